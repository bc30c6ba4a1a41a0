//! Events by id: the id list (`ID`), whose entries are the id's hash and the sequence number,
//! and the young ids (`YOUNG`) gathered before they are settled into it.
//!
//! Invariant: a young id is settled into the id list before it leaves the young list, so a crash
//! in between leaves it in both and never in neither.

use super::super::blocks::{self, Entry};
use super::super::{Store, StoreError};
use super::{StoredEvent, prefix};
use crate::event::AuditEvent;

/// Every event by its id: the entry is the first 8 bytes of the id's SHA-256 (instead of the
/// time) and the sequence number. Two ids may share those bytes: a lookup reads the events
/// it finds and compares their ids.
pub(super) const ID: u8 = b'i';
/// The ids of the newest events, not yet in [`ID`]: the entry is the sequence number and the
/// id's hash, so a batch appends to its last block. Hashes put every id somewhere else in
/// [`ID`], and sled costs ≈ 600 bytes of disk for every place written at random, so ids are
/// gathered here and settled into [`ID`] [`YOUNG_IDS`] at a time, in one sorted pass. Also kept
/// in memory (≈ 1.5 MiB at most), where lookups search them.
pub(super) const YOUNG: u8 = b'n';
/// Young ids settled at once: a pass over a store of 1,000,000 events rewrites about half of
/// the id list's blocks.
pub(in crate::store) const YOUNG_IDS: usize = 65_536;

/// The first 8 bytes of the SHA-256 of `id`.
pub(in crate::store) fn id_hash(id: &str) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
}

/// A young id's (hash, seq): its entry in [`YOUNG`] is the other way round, (seq, hash).
pub(super) fn young_id(e: &Entry) -> (u64, u64) {
    (blocks::seq_of(e), blocks::head_of(e))
}

/// The list of ids, and the entry of `id` (of event `seq`) in it.
pub(in crate::store) fn id_entry(id: &str, seq: u64) -> (Vec<u8>, Entry) {
    (prefix(ID, ""), blocks::entry(id_hash(id), seq))
}

impl Store {
    /// The young ids, as kept in memory.
    pub(super) fn young(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(u64, u64)>> {
        self.young_ids.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the young ids into memory (at open).
    pub(in crate::store) fn load_young_ids(&self) -> Result<(), StoreError> {
        let mut young = std::collections::BTreeSet::new();
        for entry in self.list_range(&prefix(YOUNG, ""), (None, None), false) {
            young.insert(young_id(&entry?));
        }
        *self.young() = young;
        Ok(())
    }

    /// Notes the young ids a committed batch added; settles them into the id list once there
    /// are [`YOUNG_IDS`]. Called with the writer's lock held.
    pub(in crate::store) fn added_young_ids(&self, added: impl Iterator<Item = (u64, u64)>) -> Result<(), StoreError> {
        let count = {
            let mut young = self.young();
            young.extend(added);
            young.len()
        };
        if count < self.young_limit {
            return Ok(());
        }
        // Into the id list first, then out of the young list: sled keeps writes in order, so a
        // crash in between leaves them in both (lookups find the same event twice; the next
        // pass adds them again, and blocks keep an entry once).
        let started = std::time::Instant::now();
        let settled: Vec<Entry> = self.young().iter().map(|&(hash, seq)| blocks::entry(hash, seq)).collect();
        blocks::add(&self.index, &self.index, &prefix(ID, ""), &settled).map_err(|e| self.sled(e))?;
        let young_list = prefix(YOUNG, "");
        for key in self.index.scan_prefix(&young_list).keys() {
            self.index.remove(key.map_err(|e| self.sled(e))?).map_err(|e| self.sled(e))?;
        }
        self.young().clear();
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(ids = settled.len(), ms, "settled the newest event ids into the id index");
        Ok(())
    }

    /// Event by its id, with its sequence number.
    pub fn event_by_id(&self, id: &str) -> anyhow::Result<Option<(u64, AuditEvent)>> {
        let Some(seq) = self.seq_of_id(id)? else { return Ok(None) };
        Ok(Some((seq, self.event_at(seq)?)))
    }

    /// Event by its id, as stored, with its sequence number.
    pub fn stored_event_by_id(&self, id: &str) -> anyhow::Result<Option<(u64, StoredEvent)>> {
        let Some(seq) = self.seq_of_id(id)? else { return Ok(None) };
        Ok(Some((seq, self.stored_event_at(seq)?)))
    }

    /// The number of the stored event with this id: the young ids and the entries of the id
    /// list that share its hash, each event read to compare the id itself.
    pub(in crate::store) fn seq_of_id(&self, id: &str) -> Result<Option<u64>, StoreError> {
        #[derive(serde::Deserialize)]
        struct Id<'a> {
            #[serde(borrow)]
            id: std::borrow::Cow<'a, str>,
        }
        let (list, probe) = id_entry(id, 0);
        let hash = blocks::head_of(&probe);
        let young: Vec<u64> = self.young().range((hash, 0)..=(hash, u64::MAX)).map(|&(_, seq)| seq).collect();
        let span = (Some(probe), hash.checked_add(1).map(|next| blocks::entry(next, 0)));
        let settled = self.list_range(&list, span, false).map(|entry| entry.map(|e| blocks::seq_of(&e)));
        for seq in young.into_iter().map(Ok).chain(settled) {
            let seq = seq?;
            let event = StoredEvent { json: self.event_json_at(seq)? };
            let stored: Id = self.read_stored(seq, &event)?;
            if stored.id == id {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }
}
