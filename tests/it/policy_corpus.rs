//! GitLab's verdict, file by file (`tests/policy_corpus/`): valid files load and are enforced,
//! invalid ones are refused with every expected error and its path. Run with the built-in
//! schema, with the same schema given as a file, and end to end through the binary with
//! `policy_schema_file` in the config, where a schema of an older GitLab decides otherwise.

use crate::common::{Workspace, commit, events_json};
use policy_audit::policy::{self, BUILTIN_SCHEMA, PolicySchema};
use std::path::{Path, PathBuf};

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy_corpus").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    files
}

fn name(p: &Path) -> String {
    p.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

fn expectations(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect()
}

/// Asserts every file's verdict under `schema`; returns how many files were checked.
fn check_corpus(schema: &PolicySchema) -> usize {
    let mut checked = 0;
    for file in corpus("valid") {
        let bytes = std::fs::read(&file).expect("read");
        let set = policy::parse_with(&bytes, schema).unwrap_or_else(|e| panic!("{} should be valid: {e}", name(&file)));
        assert!(!set.is_empty(), "{}: no policies read", name(&file));
        checked += 1;
    }
    for file in corpus("invalid") {
        let text = std::fs::read_to_string(&file).expect("read");
        let wanted = expectations(&text);
        assert!(!wanted.is_empty(), "{}: no `# expect:` line", name(&file));
        let err = policy::parse_with(text.as_bytes(), schema)
            .map(|set| set.len())
            .expect_err(&format!("{} should be invalid", name(&file)));
        for want in wanted {
            assert!(
                err.errors.iter().any(|e| e.contains(want)),
                "{}: no error contains {want:?}; errors: {:#?}",
                name(&file),
                err.errors
            );
        }
        checked += 1;
    }
    checked
}

#[test]
fn every_corpus_file_gets_gitlabs_verdict_with_the_builtin_schema() {
    let checked = check_corpus(PolicySchema::builtin());
    assert!(checked >= 120, "corpus looks incomplete: {checked} files");
}

#[test]
fn the_same_schema_given_as_a_file_gives_the_same_verdicts() {
    let ws = Workspace::new();
    let file = ws.write("schema.json", BUILTIN_SCHEMA);
    let schema = PolicySchema::from_file(&file).expect("schema file compiles");
    assert_eq!(schema.source(), Some(file.as_path()));
    check_corpus(&schema);
}

#[test]
fn ci_component_publishing_policies_are_tracked_as_policies() {
    let text = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy_corpus/valid/ci_component_publishing.yml"),
    )
    .expect("read");
    let set = policy::parse(&text).expect("valid");
    assert_eq!(set.policies[0].policy_type.key(), "ci_component_publishing_policy");
    assert_eq!(set.policies[0].name, "Publish from trusted");
}

/// A schema of an older GitLab (16.x), where `newly_detected` was still a vulnerability state.
fn older_gitlab_schema() -> String {
    let schema = BUILTIN_SCHEMA.replacen(
        r#""enum": ["detected", "confirmed", "resolved", "dismissed", "new_needs_triage", "new_dismissed"]"#,
        r#""enum": ["newly_detected", "detected", "confirmed", "resolved", "dismissed", "new_needs_triage", "new_dismissed"]"#,
        1,
    );
    assert_ne!(schema, BUILTIN_SCHEMA, "the vulnerability_states enum moved in the built-in schema");
    schema
}

const NEWLY_DETECTED: &str = "approval_policy:
- name: Legacy states
  enabled: true
  rules:
  - type: scan_finding
    branches: [main]
    scanners: [sast]
    vulnerabilities_allowed: 0
    severity_levels: [critical]
    vulnerability_states: [newly_detected]
  actions:
  - type: require_approval
    approvals_required: 1
    role_approvers: [maintainer]
";

#[test]
fn policy_schema_file_in_the_config_decides() {
    let ws = Workspace::new();
    let repo = ws.init_repo("spp");
    ws.write("spp/.gitlab/security-policies/policy.yml", NEWLY_DETECTED);
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "legacy states");
    let project =
        format!("[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n", repo.display());

    // The built-in schema (a current GitLab) refuses `newly_detected`.
    let builtin = ws.write("builtin/config.toml", &format!("state_dir = \"state\"\n{project}"));
    let out = ws.run(&builtin, &["reconcile", "--no-deliver"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events = events_json(&ws, &builtin);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["event_type"], "security_policy_yaml_invalidated");
    let errors = events[0]["details"]["validation_errors"].as_array().expect("errors listed");
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e
                .starts_with("approval_policy[0].rules[0].vulnerability_states[0]: \"newly_detected\" is not one of"))),
        "{errors:#?}"
    );

    // The administrator's GitLab is older: its schema accepts the file.
    ws.write("older/schema.json", &older_gitlab_schema());
    let older = ws
        .write("older/config.toml", &format!("state_dir = \"state\"\npolicy_schema_file = \"schema.json\"\n{project}"));
    let check = ws.run(&older, &["check-config"]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let out = ws.run(&older, &["reconcile", "--no-deliver"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events = events_json(&ws, &older);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event_type"].as_str()).collect();
    assert_eq!(kinds, ["security_policy_create"], "{events:#?}");
}

#[test]
fn check_config_names_a_schema_file_that_is_not_a_schema() {
    let ws = Workspace::new();
    ws.write("schema.json", r#"{"type": "strng"}"#);
    let config = ws.write("config.toml", "state_dir = \"state\"\npolicy_schema_file = \"schema.json\"\n");
    let out = ws.run(&config, &["check-config"]);
    assert_eq!(out.status.code(), Some(2), "unusable input");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config.toml:2:") && stderr.contains("schema.json is not a usable JSON schema"),
        "{stderr}"
    );
    let missing = ws.write("missing.toml", "state_dir = \"state\"\npolicy_schema_file = \"nope.json\"\n");
    let out = ws.run(&missing, &["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read policy schema file"), "{out:?}");
}

/// Kills the daemon if a test fails before it stops it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_daemon_reload_picks_up_a_new_policy_schema_file() {
    let ws = Workspace::new();
    let repo = ws.init_repo("spp");
    ws.write("spp/.gitlab/security-policies/policy.yml", NEWLY_DETECTED);
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "legacy states");
    ws.write("schema.json", BUILTIN_SCHEMA);
    let config = ws.write(
        "config.toml",
        &format!(
            "schedule = \"0 0 0 1 1 *\"\nstate_dir = \"state\"\npolicy_schema_file = \"schema.json\"\n\
             [[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            repo.display()
        ),
    );
    let log = ws.path("daemon.log");
    let child = crate::common::spawn_daemon(&config, std::fs::File::create(&log).expect("log").into(), &[]);
    let daemon = Running(child);
    let socket = ws.path("state/control.sock");
    crate::common::wait_for("the control socket", std::time::Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    // The start-up reconcile refuses the file under the current schema.
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kinds = |ws: &Workspace| -> Vec<String> {
        events_json(ws, &config).iter().filter_map(|e| e["event_type"].as_str().map(str::to_string)).collect()
    };
    assert_eq!(kinds(&ws), ["security_policy_yaml_invalidated"]);

    // The administrator points the file at an older GitLab's schema and reloads.
    ws.write("schema.json", &older_gitlab_schema());
    let ok =
        std::process::Command::new("kill").args(["-HUP", &daemon.0.id().to_string()]).status().expect("kill").success();
    assert!(ok);
    crate::common::wait_for("the reload", std::time::Duration::from_secs(20), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("config reloaded")
    });
    ws.write("spp/.gitlab/security-policies/policy.yml", &NEWLY_DETECTED.replace("Legacy states", "Legacy states v2"));
    commit(&repo, "Bob", "bob@example.com", "2024-01-02T10:00:00Z", "rename");
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(kinds(&ws), ["security_policy_yaml_invalidated", "security_policy_create"]);
}
