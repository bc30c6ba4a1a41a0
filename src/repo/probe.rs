//! Whether an http(s) remote has anything new, in one request: git's protocol v2 `ls-refs` with
//! a `ref-prefix` for the tracked branch, sent straight to `POST <url>/git-upload-pack`.
//!
//! A fetch over smart HTTP begins with two requests: the capability advertisement
//! (`GET info/refs?service=git-upload-pack`), then `ls-refs`. A git server behind CGI (GitLab's
//! workhorse, `git http-backend`) starts processes for each, and for an idle project (nothing
//! new, the common case on every tick) the pair is all the work there is. Protocol v2 is
//! stateless, so `ls-refs` needs no advertisement first: this asks it alone, and when the
//! branch's tip is the mirror's, the fetch is done.
//!
//! Invariants:
//! - the probe only ever says "nothing new": any other answer (a tip that differs, no such
//!   branch, a 401, a redirect, a server that does not speak protocol v2, anything that does
//!   not parse exactly) makes the caller fetch as before, which reports errors as it always did;
//! - the token goes only to the configured URL: redirects are not followed, and URLs with
//!   credentials, a query or a fragment are not probed;
//! - the answer is read up to [`MAX_ANSWER_BYTES`] and within the fetch's deadline.

use crate::tls::TlsSettings;
use gix::ObjectId;
use std::io::Read;
use std::time::Duration;

/// An `ls-refs` answer for one branch is one line and a flush; more means it is not that.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

/// The server did not answer the probe within the fetch's deadline: a stalled server, reported
/// as the fetch's deadline (a fetch after it would only wait again).
#[derive(Debug, thiserror::Error)]
#[error("ls-refs did not finish within {}", humantime::format_duration(*.0))]
pub struct Stalled(pub Duration);

/// The tip of `refs/heads/<branch>` as the server's `ls-refs` reports it, or None when it cannot
/// be told this way (see the module's invariants).
pub fn advertised_tip(
    url: &str,
    branch: &str,
    token: Option<&str>,
    tls: &TlsSettings,
    deadline: Duration,
) -> Result<Option<ObjectId>, Stalled> {
    let Some(endpoint) = endpoint(url) else { return Ok(None) };
    let Some(config) = tls.load().ok().and_then(|t| t.ureq_config().ok()) else { return Ok(None) };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(config)
        .timeout_global(Some(deadline))
        .max_redirects(0)
        .max_redirects_will_error(false)
        .http_status_as_error(false)
        .user_agent(concat!("git/2.0 (policy-audit/", env!("CARGO_PKG_VERSION"), ")"))
        .build()
        .into();
    let mut request = agent
        .post(endpoint)
        .header("Content-Type", "application/x-git-upload-pack-request")
        .header("Accept", "application/x-git-upload-pack-result")
        .header("Git-Protocol", "version=2");
    if let Some(token) = token {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{token}"));
        request = request.header("Authorization", format!("Basic {basic}"));
    }
    let response = match request.send(&ls_refs_request(branch)[..]) {
        Ok(response) => response,
        Err(ureq::Error::Timeout(_)) => return Err(Stalled(deadline)),
        Err(_) => return Ok(None),
    };
    let result_type = response
        .headers()
        .get("content-type")
        .and_then(|t| t.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-git-upload-pack-result"));
    if response.status() != 200 || !result_type {
        return Ok(None);
    }
    let mut answer = Vec::new();
    match response.into_body().into_reader().take(MAX_ANSWER_BYTES + 1).read_to_end(&mut answer) {
        Ok(_) if answer.len() as u64 <= MAX_ANSWER_BYTES => Ok(tip_in(&answer, &format!("refs/heads/{branch}"))),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(Stalled(deadline)),
        _ => Ok(None),
    }
}

/// `<url>/git-upload-pack`, for plain http(s) URLs without credentials, query or fragment.
fn endpoint(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let plain = matches!(parsed.scheme(), "http" | "https")
        && parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.query().is_none()
        && parsed.fragment().is_none();
    plain.then(|| format!("{}/git-upload-pack", url.trim_end_matches('/')))
}

/// One pkt-line: four hex digits of length (the four included), then the payload.
fn pkt_line(out: &mut Vec<u8>, payload: &str) {
    out.extend_from_slice(format!("{:04x}", payload.len() + 4).as_bytes());
    out.extend_from_slice(payload.as_bytes());
}

/// `command=ls-refs`, a delimiter, the branch's exact name as the only prefix, a flush: the
/// probe's whole request body (public for the benchmark, which measures what a server takes to
/// answer it).
pub fn ls_refs_request(branch: &str) -> Vec<u8> {
    let mut out = Vec::new();
    pkt_line(&mut out, "command=ls-refs\n");
    pkt_line(&mut out, concat!("agent=policy-audit/", env!("CARGO_PKG_VERSION"), "\n"));
    out.extend_from_slice(b"0001");
    pkt_line(&mut out, &format!("ref-prefix refs/heads/{branch}\n"));
    out.extend_from_slice(b"0000");
    out
}

/// The id `name` has in an `ls-refs` answer: pkt-lines of `<oid> <refname>[ <attribute>]*`,
/// ended by a flush and nothing after it. None for anything else.
fn tip_in(answer: &[u8], name: &str) -> Option<ObjectId> {
    let mut rest = answer;
    let mut found = None;
    loop {
        let len = usize::from_str_radix(std::str::from_utf8(rest.get(..4)?).ok()?, 16).ok()?;
        if len == 0 {
            return if rest.len() == 4 { found } else { None };
        }
        let payload = rest.get(4..len)?;
        rest = &rest[len..];
        let line = std::str::from_utf8(payload).ok()?;
        // The newline is optional in the protocol.
        let line = line.strip_suffix('\n').unwrap_or(line);
        let mut fields = line.split(' ');
        let id = ObjectId::from_hex(fields.next()?.as_bytes()).ok()?;
        let refname = fields.next()?;
        if refname == name {
            found = Some(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "1111111111111111111111111111111111111111";

    fn answer(lines: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            pkt_line(&mut out, l);
        }
        out.extend_from_slice(b"0000");
        out
    }

    #[test]
    fn the_request_is_the_pkt_lines_git_sends() {
        let request = String::from_utf8(ls_refs_request("main")).expect("ascii");
        assert!(request.starts_with("0014command=ls-refs\n"), "{request}");
        assert!(request.ends_with("0001001fref-prefix refs/heads/main\n0000"), "{request}");
    }

    #[test]
    fn the_tip_is_read_only_from_an_exact_answer() {
        let main = format!("{SHA} refs/heads/main\n");
        let id = ObjectId::from_hex(SHA.as_bytes()).expect("sha");
        assert_eq!(tip_in(&answer(&[&main]), "refs/heads/main"), Some(id));
        // A longer name under the same prefix is not the branch.
        let other = format!("{SHA} refs/heads/main-old\n");
        assert_eq!(tip_in(&answer(&[&other]), "refs/heads/main"), None);
        assert_eq!(tip_in(&answer(&[&other, &main]), "refs/heads/main"), Some(id));
        assert_eq!(tip_in(&answer(&[]), "refs/heads/main"), None, "no such branch: the fetch says so");
        // Not an ls-refs answer: a v0 advertisement, trailing bytes, a cut answer, garbage.
        assert_eq!(tip_in(b"001e# service=git-upload-pack\n0000", "refs/heads/main"), None);
        let mut trailing = answer(&[&main]);
        trailing.extend_from_slice(b"0000");
        assert_eq!(tip_in(&trailing, "refs/heads/main"), None);
        let full = answer(&[&main]);
        assert_eq!(tip_in(&full[..full.len() - 4], "refs/heads/main"), None);
        assert_eq!(tip_in(b"<html>", "refs/heads/main"), None);
        assert_eq!(tip_in(b"", "refs/heads/main"), None);
    }

    #[test]
    fn only_plain_http_urls_are_probed() {
        assert_eq!(
            endpoint("https://gitlab.example.com/acme/spp.git").as_deref(),
            Some("https://gitlab.example.com/acme/spp.git/git-upload-pack")
        );
        assert_eq!(
            endpoint("http://127.0.0.1:8080/spp/").as_deref(),
            Some("http://127.0.0.1:8080/spp/git-upload-pack")
        );
        assert_eq!(endpoint("https://user:secret@gitlab.example.com/acme/spp.git"), None);
        assert_eq!(endpoint("https://gitlab.example.com/acme/spp.git?x=1"), None);
        assert_eq!(endpoint("file:///srv/spp.git"), None);
        assert_eq!(endpoint("/srv/spp.git"), None);
    }
}
