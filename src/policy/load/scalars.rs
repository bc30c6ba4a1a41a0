//! Scalars as Psych's `ScalarScanner` and `ToRuby#deserialize` read them (YAML 1.1): the rules
//! of the table in docs/events.md ("How values are read"). Pure functions of one scalar's text,
//! style and tag.

use super::LoadError;
use serde_json::{Number, Value};
use yaml_rust2::parser::Tag;
use yaml_rust2::scanner::{Marker, TScalarStyle};

pub(super) fn ruby_number_text(n: &Number) -> String {
    match n.as_f64() {
        Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 && f.abs() < 1e16 => format!("{f:.1}"),
        _ => n.to_string(),
    }
}

pub(super) fn refuse_ruby_tag(tag: Option<&Tag>, mark: Marker) -> Result<(), LoadError> {
    match tag {
        Some(t) if t.handle == "!" && t.suffix.starts_with("ruby/") => {
            Err(LoadError::Refused { what: format!("the Ruby object tag `!{}`", t.suffix), line: mark.line() })
        }
        _ => Ok(()),
    }
}

/// One scalar as Psych's `ToRuby#deserialize` reads it.
pub(super) fn scalar(text: &str, style: TScalarStyle, tag: Option<&Tag>, mark: Marker) -> Result<Value, LoadError> {
    let Some(tag) = tag else {
        if style != TScalarStyle::Plain {
            return Ok(Value::String(text.to_string()));
        }
        return plain(text, mark);
    };
    let full = format!("{}{}", tag.handle, tag.suffix);
    let refused = |what: String| Err(LoadError::Refused { what, line: mark.line() });
    match full.as_str() {
        "tag:yaml.org,2002:str" | "!str" | "!ruby/string" => Ok(Value::String(text.to_string())),
        "tag:yaml.org,2002:binary" | "!binary" => Ok(Value::String(decode_base64(text))),
        "tag:yaml.org,2002:float" | "!float" => match plain(text, mark)? {
            Value::Number(n) => Ok(n.as_f64().and_then(Number::from_f64).map(Value::Number).unwrap_or(Value::Null)),
            _ => refused(format!("`{}` tagged as a float", short(text))),
        },
        s if s.starts_with("!ruby/sym") => Ok(Value::String(text.to_string())),
        s if s.starts_with("!ruby/") => refused(format!("the Ruby object tag `{s}`")),
        // Any other tag (`!!int`, `!!bool`, `!custom`): Psych reads the text as if plain.
        _ => plain(text, mark),
    }
}

fn short(text: &str) -> String {
    let mut s: String = text.chars().take(40).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

fn decode_base64(text: &str) -> String {
    use base64::Engine;
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    match base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

/// Psych's `ScalarScanner#tokenize` for a plain scalar (safe_load: legacy integers with `,`).
fn plain(s: &str, mark: Marker) -> Result<Value, LoadError> {
    let refused = |what: &str| Err(LoadError::Refused { what: format!("{what} `{}`", short(s)), line: mark.line() });
    // yaml-rust2 reports an empty plain scalar as `~`.
    if s.is_empty() {
        return Ok(Value::Null);
    }
    if looks_like_word(s) || s.contains('\n') {
        if s.chars().count() > 5 {
            return Ok(Value::String(s.into()));
        }
        let lower = s.to_ascii_lowercase();
        return Ok(match lower.as_str() {
            "~" | "null" => Value::Null,
            "yes" | "true" | "on" => Value::Bool(true),
            "no" | "false" | "off" => Value::Bool(false),
            _ => Value::String(s.into()),
        });
    }
    if is_timestamp(s) {
        return refused("a timestamp (Ruby Time)");
    }
    if is_date(s) {
        return refused("a date (Ruby Date)");
    }
    let lower = s.to_ascii_lowercase();
    if lower == ".inf" || lower == "+.inf" || lower == "-.inf" || lower == ".nan" {
        // JSON has no infinity or NaN: a string fails every numeric rule, as Ruby's do not
        // always; documented in docs/events.md.
        return Ok(Value::String(s.into()));
    }
    if let Some(name) = s.strip_prefix(':')
        && !name.is_empty()
    {
        // A permitted Symbol: strings after deep_stringify_keys when used as keys.
        let name = name.trim_matches(|c| c == '"' || c == '\'');
        return Ok(Value::String(name.into()));
    }
    if let Some(n) = sexagesimal(s) {
        return Ok(n);
    }
    if is_float(s) {
        if matches!(s, "." | "+." | "-.") {
            return Ok(Value::String(s.into()));
        }
        let cleaned: String = s.chars().filter(|c| *c != ',' && *c != '_').collect();
        return Ok(cleaned
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(s.into())));
    }
    if let Some(n) = legacy_integer(s) {
        return Ok(n);
    }
    Ok(Value::String(s.into()))
}

/// `/^[^\d.:-]?[[:alpha:]_\s!@#$%\^&*(){}<>|\/\\~;=]+/`: a word, not a number, date or symbol.
fn looks_like_word(s: &str) -> bool {
    let word = |c: char| c.is_alphabetic() || c == '_' || c.is_whitespace() || "!@#$%^&*(){}<>|/\\~;=".contains(c);
    let mut chars = s.chars();
    let Some(first) = chars.next() else { return false };
    if word(first) {
        return true;
    }
    if first.is_ascii_digit() || matches!(first, '.' | ':' | '-') {
        return false;
    }
    chars.next().is_some_and(word)
}

fn digits(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

/// `/^\d{4}-(?:1[012]|0\d|\d)-(?:[12]\d|3[01]|0\d|\d)$/`
fn is_date(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts.as_slice() else { return false };
    let month_ok = digits(m, 1, 2) && (m.len() == 1 || m.starts_with('0') || matches!(*m, "10" | "11" | "12"));
    let day_ok =
        digits(d, 1, 2) && (d.len() == 1 || matches!(d.as_bytes()[0], b'0' | b'1' | b'2') || matches!(*d, "30" | "31"));
    digits(y, 4, 4) && month_ok && day_ok
}

/// `/^-?\d{4}-\d{1,2}-\d{1,2}(?:[Tt]|\s+)\d{1,2}:\d\d:\d\d(?:\.\d*)?(?:\s*(?:Z|[-+]\d{1,2}:?(?:\d\d)?))?$/`
fn is_timestamp(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let Some(sep) = s.find(|c: char| c == 'T' || c == 't' || c.is_whitespace()) else { return false };
    let (date, rest) = s.split_at(sep);
    let d: Vec<&str> = date.split('-').collect();
    if !(d.len() == 3 && digits(d[0], 4, 4) && digits(d[1], 1, 2) && digits(d[2], 1, 2)) {
        return false;
    }
    let rest = if rest.starts_with(['T', 't']) { &rest[1..] } else { rest.trim_start() };
    let b = rest.as_bytes();
    let hour_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if !(1..=2).contains(&hour_len) {
        return false;
    }
    let r = &rest[hour_len..];
    let rb = r.as_bytes();
    if rb.len() < 6 || rb[0] != b':' || rb[3] != b':' || !digits(&r[1..3], 2, 2) || !digits(&r[4..6], 2, 2) {
        return false;
    }
    let mut r = &r[6..];
    if let Some(frac) = r.strip_prefix('.') {
        r = frac.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let r = r.trim_start();
    if r.is_empty() || r == "Z" {
        return true;
    }
    let Some(zone) = r.strip_prefix(['+', '-']) else { return false };
    let h = zone.bytes().take_while(u8::is_ascii_digit).count().min(2);
    if h == 0 {
        return false;
    }
    let zone = &zone[h..];
    let zone = zone.strip_prefix(':').unwrap_or(zone);
    zone.is_empty() || digits(zone, 2, 2)
}

/// `/^[-+]?[0-9][0-9_]*(:[0-5]?[0-9]){1,2}(\.[0-9_]*)?$/`, summed as Psych sums it (the first
/// part times 60², so `1:30` is 5400: Psych's reading, not YAML 1.1's).
fn sexagesimal(s: &str) -> Option<Value> {
    let (sign, body) = match s.as_bytes().first() {
        Some(b'-') => (-1i64, &s[1..]),
        Some(b'+') => (1, &s[1..]),
        _ => (1, s),
    };
    let parts: Vec<&str> = body.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return None;
    }
    let (last, frac) = match parts[parts.len() - 1].split_once('.') {
        Some((l, f)) if f.bytes().all(|c| c.is_ascii_digit() || c == b'_') => (l, Some(f)),
        Some(_) => return None,
        None => (parts[parts.len() - 1], None),
    };
    let first = parts[0];
    if !first.starts_with(|c: char| c.is_ascii_digit()) || !first.bytes().all(|c| c.is_ascii_digit() || c == b'_') {
        return None;
    }
    let mut tail: Vec<&str> = parts[1..parts.len() - 1].to_vec();
    tail.push(last);
    if !tail.iter().all(|p| digits(p, 1, 2) && (p.len() == 1 || p.as_bytes()[0] <= b'5')) {
        return None;
    }
    let mut whole: f64 = 0.0;
    let mut int: i64 = 0;
    for (e, p) in parts.iter().enumerate() {
        let p = if e == parts.len() - 1 { last } else { p };
        let v: i64 = p.replace('_', "").parse().ok()?;
        let weight = 60i64.checked_pow((e as i64 - 2).unsigned_abs() as u32)?;
        int = int.checked_add(v.checked_mul(weight)?)?;
        whole += v as f64 * weight as f64;
    }
    match frac {
        None => Some(Value::from(sign * int)),
        Some(f) => {
            let f: f64 = format!("0.{}", f.replace('_', "")).parse().unwrap_or(0.0);
            Number::from_f64(sign as f64 * (whole + f)).map(Value::Number)
        }
    }
}

/// `/^(?:[-+]?([0-9][0-9_,]*)?\.[0-9]*([eE][-+][0-9]+)?)$/`
fn is_float(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let Some((int, rest)) = s.split_once('.') else { return false };
    let int_ok = int.is_empty()
        || (int.starts_with(|c: char| c.is_ascii_digit())
            && int.bytes().all(|c| c.is_ascii_digit() || c == b'_' || c == b','));
    if !int_ok {
        return false;
    }
    let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    let exp = &rest[frac_len..];
    if exp.is_empty() {
        return true;
    }
    let Some(exp) = exp.strip_prefix(['e', 'E']) else { return false };
    let Some(exp) = exp.strip_prefix(['-', '+']) else { return false };
    !exp.is_empty() && exp.bytes().all(|c| c.is_ascii_digit())
}

/// Psych's `INTEGER_LEGACY`: binary, leading-zero octal, decimal and hex, with `_` and `,`.
fn legacy_integer(s: &str) -> Option<Value> {
    let (negative, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let sep = |c: u8| c == b'_' || c == b',';
    let (radix, digits_text) = if let Some(b) = body.strip_prefix("0b") {
        let first = b.bytes().find(|c| !sep(*c))?;
        if !matches!(first, b'0' | b'1') || !b.bytes().all(|c| matches!(c, b'0' | b'1') || sep(c)) {
            return None;
        }
        (2, b)
    } else if let Some(h) = body.strip_prefix("0x") {
        let first = h.bytes().find(|c| !sep(*c))?;
        if !first.is_ascii_hexdigit() || !h.bytes().all(|c| c.is_ascii_hexdigit() || sep(c)) {
            return None;
        }
        (16, h)
    } else if body.len() > 1 && body.starts_with('0') {
        let o = &body[1..];
        let first = o.bytes().find(|c| !sep(*c))?;
        if !(b'0'..=b'7').contains(&first) || !o.bytes().all(|c| (b'0'..=b'7').contains(&c) || sep(c)) {
            return None;
        }
        (8, o)
    } else {
        // `0` or `[1-9]` followed by digits, each `_` or `,` followed by a digit.
        let b = body.as_bytes();
        if b.is_empty() || !b[0].is_ascii_digit() || (b[0] == b'0' && b.len() > 1) {
            return None;
        }
        for (i, c) in b.iter().enumerate() {
            if sep(*c) && !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                return None;
            }
            if !c.is_ascii_digit() && !sep(*c) {
                return None;
            }
        }
        (10, body)
    };
    let clean: String = digits_text.chars().filter(|c| *c != '_' && *c != ',').collect();
    let magnitude = u128::from_str_radix(&clean, radix).ok()?;
    if negative {
        i64::try_from(magnitude).ok().map(|m| Value::from(-m)).or_else(|| big(magnitude, true))
    } else {
        u64::try_from(magnitude).ok().map(Value::from).or_else(|| big(magnitude, false))
    }
}

/// A Ruby Bignum: JSON numbers past 64 bits are read as floats.
fn big(magnitude: u128, negative: bool) -> Option<Value> {
    let f = magnitude as f64;
    Number::from_f64(if negative { -f } else { f }).map(Value::Number)
}
