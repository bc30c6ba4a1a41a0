//! `cargo run --release -p policy-audit-bench -- [all|backfill|fleet|fleet-http|delivery|store|export|nats|failover|serve|webhook|growth] [--quick]`:
//! builds its own repositories and prints one table (`growth`: a table of how each figure grows), each figure measured in the same run next to a
//! baseline (git itself, or wrk). Figures, never assertions: see docs/performance.md.

mod cgroup;
mod discovery;
mod githttp;
mod growth;
mod measure;
mod nats;
mod repos;
mod serve;
mod trees;

use anyhow::{Context, Result, bail};
use measure::{Sample, du, median, mib, ms, run};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One backfill measurement (see [`Bench::backfill_run`]).
struct BackfillRun {
    ours: Sample,
    /// policy-audit's own peak RSS, KiB (`reconcile --timings`): `ours` is the largest process
    /// of the tree, which for a local fetch is git's `pack-objects` serving it.
    own_rss_kib: u64,
    git: Sample,
    /// Bytes of the source repository's objects.
    packed: u64,
    config: PathBuf,
    state: PathBuf,
    mirror: PathBuf,
}

/// One fleet measurement (see [`Bench::fleet_run`]).
struct FleetRun {
    idle: Sample,
    fetch_loop: Sample,
    ls_remote_loop: Sample,
    /// policy-audit and the `git fetch` loop after one new commit in each repository.
    busy: Option<(Sample, Sample)>,
    /// Over smart HTTP: the server's rate for the idle probe alone (wrk, 4 connections).
    server_floor: Option<f64>,
}

struct Bench {
    bin: PathBuf,
    work: PathBuf,
    runs: usize,
    quick: bool,
    rows: Vec<[String; 5]>,
    /// `bench growth`'s table.
    growth: Vec<[String; 7]>,
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
    // `bench parse N`: parse N distinct versions of the backfill's policy file on one thread.
    if what == "parse" {
        let n: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(2_000);
        let files: Vec<String> = (0..n).map(|rev| repos::policy_file(8, rev)).collect();
        let bytes: usize = files.iter().map(String::len).sum();
        let started = std::time::Instant::now();
        let valid = files.iter().filter(|f| policy_audit::policy::parse(f.as_bytes()).is_ok()).count();
        let took = started.elapsed();
        println!(
            "{n} files ({valid} valid, {:.1} KB each): {:.1} µs/file, {:.1} µs/KB",
            bytes as f64 / n as f64 / 1000.0,
            took.as_secs_f64() * 1e6 / n as f64,
            took.as_secs_f64() * 1e9 / bytes as f64
        );
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
    // `bench fill CONFIG N [--no-outbox]`: store N synthetic events with outbox entries (or
    // without), print one event body. The figures fill their stores through it, in a child
    // process: a child's peak RSS as wait4 reports it is at least its parent's (Linux keeps the
    // high-water mark across the exec), so the harness must not grow itself.
    if what == "fill" {
        let (Some(config), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
            eprintln!("usage: bench fill CONFIG N [--no-outbox]");
            std::process::exit(2);
        };
        let outbox = !args.iter().any(|a| a == "--no-outbox");
        match synthetic_events(Path::new(config), n, outbox) {
            Ok(body) => {
                use std::io::Write;
                let _ = std::io::stdout().write_all(&body);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    // `bench fill-web CONFIG N`: the web figures' store (`serve`), filled in a child like `fill`.
    if what == "fill-web" {
        let (Some(config), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
            eprintln!("usage: bench fill-web CONFIG N");
            std::process::exit(2);
        };
        if let Err(e) = serve::fill(Path::new(config), n) {
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
    let mut bench = Bench {
        bin,
        work: tmp.path().to_path_buf(),
        runs: if quick { 1 } else { 3 },
        quick,
        rows: Vec::new(),
        growth: Vec::new(),
    };
    eprintln!("working in {} ({} run(s) per figure, median)", bench.work.display(), bench.runs);
    let all = what == "all";
    if all || what == "backfill" {
        bench.backfill()?;
    }
    if all || what == "fleet" {
        bench.fleet()?;
    }
    if all || what == "fleet-http" {
        bench.fleet_http()?;
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
    if what == "growth" {
        bench.growth()?;
    }
    if all || what == "discovery" {
        bench.discovery()?;
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
        if !self.rows.is_empty() {
            print_table(&["figure", "policy-audit", "baseline", "ratio / target", "peak RSS"], &self.rows);
        }
        if !self.growth.is_empty() {
            let header = ["figure", "work", "time", "per unit", "per unit vs 1x", "peak RSS", "baseline (same run)"];
            print_table(&header, &self.growth);
        }
    }
}

/// A markdown table with aligned columns.
fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    {
        let mut widths = header.map(|h| h.chars().count());
        for r in rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            format!("| {} |", parts.join(" | "))
        };
        println!("{}", line(&header.map(String::from)));
        println!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
        for r in rows {
            println!("{}", line(r));
        }
    }
}

impl Bench {
    fn policy_audit(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config").arg(config).args(args).stdout(std::process::Stdio::null()).env_remove("RUST_LOG");
        cmd
    }

    /// First sync with backfill of a 20,000-commit repository vs `git clone --mirror` plus
    /// `git log -- <policy file>`; then the walk phases alone vs `git log`.
    fn backfill(&mut self) -> Result<()> {
        // A real repository too, when given: BENCH_REAL_REPO=<repository> BENCH_REAL_FILE=<a
        // YAML file of it that changes often> (docs/performance.md: prometheus's history).
        if let (Some(repo), Some(file)) = (std::env::var_os("BENCH_REAL_REPO"), std::env::var("BENCH_REAL_FILE").ok()) {
            let repo = PathBuf::from(repo);
            let packed = du(&repo);
            let real = self.backfill_of(&repo, &file, "real", packed)?;
            self.backfill_row(&format!("backfill of {} following {file}", repo.display()), &real);
            self.backfill_limited(&repo, &file)?;
        }
        let commits = if self.quick { 5_000 } else { 20_000 };
        let synthetic = self.backfill_run(commits)?;
        self.backfill_row(&format!("backfill, {commits} commits"), &synthetic);
        let BackfillRun { config, state, mirror, .. } = synthetic;

        // Walk alone: our walk+parse+diff phases (from --timings) vs git log on the mirror.
        let _ = std::fs::remove_dir_all(&state);
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

    /// A backfill's row: its time next to git's, and its peak RSS, policy-audit's own and the
    /// process tree's (with the `git pack-objects` serving a local fetch).
    fn backfill_row(&mut self, what: &str, run: &BackfillRun) {
        self.row(
            &format!("{what} ({:.1} MB packed)", run.packed as f64 / 1e6),
            fmt_ms(run.ours),
            format!("{} (git clone --no-local --mirror + git log)", fmt_ms(run.git)),
            ratio(run.ours, run.git, "≤ 0.8, issue 25"),
            format!(
                "{:.1} MiB policy-audit (target ≤ 64); {:.1} MiB with the git pack-objects serving the local fetch",
                mib(run.own_rss_kib),
                mib(run.ours.max_rss_kib)
            ),
        );
    }

    /// A first sync with backfill of a `commits`-commit repository (every 10th commit changes
    /// the policy) next to `git clone --no-local --mirror` + `git log -- <policy file>`.
    fn backfill_run(&mut self, commits: usize) -> Result<BackfillRun> {
        let src = self.work.join(format!("long-{commits}"));
        eprintln!("building a {commits}-commit repository...");
        repos::long_history(&src, commits, 10, 480)?;
        let packed = du(&src.join(".git/objects"));
        self.backfill_of(&src, repos::POLICY, &commits.to_string(), packed)
    }

    /// [`Bench::backfill_run`] of the repository at `src` (a work tree's or a bare one),
    /// following `file`.
    fn backfill_of(&mut self, src: &Path, file: &str, name: &str, packed: u64) -> Result<BackfillRun> {
        let (config, state) = self.backfill_config(name, &src.display().to_string(), file)?;
        let report = self.work.join(format!("bf-report-{name}.json"));
        let mut own_rss_kib = 0;
        let ours = measure::median(self.runs, || {
            let _ = std::fs::remove_dir_all(&state);
            let mut cmd = self.policy_audit(&config, &["reconcile", "--json", "--timings"]);
            let sample = run(cmd.stdout(std::fs::File::create(&report)?))?;
            let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
            let own =
                summary["peak_memory_bytes"].as_u64().context("no peak_memory_bytes in reconcile --json --timings")?;
            own_rss_kib = own_rss_kib.max(own / 1024);
            Ok(sample)
        })?;
        let mirror = self.work.join(format!("git-mirror-{name}.git"));
        let git_total =
            measure::median(self.runs, || run(&mut git_backfill(&src.display().to_string(), &mirror, file)))?;
        Ok(BackfillRun { ours, own_rss_kib, git: git_total, packed, config, state, mirror })
    }

    /// A config backfilling `url`'s `file` as one project, its state in a folder of its own:
    /// (config, state folder), named after `name`.
    fn backfill_config(&self, name: &str, url: &str, file: &str) -> Result<(PathBuf, PathBuf)> {
        let config = self.work.join(format!("backfill-{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "state_dir = \"bf-state-{name}\"\n[[projects]]\npath = \"acme/long\"\nurl = \"{url}\"\npolicy_file = \"{file}\"\ninitial_sync = \"backfill\"\n"
            ),
        )?;
        Ok((config, self.work.join(format!("bf-state-{name}"))))
    }

    /// The backfill of `repo` within 64 MiB of memory, as systemd's `MemoryMax=64M` sets it (a
    /// memory cgroup, swap included), next to `git clone --mirror` + `git log` in the same
    /// limit. Both fetch over smart HTTP, so the git serving the fetch runs outside the limit.
    /// The kernel reclaims the pages of the pack that the fetch maps when the limit is reached:
    /// peak RSS counts them, the limit shows whether the work needs them.
    fn backfill_limited(&mut self, repo: &Path, file: &str) -> Result<()> {
        const LIMIT: u64 = 64 << 20;
        let what = format!("the same backfill within a {} MiB memory cgroup, over smart HTTP", LIMIT >> 20);
        let group = match cgroup::MemoryCgroup::create("policy-audit-bench", LIMIT) {
            Ok(group) => group,
            Err(e) => {
                self.row(&what, format!("not measured: {e:#}"), "-".into(), "-".into(), "-".into());
                return Ok(());
            }
        };
        let (root, name) = (repo.parent().context("repository's folder")?, repo.file_name().context("repository")?);
        let server = githttp::GitHttp::start(&self.work.join("nginx-limited"), root, 2)?;
        let url = format!("{}/{}", server.base, name.to_string_lossy());
        let (config, state) = self.backfill_config("limited", &url, file)?;
        // Each run in the group, with the group's peak charge (page cache included; largest over
        // the runs) kept in `peak`.
        let in_group = |cmd: &mut Command, peak: &mut u64| -> Result<Sample> {
            group.reset();
            group.enter(cmd)?;
            let sample = run(cmd)?;
            *peak = (*peak).max(group.peak().unwrap_or(0));
            Ok(sample)
        };
        let (mut our_peak, mut git_peak) = (0, 0);
        let ours = median(self.runs, || {
            let _ = std::fs::remove_dir_all(&state);
            in_group(&mut self.policy_audit(&config, &["reconcile", "--no-deliver"]), &mut our_peak)
        })?;
        let mirror = self.work.join("git-mirror-limited.git");
        let git = median(self.runs, || in_group(&mut git_backfill(&url, &mirror, file), &mut git_peak))?;
        drop(server);
        self.row(
            &what,
            fmt_ms(ours),
            format!("{} (git clone --mirror + git log, same limit)", fmt_ms(git)),
            ratio(ours, git, "≤ 1.0"),
            format!(
                "completed; the group's peak {:.1} MiB, page cache included (git's {:.1}); \
                 peak RSS {:.1} MiB, with pages of files charged elsewhere",
                mib(our_peak / 1024),
                mib(git_peak / 1024),
                mib(ours.max_rss_kib)
            ),
        );
        Ok(())
    }

    /// 1,000 projects on this machine (local paths): an idle reconcile vs a shell loop of
    /// `git fetch`; then one new policy commit in each.
    fn fleet(&mut self) -> Result<()> {
        let n = if self.quick { 200 } else { 1000 };
        let f = self.fleet_run(n, false, true)?;
        let per = ms(f.idle.wall) / n as f64;
        self.row(
            &format!("idle fleet, {n} projects, nothing new"),
            format!("{} ({per:.2} ms/project)", fmt_ms(f.idle)),
            format!("{} (git fetch loop); {} (git ls-remote loop)", fmt_ms(f.fetch_loop), fmt_ms(f.ls_remote_loop)),
            format!("{:.1}x faster (target ≥ 5x, < 2 ms/project)", ms(f.fetch_loop.wall) / ms(f.idle.wall)),
            fmt_rss(f.idle),
        );
        self.busy_row(n, "", &f);
        Ok(())
    }

    /// The same fleet served over git's smart HTTP (`git http-backend` behind nginx and
    /// fcgiwrap on 127.0.0.1): an idle reconcile vs `git fetch` and `git ls-remote` loops over
    /// the same URLs; then one new policy commit in each.
    fn fleet_http(&mut self) -> Result<()> {
        let n = if self.quick { 200 } else { 1000 };
        let f = self.fleet_run(n, true, true)?;
        let per = ms(f.idle.wall) / n as f64;
        self.row(
            &format!("idle fleet over smart HTTP, {n} projects, nothing new"),
            format!("{} ({per:.2} ms/project)", fmt_ms(f.idle)),
            format!("{} (git fetch loop); {} (git ls-remote loop)", fmt_ms(f.fetch_loop), fmt_ms(f.ls_remote_loop)),
            format!(
                "{:.1}x faster than fetch, {:.1}x than ls-remote (target ≥ 5x, < 2 ms/project)",
                ms(f.fetch_loop.wall) / ms(f.idle.wall),
                ms(f.ls_remote_loop.wall) / ms(f.idle.wall)
            ),
            fmt_rss(f.idle),
        );
        if let Some(floor) = f.server_floor {
            self.row(
                "the server alone: wrk POSTing the same ls-refs probe, 4 connections (fcgiwrap's 4 children)",
                "-".into(),
                format!("{floor:.0} probes/s ({:.2} ms each)", 1000.0 / floor),
                format!("the idle fleet's ms/project is {:.2}x the server's floor", per / (1000.0 / floor)),
                "-".into(),
            );
        }
        self.busy_row(n, " over smart HTTP", &f);
        Ok(())
    }

    fn busy_row(&mut self, n: usize, how: &str, f: &FleetRun) {
        if let Some((busy, git_busy)) = f.busy {
            self.row(
                &format!("busy fleet{how}, {n} projects, 1 new policy commit each"),
                format!("{} ({:.2} ms/project)", fmt_ms(busy), ms(busy.wall) / n as f64),
                format!("{} (git fetch loop)", fmt_ms(git_busy)),
                format!("{:.1}x faster", ms(git_busy.wall) / ms(busy.wall)),
                fmt_rss(busy),
            );
        }
    }

    /// `n` projects of 20 commits each, as local paths or (`http`) over smart HTTP; first sync,
    /// then the idle reconcile next to a `git fetch` loop (into copies of policy-audit's
    /// mirrors) and a `git ls-remote` loop over the same URLs, the runs interleaved; with
    /// `busy`, one new policy commit in each repository, then one reconcile and one fetch loop.
    fn fleet_run(&mut self, n: usize, http: bool, busy: bool) -> Result<FleetRun> {
        let dir = self.work.join(format!("fleet-{}-{n}", if http { "http" } else { "local" }));
        let repos_dir = dir.join("repos");
        std::fs::create_dir_all(&repos_dir)?;
        eprintln!("building {n} repositories{}...", if http { " (served over smart HTTP)" } else { "" });
        let template = dir.join("template");
        repos::long_history(&template, 20, 4, 200)?;
        let server = if http { Some(githttp::GitHttp::start(&dir.join("nginx"), &repos_dir, 4)?) } else { None };
        let url = |i: usize| match &server {
            Some(s) => format!("{}/spp{i:04}", s.base),
            None => repos_dir.join(format!("spp{i:04}")).display().to_string(),
        };
        let mut config = String::from("state_dir = \"state\"\n");
        for i in 0..n {
            run(Command::new("cp").arg("-a").arg(&template).arg(repos_dir.join(format!("spp{i:04}"))))?;
            config.push_str(&format!("[[projects]]\npath = \"group{}/spp{i:04}\"\nurl = \"{}\"\n", i % 10, url(i)));
        }
        let config_path = dir.join("fleet.toml");
        std::fs::write(&config_path, config)?;
        run(&mut self.policy_audit(&config_path, &["reconcile"]))?; // first sync: baselines
        // The git loops fetch into copies of the mirrors, so that they and policy-audit each
        // find their own mirrors as they left them.
        let git_mirrors = dir.join("git-mirrors");
        run(Command::new("cp").arg("-a").arg(dir.join("state/mirrors")).arg(&git_mirrors))?;
        let mut fetch_script = String::new();
        let mut ls_script = String::new();
        for entry in std::fs::read_dir(&git_mirrors)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(i) = name.find("spp").and_then(|p| name.get(p + 3..p + 7)).and_then(|d| d.parse::<usize>().ok())
            else {
                bail!("unexpected mirror name {name}");
            };
            fetch_script.push_str(&format!(
                "git -C {} fetch -q {} +refs/heads/main:refs/remotes/origin/main\n",
                entry.path().display(),
                url(i)
            ));
            ls_script.push_str(&format!("git ls-remote {} refs/heads/main > /dev/null\n", url(i)));
        }
        let fetch_path = dir.join("fetch-loop.sh");
        let ls_path = dir.join("ls-remote-loop.sh");
        std::fs::write(&fetch_path, &fetch_script)?;
        std::fs::write(&ls_path, &ls_script)?;
        let shell = |script: &Path| run(Command::new("bash").arg(script).env("GIT_CONFIG_GLOBAL", "/dev/null"));
        let (mut ours, mut fetches, mut lists) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.runs {
            ours.push(run(&mut self.policy_audit(&config_path, &["reconcile"]))?);
            fetches.push(shell(&fetch_path)?);
            lists.push(shell(&ls_path)?);
        }
        // The server's own ceiling for the idle probe: what no client can go below.
        let server_floor = match &server {
            Some(s) => Some(wrk_post(
                &dir,
                &format!("{}/spp0000/git-upload-pack", s.base),
                &policy_audit::repo::ls_refs_request("main"),
                &[("Content-Type", "application/x-git-upload-pack-request"), ("Git-Protocol", "version=2")],
                4,
            )?),
            None => None,
        };
        let mut figures = FleetRun {
            idle: measure::median_of(ours),
            fetch_loop: measure::median_of(fetches),
            ls_remote_loop: measure::median_of(lists),
            busy: None,
            server_floor,
        };
        if busy {
            eprintln!("adding one policy commit to each of {n} repositories...");
            for i in 0..n {
                let repo = repos_dir.join(format!("spp{i:04}"));
                std::fs::write(repo.join(repos::POLICY), repos::policy_file(8, 999))?;
                repos::git(
                    &repo,
                    &["-c", "user.name=Bench", "-c", "user.email=b@example.com", "commit", "-qam", "busy"],
                )?;
            }
            let ours = run(&mut self.policy_audit(&config_path, &["reconcile"]))?;
            let git = shell(&fetch_path)?;
            figures.busy = Some((ours, git));
        }
        drop(server);
        Ok(figures)
    }

    /// A store of `events` synthetic events under `{name}-state`: its config and its size on
    /// disk.
    fn fill_store(&self, name: &str, events: usize) -> Result<(PathBuf, u64)> {
        let config = self.work.join(format!("{name}.toml"));
        std::fs::write(&config, format!("state_dir = \"{name}-state\"\n"))?;
        eprintln!("filling a store with {events} events");
        fill_in_child(&config, events, false)?;
        Ok((config, du(&self.work.join(format!("{name}-state/db")))))
    }

    /// A 20,000-event outbox drained to nginx (204) vs wrk posting the same body over one
    /// connection, alternately, median of the runs; with `BENCH_COMPARE_BIN=<older
    /// policy-audit>` the same drain by that binary too, in the same runs; with strace
    /// installed, the system calls per delivered event of one more drain.
    fn delivery(&mut self) -> Result<()> {
        let events = if self.quick { 5_000 } else { 20_000 };
        let port = free_port()?;
        let nginx = Nginx::start(&self.work, port)?;
        let url = format!("http://127.0.0.1:{port}/audit");
        let state = self.work.join("dl-state");
        let template = self.work.join("dl-template");
        let config = self.work.join("delivery.toml");
        std::fs::write(self.work.join("secret"), "whsec_YmVuY2htYXJrLXNpZ25pbmcta2V5")?;
        std::fs::write(
            &config,
            format!(
                "state_dir = \"dl-state\"\n[[destinations]]\nname = \"nginx\"\nurl = \"{url}\"\nsigning_secret_file = \"secret\"\n"
            ),
        )?;
        let body = fill_in_child(&config, events, true)?;
        std::fs::rename(&state, &template)?;
        let compare = std::env::var_os("BENCH_COMPARE_BIN").map(PathBuf::from);
        // Drains a fresh copy of the filled outbox with `bin`.
        let drain = |bin: &Path| -> Result<Sample> {
            let _ = std::fs::remove_dir_all(&state);
            copy_dir(&template, &state)?;
            let mut cmd = Command::new(bin);
            cmd.arg("--config").arg(&config).args(["deliveries", "retry"]);
            run(cmd.stdout(std::process::Stdio::null()).env_remove("RUST_LOG"))
        };
        let (mut ours, mut older, mut wrk) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.runs {
            ours.push(drain(&self.bin)?);
            if let Some(bin) = &compare {
                older.push(drain(bin)?);
            }
            wrk.push(wrk_rate(&self.work, &url, &body)?);
        }
        let ours = median(ours.len(), || ours.pop().context("no run"))?;
        let rate = events as f64 / ours.wall.as_secs_f64();
        wrk.sort_by(f64::total_cmp);
        let wrk = wrk[wrk.len() / 2];
        let strace_out = self.work.join("strace.txt");
        let syscalls = |bin: &Path| -> Result<String> {
            let _ = std::fs::remove_dir_all(&state);
            copy_dir(&template, &state)?;
            Ok(match syscalls_per_event(bin, &config, &strace_out, events) {
                Ok(per_event) => format!(", {per_event:.1} syscalls/event"),
                Err(e) => format!(" (no syscall count: {e})"),
            })
        };
        let calls = syscalls(&self.bin)?;
        self.row(
            &format!("delivery, {events}-event outbox to nginx (204)"),
            format!("{rate:.0} events/s{calls}"),
            format!("{wrk:.0} requests/s (wrk, 1 connection)"),
            format!("{:.2} of wrk (target ≥ 0.5)", rate / wrk),
            fmt_rss(ours),
        );
        if let Some(bin) = &compare {
            let older = median(older.len(), || older.pop().context("no run"))?;
            let calls = syscalls(bin)?;
            self.row(
                &format!("delivery by {} (BENCH_COMPARE_BIN), same runs", bin.display()),
                format!("{:.0} events/s{calls}", events as f64 / older.wall.as_secs_f64()),
                format!("{wrk:.0} requests/s (wrk, 1 connection)"),
                format!("{:.2} of wrk", events as f64 / older.wall.as_secs_f64() / wrk),
                fmt_rss(older),
            );
        }
        drop(nginx);
        let _ = std::fs::remove_dir_all(&state);
        let _ = std::fs::remove_dir_all(&template);
        Ok(())
    }

    /// `deliveries retry` draining an outbox of `events` signed events to `url`; the time and
    /// one event body.
    fn delivery_run(&mut self, events: usize, url: &str) -> Result<(Sample, Vec<u8>)> {
        let state = self.work.join(format!("dl-state-{events}"));
        let config = self.work.join(format!("delivery-{events}.toml"));
        std::fs::write(self.work.join("secret"), "whsec_YmVuY2htYXJrLXNpZ25pbmcta2V5")?;
        std::fs::write(
            &config,
            format!(
                "state_dir = \"dl-state-{events}\"\n[[destinations]]\nname = \"nginx\"\nurl = \"{url}\"\nsigning_secret_file = \"secret\"\n"
            ),
        )?;
        let body = fill_in_child(&config, events, true)?;
        let ours = run(&mut self.policy_audit(&config, &["deliveries", "retry"]))?; // drains the outbox
        let _ = std::fs::remove_dir_all(&state);
        Ok((ours, body))
    }

    /// Bytes on disk per 100,000 stored events (with their chain links and delivered outbox).
    fn store(&mut self) -> Result<()> {
        let events = if self.quick { 20_000 } else { 100_000 };
        let (_, bytes) = self.fill_store("st", events)?;
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
        let (config, _) = self.fill_store("ex", events)?;
        let bin = self.bin.clone();
        let command = |args: &[&str]| listing(&bin, &config, args);
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

/// One policy-audit command on `config`, its output to /dev/null.
fn listing(bin: &Path, config: &Path, args: &[&str]) -> Result<Sample> {
    run(Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(std::fs::File::create("/dev/null")?)
        .stderr(std::process::Stdio::inherit()))
}

fn fmt_ms(s: Sample) -> String {
    format!("{:.0} ms", ms(s.wall))
}

fn fmt_rss(s: Sample) -> String {
    format!("{:.1} MiB (target ≤ 64)", mib(s.max_rss_kib))
}

/// git's backfill, the baseline: `git clone --mirror` of `source` into `mirror` (made anew), then
/// `git log -- file` on it. `--no-local`: a local path transfers a pack like any remote clone
/// (a local clone hardlinks); a URL is not affected.
fn git_backfill(source: &str, mirror: &Path, file: &str) -> Command {
    let _ = std::fs::remove_dir_all(mirror);
    let script = format!(
        "git clone -q --no-local --mirror {source} {m} && git -C {m} log --format=%H -- {file} > /dev/null",
        m = mirror.display()
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script]).env("GIT_CONFIG_GLOBAL", "/dev/null");
    cmd
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
    use policy_audit::store::{Cursor, Store};
    let text = std::fs::read_to_string(config_path)?;
    let with_project = format!(
        "{text}\n[[projects]]\npath = \"acme/security-policies\"\nurl = \"/nonexistent\"\nlinked = [\"acme\"]\n"
    );
    let config = Config::parse(config_path, &with_project).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::open(&config.db_dir())?;
    let change = bench_change()?;
    let project = &config.projects[0];
    let destinations: Vec<String> =
        if outbox { config.destinations.iter().map(|d| d.name.clone()).collect() } else { Vec::new() };
    let mut batch = Vec::with_capacity(1000);
    // How long each batch's write took: the slowest ones settle the newest ids (see the store).
    let mut writes = Vec::new();
    for i in 0..n {
        batch.push(bench_event(&change, project.spp(), i, 1_700_000_000 + i as i64));
        if batch.len() == 1000 || i + 1 == n {
            let cursor = Cursor {
                commit: format!("{i:040x}"),
                blob: String::new(),
                baseline: None,
                limits: Default::default(),
                included: Default::default(),
            };
            let started = std::time::Instant::now();
            store.commit_reconcile(
                &project.path,
                &cursor,
                &batch,
                &|_| destinations.clone(),
                jiff::Timestamp::now().as_millisecond(),
            )?;
            writes.push(started.elapsed());
            batch.clear();
        }
    }
    store.flush()?;
    writes.sort();
    if let (Some(median), Some(slowest)) = (writes.get(writes.len() / 2), writes.last()) {
        eprintln!(
            "  wrote {n} events in {} batches: median {:.1} ms, slowest {:.0} ms",
            writes.len(),
            ms(*median),
            ms(*slowest)
        );
    }
    Ok(store.event_bytes(0)?.map(|b| b.to_vec()).unwrap_or_default())
}

/// The change every synthetic event reports: the sample approval policy created.
fn bench_change() -> Result<policy_audit::policy::Change> {
    use policy_audit::policy::{PolicySet, diff, parse};
    let set = parse(include_bytes!("../../benches/data/approval_policy.yml"))?;
    diff(&PolicySet::default(), &set).into_iter().next().context("no change")
}

/// Synthetic event `i` of `spp` (commit `i` as its sha, by "Bench"), schema-complete.
fn bench_event(
    change: &policy_audit::policy::Change,
    spp: policy_audit::event::Spp<'_>,
    i: usize,
    committed_at: i64,
) -> policy_audit::event::AuditEvent {
    let sha = format!("{i:040x}");
    policy_audit::event::StepContext {
        project: spp,
        sha: &sha,
        previous_sha: None,
        author_name: "Bench",
        author_email: "bench@example.com",
        author_id: None,
        committed_at,
        message: "bench",
        detected_at: jiff::Timestamp::now(),
        history_rewritten: false,
    }
    .change_event(change)
}

/// [`synthetic_events`] in a child process (`bench fill`), so that this process stays small.
fn fill_in_child(config: &Path, n: usize, outbox: bool) -> Result<Vec<u8>> {
    let n = n.to_string();
    let mut args = vec![std::ffi::OsStr::new("fill"), config.as_os_str(), n.as_ref()];
    if !outbox {
        args.push("--no-outbox".as_ref());
    }
    in_child(&args)
}

/// This harness run as a child with `args` (a `fill` subcommand): its standard output. A
/// child's peak RSS as `wait4` reports it is at least its parent's high-water mark (Linux keeps
/// it across `exec`), so stores are filled in a child and the harness stays small.
fn in_child(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run bench {args:?}"))?;
    if !out.status.success() {
        bail!("bench {args:?} failed ({})", out.status);
    }
    Ok(out.stdout)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// System calls per delivered event of one drain by `bin`, counted by `strace -c -f` (every
/// call of the process, start and store opening included).
fn syscalls_per_event(bin: &Path, config: &Path, out: &Path, events: usize) -> Result<f64> {
    let status = Command::new("strace")
        .args(["-c", "-f", "-o"])
        .arg(out)
        .arg(bin)
        .arg("--config")
        .arg(config)
        .args(["deliveries", "retry"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .env_remove("RUST_LOG")
        .status()
        .context("strace is not installed (apt-get install strace)")?;
    if !status.success() {
        bail!("strace {} failed ({status})", bin.display());
    }
    let text = std::fs::read_to_string(out)?;
    // The summary's last line: "100.00  <seconds>  <usecs/call>  <calls>  <errors>  total".
    let total = text
        .lines()
        .find(|l| l.trim_end().ends_with("total"))
        .and_then(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.get(3).and_then(|c| c.parse::<f64>().ok())
        })
        .with_context(|| format!("no total in the strace summary {}", out.display()))?;
    Ok(total / events as f64)
}

/// `n` distinct synthetic events like those of `synthetic_events` (not stored).
fn synthetic_event_list(n: usize) -> Result<Vec<policy_audit::event::AuditEvent>> {
    let change = bench_change()?;
    let linked = vec!["acme".to_string()];
    let spp = policy_audit::event::Spp {
        path: "acme/security-policies",
        id: None,
        branch: "main",
        policy_file: ".gitlab/security-policies/policy.yml",
        linked: &linked,
    };
    Ok((0..n).map(|i| bench_event(&change, spp, i, 1_700_000_000 + i as i64)).collect())
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
    wrk_post(work, url, body, &[("Content-Type", "application/json")], 1)
}

/// wrk's rate of successful requests for POSTing `body` with `headers` over `connections`
/// connections (2 threads when there are more than one) for 5 s; an answer that is not 2xx is
/// an error.
fn wrk_post(work: &Path, url: &str, body: &[u8], headers: &[(&str, &str)], connections: usize) -> Result<f64> {
    let body_path = work.join("body.bin");
    std::fs::write(&body_path, body)?;
    let mut lua = String::from("wrk.method = \"POST\"\n");
    for (name, value) in headers {
        lua.push_str(&format!("wrk.headers[\"{name}\"] = \"{value}\"\n"));
    }
    lua.push_str(&format!(
        "local f = io.open(\"{}\", \"rb\")\nwrk.body = f:read(\"*a\")\nf:close()\n",
        body_path.display()
    ));
    std::fs::write(work.join("post.lua"), lua)?;
    let threads = if connections > 1 { 2 } else { 1 };
    let out = Command::new("wrk")
        .args([format!("-t{threads}"), format!("-c{connections}"), "-d5s".into(), "-s".into()])
        .arg(work.join("post.lua"))
        .arg(url)
        .output()
        .context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        bail!("wrk got answers that are not 2xx from {url}: {text}");
    }
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("cannot read wrk output: {text}"))?;
    Ok(rate)
}
