//! `policy.yml` text -> the JSON value GitLab validates, read the way GitLab reads it.
//!
//! GitLab loads the file with `Gitlab::Config::Loader::Yaml`: Ruby's Psych
//! `YAML.safe_load(blob, permitted_classes: [Symbol], permitted_symbols: [], aliases: true)`,
//! refuses anything but a mapping and anything nested deeper than 100 levels
//! (`MAX_YAML_DEPTH`), then validates `deep_stringify_keys` of the result. This module matches
//! that, in one linear pass over yaml-rust2's events:
//!
//! - plain scalars resolve with Psych's `ScalarScanner` rules (YAML 1.1: `yes`/`no`/`on`/`off`
//!   in any letter case are booleans, `y`/`n` are strings; `0x`, `0b`, leading-zero octal,
//!   `_` and `,` separators and sexagesimal `1:30` are integers; `~`, `null` and empty are
//!   null); quoted and block scalars are strings; a tag overrides (`!!str 1` is a string);
//! - dates and timestamps are refused, as safe_load refuses `Date` and `Time`, and so are
//!   `!ruby/...` objects; symbols (`:name`) are permitted, and become strings;
//! - only the first document counts; a later duplicate key wins; `<<` merges as Psych merges
//!   (the merged mapping overrides keys written before the `<<`);
//! - aliases are allowed, but the value they expand to is counted before it is copied, so an
//!   alias bomb is refused in linear time ([`MAX_EXPANDED_VALUES`]), and nesting (with aliases
//!   expanded) is bounded by [`MAX_DEPTH`], so deep input never reaches a recursive step.

mod scalars;

use scalars::{refuse_ruby_tag, ruby_number_text, scalar};
use serde_json::{Map, Value};
use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};

/// GitLab's `MAX_YAML_DEPTH`: deeper files are refused ("The parsed YAML is too big").
pub const MAX_DEPTH: usize = 100;

/// Values (scalars and collections) a file may expand to through aliases. GitLab refuses a file
/// whose parsed size is over 1 MB; real policy files with a thousand policies have about ten
/// thousand values.
pub const MAX_EXPANDED_VALUES: u64 = 250_000;

/// Why the file does not load. The text is shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("not valid YAML: {0}")]
    Syntax(String),
    #[error("not valid YAML: lists or mappings nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the parsed YAML is too big: its aliases expand to more than {MAX_EXPANDED_VALUES} values")]
    TooBig,
    #[error("YAML.safe_load refuses {what} at line {line} (quote the value to make it a string)")]
    Refused { what: String, line: usize },
}

/// Loads the first document. `Ok(None)` is an empty file (Psych loads `false`/`nil`).
pub fn load(text: &str) -> Result<Option<Value>, LoadError> {
    refuse_control_characters(text)?;
    // Should the event parser panic on hostile input, the file is refused, never a crash.
    std::panic::catch_unwind(|| Builder::default().run(text))
        .unwrap_or_else(|_| Err(LoadError::Syntax("the YAML parser gave up on this input".into())))
}

/// libyaml (under Psych) refuses a stream with characters YAML does not allow anywhere, even
/// in a comment ("control characters are not allowed"); yaml-rust2 is more lenient.
fn refuse_control_characters(text: &str) -> Result<(), LoadError> {
    let allowed = |c: char| {
        matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{7e}' | '\u{85}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}')
            || c >= '\u{10000}'
    };
    // Nearly every file is printable ASCII: checked a byte at a time, without decoding.
    if text.bytes().all(|b| matches!(b, b'\t' | b'\n' | b'\r' | 0x20..=0x7e)) {
        return Ok(());
    }
    for (i, line) in text.split('\n').enumerate() {
        if let Some(c) = line.chars().find(|c| !allowed(*c)) {
            return Err(LoadError::Syntax(format!(
                "control characters are not allowed (U+{:04X} at line {})",
                c as u32,
                i + 1
            )));
        }
    }
    Ok(())
}

/// A key waiting for its value.
struct Key {
    text: String,
    /// `<<` not explicitly tagged `!!str`: a merge key.
    merge: bool,
}

enum Open {
    Seq { items: Vec<Value> },
    Map { map: Map<String, Value>, key: Option<Key> },
}

struct Frame {
    open: Open,
    anchor: usize,
    /// `total` when the collection started: its expanded size is the difference at the end.
    start: u64,
    /// Deepest nesting below this collection, counted from it (aliases expanded).
    below: usize,
}

/// An anchored value and what it costs to copy.
struct Anchored {
    value: Value,
    size: u64,
    depth: usize,
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Anchored>,
    total: u64,
    root: Option<Value>,
}

impl Builder {
    fn run(mut self, text: &str) -> Result<Option<Value>, LoadError> {
        let mut parser = Parser::new_from_str(text);
        loop {
            let (event, mark) = parser.next_token().map_err(|e| LoadError::Syntax(e.to_string()))?;
            match event {
                Event::StreamEnd | Event::DocumentEnd => return Ok(self.root),
                Event::Scalar(value, style, anchor, tag) => {
                    let value = scalar(&value, style, tag.as_ref(), mark)?;
                    self.count(1)?;
                    if anchor != 0 {
                        self.anchors.insert(anchor, Anchored { value: value.clone(), size: 1, depth: 0 });
                    }
                    self.push(value, 0)?;
                }
                Event::Alias(id) => {
                    let Some(a) = self.anchors.get(&id) else {
                        return Err(LoadError::Syntax(format!(
                            "an alias refers to a node that contains it, at line {}",
                            mark.line()
                        )));
                    };
                    let (size, depth) = (a.size, a.depth);
                    self.count(size)?;
                    self.check_depth(depth)?;
                    // Counted first: only a copy within the limits is ever made.
                    let value = self.anchors.get(&id).map(|a| a.value.clone()).unwrap_or(Value::Null);
                    self.push(value, depth)?;
                }
                Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                    refuse_ruby_tag(tag.as_ref(), mark)?;
                    self.count(1)?;
                    let open = if matches!(event, Event::SequenceStart(..)) {
                        Open::Seq { items: Vec::new() }
                    } else {
                        Open::Map { map: Map::new(), key: None }
                    };
                    self.stack.push(Frame { open, anchor, start: self.total - 1, below: 0 });
                    self.check_depth(0)?;
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    let Some(frame) = self.stack.pop() else { continue };
                    let value = match frame.open {
                        Open::Seq { items } => Value::Array(items),
                        Open::Map { map, .. } => Value::Object(map),
                    };
                    let depth = frame.below + 1;
                    if frame.anchor != 0 {
                        let size = self.total - frame.start;
                        self.anchors.insert(frame.anchor, Anchored { value: value.clone(), size, depth });
                    }
                    self.push(value, depth)?;
                }
                Event::Nothing | Event::StreamStart | Event::DocumentStart => {}
            }
        }
    }

    fn count(&mut self, values: u64) -> Result<(), LoadError> {
        self.total = self.total.saturating_add(values);
        if self.total > MAX_EXPANDED_VALUES { Err(LoadError::TooBig) } else { Ok(()) }
    }

    /// The open collections plus `depth` levels of a value about to be placed in them.
    fn check_depth(&self, depth: usize) -> Result<(), LoadError> {
        if self.stack.len() + depth > MAX_DEPTH { Err(LoadError::TooDeep) } else { Ok(()) }
    }

    /// Places a finished value (of nesting `depth`) in the innermost open collection.
    fn push(&mut self, value: Value, depth: usize) -> Result<(), LoadError> {
        let Some(frame) = self.stack.last_mut() else {
            self.root.get_or_insert(value);
            return Ok(());
        };
        frame.below = frame.below.max(depth);
        match &mut frame.open {
            Open::Seq { items } => items.push(value),
            Open::Map { map, key } => match key.take() {
                None => *key = Some(Key { merge: is_merge_key(&value), text: key_text(value) }),
                Some(k) if k.merge => merge(map, value),
                Some(k) => {
                    map.insert(k.text, value);
                }
            },
        }
        Ok(())
    }
}

/// Psych: a plain or quoted `<<` key merges, unless tagged `!!str`. The tag is already applied
/// (a `!!str`-tagged `<<` reaches here as a string too), so this errs towards merging.
fn is_merge_key(key: &Value) -> bool {
    key.as_str() == Some("<<")
}

/// Psych's `revive_hash`: `hash.merge!(other)`, so merged keys override earlier ones; a list
/// of mappings merges with the first one winning; anything else is kept under the key `<<`.
fn merge(map: &mut Map<String, Value>, value: Value) {
    match value {
        Value::Object(other) => map.extend(other),
        Value::Array(items) if items.iter().all(Value::is_object) => {
            let mut merged = Map::new();
            for item in items.into_iter().rev() {
                if let Value::Object(o) = item {
                    merged.extend(o);
                }
            }
            map.extend(merged);
        }
        other => {
            map.insert("<<".into(), other);
        }
    }
}

/// Ruby's `to_s` of a key after `deep_stringify_keys`: `1` -> "1", `true` -> "true", nil -> "".
fn key_text(key: Value) -> String {
    match key {
        Value::String(s) => s,
        Value::Null => String::new(),
        Value::Number(n) => ruby_number_text(&n),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
