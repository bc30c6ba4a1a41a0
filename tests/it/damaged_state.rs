//! A state database whose records do not decode is reported as damaged (exit 2, with what and
//! where, and the way out), and nothing is written: today's trail stays byte for byte as it was.
//! Each kind of record is damaged in a real sled directory behind policy-audit's back.

use crate::common::{Workspace, commit, stderr, stdout};
use crate::trail::{tamper, trail};
use std::path::Path;

const POLICY: &str = ".gitlab/security-policies/policy.yml";

/// Every stored event and chain link, as bytes.
fn trail_bytes(ws: &Workspace) -> Vec<(Vec<u8>, Vec<u8>)> {
    let db = crate::common::open_sled(&ws.path("state/db"));
    let mut all = Vec::new();
    for tree in ["events", "bodies", "chain", "meta", "cursors"] {
        for item in db.open_tree(tree).expect("tree").iter() {
            let (k, v) = item.expect("item");
            let mut key = tree.as_bytes().to_vec();
            key.extend_from_slice(&k);
            all.push((key, v.to_vec()));
        }
    }
    crate::common::close_sled(db, &ws.path("state/db"));
    all
}

/// A new policy commit, so that a reconcile that went ahead would write events.
fn new_change(ws: &Workspace) {
    let repo = ws.path("spp");
    let mut text = std::fs::read_to_string(repo.join(POLICY)).expect("policy");
    text.push_str("- {name: p-new, enabled: false, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    ws.write(&format!("spp/{POLICY}"), &text);
    commit(&repo, "Bob", "bob@example.com", "2024-02-01T10:00:00Z", "p-new");
}

/// Runs `args`, expects exit 2 with the damage named, and the trail untouched.
fn refused(ws: &Workspace, config: &Path, args: &[&str], what: &str) {
    let before = trail_bytes(ws);
    let out = ws.run(config, args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?} should refuse a damaged store: {err}");
    assert!(err.contains("state database is damaged"), "{err}");
    assert!(err.contains(what), "expected {what:?} in: {err}");
    assert!(err.contains("restore from backup, see docs/operations.md"), "{err}");
    assert_eq!(trail_bytes(ws), before, "{args:?} wrote to a damaged store");
}

#[test]
fn a_short_event_counter_stops_every_command_and_event_0_is_not_overwritten() {
    let ws = Workspace::new();
    let config = trail(&ws);
    new_change(&ws);
    tamper(&ws, |db| {
        db.open_tree("meta").expect("meta").insert("next_seq", &[0u8, 0, 5]).expect("insert");
    });
    let what = "the event counter (next_seq) is 3 bytes long, not 8";
    refused(&ws, &config, &["reconcile"], what);
    refused(&ws, &config, &["events"], what);
    refused(&ws, &config, &["status"], what);
    refused(&ws, &config, &["verify"], what);
}

#[test]
fn a_short_chain_head_stops_the_reconcile() {
    let ws = Workspace::new();
    let config = trail(&ws);
    new_change(&ws);
    tamper(&ws, |db| {
        db.open_tree("meta").expect("meta").insert("chain_head", &[1u8; 31]).expect("insert");
    });
    refused(&ws, &config, &["reconcile"], "the chain head (chain_head) is 31 bytes long, not 32");
}

#[test]
fn a_missing_chain_head_with_stored_events_stops_the_reconcile() {
    let ws = Workspace::new();
    let config = trail(&ws);
    new_change(&ws);
    tamper(&ws, |db| {
        db.open_tree("meta").expect("meta").remove("chain_head").expect("remove");
    });
    refused(&ws, &config, &["reconcile"], "the chain head (chain_head) is missing although events are stored");
}

#[test]
fn a_cursor_that_does_not_decode_stops_the_reconcile() {
    let ws = Workspace::new();
    let config = trail(&ws);
    new_change(&ws);
    tamper(&ws, |db| {
        db.open_tree("cursors").expect("cursors").insert("a/spp", b"{not json").expect("insert");
    });
    refused(&ws, &config, &["reconcile"], "cursor of project \"a/spp\" does not decode");
}

#[test]
fn an_event_that_does_not_decode_is_named_by_events() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        crate::common::set_stored_body(db, 2, Some(b"garbage"));
    });
    refused(&ws, &config, &["events", "--format", "jsonl"], "event #2 does not decode");
}

#[test]
fn a_group_of_events_that_does_not_decode_is_named() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        // The group of events 0 to 15 (all five), cut inside its first body's length.
        let bodies = db.open_tree("bodies").expect("bodies");
        bodies.insert(0u64.to_be_bytes(), &[0u8, 0]).expect("insert");
    });
    let what = "the bodies of events #0..#15 do not decode (a body's length is cut short at byte 0)";
    refused(&ws, &config, &["events", "--format", "jsonl"], what);
    refused(&ws, &config, &["verify"], what);
}

#[test]
fn a_compressed_event_that_does_not_decompress_is_damaged_for_readers_and_altered_for_verify() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        let mut value = crate::common::stored_body(db, 2).expect("event 2");
        assert_eq!(value[0], policy_audit::store::body::LINKED_V1, "stored compressed");
        // One byte of the compressed data, past the frame header.
        let at = value.len() - 6;
        value[at] ^= 0xff;
        crate::common::set_stored_body(db, 2, Some(&value));
    });
    refused(&ws, &config, &["events", "--format", "jsonl"], "event #2 does not decode");
    let out = ws.run(&config, &["verify"]);
    let text = stdout(&out) + &stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("event #2") && text.contains("was altered"), "{text}");
}

#[test]
fn a_chain_link_of_the_wrong_length_is_named_by_verify() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        // The link travels at the start of the stored body: cut it to 5 bytes.
        let body = [policy_audit::store::body::LINKED_V1, 7, 7, 7, 7, 7];
        crate::common::set_stored_body(db, 1, Some(&body));
    });
    refused(&ws, &config, &["verify"], "the chain link of event #1 is 5 bytes long, not 32");
}

#[test]
fn a_delivery_that_does_not_decode_is_named_by_deliveries() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        let mut key = b"siem".to_vec();
        key.push(0);
        key.extend_from_slice(&3u64.to_be_bytes());
        db.open_tree("outbox").expect("outbox").insert(key, b"[]").expect("insert");
    });
    refused(&ws, &config, &["deliveries"], "delivery to \"siem\" of event #3 does not decode");
}

#[test]
fn a_project_status_that_does_not_decode_is_named_by_status() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        db.open_tree("status").expect("status").insert("a/spp", b"\xff").expect("insert");
    });
    refused(&ws, &config, &["status"], "status of project \"a/spp\" does not decode");
}
