//! `bench store-trees [N]`: what each sled tree of the store's layout before index blocks cost
//! on disk per event, and what opening the result costs in memory. Writes the trees with the
//! key shapes `Store::commit_reconcile` wrote until then (one sled key per index entry, the
//! chain link in its own tree; 1,000 events per transaction, flushed), directly with sled, once
//! with all trees and once without each, with plain and with compressed bodies; then opens each
//! database in a child process (`bench open-sled DIR`) for its peak RSS. It is the measurement
//! that led to the blocks (docs/performance.md, "The store on disk and in memory"); `bench
//! store` and `bench export` measure the store as it is written today.

use crate::measure::{du, mib};
use anyhow::{Context, Result};
use policy_audit::event::AuditEvent;
use sled::Transactional;
use std::path::Path;
use std::process::Command;

const TREES: [&str; 5] = ["events", "chain", "event_ids", "by_time", "by_field"];

fn time_key(created_at: &str, seq: u64) -> Vec<u8> {
    let mut k = created_at.as_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The field index keys of `src/store/index.rs` (kind ++ value ++ 0 ++ created_at ++ seq).
fn field_keys(e: &AuditEvent, seq: u64) -> Vec<Vec<u8>> {
    let mut values = vec![
        (b'p', e.entity_path.clone()),
        (b't', e.event_type.name().to_string()),
        (b'x', format!("{}\0{}", e.entity_path, e.event_type.name())),
    ];
    if let Some(policy) = &e.details.policy_name {
        values.push((b'o', policy.clone()));
    }
    let (name, email) = (e.author_name.to_lowercase(), e.details.author_email.to_lowercase());
    if email != name {
        values.push((b'a', email));
    }
    values.push((b'a', name));
    values
        .into_iter()
        .map(|(kind, value)| {
            let mut k = vec![kind];
            k.extend_from_slice(value.as_bytes());
            k.push(0);
            k.extend_from_slice(&time_key(&e.created_at, seq));
            k
        })
        .collect()
}

/// Writes `events` (each `copies` times, with distinct ids and times) into the trees in `with`.
fn fill(dir: &Path, events: &[AuditEvent], n: usize, with: &[&str], compress: bool) -> Result<()> {
    let db = sled::Config::new().path(dir).cache_capacity(16 * 1024 * 1024).open()?;
    let trees: Vec<sled::Tree> = TREES.iter().map(|t| db.open_tree(t)).collect::<Result<_, _>>()?;
    let on = |t: &str| with.contains(&t);
    let mut head = [0u8; 32];
    for start in (0..n).step_by(1000) {
        let mut batch = Vec::with_capacity(1000);
        for seq in start..(start + 1000).min(n) {
            let mut e = events[seq % events.len()].clone();
            e.id = format!("{}-{seq}", e.id);
            let json = serde_json::to_vec(&e)?;
            let body = if compress { policy_audit::store::body::encode(&json)? } else { json.clone() };
            head = policy_audit::store::chain::link(&head, &json);
            batch.push((seq as u64, e, body, head));
        }
        (&trees[0], &trees[1], &trees[2], &trees[3], &trees[4])
            .transaction(|(events, chain, ids, by_time, by_field)| {
                for (seq, e, body, link) in &batch {
                    let key = seq.to_be_bytes();
                    if on("events") {
                        events.insert(&key, body.as_slice())?;
                    }
                    if on("chain") {
                        chain.insert(&key, link)?;
                    }
                    if on("event_ids") {
                        ids.insert(e.id.as_bytes(), &key)?;
                    }
                    if on("by_time") {
                        by_time.insert(time_key(&e.created_at, *seq), &[])?;
                    }
                    if on("by_field") {
                        for k in field_keys(e, *seq) {
                            by_field.insert(k, &[])?;
                        }
                    }
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| anyhow::anyhow!("transaction: {e:?}"))?;
        db.flush()?;
    }
    Ok(())
}

/// `bench open-sled DIR`: opens every tree of a sled database (the part of `Store::open` that
/// is sled's) and prints its own peak RSS in KiB (`VmHWM`: wait4's figure for a child would
/// include the pages of the large parent it was forked from).
pub fn open_sled(dir: &Path) -> Result<()> {
    let db = sled::Config::new().path(dir).cache_capacity(16 * 1024 * 1024).open()?;
    for name in db.tree_names() {
        db.open_tree(name)?;
    }
    let peak = policy_audit::app::reconcile::peak_memory_bytes(None).context("no VmHWM in /proc/self/status")?;
    println!("{}", peak / 1024);
    Ok(())
}

pub fn store_trees(work: &Path, events: &[AuditEvent], n: usize) -> Result<()> {
    let exe = std::env::current_exe()?;
    let variants: Vec<(String, Vec<&str>, bool)> = vec![
        ("all trees, plain bodies".into(), TREES.to_vec(), false),
        ("all trees, compressed bodies".into(), TREES.to_vec(), true),
        ("events alone, plain".into(), vec!["events"], false),
        ("events alone, compressed".into(), vec!["events"], true),
    ]
    .into_iter()
    .chain(
        TREES[1..]
            .iter()
            .map(|t| (format!("all but {t}, plain"), TREES.iter().copied().filter(|x| x != t).collect(), false)),
    )
    .collect();
    println!("| {n} events | bytes on disk per event | peak RSS opening it |");
    println!("|---|---|---|");
    for (i, (name, with, compress)) in variants.iter().enumerate() {
        let dir = work.join(format!("trees-{i}"));
        fill(&dir, events, n, with, *compress).with_context(|| format!("filling {name}"))?;
        let bytes = du(&dir) as f64 / n as f64;
        let open = Command::new(&exe).arg("open-sled").arg(&dir).output()?;
        let peak_kib: u64 = String::from_utf8_lossy(&open.stdout)
            .trim()
            .parse()
            .with_context(|| format!("open-sled failed: {}", String::from_utf8_lossy(&open.stderr)))?;
        println!("| {name} | {bytes:.0} | {:.1} MiB |", mib(peak_kib));
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
