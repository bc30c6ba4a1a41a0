//! The login form and its cookie: the token is checked in constant time, the cookie holds a
//! value derived from it (never the token), `HttpOnly; SameSite=Strict` (`Secure` behind https).

use super::*;

/// The login form (also the answer to an unauthenticated page request); with `gitlab`, the
/// link to sign in with GitLab first.
pub fn login_page(status: StatusCode, error: Option<&str>, next: String, gitlab: bool) -> Response {
    let sign_in =
        format!("/sign-in?redirect_to={}", url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>());
    let body = html! {
        div.login {
            h1 { "Sign in" }
            @if gitlab { p { a.button href=(sign_in) { "Sign in with GitLab" } } p.muted { "Or, for the service account:" } }
            p.muted { "Audit events of GitLab security policy projects. Sign in with the read token ([server] token_env or token_file)." }
            @if let Some(e) = error { p.error { (e) } }
            form method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label { "Token" input type="password" name="token" autocomplete="current-password" autofocus; }
                button type="submit" { "Sign in" }
            }
        }
    };
    html_response(status, layout("Sign in", body))
}

/// Whether signing in with GitLab is set up.
pub fn gitlab(s: &Shared) -> bool {
    s.config().server.as_ref().and_then(|c| c.sign_in.as_ref()).is_some_and(|s| s.oauth.is_some())
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

use crate::server::signin::safe_redirect as safe_next;

fn signed_in(s: &Shared, next: &str) -> Response {
    let config = s.config();
    let Some(server) = config.server.as_ref() else { return not_found() };
    let Some(token) = server.token.as_ref() else { return not_found() };
    let secure = if server.https() { "; Secure" } else { "" };
    let cookie =
        format!("{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200{secure}", session_value(token));
    ([(header::SET_COOKIE, cookie)], Redirect::to(&safe_next(next))).into_response()
}

#[derive(Debug, Default, Deserialize)]
pub struct LoginLink {
    token: Option<String>,
    #[serde(default)]
    next: String,
}

/// The form; with `?token=` (the link `demo --serve` prints) it signs in directly.
pub async fn login_form(State(s): State<Shared>, Query(link): Query<LoginLink>) -> Response {
    let token = s.config().server.as_ref().and_then(|c| c.token.clone());
    match (link.token, token) {
        (Some(given), Some(token)) if secret_matches(given.as_bytes(), &token) => signed_in(&s, &link.next),
        (Some(_), _) => {
            login_page(StatusCode::UNAUTHORIZED, Some("That token is not valid."), safe_next(&link.next), gitlab(&s))
        }
        (None, _) => login_page(StatusCode::OK, None, safe_next(&link.next), gitlab(&s)),
    }
}

pub async fn login(State(s): State<Shared>, Form(form): Form<LoginForm>) -> Response {
    let token = s.config().server.as_ref().and_then(|c| c.token.clone());
    match token {
        Some(token) if secret_matches(form.token.trim().as_bytes(), &token) => signed_in(&s, &form.next),
        _ => login_page(StatusCode::UNAUTHORIZED, Some("That token is not valid."), safe_next(&form.next), gitlab(&s)),
    }
}

pub async fn logout(
    Extension(viewers): Extension<Arc<crate::server::viewers::Viewers>>,
    headers: HeaderMap,
) -> Response {
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    let user = crate::server::signin::sign_out(&viewers, &headers);
    let mut response = Redirect::to("/login").into_response();
    for c in [cookie, user] {
        if let Ok(v) = axum::http::HeaderValue::from_str(&c) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

/// A sign-in through GitLab that did not work, and what to do.
pub fn sign_in_failed(status: StatusCode, why: &str) -> Response {
    let body = html! {
        div.login {
            h1 { "Sign-in failed" }
            p.error { (why) }
            p { a href="/login" { "Back to sign in" } }
        }
    };
    html_response(status, layout("Sign-in failed", body))
}
