//! `policy-audit cluster-import`: moves a single instance's trail into a new cluster without
//! losing or repeating events. With the single instance stopped, it publishes the stored events
//! to the (empty) trail stream in their stored order, writes each project's cursor to the bucket,
//! and each destination's delivered watermark (what the instance had settled). Replicas then
//! number the events as the old store does, so the watermarks mean the same on every instance,
//! and the old state directory can itself become a replica.

use super::{Node, keys};
use crate::config::Config;
use crate::event::AuditEvent;
use crate::store::Store;
use anyhow::{Context, Result, bail};

/// What an import did.
#[derive(Debug, Default)]
pub struct Imported {
    pub events: usize,
    pub cursors: usize,
    /// (destination, settled-below sequence)
    pub watermarks: Vec<(String, u64)>,
}

const CHUNK: u64 = 500;

pub fn import(config: &Config, store: &Store) -> Result<Imported> {
    let node = Node::start(config)?;
    node.block_on(async {
        let mut stream = node.js.get_stream(&node.trail_stream).await.context("cannot open the trail stream")?;
        let last = stream.info().await.context("cannot read the trail stream's state")?.state.last_sequence;
        if last > 0 {
            bail!(
                "the cluster's trail stream {} already has {last} events: import only into a new cluster (another `name`, or an emptied stream)",
                node.trail_stream
            );
        }
        anyhow::Ok(())
    })?;
    let mut imported = Imported::default();
    let total = store.next_sequence()?;
    let mut seq = 0;
    while seq < total {
        let mut events = Vec::new();
        for s in seq..(seq + CHUNK).min(total) {
            let bytes = store.event_bytes(s)?.with_context(|| format!("event #{s} is missing from the store"))?;
            let event: AuditEvent =
                serde_json::from_slice(&bytes).with_context(|| format!("event #{s} does not decode"))?;
            events.push(event);
        }
        seq += events.len() as u64;
        imported.events += node.block_on(node.publish_events(&events))?;
    }
    for project in store.synced_projects()? {
        let Some(cursor) = store.cursor(&project)? else { continue };
        let key = keys::cursor(&project);
        node.block_on(node.kv.create(&key, serde_json::to_vec(&cursor)?.into()))
            .with_context(|| format!("cannot write the cursor of project {project:?} ({key})"))?;
        imported.cursors += 1;
    }
    for d in &config.destinations {
        let mark = store.settled_below(&d.name)?;
        node.set_watermark(&d.name, mark)?;
        imported.watermarks.push((d.name.clone(), mark));
    }
    Ok(imported)
}
