//! History queries on a mirror: the first-parent steps to walk, each step's commit metadata,
//! and the policy file's blob at a commit.

use super::Mirror;
use anyhow::{Result, bail};
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
    /// Committer time, unix seconds: when the change landed on the branch. None when the
    /// commit's time is missing or absurd (see `committer_time`).
    pub committed_at: Option<i64>,
    /// The committer time as written, to report an unreadable one as such.
    pub committer_time: String,
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
            let entries = mirror.repo.objects.find_tree_iter(&tree, &mut self.buf).map_err(|e| unreadable(tree, e))?;
            let mut found = None;
            for entry in entries {
                let entry = entry.map_err(|e| unreadable(tree, e))?;
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
    /// The first-parent chain from `tip` back to (excluding) `since`, oldest first, reading only
    /// each commit's tree and first parent. None when `since` is not on the chain (it may still
    /// be an ancestor: a "foxtrot" merge made the old tip a second parent).
    pub fn first_parent_chain(&self, tip: ObjectId, since: Option<ObjectId>) -> Result<Option<Vec<Link>>> {
        let mut chain = Vec::new();
        let mut buf = Vec::new();
        let mut next = Some(tip);
        while let Some(id) = next {
            if Some(id) == since {
                chain.reverse();
                return Ok(Some(chain));
            }
            let mut iter = self.repo.objects.find_commit_iter(&id, &mut buf).map_err(|e| unreadable(id, e))?;
            let tree = iter.tree_id().map_err(|e| unreadable(id, e))?;
            next = iter.parent_ids().next();
            chain.push(Link { id, tree });
        }
        if since.is_some() {
            return Ok(None);
        }
        chain.reverse();
        Ok(Some(chain))
    }

    /// A step commit's metadata, read as leniently as git reads it (see `commit.rs`): an odd
    /// identity or time is data to show, not a reason to stop the project.
    pub fn commit(&self, id: ObjectId) -> Result<Commit> {
        let mut buf = Vec::new();
        let object = self.repo.objects.find(&id, &mut buf).map_err(|e| unreadable(id, e))?;
        if object.kind != gix::object::Kind::Commit {
            return Err(unreadable(id, format!("it is a {}, not a commit", object.kind)));
        }
        let raw = super::commit::parse(object.data);
        let tree = raw.tree.ok_or_else(|| unreadable(id, "the commit names no tree"))?;
        Ok(Commit {
            id,
            tree,
            first_parent: raw.first_parent,
            author_name: raw.author.name,
            author_email: raw.author.email,
            committed_at: raw.committer.seconds,
            committer_time: raw.committer.raw_time,
            message: raw.message,
        })
    }

    pub fn read_blob(&self, id: ObjectId) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let blob = self.repo.objects.find_blob(&id, &mut buf).map_err(|e| unreadable(id, e))?;
        Ok(blob.data.to_vec())
    }

    /// The blob's size without reading it, so oversized files are refused cheaply.
    pub fn blob_size(&self, id: ObjectId) -> Result<u64> {
        let header = self.repo.find_header(id).map_err(|e| unreadable(id, e))?;
        Ok(header.size())
    }
}

/// An object of the mirror could not be found or decoded: the one kind of failure that
/// re-cloning the mirror can cure.
#[derive(Debug, thiserror::Error)]
#[error("object {id} cannot be read from the mirror: {reason}")]
pub struct ObjectUnreadable {
    pub id: ObjectId,
    pub reason: String,
}

fn unreadable(id: ObjectId, reason: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(ObjectUnreadable { id, reason: format!("{reason:#}") })
}
