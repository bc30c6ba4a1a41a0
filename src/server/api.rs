//! GitLab's audit events API, REST v4 (`doc/api/audit_events.md`), so that clients written for
//! GitLab (python-gitlab, SIEM collectors) work unchanged:
//! `/api/v4/audit_events`, `/api/v4/projects/:id/audit_events`, `/api/v4/groups/:id/audit_events`,
//! each with `/:event_id`; `created_after` / `created_before`; `entity_type` / `entity_id`;
//! offset pagination (`page`, `per_page` ≤ 100, `X-Page`, `X-Per-Page`, `X-Next-Page`,
//! `X-Prev-Page`, `X-Total`, `X-Total-Pages`, `Link`) and keyset pagination
//! (`pagination=keyset`, `Link: <…cursor=…>; rel="next"`, absent on the last page).
//!
//! Newest first, as GitLab lists them. Like GitLab, totals are left out when more than
//! [`MAX_COUNTED`] events match (counting a million events per request is not worth it).
//! Error bodies are GitLab's: `{"message":"404 Not found"}`, `{"message":"401 Unauthorized"}`,
//! `{"message":"404 Project Not Found"}`, `{"error":"… is invalid"}`.

use super::viewers::Reader;
use super::{Shared, blocking};
use crate::app::events::time_bound;
use crate::config::{Config, path_has_prefix};
use crate::event::EventType;
use crate::store::{EventQuery, Position, Store, StoredEvent};
use anyhow::Context;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// GitLab stops counting here (and so leaves out `X-Total`, `X-Total-Pages`, `rel="last"`).
pub const MAX_COUNTED: usize = 10_000;
const DEFAULT_PER_PAGE: usize = 20;
const MAX_PER_PAGE: usize = 100;

/// A JSON answer `{"message": …}` with `status`.
pub fn message(status: StatusCode, text: &str) -> Response {
    json_response(status, &json!({ "message": text }))
}

fn invalid(param: &str) -> Response {
    json_response(StatusCode::BAD_REQUEST, &json!({ "error": format!("{param} is invalid") }))
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub async fn no_route() -> Response {
    json_response(StatusCode::NOT_FOUND, &json!({ "error": "404 Not Found" }))
}

/// What the API needs of a stored event besides its JSON.
#[derive(serde::Deserialize)]
struct Head<'a> {
    event_type: EventType,
    #[serde(borrow)]
    entity_path: std::borrow::Cow<'a, str>,
    #[serde(default)]
    author_id: i64,
}

/// Appends an audit event as the API shows it: the stored JSON as it is (GitLab's streamed
/// schema, SPEC §3), with GitLab's `event_name` added as its first member.
fn push_entity(out: &mut Vec<u8>, event_type: EventType, e: &StoredEvent) -> anyhow::Result<()> {
    let members = e.json.trim_ascii_start().strip_prefix(b"{").context("a stored event is not a JSON object")?;
    out.extend_from_slice(b"{\"event_name\":\"");
    out.extend_from_slice(event_type.name().as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(members);
    Ok(())
}

/// A JSON array of the page's events, written once into one buffer.
fn entities(store: &Store, events: &[(u64, StoredEvent)]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(2 + events.iter().map(|(_, e)| e.json.len() + 48).sum::<usize>());
    body.push(b'[');
    for (i, (seq, e)) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        let head: Head = store.read_stored(*seq, e)?;
        push_entity(&mut body, head.event_type, e)?;
    }
    body.push(b']');
    Ok(body)
}

/// Which events a route covers.
enum Scope {
    /// `/audit_events`, optionally narrowed by `entity_type` / `entity_id`.
    All,
    Projects(Vec<String>),
}

/// The SPP path for `:id` (numeric id or URL-decoded full path).
fn project_path(config: &Config, store: &Store, id: &str) -> anyhow::Result<Option<String>> {
    if let Ok(n) = id.parse::<i64>() {
        return Ok(config.projects.iter().find(|p| p.id == Some(n)).map(|p| p.path.clone()));
    }
    if config.projects.iter().any(|p| p.path == id) || store.synced_projects()?.iter().any(|p| p == id) {
        return Ok(Some(id.to_string()));
    }
    Ok(None)
}

/// The SPPs whose policies apply in group `path`: linked to it, to a group or project under
/// it, or to a group above it (a group's link applies to its subgroups and projects, as in
/// GitLab).
fn group_projects(config: &Config, path: &str) -> Vec<String> {
    config
        .projects
        .iter()
        .filter(|p| p.linked.iter().any(|ns| path_has_prefix(ns, path) || path_has_prefix(path, ns)))
        .map(|p| p.path.clone())
        .collect()
}

pub async fn all(State(s): State<Shared>, r: Reader, RawQuery(q): RawQuery, uri: Uri, headers: HeaderMap) -> Response {
    list(s, r, Scope::All, q, uri, headers).await
}

pub async fn project(
    State(s): State<Shared>,
    r: Reader,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let found = blocking(&s, move |src| project_path(&src.config(), src.store(), &id)).await;
    match found {
        Ok(Some(path)) => list(s, r, Scope::Projects(vec![path]), q, uri, headers).await,
        Ok(None) => message(StatusCode::NOT_FOUND, "404 Project Not Found"),
        Err(r) => r,
    }
}

pub async fn group(
    State(s): State<Shared>,
    r: Reader,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let projects = group_projects(&s.config(), &id);
    if projects.is_empty() {
        return message(StatusCode::NOT_FOUND, "404 Group Not Found");
    }
    list(s, r, Scope::Projects(projects), q, uri, headers).await
}

pub async fn one(State(s): State<Shared>, r: Reader, Path(event_id): Path<String>) -> Response {
    single(s, r, None, event_id).await
}

pub async fn project_one(State(s): State<Shared>, r: Reader, Path((id, event_id)): Path<(String, String)>) -> Response {
    let found = blocking(&s, move |src| project_path(&src.config(), src.store(), &id)).await;
    match found {
        Ok(Some(path)) => single(s, r, Some(vec![path]), event_id).await,
        Ok(None) => message(StatusCode::NOT_FOUND, "404 Project Not Found"),
        Err(r) => r,
    }
}

pub async fn group_one(State(s): State<Shared>, r: Reader, Path((id, event_id)): Path<(String, String)>) -> Response {
    let projects = group_projects(&s.config(), &id);
    if projects.is_empty() {
        return message(StatusCode::NOT_FOUND, "404 Group Not Found");
    }
    single(s, r, Some(projects), event_id).await
}

async fn single(s: Shared, r: Reader, within: Option<Vec<String>>, event_id: String) -> Response {
    let visible = match r.visible(&s).await {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let found = blocking(&s, move |src| {
        let Some((seq, e)) = src.store().stored_event_by_id(&event_id)? else { return Ok(None) };
        let head: Head = src.store().read_stored(seq, &e)?;
        if within.as_ref().is_some_and(|ps| !ps.iter().any(|p| *p == head.entity_path)) {
            return Ok(None);
        }
        // An event this reader may not see is a missing one: ids cannot be probed.
        if !visible.shows(&head.entity_path, head.author_id) {
            return Ok(None);
        }
        let mut body = Vec::with_capacity(e.json.len() + 64);
        push_entity(&mut body, head.event_type, &e)?;
        Ok(Some(body))
    })
    .await;
    match found {
        Ok(Some(body)) => json_bytes(body),
        Ok(_) => message(StatusCode::NOT_FOUND, "404 Not found"),
        Err(r) => r,
    }
}

/// The request's parameters, in order, for the filters and to rebuild `Link` URLs.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A numeric parameter; the error is its name (GitLab answers `<name> is invalid`).
    fn number<'a>(&self, name: &'a str) -> Result<Option<usize>, &'a str> {
        self.get(name).map(|v| v.trim().parse::<usize>().map_err(|_| name)).transpose()
    }

    /// This request's URL with `changes` set (and the other parameters kept).
    fn url(&self, base: &str, path: &str, changes: &[(&str, String)]) -> String {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.0 {
            if !changes.iter().any(|(name, _)| name == k) {
                ser.append_pair(k, v);
            }
        }
        for (k, v) in changes {
            ser.append_pair(k, v);
        }
        format!("{base}{path}?{}", ser.finish())
    }
}

/// Where links point: `public_url`, else the host the client asked for.
fn base_url(config: &Config, headers: &HeaderMap) -> String {
    if let Some(url) = config.server.as_ref().and_then(|s| s.public_url.clone()) {
        return url;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)));
    format!("http://{}", host.unwrap_or("localhost"))
}

async fn list(s: Shared, r: Reader, scope: Scope, raw: Option<String>, uri: Uri, headers: HeaderMap) -> Response {
    let params = Params(form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).into_owned().collect());
    let mut query = EventQuery::default();
    for (name, bound) in [("created_after", &mut query.since), ("created_before", &mut query.until)] {
        if let Some(v) = params.get(name) {
            match time_bound(v, name == "created_before") {
                Ok(t) => *bound = Some(t),
                Err(_) => return invalid(name),
            }
        }
    }
    let config = s.config();
    let empty = match scope {
        Scope::Projects(projects) => {
            query.projects = projects;
            false
        }
        Scope::All => match (params.get("entity_type"), params.get("entity_id")) {
            (Some("Project"), Some(id)) => {
                match config.projects.iter().find(|p| p.id.map(|n| n.to_string()).as_deref() == Some(id)) {
                    Some(p) => {
                        query.projects = vec![p.path.clone()];
                        false
                    }
                    None => true,
                }
            }
            (Some("Project") | None, _) => false,
            // Only projects (the SPPs) have events here.
            (Some(_), _) => true,
        },
    };
    // Only what this reader may see is listed, and counted.
    let empty = match r.visible(&s).await {
        Ok(visible) => empty || !visible.restrict(&mut query),
        Err(refused) => return refused,
    };
    let per_page = match params.number("per_page") {
        Ok(n) => n.unwrap_or(DEFAULT_PER_PAGE).clamp(1, MAX_PER_PAGE),
        Err(name) => return invalid(name),
    };
    let base = base_url(&config, &headers);
    let path = uri.path().to_string();
    if params.get("pagination") == Some("keyset") {
        let cursor = match params.get("cursor").map(Position::decode) {
            Some(None) => return invalid("cursor"),
            Some(Some(p)) => Some(p),
            None => None,
        };
        let read = blocking(&s, move |src| {
            if empty {
                return Ok((b"[]".to_vec(), None));
            }
            let page = src.store().page_stored(&query, cursor.as_ref(), 0, per_page)?;
            Ok((entities(src.store(), &page.events)?, page.next))
        })
        .await;
        let (body, next) = match read {
            Ok(r) => r,
            Err(r) => return r,
        };
        let mut response = json_bytes(body);
        if let Some(next) = next {
            let link = format!("<{}>; rel=\"next\"", params.url(&base, &path, &[("cursor", next.encode())]));
            set(&mut response, "link", link);
        }
        return response;
    }
    let page_no = match params.number("page") {
        Ok(n) => n.unwrap_or(1).max(1),
        Err(name) => return invalid(name),
    };
    let skip = (page_no - 1).saturating_mul(per_page);
    let read = blocking(&s, move |src| {
        if empty {
            return Ok((b"[]".to_vec(), false, Some(0)));
        }
        let total = src.store().count(&query, MAX_COUNTED)?;
        let page = src.store().page_stored(&query, None, skip, per_page)?;
        Ok((entities(src.store(), &page.events)?, page.next.is_some(), total))
    })
    .await;
    let (body, has_next, total) = match read {
        Ok(r) => r,
        Err(r) => return r,
    };
    let mut response = json_bytes(body);
    let link_to = |n: usize, rel: &str| {
        format!(
            "<{}>; rel=\"{rel}\"",
            params.url(&base, &path, &[("page", n.to_string()), ("per_page", per_page.to_string())])
        )
    };
    let mut links = Vec::new();
    if page_no > 1 {
        links.push(link_to(page_no - 1, "prev"));
    }
    if has_next {
        links.push(link_to(page_no + 1, "next"));
    }
    links.push(link_to(1, "first"));
    set(&mut response, "x-page", page_no.to_string());
    set(&mut response, "x-per-page", per_page.to_string());
    set(&mut response, "x-next-page", if has_next { (page_no + 1).to_string() } else { String::new() });
    set(&mut response, "x-prev-page", if page_no > 1 { (page_no - 1).to_string() } else { String::new() });
    if let Some(total) = total {
        let pages = total.div_ceil(per_page).max(1);
        set(&mut response, "x-total", total.to_string());
        set(&mut response, "x-total-pages", pages.to_string());
        links.push(link_to(pages, "last"));
    }
    set(&mut response, "link", links.join(", "));
    response
}

fn json_bytes(body: Vec<u8>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn set(response: &mut Response, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(name, v);
    }
}
