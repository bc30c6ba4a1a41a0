//! The NATS side of the config (SPEC §11): destinations of `kind = "nats"` and the `[cluster]`
//! section. Kept apart from the HTTP checks so the two kinds do not tangle.
//!
//! A NATS URL is `nats://` or `tls://` (several comma-separated servers); credentials come from
//! one of `token_env`, `token_file` or a `.creds` file; `ca_file` adds a root certificate for TLS.

use super::raw::{RawCluster, RawDestination};
use super::{Checker, Secret};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Where a destination sends its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum DestinationKind {
    /// POST to `url` (the default).
    #[default]
    Http,
    Nats(NatsTarget),
}

/// A JetStream destination: events go to `<subject>.<event_type>` in `stream`.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsTarget {
    pub subject: String,
    pub stream: String,
    pub auth: NatsAuth,
    /// An extra root certificate (PEM) for `tls://` servers.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum NatsAuth {
    #[default]
    None,
    Token(Secret),
    /// A `.creds` file (JWT + nkey seed), read when connecting.
    Credentials(PathBuf),
}

/// `[cluster]`: instances sharing one config coordinate through JetStream.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub nats_url: String,
    /// Prefix of the stream and key-value bucket names.
    pub name: String,
    pub lease_ttl: Duration,
    pub auth: NatsAuth,
    pub ca_file: Option<PathBuf>,
}

pub const DEFAULT_CLUSTER_NAME: &str = "policy-audit";
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// Every server of a comma-separated list is `nats://` or `tls://` with a host.
pub fn valid_nats_url(url: &str) -> bool {
    !url.trim().is_empty()
        && url.split(',').all(|server| {
            let s = server.trim();
            let rest = s.strip_prefix("nats://").or_else(|| s.strip_prefix("tls://"));
            rest.is_some_and(|r| !r.is_empty() && !r.starts_with(['/', ':']))
        })
}

/// A stream or bucket name: letters, digits, `-` and `_` (JetStream forbids `.`, `*`, `>`, spaces).
fn valid_stream_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Subject tokens separated by `.`, none empty, no wildcards or spaces.
fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|t| !t.is_empty() && !t.contains(['*', '>']) && !t.chars().any(char::is_whitespace))
}

impl Checker<'_> {
    /// The kind of a destination, checking the keys that only one kind accepts.
    pub(super) fn destination_kind(&mut self, who: &str, raw: &RawDestination, base: &Path) -> DestinationKind {
        let kind = raw.kind.as_ref().map(|k| k.get_ref().as_str()).unwrap_or("http");
        let nats_only: [(&str, bool); 5] = [
            ("subject", raw.subject.is_some()),
            ("stream", raw.stream.is_some()),
            ("token_env", raw.token_env.is_some()),
            ("token_file", raw.token_file.is_some()),
            ("credentials_file", raw.credentials_file.is_some()),
        ];
        match kind {
            "http" => {
                for (key, set) in nats_only {
                    if set {
                        self.error_at(&raw.name, format!("{who}: `{key}` is for `kind = \"nats\"` destinations"));
                    }
                }
                DestinationKind::Http
            }
            "nats" => {
                let http_only = [
                    ("verification_token_env", raw.verification_token_env.is_some()),
                    ("verification_token_file", raw.verification_token_file.is_some()),
                    ("signing_secret_env", raw.signing_secret_env.is_some()),
                    ("signing_secret_file", raw.signing_secret_file.is_some()),
                    ("headers", raw.headers.is_some()),
                    ("allow_insecure_http", raw.allow_insecure_http),
                ];
                for (key, set) in http_only {
                    if set {
                        self.error_at(&raw.name, format!("{who}: `{key}` is for `kind = \"http\"` destinations"));
                    }
                }
                if !valid_nats_url(raw.url.get_ref()) {
                    self.error_at(
                        &raw.url,
                        format!(
                            "{who}: `url` = {:?} must be nats:// or tls:// servers, comma-separated",
                            raw.url.get_ref()
                        ),
                    );
                }
                let subject =
                    self.required(who, "subject", &raw.subject, valid_subject, "like \"gitlab.audit.policy\"");
                let stream = self.required(who, "stream", &raw.stream, valid_stream_name, "like \"GITLAB_AUDIT\"");
                let auth = self.nats_auth(who, &raw.token_env, &raw.token_file, &raw.credentials_file, base);
                let ca_file = raw.ca_file.as_ref().map(|f| base.join(f.get_ref()));
                DestinationKind::Nats(NatsTarget { subject, stream, auth, ca_file })
            }
            other => {
                if let Some(k) = &raw.kind {
                    self.error_at(
                        k,
                        format!("{who}: `kind` = {other:?} is not a destination kind (\"http\" or \"nats\")"),
                    );
                }
                DestinationKind::Http
            }
        }
    }

    fn required(
        &mut self,
        who: &str,
        key: &str,
        value: &Option<Spanned<String>>,
        valid: fn(&str) -> bool,
        example: &str,
    ) -> String {
        match value {
            Some(v) if valid(v.get_ref().trim()) => v.get_ref().trim().to_string(),
            Some(v) => {
                self.error_at(v, format!("{who}: `{key}` = {:?} is not valid; write it {example}", v.get_ref()));
                String::new()
            }
            None => {
                self.errors
                    .push(format!("{}: {who}: `kind = \"nats\"` needs `{key}` ({example})", self.file.display()));
                String::new()
            }
        }
    }

    pub(super) fn nats_auth(
        &mut self,
        who: &str,
        token_env: &Option<Spanned<String>>,
        token_file: &Option<Spanned<String>>,
        credentials_file: &Option<Spanned<String>>,
        base: &Path,
    ) -> NatsAuth {
        if let (Some(c), true) = (credentials_file, token_env.is_some() || token_file.is_some()) {
            self.error_at(
                c,
                format!("{who}: set either a token (`token_env`/`token_file`) or `credentials_file`, not both"),
            );
            return NatsAuth::None;
        }
        if let Some(c) = credentials_file {
            let path = base.join(c.get_ref());
            if self.resolve_secrets && !path.is_file() {
                self.error_at(c, format!("{who}: `credentials_file` {} does not exist", path.display()));
            }
            return NatsAuth::Credentials(path);
        }
        match self.secret(who, "token", token_env, token_file, base) {
            Some(token) => NatsAuth::Token(token),
            None => NatsAuth::None,
        }
    }

    pub(super) fn cluster(&mut self, raw: Option<RawCluster>, base: &Path) -> Option<Cluster> {
        let raw = raw?;
        let who = "[cluster]";
        if !valid_nats_url(raw.nats_url.get_ref()) {
            self.error_at(
                &raw.nats_url,
                format!(
                    "{who}: `nats_url` = {:?} must be nats:// or tls:// servers, comma-separated",
                    raw.nats_url.get_ref()
                ),
            );
        }
        let name = match &raw.name {
            Some(n) if valid_stream_name(n.get_ref()) => n.get_ref().clone(),
            Some(n) => {
                self.error_at(
                    n,
                    format!("{who}: `name` = {:?} may hold only letters, digits, '-' and '_'", n.get_ref()),
                );
                DEFAULT_CLUSTER_NAME.to_string()
            }
            None => DEFAULT_CLUSTER_NAME.to_string(),
        };
        let lease_ttl = self.duration(&raw.lease_ttl, "lease_ttl", DEFAULT_LEASE_TTL);
        if lease_ttl < Duration::from_secs(1)
            && let Some(t) = &raw.lease_ttl
        {
            self.error_at(t, format!("{who}: `lease_ttl` must be at least 1s"));
        }
        let auth = self.nats_auth(who, &raw.token_env, &raw.token_file, &raw.credentials_file, base);
        let ca_file = raw.ca_file.as_ref().map(|f| base.join(f.get_ref()));
        Some(Cluster { nats_url: raw.nats_url.get_ref().trim().to_string(), name, lease_ttl, auth, ca_file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Without reading secrets and certificates (the files named here do not exist).
    fn parse(text: &str) -> Result<Config, String> {
        Config::parse_with(Path::new("/etc/pa/config.toml"), text, false).map_err(|e| e.to_string())
    }

    const NATS: &str = "[[destinations]]\nname = \"bus\"\nkind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\n";

    #[test]
    fn a_destination_without_kind_stays_http() {
        let c = parse("[[destinations]]\nname = \"siem\"\nurl = \"https://siem.example.com/a\"\n").unwrap();
        assert_eq!(c.destinations[0].kind, DestinationKind::Http);
        assert!(c.cluster.is_none(), "no [cluster]: the single-instance mode");
    }

    #[test]
    fn a_nats_destination_needs_subject_and_stream_and_refuses_http_keys() {
        let c = parse(&format!(
            "{NATS}subject = \"gitlab.audit.policy\"\nstream = \"GITLAB_AUDIT\"\nca_file = \"ca.pem\"\n"
        ))
        .unwrap();
        let DestinationKind::Nats(target) = &c.destinations[0].kind else { panic!("not nats") };
        assert_eq!((target.subject.as_str(), target.stream.as_str()), ("gitlab.audit.policy", "GITLAB_AUDIT"));
        assert_eq!(target.auth, NatsAuth::None);
        assert_eq!(target.ca_file.as_deref(), Some(Path::new("/etc/pa/ca.pem")));

        let e = parse(NATS).unwrap_err();
        assert!(e.contains("destination \"bus\": `kind = \"nats\"` needs `subject`"), "{e}");
        assert!(e.contains("needs `stream`"), "{e}");
        let e = parse(&format!("{NATS}subject = \"a.>\"\nstream = \"S\"\nsigning_secret_env = \"X\"\n")).unwrap_err();
        assert!(e.contains("`subject` = \"a.>\" is not valid"), "{e}");
        assert!(e.contains("`signing_secret_env` is for `kind = \"http\"` destinations"), "{e}");
        let e = parse(
            "[[destinations]]\nname = \"b\"\nkind = \"nats\"\nurl = \"https://x\"\nsubject = \"a\"\nstream = \"S\"\n",
        )
        .unwrap_err();
        assert!(e.contains("must be nats:// or tls:// servers"), "{e}");
        let e = parse("[[destinations]]\nname = \"b\"\nkind = \"kafka\"\nurl = \"https://x\"\n").unwrap_err();
        assert!(e.contains("`kind` = \"kafka\" is not a destination kind"), "{e}");
        let e = parse("[[destinations]]\nname = \"b\"\nurl = \"https://x\"\nsubject = \"a\"\n").unwrap_err();
        assert!(e.contains("`subject` is for `kind = \"nats\"` destinations"), "{e}");
    }

    #[test]
    fn a_nats_token_resolves_like_other_secrets_and_excludes_a_creds_file() {
        let e = Config::parse(
            Path::new("/etc/pa/config.toml"),
            &format!("{NATS}subject = \"a\"\nstream = \"S\"\ntoken_env = \"PA_TEST_UNSET_NATS_TOKEN\"\n"),
        )
        .map_err(|e| e.to_string())
        .unwrap_err();
        assert!(e.contains("`token_env`: environment variable PA_TEST_UNSET_NATS_TOKEN is not set"), "{e}");
        let e = parse(&format!(
            "{NATS}subject = \"a\"\nstream = \"S\"\ntoken_file = \"t\"\ncredentials_file = \"c.creds\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn cluster_defaults_and_checks() {
        let c = parse("[cluster]\nnats_url = \"nats://a:4222,nats://b:4222\"\n").unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.name, DEFAULT_CLUSTER_NAME);
        assert_eq!(cluster.lease_ttl, DEFAULT_LEASE_TTL);
        let e = parse("[cluster]\nnats_url = \"nats://a\"\nname = \"a.b\"\nlease_ttl = \"500ms\"\n").unwrap_err();
        assert!(e.contains("`name` = \"a.b\" may hold only"), "{e}");
        assert!(e.contains("`lease_ttl` must be at least 1s"), "{e}");
    }

    #[test]
    fn nats_urls_subjects_and_names() {
        assert!(valid_nats_url("nats://127.0.0.1:4222"));
        assert!(valid_nats_url("nats://a:4222, tls://b:4222"));
        assert!(!valid_nats_url("http://a:4222"));
        assert!(!valid_nats_url("nats://"));
        assert!(valid_subject("gitlab.audit.policy"));
        assert!(!valid_subject("gitlab..audit"));
        assert!(!valid_subject("gitlab.>"));
        assert!(valid_stream_name("GITLAB_AUDIT"));
        assert!(!valid_stream_name("GITLAB.AUDIT"));
    }
}
