//! The policy file of each step: read from the mirror (never past `max_policy_file_bytes`),
//! parsed and validated (`policy::parse_with`), cached by blob id (a reverted file is not parsed
//! twice) and parsed ahead on other threads while the walk goes on, so it finds them ready.
//!
//! A failed read of the mirror is an error of the walk, never an invalid file.

use super::walk::Walker;
use crate::policy::{self, InvalidPolicyFile, PolicySchema, PolicySet};
use crate::repo::PolicyBlob;
use anyhow::Result;
use gix::ObjectId;
use std::collections::{HashMap, HashSet};
use std::sync::mpsc;

/// Parsed files kept by blob id.
pub(super) const PARSE_CACHE_ENTRIES: usize = 64;
/// Files handed to the parsing threads and not yet taken by the walk, at most.
pub(super) const PARSE_AHEAD: usize = 64;
/// Steps found and not yet walked, at most (a long run of reverted files hands nothing over).
pub(super) const STEPS_AHEAD: usize = 4096;

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
        // While the walk hands files over, it knows which coming steps want this file again:
        // only those are kept (copying a parsed file is a good part of the cost of a step).
        let again = self.ahead.taken(&id);
        let cached = match again {
            Some(false) => self.parsed.remove(&id),
            _ => self.parsed.get(&id).cloned(),
        };
        if let Some(cached) = cached {
            return Ok(cached);
        }
        let result = match self.ahead.take(&id) {
            Some(parsed) => parsed,
            None => match self.read(id)? {
                Ok(bytes) => policy::parse_with(&bytes, &self.config.policy_schema),
                Err(too_big) => Err(InvalidPolicyFile::new(too_big)),
            },
        };
        if again != Some(false) {
            if self.parsed.len() >= PARSE_CACHE_ENTRIES {
                self.parsed.clear();
            }
            self.parsed.insert(id, result.clone());
        }
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

    /// Hands the coming step's file to the parsing threads, when there are some and the file
    /// is not known already; files over the size limit are settled here.
    pub(super) fn hand_over(&mut self, blob: &PolicyBlob) -> Result<()> {
        let PolicyBlob::File(id) = blob else { return Ok(()) };
        if self.ahead.jobs.is_none() {
            return Ok(());
        }
        *self.ahead.coming.entry(*id).or_default() += 1;
        if self.parsed.contains_key(id) || self.ahead.knows(id) {
            return Ok(());
        }
        match self.read(*id)? {
            Ok(bytes) => self.ahead.send(*id, bytes),
            Err(too_big) => {
                self.ahead.ready.insert(*id, Err(InvalidPolicyFile::new(too_big)));
            }
        }
        Ok(())
    }
}

/// A parsed file, or why it is invalid.
type Parsed = Result<PolicySet, InvalidPolicyFile>;

/// What the parsing threads are given.
enum Job {
    Parse(ObjectId, Vec<u8>),
    /// A parsed file the walk is done with: freed where it was made, which is cheaper.
    Free(PolicySet),
}

/// Files parsed on other threads while the walk goes on: the walk reads each coming step's
/// file from the mirror and hands it over ([`Walker::hand_over`]); `load` takes the result,
/// waiting for it if need be. At most [`PARSE_AHEAD`] files are handed over and not yet taken.
#[derive(Default)]
pub(super) struct Ahead {
    jobs: Option<mpsc::Sender<Job>>,
    done: Option<mpsc::Receiver<(ObjectId, Option<Parsed>)>>,
    /// Handed over, no answer yet.
    pending: HashSet<ObjectId>,
    /// Answered, not yet taken.
    ready: HashMap<ObjectId, Parsed>,
    /// How many of the steps handed over and not yet walked have each file.
    coming: HashMap<ObjectId, usize>,
}

impl Ahead {
    /// Runs `walk` with `workers` threads parsing what it hands over; they end with it, also
    /// when it fails or panics.
    pub(super) fn run<'a, T>(
        walker: &mut Walker<'a>,
        workers: usize,
        walk: impl FnOnce(&mut Walker<'a>) -> Result<T>,
    ) -> Result<T> {
        let config: &'a crate::config::Config = walker.config;
        Ahead::with_threads(&config.policy_schema, workers, |ahead| {
            walker.ahead = std::mem::take(ahead);
            let walked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| walk(&mut *walker)));
            // The walker's handle goes: closing the queue ends the threads.
            walker.ahead = Ahead::default();
            walked.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `body` with `workers` threads parsing with `schema` what is sent to the handle it
    /// is given; the threads end when the handle's queue closes (it is dropped or replaced).
    fn with_threads<T>(schema: &PolicySchema, workers: usize, body: impl FnOnce(&mut Ahead) -> T) -> T {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (answer, done) = mpsc::channel();
        let queue = std::sync::Mutex::new(queue);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let (queue, answer) = (&queue, answer.clone());
                let named = std::thread::Builder::new().name("parse".into());
                let spawned = named.spawn_scoped(scope, move || {
                    loop {
                        let job = queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).recv();
                        let (id, bytes) = match job {
                            Ok(Job::Parse(id, bytes)) => (id, bytes),
                            Ok(Job::Free(set)) => {
                                drop(set);
                                continue;
                            }
                            Err(_) => break,
                        };
                        // A file that makes the parser panic is left to `load`, which parses it
                        // itself and reports the panic as the walk's own. (The schema is only
                        // read.)
                        let parse = std::panic::AssertUnwindSafe(|| policy::parse_with(&bytes, schema));
                        let parsed = std::panic::catch_unwind(parse).ok();
                        if answer.send((id, parsed)).is_err() {
                            break;
                        }
                    }
                });
                // Without its threads (none could start) the walk parses every file itself.
                if let Err(e) = spawned {
                    tracing::debug!(error = %e, "no thread to parse policy files ahead");
                }
            }
            drop(answer);
            let mut ahead = Ahead { jobs: Some(jobs), done: Some(done), ..Ahead::default() };
            body(&mut ahead)
        })
    }

    /// Files handed over and not yet taken.
    pub(super) fn in_flight(&self) -> usize {
        self.pending.len() + self.ready.len()
    }

    /// Counts a step's file as taken: whether a coming step has it too (`None` when the walk
    /// hands nothing over, or did not hand this file over: then nobody knows).
    fn taken(&mut self, id: &ObjectId) -> Option<bool> {
        let left = self.coming.get_mut(id)?;
        *left -= 1;
        if *left == 0 {
            self.coming.remove(id);
            return Some(false);
        }
        Some(true)
    }

    fn knows(&self, id: &ObjectId) -> bool {
        self.pending.contains(id) || self.ready.contains_key(id)
    }

    fn send(&mut self, id: ObjectId, bytes: Vec<u8>) {
        if let Some(jobs) = &self.jobs
            && jobs.send(Job::Parse(id, bytes)).is_ok()
        {
            self.pending.insert(id);
        }
    }

    /// Frees a parsed file on a parsing thread when there is one.
    pub(super) fn discard(&mut self, set: PolicySet) {
        if let Some(jobs) = &self.jobs {
            // Sent back when the threads are gone: then it is freed here.
            let _ = jobs.send(Job::Free(set));
        }
    }

    /// The parsed file `id`, waiting for it when it was handed over; `None` when it was not
    /// (or its parse panicked): the caller parses it.
    fn take(&mut self, id: &ObjectId) -> Option<Parsed> {
        if let Some(parsed) = self.ready.remove(id) {
            return Some(parsed);
        }
        while self.pending.contains(id) {
            let (answered, parsed) = self.done.as_ref()?.recv().ok()?;
            self.pending.remove(&answered);
            match parsed {
                Some(parsed) if answered == *id => return Some(parsed),
                Some(parsed) => {
                    self.ready.insert(answered, parsed);
                }
                None if answered == *id => return None,
                None => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(approvals: usize) -> Vec<u8> {
        format!(
            "approval_policy:\n- name: P{approvals}\n  enabled: true\n  rules: [{{type: any_merge_request, branch_type: protected, commits: any}}]\n  actions: [{{type: require_approval, approvals_required: 1, role_approvers: [developer]}}]\n"
        )
        .into_bytes()
    }

    fn id(n: usize) -> ObjectId {
        let mut bytes = [0u8; 20];
        bytes[..8].copy_from_slice(&(n as u64).to_be_bytes());
        ObjectId::from_bytes_or_panic(&bytes)
    }

    /// Answers come back in any order from several threads; each file is taken with its own
    /// answer, and a file never handed over is left to the caller.
    #[test]
    fn each_file_is_taken_with_its_own_answer_whatever_order_they_come_in() {
        let schema = PolicySchema::builtin();
        Ahead::with_threads(schema, 4, |ahead| {
            for round in 0..5 {
                let files: Vec<usize> = (1..=40).map(|n| n + round * 40).collect();
                for &n in &files {
                    // Big files first and small last, so later answers tend to overtake.
                    let mut bytes = file(n);
                    if n % 2 == 0 {
                        bytes.extend(format!("# {}\n", "x".repeat(50_000)).as_bytes());
                    }
                    ahead.send(id(n), bytes);
                }
                assert_eq!(ahead.in_flight(), files.len());
                for &n in files.iter().rev() {
                    let set = ahead.take(&id(n)).expect("handed over").expect("valid");
                    assert_eq!(set.policies[0].name, format!("P{n}"));
                }
                assert_eq!(ahead.in_flight(), 0);
            }
            assert!(ahead.take(&id(999)).is_none());
            ahead.send(id(1000), b"approval_policy: [unclosed\n".to_vec());
            assert!(ahead.take(&id(1000)).expect("handed over").is_err());
        });
    }

    /// A file's coming steps are counted: the last of them is told nobody wants it again.
    #[test]
    fn a_file_is_kept_only_while_a_coming_step_has_it() {
        let mut ahead = Ahead::default();
        assert_eq!(ahead.taken(&id(1)), None);
        *ahead.coming.entry(id(1)).or_default() += 2;
        assert_eq!(ahead.taken(&id(1)), Some(true));
        assert_eq!(ahead.taken(&id(1)), Some(false));
        assert_eq!(ahead.taken(&id(1)), None);
    }
}
