//! The HTTP server as users meet it: `policy-audit serve` on a real store, asked over real TCP.
//! The Audit events page, GitLab's audit events API (also through python-gitlab), `/metrics`
//! through `promtool`, and the limits that keep a client from holding the server.

use crate::common::{BIN, KillOnDrop, Workspace, commit, events_json, stderr};
use crate::http::{free_port, get, request, wait_until_up};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const POLICY: &str = ".gitlab/security-policies/policy.yml";
pub const TOKEN: &str = "read-token-3f9a1c";
pub const XSS_POLICY: &str = "<img src=x onerror=alert(1)>";

/// A running `policy-audit serve`, stopped on drop.
pub struct Served {
    child: KillOnDrop,
    pub port: u16,
}

fn policy_text(approvals: u32, xss_enabled: bool, with_dast: bool) -> String {
    let mut text = format!(
        "approval_policy:\n- name: Critical vulnerabilities need approval\n  description: AppSec signs off\n  enabled: true\n  rules:\n  - type: scan_finding\n    branches: [main]\n    scanners: [sast]\n    vulnerabilities_allowed: 0\n    severity_levels: [critical]\n    vulnerability_states: [new_needs_triage]\n  actions:\n  - type: require_approval\n    approvals_required: {approvals}\n    group_approvers: [acme/appsec]\n- name: \"{XSS_POLICY}\"\n  enabled: {xss_enabled}\n  rules: [{{type: any_merge_request, branch_type: protected, commits: any}}]\n  approval_settings: {{block_branch_modification: true}}\n"
    );
    if with_dast {
        text.push_str("scan_execution_policy:\n- name: Nightly DAST\n  enabled: true\n  rules:\n  - type: schedule\n    branches: [main]\n    cadence: '0 2 * * *'\n  actions:\n  - scan: secret_detection\n");
    }
    text
}

/// Two SPPs with a history of creates, updates (with before/after) and a policy whose name is
/// markup; reconciled into `state/`. Returns the config path.
pub fn trail(ws: &Workspace, port: u16, extra_server: &str) -> PathBuf {
    let repo = ws.init_repo("spp");
    ws.write(&format!("spp/{POLICY}"), &policy_text(1, true, false));
    commit(&repo, "Alice Martin", "alice@acme.example", "2024-01-01T10:00:00Z", "Add approval policies");
    ws.write(&format!("spp/{POLICY}"), &policy_text(2, true, false));
    commit(
        &repo,
        "Bob Okafor",
        "bob@acme.example",
        "2024-01-02T10:00:00Z",
        "Merge branch 'two' into 'main'\n\nSee merge request acme/spp!7",
    );
    ws.write(&format!("spp/{POLICY}"), &policy_text(2, true, true));
    commit(&repo, "Carol Nguyen", "carol@acme.example", "2024-01-03T10:00:00Z", "Add DAST");
    for (i, enabled) in [false, true, false, true].into_iter().enumerate() {
        ws.write(&format!("spp/{POLICY}"), &policy_text(2, enabled, true));
        commit(&repo, "Dave Schmidt", "dave@acme.example", &format!("2024-01-1{i}T10:00:00Z"), "Toggle");
    }
    let other = ws.init_repo("other");
    ws.write(&format!("other/{POLICY}"), "approval_policy:\n- {name: Other policy, enabled: true, rules: [{type: any_merge_request, branch_type: protected, commits: any}], approval_settings: {block_branch_modification: true}}\n");
    commit(&other, "Erin", "erin@other.example", "2024-01-05T10:00:00Z", "other");
    ws.write("read-token", TOKEN);
    let text = format!(
        "schedule = \"0 0 0 1 1 *\"\nstate_dir = \"state\"\n\n\
         [[projects]]\npath = \"acme/spp\"\nid = 1234\nurl = \"{}\"\ninitial_sync = \"backfill\"\nlinked = [\"acme/web\"]\n\n\
         [[projects]]\npath = \"other/spp\"\nid = 99\nurl = \"{}\"\ninitial_sync = \"backfill\"\nlinked = [\"other\"]\n\n\
         [server]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"read-token\"\ngitlab_url = \"https://gitlab.example.com\"\n{extra_server}",
        repo.display(),
        other.display()
    );
    let config = ws.write("config.toml", &text);
    let out = ws.run(&config, &["reconcile"]);
    assert!(out.status.success(), "reconcile failed: {}", stderr(&out));
    config
}

pub fn serve(ws: &Workspace, config: &Path, port: u16) -> Served {
    let log = ws.path("serve.log");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env_remove("POLICY_AUDIT_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start serve");
    wait_until_up(port, Duration::from_secs(20));
    Served { child: KillOnDrop(child), port }
}

/// The trail reconciled and served: (workspace, server, stored events oldest first).
pub fn served_trail() -> (Workspace, Served, Vec<serde_json::Value>) {
    let ws = Workspace::new();
    let port = free_port();
    let config = trail(&ws, port, "");
    let stored = events_json(&ws, &config);
    let served = serve(&ws, &config, port);
    (ws, served, stored)
}

const AUTH: (&str, &str) = ("PRIVATE-TOKEN", TOKEN);

fn ids(body: &serde_json::Value) -> Vec<String> {
    body.as_array().expect("a JSON array").iter().map(|e| e["id"].as_str().expect("id").to_string()).collect()
}

#[test]
fn every_read_route_answers_401_without_or_with_a_wrong_token() {
    let (_ws, s, stored) = served_trail();
    let id = stored[0]["id"].as_str().expect("id").to_string();
    let api_routes = [
        "/api/v4/audit_events".to_string(),
        format!("/api/v4/audit_events/{id}"),
        "/api/v4/projects/1234/audit_events".into(),
        format!("/api/v4/projects/acme%2Fspp/audit_events/{id}"),
        "/api/v4/groups/acme/audit_events".into(),
        format!("/api/v4/groups/acme/audit_events/{id}"),
        "/metrics".into(),
    ];
    let page_routes = [
        "/".to_string(),
        format!("/events/{id}"),
        "/policy?project=acme%2Fspp&name=x".into(),
        "/status".into(),
        "/export.csv".into(),
    ];
    for route in api_routes.iter().chain(&page_routes) {
        for headers in [
            vec![],
            vec![("PRIVATE-TOKEN", "wrong")],
            vec![("Authorization", "Bearer wrong")],
            vec![("Cookie", "policy_audit_session=0000")],
        ] {
            let r = get(s.port, route, &headers);
            assert_eq!(r.status, 401, "{route} with {headers:?}: {}", r.text());
            if api_routes.contains(route) {
                assert_eq!(r.json(), serde_json::json!({"message": "401 Unauthorized"}), "{route}");
            } else {
                assert!(r.text().contains("Sign in"), "{route}: a 401 page offers the login form");
            }
        }
        assert_eq!(get(s.port, route, &[AUTH]).status, 200, "{route} with the token");
        assert_eq!(get(s.port, route, &[("Authorization", &format!("Bearer {TOKEN}"))]).status, 200, "{route} bearer");
    }
    // GitLab's 404 bodies.
    let nf = get(s.port, "/api/v4/audit_events/no-such-event", &[AUTH]);
    assert_eq!((nf.status, nf.json()), (404, serde_json::json!({"message": "404 Not found"})));
    let np = get(s.port, "/api/v4/projects/777/audit_events", &[AUTH]);
    assert_eq!((np.status, np.json()), (404, serde_json::json!({"message": "404 Project Not Found"})));
    let ng = get(s.port, "/api/v4/groups/nobody/audit_events", &[AUTH]);
    assert_eq!((ng.status, ng.json()), (404, serde_json::json!({"message": "404 Group Not Found"})));
    let other_id = stored.iter().find(|e| e["entity_path"] == "other/spp").expect("other event")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let wrong_project = get(s.port, &format!("/api/v4/projects/1234/audit_events/{other_id}"), &[AUTH]);
    assert_eq!(wrong_project.status, 404, "an event of another project is not found under this one");
    // Health answers without a token.
    assert_eq!(get(s.port, "/healthz", &[]).status, 200);
    assert_eq!(get(s.port, "/readyz", &[]).status, 200);
}

#[test]
fn the_api_pages_a_projects_events_newest_first_with_gitlab_headers() {
    let (_ws, s, stored) = served_trail();
    let mut acme: Vec<String> = stored
        .iter()
        .filter(|e| e["entity_path"] == "acme/spp")
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    acme.reverse(); // the API is newest first
    assert!(acme.len() >= 7, "the fixture has enough events to page: {}", acme.len());

    let first = get(s.port, "/api/v4/projects/1234/audit_events?per_page=3", &[AUTH]);
    assert_eq!(first.status, 200);
    assert_eq!(ids(&first.json()), acme[..3]);
    assert_eq!(first.header("x-page"), Some("1"));
    assert_eq!(first.header("x-per-page"), Some("3"));
    assert_eq!(first.header("x-next-page"), Some("2"));
    assert_eq!(first.header("x-prev-page"), Some(""));
    assert_eq!(first.header("x-total"), Some(acme.len().to_string().as_str()));
    assert_eq!(first.header("x-total-pages"), Some(acme.len().div_ceil(3).to_string().as_str()));
    let link = first.header("link").expect("Link header");
    assert!(link.contains(&format!("<http://127.0.0.1:{}/api/v4/projects/1234/audit_events?", s.port)), "{link}");
    assert!(link.contains("page=2") && link.contains("rel=\"next\"") && link.contains("rel=\"last\""), "{link}");
    let entity = &first.json()[0];
    assert_eq!(entity["event_name"], entity["event_type"], "GitLab's event_name is there");
    for key in ["id", "author_id", "entity_id", "entity_type", "details", "created_at"] {
        assert!(!entity[key].is_null(), "{key} is present: {entity}");
    }

    // Keyset: follow rel="next" to the end.
    let mut url = "/api/v4/projects/acme%2Fspp/audit_events?pagination=keyset&per_page=3".to_string();
    let mut seen = Vec::new();
    loop {
        let r = get(s.port, &url, &[AUTH]);
        assert_eq!(r.status, 200, "{url}: {}", r.text());
        seen.extend(ids(&r.json()));
        match r.header("link") {
            Some(link) => {
                assert!(link.ends_with("rel=\"next\""), "{link}");
                let start = link.find("/api/").expect("a path in the link");
                url = link[start..link.find('>').expect("link end")].to_string();
            }
            None => break,
        }
    }
    assert_eq!(seen, acme, "keyset pages hold every event once, newest first");

    // created_after / created_before, entity filters, groups.
    let window = get(
        s.port,
        "/api/v4/audit_events?created_after=2024-01-02T00:00:00Z&created_before=2024-01-03T23:59:59Z",
        &[AUTH],
    );
    let expected: Vec<String> = stored
        .iter()
        .rev()
        .filter(|e| {
            let t = e["created_at"].as_str().expect("time");
            ("2024-01-02".."2024-01-04").contains(&t)
        })
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids(&window.json()), expected);
    let by_entity = get(s.port, "/api/v4/audit_events?entity_type=Project&entity_id=99&per_page=100", &[AUTH]);
    assert!(ids(&by_entity.json()).iter().all(|id| !acme.contains(id)) && !ids(&by_entity.json()).is_empty());
    let group = get(s.port, "/api/v4/groups/acme/audit_events?per_page=100", &[AUTH]);
    assert_eq!(ids(&group.json()), acme, "acme/web is linked to acme/spp, so group acme sees its events");
    let one = get(s.port, &format!("/api/v4/projects/1234/audit_events/{}", acme[0]), &[AUTH]);
    assert_eq!(one.json()["id"], acme[0].as_str());
    let bad = get(s.port, "/api/v4/audit_events?created_after=yesterday", &[AUTH]);
    assert_eq!((bad.status, bad.json()), (400, serde_json::json!({"error": "created_after is invalid"})));
}

#[test]
fn python_gitlab_lists_a_projects_events_through_both_paginations() {
    let (ws, s, stored) = served_trail();
    let script = ws.write(
        "list.py",
        r#"
import json, sys, gitlab
gl = gitlab.Gitlab(sys.argv[1], private_token=sys.argv[2])
project = gl.projects.get(1234, lazy=True)
offset = [e.id for e in project.audit_events.list(per_page=2, get_all=True)]
keyset = [e.id for e in project.audit_events.list(pagination="keyset", per_page=2, iterator=True)]
one = project.audit_events.get(offset[0])
everything = [e.id for e in gl.audit_events.list(get_all=True, per_page=3)]
print(json.dumps({"offset": offset, "keyset": keyset, "one": one.event_name, "all": everything}))
"#,
    );
    // Debian's interpreter, which has python3-gitlab (a pyenv python3 on PATH would not).
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let out = Command::new(python)
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}", s.port))
        .arg(TOKEN)
        .output()
        .expect("python3 must be installed (scripts/install-deps.sh installs python3-gitlab)");
    assert!(
        out.status.success(),
        "python-gitlab (Debian package python3-gitlab, see scripts/install-deps.sh) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    let mut acme: Vec<&str> =
        stored.iter().filter(|e| e["entity_path"] == "acme/spp").map(|e| e["id"].as_str().expect("id")).collect();
    acme.reverse();
    let strings = |v: &serde_json::Value| -> Vec<String> { serde_json::from_value(v.clone()).expect("ids") };
    assert_eq!(strings(&got["offset"]), acme, "offset pagination: exactly the stored events");
    assert_eq!(strings(&got["keyset"]), acme, "keyset pagination: exactly the stored events");
    assert_eq!(got["all"].as_array().map(Vec::len), Some(stored.len()));
    assert!(got["one"].as_str().is_some_and(|n| n.starts_with("security_policy_")));
}

#[test]
fn metrics_pass_promtool_check() {
    let (ws, s, stored) = served_trail();
    let r = get(s.port, "/metrics", &[AUTH]);
    assert_eq!(r.status, 200);
    let text = r.text();
    let creates = stored.iter().filter(|e| e["event_type"] == "security_policy_create").count();
    assert!(
        text.contains(&format!("policy_audit_events_stored{{event_type=\"security_policy_create\"}} {creates}\n")),
        "{text}"
    );
    assert!(text.contains("policy_audit_project_last_success_timestamp_seconds{project=\"acme/spp\"}"), "{text}");
    let file = ws.write("metrics.txt", &text);
    let check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("metrics file"))
        .output()
        .expect("promtool must be installed (Debian package prometheus; scripts/install-deps.sh)");
    assert!(
        check.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn oversized_or_slow_requests_are_cut_off() {
    use std::io::{Read, Write};
    let (_ws, s, _) = served_trail();
    // A body over 1 MiB.
    let big = vec![b'x'; 2 * 1024 * 1024];
    let r = request(s.port, "POST", "/hooks/gitlab", &[("Content-Type", "application/json")], &big);
    assert_eq!(r.status, 413);
    // Headers over the limit.
    let huge = "a".repeat(64 * 1024);
    let r = get(s.port, "/healthz", &[("X-Huge", &huge)]);
    assert!(r.status == 431 || r.status == 400, "oversized headers are refused: {}", r.status);
    // A client that never finishes its headers is disconnected; the server keeps answering others.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").expect("partial head");
    slow.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let started = std::time::Instant::now();
    assert_eq!(get(s.port, "/healthz", &[]).status, 200, "others are served meanwhile");
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(25), "the slow client was cut off (after {took:?})");
}

/// A client that sends its whole oversized body before it reads (as Python's urllib, curl and
/// most HTTP libraries do) still reads the 413: the server answers, then reads and discards the
/// rest for a bounded time ("lingering close", as nginx does) instead of resetting the connection
/// under the client's feet.
#[test]
fn an_oversized_body_sent_whole_before_reading_gets_a_readable_413() {
    use std::io::Write;
    let (_ws, s, _) = served_trail();
    let big = vec![b' '; 2 * 1024 * 1024];
    for path in ["/hooks/gitlab", "/api/v4/audit_events"] {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
        stream.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            big.len()
        );
        stream.write_all(head.as_bytes()).expect("send head");
        stream.write_all(&big).unwrap_or_else(|e| panic!("{path}: the whole body could be sent before reading: {e}"));
        let r = crate::http::read_response(stream);
        assert_eq!(r.status, 413, "{path}");
    }

    // Python's standard client, which sends the body whole, then reads.
    let script = r#"
import sys, urllib.request, urllib.error
for path in ("/hooks/gitlab", "/api/v4/audit_events"):
    req = urllib.request.Request(sys.argv[1] + path, data=b" " * (2 * 1024 * 1024), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=30)
        print(path, "no error")
    except urllib.error.HTTPError as e:
        print(path, e.code)
"#;
    let out = Command::new("python3")
        .args(["-c", script, &format!("http://127.0.0.1:{}", s.port)])
        .output()
        .expect("python3 must be installed (scripts/install-deps.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "urllib failed: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout, "/hooks/gitlab 413\n/api/v4/audit_events 413\n");
    assert_eq!(get(s.port, "/healthz", &[]).status, 200, "the server goes on answering");
}

#[test]
fn pages_escape_repository_text_and_send_strict_headers() {
    let (_ws, s, stored) = served_trail();
    let r = get(s.port, "/?type=security_policy_create", &[AUTH]);
    assert_eq!(r.status, 200);
    let html = r.text();
    assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"), "the markup name is shown as text");
    assert!(!html.contains("<img"), "no image element comes from a repository");
    assert!(!html.contains("security_policy_update\">") || html.contains("Event type"));
    let csp = r.header("content-security-policy").expect("CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'") && !csp.contains("script-src")
    );
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
    // Login sets an HttpOnly, SameSite=Strict cookie that then opens the pages.
    let login = request(
        s.port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        format!("token={TOKEN}&next=%2Fstatus").as_bytes(),
    );
    assert_eq!(login.status, 303);
    assert_eq!(login.header("location"), Some("/status"));
    let cookie = login.header("set-cookie").expect("cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && !cookie.contains("Secure"),
        "{cookie}"
    );
    assert!(!cookie.contains(TOKEN), "the cookie is not the token itself");
    let pair = cookie.split(';').next().expect("name=value");
    assert_eq!(get(s.port, "/status", &[("Cookie", pair)]).status, 200);
    let bad =
        request(s.port, "POST", "/login", &[("Content-Type", "application/x-www-form-urlencoded")], b"token=nope");
    assert_eq!(bad.status, 401);
    assert!(bad.header("set-cookie").is_none());
    // CSV export with GitLab's columns, one row per event.
    let csv = get(s.port, "/export.csv", &[AUTH]);
    let text = csv.text();
    assert!(text.starts_with("ID,Author ID,Author Name,Entity ID,Entity Type,Entity Path,Target ID,Target Type,Target Details,Action,IP Address,Created At (UTC)\n"), "{text}");
    assert_eq!(text.lines().count(), stored.len() + 1);
}

#[test]
fn demo_serve_prints_a_login_link_that_opens_the_demo_trail_until_ctrl_c() {
    use std::io::{BufRead, BufReader};
    let ws = Workspace::new();
    let port = free_port();
    let child = Command::new(BIN)
        .args(["demo", "--serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("HOME", ws.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo --serve");
    // Stopped even when an assertion fails first.
    let mut served = Served { child: KillOnDrop(child), port };
    let child = &mut served.child.0;
    let stdout = child.stdout.take().expect("stdout");
    let link = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.trim().strip_prefix(&format!("http://127.0.0.1:{port}")).map(str::to_string))
        .expect("a login link on stdout");
    let token = link.split("token=").nth(1).expect("token in the link").to_string();
    let login = get(port, &link, &[]);
    assert_eq!(login.status, 303, "the link signs in");
    assert!(login.header("set-cookie").is_some_and(|c| c.contains("HttpOnly")));
    let events = get(port, "/api/v4/projects/1234/audit_events?per_page=100", &[("PRIVATE-TOKEN", &token)]);
    assert_eq!(events.status, 200);
    assert!(events.json().as_array().is_some_and(|a| a.len() >= 5), "the demo's trail: {}", events.text());
    assert_eq!(get(port, "/api/v4/audit_events", &[("PRIVATE-TOKEN", "guess")]).status, 401);
    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill").success();
    assert!(ok);
    let until = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            assert_eq!(status.code(), Some(0), "Ctrl-C ends it cleanly");
            break;
        }
        assert!(std::time::Instant::now() < until, "demo --serve did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
}
