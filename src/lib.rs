//! policy-audit: an audit trail for GitLab security policies kept as code.
//!
//! The pipeline, one module per stage: `repo` (fetch, walk) -> `policy` (parse, diff) ->
//! `event` (GitLab's schema) -> `store` (sled) -> `stream` (delivery). `reconcile` drives one
//! project through it; `cli` and `daemon` are the ways in.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod event;
pub mod logging;
pub mod policy;
pub mod reconcile;
pub mod repo;
pub mod store;
pub mod stream;
pub mod text;
