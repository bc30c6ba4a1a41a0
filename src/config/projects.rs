//! `[[projects]]` -> [`Project`]: path, repository URL, branch, policy file, token, limits, and
//! which entries name the same repository (merged when the path agrees, an error otherwise; see
//! [`same_repo`](super::same_repo)).

use super::raw::{RawLimits, RawProject};
use super::{Checker, DEFAULT_POLICY_FILE, InitialSync, Secret, same_repo};
use crate::policy::{Limits, PolicyType};
use crate::tls::TlsSettings;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct Project {
    /// SPP full path: the project's identity and `entity_path`.
    pub path: String,
    pub id: Option<i64>,
    /// As configured, with a relative local path made absolute.
    pub url: String,
    pub branch: String,
    pub policy_file: String,
    pub linked: Vec<String>,
    pub token: Option<Secret>,
    pub initial_sync: InitialSync,
    pub limits: Limits,
    /// `ca_file` and client certificate for an https fetch.
    pub tls: TlsSettings,
    /// Where the entry comes from: `[[projects]]`, discovery from GitLab, or both (merged).
    pub source: ProjectSource,
}

/// Where a project entry comes from (`status`, the page and `/metrics` show it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectSource {
    /// A `[[projects]]` entry.
    Config,
    /// Discovered from GitLab (`[gitlab] discover`).
    Discovery,
    /// A `[[projects]]` entry GitLab reports too: the entry wins, the links are merged.
    ConfigAndDiscovery,
}

impl ProjectSource {
    pub fn name(self) -> &'static str {
        match self {
            ProjectSource::Config => "config",
            ProjectSource::Discovery => "discovery",
            ProjectSource::ConfigAndDiscovery => "config+discovery",
        }
    }
}

impl Project {
    /// The project as events name it.
    pub fn spp(&self) -> crate::event::Spp<'_> {
        crate::event::Spp {
            path: &self.path,
            id: self.id,
            branch: &self.branch,
            policy_file: &self.policy_file,
            linked: &self.linked,
        }
    }
}

impl Checker<'_> {
    pub(super) fn projects(&mut self, raws: Vec<RawProject>, base: &Path) -> (Vec<Project>, Vec<String>) {
        let mut projects: Vec<(Project, Spanned<String>)> = Vec::new();
        // Each project's repository key and path, computed once (a key may canonicalise a
        // path): comparing every pair made a 1,000-project config take seconds to load.
        let mut by_repo: HashMap<(String, String), usize> = HashMap::new();
        let mut by_path: HashMap<String, usize> = HashMap::new();
        let mut warnings = Vec::new();
        for raw in raws {
            let Some(project) = self.project(&raw, base) else {
                continue;
            };
            let key = repo_key(&project.url, &project.branch);
            if let Some((existing, first)) = by_repo.get(&key).and_then(|&i| projects.get_mut(i)) {
                if existing.path != project.path {
                    let first_at = self.locate(first.span().start);
                    self.error_at(
                        &raw.path,
                        format!(
                            "project {:?} has the same url and branch as project {:?} ({first_at}); one repository must have one path",
                            project.path, existing.path
                        ),
                    );
                    continue;
                }
                let at = self.locate(raw.path.span().start);
                warnings.push(format!(
                    "{at}: project {:?} is configured twice with the same url and branch; merged into one (one poll, linked namespaces combined)",
                    project.path
                ));
                for ns in project.linked {
                    if !existing.linked.contains(&ns) {
                        existing.linked.push(ns);
                    }
                }
                continue;
            }
            if let Some((_, first)) = by_path.get(&project.path).and_then(|&i| projects.get(i)) {
                let first_at = self.locate(first.span().start);
                self.error_at(
                    &raw.path,
                    format!(
                        "duplicate project path {:?} (first at {first_at}) with a different url or branch",
                        project.path
                    ),
                );
                continue;
            }
            by_repo.insert(key, projects.len());
            by_path.insert(project.path.clone(), projects.len());
            projects.push((project, raw.path.clone()));
        }
        (projects.into_iter().map(|(p, _)| p).collect(), warnings)
    }

    fn project(&mut self, raw: &RawProject, base: &Path) -> Option<Project> {
        let path = raw.path.get_ref().trim().to_string();
        if path.is_empty() || path.starts_with('/') || path.ends_with('/') || path.contains("//") {
            self.error_at(
                &raw.path,
                format!("project `path` = {path:?} must be a full path like \"acme/security-policies\""),
            );
            return None;
        }
        let url = self.repo_url(&raw.url, base)?;
        let branch = raw.branch.as_ref().map(|b| b.get_ref().trim().to_string()).unwrap_or_else(|| "main".into());
        if let Some(b) = &raw.branch
            && (branch.is_empty() || branch.starts_with("refs/") || branch.contains(' ') || branch.contains(".."))
        {
            self.error_at(b, format!("project {path:?}: `branch` = {branch:?} must be a branch name like \"main\""));
        }
        let policy_file = raw
            .policy_file
            .as_ref()
            .map(|f| f.get_ref().trim_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_POLICY_FILE.into());
        if let Some(f) = &raw.policy_file
            && (policy_file.is_empty() || policy_file.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
        {
            self.error_at(
                f,
                format!("project {path:?}: `policy_file` = {:?} must be a path inside the repository", f.get_ref()),
            );
        }
        let token = self.secret(&path, "token", &raw.token_env, &raw.token_file, base);
        let has_token = raw.token_env.is_some() || raw.token_file.is_some();
        self.check_plain_http(&raw.url, &format!("project {path:?}"), "token", has_token, raw.allow_insecure_http);
        let limits = raw.limits.as_ref().map(limits_of).unwrap_or_default();
        let tls =
            self.tls(&format!("project {path:?}"), [&raw.ca_file, &raw.client_cert_file, &raw.client_key_file], base);
        let mut linked: Vec<String> = Vec::new();
        for ns in &raw.linked {
            let ns = ns.trim_matches('/').to_string();
            if !ns.is_empty() && !linked.contains(&ns) {
                linked.push(ns);
            }
        }
        Some(Project {
            path,
            id: raw.id,
            url,
            branch,
            policy_file,
            linked,
            token,
            initial_sync: raw.initial_sync.unwrap_or_default(),
            limits,
            tls,
            source: ProjectSource::Config,
        })
    }

    fn repo_url(&mut self, raw: &Spanned<String>, base: &Path) -> Option<String> {
        let url = raw.get_ref().trim();
        if url.is_empty() {
            self.error_at(raw, "project `url` must not be empty");
            return None;
        }
        let unsupported = |scheme: &str| {
            format!("project `url` scheme {scheme:?} is not supported (use https, http, file:// or a local path)")
        };
        match crate::urls::parse(url) {
            Some(Ok(parsed)) => {
                if !matches!(parsed.scheme(), "https" | "http" | "file") {
                    self.error_at(raw, unsupported(parsed.scheme()));
                    return None;
                }
                // As configured, with the scheme in the lowercase spelling git expects.
                let rest = url.split_once("://").map_or("", |(_, rest)| rest);
                return Some(format!("{}://{rest}", parsed.scheme()));
            }
            Some(Err(e)) => {
                let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme).to_ascii_lowercase();
                if matches!(scheme.as_str(), "https" | "http" | "file") {
                    self.error_at(raw, format!("project `url` = {url:?} is not a valid URL: {e}"));
                } else {
                    self.error_at(raw, unsupported(&scheme));
                }
                return None;
            }
            None => {}
        }
        if url.contains('@') && url.contains(':') {
            self.error_at(raw, "ssh urls are not supported: use https with `token_env`, or a local path");
            return None;
        }
        Some(base.join(url).to_string_lossy().into_owned())
    }
}

fn limits_of(raw: &RawLimits) -> Limits {
    let mut map = BTreeMap::new();
    let approval = raw.approval_policy.or(raw.scan_result_policy);
    for (t, v) in [
        (PolicyType::Approval, approval),
        (PolicyType::ScanExecution, raw.scan_execution_policy),
        (PolicyType::PipelineExecution, raw.pipeline_execution_policy),
        (PolicyType::PipelineExecutionSchedule, raw.pipeline_execution_schedule_policy),
        (PolicyType::VulnerabilityManagement, raw.vulnerability_management_policy),
    ] {
        if let Some(v) = v {
            map.insert(t, v);
        }
    }
    Limits::new(map)
}

/// Same repository: normalised URLs or canonical paths (see `same_repo`), same branch.
pub(crate) fn repo_key(url: &str, branch: &str) -> (String, String) {
    (same_repo::repo_identity(url), branch.to_string())
}
