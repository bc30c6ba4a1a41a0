//! From the stored list and what GitLab reports now to the next list and the link changes
//! between them (SPEC §12).
//!
//! Invariants:
//! - the first discovery (no stored list) is a baseline: no changes;
//! - a namespace GitLab showed and whose `securityPolicyProject` is null now is unlinked; one
//!   it did not show at all (deleted, or the token lost access) is **not**: its link is kept,
//!   marked `missing_since`, until GitLab shows it again;
//! - a namespace outside every `discover` root (the roots were edited) leaves the list quietly:
//!   it is out of scope, not unlinked.

use super::{Found, Link, Snapshot, Spp};
use crate::config::DISCOVER_ALL;

/// One link that changed between two discoveries.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub namespace: String,
    pub link: Link,
    /// The SPP linked before (None: newly linked).
    pub before: Option<Spp>,
    /// The SPP linked now (None: unlinked).
    pub after: Option<Spp>,
}

/// Is `namespace` covered by the roots?
pub fn in_scope(roots: &[String], namespace: &str) -> bool {
    roots.iter().any(|r| {
        r == DISCOVER_ALL
            || namespace == r
            || namespace.strip_prefix(r.as_str()).is_some_and(|rest| rest.starts_with('/'))
    })
}

/// The next list and the changes that lead to it. `now` is an RFC 3339 time.
pub fn next(old: Option<&Snapshot>, found: Found, roots: &[String], now: &str) -> (Snapshot, Vec<Change>) {
    let mut list = Snapshot {
        discovered_at: now.to_string(),
        roots: roots.to_vec(),
        spps: Default::default(),
        links: Default::default(),
    };
    let mut changes = Vec::new();
    for (namespace, link) in &found.links {
        let after = found.spps.get(&link.spp).cloned();
        let before = old.and_then(|o| o.links.get(namespace));
        match (old, before) {
            (None, _) => {}
            (Some(_), Some(b)) if b.spp == link.spp => {}
            (Some(o), b) => changes.push(Change {
                namespace: namespace.clone(),
                link: link.clone(),
                before: b.and_then(|b| o.spps.get(&b.spp).cloned()),
                after,
            }),
        }
        list.links.insert(namespace.clone(), Link { missing_since: None, ..link.clone() });
    }
    if let Some(o) = old {
        for (namespace, link) in &o.links {
            if found.links.contains_key(namespace) || !in_scope(roots, namespace) {
                continue;
            }
            if found.seen.contains(namespace) {
                changes.push(Change {
                    namespace: namespace.clone(),
                    link: link.clone(),
                    before: o.spps.get(&link.spp).cloned(),
                    after: None,
                });
            } else {
                let since = link.missing_since.clone().unwrap_or_else(|| now.to_string());
                list.links.insert(namespace.clone(), Link { missing_since: Some(since), ..link.clone() });
            }
        }
    }
    // The SPPs the list links to: as GitLab reports them now, or as last reported for a
    // namespace that went missing.
    let wanted: std::collections::BTreeSet<&String> = list.links.values().map(|l| &l.spp).collect();
    for path in wanted {
        let spp = found.spps.get(path).or_else(|| old.and_then(|o| o.spps.get(path)));
        if let Some(spp) = spp {
            list.spps.insert(path.clone(), spp.clone());
        }
    }
    (list, changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::NamespaceKind;

    fn spp(path: &str, id: i64) -> Spp {
        Spp {
            id,
            path: path.into(),
            name: path.rsplit('/').next().unwrap_or(path).into(),
            url: None,
            branch: Some("main".into()),
        }
    }

    fn found(links: &[(&str, &Spp)], also_seen: &[&str]) -> Found {
        let mut f = Found::default();
        for (i, (ns, s)) in links.iter().enumerate() {
            let link = Link { kind: NamespaceKind::Group, id: i as i64 + 1, spp: s.path.clone(), missing_since: None };
            f.links.insert(ns.to_string(), link);
            f.spps.insert(s.path.clone(), (*s).clone());
            f.seen.insert(ns.to_string());
        }
        f.seen.extend(also_seen.iter().map(|s| s.to_string()));
        f
    }

    fn roots() -> Vec<String> {
        vec!["acme".into()]
    }

    #[test]
    fn the_first_discovery_is_a_baseline() {
        let a = spp("acme/policies", 9);
        let (list, changes) = next(None, found(&[("acme", &a)], &[]), &roots(), "t1");
        assert!(changes.is_empty());
        assert_eq!(list.links["acme"].spp, "acme/policies");
        assert!(list.spps.contains_key("acme/policies"));
    }

    #[test]
    fn linked_unlinked_and_changed_are_one_change_each() {
        let (a, b) = (spp("acme/policies", 9), spp("acme/other", 10));
        let (base, _) = next(None, found(&[("acme/web", &a), ("acme/api", &a)], &[]), &roots(), "t1");
        let now = found(&[("acme/web", &b), ("acme/new", &a)], &["acme/api"]);
        let (list, changes) = next(Some(&base), now, &roots(), "t2");
        let summary: Vec<(&str, Option<&str>, Option<&str>)> = changes
            .iter()
            .map(|c| {
                (
                    c.namespace.as_str(),
                    c.before.as_ref().map(|s| s.path.as_str()),
                    c.after.as_ref().map(|s| s.path.as_str()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("acme/new", None, Some("acme/policies")),
                ("acme/web", Some("acme/policies"), Some("acme/other")),
                ("acme/api", Some("acme/policies"), None),
            ]
        );
        assert!(!list.links.contains_key("acme/api"));
    }

    #[test]
    fn a_namespace_gitlab_no_longer_shows_is_kept_not_unlinked() {
        let a = spp("acme/policies", 9);
        let (base, _) = next(None, found(&[("acme/web", &a)], &[]), &roots(), "t1");
        let (list, changes) = next(Some(&base), found(&[], &[]), &roots(), "t2");
        assert!(changes.is_empty());
        assert_eq!(list.links["acme/web"].missing_since.as_deref(), Some("t2"));
        assert!(list.spps.contains_key("acme/policies"), "its SPP stays listed");
        let (again, _) = next(Some(&list), found(&[], &[]), &roots(), "t3");
        assert_eq!(again.links["acme/web"].missing_since.as_deref(), Some("t2"), "missing since the first time");
        let (back, changes) = next(Some(&again), found(&[], &["acme/web"]), &roots(), "t4");
        assert_eq!(changes.len(), 1, "shown again without a link: now it is unlinked");
        assert!(back.links.is_empty());
    }

    #[test]
    fn a_namespace_outside_the_roots_leaves_quietly() {
        let a = spp("acme/policies", 9);
        let (base, _) = next(None, found(&[("acme/web", &a)], &[]), &roots(), "t1");
        let (list, changes) = next(Some(&base), found(&[], &[]), &["platform".to_string()], "t2");
        assert!(changes.is_empty());
        assert!(list.links.is_empty());
        assert!(in_scope(&["*".to_string()], "any/thing"));
        assert!(!in_scope(&roots(), "acme-other/web"));
    }
}
