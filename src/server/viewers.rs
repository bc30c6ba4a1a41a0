//! Who is reading, and what they may see (SPEC §13).
//!
//! A request carries the service token (`[server]` token, or the login cookie made from it), or,
//! with `[server.sign_in]`, a person's own GitLab token (`PRIVATE-TOKEN` / `Bearer`), which is
//! resolved through GitLab's `GET /api/v4/user` and remembered for `user_cache_ttl` (a revoked
//! token stops working within it). What a person sees follows GitLab's rules for the namespaces
//! an event's SPP is linked to: administrators everything; a group's Owner, or a project's
//! Maintainer and above, every event of the SPPs linked there; a Developer only the events they
//! authored. Roles come from GitLab's members API (`members/all`, inherited memberships
//! included), asked with the person's own token and remembered for `membership_cache_ttl`.
//!
//! Invariants:
//! - fail closed: a GitLab that does not answer in time (or answers 5xx) gives `503`, never
//!   access; a token GitLab refuses gives `401`;
//! - an event a person may not see is answered exactly as a missing one;
//! - no token is logged or kept beyond its digest (the cache keys) and the request itself.

use crate::config::{Config, Project, SignIn, path_has_prefix};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

/// Who a request is.
#[derive(Clone)]
pub enum Viewer {
    /// The `[server]` token (a SIEM collector), limited to `token_namespaces` when set.
    Service,
    User(User),
}

#[derive(Clone)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub admin: bool,
    /// The person's own token, to ask GitLab for their roles (never logged).
    token: crate::config::Secret,
}

impl User {
    /// The person a signed-in session is.
    pub fn of_session(s: super::signin::Session) -> User {
        User { id: s.id, username: s.username, admin: s.admin, token: s.token }
    }
}

impl Viewer {
    /// For the access log and `/metrics`: `service`, or the GitLab username.
    pub fn name(&self) -> &str {
        match self {
            Viewer::Service => "service token",
            Viewer::User(u) => &u.username,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Viewer::Service => "service",
            Viewer::User(_) => "user",
        }
    }
}

/// GitLab did not answer (in time, or with a usable answer): the request must fail closed.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

/// What a viewer may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    All,
    Some {
        /// SPPs whose every event is visible.
        full: Vec<String>,
        /// SPPs of which only the viewer's own events are visible.
        own: Vec<String>,
        user_id: i64,
    },
}

impl Visible {
    /// Narrows a query to what is visible; false when nothing of it is.
    pub fn restrict(&self, q: &mut crate::store::EventQuery) -> bool {
        let Visible::Some { full, own, user_id } = self else { return true };
        let allowed = |p: &String| full.contains(p) || own.contains(p);
        if q.projects.is_empty() {
            q.projects = full.iter().chain(own.iter()).cloned().collect();
        } else {
            q.projects.retain(allowed);
        }
        if q.projects.is_empty() {
            return false;
        }
        q.authored_only = q.projects.iter().filter(|p| own.contains(p) && !full.contains(p)).cloned().collect();
        q.author_id = Some(*user_id);
        true
    }

    /// Narrows a query to what is visible; a query nothing of which is visible asks for a
    /// project no SPP can be (a path with a NUL), so it lists and counts nothing.
    pub fn narrow(&self, q: &mut crate::store::EventQuery) {
        if !self.restrict(q) {
            q.projects = vec!["\0nothing visible".into()];
            q.authored_only.clear();
        }
    }

    /// Whether any event of `project` may be visible (it is offered as a filter).
    pub fn lists(&self, project: &str) -> bool {
        match self {
            Visible::All => true,
            Visible::Some { full, own, .. } => full.iter().chain(own).any(|p| p == project),
        }
    }

    /// Whether one event (by its SPP and author) is visible.
    pub fn shows(&self, entity_path: &str, author_id: i64) -> bool {
        match self {
            Visible::All => true,
            Visible::Some { full, own, user_id } => {
                full.iter().any(|p| p == entity_path) || (own.iter().any(|p| p == entity_path) && author_id == *user_id)
            }
        }
    }
}

/// What GitLab said of a token: (user id, username, is an administrator), or None (refused).
type KnownUser = Option<(i64, String, bool)>;
/// A user's role in a namespace: (access level, the namespace is a group).
type Role = (u8, bool);

/// Cached answers of GitLab and the read counts, for one server.
pub struct Viewers {
    agent: ureq::Agent,
    /// sha256(token) -> the user (None: GitLab refused the token), and when it was asked.
    users: Mutex<HashMap<[u8; 32], (KnownUser, Instant)>>,
    /// (user id, namespace) -> (access level, is a group), and when it was asked.
    roles: Mutex<HashMap<(i64, String), (Role, Instant)>>,
    /// (route, viewer kind) -> reads.
    pub reads: Mutex<BTreeMap<(String, &'static str), u64>>,
    pub sign_ins_refused: Mutex<u64>,
    /// Sign-ins through GitLab's pages by outcome (`signed_in`, `refused`, `unavailable`).
    pub sign_ins: Mutex<BTreeMap<&'static str, u64>>,
    /// Signed-in sessions and sign-ins in progress.
    pub sessions: super::signin::Sessions,
}

impl Default for Viewers {
    fn default() -> Viewers {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("policy-audit/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Viewers {
            agent,
            users: Mutex::default(),
            roles: Mutex::default(),
            reads: Mutex::default(),
            sign_ins_refused: Mutex::default(),
            sign_ins: Mutex::default(),
            sessions: Default::default(),
        }
    }
}

/// GitLab's access levels (`doc/api/members.md`).
const DEVELOPER: u8 = 30;
const MAINTAINER: u8 = 40;
const OWNER: u8 = 50;

impl Viewers {
    /// The GitLab user whose token this is (None: GitLab refuses it). Blocking.
    pub fn user(&self, sign_in: &SignIn, token: &str) -> Result<Option<User>, Unavailable> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.users.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        let known = match cached {
            Some((known, at)) if at.elapsed() < sign_in.user_cache_ttl => known,
            _ => {
                let asked = self.ask_user(sign_in, token)?;
                let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
                if users.len() > 10_000 {
                    users.clear(); // bounded: a flood of made-up tokens cannot grow it
                }
                users.insert(key, (asked.clone(), Instant::now()));
                asked
            }
        };
        Ok(known.map(|(id, username, admin)| User {
            id,
            username,
            admin,
            token: crate::config::Secret::new(token.to_string()),
        }))
    }

    fn ask_user(&self, sign_in: &SignIn, token: &str) -> Result<KnownUser, Unavailable> {
        match self.get(sign_in, "/api/v4/user", token)? {
            (200, Some(v)) => {
                let id = v["id"].as_i64().ok_or_else(|| Unavailable("GitLab's /user answer has no id".into()))?;
                let username = v["username"].as_str().unwrap_or_default().to_string();
                Ok(Some((id, username, v["is_admin"].as_bool().unwrap_or(false))))
            }
            (401 | 403, _) => Ok(None),
            (status, _) => Err(Unavailable(format!("GitLab answered HTTP {status} to /api/v4/user"))),
        }
    }

    /// The user's access level in `namespace` (0: none), and whether it is a group.
    fn role(&self, sign_in: &SignIn, user: &User, namespace: &str) -> Result<Role, Unavailable> {
        let key = (user.id, namespace.to_string());
        if let Some((role, at)) = self.roles.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < sign_in.membership_cache_ttl
        {
            return Ok(*role);
        }
        let encoded: String = url::form_urlencoded::byte_serialize(namespace.as_bytes()).collect();
        let mut role = (0, false);
        for (kind, group) in [("groups", true), ("projects", false)] {
            let path = format!("/api/v4/{kind}/{encoded}/members/all/{}", user.id);
            match self.get(sign_in, &path, user.token.expose())? {
                (200, Some(v)) => {
                    let level = v["access_level"].as_u64().unwrap_or(0).min(u8::MAX as u64) as u8;
                    role = (level, group);
                    break;
                }
                (401 | 403 | 404, _) => continue,
                (status, _) => return Err(Unavailable(format!("GitLab answered HTTP {status} to the members API"))),
            }
        }
        let mut roles = self.roles.lock().unwrap_or_else(|p| p.into_inner());
        if roles.len() > 100_000 {
            roles.clear();
        }
        roles.insert(key, (role, Instant::now()));
        Ok(role)
    }

    fn get(&self, sign_in: &SignIn, path: &str, token: &str) -> Result<(u16, Option<serde_json::Value>), Unavailable> {
        let url = format!("{}{path}", sign_in.gitlab_url);
        let answer = self
            .agent
            .get(&url)
            .config()
            .timeout_global(Some(sign_in.timeout))
            .build()
            // Bearer: GitLab takes personal and OAuth access tokens so (`doc/api/rest/authentication.md`).
            .header("Authorization", format!("Bearer {token}"))
            .call();
        let mut response = answer.map_err(|e| match e {
            ureq::Error::Timeout(_) => {
                Unavailable(format!("GitLab did not answer within {}", humantime::format_duration(sign_in.timeout)))
            }
            e => Unavailable(format!("GitLab is out of reach: {e}")),
        })?;
        let status = response.status().as_u16();
        let body = (status == 200)
            .then(|| response.body_mut().with_config().limit(1024 * 1024).read_to_string().ok())
            .flatten()
            .and_then(|t| serde_json::from_str(&t).ok());
        Ok((status, body))
    }

    /// What `viewer` may see of `config`'s SPPs. Blocking (asks GitLab for roles).
    pub fn visible(&self, config: &Config, viewer: &Viewer) -> Result<Visible, Unavailable> {
        let server = config.server.as_ref();
        match viewer {
            Viewer::Service => {
                let scope = server.map(|s| s.token_namespaces.as_slice()).unwrap_or_default();
                if scope.is_empty() {
                    return Ok(Visible::All);
                }
                let full = config
                    .projects
                    .iter()
                    .filter(|p| scope.iter().any(|ns| applies_in(p, ns) || path_has_prefix(&p.path, ns)))
                    .map(|p| p.path.clone())
                    .collect();
                Ok(Visible::Some { full, own: Vec::new(), user_id: 0 })
            }
            Viewer::User(u) if u.admin => Ok(Visible::All),
            Viewer::User(u) => {
                let Some(sign_in) = server.and_then(|s| s.sign_in.as_ref()) else {
                    return Ok(Visible::Some { full: Vec::new(), own: Vec::new(), user_id: u.id });
                };
                let (mut full, mut own) = (Vec::new(), Vec::new());
                for p in &config.projects {
                    let mut best = 0u8;
                    let mut sees_all = false;
                    for ns in &p.linked {
                        let (level, group) = self.role(sign_in, u, ns)?;
                        best = best.max(level);
                        sees_all |= if group { level >= OWNER } else { level >= MAINTAINER };
                    }
                    if sees_all {
                        full.push(p.path.clone());
                    } else if best >= DEVELOPER {
                        own.push(p.path.clone());
                    }
                }
                Ok(Visible::Some { full, own, user_id: u.id })
            }
        }
    }

    pub fn count_read(&self, route: &str, viewer: &Viewer) {
        *self.reads.lock().unwrap_or_else(|p| p.into_inner()).entry((route.to_string(), viewer.kind())).or_insert(0) +=
            1;
    }
}

/// The reader of a request (put there by the authentication in front of the reads).
pub struct Reader {
    pub viewer: Viewer,
    pub viewers: std::sync::Arc<Viewers>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Reader {
    type Rejection = axum::response::Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Reader, Self::Rejection> {
        use axum::response::IntoResponse;
        let viewer = parts.extensions.get::<Viewer>().cloned();
        let viewers = parts.extensions.get::<std::sync::Arc<Viewers>>().cloned();
        match (viewer, viewers) {
            (Some(viewer), Some(viewers)) => Ok(Reader { viewer, viewers }),
            _ => Err((axum::http::StatusCode::UNAUTHORIZED, "401 Unauthorized\n").into_response()),
        }
    }
}

impl Reader {
    /// What this reader may see, or the answer refusing the request (503: GitLab is silent).
    pub async fn visible(&self, source: &super::Shared) -> Result<Visible, axum::response::Response> {
        super::visible(source, &self.viewers, &self.viewer).await
    }
}

/// Whether `p`'s policies apply in namespace `ns`: linked to it, to something under it, or to
/// a group above it.
fn applies_in(p: &Project, ns: &str) -> bool {
    p.linked.iter().any(|l| path_has_prefix(l, ns) || path_has_prefix(ns, l))
}

#[cfg(test)]
mod tests {
    use super::Visible;
    use crate::store::EventQuery;

    #[test]
    fn a_query_is_narrowed_to_what_is_visible() {
        let v = Visible::Some { full: vec!["a/spp".into()], own: vec!["b/spp".into()], user_id: 7 };
        let mut q = EventQuery::default();
        assert!(v.restrict(&mut q));
        assert_eq!(q.projects, vec!["a/spp".to_string(), "b/spp".to_string()]);
        assert_eq!((q.authored_only.clone(), q.author_id), (vec!["b/spp".to_string()], Some(7)));
        let mut other = EventQuery { projects: vec!["c/spp".into()], ..Default::default() };
        assert!(!v.restrict(&mut other), "nothing of c/spp is visible");
        assert!(v.shows("a/spp", 1) && v.shows("b/spp", 7) && !v.shows("b/spp", 1) && !v.shows("c/spp", 7));
        assert!(Visible::All.restrict(&mut EventQuery::default()));
    }
}
