//! The one integration-test binary: runs the real `policy-audit` executable against real git
//! repositories and a real sled directory in per-test temporary folders.

mod bad_input;
mod browser;
mod cli;
mod common;
mod corpus;
mod crash;
mod daemon;
mod damaged_state;
mod faults;
mod fixtures;
mod fuzz_regressions;
mod git_http;
mod http;
mod output;
mod receiver;
mod repo_urls;
mod secrets;
mod server;
mod streaming;
mod trail;
mod webhook;
