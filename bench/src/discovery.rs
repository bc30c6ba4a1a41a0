//! `bench discovery`: discovery from a scripted GitLab (`tests/support/fake_gitlab.py`, GraphQL
//! in GitLab's shapes, 100 nodes a page) of 2,000 groups and 10,000 projects (400 and 2,000
//! with --quick), 50 SPPs linked from 500 of them: GraphQL calls, wall time and peak RSS of
//! `policy-audit discover --json` (the walk and the merge, no store). Goal (issue 26):
//! ≤ 1 call per 100 namespaces, < 10 s.

use super::Bench;
use crate::measure::{Sample, median, mib, ms, run};
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

impl Bench {
    pub(super) fn discovery(&mut self) -> Result<()> {
        let (groups, projects) = if self.quick { (400, 2_000) } else { (2_000, 10_000) };
        let dir = self.work.join("discovery");
        std::fs::create_dir_all(&dir)?;
        let world_path = dir.join("world.json");
        let calls_path = dir.join("calls.log");
        std::fs::write(&world_path, world(groups, projects, "placeholder").to_string())?;
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/fake_gitlab.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&world_path)
            .arg(&calls_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("python3 is needed for the scripted GitLab")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let url = format!("http://127.0.0.1:{}", line.trim());
        std::fs::write(&world_path, world(groups, projects, &url).to_string())?;
        std::fs::write(dir.join("token"), TOKEN)?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"state\"\n[gitlab]\nurl = \"{url}\"\ntoken_file = \"token\"\ndiscover = [\"acme\"]\n"
            ),
        )?;
        let measured = (|| -> Result<(Sample, usize, Value)> {
            let _ = std::fs::remove_file(&calls_path);
            let sample =
                median(self.runs, || run(self.policy_audit(&config, &["discover", "--json"]).stdout(Stdio::null())))?;
            let calls = std::fs::read_to_string(&calls_path).unwrap_or_default().lines().count() / self.runs;
            let out = self.policy_audit(&config, &["discover", "--json"]).stdout(Stdio::piped()).output()?;
            let report: Value = serde_json::from_slice(&out.stdout).context("discover --json")?;
            Ok((sample, calls, report))
        })();
        let _ = child.kill();
        let _ = child.wait();
        let (sample, calls, report) = measured?;
        let namespaces = groups + projects;
        let spps = report["spps"].as_array().map_or(0, Vec::len);
        let links: usize =
            report["spps"].as_array().into_iter().flatten().map(|s| s["linked"].as_array().map_or(0, Vec::len)).sum();
        self.row(
            &format!("discovery of {groups} groups and {projects} projects ({spps} SPPs, {links} links found)"),
            format!("{:.2} s, {calls} GraphQL calls", ms(sample.wall) / 1000.0),
            "goal: < 10 s, ≤ 1 call per 100 namespaces".into(),
            format!("1 call per {:.0} namespaces", namespaces as f64 / calls.max(1) as f64),
            format!("{:.1} MiB", mib(sample.max_rss_kib)),
        );
        Ok(())
    }
}

const TOKEN: &str = "glpat-bench-discovery";

/// `acme` with `groups - 1` subgroups two levels deep, `projects` projects spread over them,
/// 50 SPPs under `acme/security`; every 10th subgroup and every 20th project linked.
fn world(groups: usize, projects: usize, url: &str) -> Value {
    let spp_of = |i: usize| format!("acme/security/spp{:02}", i % 50);
    let mut g =
        vec![json!({"path": "acme", "id": 1, "spp": null}), json!({"path": "acme/security", "id": 2, "spp": null})];
    let top = 40;
    let subgroups = groups.saturating_sub(2).max(top + 1);
    let group_path = |i: usize| if i < top { format!("acme/t{i:02}") } else { format!("acme/t{:02}/s{i}", i % top) };
    for i in 0..subgroups {
        let path = group_path(i);
        let spp = if i % 10 == 0 { json!(spp_of(i / 10)) } else { Value::Null };
        g.push(json!({"path": path, "id": 10 + i, "spp": spp}));
    }
    let mut p: Vec<Value> = (0..50)
        .map(|k| {
            json!({"path": format!("acme/security/spp{k:02}"), "id": 100_000 + k, "name": format!("SPP {k}"),
                   "http_url_to_repo": format!("{url}/acme/security/spp{k:02}.git"), "default_branch": "main", "spp": null})
        })
        .collect();
    for i in 0..projects.saturating_sub(50) {
        let group = group_path(i % subgroups);
        let spp = if i % 20 == 0 { json!(spp_of(i / 20)) } else { Value::Null };
        p.push(json!({"path": format!("{group}/p{i}"), "id": 200_000 + i, "spp": spp}));
    }
    json!({"token": TOKEN, "mode": "up", "groups": g, "projects": p})
}
