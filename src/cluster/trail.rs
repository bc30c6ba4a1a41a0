//! The trail of record: publishing a project's events and moving its cursor, reading the
//! stream for the replica, and the destinations' delivered watermarks.

use super::{Node, ProjectTrail, keys, project_lease};
use crate::event::AuditEvent;
use crate::store::Cursor;
use anyhow::{Context, Result, bail};
use async_nats::jetstream::kv;

impl Node {
    /// The sequence below which the holder of `destination` has settled every delivery.
    pub fn watermark(&self, destination: &str) -> Result<u64> {
        self.block_on(async {
            let key = keys::watermark(destination);
            match self.kv.get(&key).await.with_context(|| format!("cannot read {key}"))? {
                Some(v) => serde_json::from_slice(&v).with_context(|| format!("{key} does not decode")),
                None => Ok(0),
            }
        })
    }

    pub fn set_watermark(&self, destination: &str, seq: u64) -> Result<()> {
        self.block_on(async {
            let key = keys::watermark(destination);
            self.kv.put(&key, serde_json::to_vec(&seq)?.into()).await.with_context(|| format!("cannot write {key}"))?;
            anyhow::Ok(())
        })
    }

    /// Up to `max` events of the trail stream from sequence `from`, with the sequence of the
    /// last one (None when there is nothing new).
    pub fn read_trail(&self, from: u64, max: usize) -> Result<Option<(u64, Vec<AuditEvent>)>> {
        self.block_on(async {
            let mut stream =
                self.js.get_stream(&self.trail_stream).await.context("cannot open the cluster's trail stream")?;
            let last = stream.info().await.context("cannot read the trail stream's state")?.state.last_sequence;
            if last < from {
                return Ok(None);
            }
            let to = last.min(from + max as u64 - 1);
            let mut events = Vec::new();
            for seq in from..=to {
                let message = stream
                    .get_raw_message(seq)
                    .await
                    .with_context(|| format!("cannot read message {seq} of the trail stream"))?;
                let event: AuditEvent = serde_json::from_slice(&message.payload)
                    .with_context(|| format!("message {seq} of the trail stream is not an audit event"))?;
                events.push(event);
            }
            Ok(Some((to, events)))
        })
    }

    pub(super) async fn publish_events(&self, events: &[AuditEvent]) -> Result<usize> {
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.id.as_str());
            let body = serde_json::to_vec(event)?;
            let ack = self
                .js
                .publish_with_headers(self.trail_subject.clone(), headers, body.into())
                .await
                .with_context(|| format!("cannot publish event {} to the trail stream", event.id))?;
            acks.push((event.id.as_str(), ack));
        }
        let mut new = 0;
        for (id, ack) in acks {
            let ack = ack.await.with_context(|| format!("the trail stream did not acknowledge event {id}"))?;
            if !ack.duplicate {
                new += 1;
            }
        }
        Ok(new)
    }
}

impl ProjectTrail for Node {
    fn cursor(&self, project: &str) -> Result<Option<Cursor>> {
        let key = keys::cursor(project);
        let entry = self.block_on(self.kv.entry(&key)).with_context(|| format!("cannot read {key}"))?;
        let (cursor, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let cursor: Cursor = serde_json::from_slice(&e.value)
                    .with_context(|| format!("the cursor of project {project:?} ({key}) does not decode"))?;
                (Some(cursor), e.revision)
            }
            _ => (None, 0),
        };
        if let Ok(mut r) = self.revisions.lock() {
            r.insert(key, revision);
        }
        Ok(cursor)
    }

    fn commit(&self, project: &str, cursor: &Cursor, events: &[AuditEvent]) -> Result<usize> {
        if !self.holds(&project_lease(project)) {
            bail!("instance {} no longer holds the lease of project {project:?}; stopped before publishing", self.id);
        }
        let key = keys::cursor(project);
        let Some(revision) = self.revisions.lock().ok().and_then(|r| r.get(&key).copied()) else {
            bail!("project {project:?}: commit without reading the cursor first");
        };
        let value: bytes::Bytes = serde_json::to_vec(cursor)?.into();
        self.block_on(async {
            let new = self.publish_events(events).await?;
            let moved = if revision == 0 {
                self.kv.create(&key, value).await.map_err(|e| e.to_string())
            } else {
                self.kv.update(&key, value, revision).await.map_err(|e| e.to_string())
            };
            match moved {
                Ok(rev) => {
                    if let Ok(mut r) = self.revisions.lock() {
                        r.insert(key, rev);
                    }
                    Ok(new)
                }
                Err(e) => {
                    if let Ok(mut r) = self.revisions.lock() {
                        r.remove(&key);
                    }
                    bail!(
                        "the cursor of project {project:?} moved under instance {} ({e}): another instance took it over; the events were published with their ids, so none is duplicated",
                        self.id
                    )
                }
            }
        })
    }
}
