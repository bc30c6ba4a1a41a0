//! Every decision the program makes about a configured URL — is it http(s), which scheme, which
//! host, is that host this machine, which repository is it — made on one parse: `url::Url`
//! (WHATWG URL parsing: scheme and host lowercased, `.`/`..` resolved, IP forms normalised).
//!
//! Invariant: a secret may go over plain http only to this machine. The HTTP client (ureq)
//! does not use `url::Url`: it parses with the `http` crate's `Uri` (RFC 3986), and the two
//! parsers differ on some spellings (`http://127.1` is 127.0.0.1 to `url`, the name "127.1" to
//! `Uri`; a backslash ends the host for `url` and is an error for `Uri`). So [`is_loopback`]
//! says yes only when BOTH parsers find a loopback host (`localhost`, 127.0.0.0/8, `[::1]`):
//! whatever the client connects to is then this machine. Spellings where they disagree are
//! treated as remote, which only ever asks for https, never sends a secret. Not loopback here:
//! `localhost.` (a resolver's business, not ours), `127.0.0.1.evil.com`, `[::ffff:127.0.0.1]`.
//! Userinfo (`http://evil@127.0.0.1`) is not the host: both parsers agree that is 127.0.0.1.

use std::net::IpAddr;
use url::{Host, Url};

/// `text` parsed as a URL when it is written as one (`scheme://...`); None for a local path,
/// an scp-like `user@host:path`, or text that has no `://`.
pub fn parse(text: &str) -> Option<Result<Url, url::ParseError>> {
    text.trim().contains("://").then(|| Url::parse(text.trim()))
}

/// `text` without the `user:password@` of its authority, when `text` is a URL (`Some`, in the
/// parser's normal spelling when there was userinfo to remove, unchanged otherwise); None for
/// text the parser does not read as a URL.
pub fn without_userinfo(text: &str) -> Option<String> {
    let mut url = parse(text)?.ok()?;
    if url.username().is_empty() && url.password().is_none() {
        return Some(text.to_string());
    }
    url.set_password(None).ok()?;
    url.set_username("").ok()?;
    Some(url.into())
}

/// The local path of a repository on this machine: `text` itself when it is a path, the path of
/// a `file://` URL; None for any other URL.
pub fn local_path(text: &str) -> Option<std::path::PathBuf> {
    match parse(text) {
        None => Some(std::path::PathBuf::from(text.trim())),
        Some(Ok(url)) if url.scheme() == "file" => url.to_file_path().ok(),
        Some(_) => None,
    }
}

/// Whether `text` is an https URL (in any spelling of the scheme).
pub fn is_https(text: &str) -> bool {
    web(text).is_some_and(|u| u.scheme() == "https")
}

/// `text` as an http or https URL with a host; None when it is not one.
pub fn web(text: &str) -> Option<Url> {
    let url = parse(text)?.ok()?;
    (matches!(url.scheme(), "http" | "https") && url.host_str().is_some_and(|h| !h.is_empty())).then_some(url)
}

/// Whether `text` is a plain (unencrypted) http URL, in any spelling of the scheme
/// (`HTTP://` too: the client accepts it).
pub fn is_plain_http(text: &str) -> bool {
    web(text).is_some_and(|u| u.scheme() == "http")
}

/// Whether the host of the http(s) URL `text` is this machine, as both `url::Url` and the HTTP
/// client's parser (`http::Uri`) read it (see the module header).
pub fn is_loopback(text: &str) -> bool {
    let Some(url) = web(text) else { return false };
    let ours = match url.host() {
        Some(Host::Domain(d)) => d == "localhost",
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    ours && client_host(text).is_some_and(|h| is_loopback_name(&h))
}

/// The host the HTTP client would connect to, as `http::Uri` parses `text` (brackets of an IPv6
/// literal removed).
fn client_host(text: &str) -> Option<String> {
    let uri: http::Uri = text.trim().parse().ok()?;
    let host = uri.host()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Some(host.to_string())
}

fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {

    #[test]
    fn local_paths_and_file_urls_name_a_directory_and_other_urls_none() {
        use std::path::PathBuf;
        assert_eq!(local_path("/srv/git/spp"), Some(PathBuf::from("/srv/git/spp")));
        assert_eq!(local_path("file:///srv/git/spp"), Some(PathBuf::from("/srv/git/spp")));
        assert_eq!(local_path("FILE:///srv/git/a%20b"), Some(PathBuf::from("/srv/git/a b")));
        assert_eq!(local_path("https://gitlab.example.com/a/b.git"), None);
        assert!(is_https("HTTPS://siem.example.com/x"));
        assert!(!is_https("http://siem.example.com/x"));
    }
    use super::*;

    #[test]
    fn loopback_is_what_both_parsers_call_this_machine() {
        for yes in [
            "http://127.0.0.1:8080/x",
            "http://127.5.6.7/",
            "http://localhost/x",
            "http://LocalHost:1/",
            "http://[::1]/x",
            "http://[::1]:9000",
            "HTTP://127.0.0.1/",
            "http://evil@127.0.0.1/",
            "http://user:pw@localhost/",
            "  http://127.0.0.1/  ",
        ] {
            assert!(is_loopback(yes), "{yes} should be loopback");
        }
        for no in [
            "http://127.0.0.1.evil.com/",
            "http://localhost./",
            "http://localhost.evil.com/",
            "http://127.0.0.1@evil.com/",
            "http://127.0.0.1:80@evil.com/",
            "http://evil.com#@127.0.0.1",
            "http://evil.com?@127.0.0.1",
            "http://evil.com/@127.0.0.1",
            "http://localhost\\@evil.com/",
            "http://[::ffff:127.0.0.1]/",
            // 127.0.0.1 to `url`, a name to the client's `Uri`: the parsers disagree, so remote.
            "http://127.1/",
            "http://0x7f000001/",
            "http://10.0.0.1/",
            "http://example.com/",
            "ftp://127.0.0.1/",
            "127.0.0.1",
            "http://",
        ] {
            assert!(!is_loopback(no), "{no} should not be loopback");
        }
    }

    #[test]
    fn plain_http_is_found_in_any_spelling_of_the_scheme() {
        assert!(is_plain_http("http://siem.example.com/x"));
        assert!(is_plain_http("HTTP://siem.example.com/x"));
        assert!(is_plain_http("Http://siem.example.com/x"));
        assert!(!is_plain_http("https://siem.example.com/x"));
        assert!(!is_plain_http("HTTPS://siem.example.com/x"));
        assert!(!is_plain_http("/srv/repos/spp"));
    }

    #[test]
    fn web_urls_need_an_http_scheme_and_a_host() {
        assert_eq!(
            web("https://GitLab.Example.com/a").map(|u| u.host_str().map(str::to_string)),
            Some(Some("gitlab.example.com".into()))
        );
        for not_web in ["ftp://h/x", "file:///srv/spp", "https://", "siem.example.com", "https://exa mple.com/", ""] {
            assert!(web(not_web).is_none(), "{not_web:?} is not a web URL");
        }
    }

    #[test]
    fn userinfo_is_what_the_parser_calls_userinfo() {
        let cases = [
            ("https://oauth2:glpat-x@gitlab.example.com/a/b.git", "https://gitlab.example.com/a/b.git"),
            ("https://user:p@ss@gitlab.example.com/a", "https://gitlab.example.com/a"),
            ("https://tok@h/x", "https://h/x"),
            ("https://:pw@h/x", "https://h/x"),
            ("https://h/a@b", "https://h/a@b"),
            ("https://h/x?u=a:b@c", "https://h/x?u=a:b@c"),
            ("HTTPS://GitLab.Example.com/a", "HTTPS://GitLab.Example.com/a"),
        ];
        for (input, want) in cases {
            assert_eq!(without_userinfo(input).as_deref(), Some(want), "{input}");
        }
        assert_eq!(without_userinfo("/srv/repos/spp"), None);
        assert_eq!(without_userinfo("https://u:p@exa mple.com/"), None);
    }

    #[test]
    fn only_text_written_as_a_url_is_parsed_as_one() {
        assert!(parse("/srv/repos/spp").is_none());
        assert!(parse("git@gitlab.example.com:acme/spp.git").is_none());
        assert!(matches!(parse("ssh://git@h/x"), Some(Ok(u)) if u.scheme() == "ssh"));
        assert!(matches!(parse("SSH://git@h/x"), Some(Ok(u)) if u.scheme() == "ssh"));
        assert!(matches!(parse("https://exa mple.com/"), Some(Err(_))));
    }
}
