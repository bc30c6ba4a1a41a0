//! History queries on a mirror: the first-parent steps to walk, each step's commit metadata,
//! and the policy file's blob at a commit.

use super::Mirror;
use anyhow::{Context, Result, bail};
use gix::ObjectId;
use gix::prelude::FindExt;

/// The metadata of a step commit that events need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub id: ObjectId,
    pub tree: ObjectId,
    pub first_parent: Option<ObjectId>,
    pub author_name: String,
    pub author_email: String,
    /// Committer time, unix seconds: when the change landed on the branch.
    pub committed_at: i64,
    pub message: String,
}

/// A commit on the first-parent chain, as much as deciding whether it is a step needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub id: ObjectId,
    pub tree: ObjectId,
}

/// What sits at the policy file's path in one commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyBlob {
    Missing,
    File(ObjectId),
    /// A directory, symlink or submodule where the file should be.
    NotAFile(&'static str, ObjectId),
}

/// Resolves a repository path in commit after commit, skipping the lookup when a tree on the
/// way is unchanged since the previous call (most commits do not touch `.gitlab/`).
pub struct PolicyPath {
    components: Vec<Vec<u8>>,
    /// Tree ids seen on the way at the previous lookup (root first) and the answer.
    last: Option<(Vec<ObjectId>, PolicyBlob)>,
    buf: Vec<u8>,
}

impl PolicyPath {
    pub fn new(path: &str) -> PolicyPath {
        PolicyPath { components: path.split('/').map(|c| c.as_bytes().to_vec()).collect(), last: None, buf: Vec::new() }
    }

    pub fn lookup(&mut self, mirror: &Mirror, root_tree: ObjectId) -> Result<PolicyBlob> {
        let mut trees = Vec::with_capacity(self.components.len());
        let mut tree = root_tree;
        for (depth, name) in self.components.iter().enumerate() {
            if let Some((prev, answer)) = &self.last
                && prev.get(depth) == Some(&tree)
            {
                let answer = *answer;
                trees.extend_from_slice(&prev[depth..]);
                self.last = Some((trees, answer));
                return Ok(answer);
            }
            trees.push(tree);
            let entries = mirror
                .repo
                .objects
                .find_tree_iter(&tree, &mut self.buf)
                .with_context(|| format!("cannot read tree {tree}"))?;
            let mut found = None;
            for entry in entries {
                let entry = entry.with_context(|| format!("corrupt tree {tree}"))?;
                if entry.filename == name.as_slice() {
                    found = Some((entry.mode, entry.oid.to_owned()));
                    break;
                }
            }
            let last_component = depth + 1 == self.components.len();
            let answer = match found {
                None => PolicyBlob::Missing,
                Some((mode, oid)) if last_component => {
                    if mode.is_blob() {
                        PolicyBlob::File(oid)
                    } else if mode.is_tree() {
                        PolicyBlob::NotAFile("a directory", oid)
                    } else if mode.is_link() {
                        PolicyBlob::NotAFile("a symbolic link", oid)
                    } else {
                        PolicyBlob::NotAFile("a submodule", oid)
                    }
                }
                Some((mode, oid)) if mode.is_tree() => {
                    tree = oid;
                    continue;
                }
                Some(_) => PolicyBlob::Missing,
            };
            self.last = Some((trees, answer));
            return Ok(answer);
        }
        bail!("empty policy file path")
    }
}

impl Mirror {
    /// First-parent commits from `tip` back to (excluding) `since`, oldest first; the whole
    /// first-parent history when `since` is None.
    pub fn first_parent_steps(&self, tip: ObjectId, since: Option<ObjectId>) -> Result<Vec<ObjectId>> {
        let walk = self.repo.rev_walk([tip]).first_parent_only();
        let walk = match since {
            Some(s) => walk.with_hidden([s]),
            None => walk,
        };
        let mut ids = Vec::new();
        for info in walk.all().context("cannot start history walk")? {
            ids.push(info.context("history walk failed")?.id);
        }
        ids.reverse();
        Ok(ids)
    }

    /// The first-parent chain from `tip` back to (excluding) `since`, oldest first, reading only
    /// each commit's tree and first parent. None when `since` is not on the chain (it may still
    /// be an ancestor: a merge made the old tip a second parent); see [`Mirror::first_parent_steps`].
    pub fn first_parent_chain(&self, tip: ObjectId, since: Option<ObjectId>) -> Result<Option<Vec<Link>>> {
        let mut chain = Vec::new();
        let mut buf = Vec::new();
        let mut next = Some(tip);
        while let Some(id) = next {
            if Some(id) == since {
                chain.reverse();
                return Ok(Some(chain));
            }
            let mut iter = self
                .repo
                .objects
                .find_commit_iter(&id, &mut buf)
                .with_context(|| format!("cannot read commit {id}"))?;
            let tree = iter.tree_id().with_context(|| format!("commit {id} has no tree"))?;
            next = iter.parent_ids().next();
            chain.push(Link { id, tree });
        }
        if since.is_some() {
            return Ok(None);
        }
        chain.reverse();
        Ok(Some(chain))
    }

    /// Links for commits found another way (by [`Mirror::first_parent_steps`]).
    pub fn links(&self, ids: &[ObjectId]) -> Result<Vec<Link>> {
        let mut buf = Vec::new();
        ids.iter()
            .map(|&id| {
                let mut iter = self
                    .repo
                    .objects
                    .find_commit_iter(&id, &mut buf)
                    .with_context(|| format!("cannot read commit {id}"))?;
                Ok(Link { id, tree: iter.tree_id().with_context(|| format!("commit {id} has no tree"))? })
            })
            .collect()
    }

    pub fn commit(&self, id: ObjectId) -> Result<Commit> {
        let commit = self.repo.find_commit(id).with_context(|| format!("cannot read commit {id}"))?;
        let decoded = commit.decode().with_context(|| format!("cannot decode commit {id}"))?;
        let author = decoded.author().with_context(|| format!("commit {id} has a malformed author"))?;
        let committer = decoded.committer().with_context(|| format!("commit {id} has a malformed committer"))?;
        Ok(Commit {
            id,
            tree: decoded.tree(),
            first_parent: decoded.parents().next(),
            author_name: author.name.to_string().trim().to_string(),
            author_email: author.email.to_string().trim().to_string(),
            committed_at: committer.seconds(),
            message: decoded.message.to_string(),
        })
    }

    pub fn read_blob(&self, id: ObjectId) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let blob = self.repo.objects.find_blob(&id, &mut buf).with_context(|| format!("cannot read blob {id}"))?;
        Ok(blob.data.to_vec())
    }

    /// The blob's size without reading it, so oversized files are refused cheaply.
    pub fn blob_size(&self, id: ObjectId) -> Result<u64> {
        let header = self.repo.find_header(id).with_context(|| format!("cannot read object {id}"))?;
        Ok(header.size())
    }
}
