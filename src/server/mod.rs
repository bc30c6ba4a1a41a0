//! The HTTP server (SPEC §8, §9): the Audit events page, GitLab's audit events API, `/metrics`,
//! `/healthz`, `/readyz` and the push webhook, on the daemon's tokio runtime (or alone, for
//! `serve` and `demo --serve`).
//!
//! Invariants:
//! - every route but `/healthz`, `/readyz`, the login form, the stylesheet and the webhook
//!   (which has its own secret) needs the read token: `PRIVATE-TOKEN`, `Authorization: Bearer`
//!   or the login cookie; tokens are compared in constant time (as SHA-256 digests, so the
//!   comparison does not even leak the length);
//! - a client cannot hold the server: headers must arrive within [`HEADER_READ_TIMEOUT`] and fit
//!   in [`MAX_HEADER_BYTES`], bodies are capped at [`MAX_BODY_BYTES`] (413, read to the client
//!   through a bounded lingering close: [`linger`]) and a whole request must be answered within
//!   [`REQUEST_TIMEOUT`] (408), slow bodies included;
//! - the server only reads the store (the webhook only queues a reconcile): it never writes the
//!   trail.

pub mod api;
pub mod hooks;
pub mod linger;
pub mod metrics;
pub mod signin;
pub mod viewers;
pub mod web;

use crate::config::{Config, Secret, ServerConfig};
use crate::store::Store;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

pub use hooks::HookQueue;
pub use metrics::Activity;

pub const MAX_BODY_BYTES: usize = 1024 * 1024;
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const SESSION_COOKIE: &str = "policy_audit_session";

/// What the server reads: the daemon, or a store opened by `serve` / `demo --serve`.
pub trait Source: Send + Sync + 'static {
    fn config(&self) -> Arc<Config>;
    fn store(&self) -> &Store;
    /// Reconcile activity for `/metrics` and `/readyz` (None without a reconciler).
    fn activity(&self) -> Option<&Activity> {
        None
    }
    /// Where the webhook queues reconciles (None without a reconciler: no `/hooks/gitlab`).
    fn hooks(&self) -> Option<&HookQueue> {
        None
    }
}

/// A store opened for the server alone (`serve`, `demo --serve`).
pub struct Standalone {
    pub config: Arc<Config>,
    pub store: Store,
}

impl Source for Standalone {
    fn config(&self) -> Arc<Config> {
        self.config.clone()
    }
    fn store(&self) -> &Store {
        &self.store
    }
}

pub type Shared = Arc<dyn Source>;

/// The routes with their limits and the authentication in front of the reads.
pub fn router(source: Shared) -> Router {
    let reads = Router::new()
        .route("/", get(web::index))
        .route("/events/{id}", get(web::event))
        .route("/policy", get(web::policy))
        .route("/status", get(web::status))
        .route("/export.csv", get(web::export_csv))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v4/audit_events", get(api::all))
        .route("/api/v4/audit_events/{event_id}", get(api::one))
        .route("/api/v4/projects/{id}/audit_events", get(api::project))
        .route("/api/v4/projects/{id}/audit_events/{event_id}", get(api::project_one))
        .route("/api/v4/groups/{id}/audit_events", get(api::group))
        .route("/api/v4/groups/{id}/audit_events/{event_id}", get(api::group_one))
        .route("/api/{*rest}", get(api::no_route))
        .route_layer(axum::middleware::from_fn_with_state(source.clone(), require_token));
    Router::new()
        .route("/healthz", get(metrics::healthz))
        .route("/readyz", get(metrics::readyz))
        .route("/login", get(web::login_form).post(web::login))
        .route("/logout", post(web::logout))
        .route("/sign-in", get(signin::sign_in))
        .route("/oauth/callback", get(signin::callback))
        .route("/static/style.css", get(web::stylesheet))
        .route("/hooks/gitlab", post(hooks::gitlab))
        .merge(reads)
        .fallback(fallback)
        .layer(axum::middleware::from_fn(security_headers))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        // The events page's rendered rows, kept for this server (`web::Rows`).
        .layer(axum::Extension(Arc::new(web::Rows::default())))
        // Who reads: GitLab's answers about users and roles, and the read counts.
        .layer(axum::Extension(Arc::new(viewers::Viewers::default())))
        .with_state(source)
}

/// Serves `router(source)` on `listener` until `stop` is cancelled, then lets the requests in
/// flight finish (up to 5 s).
pub async fn serve(source: Shared, listener: tokio::net::TcpListener, stop: crate::stop::Stop) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let app = router(source);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "cannot accept an http connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let (stream, kept) = match linger::split(stream) {
            Ok(split) => split,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve an http connection");
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
            if let Some(kept) = kept {
                linger::linger(kept).await;
            }
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => tracing::warn!("http requests still running after 5 s; closing them"),
    }
}

/// Binds `[server] listen`, with the address in the error.
pub async fn bind(server: &ServerConfig) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(server.listen)
        .await
        .with_context(|| format!("cannot listen on {} ([server] listen)", server.listen))
}

fn digest(text: &[u8]) -> [u8; 32] {
    Sha256::digest(text).into()
}

/// Constant-time equality of a presented secret and the configured one.
pub fn secret_matches(presented: &[u8], secret: &Secret) -> bool {
    digest(presented).ct_eq(&digest(secret.expose().as_bytes())).into()
}

/// The login cookie's value: derived from the token, so the token itself never sits in a
/// cookie, and changing the token logs everybody out.
fn session_value(token: &Secret) -> String {
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(token.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(b"policy-audit login session v1");
    crate::store::chain::hex(&mac.finalize().into_bytes())
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (name, value) = c.trim().split_once('=')?;
        (name == SESSION_COOKIE).then(|| value.to_string())
    })
}

/// What a request presents.
enum Presented {
    /// The service token, or the login cookie made from it.
    Service,
    /// Some other token (a person's own GitLab token, with `[server.sign_in]`).
    Token(String),
    /// A signed-in person's session cookie.
    Session(String),
    Nothing,
}

fn presented(config: &Config, headers: &HeaderMap) -> Presented {
    let token = config.server.as_ref().and_then(|s| s.token.as_ref());
    let given =
        headers.get("private-token").and_then(|v| v.to_str().ok()).map(|v| v.trim().to_string()).or_else(|| {
            let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
            let (scheme, value) = auth.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| value.trim().to_string())
        });
    if let Some(given) = given {
        if token.is_some_and(|t| secret_matches(given.as_bytes(), t)) {
            return Presented::Service;
        }
        return if given.is_empty() { Presented::Nothing } else { Presented::Token(given) };
    }
    let cookie = session_cookie(headers);
    if let (Some(c), Some(token)) = (cookie, token)
        && bool::from(digest(c.as_bytes()).ct_eq(&digest(session_value(token).as_bytes())))
    {
        return Presented::Service;
    }
    match signin::cookie(headers) {
        Some(c) => Presented::Session(c),
        None => Presented::Nothing,
    }
}

async fn require_token(
    State(source): State<Shared>,
    axum::Extension(viewers): axum::Extension<Arc<viewers::Viewers>>,
    mut request: Request,
    next: Next,
) -> Response {
    let config = source.config();
    let path = request.uri().path().to_string();
    let api = path.starts_with("/api/") || path == "/metrics";
    let refused = |request: &Request| {
        if api {
            api::message(StatusCode::UNAUTHORIZED, "401 Unauthorized")
        } else {
            web::login_page(StatusCode::UNAUTHORIZED, None, path_and_query(request), web::gitlab(&source))
        }
    };
    let viewer = match presented(&config, request.headers()) {
        Presented::Service => viewers::Viewer::Service,
        Presented::Nothing => return refused(&request),
        Presented::Session(cookie) => match viewers.sessions.session(&cookie) {
            Some(session) => viewers::Viewer::User(viewers::User::of_session(session)),
            None => return refused(&request),
        },
        Presented::Token(token) => {
            let Some(sign_in) = config.server.as_ref().and_then(|s| s.sign_in.clone()) else {
                return refused(&request);
            };
            let v = viewers.clone();
            let resolved = tokio::task::spawn_blocking(move || v.user(&sign_in, &token)).await;
            match resolved {
                Ok(Ok(Some(user))) => viewers::Viewer::User(user),
                Ok(Ok(None)) => {
                    *viewers.sign_ins_refused.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    tracing::info!(route = %path, "a token GitLab does not know was refused");
                    return refused(&request);
                }
                Ok(Err(viewers::Unavailable(why))) => {
                    tracing::warn!(route = %path, error = %why, "cannot tell who is reading: GitLab does not answer (refused with 503)");
                    return unavailable(api);
                }
                Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}\n")).into_response(),
            }
        }
    };
    if (path == "/metrics" || path == "/status") && !matches!(viewer, viewers::Viewer::Service) {
        // The service's own state, not the trail: for the service token only.
        return api::message(StatusCode::FORBIDDEN, "403 Forbidden");
    }
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    viewers.count_read(&route, &viewer);
    // Who read the trail: API reads and exports by person (never a token).
    if api || route == "/export.csv" {
        tracing::info!(route = %route, viewer = %viewer.name(), kind = viewer.kind(), "trail read");
    }
    request.extensions_mut().insert(viewer);
    next.run(request).await
}

/// GitLab cannot say who is reading: fail closed.
fn unavailable(api: bool) -> Response {
    if api {
        api::message(StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "GitLab does not answer, so who you are cannot be checked: nothing is shown. Try again in a moment.\n",
        )
            .into_response()
    }
}

/// What the request's viewer may see (asks GitLab for roles when not cached), or the answer
/// that refuses the request.
pub(crate) async fn visible(
    source: &Shared,
    viewers: &Arc<viewers::Viewers>,
    viewer: &viewers::Viewer,
) -> Result<viewers::Visible, Response> {
    let (config, v, viewer) = (source.config(), viewers.clone(), viewer.clone());
    let api = true;
    match tokio::task::spawn_blocking(move || v.visible(&config, &viewer)).await {
        Ok(Ok(visible)) => Ok(visible),
        Ok(Err(viewers::Unavailable(why))) => {
            tracing::warn!(error = %why, "cannot read the viewer's roles from GitLab (refused with 503)");
            Err(unavailable(api))
        }
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}\n")).into_response()),
    }
}

fn path_and_query(request: &Request) -> String {
    request.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into())
}

async fn fallback(request: Request) -> Response {
    if request.uri().path().starts_with("/api/") { api::no_route().await } else { web::not_found() }
}

/// Headers every answer carries; pages get the strict CSP (no script at all, styles only from
/// our own stylesheet).
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// Runs a store read off the async threads; a panic or error becomes a 500 that names it.
pub(crate) async fn blocking<T: Send + 'static>(
    source: &Shared,
    read: impl FnOnce(&dyn Source) -> anyhow::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let source = source.clone();
    match tokio::task::spawn_blocking(move || read(source.as_ref())).await {
        Ok(result) => result.map_err(read_failed),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}\n")).into_response()),
    }
}

fn read_failed(e: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "cannot read the trail");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the trail: {e:#}\n")).into_response()
}

/// `policy-audit serve`: the server alone on the store (no polling), until SIGTERM/SIGINT.
pub fn run_standalone(config: Config) -> crate::app::Output {
    use crate::app::Output;
    if config.server.is_none() {
        return Output::unusable(format!(
            "{}: `serve` needs a [server] section (listen, token_env or token_file); see docs/api.md",
            config.source.display()
        ));
    }
    let store = match Store::open(&config.db_dir()) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.downcast_ref::<crate::store::StoreError>(),
                Some(crate::store::StoreError::Locked { .. })
            ) =>
        {
            return Output::unusable(format!(
                "{e:#}; a running daemon serves the page itself when its config has [server] (reload or restart it)"
            ));
        }
        Err(e) => return Output::unusable(format!("{e:#}")),
    };
    match serve_until_signal(
        config,
        store,
        |addr| tracing::info!(listen = %addr, "serving the audit events page and API"),
    ) {
        Ok(()) => Output::default(),
        Err(e) => Output::unusable(format!("{e:#}")),
    }
}

/// Serves `store` with `config.server` until SIGTERM/SIGINT; `started` is told the address.
pub fn serve_until_signal(
    config: Config,
    store: Store,
    started: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    use anyhow::Context;
    let server = config.server.clone().context("no [server] section")?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let listener = bind(&server).await?;
        started(listener.local_addr()?);
        let stop = crate::stop::Stop::new();
        let source: Shared =
            Arc::new(Standalone { config: Arc::new(crate::discovery::effective(&config, &store)), store });
        let serving = tokio::spawn(serve(source, listener, stop.clone()));
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down the http server");
        stop.cancel();
        let _ = serving.await;
        Ok(())
    })
}
