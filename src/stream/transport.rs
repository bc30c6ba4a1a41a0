//! The TCP transport under an HTTP destination's ureq agent: the same connection ureq's own
//! `TcpConnector` makes (TLS and CONNECT proxies stay ureq's, chained around it), with fewer
//! system calls per request. Delivery is one small POST after another over one keep-alive
//! connection, so per-request syscalls are most of its cost (docs/performance.md, Delivery).
//!
//! Invariants:
//! - bytes handed over by ureq are written when it starts waiting for the answer (or when the
//!   output buffer is nearly full), so a request's head and body leave in one `write`, as wrk
//!   sends them; nothing is read before everything handed over was written;
//! - a pooled connection is probed with one non-blocking `recv(MSG_PEEK)` (ureq's probe toggles
//!   the socket's blocking mode around a read: three calls), with the same answer: reusable
//!   only when the peer neither closed it nor sent bytes nobody asked for;
//! - socket timeouts are re-armed only when the one set would outlast the phase's remaining
//!   budget, or undercut it by more than [`SLACK`]: a call never waits past ureq's deadline
//!   and gives up at most [`SLACK`] before it (ureq sets them again before every call).
//!
//! ureq's `unversioned::transport` API is outside its semver promise: upgrading ureq past the
//! locked 3.5.2 may need this file adjusted (the compiler says where).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Weak};
use std::time::Duration;
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, RustlsConnector,
    ShutdownHandle, Transport,
};
use ureq::{Error, Timeout};

/// How much earlier than ureq's deadline a socket call may give up.
pub const SLACK: Duration = Duration::from_millis(10);

/// The pending bytes are written out first when less than 1/this of the output buffer is free
/// (16 KiB of ureq's default 128 KiB).
const MIN_FREE_OUTPUT_DIVISOR: usize = 8;

/// An agent with `config` over [`DeliveryTcpConnector`], with ureq's CONNECT proxy and rustls
/// layers around it, as in ureq's default connector chain.
pub fn agent(config: ureq::config::Config) -> ureq::Agent {
    let connector =
        ().chain(ConnectProxyConnector::default()).chain(DeliveryTcpConnector).chain(RustlsConnector::default());
    ureq::Agent::with_parts(config, connector, DefaultResolver::default())
}

/// Opens plain TCP connections as [`DeliveryTcp`] transports.
#[derive(Debug, Default)]
pub struct DeliveryTcpConnector;

impl<In: Transport> Connector<In> for DeliveryTcpConnector {
    type Out = Either<In, DeliveryTcp>;

    fn connect(&self, details: &ConnectionDetails, chained: Option<In>) -> Result<Option<Self::Out>, Error> {
        if let Some(transport) = chained {
            return Ok(Some(Either::A(transport))); // a proxy already connected
        }
        let stream = connect(&details.addrs, details.timeout)?;
        if details.config.no_delay() {
            stream.set_nodelay(true)?;
        }
        let buffers = LazyBuffers::new(details.config.input_buffer_size(), details.config.output_buffer_size());
        let transport = DeliveryTcp::new(stream, buffers);
        (details.register_shutdown)(Arc::downgrade(&transport.stream) as Weak<dyn ShutdownHandle>)?;
        Ok(Some(Either::B(transport)))
    }
}

/// Tries each resolved address in turn within the connect budget.
fn connect(addrs: &[SocketAddr], timeout: NextTimeout) -> Result<TcpStream, Error> {
    let deadline = deadline_after(timeout.after);
    let mut last = None;
    for addr in addrs {
        let attempt = match deadline {
            Some(deadline) => match deadline.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => TcpStream::connect_timeout(addr, left),
                _ => return Err(Error::Timeout(timeout.reason)),
            },
            None => TcpStream::connect(addr),
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
                last = Some(Error::Timeout(timeout.reason));
            }
            Err(e) => last = Some(Error::Io(e)),
        }
    }
    Err(last.unwrap_or_else(|| Error::Io(io::Error::new(io::ErrorKind::ConnectionRefused, "Connection refused"))))
}

/// ureq's buffers, with the output handed out after the bytes not yet written.
#[derive(Debug)]
struct CorkedBuffers {
    inner: LazyBuffers,
    /// Bytes at the start of the output buffer that were handed over but not yet written.
    pending: usize,
}

impl Buffers for CorkedBuffers {
    fn output(&mut self) -> &mut [u8] {
        let pending = self.pending;
        &mut self.inner.output()[pending..]
    }

    fn input(&self) -> &[u8] {
        self.inner.input()
    }

    fn input_append_buf(&mut self) -> &mut [u8] {
        self.inner.input_append_buf()
    }

    fn input_appended(&mut self, amount: usize) {
        self.inner.input_appended(amount)
    }

    fn input_consume(&mut self, amount: usize) {
        self.inner.input_consume(amount)
    }

    fn tmp_and_output(&mut self) -> (&mut [u8], &mut [u8]) {
        let pending = self.pending;
        let (tmp, output) = self.inner.tmp_and_output();
        (tmp, &mut output[pending..])
    }

    fn can_use_input(&self) -> bool {
        self.inner.can_use_input()
    }
}

/// One plain TCP connection (see the module's invariants).
#[derive(Debug)]
pub struct DeliveryTcp {
    stream: Arc<TcpStream>,
    buffers: CorkedBuffers,
    /// The socket timeouts as last set (None: none set).
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// The write budget of the bytes pending: until when, and the reason to report.
    pending_timeout: Option<(Option<std::time::Instant>, Timeout)>,
}

impl DeliveryTcp {
    fn new(stream: TcpStream, buffers: LazyBuffers) -> DeliveryTcp {
        DeliveryTcp {
            stream: Arc::new(stream),
            buffers: CorkedBuffers { inner: buffers, pending: 0 },
            read_timeout: None,
            write_timeout: None,
            pending_timeout: None,
        }
    }

    /// Writes the pending bytes out.
    fn write_pending(&mut self) -> Result<(), Error> {
        if self.buffers.pending == 0 {
            return Ok(());
        }
        let (deadline, reason) = self.pending_timeout.take().unwrap_or((None, Timeout::SendBody));
        let left = match deadline {
            Some(deadline) => match deadline.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(Error::Timeout(reason)),
            },
            None => None,
        };
        arm(&self.stream, &mut self.write_timeout, left, TcpStream::set_write_timeout)?;
        let pending = std::mem::take(&mut self.buffers.pending);
        let bytes = &self.buffers.inner.output()[..pending];
        (&*self.stream).write_all(bytes).map_err(|e| io_error(e, reason))
    }
}

impl Transport for DeliveryTcp {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        let timeout = timeout.for_write();
        if timeout.after.is_zero() {
            return Err(Error::Timeout(timeout.reason));
        }
        let deadline = deadline_after(timeout.after);
        // The earliest budget of the bytes pending is the one that counts.
        self.pending_timeout = match self.pending_timeout {
            Some(earlier @ (Some(at), _)) if deadline.is_none_or(|d| at <= d) => Some(earlier),
            Some(earlier @ (None, _)) if deadline.is_none() => Some(earlier),
            _ => Some((deadline, timeout.reason)),
        };
        self.buffers.pending += amount;
        let size = self.buffers.inner.output().len();
        if self.buffers.output().len() < size / MIN_FREE_OUTPUT_DIVISOR {
            self.write_pending()?;
        }
        Ok(())
    }

    fn maybe_await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.write_pending()?;
        if self.buffers.can_use_input() {
            return Ok(true);
        }
        self.await_input(timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.write_pending()?;
        let timeout = timeout.for_read();
        if timeout.after.is_zero() {
            return Err(Error::Timeout(timeout.reason));
        }
        let left = (!timeout.after.is_not_happening()).then_some(*timeout.after);
        arm(&self.stream, &mut self.read_timeout, left, TcpStream::set_read_timeout)?;
        let input = self.buffers.input_append_buf();
        let amount = loop {
            match (&*self.stream).read(input) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other.map_err(|e| io_error(e, timeout.reason))?,
            }
        };
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.buffers.pending == 0 && peer_is_quiet(&self.stream)
    }
}

/// When a budget of `after` from now runs out (None: never, or too far to represent).
fn deadline_after(after: ureq::unversioned::transport::time::Duration) -> Option<std::time::Instant> {
    if after.is_not_happening() { None } else { std::time::Instant::now().checked_add(*after) }
}

/// A socket timeout error is the phase's timeout; anything else is I/O.
fn io_error(e: io::Error, reason: Timeout) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout(reason),
        _ => Error::Io(e),
    }
}

/// Sets a socket timeout to at most `left` (None: no limit) unless the one set already fits.
fn arm(
    stream: &TcpStream,
    current: &mut Option<Duration>,
    left: Option<Duration>,
    set: fn(&TcpStream, Option<Duration>) -> io::Result<()>,
) -> Result<(), Error> {
    if let Some(wanted) = rearm(*current, left) {
        set(stream, wanted)?;
        *current = wanted;
    }
    Ok(())
}

/// The socket timeout to set for a call with `left` of its budget when `current` is set, or None
/// when `current` fits: not longer than `left`, and not more than [`SLACK`] shorter.
fn rearm(current: Option<Duration>, left: Option<Duration>) -> Option<Option<Duration>> {
    let fits = match (current, left) {
        (None, None) => true,
        (Some(set), Some(left)) => set <= left && left - set <= SLACK,
        _ => false,
    };
    // Half the slack below the budget, so the next calls of the same phase can keep it.
    (!fits).then(|| left.map(|left| if left > SLACK { left - SLACK / 2 } else { left }))
}

/// True when the connection is open and nothing unread is waiting on it: one non-blocking peek.
fn peer_is_quiet(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: recv(2) on a socket this transport owns, into a 1-byte buffer we own and pass
    // with its length; MSG_PEEK leaves any byte in the socket, MSG_DONTWAIT never blocks.
    let n = unsafe { libc::recv(stream.as_raw_fd(), byte.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    // Nothing to read (EAGAIN) is the only healthy answer: 0 is a close, > 0 stray bytes.
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_socket_timeout_never_outlasts_the_budget_and_is_kept_while_it_fits() {
        // First call of a 10 s phase: set just under it.
        assert_eq!(rearm(None, Some(ms(10_000))), Some(Some(ms(9_995))));
        // Later calls of the phase (or the next phase, with a fresh 10 s): kept.
        assert_eq!(rearm(Some(ms(9_995)), Some(ms(9_999))), None);
        assert_eq!(rearm(Some(ms(9_995)), Some(ms(10_000))), None);
        // The budget fell below what is set (a slow call used it up): lowered, never kept.
        assert_eq!(rearm(Some(ms(9_995)), Some(ms(9_990))), Some(Some(ms(9_985))));
        // A much larger budget than what is set: raised, so the call does not give up early.
        assert_eq!(rearm(Some(ms(1_000)), Some(ms(10_000))), Some(Some(ms(9_995))));
        // Tiny budgets are used as they are; no budget clears the timeout.
        assert_eq!(rearm(Some(ms(9_995)), Some(ms(3))), Some(Some(ms(3))));
        assert_eq!(rearm(Some(ms(9_995)), None), Some(None));
        assert_eq!(rearm(None, None), None);
    }

    fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    /// Waits up to `within` until `server` has `n` bytes to read; returns how many it has.
    fn readable(server: &TcpStream, n: usize, within: Duration) -> usize {
        server.set_nonblocking(true).expect("nonblocking");
        let mut buf = vec![0u8; 64 * 1024];
        let until = std::time::Instant::now() + within;
        loop {
            let got = server.peek(&mut buf).unwrap_or(0);
            if got >= n || std::time::Instant::now() > until {
                server.set_nonblocking(false).expect("blocking");
                return got;
            }
            std::thread::sleep(ms(5));
        }
    }

    #[test]
    fn the_head_and_the_body_leave_in_one_write_when_the_answer_is_awaited() {
        let (client, server) = connected();
        let mut transport = DeliveryTcp::new(client, LazyBuffers::new(4096, 4096));
        let budget =
            NextTimeout { after: Duration::from_secs(5).into(), reason: Timeout::SendBody, ..Default::default() };
        let head = b"POST /audit HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n";
        transport.buffers().output()[..head.len()].copy_from_slice(head);
        transport.transmit_output(head.len(), budget).expect("head");
        transport.buffers().output()[..2].copy_from_slice(b"{}");
        transport.transmit_output(2, budget).expect("body");
        assert_eq!(readable(&server, 1, ms(50)), 0, "nothing is sent before the answer is awaited");
        let answer = std::thread::spawn(move || {
            let mut server = server;
            let mut buf = vec![0u8; 64 * 1024];
            assert_eq!(readable(&server, head.len() + 2, ms(5_000)), head.len() + 2);
            // The whole request is there for one read.
            let n = server.read(&mut buf).expect("read");
            server.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").expect("answer");
            buf.truncate(n);
            buf
        });
        let budget =
            NextTimeout { after: Duration::from_secs(5).into(), reason: Timeout::RecvResponse, ..Default::default() };
        assert!(transport.await_input(budget).expect("answer"));
        let request = answer.join().expect("server thread");
        assert_eq!(request, [&head[..], b"{}"].concat());
        assert!(transport.buffers().input().starts_with(b"HTTP/1.1 204"));
    }

    #[test]
    fn a_pooled_connection_is_reusable_only_while_the_peer_is_quiet() {
        let (client, mut server) = connected();
        assert!(peer_is_quiet(&client), "an idle open connection");
        server.write_all(b"x").expect("stray byte");
        readable(&client, 1, ms(5_000));
        assert!(!peer_is_quiet(&client), "bytes nobody asked for");
        let (client, server) = connected();
        drop(server);
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while peer_is_quiet(&client) && std::time::Instant::now() < until {
            std::thread::sleep(ms(5));
        }
        assert!(!peer_is_quiet(&client), "a connection the peer closed");
    }

    #[test]
    fn a_body_larger_than_the_output_buffer_arrives_whole_over_a_reused_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}/audit", listener.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
            let mut writer = stream;
            let mut bodies = Vec::new();
            for _ in 0..2 {
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    std::io::BufRead::read_line(&mut reader, &mut line).expect("head");
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().expect("length");
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).expect("body");
                writer.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").expect("answer");
                bodies.push(body);
            }
            bodies
        });
        let config = ureq::Agent::config_builder()
            .output_buffer_size(4096)
            .input_buffer_size(4096)
            .timeout_recv_response(Some(Duration::from_secs(5)))
            .build();
        let agent = agent(config);
        let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for body in [&big[..], b"{}"] {
            let response = agent.post(&url).send(body).expect("post");
            assert_eq!(response.status().as_u16(), 204);
        }
        let bodies = server.join().expect("server thread");
        assert_eq!(bodies, vec![big, b"{}".to_vec()], "both requests on one connection, bodies whole");
    }
}
