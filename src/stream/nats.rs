//! One destination's NATS side (SPEC §11): JetStream publish of the stored event body to
//! `<subject>.<event_type>` with `Nats-Msg-Id` = the event id.
//!
//! Invariants:
//! - an event counts as delivered only on JetStream's publish acknowledgement (the stream has
//!   stored it); a duplicate acknowledgement (the id was already in the stream) is a delivery too;
//! - the stream is created when missing, with subjects `<subject>.>` and a duplicate window of
//!   [`DUPLICATE_WINDOW`], so a delivery repeated after a crash is dropped by the server;
//! - every outcome maps onto the one retry policy in `retry`: the server refusing the credentials
//!   is [`Outcome::Unsendable`] (dead, like HTTP 401), anything else that fails is retried.
//!
//! The delivery engine is synchronous (threads); the sender owns a current-thread tokio runtime
//! and blocks on it, so async-nats stays inside this file. It connects on the first send, once
//! per delivery round.

use super::retry::Outcome;
use crate::config::{Destination, DestinationKind, NatsAuth, NatsTarget};
use async_nats::jetstream;
use std::path::PathBuf;
use std::time::Duration;

/// JetStream's duplicate window for streams this program creates (SPEC: at least 2 minutes).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// How to reach a NATS server, shared by destinations and the cluster.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// One or more `nats://`/`tls://` servers, comma-separated.
    pub url: String,
    pub auth: NatsAuth,
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (mutual TLS), from the destination's
    /// `client_cert_file` / `client_key_file`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub timeout: Duration,
}

/// Why a connection failed, by kind: the caller decides whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("nats server {url} refused the credentials ({kind}): check token_env, token_file or credentials_file")]
    Refused { url: String, kind: String },
    #[error("cannot use {what} for nats server {url}: {reason}")]
    Setup { url: String, what: String, reason: String },
    #[error("cannot connect to nats server {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

impl ConnectError {
    /// Retrying with the same settings can succeed (the server is down, not refusing us).
    pub fn is_retriable(&self) -> bool {
        matches!(self, ConnectError::Unreachable { .. })
    }
}

/// rustls is built with two crypto providers in this program (ureq brings its own, explicitly),
/// so async-nats cannot pick one by itself: make ring, which it is built with, the default once.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: a provider is already installed, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Endpoint {
    /// Connects (must run inside a tokio runtime).
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, ConnectError> {
        install_crypto_provider();
        let setup =
            |what: &str, reason: String| ConnectError::Setup { url: self.url.clone(), what: what.to_string(), reason };
        let mut servers = Vec::new();
        for server in self.url.split(',') {
            let addr: async_nats::ServerAddr =
                server.trim().parse().map_err(|e: std::io::Error| setup("the url", e.to_string()))?;
            servers.push(addr);
        }
        let mut options = match &self.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::Token(token) => async_nats::ConnectOptions::with_token(token.expose().to_string()),
            NatsAuth::Credentials(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| setup(&format!("credentials file {}", path.display()), e.to_string()))?,
        };
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.url.split(',').any(|s| s.trim().starts_with("tls://")) {
            options = options.require_tls(true);
        }
        options = options.connection_timeout(self.timeout).request_timeout(Some(self.timeout)).name(name);
        options.connect(servers).await.map_err(|e| {
            use async_nats::ConnectErrorKind as Kind;
            match e.kind() {
                Kind::AuthorizationViolation | Kind::Authentication => {
                    ConnectError::Refused { url: self.url.clone(), kind: e.kind().to_string() }
                }
                Kind::ServerParse => setup("the url", e.to_string()),
                _ => ConnectError::Unreachable { url: self.url.clone(), reason: e.to_string() },
            }
        })
    }
}

/// The endpoint of a `kind = "nats"` destination.
pub fn endpoint(destination: &Destination, target: &NatsTarget) -> Endpoint {
    Endpoint {
        url: destination.url.clone(),
        auth: target.auth.clone(),
        ca_file: target.ca_file.clone(),
        client_cert: destination.tls.client_cert_file.clone().zip(destination.tls.client_key_file.clone()),
        timeout: destination.timeout,
    }
}

/// The stream a destination (or the cluster) writes to, created when missing.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: Vec<String>,
) -> Result<jetstream::stream::Stream, String> {
    let config = jetstream::stream::Config {
        name: name.to_string(),
        subjects,
        duplicate_window: DUPLICATE_WINDOW,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| format!("cannot find or create JetStream stream {name:?}: {e}"))
}

struct Connection {
    js: jetstream::Context,
    // Kept so the connection lives as long as the sender.
    _client: async_nats::Client,
}

pub struct Sender {
    name: String,
    endpoint: Endpoint,
    target: NatsTarget,
    runtime: Option<tokio::runtime::Runtime>,
    connection: Option<Connection>,
    /// A refusal that retrying in this round cannot change: every send answers it.
    refused: Option<Outcome>,
}

impl Sender {
    pub fn new(destination: &Destination) -> Option<Sender> {
        let DestinationKind::Nats(target) = &destination.kind else { return None };
        Some(Sender {
            name: destination.name.clone(),
            endpoint: endpoint(destination, target),
            target: target.clone(),
            runtime: None,
            connection: None,
            refused: None,
        })
    }

    /// Publishes one event and waits for JetStream's acknowledgement.
    pub fn send(&mut self, event_id: &str, event_type: &str, body: &[u8]) -> Outcome {
        if let Some(refused) = &self.refused {
            return refused.clone();
        }
        if self.runtime.is_none() {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => self.runtime = Some(rt),
                Err(e) => return Outcome::Transport { reason: format!("cannot start the nats runtime: {e}") },
            }
        }
        let Some(runtime) = &self.runtime else {
            return Outcome::Transport { reason: "the nats runtime is missing".into() };
        };
        if self.connection.is_none() {
            match runtime.block_on(self.connect()) {
                Ok(c) => self.connection = Some(c),
                Err(outcome @ Outcome::Unsendable { .. }) => {
                    self.refused = Some(outcome.clone());
                    return outcome;
                }
                Err(outcome) => return outcome,
            }
        }
        let Some(connection) = &self.connection else {
            return Outcome::Transport { reason: "not connected".into() };
        };
        let subject = format!("{}.{event_type}", self.target.subject);
        let outcome =
            runtime.block_on(publish(&connection.js, subject, event_id, event_type, body, self.endpoint.timeout));
        if matches!(outcome, Outcome::Transport { .. }) {
            self.connection = None; // reconnect on the next attempt
        }
        outcome
    }

    async fn connect(&self) -> Result<Connection, Outcome> {
        let client = self.endpoint.connect(&format!("policy-audit destination {}", self.name)).await.map_err(|e| {
            if e.is_retriable() {
                Outcome::Transport { reason: e.to_string() }
            } else {
                Outcome::Unsendable { reason: e.to_string() }
            }
        })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(self.endpoint.timeout);
        ensure_stream(&js, &self.target.stream, vec![format!("{}.>", self.target.subject)])
            .await
            .map_err(|reason| Outcome::Transport { reason })?;
        Ok(Connection { js, _client: client })
    }
}

/// One JetStream publish with the event id as `Nats-Msg-Id`, awaiting the acknowledgement.
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    event_id: &str,
    event_type: &str,
    body: &[u8],
    timeout: Duration,
) -> Outcome {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event_id);
    headers.insert("Content-Type", "application/json");
    headers.insert("X-Gitlab-Audit-Event-Type", event_type);
    let payload = bytes::Bytes::copy_from_slice(body);
    let attempt = async {
        let ack = js.publish_with_headers(subject.clone(), headers, payload).await?;
        ack.await
    };
    match tokio::time::timeout(timeout.saturating_mul(2), attempt).await {
        Ok(Ok(ack)) => Outcome::Acknowledged { duplicate: ack.duplicate },
        Ok(Err(e)) => {
            use jetstream::context::PublishErrorKind as Kind;
            let reason = match e.kind() {
                Kind::StreamNotFound => format!("no JetStream stream takes subject {subject:?}"),
                Kind::MaxPayloadExceeded => {
                    return Outcome::Unsendable { reason: format!("publish to {subject}: {e}") };
                }
                _ => format!("publish to {subject}: {e}"),
            };
            Outcome::Transport { reason }
        }
        Err(_) => Outcome::Transport { reason: format!("publish to {subject}: no acknowledgement within {timeout:?}") },
    }
}
