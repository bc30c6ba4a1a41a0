//! The policy file of each step: read from the mirror (never past `max_policy_file_bytes`),
//! parsed and validated (`policy::parse_with`), cached by blob id (a reverted file is not parsed
//! twice) and parsed ahead on all cores, window by window, so the walk finds them ready.
//!
//! A failed read of the mirror is an error of the walk, never an invalid file.

use super::walk::Walker;
use crate::policy::{self, InvalidPolicyFile, PolicySet};
use crate::repo::PolicyBlob;
use anyhow::Result;
use gix::ObjectId;

/// Parsed files kept by blob id.
pub(super) const PARSE_CACHE_ENTRIES: usize = 64;
/// Steps whose files are parsed ahead at once.
pub(super) const PARSE_WINDOW: usize = 64;

/// The cursor's name for a step's file: its blob id, "" when missing, kind:id when not a file.
pub(super) fn blob_key(blob: &PolicyBlob) -> String {
    match blob {
        PolicyBlob::Missing => String::new(),
        PolicyBlob::File(id) => id.to_string(),
        PolicyBlob::NotAFile(kind, id) => format!("{kind}:{id}"),
    }
}

impl Walker<'_> {
    /// The policy set in a blob, or why it is invalid (missing, not a file, too big, bad YAML).
    /// The outer error is a failed read of the mirror: never reported as an invalid file.
    pub(super) fn load(&mut self, blob: &PolicyBlob) -> Result<Result<PolicySet, InvalidPolicyFile>> {
        let file = &self.project.policy_file;
        let id = match blob {
            PolicyBlob::Missing => return Ok(Err(InvalidPolicyFile::new(format!("{file} does not exist")))),
            PolicyBlob::NotAFile(kind, _) => {
                return Ok(Err(InvalidPolicyFile::new(format!("{file} is {kind}, not a file"))));
            }
            PolicyBlob::File(id) => *id,
        };
        if let Some(cached) = self.parsed.get(&id) {
            return Ok(cached.clone());
        }
        let result = match self.ahead.remove(&id) {
            Some(parsed) => parsed,
            None => match self.read(id)? {
                Ok(bytes) => policy::parse_with(&bytes, &self.config.policy_schema),
                Err(too_big) => Err(InvalidPolicyFile::new(too_big)),
            },
        };
        if self.parsed.len() >= PARSE_CACHE_ENTRIES {
            self.parsed.clear();
        }
        self.parsed.insert(id, result.clone());
        Ok(result)
    }

    /// A blob's bytes, or why it is not read (over `max_policy_file_bytes`).
    fn read(&self, id: ObjectId) -> Result<Result<Vec<u8>, String>> {
        let file = &self.project.policy_file;
        let max = self.config.max_policy_file_bytes;
        let size = self.mirror.blob_size(id)?;
        if size > max {
            return Ok(Err(format!("{file} is {size} bytes, over the limit of {max} bytes (max_policy_file_bytes)")));
        }
        Ok(Ok(self.mirror.read_blob(id)?))
    }

    /// Parses the files of the coming steps on all cores (they are independent; parsing is
    /// most of a long walk's time), so `load` finds them ready.
    pub(super) fn parse_ahead<'b>(&mut self, blobs: impl Iterator<Item = &'b PolicyBlob>) -> Result<()> {
        self.ahead.clear();
        let mut todo: Vec<(ObjectId, Vec<u8>)> = Vec::new();
        for blob in blobs {
            let PolicyBlob::File(id) = blob else { continue };
            if self.parsed.contains_key(id) || self.ahead.contains_key(id) || todo.iter().any(|(t, _)| t == id) {
                continue;
            }
            match self.read(*id)? {
                Ok(bytes) => todo.push((*id, bytes)),
                Err(too_big) => {
                    self.ahead.insert(*id, Err(InvalidPolicyFile::new(too_big)));
                }
            }
        }
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 8);
        let per_worker = todo.len().div_ceil(workers).max(1);
        let schema = &self.config.policy_schema;
        let parsed: Vec<(ObjectId, Result<PolicySet, InvalidPolicyFile>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = todo
                .chunks(per_worker)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk.iter().map(|(id, bytes)| (*id, policy::parse_with(bytes, schema))).collect::<Vec<_>>()
                    })
                })
                .collect();
            // A worker that panicked leaves its files to `load`, which parses them itself.
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        self.ahead.extend(parsed);
        Ok(())
    }
}
