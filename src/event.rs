//! The audit event: GitLab's streamed audit event schema (SPEC §3), deterministic ids and
//! GitLab's exact messages. Pure: the caller passes the commit, the clock reading and the change.

use crate::policy::{Change, ChangeKind, FieldChange, InvalidPolicyFile, Policy, TypeLimit};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `author_id` GitLab uses for an author it cannot resolve to a user.
pub const UNKNOWN_AUTHOR_ID: i64 = -4;

pub const INVALIDATED_MESSAGE: &str = "The policy YAML has been invalidated in the security policy project. Security policies will no longer be enforced.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "security_policy_create")]
    Create,
    #[serde(rename = "security_policy_update")]
    Update,
    #[serde(rename = "security_policy_delete")]
    Delete,
    #[serde(rename = "security_policy_yaml_invalidated")]
    YamlInvalidated,
    #[serde(rename = "security_policy_limit_exceeded")]
    LimitExceeded,
    /// A namespace linked to, unlinked from or re-linked between SPPs: GitLab's own type for
    /// it (`ee/config/audit_events/types/policy_project_updated.yml`), seen by discovery.
    #[serde(rename = "policy_project_updated")]
    PolicyProjectUpdated,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::Create,
        EventType::Update,
        EventType::Delete,
        EventType::YamlInvalidated,
        EventType::LimitExceeded,
        EventType::PolicyProjectUpdated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventType::Create => "security_policy_create",
            EventType::Update => "security_policy_update",
            EventType::Delete => "security_policy_delete",
            EventType::YamlInvalidated => "security_policy_yaml_invalidated",
            EventType::LimitExceeded => "security_policy_limit_exceeded",
            EventType::PolicyProjectUpdated => "policy_project_updated",
        }
    }

    pub fn from_name(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub id: String,
    pub event_type: EventType,
    pub entity_type: String,
    pub entity_id: Option<i64>,
    pub entity_path: String,
    pub target_type: String,
    pub target_details: String,
    pub author_name: String,
    pub author_id: i64,
    pub created_at: String,
    pub ip_address: String,
    pub details: Details,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Details {
    pub event_name: String,
    pub custom_message: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy_type: Option<String>,
    pub security_policy_project_commit_sha: String,
    pub author_name: String,
    pub author_email: String,
    pub target_type: String,
    pub target_details: String,
    pub entity_path: String,
    pub branch: String,
    pub policy_file: String,
    pub previous_commit_sha: Option<String>,
    pub detected_at: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub merge_request: Option<MergeRequest>,
    pub linked_namespaces: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy_scope: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub changes: Option<Vec<FieldChange>>,
    #[serde(skip_serializing_if = "is_false", default)]
    pub changes_truncated: bool,
    #[serde(skip_serializing_if = "is_false", default)]
    pub history_rewritten: bool,
    /// Invalidated events: why the file is invalid, in one line.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub invalid_reason: Option<String>,
    /// Invalidated events: every error on its own, with the path it is about
    /// (`approval_policy[0].rules: ...`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub validation_errors: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy_type_limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policies_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub active_policies_names: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub active_skipped_policies_names: Option<Vec<String>>,
    /// The GitLab user the commit author was resolved to (SPEC §10), when known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gitlab_user: Option<GitLabUser>,
    /// How `author_id` was found, and what could not be resolved (set when GitLab attribution
    /// is in play: a private commit email, or `[gitlab]` configured).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attribution: Option<Attribution>,
    /// `policy_project_updated` events: the link that changed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub security_policy_project_link: Option<LinkDetails>,
    /// Events about a file a policy includes from another project (SPEC §14).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub included_content: Option<IncludedContent>,
}

/// The included file that changed (`details.included_content`): where it lives, the blobs
/// before and after (the file's git object ids; `after_sha` None when GitLab can no longer read
/// it), the commit in the included project, and what changed in its CI jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncludedContent {
    pub project: String,
    pub file: String,
    /// The ref as written in the policy; None = the project's default branch.
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// What the ref resolved to (`HEAD`, `branch main`, `tag v1`).
    pub followed: String,
    pub before_sha: Option<String>,
    pub after_sha: Option<String>,
    pub commit_sha: String,
    /// One line for people: "jobs added: a; removed: b; changed: c".
    pub summary: String,
    #[serde(default)]
    pub jobs_added: Vec<String>,
    #[serde(default)]
    pub jobs_removed: Vec<String>,
    #[serde(default)]
    pub jobs_changed: Vec<String>,
    /// The unified diff of the file (capped; `diff_truncated` says when it was cut).
    #[serde(default)]
    pub diff: String,
    #[serde(default)]
    pub diff_truncated: bool,
}

/// A link between a namespace and an SPP that changed (`details.security_policy_project_link`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkDetails {
    /// `linked`, `unlinked` or `changed` (from `previous_security_policy_project`).
    pub action: String,
    pub namespace_path: String,
    /// `Group` or `Project`.
    pub namespace_type: String,
    pub namespace_id: i64,
    /// The SPP's full path (the event's entity).
    pub security_policy_project: String,
    /// `changed`: the SPP the namespace was linked to before.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub previous_security_policy_project: Option<String>,
}

/// Who the events of a link change name as author: discovery sees the link, not who made it.
pub const DISCOVERY_AUTHOR: &str = "policy-audit discovery";

/// A link change as discovery saw it (see `crate::discovery`).
#[derive(Debug, Clone)]
pub struct LinkChange<'a> {
    /// The SPP the event is about: the one linked now (`linked`, `changed`), or the one that
    /// was linked (`unlinked`).
    pub project: Spp<'a>,
    /// Its GitLab name (GitLab's messages use it).
    pub project_name: &'a str,
    /// `changed`: the path and name of the SPP linked before.
    pub previous: Option<(&'a str, &'a str)>,
    pub linked: bool,
    pub namespace_path: &'a str,
    pub namespace_type: &'a str,
    pub namespace_id: i64,
    pub detected_at: jiff::Timestamp,
}

impl LinkChange<'_> {
    /// GitLab's `policy_project_updated` event, scoped to the SPP (the trail is the SPP's),
    /// with the namespace as target and GitLab's messages.
    pub fn event(&self) -> AuditEvent {
        let (action, message) = match (self.linked, self.previous) {
            (true, None) => ("linked", format!("Linked {} as the security policy project", self.project_name)),
            (true, Some((_, before))) => (
                "changed",
                format!("Changed the linked security policy project from {before} to {}", self.project_name),
            ),
            (false, _) => ("unlinked", format!("Unlinked {} as the security policy project", self.project_name)),
        };
        let p = self.project;
        let event_type = EventType::PolicyProjectUpdated;
        let detected_at = rfc3339_millis(self.detected_at);
        let when = format!("discovery {detected_at}");
        AuditEvent {
            id: event_id(p.path, &when, event_type, action, self.namespace_path, "0"),
            event_type,
            entity_type: "Project".into(),
            entity_id: p.id,
            entity_path: p.path.to_string(),
            target_type: self.namespace_type.into(),
            target_details: self.namespace_path.into(),
            author_name: DISCOVERY_AUTHOR.into(),
            author_id: UNKNOWN_AUTHOR_ID,
            created_at: detected_at.clone(),
            ip_address: String::new(),
            details: Details {
                event_name: event_type.name().into(),
                custom_message: message,
                policy_name: None,
                policy_type: None,
                security_policy_project_commit_sha: String::new(),
                author_name: DISCOVERY_AUTHOR.into(),
                author_email: String::new(),
                target_type: self.namespace_type.into(),
                target_details: self.namespace_path.into(),
                entity_path: p.path.to_string(),
                branch: p.branch.to_string(),
                policy_file: p.policy_file.to_string(),
                previous_commit_sha: None,
                detected_at,
                merge_request: None,
                linked_namespaces: p.linked.to_vec(),
                policy_scope: None,
                enabled: None,
                changes: None,
                changes_truncated: false,
                history_rewritten: false,
                invalid_reason: None,
                validation_errors: None,
                policy_type_limit: None,
                policies_count: None,
                active_policies_names: None,
                active_skipped_policies_names: None,
                gitlab_user: None,
                attribution: None,
                security_policy_project_link: Some(LinkDetails {
                    action: action.into(),
                    namespace_path: self.namespace_path.into(),
                    namespace_type: self.namespace_type.into(),
                    namespace_id: self.namespace_id,
                    security_policy_project: p.path.to_string(),
                    previous_security_policy_project: self.previous.map(|(path, _)| path.to_string()),
                }),
                included_content: None,
            },
        }
    }
}

/// A GitLab user as the API names one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitLabUser {
    pub id: i64,
    pub username: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// `authors_map`, `private_commit_email`, `gitlab_users_api` or `unresolved`.
    pub author_source: String,
    /// What could not be resolved and why (the GitLab API down, no user with that email, ...).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub unresolved: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRequest {
    pub project: String,
    pub iid: u64,
    /// Who merged it, from GitLab's Merge Requests API (with `[gitlab]`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub merged_by: Option<GitLabUser>,
    /// Who approved it, from GitLab's Approvals API (with `[gitlab]`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub approved_by: Option<Vec<GitLabUser>>,
}

/// The Security Policy Project an event is about, as the events name it (from the config's
/// project entry; this module does not read the config).
#[derive(Debug, Clone, Copy)]
pub struct Spp<'a> {
    pub path: &'a str,
    pub id: Option<i64>,
    pub branch: &'a str,
    pub policy_file: &'a str,
    pub linked: &'a [String],
}

/// What one step commit contributes to every event of that step.
#[derive(Debug, Clone)]
pub struct StepContext<'a> {
    pub project: Spp<'a>,
    pub sha: &'a str,
    pub previous_sha: Option<&'a str>,
    pub author_name: &'a str,
    pub author_email: &'a str,
    pub author_id: Option<i64>,
    /// The step commit's committer time, unix seconds.
    pub committed_at: i64,
    pub message: &'a str,
    pub detected_at: jiff::Timestamp,
    pub history_rewritten: bool,
}

impl StepContext<'_> {
    pub fn change_event(&self, change: &Change) -> AuditEvent {
        let (event_type, verb) = match change.kind {
            ChangeKind::Created => (EventType::Create, "Created"),
            ChangeKind::Updated => (EventType::Update, "Updated"),
            ChangeKind::Deleted => (EventType::Delete, "Deleted"),
        };
        let message = format!("{verb} security policy with the name: \"{}\"", change.name);
        let mut event = self.event(
            event_type,
            message,
            "Security::Policy",
            change.name.clone(),
            &change.occurrence.to_string(),
            change.policy_type.key(),
            &change.name,
        );
        let Policy { policy_type, enabled, .. } = &change.policy;
        let d = &mut event.details;
        d.policy_name = Some(change.name.clone());
        d.policy_type = Some(policy_type.key().to_string());
        d.policy_scope = change.policy.scope().cloned();
        d.enabled = Some(*enabled);
        if change.kind == ChangeKind::Updated {
            d.changes = Some(change.fields.clone());
            d.changes_truncated = change.fields_truncated;
        }
        event
    }

    pub fn invalidated_event(&self, invalid: &InvalidPolicyFile) -> AuditEvent {
        let path = self.project.path.to_string();
        let mut event =
            self.event(EventType::YamlInvalidated, INVALIDATED_MESSAGE.to_string(), "Project", path, "0", "", "");
        event.details.invalid_reason = Some(invalid.reason.clone());
        event.details.validation_errors = Some(invalid.errors.clone());
        event
    }

    /// A policy whose included file changed (`invalid` None: an update GitLab enforces from
    /// now on) or can no longer be read (`invalid` Some(reason): GitLab fails the pipelines).
    /// `self` is the commit in the included project; `spp_sha` the SPP commit the policy is at.
    pub fn included_event(
        &self,
        policy: &Policy,
        occurrence: usize,
        field: &str,
        spp_sha: &str,
        content: IncludedContent,
        invalid: Option<&str>,
    ) -> AuditEvent {
        let hash_key = format!(
            "included\0{}\0{}\0{}\0{field}\0{occurrence}",
            content.project,
            content.file,
            content.reference.as_deref().unwrap_or("")
        );
        let (event_type, message) = match invalid {
            None => (EventType::Update, format!("Updated security policy with the name: \"{}\"", policy.name)),
            Some(_) => (
                EventType::YamlInvalidated,
                format!(
                    "The file {} of project {} included by security policy \"{}\" cannot be read. The policy's pipelines will fail until it can.",
                    content.file, content.project, policy.name
                ),
            ),
        };
        let mut event = self.event(
            event_type,
            message,
            "Security::Policy",
            policy.name.clone(),
            &hash_key,
            policy.policy_type.key(),
            &policy.name,
        );
        let d = &mut event.details;
        d.security_policy_project_commit_sha = spp_sha.to_string();
        d.policy_name = Some(policy.name.clone());
        d.policy_type = Some(policy.policy_type.key().to_string());
        d.policy_scope = policy.scope().cloned();
        d.enabled = Some(policy.enabled);
        let described = |sha: &Option<String>| {
            serde_json::json!({
                "project": content.project, "file": content.file, "ref": content.reference, "blob": sha,
            })
        };
        d.changes = Some(vec![FieldChange {
            path: field.to_string(),
            before: Some(described(&content.before_sha)),
            after: Some(described(&content.after_sha)),
        }]);
        if let Some(reason) = invalid {
            d.invalid_reason = Some(reason.to_string());
        }
        d.included_content = Some(content);
        event
    }

    pub fn limit_event(&self, limit: &TypeLimit) -> AuditEvent {
        let message = format!(
            "Policies limit exceeded for '{}' type. Only the first {} enabled policies will be applied",
            limit.policy_type.display_name(),
            limit.limit
        );
        let path = self.project.path.to_string();
        let mut event =
            self.event(EventType::LimitExceeded, message, "Project", path, "0", limit.policy_type.key(), "");
        let d = &mut event.details;
        d.policy_type = Some(limit.policy_type.key().to_string());
        d.policy_type_limit = Some(limit.limit);
        d.policies_count = Some(limit.active.len() + limit.skipped.len());
        d.active_policies_names = Some(limit.active.clone());
        d.active_skipped_policies_names = Some(limit.skipped.clone());
        event
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        event_type: EventType,
        message: String,
        target_type: &str,
        target_details: String,
        occurrence: &str,
        policy_type: &str,
        policy_name: &str,
    ) -> AuditEvent {
        let p = self.project;
        AuditEvent {
            id: event_id(p.path, self.sha, event_type, policy_type, policy_name, occurrence),
            event_type,
            entity_type: "Project".into(),
            entity_id: p.id,
            entity_path: p.path.to_string(),
            target_type: target_type.into(),
            target_details: target_details.clone(),
            author_name: self.author_name.into(),
            author_id: self.author_id.unwrap_or(UNKNOWN_AUTHOR_ID),
            created_at: rfc3339_millis(
                jiff::Timestamp::from_second(self.committed_at).unwrap_or(jiff::Timestamp::UNIX_EPOCH),
            ),
            ip_address: String::new(),
            details: Details {
                event_name: event_type.name().into(),
                custom_message: message,
                policy_name: None,
                policy_type: None,
                security_policy_project_commit_sha: self.sha.into(),
                author_name: self.author_name.into(),
                author_email: self.author_email.into(),
                target_type: target_type.into(),
                target_details,
                entity_path: p.path.to_string(),
                branch: p.branch.to_string(),
                policy_file: p.policy_file.to_string(),
                previous_commit_sha: self.previous_sha.map(str::to_string),
                detected_at: rfc3339_millis(self.detected_at),
                merge_request: merge_request(self.message),
                linked_namespaces: p.linked.to_vec(),
                policy_scope: None,
                enabled: None,
                changes: None,
                changes_truncated: false,
                history_rewritten: self.history_rewritten,
                invalid_reason: None,
                validation_errors: None,
                policy_type_limit: None,
                policies_count: None,
                active_policies_names: None,
                active_skipped_policies_names: None,
                gitlab_user: None,
                attribution: None,
                security_policy_project_link: None,
                included_content: None,
            },
        }
    }
}

/// A stable id from (SPP path, commit, event type, policy type, policy name), shaped as an
/// RFC 9562 version-8 UUID so SIEMs that expect UUIDs accept it. `occurrence` only enters the
/// hash for the second and later same-named policies of one step.
pub fn event_id(
    project: &str,
    sha: &str,
    event_type: EventType,
    policy_type: &str,
    name: &str,
    occurrence: &str,
) -> String {
    let mut h = Sha256::new();
    for part in [project, sha, event_type.name(), policy_type, name] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    if occurrence != "0" {
        h.update(occurrence.as_bytes());
    }
    let mut b: [u8; 16] = h.finalize()[..16].try_into().unwrap_or([0; 16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// `2024-03-01T10:00:00.000Z`
pub fn rfc3339_millis(ts: jiff::Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// GitLab's merge commits end with `See merge request group/project!123`.
pub fn merge_request(message: &str) -> Option<MergeRequest> {
    message.lines().rev().find_map(|line| {
        let rest = line.trim().strip_prefix("See merge request ")?;
        let (project, iid) = rest.rsplit_once('!')?;
        let iid = iid.trim_end_matches('.').parse().ok()?;
        (!project.is_empty()).then(|| MergeRequest {
            project: project.to_string(),
            iid,
            merged_by: None,
            approved_by: None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_request_line_is_parsed() {
        let msg = "Merge branch 'x' into 'main'\n\nAdd policy\n\nSee merge request acme/security-policies!12";
        assert_eq!(
            merge_request(msg),
            Some(MergeRequest {
                project: "acme/security-policies".into(),
                iid: 12,
                merged_by: None,
                approved_by: None
            })
        );
        assert_eq!(merge_request("fix: See merge request nothing"), None);
        assert_eq!(merge_request("plain commit"), None);
    }

    #[test]
    fn ids_are_deterministic_uuid_shaped_and_distinct() {
        let a = event_id("acme/spp", "abc", EventType::Create, "approval_policy", "x", "0");
        assert_eq!(a, event_id("acme/spp", "abc", EventType::Create, "approval_policy", "x", "0"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "8");
        assert_ne!(a, event_id("acme/spp", "abc", EventType::Delete, "approval_policy", "x", "0"));
        assert_ne!(a, event_id("acme/spp", "abc", EventType::Create, "approval_policy", "x", "1"));
        assert_ne!(a, event_id("acme/spp", "abd", EventType::Create, "approval_policy", "x", "0"));
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        let ts = jiff::Timestamp::from_millisecond(1_709_287_200_123).unwrap();
        assert_eq!(rfc3339_millis(ts), "2024-03-01T10:00:00.123Z");
    }
}
