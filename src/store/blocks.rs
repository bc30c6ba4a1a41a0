//! The indexes' storage: sorted lists of 16-byte entries, kept in blocks of up to
//! [`BLOCK_ENTRIES`] entries, one sled key per block.
//!
//! A list is every event in time order (the time index) or the events of one project, type,
//! project + type, policy or author (the field indexes, see `index`). An entry is the event's
//! `created_at` in milliseconds (big-endian, sign bit flipped, so byte order is time order) and
//! its sequence number (big-endian: ties keep storage order). A block's key is the list's
//! prefix followed by an entry no greater than any it holds; every entry of a block is less
//! than the next block's key. A range of a list is therefore a range of blocks, read in
//! either direction.
//!
//! Why blocks: sled spends ≈ 130–180 bytes of disk and ≈ 48 bytes of memory at open per key,
//! whatever the key's size (see docs/performance.md, "Store size"). One key per index entry
//! made the seven index entries of an event cost more than the event itself; in blocks they
//! cost their 16 bytes each plus a share of a key.
//!
//! Writes: [`add`] merges new entries into the blocks they belong to and splits a block that
//! grows past [`BLOCK_ENTRIES`]. A sled transaction cannot range over a tree, so where the
//! blocks lie is read before it ([`Known::around`]): the store admits one writer of the index
//! at a time (`Store::index_write`), and the entries of one list are added in ascending order,
//! so a block the transaction splits or moves is never looked up again in it.

use std::collections::BTreeSet;
use std::ops::Bound;

/// `created_at` (ms, sign bit flipped) ++ seq, both big-endian.
pub(super) type Entry = [u8; ENTRY_LEN];
pub(super) const ENTRY_LEN: usize = 16;
/// 1 KiB blocks: rewriting one costs about what sled spends on a key anyway, and a list of N
/// entries takes N / 64 keys (half that at worst, for entries added out of time order).
pub(super) const BLOCK_ENTRIES: usize = 64;
/// Blocks that take entries anywhere (the id list: hashes) are split smaller: each addition
/// rewrites one, and in a random order every addition lands in a different block. 32 was
/// measured when every event went into the id list on its own (before the newest ids were
/// gathered, see `index`): at 1,000,000 events 1,357 bytes per event (1,752 with 64, 1,227 with
/// 16) and a listing's 63.4 MiB (62.2 with 64, 67.8 with 16; `bench growth`).
pub(super) const SCATTERED_BLOCK_ENTRIES: usize = 32;

const SIGN: u64 = 1 << 63;

/// The first 8 bytes of an entry: `created_at` in ms, or None when it is not a time as
/// events are stamped (RFC 3339, see [`crate::event::rfc3339_millis`]).
pub(super) fn time_of(created_at: &str) -> Option<u64> {
    let ts: jiff::Timestamp = created_at.parse().ok()?;
    Some((ts.as_millisecond() as u64) ^ SIGN)
}

pub(super) fn entry(time: u64, seq: u64) -> Entry {
    let mut e = [0; ENTRY_LEN];
    e[..8].copy_from_slice(&time.to_be_bytes());
    e[8..].copy_from_slice(&seq.to_be_bytes());
    e
}

pub(super) fn seq_of(e: &Entry) -> u64 {
    u64::from_be_bytes(e[8..].try_into().unwrap_or_default())
}

/// The first half of an entry (the time, or the hash of an id), as [`entry`] took it.
pub(super) fn head_of(e: &Entry) -> u64 {
    u64::from_be_bytes(e[..8].try_into().unwrap_or_default())
}

/// The `created_at` an entry was made from, as events carry it.
pub(super) fn created_at_of(e: &Entry) -> Option<String> {
    let time = u64::from_be_bytes(e[..8].try_into().ok()?);
    let ts = jiff::Timestamp::from_millisecond((time ^ SIGN) as i64).ok()?;
    Some(crate::event::rfc3339_millis(ts))
}

/// Where block writes go: the storing transaction, or the tree itself (building at open).
pub(super) trait Writes {
    type Error: From<sled::Error>;
    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, Self::Error>;
    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), Self::Error>;
    fn remove(&self, key: &[u8]) -> Result<(), Self::Error>;
}

impl Writes for sled::Tree {
    type Error = sled::Error;
    fn get(&self, key: &[u8]) -> sled::Result<Option<sled::IVec>> {
        sled::Tree::get(self, key)
    }
    fn insert(&self, key: &[u8], value: &[u8]) -> sled::Result<()> {
        sled::Tree::insert(self, key, value).map(drop)
    }
    fn remove(&self, key: &[u8]) -> sled::Result<()> {
        sled::Tree::remove(self, key).map(drop)
    }
}

impl Writes for sled::transaction::TransactionalTree {
    type Error = sled::transaction::UnabortableTransactionError;
    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, Self::Error> {
        sled::transaction::TransactionalTree::get(self, key)
    }
    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), Self::Error> {
        sled::transaction::TransactionalTree::insert(self, key, value).map(drop)
    }
    fn remove(&self, key: &[u8]) -> Result<(), Self::Error> {
        sled::transaction::TransactionalTree::remove(self, key).map(drop)
    }
}

fn key_of(list: &[u8], e: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(list.len() + ENTRY_LEN);
    k.extend_from_slice(list);
    k.extend_from_slice(e);
    k
}

/// Just past every key of `list` (lists end with a 0 separator, see `index::prefix`).
fn end_of(list: &[u8]) -> Vec<u8> {
    let mut end = list.to_vec();
    match end.last_mut() {
        Some(last) if *last < 0xff => *last += 1,
        _ => end.push(0xff),
    }
    end
}

fn block_of(list: &[u8], key: &[u8]) -> bool {
    key.len() == list.len() + ENTRY_LEN && key.starts_with(list)
}

/// Where the blocks of a list lie: the tree itself (when nothing else writes it), or the
/// block keys read before a transaction ([`Known`]).
pub(super) trait Locate {
    /// The greatest block key of `list` at most `probe`.
    fn floor(&self, list: &[u8], probe: &[u8]) -> sled::Result<Option<Vec<u8>>>;
    /// The least block key of `list` greater than `key` (the list's first with `key` = `list`).
    fn after(&self, list: &[u8], key: &[u8]) -> sled::Result<Option<Vec<u8>>>;

    /// The block an entry keyed `probe` belongs to: the one at or before it, or the list's
    /// first when it is older than all of them (None for an empty list).
    fn holding(&self, list: &[u8], probe: &[u8]) -> sled::Result<Option<Vec<u8>>> {
        match self.floor(list, probe)? {
            Some(key) => Ok(Some(key)),
            None => self.after(list, list),
        }
    }
}

impl Locate for sled::Tree {
    fn floor(&self, list: &[u8], probe: &[u8]) -> sled::Result<Option<Vec<u8>>> {
        Ok(self.range(list..=probe).next_back().transpose()?.map(|(k, _)| k.to_vec()).filter(|k| block_of(list, k)))
    }
    fn after(&self, list: &[u8], key: &[u8]) -> sled::Result<Option<Vec<u8>>> {
        let end = end_of(list);
        let range = (Bound::Excluded(key), Bound::Excluded(end.as_slice()));
        Ok(self.range::<&[u8], _>(range).next().transpose()?.map(|(k, _)| k.to_vec()).filter(|k| block_of(list, k)))
    }
}

/// The block keys a batch of additions can meet, read from the tree before the transaction.
#[derive(Default)]
pub(super) struct Known(BTreeSet<Vec<u8>>);

impl Known {
    /// For each list with the entries to add to it (sorted): the keys from the block holding
    /// the first to the first block past the last. (The transactions add to the time-ordered
    /// lists, where a batch meets a few blocks; the id list, whose entries fall anywhere, is
    /// written outside them, see `index`.)
    pub(super) fn around<'a>(
        tree: &sled::Tree,
        lists: impl IntoIterator<Item = (&'a [u8], &'a [Entry])>,
    ) -> sled::Result<Known> {
        let mut known = BTreeSet::new();
        for (list, entries) in lists {
            let (Some(first), Some(last)) = (entries.first(), entries.last()) else { continue };
            let start = tree.floor(list, &key_of(list, first))?.unwrap_or_else(|| list.to_vec());
            let last = key_of(list, last);
            for key in tree.range(start..end_of(list)).keys() {
                let key = key?;
                if block_of(list, &key) {
                    known.insert(key.to_vec());
                }
                if key.as_ref() > last.as_slice() {
                    break;
                }
            }
        }
        Ok(Known(known))
    }
}

impl Locate for Known {
    fn floor(&self, list: &[u8], probe: &[u8]) -> sled::Result<Option<Vec<u8>>> {
        let range = (Bound::Included(list), Bound::Included(probe));
        Ok(self.0.range::<[u8], _>(range).next_back().filter(|k| block_of(list, k)).cloned())
    }
    fn after(&self, list: &[u8], key: &[u8]) -> sled::Result<Option<Vec<u8>>> {
        let end = end_of(list);
        let range = (Bound::Excluded(key), Bound::Excluded(end.as_slice()));
        Ok(self.0.range::<[u8], _>(range).next().filter(|k| block_of(list, k)).cloned())
    }
}

/// Adds `entries` (sorted; one already in it is kept once) to `list`: `blocks` says where its blocks lie,
/// `w` takes the writes.
pub(super) fn add<L: Locate, W: Writes>(blocks: &L, w: &W, list: &[u8], entries: &[Entry]) -> Result<(), W::Error> {
    let mut i = 0;
    while i < entries.len() {
        let probe = key_of(list, &entries[i]);
        // A first block that takes older entries moves below; an empty list gets a new block.
        let key = blocks.holding(list, &probe)?.unwrap_or(probe);
        let next = blocks.after(list, &key)?;
        let upto = match &next {
            Some(next) => i + entries[i..].iter().take_while(|e| e[..] < next[list.len()..]).count(),
            None => entries.len(),
        };
        let old = w.get(&key)?;
        let old = old.as_deref().unwrap_or_default();
        let merged = merge(old, &entries[i..upto]);
        // Appended entries (the time-ordered lists) leave full blocks behind them; entries
        // added anywhere (the id list) split a block in equal parts, so that it takes more.
        let appended = old.len() < ENTRY_LEN || entries[i][..] > old[old.len() - ENTRY_LEN..];
        let len = merged.len() / ENTRY_LEN;
        let per_block = if appended { BLOCK_ENTRIES } else { len.div_ceil(len.div_ceil(SCATTERED_BLOCK_ENTRIES)) };
        // Every block is keyed by its first entry: a first block that took older entries
        // moves to its new first entry. The old key goes last, so that a reader outside a
        // transaction (a lookup while the young ids are settled) never misses an entry.
        let mut old_key_kept = old.is_empty();
        for piece in merged.chunks(per_block * ENTRY_LEN) {
            let piece_key = key_of(list, &piece[..ENTRY_LEN]);
            old_key_kept |= piece_key == key;
            w.insert(&piece_key, piece)?;
        }
        if !old_key_kept {
            w.remove(&key)?;
        }
        i = upto;
    }
    Ok(())
}

/// Two sorted runs of entries, merged; an entry in both is kept once (settling the young ids
/// again after a crash adds entries that are there already, see `index`).
fn merge(old: &[u8], new: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(old.len() + new.len() * ENTRY_LEN);
    let mut old = old.chunks_exact(ENTRY_LEN).peekable();
    let mut new = new.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (Some(a), Some(b)) if *a == &b[..] => {
                new.next();
            }
            (Some(a), Some(b)) if *a <= &b[..] => out.extend_from_slice(old.next().unwrap_or_default()),
            (_, Some(_)) => out.extend_from_slice(new.next().map(|e| &e[..]).unwrap_or_default()),
            (Some(_), None) => out.extend_from_slice(old.next().unwrap_or_default()),
            (None, None) => return out,
        }
    }
}

/// The entries of `list` from `low` (inclusive) to `high` (exclusive), oldest first, or
/// newest first with `newest_first`.
pub(super) fn range<'a>(
    tree: &'a sled::Tree,
    list: &[u8],
    low: Option<Entry>,
    high: Option<Entry>,
    newest_first: bool,
) -> Box<dyn Iterator<Item = Result<Entry, BlockError>> + 'a> {
    let end = end_of(list);
    let blocks: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 'a> = if newest_first {
        let upper = high.map(|h| key_of(list, &h)).unwrap_or(end);
        Box::new(tree.range(list.to_vec()..upper).rev())
    } else {
        // From the block holding `low`, or the first.
        match low.map(|l| tree.floor(list, &key_of(list, &l))).transpose() {
            Ok(floor) => Box::new(tree.range(floor.flatten().unwrap_or_else(|| list.to_vec())..end)),
            Err(e) => return Box::new(std::iter::once(Err(BlockError::Sled(e)))),
        }
    };
    let decode = move |(key, value): (sled::IVec, sled::IVec)| -> Result<Vec<Entry>, BlockError> {
        if value.is_empty() || value.len() % ENTRY_LEN != 0 || key.len() < ENTRY_LEN {
            return Err(BlockError::Damaged(format!("an index block of {} bytes", value.len())));
        }
        let entries = value.chunks_exact(ENTRY_LEN).map(|c| c.try_into().unwrap_or([0; ENTRY_LEN]));
        Ok(if newest_first { entries.rev().collect() } else { entries.collect() })
    };
    let in_low = move |e: &Entry| low.is_none_or(|l| *e >= l);
    let in_high = move |e: &Entry| high.is_none_or(|h| *e < h);
    // The first block read may hold entries before the side reading starts from (skipped);
    // reading stops at the first entry past the other side.
    let started = move |e: &Entry| if newest_first { in_high(e) } else { in_low(e) };
    let going = move |e: &Entry| if newest_first { in_low(e) } else { in_high(e) };
    Box::new(
        blocks
            .map(move |b| b.map_err(BlockError::Sled).and_then(decode))
            .flat_map(|b| match b {
                Ok(entries) => entries.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
            .filter(move |e| e.as_ref().map_or(true, started))
            .take_while(move |e| e.as_ref().map_or(true, going)),
    )
}

/// What reading a list can meet; the store turns it into a [`super::StoreError`].
#[derive(Debug)]
pub(super) enum BlockError {
    Sled(sled::Error),
    Damaged(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let tree = db.open_tree("index").expect("tree");
        (dir, tree)
    }

    fn all(tree: &sled::Tree, list: &[u8], low: Option<Entry>, high: Option<Entry>, rev: bool) -> Vec<u64> {
        range(tree, list, low, high, rev).map(|e| seq_of(&e.expect("entry"))).collect()
    }

    /// A small deterministic generator, so the order of additions is varied but repeatable.
    fn shuffled(n: u64, seed: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).collect();
        let mut x = seed;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    }

    #[test]
    fn lists_stay_sorted_whatever_order_entries_come_in_and_ranges_read_both_ways() {
        let (_dir, tree) = tree();
        let list = b"pgroup/project\0";
        let other = b"pgroup/project2\0";
        // times: seq * 10 ms, added in batches of varied size and order; a second list
        // interleaved, which must not leak into the first.
        // Every other batch goes through a transaction, with the blocks located beforehand.
        let order = shuffled(1_000, 7);
        for (n, batch) in order.chunks(37).enumerate() {
            let mut entries: Vec<Entry> = batch.iter().map(|&s| entry((s * 10) ^ SIGN, s)).collect();
            let mut others: Vec<Entry> = batch.iter().map(|&s| entry(s ^ SIGN, s + 5_000)).collect();
            entries.sort_unstable();
            others.sort_unstable();
            if n % 2 == 0 {
                add(&tree, &tree, list, &entries).expect("add");
                add(&tree, &tree, other, &others).expect("add other");
                continue;
            }
            let lists = [(&list[..], &entries[..]), (&other[..], &others[..])];
            let known = Known::around(&tree, lists).expect("known");
            tree.transaction(|tx| {
                add(&known, tx, list, &entries)?;
                add(&known, tx, other, &others)?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .expect("transaction");
        }
        let expected: Vec<u64> = (0..1_000).collect();
        assert_eq!(all(&tree, list, None, None, false), expected);
        assert_eq!(all(&tree, list, None, None, true), expected.iter().rev().copied().collect::<Vec<_>>());
        // Bounds: [250 ms, 5,000 ms) is seqs 25..500.
        let low = Some(entry(250 ^ SIGN, 0));
        let high = Some(entry(5_000 ^ SIGN, 0));
        assert_eq!(all(&tree, list, low, high, false), (25..500).collect::<Vec<_>>());
        assert_eq!(all(&tree, list, low, high, true), (25..500).rev().collect::<Vec<_>>());
        // Every block is within its size, keyed by its first entry, and below the next key.
        let blocks: Vec<_> = tree.scan_prefix(list).map(|b| b.expect("block")).collect();
        assert!(blocks.len() >= 1_000 / BLOCK_ENTRIES && blocks.len() < 1_000 / 4, "{} blocks", blocks.len());
        for (n, (key, value)) in blocks.iter().enumerate() {
            assert!(value.len() <= BLOCK_ENTRIES * ENTRY_LEN);
            assert_eq!(&key[list.len()..], &value[..ENTRY_LEN], "block {n} keyed by its first entry");
            if let Some((next, _)) = blocks.get(n + 1) {
                assert!(value[value.len() - ENTRY_LEN..] < next[list.len()..]);
            }
        }
    }

    #[test]
    fn entries_added_anywhere_split_blocks_evenly_and_are_found_through_points() {
        let (_dir, tree) = tree();
        let list = b"i\0";
        // Hash-like order: every batch lands all over the list, as event ids do.
        let order = shuffled(5_000, 11);
        for (n, batch) in order.chunks(50).enumerate() {
            let mut entries: Vec<Entry> =
                batch.iter().map(|&s| entry(s.wrapping_mul(0x9e37_79b9_7f4a_7c15), s)).collect();
            entries.sort_unstable();
            if n % 2 == 0 {
                add(&tree, &tree, list, &entries).expect("add");
                continue;
            }
            let known = Known::around(&tree, [(&list[..], &entries[..])]).expect("known");
            tree.transaction(|tx| {
                add(&known, tx, list, &entries)?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .expect("transaction");
        }
        let mut expected: Vec<(u64, u64)> = (0..5_000u64).map(|s| (s.wrapping_mul(0x9e37_79b9_7f4a_7c15), s)).collect();
        expected.sort();
        let found = all(&tree, list, None, None, false);
        assert_eq!(found, expected.iter().map(|(_, s)| *s).collect::<Vec<_>>());
        let blocks = tree.scan_prefix(list).count();
        assert!(blocks <= 5_000 / (SCATTERED_BLOCK_ENTRIES / 2) + 1, "{blocks} blocks: at least half full");
        // One entry looked up by its first 8 bytes.
        let (time, seq) = expected[1234];
        let one = all(&tree, list, Some(entry(time, 0)), Some(entry(time.saturating_add(1), 0)), false);
        assert_eq!(one, vec![seq]);
    }

    #[test]
    fn appending_in_time_order_fills_blocks() {
        let (_dir, tree) = tree();
        let list = b"T\0";
        for s in 0..640u64 {
            add(&tree, &tree, list, &[entry(s ^ SIGN, s)]).expect("add");
        }
        assert_eq!(tree.scan_prefix(list).count(), 10);
        assert_eq!(all(&tree, list, None, None, false), (0..640).collect::<Vec<_>>());
    }

    #[test]
    fn times_round_trip() {
        for at in ["2024-03-01T10:00:00.000Z", "1969-12-31T23:59:59.999Z", "2106-02-07T06:28:16.123Z"] {
            let e = entry(time_of(at).expect("time"), 42);
            assert_eq!(created_at_of(&e).as_deref(), Some(at));
            assert_eq!(seq_of(&e), 42);
        }
        let (a, b) = (time_of("1969-12-31T23:59:59.999Z"), time_of("1970-01-01T00:00:00.000Z"));
        assert!(a < b, "byte order is time order across the epoch");
        assert_eq!(time_of("yesterday"), None);
    }
}
