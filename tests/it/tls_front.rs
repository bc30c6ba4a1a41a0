//! TLS for tests: a certificate authority made with the `openssl` CLI (an internal CA as an
//! enterprise runs one), and a TLS front on 127.0.0.1 (rustls) that terminates TLS, optionally
//! requires a client certificate issued by that CA, and passes the bytes to a plain HTTP server
//! behind it (the scripted receiver, or `git http-backend`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and certificates it issued, as PEM files in `dir`:
/// `ca.pem`; `server.pem`/`.key` for 127.0.0.1 and localhost; `wrong-host.pem`/`.key` for
/// wrong.example only; `client.pem`/`.key` for client authentication. Keys are mode 0600.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("mkdir pki");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "90",
                "-subj",
                "/CN=policy-audit test internal CA",
            ],
        );
        let pki = Pki { dir: dir.to_path_buf() };
        pki.issue("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth", 60);
        pki.issue("wrong-host", "subjectAltName=DNS:wrong.example\nextendedKeyUsage=serverAuth", 60);
        pki.issue("client", "extendedKeyUsage=clientAuth", 60);
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Issues `<name>.pem` + `<name>.key` with the given X.509v3 extensions, valid for `days`.
    pub fn issue(&self, name: &str, extensions: &str, days: u32) {
        let ext = self.path(&format!("{name}.ext"));
        std::fs::write(&ext, format!("basicConstraints=CA:FALSE\n{extensions}\n")).expect("write ext");
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        let days = days.to_string();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                &days,
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &pem,
            ],
        );
        chmod(&self.path(&key), 0o600);
    }

    /// Issues `<name>.pem` + `<name>.key` valid only during January 2020 (`openssl ca`, which
    /// takes explicit dates).
    pub fn issue_expired(&self, name: &str) {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        std::fs::write(
            self.path("ca.cnf"),
            "[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nnew_certs_dir=.\nserial=ca.serial\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n",
        )
        .expect("write ca.cnf");
        std::fs::write(self.path("index.txt"), "").expect("write index");
        std::fs::write(self.path("ca.serial"), "1000\n").expect("write serial");
        openssl(
            &self.dir,
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-cert",
                "ca.pem",
                "-keyfile",
                "ca.key",
                "-in",
                &csr,
                "-out",
                &pem,
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200201000000Z",
                "-notext",
            ],
        );
        chmod(&self.path(&key), 0o600);
    }
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap_or_else(|e| {
        panic!("the TLS tests need the `openssl` command line tool (apt-get install openssl): {e}")
    });
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A TLS listener on 127.0.0.1 that forwards each connection, once the handshake succeeded, to
/// a plain server on `backend_port`.
pub struct TlsFront {
    pub port: u16,
    /// Handshakes that failed (no or wrong client certificate, a client that distrusts us).
    pub refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TlsFront {
    /// `cert`/`key`: the server's; `client_ca`: when set, a client certificate issued by this
    /// CA is required.
    pub fn start(backend_port: u16, cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsFront {
        let config = Arc::new(server_config(cert, key, client_ca));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let (refused, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (refused2, stop2) = (refused.clone(), stop.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(serve(listener, config, backend_port, refused2, stop2));
        });
        TlsFront { port, refused, stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn serve(
    listener: std::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    backend_port: u16,
    refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    // Bounded: the front lives at most 120 s even if a test forgets to drop it.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
        let Ok(Ok((tcp, _))) = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await else {
            continue;
        };
        let (acceptor, refused) = (acceptor.clone(), refused.clone());
        tokio::spawn(async move {
            let mut tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(_) => {
                    refused.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            };
            if let Ok(mut backend) = tokio::net::TcpStream::connect(("127.0.0.1", backend_port)).await {
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
            }
        });
    }
}

fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).expect("server cert").collect::<Result<_, _>>().expect("server cert pem");
    let key = PrivateKeyDer::from_pem_file(key).expect("server key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).expect("client ca") {
                roots.add(c.expect("client ca pem")).expect("client ca cert");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(chain, key).expect("server certificate and key")
}
