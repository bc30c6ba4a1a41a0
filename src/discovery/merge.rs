//! The discovered list as project entries, merged with `[[projects]]` (the consolidation rule:
//! one SPP, one entry, one poll), and the link changes as events.
//!
//! Invariants:
//! - a `[[projects]]` entry for a discovered SPP (same path, same GitLab id, or same repository
//!   and branch) wins: its URL, branch, token and limits are kept, the discovered links are
//!   added to its `linked`, and the entry is marked `config+discovery`;
//! - a discovered SPP is fetched from GitLab's `httpUrlToRepo` with `[gitlab]`'s token and TLS
//!   settings only when that URL is on the `[gitlab] url`'s host: the token goes nowhere else;
//! - an SPP that cannot be polled (no readable repository, an empty one, a URL elsewhere) is
//!   listed as unusable with the reason, never silently dropped.

use super::links::Change;
use super::{Snapshot, Spp};
use crate::config::{Config, DEFAULT_POLICY_FILE, GitLab, Project, ProjectSource, repo_key};
use crate::event::{AuditEvent, LinkChange};

/// A discovered SPP that is not polled, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unusable {
    pub path: String,
    pub reason: String,
}

/// `config` with the discovered SPPs added (or merged into their `[[projects]]` entry).
pub fn effective(config: &Config, list: Option<&Snapshot>) -> (Config, Vec<Unusable>) {
    let mut out = config.clone();
    let mut unusable = Vec::new();
    let (Some(list), Some(gitlab)) = (list, config.gitlab.as_ref()) else { return (out, unusable) };
    for spp in list.spps.values() {
        let linked = list.linked_to(&spp.path);
        let found = out.projects.iter_mut().find(|p| {
            p.path == spp.path
                || p.id == Some(spp.id)
                || spp
                    .url
                    .as_deref()
                    .zip(spp.branch.as_deref())
                    .is_some_and(|(url, branch)| repo_key(url, branch) == repo_key(&p.url, &p.branch))
        });
        if let Some(p) = found {
            if p.source == ProjectSource::Discovery {
                continue; // merged already (a config that is the result of this function)
            }
            p.source = ProjectSource::ConfigAndDiscovery;
            p.id = p.id.or(Some(spp.id));
            for ns in linked {
                if !p.linked.contains(&ns) {
                    p.linked.push(ns);
                }
            }
            continue;
        }
        match project(gitlab, spp, linked) {
            Ok(p) => out.projects.push(p),
            Err(reason) => unusable.push(Unusable { path: spp.path.clone(), reason }),
        }
    }
    (out, unusable)
}

fn project(gitlab: &GitLab, spp: &Spp, linked: Vec<String>) -> Result<Project, String> {
    let url = spp.url.as_deref().ok_or("GitLab reports no httpUrlToRepo for it")?;
    let branch = spp.branch.as_deref().ok_or(
        "GitLab shows no default branch: its repository is empty, or the token may not read it (read_repository)",
    )?;
    let host = |u: &str| url::Url::parse(u).ok().and_then(|u| u.host_str().map(str::to_ascii_lowercase));
    if host(url).is_none() || host(url) != host(&gitlab.url) {
        return Err(format!(
            "its repository URL {} is not on the [gitlab] host {}: the token is not sent there (add it as a [[projects]] entry)",
            crate::text::redact_urls(url),
            gitlab.url
        ));
    }
    if crate::urls::is_plain_http(url) && !crate::urls::is_loopback(url) && !crate::urls::is_plain_http(&gitlab.url) {
        return Err(format!("its repository URL {url} is plain http while [gitlab] url is https"));
    }
    Ok(Project {
        path: spp.path.clone(),
        id: Some(spp.id),
        url: url.to_string(),
        branch: branch.to_string(),
        policy_file: DEFAULT_POLICY_FILE.to_string(),
        linked,
        token: gitlab.token.clone(),
        initial_sync: Default::default(),
        limits: Default::default(),
        tls: gitlab.tls.clone(),
        source: ProjectSource::Discovery,
    })
}

/// One `policy_project_updated` event per change (a re-link is one event, on the SPP linked
/// now, as GitLab records it), naming the SPP's links after the change.
pub fn link_events(config: &Config, list: &Snapshot, changes: &[Change], now: jiff::Timestamp) -> Vec<AuditEvent> {
    let (merged, _) = effective(config, Some(list));
    let mut events = Vec::with_capacity(changes.len());
    for change in changes {
        let Some(spp) = change.after.as_ref().or(change.before.as_ref()) else { continue };
        let entry = merged.projects.iter().find(|p| p.path == spp.path || p.id == Some(spp.id));
        let linked = entry.map(|p| p.linked.clone()).unwrap_or_else(|| list.linked_to(&spp.path));
        let branch = entry.map(|p| p.branch.clone()).or_else(|| spp.branch.clone()).unwrap_or_default();
        let policy_file = entry.map_or(DEFAULT_POLICY_FILE, |p| p.policy_file.as_str());
        let project =
            crate::event::Spp { path: &spp.path, id: Some(spp.id), branch: &branch, policy_file, linked: &linked };
        let previous = match (&change.after, &change.before) {
            (Some(_), Some(b)) => Some((b.path.as_str(), b.name.as_str())),
            _ => None,
        };
        let link = LinkChange {
            project,
            project_name: &spp.name,
            previous,
            linked: change.after.is_some(),
            namespace_path: &change.namespace,
            namespace_type: change.link.kind.name(),
            namespace_id: change.link.id,
            detected_at: now,
        };
        events.push(link.event());
    }
    events
}
