//! `policy.yml` bytes -> validated [`PolicySet`], or a readable reason why GitLab would not
//! enforce the file.
//!
//! Validation is structural, like GitLab's schema where it has been stable for years: the top
//! level is a mapping of policy-type sections (plus `experiments`), each section a list of
//! mappings with a `name` (1-255 characters) and a boolean `enabled`, and approval-policy rules
//! name the branches they apply to. Unknown keys *inside* a policy are accepted: GitLab adds
//! new ones every release and an audit trail must not call a newer file invalid.

use super::{LEGACY_APPROVAL_KEY, NON_POLICY_TOP_LEVEL_KEYS, Policy, PolicySet, PolicyType};
use serde_json::{Map, Value};
use serde_yaml::Value as Yaml;
use std::fmt;

/// GitLab's limit on a policy name's length.
pub const MAX_NAME_CHARS: usize = 255;

/// Why a policy file is not a valid policy file. The text is shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPolicyFile {
    pub reason: String,
}

impl InvalidPolicyFile {
    fn new(reason: impl Into<String>) -> Self {
        InvalidPolicyFile { reason: reason.into() }
    }
}

impl fmt::Display for InvalidPolicyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for InvalidPolicyFile {}

/// Parses and validates a policy file.
pub fn parse(bytes: &[u8]) -> Result<PolicySet, InvalidPolicyFile> {
    // A UTF-8 byte order mark (some Windows editors write one) is not content: YAML allows it at
    // the start of the stream, but serde_yaml reports "more than one document" for it.
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes)
        .map_err(|e| InvalidPolicyFile::new(format!("not UTF-8 text (invalid byte at offset {})", e.valid_up_to())))?;
    let scan = super::depth::scan(text, super::depth::MAX_DEPTH);
    if scan.too_deep {
        return Err(InvalidPolicyFile::new(format!(
            "not valid YAML: lists or mappings nested deeper than {} levels",
            super::depth::MAX_DEPTH
        )));
    }
    if scan.has_alias && super::aliases::expansion_exceeds(text, super::aliases::MAX_EXPANDED_VALUES) {
        return Err(InvalidPolicyFile::new(format!(
            "the parsed YAML is too big: its aliases expand to more than {} values",
            super::aliases::MAX_EXPANDED_VALUES
        )));
    }
    let mut doc: Yaml =
        serde_yaml::from_str(text).map_err(|e| InvalidPolicyFile::new(format!("not valid YAML: {e}")))?;
    doc.apply_merge().map_err(|e| InvalidPolicyFile::new(format!("invalid YAML merge key: {e}")))?;
    let top = match doc {
        Yaml::Mapping(m) => m,
        Yaml::Null => {
            return Err(InvalidPolicyFile::new("the file is empty: it has no policy-type key"));
        }
        other => {
            return Err(InvalidPolicyFile::new(format!(
                "the top level must be a mapping of policy types, found {}",
                yaml_kind(&other)
            )));
        }
    };

    let mut approval = Vec::new();
    let mut legacy_approval = Vec::new();
    let mut others: Vec<Policy> = Vec::new();
    let mut saw_policy_type = false;
    for (key, section) in &top {
        let Some(key) = key.as_str() else {
            return Err(InvalidPolicyFile::new(format!("top-level key {} is not a string", short_yaml(key))));
        };
        if NON_POLICY_TOP_LEVEL_KEYS.contains(&key) {
            continue;
        }
        let Some(policy_type) = PolicyType::from_key(key) else {
            return Err(InvalidPolicyFile::new(format!(
                "unknown top-level key `{key}` (expected one of: {}, {LEGACY_APPROVAL_KEY}, {})",
                PolicyType::ALL.map(PolicyType::key).join(", "),
                NON_POLICY_TOP_LEVEL_KEYS.join(", ")
            )));
        };
        saw_policy_type = true;
        let policies = parse_section(key, policy_type, section)?;
        match (policy_type, key) {
            (PolicyType::Approval, LEGACY_APPROVAL_KEY) => legacy_approval = policies,
            (PolicyType::Approval, _) => approval = policies,
            _ => others.extend(policies),
        }
    }
    if !saw_policy_type {
        return Err(InvalidPolicyFile::new(format!(
            "no policy-type key at the top level (expected one of: {})",
            PolicyType::ALL.map(PolicyType::key).join(", ")
        )));
    }
    let mut policies = approval;
    policies.extend(legacy_approval);
    policies.extend(others);
    policies.sort_by_key(|p| p.policy_type); // stable: keeps file order within a type
    Ok(PolicySet { policies })
}

fn parse_section(key: &str, policy_type: PolicyType, section: &Yaml) -> Result<Vec<Policy>, InvalidPolicyFile> {
    let Yaml::Sequence(items) = section else {
        return Err(InvalidPolicyFile::new(format!(
            "`{key}` must be a list of policies, found {}",
            yaml_kind(section)
        )));
    };
    items.iter().enumerate().map(|(i, item)| parse_policy(&format!("{key}[{i}]"), policy_type, item)).collect()
}

fn parse_policy(at: &str, policy_type: PolicyType, item: &Yaml) -> Result<Policy, InvalidPolicyFile> {
    let Yaml::Mapping(map) = item else {
        return Err(InvalidPolicyFile::new(format!("{at} must be a mapping, found {}", yaml_kind(item))));
    };
    let name = match map.get("name") {
        Some(Yaml::String(s)) => s.clone(),
        Some(other) => {
            return Err(InvalidPolicyFile::new(format!("{at}: `name` must be a string, found {}", yaml_kind(other))));
        }
        None => return Err(InvalidPolicyFile::new(format!("{at}: `name` is missing"))),
    };
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(InvalidPolicyFile::new(format!(
            "{at}: `name` must be 1 to {MAX_NAME_CHARS} characters long, it has {chars}"
        )));
    }
    let at = format!("{at} \"{}\"", truncate(&name, 80));
    let enabled = match map.get("enabled") {
        Some(Yaml::Bool(b)) => *b,
        Some(other) => {
            return Err(InvalidPolicyFile::new(format!(
                "{at}: `enabled` must be true or false, found {}",
                yaml_kind(other)
            )));
        }
        None => {
            return Err(InvalidPolicyFile::new(format!("{at}: `enabled` is missing")));
        }
    };
    if policy_type == PolicyType::Approval {
        check_approval_rules(&at, map)?;
    }
    Ok(Policy { policy_type, name, enabled, content: canonical(item) })
}

/// GitLab's schema requires every approval rule to say which branches it protects.
fn check_approval_rules(at: &str, policy: &serde_yaml::Mapping) -> Result<(), InvalidPolicyFile> {
    let rules = match policy.get("rules") {
        None => return Ok(()),
        Some(Yaml::Sequence(rules)) => rules,
        Some(other) => {
            return Err(InvalidPolicyFile::new(format!("{at}: `rules` must be a list, found {}", yaml_kind(other))));
        }
    };
    for (i, rule) in rules.iter().enumerate() {
        let Yaml::Mapping(rule) = rule else {
            return Err(InvalidPolicyFile::new(format!(
                "{at}: rules[{i}] must be a mapping, found {}",
                yaml_kind(rule)
            )));
        };
        if !rule.contains_key("branches") && !rule.contains_key("branch_type") {
            return Err(InvalidPolicyFile::new(format!("{at}: rules[{i}] must have `branches` or `branch_type`")));
        }
    }
    Ok(())
}

/// YAML -> JSON with sorted mapping keys: equal values mean semantically equal policies.
fn canonical(value: &Yaml) -> Value {
    match value {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(*b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f).map(Value::Number).unwrap_or_else(|| Value::String(n.to_string()))
            }
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Sequence(items) => Value::Array(items.iter().map(canonical).collect()),
        Yaml::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(key_text(k), canonical(v));
            }
            Value::Object(out)
        }
        Yaml::Tagged(tagged) => {
            let mut out = Map::new();
            out.insert(tagged.tag.to_string(), canonical(&tagged.value));
            Value::Object(out)
        }
    }
}

fn key_text(key: &Yaml) -> String {
    match key {
        Yaml::String(s) => s.clone(),
        other => short_yaml(other),
    }
}

fn short_yaml(value: &Yaml) -> String {
    serde_yaml::to_string(value).map(|s| s.trim_end().to_string()).unwrap_or_else(|_| yaml_kind(value).to_string())
}

fn yaml_kind(value: &Yaml) -> &'static str {
    match value {
        Yaml::Null => "nothing (null)",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max_chars).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(yaml: &str) -> String {
        parse(yaml.as_bytes()).expect_err("should be invalid").reason
    }

    #[test]
    fn reads_every_policy_type_and_the_legacy_alias() {
        let set = parse(
            br#"
scan_execution_policy: [{name: s, enabled: true}]
scan_result_policy: [{name: legacy, enabled: false}]
approval_policy: [{name: a, enabled: true}]
pipeline_execution_policy: [{name: p, enabled: true}]
pipeline_execution_schedule_policy: [{name: ps, enabled: true}]
vulnerability_management_policy: [{name: v, enabled: true}]
experiments: {pipeline_execution_schedule_policy: {enabled: true}}
"#,
        )
        .unwrap();
        let names: Vec<_> = set.policies.iter().map(|p| (p.policy_type.key(), p.name.as_str())).collect();
        assert_eq!(
            names,
            [
                ("approval_policy", "a"),
                ("approval_policy", "legacy"),
                ("pipeline_execution_policy", "p"),
                ("pipeline_execution_schedule_policy", "ps"),
                ("scan_execution_policy", "s"),
                ("vulnerability_management_policy", "v"),
            ]
        );
    }

    #[test]
    fn canonical_content_ignores_key_order_quoting_and_comments() {
        let a = parse(b"approval_policy:\n- name: x\n  enabled: true\n  description: 'hi'\n").unwrap();
        let b =
            parse(b"# c\napproval_policy:\n  - description: \"hi\" # d\n    enabled: true\n    name: \"x\"\n").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_structural_errors_with_a_readable_reason() {
        assert!(invalid("approval_policy: [").contains("not valid YAML"));
        assert!(invalid("").contains("empty"));
        assert!(invalid("- name: x\n  enabled: true\n").contains("top level must be a mapping"));
        assert!(invalid("name: x\nenabled: true\n").contains("unknown top-level key `name`"));
        assert!(invalid("experiments: {}\n").contains("no policy-type key"));
        assert!(invalid("approval_policy: {name: x}\n").contains("must be a list"));
        assert!(invalid("approval_policy: [{enabled: true}]\n").contains("approval_policy[0]: `name` is missing"));
        assert!(invalid("approval_policy: [{name: x}]\n").contains("`enabled` is missing"));
        assert!(invalid("approval_policy: [{name: x, enabled: 'yes'}]\n").contains("`enabled` must be true or false"));
        assert!(invalid("approval_policy: [{name: 5, enabled: true}]\n").contains("`name` must be a string"));
        assert!(invalid("approval_policy: [{name: '', enabled: true}]\n").contains("1 to 255"));
        let long = format!("approval_policy: [{{name: '{}', enabled: true}}]\n", "n".repeat(256));
        assert!(invalid(&long).contains("it has 256"));
        assert!(
            invalid("approval_policy: [{name: x, enabled: true, rules: [{type: scan_finding}]}]\n")
                .contains("rules[0] must have `branches` or `branch_type`")
        );
        assert!(invalid("approval_policy: []\napproval_policy: []\n").contains("not valid YAML"));
        assert!(parse(&[0xff, 0xfe]).unwrap_err().reason.contains("not UTF-8"));
        assert!(invalid("approval_policy: []\n---\napproval_policy: []\n").contains("not valid YAML"));
    }

    #[test]
    fn canonical_content_serializes_with_sorted_keys() {
        // Guards against a dependency turning on serde_json's `preserve_order`.
        let set = parse(b"approval_policy: [{zeta: 1, name: x, alpha: 2, enabled: true}]\n").unwrap();
        let text = serde_json::to_string(&set.policies[0].content).unwrap();
        assert_eq!(text, r#"{"alpha":2,"enabled":true,"name":"x","zeta":1}"#);
    }

    #[test]
    fn accepts_unknown_keys_inside_a_policy() {
        let set = parse(b"approval_policy: [{name: x, enabled: true, new_gitlab_key: {a: 1}}]\n").unwrap();
        assert_eq!(set.policies[0].content["new_gitlab_key"]["a"], 1);
    }

    #[test]
    fn a_utf8_byte_order_mark_is_not_content() {
        // Block style is what serde_yaml misreads ("more than one document"); flow style was fine.
        for plain in ["approval_policy:\n- name: x\n  enabled: true\n", "approval_policy: [{name: x, enabled: true}]\n"]
        {
            let mut bom = b"\xef\xbb\xbf".to_vec();
            bom.extend_from_slice(plain.as_bytes());
            assert!(parse(plain.as_bytes()).is_ok());
            assert_eq!(parse(&bom), parse(plain.as_bytes()), "{plain:?}");
        }
    }

    #[test]
    fn applies_yaml_merge_keys() {
        let a = parse(b"approval_policy:\n- &base {name: x, enabled: true, description: d}\n").unwrap();
        let b = parse(b"approval_policy:\n- <<: {name: x, enabled: true}\n  description: d\n").unwrap();
        assert_eq!(a.policies[0].content, b.policies[0].content);
    }
}
