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
/// rewrites one, and in a random order every addition lands in a different block. 32: at
/// 1,000,000 events the store takes 1,357 bytes per event (1,752 with 64, 1,227 with 16) and
/// opening it for a listing 63.4 MiB (62.2 with 64, 67.8 with 16; `bench growth`).
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
    /// For each list and the times its new entries span, the keys from the block holding the
    /// oldest (or the list's start) to the first block past the newest; for each single entry
    /// to add (`points`: entries spread over their list), the block holding it and the next.
    pub(super) fn around<'a>(
        tree: &sled::Tree,
        spans: impl IntoIterator<Item = (&'a Vec<u8>, &'a (u64, u64))>,
        points: impl IntoIterator<Item = (&'a [u8], &'a Entry)>,
    ) -> sled::Result<Known> {
        let mut known = BTreeSet::new();
        for (list, e) in points {
            let Some(key) = (match tree.floor(list, &key_of(list, e))? {
                Some(key) => Some(key),
                None => tree.after(list, list)?,
            }) else {
                continue;
            };
            if let Some(next) = tree.after(list, &key)? {
                known.insert(next);
            }
            known.insert(key);
        }
        for (list, (oldest, newest)) in spans {
            let start = tree.floor(list, &key_of(list, &entry(*oldest, 0)))?.unwrap_or_else(|| list.clone());
            let last = key_of(list, &entry(*newest, u64::MAX));
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

/// Adds `entries` (any order, none already in it) to `list`:
/// `blocks` says where its blocks lie, `w` takes the writes.
pub(super) fn add<L: Locate, W: Writes>(blocks: &L, w: &W, list: &[u8], entries: &mut [Entry]) -> Result<(), W::Error> {
    entries.sort_unstable();
    let mut i = 0;
    while i < entries.len() {
        let probe = key_of(list, &entries[i]);
        // The block the entry belongs to; the list's first block when the entry is older than
        // all of them (moved below); a new block when the list is empty.
        let key = match blocks.floor(list, &probe)? {
            Some(key) => key,
            None => blocks.after(list, list)?.unwrap_or(probe),
        };
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
        // moves to its new first entry.
        for (n, piece) in merged.chunks(per_block * ENTRY_LEN).enumerate() {
            let piece_key = key_of(list, &piece[..ENTRY_LEN]);
            if n == 0 && piece_key != key && !old.is_empty() {
                w.remove(&key)?;
            }
            w.insert(&piece_key, piece)?;
        }
        i = upto;
    }
    Ok(())
}

/// Two sorted runs of entries, merged.
fn merge(old: &[u8], new: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(old.len() + new.len() * ENTRY_LEN);
    let mut old = old.chunks_exact(ENTRY_LEN).peekable();
    let mut new = new.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
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
    let decode = |(key, value): (sled::IVec, sled::IVec)| -> Result<Vec<Entry>, BlockError> {
        if value.is_empty() || value.len() % ENTRY_LEN != 0 || key.len() < ENTRY_LEN {
            return Err(BlockError::Damaged(format!("an index block of {} bytes", value.len())));
        }
        Ok(value.chunks_exact(ENTRY_LEN).map(|c| c.try_into().unwrap_or([0; ENTRY_LEN])).collect())
    };
    let in_low = move |e: &Entry| low.is_none_or(|l| *e >= l);
    let in_high = move |e: &Entry| high.is_none_or(|h| *e < h);
    if newest_first {
        let upper = high.map(|h| key_of(list, &h)).unwrap_or(end);
        let blocks = tree.range(list.to_vec()..upper).rev();
        Box::new(
            blocks
                .map(move |b| b.map_err(BlockError::Sled).and_then(decode))
                .flat_map(|b| match b {
                    Ok(entries) => entries.into_iter().rev().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                })
                .filter(move |e| e.as_ref().map_or(true, in_high))
                .take_while(move |e| e.as_ref().map_or(true, in_low)),
        )
    } else {
        // From the block holding `low`, or the first.
        let start = match low.map(|l| tree.floor(list, &key_of(list, &l))).transpose() {
            Ok(floor) => floor.flatten().unwrap_or_else(|| list.to_vec()),
            Err(e) => return Box::new(std::iter::once(Err(BlockError::Sled(e)))),
        };
        let blocks = tree.range(start..end);
        Box::new(
            blocks
                .map(move |b| b.map_err(BlockError::Sled).and_then(decode))
                .flat_map(|b| match b {
                    Ok(entries) => entries.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                })
                .filter(move |e| e.as_ref().map_or(true, in_low))
                .take_while(move |e| e.as_ref().map_or(true, in_high)),
        )
    }
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
            if n % 2 == 0 {
                add(&tree, &tree, list, &mut entries).expect("add");
                add(&tree, &tree, other, &mut others).expect("add other");
                continue;
            }
            let span = |e: &[Entry]| (e.iter().map(|e| e[..8].to_vec()).min(), e.iter().map(|e| e[..8].to_vec()).max());
            let time = |t: Option<Vec<u8>>| u64::from_be_bytes(t.expect("time").try_into().expect("8 bytes"));
            let spans: std::collections::BTreeMap<Vec<u8>, (u64, u64)> =
                [(list.as_slice(), &entries), (other, &others)]
                    .into_iter()
                    .map(|(l, e)| {
                        let (lo, hi) = span(e);
                        (l.to_vec(), (time(lo), time(hi)))
                    })
                    .collect();
            let known = Known::around(&tree, &spans, []).expect("known");
            tree.transaction(|tx| {
                add(&known, tx, list, &mut entries.clone())?;
                add(&known, tx, other, &mut others.clone())?;
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
            if n % 2 == 0 {
                add(&tree, &tree, list, &mut entries).expect("add");
                continue;
            }
            let points: Vec<(&[u8], &Entry)> = entries.iter().map(|e| (&list[..], e)).collect();
            let known = Known::around(&tree, [], points).expect("known");
            tree.transaction(|tx| {
                add(&known, tx, list, &mut entries.clone())?;
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
            add(&tree, &tree, list, &mut [entry(s ^ SIGN, s)]).expect("add");
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
