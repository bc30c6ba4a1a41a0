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
//!
//! By idea: this file holds the lists and what goes in them; `ids` the lookup by event id (the
//! young ids and their settling); `pages` the keyset and offset pages and counts read through
//! the lists; `build` the one-time build for stores of an older layout.

mod build;
mod ids;
mod pages;

pub(super) use ids::YOUNG_IDS;
pub use pages::{Page, Position, StoredEvent};

use super::blocks::{self, BlockError, Entry};
use super::{EventQuery, Store, StoreError};
use crate::event::AuditEvent;
use ids::{YOUNG, id_entry, id_hash, young_id};
use std::collections::BTreeMap;

/// `created_at` as stored: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(super) const TIME_LEN: usize = 24;

/// Every event, in time order.
pub(super) const TIME: u8 = b'T';
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
    pub(in crate::store) fn of<'e>(
        events: impl IntoIterator<Item = (u64, &'e AuditEvent)>,
    ) -> Result<Additions, String> {
        let mut additions = Additions::default();
        for (seq, e) in events {
            additions.add(e, seq)?;
        }
        Ok(additions.sorted())
    }

    /// Event `e`, stored as number `seq`: its entry (`entry_of`) in its lists, and its id
    /// among the young ones.
    pub(in crate::store) fn add(&mut self, e: &AuditEvent, seq: u64) -> Result<(), String> {
        self.add_entries(e, seq)?;
        self.0.entry(prefix(YOUNG, "")).or_default().push(blocks::entry(seq, id_hash(&e.id)));
        Ok(())
    }

    /// Like [`Additions::add`], with the id straight in the id list (building the indexes).
    pub(in crate::store) fn add_settled(&mut self, e: &AuditEvent, seq: u64) -> Result<(), String> {
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
    pub(in crate::store) fn young_ids(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.get(&prefix(YOUNG, "")).into_iter().flatten().map(young_id)
    }

    /// Every list sorted, as [`Additions::known`] and [`Additions::write`] need them.
    pub(in crate::store) fn sorted(mut self) -> Additions {
        self.0.values_mut().for_each(|entries| entries.sort_unstable());
        self
    }

    /// Where their blocks lie, read before the storing transaction (which cannot range over a
    /// tree).
    pub(in crate::store) fn known(&self, tree: &sled::Tree) -> sled::Result<blocks::Known> {
        blocks::Known::around(tree, self.0.iter().map(|(list, entries)| (list.as_slice(), entries.as_slice())))
    }

    /// Writes them through `w` (see [`blocks::add`]).
    pub(in crate::store) fn write<L: blocks::Locate, W: blocks::Writes>(
        &self,
        blocks: &L,
        w: &W,
    ) -> Result<(), W::Error> {
        for (list, entries) in &self.0 {
            blocks::add(blocks, w, list, entries)?;
        }
        Ok(())
    }

    pub(in crate::store) fn len(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

impl Store {
    /// The list that answers the most selective filter of `q`.
    pub(in crate::store) fn best_list(&self, q: &EventQuery) -> Vec<u8> {
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
    pub(in crate::store) fn list_range<'a>(
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
}

#[cfg(test)]
pub(super) mod tests {
    use super::build::{INDEX_VERSION, OLD_MARKS, OLD_TREES};
    use super::ids::ID;
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
        let cursor = Cursor {
            commit: "c".into(),
            blob: String::new(),
            baseline: None,
            limits: Default::default(),
            included: Default::default(),
        };
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
            let cursor = Cursor {
                commit: "c".into(),
                blob: "b".into(),
                baseline: None,
                limits: Default::default(),
                included: Default::default(),
            };
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
