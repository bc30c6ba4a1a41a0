//! Lingering close: how a connection ends so that the client reads the answer.
//!
//! A server that answers before it has read the whole request (a body over [`super::MAX_BODY_BYTES`]
//! gets its 413 as soon as the headers announce it) and then closes its socket with the rest of the
//! body unread makes the kernel send a reset. A client still sending (Python's urllib, curl and most
//! libraries send the whole body before they read) then sees "connection reset", not the 413.
//! nginx's answer is the lingering close, and this is the same: once hyper is done with a
//! connection, its write half is shut down (the client sees the end of the answer) and what the
//! client still sends is read and discarded until it closes, for at most [`LINGER_TIME`] and
//! [`LINGER_BYTES`], so a client cannot hold the server by sending forever.
//!
//! Invariant: the socket is closed only here, after the lingering read; hyper holds a duplicate
//! descriptor of it, so hyper dropping its side never resets the connection.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The longest a closed connection is read and discarded (nginx's `lingering_time` is 30 s and its
/// `lingering_timeout` 5 s; a client that sends the rest of a 1 MiB-capped request on loopback or a
/// LAN needs far less).
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// The most that is read and discarded after the answer; past it the connection is closed.
pub const LINGER_BYTES: usize = 32 * 1024 * 1024;

/// Splits an accepted connection in two descriptors of the same socket: the one hyper serves, and
/// the one [`linger`] closes. None when the descriptor cannot be duplicated (out of descriptors):
/// then the connection is served without lingering.
pub fn split(stream: tokio::net::TcpStream) -> std::io::Result<(tokio::net::TcpStream, Option<std::net::TcpStream>)> {
    let stream = stream.into_std()?;
    let kept = stream.try_clone().ok();
    Ok((tokio::net::TcpStream::from_std(stream)?, kept))
}

/// After hyper has finished with the connection: ends the answer and reads what the client still
/// sends, bounded in bytes and time, then closes the socket.
pub async fn linger(kept: std::net::TcpStream) {
    // Registered with the runtime only now that hyper's descriptor is gone.
    let Ok(mut stream) = tokio::net::TcpStream::from_std(kept) else { return };
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut discarded = 0;
    let deadline = tokio::time::sleep(LINGER_TIME);
    tokio::pin!(deadline);
    while discarded <= LINGER_BYTES {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => discarded += n,
            },
            _ = &mut deadline => break,
        }
    }
    tracing::debug!(discarded, "closing a connection whose client kept sending after the answer");
}
