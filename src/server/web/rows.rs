//! The rows of the events page, read from the stored events without decoding what a row does
//! not show (changes, scope, namespaces, attribution): a row borrows its text from the stored
//! JSON, so a page of 50 events costs one read and a scan of each, not a tree of allocations.
//!
//! A row is rendered once and kept ([`Rows`]): events never change, and the only part of a row
//! that depends on the page is its author link, which keeps the page's filters. A kept row is
//! its markup and where that link's URL goes in it.

use super::{Filters, date, event_href, kind_class, kind_label, policy_href};
use crate::event::EventType;
use crate::recent::Recent;
use maud::{Escaper, Markup, PreEscaped, html};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt::Write;
use std::sync::Arc;

/// The rows rendered for recently shown events, by sequence number; one per server.
pub type Rows = Recent<Arc<Rendered>>;

/// What a row of the events page shows of an event.
#[derive(Debug, Deserialize)]
pub struct Row<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    event_type: EventType,
    #[serde(borrow)]
    entity_path: Cow<'a, str>,
    #[serde(borrow)]
    target_details: Cow<'a, str>,
    #[serde(borrow)]
    author_name: Cow<'a, str>,
    #[serde(borrow)]
    created_at: Cow<'a, str>,
    #[serde(borrow)]
    details: RowDetails<'a>,
}

#[derive(Debug, Deserialize)]
struct RowDetails<'a> {
    #[serde(borrow)]
    author_email: Cow<'a, str>,
    #[serde(borrow)]
    custom_message: Cow<'a, str>,
    #[serde(borrow, default)]
    policy_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    included_content: Option<RowIncluded<'a>>,
}

/// An included file's change: which file and what changed, under the action.
#[derive(Debug, Deserialize)]
struct RowIncluded<'a> {
    #[serde(borrow)]
    project: Cow<'a, str>,
    #[serde(borrow)]
    file: Cow<'a, str>,
    #[serde(borrow)]
    summary: Cow<'a, str>,
}

/// A row as rendered once: its markup, where the author link's URL goes in it, and who that
/// link filters by.
#[derive(Debug)]
pub struct Rendered {
    markup: String,
    href_at: usize,
    author: String,
}

/// Stands for the author link's URL while a row is rendered: plain ASCII that escaping leaves as
/// it is, and the first thing in the row that comes from a variable, so that it is found before
/// any text of the event.
const AUTHOR_HREF: &str = "policy-audit-author-href";

impl Rendered {
    pub fn of(e: &Row<'_>) -> Rendered {
        let mut markup = row(e, AUTHOR_HREF).into_string();
        let href_at = markup.find(AUTHOR_HREF).unwrap_or(markup.len());
        markup.replace_range(href_at..(href_at + AUTHOR_HREF.len()).min(markup.len()), "");
        Rendered { markup, href_at, author: e.author_name.to_string() }
    }

    /// The markup before and after the author link's URL.
    fn parts(&self) -> (&str, &str) {
        self.markup.split_at(self.href_at)
    }
}

/// One row: author, action, target, date; GitLab's columns.
fn row(e: &Row<'_>, author_href: &str) -> Markup {
    html! {
        tr {
            td data-label="Author" {
                a href=(author_href) { (e.author_name) }
                br; span.muted { (e.details.author_email) }
            }
            td data-label="Action" {
                span class=(kind_class(e.event_type)) { (kind_label(e.event_type)) } " "
                a.action href=(event_href(&e.id)) { (e.details.custom_message) }
                @if let Some(inc) = &e.details.included_content {
                    br; span.muted { "included " code { (inc.project) ":" (inc.file) } " · " (inc.summary) }
                }
            }
            td data-label="Target" {
                @if let Some(name) = &e.details.policy_name {
                    a href=(policy_href(&e.entity_path, name)) { (name) }
                } @else { (e.target_details) }
                br; span.muted { (e.entity_path) }
            }
            td data-label="Date" { time datetime=(e.created_at) { (date(&e.created_at)) } }
        }
    }
}

/// The events table of the page with filters `f`.
pub fn table(rows: &[Arc<Rendered>], f: &Filters) -> Markup {
    let mut body = String::with_capacity(rows.iter().map(|r| r.markup.len() + 200).sum());
    for r in rows {
        let (head, tail) = r.parts();
        body.push_str(head);
        // Writing to a String cannot fail.
        let _ = Escaper::new(&mut body).write_str(&f.url_with_author("/", &r.author));
        body.push_str(tail);
    }
    html! {
        table.events {
            thead { tr { th { "Author" } th { "Action" } th { "Target" } th { "Date" } } }
            tbody { (PreEscaped(body)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_of(json: &str) -> Row<'_> {
        serde_json::from_str(json).unwrap()
    }

    /// A kept row, with the author link of the page's filters, is the row rendered at once.
    #[test]
    fn a_kept_row_is_the_row_rendered_for_the_page() {
        let events = [
            r#"{"id":"e1","event_type":"security_policy_create","entity_path":"acme/spp","target_details":"t",
                "author_name":"Ann & \"Bob\" <x>","created_at":"2026-11-30T10:00:00.000Z",
                "details":{"author_email":"a@b","custom_message":"Created <b>p</b>","policy_name":"p & q"}}"#,
            r#"{"id":"e2","event_type":"security_policy_delete","entity_path":"acme/spp","target_details":"policy.yml",
                "author_name":"  policy-audit-author-href ","created_at":"2026-11-30T10:00:00.000Z",
                "details":{"author_email":"","custom_message":"policy-audit-author-href"}}"#,
            r#"{"id":"e3","event_type":"security_policy_update","entity_path":"a/b","target_details":"t",
                "author_name":"","created_at":"2026-11-30T10:00:00.000Z",
                "details":{"author_email":"e","custom_message":"m"}}"#,
        ];
        let filters = [
            Filters::default(),
            Filters {
                project: "acme/spp".into(),
                event_type: "security_policy_update".into(),
                author: "someone else".into(),
                from: "2026-01-01".into(),
                before: "abc".into(),
                ..Default::default()
            },
        ];
        for (i, f) in filters.iter().enumerate() {
            let rows: Vec<Row> = events.iter().map(|j| row_of(j)).collect();
            let kept: Vec<Arc<Rendered>> = rows.iter().map(|r| Arc::new(Rendered::of(r))).collect();
            let rendered: String =
                rows.iter().map(|r| row(r, &f.url_with_author("/", &r.author_name)).into_string()).collect();
            let whole = table(&kept, f).into_string();
            assert!(whole.contains(&rendered), "{whole}\n---\n{rendered}");
            let first_href = if i == 0 {
                "/?author=Ann+%26+%22Bob%22+%3Cx%3E"
            } else {
                "/?project=acme%2Fspp&amp;type=security_policy_update&amp;author=Ann+%26+%22Bob%22+%3Cx%3E&amp;from=2026-01-01"
            };
            assert!(
                whole.contains(&format!("<a href=\"{first_href}\">Ann &amp; &quot;Bob&quot; &lt;x&gt;</a>")),
                "{whole}"
            );
        }
    }
}
