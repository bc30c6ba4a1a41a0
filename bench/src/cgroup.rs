//! A memory cgroup of our own, to run a command within a memory limit the way systemd's
//! `MemoryMax=` does: the kernel reclaims page cache and mapped file pages charged to the group
//! before it would kill, so what the command needs, not what it maps, decides whether it fits.
//! cgroup v2 (`/sys/fs/cgroup/memory.max`) or v1 (`/sys/fs/cgroup/memory/…`); needs root.

use anyhow::{Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// A new group `name` limited to `limit` bytes of memory, swap included (none beyond it).
    pub fn create(name: &str, limit: u64) -> Result<MemoryCgroup> {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let dir =
            if v2 { Path::new("/sys/fs/cgroup").join(name) } else { Path::new("/sys/fs/cgroup/memory").join(name) };
        if !dir.exists() {
            std::fs::create_dir(&dir).with_context(|| format!("cannot create the cgroup {}", dir.display()))?;
        }
        let group = MemoryCgroup { dir, v2 };
        if v2 {
            group.write("memory.max", &limit.to_string())?;
            // Absent when swap is not accounted: then there is none to limit.
            let _ = group.write("memory.swap.max", "0");
        } else {
            group.write("memory.limit_in_bytes", &limit.to_string())?;
            let _ = group.write("memory.memsw.limit_in_bytes", &limit.to_string());
        }
        Ok(group)
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).with_context(|| format!("cannot write {value} to {}", path.display()))
    }

    /// Makes `cmd` start inside the group (its children follow it there).
    pub fn enter(&self, cmd: &mut Command) -> Result<()> {
        let procs = self.dir.join("cgroup.procs");
        let file =
            File::options().write(true).open(&procs).with_context(|| format!("cannot open {}", procs.display()))?;
        // SAFETY: the closure only calls write(2) on a descriptor opened before the fork (it
        // stays open until exec); it allocates nothing. "0" moves the writing process.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// The group's peak memory charge since the last reset, bytes (page cache included).
    pub fn peak(&self) -> Option<u64> {
        let file = if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
        std::fs::read_to_string(self.dir.join(file)).ok()?.trim().parse().ok()
    }

    /// Starts the peak again (v2 before Linux 6.12 cannot: its peak is then the group's since it
    /// was made).
    pub fn reset(&self) {
        if !self.v2 {
            let _ = self.write("memory.max_usage_in_bytes", "0");
        } else {
            let _ = self.write("memory.peak", "0");
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty by then: every command run in it has exited.
        let _ = std::fs::remove_dir(&self.dir);
    }
}
