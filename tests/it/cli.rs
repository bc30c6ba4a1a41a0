//! The command line as a user meets it: exit codes, error lines, output formats, filters.

use crate::common::{Workspace, commit, events_json, stderr, stdout};
use serde_json::Value;
use std::path::{Path, PathBuf};

const POLICY: &str = ".gitlab/security-policies/policy.yml";

fn policy(approvals: u32, extra: &str) -> String {
    format!(
        "approval_policy:\n- name: Critical\n  enabled: true\n  rules:\n  - {{type: scan_finding, branches: [main], scanners: [sast], vulnerabilities_allowed: 0, severity_levels: [critical], vulnerability_states: [new_needs_triage]}}\n  actions:\n  - {{type: require_approval, approvals_required: {approvals}, role_approvers: [maintainer]}}\n{extra}"
    )
}

/// A config in `file` that backfills `repo` as project `path`, its state in `state`.
fn backfill_config(ws: &Workspace, file: &str, state: &str, path: &str, repo: &Path) -> PathBuf {
    ws.write(
        file,
        &format!(
            "state_dir = \"{state}\"\n[[projects]]\npath = \"{path}\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            repo.display()
        ),
    )
}

/// A repository with three policy commits by two authors, and a config that backfills it.
fn backfilled(ws: &Workspace) -> (PathBuf, PathBuf) {
    let repo = ws.init_repo("spp");
    ws.write(&format!("spp/{POLICY}"), &policy(1, ""));
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "create");
    ws.write(&format!("spp/{POLICY}"), &policy(2, "scan_execution_policy:\n- {name: DAST, enabled: true, rules: [{type: pipeline, branch_type: all}], actions: [{scan: secret_detection}]}\n"));
    commit(&repo, "Bob", "bob@example.com", "2024-02-01T10:00:00Z", "update and add DAST");
    ws.write(&format!("spp/{POLICY}"), &policy(2, ""));
    commit(&repo, "Alice", "alice@example.com", "2024-03-01T10:00:00Z", "drop DAST\n\nSee merge request acme/spp!4");
    let config = ws.write(
        "config.toml",
        &format!("state_dir = \"state\"\n[authors]\n\"alice@example.com\" = 42\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n", repo.display()),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    (repo, config)
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let ws = Workspace::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let out = ws.run(&example, &["check-config"]);
    assert!(out.status.success(), "config.toml must pass check-config: {}", stderr(&out));
    assert!(stdout(&out).contains(": ok ("));
}

#[test]
fn a_failing_project_does_not_stop_the_others_and_exits_1() {
    let ws = Workspace::new();
    let (repo, _) = backfilled(&ws);
    let config = ws.write(
        "config2.toml",
        &format!(
            "state_dir = \"state2\"\n[[projects]]\npath = \"acme/gone\"\nurl = \"{}\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            ws.path("does-not-exist").display(),
            repo.display()
        ),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("error: project acme/gone:"), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("acme/spp: 3 commit(s), 3 policy change step(s), 4 event(s) stored"),
        "{}",
        stdout(&out)
    );
    let status = ws.run(&config, &["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).expect("status json");
    let gone = &status["projects"][0];
    assert_eq!(gone["path"], "acme/gone");
    assert!(gone["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(gone["cursor"].is_null());
    assert!(status["projects"][1]["last_error"].is_null());
}

#[test]
fn unknown_project_argument_exits_2() {
    let ws = Workspace::new();
    let (_, config) = backfilled(&ws);
    let out = ws.run(&config, &["reconcile", "--project", "acme/nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("project \"acme/nope\" is not in"));
}

#[test]
fn events_json_is_gitlab_shaped_and_attributed() {
    let ws = Workspace::new();
    let (repo, config) = backfilled(&ws);
    let events = events_json(&ws, &config);
    let kinds: Vec<&str> = events.iter().map(|e| e["event_type"].as_str().unwrap_or_default()).collect();
    assert_eq!(
        kinds,
        ["security_policy_create", "security_policy_create", "security_policy_update", "security_policy_delete"]
    );
    let head = crate::common::git(&repo, &["rev-parse", "HEAD"]);
    let delete = &events[3];
    assert_eq!(delete["author_name"], "Alice");
    assert_eq!(delete["author_id"], 42);
    assert_eq!(delete["entity_type"], "Project");
    assert_eq!(delete["entity_path"], "acme/spp");
    assert_eq!(delete["target_type"], "Security::Policy");
    assert_eq!(delete["target_details"], "DAST");
    assert_eq!(delete["ip_address"], "");
    assert_eq!(delete["created_at"], "2024-03-01T10:00:00.000Z");
    assert_eq!(delete["details"]["custom_message"], "Deleted security policy with the name: \"DAST\"");
    assert_eq!(delete["details"]["security_policy_project_commit_sha"], head.trim());
    assert_eq!(delete["details"]["merge_request"]["iid"], 4);
    let update = &events[2];
    assert_eq!(update["author_id"], -4, "bob is not in [authors]");
    assert_eq!(update["details"]["changes"][0]["path"], "actions[0].approvals_required");
    assert_eq!(update["details"]["changes"][0]["before"], 1);
    assert_eq!(update["details"]["changes"][0]["after"], 2);
}

#[test]
fn events_filters_and_formats() {
    let ws = Workspace::new();
    let (_, config) = backfilled(&ws);
    let run = |args: &[&str]| {
        let out = ws.run(&config, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(run(&["events", "--format", "jsonl"]).lines().count(), 4);
    assert_eq!(run(&["events", "--format", "jsonl", "--type", "create"]).lines().count(), 2);
    assert_eq!(run(&["events", "--format", "jsonl", "--policy", "DAST"]).lines().count(), 2);
    assert_eq!(run(&["events", "--format", "jsonl", "--author", "BOB@"]).lines().count(), 2);
    assert_eq!(
        run(&["events", "--format", "jsonl", "--since", "2024-02-01", "--until", "2024-02-01"]).lines().count(),
        2
    );
    assert_eq!(run(&["events", "--format", "jsonl", "--until", "2024-01-31T23:59:59Z"]).lines().count(), 1);
    let last: Value =
        serde_json::from_str(run(&["events", "--format", "jsonl", "--limit", "1"]).trim()).expect("one json line");
    assert_eq!(last["event_type"], "security_policy_delete", "--limit keeps the most recent");
    let csv = run(&["events", "--format", "csv"]);
    assert!(csv.starts_with("id,created_at,event_type,entity_path,policy_type,policy_name,author_name"));
    assert_eq!(csv.lines().count(), 5);
    let table = run(&["events"]);
    assert!(table.lines().next().is_some_and(|h| h.starts_with("TIME")));
    assert!(table.contains("delete") && table.contains("scan_execution_policy \"DAST\"") && table.contains("!4"));
    let bad = ws.run(&config, &["events", "--type", "renamed"]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = ws.run(&config, &["events", "--since", "last tuesday"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn second_reconcile_and_repeated_backfill_store_nothing_new() {
    let ws = Workspace::new();
    let (_, config) = backfilled(&ws);
    let out = ws.run(&config, &["reconcile"]);
    assert!(stdout(&out).contains("acme/spp: up to date"), "{}", stdout(&out));
    let out = ws.run(&config, &["reconcile", "--backfill"]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("0 event(s) stored") && stdout(&out).contains("4 already stored"),
        "{}",
        stdout(&out)
    );
    assert_eq!(events_json(&ws, &config).len(), 4);
}

#[test]
fn backfill_flag_adds_history_to_a_baselined_project() {
    let ws = Workspace::new();
    let (repo, _) = backfilled(&ws);
    let config = ws.write(
        "base.toml",
        &format!("state_dir = \"base-state\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\n", repo.display()),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert!(stdout(&out).contains("first sync, baseline recorded"), "{}", stdout(&out));
    assert!(events_json(&ws, &config).is_empty());
    let out = ws.run(&config, &["reconcile", "--backfill", "--json", "--timings"]);
    let summary: Value = serde_json::from_slice(&out.stdout).expect("json summary");
    let project = &summary["projects"][0];
    assert_eq!(project["stored"], 4);
    for phase in ["fetch_ms", "walk_ms", "parse_ms", "diff_ms", "store_ms"] {
        assert!(project["timings"][phase].is_number(), "timings.{phase}");
    }
    // This process's own peak: at least the binary's code, far below a gigabyte.
    let peak = summary["peak_memory_bytes"].as_u64().expect("peak_memory_bytes with --timings");
    assert!((1 << 20..1 << 30).contains(&peak), "{peak}");
    assert_eq!(events_json(&ws, &config).len(), 4);
    let out = ws.run(&config, &["reconcile", "--json"]);
    let summary: Value = serde_json::from_slice(&out.stdout).expect("json summary");
    assert!(summary.get("peak_memory_bytes").is_none(), "only with --timings: {summary}");
}

#[test]
fn timings_are_printed_per_phase() {
    let ws = Workspace::new();
    let (repo, _) = backfilled(&ws);
    let config = backfill_config(&ws, "t.toml", "t", "acme/spp", &repo);
    let out = ws.run(&config, &["reconcile", "--timings"]);
    let text = stdout(&out);
    assert!(text.contains("timings: fetch ") && text.contains(" ms, store "), "{text}");
    let peak = text.lines().find_map(|l| l.strip_prefix("peak memory: ")).expect("a peak memory line");
    let mib: f64 = peak.split(' ').next().and_then(|n| n.parse().ok()).expect("MiB");
    assert!(mib > 1.0 && mib < 1024.0, "{text}");
}

#[test]
fn status_reports_cursor_and_flag() {
    let ws = Workspace::new();
    let (repo, config) = backfilled(&ws);
    let out = ws.run(&config, &["status"]);
    let text = stdout(&out);
    let head = crate::common::git(&repo, &["rev-parse", "HEAD"]);
    assert!(text.contains("events stored: 4"), "{text}");
    assert!(text.contains(&format!("cursor:        {}", &head[..12])), "{text}");
    assert!(text.contains("feature flag:  on (globally)"), "{text}");
}

#[test]
fn demo_prints_a_trail() {
    let ws = Workspace::new();
    let out = ws.run(&ws.path("absent.toml"), &["demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "yaml_invalidated",
        "Merge branch 'license-policy'",
        "!7",
        "destination local-siem: 8 delivered",
        "8 POSTs, 8 with a valid Standard Webhooks signature",
        "delete",
        "scan_execution_policy \"Nightly DAST on main\"",
        "up to date",
    ] {
        assert!(text.contains(needle), "demo output lacks {needle:?}:\n{text}");
    }
}

#[test]
fn a_backfill_larger_than_one_store_chunk_is_stored_whole_and_in_order() {
    let ws = Workspace::new();
    let repo = ws.init_repo("big");
    let mut text = String::from("approval_policy:\n");
    for round in 0..3 {
        for k in 0..600 {
            text.push_str(&format!("- {{name: p{round}-{k:03}, enabled: false, rules: [{{type: any_merge_request, branch_type: protected, commits: any}}], approval_settings: {{block_branch_modification: true}}}}\n"));
        }
        ws.write(&format!("big/{POLICY}"), &text);
        commit(
            &repo,
            "Alice",
            "alice@example.com",
            &format!("2024-01-0{}T10:00:00Z", round + 1),
            &format!("round {round}"),
        );
    }
    let config = backfill_config(&ws, "big.toml", "big-state", "a/big", &repo);
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1800 event(s) stored"), "{}", stdout(&out));
    let events = events_json(&ws, &config);
    assert_eq!(events.len(), 1800);
    let names: Vec<&str> = events.iter().map(|e| e["details"]["policy_name"].as_str().unwrap_or_default()).collect();
    assert_eq!((names[0], names[599], names[600], names[1799]), ("p0-000", "p0-599", "p1-000", "p2-599"));
    assert!(ws.run(&config, &["verify"]).status.success());
    let out = ws.run(&config, &["reconcile"]);
    assert!(stdout(&out).contains("up to date"), "{}", stdout(&out));
}

#[test]
fn version_names_the_git_commit_it_was_built_from() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Built from this checkout: its HEAD; from a source tree without git: "unknown".
    let in_checkout = git(&["rev-parse", "--show-toplevel"])
        .is_some_and(|top| std::fs::canonicalize(top).ok() == std::fs::canonicalize(dir).ok());
    let commit = if in_checkout {
        git(&["rev-parse", "--short", "HEAD"]).expect("git rev-parse HEAD")
    } else {
        "unknown".into()
    };
    let out = std::process::Command::new(crate::common::BIN).arg("--version").output().expect("run --version");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("policy-audit {} (commit {commit})\n", env!("CARGO_PKG_VERSION")));
}

/// A pack larger than policy-audit keeps mapped (16 MiB; vendor/README.md): while it is indexed
/// and while the walk reads it, its pages are released from the process every 8 MiB read, also
/// under slices being read. Every commit is still read as it is.
#[test]
fn a_pack_larger_than_what_is_kept_mapped_is_read_exactly() {
    let ws = Workspace::new();
    let repo = ws.init_repo("big");
    // 18 MiB that do not compress (xorshift), then the same with a tail: a delta on a large base.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let large: Vec<u8> = (0..18 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut expected = Vec::new();
    for i in 0..40u32 {
        if i == 0 || i == 20 {
            let mut data = large.clone();
            data.extend_from_slice(format!("version {i}\n").as_bytes());
            std::fs::write(repo.join("large.bin"), data).expect("write the large file");
        }
        ws.write(&format!("big/{POLICY}"), &policy(1 + i % 4, ""));
        let sha = commit(&repo, "Alice", "alice@example.com", &format!("2024-03-01T10:00:{i:02}Z"), &format!("c{i}"));
        let name = if i == 0 { "security_policy_create" } else { "security_policy_update" };
        expected.push((name.to_string(), sha.trim().to_string()));
    }
    let config = backfill_config(&ws, "big.toml", "state", "a/big", &repo);
    let out = ws.run(&config, &["reconcile", "--no-deliver"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pack: u64 = std::fs::read_dir(ws.path("state/mirrors"))
        .expect("mirrors")
        .flatten()
        .flat_map(|mirror| std::fs::read_dir(mirror.path().join("objects/pack")).expect("packs").flatten())
        .filter(|f| f.path().extension().is_some_and(|e| e == "pack"))
        .map(|f| f.metadata().expect("pack").len())
        .sum();
    assert!(pack > 16 << 20, "the pack is {pack} bytes: too small to be released while read");
    let seen: Vec<(String, String)> = events_json(&ws, &config)
        .iter()
        .map(|e| {
            let name = e["details"]["event_name"].as_str().unwrap_or_default().to_string();
            (name, e["details"]["security_policy_project_commit_sha"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    assert_eq!(seen, expected);
    let out = ws.run(&config, &["verify"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

/// A long first sync parses the coming files on other threads while it walks. Whatever order
/// the answers come in, it must report what syncing one commit at a time reports: files that
/// come back (reverts, near and far), invalid files, a file over the size limit, and commits
/// that leave the file alone, over more changes than are parsed ahead at once.
#[test]
fn a_backfill_reports_what_syncing_each_commit_reports() {
    let ws = Workspace::new();
    let repo = ws.init_repo("long");
    // Two stores of the same project: one synced commit by commit, one in one backfill.
    let config = |state: &str| {
        ws.write(
            &format!("{state}.toml"),
            &format!(
                "state_dir = \"{state}\"\nmax_policy_file_bytes = 2000\n[[projects]]\npath = \"a/long\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
                repo.display()
            ),
        )
    };
    let step_by_step = config("each");
    let oversized = format!("{}# {}\n", policy(1, ""), "x".repeat(2100));
    for i in 0..150u32 {
        let text = match i % 11 {
            // An invalid file (a step the walk cannot parse), now and then.
            3 => "approval_policy: [unclosed\n".to_string(),
            7 if i % 2 == 0 => oversized.clone(),
            // A version seen before: near (2 steps back) or far (over 60 steps back).
            5 => policy(1 + (i / 2) % 3, ""),
            9 => policy(1 + (i % 64) / 32, ""),
            _ => policy(
                1 + i % 5,
                &format!(
                    "- name: P{}\n  enabled: true\n  rules: [{{type: any_merge_request, branch_type: protected, commits: any}}]\n  actions: [{{type: require_approval, approvals_required: 1, role_approvers: [developer]}}]\n",
                    i % 13
                ),
            ),
        };
        ws.write(&format!("long/{POLICY}"), &text);
        if i % 17 == 0 {
            ws.write("long/README.md", &format!("readme {i}\n"));
        }
        commit(
            &repo,
            "Alice",
            "alice@example.com",
            &format!("2024-02-01T10:{:02}:{:02}Z", i / 60, i % 60),
            &format!("c{i}"),
        );
        let out = ws.run(&step_by_step, &["reconcile", "--no-deliver"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let at_once = config("once");
    let out = ws.run(&at_once, &["reconcile", "--no-deliver"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = |config: &Path| -> Vec<(String, String, String)> {
        events_json(&ws, config)
            .iter()
            .map(|e| {
                let d = &e["details"];
                (
                    e["id"].to_string(),
                    d["event_name"].to_string(),
                    format!("{} {}", d["policy_name"], d["security_policy_project_commit_sha"]),
                )
            })
            .collect()
    };
    let (each, once) = (seen(&step_by_step), seen(&at_once));
    let invalidated = each.iter().filter(|(_, name, _)| name.contains("invalidated")).count();
    assert!(each.len() > 150 && invalidated >= 15, "{} events, {invalidated} invalidated", each.len());
    assert_eq!(once, each);
}
