//! The crash suite: the real daemon on a long policy history with a live receiver, killed with
//! SIGKILL at seeded random moments (start-up, fetch, walk, the store transaction, delivery) and
//! restarted. At the end the store must hold exactly the events of an uninterrupted run (same
//! ids, same order, no duplicates), the chain must verify, and the receiver must have every id.
//!
//! Bounded for CI (8 kills); `POLICY_AUDIT_CRASH_KILLS=200 POLICY_AUDIT_CRASH_SEED=7` (or
//! `scripts/soak.sh`) runs a longer soak.

use crate::common::{Workspace, git_command, stderr, stdout};
use crate::receiver::Receiver;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Builds `commits` first-parent commits; every `every`-th changes the policy file (creates,
/// updates, deletes), the others touch a README.
fn long_history(ws: &Workspace, commits: usize, every: usize) -> PathBuf {
    let repo = ws.init_repo("spp");
    let mut stream = Vec::new();
    let mut live: Vec<(usize, usize)> = Vec::new(); // (policy number, revision)
    let mut next_policy = 0;
    for i in 0..commits {
        let when = 1_700_000_000 + i as i64 * 60;
        let author = ["Alice <alice@example.com>", "Bob <bob@example.com>", "Carol <carol@example.com>"][i % 3];
        let msg = format!("commit {i}");
        writeln!(
            stream,
            "commit refs/heads/main\nmark :{}\nauthor {author} {when} +0000\ncommitter {author} {when} +0000",
            i + 1
        )
        .ok();
        writeln!(stream, "data {}\n{msg}", msg.len()).ok();
        if i > 0 {
            writeln!(stream, "from :{i}").ok();
        }
        if i.is_multiple_of(every) {
            let step = i / every;
            if step.is_multiple_of(3) || live.len() < 3 {
                live.push((next_policy, 0));
                next_policy += 1;
            }
            if step % 5 == 4 && live.len() > 3 {
                live.remove(0);
            }
            let k = step % live.len();
            live[k].1 += 1;
            let mut text = String::from("approval_policy:\n");
            for (n, rev) in &live {
                text.push_str(&format!(
                    "- name: policy {n}\n  enabled: {}\n  description: revision {rev}\n  rules:\n  - {{type: any_merge_request, branch_type: protected, commits: any}}\n  approval_settings: {{block_branch_modification: true}}\n",
                    n % 2 == 0
                ));
            }
            writeln!(stream, "M 100644 inline .gitlab/security-policies/policy.yml\ndata {}\n{text}", text.len()).ok();
        } else {
            let text = format!("readme {i}\n");
            writeln!(stream, "M 100644 inline README.md\ndata {}\n{text}", text.len()).ok();
        }
    }
    let mut child =
        git_command(&repo).args(["fast-import", "--quiet"]).stdin(Stdio::piped()).spawn().expect("fast-import");
    child.stdin.take().expect("stdin").write_all(&stream).expect("write stream");
    assert!(child.wait().expect("wait").success(), "fast-import failed");
    crate::common::git(&repo, &["reset", "-q", "--hard"]); // fast-import leaves no work tree
    repo
}

/// One more policy commit, so that every daemon life has work to do.
fn add_policy(repo: &Path, n: u64) {
    let file = repo.join(".gitlab/security-policies/policy.yml");
    let mut text = std::fs::read_to_string(&file).expect("policy file");
    text.push_str(&format!(
        "- name: late {n}\n  enabled: false\n  rules:\n  - {{type: any_merge_request, branch_type: protected, commits: any}}\n  approval_settings: {{block_branch_modification: true}}\n"
    ));
    std::fs::write(&file, text).expect("write");
    let date = format!("2025-01-01T00:{:02}:{:02}Z", n / 60, n % 60);
    crate::common::commit(repo, "Dave", "dave@example.com", &date, &format!("late policy {n}"));
}

fn write_config(ws: &Workspace, name: &str, state: &str, repo: &Path, destination: Option<&str>) -> PathBuf {
    let mut text = format!(
        "schedule = \"* * * * * *\"\nstate_dir = \"{state}\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
        repo.display()
    );
    if let Some(url) = destination {
        text.push_str(&format!(
            "[[destinations]]\nname = \"siem\"\nurl = \"{url}\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\n"
        ));
    }
    ws.write(name, &text)
}

fn ids(ws: &Workspace, config: &Path) -> Vec<String> {
    let out = ws.run(config, &["events", "--format", "jsonl"]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["id"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

/// A small deterministic generator (xorshift), so a failing run can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn spawn(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log");
    crate::common::spawn_daemon(config, log.into(), &[])
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let kills = env_number("POLICY_AUDIT_CRASH_KILLS", 8);
    let seed = env_number("POLICY_AUDIT_CRASH_SEED", 1).max(1);
    let ws = Workspace::new();
    let repo = long_history(&ws, 2000, 10);

    // 10 ms per request: delivering the backlog takes over 3 s, so kills land in it too.
    let receiver = Receiver::start_slow(vec![], Duration::from_millis(10));
    let config = write_config(&ws, "config.toml", "state", &repo, Some(&receiver.url()));
    let log = ws.path("daemon.log");
    let mut rng = Rng(seed);
    let mut kill_points = Vec::new();
    for k in 0..kills {
        let mut child = spawn(&config, &log);
        let delay = Duration::from_millis(rng.below(2500));
        std::thread::sleep(delay);
        let stored = ws.path("state/db").exists();
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        kill_points.push((delay.as_millis(), receiver.requests().len(), stored));
        add_policy(&repo, k); // new work for the next life: a fetch, a step, a store, a delivery
    }

    // What an uninterrupted run stores for the final history.
    let expected_config = write_config(&ws, "expected.toml", "expected-state", &repo, None);
    let out = ws.run(&expected_config, &["reconcile", "--no-deliver"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = ids(&ws, &expected_config);
    assert!(expected.len() > 150, "the history should produce many events, got {}", expected.len());

    // Let one daemon finish the job, bounded.
    let mut child = spawn(&config, &log);
    let until = Instant::now() + Duration::from_secs(90);
    let socket = ws.path("state/control.sock");
    let done = loop {
        if Instant::now() > until {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
        if std::os::unix::net::UnixStream::connect(&socket).is_err() {
            continue;
        }
        let pending = stdout(&ws.run(&config, &["deliveries", "--state", "pending", "--json"]));
        let stored = ids(&ws, &config).len();
        if stored == expected.len() && pending.trim() == "[]" {
            break true;
        }
    };
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let exit = wait_bounded(&mut child, Duration::from_secs(15));
    assert!(
        done,
        "the daemon did not catch up within 90 s; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(exit, Some(0), "SIGTERM must exit 0");

    let stored = ids(&ws, &config);
    assert_eq!(stored, expected, "the store must hold exactly the uninterrupted run's events, in order");
    let verify = ws.run(&config, &["verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    let received = receiver.ids();
    let unique: std::collections::HashSet<&String> = received.iter().collect();
    for id in &expected {
        assert!(unique.contains(id), "event {id} never reached the receiver");
    }
    assert_eq!(unique.len(), expected.len(), "the receiver got ids that were never stored");
    let redeliveries = received.len() - unique.len();
    eprintln!(
        "crash suite (seed {seed}): {kills} SIGKILLs at {:?} ms, {} events stored exactly once, {} received, {redeliveries} redeliveries",
        kill_points.iter().map(|k| k.0).collect::<Vec<_>>(),
        stored.len(),
        received.len()
    );
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<i32> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// SIGTERM during a long backfill: the daemon stops between steps within seconds (the walk
/// polls the stop token), what it stored is consistent, and a later run finishes the job with
/// exactly the events an uninterrupted run stores.
#[test]
fn sigterm_during_a_long_backfill_stops_promptly_and_a_later_run_finishes_it() {
    let ws = Workspace::new();
    let repo = long_history(&ws, 6_000, 2);
    let config = write_config(&ws, "config.toml", "state", &repo, None);
    let log = ws.path("daemon.log");
    let mut child = spawn(&config, &log);
    // Only ask once the daemon holds the store (its socket answers): a command run before that
    // would open the store itself and keep the daemon from starting.
    let socket = ws.path("state/control.sock");
    crate::common::wait_for("the control socket", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    // Under way: the first chunk of the walk (1,000 events) is stored, through the daemon.
    let stored = || ws.run(&config, &["events", "--format", "jsonl"]).stdout.iter().filter(|b| **b == b'\n').count();
    // Polled once a second (each poll is a process and a listing), bounded generously: on a
    // loaded machine the debug build walks slowly.
    let until = Instant::now() + Duration::from_secs(300);
    while stored() == 0 {
        assert!(
            Instant::now() < until,
            "the backfill stored nothing within 300 s; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let signalled = Instant::now();
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill").success();
    assert!(ok, "kill -TERM failed");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the daemon did not stop within 15 s of SIGTERM; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("stopped {:?} after SIGTERM", signalled.elapsed());
    assert_eq!(status.code(), Some(0), "a clean exit");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("stopped by shutdown"), "the walk was interrupted, not finished: {text}");
    let partial = ids(&ws, &config);

    // What an uninterrupted run stores, and what a later run adds to the interrupted one.
    let expected_config = write_config(&ws, "expected.toml", "expected-state", &repo, None);
    assert!(ws.run(&expected_config, &["reconcile"]).status.success());
    let expected = ids(&ws, &expected_config);
    assert!(partial.len() < expected.len(), "stopped part-way: {} of {}", partial.len(), expected.len());
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ids(&ws, &config), expected, "nothing lost, nothing duplicated, same order");
}
