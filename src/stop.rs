//! The one shutdown signal: cancelled once, on SIGTERM/SIGINT. Synchronous work (a reconcile,
//! a fetch, a delivery round) polls it between units of work; async tasks await it. A command
//! run in-process gets one that is never cancelled.
//!
//! It says only "stop"; whether a command runs in-process or in the daemon is not its business
//! (the old `Option<Arc<AtomicBool>>` meant both).

pub use tokio_util::sync::CancellationToken as Stop;
