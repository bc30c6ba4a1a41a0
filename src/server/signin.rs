//! Signing in with GitLab (SPEC §13): OAuth 2.0's authorization code flow with PKCE and
//! `state`, through the `oauth2` crate, against `[server.sign_in]`'s GitLab.
//!
//! `/sign-in` sends the browser to GitLab's `/oauth/authorize` (scopes `openid read_api`);
//! GitLab sends it back to `/oauth/callback` with a code, which is exchanged (with the PKCE
//! verifier and the client secret) for the person's access token; `GET /api/v4/user` says who
//! they are; a session is made and the browser gets its id in a signed cookie.
//!
//! Invariants:
//! - a `state` is used once and only within [`PENDING_TTL`]: a forged or replayed one, or one
//!   whose verifier is gone, fails closed with a page that says so;
//! - `redirect_to` is only ever a path of this server (no open redirect);
//! - the cookie is `HttpOnly; SameSite=Lax` (GitLab's redirect back is a cross-site navigation),
//!   `Secure` behind https, expires with the session, and holds a random id and its HMAC under a
//!   key made at start: a cookie signed with another key, or of a session that expired or was
//!   signed out, is no session. Sessions live in memory: a restart signs everybody out;
//! - the access token stays on the server (for GitLab's members API) and is never logged.

use crate::config::{OAuth, Secret, SignIn};
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The user cookie's name (the service token's login cookie is another one).
pub const USER_COOKIE: &str = "policy_audit_user";
/// How long a sign-in may take between `/sign-in` and the callback.
pub const PENDING_TTL: Duration = Duration::from_secs(600);
/// Sign-ins in progress at once (a flood of `/sign-in` cannot grow memory without bound).
const MAX_PENDING: usize = 10_000;

struct Pending {
    verifier: String,
    redirect_to: String,
    created: Instant,
}

/// A signed-in person.
#[derive(Clone)]
pub struct Session {
    pub id: i64,
    pub username: String,
    pub admin: bool,
    pub token: Secret,
    expires: Instant,
}

pub struct Sessions {
    key: [u8; 32],
    pending: Mutex<HashMap<String, Pending>>,
    sessions: Mutex<HashMap<String, Session>>,
}

impl Default for Sessions {
    fn default() -> Sessions {
        Sessions { key: rand::random(), pending: Mutex::default(), sessions: Mutex::default() }
    }
}

/// Why a sign-in failed, for the page that says so.
#[derive(Debug)]
pub enum Failed {
    /// Unknown, replayed or expired `state` (or its verifier gone).
    State,
    /// GitLab said no (the person denied access, a bad code).
    Refused(String),
    /// GitLab did not answer in time, or not usably.
    Unavailable(String),
}

fn client(sign_in: &SignIn, oauth: &OAuth) -> Result<Client, String> {
    use oauth2::{AuthUrl, ClientId, ClientSecret, RedirectUrl, TokenUrl};
    let auth = AuthUrl::new(format!("{}/oauth/authorize", sign_in.gitlab_url)).map_err(|e| e.to_string())?;
    let token = TokenUrl::new(format!("{}/oauth/token", sign_in.gitlab_url)).map_err(|e| e.to_string())?;
    let redirect = RedirectUrl::new(oauth.redirect_url.clone()).map_err(|e| e.to_string())?;
    let mut client = oauth2::basic::BasicClient::new(ClientId::new(oauth.client_id.clone()))
        .set_auth_uri(auth)
        .set_token_uri(token)
        .set_redirect_uri(redirect);
    if let Some(secret) = &oauth.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose().to_string()));
    }
    Ok(client)
}

type Client = oauth2::Client<
    oauth2::basic::BasicErrorResponse,
    oauth2::basic::BasicTokenResponse,
    oauth2::basic::BasicTokenIntrospectionResponse,
    oauth2::StandardRevocableToken,
    oauth2::basic::BasicRevocationErrorResponse,
    oauth2::EndpointSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

/// Only a path of this server: never `//host`, a scheme or a backslash (an open redirect).
pub fn safe_redirect(to: &str) -> String {
    if to.starts_with('/') && !to.starts_with("//") && !to.contains('\\') && !to.contains(['\r', '\n']) {
        to.to_string()
    } else {
        "/".into()
    }
}

impl Sessions {
    /// Where to send the browser to sign in (GitLab's authorize URL with state and PKCE).
    pub fn start(&self, sign_in: &SignIn, oauth: &OAuth, redirect_to: &str) -> Result<String, String> {
        let client = client(sign_in, oauth)?;
        let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
        let (url, state) = client
            .authorize_url(oauth2::CsrfToken::new_random)
            .add_scope(oauth2::Scope::new("openid".into()))
            .add_scope(oauth2::Scope::new("read_api".into()))
            .set_pkce_challenge(challenge)
            .url();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, p| p.created.elapsed() < PENDING_TTL);
        if pending.len() >= MAX_PENDING {
            return Err("too many sign-ins in progress; try again in a few minutes".into());
        }
        pending.insert(
            state.secret().clone(),
            Pending {
                verifier: verifier.secret().clone(),
                redirect_to: safe_redirect(redirect_to),
                created: Instant::now(),
            },
        );
        Ok(url.to_string())
    }

    /// The callback: the state taken (once), the code exchanged, the user asked. Blocking.
    /// Returns the cookie value and where to go.
    pub fn finish(
        &self,
        sign_in: &SignIn,
        oauth: &OAuth,
        viewers: &super::viewers::Viewers,
        state: &str,
        code: &str,
    ) -> Result<(String, String), Failed> {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(state);
        let Some(pending) = pending.filter(|p| p.created.elapsed() < PENDING_TTL) else { return Err(Failed::State) };
        let client = client(sign_in, oauth).map_err(Failed::Unavailable)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(sign_in.timeout))
            .build()
            .into();
        let http = |request: oauth2::HttpRequest| -> Result<oauth2::HttpResponse, ureq::Error> {
            let (parts, body) = request.into_parts();
            let response = agent.run(oauth2::http::Request::from_parts(parts, body))?;
            let (parts, mut body) = response.into_parts();
            let bytes = body.with_config().limit(64 * 1024).read_to_vec()?;
            Ok(oauth2::http::Response::from_parts(parts, bytes))
        };
        let token = client
            .exchange_code(oauth2::AuthorizationCode::new(code.to_string()))
            .set_pkce_verifier(oauth2::PkceCodeVerifier::new(pending.verifier))
            .request(&http)
            .map_err(|e| match e {
                oauth2::RequestTokenError::ServerResponse(r) => {
                    Failed::Refused(format!("GitLab refused the code: {}", r.error()))
                }
                oauth2::RequestTokenError::Request(e) => Failed::Unavailable(format!("GitLab's token endpoint: {e}")),
                other => Failed::Unavailable(format!("GitLab's token endpoint: {other}")),
            })?;
        use oauth2::TokenResponse;
        let access = token.access_token().secret().to_string();
        let user = viewers
            .user(sign_in, &access)
            .map_err(|e| Failed::Unavailable(e.0))?
            .ok_or_else(|| Failed::Refused("GitLab does not accept the token it issued".into()))?;
        let id = crate::store::chain::hex(&rand::random::<[u8; 32]>());
        let session = Session {
            id: user.id,
            username: user.username.clone(),
            admin: user.admin,
            token: Secret::new(access),
            expires: Instant::now() + oauth.session_ttl,
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, s| s.expires > Instant::now());
        sessions.insert(id.clone(), session);
        tracing::info!(viewer = %user.username, "signed in with GitLab");
        Ok((format!("{id}.{}", self.mac(&id)), pending.redirect_to))
    }

    fn mac(&self, id: &str) -> String {
        let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"policy-audit user session v1\0");
        mac.update(id.as_bytes());
        crate::store::chain::hex(&mac.finalize().into_bytes())
    }

    /// The session a cookie value names, when its signature is ours and it has not expired.
    pub fn session(&self, cookie: &str) -> Option<Session> {
        let (id, mac) = cookie.split_once('.')?;
        let ours = self.mac(id);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(ours.as_bytes(), mac.as_bytes())) {
            return None;
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn end(&self, cookie: &str) {
        if let Some((id, _)) = cookie.split_once('.')
            && self.session(cookie).is_some()
        {
            self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        }
    }

    /// Seconds a new session lasts, for the cookie's `Max-Age`.
    pub fn max_age(oauth: &OAuth) -> u64 {
        oauth.session_ttl.as_secs()
    }
}

// The routes.

use super::Shared;
use super::viewers::Viewers;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use std::sync::Arc;

#[derive(Debug, Default, serde::Deserialize)]
pub struct Start {
    #[serde(default)]
    redirect_to: String,
}

/// `GET /sign-in`: to GitLab's authorize page.
pub async fn sign_in(
    State(s): State<Shared>,
    axum::Extension(viewers): axum::Extension<Arc<Viewers>>,
    Query(q): Query<Start>,
) -> Response {
    let config = s.config();
    let Some((sign_in, oauth)) = oauth_of(&config) else { return super::web::not_found() };
    match viewers.sessions.start(&sign_in, &oauth, &q.redirect_to) {
        Ok(url) => Redirect::to(&url).into_response(),
        Err(why) => failed_page(StatusCode::SERVICE_UNAVAILABLE, &why),
    }
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /oauth/callback`: GitLab sends the browser back here.
pub async fn callback(
    State(s): State<Shared>,
    axum::Extension(viewers): axum::Extension<Arc<Viewers>>,
    Query(q): Query<Callback>,
) -> Response {
    let config = s.config();
    let Some((sign_in, oauth)) = oauth_of(&config) else { return super::web::not_found() };
    let secure = config.server.as_ref().is_some_and(|s| s.https());
    if let Some(error) = q.error {
        // Still take the state, so it cannot be used afterwards.
        if let Some(state) = &q.state {
            viewers.sessions.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(state);
        }
        *viewers.sign_ins.lock().unwrap_or_else(|p| p.into_inner()).entry("refused").or_default() += 1;
        // Only an OAuth error code is echoed (RFC 6749 §4.1.2.1: `access_denied`, ...), never free text.
        const CODES: [&str; 7] = [
            "invalid_request",
            "unauthorized_client",
            "access_denied",
            "unsupported_response_type",
            "invalid_scope",
            "server_error",
            "temporarily_unavailable",
        ];
        let code = CODES.into_iter().find(|c| *c == error).unwrap_or("an error");
        tracing::info!(error = %code, "GitLab did not sign a person in");
        return failed_page(StatusCode::FORBIDDEN, &format!("GitLab did not sign you in ({code})."));
    }
    let (Some(code), Some(state)) = (q.code, q.state.clone()) else {
        if let Some(state) = &q.state {
            viewers.sessions.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(state);
        }
        *viewers.sign_ins.lock().unwrap_or_else(|p| p.into_inner()).entry("refused").or_default() += 1;
        return failed_page(StatusCode::BAD_REQUEST, "The sign-in link is incomplete. Sign in again.");
    };
    let v = viewers.clone();
    let done = tokio::task::spawn_blocking(move || v.sessions.finish(&sign_in, &oauth, &v, &state, &code)).await;
    let outcome = match &done {
        Ok(Ok(_)) => "signed_in",
        Ok(Err(Failed::Unavailable(_))) => "unavailable",
        _ => "refused",
    };
    *viewers.sign_ins.lock().unwrap_or_else(|p| p.into_inner()).entry(outcome).or_default() += 1;
    match done {
        Ok(Ok((cookie, to))) => {
            let max_age = config
                .server
                .as_ref()
                .and_then(|s| s.sign_in.as_ref())
                .and_then(|s| s.oauth.as_ref())
                .map_or(0, Sessions::max_age);
            let secure = if secure { "; Secure" } else { "" };
            let cookie = format!("{USER_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}");
            ([(header::SET_COOKIE, cookie)], Redirect::to(&to)).into_response()
        }
        Ok(Err(Failed::State)) => {
            tracing::warn!("a sign-in callback with an unknown, used or expired state was refused");
            failed_page(
                StatusCode::BAD_REQUEST,
                "This sign-in is not one this server started, or it was used already or took too long. Sign in again.",
            )
        }
        Ok(Err(Failed::Refused(why))) => {
            tracing::info!(reason = %why, "a sign-in was refused");
            failed_page(StatusCode::FORBIDDEN, &why)
        }
        Ok(Err(Failed::Unavailable(why))) => {
            tracing::warn!(error = %why, "sign-in failed: GitLab does not answer");
            failed_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "GitLab does not answer, so you cannot be signed in now. Try again in a moment.",
            )
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}\n")).into_response(),
    }
}

/// The session cookie's value, if the request has one.
pub fn cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (name, value) = c.trim().split_once('=')?;
        (name == USER_COOKIE).then(|| value.to_string())
    })
}

/// Signs a person out (`/logout`): the session ends on the server, the cookie is cleared.
pub fn sign_out(viewers: &Viewers, headers: &HeaderMap) -> String {
    if let Some(c) = cookie(headers) {
        viewers.sessions.end(&c);
    }
    format!("{USER_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0")
}

fn oauth_of(config: &crate::config::Config) -> Option<(SignIn, OAuth)> {
    let sign_in = config.server.as_ref()?.sign_in.clone()?;
    let oauth = sign_in.oauth.clone()?;
    Some((sign_in, oauth))
}

fn failed_page(status: StatusCode, why: &str) -> Response {
    super::web::sign_in_failed(status, why)
}
