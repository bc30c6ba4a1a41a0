//! A cheap guard on flow-collection nesting (`[` / `{`), run before the YAML parser sees a file.
//!
//! A YAML scanner keeps state per open flow level (libyaml's and yaml-rust2's possible simple
//! keys), so work per token can grow with the nesting depth and a 1 MiB file of nested `[`
//! takes far too long to reject, although GitLab refuses anything nested deeper than 100
//! levels in the end. Real policies nest a handful of
//! levels. The guard only counts brackets that YAML would read as flow collections: not inside
//! quotes, comments or block scalars, and in block context only where a value starts, so
//! `description: use a[0]` is not nesting. It can only under-count (then the parser decides).

#[cfg(test)]
use super::load::MAX_DEPTH;

/// What the guard found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scan {
    /// Flow collections nest deeper than the limit.
    pub too_deep: bool,
}

/// One linear pass: nesting depth of flow collections.
pub fn scan(text: &str, limit: usize) -> Scan {
    let mut found = Scan::default();
    // Each level opens with a bracket: a file with no more brackets than the limit cannot nest
    // deeper, and counting bytes is far cheaper than the pass below (every real policy file).
    if text.bytes().filter(|b| matches!(b, b'[' | b'{')).count() <= limit {
        return found;
    }
    let mut depth = 0usize;
    let mut block_scalar_indent: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if let Some(parent) = block_scalar_indent {
            if line.trim().is_empty() || indent > parent {
                continue; // content of a `|` or `>` block scalar
            }
            block_scalar_indent = None;
        }
        let mut prev = None::<char>; // previous non-blank character on this line, if any
        let mut chars = line.chars().peekable();
        let mut quote = None::<char>;
        while let Some(c) = chars.next() {
            if let Some(q) = quote {
                match (q, c) {
                    ('"', '\\') => {
                        chars.next();
                    }
                    ('\'', '\'') if chars.peek() == Some(&'\'') => {
                        chars.next();
                    }
                    _ if c == q => {
                        quote = None;
                        prev = Some(c);
                    }
                    _ => {}
                }
                continue;
            }
            let token_start = prev.is_none_or(|p| matches!(p, ' ' | '\t' | '[' | '{' | ',' | ':' | '-' | '?'));
            match c {
                '#' if prev.is_none_or(|p| p == ' ' || p == '\t') => break,
                '\'' | '"' if token_start => quote = Some(c),
                '[' | '{' if depth > 0 || value_start(prev) => {
                    depth += 1;
                    if depth > limit {
                        found.too_deep = true;
                        return found;
                    }
                }
                ']' | '}' if depth > 0 => depth -= 1,
                '|' | '>' if depth == 0 && value_start(prev) => {
                    block_scalar_indent = Some(indent);
                    break;
                }
                _ => {}
            }
            // Track the last character, counting blanks so that `a [` and `a[` differ.
            prev = Some(c);
        }
    }
    found
}

/// In block context a flow collection (or block scalar) starts a value: at the start of a line,
/// or after `: `, `- ` or `? `.
fn value_start(prev: Option<char>) -> bool {
    matches!(prev, None | Some(' ') | Some('\t'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow_nesting_exceeds(text: &str, limit: usize) -> bool {
        scan(text, limit).too_deep
    }

    #[test]
    fn counts_real_flow_nesting_only() {
        assert!(!flow_nesting_exceeds("a: [[[1]]]\n", 3));
        assert!(flow_nesting_exceeds("a: [[[[1]]]]\n", 3));
        assert!(flow_nesting_exceeds(&format!("a: {}\n", "[".repeat(200)), MAX_DEPTH));
        assert!(flow_nesting_exceeds(&"{a: ".repeat(200), MAX_DEPTH));
        // Not nesting: brackets in plain scalars, quotes, comments and block scalars.
        let text = format!(
            "a: use x[0]{}\nb: '{}'\nc: \"{}\"\n# {}\nd: |\n  {}\n  more\ne: [ok]\nf: it's [fine]\n",
            "[".repeat(300),
            "[".repeat(300),
            "[".repeat(300),
            "[".repeat(300),
            "[".repeat(300)
        );
        assert!(!flow_nesting_exceeds(&text, MAX_DEPTH), "false positive");
    }

    #[test]
    fn a_megabyte_of_brackets_is_caught() {
        assert!(flow_nesting_exceeds(&format!("a: {}", "[".repeat(1 << 20)), MAX_DEPTH));
        assert!(flow_nesting_exceeds(&format!("- {}", "{a: ".repeat(1 << 18)), MAX_DEPTH));
    }
}
