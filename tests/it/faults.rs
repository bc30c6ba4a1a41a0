//! The fault suite: receivers and repositories that misbehave, a damaged mirror, a full or
//! read-only state directory. Each must give a clear error naming the object, let the other
//! projects and destinations go on, and lose nothing.

use crate::common::{BIN, Workspace, commit, events_json, git, stderr, stdout};
use crate::receiver::{Receiver, Reply};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const POLICY: &str = ".gitlab/security-policies/policy.yml";

fn spp(ws: &Workspace, dir: &str, names: &[&str]) -> PathBuf {
    let repo = ws.init_repo(dir);
    set_policies(&repo, names, "2024-01-01T10:00:00Z", "initial");
    repo
}

fn set_policies(repo: &Path, names: &[&str], date: &str, message: &str) {
    let mut text = String::from("approval_policy:\n");
    for n in names {
        text.push_str(&format!("- {{name: {n}, enabled: false, rules: [{{type: any_merge_request, branch_type: protected, commits: any}}], approval_settings: {{block_branch_modification: true}}}}\n"));
    }
    std::fs::create_dir_all(repo.join(".gitlab/security-policies")).expect("mkdir");
    std::fs::write(repo.join(POLICY), text).expect("write");
    commit(repo, "Alice", "alice@example.com", date, message);
}

fn project(path: &str, url: &str) -> String {
    format!("[[projects]]\npath = \"{path}\"\nurl = \"{url}\"\ninitial_sync = \"backfill\"\n")
}

fn write_config(ws: &Workspace, body: &str) -> PathBuf {
    ws.write("config.toml", &format!("state_dir = \"state\"\nfetch_timeout = \"2s\"\n{body}"))
}

fn names(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["event_type"].as_str().unwrap_or_default(),
                e["details"]["policy_name"].as_str().unwrap_or("-")
            )
        })
        .collect()
}

#[test]
fn a_huge_response_body_is_not_read_whole_and_counts_as_delivered() {
    let ws = Workspace::new();
    let repo = spp(&ws, "spp", &["a"]);
    let receiver = Receiver::start(vec![Reply::HugeBody(50 * 1024 * 1024)]);
    let config = write_config(
        &ws,
        &format!(
            "{}[[destinations]]\nname = \"siem\"\nurl = \"{}\"\n",
            project("acme/spp", &repo.to_string_lossy()),
            receiver.url()
        ),
    );
    let started = Instant::now();
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("destination siem: 1 delivered"), "{}", stdout(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn an_unreachable_repository_fails_alone() {
    let ws = Workspace::new();
    let good = spp(&ws, "good", &["a"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let config = write_config(
        &ws,
        &[
            project("acme/down", &format!("http://127.0.0.1:{port}/x.git")),
            project("acme/good", &good.to_string_lossy()),
        ]
        .concat(),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("error: project acme/down: fetch of branch \"main\" from http://127.0.0.1:"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("acme/good: 1 commit(s)"), "{}", stdout(&out));
}

#[test]
fn a_stalled_server_hits_the_fetch_deadline() {
    let ws = Workspace::new();
    let good = spp(&ws, "good", &["a"]);
    // Every request stalls, as on a server that hangs (the first is the one-request probe).
    let staller = Receiver::start(vec![Reply::Stall(Duration::from_secs(30)); 4]);
    let url = format!("http://127.0.0.1:{}/stall.git", staller.port);
    let config =
        write_config(&ws, &[project("acme/stalled", &url), project("acme/good", &good.to_string_lossy())].concat());
    let started = Instant::now();
    let out = ws.run(&config, &["reconcile"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("project acme/stalled") && stderr(&out).contains("did not finish within 2s"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("acme/good: 1 commit(s)"), "{}", stdout(&out));
    assert!(took < Duration::from_secs(15), "the 2 s deadline must bound the stall (took {took:?})");
}

#[test]
fn a_deleted_branch_is_an_error_naming_it_and_loses_nothing() {
    let ws = Workspace::new();
    let repo = spp(&ws, "spp", &["a"]);
    let config = write_config(&ws, &project("acme/spp", &repo.to_string_lossy()));
    assert!(ws.run(&config, &["reconcile"]).status.success());
    git(&repo, &["checkout", "-q", "-b", "other"]);
    git(&repo, &["branch", "-q", "-D", "main"]);
    let out = ws.run(&config, &["reconcile"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("branch \"main\" does not exist"), "{}", stderr(&out));
    assert_eq!(events_json(&ws, &config).len(), 1, "stored events are kept");
    // The branch comes back with a new policy: reconciled from where it stopped.
    git(&repo, &["checkout", "-q", "-b", "main"]);
    set_policies(&repo, &["a", "b"], "2024-01-02T10:00:00Z", "add b");
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(names(&events_json(&ws, &config)), ["security_policy_create a", "security_policy_create b"]);
}

#[test]
fn a_remote_replaced_by_an_unrelated_history_is_a_rewrite() {
    let ws = Workspace::new();
    let repo = spp(&ws, "spp", &["a", "b"]);
    let config = write_config(&ws, &project("acme/spp", &repo.to_string_lossy()));
    assert!(ws.run(&config, &["reconcile"]).status.success());
    std::fs::remove_dir_all(&repo).expect("rm");
    let repo = spp(&ws, "spp", &["b", "c"]);
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("[history rewritten]"), "{}", stdout(&out));
    let events = events_json(&ws, &config);
    assert_eq!(names(&events[2..]), ["security_policy_create c", "security_policy_delete a"]);
    assert!(events[2..].iter().all(|e| e["details"]["history_rewritten"] == true));
    drop(repo);
}

#[test]
fn a_mirror_with_missing_objects_is_cloned_again() {
    let ws = Workspace::new();
    let repo = spp(&ws, "spp", &["a"]);
    let config = write_config(&ws, &project("acme/spp", &repo.to_string_lossy()));
    assert!(ws.run(&config, &["reconcile"]).status.success());
    let mirrors: Vec<PathBuf> =
        std::fs::read_dir(ws.path("state/mirrors")).expect("mirrors").flatten().map(|e| e.path()).collect();
    for entry in walk(&mirrors[0].join("objects")) {
        std::fs::remove_file(entry).expect("rm object");
    }
    set_policies(&repo, &["a", "b"], "2024-01-02T10:00:00Z", "add b");
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(names(&events_json(&ws, &config)), ["security_policy_create a", "security_policy_create b"]);
}

#[test]
fn stale_lock_files_from_a_killed_fetch_are_cleared() {
    let ws = Workspace::new();
    let repo = spp(&ws, "spp", &["a"]);
    let config = write_config(&ws, &project("acme/spp", &repo.to_string_lossy()));
    assert!(ws.run(&config, &["reconcile"]).status.success());
    let mirror = std::fs::read_dir(ws.path("state/mirrors")).expect("mirrors").flatten().next().expect("mirror").path();
    std::fs::write(mirror.join("refs/remotes/origin/main.lock"), "").expect("lock");
    std::fs::write(mirror.join("packed-refs.lock"), "").expect("lock");
    set_policies(&repo, &["a", "b"], "2024-01-02T10:00:00Z", "add b");
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(events_json(&ws, &config).len(), 2);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// Runs a shell script in a private user + mount namespace (so it may mount a small tmpfs),
/// or returns None where this machine does not allow that.
fn in_mount_namespace(ws: &Workspace, script: &str) -> Option<std::process::Output> {
    let probe = Command::new("unshare").args(["-rm", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: unshare -rm is not available here");
        return None;
    }
    Some(
        Command::new("unshare")
            .args(["-rm", "bash", "-euo", "pipefail", "-c", script])
            .current_dir(ws.dir.path())
            .env("BIN", BIN)
            .env("HOME", ws.dir.path())
            .env_remove("RUST_LOG")
            .output()
            .expect("unshare"),
    )
}

#[test]
fn a_full_disk_gives_a_clear_error_and_nothing_half_written() {
    let ws = Workspace::new();
    let repo = spp(&ws, "spp", &["a"]);
    // 400 policies: ~500 KiB of events, more than the 256 KiB disk below.
    let names: Vec<String> = (0..400).map(|k| format!("policy number {k}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    set_policies(&repo, &refs, "2024-02-01T10:00:00Z", "many policies");
    write_config(&ws, &project("acme/spp", &repo.to_string_lossy()));
    // The state directory (database and mirror) sits on a 256 KiB tmpfs, then gets room.
    let script = r#"
        mkdir -p state
        mount -t tmpfs -o size=256k tmpfs state
        set +e
        "$BIN" --config config.toml reconcile > full.out 2> full.err
        echo $? > full.code
        set -e
        mount -o remount,size=64m state
        "$BIN" --config config.toml reconcile > ok.out 2> ok.err
        "$BIN" --config config.toml events --format jsonl > events.jsonl
        "$BIN" --config config.toml verify > verify.out
    "#;
    let Some(out) = in_mount_namespace(&ws, script) else { return };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(ws.path(f)).unwrap_or_default();
    assert_ne!(read("full.code").trim(), "0", "a full disk must fail the run");
    let err = read("full.err");
    eprintln!("observed with a full disk: {}", err.trim());
    assert!(err.contains("No space left on device") || err.to_lowercase().contains("space"), "unclear error: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // After space is back, everything is there exactly once and the chain verifies.
    let events: Vec<serde_json::Value> =
        read("events.jsonl").lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let creates = events.iter().filter(|e| e["event_type"] == "security_policy_create").count();
    let ids: std::collections::HashSet<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids.len(), events.len(), "no duplicates");
    assert_eq!(creates, 401, "one create per policy, none lost");
    assert!(read("verify.out").contains("trail verified"), "{}", read("verify.out"));
}

#[test]
fn a_read_only_state_directory_gives_a_clear_error_and_loses_nothing() {
    let ws = Workspace::new();
    let repo = spp(&ws, "spp", &["a"]);
    write_config(&ws, &project("acme/spp", &repo.to_string_lossy()));
    let script = r#"
        mkdir -p state
        mount -t tmpfs -o size=64m tmpfs state
        "$BIN" --config config.toml reconcile > first.out
        mount -o remount,ro state
        git -C spp -c user.name=B -c user.email=b@example.com -c commit.gpgsign=false commit -q --allow-empty -m empty
        printf 'approval_policy:\n- {name: a, enabled: false, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n- {name: b, enabled: false, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n' > spp/.gitlab/security-policies/policy.yml
        GIT_CONFIG_GLOBAL=/dev/null git -C spp -c user.name=B -c user.email=b@example.com -c commit.gpgsign=false commit -q -am "add b"
        set +e
        "$BIN" --config config.toml reconcile > ro.out 2> ro.err
        echo $? > ro.code
        set -e
        mount -o remount,rw state
        "$BIN" --config config.toml reconcile > ok.out 2> ok.err
        "$BIN" --config config.toml events --format jsonl > events.jsonl
    "#;
    let Some(out) = in_mount_namespace(&ws, script) else { return };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(ws.path(f)).unwrap_or_default();
    assert_ne!(read("ro.code").trim(), "0");
    let err = read("ro.err");
    eprintln!("observed with a read-only state directory: {}", err.trim());
    assert!(err.to_lowercase().contains("read-only"), "unclear error: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(read("events.jsonl").lines().count(), 2, "the change made while read-only is stored afterwards");
}
