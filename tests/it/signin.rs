//! Signing in with GitLab (SPEC §13, issue 27): the OAuth 2.0 authorization code flow with PKCE
//! and `state` against the scripted GitLab of `tests/support/fake_gitlab.py` (its
//! `/oauth/authorize` checks the client, the redirect URI and an S256 challenge; its
//! `/oauth/token` checks the client secret, the code once and the verifier against the
//! challenge). A real headless Chromium signs in three people through the real redirects; the
//! hostile cases are driven step by step over HTTP so each step can be tampered with.

use crate::browser::Browser;
use crate::common::Workspace;
use crate::fake_gitlab::FakeGitLab;
use crate::http::{Response, free_port, get};
use crate::server::{Served, serve, trail};
use crate::visibility::{ids_of, world};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const CLIENT_ID: &str = "a1b2c3-policy-audit";
const CLIENT_SECRET: &str = "gloas-secret-7f7f";

struct SignIn {
    ws: Workspace,
    gitlab: FakeGitLab,
    served: Option<Served>,
    port: u16,
    config: std::path::PathBuf,
    stored: Vec<Value>,
}

fn oauth_world(port: u16, login_as: &str, mode: Value) -> Value {
    let mut w = world(mode, true);
    w["oauth"] = json!({
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        "redirect_uri": format!("http://127.0.0.1:{port}/oauth/callback"), "login_as": login_as,
    });
    w
}

fn setup(login_as: &str, session_ttl: &str) -> SignIn {
    let ws = Workspace::new();
    let port = free_port();
    let gitlab = FakeGitLab::start(&ws, &oauth_world(port, login_as, json!("up")));
    ws.write("oauth-secret", CLIENT_SECRET);
    let extra = format!(
        "\n[server.sign_in]\ngitlab_url = \"{}\"\ntimeout = \"1s\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"oauth-secret\"\nredirect_url = \"http://127.0.0.1:{port}/oauth/callback\"\nsession_ttl = \"{session_ttl}\"\n\n[authors]\n\"carol@acme.example\" = 3\n",
        gitlab.url
    );
    let config = trail(&ws, port, &extra);
    let stored = crate::common::events_json(&ws, &config);
    let served = Some(serve(&ws, &config, port));
    SignIn { ws, gitlab, served, port, config, stored }
}

/// (port, path and query) of an absolute loopback URL.
fn split(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://127.0.0.1:").unwrap_or_else(|| panic!("not a loopback URL: {url}"));
    let (port, path) = rest.split_once('/').unwrap_or((rest, ""));
    (port.parse().expect("port"), format!("/{path}"))
}

fn location(r: &Response) -> String {
    assert!(matches!(r.status, 302 | 303 | 307), "a redirect: {} {}", r.status, r.text());
    r.header("location").expect("Location").to_string()
}

impl SignIn {
    /// `/sign-in` → GitLab's authorize page → the callback URL GitLab sends the browser to.
    fn authorized(&self, redirect_to: &str) -> String {
        let start = get(self.port, &format!("/sign-in?redirect_to={redirect_to}"), &[]);
        let authorize = location(&start);
        assert!(authorize.starts_with(&format!("{}/oauth/authorize?", self.gitlab.url)), "{authorize}");
        let (port, path) = split(&authorize);
        location(&get(port, &path, &[]))
    }

    /// The callback, as the browser would follow it.
    fn callback(&self, url: &str) -> Response {
        let (port, path) = split(url);
        assert_eq!(port, self.port);
        get(self.port, &path, &[])
    }

    /// A complete sign-in: the session cookie (`name=value`) and where it sends the browser.
    fn signed_in(&self, redirect_to: &str) -> (String, String) {
        let done = self.callback(&self.authorized(redirect_to));
        let to = location(&done);
        let set = done.header("set-cookie").expect("a session cookie").to_string();
        (set.split(';').next().expect("name=value").to_string(), to)
    }

    fn page(&self, cookie: &str, path: &str) -> Response {
        get(self.port, path, &[("Cookie", cookie)])
    }

    fn set_gitlab(&self, login_as: &str, mode: Value) {
        self.gitlab.set(&oauth_world(self.port, login_as, mode));
    }
}

#[test]
fn in_chromium_three_people_sign_in_with_gitlab_and_each_sees_their_own_set() {
    let s = setup("olivia", "8h");
    let all = s.stored.len();
    let acme = ids_of(&s.stored, |e| e["entity_path"] == "acme/spp").len();
    let carols = ids_of(&s.stored, |e| e["entity_path"] == "acme/spp" && e["author_id"] == 3).len();
    let profile = s.ws.path("chromium-profile");
    let downloads = s.ws.path("downloads");
    std::fs::create_dir_all(&profile).expect("profile dir");
    std::fs::create_dir_all(&downloads).expect("downloads dir");
    let b = Browser::start(&profile, &downloads);
    let base = format!("http://127.0.0.1:{}", s.port);

    for (username, rows) in [("olivia", acme), ("carol", carols), ("root", all)] {
        s.set_gitlab(username, json!("up"));
        b.go(&format!("{base}/"));
        crate::common::wait_for("the login page", Duration::from_secs(10), || {
            b.text_now("h1").is_some_and(|t| t.contains("Sign in"))
        });
        b.click("a.button[href^='/sign-in']");
        // To GitLab's authorize page, which sends the browser back to the callback, which
        // sends it to the page it came from.
        crate::common::wait_for("the page after signing in", Duration::from_secs(10), || {
            b.text_now("h1").is_some_and(|t| t == "Audit events")
        });
        assert_eq!(b.text("header.top .who"), format!("Signed in as {username}"));
        assert_eq!(b.count("table.events tbody tr"), rows, "{username} sees their set on the page");
        b.click("header.top form[action='/logout'] button");
        crate::common::wait_for("the login page after signing out", Duration::from_secs(10), || {
            b.text_now("h1").is_some_and(|t| t.contains("Sign in"))
        });
    }
    // Signed out means signed out: the page asks again.
    b.go(&format!("{base}/"));
    crate::common::wait_for("the login page again", Duration::from_secs(10), || {
        b.text_now("h1").is_some_and(|t| t.contains("Sign in"))
    });
    let metrics = get(s.port, "/metrics", &[("PRIVATE-TOKEN", crate::server::TOKEN)]).text();
    assert!(metrics.contains("policy_audit_sign_ins_total{outcome=\"signed_in\"} 3"), "{metrics}");
}

#[test]
fn a_session_cookie_is_signed_http_only_lax_expires_and_ends_at_sign_out_or_restart() {
    let mut s = setup("olivia", "3s");
    let callback = s.authorized("/");
    let done = s.callback(&callback);
    let set = done.header("set-cookie").expect("cookie").to_string();
    assert!(set.starts_with("policy_audit_user="), "{set}");
    for attribute in ["; Path=/", "; HttpOnly", "; SameSite=Lax", "; Max-Age=3"] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    let cookie = set.split(';').next().expect("cookie").to_string();
    let acme = ids_of(&s.stored, |e| e["entity_path"] == "acme/spp").len();
    let page = s.page(&cookie, "/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("Signed in as <strong>olivia</strong>"));
    // The CSV export follows the session too.
    assert_eq!(s.page(&cookie, "/export.csv").text().lines().count(), 1 + acme);

    // The same id with another signature (another key) is no session.
    let (id, mac) = cookie.split_once('.').expect("id.mac");
    let (head, last) = mac.split_at(mac.len() - 1);
    let flipped = format!("{id}.{head}{}", if last == "0" { "1" } else { "0" });
    for forged in [flipped, format!("{id}."), id.to_string(), "policy_audit_user=../../etc".to_string()] {
        let r = s.page(&forged, "/");
        assert_eq!(r.status, 401, "{forged}");
        assert!(r.text().contains("Sign in with GitLab"));
    }

    // It expires with the session (session_ttl = 3s).
    std::thread::sleep(Duration::from_millis(3300));
    assert_eq!(s.page(&cookie, "/").status, 401, "an expired session is no session");

    // Signing out ends the session on the server, not just in the browser.
    let (cookie, _) = s.signed_in("/");
    assert_eq!(s.page(&cookie, "/").status, 200);
    let out = crate::http::request(s.port, "POST", "/logout", &[("Cookie", &cookie)], b"");
    assert_eq!(location(&out), "/login");
    assert_eq!(s.page(&cookie, "/").status, 401, "the old cookie no longer works");

    // The log names who signed in and never holds a token or the client secret.
    let (cookie, _) = s.signed_in("/");
    assert_eq!(s.page(&cookie, "/").status, 200);
    drop(s.served.take());
    let log = std::fs::read_to_string(s.ws.path("serve.log")).expect("log");
    assert!(log.contains("signed in with GitLab") && log.contains("olivia"), "{log}");
    for secret in [crate::visibility::OWNER, CLIENT_SECRET] {
        assert!(!log.contains(secret), "a secret in the log");
    }

    // A restart makes a new key: a cookie of the old process is one signed with another key.
    s.served = Some(serve(&s.ws, &s.config, s.port));
    assert_eq!(s.page(&cookie, "/").status, 401);
}

#[test]
fn forged_replayed_or_injected_state_and_codes_never_sign_anyone_in() {
    let s = setup("olivia", "8h");
    let refused = |r: &Response, status: u16, says: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        assert!(r.header("set-cookie").is_none(), "no cookie on a refused sign-in");
        assert!(r.text().contains("Sign-in failed") && r.text().contains(says), "{}", r.text());
    };

    // A state this server never made.
    refused(&get(s.port, "/oauth/callback?code=abc&state=forged", &[]), 400, "not one this server started");

    // A state used once cannot be used again (a replayed callback URL).
    let callback = s.authorized("/");
    assert_eq!(s.callback(&callback).status, 303);
    refused(&s.callback(&callback), 400, "used already");

    // A code from another sign-in (code injection): GitLab refuses it, as its PKCE challenge
    // belongs to another verifier than this state's.
    let a = s.authorized("/");
    let b = s.authorized("/");
    let code_of = |url: &str| url.split("code=").nth(1).and_then(|c| c.split('&').next()).expect("code").to_string();
    let state_of = |url: &str| url.split("state=").nth(1).and_then(|c| c.split('&').next()).expect("state").to_string();
    let injected = format!("/oauth/callback?code={}&state={}", code_of(&a), state_of(&b));
    refused(&get(s.port, &injected, &[]), 403, "GitLab refused the code");
    // And that state is spent: its own code cannot finish with it any more.
    refused(
        &get(s.port, &format!("/oauth/callback?code={}&state={}", code_of(&b), state_of(&b)), &[]),
        400,
        "used already",
    );

    // A callback without its code (or its state), or the person saying no at GitLab.
    refused(&get(s.port, &format!("/oauth/callback?state={}", state_of(&s.authorized("/"))), &[]), 400, "incomplete");
    refused(&get(s.port, "/oauth/callback?code=abc", &[]), 400, "incomplete");
    let mut denied = oauth_world(s.port, "olivia", json!("up"));
    denied["oauth"]["deny"] = json!(true);
    s.gitlab.set(&denied);
    refused(&s.callback(&s.authorized("/")), 403, "access_denied");
    let reflected = get(s.port, "/oauth/callback?error=%3Cscript%3Ealert(1)%3C/script%3E+go+to+evil.example", &[]);
    refused(&reflected, 403, "GitLab did not sign you in");
    assert!(
        !reflected.text().contains("evil") && !reflected.text().contains("script>"),
        "only an error code is echoed"
    );
    s.set_gitlab("olivia", json!("up"));

    // redirect_to is only ever a path of this server.
    for (asked, lands) in [
        ("%2F%2Fevil.example%2Fx", "/"),
        ("https%3A%2F%2Fevil.example%2F", "/"),
        ("%2F%5Cevil.example", "/"),
        ("evil.example", "/"),
        ("%2Fpolicy%3Fproject%3Dacme%252Fspp", "/policy?project=acme%2Fspp"),
    ] {
        let (_, to) = s.signed_in(asked);
        assert_eq!(to, lands, "redirect_to={asked}");
    }

    let metrics = get(s.port, "/metrics", &[("PRIVATE-TOKEN", crate::server::TOKEN)]).text();
    assert!(metrics.contains("policy_audit_sign_ins_total{outcome=\"refused\"} 8"), "{metrics}");
}

#[test]
fn a_gitlab_that_fails_or_stalls_at_sign_in_fails_closed_with_a_clear_page() {
    let s = setup("olivia", "8h");
    for mode in [json!({"status": 502}), json!({"stall": 5})] {
        // GitLab sent the browser back, then stopped answering before the code was exchanged.
        let callback = s.authorized("/");
        s.set_gitlab("olivia", mode.clone());
        let started = Instant::now();
        let r = s.callback(&callback);
        assert_eq!(r.status, 503, "{mode}: {}", r.text());
        assert!(r.header("set-cookie").is_none());
        assert!(r.text().contains("GitLab does not answer"), "{}", r.text());
        assert!(started.elapsed() < Duration::from_secs(4), "the 1 s timeout holds: {:?}", started.elapsed());
        s.set_gitlab("olivia", json!("up"));
    }
    // A state is spent even when GitLab failed: signing in again works.
    let (cookie, _) = s.signed_in("/");
    assert_eq!(s.page(&cookie, "/").status, 200);
    let metrics = get(s.port, "/metrics", &[("PRIVATE-TOKEN", crate::server::TOKEN)]).text();
    assert!(metrics.contains("policy_audit_sign_ins_total{outcome=\"unavailable\"} 2"), "{metrics}");
}
