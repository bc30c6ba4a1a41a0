//! `diff(old, new)`: the policy changes between two valid files. Pure: no I/O, no clock.
//!
//! Identity is `(policy type, name)`; a rename or a move to another type section is a delete
//! plus a create. When a type holds several policies of the same name (GitLab accepts that),
//! identical ones are matched first and the rest are paired in file order, so reordering such
//! duplicates is not a change. Matching goes through a map, never a scan per policy: diff time
//! grows linearly with the number of policies, however many share a name.

use super::{Policy, PolicySet, PolicyType};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// At most this many field changes are listed for one update, so events stay short.
pub const MAX_FIELD_CHANGES: usize = 50;

/// A changed value longer than this (as JSON) is shown as a summary with its hash.
pub const MAX_VALUE_BYTES: usize = 1024;

/// Keeps `changes` short and readable: a large value becomes `"<string of N bytes, sha256
/// 1a2b3c4d5e6f>"`, enough to tell versions apart without copying them into every event.
fn summarize(value: &Value) -> Value {
    let text = value.to_string();
    if text.len() <= MAX_VALUE_BYTES {
        return value.clone();
    }
    let kind = match value {
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "mapping",
        _ => "value",
    };
    let digest = sha2::Sha256::digest(text.as_bytes());
    let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Value::String(format!("<{kind} of {} bytes, sha256 {short}>", text.len()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

/// One field that differs in an updated policy. `before`/`after` are absent when the field was
/// added/removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub before: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub after: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: ChangeKind,
    pub policy_type: PolicyType,
    pub name: String,
    /// 0 for the first change of this kind to this (type, name) in one diff; counts up only for
    /// duplicate names, so that every change has its own identity.
    pub occurrence: usize,
    /// The policy after the change (before it, for a delete).
    pub policy: Policy,
    /// Update only: the changed fields in document order (keys sorted), at most [`MAX_FIELD_CHANGES`].
    pub fields: Vec<FieldChange>,
    /// Update only: more fields changed than are listed.
    pub fields_truncated: bool,
}

/// The policies of one identity before and after, in file order.
type BeforeAfter<'a> = (Vec<&'a Policy>, Vec<&'a Policy>);

/// The changes from `old` to `new`, ordered create, update, delete, then by type and name.
pub fn diff(old: &PolicySet, new: &PolicySet) -> Vec<Change> {
    let mut groups: BTreeMap<(PolicyType, &str), BeforeAfter> = BTreeMap::new();
    for p in &old.policies {
        groups.entry((p.policy_type, p.name.as_str())).or_default().0.push(p);
    }
    for p in &new.policies {
        groups.entry((p.policy_type, p.name.as_str())).or_default().1.push(p);
    }
    let mut changes = Vec::new();
    for (_, (mut before, mut after)) in groups {
        // Identical policies of the same name are not changes, wherever they sit: each `before`
        // takes the first unmatched identical `after` in file order. Found through a map keyed
        // by the canonical text (keys sorted), so thousands of same-named policies stay linear.
        if before.len() > 1 || after.len() > 1 {
            let (kept_before, kept_after) = drop_identical(&before, &after);
            before = kept_before;
            after = kept_after;
        } else if let (Some(b), Some(a)) = (before.first(), after.first())
            && a.content == b.content
        {
            before.clear();
            after.clear();
        }
        let paired = before.len().min(after.len());
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let (fields, fields_truncated) = field_changes(&b.content, &a.content);
            changes.push(change(ChangeKind::Updated, a, i, fields, fields_truncated));
        }
        for (i, a) in after.iter().skip(paired).enumerate() {
            changes.push(change(ChangeKind::Created, a, i, Vec::new(), false));
        }
        for (i, b) in before.iter().skip(paired).enumerate() {
            changes.push(change(ChangeKind::Deleted, b, i, Vec::new(), false));
        }
    }
    changes.sort_by(|x, y| {
        (x.kind, x.policy_type, &x.name, x.occurrence).cmp(&(y.kind, y.policy_type, &y.name, y.occurrence))
    });
    changes
}

/// `before` and `after` without the pairs of identical policies; each `before` is matched with
/// the first identical `after` not matched yet. Linear in the number and size of the policies.
fn drop_identical<'a>(before: &[&'a Policy], after: &[&'a Policy]) -> BeforeAfter<'a> {
    let mut by_content: HashMap<String, VecDeque<usize>> = HashMap::with_capacity(after.len());
    for (i, a) in after.iter().enumerate() {
        by_content.entry(a.content.to_string()).or_default().push_back(i);
    }
    let mut matched = vec![false; after.len()];
    let mut kept_before = Vec::new();
    for b in before {
        let hit = by_content.get_mut(&b.content.to_string()).and_then(VecDeque::pop_front);
        match hit {
            Some(i) => matched[i] = true,
            None => kept_before.push(*b),
        }
    }
    let kept_after = after.iter().zip(&matched).filter(|(_, m)| !**m).map(|(a, _)| *a).collect();
    (kept_before, kept_after)
}

fn change(kind: ChangeKind, policy: &Policy, occurrence: usize, fields: Vec<FieldChange>, truncated: bool) -> Change {
    Change {
        kind,
        policy_type: policy.policy_type,
        name: policy.name.clone(),
        occurrence,
        policy: policy.clone(),
        fields,
        fields_truncated: truncated,
    }
}

/// The differing fields of two canonical values: mappings compare key by key, lists of equal
/// length item by item; anything else that differs is reported whole at its path.
fn field_changes(before: &Value, after: &Value) -> (Vec<FieldChange>, bool) {
    let mut out = Vec::new();
    // Walk order: mapping keys sorted, list items by index (so rules[2] comes before rules[10]).
    walk(String::new(), Some(before), Some(after), &mut out);
    let truncated = out.len() > MAX_FIELD_CHANGES;
    out.truncate(MAX_FIELD_CHANGES);
    (out, truncated)
}

fn walk(path: String, before: Option<&Value>, after: Option<&Value>, out: &mut Vec<FieldChange>) {
    match (before, after) {
        (Some(Value::Object(b)), Some(Value::Object(a))) => {
            let keys: std::collections::BTreeSet<&String> = b.keys().chain(a.keys()).collect();
            for key in keys {
                walk(join_key(&path, key), b.get(key), a.get(key), out);
            }
        }
        (Some(Value::Array(b)), Some(Value::Array(a))) if a.len() == b.len() => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                walk(format!("{path}[{i}]"), Some(bv), Some(av), out);
            }
        }
        (b, a) if b != a => out.push(FieldChange { path, before: b.map(summarize), after: a.map(summarize) }),
        _ => {}
    }
}

fn join_key(path: &str, key: &str) -> String {
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{}]", Value::String(key.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicySchema, parse_with};

    /// Diffing is tested on partial policies: validation has its own tests.
    fn set(yaml: &str) -> PolicySet {
        parse_with(yaml.as_bytes(), &PolicySchema::accept_any()).unwrap_or_else(|e| panic!("test input invalid: {e}"))
    }

    fn summary(changes: &[Change]) -> Vec<String> {
        changes.iter().map(|c| format!("{:?} {} {}", c.kind, c.policy_type, c.name)).collect()
    }

    const BASE: &str = "
approval_policy:
- name: Critical vulns
  enabled: true
  rules:
  - {type: scan_finding, branches: [main], severity_levels: [critical]}
scan_execution_policy:
- name: DAST
  enabled: true
  actions: [{scan: dast}]
";

    #[test]
    fn create_update_delete_in_order() {
        let new = "
approval_policy:
- name: Critical vulns
  enabled: false
  rules:
  - {type: scan_finding, branches: [main, develop], severity_levels: [critical]}
- name: Licenses
  enabled: true
pipeline_execution_policy:
- name: Pipeline
  enabled: true
";
        let changes = diff(&set(BASE), &set(new));
        assert_eq!(
            summary(&changes),
            [
                "Created approval_policy Licenses",
                "Created pipeline_execution_policy Pipeline",
                "Updated approval_policy Critical vulns",
                "Deleted scan_execution_policy DAST",
            ]
        );
        let fields: Vec<_> = changes[2].fields.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(fields, ["enabled", "rules[0].branches"]);
        assert_eq!(changes[2].fields[0].before, Some(Value::Bool(true)));
        assert_eq!(changes[2].fields[0].after, Some(Value::Bool(false)));
        assert_eq!(changes[2].fields[1].after, Some(serde_json::json!(["main", "develop"])));
    }

    #[test]
    fn added_and_removed_fields_have_one_side() {
        let new = BASE.replace("actions: [{scan: dast}]", "description: now documented");
        let changes = diff(&set(BASE), &set(&new));
        assert_eq!(changes.len(), 1);
        let f = &changes[0].fields;
        assert_eq!(f[0].path, "actions");
        assert!(f[0].after.is_none() && f[0].before.is_some());
        assert_eq!(f[1].path, "description");
        assert!(f[1].before.is_none());
    }

    #[test]
    fn rename_is_delete_plus_create() {
        let new = BASE.replace("name: DAST", "name: DAST nightly");
        assert_eq!(
            summary(&diff(&set(BASE), &set(&new))),
            ["Created scan_execution_policy DAST nightly", "Deleted scan_execution_policy DAST"]
        );
    }

    #[test]
    fn move_between_types_is_delete_plus_create() {
        let new = "
approval_policy:
- name: Critical vulns
  enabled: true
  rules:
  - {type: scan_finding, branches: [main], severity_levels: [critical]}
pipeline_execution_policy:
- name: DAST
  enabled: true
  actions: [{scan: dast}]
";
        assert_eq!(
            summary(&diff(&set(BASE), &set(new))),
            ["Created pipeline_execution_policy DAST", "Deleted scan_execution_policy DAST"]
        );
    }

    #[test]
    fn formatting_and_policy_order_are_not_changes() {
        let reformatted = "
# scanners first now
scan_execution_policy:
  - actions:
      - scan: 'dast'
    enabled: true
    name: \"DAST\"
approval_policy:
  - rules:
      - severity_levels: [\"critical\"]
        branches: ['main']
        type: scan_finding
    name: Critical vulns   # same policy
    enabled: true
";
        assert!(diff(&set(BASE), &set(reformatted)).is_empty());
    }

    #[test]
    fn list_order_inside_a_policy_counts() {
        let a = "approval_policy: [{name: x, enabled: true, rules: [{branches: [a, b]}]}]";
        let b = "approval_policy: [{name: x, enabled: true, rules: [{branches: [b, a]}]}]";
        let changes = diff(&set(a), &set(b));
        assert_eq!(summary(&changes), ["Updated approval_policy x"]);
        let paths: Vec<_> = changes[0].fields.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["rules[0].branches[0]", "rules[0].branches[1]"]);
    }

    #[test]
    fn legacy_scan_result_policy_equals_approval_policy() {
        let legacy = "scan_result_policy: [{name: x, enabled: true}]";
        let modern = "approval_policy: [{name: x, enabled: true}]";
        assert!(diff(&set(legacy), &set(modern)).is_empty());
        let created = diff(&PolicySet::default(), &set(legacy));
        assert_eq!(created[0].policy_type, PolicyType::Approval);
    }

    #[test]
    fn duplicate_names_are_matched_by_content_then_by_order() {
        let a = "approval_policy: [{name: x, enabled: true, d: 1}, {name: x, enabled: true, d: 2}]";
        let swapped = "approval_policy: [{name: x, enabled: true, d: 2}, {name: x, enabled: true, d: 1}]";
        assert!(diff(&set(a), &set(swapped)).is_empty());
        let one_changed = "approval_policy: [{name: x, enabled: true, d: 1}, {name: x, enabled: false, d: 2}]";
        let changes = diff(&set(a), &set(one_changed));
        assert_eq!(summary(&changes), ["Updated approval_policy x"]);
        assert_eq!(changes[0].fields[0].path, "enabled");
        let third = "approval_policy: [{name: x, enabled: true, d: 1}, {name: x, enabled: true, d: 2}, {name: x, enabled: true, d: 3}]";
        let changes = diff(&set(a), &set(third));
        assert_eq!(summary(&changes), ["Created approval_policy x"]);
        let both_gone = diff(&set(a), &set("approval_policy: []"));
        assert_eq!(both_gone.iter().map(|c| c.occurrence).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn large_values_are_summarised() {
        let a = format!("approval_policy: [{{name: x, enabled: true, d: '{}'}}]", "a".repeat(5000));
        let b = format!("approval_policy: [{{name: x, enabled: true, d: '{}'}}]", "b".repeat(5000));
        let f = &diff(&set(&a), &set(&b))[0].fields[0];
        let (before, after) = (f.before.as_ref().unwrap(), f.after.as_ref().unwrap());
        assert!(before.as_str().unwrap().starts_with("<string of 5002 bytes, sha256 "), "{before}");
        assert_ne!(before, after, "different values keep different summaries");
    }

    #[test]
    fn unusual_keys_are_quoted_in_paths() {
        let a = "approval_policy: [{name: x, enabled: true, m: {'a.b': 1}}]";
        let b = "approval_policy: [{name: x, enabled: true, m: {'a.b': 2}}]";
        assert_eq!(diff(&set(a), &set(b))[0].fields[0].path, "m[\"a.b\"]");
    }
}
