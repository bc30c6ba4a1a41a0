//! The daemon as a user runs it: the real binary under `run`, driven by its schedule, the
//! control socket and signals. Every daemon a test starts is stopped by a guard; every wait is
//! bounded.

use crate::common::{BIN, Workspace, commit, stderr, stdout, wait_for};
use crate::receiver::{Receiver, Reply};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const POLICY: &str = ".gitlab/security-policies/policy.yml";
/// Once a year: the schedule never fires during a test unless a test says otherwise.
const NEVER: &str = "0 0 0 1 1 *";

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(ws: &Workspace, config: &Path) -> Daemon {
        Daemon::start_with_env(ws, config, &[])
    }

    fn start_with_env(ws: &Workspace, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let log = ws.path("daemon.log");
        let child = crate::common::spawn_daemon(config, std::fs::File::create(&log).expect("log file").into(), env);
        let daemon = Daemon { child, log };
        let socket = ws.path("state/control.sock");
        wait_for("the control socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        daemon
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.pid()]).status().expect("kill").success();
        assert!(ok, "kill {sig} failed");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and the exit code, within `limit`.
    fn terminate(mut self, limit: Duration) -> Option<i32> {
        self.signal("-TERM");
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A failing test shows what the daemon said.
        if std::thread::panicking() {
            eprintln!("--- the daemon's log ---\n{}--- end of the daemon's log ---", self.log());
        }
    }
}

fn spp(ws: &Workspace) -> PathBuf {
    let repo = ws.init_repo("spp");
    ws.write(&format!("spp/{POLICY}"), "approval_policy:\n- {name: first, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "first");
    repo
}

fn add_policy(repo: &Path, name: &str, date: &str) {
    let path = repo.join(POLICY);
    let mut text = std::fs::read_to_string(&path).expect("policy");
    text.push_str(&format!("- {{name: {name}, enabled: true, rules: [{{type: any_merge_request, branch_type: protected, commits: any}}], approval_settings: {{block_branch_modification: true}}}}\n"));
    std::fs::write(&path, text).expect("write");
    commit(repo, "Bob", "bob@example.com", date, &format!("add {name}"));
}

fn config(ws: &Workspace, schedule: &str, projects: &[(&str, &Path)], destinations: &str) -> PathBuf {
    let mut text = format!("schedule = \"{schedule}\"\nstate_dir = \"state\"\n");
    for (path, repo) in projects {
        text.push_str(&format!(
            "[[projects]]\npath = \"{path}\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            repo.display()
        ));
    }
    text.push_str(destinations);
    ws.write("config.toml", &text)
}

fn destination(url: &str) -> String {
    format!("[[destinations]]\nname = \"siem\"\nurl = \"{url}\"\nbackoff_initial = \"2s\"\nbackoff_max = \"2s\"\n")
}

#[test]
fn the_schedule_picks_up_new_commits_and_delivers_them() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let receiver = Receiver::start(vec![]);
    let config = config(&ws, "* * * * * *", &[("acme/spp", &repo)], &destination(&receiver.url()));
    let daemon = Daemon::start(&ws, &config);
    wait_for("the first event", Duration::from_secs(15), || receiver.requests().len() == 1);
    add_policy(&repo, "second", "2024-01-02T10:00:00Z");
    wait_for("the scheduled reconcile to deliver the new event", Duration::from_secs(15), || {
        receiver.requests().len() == 2
    });
    assert_eq!(receiver.requests()[1].json()["details"]["policy_name"], "second");
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn forced_reconcile_goes_through_the_daemon_and_returns_after_delivery() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let receiver = Receiver::start(vec![]);
    let config = config(&ws, NEVER, &[("acme/spp", &repo)], &destination(&receiver.url()));
    let daemon = Daemon::start(&ws, &config);
    wait_for("the start-up reconcile", Duration::from_secs(15), || receiver.requests().len() == 1);
    add_policy(&repo, "second", "2024-01-02T10:00:00Z");
    let started = Instant::now();
    let out = ws.run(&config, &["reconcile"]);
    let latency = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("acme/spp: 1 commit(s), 1 policy change step(s), 1 event(s) stored (create 1)"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("destination siem: 1 delivered"), "{}", stdout(&out));
    assert_eq!(receiver.requests().len(), 2, "the event is at the receiver when reconcile returns");
    eprintln!("forced reconcile latency (command start to event at the receiver): {latency:?}");
    // A project the daemon does not know is refused the same way as in-process.
    let out = ws.run(&config, &["reconcile", "--project", "nope/nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(daemon.log().contains("trigger=\"forced\""), "{}", daemon.log());
}

#[test]
fn read_commands_answer_the_same_through_the_socket_and_in_process() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    add_policy(&repo, "second", "2024-01-02T10:00:00Z");
    let config = config(&ws, NEVER, &[("acme/spp", &repo)], "");
    let daemon = Daemon::start(&ws, &config);
    wait_for("the start-up reconcile", Duration::from_secs(15), || {
        stdout(&ws.run(&config, &["events", "--format", "jsonl"])).lines().count() == 2
    });
    let commands: [&[&str]; 5] = [
        &["events", "--format", "json"],
        &["events", "--type", "create", "--format", "csv"],
        &["status"],
        &["status", "--json"],
        &["deliveries"],
    ];
    let through_daemon: Vec<(String, String)> =
        commands.iter().map(|c| ws.run(&config, c)).map(|o| (stdout(&o), stderr(&o))).collect();
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
    assert!(!ws.path("state/control.sock").exists(), "the socket is removed on exit");
    for (command, daemon_answer) in commands.iter().zip(&through_daemon) {
        let out = ws.run(&config, command);
        assert_eq!((stdout(&out), stderr(&out)), *daemon_answer, "{command:?} differs between daemon and in-process");
    }
}

#[test]
fn sighup_reloads_the_config_and_a_broken_one_is_rejected() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let other = ws.init_repo("other");
    ws.write(&format!("other/{POLICY}"), "scan_execution_policy:\n- {name: dast, enabled: true, rules: [{type: pipeline, branch_type: all}], actions: [{scan: secret_detection}]}\n");
    commit(&other, "Carol", "carol@example.com", "2024-01-03T10:00:00Z", "dast");
    let config_path = config(&ws, NEVER, &[("acme/spp", &repo)], "");
    let daemon = Daemon::start(&ws, &config_path);
    // The start-up reconcile reads the config when it starts: let it finish first, or it may
    // already see the project added below.
    wait_for("the start-up reconcile", Duration::from_secs(15), || daemon.log().contains("project=acme/spp"));
    // Add a project and reload.
    config(&ws, NEVER, &[("acme/spp", &repo), ("acme/other", &other)], "");
    daemon.signal("-HUP");
    wait_for("the reload", Duration::from_secs(10), || daemon.log().contains("config reloaded"));
    let out = ws.run(&config_path, &["reconcile", "--project", "acme/other"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("acme/other: 1 commit(s)"), "{}", stdout(&out));
    // A broken config is rejected and the daemon keeps serving the previous one.
    ws.write("config.toml", "schedule = \"not a cron\"\n[[projects]]\n");
    daemon.signal("-HUP");
    wait_for("the rejection", Duration::from_secs(10), || daemon.log().contains("config reload rejected"));
    // The running daemon still has both projects: a forced reconcile through the socket (with
    // a config file that points at the same state) reaches it.
    let pointer = config(&ws, NEVER, &[("acme/spp", &repo), ("acme/other", &other)], "");
    let out = ws.run(&pointer, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("acme/spp: up to date") && stdout(&out).contains("acme/other: up to date"),
        "{}",
        stdout(&out)
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_second_daemon_on_the_same_state_exits_2_naming_the_first() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let config = config(&ws, NEVER, &[("acme/spp", &repo)], "");
    let daemon = Daemon::start(&ws, &config);
    let out = ws.run(&config, &["run"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("another policy-audit daemon is running") && err.contains(&format!("pid {}", daemon.pid())),
        "{err}"
    );
    assert!(err.contains("control.sock"), "{err}");
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_retry_is_delivered_at_its_due_time_without_a_cron_tick() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let receiver = Receiver::start(vec![Reply::Status(503)]);
    let config = config(&ws, NEVER, &[("acme/spp", &repo)], &destination(&receiver.url()));
    let daemon = Daemon::start(&ws, &config);
    // At least: the retry's delay is jittered down to 10 ms, so it may come before the first
    // attempt is seen here.
    wait_for("the first, refused attempt", Duration::from_secs(15), || !receiver.requests().is_empty());
    let first = Instant::now();
    wait_for("the retry (due within 2 s)", Duration::from_secs(8), || receiver.requests().len() >= 2);
    let waited = first.elapsed();
    assert!(waited <= Duration::from_secs(6), "the retry came after {waited:?}");
    let out = ws.run(&config, &["deliveries"]);
    assert_eq!(stdout(&out), "no deliveries\n");
    assert_eq!(receiver.requests().len(), 2, "one refused attempt and one delivery, nothing more");
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn systemd_units_have_the_required_directives_and_verify() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| std::fs::read_to_string(dir.join("systemd").join(name)).expect("unit file");
    let service = read("policy-audit.service");
    for directive in [
        "Type=notify",
        "ExecStartPre=/usr/bin/policy-audit check-config",
        "ExecStart=/usr/bin/policy-audit run",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=policy-audit",
        "EnvironmentFile=-/etc/default/policy-audit",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "UMask=0077",
    ] {
        assert!(service.lines().any(|l| l == directive), "policy-audit.service lacks {directive}");
    }
    let oneshot = read("policy-audit-reconcile.service");
    assert!(oneshot.contains("Type=oneshot") && oneshot.contains("ExecStart=/usr/bin/policy-audit reconcile"));
    let timer = read("policy-audit-reconcile.timer");
    for directive in ["OnCalendar=", "RandomizedDelaySec=", "Persistent=true"] {
        assert!(timer.contains(directive), "timer lacks {directive}");
    }
    let out =
        Command::new("bash").arg(dir.join("scripts/verify-systemd.sh")).arg(BIN).output().expect("run verify script");
    assert!(out.status.success(), "systemd-analyze verify: {}{}", stdout(&out), stderr(&out));
}

#[test]
fn an_admin_needs_no_service_secrets_to_talk_to_the_daemon() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let receiver = Receiver::start(vec![]);
    let dest = format!("{}verification_token_env = \"PA_DAEMON_ONLY_TOKEN\"\n", destination(&receiver.url()));
    let config = config(&ws, NEVER, &[("acme/spp", &repo)], &dest);
    let daemon = Daemon::start_with_env(&ws, &config, &[("PA_DAEMON_ONLY_TOKEN", "t0k3n")]);
    wait_for("the start-up delivery", Duration::from_secs(15), || receiver.requests().len() == 1);
    // This shell does not have the token: status and a forced reconcile still work.
    let out = ws.run(&config, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("destination siem: 0 pending"), "{}", stdout(&out));
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Without the daemon, the secret is needed and its absence is named.
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
    let out = ws.run(&config, &["reconcile"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("PA_DAEMON_ONLY_TOKEN is not set"), "{}", stderr(&out));
}

#[test]
fn under_journald_lines_carry_their_syslog_priority() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let config = config(&ws, NEVER, &[("acme/spp", &repo)], "");
    let daemon = Daemon::start_with_env(&ws, &config, &[("JOURNAL_STREAM", "8:1234")]);
    wait_for("the start-up reconcile", Duration::from_secs(15), || daemon.log().contains("stored=1"));
    let log = daemon.log();
    assert!(log.lines().all(|l| l.starts_with('<')), "every line has a priority prefix:\n{log}");
    assert!(log.lines().any(|l| l.starts_with("<6>") && l.contains("policy-audit daemon started")), "{log}");
    assert!(!log.contains("Uninited"), "the scheduler's own chatter stays out: {log}");
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn check_config_asks_the_daemon_about_deliveries_a_new_config_would_orphan() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let down = format!("http://127.0.0.1:{port}/audit");
    let config_path = config(&ws, NEVER, &[("acme/spp", &repo)], &destination(&down));
    let daemon = Daemon::start(&ws, &config_path);
    wait_for("a queued delivery", Duration::from_secs(15), || {
        stdout(&ws.run(&config_path, &["deliveries"])).contains("siem")
    });
    // The edited config drops the destination; the daemon (still on the old one) holds the store.
    config(&ws, NEVER, &[("acme/spp", &repo)], "");
    let out = ws.run(&config_path, &["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("destination \"siem\" is no longer configured but has 1 pending"),
        "{}",
        stderr(&out)
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_cli_and_a_daemon_of_different_protocols_get_an_error_naming_both() {
    // A daemon that speaks protocol 999 answers whatever it is asked.
    let ws = Workspace::new();
    let repo = spp(&ws);
    let config = config(&ws, NEVER, &[("acme/spp", &repo)], "");
    std::fs::create_dir_all(ws.path("state")).expect("state dir");
    let listener = std::os::unix::net::UnixListener::bind(ws.path("state/control.sock")).expect("bind");
    let fake = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (stream, _) = listener.accept().expect("accept");
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line).expect("read request");
        let reply = r#"{"protocol":999,"release":"9.9.9","reply":{"something_new":{}}}"#;
        (&stream).write_all(format!("{reply}\n").as_bytes()).expect("answer");
        line
    });
    let out = ws.run(&config, &["status"]);
    let request = fake.join().expect("fake daemon");
    let sent: serde_json::Value = serde_json::from_str(&request).expect("the request is JSON");
    assert_eq!(sent["protocol"], 1, "the CLI names its protocol: {request}");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("speaks control protocol 1"), "{err}");
    assert!(err.contains("the running daemon speaks protocol 999, policy-audit 9.9.9"), "{err}");

    // The real daemon, asked in protocol 999, refuses in words that name both.
    let daemon = Daemon::start(&ws, &config);
    let mut stream = std::os::unix::net::UnixStream::connect(ws.path("state/control.sock")).expect("connect");
    use std::io::{BufRead, Write};
    stream
        .write_all(b"{\"protocol\":999,\"release\":\"9.9.9\",\"request\":{\"status\":{\"json\":true}}}\n")
        .expect("send");
    let mut answer = String::new();
    std::io::BufReader::new(&stream).read_line(&mut answer).expect("answer");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("the answer is JSON");
    let said = answer["reply"]["done"]["stderr"].as_str().unwrap_or_default();
    assert!(said.contains("the daemon speaks control protocol 1"), "{answer}");
    assert!(said.contains("the command speaks protocol 999, policy-audit 9.9.9"), "{answer}");
    assert_eq!(answer["reply"]["done"]["code"], 2);
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}
