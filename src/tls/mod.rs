//! The one trust policy for every TLS connection the program makes (git fetches, HTTP
//! destinations, and the coming GitLab API and NATS clients).
//!
//! Invariants:
//! - the roots are the operating system's trust store, read the way OpenSSL-based tools read it
//!   (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set, else the distribution's bundle that
//!   `update-ca-certificates` writes), plus the `ca_file` of the connection when one is set;
//!   no compiled-in root list is used;
//! - `ca_file` and the client certificate are read each time a client is built, and the system
//!   store at most [`SYSTEM_STORE_TTL`] after it was last read (thousands of projects share one
//!   reading), so a CA added with `update-ca-certificates`, a rotated `ca_file` or client
//!   certificate is picked up without a restart;
//! - a private key is never logged: [`ClientIdentity`]'s `Debug` shows the certificate only;
//! - a private key readable by group or other users is refused, never used.

mod check;

pub use check::{CertificateNote, expiring_certificates};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one reading of the system trust store is reused.
pub const SYSTEM_STORE_TTL: Duration = Duration::from_secs(60);

/// TLS settings of one connection as configured: `ca_file`, `client_cert_file`,
/// `client_key_file` (absolute paths). Shared by `[[projects]]`, `[[destinations]]` and the coming
/// `[gitlab]` and `[cluster]` sections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM file with one or more CA certificates trusted in addition to the system store.
    pub ca_file: Option<PathBuf>,
    /// PEM file: the client certificate, then any intermediates.
    pub client_cert_file: Option<PathBuf>,
    /// PEM file: the client certificate's private key (PKCS#8, PKCS#1 or SEC1), mode 0600.
    pub client_key_file: Option<PathBuf>,
}

/// Which setting a [`TlsError`] is about, so config errors point at the right key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    CaFile,
    ClientCert,
    ClientKey,
}

impl TlsFile {
    pub fn key(self) -> &'static str {
        match self {
            TlsFile::CaFile => "ca_file",
            TlsFile::ClientCert => "client_cert_file",
            TlsFile::ClientKey => "client_key_file",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { file: TlsFile, path: PathBuf, source: std::io::Error },
    #[error("{} is not a PEM certificate file ({reason})", path.display())]
    NotACertificate { file: TlsFile, path: PathBuf, reason: String },
    #[error("certificate {subject:?} in {} expired on {not_after}", path.display())]
    Expired { file: TlsFile, path: PathBuf, subject: String, not_after: String },
    #[error("certificate {subject:?} in {} is not valid before {not_before}", path.display())]
    NotYetValid { file: TlsFile, path: PathBuf, subject: String, not_before: String },
    #[error("{} holds no private key ({reason})", path.display())]
    NotAKey { path: PathBuf, reason: String },
    #[error(
        "private key {} is readable by other users (mode {mode:o}); restrict it with `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyReadableByOthers { path: PathBuf, mode: u32 },
    #[error("private key {} does not match the certificate in {} ({reason})", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf, reason: String },
    #[error("cannot build a TLS client: {0}")]
    Client(String),
}

impl TlsError {
    /// The setting the error is about.
    pub fn file(&self) -> Option<TlsFile> {
        match self {
            TlsError::Read { file, .. }
            | TlsError::NotACertificate { file, .. }
            | TlsError::Expired { file, .. }
            | TlsError::NotYetValid { file, .. } => Some(*file),
            TlsError::NotAKey { .. } | TlsError::KeyReadableByOthers { .. } | TlsError::KeyMismatch { .. } => {
                Some(TlsFile::ClientKey)
            }
            TlsError::Client(_) => None,
        }
    }
}

/// A client certificate chain and its key, loaded and checked to belong together.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The key file as read, for ureq, which takes keys as PEM.
    key_pem: Vec<u8>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity").field("chain", &self.chain.len()).field("key", &"[redacted]").finish()
    }
}

/// What a TLS client of ours trusts and presents.
#[derive(Debug)]
pub struct TrustPolicy {
    /// System store plus `ca_file`.
    pub roots: Vec<CertificateDer<'static>>,
    pub identity: Option<ClientIdentity>,
}

impl TlsSettings {
    /// The roots (system store + `ca_file`) and the client identity, read now.
    pub fn load(&self) -> Result<TrustPolicy, TlsError> {
        let identity = self.identity()?;
        let mut roots = system_roots().as_ref().clone();
        if let Some(path) = &self.ca_file {
            roots.extend(read_certificates(TlsFile::CaFile, path)?);
        }
        Ok(TrustPolicy { roots, identity })
    }

    /// The client certificate and key, loaded and matched; None when not configured.
    pub fn identity(&self) -> Result<Option<ClientIdentity>, TlsError> {
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Ok(Some(load_identity(cert, key)?)),
            _ => Ok(None),
        }
    }
}

impl TrustPolicy {
    /// For ureq (HTTP destinations): the same roots and identity, verified by rustls/webpki.
    pub fn ureq_config(&self) -> Result<ureq::tls::TlsConfig, TlsError> {
        let roots: Vec<ureq::tls::Certificate<'static>> =
            self.roots.iter().map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned()).collect();
        let client = match &self.identity {
            Some(id) => {
                let chain: Vec<_> =
                    id.chain.iter().map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned()).collect();
                // The same first key of the file that `load` matched against the certificate.
                let key = ureq::tls::PrivateKey::from_pem(&id.key_pem)
                    .map_err(|_| TlsError::Client("the client key cannot be handed to the HTTP client".into()))?;
                Some(ureq::tls::ClientCert::new_with_certs(&chain, key))
            }
            None => None,
        };
        Ok(ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(provider())
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
            .client_cert(client)
            .build())
    }

    /// For reqwest (git fetches through gix) and any other rustls client.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut store = rustls::RootCertStore::empty();
        store.add_parsable_certificates(self.roots.iter().cloned());
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Client(e.to_string()))?
            .with_root_certificates(store);
        match &self.identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| TlsError::Client(e.to_string())),
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

/// One crypto provider for every client, chosen explicitly: two are linked in (ring through
/// ureq, aws-lc-rs through reqwest), and rustls refuses to guess between them.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The operating system's trust store, read at most once per [`SYSTEM_STORE_TTL`].
pub fn system_roots() -> Arc<Vec<CertificateDer<'static>>> {
    static CACHE: Mutex<Option<(Instant, Arc<Vec<CertificateDer<'static>>>)>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((read_at, roots)) = cache.as_ref()
        && read_at.elapsed() < SYSTEM_STORE_TTL
    {
        return Arc::clone(roots);
    }
    let roots = Arc::new(read_system_roots());
    *cache = Some((Instant::now(), Arc::clone(&roots)));
    roots
}

/// The operating system's trust store as OpenSSL reads it: `SSL_CERT_FILE` / `SSL_CERT_DIR`
/// when set, else the system bundle (e.g. `/etc/ssl/certs/ca-certificates.crt`).
fn read_system_roots() -> Vec<CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "a certificate of the system trust store could not be read");
    }
    if found.certs.is_empty() {
        tracing::warn!("the system trust store is empty: only a configured `ca_file` is trusted");
    }
    found.certs
}

/// Every certificate of a PEM file; a file without one is an error.
pub fn read_certificates(file: TlsFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { file, path: path.into(), source })?;
    let not_cert = |reason: String| TlsError::NotACertificate { file, path: path.into(), reason };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_cert(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(not_cert("no BEGIN CERTIFICATE block found".into()));
    }
    for cert in &certs {
        check::parse(file, path, cert)?;
    }
    Ok(certs)
}

fn load_identity(cert_path: &Path, key_path: &Path) -> Result<ClientIdentity, TlsError> {
    let chain = read_certificates(TlsFile::ClientCert, cert_path)?;
    check_key_mode(key_path)?;
    let bytes = std::fs::read(key_path).map_err(|source| TlsError::Read {
        file: TlsFile::ClientKey,
        path: key_path.into(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::NotAKey {
        path: key_path.into(),
        // The error names the PEM structure, never the key bytes.
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no BEGIN PRIVATE KEY block found".into(),
            other => format!("bad PEM: {other}"),
        },
    })?;
    let provider = provider();
    let certified = rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider);
    if let Err(e) = certified {
        return Err(match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                key: key_path.into(),
                cert: cert_path.into(),
                reason: "its public key is not the certificate's".into(),
            },
            other => TlsError::NotAKey { path: key_path.into(), reason: other.to_string() },
        });
    }
    Ok(ClientIdentity { chain, key, key_pem: bytes })
}

/// A key readable by group or others is refused: a leaked client key lets anyone impersonate
/// this service to the SIEM.
fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        file: TlsFile::ClientKey,
        path: path.into(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyReadableByOthers { path: path.into(), mode });
    }
    Ok(())
}

/// What to tell the operator about a failed TLS handshake found anywhere in `error`'s source
/// chain, with the setting that fixes it. None when the error is not a TLS one.
pub fn handshake_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(tls));
        }
        // `io::Error::source` skips the error it wraps: look inside.
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
            && let Some(found) = handshake_problem(inner)
        {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// A rustls error in the operator's terms.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let hint = match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "the server's certificate is not signed by a CA this host trusts: set `ca_file` to the internal CA's certificate, or add the CA to the system trust store (update-ca-certificates)"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the server's certificate is not issued for the host name in the URL: use a name the certificate names"
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "the server's certificate has expired",
        E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::HandshakeFailure) => {
            "the server refused our client certificate or requires one: set `client_cert_file` and `client_key_file` to a certificate its CA issued"
        }
        _ => return format!("TLS handshake failed: {e}"),
    };
    format!("TLS handshake failed ({e}): {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_rustls_error_wrapped_in_io_errors_is_found_and_explained() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let outer = anyhow::Error::new(io).context("fetch failed");
        let found = outer.chain().find_map(handshake_problem).expect("found");
        assert!(found.contains("UnknownIssuer") && found.contains("`ca_file`"), "{found}");
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(handshake_problem(&plain), None);
    }

    #[test]
    fn a_key_with_group_or_other_bits_is_refused_and_0600_or_0400_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("client.key");
        std::fs::write(&key, "not read here").expect("write");
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false)] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let result = check_key_mode(&key);
            assert_eq!(result.is_ok(), ok, "mode {mode:o}: {result:?}");
        }
    }

    #[test]
    fn a_file_without_a_certificate_is_named_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
            .expect("write");
        let e = read_certificates(TlsFile::CaFile, &path).expect_err("refused");
        assert!(matches!(e, TlsError::NotACertificate { file: TlsFile::CaFile, .. }), "{e}");
        assert!(e.to_string().starts_with(&format!("{} is not a PEM certificate file", path.display())), "{e}");
    }
}
