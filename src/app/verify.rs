//! `policy-audit verify`: recomputes the tamper-evident chain over the stored trail; exit 1 at
//! the first altered, removed or reordered event.

use super::{EXIT_FAILED, Output};
use crate::store::Store;

pub fn run(store: &Store, json: bool) -> Output {
    let v = match store.verify_chain() {
        Ok(v) => v,
        Err(e) => return Output::unusable(format!("{e:#}")),
    };
    let mut out = Output::default();
    if json {
        out.out_line(serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    match &v.first_break {
        None => {
            if !json {
                out.out_line(format!("trail verified: {} events, chain head {}", v.events, v.head));
            }
        }
        Some(b) => {
            out.err_line(format!("error: the trail does not match its chain: {b}"));
            out.code = EXIT_FAILED;
        }
    }
    out
}
