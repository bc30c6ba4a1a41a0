//! `policy-audit events`: the stored trail, filtered, as a table, JSON, JSON lines or CSV.

use super::{EXIT_UNUSABLE, EventsArgs, Format, Output};
use crate::event::{AuditEvent, EventType, rfc3339_millis};
use crate::store::{EventQuery, Store};
use crate::text::escape_controls;

pub fn run(store: &Store, args: &EventsArgs) -> Output {
    let query = match query_of(args) {
        Ok(q) => q,
        Err(e) => {
            return Output { stderr: format!("error: {e}\n"), code: EXIT_UNUSABLE, ..Output::default() };
        }
    };
    match store.events(&query) {
        Ok(events) => Output { stdout: render(&events, args.format), ..Output::default() },
        Err(e) => Output::unusable(format!("{e:#}")),
    }
}

fn query_of(args: &EventsArgs) -> Result<EventQuery, String> {
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
    })
}

/// RFC 3339 or a date; a date as an upper bound means the end of that day (UTC).
fn time_bound(text: &str, end_of_day: bool) -> Result<String, String> {
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

pub fn render(events: &[AuditEvent], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(events).unwrap_or_default() + "\n",
        Format::Jsonl => events.iter().map(|e| serde_json::to_string(e).unwrap_or_default() + "\n").collect(),
        Format::Csv => csv(events),
        Format::Table => table(events),
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
            let mr = e.details.merge_request.as_ref().map(|m| format!(" !{}", m.iid)).unwrap_or_default();
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
                escape_controls(&format!("{} <{}>", e.author_name, e.details.author_email)).into_owned(),
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

/// Keeps table cells readable; the full text is in the JSON formats.
fn clip(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max_chars - 1).collect();
    s.push('…');
    s
}

fn csv(events: &[AuditEvent]) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    let _ = w.write_record([
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
    ]);
    for e in events {
        let d = &e.details;
        let mr = d.merge_request.as_ref().map(|m| format!("{}!{}", m.project, m.iid)).unwrap_or_default();
        let _ = w.write_record([
            e.id.as_str(),
            &e.created_at,
            e.event_type.name(),
            &e.entity_path,
            d.policy_type.as_deref().unwrap_or(""),
            d.policy_name.as_deref().unwrap_or(""),
            &e.author_name,
            &d.author_email,
            &e.author_id.to_string(),
            &d.security_policy_project_commit_sha,
            &mr,
            &d.custom_message,
        ]);
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}
