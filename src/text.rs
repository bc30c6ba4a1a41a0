//! Text that came from outside, made safe to show: control characters escaped (names are data,
//! not terminal commands) and credentials removed from URLs (no secret in any message).
//!
//! Invariants:
//! - every human-readable output of a name, message or reason taken from a repository goes
//!   through [`escape_controls`]; JSON and CSV keep the raw value (their encoders quote it);
//! - every message that shows a URL goes through [`redact_url`] or [`redact_urls`].

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with every control character (C0, DEL, C1: ESC, CR, LF, NUL, ...) written as a visible
/// escape (`\e`, `\r`, `\n`, `\0`, `\t`, `\u{9b}`), and a backslash doubled when anything was
/// escaped so the escape cannot be forged. Plain text is returned as it is. For one value: a
/// table cell, a name in a message.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    escape(text, Keep::Nothing)
}

/// Like [`escape_controls`] for text made of lines (a message, a report): line breaks stay.
pub fn escape_controls_keeping_lines(text: &str) -> Cow<'_, str> {
    escape(text, Keep::Newlines)
}

/// Like [`escape_controls`] for a log line written with colours: the colour codes the
/// formatter writes (`ESC [ digits ; m`) stay; any other escape sequence is neutralised.
pub fn escape_controls_keeping_colours(text: &str) -> Cow<'_, str> {
    escape(text, Keep::Colours)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    Newlines,
    Colours,
}

/// The one escaping function behind the three above.
fn escape(text: &str, keep: Keep) -> Cow<'_, str> {
    let kept = |c: char| c == '\n' && keep == Keep::Newlines;
    if !text.chars().any(|c| c.is_control() && !kept(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for (i, c) in text.char_indices() {
        match c {
            '\\' if keep != Keep::Newlines => out.push_str("\\\\"),
            c if kept(c) => out.push(c),
            '\u{1b}' if keep == Keep::Colours && is_colour_code(&text[i + 1..]) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            '\u{1b}' => out.push_str("\\e"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Whether `rest` (after an ESC) is a colour code: `[`, digits and `;`, then `m`.
fn is_colour_code(rest: &str) -> bool {
    let Some(body) = rest.strip_prefix('[') else { return false };
    let end = body.find(|c: char| !(c.is_ascii_digit() || c == ';')).unwrap_or(body.len());
    body[end..].starts_with('m')
}

/// The URL with any `user:password@` removed, for messages and logs. A URL is read by the one
/// URL parser ([`crate::urls`]); text it does not read as a URL (a local path, a mistyped URL)
/// still loses anything before an `@` in what looks like its authority: a password never shows.
pub fn redact_url(url: &str) -> String {
    if let Some(redacted) = crate::urls::without_userinfo(url) {
        return redacted;
    }
    let Some(scheme_end) = url.find("://") else {
        // No scheme (a mistyped URL): `user:password@host/path` still carries a password.
        let authority_end = url.find('/').unwrap_or(url.len());
        return match url[..authority_end].rfind('@') {
            Some(at) => url[at + 1..].to_string(),
            None => url.to_string(),
        };
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..scheme_end + 3], &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// `text` (an error chain, a log line) with the userinfo of every URL in it removed. A URL in
/// prose runs from its scheme to the next space, quote or angle bracket; each is then redacted
/// by [`redact_url`].
pub fn redact_urls(text: &str) -> Cow<'_, str> {
    if !text.contains("://") || !text.contains('@') {
        return Cow::Borrowed(text);
    }
    let ends_url = |c: char| matches!(c, '"' | '\'' | '`' | '<' | '>') || c.is_whitespace();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let scheme_start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |p| p + rest[p..].chars().next().map_or(1, char::len_utf8));
        out.push_str(&rest[..scheme_start]);
        let end = rest[i + 3..].find(ends_url).map_or(rest.len(), |e| i + 3 + e);
        out.push_str(&redact_url(&rest[scheme_start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible() {
        assert_eq!(escape_controls("plain name"), "plain name");
        assert_eq!(escape_controls("a\u{1b}[2Kb\r\n\0"), "a\\e[2Kb\\r\\n\\0");
        assert_eq!(escape_controls("x\\n\u{7}"), "x\\\\n\\u{7}");
        assert_eq!(escape_controls("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape_controls_keeping_lines("a\nb\u{1b}[2K\r"), "a\nb\\e[2K\\r");
        assert_eq!(
            escape_controls_keeping_colours("\u{1b}[1;31mred\u{1b}[0m \u{1b}[2K\n"),
            "\u{1b}[1;31mred\u{1b}[0m \\e[2K\\n"
        );
    }

    #[test]
    fn credentials_are_removed_from_urls() {
        assert_eq!(
            redact_url("https://oauth2:glpat-x@gitlab.example.com/a/b.git"),
            "https://gitlab.example.com/a/b.git"
        );
        assert_eq!(redact_url("ftp://u:p@h"), "ftp://h/");
        assert_eq!(redact_url("https://u:p@exa mple/x"), "https://exa mple/x");
        assert_eq!(redact_url("/srv/repos/spp"), "/srv/repos/spp");
        assert_eq!(redact_url("https://h/a@b"), "https://h/a@b");
        assert_eq!(redact_url("user:pw@h/x"), "h/x");
    }

    #[test]
    fn credentials_are_removed_from_text() {
        assert_eq!(
            redact_urls("url = \"ftp://u:s3cret@h:2121/x\" and https://a:b@c d@e"),
            "url = \"ftp://h:2121/x\" and https://c/ d@e"
        );
        assert_eq!(redact_urls("no urls here"), "no urls here");
        assert_eq!(
            redact_urls("fetch of https://oauth2:glpat-x@gitlab.example.com/a.git failed: 401 (user a@b)"),
            "fetch of https://gitlab.example.com/a.git failed: 401 (user a@b)"
        );
        assert_eq!(redact_urls("(https://u:p@h/x)"), "(https://h/x)");
    }
}
