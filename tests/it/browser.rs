//! The Audit events page in a real headless Chromium, driven over WebDriver (chromedriver on a
//! free loopback port, spoken to with the W3C WebDriver JSON protocol): log in, filter by event
//! type, open an event and see its before/after, follow to the policy's history, download the
//! CSV; a policy named like markup is text and runs nothing. Every process started is stopped.
//!
//! With `POLICY_AUDIT_SCREENSHOT=1` the screenshot replaces `docs/img/audit-events.png`.

use crate::http::{free_port, request};
use crate::server::{TOKEN, XSS_POLICY, served_trail};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

impl Browser {
    pub fn start(profile: &Path, downloads: &Path) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed (Debian packages chromium and chromium-driver; scripts/install-deps.sh)");
        let mut browser = Browser { driver, port, session: String::new() };
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "chromedriver did not start listening on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--window-size=1280,900", format!("--user-data-dir={}", profile.display())],
                "prefs": {"download.default_directory": downloads.display().to_string(), "download.prompt_for_download": false}
            }
        }}});
        let answer = browser.call("POST", "/session", Some(caps));
        browser.session = answer["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {answer}")).to_string();
        let allow = json!({"cmd": "Page.setDownloadBehavior", "params": {"behavior": "allow", "downloadPath": downloads.display().to_string()}});
        browser.call("POST", &format!("/session/{}/chromium/send_command", browser.session), Some(allow));
        browser
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let r = request(self.port, method, path, &[("Content-Type", "application/json")], body.as_bytes());
        let v = r.json();
        assert!(r.status == 200, "webdriver {method} {path}: {} {v}", r.status);
        v["value"].clone()
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn go(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({"url": url})));
    }

    pub fn url(&self) -> String {
        self.call("GET", &self.s("/url"), None).as_str().unwrap_or_default().to_string()
    }

    fn find(&self, css: &str) -> String {
        let v = self.call("POST", &self.s("/element"), Some(json!({"using": "css selector", "value": css})));
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_string()
    }

    pub fn count(&self, css: &str) -> usize {
        self.call("POST", &self.s("/elements"), Some(json!({"using": "css selector", "value": css})))
            .as_array()
            .map_or(0, Vec::len)
    }

    pub fn click(&self, css: &str) {
        let id = self.find(css);
        self.call("POST", &self.s(&format!("/element/{id}/click")), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call("POST", &self.s(&format!("/element/{id}/value")), Some(json!({"text": text})));
    }

    pub fn text(&self, css: &str) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let id = self.find(css);
            let r = request(self.port, "GET", &self.s(&format!("/element/{id}/text")), &[], b"");
            let v = r.json();
            if r.status == 200 {
                return v["value"].as_str().unwrap_or_default().to_string();
            }
            // The page was replaced between finding the element and reading it (a navigation
            // still under way): find it again, within a bound.
            assert!(
                v["value"]["error"] == "stale element reference" && Instant::now() < until,
                "webdriver text of {css}: {} {v}",
                r.status
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The text of the first element matching `css` now, or None while there is none (a page
    /// still on its way through redirects) or it was replaced while being read.
    pub fn text_now(&self, css: &str) -> Option<String> {
        let found = self.call("POST", &self.s("/elements"), Some(json!({"using": "css selector", "value": css})));
        let id = found.as_array()?.first()?[ELEMENT].as_str()?.to_string();
        let r = request(self.port, "GET", &self.s(&format!("/element/{id}/text")), &[], b"");
        (r.status == 200).then(|| r.json()["value"].as_str().unwrap_or_default().to_string())
    }

    /// Whether a JavaScript dialog (alert) is open.
    fn alert_open(&self) -> bool {
        let r = request(self.port, "GET", &self.s("/alert/text"), &[], b"");
        r.status == 200
    }

    fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let b64 = self.call("GET", &self.s("/screenshot"), None);
        base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap_or_default()).expect("png")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = request(self.port, "DELETE", &format!("/session/{}", self.session), &[], b"");
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn in_chromium_a_user_logs_in_filters_opens_an_event_follows_to_the_policy_and_exports_csv() {
    let (ws, served, stored) = served_trail();
    let profile = ws.path("chromium-profile");
    let downloads = ws.path("downloads");
    std::fs::create_dir_all(&profile).expect("profile dir");
    std::fs::create_dir_all(&downloads).expect("downloads dir");
    let base = format!("http://127.0.0.1:{}", served.port);
    let b = Browser::start(&profile, &downloads);

    // Not logged in: the login form.
    b.go(&format!("{base}/"));
    assert!(b.text("h1").contains("Sign in"));
    b.type_into("input[name=token]", TOKEN);
    b.click("form[action='/login'] button[type=submit]");
    // A click returns when the browser took it; the navigation it starts may still run.
    crate::common::wait_for("the page after signing in", Duration::from_secs(10), || b.text("h1") == "Audit events");
    assert_eq!(b.count("table.events tbody tr"), stored.len());

    // The policy named like markup is text, and nothing ran. (Read again for a while: on a
    // loaded machine the page may still be rendering after the redirect.)
    let until = Instant::now() + Duration::from_secs(10);
    let mut page_text = b.text("table.events");
    while !page_text.contains(XSS_POLICY) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        page_text = b.text("table.events");
    }
    assert!(page_text.contains(XSS_POLICY), "the name shows literally: {page_text}");
    assert_eq!(b.count("table.events img"), 0, "no image element was made from it");
    assert!(!b.alert_open(), "no script ran");

    if std::env::var_os("POLICY_AUDIT_SCREENSHOT").is_some() {
        let png = b.screenshot();
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/img/audit-events.png");
        std::fs::write(&target, png).expect("write the screenshot");
    } else {
        assert!(b.screenshot().starts_with(b"\x89PNG"), "a screenshot can be taken");
    }

    // Filter by event type (the filter lands in the URL).
    b.click("select[name=type] option[value=security_policy_update]");
    b.click("form.filters button[type=submit]");
    crate::common::wait_for("the filtered page", Duration::from_secs(10), || {
        b.url().contains("type=security_policy_update")
    });
    let updates = stored.iter().filter(|e| e["event_type"] == "security_policy_update").count();
    assert_eq!(b.count("table.events tbody tr"), updates);

    // Open the newest update of the approval policy: its before/after.
    b.click("table.events tbody tr:last-child a.action");
    crate::common::wait_for("the event's page", Duration::from_secs(10), || b.url().contains("/events/"));
    let changes = b.text("table.changes");
    assert!(changes.contains("actions[0].approvals_required"), "{changes}");
    assert_eq!(b.text("table.changes td.before"), "1");
    assert_eq!(b.text("table.changes td.after"), "2");
    assert!(b.text("dl.fields").contains("acme/spp!7"), "the merge request is linked");

    // Follow to the policy's history.
    b.click("dl.fields a[href^='/policy?']");
    crate::common::wait_for("the policy's page", Duration::from_secs(10), || {
        b.text("h1").contains("Critical vulnerabilities need approval")
    });
    assert_eq!(b.count("ol.history > li"), 2, "created, then updated");

    // Download the CSV of the filtered view.
    b.go(&format!("{base}/?type=security_policy_update"));
    b.click("a[href^='/export.csv']");
    let file = downloads.join("audit-events.csv");
    let until = Instant::now() + Duration::from_secs(20);
    while !file.exists() {
        assert!(Instant::now() < until, "the CSV was not downloaded into {}", downloads.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let csv = std::fs::read_to_string(&file).expect("csv");
    assert!(csv.starts_with("ID,Author ID,Author Name,"), "{csv}");
    assert_eq!(csv.lines().count(), updates + 1, "{csv}");
    assert!(!b.alert_open());
}
