//! The one-time build of the lists for a store written before this layout (one sled key per
//! entry, in `by_time` and `by_field`), with progress in the log; the old trees are dropped
//! only once the new lists are written and flushed.

use super::super::{Store, StoreError};
use super::Additions;
use crate::event::AuditEvent;

pub(super) const INDEX_VERSION: &[u8] = b"index_blocks_v2";
/// The index trees of the layout before blocks: one sled key per entry (`event_ids`: id -> seq).
pub(super) const OLD_TREES: [&str; 3] = ["by_time", "by_field", "event_ids"];
/// The marks of the layouts before (`index_blocks`: blocks without the id list).
pub(super) const OLD_MARKS: [&[u8]; 3] = [b"index_by_time", b"index_by_field", b"index_blocks"];

impl Store {
    /// Builds the indexes of a store written before this layout; once.
    pub(in crate::store) fn build_index(&self) -> Result<(), StoreError> {
        if self.meta.get(INDEX_VERSION).map_err(|e| self.sled(e))?.is_some() {
            return Ok(());
        }
        let total = self.next_seq()?;
        if total > 0 {
            tracing::info!(events = total, "building the indexes (time, project, type, policy, author) once");
        }
        self.index.clear().map_err(|e| self.sled(e))?;
        let mut additions = Additions::default();
        for (done, item) in self.bodies_from(0).enumerate() {
            let (seq, v) = item?;
            let e: AuditEvent = self.decode_event(seq, &v)?;
            additions.add_settled(&e, seq).map_err(|what| self.damaged_body(seq, what))?;
            if additions.len() >= 500_000 {
                std::mem::take(&mut additions).sorted().write(&self.index, &self.index).map_err(|e| self.sled(e))?;
            }
            if done > 0 && done % 100_000 == 0 {
                tracing::info!(indexed = done, of = total, "building the indexes");
            }
        }
        additions.sorted().write(&self.index, &self.index).map_err(|e| self.sled(e))?;
        self.meta.insert(INDEX_VERSION, &1u32.to_be_bytes()).map_err(|e| self.sled(e))?;
        self.db.flush().map_err(|e| self.sled(e))?;
        for tree in OLD_TREES {
            self.db.drop_tree(tree).map_err(|e| self.sled(e))?;
        }
        for mark in OLD_MARKS {
            self.meta.remove(mark).map_err(|e| self.sled(e))?;
        }
        self.db.flush().map_err(|e| self.sled(e))?;
        Ok(())
    }
}
