//! `[gitlab]`: the GitLab API used to attribute events to GitLab users and to name who merged
//! and who approved a merge request (SPEC §10). Optional: without it, attribution uses the
//! `[authors]` map and GitLab's private commit emails only.

use super::Checker;
use super::raw::RawGitLab;
use crate::config::Secret;
use crate::tls::TlsSettings;
use std::path::Path;
use std::time::Duration;

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
}

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
        Some(GitLab { url, token, timeout, cache_ttl, concurrency, tls })
    }
}
