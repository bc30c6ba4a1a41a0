//! `policy-audit discover`: what GitLab reports now (the SPPs, where each is linked, and how
//! each would be polled), without changing any state: no store is opened, nothing is stored.
//! Table or `--json`; exit 1 when GitLab cannot be read, 2 without `[gitlab] discover`.

use super::{EXIT_FAILED, Output};
use crate::config::Config;
use crate::discovery::{self, links, merge};
use serde_json::json;

pub fn run(config: &Config, json: bool) -> Output {
    let Some(gitlab) = config.gitlab.as_ref().filter(|g| !g.discover.is_empty()) else {
        return Output::unusable(format!(
            "{} has no [gitlab] discover list: add e.g. `discover = [\"acme\"]` to [gitlab]",
            config.source.display()
        ));
    };
    let started = std::time::Instant::now();
    let found = match discovery::read(gitlab, &crate::stop::Stop::new()) {
        Ok(f) => f,
        Err(why) => {
            let mut out = Output { code: EXIT_FAILED, ..Output::default() };
            out.err_line(format!("error: discovery from {} failed: {}", gitlab.url, crate::text::redact_urls(&why)));
            return out;
        }
    };
    let (calls, namespaces) = (found.calls, found.namespaces);
    let now = crate::event::rfc3339_millis(jiff::Timestamp::now());
    let (list, _) = links::next(None, found, &gitlab.discover, &now);
    let (merged, unusable) = merge::effective(config, Some(&list));
    let took_ms = started.elapsed().as_millis() as u64;
    let rows: Vec<serde_json::Value> = list
        .spps
        .values()
        .map(|spp| {
            let entry = merged.projects.iter().find(|p| p.path == spp.path || p.id == Some(spp.id));
            let links: Vec<serde_json::Value> = list
                .links
                .iter()
                .filter(|(_, l)| l.spp == spp.path)
                .map(|(ns, l)| json!({"namespace": ns, "type": l.kind.name(), "id": l.id}))
                .collect();
            json!({
                "path": spp.path,
                "id": spp.id,
                "name": spp.name,
                "url": spp.url,
                "default_branch": spp.branch,
                "linked": links,
                "polled_as": entry.map(|p| json!({"path": p.path, "source": p.source.name(), "branch": p.branch})),
                "not_polled": unusable.iter().find(|u| u.path == spp.path).map(|u| u.reason.clone()),
            })
        })
        .collect();
    let mut out = Output::default();
    if json {
        let report = json!({"roots": gitlab.discover, "calls": calls, "namespaces": namespaces, "took_ms": took_ms, "spps": rows});
        out.out_line(serde_json::to_string_pretty(&report).unwrap_or_default());
        return out;
    }
    out.out_line(format!(
        "{} SPP(s) linked from {} group(s)/project(s) under {} ({calls} GraphQL call(s), {took_ms} ms)",
        rows.len(),
        namespaces,
        gitlab.discover.join(", ")
    ));
    for r in &rows {
        let branch = r["default_branch"].as_str().unwrap_or("-");
        out.out_line(format!("{} (id {}, default branch {branch})", r["path"].as_str().unwrap_or(""), r["id"]));
        for l in r["linked"].as_array().into_iter().flatten() {
            out.out_line(format!(
                "  linked to {} {}",
                l["type"].as_str().unwrap_or(""),
                l["namespace"].as_str().unwrap_or("")
            ));
        }
        match (&r["polled_as"], r["not_polled"].as_str()) {
            (_, Some(why)) => out.out_line(format!("  not polled: {why}")),
            (p, None) if p["source"] == "config+discovery" => out.out_line(format!(
                "  polled as the [[projects]] entry {:?} (its settings win; the links are added)",
                p["path"].as_str().unwrap_or("")
            )),
            _ => out.out_line(format!("  polled from {}", r["url"].as_str().unwrap_or("-"))),
        }
    }
    out
}
