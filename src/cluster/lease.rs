//! Leases (see the module above): taking, renewing, releasing, and the fair share.

use super::{Node, keys, now_ms};
use crate::config::Config;
use anyhow::{Context, Result};
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::keys::{destination_lease, project_lease};

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
pub(super) struct Held {
    pub(super) revision: u64,
    pub(super) acquired_at: i64,
    pub(super) expires_at: i64,
}

impl Node {
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
}
