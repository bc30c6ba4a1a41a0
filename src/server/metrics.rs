//! `/metrics` (Prometheus text format 0.0.4), `/healthz` and `/readyz`.
//!
//! Stored-event counts and delivery counts are read from the store at each scrape (from the
//! type index and the outbox keys, without decoding events); reconcile durations and failures
//! are counted by the daemon as they happen ([`Activity`]), so they start at zero with the
//! process, as Prometheus counters do.

use super::{Shared, blocking};
use crate::store::Store;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the reconcile duration histogram, seconds.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// What the daemon's reconciles did since it started.
#[derive(Default)]
pub struct Activity {
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    /// Per bucket (and +Inf last), not cumulative.
    buckets: [u64; BUCKETS.len() + 1],
    sum_seconds: f64,
    count: u64,
    failures: BTreeMap<String, u64>,
    /// Whether the last reconcile of each project failed.
    failing: BTreeMap<String, bool>,
    reconciles_by_trigger: BTreeMap<String, u64>,
}

impl Activity {
    /// Records one reconcile: how long it took and which projects failed.
    pub fn record(&self, trigger: &str, took: Duration, projects: &[(String, bool)]) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let secs = took.as_secs_f64();
        let at = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        c.buckets[at] += 1;
        c.sum_seconds += secs;
        c.count += 1;
        *c.reconciles_by_trigger.entry(trigger.to_string()).or_default() += 1;
        for (project, ok) in projects {
            c.failing.insert(project.clone(), !ok);
            if !ok {
                *c.failures.entry(project.clone()).or_default() += 1;
            }
        }
    }

    /// Projects whose last reconcile failed.
    pub fn failing(&self) -> Vec<String> {
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.failing.iter().filter(|(_, f)| **f).map(|(p, _)| p.clone()).collect()
    }
}

pub async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

/// Ready when the store answers and no project's last reconcile failed.
pub async fn readyz(State(s): State<Shared>) -> Response {
    let checked = blocking(&s, |src| {
        src.store().chain_head()?;
        Ok(src.activity().map(Activity::failing).unwrap_or_default())
    })
    .await;
    match checked {
        Ok(failing) if failing.is_empty() => (StatusCode::OK, "ready\n").into_response(),
        Ok(failing) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("last reconcile failed for: {}\n", failing.join(", ")))
                .into_response()
        }
        Err(r) => (StatusCode::SERVICE_UNAVAILABLE, r.into_body()).into_response(),
    }
}

pub async fn metrics(State(s): State<Shared>, r: super::viewers::Reader) -> Response {
    match blocking(&s, render).await {
        Ok(mut text) => {
            reads(&mut text, &r.viewers);
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
        }
        Err(r) => r,
    }
}

/// Who read the trail: reads per route and kind of reader (`service` token, signed-in `user`),
/// and tokens GitLab refused, since the server started.
fn reads(out: &mut String, viewers: &super::viewers::Viewers) {
    family(
        out,
        "policy_audit_reads_total",
        "counter",
        "Authenticated reads since the server started, by route and reader kind.",
    );
    for ((route, kind), n) in viewers.reads.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "policy_audit_reads_total{{route=\"{}\",reader=\"{kind}\"}} {n}", label(route));
    }
    family(
        out,
        "policy_audit_tokens_refused_total",
        "counter",
        "Tokens GitLab did not accept (sign_in), since the server started.",
    );
    let refused = *viewers.sign_ins_refused.lock().unwrap_or_else(|p| p.into_inner());
    let _ = writeln!(out, "policy_audit_tokens_refused_total {refused}");
    family(
        out,
        "policy_audit_sign_ins_total",
        "counter",
        "Sign-ins through GitLab's pages since the server started, by outcome (signed_in, refused, unavailable).",
    );
    let sign_ins = viewers.sign_ins.lock().unwrap_or_else(|p| p.into_inner());
    for outcome in ["signed_in", "refused", "unavailable"] {
        let _ = writeln!(
            out,
            "policy_audit_sign_ins_total{{outcome=\"{outcome}\"}} {}",
            sign_ins.get(outcome).unwrap_or(&0)
        );
    }
}

fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn render(src: &dyn super::Source) -> anyhow::Result<String> {
    let config = src.config();
    let store: &Store = src.store();
    let mut out = String::new();
    family(&mut out, "policy_audit_events_stored", "gauge", "Audit events in the trail, by event type.");
    for (t, n) in store.count_by_type()? {
        let _ = writeln!(out, "policy_audit_events_stored{{event_type=\"{}\"}} {n}", t.name());
    }
    let mut names: Vec<String> = config.destinations.iter().map(|d| d.name.clone()).collect();
    for name in store.destinations_with_entries()? {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    family(&mut out, "policy_audit_deliveries_pending", "gauge", "Deliveries waiting to be sent, per destination.");
    for name in &names {
        let _ = writeln!(
            out,
            "policy_audit_deliveries_pending{{destination=\"{}\"}} {}",
            label(name),
            store.pending_count(name)
        );
    }
    family(
        &mut out,
        "policy_audit_deliveries_dead",
        "gauge",
        "Deliveries given up on (dead letters), per destination.",
    );
    for name in &names {
        let dead = store.dead(Some(name))?.len();
        let _ = writeln!(out, "policy_audit_deliveries_dead{{destination=\"{}\"}} {dead}", label(name));
    }
    family(
        &mut out,
        "policy_audit_project_last_success_timestamp_seconds",
        "gauge",
        "When each project was last reconciled successfully (unix seconds).",
    );
    let mut errored = Vec::new();
    for p in &config.projects {
        let status = store.project_status(&p.path)?;
        if let Some(at) = status.last_success_at.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
            let secs = at.as_millisecond() as f64 / 1000.0;
            let _ = writeln!(
                out,
                "policy_audit_project_last_success_timestamp_seconds{{project=\"{}\"}} {secs}",
                label(&p.path)
            );
        }
        let failed = match (&status.last_error_at, &status.last_success_at) {
            (Some(e), Some(s)) => e > s,
            (Some(_), None) => true,
            _ => false,
        };
        errored.push((p.path.clone(), failed));
    }
    family(
        &mut out,
        "policy_audit_project_last_reconcile_failed",
        "gauge",
        "1 when the project's last reconcile failed.",
    );
    for (p, failed) in &errored {
        let _ = writeln!(
            out,
            "policy_audit_project_last_reconcile_failed{{project=\"{}\"}} {}",
            label(p),
            u8::from(*failed)
        );
    }
    family(
        &mut out,
        "policy_audit_project_info",
        "gauge",
        "Each project polled, by where its entry comes from (config, discovery, config+discovery).",
    );
    for p in &config.projects {
        let _ = writeln!(
            out,
            "policy_audit_project_info{{project=\"{}\",source=\"{}\"}} 1",
            label(&p.path),
            p.source.name()
        );
    }
    if config.gitlab.as_ref().is_some_and(|g| !g.discover.is_empty()) {
        discovery(&mut out, store)?;
    }
    if let Some(activity) = src.activity() {
        let c = activity.inner.lock().unwrap_or_else(|p| p.into_inner());
        family(
            &mut out,
            "policy_audit_project_reconcile_failures_total",
            "counter",
            "Failed reconciles per project since the daemon started.",
        );
        for p in &config.projects {
            let n = c.failures.get(&p.path).copied().unwrap_or(0);
            let _ =
                writeln!(out, "policy_audit_project_reconcile_failures_total{{project=\"{}\"}} {n}", label(&p.path));
        }
        family(
            &mut out,
            "policy_audit_reconciles_total",
            "counter",
            "Reconciles run since the daemon started, by what triggered them.",
        );
        for trigger in ["schedule", "forced", "webhook"] {
            let n = c.reconciles_by_trigger.get(trigger).copied().unwrap_or(0);
            let _ = writeln!(out, "policy_audit_reconciles_total{{trigger=\"{trigger}\"}} {n}");
        }
        family(&mut out, "policy_audit_reconcile_duration_seconds", "histogram", "How long reconciles take.");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(c.buckets) {
            cumulative += n;
            let _ = writeln!(out, "policy_audit_reconcile_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "policy_audit_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {}", c.count);
        let _ = writeln!(out, "policy_audit_reconcile_duration_seconds_sum {}", c.sum_seconds);
        let _ = writeln!(out, "policy_audit_reconcile_duration_seconds_count {}", c.count);
    }
    Ok(out)
}

/// Discovery from GitLab: when it last worked, how often it failed, what it holds.
fn discovery(out: &mut String, store: &crate::store::Store) -> anyhow::Result<()> {
    let st = crate::discovery::status(store);
    let list = crate::discovery::stored(store)?;
    family(
        out,
        "policy_audit_discovery_last_success_timestamp_seconds",
        "gauge",
        "When discovery from GitLab last succeeded (unix seconds).",
    );
    if let Some(at) = st.last_success_at.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
        let _ = writeln!(
            out,
            "policy_audit_discovery_last_success_timestamp_seconds {}",
            at.as_millisecond() as f64 / 1000.0
        );
    }
    family(
        out,
        "policy_audit_discovery_last_failed",
        "gauge",
        "1 when the last discovery from GitLab failed (the last list stays in use).",
    );
    let _ = writeln!(out, "policy_audit_discovery_last_failed {}", u8::from(st.last_error.is_some()));
    family(
        out,
        "policy_audit_discovery_failures_total",
        "counter",
        "Failed discoveries from GitLab, as recorded in the store.",
    );
    let _ = writeln!(out, "policy_audit_discovery_failures_total {}", st.failures);
    family(out, "policy_audit_discovery_spps", "gauge", "SPPs in the discovered list.");
    let _ = writeln!(out, "policy_audit_discovery_spps {}", list.as_ref().map_or(0, |l| l.spps.len()));
    family(
        out,
        "policy_audit_discovery_links",
        "gauge",
        "Direct links in the discovered list (missing namespaces included).",
    );
    let _ = writeln!(out, "policy_audit_discovery_links {}", list.as_ref().map_or(0, |l| l.links.len()));
    family(
        out,
        "policy_audit_discovery_missing_namespaces",
        "gauge",
        "Linked namespaces GitLab no longer shows (kept, not unlinked).",
    );
    let missing = list.as_ref().map_or(0, |l| l.links.values().filter(|l| l.missing_since.is_some()).count());
    let _ = writeln!(out, "policy_audit_discovery_missing_namespaces {missing}");
    Ok(())
}
