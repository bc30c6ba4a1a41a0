//! Which configured projects are the same repository: URLs compared after normalisation, local
//! paths after canonicalisation, so one repository cannot be polled (and reported) twice under
//! two project paths by spelling its URL differently.
//!
//! Rules (documented in docs/configuration.md):
//! - http(s): scheme-insensitive (GitLab serves both), host lowercased, default port dropped,
//!   userinfo, query and fragment ignored, `.` and `..` segments resolved, a trailing `/` or
//!   `.git` removed, and the path compared case-insensitively (GitLab paths are);
//! - local paths and `file://` URLs: the canonical path (symlinks, `.`, `..` resolved) of the
//!   repository, with a trailing `/.git` (the git dir of a work tree) removed.

use std::path::{Component, Path, PathBuf};

/// The identity of a repository URL as [`Config`](super::Config) stored it (local paths are
/// already absolute), read with the one URL parser, [`crate::urls`].
pub fn repo_identity(url: &str) -> String {
    if let Some(parsed) = crate::urls::web(url) {
        let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
        let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
        let path = parsed.path().trim_end_matches('/');
        let path = path.strip_suffix(".git").unwrap_or(path).trim_end_matches('/');
        return format!("web://{host}{port}{}", path.to_lowercase());
    }
    let local = match crate::urls::parse(url) {
        Some(Ok(parsed)) if parsed.scheme() == "file" => match parsed.to_file_path() {
            Ok(path) => path,
            Err(()) => PathBuf::from(url.split_once("://").map_or(url, |(_, rest)| rest)),
        },
        // Any other URL (validation has refused it): its text is its identity.
        Some(_) => return url.to_string(),
        None => PathBuf::from(url),
    };
    let canonical = std::fs::canonicalize(&local).unwrap_or_else(|_| lexical(&local));
    let canonical = match canonical.file_name() {
        Some(name) if name == ".git" => canonical.parent().map(Path::to_path_buf).unwrap_or(canonical),
        _ => canonical,
    };
    format!("file://{}", canonical.display())
}

/// `.` and `..` resolved without touching the file system (for a path that does not exist yet).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::repo_identity;

    #[test]
    fn spellings_of_one_web_url_are_one_repository() {
        let base = repo_identity("https://gitlab.example.com/acme/spp");
        for other in [
            "https://GitLab.Example.com/acme/spp",
            "https://gitlab.example.com:443/acme/spp",
            "https://gitlab.example.com/./acme/spp",
            "https://gitlab.example.com/acme/x/../spp",
            "https://gitlab.example.com/acme/spp.git",
            "https://gitlab.example.com/acme/spp/",
            "https://oauth2:secret@gitlab.example.com/acme/spp",
            "http://gitlab.example.com/acme/spp",
        ] {
            assert_eq!(repo_identity(other), base, "{other}");
        }
        assert_ne!(repo_identity("https://gitlab.example.com:8443/acme/spp"), base);
        assert_ne!(repo_identity("https://gitlab.example.com/acme/other"), base);
    }

    #[test]
    fn spellings_of_one_local_path_are_one_repository() {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = dir.path().join("spp");
        std::fs::create_dir_all(repo.join(".git")).expect("mkdir");
        let base = repo_identity(&repo.to_string_lossy());
        for other in [
            format!("file://{}", repo.display()),
            format!("{}/", repo.display()),
            format!("{}/./", repo.display()),
            format!("{}/../spp", repo.display()),
            format!("{}/.git", repo.display()),
        ] {
            assert_eq!(repo_identity(&other), base, "{other}");
        }
    }
}
