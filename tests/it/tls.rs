//! TLS as enterprises run it, against a CA made by the test: an internal CA trusted through
//! `ca_file` or `SSL_CERT_FILE`, a receiver that requires a client certificate, a hostname
//! mismatch, git fetches over TLS, and `check-config` / `status` naming the certificate file
//! that is wrong or about to expire.

use crate::common::{BIN, Workspace, commit, events_json, git, stderr, stdout};
use crate::git_http::GitHttpServer;
use crate::receiver::Receiver;
use crate::tls_front::{Pki, TlsFront, chmod};
use policy_audit::config::Config;
use policy_audit::store::Store;
use policy_audit::stream::{Clock, deliver_due};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;

const POLICY: &str = ".gitlab/security-policies/policy.yml";

/// A policy repository whose backfill makes two events.
fn spp(ws: &Workspace) -> PathBuf {
    let repo = ws.init_repo("spp");
    ws.write(&format!("spp/{POLICY}"), "approval_policy:\n- {name: One, enabled: true}\n");
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "add one");
    ws.write(
        &format!("spp/{POLICY}"),
        "approval_policy:\n- {name: One, enabled: true}\n- {name: Two, enabled: false}\n",
    );
    commit(&repo, "Alice", "alice@example.com", "2024-01-02T10:00:00Z", "add two");
    repo
}

/// A config delivering the local `repo`'s events to one destination at `url` with `tls` keys.
fn config(ws: &Workspace, name: &str, state: &str, repo: &Path, url: &str, tls: &str) -> PathBuf {
    ws.write(
        name,
        &format!(
            "state_dir = \"{state}\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n\
             [[destinations]]\nname = \"siem\"\nurl = \"{url}\"\ntimeout = \"5s\"\n{tls}\n",
            repo.display()
        ),
    )
}

fn ca_file(pki: &Pki) -> String {
    format!("ca_file = \"{}\"\n", pki.path("ca.pem").display())
}

fn client_cert(pki: &Pki, name: &str) -> String {
    format!(
        "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        pki.path(&format!("{name}.pem")).display(),
        pki.path(&format!("{name}.key")).display()
    )
}

/// Runs the binary with the system trust store as this host has it (no `SSL_CERT_*` from the
/// test's environment), plus `env`.
fn run(ws: &Workspace, config: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("POLICY_AUDIT_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .env("HOME", ws.dir.path())
        .output()
        .expect("run policy-audit")
}

fn pending(ws: &Workspace, config: &Path) -> Vec<serde_json::Value> {
    let out = run(ws, config, &["deliveries", "--state", "pending", "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("deliveries --json")
}

fn stored_ids(ws: &Workspace, config: &Path) -> Vec<String> {
    events_json(ws, config).iter().map(|e| e["id"].as_str().unwrap_or_default().to_string()).collect()
}

struct LaterClock(i64);

impl Clock for LaterClock {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::from_millisecond(self.0).expect("a valid test time")
    }
}

#[test]
fn without_the_internal_ca_delivery_fails_clearly_and_waits_then_ca_file_delivers_it() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    let receiver = Receiver::start(vec![]);
    let front = TlsFront::start(receiver.port, &pki.path("server.pem"), &pki.path("server.key"), None);
    let repo = spp(&ws);
    let cfg = config(&ws, "c.toml", "state", &repo, &front.url("audit"), "");

    let out = run(&ws, &cfg, &["reconcile"], &[]);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("not signed by a CA this host trusts") && said.contains("ca_file"), "{said}");
    assert!(receiver.requests().is_empty());
    // Not lost: both wait in the outbox with the reason.
    let waiting = pending(&ws, &cfg);
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    let status = stdout(&run(&ws, &cfg, &["status"], &[]));
    assert!(status.contains("not signed by a CA this host trusts"), "{status}");

    // The operator sets `ca_file`; the next round (past the backoff) delivers them.
    config(&ws, "c.toml", "state", &repo, &front.url("audit"), &ca_file(&pki));
    let config = Config::load(&cfg).expect("config with ca_file");
    let store = Store::open(&config.db_dir()).expect("store");
    let later = LaterClock(jiff::Timestamp::now().as_millisecond() + 3_600_000);
    let reports = deliver_due(&config, &store, &later, 1).expect("deliver");
    assert_eq!(reports[0].delivered, 2, "{reports:?}");
    drop(store);
    assert_eq!(receiver.ids(), stored_ids(&ws, &cfg));
}

#[test]
fn with_ca_file_the_internal_ca_is_trusted() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    let receiver = Receiver::start(vec![]);
    let front = TlsFront::start(receiver.port, &pki.path("server.pem"), &pki.path("server.key"), None);
    let cfg = config(&ws, "c.toml", "state", &spp(&ws), &front.url("audit"), &ca_file(&pki));
    let out = run(&ws, &cfg, &["reconcile"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(receiver.ids(), stored_ids(&ws, &cfg));
    assert!(pending(&ws, &cfg).is_empty());
}

#[test]
fn with_ssl_cert_file_the_internal_ca_is_trusted_as_openssl_tools_do() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    let receiver = Receiver::start(vec![]);
    let front = TlsFront::start(receiver.port, &pki.path("server.pem"), &pki.path("server.key"), None);
    let cfg = config(&ws, "c.toml", "state", &spp(&ws), &front.url("audit"), "");
    let out = run(&ws, &cfg, &["reconcile"], &[("SSL_CERT_FILE", &pki.path("ca.pem"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(receiver.ids(), stored_ids(&ws, &cfg));
}

#[test]
fn a_receiver_requiring_a_client_certificate_accepts_ours_and_refuses_a_run_without() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    let receiver = Receiver::start(vec![]);
    let ca = pki.path("ca.pem");
    let front = TlsFront::start(receiver.port, &pki.path("server.pem"), &pki.path("server.key"), Some(&ca));
    let repo = spp(&ws);

    let without = config(&ws, "without.toml", "state1", &repo, &front.url("audit"), &ca_file(&pki));
    let out = run(&ws, &without, &["reconcile"], &[]);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("client_cert_file"), "{said}");
    assert!(receiver.requests().is_empty());
    assert!(front.refused.load(Ordering::SeqCst) > 0);
    assert_eq!(pending(&ws, &without).len(), 2);

    let tls = format!("{}{}", ca_file(&pki), client_cert(&pki, "client"));
    let with = config(&ws, "with.toml", "state2", &repo, &front.url("audit"), &tls);
    let out = run(&ws, &with, &["reconcile"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(receiver.ids(), stored_ids(&ws, &with));
    // The key is never printed.
    let key = std::fs::read_to_string(pki.path("client.key")).expect("key");
    let secret_line = key.lines().nth(1).expect("key body");
    for o in [&out, &run(&ws, &with, &["status", "--json"], &[])] {
        assert!(!stdout(o).contains(secret_line) && !stderr(o).contains(secret_line));
    }
}

#[test]
fn a_certificate_for_another_host_name_is_refused() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    let receiver = Receiver::start(vec![]);
    let front = TlsFront::start(receiver.port, &pki.path("wrong-host.pem"), &pki.path("wrong-host.key"), None);
    let cfg = config(&ws, "c.toml", "state", &spp(&ws), &front.url("audit"), &ca_file(&pki));
    let out = run(&ws, &cfg, &["reconcile"], &[]);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("not issued for the host name"), "{said}");
    assert!(receiver.requests().is_empty());
    assert_eq!(pending(&ws, &cfg).len(), 2);
}

#[test]
fn a_client_key_readable_by_other_users_is_refused() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    chmod(&pki.path("client.key"), 0o644);
    let tls = format!("{}{}", ca_file(&pki), client_cert(&pki, "client"));
    let cfg = config(&ws, "c.toml", "state", &spp(&ws), "https://127.0.0.1:9/audit", &tls);
    let out = run(&ws, &cfg, &["check-config"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("client_key_file") && err.contains("readable by other users"), "{err}");
    assert!(err.contains(&format!("chmod 600 {}", pki.path("client.key").display())), "{err}");
    let out = run(&ws, &cfg, &["reconcile"], &[]);
    assert_eq!(out.status.code(), Some(2), "the daemon and reconcile refuse it too");
}

#[test]
fn check_config_names_each_wrong_certificate_file_and_why() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    pki.issue_expired("old");
    let not_a_cert = ws.write("pki/notes.pem", "this is a ticket number, not a certificate\n");
    let dest = |name: &str, tls: String| {
        format!("[[destinations]]\nname = \"{name}\"\nurl = \"https://siem.example.com/{name}\"\n{tls}\n")
    };
    let text = format!(
        "state_dir = \"state\"\n{}{}{}{}",
        dest("garbage", format!("ca_file = \"{}\"\n", not_a_cert.display())),
        dest("expired", client_cert(&pki, "old")),
        dest(
            "mismatch",
            format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                pki.path("client.pem").display(),
                pki.path("server.key").display()
            )
        ),
        dest("good", format!("{}{}", ca_file(&pki), client_cert(&pki, "client"))),
    );
    let cfg = ws.write("c.toml", &text);
    let out = run(&ws, &cfg, &["check-config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let line = |dest: &str| err.lines().find(|l| l.contains(&format!("destination \"{dest}\""))).unwrap_or_default();
    assert!(
        line("garbage").contains("`ca_file`") && line("garbage").contains("notes.pem is not a PEM certificate"),
        "{err}"
    );
    assert!(line("expired").contains("old.pem") && line("expired").contains("expired on 2020-02-01"), "{err}");
    assert!(
        line("mismatch").contains("server.key does not match the certificate in")
            && line("mismatch").contains("client.pem"),
        "{err}"
    );
    assert!(line("good").is_empty(), "{err}");
    assert_eq!(err.lines().count(), 3, "{err}");
}

#[test]
fn status_shows_a_configured_certificate_that_expires_within_30_days() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    pki.issue("soon", "extendedKeyUsage=clientAuth", 10);
    let tls = format!("{}{}", ca_file(&pki), client_cert(&pki, "soon"));
    let cfg = config(&ws, "c.toml", "state", &spp(&ws), "https://127.0.0.1:9/audit", &tls);
    let out = run(&ws, &cfg, &["reconcile", "--no-deliver"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = stdout(&run(&ws, &cfg, &["status"], &[]));
    let line = status.lines().find(|l| l.contains("soon.pem")).unwrap_or_default();
    assert!(line.contains("expires") && line.contains("days"), "{status}");
    // The CA, valid for 90 days, is not mentioned.
    assert!(!status.contains("ca.pem"), "{status}");
    let json: serde_json::Value =
        serde_json::from_slice(&run(&ws, &cfg, &["status", "--json"], &[]).stdout).expect("status json");
    let expiring = json["certificates_expiring"].as_array().expect("certificates_expiring");
    assert_eq!(expiring.len(), 1, "{json}");
    assert_eq!(expiring[0]["key"], "client_cert_file");
    assert!(expiring[0]["days_left"].as_i64().is_some_and(|d| (8..=10).contains(&d)), "{json}");
}

#[test]
fn git_fetch_over_tls_trusts_ca_file_and_fails_clearly_without_it() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    let repo = spp(&ws);
    let bare = ws.path("served/spp.git");
    git(ws.dir.path(), &["clone", "-q", "--bare", &repo.to_string_lossy(), &bare.to_string_lossy()]);
    let server = GitHttpServer::start(&ws.path("served"), None);
    let front = TlsFront::start(server.port, &pki.path("server.pem"), &pki.path("server.key"), None);
    let project = |tls: &str| {
        format!(
            "state_dir = \"state\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n{tls}",
            front.url("spp.git")
        )
    };
    let cfg = ws.write("c.toml", &project(""));
    let out = run(&ws, &cfg, &["reconcile"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("acme/spp") && err.contains("not signed by a CA this host trusts"), "{err}");
    assert!(events_json(&ws, &cfg).is_empty());

    ws.write("c.toml", &project(&ca_file(&pki)));
    let out = run(&ws, &cfg, &["reconcile"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(events_json(&ws, &cfg).len(), 2);

    // The system trust store as OpenSSL tools read it works for fetches too.
    ws.write("c.toml", &project(""));
    let out = run(&ws, &cfg, &["reconcile"], &[("SSL_CERT_FILE", &pki.path("ca.pem"))]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_client_key_that_disappears_after_loading_fails_the_attempt_and_keeps_the_delivery() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    let receiver = Receiver::start(vec![]);
    let front = TlsFront::start(receiver.port, &pki.path("server.pem"), &pki.path("server.key"), None);
    let tls = format!("{}{}", ca_file(&pki), client_cert(&pki, "client"));
    let cfg = config(&ws, "c.toml", "state", &spp(&ws), &front.url("audit"), &tls);
    let out = run(&ws, &cfg, &["reconcile", "--no-deliver"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config = Config::load(&cfg).expect("config");
    std::fs::remove_file(pki.path("client.key")).expect("remove key");
    let store = Store::open(&config.db_dir()).expect("store");
    let reports =
        deliver_due(&config, &store, &LaterClock(jiff::Timestamp::now().as_millisecond()), 1).expect("deliver");
    assert_eq!((reports[0].delivered, reports[0].retried, reports[0].pending), (0, 1, 2), "{reports:?}");
    let reason = reports[0].last_error.clone().unwrap_or_default();
    assert!(reason.contains("client.key") && reason.contains("destination \"siem\""), "{reason}");
    assert!(receiver.requests().is_empty());
}

#[test]
fn git_fetch_through_a_proxy_that_requires_a_client_certificate_presents_ours() {
    let ws = Workspace::new();
    let pki = Pki::new(&ws.path("pki"));
    let repo = spp(&ws);
    let bare = ws.path("served/spp.git");
    git(ws.dir.path(), &["clone", "-q", "--bare", &repo.to_string_lossy(), &bare.to_string_lossy()]);
    let server = GitHttpServer::start(&ws.path("served"), None);
    let ca = pki.path("ca.pem");
    let front = TlsFront::start(server.port, &pki.path("server.pem"), &pki.path("server.key"), Some(&ca));
    let project = |tls: &str| {
        format!(
            "state_dir = \"state\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n{tls}",
            front.url("spp.git")
        )
    };
    let cfg = ws.write("c.toml", &project(&ca_file(&pki)));
    let out = run(&ws, &cfg, &["reconcile"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("acme/spp") && err.contains("client_cert_file"), "{err}");
    assert!(front.refused.load(Ordering::SeqCst) > 0);
    assert!(events_json(&ws, &cfg).is_empty());

    ws.write("c.toml", &project(&format!("{}{}", ca_file(&pki), client_cert(&pki, "client"))));
    let out = run(&ws, &cfg, &["reconcile"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(events_json(&ws, &cfg).len(), 2);
}
