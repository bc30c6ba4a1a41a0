//! `[server]` (SPEC §8): the web page, the GitLab-compatible read API, `/metrics` and the push
//! webhook. Absent = no HTTP server. The read token is required (no anonymous reads, not even
//! on loopback); the webhook secret is optional (absent = no `/hooks/gitlab`).

use super::{Checker, Secret};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Spanned<String>,
    pub token_env: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
    pub webhook_secret_env: Option<Spanned<String>>,
    pub webhook_secret_file: Option<Spanned<String>>,
    pub public_url: Option<Spanned<String>>,
    pub gitlab_url: Option<Spanned<String>>,
    /// The service token sees only the SPPs linked into these namespaces (empty = all).
    #[serde(default)]
    pub token_namespaces: Vec<String>,
    pub sign_in: Option<RawSignIn>,
}

/// `[server.sign_in]`: people read with their own GitLab identity (SPEC §13).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSignIn {
    pub gitlab_url: Spanned<String>,
    pub timeout: Option<Spanned<String>>,
    pub user_cache_ttl: Option<Spanned<String>>,
    pub membership_cache_ttl: Option<Spanned<String>>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub client_id: Option<Spanned<String>>,
    pub client_secret_env: Option<Spanned<String>>,
    pub client_secret_file: Option<Spanned<String>>,
    pub redirect_url: Option<Spanned<String>>,
    pub session_ttl: Option<Spanned<String>>,
}

/// Who may read, beyond the service token: users of this GitLab, by their own token.
#[derive(Debug, Clone)]
pub struct SignIn {
    /// Without a trailing slash.
    pub gitlab_url: String,
    /// Per call to GitLab (who is this token? what is their role there?).
    pub timeout: std::time::Duration,
    /// How long a token's user is remembered: a revoked token works at most this long.
    pub user_cache_ttl: std::time::Duration,
    /// How long a user's role in a namespace is remembered.
    pub membership_cache_ttl: std::time::Duration,
    /// Signing in through GitLab's OAuth pages (the authorization code flow with PKCE).
    pub oauth: Option<OAuth>,
}

/// The OAuth application registered in GitLab for the page.
#[derive(Debug, Clone)]
pub struct OAuth {
    pub client_id: String,
    /// None only when secrets were not resolved.
    pub client_secret: Option<Secret>,
    /// This server's `/oauth/callback`, exactly as registered in GitLab.
    pub redirect_url: String,
    /// How long a signed-in session lasts.
    pub session_ttl: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// None only when secrets were not resolved (a CLI that just looks for the daemon).
    pub token: Option<Secret>,
    pub webhook_secret: Option<Secret>,
    /// Without a trailing slash.
    pub public_url: Option<String>,
    /// Without a trailing slash.
    pub gitlab_url: Option<String>,
    /// The service token's namespaces (empty = every SPP).
    pub token_namespaces: Vec<String>,
    pub sign_in: Option<SignIn>,
}

impl ServerConfig {
    /// Whether the login cookie must be `Secure`.
    pub fn https(&self) -> bool {
        self.public_url.as_deref().is_some_and(|u| u.starts_with("https://"))
    }
}

impl Checker<'_> {
    pub(super) fn server(&mut self, raw: Option<RawServer>, base: &Path) -> Option<ServerConfig> {
        let raw = raw?;
        let listen = match raw.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.error_at(
                    &raw.listen,
                    format!(
                        "`server.listen` = {:?} is not an address and port like \"127.0.0.1:8080\"",
                        raw.listen.get_ref()
                    ),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        };
        if raw.token_env.is_none() && raw.token_file.is_none() {
            self.error_at(
                &raw.listen,
                "[server]: set `token_env` or `token_file`: every read needs the token (there are no anonymous reads)",
            );
        }
        let token = self.secret("[server]", "token", &raw.token_env, &raw.token_file, base);
        let webhook_secret =
            self.secret("[server]", "webhook_secret", &raw.webhook_secret_env, &raw.webhook_secret_file, base);
        let public_url = self.http_url(raw.public_url.as_ref(), "server.public_url");
        let gitlab_url = self.http_url(raw.gitlab_url.as_ref(), "server.gitlab_url");
        let token_namespaces: Vec<String> = raw
            .token_namespaces
            .iter()
            .map(|n| n.trim().trim_matches('/').to_string())
            .filter(|n| !n.is_empty())
            .collect();
        let sign_in = raw.sign_in.and_then(|r| self.sign_in(r, base));
        Some(ServerConfig { listen, token, webhook_secret, public_url, gitlab_url, token_namespaces, sign_in })
    }

    fn sign_in(&mut self, raw: RawSignIn, base: &Path) -> Option<SignIn> {
        let gitlab_url = self.http_url(Some(&raw.gitlab_url), "server.sign_in.gitlab_url")?;
        // Users' tokens go to this URL: plain http only to loopback, or when the user says so.
        self.check_plain_http(&raw.gitlab_url, "[server.sign_in]", "users' tokens", true, raw.allow_insecure_http);
        let sixty = std::time::Duration::from_secs(60);
        let timeout = self.duration(&raw.timeout, "server.sign_in.timeout", std::time::Duration::from_secs(5));
        let user_cache_ttl = self.duration(&raw.user_cache_ttl, "server.sign_in.user_cache_ttl", sixty);
        let membership_cache_ttl =
            self.duration(&raw.membership_cache_ttl, "server.sign_in.membership_cache_ttl", sixty);
        let session_ttl =
            self.duration(&raw.session_ttl, "server.sign_in.session_ttl", std::time::Duration::from_secs(8 * 3600));
        let oauth = match (&raw.client_id, &raw.redirect_url) {
            (None, None) => {
                if let Some(k) = raw.client_secret_env.as_ref().or(raw.client_secret_file.as_ref()) {
                    self.error_at(k, "[server.sign_in]: a client secret without `client_id` and `redirect_url`");
                }
                None
            }
            (Some(id), Some(redirect)) => {
                if raw.client_secret_env.is_none() && raw.client_secret_file.is_none() {
                    self.error_at(id, "[server.sign_in]: set `client_secret_env` or `client_secret_file` (the OAuth application's secret)");
                }
                let client_secret = self.secret(
                    "[server.sign_in]",
                    "client_secret",
                    &raw.client_secret_env,
                    &raw.client_secret_file,
                    base,
                );
                let redirect_url = self.http_url(Some(redirect), "server.sign_in.redirect_url");
                if let Some(url) = &redirect_url
                    && !url.ends_with("/oauth/callback")
                {
                    self.error_at(redirect, "`server.sign_in.redirect_url` must be this server's /oauth/callback URL, as registered in GitLab");
                }
                redirect_url.map(|redirect_url| OAuth {
                    client_id: id.get_ref().trim().to_string(),
                    client_secret,
                    redirect_url,
                    session_ttl,
                })
            }
            (Some(k), None) | (None, Some(k)) => {
                self.error_at(
                    k,
                    "[server.sign_in]: signing in through GitLab needs both `client_id` and `redirect_url`",
                );
                None
            }
        };
        Some(SignIn { gitlab_url, timeout, user_cache_ttl, membership_cache_ttl, oauth })
    }

    fn http_url(&mut self, raw: Option<&Spanned<String>>, key: &str) -> Option<String> {
        let raw = raw?;
        let url = raw.get_ref().trim().trim_end_matches('/');
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.contains(['"', '<', '>', ' ']) {
            self.error_at(raw, format!("`{key}` = {:?} is not an http(s) URL", raw.get_ref()));
            return None;
        }
        Some(url.to_string())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn parse(server: &str) -> Result<Config, Vec<String>> {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("token"), "t0ken\n").expect("token");
        let path = dir.path().join("config.toml");
        Config::parse(Path::new(&path), &format!("state_dir = \"s\"\n[server]\n{server}")).map_err(|e| e.errors)
    }

    #[test]
    fn a_server_needs_an_address_and_a_token() {
        let ok =
            parse("listen = \"127.0.0.1:8080\"\ntoken_file = \"token\"\npublic_url = \"https://audit.example.com/\"\n")
                .expect("valid");
        let server = ok.server.expect("[server]");
        assert_eq!(server.token.as_ref().map(|t| t.expose()), Some("t0ken"));
        assert_eq!(server.public_url.as_deref(), Some("https://audit.example.com"));
        assert!(server.https() && server.webhook_secret.is_none());

        let errors = parse("listen = \"127.0.0.1:8080\"\n").expect_err("no token");
        assert!(errors.iter().any(|e| e.contains("config.toml:3:") && e.contains("token_env")), "{errors:?}");
        let errors = parse("listen = \"localhost\"\ntoken_file = \"token\"\n").expect_err("no port");
        assert!(errors.iter().any(|e| e.contains("server.listen")), "{errors:?}");
        let errors = parse("listen = \"127.0.0.1:1\"\ntoken_file = \"token\"\ngitlab_url = \"javascript:alert(1)\"\n")
            .expect_err("not http");
        assert!(errors.iter().any(|e| e.contains("server.gitlab_url")), "{errors:?}");
        let errors = parse("listen = \"127.0.0.1:1\"\ntoken_file = \"token\"\nport = 1\n").expect_err("unknown key");
        assert!(errors.iter().any(|e| e.contains("port")), "{errors:?}");
    }
}
