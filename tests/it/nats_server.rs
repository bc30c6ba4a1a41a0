//! A real `nats-server -js` on a free loopback port, one per test, killed when the guard drops.
//! Its JetStream store lives in a temp dir, so a stop and a restart on the same port keep the
//! streams (a broker restart, not a new broker).

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub port: u16,
    token: Option<String>,
    extra: Vec<String>,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_with_token(None)
    }

    /// A server that admits only clients presenting `token`.
    pub fn start_with_token(token: Option<&str>) -> NatsServer {
        NatsServer::start_with(token, Vec::new())
    }

    /// A server that speaks only TLS, with this certificate and key (PEM files).
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> NatsServer {
        let extra = vec![
            "--tls".into(),
            "--tlscert".into(),
            cert.display().to_string(),
            "--tlskey".into(),
            key.display().to_string(),
        ];
        NatsServer::start_with(None, extra)
    }

    /// TLS that also requires a client certificate signed by `ca` (mutual TLS).
    pub fn start_mtls(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> NatsServer {
        let extra = vec![
            "--tlsverify".into(),
            "--tlscert".into(),
            cert.display().to_string(),
            "--tlskey".into(),
            key.display().to_string(),
            "--tlscacert".into(),
            ca.display().to_string(),
        ];
        NatsServer::start_with(None, extra)
    }

    fn start_with(token: Option<&str>, extra: Vec<String>) -> NatsServer {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let mut server = NatsServer {
            port,
            token: token.map(str::to_string),
            extra,
            store: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.resume();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: the broker's crash, not a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let mut cmd = Command::new("nats-server");
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(token) = &self.token {
            cmd.args(["--auth", token]);
        }
        cmd.args(&self.extra);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start nats-server ({e}): install it with scripts/install-deps.sh (Debian package nats-server)"
            )
        });
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "nats-server did not listen on port {} within 20s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `f` on a fresh tokio runtime (tests are synchronous).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

/// One message of a stream, as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    pub msg_id: String,
    pub body: serde_json::Value,
}

/// Every message of `stream`, in stream order (empty when the stream does not exist).
pub fn read_stream(url: &str, token: Option<&str>, stream: &str) -> Vec<Message> {
    block_on(async {
        let options = match token {
            Some(t) => async_nats::ConnectOptions::with_token(t.to_string()),
            None => async_nats::ConnectOptions::new(),
        };
        let client = options.connect(url).await.expect("connect to nats-server");
        let js = async_nats::jetstream::new(client);
        let Ok(mut s) = js.get_stream(stream).await else { return Vec::new() };
        let state = s.info().await.expect("stream info").state.clone();
        let mut out = Vec::new();
        for seq in state.first_sequence..=state.last_sequence {
            if seq == 0 {
                continue;
            }
            let m = s.get_raw_message(seq).await.expect("stream message");
            out.push(Message {
                subject: m.subject.to_string(),
                msg_id: m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string()).unwrap_or_default(),
                body: serde_json::from_slice(&m.payload).expect("message body is JSON"),
            });
        }
        out
    })
}
