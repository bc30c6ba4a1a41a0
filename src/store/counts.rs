//! Event counters per project, per event type and per (project, type), so that the API's
//! `X-Total` (GitLab counts the matches of an offset listing) and `/metrics` need no scan at
//! any size of the trail.
//!
//! Invariants:
//! - a counter lives in `meta` under `count\0 ++ <field index prefix>` (the `kind ++ value ++ 0`
//!   of `index`), a big-endian u64; it is updated in the transaction that stores its events, so
//!   a failed transaction counts nothing and a stored event is counted exactly once;
//! - `counts_at` (in `meta`, written in the same transaction) is the trail length the counters
//!   describe. When it differs from the trail length at open — a store written before the
//!   counters existed, or written by an older release since — they are rebuilt from the field
//!   indexes, once, with a line in the log.

use super::blocks::ENTRY_LEN;
use super::index::{PROJECT, PROJECT_TYPE, TYPE, prefix};
use super::records::decode_u64;
use super::{EventQuery, Store, StoreError};
use crate::event::{AuditEvent, EventType};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use std::collections::{BTreeMap, BTreeSet};

const COUNTER: &[u8] = b"count\0";
const COUNTS_AT: &[u8] = b"counts_at";

fn counter_key(index_prefix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(COUNTER.len() + index_prefix.len());
    k.extend_from_slice(COUNTER);
    k.extend_from_slice(index_prefix);
    k
}

/// "the event counter of project \"acme/spp\"", for errors.
fn what(key: &[u8]) -> String {
    let (kind, value) = key.get(COUNTER.len()..).and_then(<[u8]>::split_first).unwrap_or((&0, &[]));
    let value = String::from_utf8_lossy(value.strip_suffix(&[0]).unwrap_or(value)).replace('\0', " ");
    let of = match *kind {
        PROJECT => "project",
        TYPE => "event type",
        PROJECT_TYPE => "project and event type",
        _ => "unknown kind",
    };
    format!("the event counter of {of} {value:?}")
}

/// The counters a batch of events adds to, gathered before they are written.
#[derive(Default)]
pub(super) struct Tally(BTreeMap<Vec<u8>, u64>);

impl Tally {
    pub(super) fn add(&mut self, e: &AuditEvent) {
        let kind = e.event_type.name();
        for key in [
            prefix(PROJECT, &e.entity_path),
            prefix(TYPE, kind),
            prefix(PROJECT_TYPE, &format!("{}\0{kind}", e.entity_path)),
        ] {
            *self.0.entry(counter_key(&key)).or_default() += 1;
        }
    }

    /// Adds the tally to the stored counters and records that they describe `trail_length`
    /// events; inside the transaction that stores the events.
    pub(super) fn write(
        &self,
        store: &Store,
        meta: &TransactionalTree,
        trail_length: u64,
    ) -> Result<(), ConflictableTransactionError<StoreError>> {
        for (key, n) in &self.0 {
            let before = match meta.get(key)? {
                Some(v) => {
                    decode_u64(&store.dir, "meta", &v, || what(key)).map_err(ConflictableTransactionError::Abort)?
                }
                None => 0,
            };
            meta.insert(key.as_slice(), &(before + n).to_be_bytes())?;
        }
        meta.insert(COUNTS_AT, &trail_length.to_be_bytes())?;
        Ok(())
    }
}

impl Store {
    /// Rebuilds the counters from the field index when they do not describe the whole trail.
    pub(super) fn build_counts(&self) -> Result<(), StoreError> {
        let total = self.next_seq()?;
        let at = match self.meta.get(COUNTS_AT).map_err(|e| self.sled(e))? {
            Some(v) => Some(decode_u64(&self.dir, "meta", &v, || "the counters' trail length (counts_at)".into())?),
            None => None,
        };
        if at == Some(total) {
            return Ok(());
        }
        if total > 0 {
            tracing::info!(events = total, "counting the events per project and type (once)");
        }
        for key in self.meta.scan_prefix(COUNTER).keys() {
            self.meta.remove(key.map_err(|e| self.sled(e))?).map_err(|e| self.sled(e))?;
        }
        // The blocks of one list are contiguous in the index: only the last counter grows.
        let mut counts: Vec<(Vec<u8>, u64)> = Vec::new();
        for kind in [PROJECT, TYPE, PROJECT_TYPE] {
            for block in self.index.scan_prefix([kind]) {
                let (key, entries) = block.map_err(|e| self.sled(e))?;
                let end =
                    key.len().checked_sub(ENTRY_LEN).filter(|end| *end > 1).ok_or_else(|| StoreError::Damaged {
                        what: "an index block's key is too short".into(),
                        location: format!("tree \"index\" in {}", self.dir.display()),
                    })?;
                let n_entries = (entries.len() / ENTRY_LEN) as u64;
                match counts.last_mut() {
                    Some((last, n)) if last[COUNTER.len()..] == key[..end] => *n += n_entries,
                    _ => counts.push((counter_key(&key[..end]), n_entries)),
                }
            }
        }
        for (key, n) in counts {
            self.meta.insert(key, &n.to_be_bytes()).map_err(|e| self.sled(e))?;
        }
        self.meta.insert(COUNTS_AT, &total.to_be_bytes()).map_err(|e| self.sled(e))?;
        self.db.flush().map_err(|e| self.sled(e))?;
        Ok(())
    }

    fn counter(&self, index_prefix: &[u8]) -> Result<u64, StoreError> {
        let key = counter_key(index_prefix);
        match self.meta.get(&key).map_err(|e| self.sled(e))? {
            Some(v) => decode_u64(&self.dir, "meta", &v, || what(&key)),
            None => Ok(0),
        }
    }

    /// How many events match `q`, when the counters alone answer it: filters by projects and
    /// event types only (no time bounds, policy or author).
    pub(super) fn counted(&self, q: &EventQuery) -> Result<Option<u64>, StoreError> {
        if !q.is_counted() {
            return Ok(None);
        }
        let projects: BTreeSet<&str> = q.projects.iter().map(String::as_str).collect();
        let types: BTreeSet<EventType> = q.event_types.iter().copied().collect();
        let mut n = 0;
        match (projects.is_empty(), types.is_empty()) {
            (true, true) => n = self.next_seq()?,
            (true, false) => {
                for t in types {
                    n += self.counter(&prefix(TYPE, t.name()))?;
                }
            }
            (false, true) => {
                for p in projects {
                    n += self.counter(&prefix(PROJECT, p))?;
                }
            }
            (false, false) => {
                for p in &projects {
                    for t in &types {
                        n += self.counter(&prefix(PROJECT_TYPE, &format!("{p}\0{}", t.name())))?;
                    }
                }
            }
        }
        Ok(Some(n))
    }

    /// How many events of each type are stored (for `/metrics`).
    pub fn count_by_type(&self) -> Result<Vec<(EventType, u64)>, StoreError> {
        EventType::ALL.into_iter().map(|t| Ok((t, self.counter(&prefix(TYPE, t.name()))?))).collect()
    }
}

impl EventQuery {
    /// Whether the counters alone count the matches: filters by projects and event types only.
    fn is_counted(&self) -> bool {
        self.since.is_none()
            && self.until.is_none()
            && self.policy.is_none()
            && self.author.is_none()
            && self.author_exact.is_none()
            && self.authored_only.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CHAIN_HEAD, Cursor};

    fn event(n: u32, project: &str, t: EventType) -> AuditEvent {
        serde_json::from_value(serde_json::json!({
            "id": format!("ev-{n}"), "event_type": t, "entity_type": "Project", "entity_id": null,
            "entity_path": project, "target_type": "Security::Policy", "target_details": "p",
            "author_name": "A", "author_id": -4,
            "created_at": format!("2024-01-{:02}T10:00:00.000Z", 1 + n % 28), "ip_address": "",
            "details": {"event_name": t, "custom_message": "m", "policy_name": "p",
                "security_policy_project_commit_sha": "abc", "author_name": "A",
                "author_email": "a@example.com", "target_type": "Security::Policy",
                "target_details": "x", "entity_path": project, "branch": "main", "policy_file": "p.yml",
                "detected_at": "2024-02-01T00:00:00.000Z", "linked_namespaces": []}
        }))
        .expect("event")
    }

    const TYPES: [EventType; 3] = [EventType::Create, EventType::Update, EventType::Delete];

    fn events(from: u32, to: u32) -> Vec<AuditEvent> {
        (from..to).map(|n| event(n, ["a/spp", "b/spp", "c/spp"][n as usize % 3], TYPES[n as usize / 3 % 3])).collect()
    }

    fn commit(store: &Store, events: &[AuditEvent]) -> Result<usize, StoreError> {
        let cursor = Cursor {
            commit: "c".into(),
            blob: "b".into(),
            baseline: None,
            limits: Default::default(),
            included: Default::default(),
        };
        store.commit_reconcile("a/spp", &cursor, events, &|_| Vec::new(), 0)
    }

    /// Every query the counters answer, with the count a scan of `stored` gives.
    fn expected(stored: &[AuditEvent]) -> Vec<(EventQuery, usize)> {
        let projects = [vec![], vec!["a/spp".to_string()], vec!["b/spp".into(), "c/spp".into()], vec!["z/none".into()]];
        let types = [vec![], vec![EventType::Update], vec![EventType::Create, EventType::Delete]];
        let mut out = Vec::new();
        for p in &projects {
            for t in &types {
                let q = EventQuery { projects: p.clone(), event_types: t.clone(), ..Default::default() };
                let n = stored.iter().filter(|e| q.matches(e)).count();
                out.push((q, n));
            }
        }
        out
    }

    fn assert_counts(store: &Store, stored: &[AuditEvent], when: &str) {
        for (q, n) in expected(stored) {
            assert_eq!(store.counted(&q).expect("counted"), Some(n as u64), "{when}: {q:?}");
            assert_eq!(store.count(&q, 10_000).expect("count"), Some(n), "{when}: {q:?}");
        }
        let by_type: Vec<(EventType, u64)> = EventType::ALL
            .into_iter()
            .map(|t| (t, stored.iter().filter(|e| e.event_type == t).count() as u64))
            .collect();
        assert_eq!(store.count_by_type().expect("by type"), by_type, "{when}");
    }

    #[test]
    fn counters_are_right_after_every_commit_and_count_a_replayed_event_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("open");
        assert_counts(&store, &[], "empty");
        let all = events(0, 60);
        for (from, to) in [(0, 1), (1, 20), (20, 60)] {
            assert_eq!(commit(&store, &all[from..to]).expect("commit"), to - from);
            assert_counts(&store, &all[..to], &format!("after {to} events"));
        }
        // A replay of stored events stores (and counts) nothing.
        assert_eq!(commit(&store, &all[10..30]).expect("replay"), 0);
        assert_counts(&store, &all, "after a replay");
    }

    #[test]
    fn a_failed_transaction_counts_nothing_and_a_damaged_counter_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("open");
        let all = events(0, 30);
        commit(&store, &all[..10]).expect("commit");
        // The chain head is damaged: the transaction that would store 10 more aborts.
        let head = store.meta.get(CHAIN_HEAD).expect("get").expect("head");
        store.meta.insert(CHAIN_HEAD, b"garbage".as_slice()).expect("damage");
        assert!(matches!(commit(&store, &all[10..20]), Err(StoreError::Damaged { .. })));
        assert_counts(&store, &all[..10], "after the failed transaction");
        store.meta.insert(CHAIN_HEAD, head).expect("repair");
        commit(&store, &all[10..20]).expect("commit after the repair");
        assert_counts(&store, &all[..20], "after the repair");
        // A damaged counter is an error naming it, never a count that starts again at 0.
        let key = counter_key(&prefix(PROJECT, "a/spp"));
        store.meta.insert(&key, b"xyz".as_slice()).expect("damage");
        let err = commit(&store, &all[20..30]).expect_err("a damaged counter");
        assert!(err.to_string().contains("the event counter"), "{err}");
        let q = EventQuery { projects: vec!["a/spp".into()], ..Default::default() };
        assert!(matches!(store.counted(&q), Err(StoreError::Damaged { .. })));
        assert_eq!(store.next_seq().expect("seq"), 20, "nothing of the failed transaction was stored");
    }

    #[test]
    fn stores_without_counters_or_with_stale_ones_get_them_rebuilt_at_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let all = events(0, 50);
        {
            let store = Store::open(dir.path()).expect("open");
            commit(&store, &all[..40]).expect("commit");
        }
        // A store written before the counters existed: none of them, no `counts_at`.
        {
            let db = crate::store::retry_open(|| Ok(sled::open(dir.path())?));
            let meta = db.open_tree("meta").expect("meta");
            for key in meta.scan_prefix(COUNTER).keys() {
                meta.remove(key.expect("key")).expect("remove");
            }
            meta.remove(COUNTS_AT).expect("remove");
            db.flush().expect("flush");
        }
        {
            let store = crate::store::retry_open(|| Store::open(dir.path()));
            assert_counts(&store, &all[..40], "rebuilt for a store without counters");
            commit(&store, &all[40..45]).expect("commit");
            assert_counts(&store, &all[..45], "kept up after the rebuild");
        }
        // An older release stored events since: the counters lag behind the trail.
        {
            let db = crate::store::retry_open(|| Ok(sled::open(dir.path())?));
            let meta = db.open_tree("meta").expect("meta");
            meta.insert(counter_key(&prefix(PROJECT, "a/spp")), &3u64.to_be_bytes()).expect("stale");
            meta.insert(COUNTS_AT, &40u64.to_be_bytes()).expect("stale");
            db.flush().expect("flush");
        }
        let store = crate::store::retry_open(|| Store::open(dir.path()));
        assert_counts(&store, &all[..45], "rebuilt when they lag behind the trail");
    }
}
