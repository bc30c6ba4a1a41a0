//! One project's reconcile: fetch, walk the new first-parent steps, diff each step's policy
//! file against the last valid state, build the events, store them with the new cursor.
//!
//! Invariants:
//! - idempotent: the cursor moves only in the store transaction that holds the events, and event
//!   ids are deterministic, so a run interrupted anywhere is repeated with the same result;
//! - a step is a commit that changes the policy file's blob; an invalid or missing file emits one
//!   `security_policy_yaml_invalidated` and keeps the last valid state as the baseline;
//! - authors come from the step commit only, never from a later one.

use crate::config::{Config, InitialSync, Project};
use crate::event::{AuditEvent, StepContext};
use crate::policy::{self, LimitState, PolicySet, diff, limit_breaches};
use crate::repo::{self, Commit, Link, Mirror, PolicyBlob, PolicyPath};
use crate::store::{Cursor, Store, StoreError};
use anyhow::{Context, Result};
use gix::ObjectId;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the caller asks of a reconcile.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Replay the whole first-parent history (first sync or not); already stored events are
    /// recognised by id and not stored twice.
    pub backfill: bool,
    /// Show a progress bar for long walks (on a terminal).
    pub progress: bool,
    /// Set on shutdown: stop before the next project, and before storing (never half-way).
    pub stop: Option<Arc<AtomicBool>>,
    /// Where cursors and events are committed instead of the local store (cluster mode).
    pub trail: Option<Arc<dyn crate::cluster::ProjectTrail>>,
}

impl Options {
    fn stopped(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }
}

/// Time spent per phase, for `--timings` and the performance work.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub fetch_ms: f64,
    pub walk_ms: f64,
    pub parse_ms: f64,
    pub diff_ms: f64,
    pub store_ms: f64,
}

/// The result of one project's reconcile.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub project: String,
    /// "baseline" / "backfill" on a first sync.
    pub first_sync: Option<String>,
    pub from: Option<String>,
    pub to: String,
    /// First-parent commits walked.
    pub commits: usize,
    /// Commits that changed the policy file.
    pub steps: usize,
    /// Events built, per event type.
    pub events: BTreeMap<String, usize>,
    /// Events newly stored (fewer than built when a replay met already stored ids).
    pub stored: usize,
    pub flag_enabled: bool,
    pub history_rewritten: bool,
    /// The whole first-parent history was replayed.
    pub backfill: bool,
    pub timings: Timings,
    /// Wall time of this project's reconcile.
    pub duration_ms: f64,
}

impl Summary {
    pub fn event_total(&self) -> usize {
        self.events.values().sum()
    }
}

/// The directory of a project's mirror: readable name plus a hash, so paths never collide.
pub fn mirror_dir(config: &Config, project: &Project) -> PathBuf {
    let readable: String =
        project.path.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    config.mirrors_dir().join(format!("{readable}-{:08x}.git", crc32fast::hash(project.path.as_bytes())))
}

/// Events stored per transaction during a long walk: bounds memory, keeps transactions small.
const CHUNK_EVENTS: usize = 1000;

/// Chunk writer: stores the events with the cursor they lead to; returns how many were new.
type Sink<'a> = dyn Fn(&Cursor, &[AuditEvent]) -> Result<usize> + 'a;

fn count_events(summary: &mut Summary, events: &[AuditEvent]) {
    for e in events {
        *summary.events.entry(e.event_type.name().to_string()).or_default() += 1;
    }
}

/// A read of the mirror failed after a successful fetch: objects are missing or corrupt.
#[derive(Debug, thiserror::Error)]
#[error("the mirror cannot be read: {0}")]
pub struct MirrorDamaged(String);

/// Reconciles one project. `now` is the clock (passed in so tests control `detected_at`).
/// A mirror whose objects cannot be read is removed and cloned again, once.
pub fn reconcile_project(
    config: &Config,
    store: &Store,
    project: &Project,
    options: &Options,
    now: jiff::Timestamp,
) -> Result<Summary> {
    match attempt(config, store, project, options, now) {
        Err(e) if e.downcast_ref::<MirrorDamaged>().is_some() => {
            let dir = mirror_dir(config, project);
            tracing::warn!(project = %project.path, mirror = %dir.display(), error = %format!("{e:#}"), "re-cloning a damaged mirror");
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove damaged mirror {}", dir.display()))?;
            attempt(config, store, project, options, now).context("after re-cloning a damaged mirror")
        }
        other => other,
    }
}

fn attempt(
    config: &Config,
    store: &Store,
    project: &Project,
    options: &Options,
    now: jiff::Timestamp,
) -> Result<Summary> {
    let mut summary = Summary {
        project: project.path.clone(),
        flag_enabled: config.flag.enabled_for(&project.path),
        ..Summary::default()
    };
    let started = Instant::now();
    let cursor = match &options.trail {
        Some(trail) => trail.cursor(&project.path)?,
        None => store.cursor(&project.path)?,
    };
    summary.from = cursor.as_ref().map(|c| c.commit.clone());
    let backfill = options.backfill || (cursor.is_none() && project.initial_sync == InitialSync::Backfill);
    // A local repository can be asked directly: when its branch is where we left it, there is
    // nothing to fetch or walk (the common case for a fleet, at a fraction of a fetch's cost).
    if let (Some(c), false) = (&cursor, backfill)
        && repo::local_tip(&project.url, &project.branch)
            .is_some_and(|tip| ObjectId::from_hex(c.commit.as_bytes()).is_ok_and(|synced| synced == tip))
    {
        summary.to = c.commit.clone();
        summary.timings.fetch_ms = ms(started.elapsed());
        summary.duration_ms = summary.timings.fetch_ms;
        return Ok(summary);
    }
    let mirror = Mirror::open_or_init(&mirror_dir(config, project), &project.branch)?;
    let never = AtomicBool::new(false);
    let stop = options.stop.as_deref().unwrap_or(&never);
    let tip = match repo::fetch(&mirror, &project.url, project.token.as_ref(), config.fetch_timeout, stop) {
        Ok(fetched) => fetched.tip,
        // A fetch also fails when the mirror's own objects are gone: re-clone then.
        Err(e) if !mirror.is_sound() => return Err(anyhow::Error::new(MirrorDamaged(format!("{e:#}")))),
        Err(e) => return Err(e),
    };
    summary.timings.fetch_ms = ms(started.elapsed());
    summary.to = tip.to_string();
    if let Some(c) = &cursor
        && c.commit == summary.to
        && !backfill
    {
        summary.duration_ms = ms(started.elapsed());
        return Ok(summary); // nothing new: no walk at all
    }
    summary.backfill = backfill;
    if cursor.is_none() {
        summary.first_sync = Some(if backfill { "backfill" } else { "baseline" }.into());
    }
    let destinations_for = |e: &AuditEvent| destinations_for(config, e);
    // A long walk is stored in chunks, each transaction holding its events and the cursor at
    // the step it ends on: as atomic and resumable as one transaction, in bounded memory.
    let sink = |at: &Cursor, events: &[AuditEvent]| -> Result<usize> {
        if options.stopped() {
            anyhow::bail!("stopped by shutdown; what was stored is consistent, the next run goes on from there");
        }
        commit(store, options, &project.path, at, events, &destinations_for, now)
    };
    let (state, events) =
        walk_new_history(config, project, &mirror, &mut summary, options, cursor.as_ref(), tip, now, &sink).map_err(
            |e| {
                // Storing a chunk failed, or we are stopping: not a mirror problem.
                if e.downcast_ref::<crate::store::StoreError>().is_some() || options.stopped() {
                    e
                } else {
                    anyhow::Error::new(MirrorDamaged(format!("{e:#}")))
                }
            },
        )?;
    count_events(&mut summary, &events);
    let stored_at = Instant::now();
    let new_cursor =
        Cursor { commit: tip.to_string(), blob: state.blob, baseline: state.baseline, limits: state.limits };
    if options.stopped() {
        anyhow::bail!("stopped by shutdown before storing; nothing was written, the next run repeats this");
    }
    summary.stored += commit(store, options, &project.path, &new_cursor, &events, &destinations_for, now)?;
    summary.timings.store_ms += ms(stored_at.elapsed());
    summary.duration_ms = ms(started.elapsed());
    Ok(summary)
}

/// Stores events with the cursor they lead to: in the local store, or the cluster's trail.
fn commit(
    store: &Store,
    options: &Options,
    project: &str,
    cursor: &Cursor,
    events: &[AuditEvent],
    destinations_for: &dyn Fn(&AuditEvent) -> Vec<String>,
    now: jiff::Timestamp,
) -> Result<usize> {
    match &options.trail {
        Some(trail) => trail.commit(project, cursor, events),
        None => Ok(store.commit_reconcile(project, cursor, events, destinations_for, now.as_millisecond())?),
    }
}

/// Works out the steps since the cursor (or the baseline, or the rewrite) and their events.
/// Every error here is a failed read of the mirror.
#[allow(clippy::too_many_arguments)]
fn walk_new_history(
    config: &Config,
    project: &Project,
    mirror: &Mirror,
    summary: &mut Summary,
    options: &Options,
    cursor: Option<&Cursor>,
    tip: ObjectId,
    now: jiff::Timestamp,
    sink: &Sink<'_>,
) -> Result<(State, Vec<AuditEvent>)> {
    let backfill = summary.backfill;
    let chain_started = Instant::now();
    // The cheap walk (trees and first parents only); the revision walker when the last synced
    // commit is an ancestor off the first-parent chain (a merge made it a second parent).
    let chain = |since: Option<ObjectId>| -> Result<Vec<Link>> {
        match mirror.first_parent_chain(tip, since)? {
            Some(links) => Ok(links),
            None => mirror.links(&mirror.first_parent_steps(tip, since)?),
        }
    };
    let mut walker = Walker::new(config, project, mirror, summary, options.progress);
    let (state, plan) = match (cursor, backfill) {
        (_, true) => (State::before_history(), Plan::Steps(chain(None)?)),
        (None, false) => (walker.baseline_at(tip)?, Plan::Nothing),
        (Some(c), false) => match ObjectId::from_hex(c.commit.as_bytes()).ok() {
            Some(since) if mirror.has_commit(since) && mirror.is_ancestor(since, tip)? => {
                (State::from_cursor(c), Plan::Steps(chain(Some(since))?))
            }
            _ => (State::from_cursor(c), Plan::Rewritten(tip)),
        },
    };
    walker.summary.timings.walk_ms += ms(chain_started.elapsed());
    let emit = walker.summary.flag_enabled;
    match plan {
        Plan::Nothing => Ok((state, Vec::new())),
        Plan::Steps(steps) => walker.walk(state, &steps, emit, now, sink),
        Plan::Rewritten(tip) => walker.rewritten(state, tip, emit, now),
    }
}

/// The destinations whose filters accept an event.
pub fn destinations_for(config: &Config, event: &AuditEvent) -> Vec<String> {
    let mut paths: Vec<&str> = vec![event.entity_path.as_str()];
    paths.extend(event.details.linked_namespaces.iter().map(String::as_str));
    config.destinations.iter().filter(|d| d.wants(event.event_type, &paths)).map(|d| d.name.clone()).collect()
}

enum Plan {
    /// First sync in baseline mode: record the state, emit nothing.
    Nothing,
    Steps(Vec<Link>),
    /// The last synced commit is gone from the branch's history: one step to the tip.
    Rewritten(ObjectId),
}

/// The diff state carried from step to step (and stored in the cursor).
struct State {
    blob: String,
    baseline: Option<PolicySet>,
    limits: LimitState,
}

impl State {
    fn before_history() -> State {
        State { blob: String::new(), baseline: Some(PolicySet::default()), limits: LimitState::new() }
    }

    fn from_cursor(c: &Cursor) -> State {
        State { blob: c.blob.clone(), baseline: c.baseline.clone(), limits: c.limits.clone() }
    }
}

fn blob_key(blob: &PolicyBlob) -> String {
    match blob {
        PolicyBlob::Missing => String::new(),
        PolicyBlob::File(id) => id.to_string(),
        PolicyBlob::NotAFile(kind, id) => format!("{kind}:{id}"),
    }
}

struct Walker<'a> {
    config: &'a Config,
    project: &'a Project,
    mirror: &'a Mirror,
    summary: &'a mut Summary,
    path: PolicyPath,
    /// Parsed files by blob id: a reverted file is not parsed twice. Bounded.
    parsed: HashMap<ObjectId, Result<PolicySet, String>>,
    /// Files of the current window, parsed ahead in parallel.
    ahead: HashMap<ObjectId, Result<PolicySet, String>>,
    progress: bool,
}

const PARSE_CACHE_ENTRIES: usize = 64;
/// Steps whose files are parsed ahead at once.
const PARSE_WINDOW: usize = 64;

impl<'a> Walker<'a> {
    fn new(
        config: &'a Config,
        project: &'a Project,
        mirror: &'a Mirror,
        summary: &'a mut Summary,
        progress: bool,
    ) -> Self {
        Walker {
            config,
            project,
            mirror,
            summary,
            path: PolicyPath::new(&project.policy_file),
            parsed: HashMap::new(),
            ahead: HashMap::new(),
            progress,
        }
    }

    /// The state at `tip` for a baseline: the file there, or when it is invalid the last valid
    /// version before it, so the first change after the baseline is diffed correctly.
    fn baseline_at(&mut self, tip: ObjectId) -> Result<State> {
        let commit = self.mirror.commit(tip)?;
        let blob = self.path.lookup(self.mirror, commit.tree)?;
        let mut state = State { blob: blob_key(&blob), baseline: None, limits: LimitState::new() };
        let mut at = Some(commit);
        while let Some(c) = at {
            let blob = self.path.lookup(self.mirror, c.tree)?;
            if let Ok(set) = self.load(&blob)? {
                state.limits = limit_map(&set, self.project);
                state.baseline = Some(set);
                break;
            }
            at = c.first_parent.map(|p| self.mirror.commit(p)).transpose()?;
        }
        Ok(state)
    }

    fn walk(
        &mut self,
        mut state: State,
        steps: &[Link],
        emit: bool,
        now: jiff::Timestamp,
        sink: &Sink<'_>,
    ) -> Result<(State, Vec<AuditEvent>)> {
        let bar = self.progress_bar(steps.len());
        let mut events = Vec::new();
        let walk_started = Instant::now();
        let mut stepping = Duration::ZERO;
        // Which commits change the file: a cheap pass over trees only.
        let mut changes: Vec<(Link, PolicyBlob)> = Vec::new();
        let mut key = state.blob.clone();
        for link in steps {
            bar.inc(1);
            self.summary.commits += 1;
            let blob = self.path.lookup(self.mirror, link.tree)?;
            let next = blob_key(&blob);
            if next != key {
                key = next;
                changes.push((*link, blob));
            }
        }
        // Then window by window: parse ahead on all cores, diff in order.
        for window in changes.chunks(PARSE_WINDOW) {
            let parse_started = Instant::now();
            self.parse_ahead(window.iter().map(|(_, blob)| blob))?;
            self.summary.timings.parse_ms += ms(parse_started.elapsed());
            stepping += parse_started.elapsed();
            for (link, blob) in window {
                let step_started = Instant::now();
                let commit = self.mirror.commit(link.id)?;
                self.summary.steps += 1;
                state.blob = blob_key(blob);
                let previous = commit.first_parent.map(|p| p.to_string());
                self.step(&mut state, &commit, blob, previous.as_deref(), false, emit, now, &mut events)?;
                stepping += step_started.elapsed();
                if events.len() >= CHUNK_EVENTS {
                    let stored_at = Instant::now();
                    let at = Cursor {
                        commit: link.id.to_string(),
                        blob: state.blob.clone(),
                        baseline: state.baseline.clone(),
                        limits: state.limits.clone(),
                    };
                    self.summary.stored += sink(&at, &events)?;
                    count_events(self.summary, &events);
                    events.clear();
                    self.summary.timings.store_ms += ms(stored_at.elapsed());
                    stepping += stored_at.elapsed();
                }
            }
        }
        // Parse and diff time is counted by `step`; the rest of the loop is walking.
        self.summary.timings.walk_ms += ms(walk_started.elapsed().saturating_sub(stepping));
        bar.finish_and_clear();
        Ok((state, events))
    }

    fn rewritten(
        &mut self,
        mut state: State,
        tip: ObjectId,
        emit: bool,
        now: jiff::Timestamp,
    ) -> Result<(State, Vec<AuditEvent>)> {
        let mut events = Vec::new();
        self.summary.history_rewritten = true;
        self.summary.commits = 1;
        let commit = self.mirror.commit(tip)?;
        let blob = self.path.lookup(self.mirror, commit.tree)?;
        let key = blob_key(&blob);
        let previous = self.summary.from.clone();
        // A rewrite that leaves the file's content as it was changes nothing to report.
        if key != state.blob {
            self.summary.steps = 1;
            state.blob = key;
            self.step(&mut state, &commit, &blob, previous.as_deref(), true, emit, now, &mut events)?;
        }
        Ok((state, events))
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        state: &mut State,
        commit: &Commit,
        blob: &PolicyBlob,
        previous: Option<&str>,
        rewritten: bool,
        emit: bool,
        now: jiff::Timestamp,
        events: &mut Vec<AuditEvent>,
    ) -> Result<()> {
        let parse_started = Instant::now();
        let loaded = self.load(blob)?;
        self.summary.timings.parse_ms += ms(parse_started.elapsed());
        let diff_started = Instant::now();
        let sha = commit.id.to_string();
        let ctx = StepContext {
            project: self.project,
            sha: &sha,
            previous_sha: previous,
            author_name: &commit.author_name,
            author_email: &commit.author_email,
            author_id: self.config.author_id(&commit.author_email),
            committed_at: commit.committed_at,
            message: &commit.message,
            detected_at: now,
            history_rewritten: rewritten,
        };
        match loaded {
            Err(reason) => {
                if emit {
                    events.push(ctx.invalidated_event(&reason));
                }
            }
            Ok(set) => {
                let empty = PolicySet::default();
                let before = state.baseline.as_ref().unwrap_or(&empty);
                if emit {
                    events.extend(diff(before, &set).iter().map(|c| ctx.change_event(c)));
                }
                let breaches = limit_breaches(&set, &self.project.limits);
                for b in &breaches {
                    if emit && !same_names(state.limits.get(&b.policy_type), &b.skipped) {
                        events.push(ctx.limit_event(b));
                    }
                }
                state.limits = breaches.into_iter().map(|b| (b.policy_type, b.skipped)).collect();
                state.baseline = Some(set);
            }
        }
        self.summary.timings.diff_ms += ms(diff_started.elapsed());
        Ok(())
    }

    /// The policy set in a blob, or why it is invalid (missing, not a file, too big, bad YAML).
    /// The outer error is a failed read of the mirror: never reported as an invalid file.
    fn load(&mut self, blob: &PolicyBlob) -> Result<Result<PolicySet, String>> {
        let file = &self.project.policy_file;
        let id = match blob {
            PolicyBlob::Missing => return Ok(Err(format!("{file} does not exist"))),
            PolicyBlob::NotAFile(kind, _) => return Ok(Err(format!("{file} is {kind}, not a file"))),
            PolicyBlob::File(id) => *id,
        };
        if let Some(cached) = self.parsed.get(&id) {
            return Ok(cached.clone());
        }
        let result = match self.ahead.remove(&id) {
            Some(parsed) => parsed,
            None => match self.read(id)? {
                Ok(bytes) => policy::parse(&bytes).map_err(|e| e.reason),
                Err(too_big) => Err(too_big),
            },
        };
        if self.parsed.len() >= PARSE_CACHE_ENTRIES {
            self.parsed.clear();
        }
        self.parsed.insert(id, result.clone());
        Ok(result)
    }

    /// A blob's bytes, or why it is not read (over `max_policy_file_bytes`).
    fn read(&self, id: ObjectId) -> Result<Result<Vec<u8>, String>> {
        let file = &self.project.policy_file;
        let max = self.config.max_policy_file_bytes;
        let size = self.mirror.blob_size(id)?;
        if size > max {
            return Ok(Err(format!("{file} is {size} bytes, over the limit of {max} bytes (max_policy_file_bytes)")));
        }
        Ok(Ok(self.mirror.read_blob(id)?))
    }

    /// Parses the files of the coming steps on all cores (they are independent; parsing is
    /// most of a long walk's time), so `load` finds them ready.
    fn parse_ahead<'b>(&mut self, blobs: impl Iterator<Item = &'b PolicyBlob>) -> Result<()> {
        self.ahead.clear();
        let mut todo: Vec<(ObjectId, Vec<u8>)> = Vec::new();
        for blob in blobs {
            let PolicyBlob::File(id) = blob else { continue };
            if self.parsed.contains_key(id) || self.ahead.contains_key(id) || todo.iter().any(|(t, _)| t == id) {
                continue;
            }
            match self.read(*id)? {
                Ok(bytes) => todo.push((*id, bytes)),
                Err(too_big) => {
                    self.ahead.insert(*id, Err(too_big));
                }
            }
        }
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 8);
        let per_worker = todo.len().div_ceil(workers).max(1);
        let parsed: Vec<(ObjectId, Result<PolicySet, String>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = todo
                .chunks(per_worker)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|(id, bytes)| (*id, policy::parse(bytes).map_err(|e| e.reason)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            // A worker that panicked leaves its files to `load`, which parses them itself.
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        self.ahead.extend(parsed);
        Ok(())
    }

    fn progress_bar(&self, len: usize) -> indicatif::ProgressBar {
        use std::io::IsTerminal;
        if !self.progress || len < 100 || !std::io::stderr().is_terminal() {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(len as u64);
        let style = indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} commits ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_prefix(self.project.path.clone());
        bar
    }
}

/// The skipped policies are a set: the same names in another order are no change.
fn same_names(before: Option<&Vec<String>>, after: &[String]) -> bool {
    let Some(before) = before else { return false };
    let mut a: Vec<&String> = before.iter().collect();
    let mut b: Vec<&String> = after.iter().collect();
    a.sort();
    b.sort();
    a == b
}

fn limit_map(set: &PolicySet, project: &Project) -> LimitState {
    limit_breaches(set, &project.limits).into_iter().map(|b| (b.policy_type, b.skipped)).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One project's reconcile, named.
pub type Outcome = (String, Result<Summary>);

/// Runs the reconcile of every project, up to `config.parallelism` at once, and returns the
/// results in config order; a failure is recorded for that project and the others go on. One
/// reconcile at a time per store; the store is flushed before this returns. On shutdown, the
/// projects not started yet are left for the next run.
pub fn reconcile_all(
    config: &Config,
    store: &Store,
    projects: &[&Project],
    options: &Options,
    now: impl Fn() -> jiff::Timestamp + Sync,
) -> Vec<(String, Result<Summary>)> {
    let _run = store.lock_reconcile();
    // Projects are independent: run up to `parallelism` at once (fetches mostly wait on I/O),
    // and report in config order.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let damaged = AtomicBool::new(false);
    let slots: Vec<std::sync::Mutex<Option<Outcome>>> = projects.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let workers = config.parallelism.clamp(1, projects.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(p) = projects.get(i) else { break };
                    if options.stopped() || damaged.load(Ordering::SeqCst) {
                        break;
                    }
                    let done = reconcile_one(config, store, p, options, &now);
                    if done.1.as_ref().is_err_and(StoreError::is_damaged) {
                        // Nothing more is written to a damaged store.
                        damaged.store(true, Ordering::SeqCst);
                    }
                    if let Ok(mut slot) = slots[i].lock() {
                        *slot = Some(done);
                    }
                }
            });
        }
    });
    if !damaged.load(Ordering::SeqCst)
        && let Err(e) = store.flush()
    {
        tracing::error!(error = %format!("{e:#}"), "cannot flush the state database");
    }
    slots.into_iter().filter_map(|s| s.into_inner().ok().flatten()).collect()
}

fn reconcile_one(
    config: &Config,
    store: &Store,
    p: &Project,
    options: &Options,
    now: &(impl Fn() -> jiff::Timestamp + Sync),
) -> (String, Result<Summary>) {
    {
        {
            let result =
                reconcile_project(config, store, p, options, now()).with_context(|| format!("project {}", p.path));
            if result.as_ref().is_err_and(StoreError::is_damaged) {
                return (p.path.clone(), result); // nothing is written to a damaged store
            }
            let mut status = match store.project_status(&p.path) {
                Ok(status) => status,
                Err(e) => {
                    tracing::error!(project = %p.path, error = %format!("{e:#}"), "cannot read project status");
                    return (p.path.clone(), result.and(Err(e)));
                }
            };
            let at = crate::event::rfc3339_millis(now());
            status.last_run_at = Some(at.clone());
            match &result {
                Ok(_) => {
                    status.last_success_at = Some(at);
                    status.last_error = None;
                }
                Err(e) => {
                    status.last_error = Some(format!("{e:#}"));
                    status.last_error_at = Some(at);
                }
            }
            if let Err(e) = store.set_project_status(&p.path, &status) {
                tracing::warn!(project = %p.path, error = %format!("{e:#}"), "cannot record project status");
            }
            (p.path.clone(), result)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_names;

    #[test]
    fn skipped_policies_compare_as_a_set() {
        let before = vec!["b".to_string(), "c".to_string()];
        assert!(same_names(Some(&before), &["c".into(), "b".into()]));
        assert!(!same_names(Some(&before), &["b".into()]));
        assert!(!same_names(None, &["b".into()]));
    }
}
