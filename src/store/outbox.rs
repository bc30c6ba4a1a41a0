//! The delivery outbox and the dead letters: what the delivery engine reads and moves.
//!
//! Keys are `(destination, 0, seq)`, so one destination's deliveries are a contiguous range in
//! trail order. Updates are durable at the next [`Store::flush`]; losing one to a crash means an
//! event is delivered again (at least once), never that it is lost.
//!
//! The delivery loop reads entries a chunk at a time ([`Store::pending_entries`]), decodes only
//! their schedule, borrowed ([`Store::schedule_of`]), and records acknowledged deliveries a
//! chunk at a time ([`Store::delivered_all`]): an acknowledged entry stays in the outbox until
//! its chunk is recorded, so a crash before that sends it again, never loses it.

use super::{Delivery, Store, StoreError};
use crate::event::EventType;
use anyhow::Result;
use serde::Deserialize;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::borrow::Cow;

/// Outbox operations used by the delivery engine. Updates are durable at the next
/// [`Store::flush`]; losing one to a crash means an event is delivered again (at least once),
/// never that it is lost.
impl Store {
    /// The canonical JSON of event `seq` (decompressed): the exact body that is streamed.
    pub fn event_bytes(&self, seq: u64) -> Result<Option<sled::IVec>> {
        let Some(stored) = self.stored_body(seq)? else { return Ok(None) };
        Ok(Some(self.event_json_ivec(seq, stored)?))
    }

    /// The first pending delivery of `destination` at or after `from_seq`.
    pub fn next_pending(&self, destination: &str, from_seq: u64) -> Result<Option<Delivery>> {
        let prefix = destination_prefix(destination);
        let start = delivery_key(destination, from_seq);
        match self.outbox.range(start..).next() {
            Some(item) => {
                let (k, v) = item?;
                if k.starts_with(&prefix) { Ok(Some(self.decode_delivery("outbox", &k, &v)?)) } else { Ok(None) }
            }
            None => Ok(None),
        }
    }

    /// Up to `limit` outbox entries of `destination` from `from_seq` on, in order, as stored.
    pub fn pending_entries(&self, destination: &str, from_seq: u64, limit: usize) -> Result<Vec<PendingEntry>> {
        let end = delivery_key(destination, u64::MAX);
        let mut entries = Vec::with_capacity(limit.min(1024));
        for item in self.outbox.range(delivery_key(destination, from_seq)..=end).take(limit) {
            let (key, value) = item.map_err(|e| self.sled(e))?;
            let seq = self.decode_seq_key("outbox", &key[key.len().saturating_sub(8)..])?;
            entries.push(PendingEntry { seq, key, value });
        }
        Ok(entries)
    }

    /// What the delivery loop needs of an entry, borrowed from it (nothing copied).
    pub fn schedule_of<'e>(&self, entry: &'e PendingEntry) -> Result<Schedule<'e>, StoreError> {
        serde_json::from_slice(&entry.value).map_err(|_| {
            // The full decode says what is wrong with the record.
            match self.decode_delivery("outbox", &entry.key, &entry.value) {
                Err(e) => e,
                Ok(_) => StoreError::Damaged {
                    what: format!("delivery of event #{} does not decode", entry.seq),
                    location: format!("tree \"outbox\" in {}", self.dir.display()),
                },
            }
        })
    }

    /// The whole record of an entry (to reschedule or bury it).
    pub fn delivery_of(&self, entry: &PendingEntry) -> Result<Delivery, StoreError> {
        self.decode_delivery("outbox", &entry.key, &entry.value)
    }

    pub fn reschedule(&self, delivery: &Delivery) -> Result<()> {
        self.outbox.insert(delivery_key(&delivery.destination, delivery.seq), serde_json::to_vec(delivery)?)?;
        Ok(())
    }

    /// Records deliveries of `destination` as acknowledged: all into `sent`, then all out of the
    /// outbox. A crash in between, or before, leaves them pending, so they are sent again (at
    /// least once), never lost. Plain writes rather than a `sled::Batch`: each key stands alone,
    /// and a batch seals sled's log buffer to be atomic (measured: more log writes, more memory).
    pub fn delivered_all(&self, destination: &str, seqs: &[u64]) -> Result<()> {
        let keys: Vec<Vec<u8>> = seqs.iter().map(|seq| delivery_key(destination, *seq)).collect();
        for key in &keys {
            self.sent.insert(key.as_slice(), &[])?;
        }
        for key in keys {
            self.outbox.remove(key)?;
        }
        Ok(())
    }

    /// Moves a delivery from the outbox to the dead letters, atomically.
    pub fn bury(&self, delivery: &Delivery) -> Result<()> {
        let key = delivery_key(&delivery.destination, delivery.seq);
        let value = serde_json::to_vec(delivery)?;
        (&self.outbox, &self.dead)
            .transaction(|(outbox, dead)| {
                outbox.remove(key.as_slice())?;
                dead.insert(key.as_slice(), value.as_slice())?;
                Ok::<_, ConflictableTransactionError<String>>(())
            })
            .map_err(|e: TransactionError<String>| anyhow::anyhow!("cannot move delivery to dead letters: {e}"))
    }

    /// Puts dead deliveries (of one destination, or all) back into the outbox, due now, with
    /// their attempt count reset. Returns how many.
    pub fn requeue_dead(&self, destination: Option<&str>, now_ms: i64) -> Result<usize> {
        let dead = self.dead(destination)?;
        for d in &dead {
            let key = delivery_key(&d.destination, d.seq);
            let mut again = d.clone();
            again.attempts = 0;
            again.next_attempt_at = now_ms;
            again.enqueued_at = now_ms;
            let value = serde_json::to_vec(&again)?;
            (&self.outbox, &self.dead)
                .transaction(|(outbox, dead)| {
                    dead.remove(key.as_slice())?;
                    outbox.insert(key.as_slice(), value.as_slice())?;
                    Ok::<_, ConflictableTransactionError<String>>(())
                })
                .map_err(|e: TransactionError<String>| anyhow::anyhow!("cannot re-queue delivery: {e}"))?;
        }
        self.flush()?;
        Ok(dead.len())
    }

    /// Destination names that have pending or dead deliveries.
    pub fn destinations_with_entries(&self) -> Result<Vec<String>> {
        let mut names = std::collections::BTreeSet::new();
        for tree in [&self.outbox, &self.dead] {
            let mut key: Vec<u8> = Vec::new();
            loop {
                let next = tree.range(key.clone()..).next();
                let Some(item) = next else { break };
                let (k, _) = item?;
                let name_end = k.iter().position(|b| *b == 0).unwrap_or(k.len());
                names.insert(String::from_utf8_lossy(&k[..name_end]).into_owned());
                // Skip past every key of this destination.
                key = k[..name_end].to_vec();
                key.push(1);
            }
        }
        Ok(names.into_iter().collect())
    }
}

/// One outbox entry as stored: read once, decoded as far as needed.
pub struct PendingEntry {
    pub seq: u64,
    key: sled::IVec,
    value: sled::IVec,
}

/// The fields of a stored [`Delivery`] that one attempt needs; the rest of the record (the
/// destination, which the caller knows, and the last error) is not decoded.
#[derive(Debug, Deserialize)]
pub struct Schedule<'a> {
    #[serde(borrow)]
    pub event_id: Cow<'a, str>,
    pub event_type: EventType,
    pub next_attempt_at: i64,
}

pub(crate) fn destination_prefix(destination: &str) -> Vec<u8> {
    let mut k = destination.as_bytes().to_vec();
    k.push(0);
    k
}

pub(crate) fn delivery_key(destination: &str, seq: u64) -> Vec<u8> {
    let mut k = destination_prefix(destination);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}
