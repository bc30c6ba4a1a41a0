//! A backfill replays the included files' history with the policy file's own: before each SPP
//! step (at its commit time), every include of the policies as they were then is moved through
//! the commits its ref made up to that time, so the trail holds both in time order.
//!
//! The refs are resolved once, as they are now (git keeps no history of where a ref was), and
//! each followed ref's first-parent history is read once per backfill. An include first seen at
//! a step starts at the last commit of its ref made by then (a baseline, as for the policy
//! itself); one that leaves the policy is forgotten; one that comes back starts again. Commits
//! are ordered by committer time, the time a change landed.

use super::{Include, Run, includes};
use crate::event::AuditEvent;
use crate::repo::{Mirror, PolicyPath};
use crate::store::IncludedFile;
use anyhow::Result;
use gix::ObjectId;
use std::collections::BTreeMap;

/// A followed ref's first-parent history, oldest first, with committer times.
struct Timeline {
    followed: String,
    links: Vec<(ObjectId, ObjectId, i64)>,
    /// Links already applied to the include's state.
    done: usize,
}

struct Repository {
    mirror: Mirror,
    advertised: BTreeMap<String, ObjectId>,
    /// By include key: None when the ref does not exist.
    timelines: BTreeMap<String, Option<Timeline>>,
}

pub(in crate::reconcile) struct Replay<'a> {
    pub run: Run<'a>,
    /// By included project; Err (logged once) when it cannot be fetched.
    repositories: BTreeMap<String, Result<Repository, ()>>,
}

impl<'a> Replay<'a> {
    pub(in crate::reconcile) fn new(run: Run<'a>) -> Replay<'a> {
        Replay { run, repositories: BTreeMap::new() }
    }

    /// Moves every include of `set` (the policies before the SPP step at `until`; None: to the
    /// end) through its ref's commits up to then. `included` is replaced by the new state;
    /// the events are pushed in time order.
    pub(in crate::reconcile) fn advance(
        &mut self,
        set: Option<&crate::policy::PolicySet>,
        included: &mut BTreeMap<String, IncludedFile>,
        until: Option<i64>,
        spp_sha: &str,
        summary: &mut super::Summary,
        events: &mut Vec<AuditEvent>,
    ) -> Result<()> {
        let Some(set) = set else { return Ok(()) };
        self.run.spp_sha = spp_sha.to_string();
        let all = includes(set);
        let mut next = BTreeMap::new();
        let mut made = Vec::new();
        let mut by_project: BTreeMap<&str, Vec<&Include<'_>>> = BTreeMap::new();
        for inc in &all {
            if !super::safe_path(&inc.project) || !super::safe_path(&inc.file) {
                continue; // reported by the tracking after the walk
            }
            if let Some(pinned) = inc.pinned_file() {
                next.insert(inc.key(), pinned);
            } else {
                by_project.entry(inc.project.as_str()).or_default().push(inc);
            }
        }
        for (project, incs) in by_project {
            if !self.repositories.contains_key(project) {
                let fetched = self.run.fetched(project, &Run::names(&incs), summary);
                let repository = match fetched {
                    Ok((mirror, advertised)) => Ok(Repository { mirror, advertised, timelines: BTreeMap::new() }),
                    Err(e) => {
                        let why = format!("included project {project}: {e:#}");
                        tracing::warn!(project = %self.run.project.path, error = %why, "an included project cannot be read; its history is not replayed");
                        summary.included_errors.push(why);
                        Err(())
                    }
                };
                self.repositories.insert(project.to_string(), repository);
            }
            let Some(Ok(repository)) = self.repositories.get_mut(project) else {
                for inc in &incs {
                    if let Some(old) = included.get(&inc.key()) {
                        next.insert(inc.key(), old.clone());
                    }
                }
                continue;
            };
            for inc in &incs {
                let key = inc.key();
                if next.contains_key(&key) {
                    continue;
                }
                if !repository.timelines.contains_key(&key) {
                    let (followed, tip) = Run::resolve(&repository.mirror, &repository.advertised, inc)?;
                    let timeline = match tip {
                        Some(tip) => Some(timeline(&repository.mirror, followed, tip)?),
                        None => None,
                    };
                    repository.timelines.insert(key.clone(), timeline);
                }
                let Some(Some(timeline)) = repository.timelines.get_mut(&key) else {
                    // No such ref now: nothing to replay; the tracking after the walk says so.
                    continue;
                };
                let mut path = PolicyPath::new(&inc.file);
                let reached = |t: i64| until.is_none_or(|u| t <= u);
                let mut file = match included.get(&key) {
                    Some(file) => file.clone(),
                    None => {
                        // First sight at this step: the last commit of the ref by then.
                        let upto = timeline.links.iter().take_while(|l| reached(l.2)).count();
                        timeline.done = upto;
                        match upto.checked_sub(1).map(|i| timeline.links[i]) {
                            Some((id, tree, _)) => self.run.first_sight(
                                &repository.mirror,
                                inc,
                                &mut path,
                                timeline.followed.clone(),
                                id,
                                tree,
                            )?,
                            None => IncludedFile {
                                followed: timeline.followed.clone(),
                                invalid: true,
                                ..IncludedFile::default()
                            },
                        }
                    }
                };
                let mut steps = Vec::new();
                while let Some(&(id, tree, time)) = timeline.links.get(timeline.done) {
                    if !reached(time) {
                        break;
                    }
                    steps.extend(self.run.at(&repository.mirror, inc, &mut path, &mut file, id, tree, false)?);
                    timeline.done += 1;
                }
                made.extend(self.run.events_of(&repository.mirror, &incs, &key, &steps)?);
                next.insert(key, file);
            }
        }
        made.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        if self.run.emit {
            events.extend(made);
        }
        *included = next;
        Ok(())
    }
}

fn timeline(mirror: &Mirror, followed: String, tip: ObjectId) -> Result<Timeline> {
    let chain = mirror.first_parent_chain(tip, None)?.unwrap_or_default();
    let mut links = Vec::with_capacity(chain.len());
    for link in chain {
        let time = mirror.commit(link.id)?.committed_at.unwrap_or(0);
        links.push((link.id, link.tree, time));
    }
    Ok(Timeline { followed, links, done: 0 })
}
