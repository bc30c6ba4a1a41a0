//! The durable state, in sled: per-project cursors, the events, and the delivery outbox.
//!
//! Invariants:
//! - a project's cursor only advances in the transaction that stores the events it implies and
//!   their outbox entries ([`Store::commit_reconcile`]), and that transaction is flushed to disk
//!   before the call returns: a crash loses nothing and a replay duplicates nothing;
//! - an event id is stored at most once (looked up in the id list of the indexes before the
//!   storing transaction, under `index_write`), so replaying a step is harmless;
//! - events are numbered by a gap-free sequence in the order they were stored;
//! - a record that does not decode is [`StoreError::Damaged`], never a default: a counter read
//!   as 0 or a chain head read as genesis would overwrite the trail at the next write.

mod blocks;
pub mod bodies;
pub mod body;
pub mod chain;
mod counts;
mod error;
mod index;
mod outbox;
mod query;
mod records;

pub use outbox::{PendingEntry, Schedule};
pub(crate) use outbox::{delivery_key, destination_prefix};
mod replay;
mod replica;

pub use error::StoreError;
pub use index::{Page, Position, StoredEvent};
use records::{decode, decode_u64};

use crate::event::{AuditEvent, EventType};
use crate::policy::{LimitState, PolicySet};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::path::Path;

/// Where a project was left at its last successful reconcile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// The last synced commit of the tracked branch.
    pub commit: String,
    /// The policy file's blob at `commit` ("" when missing), to detect the next change.
    pub blob: String,
    /// The last valid policy state (None until the file was valid once).
    pub baseline: Option<PolicySet>,
    /// Skipped policy names per type at the last limit check.
    #[serde(default)]
    pub limits: LimitState,
    /// The files policies include from other repositories, by [`IncludedFile::key`], as last
    /// seen (SPEC §14): moved with the cursor, in the same transaction as the events.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub included: std::collections::BTreeMap<String, IncludedFile>,
}

/// One included file (project, file, ref as written in the policy) where it was last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncludedFile {
    /// What `ref` resolved to: `HEAD` (the default branch), `branch <name>`, `tag <name>`,
    /// `sha` (pinned, never fetched), or `missing` (no such ref).
    pub followed: String,
    /// The commit the followed ref was at ("" when missing).
    pub commit: String,
    /// The file's blob at `commit` ("" when it is not there or not a file).
    pub blob: String,
    /// The last blob GitLab could use ("" before the file was readable once).
    pub valid_blob: String,
    /// GitLab cannot read the file now (missing, not a file, too large, not YAML).
    pub invalid: bool,
}

impl IncludedFile {
    /// The map key of an include: project, file and ref as written (ref "" when absent).
    pub fn key(project: &str, file: &str, reference: Option<&str>) -> String {
        format!("{project}\n{file}\n{}", reference.unwrap_or(""))
    }
}

/// A pending or dead delivery of one event to one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub destination: String,
    pub seq: u64,
    pub event_id: String,
    pub event_type: EventType,
    pub attempts: u32,
    /// Unix milliseconds.
    pub enqueued_at: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

impl Delivery {
    /// A new delivery of event `seq` to `destination`, due now.
    pub fn queued(destination: &str, seq: u64, event: &AuditEvent, now_ms: i64) -> Delivery {
        Delivery {
            destination: destination.to_string(),
            seq,
            event_id: event.id.clone(),
            event_type: event.event_type,
            attempts: 0,
            enqueued_at: now_ms,
            next_attempt_at: now_ms,
            last_status: None,
            last_error: None,
        }
    }
}

/// Per-project bookkeeping for `status`; not part of the audit trail.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProjectStatus {
    pub last_run_at: Option<String>,
    pub last_success_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

/// What to list from the stored events.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub projects: Vec<String>,
    pub event_types: Vec<EventType>,
    pub policy: Option<String>,
    /// Case-insensitive substring of author name or email.
    pub author: Option<String>,
    /// Case-insensitive author name or email, whole (answered by the author index).
    pub author_exact: Option<String>,
    /// RFC 3339 bounds on `created_at`, inclusive.
    pub since: Option<String>,
    pub until: Option<String>,
    /// The most recent N matching events.
    pub limit: Option<usize>,
    /// Of these projects (also in `projects`), only the events whose `author_id` is
    /// `author_id` (a GitLab Developer sees only their own events, SPEC §13).
    pub authored_only: Vec<String>,
    pub author_id: Option<i64>,
}

pub struct Store {
    dir: std::path::PathBuf,
    /// Our own exclusive lock on the directory, held as long as the store is open, so that
    /// "another process has it" is a typed answer ([`StoreError::Locked`]).
    _lock: std::fs::File,
    /// Held for a whole delivery round: two rounds at once could send an event twice or out
    /// of order.
    delivery_round: std::sync::Mutex<()>,
    /// Held for a whole reconcile: two at once would walk the same steps twice.
    reconcile_run: std::sync::Mutex<()>,
    db: sled::Db,
    cursors: sled::Tree,
    /// seq -> stored body, for events stored before `bodies` and bodies too large to group.
    events: sled::Tree,
    /// seq / 16 -> the stored bodies of 16 consecutive events (see `bodies`).
    bodies: sled::Tree,
    /// seq -> chain link, for events stored before links travelled in their bodies and for
    /// bodies too large to compress (see `chain`, `body`).
    chain: sled::Tree,
    outbox: sled::Tree,
    dead: sled::Tree,
    /// (destination, 0, seq) -> (): deliveries that went out, so a replay does not repeat them.
    sent: sled::Tree,
    meta: sled::Tree,
    status: sled::Tree,
    /// Answers of the GitLab API (`gitlab::attribution`): not part of the trail.
    gitlab_cache: sled::Tree,
    /// list ++ first entry -> entries: the time and field indexes, in blocks (see `index`).
    index: sled::Tree,
    /// Held while an index write is planned and committed (see `blocks`).
    index_write: std::sync::Mutex<()>,
    /// The ids of the newest events, (hash, seq), until they are settled in the id list (see
    /// `index`).
    young_ids: std::sync::Mutex<std::collections::BTreeSet<(u64, u64)>>,
    /// The JSON of recently read events (see `crate::recent`).
    recent: crate::recent::Recent<sled::IVec>,
    /// How many young ids are settled at once ([`index::YOUNG_IDS`]; fewer in tests).
    young_limit: usize,
}

const NEXT_SEQ: &[u8] = b"next_seq";
/// The layout this binary writes, recorded at open; a binary refuses a store of a later one.
/// 3: event bodies in groups and the newest ids gathered (issue 16). Releases before it do not
/// check: they would read a store of format 3 as one whose events are missing.
const STORE_FORMAT: &[u8] = b"store_format";
const FORMAT: u32 = 3;
/// sled's page cache (its default is 1 GiB): the daemon should stay small (≤ 64 MiB resident).
/// 4 MiB: listing 1,000,000 events peaks at 63.6 MiB with it (74.2 with 16 MiB, 64.6 with 8)
/// at the same speed (docs/performance.md); pages and API answers read few, recent nodes.
const CACHE_BYTES: u64 = 4 * 1024 * 1024;
const CHAIN_HEAD: &[u8] = b"chain_head";
/// The SPPs and links the last successful discovery found (see `crate::discovery`).
const DISCOVERY: &[u8] = b"discovery";
/// When discovery last ran and how it went: bookkeeping, not the trail.
const DISCOVERY_STATUS: &[u8] = b"discovery_status";
/// In cluster mode: the last sequence of the cluster's stream applied to this replica.
const REPLICA_POSITION: &[u8] = b"replica_position";

/// What a batch of events is stored with.
#[derive(Clone, Copy)]
enum Written<'a> {
    /// A project's new cursor (the single-instance reconcile).
    Cursor(&'a str, &'a [u8]),
    /// The cluster stream's sequence the batch ends at (a replica).
    ReplicaPosition(u64),
    /// The list of SPPs and links discovery found, which the batch's link events lead to.
    Discovery(&'a [u8]),
}

impl Store {
    /// Opens (or creates) the database in `dir`. Fails with a clear message when another
    /// process holds it: sled admits one process.
    pub fn open(dir: &Path) -> Result<Store> {
        create_private_dir(dir)?;
        let lock = lock_dir(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|source| StoreError::Sled { dir: dir.to_path_buf(), source })?;
        let tree =
            |name: &str| db.open_tree(name).with_context(|| format!("cannot open tree {name} in {}", dir.display()));
        let store = Store {
            dir: dir.to_path_buf(),
            _lock: lock,
            cursors: tree("cursors")?,
            events: tree("events")?,
            bodies: tree("bodies")?,
            chain: tree("chain")?,
            outbox: tree("outbox")?,
            dead: tree("dead")?,
            sent: tree("sent")?,
            meta: tree("meta")?,
            status: tree("status")?,
            gitlab_cache: tree("gitlab_cache")?,
            index: tree("index")?,
            index_write: std::sync::Mutex::new(()),
            young_ids: Default::default(),
            young_limit: index::YOUNG_IDS,
            recent: Default::default(),
            delivery_round: std::sync::Mutex::new(()),
            reconcile_run: std::sync::Mutex::new(()),
            db,
        };
        store.check_format()?;
        // The two records every write depends on are checked before anything else happens.
        store.next_seq()?;
        store.recorded_head()?;
        store.build_index()?;
        store.load_young_ids()?;
        store.build_counts()?;
        Ok(store)
    }

    /// Refuses a store written in a later layout; records this one's.
    fn check_format(&self) -> Result<(), StoreError> {
        let recorded = match self.meta.get(STORE_FORMAT).map_err(|e| self.sled(e))? {
            Some(v) => decode_u64(&self.dir, "meta", &v, || "the store format (store_format)".into())?,
            None => 0,
        };
        if recorded > u64::from(FORMAT) {
            return Err(StoreError::TooNew { dir: self.dir.clone(), found: recorded as u32, known: FORMAT });
        }
        if recorded < u64::from(FORMAT) {
            self.meta.insert(STORE_FORMAT, &u64::from(FORMAT).to_be_bytes()).map_err(|e| self.sled(e))?;
        }
        Ok(())
    }

    /// Serialises delivery rounds on this store.
    pub fn lock_delivery(&self) -> std::sync::MutexGuard<'_, ()> {
        self.delivery_round.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serialises reconciles on this store.
    pub fn lock_reconcile(&self) -> std::sync::MutexGuard<'_, ()> {
        self.reconcile_run.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Like [`Store::open`], but waits up to `patience` for another short-lived process (a
    /// `check-config`, another `reconcile`) to release the database.
    pub fn open_waiting(dir: &Path, patience: std::time::Duration) -> Result<Store> {
        let until = std::time::Instant::now() + patience;
        loop {
            match Store::open(dir) {
                Err(e)
                    if matches!(e.downcast_ref::<StoreError>(), Some(StoreError::Locked { .. }))
                        && std::time::Instant::now() < until =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    pub fn cursor(&self, project: &str) -> Result<Option<Cursor>> {
        let location = || format!("cursor of project {project:?}");
        Ok(self.cursors.get(project)?.map(|v| decode(&self.dir, "cursors", &v, location)).transpose()?)
    }

    /// Stores a reconcile's events with one outbox entry per destination that wants each, and
    /// the new cursor, in one transaction; flushed before returning. Events whose id is
    /// already stored are skipped. Returns how many events were new.
    pub fn commit_reconcile(
        &self,
        project: &str,
        cursor: &Cursor,
        events: &[AuditEvent],
        destinations_for: &dyn Fn(&AuditEvent) -> Vec<String>,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let stored = self.commit_reconcile_chunk(project, cursor, events, destinations_for, now_ms)?;
        self.flush_now(stored)
    }

    /// Like [`Store::commit_reconcile`] for one chunk of a long walk, but durable only with the
    /// next flush (the walk's last chunk, or sled's own within 500 ms). sled recovers whole
    /// transactions in the order they were made, so a crash loses the newest chunks together
    /// with the cursor they advanced, never one without the other: the next run walks them
    /// again. Not flushing each chunk keeps the walk from waiting on the disk.
    pub fn commit_reconcile_chunk(
        &self,
        project: &str,
        cursor: &Cursor,
        events: &[AuditEvent],
        destinations_for: &dyn Fn(&AuditEvent) -> Vec<String>,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let encode = |e: serde_json::Error| StoreError::Transaction { dir: self.dir.clone(), message: e.to_string() };
        let cursor_bytes = serde_json::to_vec(cursor).map_err(encode)?;
        self.store_events(Written::Cursor(project, &cursor_bytes), events, destinations_for, now_ms)
    }

    /// The one transaction that appends events (skipping known ids) with their outbox entries,
    /// chain links and time index, and records what they came with: a project's cursor, or
    /// the replica's position in the cluster's stream. Not flushed: the callers decide.
    fn store_events(
        &self,
        written: Written<'_>,
        events: &[AuditEvent],
        destinations_for: &dyn Fn(&AuditEvent) -> Vec<String>,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        // One writer at a time: which events are new, their numbers and where their index
        // entries go are decided here, before the transaction (which cannot range over a tree).
        let _one_writer = self.index_write.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let first_seq = self.next_seq()?;
        let mut seen = std::collections::HashSet::new();
        let mut fresh: Vec<(u64, &AuditEvent)> = Vec::with_capacity(events.len());
        for e in events {
            if seen.insert(e.id.as_str()) && self.seq_of_id(&e.id)?.is_none() {
                fresh.push((first_seq + fresh.len() as u64, e));
            }
        }
        let encode = |e: serde_json::Error| StoreError::Transaction { dir: self.dir.clone(), message: e.to_string() };
        // The chain links over the canonical JSON; the store keeps it compressed (`body`).
        let mut encoded: Vec<(Vec<u8>, Vec<u8>, Vec<String>)> = Vec::with_capacity(fresh.len());
        for (_, e) in &fresh {
            let json = serde_json::to_vec(e).map_err(encode)?;
            let stored = body::encode(&json).map_err(|e| StoreError::Transaction {
                dir: self.dir.clone(),
                message: format!("cannot compress an event: {e}"),
            })?;
            encoded.push((json, stored, destinations_for(e)));
        }
        let additions = index::Additions::of(fresh.iter().copied())
            .map_err(|message| StoreError::Transaction { dir: self.dir.clone(), message })?;
        let known = additions.known(&self.index).map_err(|e| self.sled(e))?;
        let trees = (&self.cursors, &self.events, &self.bodies, &self.outbox, &self.meta, &self.chain, &self.index);
        let result = trees.transaction(|(cursors, tx_events, tx_bodies, outbox, meta, links, index)| {
            let abort = ConflictableTransactionError::Abort;
            let seq = match meta.get(NEXT_SEQ)? {
                Some(v) => {
                    decode_u64(&self.dir, "meta", &v, || "the event counter (next_seq)".into()).map_err(abort)?
                }
                None => 0,
            };
            if seq != first_seq {
                return Err(abort(StoreError::Transaction {
                    dir: self.dir.clone(),
                    message: format!("the event counter moved from {first_seq} to {seq} during a write"),
                }));
            }
            let mut head = match meta.get(CHAIN_HEAD)? {
                Some(v) => chain::to_link(&self.dir, &v, || "the chain head (chain_head)".into()).map_err(abort)?,
                None if seq > 0 => {
                    return Err(abort(StoreError::Damaged {
                        what: "the chain head (chain_head) is missing although events are stored".into(),
                        location: format!("tree \"meta\" in {}", self.dir.display()),
                    }));
                }
                None => chain::GENESIS,
            };
            let mut tally = counts::Tally::default();
            // The groups this batch appends to, as they grow (see `bodies`).
            let mut groups: Vec<([u8; 8], Vec<u8>)> = Vec::new();
            for (&(seq, event), (json, stored_body, dests)) in fresh.iter().zip(&encoded) {
                tally.add(event);
                head = chain::link(&head, json);
                // The link travels in the body; a plain (too large to compress) body keeps its
                // link in the chain tree.
                let linked = body::with_link(stored_body, &head);
                if linked.is_none() {
                    links.insert(&seq.to_be_bytes(), &head)?;
                }
                let stored = linked.as_deref().unwrap_or(stored_body);
                let grouped = (stored.len() <= bodies::GROUPED_MAX).then_some(stored);
                if grouped.is_none() {
                    tx_events.insert(&seq.to_be_bytes(), stored)?;
                }
                let key = bodies::group_key(seq);
                if groups.last().is_none_or(|(k, _)| *k != key) {
                    let existing = tx_bodies.get(key)?.map(|v| v.to_vec()).unwrap_or_default();
                    groups.push((key, existing));
                }
                if let Some((_, group)) = groups.last_mut() {
                    *group = bodies::with_slot(Some(group), bodies::slot_of(seq), grouped)
                        .map_err(|why| abort(self.damaged_group(seq / bodies::GROUP, why)))?;
                }
                for dest in dests {
                    let delivery = Delivery::queued(dest, seq, event, now_ms);
                    let value = serde_json::to_vec(&delivery).map_err(|e| {
                        abort(StoreError::Transaction { dir: self.dir.clone(), message: e.to_string() })
                    })?;
                    outbox.insert(delivery_key(dest, seq), value)?;
                }
            }
            for (key, group) in groups {
                tx_bodies.insert(&key, group)?;
            }
            additions.write(&known, index)?;
            let next_seq = first_seq + fresh.len() as u64;
            meta.insert(NEXT_SEQ, &next_seq.to_be_bytes())?;
            meta.insert(CHAIN_HEAD, &head)?;
            tally.write(self, meta, next_seq)?;
            match written {
                Written::Cursor(project, cursor_bytes) => {
                    cursors.insert(project.as_bytes(), cursor_bytes)?;
                }
                Written::ReplicaPosition(position) => {
                    meta.insert(REPLICA_POSITION, &position.to_be_bytes())?;
                }
                Written::Discovery(list) => {
                    meta.insert(DISCOVERY, list)?;
                }
            }
            Ok(fresh.len())
        });
        let stored = result.map_err(|e: TransactionError<StoreError>| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(source) => StoreError::Sled { dir: self.dir.clone(), source },
        })?;
        // The batch is stored whatever happens here: a pass that fails is made again with the
        // next batch.
        if let Err(e) = self.added_young_ids(additions.young_ids()) {
            tracing::warn!(error = %e, "cannot settle the newest event ids into the id list yet");
        }
        Ok(stored)
    }

    /// Makes everything written so far durable; returns `stored` for the caller's convenience.
    fn flush_now(&self, stored: usize) -> Result<usize, StoreError> {
        self.db.flush().map_err(|source| StoreError::Sled { dir: self.dir.clone(), source })?;
        Ok(stored)
    }

    /// Stores the link events of a discovery with the list they lead to, in one transaction,
    /// flushed: a crash keeps both or neither, so the next discovery compares with the list
    /// the stored events describe. Returns how many events were new.
    pub fn commit_discovery(
        &self,
        list: &[u8],
        events: &[AuditEvent],
        destinations_for: &dyn Fn(&AuditEvent) -> Vec<String>,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let stored = self.store_events(Written::Discovery(list), events, destinations_for, now_ms)?;
        self.flush_now(stored)
    }

    /// The list the last successful discovery stored (the caller decodes it).
    pub fn discovery(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(DISCOVERY).map_err(|e| self.sled(e))?.map(|v| v.to_vec()))
    }

    /// Discovery's bookkeeping (the caller decodes it).
    pub fn discovery_status(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(DISCOVERY_STATUS).map_err(|e| self.sled(e))?.map(|v| v.to_vec()))
    }

    /// Flushed: the interval between discoveries counts from it across restarts.
    pub fn set_discovery_status(&self, value: &[u8]) -> Result<()> {
        self.meta.insert(DISCOVERY_STATUS, value).map_err(|e| self.sled(e))?;
        self.flush()
    }

    /// A cached GitLab API answer (the caller decodes it and decides whether it is fresh).
    pub fn gitlab_cache(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.gitlab_cache.get(key).map_err(|e| self.sled(e))?.map(|v| v.to_vec()))
    }

    /// Durable with the next flush (a lost entry is only asked again).
    pub fn set_gitlab_cache(&self, key: &str, value: &[u8]) -> Result<()> {
        self.gitlab_cache.insert(key, value).map_err(|e| self.sled(e))?;
        Ok(())
    }

    pub fn project_status(&self, project: &str) -> Result<ProjectStatus> {
        let location = || format!("status of project {project:?}");
        Ok(self
            .status
            .get(project)?
            .map(|v| decode(&self.dir, "status", &v, location))
            .transpose()?
            .unwrap_or_default())
    }

    pub fn set_project_status(&self, project: &str, status: &ProjectStatus) -> Result<()> {
        // Flushed with the run (reconcile_all), not per project: status is bookkeeping.
        self.status.insert(project, serde_json::to_vec(status)?)?;
        Ok(())
    }

    /// Projects that have a cursor (including ones no longer configured).
    pub fn synced_projects(&self) -> Result<Vec<String>> {
        self.cursors.iter().keys().map(|k| Ok(String::from_utf8_lossy(&k?).into_owned())).collect()
    }

    /// The events stored, counted one by one (`chain_head` says how many there should be).
    pub fn event_count(&self) -> Result<usize, StoreError> {
        self.bodies_from(0).try_fold(0, |n, body| body.map(|_| n + 1))
    }

    pub fn pending(&self, destination: Option<&str>) -> Result<Vec<Delivery>> {
        self.scan(&self.outbox, "outbox", destination)
    }

    /// How many deliveries of `destination` are pending, without decoding them.
    pub fn pending_count(&self, destination: &str) -> usize {
        self.outbox.scan_prefix(destination_prefix(destination)).keys().count()
    }

    pub fn dead(&self, destination: Option<&str>) -> Result<Vec<Delivery>> {
        self.scan(&self.dead, "dead", destination)
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush().context("cannot flush the state database")?;
        Ok(())
    }
}

/// For tests that reopen a store: sled lets go of its files in the background after a drop,
/// so the opens are retried briefly.
#[cfg(test)]
fn retry_open<T>(mut open: impl FnMut() -> anyhow::Result<T>) -> T {
    for _ in 0..100 {
        if let Ok(v) = open() {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    open().expect("open")
}

/// Creates `dir` (and parents) readable by the owner only: it holds mirrors and the trail.
/// An existing directory keeps its mode (systemd's `StateDirectoryMode=` decides there).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

/// Takes the directory's lock file, or says who has it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("policy-audit.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::Sled { dir: dir.to_path_buf(), source: sled::Error::Io(e) })?;
    // SAFETY: flock on a descriptor we own; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
            StoreError::Locked { dir: dir.to_path_buf() }
        } else {
            StoreError::Sled { dir: dir.to_path_buf(), source: sled::Error::Io(e) }
        });
    }
    Ok(file)
}
