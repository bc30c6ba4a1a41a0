//! `policy-audit deliveries`: the outbox and dead letters per destination; `deliveries retry`
//! re-queues dead entries and delivers what is due. Also the delivery summary `reconcile` prints.

use super::{DeliveriesRequest, DeliveryState, EXIT_FAILED, EXIT_UNUSABLE, Output};
use crate::config::Config;
use crate::event::rfc3339_millis;
use crate::store::{Delivery, Store};
use crate::stream::{Clock, DestinationReport, SystemClock, deliver_due};

/// Each destination's outbox is served by the instance holding its lease; re-queueing on a
/// replica would send from the wrong place.
const CLUSTER_DELIVERIES: &str = "in cluster mode `deliveries retry` and `deliveries replay` are run by the daemon that holds the destination's lease: start `policy-audit run` (the command is then passed to it)";

/// Lists pending and dead deliveries.
pub fn run(config: &Config, store: &Store, args: &DeliveriesRequest) -> Output {
    let known = |name: &String| -> anyhow::Result<bool> {
        Ok(config.destinations.iter().any(|d| &d.name == name) || store.destinations_with_entries()?.contains(name))
    };
    if let Some(name) = &args.destination {
        match known(name) {
            Ok(true) => {}
            Ok(false) => {
                return Output::unusable(format!(
                    "destination {name:?} is not in {} and has no deliveries",
                    config.source.display()
                ));
            }
            Err(e) => return Output::unusable(format!("{e:#}")),
        }
    }
    list(store, args)
}

/// Re-queues dead deliveries (of one destination, or all) and delivers what is due.
pub fn retry(config: &Config, store: &Store, destination: Option<&str>) -> Output {
    if config.cluster.is_some() {
        return Output::unusable(CLUSTER_DELIVERIES);
    }
    if let Some(name) = destination
        && !config.destinations.iter().any(|d| d.name == name)
    {
        return Output::unusable(format!(
            "destination {name:?} is not in the config: its deliveries cannot be sent; add it back first"
        ));
    }
    let mut out = Output::default();
    match store.requeue_dead(destination, SystemClock.now_ms()) {
        Ok(n) => out.out_line(format!("re-queued {n} dead deliver{}", if n == 1 { "y" } else { "ies" })),
        Err(e) => return Output::unusable(format!("{e:#}")),
    }
    deliver_now(config, store, &mut out);
    out
}

/// Queues the stored history (from `since`) that `destination` has not had, in trail order, and
/// delivers what is due.
pub fn replay(config: &Config, store: &Store, destination: &str, since: Option<&str>) -> Output {
    if config.cluster.is_some() {
        return Output::unusable(CLUSTER_DELIVERIES);
    }
    let mut out = Output::default();
    match queue_history(config, store, destination, since) {
        Ok(n) => out.out_line(format!(
            "queued {n} stored event{} for destination {destination}",
            if n == 1 { "" } else { "s" }
        )),
        Err(e) => return Output::unusable(e),
    }
    deliver_now(config, store, &mut out);
    out
}

/// Queues the history `destination` has not had (see [`Store::enqueue_history`]); the error is
/// the message for the user.
pub fn queue_history(config: &Config, store: &Store, destination: &str, since: Option<&str>) -> Result<usize, String> {
    if destination.is_empty() {
        return Err("deliveries replay needs --destination NAME".into());
    }
    let Some(dest) = config.destinations.iter().find(|d| d.name == destination) else {
        return Err(format!(
            "destination {destination:?} is not in {}: add it there first, then replay",
            config.source.display()
        ));
    };
    let since = since.map(|s| super::events::time_bound(s, false)).transpose().map_err(|e| format!("--since: {e}"))?;
    let wants = |e: &crate::event::AuditEvent| {
        let mut paths: Vec<&str> = vec![e.entity_path.as_str()];
        paths.extend(e.details.linked_namespaces.iter().map(String::as_str));
        dest.wants(e.event_type, &paths)
    };
    store.enqueue_history(destination, since.as_deref(), &wants, SystemClock.now_ms()).map_err(|e| format!("{e:#}"))
}

fn list(store: &Store, args: &DeliveriesRequest) -> Output {
    let dest = args.destination.as_deref();
    let mut rows: Vec<(&str, Delivery)> = Vec::new();
    let want = |s: DeliveryState| args.state.is_none_or(|w| w == s);
    let result = (|| -> anyhow::Result<()> {
        if want(DeliveryState::Pending) {
            rows.extend(store.pending(dest)?.into_iter().map(|d| ("pending", d)));
        }
        if want(DeliveryState::Dead) {
            rows.extend(store.dead(dest)?.into_iter().map(|d| ("dead", d)));
        }
        Ok(())
    })();
    if let Err(e) = result {
        return Output::unusable(format!("{e:#}"));
    }
    if args.json {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|(state, d)| {
                let mut v = serde_json::to_value(d).unwrap_or_default();
                v["state"] = serde_json::json!(state);
                v
            })
            .collect();
        return Output { stdout: serde_json::to_string_pretty(&items).unwrap_or_default() + "\n", ..Output::default() };
    }
    if rows.is_empty() {
        return Output { stdout: "no deliveries\n".into(), ..Output::default() };
    }
    let mut text = format!(
        "{:<16} {:<8} {:<36} {:<33} {:>8}  {:<24}  LAST ERROR\n",
        "DESTINATION", "STATE", "EVENT", "TYPE", "ATTEMPTS", "NEXT ATTEMPT"
    );
    for (state, d) in &rows {
        let next = if *state == "dead" { "-".to_string() } else { time(d.next_attempt_at) };
        text.push_str(&format!(
            "{:<16} {:<8} {:<36} {:<33} {:>8}  {:<24}  {}\n",
            d.destination,
            state,
            d.event_id,
            d.event_type.name(),
            d.attempts,
            next,
            d.last_error.as_deref().unwrap_or("-")
        ));
    }
    Output { stdout: text, ..Output::default() }
}

fn time(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(rfc3339_millis).unwrap_or_else(|_| ms.to_string())
}

/// Delivers what is due and prints one line per destination; a delivery that went dead makes
/// the command fail (exit 1), one queued for retry does not.
pub fn deliver_now(config: &Config, store: &Store, out: &mut Output) -> Vec<DestinationReport> {
    if config.destinations.is_empty() {
        return Vec::new();
    }
    let seed = SystemClock.now_ms() as u64;
    match deliver_due(config, store, &SystemClock, seed) {
        Ok(reports) => {
            for r in &reports {
                out.out_line(describe(r));
                if r.dead > 0 {
                    out.err_line(format!(
                        "error: destination {}: {} deliver{} went dead: {}",
                        r.destination,
                        r.dead,
                        if r.dead == 1 { "y" } else { "ies" },
                        r.last_error.as_deref().unwrap_or("unknown reason")
                    ));
                    out.code = out.code.max(EXIT_FAILED);
                }
            }
            reports
        }
        Err(e) => {
            out.err_line(format!("error: delivery failed: {e:#}"));
            out.code = EXIT_UNUSABLE;
            Vec::new()
        }
    }
}

pub fn describe(r: &DestinationReport) -> String {
    let mut line = format!("destination {}: {} delivered", r.destination, r.delivered);
    if r.pending > 0 {
        let next = r.next_attempt_at.map(|t| format!(", next attempt at {}", time(t))).unwrap_or_default();
        let why = r
            .last_error
            .as_ref()
            .filter(|_| r.retried > 0)
            .map(|e| format!(" (last error: {})", crate::text::escape_controls(e)))
            .unwrap_or_default();
        line.push_str(&format!(", {} queued for retry{next}{why}", r.pending));
    }
    if r.dead > 0 {
        line.push_str(&format!(", {} dead", r.dead));
    }
    line
}
