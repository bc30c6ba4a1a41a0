//! The policy model: what a `policy.yml` means once comments, quoting and key order are gone.
//!
//! Invariants:
//! - a [`PolicySet`] only exists for a file that passed validation ([`parse`]);
//! - every [`Policy::content`] is canonical JSON (mapping keys sorted, YAML merge keys applied),
//!   so two policies are semantically equal exactly when their `content` values are equal;
//! - `scan_result_policy` items are stored as [`PolicyType::Approval`]: the legacy name never
//!   leaves this module.
//!
//! Reading follows GitLab: `load.rs` reads the YAML as Ruby's Psych `safe_load` does,
//! `schema.rs` validates the result against a JSON Schema (built-in, or the administrator's
//! own GitLab's), `parse.rs` ties them together and builds the [`PolicySet`].

mod depth;
mod diff;
mod limits;
mod load;
mod parse;
mod schema;

pub use diff::{Change, ChangeKind, FieldChange, diff};
pub use limits::{LimitState, Limits, TypeLimit, limit_breaches};
pub use load::{LoadError, MAX_DEPTH, MAX_EXPANDED_VALUES, load};
pub use parse::{InvalidPolicyFile, MAX_NAME_CHARS, parse, parse_with};
pub use schema::{BUILTIN_SCHEMA, PolicySchema, SchemaError};

use serde::{Deserialize, Serialize};
use std::fmt;

/// The policy types GitLab knows, in the order events and limits are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyType {
    #[serde(rename = "approval_policy")]
    Approval,
    #[serde(rename = "ci_component_publishing_policy")]
    CiComponentPublishing,
    #[serde(rename = "pipeline_execution_policy")]
    PipelineExecution,
    #[serde(rename = "pipeline_execution_schedule_policy")]
    PipelineExecutionSchedule,
    #[serde(rename = "scan_execution_policy")]
    ScanExecution,
    #[serde(rename = "vulnerability_management_policy")]
    VulnerabilityManagement,
}

/// The legacy top-level key that GitLab still reads as `approval_policy`.
pub const LEGACY_APPROVAL_KEY: &str = "scan_result_policy";

/// Top-level keys that are allowed in a policy file without being a policy type.
pub const NON_POLICY_TOP_LEVEL_KEYS: &[&str] = &["experiments"];

impl PolicyType {
    pub const ALL: [PolicyType; 6] = [
        PolicyType::Approval,
        PolicyType::CiComponentPublishing,
        PolicyType::PipelineExecution,
        PolicyType::PipelineExecutionSchedule,
        PolicyType::ScanExecution,
        PolicyType::VulnerabilityManagement,
    ];

    /// The key of this type's section in `policy.yml` (and `details.policy_type`).
    pub fn key(self) -> &'static str {
        match self {
            PolicyType::Approval => "approval_policy",
            PolicyType::CiComponentPublishing => "ci_component_publishing_policy",
            PolicyType::PipelineExecution => "pipeline_execution_policy",
            PolicyType::PipelineExecutionSchedule => "pipeline_execution_schedule_policy",
            PolicyType::ScanExecution => "scan_execution_policy",
            PolicyType::VulnerabilityManagement => "vulnerability_management_policy",
        }
    }

    /// Reads a top-level key; the legacy `scan_result_policy` is an approval policy.
    pub fn from_key(key: &str) -> Option<PolicyType> {
        if key == LEGACY_APPROVAL_KEY {
            return Some(PolicyType::Approval);
        }
        PolicyType::ALL.into_iter().find(|t| t.key() == key)
    }

    /// The name GitLab uses in its limit message (`POLICY_TYPE_NAME` in GitLab's models).
    pub fn display_name(self) -> &'static str {
        match self {
            PolicyType::Approval => "Merge request approval policy",
            PolicyType::CiComponentPublishing => "CI component publishing policy",
            PolicyType::PipelineExecution => "Pipeline execution policy",
            PolicyType::PipelineExecutionSchedule => "Pipeline execution schedule policy",
            PolicyType::ScanExecution => "Scan execution policy",
            PolicyType::VulnerabilityManagement => "Vulnerability management policy",
        }
    }

    /// GitLab's default number of enabled policies of this type that are enforced.
    pub fn default_limit(self) -> usize {
        match self {
            PolicyType::PipelineExecutionSchedule => 1,
            _ => 5,
        }
    }
}

impl fmt::Display for PolicyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// One policy of a valid file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub policy_type: PolicyType,
    pub name: String,
    pub enabled: bool,
    /// The whole policy mapping in canonical form (includes `name` and `enabled`).
    pub content: serde_json::Value,
}

impl Policy {
    /// The policy's `policy_scope` as written, if any.
    pub fn scope(&self) -> Option<&serde_json::Value> {
        self.content.get("policy_scope")
    }
}

/// Every policy of a valid file, per type in file order (legacy `scan_result_policy` items
/// follow the `approval_policy` ones).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
}

impl PolicySet {
    pub fn of_type(&self, policy_type: PolicyType) -> impl Iterator<Item = &Policy> {
        self.policies.iter().filter(move |p| p.policy_type == policy_type)
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}
