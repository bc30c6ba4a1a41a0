//! The canonical JSON of recently read events, kept decompressed: the newest page of the trail
//! is read again and again (a browser left open, a SIEM polling the API), and decompressing its
//! events was the largest part of serving it. Events never change once stored, so an entry is
//! valid as long as the process runs; `verify` reads the stored bodies, never this.
//!
//! Direct-mapped by sequence number: consecutive events (a page) take distinct slots, and a
//! slot holds at most one event, so the memory is bounded by [`SLOTS`] events.

use std::sync::Mutex;

/// ≈ 1.1 MB of JSON with the usual events: the newest 20 pages of 50.
pub const SLOTS: usize = 1024;

pub struct Recent {
    slots: Vec<Mutex<Option<(u64, sled::IVec)>>>,
}

impl Default for Recent {
    fn default() -> Self {
        Recent { slots: (0..SLOTS).map(|_| Mutex::new(None)).collect() }
    }
}

impl Recent {
    fn slot(&self, seq: u64) -> std::sync::MutexGuard<'_, Option<(u64, sled::IVec)>> {
        let slot = &self.slots[(seq % SLOTS as u64) as usize];
        slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Event `seq`'s JSON, when it is kept.
    pub fn get(&self, seq: u64) -> Option<sled::IVec> {
        self.slot(seq).as_ref().filter(|(kept, _)| *kept == seq).map(|(_, json)| json.clone())
    }

    /// Keeps event `seq`'s JSON, in place of the event its slot held.
    pub fn put(&self, seq: u64, json: &sled::IVec) {
        *self.slot(seq) = Some((seq, json.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_kept_until_another_takes_its_slot() {
        let recent = Recent::default();
        assert!(recent.get(5).is_none());
        recent.put(5, &sled::IVec::from(&b"five"[..]));
        assert_eq!(recent.get(5).as_deref(), Some(&b"five"[..]));
        // Same slot, another event: never answered for the one before.
        recent.put(5 + SLOTS as u64, &sled::IVec::from(&b"later"[..]));
        assert!(recent.get(5).is_none());
        assert_eq!(recent.get(5 + SLOTS as u64).as_deref(), Some(&b"later"[..]));
    }
}
