//! The scripted GitLab of `tests/support/fake_gitlab.py` (GraphQL for discovery, REST for
//! sign-in), started and stopped by the test that uses it.

use crate::common::{KillOnDrop, Workspace};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The scripted GitLab: a python3 process on 127.0.0.1, reading `world.json` on each request.
pub struct FakeGitLab {
    _process: KillOnDrop,
    pub url: String,
    world: PathBuf,
    calls: PathBuf,
}

impl FakeGitLab {
    pub fn start(ws: &Workspace, world: &Value) -> FakeGitLab {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fake_gitlab.py");
        let world_path = ws.path("world.json");
        let calls = ws.path("calls.log");
        std::fs::write(&world_path, world.to_string()).expect("world");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&world_path)
            .arg(&calls)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 must be installed (scripts/install-deps.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("port");
        let port: u16 = line.trim().parse().expect("the fake GitLab prints its port");
        FakeGitLab { _process: KillOnDrop(child), url: format!("http://127.0.0.1:{port}"), world: world_path, calls }
    }

    pub fn set(&self, world: &Value) {
        std::fs::write(&self.world, world.to_string()).expect("world");
    }

    /// (query kind, token accepted) of every request so far.
    pub fn calls(&self) -> Vec<(String, bool)> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| (v["query_kind"].as_str().unwrap_or("").to_string(), v["auth_ok"] == json!(true)))
            .collect()
    }
}
