//! `policy-audit events`: the stored trail, filtered, as a table, JSON, JSON lines or CSV.
//!
//! JSON, JSON lines and CSV are written event by event as the store yields them, so a listing
//! of any size runs in bounded memory; the table needs every row for its column widths (it is
//! for people; use `--limit` or another format for large listings). A write error is an error:
//! only a closed pipe (`events | head`) ends the listing quietly.

use super::{EXIT_UNUSABLE, EventsRequest, Format, Output, write_failed};
use crate::event::{AuditEvent, EventType, rfc3339_millis};
use crate::store::{EventQuery, Store};
use crate::text::escape_controls;
use serde::ser::{SerializeSeq, Serializer};
use std::io::Write;
use std::ops::ControlFlow;

pub fn run(store: &Store, args: &EventsRequest, out: &mut dyn Write) -> Output {
    let query = match query_of(args) {
        Ok(q) => q,
        Err(e) => {
            return Output { stderr: format!("error: {e}\n"), code: EXIT_UNUSABLE, ..Output::default() };
        }
    };
    match write_events(store, &query, args.format, out) {
        Ok(()) => Output::default(),
        Err(e) => match e.downcast::<std::io::Error>() {
            Ok(io) => write_failed(&io),
            Err(e) => Output::unusable(format!("{e:#}")),
        },
    }
}

/// Streams the matching events to `out` in `format`. I/O errors come back as `std::io::Error`.
fn write_events(store: &Store, query: &EventQuery, format: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    let go_on = ControlFlow::Continue(());
    match format {
        Format::Table => {
            let events = store.events(query)?;
            out.write_all(table(&events).as_bytes())?;
        }
        Format::Jsonl => store.for_each_event(query, |e| {
            serde_json::to_writer(&mut *out, &e).map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
            Ok(go_on)
        })?,
        Format::Json => {
            let mut ser = serde_json::Serializer::pretty(&mut *out);
            let mut seq = ser.serialize_seq(None).map_err(std::io::Error::from)?;
            store.for_each_event(query, |e| {
                seq.serialize_element(&e).map_err(std::io::Error::from)?;
                Ok(go_on)
            })?;
            seq.end().map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(&mut *out);
            w.write_record(CSV_HEADER).map_err(std::io::Error::from)?;
            store.for_each_event(query, |e| {
                w.write_record(csv_record(&e)).map_err(std::io::Error::from)?;
                Ok(go_on)
            })?;
            w.flush()?;
        }
    }
    out.flush()?;
    Ok(())
}

fn query_of(args: &EventsRequest) -> Result<EventQuery, String> {
    let mut event_types = Vec::new();
    for t in &args.types {
        let full = if t.starts_with("security_policy_") { t.clone() } else { format!("security_policy_{t}") };
        let parsed = EventType::from_name(&full).ok_or_else(|| {
            format!("--type {t:?} is not an event type (one of: {})", EventType::ALL.map(EventType::name).join(", "))
        })?;
        event_types.push(parsed);
    }
    Ok(EventQuery {
        projects: args.projects.clone(),
        event_types,
        policy: args.policy.clone(),
        author: args.author.clone(),
        since: args.since.as_deref().map(|s| time_bound(s, false)).transpose()?,
        until: args.until.as_deref().map(|s| time_bound(s, true)).transpose()?,
        limit: args.limit,
        ..EventQuery::default()
    })
}

/// RFC 3339 or a date; a date as an upper bound means the end of that day (UTC).
pub fn time_bound(text: &str, end_of_day: bool) -> Result<String, String> {
    if let Ok(ts) = text.parse::<jiff::Timestamp>() {
        return Ok(rfc3339_millis(ts));
    }
    let date: jiff::civil::Date = text.parse().map_err(|_| {
        format!("{text:?} is not a time (use RFC 3339 like 2024-03-01T10:00:00Z, or a date like 2024-03-01)")
    })?;
    let time = if end_of_day { jiff::civil::time(23, 59, 59, 999_000_000) } else { jiff::civil::time(0, 0, 0, 0) };
    let ts = date.to_datetime(time).to_zoned_datetime(jiff::tz::TimeZone::UTC).map_err(|e| e.to_string())?.timestamp();
    Ok(rfc3339_millis(ts))
}

/// Events already in memory, rendered as `events --format` does (the demo's listing).
pub fn render(events: &[AuditEvent], format: Format, out: &mut dyn Write) -> std::io::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, events)?;
            out.write_all(b"\n")
        }
        Format::Jsonl => events.iter().try_for_each(|e| {
            serde_json::to_writer(&mut *out, e)?;
            out.write_all(b"\n")
        }),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(&mut *out);
            w.write_record(CSV_HEADER)?;
            for e in events {
                w.write_record(csv_record(e))?;
            }
            w.flush()
        }
        Format::Table => out.write_all(table(events).as_bytes()),
    }
}

fn kind(e: &AuditEvent) -> &str {
    e.event_type.name().trim_start_matches("security_policy_")
}

fn what(e: &AuditEvent) -> String {
    match (&e.details.policy_type, &e.details.policy_name) {
        (Some(t), Some(n)) => format!("{t} \"{n}\""),
        (Some(t), None) => format!(
            "{t}: skipped {}",
            e.details.active_skipped_policies_names.as_deref().unwrap_or_default().join(", ")
        ),
        _ => e.details.invalid_reason.clone().unwrap_or_default(),
    }
}

fn table(events: &[AuditEvent]) -> String {
    if events.is_empty() {
        return "no events\n".into();
    }
    let rows: Vec<[String; 6]> = events
        .iter()
        .map(|e| {
            let mr = e.details.merge_request.as_ref().map(merge_request_cell).unwrap_or_default();
            let mut what = what(e);
            if let Some(changes) = &e.details.changes {
                let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
                what = format!("{what} [{}]", paths.join(", "));
            }
            if e.details.history_rewritten {
                what.push_str(" (history rewritten)");
            }
            // Names are data, not terminal commands: a cell never holds a raw control character.
            let what = clip(&escape_controls(&what), 90);
            [
                e.created_at.clone(),
                escape_controls(&e.entity_path).into_owned(),
                kind(e).to_string(),
                what,
                escape_controls(&author_cell(e)).into_owned(),
                format!(
                    "{}{mr}",
                    &e.details.security_policy_project_commit_sha
                        [..8.min(e.details.security_policy_project_commit_sha.len())]
                ),
            ]
        })
        .collect();
    let header = ["TIME", "PROJECT", "EVENT", "POLICY", "AUTHOR", "COMMIT"];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The git author, and the GitLab user it was resolved to when known.
fn author_cell(e: &AuditEvent) -> String {
    let mut cell = format!("{} <{}>", e.author_name, e.details.author_email);
    if let Some(u) = &e.details.gitlab_user {
        cell.push_str(&format!(" (@{} #{})", u.username, u.id));
    }
    cell
}

/// ` !4`, with who merged and who approved when GitLab said.
fn merge_request_cell(m: &crate::event::MergeRequest) -> String {
    let mut cell = format!(" !{}", m.iid);
    let mut people = Vec::new();
    if let Some(u) = &m.merged_by {
        people.push(format!("merged by @{}", u.username));
    }
    match m.approved_by.as_deref() {
        Some([]) => people.push("no approvals".into()),
        Some(list) => people.push(format!(
            "approved by {}",
            list.iter().map(|u| format!("@{}", u.username)).collect::<Vec<_>>().join(", ")
        )),
        None => {}
    }
    if !people.is_empty() {
        cell.push_str(&format!(" ({})", people.join("; ")));
    }
    cell
}

/// Keeps table cells readable; the full text is in the JSON formats.
fn clip(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max_chars - 1).collect();
    s.push('…');
    s
}

const CSV_HEADER: [&str; 12] = [
    "id",
    "created_at",
    "event_type",
    "entity_path",
    "policy_type",
    "policy_name",
    "author_name",
    "author_email",
    "author_id",
    "commit_sha",
    "merge_request",
    "custom_message",
];

fn csv_record(e: &AuditEvent) -> [String; 12] {
    let d = &e.details;
    let mr = d.merge_request.as_ref().map(|m| format!("{}!{}", m.project, m.iid)).unwrap_or_default();
    [
        e.id.clone(),
        e.created_at.clone(),
        e.event_type.name().to_string(),
        e.entity_path.clone(),
        d.policy_type.clone().unwrap_or_default(),
        d.policy_name.clone().unwrap_or_default(),
        e.author_name.clone(),
        d.author_email.clone(),
        e.author_id.to_string(),
        d.security_policy_project_commit_sha.clone(),
        mr,
        d.custom_message.clone(),
    ]
}
