//! The control socket: a Unix socket in the state directory (mode 0600) through which CLI
//! commands reach a running daemon, since sled admits one process. Both halves live here.
//!
//! Framing: one JSON line `{"protocol": N, "request": <app::Request>}`; back come JSON lines
//! `{"protocol": N, "reply": <Reply>}`: `chunk`s of the listing as the request writes it (so a
//! listing of any size crosses in bounded memory on both sides), then one `done` with the
//! [`Output`]. Each side checks the other's `protocol` before reading anything else, so a CLI
//! and a daemon of different versions get an error naming both instead of a misunderstanding.
//! The daemon runs the same `app` code the CLI runs in-process.

use crate::app::{Output, PROTOCOL, Request};
use crate::config::Config;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

pub const SOCKET_NAME: &str = "control.sock";
pub const PID_NAME: &str = "policy-audit.pid";

/// The first thing read of any line, whatever its version: its protocol.
#[derive(Debug, Deserialize)]
struct Version {
    protocol: u32,
    /// The sender's release, for the error message.
    #[serde(default)]
    release: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    protocol: u32,
    release: String,
    #[serde(flatten)]
    body: T,
}

fn envelope<T>(body: T) -> Envelope<T> {
    Envelope { protocol: PROTOCOL, release: env!("CARGO_PKG_VERSION").to_string(), body }
}

#[derive(Debug, Serialize, Deserialize)]
struct RequestLine {
    request: Request,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReplyLine {
    reply: Reply,
}

/// One line of the daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Part of the listing, in order.
    Chunk(String),
    /// The request finished: its summary, messages and exit code.
    Done(Output),
}

/// The error for a peer of another protocol version.
fn mismatch(ours: &str, theirs: &Version) -> String {
    let release = if theirs.release.is_empty() { String::new() } else { format!(", policy-audit {}", theirs.release) };
    format!(
        "{ours} speaks control protocol {} (policy-audit {}) but the {} speaks protocol {}{release}: run the same version on both sides (after an upgrade, restart the daemon: systemctl restart policy-audit)",
        PROTOCOL,
        env!("CARGO_PKG_VERSION"),
        if ours == "this command" { "running daemon" } else { "command" },
        theirs.protocol,
    )
}

/// A line that could not be read.
#[derive(Debug, thiserror::Error)]
enum LineError {
    #[error("{0}")]
    OtherProtocol(String),
    #[error("does not parse ({0})")]
    Malformed(serde_json::Error),
}

/// Reads one line of `T` after checking its protocol.
fn parse_line<T: serde::de::DeserializeOwned>(line: &str, ours: &str) -> Result<T, LineError> {
    let version: Version = serde_json::from_str(line).map_err(LineError::Malformed)?;
    if version.protocol != PROTOCOL {
        return Err(LineError::OtherProtocol(mismatch(ours, &version)));
    }
    serde_json::from_str(line).map_err(LineError::Malformed)
}

/// The daemon's side: reads the request line; the error is the answer to send.
pub fn read_request(line: &str) -> Result<Request, String> {
    parse_line::<Envelope<RequestLine>>(line, "the daemon").map(|e| e.body.request).map_err(|e| match e {
        LineError::OtherProtocol(why) => why,
        LineError::Malformed(e) => format!("the daemon cannot read this request: {e}"),
    })
}

/// The daemon's side: the answer to a request it cannot read (another protocol).
pub fn refusal(message: String) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&envelope(ReplyLine { reply: Reply::Done(Output::unusable(message)) })).unwrap_or_default();
    line.push(b'\n');
    line
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
        let mut line = serde_json::to_vec(&envelope(ReplyLine { reply: Reply::Chunk(text.to_string()) }))?;
        line.push(b'\n');
        self.socket.write_all(&line)?;
        self.pending.drain(..cut);
        Ok(())
    }

    /// Sends what is left and the final `done` line.
    pub fn finish(mut self, output: &Output) -> std::io::Result<()> {
        self.send(true)?;
        let mut line = serde_json::to_vec(&envelope(ReplyLine { reply: Reply::Done(output.clone()) }))?;
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
pub fn try_daemon(config: &Config, request: &Request, out: &mut dyn Write) -> Option<Result<Output>> {
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
    Some(exchange(stream, request, out).map_err(|e| match e.downcast::<LineError>() {
        Ok(LineError::OtherProtocol(why)) => anyhow::anyhow!(why),
        Ok(malformed) => anyhow::anyhow!("the daemon at {}: its answer {malformed}", path.display()),
        Err(e) => e.context(format!("the daemon at {} did not answer", path.display())),
    }))
}

fn exchange(mut stream: UnixStream, request: &Request, out: &mut dyn Write) -> Result<Output> {
    let mut line = serde_json::to_vec(&envelope(RequestLine { request: request.clone() }))?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()?;
    let mut replies = BufReader::new(stream);
    loop {
        let mut reply = String::new();
        if replies.read_line(&mut reply)? == 0 {
            anyhow::bail!("the daemon closed the connection without an answer (did it stop?)");
        }
        let reply = parse_line::<Envelope<ReplyLine>>(&reply, "this command")?;
        match reply.body.reply {
            Reply::Chunk(text) => {
                if let Err(e) = out.write_all(text.as_bytes()) {
                    // Our reader went away (or the disk is full): stop; the daemon sees the
                    // socket close and stops too.
                    return Ok(crate::app::write_failed(&e));
                }
            }
            Reply::Done(output) => return Ok(output),
        }
    }
}
