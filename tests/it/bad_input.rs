//! The bad-input catalog (docs/reliability.md, "Bad input catalog"): hostile, broken and merely
//! unusual policy files and config files, each run through the real binary.
//!
//! Policy cases share one shape. A repository gets a valid commit with two policies, reconciled
//! with `initial_sync = "backfill"` so their creates are stored; then the case's commit puts its
//! input at the policy path (bytes, or a directory, symlink or submodule); then, for inputs that
//! must be invalid, a fix commit restores the first file with one policy changed. Every reconcile
//! must exit 0 within a deadline. An invalid input must store exactly one
//! `security_policy_yaml_invalidated` for its commit with a readable reason and nothing else (no
//! delete), and the fix must then store exactly one update: the baseline survived. A valid but
//! unusual input must store exactly the expected events.
//!
//! Run with `--nocapture` to see each case's observed reason and timing (the table in the docs
//! is copied from that output).

use crate::common::{BIN, Workspace, commit, events_json, git, git_command, stderr};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const POLICY: &str = ".gitlab/security-policies/policy.yml";

/// No single reconcile of these small repositories may take longer than this; a hang fails the
/// case instead of stalling the suite.
const RECONCILE_DEADLINE: Duration = Duration::from_secs(60);

/// The baseline: two policies of two types. `approvals` is the one field the fix commit changes.
fn policy_file(approvals: u32) -> String {
    format!(
        "approval_policy:
- name: Critical vulns
  description: Block critical findings
  enabled: true
  rules:
  - type: scan_finding
    branches: [main]
    scanners: [sast]
    vulnerabilities_allowed: 0
    severity_levels: [critical]
    vulnerability_states: [new_needs_triage]
  actions:
  - type: require_approval
    approvals_required: {approvals}
    role_approvers: [maintainer]
scan_execution_policy:
- name: DAST nightly
  enabled: true
  rules:
  - type: schedule
    branches: [main]
    cadence: 0 0 * * *
  actions:
  - scan: dast
    site_profile: Staging
"
    )
}

/// A valid scan execution policy item named `name`, as block YAML at list level.
fn scan_policy(name: &str, enabled: bool) -> String {
    format!(
        "- name: {name}\n  enabled: {enabled}\n  rules:\n  - {{type: pipeline, branch_type: all}}\n  actions:\n  - scan: secret_detection\n"
    )
}

fn baseline() -> String {
    policy_file(1)
}

/// The fix commit's file: the baseline with approvals_required 1 -> 2.
fn fixed() -> String {
    policy_file(2)
}

/// What the fix commit (and several valid cases) must produce: one update, one changed field.
const FIX_UPDATE: &str = "update approval_policy \"Critical vulns\" [actions[0].approvals_required]";

/// The baseline with `extra` lines inserted into the first policy, right after its name.
fn with_in_first_policy(extra: &str) -> String {
    baseline().replacen("- name: Critical vulns\n", &format!("- name: Critical vulns\n{extra}"), 1)
}

/// `text` padded with a trailing comment to exactly `size` bytes.
fn padded(text: &str, size: usize) -> Vec<u8> {
    let mut out = text.as_bytes().to_vec();
    out.extend_from_slice(b"# ");
    assert!(out.len() < size, "padding target too small");
    while out.len() < size - 1 {
        out.push(if (out.len() + 1).is_multiple_of(100) { b'\n' } else { b'x' });
        if out.last() == Some(&b'\n') && out.len() < size - 1 {
            out.extend_from_slice(b"# ");
        }
    }
    out.truncate(size - 1);
    out.push(b'\n');
    assert_eq!(out.len(), size);
    out
}

/// Deterministic "random" bytes with NULs sprinkled in (xorshift, fixed seed).
fn binary_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i.is_multiple_of(7) { 0 } else { (x >> 24) as u8 }
        })
        .collect()
}

/// The classic billion laughs, 9 levels of 9 (387,420,489 strings once expanded), inside an
/// otherwise valid policy so that only the YAML loader can stop it.
fn alias_bomb() -> String {
    let mut lines =
        String::from("  lol0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for level in 1..=8 {
        let prev = format!("*a{}", level - 1);
        let items = [prev.as_str(); 9].join(",");
        lines.push_str(&format!("  lol{level}: &a{level} [{items}]\n"));
    }
    with_in_first_policy(&lines)
}

enum Input {
    /// These bytes as the policy file.
    Bytes(Vec<u8>),
    /// A directory at the policy path (holding a valid policy file, which must not be read).
    Directory,
    /// A symbolic link at the policy path to a valid policy file (which must not be followed).
    Symlink,
    /// A submodule (gitlink) at the policy path.
    Submodule,
    /// The policy file deleted.
    Missing,
}

enum Expect {
    /// One invalidated event whose reason contains this fragment; the fix then yields one update.
    Invalid(&'static str),
    /// Exactly these events (see [`summary`]) for the case's commit, in order.
    Valid(Vec<String>),
}

struct Case {
    name: &'static str,
    input: Input,
    /// `max_policy_file_bytes` for this case's config (default 1 MiB when None).
    max_bytes: Option<u64>,
    expect: Expect,
}

fn invalid(name: &'static str, bytes: impl Into<Vec<u8>>, fragment: &'static str) -> Case {
    Case { name, input: Input::Bytes(bytes.into()), max_bytes: None, expect: Expect::Invalid(fragment) }
}

fn valid(name: &'static str, bytes: impl Into<Vec<u8>>, events: Vec<String>) -> Case {
    Case { name, input: Input::Bytes(bytes.into()), max_bytes: None, expect: Expect::Valid(events) }
}

fn not_a_file(name: &'static str, input: Input, fragment: &'static str) -> Case {
    Case { name, input, max_bytes: None, expect: Expect::Invalid(fragment) }
}

fn policy_cases() -> Vec<Case> {
    let thousand = {
        let mut text = baseline();
        text.push_str("vulnerability_management_policy:\n"); // a third type, so the limit event is unambiguous
        for i in 1..=998 {
            text.push_str(&format!(
                "- name: Auto-resolve {i:04}\n  enabled: true\n  rules:\n  - {{type: no_longer_detected, scanners: [sast], severity_levels: [low]}}\n  actions:\n  - {{type: auto_resolve}}\n"
            ));
        }
        text
    };
    let mut thousand_events: Vec<String> =
        (1..=998).map(|i| format!("create vulnerability_management_policy \"Auto-resolve {i:04}\"")).collect();
    thousand_events.push("limit_exceeded vulnerability_management_policy active=5 skipped=993".into());

    let long_value = fixed().replacen(
        "  description: Block critical findings\n",
        &format!("  description: \"{}\"\n", "A".repeat(200 * 1024)),
        1,
    );
    let wide_name = "é".repeat(255);
    let mut utf16 = vec![0xff, 0xfe];
    utf16.extend(fixed().encode_utf16().flat_map(u16::to_le_bytes));
    let mut bom = vec![0xef, 0xbb, 0xbf];
    bom.extend_from_slice(fixed().as_bytes());
    let mut with_nuls = fixed().into_bytes();
    with_nuls.extend_from_slice(b"# \0\0\0 trailing NULs\n");

    vec![
        // Resource exhaustion.
        invalid("alias bomb (billion laughs, 9 levels)", alias_bomb(), "the parsed YAML is too big: its aliases expand to more than 250000 values"),
        invalid(
            "deep nesting (10,000 nested `[`)",
            with_in_first_policy(&format!("  deep: {}{}\n", "[".repeat(10_000), "]".repeat(10_000))),
            "not valid YAML: lists or mappings nested deeper than 100 levels",
        ),
        Case {
            name: "file over a configured limit (3,000 bytes, max_policy_file_bytes = 2048)",
            input: Input::Bytes(padded(&fixed(), 3000)),
            max_bytes: Some(2048),
            expect: Expect::Invalid("is 3000 bytes, over the limit of 2048 bytes (max_policy_file_bytes)"),
        },
        Case {
            name: "file exactly at a configured limit (2,048 bytes, max_policy_file_bytes = 2048)",
            input: Input::Bytes(padded(&fixed(), 2048)),
            max_bytes: Some(2048),
            expect: Expect::Valid(vec![FIX_UPDATE.into()]),
        },
        invalid(
            "file over the default limit (1.1 MiB of comments after a valid file)",
            padded(&fixed(), 1_153_434),
            "is 1153434 bytes, over the limit of 1048576 bytes (max_policy_file_bytes)",
        ),
        valid(
            "very long single line (200 KiB string value, under the limit)",
            long_value,
            vec!["update approval_policy \"Critical vulns\" [actions[0].approvals_required, description]".into()],
        ),
        valid("1,000 policies in one file", thousand, thousand_events),
        // Bytes that are not YAML text.
        invalid("non-UTF-8: bytes 0xff 0xfe then UTF-16LE text", utf16, "not UTF-8 text (invalid byte at offset 0)"),
        invalid("binary: 4 KiB of random-looking bytes with NULs", binary_bytes(4096), "not UTF-8 text"),
        invalid("valid UTF-8 with NUL bytes in a comment", with_nuls, "not valid YAML: control characters are not allowed"),
        valid("UTF-8 byte order mark before a valid file", bom, vec![FIX_UPDATE.into()]),
        valid("CRLF line endings", fixed().replace('\n', "\r\n"), vec![FIX_UPDATE.into()]),
        // YAML structure.
        invalid("empty file (0 bytes)", "", "the file is empty: it has no policy-type key"),
        invalid("only comments", "# policies will go here\n# later\n", "the file is empty: it has no policy-type key"),
        invalid("empty mapping `{}` (no policy-type key)", "{}\n", "(top level): the mapping is not valid under any of the schemas listed in the 'anyOf' keyword"),
        invalid(
            "top level is a list",
            "- name: Critical vulns\n  enabled: true\n",
            "the top level must be a mapping of policy types, found a list",
        ),
        invalid(
            "unclosed flow sequence",
            fixed().replace("branches: [main]", "branches: [main"),
            "not valid YAML: illegal placement of ':' indicator at byte 159 line 8 column 13",
        ),
        valid(
            "multiple YAML documents in one file (GitLab reads the first)",
            format!("{}---\nnot: [yaml\n", fixed()),
            vec![FIX_UPDATE.into()],
        ),
        valid(
            "duplicate mapping key inside a policy (`enabled` twice, the last wins)",
            with_in_first_policy("  enabled: false\n"),
            vec![],
        ),
        valid(
            "duplicate top-level key (`scan_execution_policy` twice, the last wins)",
            format!("{}scan_execution_policy:\n{}", fixed(), scan_policy("Other", true)),
            vec![
                "create scan_execution_policy \"Other\"".into(),
                FIX_UPDATE.into(),
                "delete scan_execution_policy \"DAST nightly\"".into(),
            ],
        ),
        valid(
            "YAML 1.1 booleans (`enabled: yes`, `on`)",
            fixed().replace("  enabled: true\n", "  enabled: yes\n").replacen("  enabled: yes\n", "  enabled: On\n", 1),
            vec![FIX_UPDATE.into()],
        ),
        invalid(
            "a date where a string belongs (YAML.safe_load refuses Date)",
            fixed().replace("description: Block critical findings", "description: 2024-01-31"),
            "YAML.safe_load refuses a date (Ruby Date) `2024-01-31` at line 3",
        ),
        invalid(
            "tabs for indentation",
            fixed().replace("\n  ", "\n\t"),
            "not valid YAML: while scanning a plain scalar, found a tab at byte 25 line 2 column 9",
        ),
        valid(
            "merge key `<<` (DAST written through an anchor and a merge)",
            fixed().replace(
                "- name: DAST nightly\n  enabled: true\n  rules:\n  - type: schedule\n    branches: [main]\n    cadence: 0 0 * * *\n",
                "- <<: &nightly\n    enabled: true\n    rules:\n    - type: schedule\n      branches: [main]\n      cadence: 0 0 * * *\n  name: DAST nightly\n",
            ),
            vec![FIX_UPDATE.into()],
        ),
        // Schema.
        invalid(
            "unknown top-level key",
            format!("{}policies_version: 2\n", fixed()),
            "(top level): Additional properties are not allowed ('policies_version' was unexpected)",
        ),
        invalid(
            "unknown policy type `secret_push_protection_policy`",
            format!("{}secret_push_protection_policy:\n- name: Push protection\n  enabled: true\n", fixed()),
            "(top level): Additional properties are not allowed ('secret_push_protection_policy' was unexpected)",
        ),
        valid(
            "both `scan_result_policy` and `approval_policy`",
            format!(
                "{}scan_result_policy:\n- name: Licenses\n  enabled: true\n  rules:\n  - {{type: license_finding, branches: [main], match_on_inclusion_license: true, license_types: [MIT], license_states: [detected]}}\n  actions:\n  - {{type: send_bot_message, enabled: true}}\n",
                fixed()
            ),
            vec!["create approval_policy \"Licenses\"".into(), FIX_UPDATE.into()],
        ),
        valid(
            "duplicate policy names (a second `Critical vulns`)",
            baseline().replace(
                "scan_execution_policy:\n",
                "- name: Critical vulns\n  enabled: false\n  rules:\n  - {type: any_merge_request, branch_type: protected, commits: any}\n  approval_settings: {}\nscan_execution_policy:\n",
            ),
            vec!["create approval_policy \"Critical vulns\"".into()],
        ),
        invalid(
            "section is a mapping, not a list",
            fixed().replace(
                "scan_execution_policy:\n- name: DAST nightly\n  enabled: true\n  rules:\n  - type: schedule\n    branches: [main]\n    cadence: 0 0 * * *\n  actions:\n  - scan: dast\n    site_profile: Staging\n",
                "scan_execution_policy:\n  name: DAST nightly\n  enabled: true\n",
            ),
            "scan_execution_policy: the mapping is not of type \"array\"",
        ),
        invalid(
            "policy item is a string",
            fixed().replace(
                "scan_execution_policy:\n- name: DAST nightly\n  enabled: true\n  rules:\n  - type: schedule\n    branches: [main]\n    cadence: 0 0 * * *\n  actions:\n  - scan: dast\n    site_profile: Staging\n",
                "scan_execution_policy:\n- DAST nightly\n",
            ),
            "scan_execution_policy[0]: \"DAST nightly\" is not of type \"object\"",
        ),
        invalid(
            "empty name",
            fixed().replace("name: DAST nightly", "name: ''"),
            "scan_execution_policy[0].name: \"\" is shorter than 1 character",
        ),
        invalid(
            "300-character name",
            fixed().replace("name: DAST nightly", &format!("name: {}", "n".repeat(300))),
            "scan_execution_policy[0].name: the text is longer than 255 characters",
        ),
        valid(
            "255-character name of 2-byte characters (510 bytes)",
            format!("{}{}", fixed(), scan_policy(&wide_name, false)),
            vec![format!("create scan_execution_policy \"{wide_name}\""), FIX_UPDATE.into()],
        ),
        invalid(
            "name is a number",
            fixed().replace("name: DAST nightly", "name: 42"),
            "scan_execution_policy[0].name: 42 is not of type \"string\"",
        ),
        invalid(
            "enabled is the string \"true\"",
            fixed().replace("  enabled: true\n  rules:\n  - type: schedule", "  enabled: \"true\"\n  rules:\n  - type: schedule"),
            "scan_execution_policy[0].enabled: \"true\" is not of type \"boolean\"",
        ),
        invalid(
            "enabled is missing",
            fixed().replace("  enabled: true\n  rules:\n  - type: schedule", "  rules:\n  - type: schedule"),
            "scan_execution_policy[0]: \"enabled\" is a required property",
        ),
        invalid(
            "approval rule without branches",
            fixed().replace("    branches: [main]\n", ""),
            "approval_policy[0].rules[0]: the mapping is not valid under any of the schemas listed in the 'oneOf' keyword",
        ),
        // Not a file at the policy path.
        not_a_file("policy path is a directory", Input::Directory, "policy.yml is a directory, not a file"),
        not_a_file("policy path is a symbolic link (to a valid file)", Input::Symlink, "policy.yml is a symbolic link, not a file"),
        not_a_file("policy path is a submodule", Input::Submodule, "policy.yml is a submodule, not a file"),
        not_a_file("policy file deleted", Input::Missing, ".gitlab/security-policies/policy.yml does not exist"),
    ]
}

/// `kind policy_type "name" [changed paths]`: what the assertions compare.
fn summary(e: &Value) -> String {
    let d = &e["details"];
    let kind = e["event_type"].as_str().unwrap_or("?").trim_start_matches("security_policy_");
    let mut s = kind.to_string();
    if let Some(t) = d["policy_type"].as_str() {
        s.push_str(&format!(" {t}"));
    }
    if let Some(n) = d["policy_name"].as_str() {
        s.push_str(&format!(" \"{n}\""));
    }
    if let Some(changes) = d["changes"].as_array() {
        let paths: Vec<&str> = changes.iter().filter_map(|c| c["path"].as_str()).collect();
        s.push_str(&format!(" [{}]", paths.join(", ")));
    }
    if kind == "limit_exceeded" {
        let n = |k: &str| d[k].as_array().map_or(0, Vec::len);
        s.push_str(&format!(" active={} skipped={}", n("active_policies_names"), n("active_skipped_policies_names")));
    }
    s
}

/// Runs `policy-audit reconcile`, killing it at the deadline; returns the exit code and the time.
fn reconcile(ws: &Workspace, config: &Path) -> (Option<i32>, Duration, String) {
    let out_path = ws.path("reconcile.out");
    let err_path = ws.path("reconcile.err");
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(["reconcile", "--no-deliver"])
        .env_remove("POLICY_AUDIT_CONFIG")
        .env_remove("RUST_LOG")
        .env("HOME", ws.dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("start policy-audit");
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if started.elapsed() > RECONCILE_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("reconcile did not finish within {RECONCILE_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    let text = format!(
        "{}{}",
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    (code, elapsed, text)
}

fn reconcile_ok(ws: &Workspace, config: &Path, what: &str) -> Duration {
    let (code, elapsed, output) = reconcile(ws, config);
    assert_eq!(code, Some(0), "{what}: reconcile must exit 0; output:\n{output}");
    assert!(!output.contains("panicked"), "{what}: {output}");
    elapsed
}

/// Commits what is staged, without `git add -A` (a gitlink has no working-tree directory).
fn commit_staged(repo: &Path, date: &str, message: &str) -> String {
    let out = git_command(repo)
        .args(["-c", "commit.gpgsign=false", "commit", "-q", "-m", message])
        .env("GIT_AUTHOR_NAME", "Mallory")
        .env("GIT_AUTHOR_EMAIL", "mallory@example.com")
        .env("GIT_AUTHOR_DATE", date)
        .env("GIT_COMMITTER_NAME", "Mallory")
        .env("GIT_COMMITTER_EMAIL", "mallory@example.com")
        .env("GIT_COMMITTER_DATE", date)
        .output()
        .expect("git commit");
    assert!(out.status.success(), "commit failed: {}", String::from_utf8_lossy(&out.stderr));
    git(repo, &["rev-parse", "HEAD"]).trim().to_string()
}

/// Puts the case's input at the policy path and commits it; returns the commit sha.
fn commit_input(repo: &Path, input: &Input) -> String {
    let path = repo.join(POLICY);
    std::fs::remove_file(&path).expect("remove the baseline file");
    match input {
        Input::Bytes(bytes) => std::fs::write(&path, bytes).expect("write policy bytes"),
        Input::Directory => {
            std::fs::create_dir(&path).expect("mkdir at the policy path");
            std::fs::write(path.join("policy.yml"), fixed()).expect("write file inside");
        }
        Input::Symlink => {
            std::fs::write(repo.join(".gitlab/security-policies/real-policy.yml"), fixed()).expect("write target");
            let ok = Command::new("ln")
                .args(["-s", "real-policy.yml", "policy.yml"])
                .current_dir(repo.join(".gitlab/security-policies"))
                .status()
                .expect("ln -s");
            assert!(ok.success());
        }
        Input::Submodule | Input::Missing => {}
    }
    git(repo, &["add", "-A"]);
    if let Input::Submodule = input {
        let head = git(repo, &["rev-parse", "HEAD"]);
        git(repo, &["update-index", "--add", "--cacheinfo", &format!("160000,{},{POLICY}", head.trim())]);
    }
    let sha = commit_staged(repo, "2024-02-01T10:00:00Z", "bad input");
    let listed = git(repo, &["ls-tree", "HEAD", ".gitlab/security-policies/"]);
    match input {
        Input::Directory => assert!(listed.contains("040000 tree"), "{listed}"),
        Input::Symlink => assert!(listed.contains("120000 blob") && listed.contains("policy.yml\n"), "{listed}"),
        Input::Submodule => assert!(listed.contains("160000 commit"), "{listed}"),
        Input::Missing => assert!(!listed.contains("policy.yml"), "{listed}"),
        Input::Bytes(_) => {}
    }
    sha
}

/// Replaces whatever the case left at the policy path with the fixed file and commits.
fn commit_fix(repo: &Path) -> String {
    let path = repo.join(POLICY);
    git(repo, &["rm", "-r", "-q", "--cached", "--ignore-unmatch", POLICY]);
    if path.is_dir() && !path.is_symlink() {
        std::fs::remove_dir_all(&path).expect("remove directory");
    } else if path.symlink_metadata().is_ok() {
        std::fs::remove_file(&path).expect("remove file or link");
    }
    std::fs::write(&path, fixed()).expect("write fixed file");
    commit(repo, "Fixer", "fixer@example.com", "2024-03-01T10:00:00Z", "fix")
}

fn readable(reason: &str) -> bool {
    !reason.trim().is_empty()
        && reason.chars().count() <= 400
        && !reason.contains('\u{fffd}')
        && !reason.chars().any(|c| c.is_control())
}

/// One case, start to end. Returns the line for the catalog table.
fn run_case(case: &Case) -> String {
    let ws = Workspace::new();
    let repo = ws.init_repo("spp");
    ws.write(&format!("spp/{POLICY}"), &baseline());
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "baseline");
    let limit = case.max_bytes.map(|n| format!("max_policy_file_bytes = {n}\n")).unwrap_or_default();
    let config = ws.write(
        "config.toml",
        &format!(
            "state_dir = \"state\"\n{limit}[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            repo.display()
        ),
    );
    reconcile_ok(&ws, &config, "baseline");
    let base: Vec<String> = events_json(&ws, &config).iter().map(summary).collect();
    assert_eq!(
        base,
        ["create approval_policy \"Critical vulns\"", "create scan_execution_policy \"DAST nightly\""],
        "baseline"
    );

    let bad_sha = commit_input(&repo, &case.input);
    let took = reconcile_ok(&ws, &config, "bad commit");
    let all = events_json(&ws, &config);
    let new = &all[2..];
    for e in new {
        assert_eq!(e["details"]["security_policy_project_commit_sha"], bad_sha.as_str(), "event of the case's commit");
    }
    let observed = match &case.expect {
        Expect::Invalid(fragment) => {
            let got: Vec<String> = new.iter().map(summary).collect();
            assert_eq!(got, ["yaml_invalidated"], "exactly one invalidated event, no delete");
            let reason = new[0]["details"]["invalid_reason"].as_str().unwrap_or_default();
            assert!(reason.contains(fragment), "reason {reason:?} should contain {fragment:?}");
            assert!(readable(reason), "reason is not readable: {reason:?}");

            commit_fix(&repo);
            reconcile_ok(&ws, &config, "fix commit");
            let after: Vec<String> = events_json(&ws, &config)[3..].iter().map(summary).collect();
            assert_eq!(after, [FIX_UPDATE], "the fix is diffed against the baseline");
            format!("invalidated: `{reason}`")
        }
        Expect::Valid(want) => {
            let got: Vec<String> = new.iter().map(summary).collect();
            let reasons: Vec<&str> = new.iter().filter_map(|e| e["details"]["invalid_reason"].as_str()).collect();
            assert_eq!(&got, want, "events of a valid input (invalid_reason: {reasons:?})");
            let bytes: usize = new.iter().map(|e| e.to_string().len()).max().unwrap_or(0);
            match got.len() {
                0 => "no event".to_string(),
                1..=3 => format!("{} (largest event {bytes} bytes)", got.join("; ")),
                n => format!("{n} events: {} … {} (largest event {bytes} bytes)", got[0], got[n - 1]),
            }
        }
    };
    let line = format!("| {} | {observed} | {} ms |", case.name, took.as_millis());
    eprintln!("{line}");
    line
}

#[test]
fn bad_policy_files_never_crash_hang_or_delete() {
    let cases = policy_cases();
    assert!(cases.len() >= 25, "the catalog promises at least 25 policy-file cases");
    let mut failures = Vec::new();
    for case in &cases {
        let started = Instant::now();
        match std::panic::catch_unwind(|| run_case(case)) {
            Ok(_) => {}
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {msg}", case.name));
            }
        }
        eprintln!("   ({}: whole case {} ms)", case.name, started.elapsed().as_millis());
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

/// Was a hang: libyaml's scanner is quadratic in flow nesting depth (80,000 `[` took 15 s,
/// 400,000 about ten minutes). A depth guard before the parser rejects such files at once.
#[test]
fn bad_input_flow_nesting_near_the_size_limit_finishes() {
    let case = Case {
        name: "deep nesting near the size limit (400,000 nested `[`, 800 KB)",
        input: Input::Bytes(
            with_in_first_policy(&format!("  deep: {}{}\n", "[".repeat(400_000), "]".repeat(400_000))).into_bytes(),
        ),
        max_bytes: None,
        expect: Expect::Invalid("not valid YAML: lists or mappings nested deeper than 100 levels"),
    };
    run_case(&case);
}

/// A config error: the text, where `check-config` must point (`line:column`, None when the file
/// itself cannot be read), and a fragment naming the key or the problem.
struct ConfigCase {
    name: &'static str,
    text: String,
    at: Option<&'static str>,
    fragment: &'static str,
}

fn cfg(name: &'static str, text: &str, at: &'static str, fragment: &'static str) -> ConfigCase {
    ConfigCase { name, text: text.to_string(), at: Some(at), fragment }
}

const PROJECT: &str = "[[projects]]\npath = \"acme/spp\"\nurl = \"/srv/git/spp\"\n";
const DESTINATION: &str = "[[destinations]]\nname = \"siem\"\nurl = \"https://siem.example.com/audit\"\n";

macro_rules! config_cases {
    ($($test:ident: $case:expr;)*) => {
        $(
            #[test]
            fn $test() {
                check_config_case(&$case);
            }
        )*
    };
}

fn many_headers() -> String {
    (1..=21).map(|i| format!("\"X-H{i}\" = \"v\"")).collect::<Vec<_>>().join(", ")
}

// One test per case, named after it, so a failure names its case.
config_cases! {
    config_unknown_key: cfg("unknown key", "state_dir = \"state\"\ncolour = \"red\"\n", "2:1", "unknown field `colour`");
    config_unknown_key_in_a_project: cfg("unknown key in a project", &format!("{PROJECT}brnach = \"main\"\n"), "4:1", "unknown field `brnach`");
    config_wrong_type_string_for_an_integer: cfg(
        "wrong type (string for an integer)",
        "max_policy_file_bytes = \"1MiB\"\n",
        "1:25",
        "invalid type: string \"1MiB\", expected u64",
    );
    config_max_policy_file_bytes_0: cfg(
        "max_policy_file_bytes = 0",
        "max_policy_file_bytes = 0\n",
        "1:25",
        "`max_policy_file_bytes` must be at least 1",
    );
    config_bad_cron_hour_25: cfg(
        "bad cron (hour 25)",
        "schedule = \"0 0 25 * * *\"\n",
        "1:12",
        "`schedule` = \"0 0 25 * * *\" is not a valid cron expression",
    );
    config_4_field_cron: cfg("4-field cron", "schedule = \"*/5 * * *\"\n", "1:12", "expected 5, 6 or 7 fields, found 4");
    config_bad_timezone: cfg(
        "bad timezone",
        "timezone = \"Mars/Olympus_Mons\"\n",
        "1:12",
        "`timezone` = \"Mars/Olympus_Mons\" is not an IANA time zone name",
    );
    config_missing_secret_env: cfg(
        "missing secret env",
        &format!("{PROJECT}token_env = \"POLICY_AUDIT_BAD_INPUT_UNSET\"\n"),
        "4:13",
        "acme/spp: `token_env`: environment variable POLICY_AUDIT_BAD_INPUT_UNSET is not set",
    );
    config_missing_secret_file: cfg(
        "missing secret file",
        &format!("{PROJECT}token_file = \"no-such-token.txt\"\n"),
        "4:14",
        "acme/spp: `token_file`: cannot read",
    );
    config_both_token_env_and_token_file: cfg(
        "both token_env and token_file",
        &format!("{PROJECT}token_env = \"HOME\"\ntoken_file = \"token.txt\"\n"),
        "4:13",
        "set either `token_env` or `token_file`, not both",
    );
    config_duplicate_project_path_with_a_different_url: cfg(
        "duplicate project path with a different url",
        &format!("{PROJECT}{}", PROJECT.replace("/srv/git/spp", "/srv/git/other")),
        "5:8",
        "duplicate project path \"acme/spp\" (first at config.toml:2:8) with a different url or branch",
    );
    config_same_url_and_branch_under_two_paths: cfg(
        "same url and branch under two paths",
        &format!("{PROJECT}{}", PROJECT.replace("acme/spp", "acme/spp-copy")),
        "5:8",
        "project \"acme/spp-copy\" has the same url and branch as project \"acme/spp\" (config.toml:2:8)",
    );
    config_ssh_url: cfg(
        "ssh url",
        "[[projects]]\npath = \"acme/spp\"\nurl = \"git@gitlab.example.com:acme/spp.git\"\n",
        "3:7",
        "ssh urls are not supported",
    );
    config_ftp_url: cfg(
        "ftp url",
        "[[projects]]\npath = \"acme/spp\"\nurl = \"ftp://example.com/spp.git\"\n",
        "3:7",
        "project `url` scheme \"ftp\" is not supported",
    );
    config_token_over_plain_http_to_a_non_loopback_host: cfg(
        "token over plain http to a non-loopback host",
        "[[projects]]\npath = \"acme/spp\"\nurl = \"http://gitlab.example.com/acme/spp.git\"\ntoken_file = \"token.txt\"\n",
        "3:7",
        "the token would be sent over plain http to a non-loopback host",
    );
    config_token_over_plain_http_with_an_uppercase_scheme: cfg(
        "token over plain http with an uppercase scheme",
        "[[projects]]\npath = \"acme/spp\"\nurl = \"HTTP://gitlab.example.com/acme/spp.git\"\ntoken_file = \"token.txt\"\n",
        "3:7",
        "the token would be sent over plain http to a non-loopback host",
    );
    config_token_over_plain_http_to_a_host_that_starts_like_loopback: cfg(
        "token over plain http to a host that starts like loopback",
        "[[projects]]\npath = \"acme/spp\"\nurl = \"http://127.0.0.1.evil.example/acme/spp.git\"\ntoken_file = \"token.txt\"\n",
        "3:7",
        "the token would be sent over plain http to a non-loopback host",
    );
    config_project_url_that_is_not_a_url: cfg(
        "project url that is not a URL",
        "[[projects]]\npath = \"acme/spp\"\nurl = \"https://gitlab example.com/acme/spp.git\"\n",
        "3:7",
        "project `url` = \"https://gitlab example.com/acme/spp.git\" is not a valid URL",
    );
    config_relative_destination_url: cfg(
        "relative destination url",
        "[[destinations]]\nname = \"siem\"\nurl = \"/gitlab-audit\"\n",
        "3:7",
        "destination \"siem\": `url` = \"/gitlab-audit\" must be an http:// or https:// URL",
    );
    config_duplicate_destination_name: cfg(
        "duplicate destination name",
        &format!("{DESTINATION}{DESTINATION}"),
        "5:8",
        "duplicate destination name \"siem\"",
    );
    config_bad_header_name: cfg(
        "bad header name",
        &format!("{DESTINATION}headers = {{ \"X Source\" = \"policy-audit\" }}\n"),
        "4:11",
        "header name \"X Source\" is not a valid HTTP header name",
    );
    config_more_than_20_headers: cfg(
        "more than 20 headers",
        &format!("{DESTINATION}headers = {{ {} }}\n", many_headers()),
        "4:11",
        "at most 20 custom headers are allowed, found 21",
    );
    config_reserved_header: cfg(
        "reserved header",
        &format!("{DESTINATION}headers = {{ \"Content-Type\" = \"text/plain\" }}\n"),
        "4:11",
        "header \"Content-Type\" is set by policy-audit and cannot be configured",
    );
    config_line_break_in_a_header_value: cfg(
        "line break in a header value",
        &format!("{DESTINATION}headers = {{ \"X-Source\" = \"a\\r\\nX-Evil: 1\" }}\n"),
        "4:11",
        "header \"X-Source\" has a line break in its value",
    );
    config_control_character_in_a_header_value: cfg(
        "control character in a header value",
        &format!("{DESTINATION}headers = {{ \"X-Source\" = \"a\\u001b[2Jb\" }}\n"),
        "4:11",
        "header \"X-Source\" has a value that is not a valid HTTP header value",
    );
    config_unknown_event_type_filter: cfg(
        "unknown event type filter",
        &format!("{DESTINATION}event_types = [\"security_policy_created\"]\n"),
        "4:16",
        "unknown event type \"security_policy_created\"",
    );
    config_zero_max_attempts: cfg(
        "zero max_attempts",
        &format!("{DESTINATION}max_attempts = 0\n"),
        "4:16",
        "`max_attempts` must be at least 1",
    );
    config_bad_duration: cfg(
        "bad duration",
        &format!("{DESTINATION}timeout = \"ten seconds\"\n"),
        "4:11",
        "`timeout` = \"ten seconds\" is not a duration",
    );
    config_malformed_whsec_signing_secret: cfg(
        "malformed whsec_ signing secret",
        &format!("{DESTINATION}signing_secret_file = \"whsec.txt\"\n"),
        "4:23",
        "the signing secret starts with `whsec_` but the rest is not valid base64",
    );
    config_unknown_initial_sync_value: cfg(
        "unknown initial_sync value",
        &format!("{PROJECT}initial_sync = \"sometimes\"\n"),
        "4:16",
        "unknown variant `sometimes`",
    );
    config_bad_feature_flag_value: cfg(
        "bad feature flag value",
        "[feature_flags]\nsecurity_policy_audit_events = \"yes\"\n",
        "2:32",
        "`feature_flags.security_policy_audit_events`",
    );
    config_policy_file_outside_the_repository: cfg(
        "policy_file outside the repository",
        &format!("{PROJECT}policy_file = \"../policy.yml\"\n"),
        "4:15",
        "`policy_file` = \"../policy.yml\" must be a path inside the repository",
    );
    config_invalid_toml_syntax_unterminated_string: cfg(
        "invalid TOML syntax (unterminated string)",
        "state_dir = \"state\nschedule = \"0 * * * * *\"\n",
        "1:19",
        "invalid basic string",
    );
    config_duplicate_toml_key: cfg("duplicate TOML key", "state_dir = \"a\"\nstate_dir = \"b\"\n", "2:1", "duplicate key");
    config_file_does_not_exist: ConfigCase {
        name: "config file does not exist",
        text: String::new(),
        at: None,
        fragment: "cannot read config file",
    };
}

/// `check-config` on the case's file exits 2, prints nothing on stdout, names `file:line:col`
/// and the problem on stderr, and creates no state directory.
fn check_config_case(case: &ConfigCase) {
    let ws = Workspace::new();
    ws.write("token.txt", "glpat-not-a-real-token\n");
    ws.write("whsec.txt", "whsec_!!!not*base64!!!\n");
    let config: PathBuf = match case.at {
        Some(_) => ws.write("config.toml", &case.text),
        None => ws.path("config.toml"),
    };
    let started = Instant::now();
    let out = ws.run(&config, &["check-config"]);
    let took = started.elapsed();
    let err = stderr(&out).replace(&config.display().to_string(), "config.toml");
    let want = match case.at {
        Some(at) => format!("error: config.toml:{at}: "),
        None => "error: config.toml: ".to_string(),
    };
    let first = err.lines().next().unwrap_or_default().to_string();
    eprintln!("| {} | `{}` | {} ms |", case.name, first, took.as_millis());
    assert_eq!(out.status.code(), Some(2), "{}: exit code; stderr:\n{err}", case.name);
    assert!(out.stdout.is_empty(), "{}: stdout must be empty", case.name);
    assert!(
        err.lines().any(|l| l.starts_with(&want) && l.contains(case.fragment)),
        "{}: want a line starting {want:?} containing {:?}; stderr:\n{err}",
        case.name,
        case.fragment
    );
    assert!(!ws.path("state").exists(), "{}: check-config created the state directory", case.name);
}
