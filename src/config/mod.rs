//! `config.toml` -> validated [`Config`].
//!
//! Two stages, as the user wrote it ([`raw`]) and what the program runs on ([`Config`]). Every
//! error names `file:line:column` and the key. Loading never touches the state directory, so
//! `check-config` is safe to run next to a live daemon.
//!
//! One file per section: the top-level keys and the shared checks (durations, secrets, plain
//! http) here; `[[projects]]` in `projects` (same repository: `same_repo`), `[[destinations]]`
//! and their headers in `destinations`, `schedule`/`timezone` in `schedule`, `[gitlab]`,
//! feature flags, TLS files and secrets in their own files. Every URL decision goes through
//! [`crate::urls`].

mod destinations;
mod flag;
mod gitlab;
mod nats;
mod projects;
mod raw;
mod same_repo;
mod schedule;
mod secret;
mod server;
mod tls;

pub use destinations::{Destination, MAX_CUSTOM_HEADERS, path_has_prefix};
pub use flag::FeatureFlag;
pub use gitlab::{DEFAULT_DISCOVER_INTERVAL, DISCOVER_ALL, GitLab};
pub use nats::{Cluster, DEFAULT_CLUSTER_NAME, DEFAULT_LEASE_TTL, DestinationKind, NatsAuth, NatsTarget};
pub(crate) use projects::repo_key;
pub use projects::{Project, ProjectSource};
pub use raw::InitialSync;
pub use schedule::{DEFAULT_SCHEDULE, normalize_cron};
pub use secret::Secret;
pub use server::{OAuth, ServerConfig, SignIn};

use crate::policy::PolicySchema;
use raw::RawConfig;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

pub const DEFAULT_POLICY_FILE: &str = ".gitlab/security-policies/policy.yml";
pub const DEFAULT_MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_PARALLELISM: usize = 4;

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
    /// What a policy file must satisfy: the built-in schema, or `policy_schema_file` (read and
    /// compiled here, so `check-config` tests it and a reload picks up a new file).
    pub policy_schema: PolicySchema,
    pub flag: FeatureFlag,
    /// Commit email (lowercase) -> GitLab user id.
    pub authors: BTreeMap<String, i64>,
    pub projects: Vec<Project>,
    pub destinations: Vec<Destination>,
    /// The GitLab API for attribution (SPEC §10), when configured.
    pub gitlab: Option<GitLab>,
    /// `[cluster]`: None = the single-instance mode.
    pub cluster: Option<Cluster>,
    /// `[server]`: the web page, read API and webhook (None = no HTTP server).
    pub server: Option<ServerConfig>,
    /// Things that are accepted but worth saying (e.g. merged duplicate projects).
    pub warnings: Vec<String>,
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
            ConfigError {
                errors: vec![crate::text::redact_urls(&format!("{at}: {}", e.message().trim())).into_owned()],
            }
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
        // No secret in any error: a URL's `user:password@` never reaches the message.
        self.errors.push(crate::text::redact_urls(&format!("{at}: {msg}")).into_owned());
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
        let schedule = self.schedule(&raw.schedule);
        let timezone = self.timezone(&raw.timezone);
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
        let discover_at = raw.gitlab.as_ref().and_then(|g| g.discover.first().cloned());
        let gitlab = self.gitlab(raw.gitlab, &base);
        let cluster = self.cluster(raw.cluster, &base);
        if let (Some(at), Some(_)) = (&discover_at, &cluster) {
            self.error_at(
                at,
                "`gitlab.discover` is not supported with [cluster] yet: list the SPPs as [[projects]] in cluster mode",
            );
        }
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
        let policy_schema = match &raw.policy_schema_file {
            None => PolicySchema::builtin().clone(),
            Some(file) => PolicySchema::from_file(&base.join(file.get_ref())).unwrap_or_else(|e| {
                self.error_at(file, format!("`policy_schema_file`: {e}"));
                PolicySchema::builtin().clone()
            }),
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
            policy_schema,
            flag,
            authors,
            projects: projects.0,
            destinations,
            gitlab,
            cluster,
            server,
            warnings: projects.1,
        })
    }

    /// A secret goes over plain http only to a loopback address, or when the user says so.
    fn check_plain_http(&mut self, url: &Spanned<String>, who: &str, what: &str, has_secret: bool, allowed: bool) {
        let plain = crate::urls::is_plain_http(url.get_ref());
        let loopback = crate::urls::is_loopback(url.get_ref());
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
}

#[cfg(test)]
mod tests;
