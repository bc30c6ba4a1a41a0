//! NATS JetStream figures (SPEC §11), against a real `nats-server -js` started here:
//! - `nats`: events/s delivered to a `kind = "nats"` destination (`policy-audit deliveries retry`
//!   draining an outbox) next to a raw async-nats loop publishing the same bodies with the same
//!   Msg-Id headers in the same run, one at a time and pipelined;
//! - `failover`: two cluster instances; the one holding projects is killed with SIGKILL; the
//!   time until the other holds them all (target < 2 × lease_ttl).

use super::{Bench, fill_in_child, fmt_rss, free_port};
use crate::measure::run;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct NatsServer {
    child: Child,
    port: u16,
}

impl NatsServer {
    fn start(work: &Path) -> Result<NatsServer> {
        let port = free_port()?;
        let store = work.join(format!("nats-{port}"));
        std::fs::create_dir_all(&store)?;
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nats-server (apt-get install nats-server, or scripts/install-deps.sh)")?;
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > until {
                bail!("nats-server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(NatsServer { child, port })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes `bodies` to a fresh stream; `window` acknowledgements outstanding at most (1 =
/// one at a time, as a delivery waits for each). Returns events/s.
fn raw_publish(url: &str, bodies: &[(String, Vec<u8>)], window: usize) -> Result<f64> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = async_nats::connect(url).await?;
        let js = async_nats::jetstream::new(client);
        let stream = format!("RAW{window}");
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("raw{window}.>")],
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await?;
        let started = Instant::now();
        let mut pending = std::collections::VecDeque::new();
        for (id, body) in bodies {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let ack = js
                .publish_with_headers(format!("raw{window}.security_policy_update"), headers, body.clone().into())
                .await?;
            pending.push_back(ack);
            if pending.len() >= window
                && let Some(ack) = pending.pop_front()
            {
                ack.await?;
            }
        }
        for ack in pending {
            ack.await?;
        }
        Ok(bodies.len() as f64 / started.elapsed().as_secs_f64())
    })
}

impl Bench {
    pub(super) fn nats(&mut self) -> Result<()> {
        let events = if self.quick { 2_000 } else { 10_000 };
        let server = NatsServer::start(&self.work)?;
        let config = self.work.join("nats.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"nats-state\"\n[[destinations]]\nname = \"bus\"\nkind = \"nats\"\nurl = \"{}\"\nsubject = \"bench.audit\"\nstream = \"BENCH\"\n",
                server.url()
            ),
        )?;
        // Filled in a child, and the bodies read after the drain: see `fill_in_child`.
        fill_in_child(&config, events, true)?;
        let ours = run(&mut self.policy_audit(&config, &["deliveries", "retry"]))?; // drains the outbox
        let rate = events as f64 / ours.wall.as_secs_f64();
        let bodies = {
            let loaded = policy_audit::config::Config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let store = policy_audit::store::Store::open(&loaded.db_dir())?;
            let mut bodies = Vec::with_capacity(events);
            for seq in 0..events as u64 {
                let bytes = store.event_bytes(seq)?.context("synthetic event")?;
                let id =
                    serde_json::from_slice::<serde_json::Value>(&bytes)?["id"].as_str().unwrap_or_default().to_string();
                bodies.push((id, bytes.to_vec()));
            }
            bodies
        };
        let one = raw_publish(&server.url(), &bodies, 1)?;
        let pipelined = raw_publish(&server.url(), &bodies, 256)?;
        self.row(
            &format!("NATS delivery, {events}-event outbox to JetStream"),
            format!("{rate:.0} events/s"),
            format!("{one:.0} events/s raw async-nats, ack each ({pipelined:.0}/s with 256 acks in flight)"),
            format!("{:.2} of the raw loop", rate / one),
            fmt_rss(ours),
        );
        Ok(())
    }

    pub(super) fn failover(&mut self) -> Result<()> {
        let ttl = 5;
        let server = NatsServer::start(&self.work)?;
        let mut shared = format!(
            "schedule = \"*/2 * * * * *\"\n[cluster]\nnats_url = \"{}\"\nlease_ttl = \"{ttl}s\"\n",
            server.url()
        );
        for p in 0..4 {
            let repo = self.work.join(format!("fo-spp{p}"));
            std::fs::create_dir_all(repo.join(".gitlab/security-policies"))?;
            crate::repos::git(&repo, &["init", "-q", "-b", "main"])?;
            std::fs::write(repo.join(crate::repos::POLICY), crate::repos::policy_file(3, p))?;
            crate::repos::git(&repo, &["add", "-A"])?;
            crate::repos::git(&repo, &["-c", "user.name=b", "-c", "user.email=b@example.com", "commit", "-qm", "p"])?;
            shared.push_str(&format!("[[projects]]\npath = \"acme/spp{p}\"\nurl = \"{}\"\n", repo.display()));
        }
        let start = |name: &str| -> Result<(Child, std::path::PathBuf)> {
            let config = self.work.join(format!("fo-{name}.toml"));
            std::fs::write(&config, format!("state_dir = \"fo-state-{name}\"\n{shared}"))?;
            let child = Command::new(&self.bin)
                .arg("--config")
                .arg(&config)
                .arg("run")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .env_remove("RUST_LOG")
                .spawn()?;
            Ok((child, config))
        };
        let status = |config: &Path| -> Result<serde_json::Value> {
            let out = Command::new(&self.bin).arg("--config").arg(config).args(["status", "--json"]).output()?;
            Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
        };
        let holders = |s: &serde_json::Value| -> Vec<String> {
            s["cluster"]["leases"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|l| l["lease"].as_str().is_some_and(|k| k.starts_with("lease.p.")))
                .map(|l| l["holder"].as_str().unwrap_or("").to_string())
                .collect()
        };
        let (mut a, config_a) = start("a")?;
        std::thread::sleep(Duration::from_secs(2));
        let (mut b, config_b) = start("b")?;
        // Wait until b holds some projects.
        let until = Instant::now() + Duration::from_secs(60);
        let b_id = loop {
            let sb = status(&config_b)?;
            let id = sb["cluster"]["instance"].as_str().unwrap_or_default().to_string();
            if !id.is_empty() && holders(&sb).contains(&id) {
                break id;
            }
            if Instant::now() > until {
                bail!("instance b never took a project lease");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let _ = b.kill();
        let _ = b.wait();
        let killed = Instant::now();
        let until = killed + Duration::from_secs(60);
        let took = loop {
            let held = holders(&status(&config_a)?);
            if held.len() == 4 && held.iter().all(|h| !h.is_empty() && *h != b_id) {
                break killed.elapsed();
            }
            if Instant::now() > until {
                bail!("instance a did not take over within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = a.kill();
        let _ = a.wait();
        self.row(
            &format!("cluster failover after kill -9 (lease_ttl {ttl}s)"),
            format!("{:.1} s until the survivor holds every project", took.as_secs_f64()),
            format!("2 × lease_ttl = {} s", 2 * ttl),
            format!("{:.2} of 2 × lease_ttl (target < 1)", took.as_secs_f64() / (2 * ttl) as f64),
            "-".into(),
        );
        Ok(())
    }
}
