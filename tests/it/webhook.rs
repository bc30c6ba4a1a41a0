//! `POST /hooks/gitlab` against the real daemon: a GitLab push hook triggers a reconcile of that
//! project, queued and coalesced; a wrong secret or an oversized body triggers nothing. The
//! reconciles are counted on the daemon's own `/metrics`.

use crate::common::{KillOnDrop, Workspace, commit, spawn_daemon, wait_for};
use crate::http::{free_port, get, request, wait_until_up};
use crate::receiver::Receiver;
use crate::server::TOKEN;
use std::path::{Path, PathBuf};
use std::time::Duration;

const POLICY: &str = ".gitlab/security-policies/policy.yml";
const SECRET: &str = "hook-secret-81b2";

struct Daemon {
    _child: KillOnDrop,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `policy_audit_reconciles_total{trigger="<trigger>"}` from `/metrics`.
    fn reconciles(&self, trigger: &str) -> u64 {
        let text = get(self.port, "/metrics", &[("PRIVATE-TOKEN", TOKEN)]).text();
        let needle = format!("policy_audit_reconciles_total{{trigger=\"{trigger}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {needle} in /metrics:\n{text}"))
    }

    fn hook(&self, token: &str, body: &[u8], uuid: &str) -> u16 {
        request(
            self.port,
            "POST",
            "/hooks/gitlab",
            &[
                ("Content-Type", "application/json"),
                ("X-Gitlab-Event", "Push Hook"),
                ("X-Gitlab-Token", token),
                ("X-Gitlab-Event-UUID", uuid),
            ],
            body,
        )
        .status
    }
}

fn push_hook(project: &str, branch: &str) -> Vec<u8> {
    serde_json::json!({
        "object_kind": "push",
        "event_name": "push",
        "ref": format!("refs/heads/{branch}"),
        "checkout_sha": "0000000000000000000000000000000000000000",
        "user_name": "Somebody Else",
        "project": {"path_with_namespace": project, "git_http_url": "https://gitlab.example.com/x.git"},
        "commits": [{"id": "deadbeef", "author": {"name": "Forged", "email": "forged@example.com"}}]
    })
    .to_string()
    .into_bytes()
}

fn add_policy(repo: &Path, name: &str, date: &str) {
    let path = repo.join(POLICY);
    let mut text = std::fs::read_to_string(&path).expect("policy");
    text.push_str(&format!("- {{name: {name}, enabled: true, rules: [{{type: any_merge_request, branch_type: protected, commits: any}}], approval_settings: {{block_branch_modification: true}}}}\n"));
    std::fs::write(&path, text).expect("write");
    commit(repo, "Bob", "bob@example.com", date, &format!("add {name}"));
}

/// A daemon that never ticks (after its start-up catch-up), with `[server]` and the webhook.
fn start(ws: &Workspace, receiver: &Receiver) -> (Daemon, PathBuf) {
    let repo = ws.init_repo("spp");
    ws.write(&format!("spp/{POLICY}"), "approval_policy:\n- {name: first, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "first");
    ws.write("read-token", TOKEN);
    ws.write("hook-secret", SECRET);
    let port = free_port();
    let config = ws.write(
        "config.toml",
        &format!(
            "schedule = \"0 0 0 1 1 *\"\nstate_dir = \"state\"\n\
             [[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n\
             [[destinations]]\nname = \"siem\"\nurl = \"{}\"\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"read-token\"\nwebhook_secret_file = \"hook-secret\"\n",
            repo.display(),
            receiver.url()
        ),
    );
    let log = ws.path("daemon.log");
    let child = spawn_daemon(&config, std::fs::File::create(&log).expect("log").into(), &[]);
    let daemon = Daemon { _child: KillOnDrop(child), port, log };
    wait_until_up(port, Duration::from_secs(20));
    wait_for("the start-up reconcile", Duration::from_secs(20), || daemon.reconciles("schedule") == 1);
    wait_for("the first event", Duration::from_secs(20), || receiver.requests().len() == 1);
    (daemon, repo)
}

#[test]
fn a_wrong_secret_is_401_an_oversized_body_413_and_neither_reconciles() {
    let ws = Workspace::new();
    let receiver = Receiver::start(vec![]);
    let (d, repo) = start(&ws, &receiver);
    add_policy(&repo, "second", "2024-01-02T10:00:00Z");
    assert_eq!(d.hook("wrong", &push_hook("acme/spp", "main"), "u-1"), 401);
    assert_eq!(d.hook("", &push_hook("acme/spp", "main"), "u-2"), 401);
    let mut big = push_hook("acme/spp", "main");
    big.extend(std::iter::repeat_n(b' ', 1024 * 1024 + 1));
    assert_eq!(d.hook(SECRET, &big, "u-3"), 413);
    // Unknown projects and branches are accepted and ignored.
    assert_eq!(d.hook(SECRET, &push_hook("someone/else", "main"), "u-4"), 202);
    assert_eq!(d.hook(SECRET, &push_hook("acme/spp", "feature"), "u-5"), 202);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.reconciles("webhook"), 0, "no reconcile was triggered");
    assert_eq!(receiver.requests().len(), 1, "no new event was delivered");
    assert!(d.log().contains("webhook refused"), "the refusal is logged");

    // A Standard Webhooks signature made with the secret is accepted like the token.
    let body = push_hook("acme/spp", "main");
    let ts = jiff::Timestamp::now().as_second().to_string();
    let key = policy_audit::stream::http::signing_key(&policy_audit::config::Secret::new(SECRET));
    let sig = policy_audit::stream::http::signature(&key, "msg_1", &ts, &body);
    let signed = request(
        d.port,
        "POST",
        "/hooks/gitlab",
        &[
            ("Content-Type", "application/json"),
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &sig),
        ],
        &body,
    );
    assert_eq!(signed.status, 202);
    wait_for("the signed hook's event", Duration::from_secs(20), || receiver.requests().len() == 2);
    assert_eq!(receiver.requests()[1].json()["details"]["policy_name"], "second");
    assert_eq!(receiver.requests()[1].json()["author_name"], "Bob", "the payload's forged author is never used");
}

#[test]
fn a_burst_of_100_hooks_is_one_reconcile_and_delivers_the_new_event() {
    let ws = Workspace::new();
    let receiver = Receiver::start(vec![]);
    let (d, repo) = start(&ws, &receiver);
    add_policy(&repo, "second", "2024-01-02T10:00:00Z");
    let body = push_hook("acme/spp", "main");
    let port = d.port;
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|t| {
                let body = body.clone();
                scope.spawn(move || {
                    (0..10)
                        .map(|i| {
                            request(
                                port,
                                "POST",
                                "/hooks/gitlab",
                                &[
                                    ("X-Gitlab-Event", "Push Hook"),
                                    ("X-Gitlab-Token", SECRET),
                                    ("X-Gitlab-Event-UUID", &format!("burst-{t}-{i}")),
                                ],
                                &body,
                            )
                            .status
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("thread")).collect()
    });
    assert!(statuses.iter().all(|s| *s == 202), "every hook is accepted at once: {statuses:?}");
    wait_for("the new event at the receiver", Duration::from_secs(20), || receiver.requests().len() == 2);
    assert_eq!(receiver.requests()[1].json()["details"]["policy_name"], "second");
    wait_for("the webhook reconcile to end", Duration::from_secs(20), || d.reconciles("webhook") >= 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.reconciles("webhook"), 1, "100 hooks, one reconcile");
}

#[test]
fn a_hook_during_a_running_reconcile_queues_exactly_one_more() {
    let ws = Workspace::new();
    // Each delivery takes 2 s: the reconcile that delivers is still running when the next hooks come.
    let receiver = Receiver::start_slow(vec![], Duration::from_secs(2));
    let (d, repo) = start(&ws, &receiver);
    add_policy(&repo, "second", "2024-01-02T10:00:00Z");
    assert_eq!(d.hook(SECRET, &push_hook("acme/spp", "main"), "a"), 202);
    wait_for("the first webhook reconcile to be delivering", Duration::from_secs(20), || {
        receiver.requests().len() == 2
    });
    add_policy(&repo, "third", "2024-01-03T10:00:00Z");
    for uuid in ["b", "c", "d", "b"] {
        assert_eq!(d.hook(SECRET, &push_hook("acme/spp", "main"), uuid), 202);
    }
    wait_for("the third policy's event", Duration::from_secs(30), || receiver.requests().len() == 3);
    assert_eq!(receiver.requests()[2].json()["details"]["policy_name"], "third");
    // The reconcile is counted when it ends, after its delivery (2 s at this receiver).
    wait_for("the second webhook reconcile to end", Duration::from_secs(30), || d.reconciles("webhook") >= 2);
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(d.reconciles("webhook"), 2, "the hooks during the running reconcile made exactly one more");
}
