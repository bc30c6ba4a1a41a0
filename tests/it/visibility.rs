//! Each person sees what GitLab would show them (SPEC §13): readers with their own GitLab token,
//! resolved by a scripted GitLab (`tests/support/fake_gitlab.py`: `/api/v4/user`, the members
//! API) — an administrator, the Owner of `acme`, a Developer — through the API (also
//! python-gitlab, both paginations), the page, the CSV export and event-by-id; the service token
//! scoped to a namespace; a GitLab that refuses, stalls or fails.

use crate::common::Workspace;
use crate::fake_gitlab::FakeGitLab;
use crate::http::{free_port, get};
use crate::server::{TOKEN, serve, trail};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub const ADMIN: &str = "glpat-admin-0001";
pub const OWNER: &str = "glpat-owner-0002";
pub const DEVELOPER: &str = "glpat-developer-0003";

/// `acme/spp` is linked to the project `acme/web`, `other/spp` to the group `other`.
pub fn world(mode: Value, with_developer: bool) -> Value {
    let mut users = vec![
        json!({"token": ADMIN, "id": 1, "username": "root", "is_admin": true}),
        json!({"token": OWNER, "id": 2, "username": "olivia"}),
    ];
    if with_developer {
        users.push(json!({"token": DEVELOPER, "id": 3, "username": "carol"}));
    }
    json!({"token": "unused", "mode": mode, "groups": [], "projects": [], "users": users, "members": [
        // Olivia owns the group acme: GitLab's members/all shows her inherited Owner role in acme/web.
        {"namespace": "acme/web", "kind": "project", "user_id": 2, "access_level": 50},
        {"namespace": "acme/web", "kind": "project", "user_id": 3, "access_level": 30},
        {"namespace": "other", "kind": "group", "user_id": 3, "access_level": 10},
    ]})
}

fn setup(ws: &Workspace, gitlab: &FakeGitLab, cache_ttl: &str) -> (crate::server::Served, Vec<Value>) {
    let port = free_port();
    let extra = format!(
        "token_namespaces = [\"other\"]\n\n[server.sign_in]\ngitlab_url = \"{}\"\ntimeout = \"1s\"\nuser_cache_ttl = \"{cache_ttl}\"\nmembership_cache_ttl = \"{cache_ttl}\"\n\n[authors]\n\"carol@acme.example\" = 3\n",
        gitlab.url
    );
    let config = trail(ws, port, &extra);
    let stored = crate::common::events_json(ws, &config);
    (serve(ws, &config, port), stored)
}

fn total(port: u16, route: &str, token: &str) -> usize {
    let r = get(port, route, &[("PRIVATE-TOKEN", token)]);
    assert_eq!(r.status, 200, "{route}: {}", r.text());
    r.header("x-total").and_then(|t| t.parse().ok()).expect("X-Total")
}

pub fn ids_of(stored: &[Value], keep: impl Fn(&Value) -> bool) -> Vec<String> {
    let mut ids: Vec<String> =
        stored.iter().filter(|e| keep(e)).map(|e| e["id"].as_str().expect("id").to_string()).collect();
    ids.reverse(); // the API lists newest first
    ids
}

#[test]
fn each_reader_sees_exactly_what_gitlab_would_show_them() {
    let ws = Workspace::new();
    let gitlab = FakeGitLab::start(&ws, &world(json!("up"), true));
    let (s, stored) = setup(&ws, &gitlab, "60s");
    let acme = ids_of(&stored, |e| e["entity_path"] == "acme/spp");
    let other = ids_of(&stored, |e| e["entity_path"] == "other/spp");
    let carols = ids_of(&stored, |e| e["entity_path"] == "acme/spp" && e["author_id"] == 3);
    assert!(!carols.is_empty() && carols.len() < acme.len(), "the trail has Carol's and others' events");

    // Counts count only what each may see.
    assert_eq!(total(s.port, "/api/v4/audit_events", ADMIN), stored.len());
    assert_eq!(total(s.port, "/api/v4/audit_events", OWNER), acme.len());
    assert_eq!(total(s.port, "/api/v4/audit_events", DEVELOPER), carols.len());
    assert_eq!(total(s.port, "/api/v4/audit_events", TOKEN), other.len(), "the service token is scoped to `other`");
    assert_eq!(total(s.port, "/api/v4/groups/acme/audit_events", OWNER), acme.len());
    assert_eq!(total(s.port, "/api/v4/groups/acme/audit_events", DEVELOPER), carols.len());

    // An event one may not see is answered exactly as a missing one, on every route.
    let not_found = json!({"message": "404 Not found"});
    for (token, hidden) in [
        (OWNER, &other[0]),
        (DEVELOPER, &acme.iter().find(|i| !carols.contains(i)).expect("not Carol's").clone()),
        (TOKEN, &acme[0]),
    ] {
        for route in [format!("/api/v4/audit_events/{hidden}"), format!("/api/v4/groups/acme/audit_events/{hidden}")] {
            let r = get(s.port, &route, &[("PRIVATE-TOKEN", token)]);
            assert_eq!((r.status, r.json()), (404, not_found.clone()), "{route}");
        }
        assert_eq!(get(s.port, &format!("/events/{hidden}"), &[("PRIVATE-TOKEN", token)]).status, 404);
    }
    let r = get(
        s.port,
        &format!("/api/v4/audit_events/{}", carols[0]),
        &[("Authorization", &format!("Bearer {DEVELOPER}"))],
    );
    assert_eq!(r.status, 200, "Carol sees her own event");

    // python-gitlab with each person's own token: both paginations give exactly their events.
    let script = ws.write(
        "list.py",
        r#"
import json, sys, gitlab
gl = gitlab.Gitlab(sys.argv[1], private_token=sys.argv[2])
offset = [e.id for e in gl.audit_events.list(per_page=2, get_all=True)]
keyset = [e.id for e in gl.audit_events.list(pagination="keyset", per_page=2, iterator=True)]
print(json.dumps({"offset": offset, "keyset": keyset}))
"#,
    );
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    for (token, expected) in [(OWNER, &acme), (DEVELOPER, &carols)] {
        let out = Command::new(python)
            .arg(&script)
            .arg(format!("http://127.0.0.1:{}", s.port))
            .arg(token)
            .output()
            .expect("python3 must be installed (scripts/install-deps.sh installs python3-gitlab)");
        assert!(out.status.success(), "python-gitlab failed: {}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).expect("json");
        let strings = |v: &Value| -> Vec<String> { serde_json::from_value(v.clone()).expect("ids") };
        assert_eq!(&strings(&got["offset"]), expected, "offset pagination");
        assert_eq!(&strings(&got["keyset"]), expected, "keyset pagination");
    }

    // The CSV export and the page show the same sets.
    let csv = get(s.port, "/export.csv", &[("PRIVATE-TOKEN", OWNER)]);
    assert_eq!(csv.status, 200);
    assert_eq!(csv.text().lines().count(), 1 + acme.len(), "header and Olivia's events");
    let page = get(s.port, "/", &[("PRIVATE-TOKEN", OWNER)]).text();
    assert!(page.contains("acme/spp") && !page.contains("other/spp"), "the page lists only acme's SPP");

    // The service's own state is for the service token; reads are counted per route.
    assert_eq!(get(s.port, "/metrics", &[("PRIVATE-TOKEN", OWNER)]).status, 403);
    assert_eq!(get(s.port, "/status", &[("PRIVATE-TOKEN", DEVELOPER)]).status, 403);
    let metrics = get(s.port, "/metrics", &[("PRIVATE-TOKEN", TOKEN)]).text();
    assert!(metrics.contains("policy_audit_reads_total{route=\"/api/v4/audit_events\",reader=\"user\"}"), "{metrics}");
    assert!(metrics.contains("policy_audit_reads_total{route=\"/export.csv\",reader=\"user\"}"), "{metrics}");

    // Who read is logged by name, never with a token.
    drop(s);
    let log = std::fs::read_to_string(ws.path("serve.log")).expect("log");
    assert!(log.contains("trail read") && log.contains("olivia") && log.contains("carol"), "{log}");
    for secret in [ADMIN, OWNER, DEVELOPER, TOKEN] {
        assert!(!log.contains(secret), "a token in the log");
    }
}

#[test]
fn an_unknown_revoked_or_unanswered_token_never_gets_in() {
    let ws = Workspace::new();
    let gitlab = FakeGitLab::start(&ws, &world(json!("up"), true));
    let (s, _) = setup(&ws, &gitlab, "1s");
    let unauthorized = json!({"message": "401 Unauthorized"});
    let r = get(s.port, "/api/v4/audit_events", &[("PRIVATE-TOKEN", "glpat-nobody")]);
    assert_eq!((r.status, r.json()), (401, unauthorized.clone()));
    assert_eq!(get(s.port, "/", &[("PRIVATE-TOKEN", "glpat-nobody")]).status, 401);

    // Revoked in GitLab: refused once the cache has forgotten it (user_cache_ttl = 1s).
    assert_eq!(get(s.port, "/api/v4/audit_events", &[("PRIVATE-TOKEN", DEVELOPER)]).status, 200);
    gitlab.set(&world(json!("up"), false));
    std::thread::sleep(Duration::from_millis(1200));
    let r = get(s.port, "/api/v4/audit_events", &[("PRIVATE-TOKEN", DEVELOPER)]);
    assert_eq!((r.status, r.json()), (401, unauthorized));

    // GitLab failing or silent past the timeout: 503, never access.
    for mode in [json!({"status": 502}), json!({"stall": 5})] {
        gitlab.set(&world(mode.clone(), true));
        std::thread::sleep(Duration::from_millis(1200)); // the cached answers expire
        let started = std::time::Instant::now();
        let r = get(s.port, "/api/v4/audit_events", &[("PRIVATE-TOKEN", OWNER)]);
        assert_eq!((r.status, r.json()), (503, json!({"message": "503 Service Unavailable"})), "{mode}");
        assert!(started.elapsed() < Duration::from_secs(4), "the 1 s timeout holds: {:?}", started.elapsed());
        let page = get(s.port, "/", &[("PRIVATE-TOKEN", OWNER)]);
        assert_eq!(page.status, 503);
        assert!(page.text().contains("nothing is shown"), "{}", page.text());
    }
    // The service token does not depend on GitLab.
    assert_eq!(get(s.port, "/api/v4/audit_events", &[("PRIVATE-TOKEN", TOKEN)]).status, 200);
}

#[test]
fn half_configured_sign_in_is_refused_naming_the_missing_key() {
    let ws = Workspace::new();
    ws.write("t", "x");
    ws.write("secret", "s3cret");
    let head = "[server]\nlisten = \"127.0.0.1:1\"\ntoken_file = \"t\"\n[server.sign_in]\ngitlab_url = \"https://gitlab.example.com\"\n";
    let cases = [
        ("client_id = \"abc\"\n", "c.toml:6:", "needs both `client_id` and `redirect_url`"),
        (
            "client_id = \"abc\"\nredirect_url = \"https://audit.example.com/oauth/callback\"\n",
            "c.toml:6:",
            "set `client_secret_env` or `client_secret_file`",
        ),
        (
            "client_id = \"abc\"\nclient_secret_file = \"secret\"\nredirect_url = \"https://audit.example.com/\"\n",
            "c.toml:8:",
            "must be this server's /oauth/callback URL",
        ),
    ];
    for (tail, at, message) in cases {
        let config = ws.write("c.toml", &format!("{head}{tail}"));
        let out = ws.run(&config, &["check-config"]);
        assert_eq!(out.status.code(), Some(2), "{tail}");
        let err = crate::common::stderr(&out);
        assert!(err.contains(at) && err.contains(message), "{tail}: {err}");
    }
    let config = ws.write(
        "c.toml",
        &format!("{head}client_id = \"abc\"\nclient_secret_file = \"secret\"\nredirect_url = \"https://audit.example.com/oauth/callback\"\n"),
    );
    let out = ws.run(&config, &["check-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", crate::common::stderr(&out));
    assert!(!crate::common::stdout(&out).contains("s3cret"));
}
