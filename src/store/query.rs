//! Reading the trail: events in time order through the `by_time` index, filtered, streamed to
//! the caller one at a time so that listing a million events needs memory for one (or, with
//! `limit`, for the N kept).
//!
//! The index key is `created_at` (RFC 3339 with milliseconds, fixed width, so byte order is
//! time order) followed by the big-endian sequence number: ties keep storage order. Entries are
//! written in the transaction that stores their event; stores made before the index existed get
//! it built once at open.

use super::{EventQuery, Store, StoreError};
use crate::event::AuditEvent;
use anyhow::Result;
use std::ops::ControlFlow;

const INDEX_VERSION: &[u8] = b"index_by_time";

pub(super) fn time_key(created_at: &str, seq: u64) -> Vec<u8> {
    let mut k = created_at.as_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    key.len().checked_sub(8).and_then(|at| key[at..].try_into().ok()).map(u64::from_be_bytes)
}

impl Store {
    /// Builds the time index of a store written before it existed; once.
    pub(super) fn build_time_index(&self) -> Result<(), StoreError> {
        if self.meta.get(INDEX_VERSION).map_err(|e| self.sled(e))?.is_some() {
            return Ok(());
        }
        let total = self.next_seq()?;
        if total > 0 {
            tracing::info!(events = total, "building the time index of the stored events (once)");
        }
        #[derive(serde::Deserialize)]
        struct Created {
            created_at: String,
        }
        self.by_time.clear().map_err(|e| self.sled(e))?;
        for (done, item) in self.events.iter().enumerate() {
            let (k, v) = item.map_err(|e| self.sled(e))?;
            let seq = self.decode_seq_key("events", &k)?;
            let e: Created = self.decode_event(seq, &v)?;
            self.by_time.insert(time_key(&e.created_at, seq), &[]).map_err(|e| self.sled(e))?;
            if done > 0 && done % 100_000 == 0 {
                tracing::info!(indexed = done, of = total, "building the time index");
            }
        }
        self.meta.insert(INDEX_VERSION, &1u32.to_be_bytes()).map_err(|e| self.sled(e))?;
        self.db.flush().map_err(|e| self.sled(e))?;
        Ok(())
    }

    /// Event `seq`, decoded.
    pub(super) fn event_at(&self, seq: u64) -> Result<AuditEvent, StoreError> {
        let bytes = self.event_json_at(seq)?;
        super::decode(&self.dir, "events", &bytes, || format!("event #{seq}"))
    }

    /// Event `seq` as its JSON: the bytes that are streamed and chained, which the API sends
    /// as they are. (How a body is kept on disk is this function's business.)
    pub(super) fn event_json_at(&self, seq: u64) -> Result<sled::IVec, StoreError> {
        let stored =
            self.events.get(seq.to_be_bytes()).map_err(|e| self.sled(e))?.ok_or_else(|| StoreError::Damaged {
                what: format!("event #{seq} is listed in the time index but missing"),
                location: format!("tree \"events\" in {}", self.dir.display()),
            })?;
        self.event_json_ivec(seq, stored)
    }

    /// Calls `each` with every matching event, oldest first (by `created_at`, then by storage
    /// order), until it answers `Break`. With `limit`, the most recent N matching events.
    pub fn for_each_event(
        &self,
        q: &EventQuery,
        mut each: impl FnMut(AuditEvent) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        let start = q.since.as_deref().map(|s| s.as_bytes().to_vec()).unwrap_or_default();
        let range = self.by_time.range(start..);
        let in_range = |key: &[u8]| -> bool {
            q.until.as_deref().is_none_or(|u| key.len() < 8 || &key[..key.len() - 8] <= u.as_bytes())
        };
        let visit = |key: &[u8]| -> Result<Option<AuditEvent>> {
            let seq = seq_of(key).ok_or_else(|| StoreError::Damaged {
                what: "a time index key is too short".into(),
                location: format!("tree \"by_time\" in {}", self.dir.display()),
            })?;
            let event = self.event_at(seq)?;
            Ok(q.matches(&event).then_some(event))
        };
        match q.limit {
            None => {
                for item in range {
                    let (key, _) = item.map_err(|e| self.sled(e))?;
                    if !in_range(&key) {
                        break;
                    }
                    if let Some(event) = visit(&key)?
                        && each(event)?.is_break()
                    {
                        break;
                    }
                }
            }
            Some(n) => {
                let mut newest = Vec::with_capacity(n.min(10_000));
                for item in range.rev() {
                    if newest.len() >= n {
                        break;
                    }
                    let (key, _) = item.map_err(|e| self.sled(e))?;
                    if !in_range(&key) {
                        continue;
                    }
                    if let Some(event) = visit(&key)? {
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
    }
}
