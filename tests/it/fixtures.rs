//! Reconcile scenarios, one folder per case under `tests/fixtures/` (git-cliff style):
//! `case.toml` lists the reconcile phases, `history.sh <phase>` adds that phase's commits with
//! pinned dates and identities, `expected.json` holds the events each phase must add.

use crate::common::{Workspace, events_json, git, stderr};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(serde::Deserialize)]
struct Case {
    #[allow(dead_code)]
    description: String,
    phase: Vec<Phase>,
}

#[derive(serde::Deserialize)]
struct Phase {
    #[serde(default)]
    reconcile_args: Vec<String>,
    config: Option<String>,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The parts of an event that a fixture pins, with commits named by their subject line.
fn project(event: &Value, subjects: &BTreeMap<String, String>) -> Value {
    let d = &event["details"];
    let mut m = Map::new();
    m.insert("event_type".into(), event["event_type"].clone());
    for key in ["policy_type", "policy_name", "merge_request", "active_policies_names", "active_skipped_policies_names"]
    {
        if !d[key].is_null() {
            m.insert(key.into(), d[key].clone());
        }
    }
    m.insert("author_name".into(), d["author_name"].clone());
    m.insert("author_email".into(), d["author_email"].clone());
    let sha = d["security_policy_project_commit_sha"].as_str().unwrap_or_default();
    m.insert("commit".into(), json!(subjects.get(sha).cloned().unwrap_or_else(|| format!("<unknown commit {sha}>"))));
    m.insert("created_at".into(), event["created_at"].clone());
    if let Some(changes) = d["changes"].as_array() {
        let mut paths: Vec<&str> = changes.iter().filter_map(|c| c["path"].as_str()).collect();
        paths.sort();
        m.insert("changes".into(), json!(paths));
    }
    if d["history_rewritten"] == json!(true) {
        m.insert("history_rewritten".into(), json!(true));
    }
    Value::Object(m)
}

fn run_case(name: &str) {
    let case_dir = fixtures_dir().join(name);
    let case: Case = toml::from_str(&std::fs::read_to_string(case_dir.join("case.toml")).expect("case.toml"))
        .expect("case.toml parses");
    let expected: Vec<Vec<Value>> =
        serde_json::from_str(&std::fs::read_to_string(case_dir.join("expected.json")).expect("expected.json"))
            .expect("expected.json parses");
    assert_eq!(case.phase.len(), expected.len(), "{name}: one expected list per phase");

    let ws = Workspace::new();
    let repo = ws.init_repo("repo");
    let state = ws.path("state");
    let mut subjects = BTreeMap::new();
    let mut seen = 0;
    let mut ids = HashSet::new();
    for (i, (phase, want)) in case.phase.iter().zip(&expected).enumerate() {
        let n = i + 1;
        let script = std::process::Command::new("bash")
            .arg(case_dir.join("history.sh"))
            .arg(n.to_string())
            .current_dir(&repo)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("HOME", ws.dir.path())
            .output()
            .expect("bash history.sh");
        assert!(script.status.success(), "{name}: history.sh {n} failed: {}", String::from_utf8_lossy(&script.stderr));
        for line in git(&repo, &["log", "--all", "--format=%H %s"]).lines() {
            if let Some((sha, subject)) = line.split_once(' ') {
                subjects.insert(sha.to_string(), subject.to_string());
            }
        }
        let template =
            std::fs::read_to_string(case_dir.join(phase.config.as_deref().unwrap_or("config.toml"))).expect("config");
        let config = ws.write(
            "config.toml",
            &template.replace("@REPO@", &repo.to_string_lossy()).replace("@STATE@", &state.to_string_lossy()),
        );
        let mut args = vec!["reconcile"];
        args.extend(phase.reconcile_args.iter().map(String::as_str));
        let out = ws.run(&config, &args);
        assert!(out.status.success(), "{name}: reconcile {n} failed ({:?}): {}", out.status, stderr(&out));

        let all = events_json(&ws, &config);
        let new: Vec<&Value> = all.iter().skip(seen).collect();
        seen = all.len();
        for e in &new {
            assert!(ids.insert(e["id"].as_str().unwrap_or_default().to_string()), "{name}: duplicate id {}", e["id"]);
        }
        let got: Vec<Value> = new.iter().map(|e| project(e, &subjects)).collect();
        assert_eq!(
            &got,
            want,
            "{name}, phase {n}: events differ\n got: {}\nwant: {}",
            serde_json::to_string_pretty(&got).unwrap_or_default(),
            serde_json::to_string_pretty(want).unwrap_or_default()
        );
    }
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { run_case(stringify!($name)); })*

        #[test]
        fn every_fixture_folder_has_a_test() {
            let listed: Vec<&str> = vec![$(stringify!($name)),*];
            for entry in std::fs::read_dir(fixtures_dir()).expect("fixtures dir") {
                let entry = entry.expect("entry");
                if !entry.path().is_dir() {
                    continue; // lib.sh: shared by the cases' scripts
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                assert!(listed.contains(&name.as_str()), "fixture {name} has no test: add it to cases!");
            }
        }
    };
}

cases!(
    author_not_committer,
    backfill_original_times,
    flag_off_then_on,
    force_push,
    invalid_then_fix,
    legacy_alias,
    limit_exceeded_once,
    mr_merge_attribution,
    policy_file_deleted,
    reformat_only,
    same_repo_twice,
    several_commits_between_reconciles,
);
