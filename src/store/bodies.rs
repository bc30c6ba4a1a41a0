//! Where event bodies are kept. sled costs about the same memory (≈ 48 bytes at open, in its
//! page table) and disk (≈ 150 bytes) per key whatever the key holds, so bodies are kept
//! [`GROUP`] consecutive events to a key in the `bodies` tree: a store of 1,000,000 events opens
//! with 62,500 body keys instead of 1,000,000.
//!
//! Invariants:
//! - the group of event `seq` is `seq / GROUP`, keyed by that number (8 bytes, big-endian); its
//!   value is its events' stored bodies (see `body`) in order, each as a 4-byte big-endian
//!   length and the bytes, from slot 0 up to the last event stored in it;
//! - an empty slot (length 0; no body is empty) means the body is in the `events` tree, one
//!   key per event: events stored before groups existed (an existing store is not rewritten),
//!   and bodies over [`GROUPED_MAX`] (rewriting a group copies its bodies);
//! - events are appended in sequence order, so a write adds slots at the end of the last
//!   group (or starts new groups), within the transaction that stores the events;
//! - every reader of a body goes through [`Store::stored_body`] or [`Store::bodies_from`]; a
//!   group that does not parse is reported as damaged, never skipped.

use super::{Store, StoreError};
use std::ops::Range;

/// Events per group: 16 keeps a group (≈ 4 KB of compressed events) cheap to rewrite when
/// events arrive one at a time, and the page table at 1/16.
pub const GROUP: u64 = 16;
/// Larger bodies are kept one key each in the `events` tree.
pub const GROUPED_MAX: usize = 64 * 1024;
const LEN: usize = 4;

/// The key of the group holding event `seq`.
pub fn group_key(seq: u64) -> [u8; 8] {
    (seq / GROUP).to_be_bytes()
}

/// The place of event `seq` in its group.
pub fn slot_of(seq: u64) -> usize {
    (seq % GROUP) as usize
}

/// The byte ranges of a group's slots, in order (empty ranges for empty slots); Err says
/// why the value is not a group.
pub fn slots(group: &[u8]) -> Result<Vec<Range<usize>>, String> {
    let mut out = Vec::with_capacity(GROUP as usize);
    let mut at = 0;
    while at < group.len() {
        if out.len() == GROUP as usize {
            return Err(format!("more than {GROUP} bodies"));
        }
        let Some(len) = group.get(at..at + LEN) else {
            return Err(format!("a body's length is cut short at byte {at}"));
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let start = at + LEN;
        let end = start.checked_add(len).filter(|&end| end <= group.len());
        let Some(end) = end else {
            return Err(format!("a body at byte {start} claims {len} bytes, past the group's end"));
        };
        out.push(start..end);
        at = end;
    }
    Ok(out)
}

/// Where event `seq`'s body lies in `group` (its group): None when its slot is empty or missing.
pub fn slot_in(group: &[u8], seq: u64) -> Result<Option<Range<usize>>, String> {
    Ok(slots(group)?.get(slot_of(seq)).filter(|r| !r.is_empty()).cloned())
}

/// `group` (None: a new one) with `body` in `slot` (None: empty). The slots before it that
/// the group lacks are added empty; the ones after it are dropped (a write only appends).
pub fn with_slot(group: Option<&[u8]>, slot: usize, body: Option<&[u8]>) -> Result<Vec<u8>, String> {
    if slot >= GROUP as usize {
        return Err(format!("slot {slot} of a group of {GROUP}"));
    }
    let group = group.unwrap_or_default();
    let ranges = slots(group)?;
    let keep = ranges.get(..slot).unwrap_or(&ranges).last().map_or(0, |r| r.end);
    let mut out = Vec::with_capacity(keep + (slot + 1) * LEN + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(&group[..keep]);
    for _ in ranges.len().min(slot)..slot {
        out.extend_from_slice(&0u32.to_be_bytes());
    }
    let body = body.unwrap_or_default();
    let len = u32::try_from(body.len()).map_err(|_| format!("a body of {} bytes is too large", body.len()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

impl Store {
    /// The stored body of event `seq` (see `body`), wherever it is kept; None when there is none.
    pub(super) fn stored_body(&self, seq: u64) -> Result<Option<sled::IVec>, StoreError> {
        match self.grouped_body(seq)? {
            Some(body) => Ok(Some(body)),
            None => self.events.get(seq.to_be_bytes()).map_err(|e| self.sled(e)),
        }
    }

    /// The body of event `seq` in its group; None when its slot is empty or missing.
    fn grouped_body(&self, seq: u64) -> Result<Option<sled::IVec>, StoreError> {
        let Some(group) = self.bodies.get(group_key(seq)).map_err(|e| self.sled(e))? else { return Ok(None) };
        let range = slot_in(&group, seq).map_err(|why| self.damaged_group(seq / GROUP, why))?;
        Ok(range.map(|r| group.subslice(r.start, r.len())))
    }

    /// Every stored body from event `from` on, in sequence order, wherever each is kept.
    pub(super) fn bodies_from(&self, from: u64) -> impl Iterator<Item = Result<(u64, sled::IVec), StoreError>> + '_ {
        let mut single = self
            .events
            .range(from.to_be_bytes()..)
            .map(|item| {
                let (key, body) = item.map_err(|e| self.sled(e))?;
                Ok((self.decode_seq_key("events", &key)?, body))
            })
            .peekable();
        let mut groups = self.bodies.range(group_key(from)..);
        let mut grouped: std::collections::VecDeque<(u64, sled::IVec)> = Default::default();
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let mut next = || -> Result<Option<(u64, sled::IVec)>, StoreError> {
                while grouped.is_empty() {
                    let Some(item) = groups.next() else { break };
                    let (key, group) = item.map_err(|e| self.sled(e))?;
                    let number = self.decode_seq_key("bodies", &key)?;
                    let ranges = slots(&group).map_err(|why| self.damaged_group(number, why))?;
                    for (i, r) in ranges.into_iter().enumerate() {
                        let seq = number * GROUP + i as u64;
                        if !r.is_empty() && seq >= from {
                            grouped.push_back((seq, group.subslice(r.start, r.len())));
                        }
                    }
                }
                // The smaller of the next grouped and the next single body (or an error).
                let single_first = match (single.peek(), grouped.front()) {
                    (Some(Err(_)), _) | (Some(Ok(_)), None) => true,
                    (Some(Ok((s, _))), Some((g, _))) => s < g,
                    (None, _) => false,
                };
                if single_first { single.next().transpose() } else { Ok(grouped.pop_front()) }
            };
            let item = next().transpose();
            failed = matches!(item, Some(Err(_)));
            item
        })
    }

    /// Event `seq`'s stored body is damaged (`what`), located in the tree that holds it.
    pub(super) fn damaged_body(&self, seq: u64, what: String) -> StoreError {
        StoreError::Damaged { what, location: format!("tree {:?} in {}", self.body_tree(seq), self.dir.display()) }
    }

    /// The tree event `seq`'s body is in, for error messages.
    pub(super) fn body_tree(&self, seq: u64) -> &'static str {
        // A group that does not decode is where the damage is.
        if self.grouped_body(seq).map_or(true, |body| body.is_some()) { "bodies" } else { "events" }
    }

    pub(super) fn damaged_group(&self, number: u64, why: String) -> StoreError {
        StoreError::Damaged {
            what: format!(
                "the bodies of events #{}..#{} do not decode ({why})",
                number * GROUP,
                number * GROUP + GROUP - 1
            ),
            location: format!("tree \"bodies\" in {}", self.dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::store::Cursor;

    /// Events stored one at a time and in batches, across groups, one of them too large for a
    /// group, read back one by one and in order, and chained.
    #[test]
    fn bodies_are_kept_in_groups_and_read_back_wherever_they_are() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("open");
        let cursor = Cursor {
            commit: "c".into(),
            blob: String::new(),
            baseline: None,
            limits: Default::default(),
            included: Default::default(),
        };
        let mut events: Vec<_> = (0..40)
            .map(|n| crate::store::index::tests::event(n, "a/spp", EventType::Update, Some("p"), "Alice"))
            .collect();
        // Event 20's name does not compress: its body is over GROUPED_MAX.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: String = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        events[20].details.policy_name = Some(noise);
        for batch in [&events[..1], &events[1..3], &events[3..30], &events[30..31], &events[31..]] {
            store.commit_reconcile("a/spp", &cursor, batch, &|_| Vec::new(), 0).expect("commit");
        }
        let jsons: Vec<Vec<u8>> = events.iter().map(|e| serde_json::to_vec(e).expect("json")).collect();
        for (seq, json) in jsons.iter().enumerate() {
            assert_eq!(store.event_json_at(seq as u64).expect("read").as_ref(), json.as_slice(), "event #{seq}");
        }
        let listed: Vec<u64> = store.bodies_from(0).map(|b| b.expect("body").0).collect();
        assert_eq!(listed, (0..40).collect::<Vec<_>>());
        let from_17: Vec<u64> = store.bodies_from(17).map(|b| b.expect("body").0).collect();
        assert_eq!(from_17, (17..40).collect::<Vec<_>>());
        assert_eq!((store.bodies.len(), store.events.len()), (3, 1), "3 groups, the large body alone");
        assert_eq!(store.event_count().expect("count"), 40);
        assert_eq!(store.body_tree(20), "events");
        assert_eq!(store.body_tree(21), "bodies");
        let verified = store.verify_chain().expect("verify");
        assert!(verified.first_break.is_none() && verified.events == 40);
    }

    #[test]
    fn slots_are_appended_padded_and_read_back() {
        let g = with_slot(None, 0, Some(b"zero")).expect("first");
        let g = with_slot(Some(&g), 1, Some(b"one")).expect("second");
        // Slot 2 empty (kept in the events tree), slot 4 skipped to.
        let g = with_slot(Some(&g), 4, Some(b"four")).expect("gap");
        let ranges = slots(&g).expect("parses");
        let bodies: Vec<&[u8]> = ranges.iter().map(|r| &g[r.clone()]).collect();
        assert_eq!(bodies, [&b"zero"[..], b"one", b"", b"", b"four"]);
        // Rewriting a slot drops the ones after it (a write only appends).
        let g = with_slot(Some(&g), 1, None).expect("empty");
        let ranges = slots(&g).expect("parses");
        assert_eq!(ranges.len(), 2);
        assert!(ranges[1].is_empty());
        assert_eq!((group_key(17), slot_of(17)), (1u64.to_be_bytes(), 1));
    }

    #[test]
    fn a_damaged_group_is_refused() {
        let g = with_slot(None, 0, Some(b"body")).expect("group");
        assert!(slots(&g[..g.len() - 1]).expect_err("cut").contains("past the group's end"));
        assert!(slots(&g[..2]).expect_err("cut").contains("cut short"));
        let mut full = Vec::new();
        for slot in 0..GROUP as usize {
            full = with_slot(Some(&full), slot, Some(b"x")).expect("slot");
        }
        assert!(with_slot(Some(&full), GROUP as usize, Some(b"x")).is_err());
        full.extend_from_slice(&[0, 0, 0, 1, b'x']);
        assert!(slots(&full).expect_err("17 bodies").contains("more than 16"));
    }
}
