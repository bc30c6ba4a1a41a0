//! `bench growth`: how each main figure grows with the work, at 1×, 10× and 100× (`--quick`:
//! 1× and 10×), printed as one table: time, cost per unit of work, how that cost moved from
//! the 1× row, and peak RSS. Each row reuses the function of the main figure, given a size.

use super::{Bench, Nginx, Sample, fmt_ms, free_port, mib, ms};
use anyhow::Result;

/// Cost per unit of the 1× row of a figure, to compare the larger rows with.
struct PerUnit(Option<f64>);

impl PerUnit {
    /// `per` next to the first value seen ("1.00" for the first).
    fn versus_first(&mut self, per: f64) -> String {
        let first = *self.0.get_or_insert(per);
        if first > 0.0 { format!("{:.2}", per / first) } else { "-".into() }
    }
}

fn rss(s: Sample) -> String {
    format!("{:.1} MiB", mib(s.max_rss_kib))
}

impl Bench {
    pub(super) fn growth(&mut self) -> Result<()> {
        let scales: &[usize] = if self.quick { &[1, 10] } else { &[1, 10, 100] };

        let mut first = PerUnit(None);
        for &k in scales {
            let commits = 200 * k;
            let b = self.backfill_run(commits)?;
            let per = ms(b.ours.wall) * 1000.0 / commits as f64;
            let row = [
                "backfill (first sync, 1 policy change in 10 commits)".into(),
                format!("{commits} commits"),
                fmt_ms(b.ours),
                format!("{per:.0} µs/commit"),
                first.versus_first(per),
                format!("{:.1} MiB ({} with git's pack-objects)", mib(b.own_rss_kib), rss(b.ours)),
                format!(
                    "{} git clone --mirror + git log ({:.2}x)",
                    fmt_ms(b.git),
                    ms(b.ours.wall) / ms(b.git.wall).max(f64::MIN_POSITIVE)
                ),
            ];
            self.growth_row(row);
            let _ = std::fs::remove_dir_all(&b.state);
            let _ = std::fs::remove_dir_all(&b.mirror);
        }

        let mut first = PerUnit(None);
        for &k in scales {
            let n = 10 * k;
            let f = self.fleet_run(n, false, false)?;
            let per = ms(f.idle.wall) / n as f64;
            let row = [
                "idle fleet (local paths, nothing new)".into(),
                format!("{n} projects"),
                fmt_ms(f.idle),
                format!("{per:.2} ms/project"),
                first.versus_first(per),
                rss(f.idle),
                format!(
                    "{} git fetch loop ({:.1}x faster)",
                    fmt_ms(f.fetch_loop),
                    ms(f.fetch_loop.wall) / ms(f.idle.wall)
                ),
            ];
            self.growth_row(row);
        }

        let port = free_port()?;
        let nginx = Nginx::start(&self.work, port)?;
        let url = format!("http://127.0.0.1:{port}/audit");
        let mut first = PerUnit(None);
        for &k in scales {
            let events = 200 * k;
            let (ours, _) = self.delivery_run(events, &url)?;
            let per = ms(ours.wall) * 1000.0 / events as f64;
            let row = [
                "delivery (outbox drained to nginx, signed)".into(),
                format!("{events} events"),
                fmt_ms(ours),
                format!("{per:.0} µs/event ({:.0}/s)", events as f64 / ours.wall.as_secs_f64()),
                first.versus_first(per),
                rss(ours),
                "-".into(),
            ];
            self.growth_row(row);
        }
        drop(nginx);

        let (mut first_size, mut first_list) = (PerUnit(None), PerUnit(None));
        for &k in scales {
            let events = 10_000 * k;
            let name = format!("gr-{events}");
            let (config, bytes) = self.fill_store(&name, events)?;
            let per = bytes as f64 / events as f64;
            let row = [
                "store size".into(),
                format!("{events} events"),
                format!("{:.1} MB", bytes as f64 / 1e6),
                format!("{per:.0} bytes/event"),
                first_size.versus_first(per),
                "-".into(),
                "-".into(),
            ];
            self.growth_row(row);
            let listing =
                super::median(self.runs, || super::listing(&self.bin, &config, &["events", "--format", "jsonl"]))?;
            let per = ms(listing.wall) * 1000.0 / events as f64;
            let row = [
                "events --format jsonl".into(),
                format!("{events} events"),
                fmt_ms(listing),
                format!("{per:.1} µs/event"),
                first_list.versus_first(per),
                rss(listing),
                "-".into(),
            ];
            self.growth_row(row);
            let _ = std::fs::remove_dir_all(self.work.join(format!("{name}-state")));
        }
        Ok(())
    }

    fn growth_row(&mut self, row: [String; 7]) {
        eprintln!("  {}", row.join(" | "));
        self.growth.push(row);
    }
}
