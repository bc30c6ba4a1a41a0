//! policy-audit: an audit trail for GitLab security policies kept as code.
//!
//! The pipeline, one module per stage: `repo` (fetch, walk) -> `policy` (parse, diff) ->
//! `event` (GitLab's schema) -> `store` (sled) -> `stream` (delivery). `reconcile` drives one
//! project through it; `app` is the application over it (typed requests, `execute`, the
//! renderers); `cli`, `control`, `daemon`, `server` (the web page, GitLab's API, the webhook)
//! and `demo` are the ways in, and call `app` or read the store.
//! See docs/architecture.md.

pub mod app;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod discovery;
pub mod event;
pub mod gitlab;
pub mod logging;
pub mod policy;
pub mod recent;
pub mod reconcile;
pub mod repo;
pub mod server;
pub mod stop;
pub mod store;
pub mod stream;
pub mod text;
pub mod tls;
pub mod urls;
