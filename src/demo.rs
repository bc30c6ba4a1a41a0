//! `policy-audit demo` (placeholder while the walkthrough is written).
use crate::cli::Output;
pub fn run() -> Output {
    Output::unusable("demo not written yet")
}
