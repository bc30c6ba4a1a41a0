//! Running commands and measuring them: wall time and peak RSS (from `wait4`), medians.

use anyhow::{Context, Result, bail};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub wall: Duration,
    /// Peak resident set size of the process (and, for a shell, its largest child), KiB.
    pub max_rss_kib: u64,
}

/// Runs `cmd` to completion; fails when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Sample> {
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child, not yet reaped; status and usage are valid for writes.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed();
    std::mem::forget(child); // already reaped by wait4
    if waited != pid {
        bail!("wait4 failed for {cmd:?}");
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{cmd:?} failed (status {status})");
    }
    Ok(Sample { wall, max_rss_kib: usage.ru_maxrss as u64 })
}

/// The median wall time and the largest peak RSS over `runs` runs of what `once` measures.
pub fn median(runs: usize, mut once: impl FnMut() -> Result<Sample>) -> Result<Sample> {
    let mut samples: Vec<Sample> = (0..runs).map(|_| once()).collect::<Result<_>>()?;
    samples.sort_by_key(|s| s.wall);
    let rss = samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0);
    Ok(Sample { wall: samples[samples.len() / 2].wall, max_rss_kib: rss })
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Total size of the files under `dir`, bytes.
pub fn du(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            total += du(&p);
        } else if let Ok(m) = p.metadata() {
            total += m.len();
        }
    }
    total
}

/// The median wall time and the largest peak RSS of `samples` (not empty).
pub fn median_of(mut samples: Vec<Sample>) -> Sample {
    samples.sort_by_key(|s| s.wall);
    let rss = samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0);
    samples
        .get(samples.len() / 2)
        .map_or(Sample { wall: Duration::ZERO, max_rss_kib: rss }, |s| Sample { wall: s.wall, max_rss_kib: rss })
}
