//! The Audit events page (SPEC §8): server-rendered HTML (maud escapes every value it prints,
//! so names, messages and YAML values from repositories are text, never markup), no script at
//! all, one stylesheet of our own. Every filter is in the URL, so a view can be shared.
//!
//! Pages: `/` (events, newest first, GitLab's columns, filters, keyset pagination),
//! `/events/:id` (one event: before/after of its changes, commit and merge request, linked
//! namespaces, chain link), `/policy` (one policy's whole history), `/status`, `/export.csv`
//! (GitLab's export columns) and the login form.

mod export;
mod login;
mod rows;

pub use export::export_csv;
pub use login::{gitlab, login, login_form, login_page, logout, sign_in_failed};
pub use rows::Rows;

use super::viewers::{Reader, Viewer};
use super::{SESSION_COOKIE, Shared, blocking, secret_matches, session_value};
use crate::app::events::time_bound;
use crate::event::{AuditEvent, EventType};
use crate::store::{EventQuery, Position, StoreError};
use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use std::sync::Arc;

const PAGE_SIZE: usize = 50;
/// A policy's history is shown whole up to this many events.
const POLICY_HISTORY_MAX: usize = 2000;
const STYLESHEET: &str = include_str!("static/style.css");

/// The filters of the events page, as they are in its URL.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Filters {
    #[serde(default)]
    pub project: String,
    #[serde(default, rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub policy: String,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub before: String,
}

impl Filters {
    fn query(&self) -> Result<EventQuery, String> {
        let some = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        let mut q = EventQuery { policy: some(&self.policy), author_exact: some(&self.author), ..Default::default() };
        if let Some(p) = some(&self.project) {
            q.projects = vec![p];
        }
        if let Some(t) = some(&self.event_type) {
            q.event_types = vec![EventType::from_name(&t).ok_or_else(|| format!("{t:?} is not an event type"))?];
        }
        q.since = some(&self.from).map(|t| time_bound(&t, false)).transpose()?;
        q.until = some(&self.to).map(|t| time_bound(&t, true)).transpose()?;
        Ok(q)
    }

    /// The query string of these filters, with `before` replaced.
    fn url(&self, path: &str, before: Option<&str>) -> String {
        self.url_of(path, &self.author, before)
    }

    /// The first page of these filters with the author filter set to `author`.
    fn url_with_author(&self, path: &str, author: &str) -> String {
        self.url_of(path, author, None)
    }

    fn url_of(&self, path: &str, author: &str, before: Option<&str>) -> String {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("project", self.project.as_str()),
            ("type", &self.event_type),
            ("policy", &self.policy),
            ("author", author),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if !v.trim().is_empty() {
                ser.append_pair(k, v.trim());
            }
        }
        if let Some(b) = before {
            ser.append_pair("before", b);
        }
        let qs = ser.finish();
        if qs.is_empty() { path.to_string() } else { format!("{path}?{qs}") }
    }

    fn is_filtered(&self) -> bool {
        [&self.project, &self.event_type, &self.policy, &self.author, &self.from, &self.to]
            .iter()
            .any(|v| !v.trim().is_empty())
    }
}

fn html_response(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        markup.into_string(),
    )
        .into_response()
}

/// The class of a unified diff line.
fn diff_class(line: &str) -> &'static str {
    if line.starts_with("+++") || line.starts_with("---") {
        "file"
    } else if line.starts_with('+') {
        "add"
    } else if line.starts_with('-') {
        "del"
    } else if line.starts_with("@@") {
        "hunk"
    } else {
        "ctx"
    }
}

fn layout(title: &str, body: Markup) -> Markup {
    layout_for(title, None, body)
}

/// The page with who is reading it in the header (a signed-in person by their GitLab username).
fn layout_for(title: &str, viewer: Option<&Viewer>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · policy-audit" }
                link rel="stylesheet" href="/static/style.css";
            }
            body {
                header.top {
                    a.brand href="/" { "policy-audit" }
                    nav {
                        a href="/" { "Audit events" }
                        a href="/status" { "Status" }
                        @match viewer {
                            Some(Viewer::User(u)) => span.who { "Signed in as " strong { (u.username) } },
                            Some(Viewer::Service) => span.who { "Signed in with the service token" },
                            None => {},
                        }
                        form.inline method="post" action="/logout" { button.link type="submit" { "Sign out" } }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")], STYLESHEET)
        .into_response()
}

pub fn not_found() -> Response {
    html_response(
        StatusCode::NOT_FOUND,
        layout(
            "Not found",
            html! { h1 { "Not found" } p { "There is nothing here. " a href="/" { "Back to the audit events" } } },
        ),
    )
}

fn bad_request(why: &str) -> Response {
    html_response(StatusCode::BAD_REQUEST, layout("Bad request", html! { h1 { "Bad request" } p.error { (why) } }))
}

/// GitLab-like date: `2024-03-01 10:00:00 UTC`.
fn date(created_at: &str) -> String {
    let t = created_at.get(..19).unwrap_or(created_at).replace('T', " ");
    format!("{t} UTC")
}

fn short(sha: &str) -> &str {
    sha.get(..8).unwrap_or(sha)
}

fn kind_label(t: EventType) -> &'static str {
    match t {
        EventType::Create => "created",
        EventType::Update => "updated",
        EventType::Delete => "deleted",
        EventType::YamlInvalidated => "invalid YAML",
        EventType::LimitExceeded => "limit exceeded",
        EventType::PolicyProjectUpdated => "link changed",
    }
}

fn kind_class(t: EventType) -> &'static str {
    match t {
        EventType::Create => "badge create",
        EventType::Update => "badge update",
        EventType::Delete => "badge delete",
        EventType::YamlInvalidated | EventType::LimitExceeded => "badge warn",
        EventType::PolicyProjectUpdated => "badge link",
    }
}

fn event_href(id: &str) -> String {
    format!("/events/{}", form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>())
}

fn policy_href(project: &str, name: &str) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    ser.append_pair("project", project).append_pair("name", name);
    format!("/policy?{}", ser.finish())
}

fn filter_form(f: &Filters, projects: &[String]) -> Markup {
    html! {
        form.filters method="get" action="/" {
            label { "Project"
                select name="project" {
                    option value="" { "All projects" }
                    @for p in projects { option value=(p) selected[f.project == *p] { (p) } }
                }
            }
            label { "Event type"
                select name="type" {
                    option value="" { "All types" }
                    @for t in EventType::ALL { option value=(t.name()) selected[f.event_type == t.name()] { (t.name()) } }
                }
            }
            label { "Policy" input type="text" name="policy" value=(f.policy) placeholder="exact name"; }
            label { "Author" input type="text" name="author" value=(f.author) placeholder="name or email"; }
            label { "From" input type="date" name="from" value=(f.from); }
            label { "To" input type="date" name="to" value=(f.to); }
            div.buttons {
                button type="submit" { "Filter" }
                @if f.is_filtered() { a.button.secondary href="/" { "Clear" } }
            }
        }
    }
}

pub async fn index(
    State(s): State<Shared>,
    r: Reader,
    Extension(kept): Extension<Arc<Rows>>,
    Query(f): Query<Filters>,
) -> Response {
    let mut query = match f.query() {
        Ok(q) => q,
        Err(why) => return bad_request(&why),
    };
    let visible = match r.visible(&s).await {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    visible.narrow(&mut query);
    let before = match f.before.trim() {
        "" => None,
        b => match Position::decode(b) {
            Some(p) => Some(p),
            None => return bad_request("the page position (before) is not valid; start again from the first page"),
        },
    };
    let filters = f.clone();
    let read = blocking(&s, move |src| {
        let mut projects: Vec<String> = src.config().projects.iter().map(|p| p.path.clone()).collect();
        for p in src.store().synced_projects()? {
            if !projects.contains(&p) {
                projects.push(p);
            }
        }
        projects.retain(|p| visible.lists(p));
        let page = src.store().page_stored(&query, before.as_ref(), 0, PAGE_SIZE)?;
        let rows = page
            .events
            .iter()
            .map(|(seq, e)| match kept.get(*seq) {
                Some(row) => Ok(row),
                None => {
                    let row = Arc::new(rows::Rendered::of(&src.store().read_stored(*seq, e)?));
                    kept.put(*seq, &row);
                    Ok(row)
                }
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let table = (!rows.is_empty()).then(|| rows::table(&rows, &filters));
        Ok((table, page.next, projects))
    })
    .await;
    let (table, next, projects) = match read {
        Ok(r) => r,
        Err(r) => return r,
    };
    let body = html! {
        div.heading {
            h1 { "Audit events" }
            a.button.secondary href=(f.url("/export.csv", None)) { "Export as CSV" }
        }
        (filter_form(&f, &projects))
        @if let Some(table) = table {
            (table)
        } @else {
            p.empty { "No events match these filters." }
        }
        nav.pager {
            @if !f.before.is_empty() { a.button.secondary href=(f.url("/", None)) { "« Newest" } }
            @if let Some(next) = &next { a.button.secondary rel="next" href=(f.url("/", Some(&next.encode()))) { "Older »" } }
        }
    };
    html_response(StatusCode::OK, layout_for("Audit events", Some(&r.viewer), body))
}

fn json_cell(v: &Option<serde_json::Value>) -> Markup {
    match v {
        None => html! { span.muted { "(absent)" } },
        Some(v) => html! { pre { (serde_json::to_string_pretty(v).unwrap_or_default()) } },
    }
}

fn link_or_text(gitlab: Option<&str>, path: &str, text: &str) -> Markup {
    match gitlab {
        Some(base) => html! { a href=(format!("{base}/{path}")) { (text) } },
        None => html! { (text) },
    }
}

pub async fn event(State(s): State<Shared>, r: Reader, Path(id): Path<String>) -> Response {
    let visible = match r.visible(&s).await {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let read = blocking(&s, move |src| {
        let Some((seq, e)) = src.store().event_by_id(&id)? else { return Ok(None) };
        // One this reader may not see is a missing one.
        if !visible.shows(&e.entity_path, e.author_id) {
            return Ok(None);
        }
        let links = src.store().chain_links(seq)?;
        Ok(Some((seq, e, links)))
    })
    .await;
    let (seq, e, (link, previous)) = match read {
        Ok(Some(found)) => found,
        Ok(None) => return not_found(),
        Err(r) => return r,
    };
    let config = s.config();
    let gitlab = config.server.as_ref().and_then(|c| c.gitlab_url.as_deref());
    let d = &e.details;
    let sha = &d.security_policy_project_commit_sha;
    let body = html! {
        p.crumbs { a href="/" { "Audit events" } " › " (short(&e.id)) }
        h1 { span class=(kind_class(e.event_type)) { (kind_label(e.event_type)) } " " (d.custom_message) }
        dl.fields {
            dt { "Event type" } dd { code { (e.event_type.name()) } }
            dt { "Date" } dd { time datetime=(e.created_at) { (date(&e.created_at)) } " · detected " (date(&d.detected_at)) }
            dt { "Author" } dd { (e.author_name) " " span.muted { "<" (d.author_email) ">" } " · author id " (e.author_id) }
            dt { "Project" } dd { (link_or_text(gitlab, &e.entity_path, &e.entity_path)) @if let Some(id) = e.entity_id { span.muted { " (id " (id) ")" } } }
            dt { "Target" } dd { (e.target_type) ": " (e.target_details) }
            @if let Some(name) = &d.policy_name {
                dt { "Policy" } dd { a href=(policy_href(&e.entity_path, name)) { (name) } " · history" @if let Some(t) = &d.policy_type { span.muted { " (" (t) ")" } } }
            }
            @if let Some(enabled) = d.enabled { dt { "Enabled" } dd { (if enabled { "yes" } else { "no" }) } }
            @if !sha.is_empty() { dt { "Commit" } dd { code { (link_or_text(gitlab, &format!("{}/-/commit/{sha}", e.entity_path), sha)) } } }
            @if let Some(link) = &d.security_policy_project_link {
                dt { "Link" } dd { (link.action) " · " (link.namespace_type) " " (link_or_text(gitlab, &link.namespace_path, &link.namespace_path)) span.muted { " (id " (link.namespace_id) ")" } }
                @if let Some(before) = &link.previous_security_policy_project { dt { "Linked before to" } dd { (link_or_text(gitlab, before, before)) } }
                dt { "Seen by" } dd.muted { "discovery from GitLab: the time is when policy-audit saw the change, GitLab's own audit event names who made it" }
            }
            @if let Some(prev) = &d.previous_commit_sha { dt { "Previous commit" } dd { code { (link_or_text(gitlab, &format!("{}/-/commit/{prev}", e.entity_path), prev)) } } }
            @if let Some(mr) = &d.merge_request {
                dt { "Merge request" } dd { (link_or_text(gitlab, &format!("{}/-/merge_requests/{}", mr.project, mr.iid), &format!("{}!{}", mr.project, mr.iid))) }
            }
            dt { "Branch and file" } dd { code { (d.branch) } " · " code { (d.policy_file) } }
            dt { "Linked namespaces" } dd {
                @if d.linked_namespaces.is_empty() { span.muted { "none" } }
                ul.plain { @for ns in &d.linked_namespaces { li { (link_or_text(gitlab, ns, ns)) } } }
            }
            @if let Some(scope) = &d.policy_scope { dt { "Policy scope" } dd { pre { (serde_json::to_string_pretty(scope).unwrap_or_default()) } } }
            @if let Some(why) = &d.invalid_reason { dt { "Why it is invalid" } dd { pre { (why) } } }
            @if let Some(n) = d.policy_type_limit { dt { "Limit" } dd { (n) " enabled policies of this type; " (d.policies_count.unwrap_or(0)) " present" } }
            @if let Some(skipped) = &d.active_skipped_policies_names { dt { "Skipped policies" } dd { (skipped.join(", ")) } }
            @if d.history_rewritten { dt { "History" } dd.error { "the branch history was rewritten before this change" } }
        }
        @if let Some(changes) = &d.changes {
            h2 { "Changes" }
            table.changes {
                thead { tr { th { "Field" } th { "Before" } th { "After" } } }
                tbody { @for c in changes { tr { td data-label="Field" { code { (c.path) } } td.before data-label="Before" { (json_cell(&c.before)) } td.after data-label="After" { (json_cell(&c.after)) } } } }
            }
            @if d.changes_truncated { p.muted { "More fields changed than are listed here." } }
        }
        @if let Some(inc) = &d.included_content {
            h2 { "Included file" }
            dl.fields {
                dt { "Project and file" } dd { (link_or_text(gitlab, &inc.project, &inc.project)) " · " code { (inc.file) } }
                dt { "Ref" } dd {
                    @match &inc.reference { Some(r) => code { (r) }, None => span.muted { "none: the project's default branch" } }
                    @if !inc.followed.is_empty() { span.muted { " · followed " (inc.followed) } }
                }
                @if !inc.commit_sha.is_empty() {
                    dt { "Commit there" } dd { code { (link_or_text(gitlab, &format!("{}/-/commit/{}", inc.project, inc.commit_sha), &inc.commit_sha)) } }
                }
                dt { "What changed" } dd { (inc.summary) }
                dt { "Blob" } dd { code { (inc.before_sha.as_deref().unwrap_or("none")) } " → " code { (inc.after_sha.as_deref().unwrap_or("none")) } }
                dt { "Recorded by GitLab" } dd.muted { "no: GitLab records no audit event when a file a policy includes changes" }
            }
            @if !inc.diff.is_empty() {
                pre.diff { @for line in inc.diff.lines() { span class=(diff_class(line)) { (line) } "\n" } }
            }
            @if inc.diff_truncated { p.muted { "The diff is longer than an event keeps; the commit above has all of it." } }
        }
        h2 { "Chain" }
        dl.fields {
            dt { "Event id" } dd { code { (e.id) } }
            dt { "Position" } dd { "event #" (seq) }
            dt { "Chain link" } dd { code.hash { (link.unwrap_or_else(|| "missing".into())) } }
            dt { "Previous link" } dd { code.hash { (previous) } }
        }
        details { summary { "The event as stored and streamed (JSON)" } pre { (serde_json::to_string_pretty(&e).unwrap_or_default()) } }
    };
    html_response(StatusCode::OK, layout_for(&d.custom_message, Some(&r.viewer), body))
}

#[derive(Debug, Deserialize)]
pub struct PolicyRef {
    #[serde(default)]
    project: String,
    #[serde(default)]
    name: String,
}

pub async fn policy(State(s): State<Shared>, r: Reader, Query(p): Query<PolicyRef>) -> Response {
    if p.name.is_empty() {
        return bad_request("which policy? (name is missing)");
    }
    let mut query = EventQuery {
        policy: Some(p.name.clone()),
        projects: if p.project.is_empty() { vec![] } else { vec![p.project.clone()] },
        ..Default::default()
    };
    match r.visible(&s).await {
        Ok(visible) => visible.narrow(&mut query),
        Err(refused) => return refused,
    }
    let page = match blocking(&s, move |src| src.store().page(&query, None, 0, POLICY_HISTORY_MAX)).await {
        Ok(page) => page,
        Err(r) => return r,
    };
    let body = html! {
        p.crumbs { a href="/" { "Audit events" } " › policy" }
        h1 { "Policy " q { (p.name) } }
        p.muted { (p.project) " · " (page.events.len()) " events, newest first" }
        @if page.next.is_some() { p.error { "Only the newest " (POLICY_HISTORY_MAX) " events are shown." } }
        ol.history {
            @for (_, e) in &page.events {
                li {
                    span class=(kind_class(e.event_type)) { (kind_label(e.event_type)) } " "
                    a href=(event_href(&e.id)) { time datetime=(e.created_at) { (date(&e.created_at)) } }
                    " by " (e.author_name)
                    " · " code { (short(&e.details.security_policy_project_commit_sha)) }
                    @if let Some(inc) = &e.details.included_content {
                        br; span.muted { "included " code { (inc.project) ":" (inc.file) } " · " (inc.summary) }
                    }
                    @if let Some(changes) = &e.details.changes {
                        ul.plain { @for c in changes { li { code { (c.path) } } } }
                    }
                }
            }
        }
    };
    html_response(StatusCode::OK, layout_for(&format!("Policy {}", p.name), Some(&r.viewer), body))
}

pub async fn status(State(s): State<Shared>) -> Response {
    let read = blocking(&s, |src| {
        let config = src.config();
        let store = src.store();
        let mut projects = Vec::new();
        for p in &config.projects {
            projects.push((p.path.clone(), p.branch.clone(), store.project_status(&p.path)?));
        }
        let mut destinations = Vec::new();
        for d in &config.destinations {
            destinations.push((d.name.clone(), store.pending_count(&d.name), store.dead(Some(&d.name))?.len()));
        }
        Ok((projects, destinations, store.verify_chain()?))
    })
    .await;
    let (projects, destinations, chain) = match read {
        Ok(r) => r,
        Err(r) => return r,
    };
    let body = html! {
        h1 { "Status" }
        h2 { "Trail" }
        @match &chain.first_break {
            None => p.ok { "Chain verified: " (chain.events) " events, head " code.hash { (chain.head) } },
            Some(b) => p.error { "Chain broken: " (b.to_string()) },
        }
        h2 { "Projects" }
        table.events {
            thead { tr { th { "Project" } th { "Last sync" } th { "Last error" } } }
            tbody { @for (path, branch, st) in &projects { tr {
                td data-label="Project" { (path) br; span.muted { (branch) } }
                td data-label="Last sync" { @if let Some(t) = &st.last_success_at { (date(t)) } @else { span.muted { "never" } } }
                td data-label="Last error" { @if let Some(e) = &st.last_error { span.error { (e) } br; span.muted { (st.last_error_at.as_deref().map(date).unwrap_or_default()) } } @else { span.muted { "none" } } }
            } } }
        }
        h2 { "Destinations" }
        @if destinations.is_empty() { p.muted { "No destinations configured." } } @else {
            table.events {
                thead { tr { th { "Destination" } th { "Pending" } th { "Dead" } } }
                tbody { @for (name, pending, dead) in &destinations { tr {
                    td data-label="Destination" { (name) } td data-label="Pending" { (pending) }
                    td data-label="Dead" { @if *dead > 0 { span.error { (dead) } } @else { (dead) } }
                } } }
            }
        }
    };
    html_response(StatusCode::OK, layout("Status", body))
}
