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

mod import;
mod keys;
mod lease;
mod trail;

use crate::config::{Cluster, Config};
use crate::event::AuditEvent;
use crate::store::Cursor;
use crate::stream::nats::{Endpoint, ensure_stream};
use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, kv};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

pub use import::{Imported, import};
pub use keys::{destination_lease, project_lease};
use lease::Held;
pub use lease::Lease;

/// Where a project's cursor and events are committed: the local store in the single-instance
/// mode, the cluster's bucket and stream in cluster mode.
pub trait ProjectTrail: Send + Sync + std::fmt::Debug {
    fn cursor(&self, project: &str) -> Result<Option<Cursor>>;
    /// Stores `events` and then moves the project's cursor to `cursor`; returns how many
    /// events were new.
    fn commit(&self, project: &str, cursor: &Cursor, events: &[AuditEvent]) -> Result<usize>;
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
        // [cluster] takes no client certificate (yet): token, .creds and ca_file only.
        client_cert: None,
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
}
