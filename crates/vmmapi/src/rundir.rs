//! The per-VM runtime directory: the named object other tools find (bhyve's /dev/vmm/NAME).
//!
//! `$RHYVE_RUNDIR/NAME/` (default `/run/rhyve/NAME/`) holds `pid` (flock-ed while the VM
//! lives, so a second VM of the same name is refused and a crashed one is detected as
//! stale) and `memory` (the guest RAM file).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Environment variable overriding the runtime directory base.
pub const RUNDIR_ENV: &str = "RHYVE_RUNDIR";

/// An owned, locked runtime directory. Dropping it removes the directory.
pub struct RunDir {
    path: PathBuf,
    pid_file: File,
    /// Set when a crashed VM's leftovers were found and taken over.
    pub stale_pid: Option<i32>,
}

/// Checks bhyve-compatible VM names; they become path components, so no '/' or "..".
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl RunDir {
    /// The base directory for all VMs.
    pub fn base() -> PathBuf {
        std::env::var_os(RUNDIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/rhyve"))
    }

    /// Creates and locks the runtime directory of VM `name`.
    pub fn create(name: &str) -> Result<Self> {
        Self::create_in(&Self::base(), name)
    }

    /// Creates and locks the runtime directory of VM `name` under `base`.
    pub fn create_in(base: &Path, name: &str) -> Result<Self> {
        if !valid_name(name) {
            return Err(Error::BadName(name.to_string()));
        }
        let path = base.join(name);
        let err = |msg: String| Error::RunDir {
            path: path.display().to_string(),
            msg,
        };
        std::fs::create_dir_all(&path).map_err(|e| err(format!("cannot create: {e}")))?;
        let mut pid_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path.join("pid"))
            .map_err(|e| err(format!("cannot open pid file: {e}")))?;
        let mut old = String::new();
        let _ = pid_file.read_to_string(&mut old);
        let old_pid = old.trim().parse::<i32>().ok();
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(pid_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::VmExists {
                name: name.to_string(),
                pid: old_pid.unwrap_or(-1),
            });
        }
        let stale_pid = old_pid.filter(|p| *p != std::process::id() as i32);
        pid_file
            .set_len(0)
            .and_then(|_| pid_file.rewind())
            .map_err(|e| err(e.to_string()))?;
        writeln!(pid_file, "{}", std::process::id()).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            path,
            pid_file,
            stale_pid,
        })
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates (truncating) the guest RAM file `memory`.
    pub fn create_memory_file(&self) -> Result<File> {
        let p = self.path.join("memory");
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .map_err(|e| Error::RunDir {
                path: p.display().to_string(),
                msg: e.to_string(),
            })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path.join("memory"));
        let _ = std::fs::remove_file(self.path.join("pid"));
        let _ = std::fs::remove_dir(&self.path);
        let _ = &self.pid_file;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("vm0"));
        assert!(valid_name("web-1.prod_a"));
        assert!(!valid_name(""));
        assert!(!valid_name("../etc"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name(&"x".repeat(65)));
    }

    #[test]
    fn same_name_is_refused_while_alive_and_cleaned_after() {
        let base = std::env::temp_dir().join(format!("rhyve-rundir-{}", std::process::id()));
        let first = RunDir::create_in(&base, "vm0").unwrap();
        let second = RunDir::create_in(&base, "vm0");
        assert!(matches!(second, Err(Error::VmExists { .. })));
        let dir = first.path().to_path_buf();
        drop(first);
        assert!(!dir.exists());
        let third = RunDir::create_in(&base, "vm0").unwrap();
        drop(third);
        let _ = std::fs::remove_dir(&base);
    }
}
