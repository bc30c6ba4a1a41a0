//! The indexes, so that a page of the trail, filtered or not, reads only the events it shows,
//! at any size of the trail: all events in time order, and by project, event type, project +
//! type, policy name and author.
//!
//! Each is a list of (created_at, seq) entries in the `index` tree, kept in blocks (see
//! `blocks`): a list's prefix is `kind ++ value ++ 0`, so keyset pagination by (created_at,
//! seq) is a range of a list, read newest first for pages and oldest first for listings.
//! Entries are written in the transaction that stores their event. Stores made before this
//! layout (one sled key per entry, in `by_time` and `by_field`) get it built once at open,
//! with progress in the log, and their old index trees dropped. A filter no index answers (an
//! author substring, several projects) is checked on each event of the most selective list
//! that applies.

use super::blocks::{self, BlockError, Entry};
use super::{EventQuery, Store, StoreError};
use crate::event::AuditEvent;
use std::collections::BTreeMap;

const INDEX_VERSION: &[u8] = b"index_blocks_v2";
/// The index trees of the layout before blocks: one sled key per entry (`event_ids`: id -> seq).
const OLD_TREES: [&str; 3] = ["by_time", "by_field", "event_ids"];
/// The marks of the layouts before (`index_blocks`: blocks without the id list).
const OLD_MARKS: [&[u8]; 3] = [b"index_by_time", b"index_by_field", b"index_blocks"];
/// `created_at` as stored: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(super) const TIME_LEN: usize = 24;

/// Every event, in time order.
pub(super) const TIME: u8 = b'T';
/// Every event by its id: the entry is the first 8 bytes of the id's SHA-256 (instead of the
/// time) and the sequence number. Two ids may share those bytes: a lookup reads the events
/// it finds and compares their ids.
const ID: u8 = b'i';
/// The ids of the newest events, not yet in [`ID`]: the entry is the sequence number and the
/// id's hash, so a batch appends to its last block. Hashes put every id somewhere else in
/// [`ID`], and sled costs ≈ 600 bytes of disk for every place written at random, so ids are
/// gathered here and settled into [`ID`] [`YOUNG_IDS`] at a time, in one sorted pass. Also kept
/// in memory (≈ 1.5 MiB at most), where lookups search them.
const YOUNG: u8 = b'n';
/// Young ids settled at once: a pass over a store of 1,000,000 events rewrites about half of
/// the id list's blocks.
pub(super) const YOUNG_IDS: usize = 65_536;
pub(super) const PROJECT: u8 = b'p';
pub(super) const TYPE: u8 = b't';
pub(super) const PROJECT_TYPE: u8 = b'x';
const POLICY: u8 = b'o';
const AUTHOR: u8 = b'a';

pub(super) fn prefix(kind: u8, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(value.len() + 2);
    k.push(kind);
    k.extend_from_slice(value.as_bytes());
    k.push(0);
    k
}

/// The lists event `e` is in.
pub(super) fn lists_of(e: &AuditEvent) -> Vec<Vec<u8>> {
    let mut lists = vec![
        prefix(TIME, ""),
        prefix(PROJECT, &e.entity_path),
        prefix(TYPE, e.event_type.name()),
        prefix(PROJECT_TYPE, &format!("{}\0{}", e.entity_path, e.event_type.name())),
    ];
    if let Some(policy) = &e.details.policy_name {
        lists.push(prefix(POLICY, policy));
    }
    let name = e.author_name.to_lowercase();
    let email = e.details.author_email.to_lowercase();
    if email != name {
        lists.push(prefix(AUTHOR, &email));
    }
    lists.push(prefix(AUTHOR, &name));
    lists
}

/// The first 8 bytes of the SHA-256 of `id`.
pub(super) fn id_hash(id: &str) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
}

/// A young id's (hash, seq): its entry in [`YOUNG`] is the other way round, (seq, hash).
fn young_id(e: &Entry) -> (u64, u64) {
    (blocks::seq_of(e), blocks::head_of(e))
}

/// The list of ids, and the entry of `id` (of event `seq`) in it.
pub(super) fn id_entry(id: &str, seq: u64) -> (Vec<u8>, Entry) {
    (prefix(ID, ""), blocks::entry(id_hash(id), seq))
}

/// The entry of event `seq` in its lists, or why there is none.
pub(super) fn entry_of(e: &AuditEvent, seq: u64) -> Result<Entry, String> {
    blocks::time_of(&e.created_at)
        .map(|time| blocks::entry(time, seq))
        .ok_or_else(|| format!("event {} has a created_at that is not a time: {:?}", e.id, e.created_at))
}

/// Entries to add, by list: one write per block, however many events a batch holds.
#[derive(Default)]
pub(super) struct Additions(BTreeMap<Vec<u8>, Vec<Entry>>);

impl Additions {
    /// The entries of `events` (each with the number it is stored as), every list sorted.
    pub(super) fn of<'e>(events: impl IntoIterator<Item = (u64, &'e AuditEvent)>) -> Result<Additions, String> {
        let mut additions = Additions::default();
        for (seq, e) in events {
            additions.add(e, seq)?;
        }
        Ok(additions.sorted())
    }

    /// Event `e`, stored as number `seq`: its entry (`entry_of`) in its lists, and its id
    /// among the young ones.
    pub(super) fn add(&mut self, e: &AuditEvent, seq: u64) -> Result<(), String> {
        self.add_entries(e, seq)?;
        self.0.entry(prefix(YOUNG, "")).or_default().push(blocks::entry(seq, id_hash(&e.id)));
        Ok(())
    }

    /// Like [`Additions::add`], with the id straight in the id list (building the indexes).
    pub(super) fn add_settled(&mut self, e: &AuditEvent, seq: u64) -> Result<(), String> {
        self.add_entries(e, seq)?;
        let (list, id) = id_entry(&e.id, seq);
        self.0.entry(list).or_default().push(id);
        Ok(())
    }

    fn add_entries(&mut self, e: &AuditEvent, seq: u64) -> Result<(), String> {
        let entry = entry_of(e, seq)?;
        for list in lists_of(e) {
            self.0.entry(list).or_default().push(entry);
        }
        Ok(())
    }

    /// The young ids added: (hash, seq).
    pub(super) fn young_ids(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.get(&prefix(YOUNG, "")).into_iter().flatten().map(young_id)
    }

    /// Every list sorted, as [`Additions::known`] and [`Additions::write`] need them.
    pub(super) fn sorted(mut self) -> Additions {
        self.0.values_mut().for_each(|entries| entries.sort_unstable());
        self
    }

    /// Where their blocks lie, read before the storing transaction (which cannot range over a
    /// tree).
    pub(super) fn known(&self, tree: &sled::Tree) -> sled::Result<blocks::Known> {
        blocks::Known::around(tree, self.0.iter().map(|(list, entries)| (list.as_slice(), entries.as_slice())))
    }

    /// Writes them through `w` (see [`blocks::add`]).
    pub(super) fn write<L: blocks::Locate, W: blocks::Writes>(&self, blocks: &L, w: &W) -> Result<(), W::Error> {
        for (list, entries) in &self.0 {
            blocks::add(blocks, w, list, entries)?;
        }
        Ok(())
    }

    pub(super) fn len(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

/// Where a page starts: strictly older than this (created_at, seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub created_at: String,
    pub seq: u64,
}

impl Position {
    /// `2024-03-01T10:00:00.000Z~17`, as it travels in URLs.
    pub fn encode(&self) -> String {
        format!("{}~{}", self.created_at, self.seq)
    }

    pub fn decode(text: &str) -> Option<Position> {
        let (at, seq) = text.rsplit_once('~')?;
        (at.len() == TIME_LEN && at.is_ascii() && blocks::time_of(at).is_some()).then_some(())?;
        Some(Position { created_at: at.to_string(), seq: seq.parse().ok()? })
    }
}

/// One page of matching events, newest first: decoded ([`AuditEvent`]) for the page, as stored
/// ([`StoredEvent`]) for the API.
#[derive(Debug)]
pub struct Page<T = AuditEvent> {
    pub events: Vec<(u64, T)>,
    /// Where the next (older) page starts, when there is one.
    pub next: Option<Position>,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Page { events: Vec::new(), next: None }
    }
}

/// An event as stored: its JSON, as streamed and chained (the API serves these bytes as they
/// are); [`Store::read_stored`] reads the fields a reader needs without decoding the rest.
#[derive(Debug)]
pub struct StoredEvent {
    pub json: sled::IVec,
}

impl EventQuery {
    /// `since` and `until` as entry bounds: [low, high). They are RFC 3339 with milliseconds,
    /// as `app::events::time_bound` makes them.
    pub(super) fn span(&self) -> Result<(Option<Entry>, Option<Entry>), StoreError> {
        let time =
            |text: &str| blocks::time_of(text).ok_or_else(|| StoreError::BadQuery(format!("{text:?} is not a time")));
        let low = self.since.as_deref().map(time).transpose()?.map(|t| blocks::entry(t, 0));
        let high = self.until.as_deref().map(time).transpose()?.map(|t| blocks::entry(t.saturating_add(1), 0));
        Ok((low, high))
    }
}

impl Store {
    /// Builds the indexes of a store written before this layout; once.
    pub(super) fn build_index(&self) -> Result<(), StoreError> {
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

    /// The young ids, as kept in memory.
    fn young(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(u64, u64)>> {
        self.young_ids.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the young ids into memory (at open).
    pub(super) fn load_young_ids(&self) -> Result<(), StoreError> {
        let mut young = std::collections::BTreeSet::new();
        for entry in self.list_range(&prefix(YOUNG, ""), (None, None), false) {
            young.insert(young_id(&entry?));
        }
        *self.young() = young;
        Ok(())
    }

    /// Notes the young ids a committed batch added; settles them into the id list once there
    /// are [`YOUNG_IDS`]. Called with the writer's lock held.
    pub(super) fn added_young_ids(&self, added: impl Iterator<Item = (u64, u64)>) -> Result<(), StoreError> {
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

    /// The list that answers the most selective filter of `q`.
    pub(super) fn best_list(&self, q: &EventQuery) -> Vec<u8> {
        if let Some(policy) = &q.policy {
            return prefix(POLICY, policy);
        }
        if let Some(author) = &q.author_exact {
            return prefix(AUTHOR, &author.to_lowercase());
        }
        match (q.projects.as_slice(), q.event_types.as_slice()) {
            ([p], [t]) => prefix(PROJECT_TYPE, &format!("{p}\0{}", t.name())),
            ([p], _) => prefix(PROJECT, p),
            (_, [t]) => prefix(TYPE, t.name()),
            _ => prefix(TIME, ""),
        }
    }

    /// The entries of `list` in [low, high), oldest first or newest first.
    pub(super) fn list_range<'a>(
        &'a self,
        list: &[u8],
        (low, high): (Option<Entry>, Option<Entry>),
        newest_first: bool,
    ) -> impl Iterator<Item = Result<Entry, StoreError>> + use<'a> {
        blocks::range(&self.index, list, low, high, newest_first).map(|r| {
            r.map_err(|e| match e {
                BlockError::Sled(e) => self.sled(e),
                BlockError::Damaged(what) => {
                    StoreError::Damaged { what, location: format!("tree \"index\" in {}", self.dir.display()) }
                }
            })
        })
    }

    /// The entries of the best list for `q` between `q.since`, `q.until` and `before`, newest
    /// first.
    fn index_range<'a>(
        &'a self,
        q: &EventQuery,
        before: Option<&Position>,
    ) -> Result<impl Iterator<Item = Result<Entry, StoreError>> + use<'a>, StoreError> {
        let (low, mut high) = q.span()?;
        if let Some(pos) = before {
            let time = blocks::time_of(&pos.created_at)
                .ok_or_else(|| StoreError::BadQuery(format!("{:?} is not a time", pos.created_at)))?;
            let at = blocks::entry(time, pos.seq);
            high = Some(high.map_or(at, |h| h.min(at)));
        }
        Ok(self.list_range(&self.best_list(q), (low, high), true))
    }

    /// Up to `limit` matching events older than `before` (all when None), newest first, read
    /// through the most selective index; skips the first `skip` matches (offset pagination).
    pub fn page(&self, q: &EventQuery, before: Option<&Position>, skip: usize, limit: usize) -> anyhow::Result<Page> {
        Ok(self.page_of(q, before, skip, limit, |seq| self.event_at(seq), |e| Ok(q.matches(e)))?)
    }

    /// [`Store::page`] with the events as stored, for answers that send them as they are.
    pub fn page_stored(
        &self,
        q: &EventQuery,
        before: Option<&Position>,
        skip: usize,
        limit: usize,
    ) -> anyhow::Result<Page<StoredEvent>> {
        let matches = |e: &StoredEvent| {
            let event: AuditEvent = super::records::decode(&self.dir, "events", &e.json, || "an event".into())?;
            Ok(q.matches(&event))
        };
        Ok(self.page_of(q, before, skip, limit, |seq| self.stored_event_at(seq), matches)?)
    }

    /// The fields `T` names of a stored event, borrowed from its JSON where they can be.
    pub fn read_stored<'a, T: serde::Deserialize<'a>>(&self, seq: u64, e: &'a StoredEvent) -> Result<T, StoreError> {
        self.decode_json(seq, &e.json)
    }

    fn stored_event_at(&self, seq: u64) -> Result<StoredEvent, StoreError> {
        Ok(StoredEvent { json: self.event_json_at(seq)? })
    }

    /// A page of the events `read` returns, through the most selective index. When the index
    /// alone decides the filters, skipped events and the one that tells whether a next page
    /// exists are not even read.
    fn page_of<T>(
        &self,
        q: &EventQuery,
        before: Option<&Position>,
        skip: usize,
        limit: usize,
        read: impl Fn(u64) -> Result<T, StoreError>,
        matches: impl Fn(&T) -> Result<bool, StoreError>,
    ) -> Result<Page<T>, StoreError> {
        let exact = q.is_answered_by_index();
        let mut page = Page::default();
        let mut skipped = 0;
        let mut last: Option<Entry> = None;
        for item in self.index_range(q, before)? {
            let entry = item?;
            let seq = blocks::seq_of(&entry);
            let value = if exact {
                None
            } else {
                let value = read(seq)?;
                if !matches(&value)? {
                    continue;
                }
                Some(value)
            };
            if skipped < skip {
                skipped += 1;
                continue;
            }
            if page.events.len() == limit {
                if let Some(entry) = last {
                    let seq = blocks::seq_of(&entry);
                    let created_at = blocks::created_at_of(&entry).ok_or_else(|| StoreError::Damaged {
                        what: format!("the index entry of event #{seq} does not hold a time"),
                        location: format!("tree \"index\" in {}", self.dir.display()),
                    })?;
                    page.next = Some(Position { created_at, seq });
                }
                break;
            }
            let value = match value {
                Some(value) => value,
                None => read(seq)?,
            };
            last = Some(entry);
            page.events.push((seq, value));
        }
        Ok(page)
    }

    /// How many events match `q`, or None when more than `cap` do.
    pub fn count(&self, q: &EventQuery, cap: usize) -> anyhow::Result<Option<usize>> {
        if let Some(n) = self.counted(q)? {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            return Ok((n <= cap).then_some(n));
        }
        let exact = q.is_answered_by_index();
        let mut n = 0;
        for item in self.index_range(q, None)? {
            let seq = blocks::seq_of(&item?);
            if !exact && !q.matches(&self.event_at(seq)?) {
                continue;
            }
            n += 1;
            if n > cap {
                return Ok(None);
            }
        }
        Ok(Some(n))
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
    pub(super) fn seq_of_id(&self, id: &str) -> Result<Option<u64>, StoreError> {
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

impl EventQuery {
    /// Whether the chosen index alone decides every filter: then counting needs no decoding,
    /// and a page reads only the events it shows.
    fn is_answered_by_index(&self) -> bool {
        let one_project_and_type = self.projects.len() <= 1 && self.event_types.len() <= 1;
        self.policy.is_none() && self.author_exact.is_none() && self.author.is_none() && one_project_and_type
    }
}

impl Store {
    /// The chain link of event `seq` and of the one before it (genesis for the first), hex.
    pub fn chain_links(&self, seq: u64) -> anyhow::Result<(Option<String>, String)> {
        let link = |s: u64| -> anyhow::Result<Option<String>> {
            let Some(stored) = self.stored_body(s)? else { return Ok(None) };
            Ok(self.stored_link(s, &stored)?.map(|l| super::chain::hex(&l)))
        };
        let previous = match seq.checked_sub(1) {
            Some(p) => link(p)?.unwrap_or_default(),
            None => super::chain::hex(&super::chain::GENESIS),
        };
        Ok((link(seq)?, previous))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::store::Cursor;

    pub(in crate::store) fn event(
        n: u32,
        project: &str,
        t: EventType,
        policy: Option<&str>,
        author: &str,
    ) -> AuditEvent {
        serde_json::from_value(serde_json::json!({
            "id": format!("ev-{n}"), "event_type": t, "entity_type": "Project", "entity_id": null,
            "entity_path": project, "target_type": "Security::Policy", "target_details": policy.unwrap_or(project),
            "author_name": author, "author_id": -4,
            // Not in storage order: the index orders by time.
            "created_at": format!("2024-01-{:02}T10:00:00.000Z", 1 + (n * 7) % 28), "ip_address": "",
            "details": {"event_name": t, "custom_message": "m", "policy_name": policy,
                "security_policy_project_commit_sha": "abc", "author_name": author,
                "author_email": format!("{}@example.com", author.to_lowercase()), "target_type": "Security::Policy",
                "target_details": "x", "entity_path": project, "branch": "main", "policy_file": "p.yml",
                "detected_at": "2024-02-01T00:00:00.000Z", "linked_namespaces": []}
        }))
        .expect("event")
    }

    /// Ids are found before and after they are settled into the id list, after a reopen, and
    /// after a pass cut short by a crash (in both lists); a batch stored again adds nothing.
    #[test]
    fn ids_are_found_young_settled_and_in_both() {
        let dir = tempfile::tempdir().expect("tmp");
        let cursor = Cursor { commit: "c".into(), blob: String::new(), baseline: None, limits: Default::default() };
        let events: Vec<AuditEvent> =
            (0..60).map(|n| event(n, "a/spp", EventType::Create, Some("p"), "Alice")).collect();
        let ids_listed = |store: &Store| store.list_range(&prefix(ID, ""), (None, None), false).count();
        {
            let mut store = Store::open(dir.path()).expect("open");
            store.young_limit = 16;
            for batch in events[..50].chunks(7) {
                store.commit_reconcile("a/spp", &cursor, batch, &|_| Vec::new(), 0).expect("commit");
            }
            // 49 settled in passes of 16 and more, 1 young (in memory and on disk).
            assert_eq!(ids_listed(&store) + store.young().len(), 50);
            assert!(ids_listed(&store) >= 32 && store.young().len() < 16);
            for (seq, e) in events[..50].iter().enumerate() {
                assert_eq!(store.seq_of_id(&e.id).expect("lookup"), Some(seq as u64), "{}", e.id);
            }
            assert_eq!(store.seq_of_id("ev-none").expect("lookup"), None);
            assert_eq!(store.commit_reconcile("a/spp", &cursor, &events[..50], &|_| Vec::new(), 0).expect("again"), 0);
        }
        // A pass cut short: every id in the id list is young again too.
        {
            let db = crate::store::retry_open(|| Ok(sled::open(dir.path())?));
            let index = db.open_tree("index").expect("index");
            let settled: Vec<Entry> =
                blocks::range(&index, &prefix(ID, ""), None, None, false).map(|e| e.expect("entry")).collect();
            let young: Vec<Entry> =
                settled.iter().map(|e| blocks::entry(blocks::seq_of(e), blocks::head_of(e))).collect();
            let mut young = young;
            young.sort();
            blocks::add(&index, &index, &prefix(YOUNG, ""), &young).expect("young again");
            db.flush().expect("flush");
        }
        let mut store = crate::store::retry_open(|| Store::open(dir.path()));
        store.young_limit = 16;
        for (seq, e) in events[..50].iter().enumerate() {
            assert_eq!(store.seq_of_id(&e.id).expect("lookup"), Some(seq as u64), "after reopen: {}", e.id);
        }
        store.commit_reconcile("a/spp", &cursor, &events[50..], &|_| Vec::new(), 0).expect("commit");
        // The next pass keeps each entry once.
        assert_eq!(ids_listed(&store) + store.young().len(), 60);
        for (seq, e) in events.iter().enumerate() {
            assert_eq!(store.seq_of_id(&e.id).expect("lookup"), Some(seq as u64));
        }
    }

    fn all_events() -> Vec<AuditEvent> {
        let types = [EventType::Create, EventType::Update, EventType::Delete];
        (0..40)
            .map(|n| {
                let project = if n % 3 == 0 { "a/spp" } else { "b/spp" };
                let policy = ["one", "two", "three"][n as usize % 3];
                let author = ["Alice", "Bob"][n as usize % 2];
                event(n, project, types[n as usize % 4 % 3], Some(policy), author)
            })
            .collect()
    }

    /// Every page of `q` (newest first) through keyset positions of size 3.
    fn paged(store: &Store, q: &EventQuery) -> Vec<String> {
        let mut out = Vec::new();
        let mut before = None;
        loop {
            let page = store.page(q, before.as_ref(), 0, 3).expect("page");
            out.extend(page.events.iter().map(|(_, e)| e.id.clone()));
            match page.next {
                Some(next) => before = Some(next),
                None => return out,
            }
        }
    }

    fn expected(events: &[AuditEvent], q: &EventQuery) -> Vec<String> {
        let mut matching: Vec<(String, usize, String)> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| q.matches(e))
            .map(|(seq, e)| (e.created_at.clone(), seq, e.id.clone()))
            .collect();
        matching.sort();
        matching.into_iter().rev().map(|(_, _, id)| id).collect()
    }

    fn queries() -> Vec<EventQuery> {
        vec![
            EventQuery::default(),
            EventQuery { projects: vec!["a/spp".into()], ..Default::default() },
            EventQuery { event_types: vec![EventType::Update], ..Default::default() },
            EventQuery { projects: vec!["b/spp".into()], event_types: vec![EventType::Create], ..Default::default() },
            EventQuery { policy: Some("two".into()), projects: vec!["a/spp".into()], ..Default::default() },
            EventQuery { author_exact: Some("BOB@example.com".into()), ..Default::default() },
            EventQuery {
                since: Some("2024-01-05T00:00:00.000Z".into()),
                until: Some("2024-01-20T23:59:59.999Z".into()),
                event_types: vec![EventType::Delete],
                ..Default::default()
            },
        ]
    }

    #[test]
    fn filtered_pages_through_the_indexes_match_a_full_scan_and_old_stores_get_them_built() {
        let dir = tempfile::tempdir().expect("tmp");
        let events = all_events();
        {
            let store = Store::open(dir.path()).expect("open");
            let cursor = Cursor { commit: "c".into(), blob: "b".into(), baseline: None, limits: Default::default() };
            store.commit_reconcile("a/spp", &cursor, &events, &|_| Vec::new(), 0).expect("commit");
            for q in queries() {
                assert_eq!(paged(&store, &q), expected(&events, &q), "{q:?}");
                assert_eq!(store.count(&q, 1000).expect("count"), Some(expected(&events, &q).len()), "{q:?}");
            }
            let second = store.event_by_id("ev-2").expect("by id").expect("found");
            assert_eq!(second.0, 2);
        }
        // A store written before the indexes existed: no entries, no version mark.
        {
            let db = crate::store::retry_open(|| Ok(sled::open(dir.path())?));
            db.open_tree("index").expect("tree").clear().expect("clear");
            let meta = db.open_tree("meta").expect("meta");
            meta.remove(INDEX_VERSION).expect("remove");
            // The layout before blocks: one key per entry in two trees, each with its mark.
            for tree in OLD_TREES {
                db.open_tree(tree).expect("old tree").insert(b"an old key", b"").expect("insert");
            }
            for mark in OLD_MARKS {
                meta.insert(mark, &1u32.to_be_bytes()).expect("mark");
            }
            db.flush().expect("flush");
        }
        let store = crate::store::retry_open(|| Store::open(dir.path()));
        for q in queries() {
            assert_eq!(paged(&store, &q), expected(&events, &q), "after the build: {q:?}");
            assert_eq!(store.count(&q, 1000).expect("count"), Some(expected(&events, &q).len()), "{q:?}");
        }
        let trees: Vec<sled::IVec> = store.db.tree_names();
        for tree in OLD_TREES {
            assert!(!trees.iter().any(|t| t == tree.as_bytes()), "{tree} dropped");
        }
        for mark in OLD_MARKS {
            assert_eq!(store.meta.get(mark).expect("meta"), None, "{mark:?} removed");
        }
        // Found by id through the id list built at open.
        assert_eq!(store.event_by_id("ev-7").expect("by id").map(|(seq, e)| (seq, e.id)), Some((7, "ev-7".into())));
        assert!(store.event_by_id("ev-999").expect("by id").is_none());
    }

    #[test]
    fn positions_round_trip_and_reject_garbage() {
        let p = Position { created_at: "2024-01-01T10:00:00.000Z".into(), seq: 17 };
        assert_eq!(Position::decode(&p.encode()), Some(p));
        for bad in ["", "x~1", "2024-01-01T10:00:00.000Z~", "2024-01-01T10:00:00.000Z~-1"] {
            assert_eq!(Position::decode(bad), None, "{bad:?}");
        }
    }
}
