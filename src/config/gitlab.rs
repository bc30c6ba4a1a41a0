//! `[gitlab]`: the GitLab API used to attribute events to GitLab users and to name who merged
//! and who approved a merge request (SPEC §10), and to discover Security Policy Projects and
//! their links (`discover`, SPEC §12). Optional: without it, attribution uses the `[authors]`
//! map and GitLab's private commit emails only, and the projects are the `[[projects]]` list.

use super::Checker;
use super::raw::RawGitLab;
use crate::config::Secret;
use crate::tls::TlsSettings;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct GitLab {
    /// The instance's base URL, without a trailing slash (`https://gitlab.example.com`).
    pub url: String,
    /// A token with `read_api` (None only when secrets were not resolved).
    pub token: Option<Secret>,
    /// Per API call, connect to last byte.
    pub timeout: Duration,
    /// How long a user looked up by email (found or not) is kept in the store.
    pub cache_ttl: Duration,
    /// API calls at once, over all projects.
    pub concurrency: usize,
    pub tls: TlsSettings,
    /// Group full paths whose SPP links are discovered (`"*"` alone: the whole instance);
    /// empty = no discovery.
    pub discover: Vec<String>,
    /// At most one discovery per this long.
    pub discover_interval: Duration,
}

/// `discover = ["*"]`: every group and project the token sees (an administrator's: all).
pub const DISCOVER_ALL: &str = "*";
pub const DEFAULT_DISCOVER_INTERVAL: Duration = Duration::from_secs(600);

impl Checker<'_> {
    pub(super) fn gitlab(&mut self, raw: Option<RawGitLab>, base: &Path) -> Option<GitLab> {
        let raw = raw?;
        let url = raw.url.get_ref().trim().trim_end_matches('/').to_string();
        match crate::urls::web(&url) {
            Some(_) => {}
            None => {
                self.error_at(
                    &raw.url,
                    "`gitlab.url` must be an https:// (or loopback http://) URL of the GitLab instance",
                );
                return None;
            }
        }
        let token = self.secret("[gitlab]", "token", &raw.token_env, &raw.token_file, base);
        if raw.token_env.is_none() && raw.token_file.is_none() {
            self.error_at(&raw.url, "[gitlab]: set `token_env` or `token_file` (a token with the read_api scope)");
        }
        self.check_plain_http(&raw.url, "[gitlab]", "the token", true, raw.allow_insecure_http);
        let timeout = self.duration(&raw.timeout, "gitlab.timeout", Duration::from_secs(5));
        let cache_ttl = self.duration(&raw.cache_ttl, "gitlab.cache_ttl", Duration::from_secs(24 * 3600));
        let concurrency = match &raw.concurrency {
            Some(n) if !(1..=32).contains(n.get_ref()) => {
                self.error_at(n, "`gitlab.concurrency` must be between 1 and 32");
                4
            }
            Some(n) => *n.get_ref(),
            None => 4,
        };
        let tls = self.tls("[gitlab]", [&raw.ca_file, &raw.client_cert_file, &raw.client_key_file], base);
        let discover = self.discover_roots(&raw.discover);
        let discover_interval =
            self.duration(&raw.discover_interval, "gitlab.discover_interval", DEFAULT_DISCOVER_INTERVAL);
        if let Some(v) = &raw.discover_interval
            && raw.discover.is_empty()
        {
            self.error_at(v, "`gitlab.discover_interval` is set but `gitlab.discover` is empty: nothing is discovered");
        }
        Some(GitLab { url, token, timeout, cache_ttl, concurrency, tls, discover, discover_interval })
    }

    /// `discover`: group full paths, each once, or `"*"` alone.
    fn discover_roots(&mut self, raw: &[Spanned<String>]) -> Vec<String> {
        let mut roots: Vec<String> = Vec::new();
        for entry in raw {
            let path = entry.get_ref().trim().trim_matches('/').to_string();
            let valid = path == DISCOVER_ALL
                || (!path.is_empty()
                    && !path.contains("//")
                    && path.split('/').all(|part| {
                        part.chars().all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
                            && part != "."
                            && part != ".."
                    }));
            if !valid {
                self.error_at(
                    entry,
                    format!("`gitlab.discover` entry {:?} must be a group's full path like \"acme/security\", or \"*\" for the whole instance", entry.get_ref()),
                );
                continue;
            }
            if roots.contains(&path) {
                self.error_at(entry, format!("`gitlab.discover` names {path:?} twice"));
                continue;
            }
            roots.push(path);
        }
        if roots.len() > 1
            && roots.iter().any(|r| r == DISCOVER_ALL)
            && let Some(first) = raw.first()
        {
            self.error_at(
                first,
                "`gitlab.discover`: \"*\" (the whole instance) already covers every group; use it alone",
            );
        }
        // A group under another one is walked with it: naming both would read it twice.
        for r in &roots {
            let outer = roots.iter().find(|o| *o != r && *o != DISCOVER_ALL && r.starts_with(&format!("{o}/")));
            if let Some(outer) = outer
                && let Some(entry) = raw.iter().find(|e| e.get_ref().trim().trim_matches('/') == r)
            {
                let message =
                    format!("`gitlab.discover`: {r:?} is under {outer:?}, which is walked with its subgroups already");
                self.error_at(entry, message);
            }
        }
        roots
    }
}
