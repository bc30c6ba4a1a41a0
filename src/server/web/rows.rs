//! The rows of the events page, read from the stored events without decoding what a row does
//! not show (changes, scope, namespaces, attribution): a row borrows its text from the stored
//! JSON, so a page of 50 events costs one read and a scan of each, not a tree of allocations.

use super::{Filters, date, event_href, kind_class, kind_label, policy_href};
use crate::event::EventType;
use maud::{Markup, html};
use serde::Deserialize;
use std::borrow::Cow;

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
}

/// The events table: author, action, target, date; GitLab's columns.
pub fn table(events: &[Row<'_>], f: &Filters) -> Markup {
    html! {
        table.events {
            thead { tr { th { "Author" } th { "Action" } th { "Target" } th { "Date" } } }
            tbody {
                @for e in events {
                    tr {
                        td data-label="Author" {
                            a href=(f.url_with_author("/", &e.author_name)) { (e.author_name) }
                            br; span.muted { (e.details.author_email) }
                        }
                        td data-label="Action" {
                            span class=(kind_class(e.event_type)) { (kind_label(e.event_type)) } " "
                            a.action href=(event_href(&e.id)) { (e.details.custom_message) }
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
        }
    }
}
