//! Records the git commit the binary is built from, for `--version`
//! (`POLICY_AUDIT_GIT_COMMIT`: `git rev-parse --short HEAD`, or "unknown" when the source is
//! not a git checkout of this crate, e.g. a release tarball, or git is missing).
//!
//! Cargo reruns this script when HEAD moves (a checkout changes `HEAD`, a commit changes the
//! branch's ref file or, for packed refs, `packed-refs`), so the commit is never stale.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = git_commit(&manifest_dir).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=POLICY_AUDIT_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=build.rs");
}

/// The short commit of HEAD, when `dir` is the top of a git work tree.
fn git_commit(dir: &Path) -> Option<String> {
    // A crate unpacked inside some other repository must not report that repository's commit.
    let top = git(dir, &["rev-parse", "--show-toplevel"])?;
    if std::fs::canonicalize(top).ok()? != std::fs::canonicalize(dir).ok()? {
        return None;
    }
    // In a worktree these are under the main repository's .git, hence --git-path.
    let path = |name: &str| git(dir, &["rev-parse", "--git-path", name]).map(|p| dir.join(p));
    // Only existing paths: cargo reruns the script on every build for a missing one.
    let mut watched: Vec<PathBuf> =
        ["HEAD", "packed-refs"].into_iter().filter_map(path).filter(|p| p.exists()).collect();
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]).and_then(|b| path(&b)) {
        // A packed branch ref gets a loose file at its next commit: watch its folder until then.
        let folder = branch.parent().map(Path::to_path_buf);
        watched.extend(if branch.exists() { Some(branch) } else { folder.filter(|f| f.exists()) });
    }
    for path in watched {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    git(dir, &["rev-parse", "--short", "HEAD"])
}

/// git's trimmed stdout, or None when git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").current_dir(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}
