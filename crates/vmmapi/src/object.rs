//! Named VM objects: bhyve's `/dev/vmm/NAME`, as a directory `$RHYVE_RUNDIR/NAME/`.
//!
//! | file         | what                                                                  |
//! |--------------|-----------------------------------------------------------------------|
//! | `pid`        | flock-ed by the process using the object (rhyveload while loading,    |
//! |              | rhyve while running); holds its pid. Emptied on a clean release, so   |
//! |              | an unlocked pid file that still names a pid marks a crashed owner.    |
//! | `config`     | `ram_bytes=N`: present only for persistent objects (rhyveload,        |
//! |              | `rhyvectl --create`), which outlive the processes using them          |
//! | `memory`     | guest RAM, sized to `ram_bytes`                                       |
//! | `boot-state` | written by rhyveload: what rhyve must put in the boot vCPU            |
//! | `control.sock`, `comN.pty` | served by a running rhyve                               |
//!
//! An object rhyve creates itself for a direct (`--kernel`) boot is ephemeral: its
//! directory goes away when rhyve exits, Firecracker-style. A persistent object stays until
//! [`destroy`] (or `rhyve -D` on power-off).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::rundir::{valid_name, RunDir};
use crate::{Error, Result};

/// File names inside an object's directory.
pub const PID_FILE: &str = "pid";
/// See the module table.
pub const CONFIG_FILE: &str = "config";
/// See the module table.
pub const MEMORY_FILE: &str = "memory";
/// See the module table.
pub const BOOT_STATE_FILE: &str = "boot-state";

/// What an object is doing, as [`list`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectState {
    /// A process (rhyve or rhyveload) holds its lock.
    Running {
        /// The pid recorded in its pid file (-1 when unreadable).
        pid: i32,
    },
    /// Idle, with a boot-state waiting for rhyve.
    Loaded,
    /// Idle, nothing loaded.
    Created,
    /// Its owner died without releasing it (e.g. `kill -9`).
    Stale {
        /// The dead owner's pid.
        pid: i32,
    },
}

impl std::fmt::Display for ObjectState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectState::Running { pid } => write!(f, "running (pid {pid})"),
            ObjectState::Loaded => f.write_str("loaded"),
            ObjectState::Created => f.write_str("created"),
            ObjectState::Stale { pid } => write!(f, "stale (pid {pid} gone)"),
        }
    }
}

/// One entry of [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// VM name.
    pub name: String,
    /// Its directory.
    pub path: PathBuf,
    /// What it is doing.
    pub state: ObjectState,
    /// RAM size from `config` (None for ephemeral objects).
    pub ram_bytes: Option<u64>,
    /// Outlives the processes using it (created by rhyveload or `rhyvectl --create`).
    pub persistent: bool,
}

/// A named VM's directory, locked by this process for as long as the value lives.
#[derive(Debug)]
pub struct VmObject {
    name: String,
    path: PathBuf,
    pid_file: File,
    ram_bytes: u64,
    /// Removed on drop (ephemeral objects, or a persistent one after [`VmObject::remove_on_drop`]).
    remove: AtomicBool,
    stale_pid: Option<i32>,
}

/// The base directory: `$RHYVE_RUNDIR`, default `/run/rhyve`.
pub fn base() -> PathBuf {
    RunDir::base()
}

fn io_err(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    let what = what.to_string();
    move |e| Error::RunDir {
        path,
        msg: format!("{what}: {e}"),
    }
}

/// The pid recorded in a pid file (None: empty or unreadable).
fn recorded_pid(file: &mut File) -> Option<i32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Opens `dir/pid` (creating it) and takes its exclusive lock. `Ok(Err(pid))` when another
/// process holds it. A few short retries ride out [`list`]'s momentary probe.
fn lock_pid_file(dir: &Path) -> Result<std::result::Result<File, i32>> {
    let p = dir.join(PID_FILE);
    let mut reopened = 0;
    let mut file = open_pid_file(&p)?;
    let mut attempt = 0;
    while attempt < 4 {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // The lock may be on a pid file that a destroy removed while we waited: only the
            // file still at the path counts. Open again (a removed object then fails cleanly).
            if still_linked_at(&file, &p) {
                return Ok(Ok(file));
            }
            reopened += 1;
            if reopened > 3 {
                return Err(Error::RunDir {
                    path: p.display().to_string(),
                    msg: "the VM object keeps being replaced".into(),
                });
            }
            file = open_pid_file(&p)?;
            continue;
        }
        attempt += 1;
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_err(&p, "cannot lock pid file")(e));
        }
        if attempt < 4 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(Err(recorded_pid(&mut file).unwrap_or(-1)))
}

fn open_pid_file(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .map_err(io_err(p, "cannot open pid file"))
}

/// Whether `file` is still the file at `path` (not unlinked, not replaced).
fn still_linked_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(now)) => {
            open.nlink() > 0 && open.dev() == now.dev() && open.ino() == now.ino()
        }
        _ => false,
    }
}

fn write_pid(file: &mut File, path: &Path) -> Result<()> {
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .map_err(io_err(&path.join(PID_FILE), "cannot write pid file"))
}

fn read_config(dir: &Path) -> Result<Option<u64>> {
    let p = dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&p, "cannot read")(e)),
    };
    text.lines()
        .find_map(|l| l.trim().strip_prefix("ram_bytes="))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > 0)
        .map(Some)
        .ok_or_else(|| Error::RunDir {
            path: p.display().to_string(),
            msg: "no valid ram_bytes= line".into(),
        })
}

/// Removes everything in `dir` but the pid file (whose lock the caller holds).
fn clear_dir(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(io_err(dir, "cannot list"))?;
    for e in entries.flatten() {
        if e.file_name() == PID_FILE {
            continue;
        }
        let p = e.path();
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(io_err(&p, "cannot remove"))?;
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

/// More than any boot-state the loader writes (its parser refuses over 1 MiB).
const BOOT_STATE_READ_LIMIT: u64 = 2 << 20;

impl VmObject {
    /// Creates persistent object `name` with `ram_bytes` of (zeroed) guest RAM.
    /// In the default base, which gets its huge-page tmpfs first ([`crate::hugepages`]).
    pub fn create(name: &str, ram_bytes: u64) -> Result<Self> {
        crate::hugepages::prepare_base(&base());
        Self::create_in(&base(), name, ram_bytes)
    }

    /// [`VmObject::create`] under `base`.
    pub fn create_in(base: &Path, name: &str, ram_bytes: u64) -> Result<Self> {
        check_name(name)?;
        if ram_bytes == 0 {
            return Err(Error::Memory("no guest RAM requested".into()));
        }
        std::fs::create_dir_all(base).map_err(io_err(base, "cannot create"))?;
        let path = base.join(name);
        let fresh = match std::fs::create_dir(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_err(&path, "cannot create")(e)),
        };
        let mut pid_file = lock_pid_file(&path)?.map_err(|pid| Error::InUse {
            name: name.to_string(),
            pid,
        })?;
        if !fresh {
            if path.join(CONFIG_FILE).exists() {
                return Err(match recorded_pid(&mut pid_file) {
                    Some(pid) => Error::Stale {
                        name: name.to_string(),
                        pid,
                    },
                    None => Error::Exists(name.to_string()),
                });
            }
            // No config: a crashed direct boot's leftovers (or an interrupted create). We
            // hold the lock, so nobody uses them: start afresh.
            clear_dir(&path)?;
        }
        let made = (|| {
            write_pid(&mut pid_file, &path)?;
            let mem = path.join(MEMORY_FILE);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&mem)
                .map_err(io_err(&mem, "cannot create"))?;
            f.set_len(ram_bytes)
                .map_err(io_err(&mem, "cannot size the RAM file"))?;
            // `config` last: it is what makes the directory a persistent object.
            let cfg = path.join(CONFIG_FILE);
            std::fs::write(&cfg, format!("ram_bytes={ram_bytes}\n"))
                .map_err(io_err(&cfg, "cannot write"))
        })();
        let object = Self {
            name: name.to_string(),
            path,
            pid_file,
            ram_bytes,
            // A failed create leaves nothing behind (we hold the lock until then).
            remove: AtomicBool::new(made.is_err()),
            stale_pid: None,
        };
        made.map(|()| object)
    }

    /// Opens and locks existing, idle, persistent object `name`.
    pub fn open(name: &str) -> Result<Self> {
        Self::open_in(&base(), name)
    }

    /// [`VmObject::open`] under `base`.
    pub fn open_in(base: &Path, name: &str) -> Result<Self> {
        check_name(name)?;
        let path = base.join(name);
        if !path.is_dir() {
            return Err(Error::NoObject(name.to_string()));
        }
        let mut pid_file = lock_pid_file(&path)?.map_err(|pid| Error::InUse {
            name: name.to_string(),
            pid,
        })?;
        // No config: a direct boot's (ephemeral) leftovers, not an object one can open.
        let ram_bytes = read_config(&path)?.ok_or_else(|| Error::NoObject(name.to_string()))?;
        if let Some(pid) = recorded_pid(&mut pid_file) {
            return Err(Error::Stale {
                name: name.to_string(),
                pid,
            });
        }
        write_pid(&mut pid_file, &path)?;
        Ok(Self {
            name: name.to_string(),
            path,
            pid_file,
            ram_bytes,
            remove: AtomicBool::new(false),
            stale_pid: None,
        })
    }

    /// An ephemeral object for a direct boot (removed when dropped). A stale ephemeral
    /// directory (a crashed direct boot) is taken over, as before; a persistent object of
    /// that name is not: use [`VmObject::open`] for it.
    pub fn create_ephemeral(name: &str) -> Result<Self> {
        crate::hugepages::prepare_base(&base());
        Self::create_ephemeral_in(&base(), name)
    }

    /// [`VmObject::create_ephemeral`] under `base`.
    pub fn create_ephemeral_in(base: &Path, name: &str) -> Result<Self> {
        check_name(name)?;
        let path = base.join(name);
        std::fs::create_dir_all(&path).map_err(io_err(&path, "cannot create"))?;
        let mut pid_file = lock_pid_file(&path)?.map_err(|pid| Error::InUse {
            name: name.to_string(),
            pid,
        })?;
        let old = recorded_pid(&mut pid_file);
        if path.join(CONFIG_FILE).exists() {
            // Release without touching the persistent object's pid file.
            return Err(match old {
                Some(pid) => Error::Stale {
                    name: name.to_string(),
                    pid,
                },
                None => Error::Exists(name.to_string()),
            });
        }
        write_pid(&mut pid_file, &path)?;
        Ok(Self {
            name: name.to_string(),
            path,
            pid_file,
            ram_bytes: 0,
            remove: AtomicBool::new(true),
            stale_pid: old.filter(|p| *p != std::process::id() as i32),
        })
    }

    /// The VM name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The object's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// RAM size (0 for an ephemeral object, whose RAM the VM sizes itself).
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// Whether the object outlives this process.
    pub fn persistent(&self) -> bool {
        !self.remove.load(Ordering::Relaxed)
    }

    /// The pid of a crashed direct boot whose directory [`VmObject::create_ephemeral`]
    /// took over.
    pub fn stale_pid(&self) -> Option<i32> {
        self.stale_pid
    }

    /// Makes the object go away when this value is dropped (`rhyve -D` on power-off).
    pub fn remove_on_drop(&self) {
        self.remove.store(true, Ordering::Relaxed);
    }

    /// The guest RAM file, opened read/write (ephemeral objects: created empty).
    pub fn memory_file(&self) -> Result<File> {
        let p = self.path.join(MEMORY_FILE);
        let ephemeral = self.ram_bytes == 0;
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(ephemeral)
            .truncate(ephemeral)
            // Guest RAM may hold the guest's secrets.
            .mode(0o600)
            .open(&p)
            .map_err(io_err(&p, "cannot open"))
    }

    /// Zeroes guest RAM (releasing its pages), as for a fresh VM: bhyveload's `vm_reinit`.
    pub fn clear_memory(&self) -> Result<()> {
        let p = self.path.join(MEMORY_FILE);
        let f = self.memory_file()?;
        f.set_len(0)
            .and_then(|_| f.set_len(self.ram_bytes))
            .map_err(io_err(&p, "cannot clear"))
    }

    /// Replaces `boot-state` atomically (write + rename).
    pub fn write_boot_state(&self, text: &str) -> Result<()> {
        let p = self.path.join(BOOT_STATE_FILE);
        let tmp = self.path.join(format!("{BOOT_STATE_FILE}.tmp"));
        std::fs::write(&tmp, text).map_err(io_err(&tmp, "cannot write"))?;
        std::fs::rename(&tmp, &p).map_err(io_err(&p, "cannot write"))
    }

    /// The boot-state text, None when nothing is loaded.
    pub fn read_boot_state(&self) -> Result<Option<String>> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.path.join(BOOT_STATE_FILE);
        // Never follows a symlink, and reads at most a little more than any boot-state can be
        // (the parser refuses the oversized rest): the file is outside rhyve's control.
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
        {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&p, "cannot read")(e)),
        };
        let mut text = String::new();
        file.take(BOOT_STATE_READ_LIMIT)
            .read_to_string(&mut text)
            .map_err(io_err(&p, "cannot read"))?;
        Ok(Some(text))
    }

    /// Removes `boot-state` (rhyve consumes it: after a reboot the guest must be loaded again).
    pub fn clear_boot_state(&self) -> Result<()> {
        let p = self.path.join(BOOT_STATE_FILE);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&p, "cannot remove")(e)),
        }
    }
}

impl Drop for VmObject {
    fn drop(&mut self) {
        if self.remove.load(Ordering::Relaxed) {
            // Still holding the lock, so nobody else is using the directory.
            let _ = remove_locked_dir(&self.path);
        } else {
            // A clean release: an empty pid file (the lock goes with the fd).
            let _ = self.pid_file.set_len(0);
        }
    }
}

/// Removes idle or stale object `name` (ephemeral leftovers too).
pub fn destroy(name: &str) -> Result<()> {
    destroy_in(&base(), name)
}

/// [`destroy`] under `base`.
pub fn destroy_in(base: &Path, name: &str) -> Result<()> {
    check_name(name)?;
    let path = base.join(name);
    if !path.is_dir() {
        return Err(Error::NoObject(name.to_string()));
    }
    let _lock = lock_pid_file(&path)?.map_err(|pid| Error::InUse {
        name: name.to_string(),
        pid,
    })?;
    remove_locked_dir(&path)
}

/// Removes an object's directory whose lock the caller holds: first out of the name's way
/// (one rename; dot names are never listed nor valid VM names), then deleted, so nobody can
/// open the dying object's files by name meanwhile.
fn remove_locked_dir(path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tomb = path.with_file_name(format!(".{name}.destroying.{}", std::process::id()));
    std::fs::rename(path, &tomb).map_err(io_err(path, "cannot remove"))?;
    std::fs::remove_dir_all(&tomb).map_err(io_err(&tomb, "cannot remove"))
}

/// Every object under the base directory, sorted by name.
pub fn list() -> Result<Vec<ObjectInfo>> {
    list_in(&base())
}

/// [`list`] under `base`.
pub fn list_in(base: &Path) -> Result<Vec<ObjectInfo>> {
    let entries = match std::fs::read_dir(base) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(base, "cannot list")(e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !valid_name(&name) || !path.is_dir() {
            continue;
        }
        if let Some(info) = inspect(&name, &path) {
            out.push(info);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// One object's state, probing its lock without taking it over (a shared lock, dropped at
/// once). None when the directory has no pid file (not an object, or being created).
fn inspect(name: &str, path: &Path) -> Option<ObjectInfo> {
    let mut f = File::open(path.join(PID_FILE)).ok()?;
    // SAFETY: flock on a file descriptor we own.
    let free = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    let pid = recorded_pid(&mut f);
    drop(f);
    let ram_bytes = read_config(path).ok().flatten();
    let state = match (free, pid) {
        (false, pid) => ObjectState::Running {
            pid: pid.unwrap_or(-1),
        },
        (true, Some(pid)) => ObjectState::Stale { pid },
        (true, None) if path.join(BOOT_STATE_FILE).exists() => ObjectState::Loaded,
        (true, None) => ObjectState::Created,
    };
    Some(ObjectInfo {
        name: name.to_string(),
        path: path.to_path_buf(),
        state,
        ram_bytes,
        persistent: ram_bytes.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rhyve-object-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn create_open_persist_destroy() {
        let base = scratch("life");
        let obj = VmObject::create_in(&base, "vm0", 1 << 20).unwrap();
        assert_eq!(obj.ram_bytes(), 1 << 20);
        assert!(obj.persistent());
        assert_eq!(
            obj.memory_file().unwrap().metadata().unwrap().len(),
            1 << 20
        );
        // Locked while we hold it: running, by us.
        let me = std::process::id() as i32;
        assert!(matches!(
            VmObject::open_in(&base, "vm0"),
            Err(Error::InUse { pid, .. }) if pid == me
        ));
        let e = VmObject::create_in(&base, "vm0", 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), format!("vm0 is running (pid {me})"));
        assert!(matches!(destroy_in(&base, "vm0"), Err(Error::InUse { .. })));
        assert_eq!(
            list_in(&base).unwrap()[0].state,
            ObjectState::Running { pid: me }
        );

        assert_eq!(obj.read_boot_state().unwrap(), None);
        obj.write_boot_state("hello\n").unwrap();
        drop(obj);
        let l = list_in(&base).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(
            (l[0].state, l[0].ram_bytes),
            (ObjectState::Loaded, Some(1 << 20))
        );
        assert!(matches!(
            VmObject::create_in(&base, "vm0", 1 << 20),
            Err(Error::Exists(_))
        ));
        let obj = VmObject::open_in(&base, "vm0").unwrap();
        assert_eq!(obj.read_boot_state().unwrap().as_deref(), Some("hello\n"));
        obj.clear_boot_state().unwrap();
        obj.clear_boot_state().unwrap();
        drop(obj);
        assert_eq!(list_in(&base).unwrap()[0].state, ObjectState::Created);
        destroy_in(&base, "vm0").unwrap();
        assert!(!base.join("vm0").exists());
        assert!(matches!(destroy_in(&base, "vm0"), Err(Error::NoObject(_))));
        assert!(matches!(
            VmObject::open_in(&base, "vm0"),
            Err(Error::NoObject(_))
        ));
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn stale_objects_are_reported_and_destroyable() {
        let base = scratch("stale");
        let obj = VmObject::create_in(&base, "vm1", 1 << 20).unwrap();
        drop(obj);
        // What a crash leaves: the lock went with the process, its pid stayed.
        std::fs::write(base.join("vm1").join(PID_FILE), "999999999\n").unwrap();
        let e = VmObject::open_in(&base, "vm1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "stale VM object vm1 (pid 999999999 gone); remove it with rhyvectl --vm=vm1 --destroy"
        );
        assert!(matches!(
            VmObject::create_in(&base, "vm1", 1 << 20),
            Err(Error::Stale { .. })
        ));
        assert!(matches!(
            VmObject::create_ephemeral_in(&base, "vm1"),
            Err(Error::Stale { .. })
        ));
        assert_eq!(
            list_in(&base).unwrap()[0].state,
            ObjectState::Stale { pid: 999999999 }
        );
        destroy_in(&base, "vm1").unwrap();
        assert!(list_in(&base).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn ephemeral_objects_go_away_and_remove_on_drop_works() {
        let base = scratch("eph");
        let obj = VmObject::create_ephemeral_in(&base, "vm2").unwrap();
        assert!(!obj.persistent());
        let dir = obj.path().to_path_buf();
        assert!(matches!(
            VmObject::create_ephemeral_in(&base, "vm2"),
            Err(Error::InUse { .. })
        ));
        assert_eq!(
            list_in(&base).unwrap()[0],
            ObjectInfo {
                name: "vm2".into(),
                path: dir.clone(),
                state: ObjectState::Running {
                    pid: std::process::id() as i32
                },
                ram_bytes: None,
                persistent: false,
            }
        );
        drop(obj);
        assert!(!dir.exists());

        let p = VmObject::create_in(&base, "vm3", 4096).unwrap();
        p.remove_on_drop();
        let dir = p.path().to_path_buf();
        drop(p);
        assert!(!dir.exists());
        let _ = std::fs::remove_dir_all(&base);
    }

    /// A crashed direct boot leaves a directory without `config`: not an object to open,
    /// taken over by the next direct boot (as before named objects existed).
    #[test]
    fn stale_ephemeral_leftovers_are_taken_over() {
        let base = scratch("eph-stale");
        let dir = base.join("vm6");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(PID_FILE), "999999998\n").unwrap();
        std::fs::write(dir.join(MEMORY_FILE), "old").unwrap();
        assert!(matches!(
            VmObject::open_in(&base, "vm6"),
            Err(Error::NoObject(_))
        ));
        assert_eq!(
            list_in(&base).unwrap()[0].state,
            ObjectState::Stale { pid: 999999998 }
        );
        let o = VmObject::create_ephemeral_in(&base, "vm6").unwrap();
        assert_eq!(o.stale_pid(), Some(999999998));
        assert_eq!(o.memory_file().unwrap().metadata().unwrap().len(), 0);
        drop(o);
        assert!(!dir.exists());
        // rhyveload's create takes such leftovers over as well.
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join(PID_FILE), "999999998\n").unwrap();
        std::fs::write(dir.join("com1.pty"), "x").unwrap();
        let o = VmObject::create_in(&base, "vm6", 4096).unwrap();
        assert!(!dir.join("com1.pty").exists() && !dir.join("sub").exists());
        let mode = std::fs::metadata(dir.join(MEMORY_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        drop(o);
        assert_eq!(list_in(&base).unwrap()[0].state, ObjectState::Created);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_waiter_never_owns_a_removed_object() {
        let base = scratch("removed");
        let obj = VmObject::create_in(&base, "vm6", 8192).unwrap();
        let dir = obj.path().to_path_buf();
        let pid = dir.join(PID_FILE);
        // Someone opened the pid file and waits for its lock while the object goes away.
        let waiter = open_pid_file(&pid).unwrap();
        assert!(still_linked_at(&waiter, &pid));
        obj.remove_on_drop();
        drop(obj);
        assert!(!still_linked_at(&waiter, &pid));
        assert!(lock_pid_file(&dir).is_err(), "the object is gone");
        let left: Vec<_> = std::fs::read_dir(&base).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn boot_state_is_never_read_through_a_symlink_nor_without_bound() {
        let base = scratch("bs-link");
        let obj = VmObject::create_in(&base, "vm5", 8192).unwrap();
        let target = base.join("elsewhere");
        std::fs::write(&target, "secret").unwrap();
        std::os::unix::fs::symlink(&target, obj.path().join(BOOT_STATE_FILE)).unwrap();
        assert!(obj.read_boot_state().is_err());
        std::fs::remove_file(obj.path().join(BOOT_STATE_FILE)).unwrap();
        let huge = "x".repeat(BOOT_STATE_READ_LIMIT as usize + 4096);
        std::fs::write(obj.path().join(BOOT_STATE_FILE), &huge).unwrap();
        let read = obj.read_boot_state().unwrap().unwrap();
        assert_eq!(read.len() as u64, BOOT_STATE_READ_LIMIT);
        drop(obj);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn clear_memory_zeroes_and_keeps_the_size() {
        use std::os::unix::fs::FileExt;
        let base = scratch("clear");
        let obj = VmObject::create_in(&base, "vm4", 8192).unwrap();
        obj.memory_file()
            .unwrap()
            .write_all_at(b"dirty", 100)
            .unwrap();
        obj.clear_memory().unwrap();
        let mut buf = [1u8; 5];
        let f = obj.memory_file().unwrap();
        f.read_exact_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [0; 5]);
        assert_eq!(f.metadata().unwrap().len(), 8192);
        drop(obj);
        destroy_in(&base, "vm4").unwrap();
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn bad_names_and_sizes_are_refused() {
        let base = scratch("bad");
        assert!(matches!(
            VmObject::create_in(&base, "../x", 4096),
            Err(Error::BadName(_))
        ));
        assert!(matches!(
            VmObject::create_in(&base, "vm5", 0),
            Err(Error::Memory(_))
        ));
        assert!(matches!(destroy_in(&base, "a/b"), Err(Error::BadName(_))));
        let _ = std::fs::remove_dir_all(&base);
    }
}
