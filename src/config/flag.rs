//! The `security_policy_audit_events` feature flag, gated per actor (the SPP path) the way
//! GitLab's Flipper gates are: globally, for listed actors, or for a stable percentage of actors.

/// The flag's name: part of the percentage hash (Flipper's formula; the actor here is the SPP
/// path, where GitLab would use `Project:<id>`, so the chosen projects differ from GitLab's).
pub const FLAG_NAME: &str = "security_policy_audit_events";

#[derive(Debug, Clone, PartialEq)]
pub enum FeatureFlag {
    On,
    Off,
    Gates { actors: Vec<String>, percentage_of_actors: f64 },
}

impl FeatureFlag {
    pub(super) fn from_toml(value: &toml::Value) -> Result<FeatureFlag, String> {
        match value {
            toml::Value::Boolean(true) => Ok(FeatureFlag::On),
            toml::Value::Boolean(false) => Ok(FeatureFlag::Off),
            toml::Value::Table(_) => {
                let gates: super::raw::RawFlagGates =
                    value.clone().try_into().map_err(|e: toml::de::Error| e.message().to_string())?;
                let pct = gates.percentage_of_actors.unwrap_or(0.0);
                if !(0.0..=100.0).contains(&pct) {
                    return Err(format!("`percentage_of_actors` must be between 0 and 100, found {pct}"));
                }
                Ok(FeatureFlag::Gates { actors: gates.actors, percentage_of_actors: pct })
            }
            other => Err(format!(
                "expected true, false or {{ actors = [...], percentage_of_actors = N }}, found a {}",
                other.type_str()
            )),
        }
    }

    pub fn enabled_for(&self, actor: &str) -> bool {
        match self {
            FeatureFlag::On => true,
            FeatureFlag::Off => false,
            FeatureFlag::Gates { actors, percentage_of_actors } => {
                actors.iter().any(|a| a == actor) || in_percentage(actor, *percentage_of_actors)
            }
        }
    }

    /// For `status`: why the flag is on or off for this actor.
    pub fn describe_for(&self, actor: &str) -> String {
        match self {
            FeatureFlag::On => "on (globally)".into(),
            FeatureFlag::Off => "off (globally)".into(),
            FeatureFlag::Gates { actors, percentage_of_actors } => {
                if actors.iter().any(|a| a == actor) {
                    "on (listed actor)".into()
                } else if in_percentage(actor, *percentage_of_actors) {
                    format!("on ({percentage_of_actors}% of actors)")
                } else {
                    format!("off (not listed, not in {percentage_of_actors}% of actors)")
                }
            }
        }
    }
}

/// Flipper's percentage-of-actors gate: crc32(flag name + actor) % 100_000 < percentage * 1_000.
fn in_percentage(actor: &str, percentage: f64) -> bool {
    let hash = crc32fast::hash(format!("{FLAG_NAME}{actor}").as_bytes());
    f64::from(hash % 100_000) < percentage * 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentage_is_stable_and_roughly_proportional() {
        let flag = FeatureFlag::Gates { actors: vec![], percentage_of_actors: 25.0 };
        let on = (0..4000).filter(|i| flag.enabled_for(&format!("group/spp-{i}"))).count();
        assert!((800..1200).contains(&on), "25% of 4000 actors, got {on}");
        assert_eq!(flag.enabled_for("acme/security-policies"), flag.enabled_for("acme/security-policies"));
        let none = FeatureFlag::Gates { actors: vec!["a/b".into()], percentage_of_actors: 0.0 };
        assert!(none.enabled_for("a/b"));
        assert!(!none.enabled_for("a/c"));
        let all = FeatureFlag::Gates { actors: vec![], percentage_of_actors: 100.0 };
        assert!((0..100).all(|i| all.enabled_for(&format!("x/{i}"))));
    }
}
