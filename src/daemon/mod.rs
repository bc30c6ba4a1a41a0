//! `policy-audit run`: the daemon. Reconciles on the cron schedule, delivers continuously by due
//! time, serves the control socket, reloads on SIGHUP, drains and exits on SIGTERM/SIGINT.
//!
//! Invariants:
//! - one reconcile at a time: a single worker runs them; schedule ticks that arrive while one
//!   runs are coalesced into one (a capacity-1 channel), forced reconciles queue with their reply;
//! - one delivery round at a time per store (the store's lock), so the continuous delivery loop,
//!   forced reconciles and `deliveries retry` never send an event twice or out of order;
//! - webhook reconciles (`[server]`, `/hooks/gitlab`) go through the same worker: the webhook
//!   queue holds each project at most once, and one wake-up takes everything queued;
//! - shutdown never interrupts a store transaction: work stops between projects and between
//!   deliveries, and what was not stored is repeated by the next run.

use crate::app::{self, EXIT_OK, Output, ReconcileRequest};
use crate::cluster::Node;
use crate::config::Config;
use crate::control;
use crate::stop::Stop;
use crate::store::Store;
use crate::stream::{Clock, SystemClock, deliver_due_until};
use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

mod cluster;
mod requests;

use requests::control_server;

/// How long the delivery loop sleeps when nothing is due.
const IDLE_DELIVERY_CHECK: Duration = Duration::from_secs(30);

struct Daemon {
    config_path: PathBuf,
    /// As read from the file.
    file_config: RwLock<Arc<Config>>,
    /// What everything runs on: the file's config with the discovered SPPs merged in.
    config: RwLock<Arc<Config>>,
    store: Store,
    /// Cancelled once, on SIGTERM/SIGINT: synchronous work polls it, tasks await it.
    stop: Stop,
    wake_delivery: Notify,
    /// Cluster mode: this instance's leases, cursors and the trail it replicates.
    node: Option<Arc<Node>>,
    /// Lease keys of the projects being reconciled right now (not released mid-run).
    busy: std::sync::Mutex<Vec<String>>,
    /// Destinations this instance served in its last delivery round (cluster mode).
    served: std::sync::Mutex<Vec<String>>,
    activity: crate::server::Activity,
    hooks: crate::server::HookQueue,
}

impl crate::server::Source for Daemon {
    fn config(&self) -> Arc<Config> {
        Daemon::config(self)
    }
    fn store(&self) -> &Store {
        &self.store
    }
    fn activity(&self) -> Option<&crate::server::Activity> {
        Some(&self.activity)
    }
    fn hooks(&self) -> Option<&crate::server::HookQueue> {
        Some(&self.hooks)
    }
}

type Forced = (ReconcileRequest, oneshot::Sender<Output>);

impl Daemon {
    fn config(&self) -> Arc<Config> {
        self.config.read().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    fn file_config(&self) -> Arc<Config> {
        self.file_config.read().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Runs a discovery when one is due and puts the merged config in place (blocking).
    fn discover(&self) -> crate::discovery::Outcome {
        let file = self.file_config();
        if file.gitlab.as_ref().is_none_or(|g| g.discover.is_empty()) {
            return crate::discovery::Outcome::default();
        }
        let outcome = crate::discovery::refresh(&file, &self.store, false, &self.stop);
        if outcome.ran {
            self.use_config(&file);
        }
        outcome
    }

    /// `file` with the stored discovered list merged in becomes the running config.
    fn use_config(&self, file: &Config) {
        let merged = Arc::new(crate::discovery::effective(file, &self.store));
        if let Ok(mut c) = self.config.write() {
            *c = merged;
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Returns the exit code's output.
pub fn run(config_path: &Path, config: Config) -> Output {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return Output::unusable(format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(serve(config_path, config)) {
        Ok(code) => Output { code, ..Output::default() },
        Err(e) => Output::unusable(format!("{e:#}")),
    }
}

async fn serve(config_path: &Path, config: Config) -> Result<u8> {
    // First of all: SIGHUP's default action is to terminate, and a reload may come as soon as
    // the socket (our readiness) exists.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    crate::store::create_private_dir(&config.state_dir)?;
    let store = match Store::open(&config.db_dir()) {
        Ok(s) => s,
        Err(e) => {
            let pid = std::fs::read_to_string(control::pid_path(&config)).unwrap_or_default();
            let socket = control::socket_path(&config);
            anyhow::bail!(
                "another policy-audit daemon is running on {} (pid {}, control socket {}): {e:#}",
                config.state_dir.display(),
                pid.trim(),
                socket.display()
            );
        }
    };
    std::fs::write(control::pid_path(&config), format!("{}\n", std::process::id())).context("cannot write pid file")?;
    let socket_path = control::socket_path(&config);
    let _ = std::fs::remove_file(&socket_path); // stale: we hold the store, so no daemon owns it
    let listener = tokio::net::UnixListener::bind(&socket_path)
        .with_context(|| format!("cannot listen on {}", socket_path.display()))?;
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))?;

    let node = match config.cluster {
        Some(_) => {
            let cfg = config.clone();
            let node = tokio::task::spawn_blocking(move || Node::start(&cfg)).await??;
            tracing::info!(instance = %node.id, cluster = %node.settings.name, "joined the cluster");
            Some(Arc::new(node))
        }
        None => None,
    };
    let http_listener = match &config.server {
        Some(server) => Some(crate::server::bind(server).await?),
        None => None,
    };
    let (hooks, hook_rx) = crate::server::HookQueue::new();
    // The last discovered list is used from the start, whether GitLab answers or not.
    let merged = crate::discovery::effective(&config, &store);
    let daemon = Arc::new(Daemon {
        config_path: config_path.to_path_buf(),
        file_config: RwLock::new(Arc::new(config)),
        config: RwLock::new(Arc::new(merged)),
        store,
        stop: Stop::new(),
        wake_delivery: Notify::new(),
        node,
        busy: std::sync::Mutex::new(Vec::new()),
        served: std::sync::Mutex::new(Vec::new()),
        activity: crate::server::Activity::default(),
        hooks,
    });
    let (tick_tx, tick_rx) = mpsc::channel::<()>(1);
    let (forced_tx, forced_rx) = mpsc::channel::<Forced>(64);
    let mut scheduler = Scheduler::start(&daemon.config(), tick_tx.clone()).await?;
    let worker = tokio::spawn(worker(daemon.clone(), tick_rx, forced_rx, hook_rx));
    let http = http_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(listen = %addr, "serving the audit events page and API");
        }
        tokio::spawn(crate::server::serve(daemon.clone(), listener, daemon.stop.clone()))
    });
    let deliveries = tokio::spawn(delivery_loop(daemon.clone()));
    let server = tokio::spawn(control_server(daemon.clone(), listener, forced_tx));
    let cluster_tasks = daemon.node.is_some().then(|| {
        (tokio::spawn(cluster::lease_loop(daemon.clone())), tokio::spawn(cluster::replica_loop(daemon.clone())))
    });
    let _ = tick_tx.try_send(()); // catch up at start

    let cfg = daemon.config();
    tracing::info!(
        projects = cfg.projects.len(),
        destinations = cfg.destinations.len(),
        schedule = %cfg.schedule,
        socket = %socket_path.display(),
        "policy-audit daemon started"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Some(new_schedule) = reload(&daemon) {
                    scheduler.stop().await;
                    match Scheduler::start(&new_schedule, tick_tx.clone()).await {
                        Ok(s) => scheduler = s,
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot restart the scheduler after reload"),
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    tracing::info!("shutting down: finishing the current work");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    daemon.stop.cancel();
    scheduler.stop().await;
    server.abort();
    let _ = std::fs::remove_file(&socket_path);
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        let _ = worker.await;
        let _ = deliveries.await;
        if let Some(http) = http {
            let _ = http.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "work did not finish within 20 s; exiting anyway (nothing half-written: stores are transactional)"
        );
    }
    if let Some((leases, replica)) = cluster_tasks {
        leases.abort();
        replica.abort();
    }
    if let Some(node) = daemon.node.clone() {
        // Handing the leases back lets the others go on at once instead of after the TTL.
        let _ = tokio::task::spawn_blocking(move || node.release_all()).await;
    }
    daemon.store.flush()?;
    let _ = std::fs::remove_file(control::pid_path(&daemon.config()));
    tracing::info!("stopped");
    Ok(EXIT_OK)
}

/// Re-reads the config; keeps the old one when the new one is invalid. Returns the new config
/// when the schedule must be restarted.
fn reload(daemon: &Daemon) -> Option<Config> {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
    let result = Config::load(&daemon.config_path);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let new = match result {
        Ok(c) => c,
        Err(e) => {
            for line in &e.errors {
                tracing::error!(error = %line, "config reload rejected; still running on the previous config");
            }
            return None;
        }
    };
    let old = daemon.config();
    if new.state_dir != old.state_dir {
        tracing::error!("config reload rejected: state_dir cannot change while running (restart instead)");
        return None;
    }
    for w in &new.warnings {
        tracing::warn!("{w}");
    }
    let restart = (new.schedule != old.schedule || new.timezone != old.timezone).then(|| new.clone());
    tracing::info!(projects = new.projects.len(), destinations = new.destinations.len(), "config reloaded");
    daemon.use_config(&new);
    if let Ok(mut c) = daemon.file_config.write() {
        *c = Arc::new(new);
    }
    daemon.wake_delivery.notify_one();
    restart
}

struct Scheduler {
    inner: tokio_cron_scheduler::JobScheduler,
}

impl Scheduler {
    async fn start(config: &Config, ticks: mpsc::Sender<()>) -> Result<Scheduler> {
        let inner = tokio_cron_scheduler::JobScheduler::new().await.context("cannot create the scheduler")?;
        let job = tokio_cron_scheduler::Job::new_async_tz(config.schedule.as_str(), config.timezone, move |_, _| {
            let ticks = ticks.clone();
            Box::pin(async move {
                // Full means a reconcile is already waiting: this tick is coalesced into it.
                let _ = ticks.try_send(());
            })
        })
        .with_context(|| format!("cannot schedule {:?}", config.schedule))?;
        inner.add(job).await.context("cannot add the schedule")?;
        inner.start().await.context("cannot start the scheduler")?;
        Ok(Scheduler { inner })
    }

    async fn stop(&mut self) {
        let _ = self.inner.shutdown().await;
    }
}

/// Runs reconciles one at a time: scheduled ones (coalesced) and forced ones (with a reply).
async fn worker(
    daemon: Arc<Daemon>,
    mut ticks: mpsc::Receiver<()>,
    mut forced: mpsc::Receiver<Forced>,
    mut hooked: mpsc::Receiver<()>,
) {
    loop {
        let (args, reply, trigger) = tokio::select! {
            biased;
            _ = daemon.stop.cancelled() => return,
            Some((args, reply)) = forced.recv() => (args, Some(reply), "forced"),
            Some(()) = ticks.recv() => (ReconcileRequest::default(), None, "schedule"),
            Some(()) = hooked.recv() => (ReconcileRequest::default(), None, "webhook"),
            else => return,
        };
        let args = if trigger == "webhook" {
            // A burst of pushes becomes one reconcile.
            tokio::time::sleep(crate::server::hooks::SETTLE).await;
            let projects = daemon.hooks.take();
            if projects.is_empty() {
                continue;
            }
            ReconcileRequest { projects, ..args }
        } else {
            args
        };
        if daemon.stop.is_cancelled() {
            if let Some(reply) = reply {
                let _ = reply
                    .send(Output::unusable("the daemon is shutting down; run the command again after it restarts"));
            }
            return;
        }
        let d = daemon.clone();
        let output = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let discovered = if d.node.is_none() { d.discover() } else { Default::default() };
            let config = d.config();
            let report = match &d.node {
                None => app::reconcile::reconcile(&config, &d.store, &args, &d.stop),
                Some(node) => cluster::reconcile_leased(&d, node, &config, args.clone()),
            };
            log_reconcile(&report, started.elapsed(), trigger);
            let outcomes: Vec<(String, bool)> = report.projects.iter().map(|(p, r)| (p.clone(), r.is_ok())).collect();
            d.activity.record(trigger, started.elapsed(), &outcomes);
            let mut out = app::reconcile::discovery_warning(&discovered);
            out.append(app::reconcile::render(&config, &args, report));
            // Logged after every reconcile so that removing the newest events, or rewriting the
            // chain, is visible from outside the state directory.
            match d.store.chain_head() {
                Ok(head) => tracing::info!(events = head.events, chain_head = %head.head, "trail"),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot read the chain head"),
            }
            out
        })
        .await
        .unwrap_or_else(|e| Output::unusable(format!("reconcile panicked: {e}")));
        daemon.wake_delivery.notify_one();
        if let Some(reply) = reply {
            let _ = reply.send(output);
        }
        if daemon.stop.is_cancelled() {
            return;
        }
    }
}

/// One structured line per project (and per delivery round that did something).
fn log_reconcile(report: &app::reconcile::Report, took: Duration, trigger: &str) {
    let took_ms = took.as_millis() as u64;
    for (project, result) in &report.projects {
        match result {
            Ok(s) => tracing::info!(
                trigger,
                took_ms,
                project = %s.project,
                commits = s.commits,
                steps = s.steps,
                stored = s.stored,
                from = s.from.as_deref().unwrap_or(""),
                to = %s.to,
                first_sync = s.first_sync.as_deref().unwrap_or(""),
                history_rewritten = s.history_rewritten,
                duration_ms = s.duration_ms,
                "reconciled"
            ),
            Err(e) => tracing::error!(trigger, project = %project, error = %format!("{e:#}"), "reconcile failed"),
        }
    }
    for r in report.deliveries.iter().filter(|r| r.delivered + r.retried + r.dead > 0) {
        tracing::info!(
            destination = %r.destination,
            delivered = r.delivered,
            retried = r.retried,
            dead = r.dead,
            pending = r.pending,
            "delivery round"
        );
    }
}

/// Delivers whenever something is due: sleeps until the earliest retry, or until woken by a
/// reconcile or a reload.
async fn delivery_loop(daemon: Arc<Daemon>) {
    let mut seed = SystemClock.now_ms() as u64;
    while !daemon.stop.is_cancelled() {
        let d = daemon.clone();
        seed = seed.wrapping_add(1);
        let reports = tokio::task::spawn_blocking(move || {
            let config = d.config();
            match &d.node {
                None => deliver_due_until(&config, &d.store, &SystemClock, seed, &d.stop),
                Some(node) => cluster::deliver_leased(&d, node, &config, seed),
            }
        })
        .await;
        let wait = match reports {
            Ok(Ok(reports)) => {
                for r in reports.iter().filter(|r| r.delivered + r.retried + r.dead > 0) {
                    tracing::info!(
                        destination = %r.destination,
                        delivered = r.delivered,
                        retried = r.retried,
                        dead = r.dead,
                        pending = r.pending,
                        last_error = r.last_error.as_deref().unwrap_or(""),
                        "delivery round"
                    );
                }
                let now = SystemClock.now_ms();
                reports
                    .iter()
                    .filter_map(|r| r.next_attempt_at)
                    .min()
                    .map(|due| Duration::from_millis(due.saturating_sub(now).max(0) as u64))
                    .unwrap_or(IDLE_DELIVERY_CHECK)
                    .min(IDLE_DELIVERY_CHECK)
                    // A destination lease may come to us at any lease round.
                    .min(daemon.node.as_ref().map_or(IDLE_DELIVERY_CHECK, |n| n.settings.lease_ttl / 3))
            }
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "delivery round failed");
                Duration::from_secs(5)
            }
            Err(e) => {
                tracing::error!(error = %e, "delivery round panicked");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = daemon.wake_delivery.notified() => {}
            _ = daemon.stop.cancelled() => return,
        }
    }
}
