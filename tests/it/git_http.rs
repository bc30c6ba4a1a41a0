//! A smart-HTTP git server for tests: a loopback listener that hands each request to
//! `git http-backend` (CGI), optionally requiring a Basic-auth password (a GitLab token).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub struct GitHttpServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// Requests refused for a missing or wrong token.
    pub refused: Arc<AtomicUsize>,
    /// Authorization header values seen (to prove what was sent).
    pub seen_auth: Arc<std::sync::Mutex<Vec<String>>>,
    /// Every request as `METHOD /path?query`, in order.
    pub requests: Arc<std::sync::Mutex<Vec<String>>>,
}

impl GitHttpServer {
    /// Serves the repositories under `root` at `http://127.0.0.1:<port>/<name>`.
    pub fn start(root: &Path, token: Option<&str>) -> GitHttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let seen_auth = Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (root, token) = (root.to_path_buf(), token.map(str::to_string));
        let (stop2, refused2, seen2, requests2) = (stop.clone(), refused.clone(), seen_auth.clone(), requests.clone());
        std::thread::spawn(move || {
            // Bounded: the server lives at most 120 s even if a test forgets to stop it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !stop2.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (root, token, refused, seen, requests) =
                            (root.clone(), token.clone(), refused2.clone(), seen2.clone(), requests2.clone());
                        std::thread::spawn(move || {
                            let _ = serve(stream, &root, token.as_deref(), &refused, &seen, &requests);
                        });
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        GitHttpServer { port, stop, refused, seen_auth, requests }
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    mut stream: TcpStream,
    root: &PathBuf,
    token: Option<&str>,
    refused: &AtomicUsize,
    seen: &std::sync::Mutex<Vec<String>>,
    requests: &std::sync::Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("GET").to_string(), parts.next().unwrap_or("/").to_string());
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    requests.lock().map(|mut r| r.push(format!("{method} {target}"))).ok();
    let body = if let Some(len) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        body
    } else if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        read_chunked(&mut reader)?
    } else {
        Vec::new()
    };
    if let Some(auth) = header("authorization") {
        seen.lock().map(|mut s| s.push(auth)).ok();
    }
    if let Some(token) = token {
        let ok = header("authorization").and_then(|a| basic_password(&a)).is_some_and(|p| p == token);
        if !ok {
            refused.fetch_add(1, Ordering::SeqCst);
            stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
            return Ok(());
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cgi = Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("GIT_PROTOCOL", header("git-protocol").unwrap_or_default())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding").unwrap_or_default())
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    if let Some(mut stdin) = cgi.stdin.take() {
        stdin.write_all(&body)?;
    }
    let out = cgi.wait_with_output()?;
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| out.stdout.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let (head, body) = match split {
        Some((i, n)) => (String::from_utf8_lossy(&out.stdout[..i]).into_owned(), out.stdout[i + n..].to_vec()),
        None => (String::new(), out.stdout.clone()),
    };
    let mut status = "200 OK".to_string();
    let mut response_headers = String::new();
    for line in head.lines() {
        match line.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_string(),
            Some(_) => response_headers.push_str(&format!("{}\r\n", line.trim())),
            None => {}
        }
    }
    stream.write_all(
        format!("HTTP/1.1 {status}\r\n{response_headers}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len())
            .as_bytes(),
    )?;
    stream.write_all(&body)
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        if n == 0 {
            let mut end = String::new();
            reader.read_line(&mut end)?;
            return Ok(body);
        }
        let mut chunk = vec![0; n + 2];
        reader.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk[..n]);
    }
}

fn basic_password(header: &str) -> Option<String> {
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = base64_decode(encoded.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, p)| p.to_string())
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}
