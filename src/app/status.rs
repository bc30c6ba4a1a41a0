//! `policy-audit status`: per project cursor, last success, last error and flag state; per
//! destination pending and dead deliveries. Never shows a secret.

use super::Output;
use crate::config::Config;
use crate::store::Store;
use serde_json::json;

pub fn run(config: &Config, store: &Store, json: bool) -> Output {
    match collect(config, store) {
        Ok(report) if json => {
            Output { stdout: serde_json::to_string_pretty(&report).unwrap_or_default() + "\n", ..Output::default() }
        }
        Ok(report) => Output { stdout: text(&report), ..Output::default() },
        Err(e) => Output::unusable(format!("{e:#}")),
    }
}

fn collect(config: &Config, store: &Store) -> anyhow::Result<serde_json::Value> {
    // The discovered SPPs are projects too (a daemon's config has them merged already).
    let merged = crate::discovery::effective(config, store);
    let config = &merged;
    // In cluster mode the cursors live in the cluster's bucket, not in this replica.
    let node = config.cluster.as_ref().map(|_| crate::cluster::Node::observe(config));
    let mut projects = Vec::new();
    for p in &config.projects {
        let cursor = match &node {
            Some(Ok(node)) => crate::cluster::ProjectTrail::cursor(node, &p.path)?,
            Some(Err(_)) => None,
            None => store.cursor(&p.path)?,
        };
        let status = store.project_status(&p.path)?;
        projects.push(json!({
            "path": p.path,
            "branch": p.branch,
            "source": p.source.name(),
            "cursor": cursor.as_ref().map(|c| c.commit.clone()),
            "policies": cursor.as_ref().and_then(|c| c.baseline.as_ref()).map(|b| b.len()),
            "last_run_at": status.last_run_at,
            "last_success_at": status.last_success_at,
            "last_error": status.last_error,
            "last_error_at": status.last_error_at,
            "feature_flag": config.flag.describe_for(&p.path),
        }));
    }
    let configured: Vec<&str> = config.projects.iter().map(|p| p.path.as_str()).collect();
    let unconfigured: Vec<String> =
        store.synced_projects()?.into_iter().filter(|p| !configured.contains(&p.as_str())).collect();
    let mut destinations = Vec::new();
    for d in &config.destinations {
        destinations.push(destination(store, &d.name)?);
    }
    // Deliveries of a destination that was removed from the config are kept, and shown here.
    let mut removed = Vec::new();
    for name in removed_destinations(config, store)? {
        let mut d = destination(store, &name)?;
        d["removed_from_config"] = json!(true);
        removed.push(d);
    }
    let chain = store.chain_head()?;
    let certificates = expiring_certificates(config, jiff::Timestamp::now().as_second());
    let mut report = json!({
        "events": store.event_count()?,
        "chain_head": chain.head,
        "chain_events": chain.events,
        "projects": projects,
        "unconfigured_projects_with_state": unconfigured,
        "destinations": destinations,
        "removed_destinations": removed,
        "certificates_expiring": certificates,
    });
    if let Some(node) = node {
        report["cluster"] = cluster_view(config, node);
    }
    if let Some(gitlab) = config.gitlab.as_ref().filter(|g| !g.discover.is_empty()) {
        report["discovery"] = discovery_view(config, gitlab, store)?;
    }
    Ok(report)
}

/// Discovery: when it last ran and how, what it found, what cannot be polled.
fn discovery_view(config: &Config, gitlab: &crate::config::GitLab, store: &Store) -> anyhow::Result<serde_json::Value> {
    let st = crate::discovery::status(store);
    let list = crate::discovery::stored(store)?;
    let unusable = crate::discovery::merge::effective(config, list.as_ref()).1;
    let missing: Vec<serde_json::Value> = list
        .iter()
        .flat_map(|l| &l.links)
        .filter_map(|(ns, l)| {
            l.missing_since.as_ref().map(|since| json!({"namespace": ns, "spp": l.spp, "missing_since": since}))
        })
        .collect();
    Ok(json!({
        "roots": gitlab.discover,
        "interval_seconds": gitlab.discover_interval.as_secs(),
        "last_attempt_at": st.last_attempt_at,
        "last_success_at": st.last_success_at,
        "last_error": st.last_error,
        "last_error_at": st.last_error_at,
        "failures": st.failures,
        "calls": st.calls,
        "namespaces": st.namespaces,
        "spps": list.as_ref().map_or(0, |l| l.spps.len()),
        "links": list.as_ref().map_or(0, |l| l.links.len()),
        "missing_namespaces": missing,
        "unusable_spps": unusable,
    }))
}

/// Days before expiry from which `status` points a configured certificate out.
pub const CERTIFICATE_WARNING_DAYS: i64 = 30;

/// Configured certificates (`ca_file`, `client_cert_file`) that expire within
/// [`CERTIFICATE_WARNING_DAYS`] of `now` (unix seconds) or have expired.
fn expiring_certificates(config: &Config, now: i64) -> Vec<crate::tls::CertificateNote> {
    let owners = config
        .projects
        .iter()
        .map(|p| (format!("project {:?}", p.path), &p.tls))
        .chain(config.destinations.iter().map(|d| (format!("destination {:?}", d.name), &d.tls)));
    owners
        .flat_map(|(owner, tls)| crate::tls::expiring_certificates(&owner, tls, now, CERTIFICATE_WARNING_DAYS))
        .collect()
}

/// Names with deliveries in the store but no `[[destinations]]` entry.
pub fn removed_destinations(config: &Config, store: &Store) -> anyhow::Result<Vec<String>> {
    let configured: Vec<&str> = config.destinations.iter().map(|d| d.name.as_str()).collect();
    Ok(store.destinations_with_entries()?.into_iter().filter(|n| !configured.contains(&n.as_str())).collect())
}

fn destination(store: &Store, name: &str) -> anyhow::Result<serde_json::Value> {
    let pending = store.pending(Some(name))?;
    let dead = store.dead(Some(name))?;
    let last_error = pending.iter().chain(&dead).filter_map(|d| d.last_error.clone()).next_back();
    let oldest = pending.iter().map(|d| d.enqueued_at).min();
    Ok(json!({
        "name": name,
        "pending": pending.len(),
        "dead": dead.len(),
        "oldest_pending_enqueued_at": oldest.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()).map(crate::event::rfc3339_millis),
        "last_error": last_error,
    }))
}

/// Cluster mode: who holds which project and destination. An unreachable NATS is reported in
/// place, so `status` still shows the local replica.
fn cluster_view(config: &Config, node: anyhow::Result<crate::cluster::Node>) -> serde_json::Value {
    let view = (|| -> anyhow::Result<serde_json::Value> {
        let node = node?;
        let now = crate::cluster::now_ms();
        let mut leases = Vec::new();
        let mut instances = Vec::new();
        for (key, lease) in node.leases()? {
            if key.starts_with("instance.") {
                if lease.is_live(now) {
                    instances.push(lease.holder);
                }
                continue;
            }
            let live = lease.is_live(now);
            leases.push(json!({
                "lease": key,
                "expires_in_ms": live.then_some(lease.expires_at - now),
                "holder": live.then_some(lease.holder),
            }));
        }
        Ok(json!({"instance": node.id, "instances": instances, "leases": leases}))
    })();
    let name = config.cluster.as_ref().map(|c| c.name.clone());
    match view {
        Ok(mut v) => {
            v["name"] = json!(name);
            v
        }
        Err(e) => json!({"name": name, "error": format!("{e:#}")}),
    }
}

fn text(report: &serde_json::Value) -> String {
    // Every value shown is escaped: an error message may quote a remote's or a file's text.
    let str_of = |v: &serde_json::Value| {
        v.as_str().map(|s| crate::text::escape_controls(s).into_owned()).unwrap_or_else(|| "-".into())
    };
    let mut s = format!("events stored: {}\n", report["events"]);
    s.push_str(&format!(
        "chain head:    {} (covers {} events; `policy-audit verify` checks it)\n",
        str_of(&report["chain_head"]),
        report["chain_events"]
    ));
    for p in report["projects"].as_array().into_iter().flatten() {
        let cursor = p["cursor"].as_str().map(|c| c.get(..12).unwrap_or(c).to_string());
        // Where each entry comes from matters once GitLab is a source too.
        let source =
            if report["discovery"].is_object() { format!(", from {}", str_of(&p["source"])) } else { String::new() };
        s.push_str(&format!("project {} ({}{source})\n", str_of(&p["path"]), str_of(&p["branch"])));
        s.push_str(&format!("  cursor:        {}\n", cursor.unwrap_or_else(|| "never synced".into())));
        s.push_str(&format!("  last success:  {}\n", str_of(&p["last_success_at"])));
        if !p["last_error"].is_null() {
            s.push_str(&format!("  last error:    {} ({})\n", str_of(&p["last_error"]), str_of(&p["last_error_at"])));
        }
        s.push_str(&format!("  feature flag:  {}\n", str_of(&p["feature_flag"])));
    }
    for u in report["unconfigured_projects_with_state"].as_array().into_iter().flatten() {
        s.push_str(&format!("project {} has state but is no longer configured\n", str_of(u)));
    }
    let removed = report["removed_destinations"].as_array().into_iter().flatten();
    for d in report["destinations"].as_array().into_iter().flatten().chain(removed) {
        s.push_str(&format!("destination {}: {} pending, {} dead", str_of(&d["name"]), d["pending"], d["dead"]));
        if d["removed_from_config"] == json!(true) {
            s.push_str(" (no longer in the config: kept, not delivered)");
        }
        if let Some(oldest) = d["oldest_pending_enqueued_at"].as_str() {
            s.push_str(&format!(", oldest pending since {oldest}"));
        }
        if !d["last_error"].is_null() {
            s.push_str(&format!(", last error: {}", str_of(&d["last_error"])));
        }
        s.push('\n');
    }
    for c in report["certificates_expiring"].as_array().into_iter().flatten() {
        let (path, owner, key) = (str_of(&c["path"]), str_of(&c["owner"]), str_of(&c["key"]));
        let subject = str_of(&c["subject"]);
        let days = c["days_left"].as_i64().unwrap_or_default();
        if days < 0 {
            s.push_str(&format!(
                "certificate {path} ({owner} `{key}`, {subject}) expired on {}\n",
                str_of(&c["not_after"])
            ));
        } else {
            s.push_str(&format!(
                "certificate {path} ({owner} `{key}`, {subject}) expires on {} (in {days} days): renew it\n",
                str_of(&c["not_after"])
            ));
        }
    }
    if let Some(d) = report["discovery"].as_object() {
        let roots: Vec<String> = d["roots"].as_array().into_iter().flatten().map(str_of).collect();
        s.push_str(&format!("discovery from GitLab ({}):\n", roots.join(", ")));
        s.push_str(&format!(
            "  last success:  {} ({} SPPs, {} links; {} namespaces read in {} calls)\n",
            str_of(&d["last_success_at"]),
            d["spps"],
            d["links"],
            d["namespaces"],
            d["calls"]
        ));
        if !d["last_error"].is_null() {
            s.push_str(&format!(
                "  last error:    {} ({}; the last discovered list stays in use)\n",
                str_of(&d["last_error"]),
                str_of(&d["last_error_at"])
            ));
        }
        for m in d["missing_namespaces"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "  {} (linked to {}) is not shown by GitLab since {}: deleted, or the token lost access; its link is kept\n",
                str_of(&m["namespace"]),
                str_of(&m["spp"]),
                str_of(&m["missing_since"])
            ));
        }
        for u in d["unusable_spps"].as_array().into_iter().flatten() {
            s.push_str(&format!("  SPP {} is not polled: {}\n", str_of(&u["path"]), str_of(&u["reason"])));
        }
    }
    if let Some(c) = report["cluster"].as_object() {
        s.push_str(&format!("cluster {}: this instance is {}\n", str_of(&c["name"]), str_of(&c["instance"])));
        if let Some(e) = c.get("error") {
            s.push_str(&format!("  cannot read the leases: {}\n", str_of(e)));
        }
        let live: Vec<String> = c["instances"].as_array().into_iter().flatten().map(str_of).collect();
        s.push_str(&format!("  live instances: {}\n", if live.is_empty() { "-".into() } else { live.join(", ") }));
        for l in c["leases"].as_array().into_iter().flatten() {
            let holder = l["holder"].as_str().map_or_else(|| "free".to_string(), |h| format!("held by {h}"));
            s.push_str(&format!("  {}: {holder}\n", str_of(&l["lease"])));
        }
    }
    s
}
