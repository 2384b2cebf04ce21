//! Guest RAM: one shared, file-backed mapping, split into guest-physical regions.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};

use crate::hugepages::{self, HugePages};
use crate::{Error, GuestMemoryMmap, Result};

/// How guest RAM is backed (`memory.*` keys).
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryOptions {
    /// `memory.hugepages`.
    pub huge_pages: HugePages,
    /// `memory.wired` (`-S`): allocate and lock everything up front ([`GuestRam::wire`]).
    pub wired: bool,
}

/// The host mapping of the RAM file. Unmapped when the last user drops it.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; concurrent access is governed by the
// guest (as on real hardware) and by vm-memory's volatile accessors.
unsafe impl Send for Mapping {}
// SAFETY: see above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: addr/len come from a successful mmap that nothing else unmaps.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Guest RAM backed by one file (in the VM's runtime dir) and one `MAP_SHARED` mapping.
///
/// Because the file is shared, other processes can read guest memory through it —
/// the Linux counterpart of reading bhyve's `/dev/vmm/NAME`.
#[derive(Clone)]
pub struct GuestRam {
    mapping: Arc<Mapping>,
    memory: GuestMemoryMmap,
    /// (guest physical address, offset into the file, length) per region.
    regions: Vec<(u64, u64, u64)>,
    huge_pages: bool,
}

impl GuestRam {
    /// Sizes `file` to the sum of `regions` and maps it; `regions` are (gpa, len) pairs,
    /// consecutive in the file in the order given.
    pub fn new(file: &File, regions: &[(u64, u64)], options: &MemoryOptions) -> Result<Self> {
        let total = regions
            .iter()
            .try_fold(0u64, |acc, (_, len)| acc.checked_add(*len))
            .ok_or_else(|| Error::Memory("region sizes overflow".into()))?;
        if total == 0 {
            return Err(Error::Memory("no guest RAM requested".into()));
        }
        let len = usize::try_from(total).map_err(|_| Error::Memory("too large".into()))?;
        file.set_len(total).map_err(|e| {
            Error::Memory(format!("cannot size the RAM file to {total} bytes: {e}"))
        })?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        // SAFETY: mapping a file we own with a length we just set; the result is checked.
        let addr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, file.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            return Err(Error::Memory(format!(
                "mmap of {total} bytes failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mapping = Arc::new(Mapping {
            addr: addr.cast(),
            len,
        });
        let huge_pages = hugepages::advise(addr, len, file, options.huge_pages)?;
        let mut guest_regions = Vec::new();
        let mut layout = Vec::new();
        let mut offset = 0u64;
        for &(gpa, rlen) in regions {
            let rsize = usize::try_from(rlen).map_err(|_| Error::Memory("too large".into()))?;
            let off = usize::try_from(offset).map_err(|_| Error::Memory("too large".into()))?;
            // SAFETY: [addr+off, addr+off+rsize) lies inside the mapping created above, which
            // `mapping` keeps alive for as long as any GuestRam clone (and so the region) lives.
            let region =
                unsafe { MmapRegion::build_raw(mapping.addr.add(off), rsize, prot, flags) }
                    .map_err(|e| Error::Memory(e.to_string()))?;
            let region = GuestRegionMmap::new(region, GuestAddress(gpa))
                .ok_or_else(|| Error::Memory(format!("region at {gpa:#x} overflows")))?;
            guest_regions.push(region);
            layout.push((gpa, offset, rlen));
            offset += rlen;
        }
        let memory = GuestMemoryMmap::from_regions(guest_regions)
            .map_err(|e| Error::Memory(e.to_string()))?;
        let ram = Self {
            mapping,
            memory,
            regions: layout,
            huge_pages,
        };
        if options.wired {
            ram.wire()?;
        }
        Ok(ram)
    }

    /// Whether the mapping gets 2 MiB pages (see [`crate::hugepages`]).
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// The vm-memory view used by the loader and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// (guest physical address, file offset, length) of each region.
    pub fn regions(&self) -> &[(u64, u64, u64)] {
        &self.regions
    }

    /// Host address of a region's first byte, for KVM memory slots.
    pub(crate) fn host_addr(&self, file_offset: u64) -> u64 {
        self.mapping.addr as u64 + file_offset
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.mapping.len as u64
    }

    /// Wires the RAM (bhyve `-S`): every page allocated and mapped writable now, then locked
    /// so it is never swapped or reclaimed. Populating for write first means the guest's first
    /// store to a page costs no host fault at all (mlock alone maps shared pages read-only).
    pub fn wire(&self) -> Result<()> {
        let (addr, len) = (self.mapping.addr.cast::<libc::c_void>(), self.mapping.len);
        // SAFETY: addr/len are exactly our live mapping; populating it changes no contents.
        if unsafe { libc::madvise(addr, len, libc::MADV_POPULATE_WRITE) } != 0 {
            return Err(Error::Memory(format!(
                "-S: cannot allocate all {} MiB of guest RAM: {}",
                len >> 20,
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: as above; locking pins pages of our own mapping, nothing is freed.
        if unsafe { libc::mlock(addr, len) } != 0 {
            return Err(Error::Memory(format!(
                "-S: cannot lock {} MiB of guest RAM (RLIMIT_MEMLOCK?): {}",
                len >> 20,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::{Bytes, GuestAddress};

    /// A fresh read-write file in the temporary directory, named after `tag`.
    fn scratch_file(tag: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("rhyve-{tag}-test-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn wired_ram_is_allocated_in_the_file() {
        use std::os::unix::fs::MetadataExt;
        let (path, file) = scratch_file("wire");
        let size = 4u64 << 20;
        let ram = GuestRam::new(&file, &[(0, size)], &MemoryOptions::default()).unwrap();
        let allocated = || file.metadata().unwrap().blocks() * 512;
        assert!(allocated() < size, "a fresh RAM file is sparse");
        ram.wire().unwrap();
        assert!(
            allocated() >= size,
            "wired: {} of {size} bytes",
            allocated()
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn writes_are_visible_through_the_file() {
        let (path, file) = scratch_file("mem");
        let ram = GuestRam::new(
            &file,
            &[(0, 0x10000), (0x1_0000_0000, 0x10000)],
            &MemoryOptions::default(),
        )
        .unwrap();
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1_0000_0010))
            .unwrap();
        let mut f = File::open(&path).unwrap();
        f.seek(SeekFrom::Start(0x10010)).unwrap();
        let mut buf = [0u8; 4];
        f.read_exact(&mut buf).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.size(), 0x20000);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn empty_ram_is_refused() {
        let file = tempfile_in_tmp();
        assert!(GuestRam::new(&file, &[], &MemoryOptions::default()).is_err());
    }

    fn tempfile_in_tmp() -> File {
        let (path, f) = scratch_file("mem-empty");
        let _ = std::fs::remove_file(path);
        f
    }
}
