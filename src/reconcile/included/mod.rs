//! The files policies include from other projects (SPEC §14): a pipeline execution policy's
//! (and a scheduled one's) `content.include[i]` and a scan execution policy's
//! `actions[i].ci_configuration_path`, each `{project, file, ref}`. Whoever can push to that
//! project changes what the policy enforces without touching the SPP; GitLab records none of it.
//!
//! After an SPP's own steps, every include of the policies at the SPP's tip is checked: one
//! mirror per included repository (under `mirrors/included/`), one fetch per repository per
//! reconcile however many policies include from it, with the SPP's token, TLS and deadline.
//! The ref resolves as GitLab resolves it (`git rev-parse`: a tag before a branch of the same
//! name; none = the project's default branch, the remote's `HEAD`); 40 hex digits are a
//! commit, pinned: never fetched, never changing.
//!
//! Invariants:
//! - the state of every include moves only with the SPP's cursor, in the transaction that holds
//!   its events; ids are deterministic (SPP, included commit, policy, include), so a run cut off
//!   anywhere is repeated with the same result;
//! - the first sight of an include is a baseline (no event): an include added or moved by the
//!   SPP is reported by the SPP's own update;
//! - a step is a first-parent commit of the followed ref that changes the file's blob: a
//!   readable new version is one `security_policy_update` per policy that includes it, by that
//!   commit's author; a file GitLab cannot use (gone, not a file, too large, not YAML, the ref
//!   deleted) is one `security_policy_yaml_invalidated` per policy, once, until it is readable
//!   again; a ref moved off its line (force push, a tag moved) is one step to the new tip;
//! - a repository that cannot be fetched or read keeps its includes' state and is reported; it
//!   never stops the SPP's own events or the other repositories.

pub(super) mod ci;
pub(super) mod replay;

use super::Summary;
use super::policy_files::blob_key;
use crate::config::{Config, Project};
use crate::event::{AuditEvent, IncludedContent, StepContext};
use crate::policy::{Policy, PolicySet, PolicyType};
use crate::repo::{Mirror, PolicyBlob, PolicyPath};
use crate::store::IncludedFile;
use anyhow::{Context, Result};
use gix::ObjectId;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// One include of one policy, as written.
pub(super) struct Include<'a> {
    pub policy: &'a Policy,
    /// Among the policies of the same type and name (0 for the first).
    pub occurrence: usize,
    /// Where in the policy: `content.include[0]`, `actions[1].ci_configuration_path`.
    pub field: String,
    pub project: String,
    pub file: String,
    pub reference: Option<String>,
}

impl Include<'_> {
    fn key(&self) -> String {
        IncludedFile::key(&self.project, &self.file, self.reference.as_deref())
    }

    /// The state of a pinned include (a commit sha: never fetched, never changes); None when
    /// its ref is not a sha.
    fn pinned_file(&self) -> Option<IncludedFile> {
        self.pinned().then(|| IncludedFile {
            followed: "sha".into(),
            commit: self.reference.clone().unwrap_or_default(),
            ..IncludedFile::default()
        })
    }

    fn pinned(&self) -> bool {
        self.reference
            .as_deref()
            .is_some_and(|r| (r.len() == 40 || r.len() == 64) && r.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

/// Every include of every policy of `set`, in file order.
pub(super) fn includes(set: &PolicySet) -> Vec<Include<'_>> {
    let mut out = Vec::new();
    let mut seen: BTreeMap<(PolicyType, &str), usize> = BTreeMap::new();
    for policy in &set.policies {
        let n = seen.entry((policy.policy_type, policy.name.as_str())).or_default();
        let occurrence = *n;
        *n += 1;
        let mut add = |field: String, v: &serde_json::Value| {
            let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            if let (Some(project), Some(file)) = (text("project"), text("file")) {
                out.push(Include { policy, occurrence, field, project, file, reference: text("ref") });
            }
        };
        match policy.policy_type {
            PolicyType::PipelineExecution | PolicyType::PipelineExecutionSchedule => {
                let list = policy.content.pointer("/content/include").and_then(|v| v.as_array());
                for (i, v) in list.into_iter().flatten().enumerate() {
                    add(format!("content.include[{i}]"), v);
                }
            }
            PolicyType::ScanExecution => {
                let actions = policy.content.get("actions").and_then(|v| v.as_array());
                for (i, a) in actions.into_iter().flatten().enumerate() {
                    if let Some(v) = a.get("ci_configuration_path") {
                        add(format!("actions[{i}].ci_configuration_path"), v);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// A path GitLab would accept for a project or a file in it: relative, no `..`, no empty
/// segment, no control characters (a policy must not point the mirror anywhere else).
fn safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && !path.chars().any(char::is_control)
        && path.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// Where the included project's repository is: the SPP's URL with the SPP's path replaced by
/// the project's (same GitLab, same scheme), else `[gitlab] url`.
pub fn included_url(config: &Config, spp: &Project, included: &str) -> Option<String> {
    let url = spp.url.trim_end_matches('/');
    let (bare, git) = match url.strip_suffix(".git") {
        Some(u) => (u, ".git"),
        None => (url, ""),
    };
    if let Some(base) = bare.strip_suffix(spp.path.as_str())
        && base.ends_with('/')
    {
        return Some(format!("{base}{included}{git}"));
    }
    config.gitlab.as_ref().map(|g| format!("{}/{included}.git", g.url))
}

fn mirror_dir(config: &Config, url: &str) -> PathBuf {
    let shown = crate::text::redact_url(url);
    let tail = shown.rsplit('/').next().unwrap_or("repo").trim_end_matches(".git");
    let readable: String =
        tail.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    config.mirrors_dir().join("included").join(format!("{readable}-{:08x}.git", crc32fast::hash(url.as_bytes())))
}

/// One mirror is used by one reconcile at a time (two SPPs may include from the same project).
fn lock_for(dir: &std::path::Path) -> Arc<Mutex<()>> {
    static LOCKS: std::sync::LazyLock<Mutex<BTreeMap<PathBuf, Arc<Mutex<()>>>>> =
        std::sync::LazyLock::new(Default::default);
    let mut locks = LOCKS.lock().unwrap_or_else(|p| p.into_inner());
    locks.entry(dir.to_path_buf()).or_default().clone()
}

/// What one reconcile needs to track the includes of one SPP.
pub(super) struct Run<'a> {
    pub config: &'a Config,
    pub project: &'a Project,
    pub stop: &'a crate::stop::Stop,
    /// The SPP commit the policies are at.
    pub spp_sha: String,
    pub now: jiff::Timestamp,
    pub emit: bool,
}

/// A change of one included file: at a commit of its project (None: its ref is gone).
pub(super) struct Step {
    commit: Option<crate::repo::Commit>,
    before_blob: String,
    /// None: GitLab can no longer read the file (and why).
    after: Result<String, String>,
    rewritten: bool,
    /// What the ref resolved to at this step.
    followed: String,
}

impl Run<'_> {
    /// The includes of `set`, tracked from `before`: the new state of every include and the
    /// events, oldest first. Never fails: a repository that cannot be read keeps its state.
    pub(super) fn track(
        &self,
        set: Option<&PolicySet>,
        before: &BTreeMap<String, IncludedFile>,
        summary: &mut Summary,
    ) -> (BTreeMap<String, IncludedFile>, Vec<AuditEvent>) {
        let Some(set) = set else { return (before.clone(), Vec::new()) };
        let all = includes(set);
        let mut state = BTreeMap::new();
        let mut events = Vec::new();
        let mut by_project: BTreeMap<&str, Vec<&Include<'_>>> = BTreeMap::new();
        for inc in &all {
            if !safe_path(&inc.project) || !safe_path(&inc.file) {
                let why = format!(
                    "policy {:?} includes {:?} from project {:?}: not a path GitLab accepts; not tracked",
                    inc.policy.name, inc.file, inc.project
                );
                tracing::warn!(project = %self.project.path, "{why}");
                summary.included_errors.push(why);
            } else if let Some(pinned) = inc.pinned_file() {
                state.insert(inc.key(), pinned);
            } else {
                by_project.entry(inc.project.as_str()).or_default().push(inc);
            }
        }
        for (included, incs) in by_project {
            match self.track_repository(included, &incs, before, summary) {
                Ok((files, made)) => {
                    state.extend(files);
                    events.extend(made);
                }
                Err(e) => {
                    let why = format!("included project {included}: {e:#}");
                    tracing::warn!(project = %self.project.path, error = %why, "an included project cannot be read; its files are checked again at the next run");
                    summary.included_errors.push(why);
                    for inc in incs {
                        if let Some(old) = before.get(&inc.key()) {
                            state.insert(inc.key(), old.clone());
                        }
                    }
                }
            }
        }
        events.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        if !self.emit {
            events.clear();
        }
        (state, events)
    }

    /// The included project's mirror, fetched (HEAD and `names`), and what the remote advertised.
    pub(super) fn fetched(
        &self,
        included: &str,
        names: &[String],
        summary: &mut Summary,
    ) -> Result<(Mirror, BTreeMap<String, ObjectId>)> {
        let url = included_url(self.config, self.project, included).with_context(|| {
            format!(
                "cannot tell where it is: the SPP's url does not end with its path {:?} and there is no [gitlab] url",
                self.project.path
            )
        })?;
        let dir = mirror_dir(self.config, &url);
        let lock = lock_for(&dir);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mirror = Mirror::open_or_init(&dir, "HEAD")?;
        let advertised = crate::repo::fetch_refs(
            &mirror,
            &url,
            self.project.token.as_ref(),
            &self.project.tls,
            self.config.fetch_timeout,
            self.stop,
            names,
        )?;
        summary.included_fetches += 1;
        Ok((mirror, advertised.into_iter().collect()))
    }

    /// The refs to fetch for these includes: each named ref as a tag and as a branch.
    pub(super) fn names(incs: &[&Include<'_>]) -> Vec<String> {
        let names: BTreeSet<String> = incs
            .iter()
            .filter_map(|i| i.reference.as_ref())
            .flat_map(|r| [format!("refs/tags/{r}"), format!("refs/heads/{r}")])
            .collect();
        names.into_iter().collect()
    }

    /// What the include's ref follows and the commit it is at (None: no such ref), as
    /// `git rev-parse` resolves it: a tag before a branch; no ref = the default branch.
    pub(super) fn resolve(
        mirror: &Mirror,
        advertised: &BTreeMap<String, ObjectId>,
        inc: &Include<'_>,
    ) -> Result<(String, Option<ObjectId>)> {
        let (followed, tip) = match &inc.reference {
            None => ("HEAD".to_string(), advertised.get("HEAD")),
            Some(r) => match (advertised.get(&format!("refs/tags/{r}")), advertised.get(&format!("refs/heads/{r}"))) {
                (Some(tag), _) => (format!("tag {r}"), Some(tag)),
                (None, Some(branch)) => (format!("branch {r}"), Some(branch)),
                (None, None) => ("missing".to_string(), None),
            },
        };
        Ok((followed, tip.map(|id| mirror.peel_to_commit(*id)).transpose()?))
    }

    fn track_repository(
        &self,
        included: &str,
        incs: &[&Include<'_>],
        before: &BTreeMap<String, IncludedFile>,
        summary: &mut Summary,
    ) -> Result<(BTreeMap<String, IncludedFile>, Vec<AuditEvent>)> {
        let (mirror, advertised) = self.fetched(included, &Self::names(incs), summary)?;
        let mut state = BTreeMap::new();
        let mut events = Vec::new();
        let mut done = BTreeSet::new();
        for inc in incs {
            let key = inc.key();
            if !done.insert(key.clone()) {
                continue;
            }
            let (followed, tip) = Self::resolve(&mirror, &advertised, inc)?;
            let (file, steps) = self.steps(&mirror, inc, before.get(&key), followed, tip)?;
            state.insert(key.clone(), file);
            events.extend(self.events_of(&mirror, incs, &key, &steps)?);
        }
        Ok((state, events))
    }

    /// One event per include with `key` per step.
    pub(super) fn events_of(
        &self,
        mirror: &Mirror,
        incs: &[&Include<'_>],
        key: &str,
        steps: &[Step],
    ) -> Result<Vec<AuditEvent>> {
        let mut events = Vec::new();
        for step in steps {
            for inc in incs.iter().filter(|i| i.key() == key) {
                events.push(self.event(mirror, inc, step)?);
            }
        }
        Ok(events)
    }

    /// The include's new state and its steps since `prev`.
    fn steps(
        &self,
        mirror: &Mirror,
        inc: &Include<'_>,
        prev: Option<&IncludedFile>,
        followed: String,
        tip: Option<ObjectId>,
    ) -> Result<(IncludedFile, Vec<Step>)> {
        let mut path = PolicyPath::new(&inc.file);
        let Some(tip) = tip else {
            let mut file = prev.cloned().unwrap_or_default();
            let mut steps = Vec::new();
            if prev.is_some_and(|p| !p.invalid) {
                let why = format!(
                    "ref {:?} does not exist in project {}",
                    inc.reference.as_deref().unwrap_or("HEAD"),
                    inc.project
                );
                steps.push(Step {
                    commit: None,
                    before_blob: file.valid_blob.clone(),
                    after: Err(why),
                    rewritten: false,
                    followed: followed.clone(),
                });
            }
            file.followed = followed;
            file.commit = String::new();
            file.blob = String::new();
            file.invalid = true;
            return Ok((file, steps));
        };
        let Some(prev) = prev else {
            let tree = mirror.commit(tip)?.tree;
            return Ok((self.first_sight(mirror, inc, &mut path, followed, tip, tree)?, Vec::new()));
        };
        if tip.to_hex() == prev.commit && prev.followed == followed {
            return Ok((prev.clone(), Vec::new()));
        }
        let since = ObjectId::from_hex(prev.commit.as_bytes()).ok().filter(|id| mirror.has_commit(*id));
        let chain = match since {
            Some(since) if prev.followed == followed => mirror.first_parent_chain(tip, Some(since))?,
            _ => None,
        };
        let (links, rewritten) = match chain {
            Some(links) => (links.into_iter().map(|l| (l.id, l.tree)).collect::<Vec<_>>(), false),
            None => (vec![(tip, mirror.commit(tip)?.tree)], true),
        };
        let mut file = prev.clone();
        file.followed = followed;
        let mut steps = Vec::new();
        for (id, tree) in links {
            steps.extend(self.at(mirror, inc, &mut path, &mut file, id, tree, rewritten)?);
        }
        file.commit = tip.to_string();
        Ok((file, steps))
    }

    /// An include seen for the first time, at commit `id`: a baseline, no step.
    pub(super) fn first_sight(
        &self,
        mirror: &Mirror,
        inc: &Include<'_>,
        path: &mut PolicyPath,
        followed: String,
        id: ObjectId,
        tree: ObjectId,
    ) -> Result<IncludedFile> {
        let blob = path.lookup(mirror, tree)?;
        let readable = self.readable(mirror, inc, &blob)?;
        let key = blob_key(&blob);
        Ok(IncludedFile {
            followed,
            commit: id.to_string(),
            valid_blob: if readable.is_ok() { key.clone() } else { String::new() },
            blob: key,
            invalid: readable.is_err(),
        })
    }

    /// The file at commit `id` of the followed ref: the step it makes, if any, and `file`
    /// moved there.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn at(
        &self,
        mirror: &Mirror,
        inc: &Include<'_>,
        path: &mut PolicyPath,
        file: &mut IncludedFile,
        id: ObjectId,
        tree: ObjectId,
        rewritten: bool,
    ) -> Result<Option<Step>> {
        let blob = path.lookup(mirror, tree)?;
        let key = blob_key(&blob);
        let mut step = None;
        if key != file.blob || (rewritten && file.invalid) {
            let readable = self.readable(mirror, inc, &blob)?;
            let changed = match &readable {
                Ok(_) => key != file.valid_blob || file.invalid,
                Err(_) => !file.invalid,
            };
            if changed {
                step = Some(Step {
                    commit: Some(mirror.commit(id)?),
                    before_blob: file.valid_blob.clone(),
                    after: readable.clone().map(|_| key.clone()),
                    rewritten,
                    followed: file.followed.clone(),
                });
            }
            if readable.is_ok() {
                file.valid_blob = key.clone();
            }
            file.invalid = readable.is_err();
            file.blob = key;
        }
        file.commit = id.to_string();
        Ok(step)
    }

    /// Whether GitLab can use the file at this blob (Ok), or why not. The outer error is a
    /// failed read of the mirror.
    fn readable(&self, mirror: &Mirror, inc: &Include<'_>, blob: &PolicyBlob) -> Result<Result<(), String>> {
        Ok(match blob {
            PolicyBlob::Missing => Err(format!("{} does not exist in project {}", inc.file, inc.project)),
            PolicyBlob::NotAFile(what, _) => {
                Err(format!("{} in project {} is {what}, not a file", inc.file, inc.project))
            }
            PolicyBlob::File(id) => {
                let size = mirror.blob_size(*id)?;
                if size > self.config.max_policy_file_bytes {
                    Err(format!(
                        "{} in project {} is {size} bytes, more than max_policy_file_bytes",
                        inc.file, inc.project
                    ))
                } else {
                    match ci::unreadable(&mirror.read_blob(*id)?) {
                        None => Ok(()),
                        Some(why) => Err(format!("{} in project {}: {why}", inc.file, inc.project)),
                    }
                }
            }
        })
    }

    fn text(&self, mirror: &Mirror, blob: &str) -> Result<String> {
        match ObjectId::from_hex(blob.as_bytes()) {
            Ok(id) => Ok(String::from_utf8_lossy(&mirror.read_blob(id)?).into_owned()),
            Err(_) => Ok(String::new()),
        }
    }

    fn event(&self, mirror: &Mirror, inc: &Include<'_>, step: &Step) -> Result<AuditEvent> {
        let before_text = self.text(mirror, &step.before_blob)?;
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let (after_sha, summary, jobs, diff) = match &step.after {
            Ok(after) => {
                let after_text = self.text(mirror, after)?;
                let (added, removed, changed, summary) = ci::job_changes(&before_text, &after_text);
                (
                    nonempty(after),
                    summary,
                    (added, removed, changed),
                    ci::unified_diff(&inc.file, &before_text, &after_text),
                )
            }
            Err(why) => (None, why.clone(), Default::default(), (String::new(), false)),
        };
        let commit_sha = step.commit.as_ref().map(|c| c.id.to_string()).unwrap_or_default();
        let content = IncludedContent {
            project: inc.project.clone(),
            file: inc.file.clone(),
            reference: inc.reference.clone(),
            followed: step.followed.clone(),
            before_sha: nonempty(&step.before_blob),
            after_sha,
            commit_sha: commit_sha.clone(),
            summary,
            jobs_added: jobs.0,
            jobs_removed: jobs.1,
            jobs_changed: jobs.2,
            diff: diff.0,
            diff_truncated: diff.1,
        };
        let (name, email, message) = match &step.commit {
            Some(c) => (c.author_name.as_str(), c.author_email.as_str(), c.message.as_str()),
            None => ("", "", ""),
        };
        // A ref deleted has no commit: the event is identified by the last one seen.
        let sha = if commit_sha.is_empty() { format!("ref-missing:{}", step.before_blob) } else { commit_sha };
        let ctx = StepContext {
            project: self.project.spp(),
            sha: &sha,
            // `previous_commit_sha` is the SPP's; the included commit is in `included_content`.
            previous_sha: None,
            author_name: name,
            author_email: email,
            author_id: self.config.author_id(email),
            committed_at: step.commit.as_ref().and_then(|c| c.committed_at).unwrap_or(self.now.as_second()),
            message,
            detected_at: self.now,
            history_rewritten: step.rewritten,
        };
        Ok(ctx.included_event(
            inc.policy,
            inc.occurrence,
            &inc.field,
            &self.spp_sha,
            content,
            step.after.as_ref().err().map(String::as_str),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_are_read_from_pipeline_execution_and_scan_execution_policies() {
        let text = "pipeline_execution_policy:\n- name: p\n  enabled: true\n  pipeline_config_strategy: inject_policy\n  content: {include: [{project: ci/templates, file: pipeline.yml}]}\n\
                    scan_execution_policy:\n- name: s\n  enabled: true\n  rules: [{type: pipeline, branches: [main]}]\n  actions:\n  - {scan: secret_detection}\n  - {scan: custom, ci_configuration_path: {project: ci/templates, file: scan.yml, ref: v1}}\n";
        let set = crate::policy::parse(text.as_bytes()).expect("valid");
        let found: Vec<(String, String, String, Option<String>)> = includes(&set)
            .iter()
            .map(|i| (i.policy.name.clone(), i.field.clone(), i.file.clone(), i.reference.clone()))
            .collect();
        assert_eq!(
            found,
            [
                ("p".into(), "content.include[0]".into(), "pipeline.yml".into(), None),
                ("s".into(), "actions[1].ci_configuration_path".into(), "scan.yml".into(), Some("v1".into())),
            ]
        );
    }

    #[test]
    fn only_plain_relative_paths_are_followed() {
        for ok in ["ci/templates", "a/b/c.yml", "group/sub/proj-1"] {
            assert!(safe_path(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../b", "a//b", "a\\b", "a/./b", "a\nb"] {
            assert!(!safe_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_pinned_sha_is_forty_or_sixty_four_hex_digits() {
        let policy = Policy {
            policy_type: PolicyType::PipelineExecution,
            name: "p".into(),
            enabled: true,
            content: serde_json::Value::Null,
        };
        let inc = |r: &str| Include {
            policy: &policy,
            occurrence: 0,
            field: String::new(),
            project: "p".into(),
            file: "f".into(),
            reference: Some(r.into()),
        };
        assert!(inc(&"a".repeat(40)).pinned());
        assert!(!inc("main").pinned());
        assert!(!inc("deadbeef").pinned(), "a short sha is read as a ref name first, as git does");
    }
}
