//! Cluster mode (SPEC §11): instances sharing one config coordinate through NATS JetStream.
//!
//! - Leases: one key per project (`lease.p.<path>`) and per destination (`lease.d.<name>`) in
//!   the key-value bucket `<name>`. A lease is `{holder, acquired_at, expires_at}`; it is taken
//!   with create-if-absent, or with an update checked against the revision read when it was
//!   free or expired, renewed (revision-checked) every `lease_ttl / 3` while held, released
//!   (holder "") on a clean shutdown. An instance that dies stops renewing; after `lease_ttl`
//!   others take its leases over. Each instance takes at most its fair share
//!   (ceil(items / live instances)), so the work spreads and moves when one leaves.
//! - Cursors: `cursor.<path>` in the same bucket. A commit first publishes the events to the
//!   trail stream (`<name>-trail`, subject `<name>.trail`) with `Nats-Msg-Id` = event id, awaits
//!   every acknowledgement, and then moves the cursor with an update checked against the
//!   revision the reconcile started from. A crash between the two leaves the cursor behind: the
//!   next holder publishes the same events again and the stream drops them as duplicates. A
//!   cursor that moved meanwhile (another instance took over) fails the commit: no gap, no
//!   replay.
//! - The trail stream is the trail of record; each instance's store follows it as a replica
//!   (`store::replica`), so every instance shows the whole trail.
//! - Destinations are served by the holder of their lease; it publishes `delivered.<name>`, the
//!   sequence below which every delivery is settled, and the others settle their copies of the
//!   outbox up to it, so a takeover neither repeats nor skips.
//!
//! Lease expiry compares wall clocks of different hosts: keep them in sync (NTP) to well under
//! `lease_ttl`. Correctness of the trail does not rest on it (the cursor update is checked).

mod keys;

use crate::config::{Cluster, Config};
use crate::event::AuditEvent;
use crate::store::Cursor;
use crate::stream::nats::{Endpoint, ensure_stream};
use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

pub use keys::{destination_lease, project_lease};

/// Where a project's cursor and events are committed: the local store in the single-instance
/// mode, the cluster's bucket and stream in cluster mode.
pub trait ProjectTrail: Send + Sync + std::fmt::Debug {
    fn cursor(&self, project: &str) -> Result<Option<Cursor>>;
    /// Stores `events` and then moves the project's cursor to `cursor`; returns how many
    /// events were new.
    fn commit(&self, project: &str, cursor: &Cursor, events: &[AuditEvent]) -> Result<usize>;
}

/// A lease as stored in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The instance id, "" when released.
    pub holder: String,
    pub acquired_at: i64,
    pub expires_at: i64,
}

impl Lease {
    pub fn is_live(&self, now_ms: i64) -> bool {
        !self.holder.is_empty() && self.expires_at > now_ms
    }
}

#[derive(Debug, Clone, Copy)]
struct Held {
    revision: u64,
    acquired_at: i64,
    expires_at: i64,
}

/// This instance's membership in the cluster.
pub struct Node {
    pub id: String,
    pub settings: Cluster,
    runtime: Option<tokio::runtime::Runtime>,
    js: jetstream::Context,
    kv: kv::Store,
    trail_stream: String,
    trail_subject: String,
    /// Lease key -> what we hold.
    held: Mutex<BTreeMap<String, Held>>,
    /// Cursor key -> the revision the running reconcile started from (0 = no cursor yet).
    revisions: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).field("cluster", &self.settings.name).finish()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which tokio forbids inside async code (the daemon).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// This host's name and a hash of the state directory: unique per instance, stable across
/// restarts (a restarted instance recognises its own leases).
pub fn instance_id(config: &Config) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
    let host: String =
        host.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("{host}-{:08x}", crc32fast::hash(config.state_dir.to_string_lossy().as_bytes()))
}

fn endpoint(settings: &Cluster) -> Endpoint {
    Endpoint {
        url: settings.nats_url.clone(),
        auth: settings.auth.clone(),
        ca_file: settings.ca_file.clone(),
        timeout: Duration::from_secs(10),
    }
}

async fn open_bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store> {
    // The bucket's stream is created here, as a key-value bucket is laid out (`KV_<name>`,
    // subjects `$KV.<name>.>`), rather than with `create_key_value`, which first reads account
    // details that a nats-server 2.9 (Debian 12) answers in a shape the client cannot parse.
    let config = jetstream::stream::Config {
        name: format!("KV_{name}"),
        description: Some("policy-audit leases and cursors".into()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 64,
        max_message_size: -1,
        max_bytes: -1,
        max_messages: -1,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create key-value bucket {name:?}: {e}"))?;
    js.get_key_value(name).await.with_context(|| format!("cannot open key-value bucket {name:?}"))
}

impl Node {
    /// Connects, and creates the bucket and the trail stream when missing. Call from a thread
    /// that is not running async code.
    pub fn start(config: &Config) -> Result<Node> {
        Node::connect(config, true)
    }

    /// Connects to look only (`status`): nothing is created.
    pub fn observe(config: &Config) -> Result<Node> {
        Node::connect(config, false)
    }

    fn connect(config: &Config, create: bool) -> Result<Node> {
        let Some(settings) = config.cluster.clone() else { bail!("the config has no [cluster] section") };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cluster")
            .enable_all()
            .build()
            .context("cannot start the cluster runtime")?;
        let id = instance_id(config);
        let trail_stream = format!("{}-trail", settings.name);
        let trail_subject = format!("{}.trail", settings.name);
        let (js, kv) = runtime.block_on(async {
            let client = endpoint(&settings).connect(&format!("policy-audit {id}")).await?;
            let js = jetstream::new(client);
            let kv = if create {
                ensure_stream(&js, &trail_stream, vec![trail_subject.clone()]).await.map_err(anyhow::Error::msg)?;
                open_bucket(&js, &settings.name).await?
            } else {
                js.get_key_value(&settings.name).await.with_context(|| {
                    format!("no key-value bucket {:?}: has an instance of this cluster started yet?", settings.name)
                })?
            };
            anyhow::Ok((js, kv))
        })?;
        Ok(Node {
            id,
            settings,
            runtime: Some(runtime),
            js,
            kv,
            trail_stream,
            trail_subject,
            held: Mutex::new(BTreeMap::new()),
            revisions: Mutex::new(HashMap::new()),
        })
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        let Some(rt) = &self.runtime else { unreachable!("the runtime is taken only when the node drops") };
        rt.block_on(f)
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.settings.lease_ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Whether we hold `key` with time to spare (a lease about to run out is not used).
    pub fn holds(&self, key: &str) -> bool {
        let margin = self.ttl_ms() / 10;
        self.held.lock().map(|h| h.get(key).is_some_and(|l| l.expires_at - margin > now_ms())).unwrap_or(false)
    }

    /// One lease round: heartbeat, renew what we hold, release a surplus, take free or expired
    /// leases up to our fair share. `busy` leases are not released (a reconcile is running).
    pub fn lease_round(&self, config: &Config, busy: &[String]) -> Result<()> {
        self.block_on(self.lease_round_async(config, busy))
    }

    async fn lease_round_async(&self, config: &Config, busy: &[String]) -> Result<()> {
        let now = now_ms();
        let me = Lease { holder: self.id.clone(), acquired_at: now, expires_at: now + self.ttl_ms() };
        self.kv
            .put(keys::instance(&self.id), serde_json::to_vec(&me)?.into())
            .await
            .context("cannot record this instance's heartbeat")?;
        let live = self.live_instances().await?.len().max(1);
        self.renew_all().await;
        let projects: Vec<String> = config.projects.iter().map(|p| project_lease(&p.path)).collect();
        let destinations: Vec<String> = config.destinations.iter().map(|d| destination_lease(&d.name)).collect();
        for group in [projects, destinations] {
            let share = group.len().div_ceil(live);
            let mut mine: Vec<String> = group.iter().filter(|k| self.holds(k)).cloned().collect();
            while mine.len() > share {
                let Some(pos) = mine.iter().rposition(|k| !busy.contains(k)) else { break };
                let key = mine.remove(pos);
                self.release(&key).await;
            }
            // Start at a different place per instance, so instances do not all race for the
            // same keys.
            let offset = crc32fast::hash(self.id.as_bytes()) as usize % group.len().max(1);
            for i in 0..group.len() {
                if mine.len() >= share {
                    break;
                }
                let key = &group[(i + offset) % group.len()];
                if !self.holds(key) && self.try_take(key).await? {
                    mine.push(key.clone());
                }
            }
        }
        Ok(())
    }

    async fn live_instances(&self) -> Result<Vec<String>> {
        let now = now_ms();
        let mut live = Vec::new();
        let mut keys = self.kv.keys().await.context("cannot list the bucket's keys")?;
        let mut instances = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.context("cannot list the bucket's keys")?;
            if key.starts_with(keys::INSTANCE_PREFIX) {
                instances.push(key);
            }
        }
        for key in instances {
            if let Some(lease) = self.read_lease(&key).await?.map(|(l, _)| l)
                && lease.is_live(now)
            {
                live.push(lease.holder);
            }
        }
        Ok(live)
    }

    async fn read_lease(&self, key: &str) -> Result<Option<(Lease, u64)>> {
        let Some(entry) = self.kv.entry(key).await.with_context(|| format!("cannot read {key}"))? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let lease: Lease =
            serde_json::from_slice(&entry.value).with_context(|| format!("lease {key} does not decode"))?;
        Ok(Some((lease, entry.revision)))
    }

    /// Takes `key` when it is absent, released or expired; false when someone else holds it or
    /// won the race.
    async fn try_take(&self, key: &str) -> Result<bool> {
        let now = now_ms();
        let lease = Lease { holder: self.id.clone(), acquired_at: now, expires_at: now + self.ttl_ms() };
        let value: bytes::Bytes = serde_json::to_vec(&lease)?.into();
        let revision = match self.read_lease(key).await? {
            None => self.kv.create(key, value).await.ok(),
            Some((current, rev)) if !current.is_live(now) || current.holder == self.id => {
                self.kv.update(key, value, rev).await.ok()
            }
            Some(_) => None,
        };
        let Some(revision) = revision else { return Ok(false) };
        tracing::info!(instance = %self.id, lease = %key, "lease taken");
        if let Ok(mut held) = self.held.lock() {
            held.insert(key.to_string(), Held { revision, acquired_at: now, expires_at: lease.expires_at });
        }
        Ok(true)
    }

    async fn renew_all(&self) {
        let held: Vec<(String, Held)> =
            self.held.lock().map(|h| h.iter().map(|(k, v)| (k.clone(), *v)).collect()).unwrap_or_default();
        for (key, lease) in held {
            let now = now_ms();
            let renewed =
                Lease { holder: self.id.clone(), acquired_at: lease.acquired_at, expires_at: now + self.ttl_ms() };
            let Ok(value) = serde_json::to_vec(&renewed) else { continue };
            let result = self.kv.update(&key, value.into(), lease.revision).await;
            let Ok(mut held) = self.held.lock() else { continue };
            match result {
                Ok(revision) => {
                    held.insert(key, Held { revision, expires_at: renewed.expires_at, ..lease });
                }
                Err(e) if lease.expires_at > now => {
                    // Not lost yet (e.g. NATS is restarting): keep it until it runs out.
                    tracing::warn!(instance = %self.id, lease = %key, error = %e, "cannot renew lease");
                }
                Err(e) => {
                    tracing::warn!(instance = %self.id, lease = %key, error = %e, "lease lost");
                    held.remove(&key);
                }
            }
        }
    }

    async fn release(&self, key: &str) {
        let Some(lease) = self.held.lock().ok().and_then(|mut h| h.remove(key)) else { return };
        let released = Lease { holder: String::new(), acquired_at: lease.acquired_at, expires_at: now_ms() };
        let Ok(value) = serde_json::to_vec(&released) else { return };
        match self.kv.update(key, value.into(), lease.revision).await {
            Ok(_) => tracing::info!(instance = %self.id, lease = %key, "lease released"),
            Err(e) => tracing::warn!(instance = %self.id, lease = %key, error = %e, "cannot release lease"),
        }
    }

    /// Releases every lease (clean shutdown): the others take over without waiting for the TTL.
    pub fn release_all(&self) {
        let keys: Vec<String> = self.held.lock().map(|h| h.keys().cloned().collect()).unwrap_or_default();
        self.block_on(async {
            for key in keys {
                self.release(&key).await;
            }
            let _ = self.kv.delete(keys::instance(&self.id)).await;
        });
    }

    /// The destinations whose lease we hold.
    pub fn held_destinations(&self, config: &Config) -> Vec<String> {
        config.destinations.iter().filter(|d| self.holds(&destination_lease(&d.name))).map(|d| d.name.clone()).collect()
    }

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

    /// Every lease with its holder, for `status`.
    pub fn leases(&self) -> Result<Vec<(String, Lease)>> {
        self.block_on(async {
            let mut keys = self.kv.keys().await.context("cannot list the bucket's keys")?;
            let mut names = Vec::new();
            while let Some(key) = keys.next().await {
                let key = key.context("cannot list the bucket's keys")?;
                if key.starts_with("lease.") || key.starts_with(keys::INSTANCE_PREFIX) {
                    names.push(key);
                }
            }
            let mut out = Vec::new();
            for key in names {
                if let Some((lease, _)) = self.read_lease(&key).await? {
                    out.push((key, lease));
                }
            }
            Ok(out)
        })
    }

    async fn publish_events(&self, events: &[AuditEvent]) -> Result<usize> {
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
