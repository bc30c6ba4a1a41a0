//! Output errors are errors, checks that could not check say so, and listings stream.

use crate::common::{Workspace, commit, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const POLICY: &str = ".gitlab/security-policies/policy.yml";

/// A trail of `n` events (one commit creating `n` policies), with its config.
fn trail_of(ws: &Workspace, n: usize) -> PathBuf {
    let repo = ws.init_repo("spp");
    let mut text = String::from("approval_policy:\n");
    for i in 0..n {
        text.push_str(&format!("- {{name: policy-number-{i:05}, enabled: false, rules: [{{type: any_merge_request, branch_type: protected, commits: any}}], approval_settings: {{block_branch_modification: true}}}}\n"));
    }
    ws.write(&format!("spp/{POLICY}"), &text);
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "policies");
    let config = ws.write(
        "config.toml",
        &format!(
            "state_dir = \"state\"\n[[projects]]\npath = \"a/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\nlimits = {{ approval_policy = 1000 }}\n",
            repo.display()
        ),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    config
}

fn run_to(config: &Path, args: &[&str], out: Stdio) -> std::process::Output {
    Command::new(crate::common::BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("POLICY_AUDIT_CONFIG")
        .stdout(out)
        .stderr(Stdio::piped())
        .output()
        .expect("run policy-audit")
}

fn dev_full() -> Stdio {
    Stdio::from(std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full"))
}

#[test]
fn every_format_to_a_full_disk_fails_with_a_message() {
    let ws = Workspace::new();
    let config = trail_of(&ws, 3);
    for format in ["jsonl", "json", "csv", "table"] {
        let out = run_to(&config, &["events", "--format", format], dev_full());
        assert_eq!(out.status.code(), Some(1), "events --format {format} > /dev/full: {}", stderr(&out));
        assert!(stderr(&out).contains("cannot write the output: No space left on device"), "{}", stderr(&out));
    }
    let out = run_to(&config, &["status"], dev_full());
    assert_eq!(out.status.code(), Some(1), "status > /dev/full: {}", stderr(&out));
}

#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    let ws = Workspace::new();
    // ~300 KB of JSON lines: more than a pipe holds, so the writer meets the closed pipe.
    let config = trail_of(&ws, 300);
    let mut child = Command::new(crate::common::BIN)
        .arg("--config")
        .arg(&config)
        .args(["events", "--format", "jsonl"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut first = String::new();
    {
        use std::io::BufRead;
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout).read_line(&mut first).expect("read a line");
    } // the reader is dropped here, as `head -1` exits
    let out = child.wait_with_output().expect("wait");
    assert!(first.contains("policy-number-"), "{first}");
    assert_eq!(out.status.code(), Some(0), "a closed pipe is success: {}", stderr(&out));
    assert_eq!(stderr(&out), "");
}

#[test]
fn json_and_jsonl_list_the_same_events_in_the_same_order() {
    let ws = Workspace::new();
    let config = trail_of(&ws, 25);
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&stdout(&ws.run(&config, &["events", "--format", "json"]))).expect("json array");
    let lines: Vec<serde_json::Value> = stdout(&ws.run(&config, &["events", "--format", "jsonl"]))
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(json.len(), 25);
    assert_eq!(json, lines);
    let csv = stdout(&ws.run(&config, &["events", "--format", "csv"]));
    assert_eq!(csv.lines().count(), 26, "header and one row per event");
    let empty = ws.run(&config, &["events", "--format", "json", "--type", "delete"]);
    assert_eq!(stdout(&empty).trim(), "[]");
}

/// A stand-in for a daemon on the control socket that answers `reply` to any request.
fn fake_daemon(socket: PathBuf, reply: &'static str) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind control socket");
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        if let Ok((stream, _)) = listener.accept() {
            let mut line = String::new();
            let _ = std::io::BufReader::new(&stream).read_line(&mut line);
            let _ = (&stream).write_all(reply.as_bytes());
        }
    })
}

#[test]
fn check_config_says_when_the_daemons_answer_does_not_parse() {
    let ws = Workspace::new();
    let config = trail_of(&ws, 1);
    let daemon = fake_daemon(ws.path("state/control.sock"), "this is not the protocol\n");
    let out = ws.run(&config, &["check-config"]);
    daemon.join().expect("fake daemon");
    assert!(
        stderr(&out).contains("orphaned deliveries: could not check: the daemon at"),
        "check-config must say it could not check: {}",
        stderr(&out)
    );
}

#[test]
fn check_config_says_when_the_store_cannot_be_read() {
    let ws = Workspace::new();
    let config = trail_of(&ws, 1);
    crate::trail::tamper(&ws, |db| {
        db.open_tree("meta").expect("meta").insert("next_seq", &[1u8]).expect("insert");
    });
    let out = ws.run(&config, &["check-config"]);
    assert_eq!(out.status.code(), Some(0), "the config itself is fine: {}", stderr(&out));
    assert!(
        stderr(&out).contains("orphaned deliveries: could not check: state database is damaged"),
        "{}",
        stderr(&out)
    );
}
