//! What changed in an included CI file, for people: which jobs were added, removed or changed,
//! and the unified diff of the text. Pure.
//!
//! A job is a top-level key of the CI file that is not one of GitLab's global keywords
//! (`doc/ci/yaml/_index.md`: `default`, `include`, `stages`, `variables`, `workflow`, and the
//! deprecated globals `image`, `services`, `cache`, `before_script`, `after_script`), and not the
//! header's `spec`. Hidden jobs (`.name`) count: other jobs extend them.

use serde_json::Value;
use std::collections::BTreeMap;

const GLOBAL_KEYWORDS: &[&str] = &[
    "default",
    "include",
    "stages",
    "variables",
    "workflow",
    "image",
    "services",
    "cache",
    "before_script",
    "after_script",
    "spec",
];

/// The longest diff kept in an event; a longer one is cut at a line and marked truncated.
pub const MAX_DIFF_BYTES: usize = 32 * 1024;

/// The content document of a CI file, read as GitLab reads YAML (the policy loader: Psych's
/// `safe_load`): with a `spec:` header, the document after the header's `---`.
fn content(text: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(text).map_err(|_| "the file is not UTF-8 text".to_string())?;
    let load = |t: &str| crate::policy::load(t).map_err(|e| format!("the file is not valid YAML: {e}"));
    let mut value = load(text)?;
    if let Some(Value::Object(header)) = &value
        && header.len() == 1
        && header.contains_key("spec")
    {
        let rest = text.split_once("\n---").map(|(_, rest)| rest.split_once('\n').map_or("", |(_, r)| r));
        value = load(rest.unwrap_or(""))?;
    }
    match value {
        Some(v @ Value::Object(_)) => Ok(v),
        None | Some(Value::Null) | Some(Value::Bool(false)) => Err("the file is empty".into()),
        Some(_) => Err("the file's content is not a mapping of jobs and keywords".into()),
    }
}

/// Why GitLab could not read `text` as a CI file, or None when it can.
pub fn unreadable(text: &[u8]) -> Option<String> {
    content(text).err()
}

fn jobs(text: &str) -> BTreeMap<String, Value> {
    match content(text.as_bytes()) {
        Ok(Value::Object(m)) => m.into_iter().filter(|(k, _)| !GLOBAL_KEYWORDS.contains(&k.as_str())).collect(),
        _ => BTreeMap::new(),
    }
}

/// Jobs added, removed and changed from `before` to `after` (either may be unreadable: then it
/// has no jobs), and the one-line summary.
pub fn job_changes(before: &str, after: &str) -> (Vec<String>, Vec<String>, Vec<String>, String) {
    let (a, b) = (jobs(before), jobs(after));
    let added: Vec<String> = b.keys().filter(|k| !a.contains_key(*k)).cloned().collect();
    let removed: Vec<String> = a.keys().filter(|k| !b.contains_key(*k)).cloned().collect();
    let changed: Vec<String> =
        b.iter().filter(|(k, v)| a.get(*k).is_some_and(|old| old != *v)).map(|(k, _)| k.clone()).collect();
    let mut parts = Vec::new();
    for (label, names) in [("added", &added), ("removed", &removed), ("changed", &changed)] {
        if !names.is_empty() {
            parts.push(format!("jobs {label}: {}", names.join(", ")));
        }
    }
    let summary = if parts.is_empty() {
        "no job changed (keywords, comments or formatting only)".to_string()
    } else {
        parts.join("; ")
    };
    (added, removed, changed, summary)
}

/// The unified diff from `before` to `after` with 3 lines of context, capped at
/// [`MAX_DIFF_BYTES`]: (diff, truncated).
pub fn unified_diff(file: &str, before: &str, after: &str) -> (String, bool) {
    let diff = similar::TextDiff::from_lines(before, after);
    let text = diff.unified_diff().context_radius(3).header(&format!("a/{file}"), &format!("b/{file}")).to_string();
    if text.len() <= MAX_DIFF_BYTES {
        return (text, false);
    }
    let mut cut = MAX_DIFF_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let end = text[..cut].rfind('\n').map_or(cut, |i| i + 1);
    (text[..end].to_string(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_added_removed_and_changed_are_named_and_keywords_are_not_jobs() {
        let before =
            "stages: [test]\nvariables: {A: 1}\nsast:\n  script: [scan]\nlint:\n  script: [lint]\n.base: {image: x}\n";
        let after = "stages: [test, deploy]\nsast:\n  script: [scan --strict]\n.base: {image: x}\nsecrets:\n  script: [gitleaks]\n";
        let (added, removed, changed, summary) = job_changes(before, after);
        assert_eq!((added, removed, changed), (vec!["secrets".into()], vec!["lint".into()], vec!["sast".into()]));
        assert_eq!(summary, "jobs added: secrets; jobs removed: lint; jobs changed: sast");
        assert_eq!(job_changes(before, before).3, "no job changed (keywords, comments or formatting only)");
    }

    #[test]
    fn a_spec_header_is_not_the_content_and_unreadable_files_are_named() {
        let with_header = "spec:\n  inputs: {stage: {default: test}}\n---\njob:\n  script: [x]\n";
        assert_eq!(unreadable(with_header.as_bytes()), None);
        assert_eq!(jobs(with_header).keys().collect::<Vec<_>>(), ["job"]);
        assert!(unreadable(b"job: [unclosed").unwrap().contains("not valid YAML"));
        assert!(unreadable(b"- a\n- b\n").unwrap().contains("not a mapping"));
        assert!(unreadable(b"").unwrap().contains("empty"));
        assert!(unreadable(b"\xff\xfe").unwrap().contains("UTF-8"));
    }

    #[test]
    fn the_diff_is_unified_and_capped_at_a_line() {
        let (diff, cut) = unified_diff("ci.yml", "a: 1\n", "a: 2\n");
        assert!(!cut);
        assert!(diff.contains("--- a/ci.yml") && diff.contains("-a: 1") && diff.contains("+a: 2"), "{diff}");
        let big: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        let (diff, cut) = unified_diff("ci.yml", "", &big);
        assert!(cut && diff.len() <= MAX_DIFF_BYTES && diff.ends_with('\n'));
    }
}
