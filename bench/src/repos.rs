//! Repositories for the benchmarks, built with `git fast-import` (seconds for 20,000 commits).

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

pub const POLICY: &str = ".gitlab/security-policies/policy.yml";

pub fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args(args)
        .output()
        .with_context(|| format!("cannot run git {args:?}"))?;
    if !out.status.success() {
        bail!("git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A policy file of `n` approval policies at revision `rev`: one policy differs from revision
/// to revision (a realistic 2-4 KiB file).
pub fn policy_file(n: usize, rev: usize) -> String {
    let mut text = String::from("approval_policy:\n");
    for k in 0..n {
        text.push_str(&format!(
            "- name: Policy {k}\n  description: Revision {}\n  enabled: {}\n  rules:\n  - type: scan_finding\n    branches: [main]\n    scanners: [sast, dependency_scanning]\n    vulnerabilities_allowed: {}\n    severity_levels: [critical, high]\n    vulnerability_states: [new_needs_triage]\n  actions:\n  - type: require_approval\n    approvals_required: 1\n    role_approvers: [maintainer]\n",
            if k == rev % n { rev } else { 0 },
            k < 5,
            if k == rev % n { rev % 3 } else { 0 }
        ));
    }
    text
}

/// `commits` first-parent commits on `main`; every `every`-th rewrites the policy file, the
/// others add ~`filler` bytes of incompressible text to a source file (so the pack is realistic).
pub fn long_history(dir: &Path, commits: usize, every: usize, filler: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    git(dir, &["init", "-q", "-b", "main"])?;
    let mut child = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot run git fast-import")?;
    let mut stdin = child.stdin.take().context("fast-import stdin")?;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rng = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..commits {
        let when = 1_600_000_000 + i as i64 * 600;
        let author = ["Alice <alice@example.com>", "Bob <bob@example.com>", "Carol <carol@example.com>"][i % 3];
        let msg = format!("commit {i}");
        let mut block = format!(
            "commit refs/heads/main\nmark :{}\nauthor {author} {when} +0000\ncommitter {author} {when} +0000\ndata {}\n{msg}\n",
            i + 1,
            msg.len()
        );
        if i > 0 {
            block.push_str(&format!("from :{i}\n"));
        }
        let (path, content) = if i % every == 0 {
            (POLICY.to_string(), policy_file(8, i / every))
        } else {
            let text: String = (0..filler / 16).map(|_| format!("{:016x}", rng())).collect();
            (format!("src/module{}.txt", i % 50), text)
        };
        block.push_str(&format!("M 100644 inline {path}\ndata {}\n{content}\n", content.len()));
        stdin.write_all(block.as_bytes())?;
    }
    drop(stdin);
    if !child.wait()?.success() {
        bail!("git fast-import failed");
    }
    git(dir, &["repack", "-adq"])?;
    git(dir, &["reset", "-q", "--hard"])?; // fast-import leaves no work tree
    Ok(())
}
