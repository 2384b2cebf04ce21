//! Huge pages for guest RAM, keeping RAM a named file other tools can read.
//!
//! Why this mechanism: anonymous THP (QEMU's default) has no file; hugetlbfs and
//! `MFD_HUGETLB` need a pool the administrator reserved ahead (`nr_hugepages`, 0 by default)
//! and fail outright without one. Shared-memory THP needs no reservation, but the system knob
//! (`shmem_enabled`) governs only memfd and SysV shm and is `never` by default; a tmpfs
//! mount's own `huge=` option does not depend on it. So, as libvmmapi loads vmm.ko on first
//! use, vmmapi gives the default runtime base (`/run/rhyve`) a tmpfs of its own, mounted
//! `huge=advise`, when it creates the first VM object there — only while the base is empty,
//! so it never hides objects. Each VM then asks for huge pages on its own mapping
//! (`MADV_HUGEPAGE`; `memory.hugepages=off` asks for none), and 4 KiB pages remain the
//! fallback with one warning. A base the administrator mounted (tmpfs `huge=`, hugetlbfs) is
//! used as it is.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::{Error, Result};

/// `memory.hugepages`: whether guest RAM asks for 2 MiB pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Huge pages where the RAM file's filesystem offers them, else 4 KiB pages and a warning.
    #[default]
    Auto,
    /// Huge pages or an error.
    On,
    /// 4 KiB pages.
    Off,
}

impl HugePages {
    /// Parses `auto`, `on`/`true`/`yes`, `off`/`false`/`no`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "on" | "true" | "yes" => Some(Self::On),
            "off" | "false" | "no" => Some(Self::Off),
            _ => None,
        }
    }
}

/// What a filesystem does about huge pages for a shared file mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FsHuge {
    /// 4 KiB pages only.
    Never,
    /// Huge pages for mappings that ask (tmpfs `huge=advise`).
    Advise,
    /// Huge pages whether asked or not (tmpfs `huge=always|within_size`, hugetlbfs).
    Always,
}

/// Why the base could not get its huge-page tmpfs, for the one warning.
static BASE_REFUSED: Mutex<Option<String>> = Mutex::new(None);
static WARNED: AtomicBool = AtomicBool::new(false);

const TMPFS_OPTIONS: &str = "mode=0755,huge=advise,size=100%";

/// Gives `base` a huge-page tmpfs unless its filesystem already offers huge pages. Best
/// effort: failures are remembered for the warning [`advise`] prints, never fatal.
pub(crate) fn prepare_base(base: &Path) {
    let outcome = mount_base(base);
    let mut refused = BASE_REFUSED.lock().unwrap_or_else(|e| e.into_inner());
    *refused = outcome.err();
}

fn mount_base(base: &Path) -> std::result::Result<(), String> {
    std::fs::create_dir_all(base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    let dir = File::open(base).map_err(|e| format!("cannot open {}: {e}", base.display()))?;
    // Serialises creators racing to mount: the loser finds the winner's mount when it looks
    // again through the path (the lock is on the directory underneath, which both opened).
    // SAFETY: flock on a descriptor we own; released when `dir` closes.
    unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) };
    if fs_huge_at(base) != FsHuge::Never {
        return Ok(());
    }
    let here = std::fs::metadata(base).map_err(|e| e.to_string())?;
    let parent = base.parent().unwrap_or(Path::new("/"));
    if std::fs::metadata(parent).is_ok_and(|p| p.dev() != here.dev()) {
        return Err(format!(
            "{} is a mount point without huge pages",
            base.display()
        ));
    }
    let mut entries = std::fs::read_dir(base).map_err(|e| e.to_string())?;
    if entries.next().is_some() {
        return Err(format!(
            "{} is not empty, so rhyve does not mount its huge-page tmpfs over it",
            base.display()
        ));
    }
    let target = std::ffi::CString::new(base.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let options = std::ffi::CString::new(TMPFS_OPTIONS).map_err(|e| e.to_string())?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot mount a huge-page tmpfs on {}: {}",
            base.display(),
            std::io::Error::last_os_error()
        ));
    }
    log::info!("mounted tmpfs ({TMPFS_OPTIONS}) on {}", base.display());
    Ok(())
}

/// Asks for (or against) huge pages on the RAM mapping `[addr, addr+len)` of `file`, before
/// anything touches it. Returns whether the mapping gets huge pages.
pub(crate) fn advise(
    addr: *mut libc::c_void,
    len: usize,
    file: &File,
    policy: HugePages,
) -> Result<bool> {
    let fs = file
        .metadata()
        .map(|m| fs_huge_of_dev(m.dev()))
        .unwrap_or(FsHuge::Never);
    if policy == HugePages::Off {
        // SAFETY: addr/len are the caller's live mapping; advice changes no contents.
        unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
        return Ok(fs == FsHuge::Always && !is_shmem_fs(file));
    }
    let huge = fs != FsHuge::Never && {
        // SAFETY: as above.
        let advised = unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) } == 0;
        advised || fs == FsHuge::Always
    };
    if huge {
        return Ok(true);
    }
    let reason = BASE_REFUSED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| "its filesystem offers none".to_string());
    if policy == HugePages::On {
        return Err(Error::Memory(format!(
            "memory.hugepages=on: no huge pages for guest RAM: {reason}"
        )));
    }
    if !WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "guest RAM on 4 KiB pages (slower first touch): {reason}; for huge pages mount \
             one, e.g. mount -t tmpfs -o huge=advise tmpfs {}",
            crate::object::base().display()
        );
    }
    Ok(false)
}

fn is_shmem_fs(file: &File) -> bool {
    fstype_of_dev(file.metadata().map(|m| m.dev()).unwrap_or(0)).as_deref() == Some("tmpfs")
}

/// The huge-page behaviour of the filesystem `path` is on.
pub(crate) fn fs_huge_at(path: &Path) -> FsHuge {
    std::fs::metadata(path)
        .map(|m| fs_huge_of_dev(m.dev()))
        .unwrap_or(FsHuge::Never)
}

fn fs_huge_of_dev(dev: u64) -> FsHuge {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return FsHuge::Never;
    };
    let Some((fstype, super_options)) = mount_of_dev(&mountinfo, dev) else {
        return FsHuge::Never;
    };
    match fstype {
        "hugetlbfs" => FsHuge::Always,
        "tmpfs" => tmpfs_huge(super_options, &shmem_knob()),
        _ => FsHuge::Never,
    }
}

fn fstype_of_dev(dev: u64) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_of_dev(&mountinfo, dev).map(|(t, _)| t.to_string())
}

/// The system-wide shmem THP setting: `[deny]` and `[force]` override every mount.
fn shmem_knob() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").unwrap_or_default()
}

fn tmpfs_huge(super_options: &str, knob: &str) -> FsHuge {
    if knob.is_empty() || knob.contains("[deny]") {
        return FsHuge::Never; // no THP in this kernel, or disabled for all shmem
    }
    if knob.contains("[force]") {
        return FsHuge::Always;
    }
    let mode = super_options
        .split(',')
        .find_map(|o| o.strip_prefix("huge="))
        .unwrap_or("never");
    match mode {
        "always" | "within_size" => FsHuge::Always,
        "advise" => FsHuge::Advise,
        _ => FsHuge::Never,
    }
}

/// (filesystem type, super options) of the mount whose device is `dev`, from
/// `/proc/self/mountinfo` text: `id parent MAJ:MIN root point opts [tags] - type src sopts`.
fn mount_of_dev(mountinfo: &str, dev: u64) -> Option<(&str, &str)> {
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    mountinfo.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        if fields.nth(2)? != want {
            return None;
        }
        let (_, tail) = line.split_once(" - ")?;
        let mut tail = tail.split(' ');
        let fstype = tail.next()?;
        let _source = tail.next()?;
        Some((fstype, tail.next().unwrap_or("")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
45 22 0:40 / /run/rhyve rw,nosuid,nodev,noexec,relatime shared:9 - tmpfs tmpfs rw,mode=755,huge=advise
46 22 0:41 / /mnt/h rw,relatime - hugetlbfs none rw,pagesize=2M
";

    #[test]
    fn mountinfo_lines_are_matched_by_device() {
        let dev = libc::makedev(0, 40);
        assert_eq!(
            mount_of_dev(MOUNTINFO, dev),
            Some(("tmpfs", "rw,mode=755,huge=advise"))
        );
        assert_eq!(
            mount_of_dev(MOUNTINFO, libc::makedev(0, 41)).map(|m| m.0),
            Some("hugetlbfs")
        );
        assert_eq!(mount_of_dev(MOUNTINFO, libc::makedev(9, 9)), None);
        assert_eq!(mount_of_dev("garbage\n\n1 2\n", dev), None);
    }

    #[test]
    fn tmpfs_modes_and_the_system_knob() {
        let knob = "always within_size advise [never] deny force\n";
        assert_eq!(tmpfs_huge("rw,huge=advise", knob), FsHuge::Advise);
        assert_eq!(tmpfs_huge("rw,huge=within_size", knob), FsHuge::Always);
        assert_eq!(tmpfs_huge("rw,mode=755", knob), FsHuge::Never);
        let deny = "always within_size advise never [deny] force\n";
        assert_eq!(tmpfs_huge("rw,huge=always", deny), FsHuge::Never);
        let force = "always within_size advise never deny [force]\n";
        assert_eq!(tmpfs_huge("rw", force), FsHuge::Always);
        assert_eq!(tmpfs_huge("rw,huge=always", ""), FsHuge::Never);
    }

    #[test]
    fn policies_parse() {
        assert_eq!(HugePages::parse("auto"), Some(HugePages::Auto));
        assert_eq!(HugePages::parse("on"), Some(HugePages::On));
        assert_eq!(HugePages::parse("false"), Some(HugePages::Off));
        assert_eq!(HugePages::parse("2M"), None);
    }
}
