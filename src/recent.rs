//! What was made of recently read events, kept: the newest page of the trail is read again and
//! again (a browser left open, a SIEM polling the API). The store keeps their JSON decompressed
//! (decompressing was the largest part of serving them); the events page keeps their rendered
//! rows. Events never change once stored, so an entry is valid as long as the process runs;
//! `verify` reads the stored bodies, never this.
//!
//! Direct-mapped by sequence number: consecutive events (a page) take distinct slots, and a
//! slot holds at most one event, so the memory is bounded by [`SLOTS`] events.

use std::sync::Mutex;

/// The newest 20 pages of 50 (≈ 1.1 MB of JSON, or of rows, with the usual events).
pub const SLOTS: usize = 1024;

/// `T` is cheap to clone (shared bytes, an `Arc`): a reader takes its own handle.
pub struct Recent<T> {
    slots: Vec<Mutex<Option<(u64, T)>>>,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent { slots: (0..SLOTS).map(|_| Mutex::new(None)).collect() }
    }
}

impl<T: Clone> Recent<T> {
    fn slot(&self, seq: u64) -> std::sync::MutexGuard<'_, Option<(u64, T)>> {
        let slot = &self.slots[(seq % SLOTS as u64) as usize];
        slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What is kept of event `seq`, if anything.
    pub fn get(&self, seq: u64) -> Option<T> {
        self.slot(seq).as_ref().filter(|(kept, _)| *kept == seq).map(|(_, value)| value.clone())
    }

    /// Keeps `value` for event `seq`, in place of the event its slot held.
    pub fn put(&self, seq: u64, value: &T) {
        *self.slot(seq) = Some((seq, value.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_kept_until_another_takes_its_slot() {
        let recent: Recent<sled::IVec> = Recent::default();
        assert!(recent.get(5).is_none());
        recent.put(5, &sled::IVec::from(&b"five"[..]));
        assert_eq!(recent.get(5).as_deref(), Some(&b"five"[..]));
        // Same slot, another event: never answered for the one before.
        recent.put(5 + SLOTS as u64, &sled::IVec::from(&b"later"[..]));
        assert!(recent.get(5).is_none());
        assert_eq!(recent.get(5 + SLOTS as u64).as_deref(), Some(&b"later"[..]));
    }
}
