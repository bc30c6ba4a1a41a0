//! Fetching the tracked branch into a mirror, with a deadline and without persisting
//! credentials.

use super::Mirror;
use crate::config::Secret;
use crate::tls::TlsSettings;
use anyhow::{Context, Result, anyhow, bail};
use gix::ObjectId;
use gix::remote::Direction;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchOutcome {
    /// The tip of the tracked branch as the remote advertised it.
    pub tip: ObjectId,
}

/// Fetches `branch` from `url` into the mirror's `refs/remotes/origin/<branch>`.
///
/// The fetch runs on its own thread; when `deadline` passes it is told to stop and this returns
/// an error at once, so a server that stalls cannot hold up the other projects.
/// `stop` (shutdown) ends the wait early, like the deadline does.
pub fn fetch(
    mirror: &Mirror,
    url: &str,
    token: Option<&Secret>,
    tls: &TlsSettings,
    deadline: Duration,
    stop: &crate::stop::Stop,
) -> Result<FetchOutcome> {
    let repo = mirror.repo.clone();
    let tls = tls.clone();
    let branch = mirror.branch.clone();
    let url_owned = url.to_string();
    let token = token.map(|t| t.expose().to_string());
    let what = format!("fetch of branch {:?} from {}", mirror.branch, redact_url(url));
    on_fetch_thread(&mirror.dir, url, deadline, stop, what, move |flag| {
        let remote = Remote { url: &url_owned, branch: &branch, token: token.as_deref(), tls: &tls };
        let mut result = fetch_blocking(repo.clone(), &remote, deadline, flag, false);
        // Negotiation reads the mirror's commits with gix's strict signature parser: one odd
        // commit (an author without an email, as git itself accepts) fails it on every run.
        // Then fetch once more without negotiation (the whole branch), which reads none of them.
        if let Err(e) = &result
            && e.downcast_ref::<ReceiveFailed>().is_some()
            && !flag.load(Ordering::SeqCst)
            && local_tip(&repo, &branch).is_some()
        {
            tracing::warn!(
                url = %redact_url(&url_owned),
                error = %crate::text::redact_urls(&format!("{e:#}")),
                "fetch failed; fetching the whole branch once more without negotiation"
            );
            result = fetch_blocking(repo, &remote, deadline, flag, true);
        }
        result
    })
}

/// Fetches the remote's `HEAD` and the named refs (`refs/heads/..`, `refs/tags/..`) into the
/// mirror, each under [`tracking_name`], in one fetch with the same deadline, TLS and token
/// rules as [`fetch`]. Returns what the remote advertised for each of them (a name it does not
/// have is simply absent: a missing ref is the caller's to report, not a failed fetch).
pub fn fetch_refs(
    mirror: &Mirror,
    url: &str,
    token: Option<&Secret>,
    tls: &TlsSettings,
    deadline: Duration,
    stop: &crate::stop::Stop,
    refs: &[String],
) -> Result<Vec<(String, ObjectId)>> {
    let mut repo = mirror.repo.clone();
    let tls = tls.clone();
    let url_owned = url.to_string();
    let token = token.map(|t| t.expose().to_string());
    let mut names = vec!["HEAD".to_string()];
    names.extend(refs.iter().filter(|r| r.as_str() != "HEAD").cloned());
    let what = format!("fetch of {} from {}", names.join(", "), redact_url(url));
    on_fetch_thread(&mirror.dir, url, deadline, stop, what, move |flag| {
        configure(&mut repo, deadline, false)?;
        let refspecs: Vec<String> = names.iter().map(|n| format!("+{n}:{}", tracking_name(n))).collect();
        with_prepared(&repo, &url_owned, token.as_deref(), &tls, &refspecs, |prepared| {
            let advertised = |map: &gix::remote::fetch::RefMap| -> Vec<(String, ObjectId)> {
                map.mappings
                    .iter()
                    .filter_map(|m| {
                        let name = m.remote.as_name()?.to_string();
                        let id = m.remote.as_id()?.to_owned();
                        names.contains(&name).then_some((name, id))
                    })
                    .collect()
            };
            let offered = advertised(prepared.ref_map());
            // Nothing new: every advertised ref is where the mirror has it.
            if offered.iter().all(|(name, id)| tracked(&repo, &tracking_name(name)) == Some(*id)) {
                return Ok(offered);
            }
            let outcome = prepared
                .receive(gix::progress::Discard, flag)
                .map_err(|e| anyhow::Error::new(ReceiveFailed(format!("{:#}", anyhow::Error::new(e)))))?;
            Ok(advertised(&outcome.ref_map))
        })
    })
}

/// Where [`fetch_refs`] keeps a remote ref in the mirror.
pub fn tracking_name(remote: &str) -> String {
    match (remote.strip_prefix("refs/heads/"), remote.strip_prefix("refs/tags/")) {
        (Some(branch), _) => format!("refs/remotes/origin/{branch}"),
        (_, Some(tag)) => format!("refs/remotes/origin-tags/{tag}"),
        _ => format!("refs/remotes/origin/{remote}"),
    }
}

/// Runs a fetch on its own thread; when `deadline` passes it is told to stop (the flag) and
/// this returns an error at once, so a server that stalls cannot hold up the other projects.
/// `stop` (shutdown) ends the wait early, like the deadline does.
fn on_fetch_thread<T: Send + 'static>(
    dir: &std::path::Path,
    url: &str,
    deadline: Duration,
    stop: &crate::stop::Stop,
    what: String,
    job: impl FnOnce(&AtomicBool) -> Result<T> + Send + 'static,
) -> Result<T> {
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupt);
    let (tx, rx) = mpsc::channel();
    let dir = dir.to_path_buf();
    in_flight_set().insert(dir.clone());
    let running = dir.clone();
    let spawned = std::thread::Builder::new().name("fetch".into()).spawn(move || {
        let result = job(&flag);
        in_flight_set().remove(&running);
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        in_flight_set().remove(&dir);
        return Err(e).context("cannot start fetch thread");
    }
    let until = std::time::Instant::now() + deadline;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(result) => {
                // The transport's own messages may quote the URL with its credentials.
                return result
                    .map_err(|e| anyhow!("{}", crate::text::redact_urls(&format!("{:#}", explain_tls(e)))))
                    .context(what);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() < until && !stop.is_cancelled() => {}
            Err(_) => {
                interrupt.store(true, Ordering::SeqCst);
                if stop.is_cancelled() {
                    bail!("fetch from {} stopped by shutdown", redact_url(url));
                }
                bail!("fetch from {} did not finish within {}", redact_url(url), humantime::format_duration(deadline))
            }
        }
    }
}

/// Where a fetch goes and how it authenticates.
struct Remote<'a> {
    url: &'a str,
    branch: &'a str,
    token: Option<&'a str>,
    tls: &'a TlsSettings,
}

fn fetch_blocking(
    mut repo: gix::Repository,
    remote: &Remote<'_>,
    deadline: Duration,
    interrupt: &AtomicBool,
    without_negotiation: bool,
) -> Result<FetchOutcome> {
    let Remote { url, branch, token, tls } = *remote;
    // Nothing new, told in one request (http(s) only; anything else is the fetch's to say).
    if !without_negotiation
        && let Some(tip) = super::probe::advertised_tip(url, branch, token, tls, deadline)?
        && local_tip(&repo, branch) == Some(tip)
    {
        return Ok(FetchOutcome { tip });
    }
    configure(&mut repo, deadline, without_negotiation)?;
    let refspec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
    with_prepared(&repo, url, token, tls, &[refspec], |prepared| {
        // The branch must be advertised: asked for by name, gix's typed answer is an unmatched
        // required mapping (its receive would fail with "None of the refspec(s) ... matched").
        if prepared.ref_map().is_missing_required_mapping() {
            return Err(anyhow::Error::new(BranchMissing { branch: branch.to_string() }));
        }
        let wanted = format!("refs/heads/{branch}");
        let tracking = format!("refs/remotes/origin/{branch}");
        let advertised = prepared
            .ref_map()
            .mappings
            .iter()
            .find(|m| m.remote.as_name().is_some_and(|n| n == wanted.as_bytes()))
            .and_then(|m| m.remote.as_id().map(|id| id.to_owned()));
        let before = local_tip(&repo, branch);
        // Nothing new: no negotiation at all (it would read the tip commit, odd or not).
        if let Some(tip) = advertised
            && before == Some(tip)
        {
            return Ok(FetchOutcome { tip });
        }
        // Without negotiation the mirror's own tip must not be read either: the ref is set again
        // by the fetch, or put back when it fails.
        if without_negotiation && before.is_some() {
            set_tracking_ref(&repo, &tracking, None)?;
        }
        let received = prepared
            .receive(gix::progress::Discard, interrupt)
            .map_err(|e| anyhow::Error::new(ReceiveFailed(format!("{:#}", anyhow::Error::new(e)))));
        if received.is_err()
            && let Some(before) = before.filter(|_| without_negotiation)
        {
            set_tracking_ref(&repo, &tracking, Some(before))?;
        }
        let outcome = received?;
        let tip = outcome
            .ref_map
            .mappings
            .iter()
            .find(|m| m.remote.as_name().is_some_and(|n| n == wanted.as_bytes()))
            .and_then(|m| m.remote.as_id().map(|id| id.to_owned()));
        tip.map(|tip| FetchOutcome { tip })
            .ok_or_else(|| anyhow::Error::new(BranchMissing { branch: branch.to_string() }))
    })
}

/// The mirror's config for one fetch, in memory only: a slow HTTP transfer is abandoned like a
/// stalled one, and no credential helper or prompt is ever consulted.
fn configure(repo: &mut gix::Repository, deadline: Duration, without_negotiation: bool) -> Result<()> {
    let secs = deadline.as_secs().max(1);
    let mut config = repo.config_snapshot_mut();
    let mut settings = vec![
        "http.lowSpeedLimit=1".to_string(),
        format!("http.lowSpeedTime={secs}"),
        format!("gitoxide.http.connectTimeout={}", secs * 1000),
        "credential.helper=".to_string(),
        "core.askPass=".to_string(),
    ];
    if without_negotiation {
        settings.push("fetch.negotiationAlgorithm=noop".to_string());
    }
    config.append_config(settings, gix::config::Source::Api).map_err(anyhow::Error::new)?;
    config.commit().map_err(anyhow::Error::new)?;
    Ok(())
}

/// Connects for `refspecs` (no tags beyond them) with the TLS policy and the configured token
/// only, and hands the prepared fetch (the remote's advertised refs, nothing received yet) to `f`.
fn with_prepared<T>(
    repo: &gix::Repository,
    url: &str,
    token: Option<&str>,
    tls: &TlsSettings,
    refspecs: &[String],
    f: impl FnOnce(Prepared<'_, '_>) -> Result<T>,
) -> Result<T> {
    let remote = repo
        .remote_at(url)
        .map_err(anyhow::Error::new)
        .context("invalid repository url")?
        .with_refspecs(refspecs.iter().map(String::as_str), Direction::Fetch)
        .map_err(|e| anyhow!("invalid refspecs {refspecs:?}: {e}"))?
        .with_fetch_tags(gix::remote::fetch::Tags::None);
    let connection = remote.connect(Direction::Fetch).map_err(anyhow::Error::new).context("cannot connect")?;
    let connection = match transport_options(repo, url, tls)? {
        Some(options) => connection.with_transport_options(options),
        None => connection,
    };
    // Never prompt and never consult credential helpers: the configured token or nothing.
    let token = token.map(str::to_string);
    let connection = connection.with_credentials(move |action| match (&action, &token) {
        (gix::credentials::helper::Action::Get(ctx), Some(token)) => Ok(Some(gix::credentials::protocol::Outcome {
            identity: gix::sec::identity::Account {
                username: "oauth2".into(),
                password: token.to_string(),
                oauth_refresh_token: None,
            },
            next: ctx.clone().into(),
        })),
        _ => Ok(None),
    });
    let prepared = connection.prepare_fetch(gix::progress::Discard, Default::default()).map_err(anyhow::Error::new)?;
    f(prepared)
}

type Prepared<'remote, 'repo> = gix::remote::fetch::Prepare<
    'remote,
    'repo,
    Box<dyn gix::protocol::transport::client::blocking_io::Transport + Send>,
>;

/// A fetch that failed in the TLS handshake says so first, with the setting that fixes it.
fn explain_tls(e: anyhow::Error) -> anyhow::Error {
    match e.chain().find_map(crate::tls::handshake_problem) {
        Some(problem) => e.context(problem),
        None => e,
    }
}

/// gix's options for an http(s) URL as the repository config makes them (timeouts), with the
/// reqwest client built on [`crate::tls`]'s trust policy instead of its own: the same roots and
/// client certificate as the HTTP destinations. None for other transports.
fn transport_options(repo: &gix::Repository, url: &str, tls: &TlsSettings) -> Result<Option<Box<dyn std::any::Any>>> {
    use gix_transport::client::blocking_io::http;
    let Some(mut options) = repo.transport_options(url, None).map_err(|e| anyhow!("{e}"))? else {
        return Ok(None);
    };
    let Some(http_options) = options.downcast_mut::<http::Options>() else {
        return Ok(Some(options));
    };
    let config = tls.load()?.rustls_config()?;
    let backend = http::reqwest::Options {
        configure_client: Some(Box::new(move |builder| Ok(builder.tls_backend_preconfigured(config.clone())))),
        configure_request: None,
    };
    http_options.backend = Some(Arc::new(std::sync::Mutex::new(backend)));
    Ok(Some(options))
}

/// The tracked branch is not on the remote (wrong `branch`, or it was deleted).
#[derive(Debug, thiserror::Error)]
#[error("branch {branch:?} does not exist in the repository")]
pub struct BranchMissing {
    pub branch: String,
}

/// The server answered and the negotiation or the pack transfer failed (not the connection or
/// the ref advertisement): the one failure a fetch without negotiation may get past.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ReceiveFailed(String);

/// The mirror's tracking ref, if it is set.
fn local_tip(repo: &gix::Repository, branch: &str) -> Option<ObjectId> {
    tracked(repo, &format!("refs/remotes/origin/{branch}"))
}

/// What a ref of the mirror points at, as stored (an annotated tag is not peeled).
fn tracked(repo: &gix::Repository, name: &str) -> Option<ObjectId> {
    let reference = repo.try_find_reference(name).ok()??;
    reference.target().try_id().map(|id| id.to_owned())
}

/// Sets (Some) or removes (None) the mirror's tracking ref.
fn set_tracking_ref(repo: &gix::Repository, name: &str, to: Option<ObjectId>) -> Result<()> {
    match to {
        Some(id) => {
            repo.reference(
                name,
                id,
                gix::refs::transaction::PreviousValue::Any,
                "policy-audit: restore after a failed fetch",
            )
            .map_err(anyhow::Error::new)
            .with_context(|| format!("cannot restore {name}"))?;
        }
        None => {
            if let Some(r) = repo.try_find_reference(name).map_err(anyhow::Error::new)? {
                r.delete().map_err(anyhow::Error::new).with_context(|| format!("cannot remove {name}"))?;
            }
        }
    }
    Ok(())
}

/// Mirrors with a fetch thread still running in this process (one that passed its deadline
/// keeps running until its transport gives up).
fn in_flight_set() -> std::sync::MutexGuard<'static, std::collections::HashSet<std::path::PathBuf>> {
    static SET: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>> =
        std::sync::LazyLock::new(Default::default);
    SET.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn in_flight(dir: &std::path::Path) -> bool {
    in_flight_set().contains(dir)
}

pub use crate::text::redact_url;
