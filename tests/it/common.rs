//! Shared test plumbing: a temp workspace, git with pinned identities, the binary under test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_policy-audit");

/// A temporary folder holding a policy repository, a state dir and a config.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `git init -b main` a repository under `rel`.
    pub fn init_repo(&self, rel: &str) -> PathBuf {
        let repo = self.path(rel);
        std::fs::create_dir_all(&repo).expect("mkdir repo");
        git(&repo, &["init", "-q", "-b", "main"]);
        repo
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
        p
    }

    /// Runs `policy-audit --config <config> <args>` with extra environment variables.
    pub fn run_with_env(&self, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("POLICY_AUDIT_CONFIG")
            .env_remove("RUST_LOG")
            .env("HOME", self.dir.path())
            .envs(env.iter().copied())
            .output()
            .expect("run policy-audit")
    }

    /// Runs `policy-audit --config <config> <args>`.
    pub fn run(&self, config: &Path, args: &[&str]) -> Output {
        self.run_with_env(config, args, &[])
    }
}

/// Runs git with no user or system config, so the machine's settings cannot leak in.
pub fn git_command(repo: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", repo)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE");
    cmd
}

pub fn git(repo: &Path, args: &[&str]) -> String {
    let out = git_command(repo).args(args).output().expect("run git");
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Commits everything in `repo` as `name <email>` at `date` (author and committer).
pub fn commit(repo: &Path, name: &str, email: &str, date: &str, message: &str) -> String {
    git(repo, &["add", "-A"]);
    let out = git_command(repo)
        .args(["-c", "commit.gpgsign=false", "commit", "-q", "--allow-empty", "-m", message])
        .env("GIT_AUTHOR_NAME", name)
        .env("GIT_AUTHOR_EMAIL", email)
        .env("GIT_AUTHOR_DATE", date)
        .env("GIT_COMMITTER_NAME", name)
        .env("GIT_COMMITTER_EMAIL", email)
        .env("GIT_COMMITTER_DATE", date)
        .output()
        .expect("git commit");
    assert!(out.status.success(), "commit failed: {}", String::from_utf8_lossy(&out.stderr));
    git(repo, &["rev-parse", "HEAD"]).trim().to_string()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// All stored events as JSON values, via the CLI.
pub fn events_json(ws: &Workspace, config: &Path) -> Vec<serde_json::Value> {
    let out = ws.run(config, &["events", "--format", "json"]);
    assert!(out.status.success(), "events failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("events --format json is a JSON array")
}

/// A process the test started, killed and reaped when the test ends, assertion failed or not.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `policy-audit --config <config> run` with info logs to `stderr`.
pub fn spawn_daemon(config: &Path, stderr: std::process::Stdio, env: &[(&str, &str)]) -> std::process::Child {
    Command::new(BIN)
        .envs(env.iter().copied())
        .arg("--config")
        .arg(config)
        .arg("run")
        .env_remove("POLICY_AUDIT_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start daemon")
}

/// Opens the sled database in `dir` from the test, as someone with access to the state
/// directory could, waiting (bounded) for a handle the test dropped a moment ago: sled's
/// background threads close its file a little after the handle goes.
pub fn open_sled(dir: &Path) -> sled::Db {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < until => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("cannot open {}: {e}", dir.display()),
        }
    }
}

/// Drops `db` and waits (bounded) until its lock is released, so that the binary run next
/// finds the database free.
pub fn close_sled(db: sled::Db, dir: &Path) {
    drop(db);
    let lock = dir.join("db");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < until {
        let Ok(file) = std::fs::File::open(&lock) else { return };
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; released when `file` is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Polls `ready` until it holds, for at most `limit` (bounded: a test never hangs), and says how
/// long it took; panics naming `what` when it never held.
pub fn wait_for(what: &str, limit: std::time::Duration, mut ready: impl FnMut() -> bool) -> std::time::Duration {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if ready() {
            return started.elapsed();
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// The stored body of event `seq` in a store's sled database, wherever the store keeps it (in
/// its group in `bodies`, or one key in `events`: see `policy_audit::store::bodies`).
pub fn stored_body(db: &sled::Db, seq: u64) -> Option<Vec<u8>> {
    use policy_audit::store::bodies;
    let group = db.open_tree("bodies").expect("bodies").get(bodies::group_key(seq)).expect("get");
    if let Some(group) = group
        && let Some(r) = bodies::slot_in(&group, seq).expect("a group")
    {
        return Some(group[r].to_vec());
    }
    db.open_tree("events").expect("events").get(seq.to_be_bytes()).expect("get").map(|v| v.to_vec())
}

/// Writes `body` (None: removes it) as event `seq`'s stored body, behind the store's back:
/// in place, the other events of its group kept as they are.
pub fn set_stored_body(db: &sled::Db, seq: u64, body: Option<&[u8]>) {
    use policy_audit::store::bodies;
    let tree = db.open_tree("bodies").expect("bodies");
    let key = bodies::group_key(seq);
    let group = tree.get(key).expect("get").map(|g| g.to_vec()).unwrap_or_default();
    if bodies::slot_in(&group, seq).expect("a group").is_none() {
        let events = db.open_tree("events").expect("events");
        match body {
            Some(body) => events.insert(seq.to_be_bytes(), body).expect("insert"),
            None => events.remove(seq.to_be_bytes()).expect("remove"),
        };
        return;
    }
    let mut rebuilt = Vec::new();
    for (slot, r) in bodies::slots(&group).expect("a group").iter().enumerate() {
        let kept = (!r.is_empty()).then(|| &group[r.clone()]);
        let value = if slot == bodies::slot_of(seq) { body } else { kept };
        rebuilt = bodies::with_slot(Some(&rebuilt), slot, value).expect("slot");
    }
    tree.insert(key, rebuilt).expect("insert");
}
