//! `Config::parse` on arbitrary UTF-8 text. It must never panic (nor hang), and every line of
//! every error must name the file: each starts with `/fuzz/config.toml`.
//!
//! The loader reads the environment (`*_env` keys, `STATE_DIRECTORY`) and files (`*_file` keys,
//! relative to `/fuzz/`, which does not exist): an input can make it read any absolute path. Run
//! it on a machine where that is harmless.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy_audit::config::Config;
use std::path::Path;

const FILE: &str = "/fuzz/config.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(Path::new(FILE), text) {
        assert!(!e.errors.is_empty(), "an error without a message");
        for line in e.to_string().lines() {
            assert!(line.starts_with(FILE), "error line without the file name: {line:?}\nall errors: {e}");
        }
    }
});
