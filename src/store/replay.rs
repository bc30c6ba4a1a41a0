//! `deliveries replay`: queues stored events for a destination that has not had them (one
//! added later, or one whose filters widened), in trail order.
//!
//! Invariant: an event is queued for a destination at most once over the life of the store. It
//! is skipped when it is pending or dead for that destination, or was already delivered there
//! (the `sent` tree); deliveries made before `sent` existed are not known, and a receiver dedupes
//! those on the event id (JetStream does, within its duplicate window).

use super::{Delivery, Store, delivery_key};
use crate::event::AuditEvent;
use anyhow::{Context, Result};

impl Store {
    /// Queues, in sequence order, every stored event created at or after `since` (RFC 3339,
    /// compared as stored) that `wants` accepts and `destination` has not had. Flushed before
    /// returning. Returns how many were queued.
    pub fn enqueue_history(
        &self,
        destination: &str,
        since: Option<&str>,
        wants: &dyn Fn(&AuditEvent) -> bool,
        now_ms: i64,
    ) -> Result<usize> {
        let _round = self.lock_delivery();
        let mut queued = 0;
        for item in self.bodies_from(0) {
            let (seq, bytes) = item?;
            let event: AuditEvent = self.decode_event(seq, &bytes)?;
            if since.is_some_and(|s| event.created_at.as_str() < s) || !wants(&event) {
                continue;
            }
            let dkey = delivery_key(destination, seq);
            let known = self.outbox.contains_key(&dkey).map_err(|e| self.sled(e))?
                || self.dead.contains_key(&dkey).map_err(|e| self.sled(e))?
                || self.sent.contains_key(&dkey).map_err(|e| self.sled(e))?;
            if known {
                continue;
            }
            let delivery = Delivery::queued(destination, seq, &event, now_ms);
            self.outbox.insert(dkey, serde_json::to_vec(&delivery)?).map_err(|e| self.sled(e))?;
            queued += 1;
        }
        self.flush().with_context(|| format!("cannot queue the history for destination {destination:?}"))?;
        Ok(queued)
    }
}
