//! `[[destinations]]` -> [`Destination`]: name, URL, secrets, event filters, custom headers,
//! retry timing. Custom headers are checked with the `http` crate's types, the ones the HTTP
//! client sends, so a header that passes here is one the client can send.

use super::DestinationKind;
use super::raw::RawDestination;
use super::{Checker, Secret};
use crate::event::EventType;
use crate::tls::TlsSettings;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

pub const MAX_CUSTOM_HEADERS: usize = 20;
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
pub struct Destination {
    pub name: String,
    /// An http(s) URL, or for `kind = "nats"` the NATS servers.
    pub url: String,
    pub kind: DestinationKind,
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
    /// `ca_file` and client certificate (mTLS) for this destination.
    pub tls: TlsSettings,
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

impl Checker<'_> {
    pub(super) fn destinations(&mut self, raws: Vec<RawDestination>, base: &Path) -> Vec<Destination> {
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
            let kind = self.destination_kind(&who, &raw, base);
            if crate::urls::web(&url).is_none() && kind == DestinationKind::Http {
                self.error_at(
                    &raw.url,
                    format!("{who}: `url` = {:?} must be an http:// or https:// URL", crate::text::redact_url(&url)),
                );
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
            let tls = self.tls(&who, [&raw.ca_file, &raw.client_cert_file, &raw.client_key_file], base);
            out.push(Destination {
                name,
                url,
                kind,
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
                tls,
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
            // The types the HTTP client (ureq, over `http`) builds its request from: what passes
            // here is what it can send, and a value cannot smuggle a second header.
            let header_name = http::HeaderName::from_bytes(name.as_bytes());
            if header_name.is_err() {
                self.error_at(raw, format!("{who}: header name {name:?} is not a valid HTTP header name"));
            } else if header_name.is_ok_and(|n| RESERVED_HEADERS.contains(&n.as_str())) {
                self.error_at(raw, format!("{who}: header {name:?} is set by policy-audit and cannot be configured"));
            } else if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                self.error_at(raw, format!("{who}: header {name:?} has a line break in its value"));
            } else if http::HeaderValue::from_str(value).is_err() {
                self.error_at(
                    raw,
                    format!(
                        "{who}: header {name:?} has a value that is not a valid HTTP header value (it has a control character)"
                    ),
                );
            } else {
                out.push((name.clone(), value.clone()));
            }
        }
        out
    }
}
