//! `policy.yml` bytes -> validated [`PolicySet`], or every reason why GitLab would not enforce
//! the file.
//!
//! A file is valid exactly when GitLab would enforce it: it loads as Psych's `safe_load` loads
//! it ([`super::load`]), the result is a mapping, and it satisfies the policy schema
//! ([`super::schema`]: the built-in one, or `policy_schema_file`, which then decides alone).
//! Only then are the policies read out of it; their `content` is the loaded value itself, so
//! two files that GitLab reads the same way (`enabled: yes` and `enabled: true`) are the same.

use super::load::{self, LoadError};
use super::schema::PolicySchema;
use super::{LEGACY_APPROVAL_KEY, Policy, PolicySet, PolicyType};
use serde_json::Value;
use std::fmt;

/// GitLab's limit on a policy name's length.
pub const MAX_NAME_CHARS: usize = 255;

/// Why a policy file is not a valid policy file. The text is shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPolicyFile {
    /// One line for people: every error, joined.
    pub reason: String,
    /// Every error on its own, with the path it is about when there is one
    /// (`approval_policy[0].actions[0].approvals_required: 101 is greater than the maximum of 100`).
    pub errors: Vec<String>,
}

impl InvalidPolicyFile {
    /// A file refused for one reason (missing, unreadable, not YAML).
    pub fn new(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        InvalidPolicyFile { errors: vec![reason.clone()], reason }
    }

    fn schema(errors: Vec<String>) -> Self {
        let reason = match errors.len() {
            1 => format!("GitLab's policy schema refuses the file: {}", errors[0]),
            n => format!("GitLab's policy schema refuses the file ({n} errors): {}", errors.join("; ")),
        };
        InvalidPolicyFile { reason, errors }
    }
}

impl fmt::Display for InvalidPolicyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for InvalidPolicyFile {}

impl From<LoadError> for InvalidPolicyFile {
    fn from(e: LoadError) -> Self {
        InvalidPolicyFile::new(e.to_string())
    }
}

/// Parses and validates a policy file against the built-in schema.
pub fn parse(bytes: &[u8]) -> Result<PolicySet, InvalidPolicyFile> {
    parse_with(bytes, PolicySchema::builtin())
}

/// Parses a policy file and validates it against `schema`.
pub fn parse_with(bytes: &[u8], schema: &PolicySchema) -> Result<PolicySet, InvalidPolicyFile> {
    // A UTF-8 byte order mark (some Windows editors write one) is not content.
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes)
        .map_err(|e| InvalidPolicyFile::new(format!("not UTF-8 text (invalid byte at offset {})", e.valid_up_to())))?;
    // The event parser's work per token grows with flow nesting: refuse deep brackets first.
    if super::depth::scan(text, load::MAX_DEPTH).too_deep {
        return Err(LoadError::TooDeep.into());
    }
    let doc = match load::load(text)? {
        None | Some(Value::Null) => {
            return Err(InvalidPolicyFile::new("the file is empty: it has no policy-type key"));
        }
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(InvalidPolicyFile::new(format!(
                "the top level must be a mapping of policy types, found {}",
                json_kind(&other)
            )));
        }
    };
    let doc = Value::Object(doc);
    let errors = schema.errors(&doc);
    if !errors.is_empty() {
        return Err(InvalidPolicyFile::schema(errors));
    }
    policies(doc)
}

/// The policies of a file the schema accepted. A schema file may accept what policy-audit
/// cannot track (a policy without a string `name`): that is reported, not guessed. The document
/// is taken apart, not copied: each policy keeps its own mapping.
fn policies(doc: Value) -> Result<PolicySet, InvalidPolicyFile> {
    let mut approval = Vec::new();
    let mut legacy_approval = Vec::new();
    let mut others: Vec<Policy> = Vec::new();
    let Value::Object(top) = doc else { return Ok(PolicySet::default()) };
    for (key, section) in top {
        let Some(policy_type) = PolicyType::from_key(&key) else { continue };
        let Value::Array(items) = section else {
            return Err(InvalidPolicyFile::new(format!(
                "{key}: must be a list of policies, found {}",
                json_kind(&section)
            )));
        };
        let mut policies = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let Some(name) = item.get("name").and_then(Value::as_str) else {
                return Err(InvalidPolicyFile::new(format!(
                    "{key}[{i}]: a policy without a string `name` cannot be tracked"
                )));
            };
            let name = name.to_string();
            let enabled = item.get("enabled").and_then(Value::as_bool).unwrap_or(false);
            policies.push(Policy { policy_type, name, enabled, content: item });
        }
        match (policy_type, key.as_str()) {
            (PolicyType::Approval, LEGACY_APPROVAL_KEY) => legacy_approval = policies,
            (PolicyType::Approval, _) => approval = policies,
            _ => others.extend(policies),
        }
    }
    let mut policies = approval;
    policies.extend(legacy_approval);
    policies.extend(others);
    policies.sort_by_key(|p| p.policy_type); // stable: keeps file order within a type
    Ok(PolicySet { policies })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCAN: &str = "{name: s, enabled: true, rules: [{type: pipeline, branches: [main]}], actions: [{scan: sast}]}";
    const APPROVAL: &str = "{name: a, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], actions: [{type: require_approval, approvals_required: 1, role_approvers: [developer]}]}";
    const PIPELINE: &str = "{name: p, enabled: true, pipeline_config_strategy: inject_policy, content: {include: [{project: g/p, file: ci.yml}]}}";

    fn invalid(yaml: &str) -> InvalidPolicyFile {
        parse(yaml.as_bytes()).expect_err("should be invalid")
    }

    #[test]
    fn reads_every_policy_type_and_the_legacy_alias() {
        let text = format!(
            "scan_execution_policy: [{SCAN}]\nscan_result_policy: [{}]\napproval_policy: [{APPROVAL}]\n\
             pipeline_execution_policy: [{PIPELINE}]\n\
             pipeline_execution_schedule_policy: [{{name: ps, enabled: true, content: {{include: [{{project: g/p, file: s.yml}}]}}, schedules: [{{type: daily, start_time: '10:00', time_window: {{value: 600, distribution: random}}}}]}}]\n\
             vulnerability_management_policy: [{{name: v, enabled: true, rules: [{{type: no_longer_detected, scanners: [sast], severity_levels: [low]}}], actions: [{{type: auto_resolve}}]}}]\n\
             ci_component_publishing_policy: [{{name: c, enabled: true, allowed_sources: {{projects: [{{path: a/b}}]}}, policy_scope: {{}}}}]\n\
             experiments: {{pipeline_execution_schedule_policy: {{enabled: true}}}}\n",
            APPROVAL.replace("name: a", "name: legacy")
        );
        let set = parse(text.as_bytes()).unwrap();
        let names: Vec<_> = set.policies.iter().map(|p| (p.policy_type.key(), p.name.as_str())).collect();
        assert_eq!(
            names,
            [
                ("approval_policy", "a"),
                ("approval_policy", "legacy"),
                ("ci_component_publishing_policy", "c"),
                ("pipeline_execution_policy", "p"),
                ("pipeline_execution_schedule_policy", "ps"),
                ("scan_execution_policy", "s"),
                ("vulnerability_management_policy", "v"),
            ]
        );
    }

    #[test]
    fn canonical_content_ignores_key_order_quoting_comments_and_yaml_1_1_spelling() {
        let a = parse(format!("approval_policy:\n- {APPROVAL}\n").as_bytes()).unwrap();
        let b = parse(
            b"# c\napproval_policy:\n  - actions: [{type: require_approval, approvals_required: 0x1, role_approvers: ['developer']}]\n    enabled: Yes # d\n    rules: [{commits: any, branch_type: \"protected\", type: any_merge_request}]\n    name: \"a\"\n",
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn refuses_what_gitlab_refuses_with_every_error_and_its_path() {
        assert!(invalid("approval_policy: [").reason.contains("not valid YAML"));
        assert!(invalid("").reason.contains("empty"));
        assert!(invalid("- a\n").reason.contains("top level must be a mapping"));
        let e = invalid("name: x\nenabled: true\n");
        assert!(e.errors.iter().any(|e| e.contains("(top level): Additional properties are not allowed")), "{e:?}");
        let e = invalid(&format!(
            "approval_policy: [{}]\n",
            APPROVAL.replace("approvals_required: 1", "approvals_required: 101")
        ));
        assert_eq!(
            e.errors,
            ["approval_policy[0].actions[0].approvals_required: 101 is greater than the maximum of 100"]
        );
        let e = invalid(&format!(
            "scan_execution_policy: [{}]\n",
            SCAN.replace("sast", "sastt").replace("enabled: true", "enabled: 'yes'")
        ));
        assert_eq!(e.errors.len(), 2, "{e:?}");
        assert!(e.reason.contains("2 errors"), "{}", e.reason);
        assert!(parse(&[0xff, 0xfe]).unwrap_err().reason.contains("not UTF-8"));
    }

    #[test]
    fn yaml_1_1_booleans_duplicate_keys_and_later_documents_are_read_as_gitlab_reads_them() {
        for (spelling, enabled) in [("off", false), ("no", false), ("on", true), ("yes", true), ("True", true)] {
            let text =
                format!("approval_policy: [{}]\n", APPROVAL.replace("enabled: true", &format!("enabled: {spelling}")));
            assert_eq!(parse(text.as_bytes()).unwrap().policies[0].enabled, enabled, "{spelling}");
        }
        let dup = format!("approval_policy: []\napproval_policy: [{APPROVAL}]\n");
        assert_eq!(parse(dup.as_bytes()).unwrap().len(), 1);
        let two_docs = format!("approval_policy: [{APPROVAL}]\n---\nnot: [valid\n");
        assert_eq!(parse(two_docs.as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn canonical_content_serializes_with_sorted_keys() {
        // Guards against a dependency turning on serde_json's `preserve_order`.
        let set = parse(format!("pipeline_execution_policy: [{PIPELINE}]\n").as_bytes()).unwrap();
        let text = serde_json::to_string(&set.policies[0].content).unwrap();
        assert!(
            text.starts_with(r#"{"content":{"include":[{"file":"ci.yml","project":"g/p"}]},"enabled":true,"name":"p""#),
            "{text}"
        );
    }

    #[test]
    fn a_utf8_byte_order_mark_is_not_content() {
        let plain = format!("pipeline_execution_policy:\n- {PIPELINE}\n");
        let mut bom = b"\xef\xbb\xbf".to_vec();
        bom.extend_from_slice(plain.as_bytes());
        assert!(parse(plain.as_bytes()).is_ok());
        assert_eq!(parse(&bom), parse(plain.as_bytes()));
    }

    #[test]
    fn applies_yaml_merge_keys() {
        let a = parse(format!("pipeline_execution_policy:\n- {PIPELINE}\n").as_bytes()).unwrap();
        let b = parse(b"x: &base {enabled: true, pipeline_config_strategy: inject_policy}\n".as_slice());
        assert!(b.is_err(), "an unknown top-level key is refused");
        let c = parse(
            b"pipeline_execution_policy:\n- <<: {enabled: true, pipeline_config_strategy: inject_policy}\n  name: p\n  content: {include: [{project: g/p, file: ci.yml}]}\n",
        )
        .unwrap();
        assert_eq!(a.policies[0].content, c.policies[0].content);
    }
}
