//! The config file exactly as written: serde structs with `deny_unknown_fields`, spans kept on
//! every value that a later check may need to point at.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub schedule: Option<Spanned<String>>,
    pub timezone: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<String>>,
    pub fetch_timeout: Option<Spanned<String>>,
    pub max_policy_file_bytes: Option<Spanned<u64>>,
    pub log_level: Option<Spanned<String>>,
    pub parallelism: Option<Spanned<usize>>,
    pub policy_schema_file: Option<Spanned<String>>,
    #[serde(default)]
    pub feature_flags: RawFeatureFlags,
    #[serde(default)]
    pub authors: BTreeMap<String, Spanned<i64>>,
    #[serde(default)]
    pub projects: Vec<RawProject>,
    #[serde(default)]
    pub destinations: Vec<RawDestination>,
    pub gitlab: Option<RawGitLab>,
    pub cluster: Option<RawCluster>,
    pub server: Option<super::server::RawServer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGitLab {
    pub url: Spanned<String>,
    pub token_env: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub cache_ttl: Option<Spanned<String>>,
    pub concurrency: Option<Spanned<usize>>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub ca_file: Option<Spanned<String>>,
    pub client_cert_file: Option<Spanned<String>>,
    pub client_key_file: Option<Spanned<String>>,
    /// Group full paths (or `"*"`) whose SPP links are read from GitLab.
    #[serde(default)]
    pub discover: Vec<Spanned<String>>,
    pub discover_interval: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeatureFlags {
    pub security_policy_audit_events: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlagGates {
    #[serde(default)]
    pub actors: Vec<String>,
    pub percentage_of_actors: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProject {
    pub path: Spanned<String>,
    pub id: Option<i64>,
    pub url: Spanned<String>,
    pub branch: Option<Spanned<String>>,
    pub policy_file: Option<Spanned<String>>,
    #[serde(default)]
    pub linked: Vec<String>,
    pub token_env: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
    pub initial_sync: Option<InitialSync>,
    pub limits: Option<RawLimits>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub ca_file: Option<Spanned<String>>,
    pub client_cert_file: Option<Spanned<String>>,
    pub client_key_file: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialSync {
    /// Record the current state and emit nothing.
    #[default]
    Baseline,
    /// Replay the whole first-parent history and emit the historical events.
    Backfill,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub approval_policy: Option<usize>,
    pub scan_result_policy: Option<usize>,
    pub scan_execution_policy: Option<usize>,
    pub pipeline_execution_policy: Option<usize>,
    pub pipeline_execution_schedule_policy: Option<usize>,
    pub vulnerability_management_policy: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    pub name: Spanned<String>,
    pub url: Spanned<String>,
    pub verification_token_env: Option<Spanned<String>>,
    pub verification_token_file: Option<Spanned<String>>,
    pub signing_secret_env: Option<Spanned<String>>,
    pub signing_secret_file: Option<Spanned<String>>,
    #[serde(default)]
    pub event_types: Vec<Spanned<String>>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub headers: Option<Spanned<BTreeMap<String, String>>>,
    pub timeout: Option<Spanned<String>>,
    pub max_attempts: Option<Spanned<u32>>,
    pub max_age: Option<Spanned<String>>,
    pub backoff_initial: Option<Spanned<String>>,
    pub backoff_max: Option<Spanned<String>>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub ca_file: Option<Spanned<String>>,
    pub client_cert_file: Option<Spanned<String>>,
    pub client_key_file: Option<Spanned<String>>,
    // kind = "nats" (see `nats`)
    pub kind: Option<Spanned<String>>,
    pub subject: Option<Spanned<String>>,
    pub stream: Option<Spanned<String>>,
    pub token_env: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
    pub credentials_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub nats_url: Spanned<String>,
    pub name: Option<Spanned<String>>,
    pub lease_ttl: Option<Spanned<String>>,
    pub token_env: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
    pub credentials_file: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
}
