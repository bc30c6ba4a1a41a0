//! Every project of a run: up to `parallelism` at once, results in config order, each
//! project's status recorded; a damaged store stops the run before anything more is written.

use super::{Options, Summary, reconcile_project};
use crate::clock::Clock;
use crate::config::{Config, Project};
use crate::gitlab::attribution::Attributor;
use crate::store::{Store, StoreError};
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// One project's reconcile, named.
pub type Outcome = (String, Result<Summary>);

/// Runs the reconcile of every project, up to `config.parallelism` at once, and returns the
/// results in config order; a failure is recorded for that project and the others go on. One
/// reconcile at a time per store; the store is flushed before this returns. On shutdown, the
/// projects not started yet are left for the next run.
pub fn reconcile_all(
    config: &Config,
    store: &Store,
    projects: &[&Project],
    options: &Options,
    clock: &dyn Clock,
) -> Vec<(String, Result<Summary>)> {
    let _run = store.lock_reconcile();
    // Projects are independent: run up to `parallelism` at once (fetches mostly wait on I/O),
    // and report in config order.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let damaged = AtomicBool::new(false);
    let attributor = Attributor::new(config, store, clock.now());
    let slots: Vec<std::sync::Mutex<Option<Outcome>>> = projects.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let workers = config.parallelism.clamp(1, projects.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(p) = projects.get(i) else { break };
                    if options.stopped() || damaged.load(Ordering::SeqCst) {
                        break;
                    }
                    let done = reconcile_one(config, store, p, options, &attributor, clock);
                    if done.1.as_ref().is_err_and(StoreError::is_damaged) {
                        // Nothing more is written to a damaged store.
                        damaged.store(true, Ordering::SeqCst);
                    }
                    if let Ok(mut slot) = slots[i].lock() {
                        *slot = Some(done);
                    }
                }
            });
        }
    });
    if !damaged.load(Ordering::SeqCst)
        && let Err(e) = store.flush()
    {
        tracing::error!(error = %format!("{e:#}"), "cannot flush the state database");
    }
    slots.into_iter().filter_map(|s| s.into_inner().ok().flatten()).collect()
}

fn reconcile_one(
    config: &Config,
    store: &Store,
    p: &Project,
    options: &Options,
    attributor: &Attributor,
    clock: &dyn Clock,
) -> (String, Result<Summary>) {
    {
        {
            let result = reconcile_project(config, store, p, options, attributor, clock.now())
                .with_context(|| format!("project {}", p.path));
            if result.as_ref().is_err_and(StoreError::is_damaged) {
                return (p.path.clone(), result); // nothing is written to a damaged store
            }
            let mut status = match store.project_status(&p.path) {
                Ok(status) => status,
                Err(e) => {
                    tracing::error!(project = %p.path, error = %format!("{e:#}"), "cannot read project status");
                    return (p.path.clone(), result.and(Err(e)));
                }
            };
            let at = crate::event::rfc3339_millis(clock.now());
            status.last_run_at = Some(at.clone());
            match &result {
                Ok(_) => {
                    status.last_success_at = Some(at);
                    status.last_error = None;
                }
                Err(e) => {
                    status.last_error = Some(format!("{e:#}"));
                    status.last_error_at = Some(at);
                }
            }
            if let Err(e) = store.set_project_status(&p.path, &status) {
                tracing::warn!(project = %p.path, error = %format!("{e:#}"), "cannot record project status");
            }
            (p.path.clone(), result)
        }
    }
}
