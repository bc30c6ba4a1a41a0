//! Which commits are steps: the plan for one project's new history (a baseline, the first-parent
//! steps since the cursor, or one step to the tip after a rewrite), walked cheaply over trees,
//! then step by step, stored in chunks through the sink.

use super::policy_files::{Ahead, PARSE_AHEAD, STEPS_AHEAD, blob_key};
use super::step::{self, State, limit_map};
use super::{CHUNK_EVENTS, Options, Sink, Summary, count_events, ms};
use crate::config::{Config, Project};
use crate::event::{AuditEvent, StepContext};
use crate::policy::{InvalidPolicyFile, LimitState, PolicySet};
use crate::repo::{Commit, Link, Mirror, PolicyBlob, PolicyPath};
use crate::stop::Stop;
use crate::store::Cursor;
use anyhow::Result;
use gix::ObjectId;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Works out the steps since the cursor (or the baseline, or the rewrite) and their events.
/// Every error here is a failed read of the mirror.
#[allow(clippy::too_many_arguments)]
pub(super) fn walk_new_history(
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
    // The cheap walk: trees and first parents only.
    let mut walker = Walker::new(config, project, mirror, summary, options);
    if backfill {
        let emit = walker.summary.flag_enabled;
        walker.replay = Some(super::included::replay::Replay::new(super::included::Run {
            config,
            project,
            stop: &options.stop,
            spp_sha: String::new(),
            now,
            emit,
        }));
    }
    let (state, plan) = match (cursor, backfill) {
        (_, true) => (State::before_history(), Plan::Steps(mirror.first_parent_chain(tip, None)?.unwrap_or_default())),
        (None, false) => (walker.baseline_at(tip)?, Plan::Nothing),
        (Some(c), false) => match ObjectId::from_hex(c.commit.as_bytes()).ok() {
            // The last synced commit must be on the tip's first-parent line for the steps to be
            // the changes made since. Not there, it is either gone (a force push) or an ancestor
            // off that line (a "foxtrot" merge put it on a second-parent side), where walking
            // the line would charge the side branch's commits with reverting what only the
            // other line had: both are a rewrite, never an invented change. (No merge-base
            // search: it decodes every commit's signatures, which one odd commit must not stop.)
            Some(since) if mirror.has_commit(since) => match mirror.first_parent_chain(tip, Some(since))? {
                Some(links) => (State::from_cursor(c), Plan::Steps(links)),
                None => (State::from_cursor(c), Plan::Rewritten(tip)),
            },
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

enum Plan {
    /// First sync in baseline mode: record the state, emit nothing.
    Nothing,
    Steps(Vec<Link>),
    /// The last synced commit is gone from the branch's history, or off its first-parent line:
    /// one step to the tip.
    Rewritten(ObjectId),
}

pub(super) struct Walker<'a> {
    pub(super) config: &'a Config,
    pub(super) project: &'a Project,
    pub(super) mirror: &'a Mirror,
    pub(super) summary: &'a mut Summary,
    pub(super) path: PolicyPath,
    /// Parsed files by blob id: a reverted file is not parsed twice. Bounded.
    pub(super) parsed: HashMap<ObjectId, Result<PolicySet, InvalidPolicyFile>>,
    /// Files of the coming steps, parsed on other threads (only during [`Walker::walk`]).
    pub(super) ahead: Ahead,
    pub(super) progress: bool,
    /// Shutdown: a long walk stops between steps (what was stored is consistent).
    pub(super) stop: Stop,
    /// A backfill: the included files' history, replayed between the steps.
    pub(super) replay: Option<super::included::replay::Replay<'a>>,
}

impl<'a> Walker<'a> {
    fn new(
        config: &'a Config,
        project: &'a Project,
        mirror: &'a Mirror,
        summary: &'a mut Summary,
        options: &Options,
    ) -> Self {
        Walker {
            config,
            project,
            mirror,
            summary,
            path: PolicyPath::new(&project.policy_file),
            parsed: HashMap::new(),
            ahead: Ahead::default(),
            progress: options.progress,
            stop: options.stop.clone(),
            replay: None,
        }
    }

    fn check_stop(&self) -> Result<()> {
        if self.stop.is_cancelled() {
            anyhow::bail!("stopped by shutdown; what was stored is consistent, the next run goes on from there");
        }
        Ok(())
    }

    /// The state at `tip` for a baseline: the file there, or when it is invalid the last valid
    /// version before it, so the first change after the baseline is diffed correctly.
    fn baseline_at(&mut self, tip: ObjectId) -> Result<State> {
        let commit = self.mirror.commit(tip)?;
        let blob = self.path.lookup(self.mirror, commit.tree)?;
        let mut state =
            State { blob: blob_key(&blob), baseline: None, limits: LimitState::new(), included: Default::default() };
        let mut at = Some(commit);
        while let Some(c) = at {
            let blob = self.path.lookup(self.mirror, c.tree)?;
            if let Ok(set) = self.load(&blob)? {
                state.limits = limit_map(&set, &self.project.limits);
                state.baseline = Some(set);
                break;
            }
            at = c.first_parent.map(|p| self.mirror.commit(p)).transpose()?;
        }
        Ok(state)
    }

    fn walk(
        &mut self,
        state: State,
        steps: &[Link],
        emit: bool,
        now: jiff::Timestamp,
        sink: &Sink<'_>,
    ) -> Result<(State, Vec<AuditEvent>)> {
        // A short walk (the usual run: a commit or a few) parses its files itself: starting the
        // threads would cost more than they save.
        if steps.len() < PARSE_AHEAD {
            return self.walk_steps(state, steps, emit, now, sink);
        }
        // This thread walks, diffs and stores: the other cores parse (on 2 cores, one parsing
        // thread was as fast as two and steadier, docs/performance.md).
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let workers = cores.saturating_sub(1).clamp(1, 8);
        Ahead::run(self, workers, |walker| walker.walk_steps(state, steps, emit, now, sink))
    }

    /// The steps in order: a cheap pass over trees finds the commits that change the file and
    /// hands their files to the parsing threads, staying [`PARSE_AHEAD`] files ahead of the
    /// steps, which load, diff and store them.
    fn walk_steps(
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
        let mut changes: VecDeque<(Link, PolicyBlob)> = VecDeque::new();
        let mut looked = 0;
        let mut key = state.blob.clone();
        loop {
            while looked < steps.len() && self.ahead.in_flight() < PARSE_AHEAD && changes.len() < STEPS_AHEAD {
                if looked % 4096 == 0 {
                    self.check_stop()?;
                }
                let link = steps[looked];
                looked += 1;
                bar.inc(1);
                self.summary.commits += 1;
                let blob = self.path.lookup(self.mirror, link.tree)?;
                let next = blob_key(&blob);
                if next != key {
                    key = next;
                    self.hand_over(&blob)?;
                    changes.push_back((link, blob));
                }
            }
            let Some((link, blob)) = changes.pop_front() else { break };
            self.check_stop()?;
            let step_started = Instant::now();
            let commit = self.mirror.commit(link.id)?;
            self.summary.steps += 1;
            let previous = commit.first_parent.map(|p| p.to_string());
            // A backfill: the included files up to this step under the policies before it, then
            // the includes this step adds start at its time.
            let until = self.replay.is_some().then(|| self.committed_at(&commit, now));
            if until.is_some() {
                self.replay_included(&mut state, until, previous.as_deref().unwrap_or(""), &mut events)?;
            }
            state.blob = blob_key(&blob);
            state = self.step(state, &commit, &blob, previous.as_deref(), false, emit, now, &mut events)?;
            if until.is_some() {
                self.replay_included(&mut state, until, &link.id.to_string(), &mut events)?;
            }
            stepping += step_started.elapsed();
            if events.len() >= CHUNK_EVENTS {
                let stored_at = Instant::now();
                let at = state.cursor(link.id.to_string());
                self.summary.stored += sink(&at, &events)?;
                count_events(self.summary, &events);
                events.clear();
                self.summary.timings.store_ms += ms(stored_at.elapsed());
                stepping += stored_at.elapsed();
            }
        }
        if self.replay.is_some() {
            let tip = steps.last().map(|l| l.id.to_string()).unwrap_or_default();
            self.replay_included(&mut state, None, &tip, &mut events)?;
        }
        // Parse and diff time is counted by `step`; the rest of the loop is walking.
        self.summary.timings.walk_ms += ms(walk_started.elapsed().saturating_sub(stepping));
        bar.finish_and_clear();
        Ok((state, events))
    }

    /// The included files of the policies as they are in `state`, moved to `until`.
    fn replay_included(
        &mut self,
        state: &mut State,
        until: Option<i64>,
        spp_sha: &str,
        events: &mut Vec<AuditEvent>,
    ) -> Result<()> {
        if let Some(replay) = self.replay.as_mut() {
            replay.advance(state.baseline.as_ref(), &mut state.included, until, spp_sha, self.summary, events)?;
        }
        Ok(())
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
            state = self.step(state, &commit, &blob, previous.as_deref(), true, emit, now, &mut events)?;
        }
        Ok((state, events))
    }

    /// Loads the step's file (I/O, timed as parsing) and applies the pure [`step::apply`].
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        state: State,
        commit: &Commit,
        blob: &PolicyBlob,
        previous: Option<&str>,
        rewritten: bool,
        emit: bool,
        now: jiff::Timestamp,
        events: &mut Vec<AuditEvent>,
    ) -> Result<State> {
        let parse_started = Instant::now();
        let loaded = self.load(blob)?;
        self.summary.timings.parse_ms += ms(parse_started.elapsed());
        let diff_started = Instant::now();
        let sha = commit.id.to_string();
        let ctx = StepContext {
            project: self.project.spp(),
            sha: &sha,
            previous_sha: previous,
            author_name: &commit.author_name,
            author_email: &commit.author_email,
            author_id: self.config.author_id(&commit.author_email),
            committed_at: self.committed_at(commit, now),
            message: &commit.message,
            detected_at: now,
            history_rewritten: rewritten,
        };
        let ahead = &mut self.ahead;
        let (state, made) =
            step::apply_then(state, loaded, &ctx, &self.project.limits, emit, |replaced| ahead.discard(replaced));
        events.extend(made);
        self.summary.timings.diff_ms += ms(diff_started.elapsed());
        Ok(state)
    }

    /// The commit's time, or when it is missing or absurd (before year -9999 or after 9999) the
    /// time of detection, said in a warning: never a made-up 1970-01-01.
    fn committed_at(&self, commit: &Commit, now: jiff::Timestamp) -> i64 {
        match commit.committed_at {
            Some(secs) => secs,
            None => {
                tracing::warn!(
                    project = %self.project.path,
                    commit = %commit.id,
                    time = %crate::text::escape_controls(&commit.committer_time),
                    "the commit's committer time is missing or absurd; its events carry the time of detection instead"
                );
                now.as_second()
            }
        }
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
