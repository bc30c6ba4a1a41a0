//! `policy-audit demo`: builds a sample Security Policy Project with a realistic history in a
//! temporary folder (several authors, a merge request merged with a merge commit, an update, a
//! rename, an invalid commit and its fix), reconciles it with the embedded store and prints the
//! trail. Needs no network and no setup beyond `git` on PATH.

use crate::app::{EXIT_FAILED, Format, Output};
use crate::config::Config;
use crate::reconcile::{Options, reconcile_all};
use crate::store::{EventQuery, Store};
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

mod receiver;

pub use receiver::LocalReceiver;

const DEMO_SECRET: &str = "whsec_ZGVtby1zaWduaW5nLXNlY3JldC1mb3ItcG9saWN5LWF1ZGl0";

const POLICY: &str = ".gitlab/security-policies/policy.yml";

pub fn run() -> Output {
    match walkthrough(false) {
        Ok((text, _)) => Output { stdout: text, ..Output::default() },
        Err(e) => Output { stderr: format!("error: demo failed: {e:#}\n"), code: EXIT_FAILED, ..Output::default() },
    }
}

/// `demo --serve`: the walkthrough, then its trail in the web page and API until Ctrl-C.
pub fn run_and_serve(listen: std::net::SocketAddr, stdout: &mut dyn std::io::Write) -> Output {
    let served = walkthrough(true).and_then(|(text, kept)| {
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        let Kept { _tmp, mut config, store } = kept;
        let token = crate::store::chain::hex(&rand::random::<[u8; 16]>());
        config.server = Some(crate::config::ServerConfig {
            listen,
            token: Some(crate::config::Secret::new(token.clone())),
            webhook_secret: None,
            public_url: None,
            gitlab_url: None,
            token_namespaces: Vec::new(),
            sign_in: None,
        });
        crate::server::serve_until_signal(config, store, |addr| {
            let _ = writeln!(
                stdout,
                "\n7. The trail in the browser (Audit events page and GitLab's audit events API), until Ctrl-C:\n\n   http://{addr}/login?token={token}\n\n   API: curl -H 'PRIVATE-TOKEN: {token}' http://{addr}/api/v4/projects/1234/audit_events"
            );
            let _ = stdout.flush();
        })
    });
    match served {
        Ok(()) => Output::default(),
        Err(e) => Output { stderr: format!("error: demo failed: {e:#}\n"), code: EXIT_FAILED, ..Output::default() },
    }
}

/// What `demo --serve` keeps open after the walkthrough.
struct Kept {
    _tmp: tempfile::TempDir,
    config: Config,
    store: Store,
}

fn walkthrough(serve: bool) -> Result<(String, Kept)> {
    let tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
    let repo = tmp.path().join("security-policies");
    let mut out = String::new();
    writeln!(out, "policy-audit demo\n=================\n")?;
    writeln!(out, "1. Building a sample Security Policy Project in {}", repo.display())?;
    let history = build_history(&repo)?;
    for line in &history {
        writeln!(out, "   {line}")?;
    }

    let key = crate::stream::http::signing_key(&crate::config::Secret::new(DEMO_SECRET));
    let receiver = LocalReceiver::start(key).context("cannot start the demo's local receiver")?;
    std::fs::write(tmp.path().join("signing-secret"), DEMO_SECRET)?;
    let config_text = format!(
        "state_dir = \"state\"\n\
         [authors]\n\"alice@acme.example\" = 42\n\n\
         [[projects]]\npath = \"acme/security-policies\"\nid = 1234\nurl = \"{}\"\nbranch = \"main\"\n\
         linked = [\"acme\", \"acme/web/shop\"]\ninitial_sync = \"backfill\"\n\n\
         [[destinations]]\nname = \"local-siem\"\nurl = \"{}\"\nsigning_secret_file = \"signing-secret\"\n",
        repo.display(),
        receiver.url
    );
    let config_path = tmp.path().join("config.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = Config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::open(&config.db_dir())?;

    writeln!(out, "\n2. Reconciling it (first sync with initial_sync = \"backfill\": the whole history is replayed)")?;
    let projects: Vec<_> = config.projects.iter().collect();
    for (_, result) in reconcile_all(&config, &store, &projects, &Options::default(), &crate::clock::SystemClock) {
        writeln!(out, "   {}", crate::app::reconcile::describe(&result?))?;
    }

    writeln!(out, "\n3. The audit trail (policy-audit events):\n")?;
    let events = store.events(&EventQuery::default())?;
    let mut table = Vec::new();
    crate::app::events::render(&events, Format::Table, &mut table)?;
    for line in String::from_utf8_lossy(&table).lines() {
        writeln!(out, "   {line}")?;
    }
    writeln!(out, "\n   A rename shows as a delete of the old name plus a create of the new one; the invalid")?;
    writeln!(out, "   commit produced one security_policy_yaml_invalidated event and no deletes, and its fix")?;
    writeln!(out, "   was compared with the last valid state.")?;

    if let Some(mr) = events.iter().find(|e| e.details.merge_request.is_some()) {
        writeln!(out, "\n4. One event in full, as stored and streamed (GitLab's audit event schema):\n")?;
        for line in serde_json::to_string_pretty(mr)?.lines() {
            writeln!(out, "   {line}")?;
        }
    }

    writeln!(out, "\n5. Streaming to a local receiver at {} (as a SIEM would receive them)", receiver.url)?;
    let mut delivery = Output::default();
    crate::app::deliveries::deliver_now(&config, &store, &mut delivery);
    for line in delivery.stdout.lines() {
        writeln!(out, "   {line}")?;
    }
    let got = receiver.received();
    let verified = got.iter().filter(|r| r.signature_ok).count();
    writeln!(out, "   the receiver got {} POSTs, {verified} with a valid Standard Webhooks signature:", got.len())?;
    let mut kinds: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for r in &got {
        *kinds.entry(r.event_type.as_str()).or_default() += 1;
    }
    for (kind, n) in kinds {
        writeln!(out, "     {n} x {kind}")?;
    }

    writeln!(out, "\n6. Reconciling again: nothing new, nothing stored twice")?;
    for (_, result) in reconcile_all(&config, &store, &projects, &Options::default(), &crate::clock::SystemClock) {
        writeln!(out, "   {}", crate::app::reconcile::describe(&result?))?;
    }
    if !serve {
        writeln!(
            out,
            "\nThe temporary folder is removed now. Point a config.toml at your own policy projects and run"
        )?;
        writeln!(out, "`policy-audit check-config`, then `policy-audit reconcile`.")?;
    }
    Ok((out, Kept { _tmp: tmp, config, store }))
}

struct Author {
    name: &'static str,
    email: &'static str,
}

const ALICE: Author = Author { name: "Alice Martin", email: "alice@acme.example" };
const BOB: Author = Author { name: "Bob Okafor", email: "bob@acme.example" };
const CAROL: Author = Author { name: "Carol Nguyen", email: "carol@acme.example" };
const DAVE: Author = Author { name: "Dave Schmidt", email: "dave@acme.example" };

fn build_history(repo: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(repo.join(".gitlab/security-policies"))?;
    git(repo, &["init", "-q", "-b", "main"], None, "")?;
    let mut log = Vec::new();
    let step = |who: &Author, date: &str, message: &str, policy: Option<&str>, log: &mut Vec<String>| -> Result<()> {
        if let Some(text) = policy {
            std::fs::write(repo.join(POLICY), text)?;
        }
        git(repo, &["add", "-A"], None, "")?;
        git(repo, &["commit", "-q", "--allow-empty", "-m", message], Some(who), date)?;
        log.push(format!("{date}  {:<13} {}", who.name, message.lines().next().unwrap_or_default()));
        Ok(())
    };
    std::fs::write(repo.join("README.md"), "# ACME security policies\n")?;
    step(&ALICE, "2024-01-08T09:00:00Z", "Initial commit", None, &mut log)?;
    step(
        &ALICE,
        "2024-01-08T09:30:00Z",
        "Add vulnerability approval and nightly DAST policies",
        Some(&policies(1, "Nightly DAST on main", false, true)),
        &mut log,
    )?;
    git(repo, &["checkout", "-q", "-b", "license-policy"], None, "")?;
    step(
        &BOB,
        "2024-01-10T14:00:00Z",
        "Add license approval policy",
        Some(&policies(1, "Nightly DAST on main", true, true)),
        &mut log,
    )?;
    git(repo, &["checkout", "-q", "main"], None, "")?;
    git(
        repo,
        &[
            "merge",
            "-q",
            "--no-ff",
            "--no-log",
            "-m",
            "Merge branch 'license-policy' into 'main'\n\nAdd license approval policy\n\nSee merge request acme/security-policies!7",
            "license-policy",
        ],
        Some(&CAROL),
        "2024-01-11T10:15:00Z",
    )?;
    log.push(format!("2024-01-11T10:15:00Z  {:<13} Merge branch 'license-policy' into 'main' (!7)", CAROL.name));
    step(
        &DAVE,
        "2024-02-02T16:20:00Z",
        "Require two approvals for critical vulnerabilities",
        Some(&policies(2, "Nightly DAST on main", true, true)),
        &mut log,
    )?;
    step(
        &ALICE,
        "2024-02-15T11:00:00Z",
        "Rename the DAST policy",
        Some(&policies(2, "Nightly DAST", true, true)),
        &mut log,
    )?;
    let broken =
        policies(2, "Nightly DAST", true, true).replace("  enabled: true\n  rules:", "  enabled: true\n rules:");
    step(&BOB, "2024-03-01T08:45:00Z", "Tweak license rules (broken indentation)", Some(&broken), &mut log)?;
    step(
        &BOB,
        "2024-03-01T09:05:00Z",
        "Fix indentation and disable the license policy for now",
        Some(&policies(2, "Nightly DAST", true, false)),
        &mut log,
    )?;
    Ok(log)
}

fn policies(approvals: u32, dast_name: &str, with_license: bool, license_enabled: bool) -> String {
    let mut text = format!(
        "# Security policies for the ACME group, enforced on every linked project.\n\
         approval_policy:\n\
         - name: Critical vulnerabilities need AppSec approval\n  description: Block merge requests that add critical findings\n  enabled: true\n  rules:\n  - type: scan_finding\n    branches: [main]\n    scanners: [sast, container_scanning]\n    vulnerabilities_allowed: 0\n    severity_levels: [critical]\n    vulnerability_states: [new_needs_triage]\n  actions:\n  - type: require_approval\n    approvals_required: {approvals}\n    group_approvers: [acme/appsec]\n"
    );
    if with_license {
        text.push_str(&format!(
            "- name: Deny copyleft licenses\n  description: Copyleft licenses need legal review\n  enabled: {license_enabled}\n  rules:\n  - type: license_finding\n    branch_type: protected\n    match_on_inclusion_license: true\n    license_types: [GPL-3.0, AGPL-3.0]\n    license_states: [newly_detected]\n  actions:\n  - type: require_approval\n    approvals_required: 1\n    role_approvers: [maintainer]\n"
        ));
    }
    text.push_str(&format!(
        "scan_execution_policy:\n- name: {dast_name}\n  description: Run DAST every night on the default branch\n  enabled: true\n  rules:\n  - type: schedule\n    branches: [main]\n    cadence: '0 2 * * *'\n  actions:\n  - scan: dast\n    site_profile: Staging\n    scanner_profile: Quick\n"
    ));
    text
}

fn git(repo: &Path, args: &[&str], who: Option<&Author>, date: &str) -> Result<()> {
    let mut cmd = Command::new("git");
    cmd.current_dir(repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args(["-c", "commit.gpgsign=false"])
        .args(args);
    if let Some(who) = who {
        for (k, v) in [
            ("GIT_AUTHOR_NAME", who.name),
            ("GIT_AUTHOR_EMAIL", who.email),
            ("GIT_COMMITTER_NAME", who.name),
            ("GIT_COMMITTER_EMAIL", who.email),
        ] {
            cmd.env(k, v);
        }
        cmd.env("GIT_AUTHOR_DATE", date).env("GIT_COMMITTER_DATE", date);
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "the demo needs `git` on PATH to build its sample repository (install git, e.g. `apt-get install git`)"
        ),
        Err(e) => return Err(e).context("cannot run git"),
    };
    if !out.status.success() {
        bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
