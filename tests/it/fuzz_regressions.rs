//! Regression checks from fuzzing `policy::parse`/`diff` and `Config::parse` (docs/fuzzing.md):
//! the hostile shapes tried directly next to the fuzz runs (deep nesting, alias bombs), fed to
//! the library exactly as described there. The 2 x 10 minute fuzz runs found no crash, timeout
//! or out-of-memory input; any input they find later is added here as it was found.

use policy_audit::policy;
use std::time::{Duration, Instant};

/// Generous: the checks are about not overflowing the stack or blowing up, not about speed
/// (each input takes at most a few hundred milliseconds in a debug build).
const QUICK: Duration = Duration::from_secs(10);

fn parse_timed(input: &str) -> (Result<policy::PolicySet, policy::InvalidPolicyFile>, Duration) {
    let start = Instant::now();
    let result = policy::parse(input.as_bytes());
    (result, start.elapsed())
}

fn nested_policy(depth: usize) -> String {
    format!("approval_policy: [{{name: x, enabled: true, d: {}{}}}]\n", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn deep_nesting_is_rejected_without_overflowing_the_stack() {
    let cases = [
        ("100k unclosed [", "[".repeat(100_000)),
        ("100k unclosed {", "{".repeat(100_000)),
        ("100k nested block sequences", format!("{}x\n", "- ".repeat(100_000))),
        ("100k balanced [] inside a policy", nested_policy(100_000)),
        ("1,000 block mappings nested by indentation", (0..1000).map(|i| format!("{}a:\n", " ".repeat(i))).collect()),
    ];
    for (what, input) in cases {
        let (result, took) = parse_timed(&input);
        let reason = result.expect_err(what).reason;
        eprintln!("{what} ({} bytes): {took:?}: {reason}", input.len());
        assert!(reason.starts_with("not valid YAML"), "{what}: {reason}");
        assert!(reason.contains("nested deeper than 100 levels"), "{what}: {reason}");
        assert!(took < QUICK, "{what}: took {took:?}");
    }
}

#[test]
fn nesting_within_gitlabs_depth_limit_loads_and_deeper_is_refused() {
    // GitLab refuses files nested deeper than 100 levels (`MAX_YAML_DEPTH`); the top-level
    // mapping, the policy list and the policy mapping take 3 of them. Within the limit the file
    // loads and the schema decides (it has no place for `d`); beyond it the loader refuses.
    assert!(policy::load(&nested_policy(97)).is_ok(), "100 levels load");
    let reason = policy::parse(nested_policy(97).as_bytes()).unwrap_err().reason;
    assert!(reason.contains("Additional properties are not allowed ('d' was unexpected)"), "{reason}");
    for depth in [98, 200] {
        let reason = policy::parse(nested_policy(depth).as_bytes()).unwrap_err().reason;
        assert!(reason.contains("nested deeper than 100 levels"), "{reason}");
    }
}

/// The "billion laughs": 9 levels of 9 aliases, 9^9 strings if expanded.
fn billion_laughs(inside_a_policy: bool) -> String {
    let indent = if inside_a_policy { "  " } else { "" };
    let mut s = String::new();
    if inside_a_policy {
        s.push_str("approval_policy:\n- name: x\n  enabled: true\n");
    }
    s.push_str(&format!("{indent}a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"));
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        s.push_str(&format!("{indent}a{i}: &a{i} [{refs}]\n"));
    }
    s
}

#[test]
fn billion_laughs_alias_bomb_is_rejected_quickly() {
    for inside in [false, true] {
        let (result, took) = parse_timed(&billion_laughs(inside));
        let reason = result.expect_err("alias bomb").reason;
        eprintln!("billion laughs (inside a policy: {inside}): {took:?}: {reason}");
        assert!(reason.contains("aliases expand to more than"), "{reason}");
        assert!(took < QUICK, "took {took:?}");
    }
}

/// One anchored list of `items` scalars and a list of `aliases` aliases to it: `2 * items +
/// 3 * aliases` bytes that a naive loader expands to `items * aliases` values (serde_yaml's alias limit capped
/// the number of alias uses at 100 per event, not the size of what they expand to).
fn quadratic_aliases(items: usize, aliases: usize) -> String {
    format!(
        "approval_policy:\n- name: x\n  enabled: true\n  a: &a [{}]\n  b: [{}]\n",
        vec!["1"; items].join(","),
        vec!["*a"; aliases].join(",")
    )
}

#[test]
fn small_alias_expansion_still_parses() {
    // Anchors and aliases are legitimate YAML (`<<: *defaults`); a modest expansion is fine.
    let doc = policy::load(&quadratic_aliases(100, 60)).unwrap().unwrap();
    let b = &doc["approval_policy"][0]["b"];
    assert_eq!(b.as_array().unwrap().len(), 60);
    assert_eq!(b[59].as_array().unwrap().len(), 100);
}

/// Was open (found by a direct alias test): a 19 KB file expanding to 15 million values took
/// 8.7 s and 1.5 GB in one parse. The loader (`policy/load.rs`) adds up the expansion before it
/// copies anything and refuses the file.
#[test]
fn quadratic_alias_expansion_is_refused_quickly() {
    let input = quadratic_aliases(5_000, 3_000);
    assert!(input.len() < 20_000);
    let (result, took) = parse_timed(&input);
    let reason = result.expect_err("a 19 KB file expanding to 15 million values was accepted").reason;
    assert!(reason.contains("aliases expand to more than"), "{reason}");
    eprintln!("refused in {took:?}");
}
