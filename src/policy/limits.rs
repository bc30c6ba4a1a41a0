//! Per-type limits on enabled policies: GitLab enforces only the first N enabled policies of
//! a type (in file order) and skips the rest. Pure functions over a [`PolicySet`].

use super::{PolicySet, PolicyType};
use std::collections::BTreeMap;

/// The limit per policy type: GitLab's defaults, overridable per project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    overrides: BTreeMap<PolicyType, usize>,
}

impl Limits {
    pub fn new(overrides: BTreeMap<PolicyType, usize>) -> Self {
        Limits { overrides }
    }

    pub fn of(&self, policy_type: PolicyType) -> usize {
        self.overrides.get(&policy_type).copied().unwrap_or_else(|| policy_type.default_limit())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(BTreeMap::new())
    }
}

/// A type whose enabled policies exceed its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeLimit {
    pub policy_type: PolicyType,
    pub limit: usize,
    /// Names of the enabled policies that are enforced, in file order.
    pub active: Vec<String>,
    /// Names of the enabled policies beyond the limit, in file order.
    pub skipped: Vec<String>,
}

/// The skipped policy names per type, as last reported. Kept in the cursor so a limit event is
/// emitted when the skipped set changes, not at every reconcile.
pub type LimitState = BTreeMap<PolicyType, Vec<String>>;

/// The types whose enabled policies exceed their limit, in type order.
pub fn limit_breaches(set: &PolicySet, limits: &Limits) -> Vec<TypeLimit> {
    PolicyType::ALL
        .into_iter()
        .filter_map(|policy_type| {
            let limit = limits.of(policy_type);
            let enabled: Vec<String> = set.of_type(policy_type).filter(|p| p.enabled).map(|p| p.name.clone()).collect();
            (enabled.len() > limit).then(|| {
                let (active, skipped) = enabled.split_at(limit);
                TypeLimit { policy_type, limit, active: active.to_vec(), skipped: skipped.to_vec() }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicySchema, parse_with};

    #[test]
    fn only_enabled_policies_count_and_file_order_decides() {
        let yaml = "
approval_policy:
- {name: a, enabled: true}
- {name: 'off', enabled: false}
- {name: b, enabled: true}
- {name: c, enabled: true}
pipeline_execution_schedule_policy:
- {name: s1, enabled: true}
- {name: s2, enabled: true}
";
        let set = parse_with(yaml.as_bytes(), &PolicySchema::accept_any()).unwrap();
        let limits = Limits::new([(PolicyType::Approval, 2)].into());
        let breaches = limit_breaches(&set, &limits);
        assert_eq!(breaches.len(), 2);
        assert_eq!(breaches[0].active, ["a", "b"]);
        assert_eq!(breaches[0].skipped, ["c"]);
        assert_eq!(breaches[1].policy_type, PolicyType::PipelineExecutionSchedule);
        assert_eq!((breaches[1].limit, breaches[1].skipped.as_slice()), (1, ["s2".to_string()].as_slice()));
        assert!(
            limit_breaches(
                &set,
                &Limits::new([(PolicyType::Approval, 3), (PolicyType::PipelineExecutionSchedule, 2)].into())
            )
            .is_empty()
        );
    }
}
