//! Discovery from GitLab (SPEC §12): which Security Policy Projects exist and where they are
//! linked, read from GitLab's GraphQL API ([`walk`]), kept in the store, turned into project
//! entries ([`merge`]) and into `policy_project_updated` events when a link changes
//! ([`links`]).
//!
//! Invariants:
//! - at most one discovery per `discover_interval` (counted from the last attempt, kept in the
//!   store so a restart does not ask again at once), except when asked (`policy-audit
//!   discover`, `reconcile` after the interval);
//! - a failing GitLab (unreachable, slow, 401/403, 5xx, an answer not in GitLab's shape)
//!   changes nothing: the stored list stays, no project is dropped, no unlink is recorded; the
//!   failure is in `status`, the log and `/metrics`;
//! - the link events and the list they lead to are stored in one transaction;
//! - the API client is attribution's: its deadline, concurrency limit, `Retry-After` handling
//!   and circuit breaker, and the token in no message.

pub mod links;
pub mod merge;
pub mod walk;

use crate::config::{Config, GitLab};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// A Security Policy Project as GitLab reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spp {
    pub id: i64,
    pub path: String,
    /// GitLab's project name (its audit messages use it).
    pub name: String,
    /// `httpUrlToRepo`.
    pub url: Option<String>,
    /// The default branch (`repository.rootRef`): GitLab reads policies from it. None when the
    /// token may not read the code, or the repository is empty.
    pub branch: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamespaceKind {
    Group,
    Project,
}

impl NamespaceKind {
    pub fn name(self) -> &'static str {
        match self {
            NamespaceKind::Group => "Group",
            NamespaceKind::Project => "Project",
        }
    }
}

/// A namespace's direct link to an SPP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub kind: NamespaceKind,
    pub id: i64,
    /// The SPP's full path.
    pub spp: String,
    /// Since when GitLab no longer shows the namespace (deleted, or access lost): the link is
    /// kept until GitLab answers for it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_since: Option<String>,
}

/// What one walk of GitLab found.
#[derive(Debug, Default)]
pub struct Found {
    /// SPPs linked from the namespaces read, by full path.
    pub spps: BTreeMap<String, Spp>,
    /// Namespace full path -> its direct link.
    pub links: BTreeMap<String, Link>,
    /// Every namespace GitLab showed, linked or not.
    pub seen: HashSet<String>,
    /// GraphQL calls made.
    pub calls: usize,
    /// Groups and projects read.
    pub namespaces: usize,
}

impl Found {
    /// Adds what another walk found.
    pub fn absorb(&mut self, other: Found) {
        self.spps.extend(other.spps);
        self.links.extend(other.links);
        self.seen.extend(other.seen);
        self.calls += other.calls;
        self.namespaces += other.namespaces;
    }
}

/// The discovered list, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub discovered_at: String,
    pub roots: Vec<String>,
    pub spps: BTreeMap<String, Spp>,
    pub links: BTreeMap<String, Link>,
}

impl Snapshot {
    /// The namespaces linked directly to `spp`, sorted.
    pub fn linked_to(&self, spp: &str) -> Vec<String> {
        self.links.iter().filter(|(_, l)| l.spp == spp).map(|(ns, _)| ns.clone()).collect()
    }
}

/// Discovery's bookkeeping (not part of the trail).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub last_attempt_at: Option<String>,
    #[serde(default)]
    pub last_attempt_ms: i64,
    pub last_success_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    #[serde(default)]
    pub failures: u64,
    /// Of the last successful discovery.
    #[serde(default)]
    pub calls: usize,
    #[serde(default)]
    pub namespaces: usize,
    #[serde(default)]
    pub duration_ms: u64,
}

/// The stored list (None before the first successful discovery).
pub fn stored(store: &Store) -> anyhow::Result<Option<Snapshot>> {
    let Some(bytes) = store.discovery()? else { return Ok(None) };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("the stored discovery list does not decode: {e}"))
}

pub fn status(store: &Store) -> Status {
    store.discovery_status().ok().flatten().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// What GitLab reports now, read-only (`policy-audit discover`).
pub fn read(gitlab: &GitLab, stop: &crate::stop::Stop) -> Result<Found, String> {
    let client = match crate::gitlab::Client::new(gitlab) {
        Ok(Some(c)) => c,
        Ok(None) => return Err("[gitlab] has no token".into()),
        Err(e) => return Err(format!("[gitlab]: {e}")),
    };
    walk::walk(&client, &gitlab.discover, stop)
}

/// What a discovery did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The discovery ran (it was due).
    pub ran: bool,
    pub error: Option<String>,
    /// Link events stored.
    pub stored: usize,
}

/// Runs a discovery when one is due (or `force`), storing the link events with the new list.
/// Never fails: an error is recorded and returned in the outcome.
pub fn refresh(config: &Config, store: &Store, force: bool, stop: &crate::stop::Stop) -> Outcome {
    let Some(gitlab) = config.gitlab.as_ref().filter(|g| !g.discover.is_empty()) else {
        return Outcome::default();
    };
    let now = jiff::Timestamp::now();
    let mut st = status(store);
    let due = st.last_attempt_ms + gitlab.discover_interval.as_millis() as i64 <= now.as_millisecond();
    if !force && !due {
        return Outcome::default();
    }
    let started = std::time::Instant::now();
    let now_text = crate::event::rfc3339_millis(now);
    st.last_attempt_at = Some(now_text.clone());
    st.last_attempt_ms = now.as_millisecond();
    let result = read(gitlab, stop).and_then(|found| {
        let (calls, namespaces) = (found.calls, found.namespaces);
        let old = stored(store).map_err(|e| format!("{e:#}"))?;
        let (list, changes) = links::next(old.as_ref(), found, &gitlab.discover, &now_text);
        let events = merge::link_events(config, &list, &changes, now);
        let bytes = serde_json::to_vec(&list).map_err(|e| e.to_string())?;
        let destinations = |e: &crate::event::AuditEvent| crate::reconcile::destinations_for(config, e);
        let stored = store
            .commit_discovery(&bytes, &events, &destinations, now.as_millisecond())
            .map_err(|e| format!("cannot store the discovered list: {e}"))?;
        Ok((calls, namespaces, list, stored))
    });
    let mut outcome = Outcome { ran: true, ..Outcome::default() };
    match result {
        Ok((calls, namespaces, list, stored)) => {
            let missing = list.links.values().filter(|l| l.missing_since.is_some()).count();
            tracing::info!(
                spps = list.spps.len(),
                links = list.links.len(),
                missing,
                namespaces,
                calls,
                link_events = stored,
                took_ms = started.elapsed().as_millis() as u64,
                "discovered the security policy projects from GitLab"
            );
            st.last_success_at = Some(now_text);
            st.last_error = None;
            st.calls = calls;
            st.namespaces = namespaces;
            st.duration_ms = started.elapsed().as_millis() as u64;
            outcome.stored = stored;
        }
        Err(why) => {
            let why = crate::text::redact_urls(&why).into_owned();
            tracing::warn!(error = %why, "discovery from GitLab failed; the last discovered list stays in use");
            st.last_error = Some(why.clone());
            st.last_error_at = Some(now_text);
            st.failures += 1;
            outcome.error = Some(why);
        }
    }
    if let Ok(bytes) = serde_json::to_vec(&st)
        && let Err(e) = store.set_discovery_status(&bytes)
    {
        tracing::warn!(error = %format!("{e:#}"), "cannot record the discovery's status");
    }
    outcome
}

/// The config with the stored discovered list merged in (the config as it is without one).
pub fn effective(config: &Config, store: &Store) -> Config {
    if config.gitlab.as_ref().is_none_or(|g| g.discover.is_empty()) {
        return config.clone();
    }
    match stored(store) {
        Ok(list) => merge::effective(config, list.as_ref()).0,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the discovered projects cannot be used");
            config.clone()
        }
    }
}
