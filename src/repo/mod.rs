//! Git access with gix: one bare mirror per project under the state directory, fetched from the
//! configured URL, and read-only history queries on it.
//!
//! Invariants:
//! - only the tracked branch is fetched, into `refs/remotes/origin/<branch>`; the walk starts
//!   there, never at HEAD;
//! - the URL and credentials are passed at fetch time and never written into the mirror's
//!   config, so a token cannot leak through the state directory;
//! - every fetch has a deadline: a stalled server fails the fetch, it does not hang the run.

mod commit;
mod fetch;
mod history;
mod probe;

pub use fetch::{FetchOutcome, fetch, fetch_refs, redact_url, tracking_name};

/// The tip of `branch` in a repository on this machine (a local path or `file://` URL), read
/// directly; None for remote URLs or when it cannot be read (the fetch then decides).
pub fn local_tip(url: &str, branch: &str) -> Option<ObjectId> {
    let path = crate::urls::local_path(url)?;
    let repo = gix::open_opts(path, gix::open::Options::isolated()).ok()?;
    let mut reference = repo.try_find_reference(format!("refs/heads/{branch}").as_str()).ok()??;
    reference.peel_to_id().ok().map(|id| id.detach())
}
pub use history::{Commit, Link, ObjectUnreadable, PolicyBlob, PolicyPath};
pub use probe::ls_refs_request;

use anyhow::{Context, Result};
use gix::ObjectId;
use std::path::{Path, PathBuf};

/// A bare mirror of one project's tracked branch.
pub struct Mirror {
    repo: gix::Repository,
    branch: String,
    dir: PathBuf,
}

impl Mirror {
    /// Opens the mirror at `dir`, creating an empty bare repository there first if needed.
    /// Lock files left by a process that was killed mid-fetch are removed first: the state
    /// directory admits one process, so a lock no fetch of ours holds is stale.
    pub fn open_or_init(dir: &Path, branch: &str) -> Result<Mirror> {
        if fetch::in_flight(dir) {
            anyhow::bail!(
                "a previous fetch into {} is still running (it passed its deadline); it is retried at the next run",
                dir.display()
            );
        }
        remove_stale_locks(dir);
        let repo = if dir.join("HEAD").exists() {
            gix::open(dir).with_context(|| format!("cannot open mirror {}", dir.display()))?
        } else {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create mirror directory {}", dir.display()))?;
            gix::init_bare(dir).with_context(|| format!("cannot create mirror {}", dir.display()))?
        };
        Ok(Mirror::from_repo(repo, branch, dir))
    }

    fn from_repo(mut repo: gix::Repository, branch: &str, dir: &Path) -> Mirror {
        // Measured: a small object cache and no pack cache make long first-parent walks ~1.5x faster.
        repo.object_cache_size(1024 * 1024);
        repo.objects.unset_pack_cache();
        Mirror { repo, branch: branch.to_string(), dir: dir.to_path_buf() }
    }

    pub fn tracking_ref(&self) -> String {
        format!("refs/remotes/origin/{}", self.branch)
    }

    /// The commit `id` names, annotated tags peeled (an included file's ref may be a tag).
    pub fn peel_to_commit(&self, id: ObjectId) -> Result<ObjectId> {
        let object = self.repo.find_object(id).with_context(|| format!("cannot read object {id}"))?;
        let peeled = object.peel_tags_to_end().with_context(|| format!("cannot peel tag {id}"))?;
        if peeled.kind != gix::object::Kind::Commit {
            anyhow::bail!("{id} names a {}, not a commit", peeled.kind);
        }
        Ok(peeled.id)
    }

    /// The fetched tip of the tracked branch, or None when the remote has no such branch.
    pub fn tip(&self) -> Result<Option<ObjectId>> {
        let name = self.tracking_ref();
        match self.repo.try_find_reference(name.as_str()).with_context(|| format!("cannot read {name}"))? {
            None => Ok(None),
            Some(mut r) => {
                let id = r.peel_to_id().with_context(|| format!("cannot resolve {name}"))?;
                Ok(Some(id.detach()))
            }
        }
    }

    /// Whether the tracking ref (if any) points at a commit the mirror actually has.
    pub fn is_sound(&self) -> bool {
        match self.tip() {
            Ok(None) => true,
            Ok(Some(tip)) => self.has_commit(tip),
            Err(_) => false,
        }
    }

    pub fn has_commit(&self, id: ObjectId) -> bool {
        self.repo.find_commit(id).is_ok()
    }
}

/// Removes `*.lock` files under `refs/` and at the top of a bare repository.
fn remove_stale_locks(dir: &Path) {
    fn walk(dir: &Path) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path);
            } else if path.extension().is_some_and(|e| e == "lock") {
                tracing::warn!(file = %path.display(), "removing a stale lock file left by an interrupted fetch");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    walk(&dir.join("refs"));
    for name in ["packed-refs.lock", "config.lock", "HEAD.lock", "shallow.lock", "FETCH_HEAD.lock", "index.lock"] {
        let path = dir.join(name);
        if path.exists() {
            tracing::warn!(file = %path.display(), "removing a stale lock file left by an interrupted fetch");
            let _ = std::fs::remove_file(&path);
        }
    }
}
