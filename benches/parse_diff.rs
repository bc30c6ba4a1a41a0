//! Micro-benchmarks for the pure core: `cargo bench --bench parse_diff`.
//! Inputs: every policy file of `../shared/corpus` when present, else the bundled sample.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use policy_audit::policy::{PolicySet, diff, parse};
use std::hint::black_box;
use std::path::Path;

fn inputs() -> Vec<(String, Vec<u8>)> {
    let mut files = vec![("sample approval_policy".to_string(), include_bytes!("data/approval_policy.yml").to_vec())];
    for dir in ["../shared/corpus/docs", "../shared/corpus/real"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut entries: Vec<_> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "yml")) {
            if let Ok(bytes) = std::fs::read(&p) {
                files.push((p.file_name().unwrap_or_default().to_string_lossy().into_owned(), bytes));
            }
        }
    }
    files
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (name, bytes) in inputs() {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(&name), &bytes, |b, bytes| {
            b.iter(|| parse(black_box(bytes)))
        });
    }
    group.finish();
}

fn bench_diff(c: &mut Criterion) {
    let mut group = c.benchmark_group("diff");
    let valid: Vec<(String, PolicySet)> =
        inputs().into_iter().filter_map(|(n, b)| parse(&b).ok().map(|s| (n, s))).collect();
    for (name, set) in &valid {
        // A created set (everything new) and an update of every policy (one field changed).
        group.bench_with_input(BenchmarkId::new("create", name), set, |b, set| {
            b.iter(|| diff(&PolicySet::default(), black_box(set)))
        });
        let mut changed = set.clone();
        for p in &mut changed.policies {
            p.content["description"] = serde_json::json!("changed");
        }
        group.bench_with_input(BenchmarkId::new("update", name), &changed, |b, changed| {
            b.iter(|| diff(black_box(set), black_box(changed)))
        });
    }
    group.finish();
}

/// 10,000 policies in one file (≈ 500 KB, under the default 1 MiB cap), all sharing one name
/// or all distinct: the diff when every policy changed, and when they were only reordered.
/// The figures are in docs/performance.md ("Many policies in one file").
fn bench_diff_many(c: &mut Criterion) {
    let mut group = c.benchmark_group("diff_many");
    group.sample_size(10);
    let file = |same_name: bool, version: u32, reversed: bool| {
        let mut order: Vec<usize> = (0..10_000).collect();
        if reversed {
            order.reverse();
        }
        let mut text = String::from("approval_policy:\n");
        for i in order {
            let name = if same_name { "Same".to_string() } else { format!("Policy {i}") };
            text.push_str(&format!("- {{name: '{name}', enabled: true, description: 'policy {i} v{version}'}}\n"));
        }
        parse(text.as_bytes()).unwrap_or_else(|e| panic!("bench input invalid: {e}"))
    };
    for (label, same_name) in [("same-named", true), ("distinct", false)] {
        let old = file(same_name, 1, false);
        let changed = file(same_name, 2, false);
        let reordered = file(same_name, 1, true);
        group.bench_function(BenchmarkId::new("all changed", label), |b| {
            b.iter(|| diff(black_box(&old), black_box(&changed)))
        });
        group.bench_function(BenchmarkId::new("reordered", label), |b| {
            b.iter(|| diff(black_box(&old), black_box(&reordered)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_parse, bench_diff, bench_diff_many);
criterion_main!(benches);
