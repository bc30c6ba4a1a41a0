//! Discovery from GitLab (SPEC §12) against a scripted GitLab (`tests/support/fake_gitlab.py`)
//! that answers GraphQL in the shapes of GitLab's schema, paginated by 100 like GitLab, with the
//! SPP's repository served over smart HTTP with the same token; driven through the real daemon.

use crate::common::{KillOnDrop, Workspace, commit, spawn_daemon, stderr, stdout, wait_for};
use crate::fake_gitlab::FakeGitLab;
use crate::git_http::GitHttpServer;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const POLICY: &str = ".gitlab/security-policies/policy.yml";
const TOKEN: &str = "glpat-discovery-secret-8812";

/// `acme` with 120 subgroups and 150 projects (more than one page of each), the SPP
/// `acme/security/policies` served by `git`; `links` are (namespace, SPP) pairs.
fn world(git: &GitHttpServer, links: &[&str], mode: Value) -> Value {
    let spp = |ns: &str| if links.contains(&ns) { json!("acme/security/policies") } else { Value::Null };
    let mut groups = vec![json!({"path": "acme", "id": 1, "spp": spp("acme")})];
    groups.push(json!({"path": "acme/security", "id": 2, "spp": spp("acme/security")}));
    for g in 0..120 {
        let path = format!("acme/g{g:03}");
        groups.push(json!({"path": path, "id": 100 + g, "spp": spp(&path)}));
    }
    let mut projects = vec![json!({"path": "acme/security/policies", "id": 500, "name": "Policies",
        "http_url_to_repo": git.url("policies.git"), "default_branch": "main", "spp": null})];
    for p in 0..150 {
        let path = format!("acme/g{:03}/app{p}", p % 120);
        projects.push(json!({"path": path, "id": 1000 + p, "spp": spp(&path)}));
    }
    json!({"token": TOKEN, "mode": mode, "groups": groups, "projects": projects})
}

fn policy(approvals: u32) -> String {
    format!(
        "approval_policy:\n- name: Critical\n  enabled: true\n  rules:\n  - {{type: scan_finding, branches: [main], scanners: [sast], vulnerabilities_allowed: 0, severity_levels: [critical], vulnerability_states: [new_needs_triage]}}\n  actions:\n  - {{type: require_approval, approvals_required: {approvals}, role_approvers: [maintainer]}}\n"
    )
}

/// The SPP's repository, bare, under `served/` (what the git server serves), and a work clone.
fn spp_repo(ws: &Workspace) -> PathBuf {
    let work = ws.init_repo("work");
    ws.write(&format!("work/{POLICY}"), &policy(1));
    commit(&work, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "create");
    std::fs::create_dir_all(ws.path("served")).expect("mkdir");
    let bare = ws.path("served/policies.git");
    crate::common::git(&ws.path("served"), &["clone", "-q", "--bare", work.to_str().expect("utf-8"), "policies.git"]);
    crate::common::git(&work, &["remote", "add", "origin", bare.to_str().expect("utf-8")]);
    work
}

fn push_change(work: &Path, approvals: u32, date: &str) {
    std::fs::write(work.join(POLICY), policy(approvals)).expect("write");
    commit(work, "Bob", "bob@example.com", date, &format!("require {approvals} approvals"));
    crate::common::git(work, &["push", "-q", "origin", "main"]);
}

fn config(ws: &Workspace, gitlab: &FakeGitLab, projects: &str) -> PathBuf {
    ws.write("gitlab-token", TOKEN);
    ws.write(
        "config.toml",
        &format!(
            "state_dir = \"state\"\nschedule = \"0 0 0 1 1 *\"\n[gitlab]\nurl = \"{}\"\ntoken_file = \"gitlab-token\"\ndiscover = [\"acme\"]\ndiscover_interval = \"1s\"\n{projects}",
            gitlab.url
        ),
    )
}

fn events(ws: &Workspace, config: &Path) -> Vec<Value> {
    let out = ws.run(config, &["events", "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("events json")
}

fn of_type<'a>(events: &'a [Value], t: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event_type"] == t).collect()
}

fn reconcile(ws: &Workspace, config: &Path) -> String {
    let out = ws.run(config, &["reconcile"]);
    assert!(out.status.success(), "reconcile: {}\n{}", stdout(&out), stderr(&out));
    format!("{}{}", stdout(&out), stderr(&out))
}

fn status(ws: &Workspace, config: &Path) -> Value {
    let out = ws.run(config, &["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("status json")
}

fn start_daemon(ws: &Workspace, config: &Path) -> KillOnDrop {
    let log = std::fs::File::create(ws.path("daemon.log")).expect("log");
    let daemon = KillOnDrop(spawn_daemon(config, Stdio::from(log), &[]));
    let socket = ws.path("state/control.sock");
    wait_for("the control socket", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    daemon
}

fn stop_daemon(mut daemon: KillOnDrop) {
    let pid = daemon.0.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < until {
        if let Ok(Some(_)) = daemon.0.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the daemon did not stop within 30 s");
}

/// Waits out `discover_interval` (1 s) so the next reconcile discovers again.
fn next_interval() {
    std::thread::sleep(Duration::from_millis(1100));
}

#[test]
fn an_spp_only_gitlab_knows_is_audited_its_link_changes_are_events_and_a_down_gitlab_loses_nothing() {
    let ws = Workspace::new();
    let work = spp_repo(&ws);
    let git = GitHttpServer::start(&ws.path("served"), Some(TOKEN));
    let gitlab = FakeGitLab::start(&ws, &world(&git, &["acme", "acme/g001"], json!("up")));
    let config = config(&ws, &gitlab, "");
    let daemon = start_daemon(&ws, &config);

    // First discovery and first sync (the daemon's start-up run, or this one): baselines.
    reconcile(&ws, &config);
    assert!(events(&ws, &config).is_empty());
    let st = status(&ws, &config);
    let projects = st["projects"].as_array().expect("projects");
    assert_eq!(projects.len(), 1, "{st}");
    assert_eq!(projects[0]["path"], "acme/security/policies");
    assert_eq!(projects[0]["source"], "discovery");
    assert_eq!(st["discovery"]["spps"], 1);
    assert_eq!(st["discovery"]["links"], 2);
    // 122 groups and 151 projects: two pages of each per discovery, every call with the token.
    let calls = gitlab.calls();
    let trees = calls.iter().filter(|(k, _)| k == "group_tree").count();
    assert!(trees >= 2 && trees % 2 == 0, "{calls:?}");
    assert_eq!(calls.iter().filter(|(k, _)| k == "group_projects").count(), trees, "{calls:?}");
    assert!(calls.iter().all(|(_, ok)| *ok), "{calls:?}");
    assert_eq!(st["discovery"]["calls"], 4);
    assert_eq!(st["discovery"]["namespaces"], 122 + 151);

    // A policy change in the discovered SPP is audited, naming its direct links.
    push_change(&work, 2, "2024-02-01T10:00:00Z");
    next_interval();
    reconcile(&ws, &config);
    let all = events(&ws, &config);
    let updates = of_type(&all, "security_policy_update");
    assert_eq!(updates.len(), 1, "{all:#?}");
    assert_eq!(updates[0]["entity_path"], "acme/security/policies");
    assert_eq!(updates[0]["entity_id"], 500);
    assert_eq!(updates[0]["details"]["linked_namespaces"], json!(["acme", "acme/g001"]));
    assert!(of_type(&all, "policy_project_updated").is_empty(), "the same links: no link event");

    // A project linked and a group unlinked mid-run: one event each, in GitLab's words.
    gitlab.set(&world(&git, &["acme", "acme/g002/app2"], json!("up")));
    next_interval();
    reconcile(&ws, &config);
    let all = events(&ws, &config);
    let links = of_type(&all, "policy_project_updated");
    assert_eq!(links.len(), 2, "{links:#?}");
    let linked = links.iter().find(|e| e["target_details"] == "acme/g002/app2").expect("the new link");
    assert_eq!(linked["details"]["custom_message"], "Linked Policies as the security policy project");
    assert_eq!(linked["target_type"], "Project");
    assert_eq!(linked["entity_path"], "acme/security/policies");
    assert_eq!(linked["details"]["security_policy_project_link"]["action"], "linked");
    assert_eq!(linked["details"]["security_policy_project_link"]["namespace_id"], 1002);
    let unlinked = links.iter().find(|e| e["target_details"] == "acme/g001").expect("the unlink");
    assert_eq!(unlinked["details"]["custom_message"], "Unlinked Policies as the security policy project");
    assert_eq!(unlinked["target_type"], "Group");
    assert_eq!(unlinked["details"]["linked_namespaces"], json!(["acme", "acme/g002/app2"]));
    // ... and the next policy event names the new links.
    push_change(&work, 3, "2024-02-02T10:00:00Z");
    next_interval();
    reconcile(&ws, &config);
    let all = events(&ws, &config);
    assert_eq!(of_type(&all, "policy_project_updated").len(), 2, "discovered again, nothing changed: no event");
    let last = *of_type(&all, "security_policy_update").last().expect("update");
    assert_eq!(last["details"]["linked_namespaces"], json!(["acme", "acme/g002/app2"]));

    // GitLab down: the SPP is still polled, nothing is unlinked, and status says why.
    gitlab.set(&world(&git, &[], json!({"status": 503})));
    push_change(&work, 4, "2024-02-03T10:00:00Z");
    next_interval();
    reconcile(&ws, &config);
    let all = events(&ws, &config);
    assert_eq!(of_type(&all, "policy_project_updated").len(), 2, "an error is never an unlink");
    let last = *of_type(&all, "security_policy_update").last().expect("update");
    assert_eq!(
        last["details"]["security_policy_project_commit_sha"],
        crate::common::git(&work, &["rev-parse", "HEAD"]).trim()
    );
    assert_eq!(last["details"]["linked_namespaces"], json!(["acme", "acme/g002/app2"]));
    let st = status(&ws, &config);
    let error = st["discovery"]["last_error"].as_str().expect("the failure is in status");
    assert!(error.contains("503"), "{error}");
    assert_eq!(st["projects"][0]["source"], "discovery");

    // The list survives a restart while GitLab is still down.
    stop_daemon(daemon);
    let daemon = start_daemon(&ws, &config);
    let st = status(&ws, &config);
    assert_eq!(st["projects"].as_array().map(Vec::len), Some(1), "{st}");
    let text = ws.run(&config, &["status"]);
    let text = stdout(&text);
    assert!(text.contains("project acme/security/policies (main, from discovery)"), "{text}");
    assert!(text.contains("the last discovered list stays in use"), "{text}");
    let metrics_free = ws.path("daemon.log");
    stop_daemon(daemon);

    // The token appears in no output, log or stored event.
    let log = std::fs::read_to_string(metrics_free).expect("log");
    assert!(!log.contains(TOKEN), "the daemon's log has the token");
    let listing = ws.run(&config, &["events", "--format", "jsonl"]);
    assert!(!stdout(&listing).contains(TOKEN));
    let discover = ws.run(&config, &["discover", "--json"]);
    assert!(!stdout(&discover).contains(TOKEN) && !stderr(&discover).contains(TOKEN));
}

#[test]
fn a_configured_spp_that_gitlab_also_reports_is_one_entry_polled_once() {
    let ws = Workspace::new();
    let work = spp_repo(&ws);
    let git = GitHttpServer::start(&ws.path("served"), Some(TOKEN));
    let gitlab = FakeGitLab::start(&ws, &world(&git, &["acme/g005"], json!("up")));
    ws.write("repo-token", TOKEN);
    let entry = format!(
        "[[projects]]\npath = \"acme/security/policies\"\nurl = \"{}\"\ntoken_file = \"repo-token\"\nlinked = [\"platform\"]\n",
        git.url("policies.git")
    );
    let config = config(&ws, &gitlab, &entry);

    // `discover` shows what GitLab reports and how it will be polled, changing nothing.
    let out = ws.run(&config, &["discover"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("acme/security/policies (id 500, default branch main)"), "{text}");
    assert!(text.contains("linked to Group acme/g005"), "{text}");
    assert!(text.contains("polled as the [[projects]] entry"), "{text}");
    assert!(!ws.path("state").exists(), "discover opens no store");

    reconcile(&ws, &config);
    let st = status(&ws, &config);
    assert_eq!(st["projects"].as_array().map(Vec::len), Some(1), "one entry: {st}");
    assert_eq!(st["projects"][0]["source"], "config+discovery");
    push_change(&work, 2, "2024-02-01T10:00:00Z");
    next_interval();
    let out = reconcile(&ws, &config);
    assert_eq!(out.matches("acme/security/policies:").count(), 1, "one poll: {out}");
    let all = events(&ws, &config);
    let updates = of_type(&all, "security_policy_update");
    assert_eq!(updates.len(), 1, "one event, not one per source: {all:#?}");
    assert_eq!(updates[0]["details"]["linked_namespaces"], json!(["platform", "acme/g005"]));
    assert_eq!(updates[0]["entity_id"], 500, "the id GitLab reports fills the entry's");
}

#[test]
fn a_bad_discover_list_is_refused_by_check_config_and_a_good_one_is_described() {
    let ws = Workspace::new();
    let bad = ws.write(
        "bad.toml",
        "[gitlab]\nurl = \"https://gitlab.example.com\"\ntoken_env = \"T\"\ndiscover = [\"*\", \"acme\", \"a b\"]\n",
    );
    let out = ws.run_with_env(&bad, &["check-config"], &[("T", "x")]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("bad.toml:4:") && err.contains("\"a b\" must be a group's full path"), "{err}");
    assert!(err.contains("\"*\" (the whole instance) already covers every group"), "{err}");
    let good = ws.write(
        "good.toml",
        "[gitlab]\nurl = \"https://gitlab.example.com\"\ntoken_env = \"T\"\ndiscover = [\"acme\", \"platform/security\"]\ndiscover_interval = \"30m\"\n",
    );
    let out = ws.run_with_env(&good, &["check-config"], &[("T", "x")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("discovery: the SPPs linked under acme, platform/security are read from https://gitlab.example.com at most every 30m"), "{}", stdout(&out));
}
