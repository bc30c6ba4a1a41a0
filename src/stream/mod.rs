//! Delivery of the outbox to HTTP and NATS JetStream destinations, at least once.
//!
//! Invariants:
//! - an outbox entry leaves the outbox only when its destination answered 2xx (HTTP) or
//!   acknowledged the publish (JetStream), or into the dead
//!   letters with its reason: nothing stored is dropped on the way out;
//! - per destination, events go out in the order they were stored: a delivery waiting for its
//!   retry holds back the ones after it (a dead one does not);
//! - destinations are served concurrently, so one that is down never delays another.

pub mod http;
pub mod nats;
pub mod retry;
mod transport;

use crate::config::{Config, Destination};
use crate::stop::Stop;
use crate::store::{Delivery, Store};
use anyhow::Result;
use rand::SeedableRng;
use retry::{Decision, backoff, decide};
use serde::Serialize;
use std::time::Duration;

/// The time source for delivery decisions; tests pass their own so no test sleeps through a
/// backoff.
pub use crate::clock::{Clock, SystemClock};

/// What one delivery round did for one destination.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DestinationReport {
    pub destination: String,
    pub delivered: usize,
    /// Attempts that failed and were scheduled again.
    pub retried: usize,
    /// Deliveries that went dead in this round.
    pub dead: usize,
    /// Entries left in the outbox after the round.
    pub pending: usize,
    /// When the first remaining entry is due (unix ms).
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<String>,
}

/// Delivers every due outbox entry of every configured destination, concurrently across
/// destinations, in order within each. `seed` feeds the backoff jitter.
pub fn deliver_due(config: &Config, store: &Store, clock: &dyn Clock, seed: u64) -> Result<Vec<DestinationReport>> {
    deliver_due_until(config, store, clock, seed, &Stop::new())
}

/// Like [`deliver_due`], stopping between deliveries once `stop` is set (shutdown).
pub fn deliver_due_until(
    config: &Config,
    store: &Store,
    clock: &dyn Clock,
    seed: u64,
    stop: &Stop,
) -> Result<Vec<DestinationReport>> {
    let _round = store.lock_delivery();
    let reports = std::thread::scope(|scope| {
        let handles: Vec<_> = config
            .destinations
            .iter()
            .map(|d| {
                let dest_seed = seed ^ u64::from(crc32fast::hash(d.name.as_bytes()));
                scope.spawn(move || deliver_destination(d, store, clock, dest_seed, stop))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("delivery thread panicked"))))
            .collect::<Result<Vec<_>>>()
    })?;
    store.flush()?;
    Ok(reports)
}

/// Outbox entries read at a time.
const CHUNK: usize = 256;
/// Acknowledged deliveries are recorded at least this often (and at the end of every chunk),
/// so a crash re-sends at most a chunk, or this much time, of deliveries.
const RECORD_EVERY: Duration = Duration::from_millis(100);

fn deliver_destination(
    dest: &Destination,
    store: &Store,
    clock: &dyn Clock,
    seed: u64,
    stop: &Stop,
) -> Result<DestinationReport> {
    let mut report = DestinationReport { destination: dest.name.clone(), ..DestinationReport::default() };
    let mut acked = Acknowledged { seqs: Vec::with_capacity(CHUNK), since: std::time::Instant::now() };
    let drained = drain(dest, store, clock, seed, stop, &mut report, &mut acked);
    // Recorded whatever happened above: an acknowledged delivery must not be sent again
    // needlessly (and if this fails, it is: at least once).
    let recorded = acked.record(store, &dest.name);
    drained?;
    recorded?;
    report.pending = store.pending_count(&dest.name);
    Ok(report)
}

/// Deliveries acknowledged but not yet recorded.
struct Acknowledged {
    seqs: Vec<u64>,
    /// When the first of `seqs` was acknowledged.
    since: std::time::Instant,
}

impl Acknowledged {
    fn push(&mut self, seq: u64) {
        if self.seqs.is_empty() {
            self.since = std::time::Instant::now();
        }
        self.seqs.push(seq);
    }

    fn record(&mut self, store: &Store, destination: &str) -> Result<()> {
        store.delivered_all(destination, &self.seqs)?;
        self.seqs.clear();
        Ok(())
    }
}

fn drain(
    dest: &Destination,
    store: &Store,
    clock: &dyn Clock,
    seed: u64,
    stop: &Stop,
    report: &mut DestinationReport,
    acked: &mut Acknowledged,
) -> Result<()> {
    // Built at the first due delivery, so an idle round reads no certificates. A certificate or
    // key that can no longer be loaded fails the attempt like a destination that is down: the
    // delivery is retried with the reason, not dropped.
    let mut sender: Option<Result<Sender, String>> = None;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let max_age_ms = i64::try_from(dest.max_age.as_millis()).unwrap_or(i64::MAX);
    let mut from = 0;
    loop {
        let entries = store.pending_entries(&dest.name, from, CHUNK)?;
        if entries.is_empty() {
            return Ok(());
        }
        for entry in &entries {
            if stop.is_cancelled() {
                return Ok(());
            }
            from = entry.seq + 1;
            let schedule = store.schedule_of(entry)?;
            let now = clock.now_ms();
            if schedule.next_attempt_at > now {
                report.next_attempt_at = Some(schedule.next_attempt_at);
                return Ok(()); // the head of the line is waiting: keep the order
            }
            let Some(body) = store.event_bytes(entry.seq)? else {
                let mut delivery = store.delivery_of(entry)?;
                bury(store, &mut delivery, "the event is missing from the store".into(), report)?;
                continue;
            };
            let sender = sender.get_or_insert_with(|| Sender::new(dest));
            let outcome = match sender {
                Ok(sender) => sender.send(&schedule.event_id, schedule.event_type.name(), &body, now),
                Err(reason) => retry::Outcome::Transport { reason: reason.clone() },
            };
            if let retry::Outcome::Acknowledged { duplicate: true } = outcome {
                tracing::debug!(destination = %dest.name, event = %schedule.event_id, "the stream already had this event");
            }
            // A failed attempt: the whole record is read to update it.
            let failed = || -> Result<Delivery> {
                let mut delivery = store.delivery_of(entry)?;
                delivery.attempts += 1;
                delivery.last_status = outcome.status();
                Ok(delivery)
            };
            match decide(&outcome) {
                Decision::Success => {
                    acked.push(entry.seq);
                    report.delivered += 1;
                    if acked.since.elapsed() >= RECORD_EVERY {
                        acked.record(store, &dest.name)?;
                    }
                }
                Decision::Dead { reason } => {
                    let mut delivery = failed()?;
                    tracing::warn!(destination = %dest.name, event = %delivery.event_id, %reason, "delivery is dead");
                    bury(store, &mut delivery, reason, report)?;
                }
                Decision::Retry { reason, not_before } => {
                    let mut delivery = failed()?;
                    let wait = backoff(delivery.attempts, dest.backoff_initial, dest.backoff_max, not_before, &mut rng);
                    // Every delivery is tried at least once; the last retry is pulled in to the
                    // max_age deadline rather than dropped before it.
                    let deadline = delivery.enqueued_at.saturating_add(max_age_ms);
                    let due = now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)).min(deadline);
                    if delivery.attempts >= dest.max_attempts {
                        let reason = format!("{reason}; gave up after {} attempts (max_attempts)", delivery.attempts);
                        bury(store, &mut delivery, reason, report)?;
                        continue;
                    }
                    if now >= deadline {
                        let age = humantime::format_duration(dest.max_age);
                        bury(store, &mut delivery, format!("{reason}; not delivered within max_age ({age})"), report)?;
                        continue;
                    }
                    tracing::info!(destination = %dest.name, event = %delivery.event_id, %reason, attempts = delivery.attempts, retry_in = %humantime::format_duration(Duration::from_millis(wait.as_millis() as u64)), "delivery will be retried");
                    delivery.next_attempt_at = due;
                    delivery.last_error = Some(reason.clone());
                    store.reschedule(&delivery)?;
                    report.retried += 1;
                    report.last_error = Some(reason);
                    report.next_attempt_at = Some(due);
                    return Ok(()); // keep the order: later events wait for this one
                }
            }
        }
        acked.record(store, &dest.name)?;
    }
}

/// The sending half of one destination, by kind.
enum Sender {
    Http(http::Sender),
    Nats(Box<nats::Sender>),
}

impl Sender {
    /// Fails when an https destination's TLS settings cannot be loaded (said with the reason).
    fn new(dest: &Destination) -> Result<Sender, String> {
        match nats::Sender::new(dest) {
            Some(nats) => Ok(Sender::Nats(Box::new(nats))),
            None => http::Sender::new(dest)
                .map(Sender::Http)
                .map_err(|e| format!("cannot set up TLS for destination {:?}: {e}", dest.name)),
        }
    }

    fn send(&mut self, event_id: &str, event_type: &str, body: &[u8], now_ms: i64) -> retry::Outcome {
        match self {
            Sender::Http(http) => http.send(event_id, event_type, body, now_ms),
            Sender::Nats(nats) => nats.send(event_id, event_type, body),
        }
    }
}

fn bury(store: &Store, delivery: &mut Delivery, reason: String, report: &mut DestinationReport) -> Result<()> {
    delivery.last_error = Some(reason.clone());
    store.bury(delivery)?;
    report.dead += 1;
    report.last_error = Some(reason);
    Ok(())
}
