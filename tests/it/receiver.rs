//! A scriptable HTTP receiver on 127.0.0.1: records every request and answers from a script
//! (status codes, Retry-After, a hang past the client's timeout, a reset mid-response).
//! Keep-alive is supported, so a client's connection reuse is exercised.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// A status with extra response headers (e.g. Retry-After, Location).
    With(u16, Vec<(&'static str, String)>),
    /// Say nothing for this long, then close.
    Hang(Duration),
    /// Start a response, then reset the connection.
    Reset,
    /// Answer 200 with a body of this many bytes.
    HugeBody(usize),
    /// Send the status line and a few body bytes, then stall this long.
    Stall(Duration),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

pub struct Receiver {
    pub port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    /// Answers each request with the next scripted reply, then with `204` once the script is
    /// used up.
    pub fn start(script: Vec<Reply>) -> Receiver {
        Receiver::start_slow(script, Duration::ZERO)
    }

    /// Like [`Receiver::start`], taking `delay` before every answer (a slow SIEM).
    pub fn start_slow(script: Vec<Reply>, delay: Duration) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, st) = (requests.clone(), script.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (r, s, st) = (r.clone(), s.clone(), st.clone());
                        std::thread::spawn(move || {
                            let _ = serve(stream, &r, &s, &st, delay);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Receiver { port, requests, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/audit", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }

    /// Ids of the events received, in arrival order.
    pub fn ids(&self) -> Vec<String> {
        self.requests().iter().map(|r| r.json()["id"].as_str().unwrap_or_default().to_string()).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    stream: TcpStream,
    requests: &Mutex<Vec<Request>>,
    script: &Mutex<VecDeque<Reply>>,
    stop: &AtomicBool,
    delay: Duration,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while !stop.load(Ordering::SeqCst) {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) =
            (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        requests.lock().expect("lock").push(Request { method, path, headers, body });
        let reply = script.lock().expect("lock").pop_front().unwrap_or(Reply::Status(204));
        std::thread::sleep(delay);
        match reply {
            Reply::Status(code) => respond(&mut writer, code, &[])?,
            Reply::With(code, extra) => respond(&mut writer, code, &extra)?,
            Reply::Hang(d) => {
                std::thread::sleep(d);
                return Ok(());
            }
            Reply::HugeBody(n) => {
                writer.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes())?;
                let chunk = vec![b'x'; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    if writer.write_all(&chunk[..k]).is_err() {
                        return Ok(()); // the client stopped reading: fine
                    }
                    left -= k;
                }
            }
            Reply::Stall(d) => {
                writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\nContent-Length: 100000\r\n\r\n001e# service=git-upload")?;
                writer.flush()?;
                std::thread::sleep(d);
                return Ok(());
            }
            Reply::Reset => {
                writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")?;
                writer.flush()?;
                let sock = socket_of(&writer);
                sock.set_linger(Some(Duration::ZERO))?;
                return Ok(()); // dropping with linger 0 sends RST
            }
        }
    }
    Ok(())
}

fn socket_of(stream: &TcpStream) -> socket2::SockRef<'_> {
    socket2::SockRef::from(stream)
}

fn respond(w: &mut TcpStream, code: u16, extra: &[(&str, String)]) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {code} Scripted\r\nContent-Length: 0\r\n");
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.flush()
}
