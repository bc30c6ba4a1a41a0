//! The control socket: a Unix socket in the state directory (mode 0600) through which CLI
//! commands reach a running daemon, since sled admits one process. One JSON request line, one
//! JSON [`Output`] back; the daemon runs the same command code the CLI runs in-process.

use crate::cli::{Command, Output};
use crate::config::Config;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

pub const SOCKET_NAME: &str = "control.sock";
pub const PID_NAME: &str = "policy-audit.pid";

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
}

pub fn socket_path(config: &Config) -> PathBuf {
    config.state_dir.join(SOCKET_NAME)
}

pub fn pid_path(config: &Config) -> PathBuf {
    config.state_dir.join(PID_NAME)
}

/// Sends `command` to the daemon, if one listens on the state directory's socket. None when
/// no daemon answers (no socket, or a stale one): the caller runs the command in-process.
pub fn try_daemon(config: &Config, command: &Command) -> Option<Result<Output>> {
    let path = socket_path(config);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Some(Err(anyhow::anyhow!(
                "cannot connect to the daemon's control socket {}: permission denied (run as the service's user or root)",
                path.display()
            )));
        }
        Err(_) => return None, // no daemon (no socket, or a stale one)
    };
    Some(exchange(stream, command).with_context(|| format!("the daemon at {} did not answer", path.display())))
}

fn exchange(mut stream: UnixStream, command: &Command) -> Result<Output> {
    let mut line = serde_json::to_vec(&Request { command: command.clone() })?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    if reply.trim().is_empty() {
        anyhow::bail!("the daemon closed the connection without an answer (did it stop?)");
    }
    Ok(serde_json::from_str(&reply)?)
}
