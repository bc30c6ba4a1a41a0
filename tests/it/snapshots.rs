//! What users read, pinned: the events table and CSV, `status`, and the reconcile summary, from
//! the real binary on a history with fixed dates and authors. A change to any of them shows up
//! as a reviewed snapshot diff (`cargo insta review`). Times and hashes that differ from run to
//! run (durations, `detected_at` through the chain head, last-success times) are redacted.

use crate::common::{Workspace, commit, stderr, stdout};
use std::path::PathBuf;

const POLICY: &str = ".gitlab/security-policies/policy.yml";

fn file(approvals: u32, with_dast: bool) -> String {
    let mut text = format!(
        "approval_policy:
- name: Critical vulnerabilities
  description: Two approvals for critical findings
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
"
    );
    if with_dast {
        text.push_str(
            "scan_execution_policy:
- name: Nightly DAST
  enabled: true
  rules:
  - type: schedule
    branches: [main]
    cadence: 0 0 * * *
  actions:
  - scan: secret_detection
",
        );
    }
    text
}

/// Three commits by two authors (create; update + create; delete via a merge request), and
/// the output of the reconcile that backfilled them.
fn history(ws: &Workspace) -> (PathBuf, String) {
    let repo = ws.init_repo("spp");
    ws.write(&format!("spp/{POLICY}"), &file(1, false));
    commit(&repo, "Alice Admin", "alice@example.com", "2024-01-01T10:00:00Z", "create");
    ws.write(&format!("spp/{POLICY}"), &file(2, true));
    commit(&repo, "Bob Builder", "bob@example.com", "2024-02-01T10:00:00Z", "two approvals, nightly DAST");
    ws.write(&format!("spp/{POLICY}"), &file(2, false));
    commit(
        &repo,
        "Alice Admin",
        "alice@example.com",
        "2024-03-01T10:00:00Z",
        "drop DAST\n\nSee merge request acme/spp!4",
    );
    let config = ws.write(
        "config.toml",
        &format!(
            "state_dir = \"state\"\n[authors]\n\"alice@example.com\" = 42\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\nlinked = [\"acme\"]\n",
            repo.display()
        ),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    (config, stdout(&out))
}

/// Redactions for what changes from run to run.
fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.add_filter(r" in \d+ ms", " in [duration]");
    s.add_filter(r"[0-9a-f]{64}", "[sha256]");
    s.add_filter(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", "[time]");
    s.add_filter(r"\[[0-9a-f]{8}\.\.[0-9a-f]{8}\]|\[root\.\.[0-9a-f]{8}\]", "[range]");
    s
}

#[test]
fn reconcile_summary() {
    let ws = Workspace::new();
    let (config, first) = history(&ws);
    let again = stdout(&ws.run(&config, &["reconcile"]));
    settings().bind(|| {
        insta::assert_snapshot!("reconcile_summary_backfill", first);
        insta::assert_snapshot!("reconcile_summary_up_to_date", again);
    });
}

#[test]
fn events_table_and_csv() {
    let ws = Workspace::new();
    let (config, _) = history(&ws);
    let table = stdout(&ws.run(&config, &["events"]));
    let csv = stdout(&ws.run(&config, &["events", "--format", "csv"]));
    insta::assert_snapshot!("events_table", table);
    insta::assert_snapshot!("events_csv", csv);
}

#[test]
fn status_text() {
    let ws = Workspace::new();
    let (config, _) = history(&ws);
    let status = stdout(&ws.run(&config, &["status"]));
    settings().bind(|| insta::assert_snapshot!("status", status));
}
