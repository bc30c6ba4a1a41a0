//! Delivery to HTTP destinations against a real receiver on 127.0.0.1: headers, signing, the
//! retry policy, dead letters, ordering, isolation between destinations, filters.
//! Backoffs are driven by a test clock: no test sleeps through one.

use crate::common::{Workspace, commit, events_json, stderr, stdout};
use crate::receiver::{Receiver, Reply};
use policy_audit::config::Config;
use policy_audit::store::Store;
use policy_audit::stream::{Clock, deliver_due};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

const POLICY: &str = ".gitlab/security-policies/policy.yml";

struct TestClock(AtomicI64);

impl TestClock {
    fn now() -> TestClock {
        TestClock(AtomicI64::new(jiff::Timestamp::now().as_millisecond()))
    }
    fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::from_millisecond(self.0.load(Ordering::SeqCst)).expect("a valid test time")
    }
}

/// A policy repository whose history creates `n` policies, one commit each (n events on backfill).
fn repo_with_creates(ws: &Workspace, n: usize) -> PathBuf {
    let repo = ws.init_repo("spp");
    let mut text = String::from("approval_policy:\n");
    for i in 0..n {
        text.push_str(&format!("- {{name: policy-{i}, enabled: false, rules: [{{type: any_merge_request, branch_type: protected, commits: any}}], approval_settings: {{block_branch_modification: true}}}}\n"));
        ws.write(&format!("spp/{POLICY}"), &text);
        commit(&repo, "Alice", "alice@example.com", &format!("2024-01-01T10:{i:02}:00Z"), &format!("add policy {i}"));
    }
    repo
}

fn write_config(ws: &Workspace, repo: &Path, destinations: &str) -> PathBuf {
    ws.write(
        "config.toml",
        &format!(
            "state_dir = \"state\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\nlinked = [\"acme/web\"]\ninitial_sync = \"backfill\"\n{destinations}",
            repo.display()
        ),
    )
}

fn dest(name: &str, url: &str, extra: &str) -> String {
    let mut text = format!("[[destinations]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n");
    for (key, value) in [("timeout", "1s"), ("backoff_initial", "1s"), ("backoff_max", "60s")] {
        if !extra.contains(key) {
            text.push_str(&format!("{key} = \"{value}\"\n"));
        }
    }
    text
}

/// Stores the events (and their outbox entries) without delivering.
fn store_events(ws: &Workspace, config: &Path) {
    let out = ws.run(config, &["reconcile", "--no-deliver"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn open(config: &Path) -> (Config, Store) {
    let config = Config::load(config).expect("config");
    let store = Store::open(&config.db_dir()).expect("store");
    (config, store)
}

fn stored_ids(ws: &Workspace, config: &Path) -> Vec<String> {
    events_json(ws, config).iter().map(|e| e["id"].as_str().unwrap_or_default().to_string()).collect()
}

#[test]
fn requests_carry_gitlab_headers_and_a_verifiable_signature() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 3);
    let receiver = Receiver::start(vec![]);
    std::fs::write(ws.path("token"), "stream-token-123\n").expect("token");
    std::fs::write(ws.path("secret"), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").expect("secret");
    let extra = "verification_token_file = \"token\"\nsigning_secret_file = \"secret\"\nheaders = { \"X-Source\" = \"policy-audit\" }";
    let config = write_config(&ws, &repo, &dest("siem", &receiver.url(), extra));
    let before = jiff::Timestamp::now().as_second();
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("destination siem: 3 delivered"), "{}", stdout(&out));

    let stored: Vec<String> = {
        let out = ws.run(&config, &["events", "--format", "jsonl"]);
        stdout(&out).lines().map(str::to_string).collect()
    };
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    let key = base64_decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    for (req, stored) in requests.iter().zip(&stored) {
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/audit");
        let body = req.json();
        assert_eq!(
            &body,
            &serde_json::from_str::<serde_json::Value>(stored).expect("stored json"),
            "body is the stored event"
        );
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.header("x-gitlab-event-streaming-token"), Some("stream-token-123"));
        assert_eq!(req.header("x-gitlab-audit-event-type"), body["event_type"].as_str());
        assert_eq!(req.header("x-source"), Some("policy-audit"));
        let id = req.header("webhook-id").expect("webhook-id");
        assert_eq!(id, body["id"].as_str().unwrap_or_default());
        let ts = req.header("webhook-timestamp").expect("webhook-timestamp");
        let ts_num: i64 = ts.parse().expect("unix seconds");
        assert!((before - 5..=before + 60).contains(&ts_num));
        // Recompute the Standard Webhooks signature independently of the product's code.
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("key");
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&req.body);
        let expected = format!("v1,{}", base64_encode(&mac.finalize().into_bytes()));
        assert_eq!(req.header("webhook-signature"), Some(expected.as_str()));
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn server_errors_are_retried_with_backoff_and_order_is_kept() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 3);
    let receiver = Receiver::start(vec![Reply::Status(503), Reply::Status(503)]);
    let config = write_config(&ws, &repo, &dest("siem", &receiver.url(), ""));
    store_events(&ws, &config);
    let ids = stored_ids(&ws, &config);
    let (cfg, store) = open(&config);
    let clock = TestClock::now();

    let r = &deliver_due(&cfg, &store, &clock, 1).expect("round 1")[0];
    assert_eq!((r.delivered, r.retried, r.pending), (0, 1, 3), "first attempt failed, everything waits");
    let head = &store.pending(Some("siem")).expect("pending")[0];
    assert_eq!(head.attempts, 1);
    assert_eq!(head.last_status, Some(503));
    assert!(head.next_attempt_at > clock.now_ms() - 1 && head.next_attempt_at <= clock.now_ms() + 1_000);

    // Not due yet: nothing is sent.
    let sent = receiver.requests().len();
    clock.advance(Duration::from_millis(0));
    let due = head.next_attempt_at;
    if due > clock.now_ms() {
        deliver_due(&cfg, &store, &clock, 2).expect("early round");
        assert_eq!(receiver.requests().len(), sent, "a delivery must not be tried before its time");
    }
    clock.advance(Duration::from_secs(2));
    let r = &deliver_due(&cfg, &store, &clock, 3).expect("round 2")[0];
    assert_eq!((r.delivered, r.retried), (0, 1));
    assert_eq!(store.pending(Some("siem")).expect("pending")[0].attempts, 2);
    clock.advance(Duration::from_secs(3));
    let r = &deliver_due(&cfg, &store, &clock, 4).expect("round 3")[0];
    assert_eq!((r.delivered, r.pending), (3, 0));
    let received = receiver.ids();
    assert_eq!(received.len(), 5, "two refused attempts, then three deliveries");
    assert_eq!(&received[2..], &ids[..], "delivered once each, in stored order");
    assert_eq!(received[0], ids[0]);
    assert_eq!(received[1], ids[0]);
}

#[test]
fn retry_after_is_honoured() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 1);
    let receiver = Receiver::start(vec![Reply::With(429, vec![("Retry-After", "120".into())])]);
    let config = write_config(&ws, &repo, &dest("siem", &receiver.url(), ""));
    store_events(&ws, &config);
    let (cfg, store) = open(&config);
    let clock = TestClock::now();
    deliver_due(&cfg, &store, &clock, 1).expect("round");
    let d = &store.pending(None).expect("pending")[0];
    assert!(d.next_attempt_at >= clock.now_ms() + 120_000, "Retry-After: 120 must delay the retry by at least 120 s");
    clock.advance(Duration::from_secs(60));
    deliver_due(&cfg, &store, &clock, 2).expect("round");
    assert_eq!(receiver.requests().len(), 1, "no attempt before Retry-After");
    clock.advance(Duration::from_secs(61));
    let r = &deliver_due(&cfg, &store, &clock, 3).expect("round")[0];
    assert_eq!(r.delivered, 1);
}

#[test]
fn client_errors_and_redirects_are_dead_and_do_not_block_the_rest() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 3);
    let elsewhere = Receiver::start(vec![]);
    let receiver = Receiver::start(vec![Reply::Status(400), Reply::With(301, vec![("Location", elsewhere.url())])]);
    let config = write_config(&ws, &repo, &dest("siem", &receiver.url(), ""));
    store_events(&ws, &config);
    let ids = stored_ids(&ws, &config);
    let (cfg, store) = open(&config);
    let r = &deliver_due(&cfg, &store, &TestClock::now(), 1).expect("round")[0];
    assert_eq!((r.dead, r.delivered, r.pending), (2, 1, 0));
    let dead = store.dead(Some("siem")).expect("dead");
    assert_eq!(dead.len(), 2);
    assert_eq!((dead[0].event_id.as_str(), dead[0].last_status), (ids[0].as_str(), Some(400)));
    assert_eq!(dead[1].last_status, Some(301));
    assert!(dead[1].last_error.as_deref().is_some_and(|e| e.contains("redirects are not followed")));
    assert!(elsewhere.requests().is_empty(), "a redirect must not be followed");
    assert_eq!(receiver.ids().last(), Some(&ids[2]));
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn refused_hung_and_reset_connections_are_retried() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 1);
    let hung = Receiver::start(vec![Reply::Hang(Duration::from_secs(4))]);
    let reset = Receiver::start(vec![Reply::Reset]);
    let refused = format!("http://127.0.0.1:{}/audit", closed_port());
    let dests =
        [dest("refused", &refused, ""), dest("hung", &hung.url(), ""), dest("reset", &reset.url(), "")].concat();
    let config = write_config(&ws, &repo, &dests);
    store_events(&ws, &config);
    let (cfg, store) = open(&config);
    let started = std::time::Instant::now();
    let reports = deliver_due(&cfg, &store, &TestClock::now(), 1).expect("round");
    assert!(started.elapsed() < Duration::from_secs(4), "the 1 s timeout must cut the hung request short");
    for r in &reports {
        assert_eq!((r.retried, r.dead, r.pending), (1, 0, 1), "{}: {r:?}", r.destination);
    }
    let errors: Vec<String> = reports.iter().map(|r| r.last_error.clone().unwrap_or_default()).collect();
    assert!(
        errors[0].to_lowercase().contains("connect") || errors[0].to_lowercase().contains("refused"),
        "{}",
        errors[0]
    );
    assert!(errors[1].contains("timed out"), "{}", errors[1]);
    assert!(!errors[2].is_empty());
}

#[test]
fn max_attempts_makes_a_delivery_dead_and_deliveries_retry_sends_it() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 1);
    let receiver = Receiver::start(vec![Reply::Status(500), Reply::Status(500)]);
    let config = write_config(&ws, &repo, &dest("siem", &receiver.url(), "max_attempts = 2"));
    store_events(&ws, &config);
    {
        let (cfg, store) = open(&config);
        let clock = TestClock::now();
        deliver_due(&cfg, &store, &clock, 1).expect("round");
        clock.advance(Duration::from_secs(5));
        let r = &deliver_due(&cfg, &store, &clock, 2).expect("round")[0];
        assert_eq!(r.dead, 1);
        let dead = store.dead(None).expect("dead");
        assert!(dead[0].last_error.as_deref().is_some_and(|e| e.contains("gave up after 2 attempts")), "{dead:?}");
    }
    let out = ws.run(&config, &["deliveries", "--state", "dead"]);
    assert!(stdout(&out).contains("siem") && stdout(&out).contains("gave up after 2 attempts"), "{}", stdout(&out));
    let out = ws.run(&config, &["deliveries", "retry", "--destination", "siem"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("re-queued 1 dead delivery") && stdout(&out).contains("siem: 1 delivered"),
        "{}",
        stdout(&out)
    );
    assert_eq!(receiver.requests().len(), 3);
    let out = ws.run(&config, &["deliveries"]);
    assert_eq!(stdout(&out), "no deliveries\n");
}

#[test]
fn a_destination_that_is_down_does_not_hold_up_another_or_polling() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 3);
    let up = Receiver::start(vec![]);
    let down = format!("http://127.0.0.1:{}/audit", closed_port());
    let config = write_config(&ws, &repo, &[dest("down", &down, ""), dest("up", &up.url(), "")].concat());
    let out = ws.run(&config, &["reconcile"]);
    assert_eq!(out.status.code(), Some(0), "a delivery queued for retry is not a failure: {}", stderr(&out));
    assert!(stdout(&out).contains("destination up: 3 delivered"), "{}", stdout(&out));
    assert!(stdout(&out).contains("destination down: 0 delivered, 3 queued for retry"), "{}", stdout(&out));
    assert_eq!(up.ids(), stored_ids(&ws, &config));
    // Polling goes on: a new commit is stored and delivered to the healthy destination.
    let mut text = std::fs::read_to_string(repo.join(POLICY)).expect("policy");
    text.push_str("- {name: late, enabled: false, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    std::fs::write(repo.join(POLICY), text).expect("write");
    commit(&repo, "Bob", "bob@example.com", "2024-02-01T10:00:00Z", "late policy");
    let out = ws.run(&config, &["reconcile"]);
    assert!(
        stdout(&out).contains("1 event(s) stored") && stdout(&out).contains("destination up: 1 delivered"),
        "{}",
        stdout(&out)
    );
    assert_eq!(up.requests().len(), 4);
    let status = ws.run(&config, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(status["destinations"][0]["pending"], 4);
    assert!(status["destinations"][0]["last_error"].as_str().is_some());
    assert_eq!(status["destinations"][1]["pending"], 0);
}

#[test]
fn filters_by_event_type_and_namespace() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 2);
    std::fs::write(repo.join(POLICY), "approval_policy:\n- {name: policy-0, enabled: false, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n").expect("write");
    commit(&repo, "Bob", "bob@example.com", "2024-02-01T10:00:00Z", "drop policy-1");
    let (creates, by_ns, other_ns) = (Receiver::start(vec![]), Receiver::start(vec![]), Receiver::start(vec![]));
    let dests = [
        dest("creates", &creates.url(), "event_types = [\"security_policy_create\"]"),
        dest("linked", &by_ns.url(), "namespaces = [\"acme/web\"]"),
        dest("other", &other_ns.url(), "namespaces = [\"acme/we\", \"globex\"]"),
    ]
    .concat();
    let config = write_config(&ws, &repo, &dests);
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let types = |r: &Receiver| {
        r.requests().iter().map(|q| q.json()["event_type"].as_str().unwrap_or_default().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(types(&creates), ["security_policy_create", "security_policy_create"]);
    assert_eq!(types(&by_ns).len(), 3, "the linked namespace matches every event of this SPP");
    assert!(other_ns.requests().is_empty(), "\"acme/we\" is not a path prefix of \"acme/web\"");
}

#[test]
fn deliveries_of_a_removed_destination_are_kept_and_reported() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 2);
    let down = format!("http://127.0.0.1:{}/audit", closed_port());
    let config = write_config(&ws, &repo, &dest("old-siem", &down, ""));
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config = write_config(&ws, &repo, "");
    let out = ws.run(&config, &["status"]);
    assert!(
        stdout(&out).contains("destination old-siem: 2 pending, 0 dead (no longer in the config"),
        "{}",
        stdout(&out)
    );
    let out = ws.run(&config, &["check-config"]);
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("destination \"old-siem\" is no longer configured but has 2 pending"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn max_age_tries_every_delivery_at_least_once_and_retries_up_to_the_deadline() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 2);
    let receiver = Receiver::start(vec![Reply::Status(503), Reply::Status(503)]);
    let config =
        write_config(&ws, &repo, &dest("siem", &receiver.url(), "max_age = \"10s\"\nbackoff_initial = \"60s\""));
    store_events(&ws, &config);
    let (cfg, store) = open(&config);
    let clock = TestClock::now();
    // Long after max_age, an untried delivery is still tried (and here fails).
    clock.advance(Duration::from_secs(3600));
    let r = &deliver_due(&cfg, &store, &clock, 1).expect("round")[0];
    assert_eq!(receiver.requests().len(), 2, "untried deliveries must be tried, whatever their age");
    assert_eq!(r.dead, 2, "past max_age and failed: dead");
    assert!(r.last_error.as_deref().is_some_and(|e| e.contains("max_age")), "{r:?}");
    let dead = store.dead(None).expect("dead");
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.attempts == 1));
}

#[test]
fn a_retry_is_pulled_in_to_the_max_age_deadline() {
    let ws = Workspace::new();
    let repo = repo_with_creates(&ws, 1);
    let receiver = Receiver::start(vec![Reply::Status(503)]);
    let config = write_config(
        &ws,
        &repo,
        &dest("siem", &receiver.url(), "max_age = \"10s\"\nbackoff_initial = \"60s\"\nbackoff_max = \"60s\""),
    );
    store_events(&ws, &config);
    let (cfg, store) = open(&config);
    let clock = TestClock::now();
    deliver_due(&cfg, &store, &clock, 1).expect("round");
    let d = &store.pending(None).expect("pending")[0];
    assert!(d.next_attempt_at <= d.enqueued_at + 10_000, "the retry must not be scheduled past max_age");
    clock.advance(Duration::from_secs(11));
    let r = &deliver_due(&cfg, &store, &clock, 2).expect("round")[0];
    assert_eq!(r.delivered, 1, "the last attempt, at the deadline, succeeds");
}
