//! `POST /hooks/gitlab` (SPEC §9): GitLab's `Push Hook` as a trigger, never as a source of truth.
//!
//! Invariants:
//! - accepted only with `X-Gitlab-Token` equal to the webhook secret (constant time) or a valid
//!   Standard Webhooks signature made with it (timestamp within [`SIGNATURE_TOLERANCE`]);
//!   anything else is 401 and queues nothing;
//! - the payload only selects a configured project and branch (`project.path_with_namespace`
//!   or `project.git_http_url`, and `ref`); its commits and authors are never read: the
//!   reconcile reads the repository exactly as a scheduled one does;
//! - one queued reconcile per project at most ([`HookQueue`]): a hook for a project already
//!   queued is coalesced into it, a repeated `Idempotency-Key` / `X-Gitlab-Event-UUID` /
//!   `webhook-id` is dropped; the answer is 202 at once, 503 when the queue is full.

use super::{Shared, api::message, secret_matches};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// How many different projects may wait for a webhook reconcile; more is 503.
pub const MAX_QUEUED_PROJECTS: usize = 1024;
/// How many delivery ids are remembered to drop repeats.
const REMEMBERED_DELIVERIES: usize = 4096;
/// Standard Webhooks: signatures older or newer than this are refused (replays).
const SIGNATURE_TOLERANCE: i64 = 5 * 60;
/// How long the worker waits after the first hook before it starts, so that a burst of pushes
/// (a merge train, a group hook fanning out) becomes one reconcile.
pub const SETTLE: Duration = Duration::from_millis(250);

/// What the webhook did with a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// A reconcile of the project is now queued.
    Queued,
    /// One was already queued: this hook is part of it.
    Coalesced,
    /// The same delivery was seen before.
    Repeated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// Projects waiting for a webhook-triggered reconcile; the daemon's worker takes them.
pub struct HookQueue {
    state: Mutex<QueueState>,
    wake: mpsc::Sender<()>,
}

#[derive(Default)]
struct QueueState {
    pending: BTreeSet<String>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
}

impl HookQueue {
    /// The queue and the receiver the worker waits on (one wake-up stands for any number of hooks).
    pub fn new() -> (HookQueue, mpsc::Receiver<()>) {
        let (wake, woken) = mpsc::channel(1);
        (HookQueue { state: Mutex::new(QueueState::default()), wake }, woken)
    }

    pub fn submit(&self, project: &str, delivery: Option<&str>) -> Result<Queued, QueueFull> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = delivery
            && s.seen.contains(id)
        {
            return Ok(Queued::Repeated);
        }
        let queued = if s.pending.contains(project) {
            Queued::Coalesced
        } else if s.pending.len() >= MAX_QUEUED_PROJECTS {
            return Err(QueueFull);
        } else {
            s.pending.insert(project.to_string());
            Queued::Queued
        };
        if let Some(id) = delivery {
            s.seen.insert(id.to_string());
            s.seen_order.push_back(id.to_string());
            if s.seen_order.len() > REMEMBERED_DELIVERIES
                && let Some(old) = s.seen_order.pop_front()
            {
                s.seen.remove(&old);
            }
        }
        // Full means the worker is already woken: it takes everything pending.
        let _ = self.wake.try_send(());
        Ok(queued)
    }

    /// Everything queued so far (the worker reconciles these together).
    pub fn take(&self) -> Vec<String> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut s.pending).into_iter().collect()
    }
}

#[derive(Deserialize)]
struct PushHook {
    #[serde(default)]
    object_kind: String,
    #[serde(rename = "ref", default)]
    git_ref: String,
    project: Option<HookProject>,
}

#[derive(Deserialize)]
struct HookProject {
    path_with_namespace: Option<String>,
    git_http_url: Option<String>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `webhook-signature: v1,<base64> [v1,<base64>…]` over `<id>.<timestamp>.<body>`.
fn signature_valid(headers: &HeaderMap, body: &[u8], secret: &crate::config::Secret, now: i64) -> bool {
    let (Some(id), Some(ts), Some(sigs)) =
        (header(headers, "webhook-id"), header(headers, "webhook-timestamp"), header(headers, "webhook-signature"))
    else {
        return false;
    };
    let Ok(at) = ts.parse::<i64>() else { return false };
    if (now - at).abs() > SIGNATURE_TOLERANCE {
        return false;
    }
    let expected = crate::stream::http::signature(&crate::stream::http::signing_key(secret), id, ts, body);
    sigs.split(' ').any(|candidate| {
        use subtle::ConstantTimeEq;
        let (a, b) = (super::digest(candidate.as_bytes()), super::digest(expected.as_bytes()));
        a.ct_eq(&b).into()
    })
}

pub async fn gitlab(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let config = s.config();
    let (Some(secret), Some(queue)) = (config.server.as_ref().and_then(|c| c.webhook_secret.as_ref()), s.hooks())
    else {
        return message(StatusCode::NOT_FOUND, "404 Not found");
    };
    let token_ok = header(&headers, "x-gitlab-token").is_some_and(|t| secret_matches(t.as_bytes(), secret));
    if !token_ok && !signature_valid(&headers, &body, secret, jiff::Timestamp::now().as_second()) {
        tracing::warn!("webhook refused: wrong or missing X-Gitlab-Token or signature");
        return message(StatusCode::UNAUTHORIZED, "401 Unauthorized");
    }
    let hook: PushHook = match serde_json::from_slice(&body) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "webhook body is not a push hook; ignored");
            return (StatusCode::BAD_REQUEST, "the body is not a GitLab push hook (JSON)\n").into_response();
        }
    };
    let kind = header(&headers, "x-gitlab-event").unwrap_or("");
    if hook.object_kind != "push" && kind != "Push Hook" {
        tracing::debug!(event = kind, object_kind = %hook.object_kind, "webhook is not a push hook; ignored");
        return StatusCode::ACCEPTED.into_response();
    }
    let project = hook.project.as_ref();
    let path = project.and_then(|p| p.path_with_namespace.as_deref());
    let url = project.and_then(|p| p.git_http_url.as_deref());
    let Some(target) = config.projects.iter().find(|p| {
        (path == Some(p.path.as_str()) || url == Some(p.url.as_str()))
            && hook.git_ref.strip_prefix("refs/heads/") == Some(p.branch.as_str())
    }) else {
        tracing::debug!(project = path.unwrap_or(""), git_ref = %hook.git_ref, "webhook for a project or branch that is not configured; ignored");
        return StatusCode::ACCEPTED.into_response();
    };
    let delivery = header(&headers, "idempotency-key")
        .or_else(|| header(&headers, "x-gitlab-event-uuid"))
        .or_else(|| header(&headers, "webhook-id"));
    match queue.submit(&target.path, delivery) {
        Ok(how) => {
            tracing::info!(project = %target.path, outcome = ?how, "webhook: reconcile queued");
            StatusCode::ACCEPTED.into_response()
        }
        Err(QueueFull) => {
            tracing::warn!(project = %target.path, "webhook refused: the reconcile queue is full");
            (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "30")], "the reconcile queue is full; try again\n")
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_for_one_project_coalesce_and_repeats_are_dropped() {
        let (q, _woken) = HookQueue::new();
        assert_eq!(q.submit("a/spp", Some("u1")), Ok(Queued::Queued));
        assert_eq!(q.submit("a/spp", Some("u2")), Ok(Queued::Coalesced));
        assert_eq!(q.submit("a/spp", Some("u1")), Ok(Queued::Repeated));
        assert_eq!(q.take(), vec!["a/spp".to_string()]);
        assert_eq!(q.submit("a/spp", Some("u1")), Ok(Queued::Repeated), "a repeat stays dropped after the run");
        assert_eq!(q.submit("a/spp", None), Ok(Queued::Queued));
    }

    #[test]
    fn a_full_queue_refuses_new_projects_but_coalesces_known_ones() {
        let (q, _woken) = HookQueue::new();
        for i in 0..MAX_QUEUED_PROJECTS {
            assert!(q.submit(&format!("g/p{i}"), None).is_ok());
        }
        assert_eq!(q.submit("g/another", None), Err(QueueFull));
        assert_eq!(q.submit("g/p0", None), Ok(Queued::Coalesced));
    }
}
