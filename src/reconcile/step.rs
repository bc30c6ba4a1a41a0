//! One step, as a pure function: the state carried from the previous step, the step's loaded
//! policy file and its context (commit, author, time, whether the history was rewritten) give
//! the step's events and the next state. No I/O: every rule of SPEC §2 that decides what a step
//! reports is here, and tested here.

use crate::event::{AuditEvent, StepContext};
use crate::policy::{InvalidPolicyFile, LimitState, Limits, PolicySet, diff, limit_breaches};
use crate::store::Cursor;

/// The diff state carried from step to step (and stored in the cursor).
pub(super) struct State {
    pub(super) blob: String,
    pub(super) baseline: Option<PolicySet>,
    pub(super) limits: LimitState,
    /// The included files as last seen: carried through the policy file's own steps untouched
    /// (they are tracked after the walk, `included.rs`).
    pub(super) included: std::collections::BTreeMap<String, crate::store::IncludedFile>,
}

impl State {
    /// Before the first commit (the included files too: a backfill replays their history).
    pub(super) fn before_history() -> State {
        State {
            blob: String::new(),
            baseline: Some(PolicySet::default()),
            limits: LimitState::new(),
            included: Default::default(),
        }
    }

    pub(super) fn from_cursor(c: &Cursor) -> State {
        State {
            blob: c.blob.clone(),
            baseline: c.baseline.clone(),
            limits: c.limits.clone(),
            included: c.included.clone(),
        }
    }

    /// The cursor at `commit` with this state.
    pub(super) fn cursor(&self, commit: String) -> Cursor {
        Cursor {
            commit,
            blob: self.blob.clone(),
            baseline: self.baseline.clone(),
            limits: self.limits.clone(),
            included: self.included.clone(),
        }
    }
}

/// The step's events and the state after it.
///
/// - an invalid file makes one `security_policy_yaml_invalidated` event and keeps the last
///   valid state as the baseline (no deletes);
/// - a valid file is diffed against the baseline (creates, updates, deletes) and becomes it;
/// - a limit event is made only where the set of skipped policies of a type changes;
/// - with `emit` false (the feature flag off) nothing is reported but the state advances.
///
/// The replaced baseline goes to `discard`: a long walk frees it on another thread (freeing a
/// parsed file costs about as much as diffing it).
pub(super) fn apply_then(
    mut state: State,
    loaded: Result<PolicySet, InvalidPolicyFile>,
    ctx: &StepContext,
    limits: &Limits,
    emit: bool,
    discard: impl FnOnce(PolicySet),
) -> (State, Vec<AuditEvent>) {
    let mut events = Vec::new();
    match loaded {
        Err(invalid) => {
            if emit {
                events.push(ctx.invalidated_event(&invalid));
            }
        }
        Ok(set) => {
            let empty = PolicySet::default();
            let before = state.baseline.as_ref().unwrap_or(&empty);
            if emit {
                events.extend(diff(before, &set).iter().map(|c| ctx.change_event(c)));
            }
            let breaches = limit_breaches(&set, limits);
            for b in &breaches {
                if emit && !same_names(state.limits.get(&b.policy_type), &b.skipped) {
                    events.push(ctx.limit_event(b));
                }
            }
            state.limits = breaches.into_iter().map(|b| (b.policy_type, b.skipped)).collect();
            if let Some(replaced) = state.baseline.replace(set) {
                discard(replaced);
            }
        }
    }
    (state, events)
}

/// [`apply_then`], freeing the replaced baseline here.
#[cfg(test)]
pub(super) fn apply(
    state: State,
    loaded: Result<PolicySet, InvalidPolicyFile>,
    ctx: &StepContext,
    limits: &Limits,
    emit: bool,
) -> (State, Vec<AuditEvent>) {
    apply_then(state, loaded, ctx, limits, emit, drop)
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

pub(super) fn limit_map(set: &PolicySet, limits: &Limits) -> LimitState {
    limit_breaches(set, limits).into_iter().map(|b| (b.policy_type, b.skipped)).collect()
}

#[cfg(test)]
mod tests {
    //! The rules of SPEC §2 that decide what one step reports.

    use super::{State, apply, same_names};
    use crate::config::{Config, Project};
    use crate::event::{AuditEvent, EventType, StepContext};
    use crate::policy::{InvalidPolicyFile, PolicySet, parse};

    fn project(limits: &str) -> Project {
        let text = format!("[[projects]]\npath = \"acme/spp\"\nurl = \"/nonexistent\"\n{limits}\n");
        let config = Config::parse(std::path::Path::new("/tmp/step-tests.toml"), &text).expect("config");
        config.projects.into_iter().next().expect("project")
    }

    fn ctx<'a>(project: &'a Project, sha: &'a str, rewritten: bool) -> StepContext<'a> {
        StepContext {
            project: project.spp(),
            sha,
            previous_sha: None,
            author_name: "Alice",
            author_email: "alice@example.com",
            author_id: None,
            committed_at: 1_700_000_000,
            message: "change",
            detected_at: jiff::Timestamp::UNIX_EPOCH,
            history_rewritten: rewritten,
        }
    }

    /// A valid file with approval policies `names`, all enabled, with `approvals` each.
    fn file(names: &[&str], approvals: u32) -> PolicySet {
        let mut text = String::from("approval_policy:\n");
        for n in names {
            text.push_str(&format!(
                "- name: {n}\n  enabled: true\n  rules: [{{type: any_merge_request, branch_type: protected, commits: any}}]\n  actions: [{{type: require_approval, approvals_required: {approvals}, role_approvers: [maintainer]}}]\n"
            ));
        }
        parse(text.as_bytes()).expect("a valid file")
    }

    fn kinds(events: &[AuditEvent]) -> Vec<(EventType, String)> {
        events.iter().map(|e| (e.event_type, e.details.policy_name.clone().unwrap_or_default())).collect()
    }

    fn start(set: PolicySet) -> State {
        State { blob: "a".into(), baseline: Some(set), limits: Default::default(), included: Default::default() }
    }

    #[test]
    fn an_invalid_file_reports_once_and_keeps_the_baseline() {
        let p = project("");
        let (state, events) = apply(
            start(file(&["A"], 1)),
            Err(InvalidPolicyFile::new("bad YAML")),
            &ctx(&p, "b", false),
            &p.limits,
            true,
        );
        assert_eq!(kinds(&events), vec![(EventType::YamlInvalidated, String::new())], "no deletes");
        // The next valid file is compared with the last valid one, not with nothing.
        let (_, events) = apply(state, Ok(file(&["A"], 2)), &ctx(&p, "c", false), &p.limits, true);
        assert_eq!(kinds(&events), vec![(EventType::Update, "A".into())]);
    }

    #[test]
    fn created_updated_deleted_in_that_order() {
        let p = project("");
        let (_, events) =
            apply(start(file(&["A", "B"], 1)), Ok(file(&["B", "C"], 2)), &ctx(&p, "b", false), &p.limits, true);
        assert_eq!(
            kinds(&events),
            vec![(EventType::Create, "C".into()), (EventType::Update, "B".into()), (EventType::Delete, "A".into())]
        );
    }

    #[test]
    fn the_limit_event_comes_only_when_the_skipped_set_changes() {
        let p = project("limits = { approval_policy = 1 }");
        let step = |state, set, sha| apply(state, Ok(set), &ctx(&p, sha, false), &p.limits, true);
        let (state, events) = step(start(file(&["A"], 1)), file(&["A", "B"], 1), "b");
        assert!(kinds(&events).contains(&(EventType::LimitExceeded, String::new())), "{:?}", kinds(&events));
        // Same skipped set (an update elsewhere): no new limit event.
        let (state, events) = step(state, file(&["A", "B"], 2), "c");
        assert!(!kinds(&events).iter().any(|(t, _)| *t == EventType::LimitExceeded), "{:?}", kinds(&events));
        // Another policy skipped: the set changed.
        let (_, events) = step(state, file(&["A", "B", "C"], 2), "d");
        assert!(kinds(&events).contains(&(EventType::LimitExceeded, String::new())), "{:?}", kinds(&events));
    }

    #[test]
    fn events_of_a_rewritten_history_are_marked() {
        let p = project("");
        let (_, events) = apply(start(file(&["A"], 1)), Ok(file(&["A"], 3)), &ctx(&p, "b", true), &p.limits, true);
        assert_eq!(events.len(), 1);
        assert!(events.iter().all(|e| e.details.history_rewritten));
        let (_, events) = apply(start(file(&["A"], 1)), Ok(file(&["A"], 3)), &ctx(&p, "b", false), &p.limits, true);
        assert!(events.iter().all(|e| !e.details.history_rewritten));
    }

    #[test]
    fn with_the_flag_off_the_state_advances_without_events() {
        let p = project("");
        let (state, events) =
            apply(start(file(&["A"], 1)), Ok(file(&["B"], 1)), &ctx(&p, "b", false), &p.limits, false);
        assert!(events.is_empty());
        // Turned on later, only what changes from then on is reported.
        let (_, events) = apply(state, Ok(file(&["B"], 2)), &ctx(&p, "c", false), &p.limits, true);
        assert_eq!(kinds(&events), vec![(EventType::Update, "B".into())]);
    }

    #[test]
    fn skipped_policies_compare_as_a_set() {
        let before = vec!["b".to_string(), "c".to_string()];
        assert!(same_names(Some(&before), &["c".into(), "b".into()]));
        assert!(!same_names(Some(&before), &["b".into()]));
        assert!(!same_names(None, &["b".into()]));
    }
}
