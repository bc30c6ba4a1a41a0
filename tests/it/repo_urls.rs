//! Fetching over every supported kind of URL: local path, file://, and smart HTTP with a token
//! that is sent to the server but never written into the mirror or printed.

use crate::common::{Workspace, commit, events_json, git, stderr, stdout};
use crate::git_http::GitHttpServer;
use std::sync::atomic::Ordering;

const POLICY: &str = ".gitlab/security-policies/policy.yml";

fn spp(ws: &Workspace) -> std::path::PathBuf {
    let repo = ws.init_repo("src/spp");
    ws.write(&format!("src/spp/{POLICY}"), "approval_policy:\n- {name: One, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "create");
    repo
}

#[test]
fn file_url_is_fetched() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let config = ws.write(
        "c.toml",
        &format!(
            "state_dir = \"s\"\n[[projects]]\npath = \"a/spp\"\nurl = \"file://{}\"\ninitial_sync = \"backfill\"\n",
            repo.display()
        ),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(events_json(&ws, &config).len(), 1);
}

#[test]
fn http_fetch_sends_the_token_and_never_stores_or_prints_it() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let bare = ws.path("served/spp.git");
    git(ws.dir.path(), &["clone", "-q", "--bare", &repo.to_string_lossy(), &bare.to_string_lossy()]);
    let token = "glpat-test-token-0123456789";
    let server = GitHttpServer::start(&ws.path("served"), Some(token));
    std::fs::write(ws.path("token"), format!("{token}\n")).expect("token file");
    let config = ws.write(
        "c.toml",
        &format!("state_dir = \"s\"\n[[projects]]\npath = \"a/spp\"\nurl = \"{}\"\ntoken_file = \"token\"\ninitial_sync = \"backfill\"\n", server.url("spp.git")),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(events_json(&ws, &config).len(), 1);
    assert!(server.seen_auth.lock().expect("lock").iter().any(|a| a.starts_with("Basic ")));
    // The token is nowhere in the state directory (mirror config included) nor in any output.
    for entry in walk(&ws.path("s")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(!bytes.windows(token.len()).any(|w| w == token.as_bytes()), "token found in {}", entry.display());
    }
    let status = ws.run(&config, &["status", "--json"]);
    assert!(!stdout(&status).contains(token) && !stdout(&out).contains(token) && !stderr(&out).contains(token));

    // A wrong token: the fetch fails with an error naming the project, and still no token is shown.
    std::fs::write(ws.path("token"), "wrong-token\n").expect("token file");
    ws.write(&format!("src/spp/{POLICY}"), "approval_policy:\n- {name: Two, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    commit(&repo, "Bob", "bob@example.com", "2024-01-02T10:00:00Z", "rename");
    git(&repo, &["push", "-q", &bare.to_string_lossy(), "main"]);
    let out = ws.run(&config, &["reconcile"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("project a/spp"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("wrong-token"));
    assert!(server.refused.load(Ordering::SeqCst) > 0);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
