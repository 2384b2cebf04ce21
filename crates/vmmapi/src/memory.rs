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
    /// The file mapped: the shared RAM file, or the image a private mapping was restored
    /// from. A snapshot skips its holes without touching them.
    file: Arc<File>,
    /// Whether the mapping is `MAP_SHARED` (the RAM file) or `MAP_PRIVATE` (an image).
    shared: bool,
}

impl GuestRam {
    /// Sizes `file` to the sum of `regions` and maps it; `regions` are (gpa, len) pairs,
    /// consecutive in the file in the order given.
    pub fn new(file: &File, regions: &[(u64, u64)], options: &MemoryOptions) -> Result<Self> {
        let total = total_size(regions)?;
        file.set_len(total).map_err(|e| {
            Error::Memory(format!("cannot size the RAM file to {total} bytes: {e}"))
        })?;
        Self::map(file, regions, options, true)
    }

    /// Guest RAM from a snapshot's memory image, mapped `MAP_PRIVATE`: a page is read from
    /// the image only when first touched (a restore costs no copy), and the guest's writes
    /// stay in this process, so the image is never changed and can be restored again.
    pub fn from_image(
        image: &File,
        regions: &[(u64, u64)],
        options: &MemoryOptions,
    ) -> Result<Self> {
        let total = total_size(regions)?;
        let len = image
            .metadata()
            .map_err(|e| Error::Memory(format!("memory image: {e}")))?
            .len();
        if len != total {
            return Err(Error::Memory(format!(
                "the memory image has {len} bytes, the snapshot's RAM is {total}"
            )));
        }
        Self::map(image, regions, options, false)
    }

    fn map(
        file: &File,
        regions: &[(u64, u64)],
        options: &MemoryOptions,
        shared: bool,
    ) -> Result<Self> {
        let total = total_size(regions)?;
        let len = usize::try_from(total).map_err(|_| Error::Memory("too large".into()))?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let sharing = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let flags = sharing | libc::MAP_NORESERVE;
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
        // A private image mapping is the page cache of a regular file: 4 KiB pages.
        let huge_pages = shared && hugepages::advise(addr, len, file, options.huge_pages)?;
        let file = Arc::new(
            file.try_clone()
                .map_err(|e| Error::Memory(format!("RAM file: {e}")))?,
        );
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
            file,
            shared,
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

    /// (guest physical address, host address, length) of each region: what a device's
    /// IOMMU maps for DMA (passthrough).
    pub fn host_regions(&self) -> Vec<(u64, u64, u64)> {
        self.regions
            .iter()
            .map(|&(gpa, off, len)| (gpa, self.host_addr(off), len))
            .collect()
    }

    /// Host address of a region's first byte, for KVM memory slots.
    pub(crate) fn host_addr(&self, file_offset: u64) -> u64 {
        self.mapping.addr as u64 + file_offset
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.mapping.len as u64
    }

    /// Writes all of guest RAM to `out` (a snapshot's memory image, laid out as the RAM
    /// file): sized to the RAM, zero pages left as holes. Returns the bytes written. Pages that
    /// can only be zero are skipped unread: holes of the shared RAM file (reading them would
    /// allocate them), and of a restored image where the guest has not written (its own
    /// copies, per /proc/self/pagemap; without that file every page is read). The guest must
    /// not run meanwhile.
    pub fn write_image(&self, out: &File) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let total = self.mapping.len as u64;
        let io = |e: std::io::Error| Error::Memory(format!("writing the memory image: {e}"));
        out.set_len(0).map_err(io)?;
        out.set_len(total).map_err(io)?;
        let mut ranges = data_ranges(&self.file, total).map_err(io)?;
        if !self.shared {
            match self.private_copies() {
                Ok(copies) => ranges = merge_ranges(ranges, copies),
                Err(e) => {
                    log::debug!("/proc/self/pagemap: {e}: every page of the image is read");
                    ranges = vec![(0, total)];
                }
            }
        }
        // SAFETY: the mapping is live for &self and `total` bytes long; the guest is paused,
        // and the bytes are only copied out.
        let ram = unsafe { std::slice::from_raw_parts(self.mapping.addr, self.mapping.len) };
        let mut written = 0u64;
        for (start, end) in ranges {
            let mut page = start & !(PAGE - 1);
            while page < end {
                // The longest run of non-zero pages from here.
                let run_start = page;
                while page < end && !is_zero(&ram[page as usize..(page + PAGE).min(total) as usize])
                {
                    page += PAGE;
                }
                if page > run_start {
                    let run_end = page.min(total);
                    out.write_all_at(&ram[run_start as usize..run_end as usize], run_start)
                        .map_err(io)?;
                    written += run_end - run_start;
                }
                page += PAGE;
            }
        }
        Ok(written)
    }

    /// The (start, end) ranges of a private mapping whose pages are the guest's own copies
    /// (written since the restore: anonymous, present or swapped out).
    fn private_copies(&self) -> std::io::Result<Vec<(u64, u64)>> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_PAGE: u64 = 1 << 61;
        let pagemap = File::open("/proc/self/pagemap")?;
        let pages = self.mapping.len as u64 / PAGE;
        let first = self.mapping.addr as u64 / PAGE;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut buf = vec![0u8; 8 * 4096];
        let mut page = 0u64;
        while page < pages {
            let n = (pages - page).min(4096);
            let bytes = &mut buf[..n as usize * 8];
            pagemap.read_exact_at(bytes, (first + page) * 8)?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(e);
                let entry = u64::from_le_bytes(raw);
                let copied =
                    (entry & PRESENT != 0 && entry & FILE_PAGE == 0) || entry & SWAPPED != 0;
                if copied {
                    let at = (page + i as u64) * PAGE;
                    match ranges.last_mut() {
                        Some(last) if last.1 == at => last.1 = at + PAGE,
                        _ => ranges.push((at, at + PAGE)),
                    }
                }
            }
            page += n;
        }
        Ok(ranges)
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

const PAGE: u64 = 4096;

fn total_size(regions: &[(u64, u64)]) -> Result<u64> {
    let total = regions
        .iter()
        .try_fold(0u64, |acc, (_, len)| acc.checked_add(*len))
        .ok_or_else(|| Error::Memory("region sizes overflow".into()))?;
    if total == 0 {
        return Err(Error::Memory("no guest RAM requested".into()));
    }
    Ok(total)
}

/// The union of two sorted lists of disjoint (start, end) ranges, sorted.
fn merge_ranges(a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut all = a;
    all.extend(b);
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// The (start, end) ranges of `file` below `len` that hold data (SEEK_DATA/SEEK_HOLE).
fn data_ranges(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we hold; the results are checked.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data after pos.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(ranges)
            } else {
                Err(e)
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(len));
        if hole <= data {
            break;
        }
        ranges.push((data, hole));
        pos = hole;
    }
    Ok(ranges)
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
    fn an_image_restores_lazily_and_privately() {
        use std::os::unix::fs::MetadataExt;
        let (path, file) = scratch_file("img-src");
        let regions = [(0, 0x40_0000), (0x1_0000_0000, 0x10_0000)];
        let ram = GuestRam::new(&file, &regions, &MemoryOptions::default()).unwrap();
        let mem = ram.memory();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x1234)).unwrap();
        mem.write_obj(0x5566_7788u32, GuestAddress(0x1_0000_0ff0))
            .unwrap();
        // Written and zeroed again: a zero page, left as a hole in the image.
        mem.write_obj(7u64, GuestAddress(0x20_0000)).unwrap();
        mem.write_obj(0u64, GuestAddress(0x20_0000)).unwrap();
        let (img_path, img) = scratch_file("img");
        assert_eq!(ram.write_image(&img).unwrap(), 2 * PAGE);
        assert_eq!(img.metadata().unwrap().len(), 0x50_0000);
        assert!(
            img.metadata().unwrap().blocks() * 512 <= 4 * PAGE,
            "zero pages are holes"
        );

        let back = GuestRam::from_image(&img, &regions, &MemoryOptions::default()).unwrap();
        let m = back.memory();
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x1_0000_0ff0)).unwrap(),
            0x5566_7788
        );
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(), 0);
        // The restored guest's writes stay private: the image can be restored again.
        m.write_obj(0xffu32, GuestAddress(0x1234)).unwrap();
        // A page that is a hole in the image, written after the restore: the guest's own copy.
        m.write_obj(0xabcdu32, GuestAddress(0x30_0008)).unwrap();
        assert_eq!(
            back.private_copies().unwrap(),
            [(0x1000, 0x2000), (0x30_0000, 0x30_1000)]
        );
        let again = GuestRam::from_image(&img, &regions, &MemoryOptions::default()).unwrap();
        assert_eq!(
            again
                .memory()
                .read_obj::<u32>(GuestAddress(0x1234))
                .unwrap(),
            0x1122_3344
        );
        // A restored RAM is saved in turn (a snapshot of a restored VM).
        let (img2_path, img2) = scratch_file("img2");
        back.write_image(&img2).unwrap();
        let third = GuestRam::from_image(&img2, &regions, &MemoryOptions::default()).unwrap();
        assert_eq!(
            third
                .memory()
                .read_obj::<u32>(GuestAddress(0x1234))
                .unwrap(),
            0xff
        );
        let third_mem = third.memory();
        assert_eq!(
            third_mem.read_obj::<u32>(GuestAddress(0x30_0008)).unwrap(),
            0xabcd
        );
        // An image of another size is refused.
        let wrong = GuestRam::from_image(&img, &regions[..1], &MemoryOptions::default());
        assert!(wrong.is_err());
        for p in [path, img_path, img2_path] {
            std::fs::remove_file(p).unwrap();
        }
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
