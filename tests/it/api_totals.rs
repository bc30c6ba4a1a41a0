//! `X-Total` / `X-Total-Pages` of GitLab's offset pagination and the per-type counts of
//! `/metrics`, answered by the store's event counters: right after new events (the daemon
//! serving while it reconciles), for a store written before the counters existed, and for one
//! an older release stored events in after them. Each is compared with a count of the events
//! `events --format json` lists.

use crate::common::{Workspace, events_json, spawn_daemon, stderr, wait_for};
use crate::http::{free_port, get, wait_until_up};
use crate::server::{POLICY, TOKEN, serve, trail};
use crate::trail::tamper;
use serde_json::Value;
use std::time::Duration;

const AUTH: (&str, &str) = ("PRIVATE-TOKEN", TOKEN);

fn count(stored: &[Value], keep: impl Fn(&Value) -> bool) -> usize {
    stored.iter().filter(|e| keep(e)).count()
}

/// Every total the server reports equals a count of the stored events.
fn assert_totals(port: u16, stored: &[Value], when: &str) {
    let acme = count(stored, |e| e["entity_path"] == "acme/spp");
    let other = count(stored, |e| e["entity_path"] == "other/spp");
    assert!(acme > 0 && other > 0, "{when}: the fixture has events of both projects");
    for (route, expected) in [
        ("/api/v4/audit_events?per_page=2", stored.len()),
        ("/api/v4/projects/1234/audit_events?per_page=2", acme),
        ("/api/v4/projects/other%2Fspp/audit_events?per_page=2", other),
        ("/api/v4/groups/acme/audit_events?per_page=2", acme),
        ("/api/v4/audit_events?entity_type=Project&entity_id=99&per_page=2", other),
    ] {
        let r = get(port, route, &[AUTH]);
        assert_eq!(r.status, 200, "{when}: {route}: {}", r.text());
        assert_eq!(r.header("x-total"), Some(expected.to_string().as_str()), "{when}: {route}");
        assert_eq!(r.header("x-total-pages"), Some(expected.div_ceil(2).to_string().as_str()), "{when}: {route}");
    }
    let metrics = get(port, "/metrics", &[AUTH]).text();
    for t in ["security_policy_create", "security_policy_update", "security_policy_delete"] {
        let line =
            format!("policy_audit_events_stored{{event_type=\"{t}\"}} {}", count(stored, |e| e["event_type"] == t));
        assert!(metrics.lines().any(|l| l == line), "{when}: /metrics has {line:?}:\n{metrics}");
    }
}

#[test]
fn totals_are_right_right_after_new_events_while_the_daemon_serves() {
    let ws = Workspace::new();
    let port = free_port();
    let config = trail(&ws, port, "");
    let before = events_json(&ws, &config);
    let log = std::fs::File::create(ws.path("daemon.log")).expect("log file");
    let _daemon = crate::common::KillOnDrop(spawn_daemon(&config, log.into(), &[]));
    wait_until_up(port, Duration::from_secs(20));
    assert_totals(port, &before, "at start");
    // A merge that deletes two policies and adds one: three events of two types.
    ws.write(
        &format!("spp/{POLICY}"),
        "approval_policy:\n- {name: Fresh policy, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n",
    );
    crate::common::commit(&ws.path("spp"), "Fay", "fay@acme.example", "2024-02-01T10:00:00Z", "Replace policies");
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = events_json(&ws, &config);
    assert!(after.len() > before.len() + 1, "the merge made events: {} → {}", before.len(), after.len());
    assert_totals(port, &after, "right after the reconcile");
}

/// The keys of the store's event counters (in `meta`, under `count\0`).
fn counter_keys(db: &sled::Db) -> Vec<sled::IVec> {
    let meta = db.open_tree("meta").expect("meta");
    meta.scan_prefix(b"count\0").keys().map(|k| k.expect("key")).collect()
}

#[test]
fn totals_are_right_for_a_store_without_counters_and_one_an_older_release_wrote_to() {
    let ws = Workspace::new();
    let port = free_port();
    let config = trail(&ws, port, "");
    let stored = events_json(&ws, &config);
    // As a store written before the counters existed looks: none of them.
    tamper(&ws, |db| {
        let meta = db.open_tree("meta").expect("meta");
        assert!(!counter_keys(db).is_empty(), "the reconcile kept counters");
        for key in counter_keys(db) {
            meta.remove(key).expect("remove");
        }
        meta.remove(b"counts_at").expect("remove");
    });
    {
        let _served = serve(&ws, &config, port);
        assert_totals(port, &stored, "a store without counters");
    }
    let log = std::fs::read_to_string(ws.path("serve.log")).expect("serve log");
    assert!(log.contains("counting the events per project and type"), "{log}");
    // An older release stored events after the counters were made: they lag behind the trail.
    tamper(&ws, |db| {
        let meta = db.open_tree("meta").expect("meta");
        for key in counter_keys(db) {
            meta.insert(key, &1u64.to_be_bytes()).expect("lagging counter");
        }
        meta.insert(b"counts_at", &1u64.to_be_bytes()).expect("lagging");
    });
    let _served = serve(&ws, &config, port);
    wait_for("the server", Duration::from_secs(5), || get(port, "/healthz", &[]).status == 200);
    assert_totals(port, &stored, "a store an older release wrote to");
}
