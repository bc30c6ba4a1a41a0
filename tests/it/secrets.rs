//! Secure defaults: no secret in any output (at trace level, in status, in errors), the state
//! directory private, the control socket owner-only.

use crate::common::{Workspace, commit, git, stderr, stdout};
use crate::git_http::GitHttpServer;
use crate::receiver::Receiver;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const POLICY: &str = ".gitlab/security-policies/policy.yml";
const GIT_TOKEN: &str = "glpat-SECRET-git-token-4242";
const STREAM_TOKEN: &str = "SECRET-stream-token-5151";
const SIGNING: &str = "whsec_U0VDUkVULXNpZ25pbmcta2V5LTYxNjE=";

#[test]
fn no_secret_reaches_logs_status_or_errors() {
    let ws = Workspace::new();
    let repo = ws.init_repo("src/spp");
    ws.write(&format!("src/spp/{POLICY}"), "approval_policy:\n- {name: One, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "create");
    git(
        ws.dir.path(),
        &["clone", "-q", "--bare", &repo.to_string_lossy(), &ws.path("served/spp.git").to_string_lossy()],
    );
    let server = GitHttpServer::start(&ws.path("served"), Some(GIT_TOKEN));
    let receiver = Receiver::start(vec![]);
    std::fs::write(ws.path("git-token"), GIT_TOKEN).expect("write");
    std::fs::write(ws.path("signing"), SIGNING).expect("write");
    let config = ws.write(
        "config.toml",
        &format!(
            "state_dir = \"state\"\nlog_level = \"trace\"\n[[projects]]\npath = \"a/spp\"\nurl = \"{}\"\ntoken_file = \"git-token\"\ninitial_sync = \"backfill\"\n\
             [[destinations]]\nname = \"siem\"\nurl = \"{}\"\nverification_token_env = \"PA_TEST_STREAM_TOKEN\"\nsigning_secret_file = \"signing\"\n",
            server.url("spp.git"),
            receiver.url()
        ),
    );
    let run = |args: &[&str]| {
        let out = Command::new(crate::common::BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("PA_TEST_STREAM_TOKEN", STREAM_TOKEN)
            .env("RUST_LOG", "trace")
            .env("HOME", ws.dir.path())
            .output()
            .expect("run");
        (out.status.code(), stdout(&out) + &stderr(&out))
    };
    let mut outputs = vec![run(&["check-config"]), run(&["reconcile"])];
    assert_eq!(outputs[1].0, Some(0), "{}", outputs[1].1);
    assert!(receiver.requests()[0].header("x-gitlab-event-streaming-token") == Some(STREAM_TOKEN), "the token is sent");
    outputs.push(run(&["status"]));
    outputs.push(run(&["status", "--json"]));
    outputs.push(run(&["deliveries"]));
    outputs.push(run(&["events", "--format", "json"]));
    // A failing fetch (wrong token on the server side) must not echo the token either.
    std::fs::write(ws.path("git-token"), "glpat-SECRET-wrong-token-9999").expect("write");
    outputs.push(run(&["reconcile"]));
    assert_eq!(outputs.last().map(|o| o.0), Some(Some(1)));
    let all: String = outputs.iter().map(|o| o.1.clone()).collect();
    assert!(all.contains(" TRACE "), "trace logging should be on");
    // A raw byte dump would split a secret across lines, where a substring search cannot see it.
    let dump = all.lines().find(|l| {
        let rest = l.split(" TRACE ").nth(1).or_else(|| l.split(" DEBUG ").nth(1)).unwrap_or("");
        rest.split(' ').take(4).filter(|w| w.len() == 4 && w.chars().all(|c| c.is_ascii_hexdigit())).count() == 4
    });
    assert!(dump.is_none(), "raw byte dumps must not be logged: {dump:?}");
    assert!(!all.contains("Request {") && !all.contains("headers:"), "request headers must not be logged");
    for secret in [GIT_TOKEN, STREAM_TOKEN, SIGNING, &SIGNING[6..], "glpat-SECRET-wrong-token-9999"] {
        assert!(!all.contains(secret), "secret {secret:?} leaked into output");
    }
    drop(server);
}

#[test]
fn state_directory_is_private_and_the_socket_owner_only() {
    let ws = Workspace::new();
    let repo = ws.init_repo("spp");
    ws.write(&format!("spp/{POLICY}"), "approval_policy:\n- {name: One, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "create");
    let config = ws.write(
        "config.toml",
        &format!(
            "schedule = \"0 0 0 1 1 *\"\nstate_dir = \"state\"\n[[projects]]\npath = \"a/spp\"\nurl = \"{}\"\n",
            repo.display()
        ),
    );
    let mut child = Command::new(crate::common::BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("daemon");
    let socket = ws.path("state/control.sock");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !socket.exists() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    let (state_mode, socket_mode) = (mode(&ws.path("state")), mode(&socket));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(state_mode, 0o700, "state directory mode");
    assert_eq!(socket_mode, 0o600, "control socket mode");
}
