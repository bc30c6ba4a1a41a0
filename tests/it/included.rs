//! What no one audits today (SPEC §14, issue 28): the CI files pipeline execution policies
//! include from other projects. Real git repositories laid out as one GitLab would serve them
//! (`gitlab/<group>/<project>`), so the included project's URL is the SPP's with its path
//! replaced; reconciled by the real binary; a reconcile killed with SIGKILL mid-way.

use crate::common::{BIN, Workspace, commit, events_json, git, stderr};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const POLICY: &str = ".gitlab/security-policies/policy.yml";

fn pipeline_policy(name: &str, file: &str, reference: Option<&str>) -> String {
    let r = reference.map(|r| format!(", ref: {r}")).unwrap_or_default();
    format!(
        "- name: {name}\n  enabled: true\n  pipeline_config_strategy: inject_policy\n  content:\n    include:\n    - {{project: ci/templates, file: {file}{r}}}\n"
    )
}

struct World {
    ws: Workspace,
    spp: PathBuf,
    templates: PathBuf,
    config: PathBuf,
}

/// An SPP with `policies` and the project `ci/templates` holding pipeline.yml and other.yml.
fn world(policies: &[String]) -> World {
    let ws = Workspace::new();
    let templates = ws.init_repo("gitlab/ci/templates");
    ws.write("gitlab/ci/templates/pipeline.yml", "stages: [test]\nsast:\n  script: [scan]\nlint:\n  script: [lint]\n");
    ws.write("gitlab/ci/templates/other.yml", "other:\n  script: [x]\n");
    commit(&templates, "Tess Templar", "tess@acme.example", "2024-02-01T10:00:00Z", "CI templates");
    let spp = ws.init_repo("gitlab/acme/spp");
    ws.write(&format!("gitlab/acme/spp/{POLICY}"), &format!("pipeline_execution_policy:\n{}", policies.concat()));
    commit(&spp, "Alice", "alice@acme.example", "2024-02-02T10:00:00Z", "Policies");
    let config = ws.write(
        "config.toml",
        &format!(
            "schedule = \"0 0 0 1 1 *\"\nstate_dir = \"state\"\n\n[authors]\n\"ivan@acme.example\" = 42\n\n[[projects]]\npath = \"acme/spp\"\nid = 7\nurl = \"{}\"\nlinked = [\"acme/web\"]\n",
            spp.display()
        ),
    );
    World { ws, spp, templates, config }
}

impl World {
    fn reconcile(&self) -> Value {
        let out = self.ws.run(&self.config, &["reconcile", "--json"]);
        assert!(out.status.success(), "reconcile failed: {}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v["projects"][0].clone()
    }

    fn edit_template(&self, file: &str, text: &str, date: &str, message: &str) -> String {
        self.ws.write(&format!("gitlab/ci/templates/{file}"), text);
        commit(&self.templates, "Ivan Ops", "ivan@acme.example", date, message)
    }

    fn events(&self) -> Vec<Value> {
        events_json(&self.ws, &self.config)
    }
}

fn included_events(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| !e["details"]["included_content"].is_null()).collect()
}

#[test]
fn an_included_file_edited_in_its_own_project_is_one_update_per_policy_attributed_to_that_commit() {
    let w = world(&[
        pipeline_policy("Enforce SAST", "pipeline.yml", None),
        pipeline_policy("Enforce SAST on release", "pipeline.yml", None),
        pipeline_policy("Other", "other.yml", None),
    ]);
    let first = w.reconcile();
    assert_eq!(first["included_fetches"], 1, "one fetch for the three includes: {first}");
    assert!(w.events().is_empty(), "the first sync is a baseline, included files too");
    let before_blob = git(&w.templates, &["rev-parse", "HEAD:pipeline.yml"]).trim().to_string();

    let sha = w.edit_template(
        "pipeline.yml",
        "stages: [test]\nsast:\n  script: [scan --strict]\nsecrets:\n  script: [gitleaks]\n",
        "2024-02-03T09:30:00Z",
        "Merge branch 'strict' into 'main'\n\nSee merge request ci/templates!3",
    );
    let after_blob = git(&w.templates, &["rev-parse", "HEAD:pipeline.yml"]).trim().to_string();
    let second = w.reconcile();
    assert_eq!(second["included_fetches"], 1, "{second}");
    let events = w.events();
    let included = included_events(&events);
    assert_eq!(included.len(), 2, "one per policy that includes pipeline.yml, none for other.yml: {events:#?}");
    let mut names: Vec<&str> = included.iter().map(|e| e["details"]["policy_name"].as_str().expect("name")).collect();
    names.sort();
    assert_eq!(names, ["Enforce SAST", "Enforce SAST on release"]);
    for e in &included {
        assert_eq!(e["event_type"], "security_policy_update");
        assert_eq!(e["author_name"], "Ivan Ops");
        assert_eq!(e["author_id"], 42, "attributed like any step: the [authors] map");
        assert_eq!(e["created_at"], "2024-02-03T09:30:00.000Z");
        assert_eq!(e["entity_path"], "acme/spp");
        let d = &e["details"];
        assert_eq!(
            d["custom_message"],
            format!("Updated security policy with the name: \"{}\"", d["policy_name"].as_str().unwrap_or(""))
        );
        assert_eq!(d["linked_namespaces"], serde_json::json!(["acme/web"]));
        assert_eq!(d["merge_request"]["project"], "ci/templates");
        assert_eq!(d["merge_request"]["iid"], 3);
        assert_eq!(d["changes"][0]["path"], "content.include[0]");
        assert_eq!(d["changes"][0]["before"]["blob"], before_blob.as_str());
        assert_eq!(d["changes"][0]["after"]["blob"], after_blob.as_str());
        let c = &d["included_content"];
        assert_eq!((c["project"].as_str(), c["file"].as_str()), (Some("ci/templates"), Some("pipeline.yml")));
        assert!(c["ref"].is_null());
        assert_eq!(c["followed"], "HEAD");
        assert_eq!(c["before_sha"], before_blob.as_str());
        assert_eq!(c["after_sha"], after_blob.as_str());
        assert_eq!(c["commit_sha"], sha.as_str());
        assert_eq!(c["summary"], "jobs added: secrets; jobs removed: lint; jobs changed: sast");
        let diff = c["diff"].as_str().expect("diff");
        assert!(diff.contains("-  script: [scan]") && diff.contains("+  script: [scan --strict]"), "{diff}");
        assert_eq!(d["security_policy_project_commit_sha"], git(&w.spp, &["rev-parse", "HEAD"]).trim());
    }
    // Nothing new: nothing more, and the same run again changes nothing.
    w.reconcile();
    assert_eq!(w.events().len(), events.len());

    // Two commits to the file between two runs: each is its own step, in order.
    w.edit_template("pipeline.yml", "sast:\n  script: [scan --strict]\n", "2024-02-04T10:00:00Z", "Drop secrets");
    w.ws.write("gitlab/ci/templates/README.md", "not the included file\n");
    commit(&w.templates, "Ivan Ops", "ivan@acme.example", "2024-02-04T11:00:00Z", "Readme");
    w.edit_template("pipeline.yml", "sast:\n  script: [scan --all]\n", "2024-02-04T12:00:00Z", "Scan all");
    w.reconcile();
    let events = w.events();
    let included = included_events(&events);
    assert_eq!(included.len(), 6, "2 more steps x 2 policies; the README commit is no step");
    let summaries: Vec<&str> =
        included[2..].iter().map(|e| e["details"]["included_content"]["summary"].as_str().unwrap_or("")).collect();
    assert_eq!(
        summaries,
        ["jobs removed: secrets", "jobs removed: secrets", "jobs changed: sast", "jobs changed: sast"]
    );
}

#[test]
fn a_pinned_tag_or_sha_ignores_later_edits_and_a_moved_include_follows_from_that_step() {
    let w = world(&[pipeline_policy("Enforce SAST", "pipeline.yml", None)]);
    git(&w.templates, &["-c", "user.name=Tess", "-c", "user.email=tess@acme.example", "tag", "-a", "v1", "-m", "v1"]);
    let pinned_sha = git(&w.templates, &["rev-parse", "HEAD"]).trim().to_string();
    w.reconcile();
    // The SPP moves the include to the tag: that is the policy's own update, as always.
    w.ws.write(
        &format!("gitlab/acme/spp/{POLICY}"),
        &format!(
            "pipeline_execution_policy:\n{}{}",
            pipeline_policy("Enforce SAST", "pipeline.yml", Some("v1")),
            pipeline_policy("Pinned", "other.yml", Some(&pinned_sha))
        ),
    );
    commit(&w.spp, "Alice", "alice@acme.example", "2024-02-05T10:00:00Z", "Pin the templates");
    w.reconcile();
    let events = w.events();
    assert_eq!(included_events(&events).len(), 0);
    let mut own: Vec<&str> = events.iter().map(|e| e["event_type"].as_str().unwrap_or("")).collect();
    own.sort();
    assert_eq!(own, ["security_policy_create", "security_policy_update"], "{events:#?}");
    let update = events.iter().find(|e| e["event_type"] == "security_policy_update").expect("update");
    assert_eq!(update["details"]["changes"][0]["path"], "content.include[0].ref");

    // Edits on the branch change nothing the policy enforces.
    let edit =
        w.edit_template("pipeline.yml", "sast:\n  script: [changed on main]\n", "2024-02-06T10:00:00Z", "edit main");
    w.edit_template("other.yml", "other:\n  script: [changed too]\n", "2024-02-06T11:00:00Z", "edit other");
    let run = w.reconcile();
    assert_eq!(w.events().len(), events.len(), "a pinned tag and a pinned sha emit nothing");
    assert_eq!(run["included_fetches"], 1, "the tag's project is fetched; the sha alone would not be");

    // The tag moved (git tag -f) to the branch's tip: GitLab now runs the new content, so the
    // commits between are the policy's updates (the one that changed the file: one event).
    git(
        &w.templates,
        &["-c", "user.name=Tess", "-c", "user.email=tess@acme.example", "tag", "-f", "-a", "v1", "-m", "v1 again"],
    );
    w.reconcile();
    let events = w.events();
    let included = included_events(&events);
    assert_eq!(included.len(), 1, "{events:#?}");
    assert_eq!(included[0]["details"]["included_content"]["followed"], "tag v1");
    assert_eq!(included[0]["details"]["included_content"]["commit_sha"], edit.as_str());
    assert_eq!(included[0]["details"]["policy_name"], "Enforce SAST");
}

#[test]
fn an_included_file_deleted_or_broken_is_one_invalidation_naming_the_include_until_it_is_back() {
    let w = world(&[pipeline_policy("Enforce SAST", "pipeline.yml", None)]);
    w.reconcile();
    git(&w.templates, &["rm", "-q", "pipeline.yml"]);
    let deleted = commit(&w.templates, "Ivan Ops", "ivan@acme.example", "2024-02-07T10:00:00Z", "Remove pipeline.yml");
    w.reconcile();
    w.reconcile();
    let events = w.events();
    assert_eq!(events.len(), 1, "once, not at every run: {events:#?}");
    let e = &events[0];
    assert_eq!(e["event_type"], "security_policy_yaml_invalidated");
    assert_eq!(e["author_name"], "Ivan Ops");
    assert_eq!(e["details"]["policy_name"], "Enforce SAST");
    assert_eq!(e["details"]["invalid_reason"], "pipeline.yml does not exist in project ci/templates");
    assert!(e["details"]["custom_message"].as_str().unwrap_or("").contains("pipeline.yml of project ci/templates"));
    assert_eq!(e["details"]["included_content"]["commit_sha"], deleted.as_str());
    assert!(e["details"]["included_content"]["after_sha"].is_null());
    assert_eq!(e["details"]["changes"][0]["path"], "content.include[0]");

    // Broken YAML while it is gone is still the same outage: no second event.
    w.edit_template("pipeline.yml", "sast: [unclosed\n", "2024-02-08T10:00:00Z", "broken");
    w.reconcile();
    assert_eq!(w.events().len(), 1);
    // Readable again: GitLab enforces it again, an update.
    w.edit_template("pipeline.yml", "sast:\n  script: [scan]\n", "2024-02-09T10:00:00Z", "fixed");
    w.reconcile();
    let events = w.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["event_type"], "security_policy_update");
    // Diffed against the last version GitLab could use (before the deletion), not the broken one.
    assert_eq!(events[1]["details"]["included_content"]["summary"], "jobs removed: lint");

    // The ref the policy names is deleted: the same kind of invalidation.
    let w = world(&[pipeline_policy("Release", "pipeline.yml", Some("release"))]);
    git(&w.templates, &["branch", "release"]);
    w.reconcile();
    git(&w.templates, &["branch", "-D", "release"]);
    w.reconcile();
    let events = w.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["details"]["invalid_reason"], "ref \"release\" does not exist in project ci/templates");
}

#[test]
fn an_included_project_that_cannot_be_read_loses_nothing_and_stops_nothing_else() {
    let w = world(&[pipeline_policy("Enforce SAST", "pipeline.yml", None)]);
    w.reconcile();
    // The included project goes away for a run; the SPP's own change is still recorded.
    std::fs::rename(&w.templates, w.ws.path("gitlab/ci/templates-away")).expect("move away");
    w.ws.write(
        &format!("gitlab/acme/spp/{POLICY}"),
        &format!(
            "pipeline_execution_policy:\n{}",
            pipeline_policy("Enforce SAST", "pipeline.yml", None).replace("inject_policy", "override_project_ci")
        ),
    );
    commit(&w.spp, "Alice", "alice@acme.example", "2024-02-10T10:00:00Z", "Override");
    let out = w.ws.run(&w.config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning: acme/spp: included project ci/templates:"), "{}", stderr(&out));
    assert_eq!(w.events().len(), 1, "the SPP's own update");
    // Back, with an edit made meanwhile: found at the next run, from where it was left.
    std::fs::rename(w.ws.path("gitlab/ci/templates-away"), &w.templates).expect("move back");
    w.edit_template("pipeline.yml", "sast:\n  script: [scan]\n", "2024-02-11T10:00:00Z", "meanwhile");
    w.reconcile();
    assert_eq!(included_events(&w.events()).len(), 1);
}

/// SIGKILL a reconcile at growing delays while it works through a long included history;
/// the end state must equal an uninterrupted run's: same ids, in the same order, none twice.
#[test]
fn a_reconcile_killed_while_tracking_included_files_loses_and_doubles_nothing() {
    let build = || {
        let w = world(&[pipeline_policy("A", "pipeline.yml", None), pipeline_policy("B", "pipeline.yml", None)]);
        w.reconcile();
        for i in 0..60 {
            let jobs: String = (0..=i % 5).map(|j| format!("job{j}:\n  script: [run {i}]\n")).collect();
            w.edit_template("pipeline.yml", &jobs, &format!("2024-03-01T10:{:02}:00Z", i), &format!("edit {i}"));
        }
        w
    };
    let clean = build();
    clean.reconcile();
    let expected: Vec<Value> = clean.events().iter().map(|e| e["id"].clone()).collect();
    assert_eq!(expected.len(), 120);

    let w = build();
    let mut kills = 0;
    for delay_ms in [5u64, 20, 40, 80, 120, 200, 300] {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&w.config)
            .arg("reconcile")
            .env_remove("POLICY_AUDIT_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start reconcile");
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().expect("wait").is_none() {
            kills += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    assert!(kills >= 1, "at least one reconcile was killed while running");
    w.reconcile();
    let got: Vec<Value> = w.events().iter().map(|e| e["id"].clone()).collect();
    assert_eq!(got, expected, "after {kills} kills");
}

/// The event page shows the included file's diff.
#[test]
fn the_event_page_shows_the_included_files_diff() {
    let w = world(&[pipeline_policy("Enforce SAST", "pipeline.yml", None)]);
    w.reconcile();
    w.edit_template("pipeline.yml", "sast:\n  script: [scan <now>]\n", "2024-02-03T09:30:00Z", "edit");
    w.reconcile();
    let id = w.events()[0]["id"].as_str().expect("id").to_string();
    let port = crate::http::free_port();
    w.ws.write("read-token", "tok-123");
    let text = std::fs::read_to_string(&w.config).expect("config")
        + &format!("\n[server]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"read-token\"\n");
    std::fs::write(&w.config, text).expect("config");
    let _served = crate::server::serve(&w.ws, &w.config, port);
    let page = crate::http::get(port, &format!("/events/{id}"), &[("PRIVATE-TOKEN", "tok-123")]).text();
    assert!(page.contains("Included file"), "{page}");
    assert!(page.contains("ci/templates") && page.contains("pipeline.yml"));
    assert!(page.contains("<span class=\"add\">+  script: [scan &lt;now&gt;]</span>"), "{page}");
    assert!(page.contains("<span class=\"del\">-  script: [scan]</span>"), "{page}");
    let history =
        crate::http::get(port, "/policy?project=acme%2Fspp&name=Enforce%20SAST", &[("PRIVATE-TOKEN", "tok-123")]);
    let history = history.text();
    assert!(history.contains(&format!("/events/{id}")), "the policy's history lists it: {history}");
    assert!(
        history.contains("included <code>ci/templates:pipeline.yml</code> · jobs removed: lint; jobs changed: sast"),
        "{history}"
    );
}

/// A backfill replays the included file's history in time order with the policy's own steps,
/// following each include only while the policy has it; replayed again, it is the same trail.
#[test]
fn a_backfill_replays_included_history_in_time_order_with_the_policys_own_steps() {
    let ws = Workspace::new();
    let templates = ws.init_repo("gitlab/ci/templates");
    let edit = |file: &str, text: &str, date: &str| {
        ws.write(&format!("gitlab/ci/templates/{file}"), text);
        commit(&templates, "Ivan Ops", "ivan@acme.example", date, &format!("edit {file}"))
    };
    edit("pipeline.yml", "sast:\n  script: [v0]\n", "2024-01-01T00:00:00Z");
    edit("other.yml", "other:\n  script: [v0]\n", "2024-01-01T00:00:01Z");
    let spp = ws.init_repo("gitlab/acme/spp");
    let set_policy = |file: &str, description: &str, date: &str| {
        let policy = pipeline_policy("P", file, None)
            .replace("  enabled: true\n", &format!("  description: {description}\n  enabled: true\n"));
        ws.write(&format!("gitlab/acme/spp/{POLICY}"), &format!("pipeline_execution_policy:\n{policy}"));
        commit(&spp, "Alice", "alice@acme.example", date, "policy")
    };
    set_policy("pipeline.yml", "one", "2024-01-01T01:00:00Z"); // t1: created
    edit("pipeline.yml", "sast:\n  script: [v1]\n", "2024-01-01T02:00:00Z"); // t2
    set_policy("pipeline.yml", "two", "2024-01-01T03:00:00Z"); // t3: own update
    edit("pipeline.yml", "sast:\n  script: [v2]\nlint:\n  script: [l]\n", "2024-01-01T04:00:00Z"); // t4
    set_policy("other.yml", "two", "2024-01-01T05:00:00Z"); // t5: the include moves
    edit("pipeline.yml", "sast:\n  script: [v3]\n", "2024-01-01T06:00:00Z"); // t6: no longer included
    edit("other.yml", "other:\n  script: [v1]\n", "2024-01-01T07:00:00Z"); // t7
    let config = ws.write(
        "config.toml",
        &format!(
            "schedule = \"0 0 0 1 1 *\"\nstate_dir = \"state\"\n\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            spp.display()
        ),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events = events_json(&ws, &config);
    let seen: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let file = e["details"]["included_content"]["file"].as_str().unwrap_or("(own)").to_string();
            (
                e["created_at"].as_str().unwrap_or("")[11..13].to_string(),
                e["event_type"].as_str().unwrap_or("").to_string(),
                file,
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("01", "security_policy_create", "(own)"),
        ("02", "security_policy_update", "pipeline.yml"),
        ("03", "security_policy_update", "(own)"),
        ("04", "security_policy_update", "pipeline.yml"),
        ("05", "security_policy_update", "(own)"),
        ("07", "security_policy_update", "other.yml"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(seen, expected, "{events:#?}");
    assert_eq!(events[3]["details"]["included_content"]["summary"], "jobs added: lint; jobs changed: sast");
    // At t4 the policy was at its t3 commit.
    let t3 = git(&spp, &["rev-parse", "HEAD~1"]).trim().to_string();
    assert_eq!(events[3]["details"]["security_policy_project_commit_sha"], t3.as_str());

    // Replayed again: the same ids, nothing new; and the next run finds nothing.
    let out = ws.run(&config, &["reconcile", "--backfill"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = events_json(&ws, &config);
    assert_eq!(again, events);
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success());
    assert_eq!(events_json(&ws, &config).len(), events.len());
}
