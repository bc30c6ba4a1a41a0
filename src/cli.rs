//! The command line (SPEC §5): clap definitions and one small function per command. Every
//! command returns an [`Output`] instead of printing, so the same code answers in-process and
//! through the daemon's control socket.

use crate::config::Config;
use crate::store::Store;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

mod deliveries;
mod events;
mod reconcile;
mod status;
mod verify;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_UNUSABLE: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "policy-audit", version, about = "Audit trail for GitLab security policies kept as code")]
pub struct Cli {
    /// Config file [default: $POLICY_AUDIT_CONFIG, else ./config.toml]
    #[arg(long, global = true, env = "POLICY_AUDIT_CONFIG", default_value = "config.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Subcommand, Serialize, Deserialize)]
pub enum Command {
    /// Reconcile now and deliver what is due
    Reconcile(ReconcileArgs),
    /// List stored events, oldest first
    Events(EventsArgs),
    /// Show per project and per destination state
    Status(StatusArgs),
    /// List pending or dead deliveries; `deliveries retry` re-queues dead ones
    Deliveries(DeliveriesArgs),
    /// Recompute the tamper-evident chain over the stored events (exit 1 on a break)
    Verify(VerifyArgs),
    /// Validate the config (and that secrets resolve) without touching state
    CheckConfig,
    /// Self-contained walkthrough on a sample policy project in a temporary folder
    Demo,
    /// Daemon: reconcile on the schedule, deliver continuously, serve the control socket
    Run,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
pub struct ReconcileArgs {
    /// Only these projects (SPP paths); repeatable
    #[arg(long = "project", value_name = "PATH")]
    pub projects: Vec<String>,
    /// Replay the whole first-parent history (already stored events are not stored twice)
    #[arg(long)]
    pub backfill: bool,
    /// Store events but do not deliver them now
    #[arg(long)]
    pub no_deliver: bool,
    /// Print the summary as JSON
    #[arg(long)]
    pub json: bool,
    /// Print time spent per phase (fetch, walk, parse, diff, store)
    #[arg(long)]
    pub timings: bool,
    /// Start a new trail (a baseline) for projects whose state was lost although their mirror
    /// shows an earlier trail; the changes in between are not reported
    #[arg(long)]
    #[serde(default)]
    pub rebaseline: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Format {
    #[default]
    Table,
    Json,
    Jsonl,
    Csv,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
pub struct EventsArgs {
    /// Only events of these projects (SPP paths); repeatable
    #[arg(long = "project", value_name = "PATH")]
    pub projects: Vec<String>,
    /// Only these event types (e.g. security_policy_update, or just update); repeatable
    #[arg(long = "type", value_name = "T")]
    pub types: Vec<String>,
    /// Only events about this policy name
    #[arg(long)]
    pub policy: Option<String>,
    /// Only events whose author name or email contains TEXT (case-insensitive)
    #[arg(long, value_name = "TEXT")]
    pub author: Option<String>,
    /// Only events at or after T (RFC 3339 or YYYY-MM-DD)
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Only events at or before T (RFC 3339 or YYYY-MM-DD, inclusive of that day)
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// Only the N most recent matching events
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
pub struct DeliveriesArgs {
    #[command(subcommand)]
    pub action: Option<DeliveriesAction>,
    /// Only this destination
    #[arg(long, global = true, value_name = "NAME")]
    pub destination: Option<String>,
    /// Only pending or only dead deliveries [default: both]
    #[arg(long, value_enum)]
    pub state: Option<DeliveryState>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand, Serialize, Deserialize)]
pub enum DeliveriesAction {
    /// Put dead deliveries back in the queue (attempts reset) and deliver what is due
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum DeliveryState {
    Pending,
    Dead,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
pub struct VerifyArgs {
    #[arg(long)]
    pub json: bool,
    /// The chain head recorded earlier (from `verify` or `status`): fail unless the trail still
    /// ends there or continues from it
    #[arg(long, value_name = "HEX")]
    #[serde(default)]
    pub expect_head: Option<String>,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
}

/// What a command prints and how it exits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub code: u8,
}

impl Output {
    // Names, reasons and remote messages are data, not terminal commands: every line shown to
    // a person has its control characters escaped (line breaks of a multi-line report stay).
    pub fn unusable(message: impl std::fmt::Display) -> Output {
        let message = crate::text::escape_controls_keeping_lines(&message.to_string()).into_owned();
        Output { stderr: format!("error: {message}\n"), code: EXIT_UNUSABLE, ..Output::default() }
    }

    pub fn err_line(&mut self, line: impl std::fmt::Display) {
        let _ = writeln!(self.stderr, "{}", crate::text::escape_controls_keeping_lines(&line.to_string()));
    }

    pub fn out_line(&mut self, line: impl std::fmt::Display) {
        let _ = writeln!(self.stdout, "{}", crate::text::escape_controls_keeping_lines(&line.to_string()));
    }
}

pub fn parse_args() -> Cli {
    Cli::parse()
}

pub fn run(cli: Cli) -> Output {
    match &cli.command {
        Command::Demo => {
            crate::logging::init(None);
            crate::demo::run()
        }
        Command::CheckConfig => {
            crate::logging::init(None);
            check_config(&cli)
        }
        Command::Run => {
            let config = match load_config(&cli) {
                Ok(c) => c,
                Err(out) => return out,
            };
            crate::logging::init(Some(config.log_level.as_deref().unwrap_or("info")));
            for w in &config.warnings {
                tracing::warn!("{w}");
            }
            crate::daemon::run(&cli.config, config)
        }
        command => {
            // A running daemon holds the store and the secrets: ask it. Same command code,
            // same output.
            let client = match Config::load_without_secrets(&cli.config) {
                Ok(c) => c,
                Err(e) => return config_errors(&e),
            };
            match crate::daemon::control::try_daemon(&client, command) {
                Some(Ok(answer)) => return answer,
                Some(Err(e)) => {
                    return Output { stderr: format!("error: {e:#}\n"), code: EXIT_UNUSABLE, ..Output::default() };
                }
                None => {}
            }
            let config = match load_config(&cli) {
                Ok(c) => c,
                Err(out) => return out,
            };
            crate::logging::init(config.log_level.as_deref());
            let mut out = Output::default();
            for w in &config.warnings {
                out.err_line(format!("warning: {w}"));
            }
            let result = match Store::open_waiting(&config.db_dir(), std::time::Duration::from_secs(3)) {
                Ok(store) => execute(&config, &store, command, None),
                Err(e) => Output::unusable(format!("{e:#}")),
            };
            out.stdout.push_str(&result.stdout);
            out.stderr.push_str(&result.stderr);
            out.code = result.code;
            out
        }
    }
}

/// Runs a command that needs the store.
/// `stop` is the daemon's shutdown flag (None in-process).
pub fn execute(config: &Config, store: &Store, command: &Command, stop: Option<Arc<AtomicBool>>) -> Output {
    match command {
        Command::Reconcile(args) => reconcile::run(config, store, args, stop),
        Command::Events(args) => events::run(store, args),
        Command::Status(args) => status::run(config, store, args),
        Command::Deliveries(args) => deliveries::run(config, store, args),
        Command::Verify(args) => verify::run(store, args),
        Command::Run | Command::CheckConfig | Command::Demo => {
            Output::unusable("internal: command does not use the store")
        }
    }
}

/// Deliveries queued for destinations the config being checked no longer has: asked of the
/// running daemon, or read from a store of our own; check-config never creates state.
fn orphaned_deliveries(config: &Config) -> Vec<String> {
    let mut counts: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let list = Command::Deliveries(DeliveriesArgs { json: true, ..DeliveriesArgs::default() });
    match crate::daemon::control::try_daemon(config, &list) {
        Some(Ok(answer)) => {
            let items: Vec<serde_json::Value> = serde_json::from_str(&answer.stdout).unwrap_or_default();
            for item in items {
                let name = item["destination"].as_str().unwrap_or_default().to_string();
                let entry = counts.entry(name).or_default();
                if item["state"] == "dead" { entry.1 += 1 } else { entry.0 += 1 }
            }
        }
        Some(Err(_)) => return Vec::new(),
        None => {
            // No daemon: read the store ourselves, but only one that is ours, so that an admin's
            // check never leaves files owned by another user in a service's state directory.
            use std::os::unix::fs::MetadataExt;
            let db = config.db_dir();
            // SAFETY: geteuid has no preconditions.
            let mine = std::fs::metadata(&db).is_ok_and(|m| m.uid() == unsafe { libc::geteuid() });
            if !mine || !db.join("conf").exists() {
                return Vec::new();
            }
            let Ok(store) = Store::open(&db) else { return Vec::new() };
            for d in store.pending(None).unwrap_or_default() {
                counts.entry(d.destination).or_default().0 += 1;
            }
            for d in store.dead(None).unwrap_or_default() {
                counts.entry(d.destination).or_default().1 += 1;
            }
        }
    }
    counts
        .into_iter()
        .filter(|(name, _)| !config.destinations.iter().any(|d| &d.name == name))
        .map(|(name, (pending, dead))| {
            format!("destination {name:?} is no longer configured but has {pending} pending and {dead} dead deliveries in the state; they are kept, not delivered")
        })
        .collect()
}

fn load_config(cli: &Cli) -> Result<Config, Output> {
    Config::load(&cli.config).map_err(|e| config_errors(&e))
}

/// One `error:` line per problem, exit 2.
fn config_errors(e: &crate::config::ConfigError) -> Output {
    let mut out = Output { code: EXIT_UNUSABLE, ..Output::default() };
    for line in &e.errors {
        out.err_line(format!("error: {line}"));
    }
    out
}

fn check_config(cli: &Cli) -> Output {
    let config = match load_config(cli) {
        Ok(c) => c,
        Err(out) => return out,
    };
    let mut out = Output::default();
    for w in &config.warnings {
        out.err_line(format!("warning: {w}"));
    }
    for w in orphaned_deliveries(&config) {
        out.err_line(format!("warning: {w}"));
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
    out
}

/// The one-line summary `reconcile` prints for a project.
pub fn describe_summary(summary: &crate::reconcile::Summary) -> String {
    reconcile::describe(summary)
}

/// Delivers what is due, as `reconcile` does after storing.
pub fn deliver_now(config: &Config, store: &Store, out: &mut Output) -> Vec<crate::stream::DestinationReport> {
    deliveries::deliver_now(config, store, out)
}

/// Events rendered as `events --format` does.
pub fn render_events(events: &[crate::event::AuditEvent], format: Format) -> String {
    events::render(events, format)
}
