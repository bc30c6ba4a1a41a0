//! `policy-audit reconcile`: runs the reconcile of the selected projects and prints one summary
//! line per project (or JSON); exit 1 when any project failed.

use super::{EXIT_FAILED, EXIT_UNUSABLE, Output, ReconcileArgs};
use crate::config::{Config, Project};
use crate::reconcile::{Options, Summary, reconcile_all};
use crate::store::Store;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// `stop` is the daemon's shutdown flag (None in-process).
pub fn run(config: &Config, store: &Store, args: &ReconcileArgs, stop: Option<Arc<AtomicBool>>) -> Output {
    let mut out = Output::default();
    let projects: Vec<&Project> = if args.projects.is_empty() {
        config.projects.iter().collect()
    } else {
        let mut chosen = Vec::new();
        for path in &args.projects {
            match config.projects.iter().find(|p| &p.path == path) {
                Some(p) => chosen.push(p),
                None => {
                    out.err_line(format!("error: project {path:?} is not in {}", config.source.display()));
                    out.code = EXIT_UNUSABLE;
                }
            }
        }
        if out.code != 0 {
            return out;
        }
        chosen
    };
    let options =
        Options { backfill: args.backfill, rebaseline: args.rebaseline, progress: !args.json && stop.is_none(), stop };
    let results = reconcile_all(config, store, &projects, &options, jiff::Timestamp::now);
    let mut json_rows = Vec::new();
    for (path, result) in &results {
        match result {
            Ok(summary) => {
                if args.json {
                    json_rows.push(serde_json::to_value(summary).unwrap_or_default());
                } else {
                    out.out_line(describe(summary));
                    if args.timings {
                        let t = &summary.timings;
                        out.out_line(format!(
                            "  timings: fetch {:.1} ms, walk {:.1} ms, parse {:.1} ms, diff {:.1} ms, store {:.1} ms",
                            t.fetch_ms, t.walk_ms, t.parse_ms, t.diff_ms, t.store_ms
                        ));
                    }
                }
            }
            Err(e) => {
                out.err_line(format!("error: {e:#}"));
                out.code = EXIT_FAILED;
                if args.json {
                    json_rows.push(json!({"project": path, "error": format!("{e:#}")}));
                }
            }
        }
    }
    let mut deliveries = Vec::new();
    if !args.no_deliver {
        let mut delivery_out = Output::default();
        deliveries = super::deliveries::deliver_now(config, store, &mut delivery_out);
        if !args.json {
            out.stdout.push_str(&delivery_out.stdout);
        }
        out.stderr.push_str(&delivery_out.stderr);
        out.code = out.code.max(delivery_out.code);
    }
    if args.json {
        let summary = json!({"projects": json_rows, "deliveries": deliveries});
        out.out_line(serde_json::to_string_pretty(&summary).unwrap_or_default());
    }
    out
}

fn short(sha: &str) -> &str {
    sha.get(..8).unwrap_or(sha)
}

/// One readable line per project.
pub fn describe(s: &Summary) -> String {
    let flag = if s.flag_enabled { "" } else { " (feature flag off: no events made)" };
    if s.first_sync.as_deref() == Some("baseline") {
        return format!(
            "{}: first sync, baseline recorded at {} (no events){flag} in {:.0} ms",
            s.project,
            short(&s.to),
            s.duration_ms
        );
    }
    if s.commits == 0 && s.first_sync.is_none() {
        return format!("{}: up to date at {} in {:.0} ms", s.project, short(&s.to), s.duration_ms);
    }
    let range = match &s.from {
        Some(from) if !s.backfill => format!("{}..{}", short(from), short(&s.to)),
        _ => format!("root..{}", short(&s.to)),
    };
    let counts: Vec<String> =
        s.events.iter().map(|(t, n)| format!("{} {n}", t.trim_start_matches("security_policy_"))).collect();
    let counts = if counts.is_empty() { String::new() } else { format!(" ({})", counts.join(", ")) };
    let replayed = s.event_total() - s.stored;
    let replayed = if replayed > 0 { format!(", {replayed} already stored") } else { String::new() };
    let rewritten = if s.history_rewritten { " [history rewritten]" } else { "" };
    format!(
        "{}: {} commit(s), {} policy change step(s), {} event(s) stored{counts}{replayed} [{range}]{rewritten}{flag} in {:.0} ms",
        s.project, s.commits, s.steps, s.stored, s.duration_ms
    )
}
