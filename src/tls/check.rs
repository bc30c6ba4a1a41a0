//! Reading a certificate's subject and validity, for `check-config` (expired, not yet valid,
//! not a certificate) and `status` (expires within 30 days). Only certificates are read here,
//! never a key, so an admin without access to the key can still see an expiry.

use super::{TlsError, TlsFile, TlsSettings, read_certificates};
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use std::path::Path;

/// What is known about one certificate of a configured file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub subject: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Parses one DER certificate; an unparseable one is [`TlsError::NotACertificate`].
pub(super) fn parse(file: TlsFile, path: &Path, der: &CertificateDer<'_>) -> Result<Certificate, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| TlsError::NotACertificate {
        file,
        path: path.into(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    let validity = cert.validity();
    Ok(Certificate {
        subject: cert.subject().to_string(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

fn date(unix: i64) -> String {
    jiff::Timestamp::from_second(unix).map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_default()
}

impl TlsSettings {
    /// Loads every certificate and key as a connection would, and checks that each certificate
    /// is valid at `now` (unix seconds). Every problem, one per file.
    pub fn check(&self, now: i64) -> Vec<TlsError> {
        let mut errors = Vec::new();
        for (file, path) in self.certificate_files() {
            match certificates(file, path) {
                Ok(certs) => errors.extend(certs.iter().filter_map(|c| validity_error(file, path, c, now))),
                Err(e) => errors.push(e),
            }
        }
        // The key is checked once the certificates are known to be good: a mismatch against a
        // broken certificate would only repeat the first error.
        if errors.is_empty()
            && let Err(e) = self.identity()
        {
            errors.push(e);
        }
        errors
    }

    fn certificate_files(&self) -> Vec<(TlsFile, &Path)> {
        let mut files = Vec::new();
        if let Some(p) = &self.ca_file {
            files.push((TlsFile::CaFile, p.as_path()));
        }
        if let Some(p) = &self.client_cert_file {
            files.push((TlsFile::ClientCert, p.as_path()));
        }
        files
    }
}

fn certificates(file: TlsFile, path: &Path) -> Result<Vec<Certificate>, TlsError> {
    read_certificates(file, path)?.iter().map(|der| parse(file, path, der)).collect()
}

fn validity_error(file: TlsFile, path: &Path, cert: &Certificate, now: i64) -> Option<TlsError> {
    let subject = cert.subject.clone();
    if now > cert.not_after {
        return Some(TlsError::Expired { file, path: path.into(), subject, not_after: date(cert.not_after) });
    }
    if now < cert.not_before {
        return Some(TlsError::NotYetValid { file, path: path.into(), subject, not_before: date(cert.not_before) });
    }
    None
}

/// A configured certificate that `status` should point out.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateNote {
    /// `project "acme/spp"` or `destination "siem"`.
    pub owner: String,
    /// The config key: `ca_file` or `client_cert_file`.
    pub key: &'static str,
    pub path: String,
    pub subject: String,
    /// RFC 3339.
    pub not_after: String,
    /// Negative once expired.
    pub days_left: i64,
}

/// Certificates of `settings` (owned by `owner`) that expire within `within_days` of `now`, or
/// have expired. A file that cannot be read is left to `check-config`.
pub fn expiring_certificates(owner: &str, settings: &TlsSettings, now: i64, within_days: i64) -> Vec<CertificateNote> {
    let mut notes = Vec::new();
    for (file, path) in settings.certificate_files() {
        for cert in certificates(file, path).unwrap_or_default() {
            let days_left = (cert.not_after - now).div_euclid(86_400);
            if days_left < within_days {
                notes.push(CertificateNote {
                    owner: owner.to_string(),
                    key: file.key(),
                    path: path.display().to_string(),
                    subject: cert.subject,
                    not_after: date(cert.not_after),
                    days_left,
                });
            }
        }
    }
    notes
}
