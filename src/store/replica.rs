//! The store as a replica of the cluster's trail (SPEC §11): events arrive in the stream's order
//! and are appended with the stream position they end at, in one transaction, so a restarted
//! replica resumes right after the last applied message. The outbox of a destination served by
//! another instance is settled up to that instance's published watermark.
//!
//! Every replica applies the same messages in the same order with the same id check, so the
//! local sequence numbers, and the chain, are the same on every instance.

use super::{REPLICA_POSITION, Store, StoreError, Written, decode_u64, delivery_key, destination_prefix};
use crate::event::AuditEvent;
use anyhow::Result;

impl Store {
    /// The last stream sequence applied (0 = none).
    pub fn replica_position(&self) -> Result<u64, StoreError> {
        match self.meta.get(REPLICA_POSITION).map_err(|e| self.sled(e))? {
            Some(v) => decode_u64(&self.dir, "meta", &v, || "the replica position (replica_position)".into()),
            None => Ok(0),
        }
    }

    /// The sequence number the next stored event gets (= how many events the trail has).
    pub fn next_sequence(&self) -> Result<u64, StoreError> {
        self.next_seq()
    }

    /// Appends events read from the stream, ending at stream sequence `position`.
    pub fn apply_replica(
        &self,
        position: u64,
        events: &[AuditEvent],
        destinations_for: &dyn Fn(&AuditEvent) -> Vec<String>,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let stored = self.store_events(Written::ReplicaPosition(position), events, destinations_for, now_ms)?;
        self.flush_now(stored)
    }

    /// The sequence below which every delivery of `destination` is settled (delivered or dead):
    /// its first pending entry, or the end of the trail when none is pending.
    pub fn settled_below(&self, destination: &str) -> Result<u64> {
        Ok(match self.next_pending(destination, 0)? {
            Some(d) => d.seq,
            None => self.next_seq()?,
        })
    }

    /// Marks the pending deliveries of `destination` below `seq` as sent (another instance
    /// delivered them). Returns how many.
    pub fn settle_below(&self, destination: &str, seq: u64) -> Result<usize> {
        let prefix = destination_prefix(destination);
        let mut settled = 0;
        for item in self.outbox.range(prefix.clone()..delivery_key(destination, seq)) {
            let (k, _) = item.map_err(|e| self.sled(e))?;
            self.outbox.remove(&k).map_err(|e| self.sled(e))?;
            self.sent.insert(&k, &[]).map_err(|e| self.sled(e))?;
            settled += 1;
        }
        Ok(settled)
    }
}
