//! The daemon's cluster-mode loops (see `crate::cluster` for the protocol): lease rounds, the
//! replica following the trail stream, and reconcile and delivery limited to what this
//! instance holds.

use super::Daemon;
use crate::app::{self, ReconcileRequest};
use crate::cluster::{Node, ProjectTrail, destination_lease, project_lease};
use crate::config::Config;
use crate::reconcile::destinations_for;
use crate::stream::{Clock, DestinationReport, SystemClock, deliver_due_until};
use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;

/// Events read from the trail stream per replica transaction.
const REPLICA_BATCH: usize = 500;
/// How often the replica looks for new events when it is caught up.
const REPLICA_POLL: Duration = Duration::from_millis(200);

/// Heartbeat, renew, rebalance: every `lease_ttl / 3`.
pub(super) async fn lease_loop(daemon: Arc<Daemon>) {
    let Some(node) = daemon.node.clone() else { return };
    let every = (node.settings.lease_ttl / 3).max(Duration::from_millis(200));
    loop {
        let (d, n) = (daemon.clone(), node.clone());
        let held_before = n.held_destinations(&d.config());
        let result = tokio::task::spawn_blocking(move || {
            let busy = d.busy.lock().map(|b| b.clone()).unwrap_or_default();
            n.lease_round(&d.config(), &busy)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "lease round failed"),
            Err(e) => tracing::error!(error = %e, "lease round panicked"),
        }
        if node.held_destinations(&daemon.config()) != held_before {
            daemon.wake_delivery.notify_one();
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = daemon.stop.cancelled() => return,
        }
    }
}

/// Applies the trail stream to the local store, in order, from where it left off.
pub(super) async fn replica_loop(daemon: Arc<Daemon>) {
    let Some(node) = daemon.node.clone() else { return };
    while !daemon.stop.is_cancelled() {
        let (d, n) = (daemon.clone(), node.clone());
        let applied = tokio::task::spawn_blocking(move || -> Result<usize> {
            let from = d.store.replica_position()? + 1;
            let Some((to, events)) = n.read_trail(from, REPLICA_BATCH)? else { return Ok(0) };
            let config = d.config();
            let dests = |e: &crate::event::AuditEvent| destinations_for(&config, e);
            d.store.apply_replica(to, &events, &dests, SystemClock.now_ms())?;
            Ok(events.len())
        })
        .await;
        let wait = match applied {
            Ok(Ok(0)) => REPLICA_POLL,
            Ok(Ok(n)) => {
                tracing::debug!(events = n, "replica caught up with the trail stream");
                daemon.wake_delivery.notify_one();
                Duration::ZERO
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot follow the trail stream");
                Duration::from_secs(1)
            }
            Err(e) => {
                tracing::error!(error = %e, "replica panicked");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = daemon.stop.cancelled() => return,
        }
    }
}

/// Reconciles the projects whose lease this instance holds, committing to the cluster.
/// Delivery is left to the delivery loop, which sends what the replica has applied.
pub(super) fn reconcile_leased(
    daemon: &Daemon,
    node: &Arc<Node>,
    config: &Config,
    mut args: ReconcileRequest,
) -> app::reconcile::Report {
    let mut leased = config.clone();
    leased.projects.retain(|p| node.holds(&project_lease(&p.path)));
    let asked = std::mem::take(&mut args.projects);
    args.projects = asked.into_iter().filter(|p| leased.projects.iter().any(|l| &l.path == p)).collect();
    args.no_deliver = true;
    let keys: Vec<String> = leased.projects.iter().map(|p| project_lease(&p.path)).collect();
    if let Ok(mut busy) = daemon.busy.lock() {
        *busy = keys;
    }
    let trail: Arc<dyn ProjectTrail> = node.clone();
    let report = app::reconcile::reconcile_into(&leased, &daemon.store, &args, &daemon.stop, Some(trail));
    if let Ok(mut busy) = daemon.busy.lock() {
        busy.clear();
    }
    report
}

/// Settles the outbox of every destination this instance did not serve in its last round up to
/// the holder's watermark (a holder that kept its lease is the one that knows: what it re-queued
/// or replayed below the watermark is still to be sent), delivers the destinations it holds, and
/// publishes their new watermarks.
pub(super) fn deliver_leased(
    daemon: &Daemon,
    node: &Node,
    config: &Config,
    seed: u64,
) -> Result<Vec<DestinationReport>> {
    let served = daemon.served.lock().map(|s| s.clone()).unwrap_or_default();
    let mut marks = std::collections::HashMap::new();
    for d in &config.destinations {
        let mark = node.watermark(&d.name)?;
        marks.insert(d.name.clone(), mark);
        if served.contains(&d.name) && node.holds(&destination_lease(&d.name)) {
            continue;
        }
        let settled = daemon.store.settle_below(&d.name, mark)?;
        if settled > 0 {
            tracing::debug!(destination = %d.name, settled, "settled deliveries made by another instance");
        }
    }
    let mut held = config.clone();
    held.destinations.retain(|d| node.holds(&destination_lease(&d.name)));
    if let Ok(mut s) = daemon.served.lock() {
        *s = held.destinations.iter().map(|d| d.name.clone()).collect();
    }
    let reports = deliver_due_until(&held, &daemon.store, &SystemClock, seed, &daemon.stop)?;
    for d in &held.destinations {
        // Never lowered: a replica that is behind must not make the next holder send again
        // what was already delivered.
        let before = marks.get(&d.name).copied().unwrap_or(0);
        let now = daemon.store.settled_below(&d.name)?;
        if now > before {
            node.set_watermark(&d.name, now)?;
        }
    }
    Ok(reports)
}

/// `deliveries retry` / `deliveries replay` in cluster mode: run by the holder of the
/// destination, which queues and lets its delivery loop send; elsewhere an error naming the
/// holder.
pub(super) fn requeue(daemon: &Daemon, request: &app::Request) -> app::Output {
    let Some(node) = &daemon.node else { return app::Output::unusable("not in cluster mode") };
    let config = daemon.config();
    let (destination, since) = match request {
        app::Request::ReplayDeliveries { destination, since } => (Some(destination.clone()), Some(since.clone())),
        app::Request::RetryDeliveries { destination } => (destination.clone(), None),
        _ => return app::Output::unusable("not a delivery request"),
    };
    let held = node.held_destinations(&config);
    let targets: Vec<String> = match &destination {
        Some(name) => vec![name.clone()],
        None => held.clone(),
    };
    let mut out = app::Output::default();
    for name in targets {
        if !held.contains(&name) {
            let holder = node
                .leases()
                .ok()
                .and_then(|all| all.into_iter().find(|(k, _)| *k == destination_lease(&name)))
                .filter(|(_, l)| l.is_live(crate::cluster::now_ms()))
                .map(|(_, l)| l.holder)
                .unwrap_or_else(|| "no instance (yet)".into());
            return app::Output::unusable(format!(
                "destination {name:?} is served by {holder}, not by this instance ({}): run the command there",
                node.id
            ));
        }
        let result = match &since {
            Some(since) => app::deliveries::queue_history(&config, &daemon.store, &name, since.as_deref()),
            None => daemon.store.requeue_dead(Some(&name), SystemClock.now_ms()).map_err(|e| format!("{e:#}")),
        };
        match result {
            Ok(n) if since.is_some() => out.out_line(format!(
                "queued {n} stored event{} for destination {name} (instance {} sends them)",
                if n == 1 { "" } else { "s" },
                node.id
            )),
            Ok(n) => out.out_line(format!(
                "re-queued {n} dead deliver{} of destination {name}",
                if n == 1 { "y" } else { "ies" }
            )),
            Err(e) => return app::Output::unusable(e),
        }
    }
    out
}
