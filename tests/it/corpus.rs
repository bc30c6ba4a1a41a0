//! Every real and documented `policy.yml` in `../shared/corpus` (when that folder exists; a
//! clone of this repository alone skips it) gets GitLab's verdict: current documented policy
//! files parse; bare lists, fragments, pre-17.0 examples and the real files that a current
//! GitLab refuses are reported invalid with the path of each error.

use policy_audit::policy::parse;
use std::path::{Path, PathBuf};

/// The corpus folder, or None (said on the terminal) when this clone has none beside it. Under
/// CI (`CI` set) a missing corpus is a failure: CI always runs with the shared folder.
fn corpus() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: CI runs with the shared folder beside the checkout",
        dir.display()
    );
    // Written past the test harness's capture, so that the skip shows in a plain `cargo test`.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "corpus tests skipped: {} is missing", dir.display());
    None
}

fn yml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("corpus dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    files
}

fn name(p: &Path) -> String {
    p.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// Documents GitLab refuses: bare lists of policies (no policy-type key), the GitLab 13.10-era
/// example whose unquoted cron is not YAML, and the pre-17.0 examples with the retired
/// vulnerability state `newly_detected`.
const INVALID_DOCS: &[(&str, &str)] = &[
    ("_index__02.yml", "top level must be a mapping"),
    ("index__02.yml", "not valid YAML: while parsing node, found unknown anchor"),
    ("scan-execution-policies__01.yml", "top level must be a mapping"),
    (
        "scan-result-policies__01.yml",
        "scan_result_policy[0].rules[0].vulnerability_states[0]: \"newly_detected\" is not one of",
    ),
    ("scan-result-policies__02.yml", "top level must be a mapping"),
    (
        "scan-result-policies__03.yml",
        "scan_result_policy[0].rules[0].vulnerability_states[0]: \"newly_detected\" is not one of",
    ),
    ("scan_execution_policies__01.yml", "top level must be a mapping"),
    ("scan_execution_policies__04.yml", "top level must be a mapping"),
    ("scan_execution_policies__05.yml", "top level must be a mapping"),
    ("scan_execution_policies__06.yml", "top level must be a mapping"),
];

#[test]
fn documented_policy_files_get_gitlabs_verdict() {
    let Some(dir) = corpus() else { return };
    let files = yml_files(&dir.join("docs"));
    assert!(files.len() >= 30, "corpus docs/ looks incomplete: {} files", files.len());
    for file in files {
        let n = name(&file);
        let result = parse(&std::fs::read(&file).expect("read"));
        match INVALID_DOCS.iter().find(|(f, _)| *f == n) {
            Some((_, fragment)) => {
                let err = result.expect_err(&format!("{n} should be invalid"));
                assert!(err.errors.iter().any(|e| e.contains(fragment)), "{n}: unexpected errors {:?}", err.errors);
            }
            None => {
                let set = result.unwrap_or_else(|e| panic!("{n} should parse: {e}"));
                assert!(!set.is_empty(), "{n}: no policies read");
            }
        }
    }
}

#[test]
fn fragments_are_not_policy_files() {
    let Some(dir) = corpus() else { return };
    for file in yml_files(&dir.join("docs/fragments")) {
        let err = parse(&std::fs::read(&file).expect("read")).expect_err(&format!("{} is a fragment", name(&file)));
        assert!(err.errors.iter().any(|e| e.starts_with("(top level): ")), "{}: {:?}", name(&file), err.errors);
    }
}

#[test]
fn real_files() {
    let Some(dir) = corpus() else { return };
    let real = dir.join("real");
    // The pre-17.0 key `match_on_inclusion` was retired: a current GitLab refuses the file.
    let legacy = parse(&std::fs::read(real.join("24HeuresINSA__Overbookd.yml")).expect("read"))
        .expect_err("retired match_on_inclusion");
    assert!(
        legacy.errors.contains(
            &"scan_result_policy[0].rules[0]: Additional properties are not allowed ('match_on_inclusion' was unexpected)"
                .to_string()
        ),
        "{:?}",
        legacy.errors
    );

    let err = parse(&std::fs::read(real.join("jrevillard__genie-ai-replica.yml")).expect("read"))
        .expect_err("rules without branches");
    for want in [
        "approval_policy[0].rules[0]: Additional properties are not allowed ('number_of_changes_required' was unexpected)",
        "approval_policy[0].rules[0]: the mapping is not valid under any of the schemas listed in the 'oneOf' keyword",
        "approval_policy[1].rules[0]: the mapping is not valid under any of the schemas listed in the 'oneOf' keyword",
    ] {
        assert!(err.errors.iter().any(|e| e == want), "{want}: {:?}", err.errors);
    }

    let err = parse(&std::fs::read(real.join("arif-900__Snap-Waste-Management-.yml")).expect("read"))
        .expect_err("not a policy file");
    assert!(err.reason.contains("(top level): Additional properties are not allowed ('description', 'enabled', 'name', 'rules' were unexpected)"), "{}", err.reason);
}

#[test]
fn the_duplicate_name_example_keeps_both_policies() {
    let Some(dir) = corpus() else { return };
    let set =
        parse(&std::fs::read(dir.join("docs/merge_request_approval_policies__05.yml")).expect("read")).expect("parses");
    let dupes = set.policies.iter().filter(|p| p.name == "critical vulnerability CS approvals").count();
    assert_eq!(dupes, 2);
}
