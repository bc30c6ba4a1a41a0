//! Attribution from GitLab (SPEC §10) against a local HTTP server scripted with answers shaped
//! as GitLab's documented ones (`doc/api/users.md`, `merge_requests.md`,
//! `merge_request_approvals.md`): exact email matches, several users, none, `429` with
//! `Retry-After`, `500`, a stall past the timeout; and a token that never shows anywhere.

use crate::common::{Workspace, commit, events_json, stderr, stdout};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const POLICY: &str = ".gitlab/security-policies/policy.yml";
const TOKEN: &str = "glpat-attribution-secret-4711";

/// One scripted answer: status, extra headers, body; or a stall.
#[derive(Clone)]
enum Answer {
    Json(u16, Vec<(&'static str, String)>, String),
    Stall(Duration),
}

type Script = Arc<dyn Fn(&str, usize) -> Answer + Send + Sync>;

/// A GitLab stand-in on 127.0.0.1: answers GETs by path (and how often that path was asked),
/// records each request's path and PRIVATE-TOKEN.
struct FakeGitLab {
    url: String,
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl FakeGitLab {
    fn start(script: impl Fn(&str, usize) -> Answer + Send + Sync + 'static) -> FakeGitLab {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let script: Script = Arc::new(script);
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let (script, log) = (script.clone(), log.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut token = String::new();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("private-token")
                        {
                            token = v.trim().to_string();
                        }
                    }
                    let asked = {
                        let mut log = log.lock().expect("log");
                        log.push((path.clone(), token));
                        log.iter().filter(|(p, _)| *p == path).count()
                    };
                    match script(&path, asked) {
                        Answer::Stall(d) => std::thread::sleep(d),
                        Answer::Json(status, headers, body) => {
                            let mut head = format!(
                                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
                                body.len()
                            );
                            for (k, v) in headers {
                                head.push_str(&format!("{k}: {v}\r\n"));
                            }
                            let _ = stream.write_all(format!("{head}\r\n{body}").as_bytes());
                        }
                    }
                });
            }
        });
        FakeGitLab { url, seen }
    }

    fn paths(&self) -> Vec<String> {
        self.seen.lock().expect("seen").iter().map(|(p, _)| p.clone()).collect()
    }

    fn tokens(&self) -> Vec<String> {
        self.seen.lock().expect("seen").iter().map(|(_, t)| t.clone()).collect()
    }
}

fn ok(body: Value) -> Answer {
    Answer::Json(200, vec![], body.to_string())
}

fn user(id: i64, username: &str, name: &str, email: &str) -> Value {
    json!({"id": id, "username": username, "name": name, "state": "active",
           "avatar_url": "", "web_url": format!("https://gitlab.example.com/{username}"), "email": email})
}

const VALID: &str = "approval_policy:
- name: Critical
  enabled: true
  rules:
  - {type: scan_finding, branches: [main], scanners: [sast], vulnerabilities_allowed: 0, severity_levels: [critical], vulnerability_states: [new_needs_triage]}
  actions:
  - {type: require_approval, approvals_required: APPROVALS, role_approvers: [maintainer]}
";

/// A repository whose second commit (by `email`, with `message`) changes a policy, backfilled
/// against `gitlab` with `timeout`.
fn run(
    ws: &Workspace,
    gitlab: &FakeGitLab,
    email: &str,
    message: &str,
    timeout: &str,
) -> (std::process::Output, PathBuf) {
    let repo = ws.init_repo("spp");
    ws.write(&format!("spp/{POLICY}"), &VALID.replace("APPROVALS", "1"));
    commit(&repo, "Alice", "alice@example.com", "2024-01-01T10:00:00Z", "create");
    ws.write(&format!("spp/{POLICY}"), &VALID.replace("APPROVALS", "2"));
    commit(&repo, "Carol Commit", email, "2024-01-02T10:00:00Z", message);
    let config = config(ws, &repo, &gitlab.url, timeout);
    let out = ws.run_with_env(&config, &["reconcile"], &[("GITLAB_API_TOKEN", TOKEN), ("RUST_LOG", "trace")]);
    (out, config)
}

fn config(ws: &Workspace, repo: &Path, url: &str, timeout: &str) -> PathBuf {
    ws.write("gitlab-token", TOKEN);
    ws.write(
        "config.toml",
        &format!(
            "state_dir = \"state\"\n[authors]\n\"alice@example.com\" = 1\n[gitlab]\nurl = \"{url}\"\ntoken_file = \"gitlab-token\"\ntimeout = \"{timeout}\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            repo.display()
        ),
    )
}

fn update(ws: &Workspace, config: &Path) -> Value {
    events_json(ws, config).into_iter().find(|e| e["event_type"] == "security_policy_update").expect("the update event")
}

#[test]
fn an_exact_email_match_names_the_gitlab_user() {
    let ws = Workspace::new();
    let gitlab = FakeGitLab::start(|path, _| {
        if path.starts_with("/api/v4/users?search=carol%40example.com") {
            // GitLab's search also matches other users; only the exact email counts.
            ok(json!([
                user(8, "carolina", "Carolina", "carolina@example.com"),
                user(7, "carol", "Carol C.", "Carol@Example.com")
            ]))
        } else {
            Answer::Json(404, vec![], r#"{"message":"404 Not found"}"#.into())
        }
    });
    let (out, config) = run(&ws, &gitlab, "carol@example.com", "tighten", "5s");
    assert!(out.status.success(), "{}", stderr(&out));
    let e = update(&ws, &config);
    assert_eq!(e["author_id"], 7);
    assert_eq!(e["details"]["gitlab_user"], json!({"id": 7, "username": "carol", "name": "Carol C."}));
    assert_eq!(e["details"]["attribution"], json!({"author_source": "gitlab_users_api"}));
    // The [authors] map comes first: no API call for alice.
    assert!(!gitlab.paths().iter().any(|p| p.contains("alice")), "{:?}", gitlab.paths());
    assert!(gitlab.tokens().iter().all(|t| t == TOKEN), "the token is sent as PRIVATE-TOKEN");

    // Cached: a later change by the same author asks nothing.
    let asked = gitlab.paths().len();
    let repo = ws.path("spp");
    ws.write(&format!("spp/{POLICY}"), &VALID.replace("APPROVALS", "3"));
    commit(&repo, "Carol Commit", "carol@example.com", "2024-01-03T10:00:00Z", "three");
    let out = ws.run_with_env(&config, &["reconcile"], &[("GITLAB_API_TOKEN", TOKEN)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(gitlab.paths().len(), asked, "the user came from the cache: {:?}", gitlab.paths());
    let latest = events_json(&ws, &config).pop().expect("event");
    assert_eq!(latest["author_id"], 7);
}

#[test]
fn several_users_or_none_leave_the_author_unknown_and_say_why() {
    for (answer, why) in [
        (
            json!([
                user(7, "carol", "Carol", "carol@example.com"),
                user(9, "carol-too", "Carol 2", "CAROL@example.com")
            ]),
            "2 GitLab users have the email carol@example.com",
        ),
        (
            json!([user(8, "carolina", "Carolina", "carolina@example.com")]),
            "no GitLab user has the email carol@example.com",
        ),
        (json!([]), "no GitLab user has the email carol@example.com"),
    ] {
        let ws = Workspace::new();
        let gitlab = FakeGitLab::start(move |_, _| ok(answer.clone()));
        let (out, config) = run(&ws, &gitlab, "carol@example.com", "tighten", "5s");
        assert!(out.status.success(), "{}", stderr(&out));
        let e = update(&ws, &config);
        assert_eq!(e["author_id"], -4);
        assert!(e["details"].get("gitlab_user").is_none());
        assert_eq!(e["details"]["attribution"]["author_source"], "unresolved");
        let unresolved = e["details"]["attribution"]["unresolved"].to_string();
        assert!(unresolved.contains(why), "{unresolved}");
    }
}

#[test]
fn a_merge_request_step_names_who_merged_and_who_approved() {
    let ws = Workspace::new();
    let gitlab = FakeGitLab::start(|path, _| match path {
        "/api/v4/projects/acme%2Fspp/merge_requests/4" => ok(json!({
            "id": 84, "iid": 4, "project_id": 3, "title": "Tighten", "state": "merged",
            "merged_by": user(5, "mia", "Mia Merger", "mia@example.com"),
            "merge_user": user(5, "mia", "Mia Merger", "mia@example.com"),
        })),
        "/api/v4/projects/acme%2Fspp/merge_requests/4/approvals" => ok(json!({
            "id": 84, "iid": 4, "project_id": 3, "approved": true,
            "approved_by": [{"user": user(11, "ann", "Ann Approver", "ann@example.com")},
                            {"user": user(12, "abe", "Abe Approver", "abe@example.com")}],
        })),
        _ => ok(json!([])),
    });
    let (out, config) =
        run(&ws, &gitlab, "carol@example.com", "Merge branch 'tighten'\n\nSee merge request acme/spp!4", "5s");
    assert!(out.status.success(), "{}", stderr(&out));
    let mr = &update(&ws, &config)["details"]["merge_request"];
    assert_eq!(mr["iid"], 4);
    assert_eq!(mr["merged_by"], json!({"id": 5, "username": "mia", "name": "Mia Merger"}));
    assert_eq!(
        mr["approved_by"],
        json!([{"id": 11, "username": "ann", "name": "Ann Approver"}, {"id": 12, "username": "abe", "name": "Abe Approver"}])
    );
    let table = stdout(&ws.run_with_env(&config, &["events", "--type", "update"], &[("GITLAB_API_TOKEN", TOKEN)]));
    assert!(table.contains("approved by @ann, @abe"), "{table}");
}

#[test]
fn a_429_with_retry_after_is_honoured() {
    let ws = Workspace::new();
    let gitlab = FakeGitLab::start(|_, asked| {
        if asked == 1 {
            Answer::Json(429, vec![("Retry-After", "1".into())], r#"{"message":"429 Too Many Requests"}"#.into())
        } else {
            ok(json!([user(7, "carol", "Carol", "carol@example.com")]))
        }
    });
    let (out, config) = run(&ws, &gitlab, "carol@example.com", "tighten", "5s");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(update(&ws, &config)["author_id"], 7, "asked again after Retry-After");
    assert_eq!(gitlab.paths().len(), 2);
}

#[test]
fn a_retry_after_beyond_the_timeout_is_not_waited_for() {
    let ws = Workspace::new();
    let gitlab = FakeGitLab::start(|_, _| {
        Answer::Json(429, vec![("Retry-After", "3600".into())], r#"{"message":"429 Too Many Requests"}"#.into())
    });
    let (out, config) = run(&ws, &gitlab, "carol@example.com", "tighten", "2s");
    assert!(out.status.success(), "{}", stderr(&out));
    let e = update(&ws, &config);
    assert_eq!(e["author_id"], -4);
    assert!(e["details"]["attribution"]["unresolved"].to_string().contains("rate limiting (Retry-After 3600s"), "{e}");
}

#[test]
fn a_failing_or_stalled_api_is_asked_once_per_run_and_the_event_is_stored() {
    for (answer, why) in [
        (
            Answer::Json(500, vec![], r#"{"message":"500 Internal Server Error"}"#.into()),
            "the GitLab API failed (HTTP 500)",
        ),
        (Answer::Stall(Duration::from_secs(8)), "the GitLab API did not answer within 1s"),
    ] {
        let ws = Workspace::new();
        let gitlab = FakeGitLab::start(move |_, _| answer.clone());
        let (out, config) = run(&ws, &gitlab, "carol@example.com", "Merge\n\nSee merge request acme/spp!4", "1s");
        assert!(out.status.success(), "the reconcile does not fail: {}", stderr(&out));
        let e = update(&ws, &config);
        assert_eq!(e["author_id"], -4);
        let unresolved = e["details"]["attribution"]["unresolved"].to_string();
        assert!(unresolved.contains(&format!("author: {why}")), "{unresolved}");
        assert!(unresolved.contains(&format!("merge request acme/spp!4: {why}")), "{unresolved}");
        assert_eq!(gitlab.paths().len(), 1, "after the first failure the API is not asked again: {:?}", gitlab.paths());
    }
}

#[test]
fn a_private_commit_email_needs_no_api_call() {
    let ws = Workspace::new();
    let gitlab = FakeGitLab::start(|_, _| ok(json!([])));
    let (out, config) = run(&ws, &gitlab, "42-dave@users.noreply.gitlab.example.com", "tighten", "5s");
    assert!(out.status.success(), "{}", stderr(&out));
    let e = update(&ws, &config);
    assert_eq!(e["author_id"], 42);
    assert_eq!(e["details"]["gitlab_user"]["username"], "dave");
    assert_eq!(e["details"]["attribution"]["author_source"], "private_commit_email");
    assert!(gitlab.paths().is_empty(), "{:?}", gitlab.paths());
}

#[test]
fn the_token_appears_in_no_output_log_or_event() {
    let ws = Workspace::new();
    let gitlab = FakeGitLab::start(|_, _| Answer::Json(401, vec![], r#"{"message":"401 Unauthorized"}"#.into()));
    let (out, config) = run(&ws, &gitlab, "carol@example.com", "Merge\n\nSee merge request acme/spp!4", "5s");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(gitlab.tokens(), vec![TOKEN.to_string()], "the token was sent, once");
    let mut everything = stdout(&out) + &stderr(&out);
    for args in [&["events", "--format", "json"][..], &["status", "--json"], &["check-config"]] {
        let o = ws.run_with_env(&config, args, &[("GITLAB_API_TOKEN", TOKEN), ("RUST_LOG", "trace")]);
        everything += &(stdout(&o) + &stderr(&o));
    }
    assert!(everything.contains("refused the token (HTTP 401)"), "the refusal is said");
    assert!(!everything.contains(TOKEN), "the token leaked");
}
