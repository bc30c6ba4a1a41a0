use super::*;
use crate::event::EventType;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/pa/config.toml"), text)
}

fn errors(text: &str) -> String {
    parse(text).expect_err("config should be rejected").to_string()
}

const PROJECT: &str = "
[[projects]]
path = \"acme/security-policies\"
url = \"https://gitlab.example.com/acme/security-policies.git\"
linked = [\"acme\"]
";

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = parse(PROJECT).unwrap();
    assert_eq!(c.schedule, DEFAULT_SCHEDULE);
    assert_eq!(c.projects[0].branch, "main");
    assert_eq!(c.projects[0].policy_file, DEFAULT_POLICY_FILE);
    assert_eq!(c.projects[0].initial_sync, InitialSync::Baseline);
    assert_eq!(c.flag, FeatureFlag::On);
}

#[test]
fn unknown_key_names_file_line_column_and_key() {
    let e = errors(&format!("{PROJECT}colour = \"blue\"\n"));
    assert!(e.starts_with("/etc/pa/config.toml:6:1: unknown field `colour`"), "{e}");
}

#[test]
fn five_field_cron_gets_seconds_and_bad_cron_is_located() {
    let c = parse(&format!("schedule = \"*/10 * * * *\"\n{PROJECT}")).unwrap();
    assert_eq!(c.schedule, "0 */10 * * * *");
    let e = errors(&format!("schedule = \"every day\"\n{PROJECT}"));
    assert!(e.starts_with("/etc/pa/config.toml:1:12: `schedule`"), "{e}");
    let e = errors(&format!("schedule = \"0 61 * * * *\"\n{PROJECT}"));
    assert!(e.contains("not a valid cron expression"), "{e}");
}

#[test]
fn missing_secret_is_an_error_naming_the_variable_but_not_a_value() {
    let e = errors(&format!("{PROJECT}token_env = \"POLICY_AUDIT_TEST_SURELY_UNSET\"\n"));
    assert!(e.contains("config.toml:6:13") && e.contains("POLICY_AUDIT_TEST_SURELY_UNSET is not set"), "{e}");
}

#[test]
fn secret_from_file_is_redacted_in_debug() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "s3cr3t-value\n").unwrap();
    let c = Config::parse(&dir.path().join("config.toml"), &format!("{PROJECT}token_file = \"token\"\n")).unwrap();
    assert_eq!(c.projects[0].token.as_ref().unwrap().expose(), "s3cr3t-value");
    assert!(!format!("{c:?}").contains("s3cr3t"));
}

#[test]
fn same_url_and_branch_twice_is_merged_with_a_warning() {
    let text = format!("{PROJECT}{}", PROJECT.replace("[\"acme\"]", "[\"acme/web/shop\", \"acme\"]"));
    let c = parse(&text).unwrap();
    assert_eq!(c.projects.len(), 1);
    assert_eq!(c.projects[0].linked, ["acme", "acme/web/shop"]);
    assert!(c.warnings[0].contains("configured twice"), "{:?}", c.warnings);
}

#[test]
fn same_repository_under_two_paths_and_duplicate_paths_are_errors() {
    let other_path = PROJECT.replace("acme/security-policies\"", "acme/other\"");
    let e = errors(&format!("{PROJECT}{other_path}"));
    assert!(e.contains("same url and branch as project \"acme/security-policies\""), "{e}");
    let other_url = PROJECT.replace("security-policies.git", "other.git");
    let e = errors(&format!("{PROJECT}{other_url}"));
    assert!(e.contains("duplicate project path \"acme/security-policies\""), "{e}");
}

#[test]
fn relative_state_dir_and_local_url_are_anchored_at_the_config_file() {
    let c = parse("state_dir = \"st\"\n[[projects]]\npath = \"a/b\"\nurl = \"repos/spp\"\n").unwrap();
    assert_eq!(c.state_dir, Path::new("/etc/pa/st"));
    assert_eq!(c.projects[0].url, "/etc/pa/repos/spp");
}

#[test]
fn flag_forms() {
    let c =
        parse("[feature_flags]\nsecurity_policy_audit_events = { actors = [\"a/b\"], percentage_of_actors = 25 }\n")
            .unwrap();
    assert!(c.flag.enabled_for("a/b"));
    assert!(parse("[feature_flags]\nsecurity_policy_audit_events = false\n").unwrap().flag == FeatureFlag::Off);
    let e = errors("[feature_flags]\nsecurity_policy_audit_events = \"yes\"\n");
    assert!(e.starts_with("/etc/pa/config.toml:2:32:"), "{e}");
    let e = errors("[feature_flags]\nsecurity_policy_audit_events = { percent = 3 }\n");
    assert!(e.contains("unknown field `percent`"), "{e}");
}

#[test]
fn destination_checks() {
    let d = "[[destinations]]\nname = \"siem\"\nurl = \"https://siem.example.com/x\"\n";
    let c =
        parse(&format!("{d}event_types = [\"security_policy_create\"]\nnamespaces = [\"acme/\"]\ntimeout = \"3s\"\n"))
            .unwrap();
    let dest = &c.destinations[0];
    assert_eq!(dest.timeout, Duration::from_secs(3));
    assert!(dest.wants(EventType::Create, &["acme/web"]));
    assert!(!dest.wants(EventType::Delete, &["acme/web"]));
    assert!(!dest.wants(EventType::Create, &["acme-corp"]));
    assert!(
        errors(&format!("{d}event_types = [\"policy_create\"]\n")).contains("unknown event type \"policy_create\"")
    );
    assert!(errors(&format!("{d}headers = {{ \"Bad Header\" = \"x\" }}\n")).contains("not a valid HTTP header name"));
    assert!(errors(&format!("{d}headers = {{ \"Content-Type\" = \"x\" }}\n")).contains("set by policy-audit"));
    let many: Vec<String> = (0..21).map(|i| format!("\"X-H{i}\" = \"v\"")).collect();
    assert!(errors(&format!("{d}headers = {{ {} }}\n", many.join(", "))).contains("at most 20"));
    assert!(errors(&format!("{d}max_age = \"forever\"\n")).contains("`max_age`"));
    assert!(errors(&format!("{d}{d}")).contains("duplicate destination name"));
    unsafe { std::env::set_var("POLICY_AUDIT_TEST_TOKEN", "t") };
    let insecure = "[[destinations]]\nname = \"s\"\nurl = \"http://siem.example.com/x\"\nverification_token_env = \"POLICY_AUDIT_TEST_TOKEN\"\n";
    assert!(errors(insecure).contains("plain http"));
    assert!(parse(&format!("{insecure}allow_insecure_http = true\n")).is_ok());
    assert!(parse(&insecure.replace("siem.example.com", "127.0.0.1:8080")).is_ok());
}

#[test]
fn several_errors_are_all_reported() {
    let e = errors("schedule = \"x\"\ntimezone = \"Mars/Base\"\n[[projects]]\npath = \"/bad\"\nurl = \"ftp://x\"\n");
    assert_eq!(e.lines().count(), 3, "{e}");
}

#[test]
fn a_project_token_over_plain_http_needs_loopback_or_consent() {
    unsafe { std::env::set_var("POLICY_AUDIT_TEST_GL_TOKEN", "t") };
    let p = "[[projects]]\npath = \"a/b\"\nurl = \"http://gitlab.example.com/a/b.git\"\ntoken_env = \"POLICY_AUDIT_TEST_GL_TOKEN\"\n";
    assert!(errors(p).contains("project \"a/b\": the token would be sent over plain http"));
    assert!(parse(&format!("{p}allow_insecure_http = true\n")).is_ok());
    assert!(parse(&p.replace("gitlab.example.com", "127.0.0.1:8080")).is_ok());
    assert!(parse(&p.replace("http://", "https://")).is_ok());
}

#[test]
fn a_malformed_whsec_secret_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad"), "whsec_not base64!\n").unwrap();
    std::fs::write(dir.path().join("good"), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
    let d = "[[destinations]]\nname = \"s\"\nurl = \"https://siem.example.com/x\"\n";
    let e = Config::parse(&dir.path().join("c.toml"), &format!("{d}signing_secret_file = \"bad\"\n")).unwrap_err();
    assert!(e.to_string().contains("not valid base64"), "{e}");
    assert!(Config::parse(&dir.path().join("c.toml"), &format!("{d}signing_secret_file = \"good\"\n")).is_ok());
}

#[test]
fn a_client_certificate_needs_its_key_and_a_missing_tls_file_is_named() {
    let dest = "[[destinations]]\nname = \"siem\"\nurl = \"https://siem.example.com/a\"\n";
    let e = errors(&format!("{PROJECT}{dest}client_cert_file = \"tls/client.pem\"\n"));
    assert!(
        e.starts_with("/etc/pa/config.toml:9:20: destination \"siem\": `client_cert_file` needs `client_key_file`"),
        "{e}"
    );
    let e = errors(&format!("{PROJECT}{dest}client_key_file = \"tls/client.key\"\n"));
    assert!(e.contains("`client_key_file` needs `client_cert_file`"), "{e}");
    let e = errors(&format!("{PROJECT}ca_file = \"/nonexistent/internal-ca.pem\"\n"));
    assert!(
        e.starts_with("/etc/pa/config.toml:6:11: project \"acme/security-policies\": `ca_file`: cannot read /nonexistent/internal-ca.pem"),
        "{e}"
    );
}

#[test]
fn tls_files_are_resolved_relative_to_the_config_and_not_read_without_secrets() {
    let text = format!("{PROJECT}ca_file = \"tls/ca.pem\"\n");
    let c = Config::parse_with(Path::new("/etc/pa/config.toml"), &text, false).unwrap();
    assert_eq!(c.projects[0].tls.ca_file.as_deref(), Some(Path::new("/etc/pa/tls/ca.pem")));
}

#[test]
fn a_secret_over_plain_http_is_refused_in_every_spelling_of_a_remote_host() {
    unsafe { std::env::set_var("POLICY_AUDIT_TEST_SPELLING_TOKEN", "t") };
    let dest = |url: &str| {
        format!(
            "[[destinations]]\nname = \"s\"\nurl = \"{url}\"\nverification_token_env = \"POLICY_AUDIT_TEST_SPELLING_TOKEN\"\n"
        )
    };
    for remote in [
        "HTTP://siem.example.com/x",
        "Http://siem.example.com/x",
        "http://127.0.0.1.evil.com/x",
        "http://127.0.0.1@evil.com/x",
        "http://localhost./x",
        "http://127.1/x",
    ] {
        assert!(errors(&dest(remote)).contains("would be sent over plain http"), "{remote} must be refused");
    }
    for local in ["http://[::1]:8080/x", "http://evil@127.0.0.1:8080/x", "HTTP://LOCALHOST:8080/x"] {
        assert!(parse(&dest(local)).is_ok(), "{local} is this machine");
    }
    let gitlab = "[gitlab]\nurl = \"HTTP://gitlab.example.com\"\ntoken_env = \"POLICY_AUDIT_TEST_SPELLING_TOKEN\"\n";
    assert!(errors(gitlab).contains("would be sent over plain http"));
}

#[test]
fn a_project_url_is_read_by_the_url_parser() {
    let p = |url: &str| format!("[[projects]]\npath = \"a/b\"\nurl = \"{url}\"\n");
    let config = parse(&p("HTTPS://gitlab.example.com/a/b.git")).expect("an uppercase scheme is a scheme");
    assert_eq!(config.projects[0].url, "https://gitlab.example.com/a/b.git");
    assert!(
        errors(&p("SSH://git@gitlab.example.com/a/b.git")).contains("project `url` scheme \"ssh\" is not supported")
    );
    assert!(errors(&p("https://gitlab example.com/a/b.git")).contains("is not a valid URL"));
    assert!(errors(&p("https://oauth2:hunter2@exa mple.com/a/b.git")).contains("is not a valid URL"));
    assert!(!errors(&p("https://oauth2:hunter2@exa mple.com/a/b.git")).contains("hunter2"));
}

#[test]
fn header_names_and_values_are_what_the_http_client_can_send() {
    let d = "[[destinations]]\nname = \"s\"\nurl = \"https://siem.example.com/x\"\n";
    let header = |name: &str, value: &str| errors(&format!("{d}headers = {{ \"{name}\" = \"{value}\" }}\n"));
    for bad_name in ["Bad Header", "", "X-Ä", "X:Y"] {
        assert!(header(bad_name, "v").contains("is not a valid HTTP header name"), "{bad_name:?}");
    }
    assert!(header("content-TYPE", "x").contains("is set by policy-audit"));
    assert!(header("X-A", "a\\r\\nX-Injected: 1").contains("has a line break in its value"));
    for bad_value in ["bell\\u0007", "del\\u007f", "esc\\u001b[2J"] {
        assert!(header("X-A", bad_value).contains("is not a valid HTTP header value"), "{bad_value:?}");
    }
    let ok = parse(&format!("{d}headers = {{ \"X-Tenant\" = \"acme corp\\tblue\", \"X-Team\" = \"caf\u{e9}\" }}\n"))
        .expect("valid headers");
    assert_eq!(ok.destinations[0].headers.len(), 2);
}
