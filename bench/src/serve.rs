//! Figures of the HTTP server (docs/performance.md): the first page of the Audit events page
//! and of the API on a large store, unfiltered and filtered, p50/p99 and request rate under
//! `wrk -c 8`, next to nginx serving the same JSON as a static file in the same run; peak RSS of
//! the server. And merge → event at a loopback receiver, through the webhook vs the schedule.

use super::{Bench, Nginx, free_port};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-read-token";
const PROJECTS: usize = 10;

/// `wrk -t2 -c8 -d10s --latency`: (p50 ms, p99 ms, requests/s).
fn wrk(url: &str, token: Option<&str>) -> Result<(f64, f64, f64)> {
    wrk_with(url, token, None)
}

/// wrk, with a Lua `script` choosing the requests when given.
fn wrk_with(url: &str, token: Option<&str>, script: Option<&Path>) -> Result<(f64, f64, f64)> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c8", "-d10s", "--latency"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("PRIVATE-TOKEN: {t}")]);
    }
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd.arg(url).output().context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |label: &str| -> Option<f64> {
        let v = text.lines().find_map(|l| l.trim().strip_prefix(label))?.trim().to_string();
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = num.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let rate = text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok());
    match (ms("50%"), ms("99%"), rate) {
        (Some(a), Some(b), Some(r)) if !text.contains("Non-2xx") => Ok((a, b, r)),
        _ => bail!("cannot read wrk's output for {url} (or non-2xx answers): {text}"),
    }
}

fn vm_hwm_mib(pid: u32) -> f64 {
    policy_audit::app::reconcile::peak_memory_bytes(Some(pid)).map_or(0.0, |bytes| bytes as f64 / 1048576.0)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > until {
            bail!("nothing listens on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `n` events over [`PROJECTS`] projects and three event types, in batches of 1,000. Run in a
/// child process (`bench fill-web`): see `fill_in_child`.
pub(crate) fn fill(config_path: &Path, n: usize) -> Result<()> {
    use policy_audit::config::Config;
    use policy_audit::event::EventType;
    use policy_audit::store::{Cursor, Store};
    let config = Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::open(&config.db_dir())?;
    let change = super::bench_change()?;
    let types = [EventType::Create, EventType::Update, EventType::Delete];
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let project = &config.projects[i % PROJECTS];
        let mut e = super::bench_event(&change, project.spp(), i, 1_600_000_000 + i as i64 * 60);
        e.event_type = types[(i / PROJECTS) % 3];
        e.details.event_name = e.event_type.name().to_string();
        e.id = format!("bench-{i}");
        batch.push(e);
        if batch.len() == 1000 || i + 1 == n {
            let cursor = Cursor {
                commit: format!("{i:040x}"),
                blob: String::new(),
                baseline: None,
                limits: Default::default(),
                included: Default::default(),
            };
            store.commit_reconcile(&project.path, &cursor, &batch, &|_| Vec::new(), 0)?;
            batch.clear();
        }
    }
    store.flush()?;
    Ok(())
}

/// The URLs measured: (what, path).
const CASES: [(&str, &str); 5] = [
    ("page `/`, unfiltered", "/"),
    ("page, filtered by type + project", "/?project=acme%2Fspp-3&type=security_policy_update"),
    ("API `/api/v4/audit_events`, unfiltered", "/api/v4/audit_events"),
    ("API, one project, keyset", "/api/v4/projects/4/audit_events?pagination=keyset"),
    ("API, one project, offset (counts to 10,000)", "/api/v4/projects/4/audit_events"),
];

/// Older pages taken in turn: more rows than the server keeps rendered, so each request renders
/// its rows again.
const OLDER_PAGES: usize = 200;

/// A wrk script requesting `paths` in turn; wrk's two threads start half the list apart, so a
/// page comes back only after about `paths.len() / 2` others.
fn pages_in_turn(dir: &Path, paths: &[String]) -> Result<std::path::PathBuf> {
    let list: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
    let script = format!(
        "local paths = {{ {} }}\nlocal threads = 0\n\
         function setup(thread) thread:set(\"start\", threads * {}); threads = threads + 1 end\n\
         function init(args) i = start or 0 end\n\
         function request() i = i + 1; return wrk.format(\"GET\", paths[(i % #paths) + 1]) end\n",
        list.join(", "),
        paths.len() / 2
    );
    let path = dir.join("older-pages.lua");
    std::fs::write(&path, script)?;
    Ok(path)
}

/// The first `n` pages of the events page, following its "Older" links.
fn older_pages(base: &str, n: usize) -> Result<Vec<String>> {
    let mut paths = vec!["/".to_string()];
    while paths.len() < n {
        let last = paths.last().context("a page")?;
        let page =
            ureq::get(&format!("{base}{last}")).header("PRIVATE-TOKEN", TOKEN).call()?.into_body().read_to_string()?;
        let Some(next) = page.split("rel=\"next\" href=\"").nth(1).and_then(|rest| rest.split('"').next()) else {
            break;
        };
        paths.push(next.replace("&amp;", "&"));
    }
    Ok(paths)
}

/// How many events the store of `config_path` holds (0 when it does not exist yet).
fn stored_events(config_path: &Path) -> Result<u64> {
    let config = policy_audit::config::Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !config.db_dir().exists() {
        return Ok(0);
    }
    Ok(policy_audit::store::Store::open(&config.db_dir())?.next_sequence()?)
}

fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The medians of several wrk runs of one URL, and the server's peak RSS.
#[derive(Default)]
struct Figures {
    p50: Vec<f64>,
    p99: Vec<f64>,
    rate: Vec<f64>,
    rss_mib: f64,
}

impl Figures {
    fn add(&mut self, (p50, p99, rate): (f64, f64, f64)) {
        self.p50.push(p50);
        self.p99.push(p99);
        self.rate.push(rate);
    }

    fn medians(&self) -> (f64, f64, f64) {
        (median_of(self.p50.clone()), median_of(self.p99.clone()), median_of(self.rate.clone()))
    }
}

impl Bench {
    /// `BENCH_EVENTS=N` sets the store size; `BENCH_STORE=DIR` keeps the filled store in DIR
    /// and reuses it on the next run (filling a million events takes minutes);
    /// `BENCH_COMPARE=BIN` measures another build of policy-audit (say, the release binary
    /// before a change) on the same store in the same run, the two servers taking turns.
    pub fn serve(&mut self) -> Result<()> {
        let wanted: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(if self.quick {
            50_000
        } else {
            250_000
        });
        let port = free_port()?;
        std::fs::write(self.work.join("web-token"), TOKEN)?;
        let state_dir = match std::env::var_os("BENCH_STORE") {
            Some(dir) => std::path::PathBuf::from(dir),
            None => self.work.join("web-state"),
        };
        let mut text = format!(
            "state_dir = {:?}\n[server]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"web-token\"\n",
            state_dir.display().to_string()
        );
        for p in 0..PROJECTS {
            text.push_str(&format!(
                "[[projects]]\npath = \"acme/spp-{p}\"\nid = {}\nurl = \"/nonexistent/{p}\"\n",
                p + 1
            ));
        }
        let config = self.work.join("web.toml");
        std::fs::write(&config, text)?;
        let have = stored_events(&config)?;
        let n = if have == 0 {
            let started = Instant::now();
            let wanted_text = wanted.to_string();
            super::in_child(&["fill-web".as_ref(), config.as_os_str(), wanted_text.as_ref()])?;
            eprintln!("  stored {wanted} events in {:.1} s", started.elapsed().as_secs_f64());
            wanted
        } else {
            eprintln!("  reusing the {have} events stored in {}", state_dir.display());
            usize::try_from(have)?
        };
        let mut servers = vec![("policy-audit".to_string(), self.bin.clone())];
        if let Some(other) = std::env::var_os("BENCH_COMPARE") {
            servers.push((format!("before ({})", Path::new(&other).display()), other.into()));
        }
        let base = format!("http://127.0.0.1:{port}");
        // One more case after CASES: older pages in turn.
        let mut figures: Vec<Vec<Figures>> =
            servers.iter().map(|_| (0..=CASES.len()).map(|_| Figures::default()).collect()).collect();
        let mut older_script = None;
        let mut nginx_figures = Figures::default();
        let root = self.work.join("static");
        let mut body_len = 0;
        for run in 0..self.runs {
            // Take turns: the first server of one run is the last of the next.
            let mut order: Vec<usize> = (0..servers.len()).collect();
            if run % 2 == 1 {
                order.reverse();
            }
            for s in order {
                let server = Killed(
                    Command::new(&servers[s].1)
                        .arg("--config")
                        .arg(&config)
                        .arg("serve")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .with_context(|| format!("cannot start {} serve", servers[s].1.display()))?,
                );
                wait_port(port)?;
                if body_len == 0 {
                    // The baseline: nginx serving the unfiltered API page as a static file.
                    let body = ureq::get(&format!("{base}/api/v4/audit_events"))
                        .header("PRIVATE-TOKEN", TOKEN)
                        .call()?
                        .into_body()
                        .read_to_vec()?;
                    std::fs::create_dir_all(&root)?;
                    std::fs::write(root.join("events.json"), &body)?;
                    body_len = body.len();
                }
                for (c, (_, path)) in CASES.iter().enumerate() {
                    figures[s][c].add(wrk(&format!("{base}{path}"), Some(TOKEN))?);
                }
                if older_script.is_none() {
                    older_script = Some(pages_in_turn(&self.work, &older_pages(&base, OLDER_PAGES)?)?);
                }
                figures[s][CASES.len()].add(wrk_with(&base, Some(TOKEN), older_script.as_deref())?);
                let rss = vm_hwm_mib(server.0.id());
                for f in &mut figures[s] {
                    f.rss_mib = f.rss_mib.max(rss);
                }
            }
            let nginx_port = free_port()?;
            let nginx = Nginx::start_static(&self.work, nginx_port, &root)?;
            nginx_figures.add(wrk(&format!("http://127.0.0.1:{nginx_port}/events.json"), None)?);
            drop(nginx);
        }
        let (np50, np99, nrate) = nginx_figures.medians();
        for (s, (name, _)) in servers.iter().enumerate() {
            let older = format!("page, {OLDER_PAGES} older pages in turn (each row rendered again)");
            for (c, what) in CASES.iter().map(|(what, _)| *what).chain([older.as_str()]).enumerate() {
                let (p50, p99, rate) = figures[s][c].medians();
                let label = if s == 0 { String::new() } else { format!(", {name}") };
                self.row(
                    &format!("{what}, {n} events, wrk -c 8{label}"),
                    format!("p50 {p50:.2} ms, p99 {p99:.2} ms, {rate:.0} req/s"),
                    format!(
                        "nginx static JSON ({} KB): p50 {np50:.2} ms, p99 {np99:.2} ms, {nrate:.0} req/s",
                        body_len / 1024
                    ),
                    format!("{:.2} of nginx (target ≥ 0.3); p99 target < 20 ms", rate / nrate),
                    format!("{:.1} MiB", figures[s][c].rss_mib),
                );
            }
        }
        if std::env::var_os("BENCH_SKIP_WEBHOOK").is_none() {
            self.webhook_latency()?;
        }
        Ok(())
    }

    /// Merge → event at a loopback receiver: 50 merges through the webhook, 50 through a
    /// schedule of every second.
    pub fn webhook_latency(&mut self) -> Result<()> {
        let merges = if self.quick { 10 } else { 50 };
        let mut results = Vec::new();
        for via_hook in [true, false] {
            let dir = self.work.join(if via_hook { "hook" } else { "cron" });
            let repo = dir.join("spp");
            std::fs::create_dir_all(repo.join(".gitlab/security-policies"))?;
            crate::repos::git(&repo, &["init", "-q", "-b", "main"])?;
            let policy_at =
                |i: usize| format!("approval_policy:\n- {{name: p0, enabled: true, description: \"revision {i}\"}}\n");
            let commit = |policy: &str, i: usize| -> Result<()> {
                std::fs::write(repo.join(".gitlab/security-policies/policy.yml"), policy)?;
                crate::repos::git(&repo, &["add", "-A"])?;
                crate::repos::git(
                    &repo,
                    &[
                        "-c",
                        "user.name=B",
                        "-c",
                        "user.email=b@example.com",
                        "commit",
                        "-q",
                        "-m",
                        &format!("merge {i}"),
                    ],
                )
            };
            commit(&policy_at(0), 0)?;
            let (events, receiver_port) = receiver()?;
            let port = free_port()?;
            std::fs::write(dir.join("token"), TOKEN)?;
            std::fs::write(dir.join("secret"), "hook-secret")?;
            let schedule = if via_hook { "0 0 0 1 1 *" } else { "* * * * * *" };
            let config = dir.join("config.toml");
            std::fs::write(
                &config,
                format!(
                    "schedule = \"{schedule}\"\nstate_dir = \"state\"\n[[projects]]\npath = \"acme/spp\"\nurl = \"{}\"\n\
                     [[destinations]]\nname = \"r\"\nurl = \"http://127.0.0.1:{receiver_port}/\"\n\
                     [server]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"token\"\nwebhook_secret_file = \"secret\"\n",
                    repo.display()
                ),
            )?;
            let daemon = Killed(
                Command::new(&self.bin)
                    .arg("--config")
                    .arg(&config)
                    .arg("run")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("cannot start the daemon")?,
            );
            wait_port(port)?;
            std::thread::sleep(Duration::from_secs(2)); // the start-up reconcile (baseline)
            while events.try_recv().is_ok() {}
            let hook = r#"{"object_kind":"push","ref":"refs/heads/main","project":{"path_with_namespace":"acme/spp"}}"#;
            let mut latencies = Vec::new();
            for i in 1..=merges {
                // One update event per merge (adding policies would hit the type's limit).
                commit(&policy_at(i), i)?;
                let t0 = Instant::now();
                if via_hook {
                    ureq::post(&format!("http://127.0.0.1:{port}/hooks/gitlab"))
                        .header("X-Gitlab-Token", "hook-secret")
                        .header("X-Gitlab-Event", "Push Hook")
                        .send(hook.as_bytes())?;
                }
                events.recv_timeout(Duration::from_secs(30)).context("no event within 30 s")?;
                latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            drop(daemon);
            latencies.sort_by(f64::total_cmp);
            let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
            results.push((pct(0.5), pct(0.99)));
        }
        let ((h50, h99), (c50, c99)) = (results[0], results[1]);
        self.row(
            &format!("merge → event at a loopback receiver, {merges} merges, webhook"),
            format!("p50 {h50:.0} ms, p99 {h99:.0} ms"),
            format!("schedule every second: p50 {c50:.0} ms, p99 {c99:.0} ms (every 5 min by default)"),
            "p99 target < 1 s".into(),
            "–".into(),
        );
        Ok(())
    }
}

/// A loopback HTTP receiver that answers 204 and reports each request's arrival.
fn receiver() -> Result<(mpsc::Receiver<()>, u16)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut w = stream.try_clone()?;
                let mut r = BufReader::new(stream);
                loop {
                    let mut len = 0usize;
                    let mut chunked = false;
                    let mut first = true;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line)? == 0 {
                            return Ok(());
                        }
                        if line.trim().is_empty() && !first {
                            break;
                        }
                        first = false;
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
                    }
                    if chunked {
                        loop {
                            let mut size = String::new();
                            r.read_line(&mut size)?;
                            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                            let mut chunk = vec![0; n + 2];
                            r.read_exact(&mut chunk)?;
                            if n == 0 {
                                break;
                            }
                        }
                    } else {
                        let mut body = vec![0; len];
                        r.read_exact(&mut body)?;
                    }
                    w.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")?;
                    let _ = tx.send(());
                }
            });
        }
    });
    Ok((rx, port))
}
