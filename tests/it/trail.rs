//! The tamper-evident trail: `verify` finds an altered, removed or reordered event, and the
//! removal of the newest ones, when the sled database is edited behind policy-audit's back.

use crate::common::{Workspace, commit, set_stored_body, stderr, stdout, stored_body};
use std::path::PathBuf;

const POLICY: &str = ".gitlab/security-policies/policy.yml";

/// A trail of 5 events (five policy creations), with its config.
pub(crate) fn trail(ws: &Workspace) -> PathBuf {
    let repo = ws.init_repo("spp");
    let mut text = String::from("approval_policy:\n");
    for i in 0..5 {
        text.push_str(&format!("- {{name: p{i}, enabled: false, rules: [{{type: any_merge_request, branch_type: protected, commits: any}}], approval_settings: {{block_branch_modification: true}}}}\n"));
        ws.write(&format!("spp/{POLICY}"), &text);
        commit(&repo, "Alice", "alice@example.com", &format!("2024-01-0{}T10:00:00Z", i + 1), &format!("p{i}"));
    }
    let config = ws.write(
        "config.toml",
        &format!(
            "state_dir = \"state\"\n[[projects]]\npath = \"a/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            repo.display()
        ),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    config
}

/// Opens the database directly, as someone with access to the state directory could.
pub(crate) fn tamper(ws: &Workspace, edit: impl FnOnce(&sled::Db)) {
    let db = crate::common::open_sled(&ws.path("state/db"));
    edit(&db);
    db.flush().expect("flush");
    crate::common::close_sled(db, &ws.path("state/db"));
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn verify(ws: &Workspace, config: &std::path::Path) -> (Option<i32>, String) {
    let out = ws.run(config, &["verify"]);
    (out.status.code(), stdout(&out) + &stderr(&out))
}

#[test]
fn an_intact_trail_verifies_and_status_shows_the_same_head() {
    let ws = Workspace::new();
    let config = trail(&ws);
    let (code, text) = verify(&ws, &config);
    assert_eq!(code, Some(0), "{text}");
    let head = text.trim().rsplit(' ').next().expect("head").to_string();
    assert_eq!(head.len(), 64);
    assert!(text.contains("trail verified: 5 events"));
    let status = ws.run(&config, &["status"]);
    assert!(stdout(&status).contains(&format!("chain head:    {head}")), "{}", stdout(&status));
}

#[test]
fn an_altered_event_is_found() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        let stored = stored_body(db, 2).expect("event 2");
        // Stored compressed with its chain link: the editor writes back the JSON with one name
        // changed, compressed again, with the link it had.
        use policy_audit::store::body;
        let bytes = body::decode(&stored).expect("decodes").into_owned();
        let altered = String::from_utf8_lossy(&bytes).replace("Alice", "Mallory");
        assert_ne!(altered.as_bytes(), bytes.as_slice());
        let link = body::link(&stored).expect("a link").expect("32 bytes");
        let rewritten = body::with_link(&body::encode(altered.as_bytes()).expect("encode"), &link).expect("linked");
        set_stored_body(db, 2, Some(&rewritten));
    });
    let (code, text) = verify(&ws, &config);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("event #2 (id ") && text.contains("was altered"), "{text}");
}

#[test]
fn an_event_written_back_without_its_chain_link_is_found() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        let stored = stored_body(db, 2).expect("event 2");
        // The editor writes back the plain JSON, unchanged: the link the body carried is gone.
        let bytes = policy_audit::store::body::decode(&stored).expect("decodes").into_owned();
        set_stored_body(db, 2, Some(&bytes));
    });
    let (code, text) = verify(&ws, &config);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("event #2 has no chain link"), "{text}");
}

#[test]
fn a_removed_event_is_found() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        set_stored_body(db, 1, None);
    });
    let (code, text) = verify(&ws, &config);
    assert_eq!(code, Some(1));
    assert!(text.contains("event #1 was removed"), "{text}");
}

#[test]
fn reordered_events_are_found() {
    let ws = Workspace::new();
    let config = trail(&ws);
    tamper(&ws, |db| {
        let (a, b) = (stored_body(db, 1).expect("1"), stored_body(db, 2).expect("2"));
        set_stored_body(db, 1, Some(&b));
        set_stored_body(db, 2, Some(&a));
    });
    let (code, text) = verify(&ws, &config);
    assert_eq!(code, Some(1));
    assert!(text.contains("event #1 (id ") && text.contains("events were reordered"), "{text}");
}

#[test]
fn reordered_events_are_found_in_the_layout_with_links_in_the_chain_tree_too() {
    let ws = Workspace::new();
    let config = trail(&ws);
    // As stores written before links travelled in the bodies: plain JSON bodies, one key each
    // in the events tree, each link in the chain tree at its event's place. Then events 1 and 2
    // swapped (their links stay).
    tamper(&ws, |db| {
        use policy_audit::store::body;
        let events = db.open_tree("events").expect("tree");
        let chain = db.open_tree("chain").expect("tree");
        for seq in 0..5 {
            let stored = stored_body(db, seq).expect("an event");
            chain.insert(key(seq), &body::link(&stored).expect("a link").expect("32 bytes")).expect("link");
            events.insert(key(seq), body::decode(&stored).expect("decodes").into_owned()).expect("plain");
        }
        db.open_tree("bodies").expect("tree").clear().expect("no groups");
        let (a, b) = (events.get(key(1)).expect("get").expect("1"), events.get(key(2)).expect("get").expect("2"));
        events.insert(key(1), b).expect("insert");
        events.insert(key(2), a).expect("insert");
    });
    let (code, text) = verify(&ws, &config);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("event #1 (id ") && text.contains("events were reordered"), "{text}");
}

#[test]
fn removing_the_newest_events_changes_the_head_or_is_found() {
    let ws = Workspace::new();
    let config = trail(&ws);
    let before = verify(&ws, &config).1;
    // Only the events and their links: the recorded head no longer matches.
    tamper(&ws, |db| {
        // The event with its link (in its body).
        set_stored_body(db, 4, None);
        db.open_tree("meta").expect("tree").insert("next_seq", &key(4)).expect("insert");
    });
    let (code, text) = verify(&ws, &config);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("newest events were removed"), "{text}");
    // Rewriting the head too passes `verify`, but the head differs from the one logged before.
    tamper(&ws, |db| {
        let event_3 = stored_body(db, 3).expect("event 3");
        let link = policy_audit::store::body::link(&event_3).expect("a link").expect("32 bytes");
        db.open_tree("meta").expect("tree").insert("chain_head", &link).expect("insert");
    });
    let (code, text) = verify(&ws, &config);
    assert_eq!(code, Some(0));
    assert_ne!(text.trim().rsplit(' ').next(), before.trim().rsplit(' ').next(), "the head must change");
    assert!(text.contains("4 events"));
}
