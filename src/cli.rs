//! The command line (SPEC §5), clap only: what the user typed becomes an [`app::Request`], run
//! through the daemon's control socket when a daemon holds the store, in-process otherwise.
//! `run` (the daemon), `check-config` and `demo` are started from here.

use crate::app::{self, EXIT_UNUSABLE, Output, Request};
use crate::config::Config;
use crate::store::Store;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

mod check;
mod manual;

use check::check_config;

/// `--version`: the crate version and the git commit it was built from (see build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("POLICY_AUDIT_GIT_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(name = "policy-audit", version = VERSION, about = "Audit trail for GitLab security policies kept as code")]
pub struct Cli {
    /// Config file [default: $POLICY_AUDIT_CONFIG, else ./config.toml]
    #[arg(long, global = true, env = "POLICY_AUDIT_CONFIG", default_value = "config.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Reconcile now and deliver what is due
    Reconcile(ReconcileArgs),
    /// List stored events, oldest first
    Events(EventsArgs),
    /// Show per project and per destination state
    Status(StatusArgs),
    /// List pending or dead deliveries; `deliveries retry` re-queues dead ones, `deliveries replay` queues history
    Deliveries(DeliveriesArgs),
    /// Recompute the tamper-evident chain over the stored events (exit 1 on a break)
    Verify(VerifyArgs),
    /// Validate the config (and that secrets resolve) without touching state
    CheckConfig,
    /// Show which SPPs GitLab reports and where they are linked ([gitlab] discover), changing nothing
    Discover(StatusArgs),
    /// Self-contained walkthrough on a sample policy project in a temporary folder
    Demo(DemoArgs),
    /// Daemon: reconcile on the schedule, deliver continuously, serve the control socket
    Run,
    /// The web page and read API (SPEC §8) on the store, without polling (when no daemon runs).
    Serve,
    /// Move this (stopped) single instance's trail, cursors and delivery progress into a new
    /// cluster (the config's [cluster]); see docs/cluster.md
    ClusterImport,
    /// Print the completion script for a shell (bash, zsh or fish)
    Completions(CompletionsArgs),
    /// Print the man page (roff), generated from these definitions; the package installs it
    #[command(hide = true)]
    Man,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Clone, Default, Args)]
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
    /// Print time spent per phase (fetch, walk, parse, diff, store) and the peak memory
    #[arg(long)]
    pub timings: bool,
    /// Start a new trail (a baseline) for projects whose state was lost although their mirror
    /// shows an earlier trail; the changes in between are not reported
    #[arg(long)]
    pub rebaseline: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Jsonl,
    Csv,
}

#[derive(Debug, Clone, Default, Args)]
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

#[derive(Debug, Clone, Default, Args)]
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

#[derive(Debug, Clone, Subcommand)]
pub enum DeliveriesAction {
    /// Put dead deliveries back in the queue (attempts reset) and deliver what is due
    Retry,
    /// Queue stored events for --destination that it has not had (one added later), in trail
    /// order, and deliver what is due
    Replay {
        /// Only events created at or after this time (RFC 3339 or YYYY-MM-DD)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeliveryState {
    Pending,
    Dead,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Keep the demo's trail open in the web page and API until Ctrl-C; prints a login URL.
    #[arg(long)]
    pub serve: bool,
    /// Where `--serve` listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080", requires = "serve")]
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Clone, Default, Args)]
pub struct VerifyArgs {
    #[arg(long)]
    pub json: bool,
    /// The chain head recorded earlier (from `verify` or `status`): fail unless the trail still
    /// ends there or continues from it
    #[arg(long, value_name = "HEX")]
    pub expect_head: Option<String>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
}

pub fn parse_args() -> Cli {
    Cli::parse()
}

/// Runs the command the user typed. Listings go to `stdout` as they are produced; the rest of
/// what the command prints comes back in the [`Output`].
pub fn run(cli: Cli, stdout: &mut dyn std::io::Write) -> Output {
    match &cli.command {
        Command::Completions(args) => manual::completions(args.shell),
        Command::Man => manual::man_page(),
        Command::Demo(args) if args.serve => {
            crate::logging::init(None);
            crate::demo::run_and_serve(args.listen, stdout)
        }
        Command::Demo(_) => {
            crate::logging::init(None);
            crate::demo::run()
        }
        Command::Serve => {
            let config = match load_config(&cli) {
                Ok(c) => c,
                Err(out) => return out,
            };
            crate::logging::init(Some(config.log_level.as_deref().unwrap_or("info")));
            crate::server::run_standalone(config)
        }
        Command::CheckConfig => {
            crate::logging::init(None);
            check_config(&cli)
        }
        Command::Discover(args) => {
            let config = match load_config(&cli) {
                Ok(c) => c,
                Err(out) => return out,
            };
            crate::logging::init(config.log_level.as_deref());
            app::discover::run(&config, args.json)
        }
        Command::ClusterImport => {
            let config = match load_config(&cli) {
                Ok(c) => c,
                Err(out) => return out,
            };
            crate::logging::init(config.log_level.as_deref());
            cluster_import(&config)
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
            let Some(request) = request_of(command) else {
                return Output::unusable("internal: this command is not a request");
            };
            match crate::control::try_daemon(&client, &request, stdout) {
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
                Ok(store) => app::execute(&config, &store, &request, &crate::stop::Stop::new(), stdout),
                Err(e) => Output::unusable(format!("{e:#}")),
            };
            out.stdout.push_str(&result.stdout);
            out.stderr.push_str(&result.stderr);
            out.code = result.code;
            out
        }
    }
}

/// `cluster-import`: needs the store to itself (the single instance stopped) and a `[cluster]`.
fn cluster_import(config: &Config) -> Output {
    if config.cluster.is_none() {
        return Output::unusable(format!(
            "{} has no [cluster] section: add it (see docs/cluster.md), then import",
            config.source.display()
        ));
    }
    let store = match Store::open(&config.db_dir()) {
        Ok(s) => s,
        Err(e) => return Output::unusable(format!("{e:#} (stop the daemon before importing)")),
    };
    match crate::cluster::import(config, &store) {
        Ok(done) => {
            let mut out = Output::default();
            out.out_line(format!(
                "imported {} event(s) into the cluster's trail and {} project cursor(s)",
                done.events, done.cursors
            ));
            for (name, mark) in done.watermarks {
                out.out_line(format!("destination {name}: the first {mark} event(s) count as delivered"));
            }
            out
        }
        Err(e) => Output::unusable(format!("{e:#}")),
    }
}

/// The request a command stands for (None for the commands started here).
fn request_of(command: &Command) -> Option<Request> {
    Some(match command {
        Command::Reconcile(a) => Request::Reconcile(app::ReconcileRequest {
            projects: a.projects.clone(),
            backfill: a.backfill,
            no_deliver: a.no_deliver,
            json: a.json,
            timings: a.timings,
            rebaseline: a.rebaseline,
        }),
        Command::Events(a) => Request::Events(app::EventsRequest {
            projects: a.projects.clone(),
            types: a.types.clone(),
            policy: a.policy.clone(),
            author: a.author.clone(),
            since: a.since.clone(),
            until: a.until.clone(),
            limit: a.limit,
            format: match a.format {
                Format::Table => app::Format::Table,
                Format::Json => app::Format::Json,
                Format::Jsonl => app::Format::Jsonl,
                Format::Csv => app::Format::Csv,
            },
        }),
        Command::Status(a) => Request::Status { json: a.json },
        Command::Deliveries(DeliveriesArgs { action: Some(DeliveriesAction::Retry), destination, .. }) => {
            Request::RetryDeliveries { destination: destination.clone() }
        }
        Command::Deliveries(DeliveriesArgs {
            action: Some(DeliveriesAction::Replay { since }), destination, ..
        }) => Request::ReplayDeliveries { destination: destination.clone().unwrap_or_default(), since: since.clone() },
        Command::Deliveries(a) => Request::Deliveries(app::DeliveriesRequest {
            destination: a.destination.clone(),
            state: a.state.map(|s| match s {
                DeliveryState::Pending => app::DeliveryState::Pending,
                DeliveryState::Dead => app::DeliveryState::Dead,
            }),
            json: a.json,
        }),
        Command::Verify(a) => Request::Verify { json: a.json, expect_head: a.expect_head.clone() },
        Command::CheckConfig
        | Command::Discover(_)
        | Command::Demo(_)
        | Command::Run
        | Command::Serve
        | Command::Completions(_)
        | Command::Man
        | Command::ClusterImport => return None,
    })
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
