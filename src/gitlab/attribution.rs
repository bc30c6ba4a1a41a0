//! Who did it, in GitLab's terms (SPEC §10): each event's `author_id` from, in this order, the
//! `[authors]` map, a GitLab private commit email (`<id>-<username>@users.noreply.<host>`, no
//! API call), the Users API (exact email match, cached in the store for `gitlab.cache_ttl`, "no
//! such user" cached too), else `-4`; and for merge-request steps, who merged and who approved.
//!
//! Attribution never fails a reconcile: what could not be resolved is said in
//! `details.attribution.unresolved` and the event is stored with what is known. Event ids do
//! not depend on any of it, so a replay finds the same events.

use super::{Client, Lookup, MergeRequestPeople};
use crate::config::Config;
use crate::event::{Attribution, AuditEvent, GitLabUser, UNKNOWN_AUTHOR_ID};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

pub struct Attributor<'a> {
    authors: &'a BTreeMap<String, i64>,
    /// With `[gitlab]`: the client, or why there is none this run.
    api: Option<Result<Client, String>>,
    store: &'a Store,
    ttl_ms: i64,
    now_ms: i64,
    users: Mutex<HashMap<String, Lookup<GitLabUser>>>,
    merge_requests: Mutex<HashMap<(String, u64), Lookup<MergeRequestPeople>>>,
}

#[derive(Serialize, Deserialize)]
struct CachedUser {
    at: i64,
    user: Option<GitLabUser>,
}

/// `<id>-<username>@users.noreply.<host>`: GitLab's private commit email.
pub fn private_commit_email(email: &str) -> Option<(i64, String)> {
    let (local, domain) = email.rsplit_once('@')?;
    if !domain.to_lowercase().starts_with("users.noreply.") {
        return None;
    }
    let (id, username) = local.split_once('-')?;
    let id: i64 = id.parse().ok().filter(|id| *id > 0)?;
    (!username.is_empty()).then(|| (id, username.to_string()))
}

impl<'a> Attributor<'a> {
    pub fn new(config: &'a Config, store: &'a Store, now: jiff::Timestamp) -> Attributor<'a> {
        let api = config.gitlab.as_ref().map(|g| match Client::new(g) {
            Ok(Some(client)) => Ok(client),
            Ok(None) => Err("the [gitlab] token is not available".to_string()),
            Err(e) => Err(format!("the GitLab API client cannot be set up: {e}")),
        });
        Attributor {
            authors: &config.authors,
            api,
            store,
            ttl_ms: config.gitlab.as_ref().map_or(0, |g| g.cache_ttl.as_millis() as i64),
            now_ms: now.as_millisecond(),
            users: Mutex::new(HashMap::new()),
            merge_requests: Mutex::new(HashMap::new()),
        }
    }

    /// Fills in `author_id`, `details.gitlab_user`, `details.merge_request.merged_by` /
    /// `approved_by` and `details.attribution` of freshly made events.
    pub fn apply(&self, events: &mut [AuditEvent]) {
        for e in events {
            let email = e.details.author_email.to_lowercase();
            let mut unresolved = Vec::new();
            let (id, user, source) = if let Some(id) = self.authors.get(&email) {
                (Some(*id), None, "authors_map")
            } else if let Some((id, username)) = private_commit_email(&email) {
                (Some(id), Some(GitLabUser { id, username, name: e.author_name.clone() }), "private_commit_email")
            } else {
                match self.user(&email) {
                    Some(Lookup::Found(u)) => (Some(u.id), Some(u), "gitlab_users_api"),
                    Some(Lookup::NotFound) => {
                        unresolved.push(format!("author: no GitLab user has the email {email}"));
                        (None, None, "unresolved")
                    }
                    Some(Lookup::Unresolved(why)) => {
                        unresolved.push(format!("author: {why}"));
                        (None, None, "unresolved")
                    }
                    None => (None, None, "unresolved"),
                }
            };
            e.author_id = id.unwrap_or(UNKNOWN_AUTHOR_ID);
            e.details.gitlab_user = user;
            if let Some(mr) = e.details.merge_request.as_mut() {
                match self.merge_request(&mr.project, mr.iid) {
                    Some(Lookup::Found(people)) => {
                        mr.merged_by = people.merged_by;
                        mr.approved_by = Some(people.approved_by);
                    }
                    Some(Lookup::NotFound) => {
                        unresolved.push(format!("merge request {}!{}: not found in GitLab", mr.project, mr.iid));
                    }
                    Some(Lookup::Unresolved(why)) => {
                        unresolved.push(format!("merge request {}!{}: {why}", mr.project, mr.iid));
                    }
                    None => {}
                }
            }
            if self.api.is_some() || source == "private_commit_email" {
                e.details.attribution = Some(Attribution { author_source: source.into(), unresolved });
            }
        }
    }

    /// None without `[gitlab]`.
    fn client(&self) -> Option<Result<&Client, String>> {
        self.api.as_ref().map(|a| a.as_ref().map_err(Clone::clone))
    }

    fn user(&self, email: &str) -> Option<Lookup<GitLabUser>> {
        let client = match self.client()? {
            Ok(c) => c,
            Err(why) => return Some(Lookup::Unresolved(why)),
        };
        if let Some(known) = self.users.lock().unwrap_or_else(|p| p.into_inner()).get(email) {
            return Some(known.clone());
        }
        let key = format!("user:{email}");
        let cached = self.store.gitlab_cache(&key).ok().flatten().and_then(|bytes| {
            serde_json::from_slice::<CachedUser>(&bytes)
                .inspect_err(
                    |e| tracing::warn!(email, error = %e, "an unreadable GitLab user cache entry is looked up again"),
                )
                .ok()
        });
        let found = match cached {
            Some(c) if self.now_ms.saturating_sub(c.at) < self.ttl_ms => match c.user {
                Some(u) => Lookup::Found(u),
                None => Lookup::NotFound,
            },
            _ => {
                let answer = client.user_by_email(email);
                let user = match &answer {
                    Lookup::Found(u) => Some(Some(u.clone())),
                    Lookup::NotFound => Some(None),
                    Lookup::Unresolved(_) => None, // not cached: ask again next time
                };
                if let Some(user) = user
                    && let Ok(bytes) = serde_json::to_vec(&CachedUser { at: self.now_ms, user })
                    && let Err(e) = self.store.set_gitlab_cache(&key, &bytes)
                {
                    tracing::warn!(error = %format!("{e:#}"), "cannot cache a GitLab user");
                }
                answer
            }
        };
        self.users.lock().unwrap_or_else(|p| p.into_inner()).insert(email.to_string(), found.clone());
        Some(found)
    }

    fn merge_request(&self, project: &str, iid: u64) -> Option<Lookup<MergeRequestPeople>> {
        let client = match self.client()? {
            Ok(c) => c,
            Err(why) => return Some(Lookup::Unresolved(why)),
        };
        let memo_key = (project.to_string(), iid);
        if let Some(known) = self.merge_requests.lock().unwrap_or_else(|p| p.into_inner()).get(&memo_key) {
            return Some(known.clone());
        }
        // Who merged and approved a merged request never changes: kept without expiry.
        let key = format!("mr:{project}!{iid}");
        let cached = self
            .store
            .gitlab_cache(&key)
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice::<MergeRequestPeople>(&bytes).ok());
        let found = match cached {
            Some(people) => Lookup::Found(people),
            None => {
                let answer = client.merge_request_people(project, iid);
                if let Lookup::Found(people) = &answer
                    && let Ok(bytes) = serde_json::to_vec(people)
                    && let Err(e) = self.store.set_gitlab_cache(&key, &bytes)
                {
                    tracing::warn!(error = %format!("{e:#}"), "cannot cache a merge request's people");
                }
                answer
            }
        };
        self.merge_requests.lock().unwrap_or_else(|p| p.into_inner()).insert(memo_key, found.clone());
        Some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::private_commit_email;

    #[test]
    fn private_commit_emails_name_the_user() {
        assert_eq!(private_commit_email("42-alice@users.noreply.gitlab.com"), Some((42, "alice".into())));
        assert_eq!(
            private_commit_email("7-bob-the-builder@users.noreply.gitlab.example.com"),
            Some((7, "bob-the-builder".into()))
        );
        assert_eq!(private_commit_email("alice@users.noreply.gitlab.com"), None);
        assert_eq!(private_commit_email("42-alice@example.com"), None);
        assert_eq!(private_commit_email("0-root@users.noreply.gitlab.com"), None);
        assert_eq!(private_commit_email("x-alice@users.noreply.gitlab.com"), None);
    }
}
