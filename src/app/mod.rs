//! The application: typed requests and their output, and `execute()`, which runs a request on a
//! config and a store. The command line, the control socket, the daemon, the demo (and the web
//! server to come) all call it; it calls none of them.
//!
//! Requests are plain serde types with no clap in them, and they cross the control socket as
//! they are, inside an envelope with [`PROTOCOL`]: renaming a command-line flag never changes
//! what a running daemon understands, and a CLI and a daemon of different protocol versions get
//! a clear error naming both (see `control`).
//!
//! Listings of unbounded size (`events`) are written to the writer `execute` is given as they
//! are produced; everything else a request prints comes back in its [`Output`].

pub mod deliveries;
pub mod discover;
pub mod events;
pub mod reconcile;
pub mod status;
pub mod verify;

use crate::config::Config;
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The version of [`Request`] and [`Output`] as they cross the control socket. Bump it on any
/// change a daemon of the previous version would misread.
pub const PROTOCOL: u32 = 1;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_UNUSABLE: u8 = 2;

/// What can be asked of the application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Reconcile(ReconcileRequest),
    Events(EventsRequest),
    Status {
        json: bool,
    },
    Deliveries(DeliveriesRequest),
    RetryDeliveries {
        destination: Option<String>,
    },
    Verify {
        json: bool,
        /// A chain head recorded earlier that must still be in the trail.
        #[serde(default)]
        expect_head: Option<String>,
    },
    /// Queue stored events (created at or after `since`) a destination has not had.
    ReplayDeliveries {
        destination: String,
        since: Option<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconcileRequest {
    /// Only these projects (SPP paths); empty = all.
    pub projects: Vec<String>,
    pub backfill: bool,
    pub no_deliver: bool,
    pub json: bool,
    pub timings: bool,
    /// Start a new trail for projects whose state was lost although their mirror shows an
    /// earlier one.
    #[serde(default)]
    pub rebaseline: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Table,
    Json,
    Jsonl,
    Csv,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventsRequest {
    pub projects: Vec<String>,
    /// `security_policy_update` or just `update`.
    pub types: Vec<String>,
    pub policy: Option<String>,
    pub author: Option<String>,
    /// RFC 3339 or YYYY-MM-DD.
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<usize>,
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Pending,
    Dead,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveriesRequest {
    pub destination: Option<String>,
    /// Only one state; None = both.
    pub state: Option<DeliveryState>,
    pub json: bool,
}

/// What a request prints and how it exits.
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

    /// Appends another output's text and keeps the worse exit code.
    pub fn append(&mut self, other: Output) {
        self.stdout.push_str(&other.stdout);
        self.stderr.push_str(&other.stderr);
        self.code = self.code.max(other.code);
    }
}

/// Runs `request`. `stop` is the daemon's shutdown flag (None in-process); `out` takes
/// listings as they are produced.
pub fn execute(
    config: &Config,
    store: &Store,
    request: &Request,
    stop: &crate::stop::Stop,
    out: &mut dyn std::io::Write,
) -> Output {
    match request {
        Request::Reconcile(r) => reconcile::run(config, store, r, stop),
        Request::Events(r) => events::run(store, r, out),
        Request::Status { json } => status::run(config, store, *json),
        Request::Deliveries(r) => deliveries::run(config, store, r),
        Request::RetryDeliveries { destination } => deliveries::retry(config, store, destination.as_deref()),
        Request::Verify { json, expect_head } => verify::run(store, *json, expect_head.as_deref()),
        Request::ReplayDeliveries { destination, since } => {
            deliveries::replay(config, store, destination, since.as_deref())
        }
    }
}

/// A failed write of the output: an error (exit 1), except a closed pipe
/// (`policy-audit events | head`), which ends the output quietly.
pub fn write_failed(e: &std::io::Error) -> Output {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return Output::default();
    }
    Output { stderr: format!("error: cannot write the output: {e}\n"), code: EXIT_FAILED, ..Output::default() }
}
