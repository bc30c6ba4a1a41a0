//! Key names in the cluster's bucket. A key allows letters, digits and `-/_=.`; any other byte
//! of a project path or destination name is written `=XX` (hex), so two names never share a key.

pub const INSTANCE_PREFIX: &str = "instance.";

fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

pub fn project_lease(path: &str) -> String {
    format!("lease.p.{}", encode(path))
}

pub fn destination_lease(name: &str) -> String {
    format!("lease.d.{}", encode(name))
}

pub fn cursor(path: &str) -> String {
    format!("cursor.{}", encode(path))
}

pub fn watermark(destination: &str) -> String {
    format!("delivered.{}", encode(destination))
}

pub fn instance(id: &str) -> String {
    format!("{INSTANCE_PREFIX}{}", encode(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_distinct_valid_keys() {
        assert_eq!(project_lease("acme/security-policies"), "lease.p.acme/security-policies");
        assert_eq!(cursor("a.b"), "cursor.a=2Eb");
        assert_ne!(cursor("a.b"), cursor("a=2Eb"));
        assert!(project_lease("ü x").bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)));
    }
}
