//! A guard on YAML alias expansion, run before serde_yaml builds a value.
//!
//! serde_yaml copies the anchored node at every alias, and its own limit counts alias uses, not
//! what they copy: one anchored list of K items used M times becomes K×M values (a 19 KB file
//! took 8.7 s and 1.5 GB). GitLab accepts aliases but refuses a file whose parsed size is too big
//! (`Gitlab::Config::Loader::Yaml`, 1 MB). This pass reads the file's events with yaml-rust2
//! and adds up the expanded size — an alias adds its anchor's size, nothing is copied — so an
//! expansion bomb is refused in linear time. Only files that contain an alias pay for it.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};

/// Values (scalars and collections) a file may expand to through aliases. Real policy files
/// with a thousand policies have about ten thousand.
pub const MAX_EXPANDED_VALUES: u64 = 250_000;

/// Whether the document's aliases expand it beyond `limit` values. Syntax errors return false:
/// the real parser reports them with a position. Should the event parser panic on hostile input,
/// the file counts as too big: refused, never a crash of the reconcile.
pub fn expansion_exceeds(text: &str, limit: u64) -> bool {
    std::panic::catch_unwind(|| count_exceeds(text, limit)).unwrap_or(true)
}

fn count_exceeds(text: &str, limit: u64) -> bool {
    let mut parser = Parser::new_from_str(text);
    let mut total: u64 = 0;
    let mut sizes: HashMap<usize, u64> = HashMap::new();
    let mut open: Vec<(usize, u64)> = Vec::new(); // (anchor id, total before the collection)
    loop {
        let Ok((event, _)) = parser.next_token() else { return false };
        match event {
            Event::StreamEnd => return false,
            Event::Alias(id) => total = total.saturating_add(sizes.get(&id).copied().unwrap_or(1)),
            Event::Scalar(_, _, anchor, _) => {
                total += 1;
                if anchor != 0 {
                    sizes.insert(anchor, 1);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                open.push((anchor, total));
                total += 1;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, before)) = open.pop()
                    && anchor != 0
                {
                    sizes.insert(anchor, total - before);
                }
            }
            _ => {}
        }
        if total > limit {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_expansions_without_performing_them() {
        // The mapping, 3 keys, the list and its 3 items, then 2 aliases of 4 values each: 16.
        assert!(!expansion_exceeds("a: &x [1, 2, 3]\nb: *x\nc: *x\n", 16));
        assert!(expansion_exceeds("a: &x [1, 2, 3]\nb: *x\nc: *x\n", 15));
        // A doubling chain: 2^40 values from a few hundred bytes, refused at once.
        let mut text = String::from("l0: &l0 [x, x]\n");
        for i in 1..40 {
            text.push_str(&format!("l{i}: &l{i} [*l{}, *l{}]\n", i - 1, i - 1));
        }
        assert!(expansion_exceeds(&text, MAX_EXPANDED_VALUES));
        // K × M: one list of 1,000 items used 1,000 times.
        let items = vec!["1"; 1000].join(", ");
        let uses = vec!["*k"; 1000].join(", ");
        assert!(expansion_exceeds(&format!("a: &k [{items}]\nb: [{uses}]\n"), MAX_EXPANDED_VALUES));
    }
}
