//! `config.toml` -> validated [`Config`].
//!
//! Two stages, as the user wrote it ([`raw`]) and what the program runs on ([`Config`]). Every
//! error names `file:line:column` and the key. Loading never touches the state directory, so
//! `check-config` is safe to run next to a live daemon.

mod flag;
mod raw;
mod secret;
mod server;

pub use flag::FeatureFlag;
pub use raw::InitialSync;
pub use secret::Secret;
pub use server::ServerConfig;

use crate::event::EventType;
use crate::policy::{Limits, PolicyType};
use raw::{RawConfig, RawDestination, RawLimits, RawProject};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

pub const DEFAULT_SCHEDULE: &str = "0 */5 * * * *";
pub const DEFAULT_POLICY_FILE: &str = ".gitlab/security-policies/policy.yml";
pub const DEFAULT_MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;
pub const MAX_CUSTOM_HEADERS: usize = 20;
pub const DEFAULT_PARALLELISM: usize = 4;
/// Headers policy-audit sets itself; config may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "x-gitlab-event-streaming-token",
    "x-gitlab-audit-event-type",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    /// Six or seven cron fields, seconds first (5-field input gets `0` seconds).
    pub schedule: String,
    pub timezone: chrono_tz::Tz,
    pub state_dir: PathBuf,
    pub fetch_timeout: Duration,
    pub max_policy_file_bytes: u64,
    pub log_level: Option<String>,
    /// Projects reconciled at once.
    pub parallelism: usize,
    pub flag: FeatureFlag,
    /// Commit email (lowercase) -> GitLab user id.
    pub authors: BTreeMap<String, i64>,
    pub projects: Vec<Project>,
    pub destinations: Vec<Destination>,
    /// `[server]`: the web page, read API and webhook (None = no HTTP server).
    pub server: Option<ServerConfig>,
    /// Things that are accepted but worth saying (e.g. merged duplicate projects).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Project {
    /// SPP full path: the project's identity and `entity_path`.
    pub path: String,
    pub id: Option<i64>,
    /// As configured, with a relative local path made absolute.
    pub url: String,
    pub branch: String,
    pub policy_file: String,
    pub linked: Vec<String>,
    pub token: Option<Secret>,
    pub initial_sync: InitialSync,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct Destination {
    pub name: String,
    pub url: String,
    pub verification_token: Option<Secret>,
    pub signing_secret: Option<Secret>,
    pub event_types: Vec<EventType>,
    pub namespaces: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub max_age: Duration,
    /// Backoff ceiling after the first failure; doubles per attempt up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Destination {
    /// Whether an event of this type, about these paths, goes to this destination.
    pub fn wants(&self, event_type: EventType, paths: &[&str]) -> bool {
        let type_ok = self.event_types.is_empty() || self.event_types.contains(&event_type);
        let ns_ok = self.namespaces.is_empty()
            || self.namespaces.iter().any(|prefix| paths.iter().any(|p| path_has_prefix(p, prefix)));
        type_ok && ns_ok
    }
}

/// `acme` is a prefix of `acme` and `acme/web`, not of `acme-corp`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// Every problem found in a config file, one line each.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.errors.join("\n"))
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, true)
    }

    /// Reads a config without resolving its secrets (they are all None): enough to find the
    /// state directory and a running daemon, which has the secrets. An admin's `status` must not
    /// need the service's tokens.
    pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, false)
    }

    fn load_with(path: &Path, resolve_secrets: bool) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { errors: vec![format!("{}: cannot read config file: {e}", path.display())] })?;
        Config::parse_with(path, &text, resolve_secrets)
    }

    /// Validates config text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(path, text, true)
    }

    fn parse_with(path: &Path, text: &str, resolve_secrets: bool) -> Result<Config, ConfigError> {
        let mut checker = Checker { file: path, text, errors: Vec::new(), resolve_secrets };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| checker.locate(s.start)).unwrap_or_else(|| path.display().to_string());
            ConfigError { errors: vec![format!("{at}: {}", e.message().trim())] }
        })?;
        let config = checker.validate(raw);
        match (config, checker.errors.is_empty()) {
            (Some(config), true) => Ok(config),
            _ => Err(ConfigError { errors: checker.errors }),
        }
    }

    pub fn mirrors_dir(&self) -> PathBuf {
        self.state_dir.join("mirrors")
    }

    pub fn db_dir(&self) -> PathBuf {
        self.state_dir.join("db")
    }

    pub fn author_id(&self, email: &str) -> Option<i64> {
        self.authors.get(&email.to_lowercase()).copied()
    }
}

struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<String>,
    /// False for a CLI that only needs to find the daemon: secrets stay unread.
    resolve_secrets: bool,
}

impl Checker<'_> {
    fn locate(&self, offset: usize) -> String {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        format!("{}:{line}:{col}", self.file.display())
    }

    fn error_at<T>(&mut self, spanned: &Spanned<T>, msg: impl fmt::Display) {
        let at = self.locate(spanned.span().start);
        self.errors.push(format!("{at}: {msg}"));
    }

    fn base_dir(&self) -> PathBuf {
        let parent = self.file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf())
    }

    fn duration(&mut self, value: &Option<Spanned<String>>, key: &str, default: Duration) -> Duration {
        let Some(v) = value else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.error_at(v, format!("`{key}` must be longer than zero"));
                default
            }
            Err(e) => {
                self.error_at(
                    v,
                    format!("`{key}` = {:?} is not a duration ({e}); write e.g. \"10s\", \"5m\", \"24h\"", v.get_ref()),
                );
                default
            }
        }
    }

    fn validate(&mut self, raw: RawConfig) -> Option<Config> {
        let schedule = match &raw.schedule {
            None => DEFAULT_SCHEDULE.to_string(),
            Some(s) => match normalize_cron(s.get_ref()) {
                Ok(cron) => cron,
                Err(e) => {
                    self.error_at(s, format!("`schedule` = {:?} is not a valid cron expression: {e}", s.get_ref()));
                    String::new()
                }
            },
        };
        let timezone = match &raw.timezone {
            None => chrono_tz::UTC,
            Some(tz) => tz.get_ref().parse().unwrap_or_else(|_| {
                self.error_at(
                    tz,
                    format!(
                        "`timezone` = {:?} is not an IANA time zone name (e.g. \"UTC\", \"Europe/Berlin\")",
                        tz.get_ref()
                    ),
                );
                chrono_tz::UTC
            }),
        };
        let base = self.base_dir();
        let state_dir = match &raw.state_dir {
            Some(dir) if dir.get_ref().trim().is_empty() => {
                self.error_at(dir, "`state_dir` must not be empty");
                PathBuf::new()
            }
            Some(dir) => base.join(dir.get_ref()),
            // Under systemd, StateDirectory= sets $STATE_DIRECTORY (a ':'-separated list; ours
            // is the first).
            None => std::env::var("STATE_DIRECTORY")
                .ok()
                .and_then(|v| v.split(':').next().filter(|d| !d.is_empty()).map(PathBuf::from))
                .unwrap_or_else(|| base.join("state")),
        };
        let fetch_timeout = self.duration(&raw.fetch_timeout, "fetch_timeout", Duration::from_secs(120));
        let max_policy_file_bytes = match &raw.max_policy_file_bytes {
            Some(v) if *v.get_ref() == 0 => {
                self.error_at(v, "`max_policy_file_bytes` must be at least 1");
                DEFAULT_MAX_POLICY_FILE_BYTES
            }
            Some(v) => *v.get_ref(),
            None => DEFAULT_MAX_POLICY_FILE_BYTES,
        };
        let flag = match &raw.feature_flags.security_policy_audit_events {
            None => FeatureFlag::On,
            Some(v) => FeatureFlag::from_toml(v.get_ref()).unwrap_or_else(|e| {
                self.error_at(v, format!("`feature_flags.security_policy_audit_events`: {e}"));
                FeatureFlag::On
            }),
        };
        let authors = raw.authors.iter().map(|(email, id)| (email.to_lowercase(), *id.get_ref())).collect();
        let projects = self.projects(raw.projects, &base);
        let destinations = self.destinations(raw.destinations, &base);
        let server = self.server(raw.server, &base);
        if let Some(level) = &raw.log_level
            && tracing_subscriber::EnvFilter::try_new(level.get_ref()).is_err()
        {
            self.error_at(
                level,
                format!(
                    "`log_level` = {:?} is not a level (error, warn, info, debug, trace) or filter",
                    level.get_ref()
                ),
            );
        }
        let log_level = raw.log_level.map(Spanned::into_inner);
        let parallelism = match &raw.parallelism {
            Some(n) if !(1..=64).contains(n.get_ref()) => {
                self.error_at(n, "`parallelism` must be between 1 and 64");
                DEFAULT_PARALLELISM
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_PARALLELISM,
        };
        Some(Config {
            source: self.file.to_path_buf(),
            schedule,
            timezone,
            state_dir,
            fetch_timeout,
            max_policy_file_bytes,
            log_level,
            parallelism,
            flag,
            authors,
            projects: projects.0,
            destinations,
            server,
            warnings: projects.1,
        })
    }

    fn projects(&mut self, raws: Vec<RawProject>, base: &Path) -> (Vec<Project>, Vec<String>) {
        let mut projects: Vec<(Project, Spanned<String>)> = Vec::new();
        let mut warnings = Vec::new();
        for raw in raws {
            let Some(project) = self.project(&raw, base) else {
                continue;
            };
            let key = repo_key(&project.url, &project.branch);
            if let Some((existing, first)) = projects.iter_mut().find(|(p, _)| repo_key(&p.url, &p.branch) == key) {
                if existing.path != project.path {
                    let first_at = self.locate(first.span().start);
                    self.error_at(
                        &raw.path,
                        format!(
                            "project {:?} has the same url and branch as project {:?} ({first_at}); one repository must have one path",
                            project.path, existing.path
                        ),
                    );
                    continue;
                }
                let at = self.locate(raw.path.span().start);
                warnings.push(format!(
                    "{at}: project {:?} is configured twice with the same url and branch; merged into one (one poll, linked namespaces combined)",
                    project.path
                ));
                for ns in project.linked {
                    if !existing.linked.contains(&ns) {
                        existing.linked.push(ns);
                    }
                }
                continue;
            }
            if let Some((_, first)) = projects.iter().find(|(p, _)| p.path == project.path) {
                let first_at = self.locate(first.span().start);
                self.error_at(
                    &raw.path,
                    format!(
                        "duplicate project path {:?} (first at {first_at}) with a different url or branch",
                        project.path
                    ),
                );
                continue;
            }
            projects.push((project, raw.path.clone()));
        }
        (projects.into_iter().map(|(p, _)| p).collect(), warnings)
    }

    fn project(&mut self, raw: &RawProject, base: &Path) -> Option<Project> {
        let path = raw.path.get_ref().trim().to_string();
        if path.is_empty() || path.starts_with('/') || path.ends_with('/') || path.contains("//") {
            self.error_at(
                &raw.path,
                format!("project `path` = {path:?} must be a full path like \"acme/security-policies\""),
            );
            return None;
        }
        let url = self.repo_url(&raw.url, base)?;
        let branch = raw.branch.as_ref().map(|b| b.get_ref().trim().to_string()).unwrap_or_else(|| "main".into());
        if let Some(b) = &raw.branch
            && (branch.is_empty() || branch.starts_with("refs/") || branch.contains(' ') || branch.contains(".."))
        {
            self.error_at(b, format!("project {path:?}: `branch` = {branch:?} must be a branch name like \"main\""));
        }
        let policy_file = raw
            .policy_file
            .as_ref()
            .map(|f| f.get_ref().trim_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_POLICY_FILE.into());
        if let Some(f) = &raw.policy_file
            && (policy_file.is_empty() || policy_file.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
        {
            self.error_at(
                f,
                format!("project {path:?}: `policy_file` = {:?} must be a path inside the repository", f.get_ref()),
            );
        }
        let token = self.secret(&path, "token", &raw.token_env, &raw.token_file, base);
        let has_token = raw.token_env.is_some() || raw.token_file.is_some();
        self.check_plain_http(&raw.url, &format!("project {path:?}"), "token", has_token, raw.allow_insecure_http);
        let limits = raw.limits.as_ref().map(limits_of).unwrap_or_default();
        let mut linked: Vec<String> = Vec::new();
        for ns in &raw.linked {
            let ns = ns.trim_matches('/').to_string();
            if !ns.is_empty() && !linked.contains(&ns) {
                linked.push(ns);
            }
        }
        Some(Project {
            path,
            id: raw.id,
            url,
            branch,
            policy_file,
            linked,
            token,
            initial_sync: raw.initial_sync.unwrap_or_default(),
            limits,
        })
    }

    fn repo_url(&mut self, raw: &Spanned<String>, base: &Path) -> Option<String> {
        let url = raw.get_ref().trim();
        if url.is_empty() {
            self.error_at(raw, "project `url` must not be empty");
            return None;
        }
        if let Some((scheme, _)) = url.split_once("://") {
            if !matches!(scheme, "https" | "http" | "file") {
                self.error_at(
                    raw,
                    format!(
                        "project `url` scheme {scheme:?} is not supported (use https, http, file:// or a local path)"
                    ),
                );
                return None;
            }
            return Some(url.to_string());
        }
        if url.contains('@') && url.contains(':') {
            self.error_at(raw, "ssh urls are not supported: use https with `token_env`, or a local path");
            return None;
        }
        Some(base.join(url).to_string_lossy().into_owned())
    }

    /// A secret goes over plain http only to a loopback address, or when the user says so.
    fn check_plain_http(&mut self, url: &Spanned<String>, who: &str, what: &str, has_secret: bool, allowed: bool) {
        let plain = url.get_ref().trim().starts_with("http://");
        let loopback = http_host(url.get_ref().trim()).as_deref().is_some_and(is_loopback_host);
        if has_secret && plain && !loopback && !allowed {
            self.error_at(
                url,
                format!("{who}: the {what} would be sent over plain http to a non-loopback host; use https, or set `allow_insecure_http = true`"),
            );
        }
    }

    fn secret(
        &mut self,
        owner: &str,
        what: &str,
        env: &Option<Spanned<String>>,
        file: &Option<Spanned<String>>,
        base: &Path,
    ) -> Option<Secret> {
        match (env, file) {
            (Some(e), Some(_)) => {
                self.error_at(e, format!("{owner}: set either `{what}_env` or `{what}_file`, not both"));
                None
            }
            _ if !self.resolve_secrets => None,
            (Some(e), None) => Secret::from_env(e.get_ref())
                .map_err(|msg| self.error_at(e, format!("{owner}: `{what}_env`: {msg}")))
                .ok(),
            (None, Some(f)) => Secret::from_file(&base.join(f.get_ref()))
                .map_err(|msg| self.error_at(f, format!("{owner}: `{what}_file`: {msg}")))
                .ok(),
            (None, None) => None,
        }
    }

    fn destinations(&mut self, raws: Vec<RawDestination>, base: &Path) -> Vec<Destination> {
        let mut out: Vec<Destination> = Vec::new();
        for raw in raws {
            let name = raw.name.get_ref().trim().to_string();
            if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) {
                self.error_at(&raw.name, format!("destination `name` = {name:?} must be a non-empty name without '/'"));
                continue;
            }
            if out.iter().any(|d| d.name == name) {
                self.error_at(&raw.name, format!("duplicate destination name {name:?}"));
                continue;
            }
            let who = format!("destination {name:?}");
            let url = raw.url.get_ref().trim().to_string();
            let host = http_host(&url);
            if host.is_none() {
                self.error_at(&raw.url, format!("{who}: `url` = {url:?} must be an http:// or https:// URL"));
            }
            let verification_token = self.secret(
                &who,
                "verification_token",
                &raw.verification_token_env,
                &raw.verification_token_file,
                base,
            );
            let signing_secret =
                self.secret(&who, "signing_secret", &raw.signing_secret_env, &raw.signing_secret_file, base);
            if let Some(b64) = signing_secret.as_ref().and_then(|s| s.expose().strip_prefix("whsec_"))
                && base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).is_err()
                && let Some(at) = raw.signing_secret_env.as_ref().or(raw.signing_secret_file.as_ref())
            {
                self.error_at(
                    at,
                    format!("{who}: the signing secret starts with `whsec_` but the rest is not valid base64"),
                );
            }
            let has_secret = raw.verification_token_env.is_some()
                || raw.verification_token_file.is_some()
                || raw.signing_secret_env.is_some()
                || raw.signing_secret_file.is_some();
            self.check_plain_http(&raw.url, &who, "token or signing secret", has_secret, raw.allow_insecure_http);
            let mut event_types = Vec::new();
            for t in &raw.event_types {
                match EventType::from_name(t.get_ref()) {
                    Some(t) => event_types.push(t),
                    None => self.error_at(
                        t,
                        format!(
                            "{who}: unknown event type {:?} (expected one of: {})",
                            t.get_ref(),
                            EventType::ALL.map(EventType::name).join(", ")
                        ),
                    ),
                }
            }
            let headers = self.headers(&who, raw.headers.as_ref());
            let timeout = self.duration(&raw.timeout, "timeout", Duration::from_secs(10));
            let max_age = self.duration(&raw.max_age, "max_age", Duration::from_secs(24 * 3600));
            let backoff_initial = self.duration(&raw.backoff_initial, "backoff_initial", Duration::from_secs(1));
            let backoff_max = self.duration(&raw.backoff_max, "backoff_max", Duration::from_secs(300));
            let max_attempts = match &raw.max_attempts {
                Some(n) if *n.get_ref() == 0 => {
                    self.error_at(n, format!("{who}: `max_attempts` must be at least 1"));
                    1
                }
                Some(n) => *n.get_ref(),
                None => 12,
            };
            out.push(Destination {
                name,
                url,
                verification_token,
                signing_secret,
                event_types,
                namespaces: raw
                    .namespaces
                    .iter()
                    .map(|n| n.trim_matches('/').to_string())
                    .filter(|n| !n.is_empty())
                    .collect(),
                headers,
                timeout,
                max_attempts,
                max_age,
                backoff_initial,
                backoff_max,
            });
        }
        out
    }

    fn headers(&mut self, who: &str, raw: Option<&Spanned<BTreeMap<String, String>>>) -> Vec<(String, String)> {
        let Some(raw) = raw else { return Vec::new() };
        if raw.get_ref().len() > MAX_CUSTOM_HEADERS {
            self.error_at(
                raw,
                format!(
                    "{who}: at most {MAX_CUSTOM_HEADERS} custom headers are allowed, found {}",
                    raw.get_ref().len()
                ),
            );
        }
        let mut out = Vec::new();
        for (name, value) in raw.get_ref() {
            let valid_name =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid_name {
                self.error_at(raw, format!("{who}: header name {name:?} is not a valid HTTP header name"));
            } else if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                self.error_at(raw, format!("{who}: header {name:?} is set by policy-audit and cannot be configured"));
            } else if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                self.error_at(raw, format!("{who}: header {name:?} has a line break in its value"));
            } else {
                out.push((name.clone(), value.clone()));
            }
        }
        out
    }
}

fn limits_of(raw: &RawLimits) -> Limits {
    let mut map = BTreeMap::new();
    let approval = raw.approval_policy.or(raw.scan_result_policy);
    for (t, v) in [
        (PolicyType::Approval, approval),
        (PolicyType::ScanExecution, raw.scan_execution_policy),
        (PolicyType::PipelineExecution, raw.pipeline_execution_policy),
        (PolicyType::PipelineExecutionSchedule, raw.pipeline_execution_schedule_policy),
        (PolicyType::VulnerabilityManagement, raw.vulnerability_management_policy),
    ] {
        if let Some(v) = v {
            map.insert(t, v);
        }
    }
    Limits::new(map)
}

/// Accepts 5-field cron (minute first) by adding a `0` seconds field; validates with the parser
/// tokio-cron-scheduler uses, so what passes here also schedules.
pub fn normalize_cron(expr: &str) -> Result<String, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let six = match fields.len() {
        5 => format!("0 {}", fields.join(" ")),
        6 | 7 => fields.join(" "),
        n => return Err(format!("expected 5, 6 or 7 fields, found {n}")),
    };
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(&six)
        .map_err(|e| e.to_string())?;
    Ok(six)
}

/// Same repository: compares URLs without a trailing slash or `.git`.
fn repo_key(url: &str, branch: &str) -> (String, String) {
    let u = url.trim_end_matches('/');
    let u = u.strip_suffix(".git").unwrap_or(u);
    (u.to_string(), branch.to_string())
}

/// The host of an http(s) URL, or None when it is not one.
pub fn http_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next()?.to_string()
    } else {
        host_port.split(':').next()?.to_string()
    };
    (!host.is_empty()).then_some(host)
}

pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests;
