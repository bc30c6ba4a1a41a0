//! Benchmarks that print figures (never timed assertions): `cargo run --release --bin bench --
//! delivery [--events N]` stores N events with one outbox entry each, then drains the outbox to
//! a receiver on 127.0.0.1 and prints events per second.

use policy_audit::config::Config;
use policy_audit::event::StepContext;
use policy_audit::policy::{PolicySet, diff, parse};
use policy_audit::store::Store;
use policy_audit::stream::{SystemClock, deliver_due};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let events = args
        .iter()
        .position(|a| a == "--events")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    match args.first().map(String::as_str) {
        Some("delivery") | None => {
            if let Err(e) = delivery(events) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
        Some(other) => {
            eprintln!("unknown benchmark {other:?}; available: delivery [--events N]");
            std::process::exit(2);
        }
    }
}

fn delivery(n: usize) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let secret = "whsec_YmVuY2htYXJrLXNpZ25pbmcta2V5";
    std::fs::write(tmp.path().join("secret"), secret)?;
    let key = policy_audit::stream::http::signing_key(&policy_audit::config::Secret::new(secret));
    let receiver = policy_audit::demo::LocalReceiver::start(key)?;
    let text = format!(
        "state_dir = \"state\"\n[[projects]]\npath = \"acme/security-policies\"\nurl = \"/nonexistent\"\nlinked = [\"acme\"]\n\
         [[destinations]]\nname = \"bench\"\nurl = \"{}\"\nsigning_secret_file = \"secret\"\n",
        receiver.url
    );
    let config = Config::parse(&tmp.path().join("config.toml"), &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::open(&config.db_dir())?;

    // Realistic events: one create of a real-sized approval policy, each with its own commit.
    let set = parse(include_bytes!("../../benches/data/approval_policy.yml"))?;
    let change = diff(&PolicySet::default(), &set).into_iter().next().ok_or_else(|| anyhow::anyhow!("no change"))?;
    let project = &config.projects[0];
    let started = Instant::now();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let sha = format!("{i:040x}");
        let ctx = StepContext {
            project,
            sha: &sha,
            previous_sha: None,
            author_name: "Bench",
            author_email: "bench@example.com",
            author_id: None,
            committed_at: 1_700_000_000 + i as i64,
            message: "bench",
            detected_at: jiff::Timestamp::now(),
            history_rewritten: false,
        };
        batch.push(ctx.change_event(&change));
        if batch.len() == 1000 || i + 1 == n {
            let cursor = policy_audit::store::Cursor {
                commit: sha.clone(),
                blob: String::new(),
                baseline: None,
                limits: Default::default(),
            };
            store.commit_reconcile(
                &project.path,
                &cursor,
                &batch,
                &|_| vec!["bench".to_string()],
                jiff::Timestamp::now().as_millisecond(),
            )?;
            batch.clear();
        }
    }
    let stored = started.elapsed();
    let body_bytes = store.event_bytes(0)?.map(|b| b.len()).unwrap_or(0);

    let started = Instant::now();
    let reports = deliver_due(&config, &store, &SystemClock, 1)?;
    let drained = started.elapsed();
    let delivered: usize = reports.iter().map(|r| r.delivered).sum();
    let received = receiver.received();
    let verified = received.iter().filter(|r| r.signature_ok).count();
    let received = received.len();
    println!("delivery benchmark ({n} events, {body_bytes} bytes each, signed, one destination on 127.0.0.1)");
    println!("  store:    {:>8.0} events/s ({:.2} s)", n as f64 / stored.as_secs_f64(), stored.as_secs_f64());
    println!(
        "  delivery: {:>8.0} events/s ({:.2} s, {delivered} delivered, {received} received)",
        delivered as f64 / drained.as_secs_f64(),
        drained.as_secs_f64()
    );
    println!("  signatures verified by the receiver: {verified}");
    if delivered != n || received != n || verified != n {
        anyhow::bail!("expected {n} deliveries, got {delivered} delivered and {received} received");
    }
    Ok(())
}
