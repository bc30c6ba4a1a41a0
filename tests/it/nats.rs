//! The `kind = "nats"` destination against a real `nats-server -js` on loopback: every event is
//! published once (a consumer counts the ids), a backfill run again adds nothing, a broker that
//! stops and comes back loses nothing, a refused token is a clear error; and `deliveries replay`
//! gives a destination added later the history, in order, once.

use crate::common::{Workspace, commit, events_json, stderr, stdout};
use crate::nats_server::{NatsServer, read_stream};
use policy_audit::config::Config;
use policy_audit::store::Store;
use policy_audit::stream::{Clock, deliver_due};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

const POLICY: &str = ".gitlab/security-policies/policy.yml";

/// Adds policies `from..to` to the repository, one commit each (one event each on backfill).
fn add_policies(ws: &Workspace, repo: &Path, from: usize, to: usize) {
    let path = ws.path(&format!("spp/{POLICY}"));
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|_| String::from("approval_policy:\n"));
    for i in from..to {
        text.push_str(&format!("- {{name: policy-{i}, enabled: false, rules: [{{type: any_merge_request, branch_type: protected, commits: any}}], approval_settings: {{block_branch_modification: true}}}}\n"));
        ws.write(&format!("spp/{POLICY}"), &text);
        let date = format!("2024-01-01T{:02}:{:02}:00Z", 10 + i / 60, i % 60);
        commit(repo, "Alice", "alice@example.com", &date, &format!("add policy {i}"));
    }
}

fn nats_dest(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[destinations]]\nname = \"{name}\"\nkind = \"nats\"\nurl = \"{url}\"\nsubject = \"gitlab.audit.policy\"\nstream = \"GITLAB_AUDIT\"\ntimeout = \"2s\"\nbackoff_initial = \"1s\"\n{extra}\n"
    )
}

fn write_config(ws: &Workspace, repo: &Path, destinations: &str) -> PathBuf {
    ws.write(
        "config.toml",
        &format!(
            "state_dir = \"state\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n{destinations}",
            repo.display()
        ),
    )
}

fn stored_ids(ws: &Workspace, config: &Path) -> Vec<String> {
    events_json(ws, config).iter().map(|e| e["id"].as_str().unwrap_or_default().to_string()).collect()
}

fn ids(messages: &[crate::nats_server::Message]) -> Vec<String> {
    messages.iter().map(|m| m.msg_id.clone()).collect()
}

struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::from_millisecond(self.0.load(Ordering::SeqCst)).expect("a valid test time")
    }
}

#[test]
fn every_event_is_published_once_with_its_id_and_type_subject() {
    let nats = NatsServer::start();
    let ws = Workspace::new();
    let repo = ws.init_repo("spp");
    add_policies(&ws, &repo, 0, 12);
    let config = write_config(&ws, &repo, &nats_dest("bus", &nats.url(), ""));

    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("destination bus: 12 delivered"), "{}", stdout(&out));

    let stored = stored_ids(&ws, &config);
    assert_eq!(stored.len(), 12);
    let messages = read_stream(&nats.url(), None, "GITLAB_AUDIT");
    assert_eq!(ids(&messages), stored, "each event once, in trail order, with Nats-Msg-Id = event id");
    for m in &messages {
        assert_eq!(m.subject, "gitlab.audit.policy.security_policy_create");
        assert_eq!(m.body["id"].as_str(), Some(m.msg_id.as_str()), "the body is the stored event");
    }

    // Run the backfill again, and again from a lost state directory: the stream gains nothing
    // (the second time only because the broker drops a Msg-Id it already has).
    let out = ws.run(&config, &["reconcile", "--backfill"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir_all(ws.path("state")).expect("remove state");
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("destination bus: 12 delivered"), "{}", stdout(&out));
    assert_eq!(ids(&read_stream(&nats.url(), None, "GITLAB_AUDIT")), stored, "a replayed backfill adds nothing");
}

#[test]
fn a_broker_that_stops_and_comes_back_loses_nothing() {
    let mut nats = NatsServer::start();
    let ws = Workspace::new();
    let repo = ws.init_repo("spp");
    add_policies(&ws, &repo, 0, 5);
    let config = write_config(&ws, &repo, &nats_dest("bus", &nats.url(), ""));
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_stream(&nats.url(), None, "GITLAB_AUDIT").len(), 5);

    // The broker dies; five more changes arrive and are stored.
    nats.stop();
    add_policies(&ws, &repo, 5, 10);
    let out = ws.run(&config, &["reconcile", "--no-deliver"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let loaded = Config::load(&config).expect("config");
    let store = Store::open(&loaded.db_dir()).expect("store");
    let clock = TestClock(AtomicI64::new(jiff::Timestamp::now().as_millisecond()));
    let reports = deliver_due(&loaded, &store, &clock, 1).expect("delivery round");
    assert_eq!((reports[0].delivered, reports[0].pending), (0, 5), "{:?}", reports[0]);
    let error = reports[0].last_error.clone().unwrap_or_default();
    assert!(error.contains(&nats.url()), "the retry reason names the server: {error}");

    // It comes back with its store; the retries go through, each event once.
    nats.resume();
    clock.0.fetch_add(Duration::from_secs(600).as_millis() as i64, Ordering::SeqCst);
    let reports = deliver_due(&loaded, &store, &clock, 2).expect("delivery round");
    assert_eq!((reports[0].delivered, reports[0].pending, reports[0].dead), (5, 0, 0), "{:?}", reports[0]);
    drop(store);
    let stored = stored_ids(&ws, &config);
    assert_eq!(stored.len(), 10);
    assert_eq!(ids(&read_stream(&nats.url(), None, "GITLAB_AUDIT")), stored);
}

#[test]
fn a_refused_token_is_a_clear_error_naming_the_destination() {
    let nats = NatsServer::start_with_token(Some("right-token"));
    let ws = Workspace::new();
    let repo = ws.init_repo("spp");
    add_policies(&ws, &repo, 0, 3);
    let config = write_config(&ws, &repo, &nats_dest("bus", &nats.url(), "token_env = \"BUS_TOKEN\""));

    let out = std::process::Command::new(crate::common::BIN)
        .args(["--config"])
        .arg(&config)
        .arg("reconcile")
        .env("BUS_TOKEN", "wrong-token")
        .env("HOME", ws.dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("destination bus"), "{err}");
    assert!(err.contains("refused the credentials (authorization violation)"), "{err}");
    assert!(!err.contains("right-token") && !err.contains("wrong-token"), "no token in output: {err}");
    assert!(read_stream(&nats.url(), Some("right-token"), "GITLAB_AUDIT").is_empty());

    // With the right token, `deliveries retry` sends the dead ones.
    let out = std::process::Command::new(crate::common::BIN)
        .args(["--config"])
        .arg(&config)
        .args(["deliveries", "retry"])
        .env("BUS_TOKEN", "right-token")
        .env("HOME", ws.dir.path())
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_stream(&nats.url(), Some("right-token"), "GITLAB_AUDIT").len(), 3);
}

#[test]
fn a_destination_added_after_100_events_gets_all_of_them_in_order_once_on_replay() {
    let nats = NatsServer::start();
    let ws = Workspace::new();
    let repo = ws.init_repo("spp");
    add_policies(&ws, &repo, 0, 100);
    let config = write_config(&ws, &repo, "");
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stored = stored_ids(&ws, &config);
    assert_eq!(stored.len(), 100);

    // The destination is added later: new events would reach it, the history does not by itself.
    let config = write_config(&ws, &repo, &nats_dest("late", &nats.url(), ""));
    let out = ws.run(&config, &["deliveries", "replay"]);
    assert_eq!(out.status.code(), Some(2), "replay needs --destination");
    assert!(stderr(&out).contains("--destination"), "{}", stderr(&out));

    let out = ws.run(&config, &["deliveries", "replay", "--destination", "late"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("queued 100 stored events for destination late"), "{}", stdout(&out));
    assert!(stdout(&out).contains("destination late: 100 delivered"), "{}", stdout(&out));
    let messages = read_stream(&nats.url(), None, "GITLAB_AUDIT");
    assert_eq!(ids(&messages), stored, "all 100, in trail order, once");

    // Asking again queues nothing: the destination has had them.
    let out = ws.run(&config, &["deliveries", "replay", "--destination", "late"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("queued 0 stored events"), "{}", stdout(&out));
    assert_eq!(read_stream(&nats.url(), None, "GITLAB_AUDIT").len(), 100);
}

#[test]
fn replay_since_queues_only_the_later_part_of_the_trail() {
    let nats = NatsServer::start();
    let ws = Workspace::new();
    let repo = ws.init_repo("spp");
    add_policies(&ws, &repo, 0, 10); // created 10:00 .. 10:09
    let config =
        write_config(&ws, &repo, &nats_dest("late", &nats.url(), "event_types = [\"security_policy_create\"]"));
    let out = ws.run(&config, &["reconcile", "--no-deliver"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The outbox already holds all ten: replay adds none of them.
    let out = ws.run(&config, &["deliveries", "replay", "--destination", "late", "--since", "2024-01-01T10:05:00Z"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("queued 0 stored events"), "{}", stdout(&out));
    assert_eq!(read_stream(&nats.url(), None, "GITLAB_AUDIT").len(), 10);

    // A second destination asks only for the later half.
    let both = format!(
        "{}{}",
        nats_dest("late", &nats.url(), ""),
        nats_dest("half", &nats.url(), "").replace("gitlab.audit.policy", "half.audit").replace("GITLAB_AUDIT", "HALF")
    );
    let config = write_config(&ws, &repo, &both);
    let out = ws.run(&config, &["deliveries", "replay", "--destination", "half", "--since", "2024-01-01T10:05:00Z"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stored = stored_ids(&ws, &config);
    assert_eq!(ids(&read_stream(&nats.url(), None, "HALF")), stored[5..].to_vec());
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, made with openssl:
/// (CA certificate, server certificate, server key).
fn test_pki(ws: &Workspace) -> (PathBuf, PathBuf, PathBuf) {
    let p = |name: &str| ws.path(name).display().to_string();
    ws.write("server.ext", "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let steps: [Vec<String>; 3] = [
        ["req", "-x509"]
            .iter()
            .chain(&ec)
            .chain(&["-days", "2", "-subj", "/CN=policy-audit test CA"])
            .map(|s| s.to_string())
            .chain(["-keyout".into(), p("ca.key"), "-out".into(), p("ca.pem")])
            .collect(),
        ["req"]
            .iter()
            .chain(&ec)
            .chain(&["-subj", "/CN=127.0.0.1"])
            .map(|s| s.to_string())
            .chain(["-keyout".into(), p("key.pem"), "-out".into(), p("server.csr")])
            .collect(),
        ["x509", "-req", "-days", "2", "-CAcreateserial"]
            .iter()
            .map(|s| s.to_string())
            .chain(["-in".into(), p("server.csr"), "-CA".into(), p("ca.pem"), "-CAkey".into(), p("ca.key")])
            .chain(["-extfile".into(), p("server.ext"), "-out".into(), p("cert.pem")])
            .collect(),
    ];
    openssl(&steps);
    (ws.path("ca.pem"), ws.path("cert.pem"), ws.path("key.pem"))
}

#[test]
fn a_tls_server_is_trusted_through_ca_file_and_refused_without_it() {
    let ws = Workspace::new();
    let (ca, cert, key) = test_pki(&ws);
    let nats = NatsServer::start_tls(&cert, &key);
    let repo = ws.init_repo("spp");
    add_policies(&ws, &repo, 0, 2);
    let url = format!("tls://127.0.0.1:{}", nats.port);

    // Without the CA the certificate is not trusted: retried, with TLS named in the reason.
    let config = write_config(&ws, &repo, &nats_dest("bus", &url, ""));
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("destination bus: 0 delivered, 2 queued for retry"), "{}", stdout(&out));
    assert!(stdout(&out).to_lowercase().contains("tls"), "{}", stdout(&out));

    let config = write_config(&ws, &repo, &nats_dest("bus", &url, &format!("ca_file = \"{}\"", ca.display())));
    let loaded = Config::load(&config).expect("config");
    let store = Store::open(&loaded.db_dir()).expect("store");
    let clock = TestClock(AtomicI64::new(jiff::Timestamp::now().as_millisecond() + 3_600_000));
    let reports = deliver_due(&loaded, &store, &clock, 3).expect("delivery round");
    assert_eq!((reports[0].delivered, reports[0].pending), (2, 0), "{:?}", reports[0]);
}

/// Runs each openssl command line in turn; a missing openssl names the script that installs it.
fn openssl(steps: &[Vec<String>]) {
    for args in steps {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl ({e}): install it with scripts/install-deps.sh"));
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    }
}

/// A client certificate signed by the test CA (made by `test_pki`), its key mode 0600.
fn client_pki(ws: &Workspace) -> (PathBuf, PathBuf) {
    let p = |name: &str| ws.path(name).display().to_string();
    ws.write("client.ext", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n");
    let steps: [Vec<String>; 2] = [
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=policy-audit"]
            .iter()
            .map(|s| s.to_string())
            .chain(["-keyout".into(), p("client.key"), "-out".into(), p("client.csr")])
            .collect(),
        ["x509", "-req", "-days", "2", "-CAcreateserial"]
            .iter()
            .map(|s| s.to_string())
            .chain(["-in".into(), p("client.csr"), "-CA".into(), p("ca.pem"), "-CAkey".into(), p("ca.key")])
            .chain(["-extfile".into(), p("client.ext"), "-out".into(), p("client.pem")])
            .collect(),
    ];
    openssl(&steps);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(ws.path("client.key"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (ws.path("client.pem"), ws.path("client.key"))
}

#[test]
fn a_server_that_requires_a_client_certificate_takes_ours_and_refuses_a_run_without_it() {
    let ws = Workspace::new();
    let (ca, cert, key) = test_pki(&ws);
    let (client_cert, client_key) = client_pki(&ws);
    let nats = NatsServer::start_mtls(&cert, &key, &ca);
    let repo = ws.init_repo("spp");
    add_policies(&ws, &repo, 0, 2);
    let url = format!("tls://127.0.0.1:{}", nats.port);

    // Trusting the server is not enough: without a certificate of ours, nothing is delivered.
    let trust = format!("ca_file = \"{}\"", ca.display());
    let config = write_config(&ws, &repo, &nats_dest("bus", &url, &trust));
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("destination bus: 0 delivered, 2 queued for retry"), "{}", stdout(&out));

    // With it: delivered.
    let mtls = format!(
        "{trust}\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        client_cert.display(),
        client_key.display()
    );
    let config = write_config(&ws, &repo, &nats_dest("bus", &url, &mtls));
    let loaded = Config::load(&config).expect("config");
    let store = Store::open(&loaded.db_dir()).expect("store");
    let clock = TestClock(AtomicI64::new(jiff::Timestamp::now().as_millisecond() + 3_600_000));
    let reports = deliver_due(&loaded, &store, &clock, 3).expect("delivery round");
    assert_eq!((reports[0].delivered, reports[0].pending), (2, 0), "{:?}", reports[0]);
}
