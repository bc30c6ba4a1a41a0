//! Reading a commit object as leniently as git does: an identity without an email, odd spacing
//! around it, a time that is missing or absurd, and names in the encoding the commit's
//! `encoding` header names (Latin-1 from old imports). gix refuses some of these outright; one
//! odd commit in a mirrored history must not stop a project forever.

use gix::ObjectId;

/// An author or committer line, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub email: String,
    /// Unix seconds; None when the line has no time or one no calendar can show.
    pub seconds: Option<i64>,
    /// The time as written, for reporting an unreadable one.
    pub raw_time: String,
}

/// The fields of a commit object events need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCommit {
    pub tree: Option<ObjectId>,
    pub first_parent: Option<ObjectId>,
    pub author: Identity,
    pub committer: Identity,
    pub message: String,
}

/// Parses the bytes of a commit object. Never fails on the identities or the message; the
/// caller checks that the tree is there.
pub fn parse(data: &[u8]) -> RawCommit {
    let (headers, message) = match find(data, b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let mut tree = None;
    let mut first_parent = None;
    let mut author: &[u8] = b"";
    let mut committer: &[u8] = b"";
    let mut encoding: Option<&[u8]> = None;
    for line in headers.split(|b| *b == b'\n') {
        if line.starts_with(b" ") {
            continue; // continuation of a multi-line header (gpgsig, mergetag)
        }
        let (key, value) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        match key {
            b"tree" if tree.is_none() => tree = ObjectId::from_hex(trim(value)).ok(),
            b"parent" if first_parent.is_none() => first_parent = ObjectId::from_hex(trim(value)).ok(),
            b"author" if author.is_empty() => author = value,
            b"committer" if committer.is_empty() => committer = value,
            b"encoding" if encoding.is_none() => encoding = Some(trim(value)),
            _ => {}
        }
    }
    let decoder = decoder(encoding);
    RawCommit {
        tree,
        first_parent,
        author: identity(author, decoder),
        committer: identity(committer, decoder),
        message: decode(message, decoder),
    }
}

/// The encoding named by the header (None: UTF-8, as git assumes).
fn decoder(label: Option<&[u8]>) -> Option<&'static encoding_rs::Encoding> {
    label.and_then(encoding_rs::Encoding::for_label).filter(|e| *e != encoding_rs::UTF_8)
}

/// Bytes as text: in the commit's declared encoding, else UTF-8, else (old imports that
/// declare nothing) Windows-1252, the superset of Latin-1 git tools fall back to.
fn decode(bytes: &[u8], encoding: Option<&'static encoding_rs::Encoding>) -> String {
    if let Some(e) = encoding {
        return e.decode_without_bom_handling(bytes).0.into_owned();
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => encoding_rs::WINDOWS_1252.decode_without_bom_handling(bytes).0.into_owned(),
    }
}

/// `Name <email> 1700000000 +0100`, as git's `split_ident_line` reads it, and more leniently:
/// no `<email>` at all leaves the email empty and the name before the time.
fn identity(line: &[u8], encoding: Option<&'static encoding_rs::Encoding>) -> Identity {
    let (name, email, time) = match (line.iter().position(|b| *b == b'<'), line.iter().rposition(|b| *b == b'>')) {
        (Some(open), Some(close)) if close > open => (&line[..open], &line[open + 1..close], &line[close + 1..]),
        (Some(open), _) => {
            let (email, time) = split_time(&line[open + 1..]);
            (&line[..open], email, time)
        }
        (None, _) => {
            let (name, time) = split_time(line);
            (name, &[][..], time)
        }
    };
    let raw_time = String::from_utf8_lossy(trim(time)).into_owned();
    Identity {
        name: decode(trim(name), encoding).trim().to_string(),
        email: decode(trim(email), encoding).trim().to_string(),
        seconds: seconds(&raw_time),
        raw_time,
    }
}

/// Splits `text 1700000000 +0100` at the trailing time (the tokens made of digits and signs).
fn split_time(text: &[u8]) -> (&[u8], &[u8]) {
    let is_time = |t: &[u8]| !t.is_empty() && t.iter().all(|b| b.is_ascii_digit() || *b == b'+' || *b == b'-');
    let mut cut = text.len();
    for _ in 0..2 {
        let head = trim_end(&text[..cut]);
        let start = head.iter().rposition(|b| b.is_ascii_whitespace()).map(|i| i + 1).unwrap_or(0);
        if !is_time(&head[start..]) {
            break;
        }
        cut = start;
    }
    (&text[..cut], &text[cut..])
}

/// The seconds of a git time (`1700000000 +0100`), or None when they are missing, not a
/// number, or outside the years a timestamp can show (-9999..=9999).
fn seconds(time: &str) -> Option<i64> {
    let secs: i64 = time.split_whitespace().next()?.parse().ok()?;
    jiff::Timestamp::from_second(secs).ok().map(|_| secs)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    trim_end(&bytes[start..])
}

fn trim_end(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map(|i| i + 1).unwrap_or(0);
    &bytes[..end]
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(line: &[u8]) -> Identity {
        identity(line, None)
    }

    #[test]
    fn identities_are_read_like_git_reads_them() {
        let plain = id(b"Alice Example <alice@example.com> 1700000000 +0100");
        assert_eq!(
            (plain.name.as_str(), plain.email.as_str(), plain.seconds),
            ("Alice Example", "alice@example.com", Some(1700000000))
        );
        let no_email = id(b"Importer Bot 1700000000 +0000");
        assert_eq!(
            (no_email.name.as_str(), no_email.email.as_str(), no_email.seconds),
            ("Importer Bot", "", Some(1700000000))
        );
        let spaced = id(b"  Bob   <  bob@example.com >   1700000000   -0230");
        assert_eq!(
            (spaced.name.as_str(), spaced.email.as_str(), spaced.seconds),
            ("Bob", "bob@example.com", Some(1700000000))
        );
        let empty = id(b"<> 5 +0000");
        assert_eq!((empty.name.as_str(), empty.email.as_str(), empty.seconds), ("", "", Some(5)));
        let unclosed = id(b"Carol <carol@example.com 1700000000 +0000");
        assert_eq!((unclosed.name.as_str(), unclosed.email.as_str()), ("Carol", "carol@example.com"));
    }

    #[test]
    fn absurd_or_missing_times_are_none() {
        assert_eq!(id(b"A <a@b> 99999999999999999 +0000").seconds, None);
        assert_eq!(id(b"A <a@b>").seconds, None);
        assert_eq!(id(b"A <a@b> soon +0000").seconds, None);
        assert_eq!(id(b"A <a@b> 0 +0000").seconds, Some(0));
    }

    #[test]
    fn the_encoding_header_decides_how_names_read() {
        let data = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\nauthor Jos\xe9 <j@x> 1 +0000\ncommitter Jos\xe9 <j@x> 1 +0000\nencoding ISO-8859-1\n\nd\xe9j\xe0 vu\n";
        let c = parse(data);
        assert_eq!(c.author.name, "José");
        assert_eq!(c.message, "déjà vu\n");
        assert!(c.tree.is_some());
        let utf8 = parse(
            "tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\nauthor José <j@x> 1 +0000\ncommitter J <j@x> 1 +0000\n\nm"
                .as_bytes(),
        );
        assert_eq!(utf8.author.name, "José");
    }
}
