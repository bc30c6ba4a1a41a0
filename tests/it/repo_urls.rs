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

/// An idle project over smart HTTP costs the server one request: protocol v2 `ls-refs` for the
/// branch alone, without the capability advertisement a fetch begins with. A new commit is
/// still fetched and reported, with the token sent on the probe too.
#[test]
fn an_idle_http_project_is_one_ls_refs_request_and_a_new_commit_is_still_fetched() {
    let ws = Workspace::new();
    let repo = spp(&ws);
    let bare = ws.path("served/spp.git");
    git(ws.dir.path(), &["clone", "-q", "--bare", &repo.to_string_lossy(), &bare.to_string_lossy()]);
    let token = "glpat-probe-token-0123456789";
    let server = GitHttpServer::start(&ws.path("served"), Some(token));
    std::fs::write(ws.path("token"), format!("{token}\n")).expect("token file");
    let config = ws.write(
        "c.toml",
        &format!(
            "state_dir = \"s\"\n[[projects]]\npath = \"a/spp\"\nurl = \"{}\"\ntoken_file = \"token\"\n",
            server.url("spp.git")
        ),
    );
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = server.requests().len();
    // gix asks without credentials first and answers the 401 with the token.
    let refused = server.refused.load(Ordering::SeqCst);
    assert!(first >= 2, "the first sync fetches: {:?}", server.requests());

    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let idle: Vec<String> = server.requests()[first..].to_vec();
    assert_eq!(idle, vec!["POST /spp.git/git-upload-pack".to_string()], "an idle reconcile is one request");
    assert_eq!(server.refused.load(Ordering::SeqCst), refused, "the probe sends the token");

    ws.write(&format!("src/spp/{POLICY}"), "approval_policy:\n- {name: Two, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    commit(&repo, "Bob", "bob@example.com", "2024-01-02T10:00:00Z", "rename");
    git(&repo, &["push", "-q", &bare.to_string_lossy(), "main"]);
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let names: Vec<String> = events_json(&ws, &config)
        .iter()
        .map(|e| {
            format!("{} {}", e["event_type"].as_str().unwrap_or(""), e["details"]["policy_name"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(names, ["security_policy_create Two", "security_policy_delete One"], "the new commit was fetched");
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
