//! Git's smart HTTP on 127.0.0.1: `git http-backend` run by fcgiwrap behind nginx, the way a
//! self-hosted git server is usually set up. Serves every repository under a folder, read-only.

use crate::Nginx;
use anyhow::{Context, Result, bail};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct GitHttp {
    /// `http://127.0.0.1:PORT`; a repository `root/NAME` is at `{base}/NAME`.
    pub base: String,
    // Dropped in this order: nginx first, then the CGI runner behind it.
    _nginx: Nginx,
    fcgiwrap: Child,
}

impl GitHttp {
    /// Serves the repositories under `root` (bare or not) on a free port; `dir` holds the
    /// servers' files. fcgiwrap runs `children` CGI processes at once (each request forks one
    /// `git http-backend`, which runs `git upload-pack`).
    pub fn start(dir: &Path, root: &Path, children: usize) -> Result<GitHttp> {
        std::fs::create_dir_all(dir)?;
        let backend = http_backend()?;
        let fcgi_port = crate::free_port()?;
        // /usr/sbin is not on every user's PATH.
        let program = if Path::new("/usr/sbin/fcgiwrap").exists() { "/usr/sbin/fcgiwrap" } else { "fcgiwrap" };
        let fcgiwrap = Command::new(program)
            .args(["-c", &children.to_string(), "-s", &format!("tcp:127.0.0.1:{fcgi_port}")])
            // Its own process group: the children it forks are stopped with it (see `stop`).
            .process_group(0)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start fcgiwrap (apt-get install fcgiwrap)")?;
        // TCP rather than a unix socket: nginx's workers may run as another user than us.
        let mut guard = KillOnDrop(Some(fcgiwrap));
        wait_for_port(fcgi_port, "fcgiwrap")?;
        let port = crate::free_port()?;
        let location = format!(
            "location / {{ client_max_body_size 0; fastcgi_pass 127.0.0.1:{fcgi_port}; \
             fastcgi_param SCRIPT_FILENAME {backend}; fastcgi_param GIT_PROJECT_ROOT {root}; \
             fastcgi_param GIT_HTTP_EXPORT_ALL \"\"; fastcgi_param PATH_INFO $uri; \
             fastcgi_param QUERY_STRING $query_string; fastcgi_param REQUEST_METHOD $request_method; \
             fastcgi_param CONTENT_TYPE $content_type; fastcgi_param CONTENT_LENGTH $content_length; \
             fastcgi_param GIT_PROTOCOL $http_git_protocol; fastcgi_param REMOTE_ADDR $remote_addr; \
             fastcgi_param SERVER_PROTOCOL $server_protocol; }}",
            backend = backend.display(),
            root = root.display(),
        );
        let nginx =
            Nginx::launch(dir, port, &location, "client_body_temp_path {dir}/body; fastcgi_temp_path {dir}/fastcgi;")?;
        let fcgiwrap = guard.0.take().context("fcgiwrap")?;
        Ok(GitHttp { base: format!("http://127.0.0.1:{port}"), _nginx: nginx, fcgiwrap })
    }
}

impl Drop for GitHttp {
    fn drop(&mut self) {
        stop(&mut self.fcgiwrap);
    }
}

struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            stop(&mut child);
        }
    }
}

/// Stops fcgiwrap and the children it forked (its process group): killing the parent alone
/// leaves them running.
fn stop(child: &mut Child) {
    // SAFETY: kill(2) on the process group of our own child has no memory-safety preconditions.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGTERM) };
    let _ = child.wait();
}

/// `git http-backend` of the git on PATH (`git --exec-path`).
fn http_backend() -> Result<PathBuf> {
    let out = Command::new("git").arg("--exec-path").output().context("cannot run git --exec-path")?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("git-http-backend");
    if !path.exists() {
        bail!("{} not found (git's http-backend is needed for the smart HTTP figures)", path.display());
    }
    Ok(path)
}

fn wait_for_port(port: u16, what: &str) -> Result<()> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > until {
            bail!("{what} did not start on 127.0.0.1:{port}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}
