//! `policy-audit reconcile`: runs the reconcile of the selected projects, then delivers what is
//! due. [`reconcile`] gives the typed [`Report`] (the daemon logs its fields); [`render`] prints
//! one summary line per project (or JSON); exit 1 when any project failed, 2 when the store is
//! damaged.

use super::{EXIT_FAILED, EXIT_UNUSABLE, Output, ReconcileRequest};
use crate::cluster::ProjectTrail;
use crate::config::{Config, Project};
use crate::reconcile::{Options, Summary, reconcile_all};
use crate::stop::Stop;
use crate::store::{Store, StoreError};
use crate::stream::DestinationReport;
use serde_json::json;
use std::sync::Arc;

/// What one reconcile request did.
pub struct Report {
    /// One entry per selected project, in config order.
    pub projects: Vec<(String, anyhow::Result<Summary>)>,
    /// One entry per destination, when deliveries were made.
    pub deliveries: Vec<DestinationReport>,
    /// The delivery lines and errors, as `deliveries retry` prints them.
    pub delivery_output: Output,
    /// Unknown `--project` paths: nothing was run.
    pub unknown_projects: Vec<String>,
}

impl Report {
    pub fn damaged(&self) -> bool {
        self.projects.iter().any(|(_, r)| r.as_ref().is_err_and(StoreError::is_damaged))
    }
}

/// Reconciles the selected projects and delivers what is due. `stop` is the daemon's shutdown
/// flag (None in-process).
pub fn reconcile(config: &Config, store: &Store, req: &ReconcileRequest, stop: &Stop) -> Report {
    reconcile_into(config, store, req, stop, None)
}

/// Like [`reconcile`], committing cursors and events to `trail` when given (cluster mode: the
/// daemon passes its node, and a config holding only the projects it leases).
pub fn reconcile_into(
    config: &Config,
    store: &Store,
    req: &ReconcileRequest,
    stop: &Stop,
    trail: Option<Arc<dyn ProjectTrail>>,
) -> Report {
    let mut report = Report {
        projects: Vec::new(),
        deliveries: Vec::new(),
        delivery_output: Output::default(),
        unknown_projects: Vec::new(),
    };
    let projects: Vec<&Project> = if req.projects.is_empty() {
        config.projects.iter().collect()
    } else {
        let mut chosen = Vec::new();
        for path in &req.projects {
            match config.projects.iter().find(|p| &p.path == path) {
                Some(p) => chosen.push(p),
                None => report.unknown_projects.push(path.clone()),
            }
        }
        if !report.unknown_projects.is_empty() {
            return report;
        }
        chosen
    };
    let options =
        Options { backfill: req.backfill, rebaseline: req.rebaseline, progress: !req.json, stop: stop.clone(), trail };
    report.projects = reconcile_all(config, store, &projects, &options, &crate::clock::SystemClock);
    if !req.no_deliver && !report.damaged() {
        report.deliveries = super::deliveries::deliver_now(config, store, &mut report.delivery_output);
    }
    report
}

/// The report as `reconcile` prints it.
pub fn render(config: &Config, req: &ReconcileRequest, report: Report) -> Output {
    let mut out = Output::default();
    for path in &report.unknown_projects {
        out.err_line(format!("error: project {path:?} is not in {}", config.source.display()));
        out.code = EXIT_UNUSABLE;
    }
    if !report.unknown_projects.is_empty() {
        return out;
    }
    let mut json_rows = Vec::new();
    for (path, result) in &report.projects {
        match result {
            Ok(summary) => {
                if req.json {
                    json_rows.push(serde_json::to_value(summary).unwrap_or_default());
                } else {
                    out.out_line(describe(summary));
                    for why in &summary.included_errors {
                        out.err_line(format!("warning: {}: {why}", summary.project));
                    }
                    if req.timings {
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
                // A damaged store is unusable state, not one failed project.
                out.code = out.code.max(if StoreError::is_damaged(e) { EXIT_UNUSABLE } else { EXIT_FAILED });
                if req.json {
                    json_rows.push(json!({"project": path, "error": format!("{e:#}")}));
                }
            }
        }
    }
    let mut delivery = report.delivery_output;
    if req.json {
        delivery.stdout.clear();
    }
    out.append(delivery);
    let peak = req.timings.then(|| peak_memory_bytes(None)).flatten();
    if req.json {
        let mut summary = json!({"projects": json_rows, "deliveries": report.deliveries});
        if let Some(peak) = peak {
            summary["peak_memory_bytes"] = peak.into();
        }
        out.out_line(serde_json::to_string_pretty(&summary).unwrap_or_default());
    } else if let Some(peak) = peak {
        out.out_line(format!(
            "peak memory: {:.1} MiB (resident, of the process that ran the reconcile since it started: the daemon's when one runs; not the git programs a local fetch runs)",
            peak as f64 / (1024.0 * 1024.0)
        ));
    }
    out
}

/// The most memory process `pid` (None: this one) has held resident so far (`VmHWM`), bytes:
/// its own, not that of the programs it ran (a fetch from a local path runs `git upload-pack`,
/// which on a real server runs there), nor that of the process that started it. A reconcile
/// asked of the daemon is rendered there: then it is the daemon's, since it started. (The
/// benchmark harness reads its servers' peaks with it too.)
pub fn peak_memory_bytes(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or_else(|| "/proc/self/status".to_string(), |pid| format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(path).ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim();
    Some(kib.parse::<u64>().ok()? * 1024)
}

/// Reconciles and prints.
pub fn run(config: &Config, store: &Store, req: &ReconcileRequest, stop: &Stop) -> Output {
    if config.cluster.is_some() {
        // Here without a daemon: this store is a replica, and the projects belong to the
        // instances holding their leases.
        return Output::unusable(
            "in cluster mode projects are reconciled by the daemons holding their leases: start `policy-audit run` (the command is then passed to it)",
        );
    }
    // Without a daemon: discover here when due, and run on the merged list.
    let discovered = crate::discovery::refresh(config, store, false, stop);
    let config = &crate::discovery::effective(config, store);
    let report = reconcile(config, store, req, stop);
    let mut out = discovery_warning(&discovered);
    out.append(render(config, req, report));
    out
}

/// A failed discovery is said, not fatal: the projects are reconciled on the last list.
pub fn discovery_warning(outcome: &crate::discovery::Outcome) -> Output {
    let mut out = Output::default();
    if let Some(why) = &outcome.error {
        out.err_line(format!("warning: discovery from GitLab failed ({why}); the last discovered list is used"));
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
