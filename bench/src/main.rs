//! `cargo run --release -p policy-audit-bench -- [all|backfill|fleet|delivery|store|export|nats|failover|serve|webhook] [--quick]`: builds
//! its own repositories and prints one table, each figure measured in the same run next to a
//! baseline (git itself, or wrk). Figures, never assertions: see docs/performance.md.

mod measure;
mod nats;
mod repos;
mod serve;
mod trees;

use anyhow::{Context, Result, bail};
use measure::{Sample, du, median, mib, ms, run};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Bench {
    bin: PathBuf,
    work: PathBuf,
    runs: usize,
    quick: bool,
    rows: Vec<[String; 5]>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let what = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| "all".into());
    // `bench http URL N`: raw ureq POST loop (profiling aid).
    if what == "http" {
        let url = args.get(1).cloned().unwrap_or_default();
        let n: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000);
        let t = Some(std::time::Duration::from_secs(10));
        let kind = std::env::var("TIMEOUT_KIND").unwrap_or_default();
        let mut builder = ureq::Agent::config_builder();
        builder = match kind.as_str() {
            "none" => builder,
            "per_call" => builder.timeout_per_call(t),
            "phases" => builder
                .timeout_connect(t)
                .timeout_send_request(t)
                .timeout_send_body(t)
                .timeout_recv_response(t)
                .timeout_recv_body(t),
            "connect_recv" => builder.timeout_connect(t).timeout_recv_response(t),
            _ => builder.timeout_global(t),
        };
        let agent: ureq::Agent = builder.max_redirects(0).http_status_as_error(false).build().into();
        let body = vec![b'x'; 1100];
        let started = std::time::Instant::now();
        for _ in 0..n {
            let _ = agent.post(&url).header("Content-Type", "application/json").send(&body[..]);
        }
        println!("{:.0} requests/s", n as f64 / started.elapsed().as_secs_f64());
        return;
    }
    // `bench make-repo DIR N`: the backfill benchmark's repository, kept (profiling aid).
    if what == "make-repo" {
        let (Some(dir), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
            eprintln!("usage: bench make-repo DIR N");
            std::process::exit(2);
        };
        if let Err(e) = repos::long_history(Path::new(dir), n, 10, 480) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    // `bench store-trees [N]`: each store tree's cost on disk and at open (docs/performance.md).
    if what == "store-trees" {
        let n = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
        let result = tempfile::tempdir()
            .map_err(anyhow::Error::from)
            .and_then(|tmp| Ok((synthetic_event_list(1000)?, tmp)))
            .and_then(|(events, tmp)| trees::store_trees(tmp.path(), &events, n));
        if let Err(e) = result {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if what == "open-sled" {
        if let Err(e) = trees::open_sled(Path::new(args.get(1).map(String::as_str).unwrap_or("."))) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    // `bench fill CONFIG N`: store N synthetic events with outbox entries (for profiling).
    if what == "fill" {
        let (Some(config), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
            eprintln!("usage: bench fill CONFIG N");
            std::process::exit(2);
        };
        if let Err(e) = synthetic_outbox(Path::new(config), n) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = start(&what, quick) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn start(what: &str, quick: bool) -> Result<()> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("policy-audit");
    if !bin.exists() {
        bail!("{} not found: build it first (cargo build --release)", bin.display());
    }
    let tmp = tempfile::tempdir()?;
    let mut bench =
        Bench { bin, work: tmp.path().to_path_buf(), runs: if quick { 1 } else { 3 }, quick, rows: Vec::new() };
    eprintln!("working in {} ({} run(s) per figure, median)", bench.work.display(), bench.runs);
    let all = what == "all";
    if all || what == "backfill" {
        bench.backfill()?;
    }
    if all || what == "fleet" {
        bench.fleet()?;
    }
    if all || what == "delivery" {
        bench.delivery()?;
    }
    if all || what == "store" {
        bench.store()?;
    }
    if all || what == "export" {
        bench.export()?;
    }
    if all || what == "nats" {
        bench.nats()?;
    }
    if all || what == "failover" {
        bench.failover()?;
    }
    if all || what == "serve" {
        bench.serve()?;
    } else if what == "webhook" {
        bench.webhook_latency()?;
    }
    bench.print();
    Ok(())
}

impl Bench {
    fn row(&mut self, what: &str, ours: String, baseline: String, ratio: String, rss: String) {
        eprintln!("  {what}: {ours} vs {baseline} ({ratio})");
        self.rows.push([what.into(), ours, baseline, ratio, rss]);
    }

    fn print(&self) {
        let header = ["figure", "policy-audit", "baseline", "ratio / target", "peak RSS"];
        let mut widths = header.map(str::len);
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            format!("| {} |", parts.join(" | "))
        };
        println!("{}", line(&header.map(String::from)));
        println!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
        for r in &self.rows {
            println!("{}", line(r));
        }
    }

    fn policy_audit(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config").arg(config).args(args).stdout(std::process::Stdio::null()).env_remove("RUST_LOG");
        cmd
    }

    /// First sync with backfill of a 20,000-commit repository vs `git clone --mirror` plus
    /// `git log -- <policy file>`; then the walk phases alone vs `git log`.
    fn backfill(&mut self) -> Result<()> {
        let commits = if self.quick { 5_000 } else { 20_000 };
        let src = self.work.join("long");
        eprintln!("building a {commits}-commit repository...");
        repos::long_history(&src, commits, 10, 480)?;
        let packed = du(&src.join(".git/objects"));
        let config = self.work.join("backfill.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"bf-state\"\n[[projects]]\npath = \"acme/long\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
                src.display()
            ),
        )?;
        let ours = measure::median(self.runs, || {
            let _ = std::fs::remove_dir_all(self.work.join("bf-state"));
            run(&mut self.policy_audit(&config, &["reconcile"]))
        })?;
        let mirror = self.work.join("git-mirror.git");
        let git_total = measure::median(self.runs, || {
            let _ = std::fs::remove_dir_all(&mirror);
            let script = format!(
                // --no-local: transfer a pack like any remote clone (a local clone hardlinks).
                "git clone -q --no-local --mirror {} {} && git -C {} log --format=%H -- {} > /dev/null",
                src.display(),
                mirror.display(),
                mirror.display(),
                repos::POLICY
            );
            run(Command::new("bash").args(["-c", &script]).env("GIT_CONFIG_GLOBAL", "/dev/null"))
        })?;
        let what = format!("backfill, {commits} commits ({:.1} MB packed)", packed as f64 / 1e6);
        self.row(
            &what,
            fmt_ms(ours),
            format!("{} (git clone --no-local --mirror + git log)", fmt_ms(git_total)),
            ratio(ours, git_total, "≤ 1.0"),
            fmt_rss(ours),
        );

        // Walk alone: our walk+parse+diff phases (from --timings) vs git log on the mirror.
        let _ = std::fs::remove_dir_all(self.work.join("bf-state"));
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&config)
            .args(["reconcile", "--json", "--no-deliver"])
            .output()?;
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).context("reconcile --json")?;
        let t = &summary["projects"][0]["timings"];
        let phase = |k: &str| t[k].as_f64().unwrap_or(0.0);
        let log = measure::median(self.runs, || {
            let script = format!("git -C {} log --format=%H -- {} > /dev/null", mirror.display(), repos::POLICY);
            run(Command::new("bash").args(["-c", &script]))
        })?;
        self.row(
            "walk alone (--timings: walk phase)",
            format!(
                "{:.0} ms (then parse {:.0}, diff {:.0}, store {:.0}; fetch {:.0})",
                phase("walk_ms"),
                phase("parse_ms"),
                phase("diff_ms"),
                phase("store_ms"),
                phase("fetch_ms")
            ),
            format!("{} (git log -- policy.yml)", fmt_ms(log)),
            format!("{:.2}", phase("walk_ms") / ms(log.wall)),
            "-".into(),
        );
        Ok(())
    }

    /// 1,000 projects: an idle reconcile vs a shell loop of `git fetch`; then one new policy
    /// commit in each.
    fn fleet(&mut self) -> Result<()> {
        let n = if self.quick { 200 } else { 1000 };
        eprintln!("building {n} repositories...");
        let template = self.work.join("fleet-template");
        repos::long_history(&template, 20, 4, 200)?;
        let fleet = self.work.join("fleet");
        std::fs::create_dir_all(&fleet)?;
        let mut config = String::from("state_dir = \"fleet-state\"\n");
        for i in 0..n {
            let repo = fleet.join(format!("spp{i:04}"));
            run(Command::new("cp").arg("-a").arg(&template).arg(&repo))?;
            config.push_str(&format!(
                "[[projects]]\npath = \"group{}/spp{i:04}\"\nurl = \"{}\"\n",
                i % 10,
                repo.display()
            ));
        }
        let config_path = self.work.join("fleet.toml");
        std::fs::write(&config_path, config)?;
        run(&mut self.policy_audit(&config_path, &["reconcile"]))?; // first sync: baselines
        let mirrors: Vec<PathBuf> =
            std::fs::read_dir(self.work.join("fleet-state/mirrors"))?.flatten().map(|e| e.path()).collect();
        let fetch_loop = |mirrors: &[PathBuf]| -> String {
            let mut script = String::new();
            for (i, m) in mirrors.iter().enumerate() {
                let name = m.file_name().and_then(|f| f.to_str()).unwrap_or_default();
                let idx: String = name.chars().skip(name.find("spp").map(|p| p + 3).unwrap_or(0)).take(4).collect();
                let _ = i;
                script.push_str(&format!(
                    "git -C {} fetch -q {}/spp{idx} +refs/heads/main:refs/remotes/origin/main\n",
                    m.display(),
                    fleet.display()
                ));
            }
            script
        };
        let script = fetch_loop(&mirrors);
        let script_path = self.work.join("fetch-loop.sh");
        std::fs::write(&script_path, &script)?;
        let ours = measure::median(self.runs, || run(&mut self.policy_audit(&config_path, &["reconcile"])))?;
        let git = measure::median(self.runs, || {
            run(Command::new("bash").arg(&script_path).env("GIT_CONFIG_GLOBAL", "/dev/null"))
        })?;
        let per = ms(ours.wall) / n as f64;
        self.row(
            &format!("idle fleet, {n} projects, nothing new"),
            format!("{} ({per:.2} ms/project)", fmt_ms(ours)),
            format!("{} (git fetch loop)", fmt_ms(git)),
            format!("{:.1}x faster (target ≥ 5x, < 2 ms/project)", ms(git.wall) / ms(ours.wall)),
            fmt_rss(ours),
        );

        eprintln!("adding one policy commit to each of {n} repositories...");
        for i in 0..n {
            let repo = fleet.join(format!("spp{i:04}"));
            std::fs::write(repo.join(repos::POLICY), repos::policy_file(8, 999))?;
            repos::git(&repo, &["-c", "user.name=Bench", "-c", "user.email=b@example.com", "commit", "-qam", "busy"])?;
        }
        let busy = run(&mut self.policy_audit(&config_path, &["reconcile"]))?;
        let git_busy = run(Command::new("bash").arg(&script_path).env("GIT_CONFIG_GLOBAL", "/dev/null"))?;
        self.row(
            &format!("busy fleet, {n} projects, 1 new policy commit each"),
            format!("{} ({:.2} ms/project)", fmt_ms(busy), ms(busy.wall) / n as f64),
            format!("{} (git fetch loop)", fmt_ms(git_busy)),
            format!("{:.1}x faster", ms(git_busy.wall) / ms(busy.wall)),
            fmt_rss(busy),
        );
        Ok(())
    }

    /// A 20,000-event outbox drained to nginx (204) vs wrk posting the same body over one
    /// connection.
    fn delivery(&mut self) -> Result<()> {
        let events = if self.quick { 5_000 } else { 20_000 };
        let port = free_port()?;
        let nginx = Nginx::start(&self.work, port)?;
        let url = format!("http://127.0.0.1:{port}/audit");
        let state = self.work.join("dl-state");
        let config = self.work.join("delivery.toml");
        std::fs::write(self.work.join("secret"), "whsec_YmVuY2htYXJrLXNpZ25pbmcta2V5")?;
        std::fs::write(
            &config,
            format!(
                "state_dir = \"dl-state\"\n[[destinations]]\nname = \"nginx\"\nurl = \"{url}\"\nsigning_secret_file = \"secret\"\n"
            ),
        )?;
        let body = synthetic_outbox(&config, events)?;
        let ours = run(&mut self.policy_audit(&config, &["deliveries", "retry"]))?; // drains the outbox
        let _ = std::fs::remove_dir_all(&state);
        let rate = events as f64 / ours.wall.as_secs_f64();
        let wrk = wrk_rate(&self.work, &url, &body)?;
        drop(nginx);
        self.row(
            &format!("delivery, {events}-event outbox to nginx (204)"),
            format!("{rate:.0} events/s"),
            format!("{wrk:.0} requests/s (wrk, 1 connection)"),
            format!("{:.2} of wrk (target ≥ 0.5)", rate / wrk),
            fmt_rss(ours),
        );
        Ok(())
    }

    /// Bytes on disk per 100,000 stored events (with their chain links and delivered outbox).
    fn store(&mut self) -> Result<()> {
        let events = if self.quick { 20_000 } else { 100_000 };
        let config = self.work.join("store.toml");
        std::fs::write(&config, "state_dir = \"st-state\"\n")?;
        synthetic_events(&config, events, false)?;
        let bytes = du(&self.work.join("st-state/db"));
        let per_100k = bytes as f64 * 100_000.0 / events as f64;
        self.row(
            &format!("store, {events} events"),
            format!("{:.1} MB per 100,000 events", per_100k / 1e6),
            "-".into(),
            format!("{:.0} bytes/event", bytes as f64 / events as f64),
            "-".into(),
        );
        Ok(())
    }
}

impl Bench {
    /// `events` over a large store: written as it is read, so memory stays flat whatever the
    /// size of the trail (the table format, which sizes its columns, is left out).
    fn export(&mut self) -> Result<()> {
        let events = if self.quick { 100_000 } else { 1_000_000 };
        let config = self.work.join("export.toml");
        std::fs::write(&config, "state_dir = \"ex-state\"\n")?;
        eprintln!("filling a store with {events} events (once)");
        synthetic_events(&config, events, false)?;
        let bin = self.bin.clone();
        let command = |args: &[&str]| -> Result<Sample> {
            run(Command::new(&bin)
                .arg("--config")
                .arg(&config)
                .args(args)
                .stdout(std::fs::File::create("/dev/null")?)
                .stderr(std::process::Stdio::inherit()))
        };
        // The baseline: opening the same store and listing nothing (an empty outbox). What sled
        // holds for a store of this size is in both.
        let open_only = median(self.runs, || command(&["deliveries"]))?;
        for format in ["jsonl", "csv"] {
            let sample = median(self.runs, || command(&["events", "--format", format]))?;
            self.row(
                &format!("events --format {format}, {events} events"),
                format!("{:.0} events/s, {}", events as f64 / sample.wall.as_secs_f64(), fmt_ms(sample)),
                format!("open only: {:.1} MiB", mib(open_only.max_rss_kib)),
                format!("+{:.1} MiB over open", mib(sample.max_rss_kib.saturating_sub(open_only.max_rss_kib))),
                fmt_rss(sample),
            );
        }
        Ok(())
    }
}

fn fmt_ms(s: Sample) -> String {
    format!("{:.0} ms", ms(s.wall))
}

fn fmt_rss(s: Sample) -> String {
    format!("{:.1} MiB (target ≤ 64)", mib(s.max_rss_kib))
}

fn ratio(ours: Sample, base: Sample, target: &str) -> String {
    format!("{:.2} (target {target})", ms(ours.wall) / ms(base.wall))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Stores `n` synthetic (but schema-complete) events, with an outbox entry each when
/// `outbox`. Returns one event body.
fn synthetic_events(config_path: &Path, n: usize, outbox: bool) -> Result<Vec<u8>> {
    use policy_audit::config::Config;
    use policy_audit::event::StepContext;
    use policy_audit::policy::{PolicySet, diff, parse};
    use policy_audit::store::{Cursor, Store};
    let text = std::fs::read_to_string(config_path)?;
    let with_project = format!(
        "{text}\n[[projects]]\npath = \"acme/security-policies\"\nurl = \"/nonexistent\"\nlinked = [\"acme\"]\n"
    );
    let config = Config::parse(config_path, &with_project).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::open(&config.db_dir())?;
    let set = parse(include_bytes!("../../benches/data/approval_policy.yml"))?;
    let change = diff(&PolicySet::default(), &set).into_iter().next().context("no change")?;
    let project = &config.projects[0];
    let destinations: Vec<String> =
        if outbox { config.destinations.iter().map(|d| d.name.clone()).collect() } else { Vec::new() };
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let sha = format!("{i:040x}");
        let ctx = StepContext {
            project: project.spp(),
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
            let cursor =
                Cursor { commit: sha.clone(), blob: String::new(), baseline: None, limits: Default::default() };
            store.commit_reconcile(
                &project.path,
                &cursor,
                &batch,
                &|_| destinations.clone(),
                jiff::Timestamp::now().as_millisecond(),
            )?;
            batch.clear();
        }
    }
    store.flush()?;
    Ok(store.event_bytes(0)?.map(|b| b.to_vec()).unwrap_or_default())
}

/// `n` distinct synthetic events like those of `synthetic_events` (not stored).
fn synthetic_event_list(n: usize) -> Result<Vec<policy_audit::event::AuditEvent>> {
    use policy_audit::event::{Spp, StepContext};
    use policy_audit::policy::{PolicySet, diff, parse};
    let set = parse(include_bytes!("../../benches/data/approval_policy.yml"))?;
    let change = diff(&PolicySet::default(), &set).into_iter().next().context("no change")?;
    let linked = vec!["acme".to_string()];
    Ok((0..n)
        .map(|i| {
            let sha = format!("{i:040x}");
            StepContext {
                project: Spp {
                    path: "acme/security-policies",
                    id: None,
                    branch: "main",
                    policy_file: ".gitlab/security-policies/policy.yml",
                    linked: &linked,
                },
                sha: &sha,
                previous_sha: None,
                author_name: "Bench",
                author_email: "bench@example.com",
                author_id: None,
                committed_at: 1_700_000_000 + i as i64,
                message: "bench",
                detected_at: jiff::Timestamp::now(),
                history_rewritten: false,
            }
            .change_event(&change)
        })
        .collect())
}

fn synthetic_outbox(config: &Path, n: usize) -> Result<Vec<u8>> {
    synthetic_events(config, n, true)
}

struct Nginx {
    child: std::process::Child,
}

impl Nginx {
    fn start(work: &Path, port: u16) -> Result<Nginx> {
        Nginx::launch(
            &work.join("nginx"),
            port,
            "location / { client_max_body_size 1m; return 204; }",
            "client_body_temp_path {dir};",
        )
    }

    /// nginx serving the files of `root` (the static baseline of the web server's figures).
    fn start_static(work: &Path, port: u16, root: &Path) -> Result<Nginx> {
        let location = format!("location / {{ root {}; default_type application/json; }}", root.display());
        Nginx::launch(&work.join("nginx-static"), port, &location, "")
    }

    /// One worker on `127.0.0.1:port` with its files under `dir`, serving `location`; waits
    /// (bounded) until it accepts connections. `{dir}` in `http_extra` is replaced by `dir`.
    fn launch(dir: &Path, port: u16, location: &str, http_extra: &str) -> Result<Nginx> {
        std::fs::create_dir_all(dir.join("logs"))?;
        let conf = format!(
            "worker_processes 1;\npid {0}/nginx.pid;\nerror_log {0}/logs/error.log;\ndaemon off;\nevents {{ worker_connections 64; }}\n\
             http {{ access_log off; {1} server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000; {location} }} }}\n",
            dir.display(),
            http_extra.replace("{dir}", &dir.display().to_string()),
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new("nginx")
            .args(["-p", &dir.to_string_lossy(), "-c", &dir.join("nginx.conf").to_string_lossy()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start nginx (apt-get install nginx-light)")?;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > until {
                bail!("nginx did not start");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(Nginx { child })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master then stops its workers (a killed master orphans them).
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// wrk's request rate for POSTing `body` over one connection for 5 s.
fn wrk_rate(work: &Path, url: &str, body: &[u8]) -> Result<f64> {
    let body_path = work.join("body.json");
    std::fs::write(&body_path, body)?;
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nlocal f = io.open(\"{}\", \"rb\")\nwrk.body = f:read(\"*a\")\nf:close()\n",
        body_path.display()
    );
    std::fs::write(work.join("post.lua"), lua)?;
    let out = Command::new("wrk")
        .args(["-t1", "-c1", "-d5s", "-s"])
        .arg(work.join("post.lua"))
        .arg(url)
        .output()
        .context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("cannot read wrk output: {text}"))?;
    Ok(rate)
}
