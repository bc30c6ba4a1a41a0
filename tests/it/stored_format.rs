//! Event bodies on disk (issue 16): new stores hold them compressed, the chain stays over the
//! canonical JSON, and a store written before compression (plain JSON values) keeps working
//! without migration — it opens, lists, verifies against the head recorded before, and delivers
//! the same bytes.

use crate::common::{Workspace, stderr, stdout};
use crate::receiver::Receiver;
use crate::trail::{tamper, trail};
use policy_audit::store::body;
use sha2::{Digest, Sha256};

/// Every stored event body in sequence order, as stored (wherever the store keeps it).
fn stored_bodies(ws: &Workspace) -> Vec<Vec<u8>> {
    let db = crate::common::open_sled(&ws.path("state/db"));
    let bodies = (0..).map_while(|seq| crate::common::stored_body(&db, seq)).collect();
    crate::common::close_sled(db, &ws.path("state/db"));
    bodies
}

/// How many keys the trees `bodies` (groups of events) and `events` (one event each) hold.
fn body_keys(ws: &Workspace) -> (usize, usize) {
    let db = crate::common::open_sled(&ws.path("state/db"));
    let count = |tree: &str| db.open_tree(tree).expect("tree").len();
    let keys = (count("bodies"), count("events"));
    crate::common::close_sled(db, &ws.path("state/db"));
    keys
}

fn chain_head(ws: &Workspace, config: &std::path::Path) -> String {
    let out = ws.run(config, &["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("status json");
    status["chain_head"].as_str().expect("chain_head").to_string()
}

#[test]
fn a_new_store_keeps_events_compressed_and_the_chain_over_their_plain_json() {
    let ws = Workspace::new();
    let config = trail(&ws);
    let stored = stored_bodies(&ws);
    assert_eq!(stored.len(), 5);
    assert_eq!(body_keys(&ws), (1, 0), "the 5 bodies are kept as one group");
    let listed = stdout(&ws.run(&config, &["events", "--format", "jsonl"]));
    let listed: Vec<&str> = listed.lines().collect();
    let mut head = [0u8; 32];
    for (seq, value) in stored.iter().enumerate() {
        assert_eq!(value[0], body::LINKED_V1, "event #{seq} is stored compressed, with its chain link");
        let json = body::decode(value).expect("decodes");
        assert!(value.len() * 2 < json.len(), "event #{seq}: {} bytes stored for {} of JSON", value.len(), json.len());
        // What is listed (and streamed) is the canonical JSON, byte for byte.
        assert_eq!(listed[seq].as_bytes(), json.as_ref(), "event #{seq}");
        let mut h = Sha256::new();
        h.update(head);
        h.update(&json);
        head = h.finalize().into();
        assert_eq!(body::link(value), Some(Ok(head)), "event #{seq} carries its link");
    }
    let expected: String = head.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(chain_head(&ws, &config), expected, "the chain links over the plain JSON, as before compression");
    let out = ws.run(&config, &["verify", "--expect-head", &expected]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn a_store_written_before_compression_opens_lists_verifies_and_delivers() {
    let ws = Workspace::new();
    let config = trail(&ws);
    let head = chain_head(&ws, &config);
    let listed_before = stdout(&ws.run(&config, &["events", "--format", "jsonl"]));
    // Rewrite the store the way releases before compression left it: every event body as its
    // plain JSON with its chain link (over those same bytes, unchanged) in the chain tree, and
    // no indexes yet, as in stores older than them, so that opening builds them from plain
    // bodies.
    tamper(&ws, |db| {
        let events = db.open_tree("events").expect("events");
        let chain = db.open_tree("chain").expect("chain");
        for seq in 0..5u64 {
            let value = crate::common::stored_body(db, seq).expect("an event");
            let link = body::link(&value).expect("a link").expect("32 bytes");
            chain.insert(seq.to_be_bytes(), &link).expect("insert link");
            let json = body::decode(&value).expect("decodes").into_owned();
            events.insert(seq.to_be_bytes(), json).expect("insert");
        }
        // One key per event, no groups.
        db.drop_tree("bodies").expect("drop");
        // Their ids in a tree of their own, one key each.
        let ids = db.open_tree("event_ids").expect("event_ids");
        for (seq, item) in events.iter().enumerate() {
            let json = body::decode(&item.expect("item").1).expect("decodes").into_owned();
            let event: serde_json::Value = serde_json::from_slice(&json).expect("json");
            ids.insert(event["id"].as_str().expect("id"), &(seq as u64).to_be_bytes()).expect("insert id");
        }
        let meta = db.open_tree("meta").expect("meta");
        meta.remove("index_blocks_v2").expect("remove");
        db.drop_tree("index").expect("drop");
    });
    let plain = stored_bodies(&ws);
    assert!(plain.iter().all(|v| v[0] == b'{'), "the store is in the old format");

    assert_eq!(stdout(&ws.run(&config, &["events", "--format", "jsonl"])), listed_before);
    let filtered = stdout(&ws.run(&config, &["events", "--format", "jsonl", "--policy", "p3"]));
    assert_eq!(filtered.lines().count(), 1, "the field index was built from the plain bodies: {filtered}");
    let trees = {
        let db = crate::common::open_sled(&ws.path("state/db"));
        let names: Vec<String> = db.tree_names().iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        crate::common::close_sled(db, &ws.path("state/db"));
        names
    };
    assert!(!trees.iter().any(|t| t == "event_ids"), "the old id tree is dropped: {trees:?}");
    let out = ws.run(&config, &["verify", "--expect-head", &head]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("trail verified: 5 events"), "{}", stdout(&out));

    let receiver = Receiver::start(Vec::new());
    let with_destination = format!(
        "{}[[destinations]]\nname = \"siem\"\nurl = \"{}\"\n",
        std::fs::read_to_string(&config).expect("config"),
        receiver.url()
    );
    let config = ws.write("config.toml", &with_destination);
    let out = ws.run(&config, &["deliveries", "replay", "--destination", "siem"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("siem: 5 delivered"), "{}", stdout(&out));
    let bodies: Vec<Vec<u8>> = receiver.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, plain, "the stored JSON is delivered byte for byte");
    // Nothing was migrated: the old bodies stay as they were.
    assert_eq!(stored_bodies(&ws), plain);

    // New events join the old ones: kept in a group, read, chained and verified with them.
    let policy = ws.path("spp/.gitlab/security-policies/policy.yml");
    let mut text = std::fs::read_to_string(&policy).expect("policy");
    text.push_str("- {name: p-new, enabled: false, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    ws.write("spp/.gitlab/security-policies/policy.yml", &text);
    crate::common::commit(&ws.path("spp"), "Bob", "bob@example.com", "2024-02-01T10:00:00Z", "p-new");
    let out = ws.run(&config, &["reconcile", "--no-deliver"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&ws.run(&config, &["events", "--format", "jsonl"]));
    assert_eq!(listed.lines().count(), 6, "{listed}");
    assert!(listed.starts_with(&listed_before) && listed.contains("p-new"), "{listed}");
    assert_eq!(body_keys(&ws), (1, 5), "the old bodies stay one key each, the new one is in a group");
    let out = ws.run(&config, &["verify"]);
    assert!(stdout(&out).contains("trail verified: 6 events"), "{}{}", stdout(&out), stderr(&out));
}

/// A store written by a later release (a layout this binary does not know) is refused by every
/// command, and left as it is; the format this binary writes is recorded when it opens one.
#[test]
fn a_store_from_a_newer_release_is_refused_and_left_alone() {
    let ws = Workspace::new();
    let config = trail(&ws);
    let recorded = |ws: &Workspace| {
        let db = crate::common::open_sled(&ws.path("state/db"));
        let format = db.open_tree("meta").expect("meta").get("store_format").expect("get").map(|v| v.to_vec());
        crate::common::close_sled(db, &ws.path("state/db"));
        format
    };
    assert_eq!(recorded(&ws), Some(3u64.to_be_bytes().to_vec()));
    tamper(&ws, |db| {
        db.open_tree("meta").expect("meta").insert("store_format", &4u64.to_be_bytes()).expect("insert");
    });
    for args in [&["events"][..], &["verify"], &["reconcile"], &["status"]] {
        let out = ws.run(&config, args);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("was written by a newer policy-audit (store format 4; this binary reads formats up to 3)"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(recorded(&ws), Some(4u64.to_be_bytes().to_vec()));
}
