//! One project's reconcile: fetch, walk the new first-parent steps, diff each step's policy
//! file against the last valid state, build the events, store them with the new cursor.
//!
//! The stages, one file each: `walk.rs` (which commits are steps, the plan: baseline, steps or
//! rewrite), `policy_files.rs` (reading and parsing the file of each step, cached and parsed
//! ahead), `step.rs` (pure: state + loaded file + step context -> events + new state) and
//! `fleet.rs` (every project of a run, in parallel). This file holds one project's attempt and
//! the one [`error_policy`] that decides between cloning the mirror again and giving up.
//!
//! Invariants:
//! - idempotent: the cursor moves only in the store transaction that holds the events, and event
//!   ids are deterministic, so a run interrupted anywhere is repeated with the same result;
//! - a step is a commit that changes the policy file's blob; an invalid or missing file emits one
//!   `security_policy_yaml_invalidated` and keeps the last valid state as the baseline;
//! - authors come from the step commit only, never from a later one.

mod fleet;
mod included;
mod policy_files;
mod step;
mod walk;

pub use fleet::{Outcome, reconcile_all};

use crate::config::{Config, InitialSync, Project};
use crate::event::AuditEvent;
use crate::gitlab::attribution::Attributor;
use crate::repo::{self, Mirror};
use crate::stop::Stop;
use crate::store::{Cursor, Store};
use anyhow::{Context, Result};
use gix::ObjectId;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use walk::walk_new_history;

/// What the caller asks of a reconcile.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Replay the whole first-parent history (first sync or not); already stored events are
    /// recognised by id and not stored twice.
    pub backfill: bool,
    /// Record a new baseline for a project whose state is gone although its mirror shows an
    /// earlier trail (otherwise refused with [`TrailLost`]).
    pub rebaseline: bool,
    /// Show a progress bar for long walks (on a terminal).
    pub progress: bool,
    /// Set on shutdown: stop before the next project, and before storing (never half-way).
    pub stop: Stop,
    /// Where cursors and events are committed instead of the local store (cluster mode).
    pub trail: Option<Arc<dyn crate::cluster::ProjectTrail>>,
}

impl Options {
    fn stopped(&self) -> bool {
        self.stop.is_cancelled()
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
    /// Fetches of included projects (one per repository, however many policies include from it).
    #[serde(skip_serializing_if = "is_zero")]
    pub included_fetches: usize,
    /// Included projects or includes that could not be read this run (their state is kept).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub included_errors: Vec<String>,
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

/// Events stored per transaction during a long walk. sled's cost per write grows with the
/// transaction, and what it holds in memory with the writes not yet flushed: at 1,000 a
/// 20,000-commit backfill peaked at 126 MiB, at 50 at 70 MiB and 10 % faster (smaller still
/// buys nothing; docs/performance.md).
const CHUNK_EVENTS: usize = 50;

/// Chunk writer: stores the events with the cursor they lead to; returns how many were new.
type Sink<'a> = dyn Fn(&Cursor, &[AuditEvent]) -> Result<usize> + 'a;

fn count_events(summary: &mut Summary, events: &[AuditEvent]) {
    for e in events {
        *summary.events.entry(e.event_type.name().to_string()).or_default() += 1;
    }
}

/// The state database has no cursor for a project whose mirror records that its events were
/// stored before: the state was deleted or replaced. A silent new baseline would hide every
/// change made since, so it is refused until the user says so.
#[derive(Debug, thiserror::Error)]
#[error(
    "the state database has no record of project {project} but its mirror {mirror} shows that its trail was stored before \
     (the state database was deleted, replaced or restored from an old backup); refusing to record a new baseline, which \
     would hide the changes made since. Restore the state database, or run `policy-audit reconcile --project {project} --backfill` \
     to replay the whole history, or `policy-audit reconcile --project {project} --rebaseline` to start a new trail from the \
     current policy file"
)]
pub struct TrailLost {
    pub project: String,
    pub mirror: String,
}

/// Written into a mirror once a reconcile of its project has stored its cursor: the evidence
/// that a trail exists, which outlives a deleted state database.
const SYNCED_MARKER: &str = "policy-audit-synced";

fn mark_synced(dir: &std::path::Path, project: &Project) {
    let marker = dir.join(SYNCED_MARKER);
    if dir.join("HEAD").exists()
        && !marker.exists()
        && let Err(e) = std::fs::write(&marker, format!("{}\n", project.path))
    {
        tracing::warn!(project = %project.path, file = %marker.display(), error = %e, "cannot record that the project was synced");
    }
}

/// A fetch failed and the mirror itself is unsound: its objects are missing or corrupt.
#[derive(Debug, thiserror::Error)]
#[error("the mirror cannot be read: {0}")]
pub struct MirrorDamaged(String);

/// What to do after a failed attempt of one project.
#[derive(Debug, PartialEq, Eq)]
enum Recovery {
    /// The mirror's objects are missing or corrupt: remove it and clone again (once).
    Reclone,
    /// Anything else fails the same way on a new clone: report it; the next run tries again.
    GiveUp,
}

/// The one place that decides whether a failure is cured by cloning the mirror again, from the
/// error's type alone (kube-rs's `error_policy`): a mirror found unsound after a failed fetch
/// ([`MirrorDamaged`]) or an object that cannot be read ([`repo::ObjectUnreadable`]). A store
/// failure, a shutdown, an unreachable remote, a missing branch or an odd commit never delete a
/// mirror.
fn error_policy(e: &anyhow::Error, options: &Options) -> Recovery {
    let damaged = e.chain().any(|c| c.is::<MirrorDamaged>() || c.is::<repo::ObjectUnreadable>());
    if damaged && !options.stopped() { Recovery::Reclone } else { Recovery::GiveUp }
}

/// Reconciles one project. `now` is the clock (passed in so tests control `detected_at`).
/// A mirror whose objects cannot be read is removed and cloned again, once.
pub fn reconcile_project(
    config: &Config,
    store: &Store,
    project: &Project,
    options: &Options,
    attributor: &Attributor,
    now: jiff::Timestamp,
) -> Result<Summary> {
    let first = attempt(config, store, project, options, attributor, now);
    match first {
        Err(e) if error_policy(&e, options) == Recovery::Reclone => {
            let dir = mirror_dir(config, project);
            tracing::warn!(project = %project.path, mirror = %dir.display(), error = %format!("{e:#}"), "re-cloning a damaged mirror");
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove damaged mirror {}", dir.display()))?;
            attempt(config, store, project, options, attributor, now).context("after re-cloning a damaged mirror")
        }
        other => other,
    }
}

fn attempt(
    config: &Config,
    store: &Store,
    project: &Project,
    options: &Options,
    attributor: &Attributor,
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
        mark_synced(&mirror_dir(config, project), project);
        summary.timings.fetch_ms = ms(started.elapsed());
        track_included_at(config, store, project, options, attributor, now, c, &mut summary)?;
        summary.duration_ms = ms(started.elapsed());
        return Ok(summary);
    }
    let dir = mirror_dir(config, project);
    if cursor.is_none() && !backfill && !options.rebaseline && dir.join(SYNCED_MARKER).exists() {
        return Err(anyhow::Error::new(TrailLost { project: project.path.clone(), mirror: dir.display().to_string() }));
    }
    let mirror = Mirror::open_or_init(&dir, &project.branch)?;
    let tip = match repo::fetch(
        &mirror,
        &project.url,
        project.token.as_ref(),
        &project.tls,
        config.fetch_timeout,
        &options.stop,
    ) {
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
        mark_synced(&dir, project);
        track_included_at(config, store, project, options, attributor, now, c, &mut summary)?;
        summary.duration_ms = ms(started.elapsed());
        return Ok(summary); // nothing new in the SPP: no walk at all
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
        let mut events = events.to_vec();
        attributor.apply(&mut events);
        commit(store, options, &project.path, at, &events, &destinations_for, now, Durable::WithTheLastChunk)
    };
    let (state, mut events) =
        walk_new_history(config, project, &mirror, &mut summary, options, cursor.as_ref(), tip, now, &sink)?;
    let tip_sha = tip.to_string();
    let run = included::Run {
        config,
        project,
        stop: &options.stop,
        spp_sha: tip_sha.clone(),
        now,
        emit: summary.flag_enabled,
    };
    let (now_included, more) = run.track(state.baseline.as_ref(), &state.included, &mut summary);
    events.extend(more);
    count_events(&mut summary, &events);
    let stored_at = Instant::now();
    let mut new_cursor = state.cursor(tip_sha.clone());
    new_cursor.included = now_included;
    if options.stopped() {
        anyhow::bail!("stopped by shutdown before storing; nothing was written, the next run repeats this");
    }
    attributor.apply(&mut events);
    summary.stored +=
        commit(store, options, &project.path, &new_cursor, &events, &destinations_for, now, Durable::Now)?;
    mark_synced(&dir, project);
    summary.timings.store_ms += ms(stored_at.elapsed());
    summary.duration_ms = ms(started.elapsed());
    Ok(summary)
}

/// An SPP whose own branch did not move: the files its policies include are still checked,
/// and stored with its cursor when anything changed (nothing is written otherwise).
#[allow(clippy::too_many_arguments)]
fn track_included_at(
    config: &Config,
    store: &Store,
    project: &Project,
    options: &Options,
    attributor: &Attributor,
    now: jiff::Timestamp,
    cursor: &Cursor,
    summary: &mut Summary,
) -> Result<()> {
    let has_includes = cursor.baseline.as_ref().is_some_and(|set| !included::includes(set).is_empty());
    if !has_includes && cursor.included.is_empty() {
        return Ok(());
    }
    let run = included::Run {
        config,
        project,
        stop: &options.stop,
        spp_sha: cursor.commit.clone(),
        now,
        emit: summary.flag_enabled,
    };
    let (now_included, mut events) = run.track(cursor.baseline.as_ref(), &cursor.included, summary);
    if now_included == cursor.included && events.is_empty() {
        return Ok(());
    }
    if options.stopped() {
        anyhow::bail!("stopped by shutdown before storing; nothing was written, the next run repeats this");
    }
    count_events(summary, &events);
    let mut next = cursor.clone();
    next.included = now_included;
    attributor.apply(&mut events);
    let destinations_for = |e: &AuditEvent| destinations_for(config, e);
    summary.stored += commit(store, options, &project.path, &next, &events, &destinations_for, now, Durable::Now)?;
    Ok(())
}

/// When a local commit must be on disk.
#[derive(Clone, Copy)]
enum Durable {
    /// Before `commit` returns: the end of a project's run.
    Now,
    /// A chunk of a long walk: with the walk's last chunk (see [`Store::commit_reconcile_chunk`]).
    WithTheLastChunk,
}

/// Stores events with the cursor they lead to: in the local store, or the cluster's trail.
#[allow(clippy::too_many_arguments)]
fn commit(
    store: &Store,
    options: &Options,
    project: &str,
    cursor: &Cursor,
    events: &[AuditEvent],
    destinations_for: &dyn Fn(&AuditEvent) -> Vec<String>,
    now: jiff::Timestamp,
    durable: Durable,
) -> Result<usize> {
    let now_ms = now.as_millisecond();
    match (&options.trail, durable) {
        (Some(trail), _) => trail.commit(project, cursor, events),
        (None, Durable::Now) => Ok(store.commit_reconcile(project, cursor, events, destinations_for, now_ms)?),
        (None, Durable::WithTheLastChunk) => {
            Ok(store.commit_reconcile_chunk(project, cursor, events, destinations_for, now_ms)?)
        }
    }
}

/// The destinations whose filters accept an event.
pub fn destinations_for(config: &Config, event: &AuditEvent) -> Vec<String> {
    let mut paths: Vec<&str> = vec![event.entity_path.as_str()];
    paths.extend(event.details.linked_namespaces.iter().map(String::as_str));
    config.destinations.iter().filter(|d| d.wants(event.event_type, &paths)).map(|d| d.name.clone()).collect()
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
