//! GitLab's API: for attribution (SPEC §10) the Users API (who is this commit email?), the Merge
//! Requests API (who merged?) and the Approvals API (who approved?); for discovery (SPEC §12,
//! `crate::discovery`) the GraphQL API ([`Client::graphql`]).
//!
//! Invariants:
//! - the API can never fail or stall a reconcile: every call has a deadline (`gitlab.timeout`),
//!   at most `gitlab.concurrency` calls run at once, and after the first call that fails for a
//!   reason that would make the next ones fail too (unreachable, 5xx, a timeout, a 401, a
//!   `Retry-After` beyond the deadline) the client answers "unresolved" at once for the rest of
//!   its life (one reconcile run): the events are stored with what is known;
//! - `429` is honoured: the call waits `Retry-After` (when it fits in the deadline) and tries again;
//! - the token is sent as `PRIVATE-TOKEN` (REST) or `Authorization: Bearer` (GraphQL, as GitLab
//!   documents it) and never appears in a message or a log line.

pub mod attribution;

use crate::config::{GitLab, Secret};
use crate::event::GitLabUser;
use serde::Deserialize;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    /// GitLab answered: there is none.
    NotFound,
    /// No answer that can be trusted, and why.
    Unresolved(String),
}

/// Who merged and who approved a merge request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct MergeRequestPeople {
    pub merged_by: Option<GitLabUser>,
    pub approved_by: Vec<GitLabUser>,
}

pub struct Client {
    base: String,
    token: Secret,
    agent: ureq::Agent,
    timeout: Duration,
    slots: Slots,
    /// Set once the API is known to be out of reach for this run.
    down: Mutex<Option<String>>,
}

/// A counting semaphore: calls at once.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn take(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// One call's outcome, before it becomes a [`Lookup`].
enum Reply {
    Json(serde_json::Value),
    NotFound,
    /// Try no more calls this run.
    Down(String),
    /// This call failed; others may succeed.
    Failed(String),
    /// 429: ask again after this long.
    RateLimited(Duration),
}

#[derive(Deserialize)]
struct ApiUser {
    id: i64,
    username: String,
    name: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    public_email: Option<String>,
}

impl From<ApiUser> for GitLabUser {
    fn from(u: ApiUser) -> GitLabUser {
        GitLabUser { id: u.id, username: u.username, name: u.name }
    }
}

fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

impl Client {
    /// None when `[gitlab]` has no token (secrets not resolved).
    pub fn new(config: &GitLab) -> Result<Option<Client>, crate::tls::TlsError> {
        let Some(token) = config.token.clone() else { return Ok(None) };
        let tls = config.tls.load()?.ureq_config()?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("policy-audit/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Some(Client {
            base: config.url.clone(),
            token,
            agent,
            timeout: config.timeout,
            slots: Slots { free: Mutex::new(config.concurrency.max(1)), freed: Condvar::new() },
            down: Mutex::new(None),
        }))
    }

    /// The user whose email is `email` (case-insensitive, exact), per `GET /users?search=`.
    pub fn user_by_email(&self, email: &str) -> Lookup<GitLabUser> {
        let users = match self.get(&format!("/api/v4/users?search={}", encode(email))) {
            Ok(Some(v)) => v,
            Ok(None) => return Lookup::NotFound,
            Err(why) => return Lookup::Unresolved(why),
        };
        let Ok(users) = serde_json::from_value::<Vec<ApiUser>>(users) else {
            return Lookup::Unresolved("the Users API answered something that is not a list of users".into());
        };
        let wanted = email.to_lowercase();
        let mut exact: Vec<ApiUser> = users
            .into_iter()
            .filter(|u| [&u.email, &u.public_email].into_iter().flatten().any(|e| e.to_lowercase() == wanted))
            .collect();
        match exact.len() {
            0 => Lookup::NotFound,
            1 => Lookup::Found(exact.remove(0).into()),
            n => Lookup::Unresolved(format!("{n} GitLab users have the email {email}")),
        }
    }

    /// Who merged and who approved merge request `project!iid`.
    pub fn merge_request_people(&self, project: &str, iid: u64) -> Lookup<MergeRequestPeople> {
        let base = format!("/api/v4/projects/{}/merge_requests/{iid}", encode(project));
        let mr = match self.get(&base) {
            Ok(Some(v)) => v,
            Ok(None) => return Lookup::NotFound,
            Err(why) => return Lookup::Unresolved(why),
        };
        let user = |v: &serde_json::Value| serde_json::from_value::<ApiUser>(v.clone()).ok().map(GitLabUser::from);
        // `merge_user` is the newer name; `merged_by` is kept by GitLab for compatibility.
        let merged_by = user(&mr["merge_user"]).or_else(|| user(&mr["merged_by"]));
        let approvals = match self.get(&format!("{base}/approvals")) {
            Ok(Some(v)) => v,
            Ok(None) => return Lookup::Unresolved(format!("the approvals of {project}!{iid} are not available")),
            Err(why) => return Lookup::Unresolved(why),
        };
        let approved_by = approvals["approved_by"]
            .as_array()
            .map(|list| list.iter().filter_map(|a| user(&a["user"])).collect())
            .unwrap_or_default();
        Lookup::Found(MergeRequestPeople { merged_by, approved_by })
    }

    /// A GraphQL query (`POST /api/graphql`): its `data`, or why not. GraphQL `errors` fail
    /// the call (a partial answer is not an answer); the first error's message is kept.
    pub fn graphql(&self, query: &str, variables: serde_json::Value) -> Result<serde_json::Value, String> {
        let body = serde_json::json!({"query": query, "variables": variables}).to_string();
        let answer = match self.request("/api/graphql", Some(&body))? {
            Some(v) => v,
            None => return Err("the GitLab GraphQL API is not there (HTTP 404 on /api/graphql)".into()),
        };
        if let Some(errors) = answer.get("errors").and_then(|e| e.as_array()).filter(|e| !e.is_empty()) {
            let first = errors[0].get("message").and_then(|m| m.as_str()).unwrap_or("no message");
            return Err(format!("the GitLab GraphQL API answered with {} error(s): {first}", errors.len()));
        }
        match answer.get("data") {
            Some(data) if data.is_object() => Ok(data.clone()),
            _ => Err("the GitLab GraphQL API's answer has no `data`".into()),
        }
    }

    /// `GET` with the deadline, the slot, `429` handling and the circuit breaker. Ok(None) is
    /// a 404.
    fn get(&self, path: &str) -> Result<Option<serde_json::Value>, String> {
        self.request(path, None)
    }

    /// `GET`, or `POST` of a JSON `body`, with the deadline, the slot, `429` handling and the
    /// circuit breaker. Ok(None) is a 404.
    fn request(&self, path: &str, body: Option<&str>) -> Result<Option<serde_json::Value>, String> {
        if let Some(why) = self.down.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(why);
        }
        let _slot = self.slots.take();
        let deadline = Instant::now() + self.timeout;
        let mut reply = self.call(path, body);
        // 429: wait as asked when that fits in the deadline, then ask again.
        while let Reply::RateLimited(wait) = reply {
            if Instant::now() + wait >= deadline {
                reply = Reply::Down(format!(
                    "the GitLab API is rate limiting (Retry-After {}s, beyond the {} timeout)",
                    wait.as_secs(),
                    humantime::format_duration(self.timeout)
                ));
                break;
            }
            std::thread::sleep(wait);
            reply = self.call(path, body);
        }
        match reply {
            Reply::Json(v) => Ok(Some(v)),
            Reply::NotFound => Ok(None),
            Reply::Failed(why) => Err(why),
            Reply::RateLimited(_) => Err("the GitLab API is rate limiting".into()), // not reached: the loop above
            Reply::Down(why) => {
                tracing::warn!(gitlab = %self.base, reason = %why, "the GitLab API is not used for the rest of this run");
                *self.down.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                Err(why)
            }
        }
    }

    fn call(&self, path: &str, body: Option<&str>) -> Reply {
        let url = format!("{}{path}", self.base);
        let answer = match body {
            None => self.agent.get(&url).header("PRIVATE-TOKEN", self.token.expose()).call(),
            Some(body) => self
                .agent
                .post(&url)
                .header("Authorization", format!("Bearer {}", self.token.expose()))
                .header("Content-Type", "application/json")
                .send(body),
        };
        let mut response = match answer {
            Ok(r) => r,
            Err(ureq::Error::Timeout(_)) => {
                return Reply::Down(format!(
                    "the GitLab API did not answer within {}",
                    humantime::format_duration(self.timeout)
                ));
            }
            Err(e) => return Reply::Down(format!("the GitLab API is out of reach: {e}")),
        };
        let status = response.status().as_u16();
        match status {
            200..=299 => {
                let text = response.body_mut().with_config().limit(4 * 1024 * 1024).read_to_string();
                match text.map_err(|e| e.to_string()).and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
                {
                    Ok(v) => Reply::Json(v),
                    Err(e) => {
                        Reply::Failed(format!("the GitLab API's answer to {} does not parse: {e}", strip_query(path)))
                    }
                }
            }
            404 => Reply::NotFound,
            429 => Reply::RateLimited(
                response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(Duration::from_secs(1))
                    .max(Duration::from_millis(100)),
            ),
            401 | 403 => {
                Reply::Down(format!("the GitLab API refused the token (HTTP {status}): it needs the read_api scope"))
            }
            500..=599 => Reply::Down(format!("the GitLab API failed (HTTP {status})")),
            _ => Reply::Failed(format!("the GitLab API answered HTTP {status} to {}", strip_query(path))),
        }
    }
}

/// The path without its query: search terms (emails) stay out of messages.
fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}
