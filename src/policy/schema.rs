//! The JSON Schema a loaded policy file must satisfy: the built-in one
//! (`schema/policy.schema.json`, written from GitLab's documented policy format), or the schema
//! file of the administrator's own GitLab (`policy_schema_file`), which then decides alone.
//!
//! Every error is reported with the path of the value it is about, in the notation users
//! write (`approval_policy[0].actions[0].approvals_required`), so an invalidated event says
//! exactly what GitLab objects to.

use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

/// The built-in schema's text.
pub const BUILTIN_SCHEMA: &str = include_str!("schema/policy.schema.json");

/// A message longer than this is cut (an `enum` error lists every allowed value).
const MAX_MESSAGE_CHARS: usize = 300;
/// A string value longer than this is not quoted in an error.
const MAX_QUOTED_CHARS: usize = 60;

static BUILTIN: LazyLock<PolicySchema> = LazyLock::new(|| {
    // Part of the program, not input, and compiled by a unit test: falling back to a schema that
    // accepts everything would silently hide every invalid file, so a broken build fails loudly.
    let value: Value = serde_json::from_str(BUILTIN_SCHEMA).expect("the built-in policy schema is JSON");
    PolicySchema::compile(value, None).expect("the built-in policy schema compiles")
});

/// A compiled policy schema. Cheap to clone.
#[derive(Clone)]
pub struct PolicySchema {
    validator: Arc<jsonschema::Validator>,
    /// The file it was read from; `None` for the built-in schema.
    source: Option<PathBuf>,
}

impl fmt::Debug for PolicySchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(path) => write!(f, "PolicySchema({})", path.display()),
            None => f.write_str("PolicySchema(built-in)"),
        }
    }
}

/// Why a schema file cannot be used. Names the file; shown by `check-config`.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read policy schema file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("policy schema file {} is not JSON: {source}", path.display())]
    NotJson { path: PathBuf, source: serde_json::Error },
    #[error("policy schema file {} is not a usable JSON schema: {reason}", path.display())]
    NotASchema { path: PathBuf, reason: String },
}

impl PolicySchema {
    /// The built-in schema.
    pub fn builtin() -> &'static PolicySchema {
        &BUILTIN
    }

    /// Reads and compiles a schema file (GitLab ships its own as
    /// `ee/app/validators/json_schemas/security_orchestration_policy.json`).
    pub fn from_file(path: &Path) -> Result<PolicySchema, SchemaError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| SchemaError::Read { path: path.to_path_buf(), source })?;
        let value: Value =
            serde_json::from_str(&text).map_err(|source| SchemaError::NotJson { path: path.to_path_buf(), source })?;
        PolicySchema::compile(value, Some(path.to_path_buf()))
    }

    fn compile(value: Value, source: Option<PathBuf>) -> Result<PolicySchema, SchemaError> {
        let not_a_schema = |reason: String| SchemaError::NotASchema {
            path: source.clone().unwrap_or_else(|| PathBuf::from("(built-in)")),
            reason,
        };
        if !value.is_object() {
            return Err(not_a_schema("the top level must be a JSON object".into()));
        }
        // Compiling checks the schema against its draft's meta-schema: a typo such as
        // `"type": "strng"` is refused here, not discovered as every policy file being invalid.
        let validator = jsonschema::validator_for(&value)
            .map_err(|e| not_a_schema(format!("{} (at {})", e, pointer_text(e.instance_path().as_str()))))?;
        Ok(PolicySchema { validator: Arc::new(validator), source })
    }

    /// A schema that accepts every mapping: for tests of what happens after validation
    /// (diffing, limits), whose inputs need not be complete policies.
    #[cfg(test)]
    pub(crate) fn accept_any() -> PolicySchema {
        PolicySchema::compile(serde_json::json!({}), None).expect("`{}` is a valid schema")
    }

    /// The file this schema was read from, `None` for the built-in one.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Every error of `value` against the schema, each as `path: message`, in document order.
    pub fn errors(&self, value: &Value) -> Vec<String> {
        // Most files are valid: the yes/no answer skips building every error's description.
        if self.validator.is_valid(value) {
            return Vec::new();
        }
        let mut errors: Vec<(String, String)> = self
            .validator
            .iter_errors(value)
            .map(|e| {
                let path = readable_path(e.instance_path().segments().map(|s| s.to_string()));
                // A list or mapping quoted in full would bury the point: name its kind instead
                // ("the list has more than 5 items"); the path says which one.
                let message = match e.instance().as_ref() {
                    Value::Array(_) => e.masked_with("the list").to_string(),
                    Value::Object(_) => e.masked_with("the mapping").to_string(),
                    Value::String(s) if s.chars().count() > MAX_QUOTED_CHARS => e.masked_with("the text").to_string(),
                    _ => e.to_string(),
                };
                (path, truncate(&message, MAX_MESSAGE_CHARS))
            })
            .collect();
        errors.dedup();
        errors
            .into_iter()
            .map(
                |(path, message)| {
                    if path.is_empty() { format!("(top level): {message}") } else { format!("{path}: {message}") }
                },
            )
            .collect()
    }
}

fn pointer_text(pointer: &str) -> String {
    if pointer.is_empty() { "the top level".into() } else { pointer.to_string() }
}

/// `["approval_policy", "0", "rules"]` -> `approval_policy[0].rules`.
fn readable_path(segments: impl Iterator<Item = String>) -> String {
    let mut out = String::new();
    for s in segments {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{s}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&s);
        }
    }
    out
}

fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max_chars).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_schema_is_a_valid_schema() {
        let value: Value = serde_json::from_str(BUILTIN_SCHEMA).expect("built-in schema is JSON");
        PolicySchema::compile(value, None).expect("built-in schema compiles");
    }

    #[test]
    fn a_file_that_is_not_a_schema_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("schema.json");
        std::fs::write(&bad, r#"{"type": "strng"}"#).unwrap();
        let e = PolicySchema::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("schema.json") && e.contains("not a usable JSON schema"), "{e}");
        std::fs::write(&bad, "{not json").unwrap();
        assert!(PolicySchema::from_file(&bad).unwrap_err().to_string().contains("is not JSON"));
        let missing = PolicySchema::from_file(&dir.path().join("missing.json")).unwrap_err().to_string();
        assert!(missing.contains("cannot read policy schema file") && missing.contains("missing.json"), "{missing}");
    }
}
