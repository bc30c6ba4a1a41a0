//! Reading the trail: events in time order through the indexes (see `index`), filtered,
//! streamed to the caller one at a time so that listing a million events needs memory for one
//! (or, with `limit`, for the N kept). Ties in time keep storage order.

use super::{EventQuery, Store, StoreError, blocks};
use crate::event::AuditEvent;
use anyhow::Result;
use std::ops::ControlFlow;

impl Store {
    /// Event `seq`, decoded.
    pub(super) fn event_at(&self, seq: u64) -> Result<AuditEvent, StoreError> {
        self.decode_json(seq, &self.event_json_at(seq)?)
    }

    /// Event `seq` as its JSON: the bytes that are streamed and chained, which the API sends
    /// as they are. (How a body is kept on disk is this function's business.)
    pub(super) fn event_json_at(&self, seq: u64) -> Result<sled::IVec, StoreError> {
        if let Some(json) = self.recent.get(seq) {
            return Ok(json);
        }
        let stored = self.stored_body(seq)?.ok_or_else(|| StoreError::Damaged {
            what: format!("event #{seq} is listed in the time index but missing"),
            location: format!("tree \"bodies\" in {}", self.dir.display()),
        })?;
        let json = self.event_json_ivec(seq, stored)?;
        self.recent.put(seq, &json);
        Ok(json)
    }

    /// Calls `each` with every matching event, oldest first (by `created_at`, then by storage
    /// order), until it answers `Break`. With `limit`, the most recent N matching events.
    pub fn for_each_event(
        &self,
        q: &EventQuery,
        mut each: impl FnMut(AuditEvent) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        let span = q.span()?;
        let visit = |entry: Result<blocks::Entry, StoreError>| -> Result<Option<AuditEvent>> {
            let event = self.event_at(blocks::seq_of(&entry?))?;
            Ok(q.matches(&event).then_some(event))
        };
        // The most selective list: `events --project X` reads only X's events.
        let list = self.best_list(q);
        match q.limit {
            None => {
                for entry in self.list_range(&list, span, false) {
                    if let Some(event) = visit(entry)?
                        && each(event)?.is_break()
                    {
                        break;
                    }
                }
            }
            Some(n) => {
                let mut newest = Vec::with_capacity(n.min(10_000));
                for entry in self.list_range(&list, span, true) {
                    if newest.len() >= n {
                        break;
                    }
                    if let Some(event) = visit(entry)? {
                        newest.push(event);
                    }
                }
                for event in newest.into_iter().rev() {
                    if each(event)?.is_break() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Matching events, oldest first, collected (see [`Store::for_each_event`]).
    pub fn events(&self, q: &EventQuery) -> Result<Vec<AuditEvent>> {
        let mut out = Vec::new();
        self.for_each_event(q, |e| {
            out.push(e);
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(out)
    }
}

impl EventQuery {
    pub(super) fn matches(&self, e: &AuditEvent) -> bool {
        let author = self.author.as_ref().map(|a| a.to_lowercase());
        (self.projects.is_empty() || self.projects.iter().any(|p| p == &e.entity_path))
            && (self.event_types.is_empty() || self.event_types.contains(&e.event_type))
            && self.policy.as_ref().is_none_or(|p| e.details.policy_name.as_deref() == Some(p.as_str()))
            && author.is_none_or(|a| {
                e.author_name.to_lowercase().contains(&a) || e.details.author_email.to_lowercase().contains(&a)
            })
            && self
                .author_exact
                .as_ref()
                .map(|a| a.to_lowercase())
                .is_none_or(|a| e.author_name.to_lowercase() == a || e.details.author_email.to_lowercase() == a)
            && self.since.as_ref().is_none_or(|s| e.created_at.as_str() >= s.as_str())
            && self.until.as_ref().is_none_or(|u| e.created_at.as_str() <= u.as_str())
            && (!self.authored_only.iter().any(|p| p == &e.entity_path) || Some(e.author_id) == self.author_id)
    }
}
