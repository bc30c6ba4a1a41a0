//! `policy::parse` + `policy::diff` + `policy::limit_breaches` on arbitrary bytes.
//!
//! The whole input is parsed as one file, then its two halves (`data[..len/2]`,
//! `data[len/2..]`) as the old and the new file. Nothing may panic, hang or blow up memory, and
//! these must hold:
//! - parsing is deterministic: `parse(x) == parse(x)` (the `Ok` set or the error text);
//! - a file has no changes against itself: `diff(a, a)` is empty;
//! - when both halves parse, `diff(a, b)` and `diff(b, a)` mirror each other: the creates of one
//!   are the deletes of the other (same multiset of `(type, name)`), the updates pair up by
//!   `(type, name, occurrence)` with the same field paths and `before`/`after` swapped, and every
//!   update lists at least one field;
//! - `limit_breaches` never panics, for the default limits and for limits 0 and 1; a breach
//!   skips exactly the enabled policies past the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy_audit::policy::{self, Change, ChangeKind, Limits, PolicySet, PolicyType};
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let whole = parse_twice(data);
    if let Ok(set) = &whole {
        check_one(set);
    }
    let (a, b) = data.split_at(data.len() / 2);
    let (Ok(a), Ok(b)) = (parse_twice(a), parse_twice(b)) else {
        return;
    };
    check_one(&a);
    check_one(&b);
    check_pair(&a, &b);
});

fn parse_twice(bytes: &[u8]) -> Result<PolicySet, policy::InvalidPolicyFile> {
    let first = policy::parse(bytes);
    let second = policy::parse(bytes);
    assert_eq!(first, second, "parse is not deterministic");
    first
}

fn check_one(set: &PolicySet) {
    let same = policy::diff(set, set);
    assert!(same.is_empty(), "diff(a, a) is not empty: {same:?}");
    for limits in [
        Limits::default(),
        Limits::new(PolicyType::ALL.into_iter().map(|t| (t, 0)).collect()),
        Limits::new(PolicyType::ALL.into_iter().map(|t| (t, 1)).collect()),
    ] {
        for breach in policy::limit_breaches(set, &limits) {
            let enabled = set.of_type(breach.policy_type).filter(|p| p.enabled).count();
            assert_eq!(breach.limit, limits.of(breach.policy_type));
            assert_eq!(breach.active.len(), breach.limit);
            assert_eq!(breach.active.len() + breach.skipped.len(), enabled);
            assert!(!breach.skipped.is_empty());
        }
    }
}

type Identity = (ChangeKind, PolicyType, String, usize);

fn by_identity(changes: &[Change]) -> BTreeMap<Identity, &Change> {
    let mut out = BTreeMap::new();
    for c in changes {
        let previous = out.insert((c.kind, c.policy_type, c.name.clone(), c.occurrence), c);
        assert!(previous.is_none(), "two changes share one identity: {c:?}");
    }
    out
}

fn names_of(changes: &BTreeMap<Identity, &Change>, kind: ChangeKind) -> Vec<(PolicyType, String, usize)> {
    changes.keys().filter(|k| k.0 == kind).map(|(_, t, n, o)| (*t, n.clone(), *o)).collect()
}

fn check_pair(a: &PolicySet, b: &PolicySet) {
    let forward = policy::diff(a, b);
    let backward = policy::diff(b, a);
    let fw = by_identity(&forward);
    let bw = by_identity(&backward);
    assert_eq!(names_of(&fw, ChangeKind::Created), names_of(&bw, ChangeKind::Deleted), "creates a->b != deletes b->a");
    assert_eq!(names_of(&fw, ChangeKind::Deleted), names_of(&bw, ChangeKind::Created), "deletes a->b != creates b->a");
    assert_eq!(names_of(&fw, ChangeKind::Updated), names_of(&bw, ChangeKind::Updated), "updates do not pair up");
    for ((kind, t, name, occ), f) in &fw {
        if *kind != ChangeKind::Updated {
            assert!(f.fields.is_empty() && !f.fields_truncated);
            continue;
        }
        let r = bw[&(*kind, *t, name.clone(), *occ)];
        assert!(!f.fields.is_empty(), "an update lists no field: {f:?}");
        assert_eq!(f.fields.len(), r.fields.len());
        assert_eq!(f.fields_truncated, r.fields_truncated);
        for (x, y) in f.fields.iter().zip(&r.fields) {
            assert_eq!(x.path, y.path);
            assert_eq!(x.before, y.after);
            assert_eq!(x.after, y.before);
        }
    }
    if forward.is_empty() {
        assert!(backward.is_empty(), "diff(a, b) is empty but diff(b, a) is not");
    }
}
