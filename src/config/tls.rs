//! `ca_file`, `client_cert_file`, `client_key_file` of any section -> [`TlsSettings`]. When the
//! config is loaded for running (secrets resolved), every certificate and key is loaded and
//! checked here, so `check-config` names the file that is wrong and why.

use super::Checker;
use crate::tls::{TlsFile, TlsSettings};
use std::path::Path;
use toml::Spanned;

impl Checker<'_> {
    /// `files` are the raw `ca_file`, `client_cert_file`, `client_key_file` of the section of
    /// `owner` (e.g. `destination "siem"`).
    pub(super) fn tls(&mut self, owner: &str, files: [&Option<Spanned<String>>; 3], base: &Path) -> TlsSettings {
        let [ca, cert, key] = files;
        let path_of = |v: &Option<Spanned<String>>| v.as_ref().map(|p| base.join(p.get_ref().trim()));
        let settings =
            TlsSettings { ca_file: path_of(ca), client_cert_file: path_of(cert), client_key_file: path_of(key) };
        for (value, name) in [(ca, "ca_file"), (cert, "client_cert_file"), (key, "client_key_file")] {
            if let Some(v) = value
                && v.get_ref().trim().is_empty()
            {
                self.error_at(v, format!("{owner}: `{name}` must not be empty"));
                return TlsSettings::default();
            }
        }
        match (cert, key) {
            (Some(c), None) => {
                self.error_at(
                    c,
                    format!("{owner}: `client_cert_file` needs `client_key_file` (the certificate's private key)"),
                );
                return settings;
            }
            (None, Some(k)) => {
                self.error_at(
                    k,
                    format!("{owner}: `client_key_file` needs `client_cert_file` (the certificate of the key)"),
                );
                return settings;
            }
            _ => {}
        }
        // Like secrets, certificates and keys are read only by the process that will use them.
        if !self.resolve_secrets {
            return settings;
        }
        let now = jiff::Timestamp::now().as_second();
        for e in settings.check(now) {
            let at = match e.file() {
                Some(TlsFile::CaFile) => ca,
                Some(TlsFile::ClientCert) => cert,
                Some(TlsFile::ClientKey) | None => key,
            };
            match at.as_ref().or(ca.as_ref()) {
                Some(at) => self.error_at(at, format!("{owner}: `{}`: {e}", e.file().map_or("tls", TlsFile::key))),
                None => self.errors.push(format!("{owner}: {e}")),
            }
        }
        settings
    }
}
