//! The one integration-test binary: runs the real `policy-audit` executable against real git
//! repositories and a real sled directory in per-test temporary folders.

mod api_totals;
mod bad_input;
mod browser;
mod cli;
mod cluster;
mod common;
mod corpus;
mod crash;
mod daemon;
mod damaged_state;
mod discovery;
mod faults;
mod fixtures;
mod fuzz_regressions;
mod git_http;
mod gitlab_api;
mod hostile;
mod http;
mod nats;
mod nats_server;
mod output;
mod package;
mod policy_corpus;
mod receiver;
mod repo_urls;
mod secrets;
mod server;
mod snapshots;
mod stored_format;
mod streaming;
mod tls;
mod tls_front;
mod trail;
mod webhook;
