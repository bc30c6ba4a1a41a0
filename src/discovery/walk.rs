//! Reading from GitLab's GraphQL API which groups and projects are linked to which SPP.
//!
//! For each `discover` root, two paginated connections of 100 nodes each (the page size
//! GitLab's own UI asks for): the root group with `descendantGroups(includeParentDescendants:
//! true)` (every subgroup, at any depth) and `projects(includeSubgroups: true)`; for `"*"`,
//! the instance's `groups` and `projects`. Every node carries its `securityPolicyProject`
//! (GitLab's field on `Namespace` and `Project`, `ee/app/graphql/ee/types/*_type.rb`), which is
//! the **direct** link only: inheritance is applied by the reader (`crate::server::api`).
//! So 12,000 namespaces are about 120 calls.
//!
//! Invariants:
//! - all or nothing: any failed call, `errors` in an answer, a root GitLab does not show, or a
//!   node not in GitLab's shape fails the whole walk (the caller keeps the previous list), so a
//!   half-read GitLab never looks like unlinked namespaces;
//! - bounded: at most [`MAX_PAGES`] pages per connection, and a cursor that does not move is an
//!   error, not a loop.

use super::{Found, Link, NamespaceKind, Spp};
use crate::config::DISCOVER_ALL;
use crate::gitlab::Client;
use serde_json::{Value, json};

/// Pages per connection (100 nodes each): a million namespaces.
pub const MAX_PAGES: usize = 10_000;

const SPP_FIELDS: &str = "securityPolicyProject { id name fullPath httpUrlToRepo repository { rootRef } }";

fn group_tree_query() -> String {
    format!(
        "query($path: ID!, $after: String) {{ group(fullPath: $path) {{ id fullPath {SPP_FIELDS} \
         descendantGroups(includeParentDescendants: true, first: 100, after: $after) {{ \
         nodes {{ id fullPath {SPP_FIELDS} }} pageInfo {{ hasNextPage endCursor }} }} }} }}"
    )
}

fn group_projects_query() -> String {
    format!(
        "query($path: ID!, $after: String) {{ group(fullPath: $path) {{ \
         projects(includeSubgroups: true, first: 100, after: $after) {{ \
         nodes {{ id fullPath {SPP_FIELDS} }} pageInfo {{ hasNextPage endCursor }} }} }} }}"
    )
}

fn instance_query(connection: &str) -> String {
    format!(
        "query($after: String) {{ {connection}(first: 100, after: $after) {{ \
         nodes {{ id fullPath {SPP_FIELDS} }} pageInfo {{ hasNextPage endCursor }} }} }}"
    )
}

/// Everything the roots cover, as GitLab reports it now. The groups and the projects of a
/// root are two cursors, walked at once (within the client's concurrency limit).
pub fn walk(client: &Client, roots: &[String], stop: &crate::stop::Stop) -> Result<Found, String> {
    let mut found = Found::default();
    for root in roots {
        let (groups, projects) = std::thread::scope(|scope| {
            let projects = scope.spawn(|| projects_of(client, root, stop));
            let groups = groups_of(client, root, stop);
            (groups, projects.join().unwrap_or_else(|_| Err("the projects walk panicked".into())))
        });
        found.absorb(groups?);
        found.absorb(projects?);
    }
    Ok(found)
}

/// The groups under `root` (the root itself included), or the instance's groups.
fn groups_of(client: &Client, root: &str, stop: &crate::stop::Stop) -> Result<Found, String> {
    let mut found = Found::default();
    if root == DISCOVER_ALL {
        let query = instance_query("groups");
        paginate(&mut found, stop, "the instance's groups", |after| {
            Ok((client.graphql(&query, json!({"after": after}))?, vec!["groups"]))
        })?;
        return Ok(found);
    }
    let query = group_tree_query();
    let first = paginate(&mut found, stop, &format!("the subgroups of {root}"), |after| {
        let data = client.graphql(&query, json!({"path": root, "after": after}))?;
        if data["group"].is_null() {
            return Err(format!("GitLab has no group {root:?}, or the token cannot see it"));
        }
        Ok((data, vec!["group", "descendantGroups"]))
    })?;
    // The root's own link comes with the first page.
    node(&first["group"], NamespaceKind::Group)?.record(&mut found);
    Ok(found)
}

/// The projects under `root` (in its subgroups too), or the instance's projects.
fn projects_of(client: &Client, root: &str, stop: &crate::stop::Stop) -> Result<Found, String> {
    let mut found = Found::default();
    if root == DISCOVER_ALL {
        let query = instance_query("projects");
        paginate(&mut found, stop, "the instance's projects", |after| {
            Ok((client.graphql(&query, json!({"after": after}))?, vec!["projects"]))
        })?;
        return Ok(found);
    }
    let query = group_projects_query();
    paginate(&mut found, stop, &format!("the projects of {root}"), |after| {
        let data = client.graphql(&query, json!({"path": root, "after": after}))?;
        if data["group"].is_null() {
            return Err(format!("GitLab has no group {root:?}, or the token cannot see it"));
        }
        Ok((data, vec!["group", "projects"]))
    })?;
    Ok(found)
}

/// Asks `page(after)` until `hasNextPage` is false, recording every node. `page` returns the
/// `data` and the path to the connection in it. Returns the first page's `data`.
fn paginate(
    found: &mut Found,
    stop: &crate::stop::Stop,
    what: &str,
    mut page: impl FnMut(Option<&str>) -> Result<(Value, Vec<&'static str>), String>,
) -> Result<Value, String> {
    let mut after: Option<String> = None;
    let mut first = None;
    for _ in 0..MAX_PAGES {
        if stop.is_cancelled() {
            return Err("stopped: the daemon is shutting down".into());
        }
        let (data, path) = page(after.as_deref())?;
        found.calls += 1;
        let connection = path.iter().fold(&data, |v, key| &v[*key]);
        let kind = if path.last() == Some(&"projects") { NamespaceKind::Project } else { NamespaceKind::Group };
        let nodes =
            connection["nodes"].as_array().ok_or_else(|| format!("GitLab's answer for {what} has no `nodes` list"))?;
        for n in nodes {
            node(n, kind).map_err(|e| format!("{what}: {e}"))?.record(found);
        }
        let info = &connection["pageInfo"];
        let more = info["hasNextPage"]
            .as_bool()
            .ok_or_else(|| format!("GitLab's answer for {what} has no `pageInfo.hasNextPage`"))?;
        if first.is_none() {
            first = Some(data.clone());
        }
        if !more {
            return Ok(first.unwrap_or(data));
        }
        let next = info["endCursor"]
            .as_str()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("GitLab's answer for {what} says there is a next page but has no `endCursor`"))?;
        if after.as_deref() == Some(next) {
            return Err(format!("GitLab's answer for {what} repeats the cursor {next:?}: the walk would not end"));
        }
        after = Some(next.to_string());
    }
    Err(format!("{what}: more than {MAX_PAGES} pages of 100"))
}

/// One group or project node and its direct link.
struct Node {
    path: String,
    kind: NamespaceKind,
    id: i64,
    spp: Option<Spp>,
}

impl Node {
    fn record(self, found: &mut Found) {
        found.namespaces += 1;
        found.seen.insert(self.path.clone());
        if let Some(spp) = self.spp {
            found
                .links
                .insert(self.path, Link { kind: self.kind, id: self.id, spp: spp.path.clone(), missing_since: None });
            found.spps.insert(spp.path.clone(), spp);
        }
    }
}

fn node(v: &Value, kind: NamespaceKind) -> Result<Node, String> {
    let path = v["fullPath"].as_str().filter(|p| !p.is_empty()).ok_or("a node has no `fullPath`")?.to_string();
    let id = numeric_id(&v["id"]).ok_or_else(|| format!("{path}: `id` is not a GitLab global id"))?;
    let spp = match &v["securityPolicyProject"] {
        Value::Null => None,
        p => Some(spp(p).map_err(|e| format!("{path}: securityPolicyProject: {e}"))?),
    };
    Ok(Node { path, kind, id, spp })
}

fn spp(v: &Value) -> Result<Spp, String> {
    let path = v["fullPath"].as_str().filter(|p| !p.is_empty()).ok_or("no `fullPath`")?.to_string();
    let id = numeric_id(&v["id"]).ok_or("`id` is not a GitLab global id")?;
    let name = v["name"].as_str().unwrap_or(&path).to_string();
    let url = v["httpUrlToRepo"].as_str().map(str::to_string);
    // `repository` is null when the token may not download the code; `rootRef` when it is empty.
    let branch = v["repository"]["rootRef"].as_str().filter(|b| !b.is_empty()).map(str::to_string);
    Ok(Spp { id, path, name, url, branch })
}

/// `gid://gitlab/Project/42` -> 42.
pub fn numeric_id(v: &Value) -> Option<i64> {
    let gid = v.as_str()?;
    let rest = gid.strip_prefix("gid://gitlab/")?;
    let (_, n) = rest.rsplit_once('/')?;
    n.parse().ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_ids_are_read_and_anything_else_is_refused() {
        assert_eq!(numeric_id(&json!("gid://gitlab/Project/42")), Some(42));
        assert_eq!(numeric_id(&json!("gid://gitlab/Group/7")), Some(7));
        assert_eq!(numeric_id(&json!("42")), None);
        assert_eq!(numeric_id(&json!(42)), None);
        assert_eq!(numeric_id(&json!("gid://gitlab/Project/x")), None);
    }

    #[test]
    fn a_node_without_access_to_the_spp_code_has_no_branch() {
        let n = node(
            &json!({"id": "gid://gitlab/Group/3", "fullPath": "acme",
                    "securityPolicyProject": {"id": "gid://gitlab/Project/9", "name": "Policies",
                        "fullPath": "acme/policies", "httpUrlToRepo": "https://g/acme/policies.git", "repository": null}}),
            NamespaceKind::Group,
        )
        .expect("node");
        let spp = n.spp.expect("linked");
        assert_eq!((spp.id, spp.path.as_str(), spp.branch), (9, "acme/policies", None));
        assert!(node(&json!({"id": "gid://gitlab/Group/3"}), NamespaceKind::Group).is_err(), "no fullPath");
    }
}
