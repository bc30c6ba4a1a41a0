//! `check-config`: the config (secrets, certificates, schema file included) checked without
//! touching state, and the deliveries a new config would orphan, asked of the running daemon or
//! read from a store of our own.

use super::{Cli, load_config};
use crate::app::{self, EXIT_OK, Output, Request};
use crate::config::Config;
use crate::store::Store;

/// Deliveries queued for destinations the config being checked no longer has: asked of the
/// running daemon, or read from a store of our own; check-config never creates state. An
/// error means the check could not be made (and says why); it never reads as "none".
fn orphaned_deliveries(config: &Config) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let mut counts: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let list = Request::Deliveries(app::DeliveriesRequest { json: true, ..app::DeliveriesRequest::default() });
    let mut listing = Vec::new();
    match crate::control::try_daemon(config, &list, &mut listing) {
        Some(answer) => {
            let answer = answer?;
            if answer.code != EXIT_OK {
                anyhow::bail!("the daemon answered: {}", answer.stderr.trim());
            }
            listing.extend_from_slice(answer.stdout.as_bytes());
            let items: Vec<serde_json::Value> =
                serde_json::from_slice(&listing).context("the daemon's list of deliveries does not parse")?;
            for item in items {
                let name = item["destination"].as_str().context("a delivery without a destination name")?;
                let entry = counts.entry(name.to_string()).or_default();
                if item["state"] == "dead" { entry.1 += 1 } else { entry.0 += 1 }
            }
        }
        None => {
            // No daemon: read the store ourselves, but only one that is ours, so that an admin's
            // check never leaves files owned by another user in a service's state directory.
            use std::os::unix::fs::MetadataExt;
            let db = config.db_dir();
            if !db.join("conf").exists() {
                return Ok(Vec::new()); // nothing stored yet: nothing can be orphaned
            }
            let owner = std::fs::metadata(&db).with_context(|| format!("cannot read {}", db.display()))?.uid();
            // SAFETY: geteuid has no preconditions.
            if owner != unsafe { libc::geteuid() } {
                anyhow::bail!(
                    "the state database {} belongs to user id {owner}; run check-config as that user (or start the daemon) to check it",
                    db.display()
                );
            }
            let store = Store::open(&db)?;
            for d in store.pending(None)? {
                counts.entry(d.destination).or_default().0 += 1;
            }
            for d in store.dead(None)? {
                counts.entry(d.destination).or_default().1 += 1;
            }
        }
    }
    Ok(counts
        .into_iter()
        .filter(|(name, _)| !config.destinations.iter().any(|d| &d.name == name))
        .map(|(name, (pending, dead))| {
            format!("destination {name:?} is no longer configured but has {pending} pending and {dead} dead deliveries in the state; they are kept, not delivered")
        })
        .collect())
}

pub(super) fn check_config(cli: &Cli) -> Output {
    let config = match load_config(cli) {
        Ok(c) => c,
        Err(out) => return out,
    };
    let mut out = Output::default();
    for w in &config.warnings {
        out.err_line(format!("warning: {w}"));
    }
    match orphaned_deliveries(&config) {
        Ok(orphans) => orphans.iter().for_each(|w| out.err_line(format!("warning: {w}"))),
        Err(e) => out.err_line(format!("warning: orphaned deliveries: could not check: {e:#}")),
    }
    out.out_line(format!(
        "{}: ok ({} project(s), {} destination(s), schedule \"{}\" {}, state in {})",
        cli.config.display(),
        config.projects.len(),
        config.destinations.len(),
        config.schedule,
        config.timezone,
        config.state_dir.display()
    ));
    if let Some(g) = config.gitlab.as_ref().filter(|g| !g.discover.is_empty()) {
        out.out_line(format!(
            "discovery: the SPPs linked under {} are read from {} at most every {} (`policy-audit discover` shows them)",
            g.discover.join(", "),
            g.url,
            humantime::format_duration(g.discover_interval)
        ));
    }
    out
}
