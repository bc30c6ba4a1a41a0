//! `policy-audit verify`: recomputes the tamper-evident chain over the stored trail; exit 1 at
//! the first altered, removed or reordered event.

use super::{EXIT_FAILED, Output};
use crate::store::Store;

pub fn run(store: &Store, json: bool, expect_head: Option<&str>) -> Output {
    let v = match store.verify_chain() {
        Ok(v) => v,
        Err(e) => return Output::unusable(format!("{e:#}")),
    };
    let mut out = Output::default();
    if json {
        out.out_line(serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    // A head recorded earlier must still be in the trail: a lost or reset state database holds
    // a consistent but shorter (or empty) chain that verifies on its own.
    if let (None, Some(expected)) = (&v.first_break, expect_head) {
        match store.events_at_head(expected) {
            Ok(Some(_)) => {}
            Ok(None) => {
                out.err_line(format!(
                    "error: the expected chain head {expected} is not in this trail ({} events, chain head {}): \
                     the trail was lost, reset or rewritten since that head was recorded",
                    v.events, v.head
                ));
                out.code = EXIT_FAILED;
                return out;
            }
            Err(e) => return Output::unusable(format!("{e:#}")),
        }
    }
    match &v.first_break {
        None => {
            if !json {
                let continues = match expect_head {
                    Some(expected) => format!(" (continues from {expected})"),
                    None => String::new(),
                };
                out.out_line(format!("trail verified: {} events, chain head {}{continues}", v.events, v.head));
            }
        }
        Some(b) => {
            out.err_line(format!("error: the trail does not match its chain: {b}"));
            out.code = EXIT_FAILED;
        }
    }
    out
}
