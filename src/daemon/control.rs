//! The control socket: a Unix socket in the state directory (mode 0600) through which CLI
//! commands reach a running daemon, since sled admits one process. One JSON request line; back
//! come JSON [`Reply`] lines: `chunk`s of the listing as the command writes it (so a listing of
//! any size crosses in bounded memory on both sides), then one `done` with the [`Output`]. The
//! daemon runs the same command code the CLI runs in-process.

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

/// One line of the daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Part of the command's listing, in order.
    Chunk(String),
    /// The command finished: its summary, messages and exit code.
    Done(Output),
}

/// Bytes of listing per `chunk` line.
const CHUNK_BYTES: usize = 64 * 1024;

/// The daemon's side: turns what a command writes into `chunk` lines on the socket. A chunk
/// never splits a UTF-8 character.
pub struct ChunkWriter<W: Write> {
    socket: W,
    pending: Vec<u8>,
}

impl<W: Write> ChunkWriter<W> {
    pub fn new(socket: W) -> Self {
        ChunkWriter { socket, pending: Vec::with_capacity(CHUNK_BYTES) }
    }

    fn send(&mut self, all: bool) -> std::io::Result<()> {
        let cut = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() && !all => e.valid_up_to(), // a character continues
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        };
        if cut == 0 {
            return Ok(());
        }
        let text = std::str::from_utf8(&self.pending[..cut]).map_err(std::io::Error::other)?;
        let mut line = serde_json::to_vec(&Reply::Chunk(text.to_string()))?;
        line.push(b'\n');
        self.socket.write_all(&line)?;
        self.pending.drain(..cut);
        Ok(())
    }

    /// Sends what is left and the final `done` line.
    pub fn finish(mut self, output: &Output) -> std::io::Result<()> {
        self.send(true)?;
        let mut line = serde_json::to_vec(&Reply::Done(output.clone()))?;
        line.push(b'\n');
        self.socket.write_all(&line)?;
        self.socket.flush()
    }
}

impl<W: Write> Write for ChunkWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= CHUNK_BYTES {
            self.send(false)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send(false)?;
        self.socket.flush()
    }
}

pub fn socket_path(config: &Config) -> PathBuf {
    config.state_dir.join(SOCKET_NAME)
}

pub fn pid_path(config: &Config) -> PathBuf {
    config.state_dir.join(PID_NAME)
}

/// Sends `command` to the daemon, if one listens on the state directory's socket, writing its
/// listing to `out` as it arrives. None when no daemon answers (no socket, or a stale one): the
/// caller runs the command in-process.
pub fn try_daemon(config: &Config, command: &Command, out: &mut dyn Write) -> Option<Result<Output>> {
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
    Some(exchange(stream, command, out).with_context(|| format!("the daemon at {} did not answer", path.display())))
}

fn exchange(mut stream: UnixStream, command: &Command, out: &mut dyn Write) -> Result<Output> {
    let mut line = serde_json::to_vec(&Request { command: command.clone() })?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()?;
    let mut replies = BufReader::new(stream);
    loop {
        let mut reply = String::new();
        if replies.read_line(&mut reply)? == 0 {
            anyhow::bail!("the daemon closed the connection without an answer (did it stop?)");
        }
        match serde_json::from_str(&reply).context("the daemon's answer does not parse")? {
            Reply::Chunk(text) => {
                if let Err(e) = out.write_all(text.as_bytes()) {
                    // Our reader went away (or the disk is full): stop; the daemon sees the
                    // socket close and stops too.
                    return Ok(crate::cli::write_failed(&e));
                }
            }
            Reply::Done(output) => return Ok(output),
        }
    }
}
