//! Guest kernel loading for x86-64: Linux bzImage (64-bit boot protocol) and ELF vmlinux
//! through its PVH entry, with initrd, command line, e820 map and the vCPU entry state.
//!
//! Everything here is KVM-independent: it writes into any `vm_memory` guest memory and returns
//! the register state the VMM must load. Kernel and initrd files are untrusted input: every
//! malformed file ends in a precise [`Error`], never a panic.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub mod acpi;
pub mod boot_state;
mod bzimage;
pub mod entry;
pub mod layout;
pub mod mptable;
mod pvh;
pub mod table_loader;

pub use boot_state::{BootState, BootStateError};
pub use entry::{EntryState, Segment};
pub use layout::{e820_map, E820Entry, E820Kind};

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// cannot read PATH: SOURCE
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// PATH: truncated header: the file has LEN bytes, the header needs NEED
    #[error("{}: truncated header: the file has {len} bytes, the header needs {need}", path.display())]
    TruncatedHeader {
        /// The file.
        path: PathBuf,
        /// File length.
        len: u64,
        /// Bytes the header needs.
        need: u64,
    },
    /// PATH: the file has LEN bytes but its headers describe data up to byte NEED
    #[error("{}: the file has {len} bytes but its headers describe data up to byte {need}", path.display())]
    TruncatedFile {
        /// The file.
        path: PathBuf,
        /// File length.
        len: u64,
        /// End of the data the headers describe.
        need: u64,
    },
    /// bad magic: WHAT
    #[error("bad magic: {0}")]
    BadMagic(&'static str),
    /// boot protocol MAJOR.MINOR is too old: 2.06 or newer is needed
    #[error("boot protocol {}.{:02} is too old: 2.06 or newer is needed", .0 >> 8, .0 & 0xff)]
    ProtocolTooOld(u16),
    /// malformed bzImage setup header: WHAT
    #[error("malformed bzImage setup header: {0}")]
    BadSetupHeader(&'static str),
    /// bzImage has no protected-mode kernel after its setup sectors (which end at SETUP_END)
    #[error("bzImage has no protected-mode kernel after its setup sectors (which end at {setup_end:#x})")]
    NoProtectedModeKernel {
        /// File offset where the protected-mode kernel should start.
        setup_end: u64,
    },
    /// kernel lacks LOADED_HIGH: it cannot run from 1 MiB (a zImage?)
    #[error("kernel lacks LOADED_HIGH: it cannot run from 1 MiB (a zImage?)")]
    NotLoadedHigh,
    /// kernel has no 64-bit entry point (protocol VERSION, xloadflags FLAGS without XLF_KERNEL_64)
    #[error(
        "kernel has no 64-bit entry point (protocol {}.{:02}, xloadflags {xloadflags:#x} without XLF_KERNEL_64)",
        version >> 8,
        version & 0xff
    )]
    Not64Bit {
        /// Boot protocol version.
        version: u16,
        /// xloadflags (0 before protocol 2.12).
        xloadflags: u16,
    },
    /// relocatable kernel has kernel_alignment ALIGN, which is not a power of two
    #[error("relocatable kernel has kernel_alignment {0:#x}, which is not a power of two")]
    BadKernelAlignment(u32),
    /// kernel load address ADDR is below 1 MiB, over the loader's boot structures
    #[error("kernel load address {0:#x} is below 1 MiB, over the loader's boot structures")]
    KernelOverlapsLowMemory(u64),
    /// kernel needs [START, END) but RAM below the PCI hole ends at RAM_END
    #[error("kernel needs [{start:#x}, {end:#x}) but RAM below the PCI hole ends at {ram_end:#x}")]
    KernelDoesNotFit {
        /// Load address.
        start: u64,
        /// End of what the kernel needs while booting (load + init_size), saturated.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// initrd of SIZE bytes does not fit: only FREE bytes are free between the kernel and LIMIT
    #[error("initrd of {size} bytes does not fit: only {free} bytes are free between the kernel and {limit:#x}")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// Room available.
        free: u64,
        /// Highest end address allowed (initrd_addr_max + 1 or end of low RAM).
        limit: u64,
    },
    /// kernel command line of LEN bytes is longer than the MAX the kernel accepts
    #[error("kernel command line of {len} bytes is longer than the {max} the kernel accepts")]
    CmdlineTooLong {
        /// Command line length (no NUL).
        len: usize,
        /// Maximum length (no NUL).
        max: u64,
    },
    /// kernel command line contains a NUL byte
    #[error("kernel command line contains a NUL byte")]
    CmdlineHasNul,
    /// ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); only PVH entry is supported for ELF
    #[error("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); only PVH entry is supported for ELF")]
    NoPvhNote,
    /// malformed ELF kernel: WHAT
    #[error("malformed ELF kernel: {0}")]
    BadElf(&'static str),
    /// ELF segment [PADDR, PADDR + MEMSZ) lies outside guest RAM
    #[error("ELF segment at {paddr:#x} of {memsz:#x} bytes lies outside guest RAM")]
    ElfSegmentOutsideRam {
        /// Segment physical address.
        paddr: u64,
        /// Segment size in memory.
        memsz: u64,
    },
    /// PATH: unknown kernel format (neither a bzImage nor an ELF vmlinux)
    #[error("{}: unknown kernel format (neither a bzImage nor an ELF vmlinux)", path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// cannot write guest memory at ADDR: SOURCE
    #[error("cannot write guest memory at {addr:#x}: {source}")]
    GuestMemory {
        /// Guest-physical address of the failed access.
        addr: u64,
        /// The vm-memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// MP table: N vCPUs is out of range (1 to 254)
    #[error("MP table: {0} vCPUs is out of range (1 to 254)")]
    BadCpuCount(u32),
    /// MP table: the table would end at END, beyond the BIOS area (0x100000)
    #[error("MP table: the table would end at {0:#x}, beyond the BIOS area (0x100000)")]
    MpTableTooBig(u64),
    /// ACPI: N vCPUs is out of range (1 to 254)
    #[error("ACPI: {0} vCPUs is out of range (1 to 254)")]
    AcpiBadCpuCount(u32),
    /// ACPI: the tables would end at END, beyond the BIOS area (0x100000)
    #[error("ACPI: the tables would end at {0:#x}, beyond the BIOS area (0x100000)")]
    AcpiTooBig(u64),
}

/// Kernel image formats the loader understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Linux bzImage, entered through the 64-bit boot protocol.
    BzImage,
    /// ELF vmlinux, entered through its PVH (32-bit, paging off) entry point.
    ElfPvh,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootConfig<'a> {
    /// Kernel image (bzImage or ELF vmlinux with a PVH note).
    pub kernel: &'a Path,
    /// Optional initial ramdisk.
    pub initrd: Option<&'a Path>,
    /// Kernel command line (no NUL bytes).
    pub cmdline: &'a str,
    /// Guest RAM size; the guest memory must be laid out as [`layout::ram_regions`].
    pub ram_bytes: u64,
    /// ACPI RSDP address to hand to the kernel, if the VMM built ACPI tables.
    pub rsdp_addr: Option<u64>,
}

/// Result of [`load`]: where things went and how to start the boot vCPU.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Detected format.
    pub format: KernelFormat,
    /// Boot vCPU registers.
    pub entry: EntryState,
    /// `[start, end)` the kernel occupies while booting (bzImage: up to the end of its
    /// decompression area, from init_size; ELF: the PT_LOAD segments).
    pub kernel_range: (u64, u64),
    /// `[start, end)` of the initrd, if any.
    pub initrd_range: Option<(u64, u64)>,
    /// The memory map given to the kernel.
    pub e820: Vec<E820Entry>,
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline_addr: u64,
}

/// Bytes of the file start read for format detection and headers.
const PREFIX_LEN: u64 = 4096;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Offset and value of the x86 boot sector signature.
const BOOT_FLAG_OFFSET: usize = 0x1fe;
const BOOT_FLAG: [u8; 2] = [0x55, 0xaa];
/// Offset of the "HdrS" setup header magic.
const HDRS_OFFSET: usize = 0x202;

/// Sniffs the format from the first bytes of a kernel file (at least 0x206 for bzImage).
pub fn probe(bytes_prefix: &[u8]) -> Option<KernelFormat> {
    if bytes_prefix.starts_with(ELF_MAGIC) {
        return Some(KernelFormat::ElfPvh);
    }
    let flag = bytes_prefix.get(BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2)?;
    let magic = bytes_prefix.get(HDRS_OFFSET..HDRS_OFFSET + 4)?;
    (flag == BOOT_FLAG && magic == b"HdrS").then_some(KernelFormat::BzImage)
}

/// What to boot, with kernel and initrd already in memory (e.g. read out of a disk image by
/// rhyveload). The names only label error messages.
#[derive(Debug, Clone)]
pub struct BootBytes<'a> {
    /// Kernel image bytes (bzImage or ELF vmlinux with a PVH note).
    pub kernel: &'a [u8],
    /// Name of the kernel in error messages (e.g. its path inside the guest filesystem).
    pub kernel_name: &'a str,
    /// Optional initial ramdisk: (name, bytes).
    pub initrd: Option<(&'a str, &'a [u8])>,
    /// Kernel command line (no NUL bytes).
    pub cmdline: &'a str,
    /// Guest RAM size; the guest memory must be laid out as [`layout::ram_regions`].
    pub ram_bytes: u64,
    /// ACPI RSDP address to hand to the kernel, if the VMM builds ACPI tables.
    pub rsdp_addr: Option<u64>,
}

/// A kernel or initrd: a file, or bytes already read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Input<'a> {
    Path(&'a Path),
    Bytes(&'a str, &'a [u8]),
}

impl<'a> Input<'a> {
    fn open(self) -> Result<Image<'a>, Error> {
        match self {
            Input::Path(p) => Image::open(p),
            Input::Bytes(name, data) => Ok(Image::from_bytes(name, data)),
        }
    }
}

/// Both entry points' request, in one shape for the format loaders.
pub(crate) struct Request<'a> {
    pub(crate) initrd: Option<Input<'a>>,
    pub(crate) cmdline: &'a str,
    pub(crate) ram_bytes: u64,
    pub(crate) rsdp_addr: Option<u64>,
}

/// Loads kernel, initrd, command line and boot tables into `mem` (a guest memory whose
/// regions are `layout::ram_regions(cfg.ram_bytes)`) and returns the entry state.
pub fn load<M: GuestMemoryBackend>(mem: &M, cfg: &BootConfig) -> Result<LoadedKernel, Error> {
    let req = Request {
        initrd: cfg.initrd.map(Input::Path),
        cmdline: cfg.cmdline,
        ram_bytes: cfg.ram_bytes,
        rsdp_addr: cfg.rsdp_addr,
    };
    load_input(mem, Input::Path(cfg.kernel), &req)
}

/// [`load`] from in-memory kernel and initrd.
pub fn load_bytes<M: GuestMemoryBackend>(mem: &M, cfg: &BootBytes) -> Result<LoadedKernel, Error> {
    let req = Request {
        initrd: cfg.initrd.map(|(n, d)| Input::Bytes(n, d)),
        cmdline: cfg.cmdline,
        ram_bytes: cfg.ram_bytes,
        rsdp_addr: cfg.rsdp_addr,
    };
    load_input(mem, Input::Bytes(cfg.kernel_name, cfg.kernel), &req)
}

fn load_input<M: GuestMemoryBackend>(
    mem: &M,
    kernel: Input,
    req: &Request,
) -> Result<LoadedKernel, Error> {
    let mut img = kernel.open()?;
    let prefix = img.prefix()?;
    if prefix.starts_with(ELF_MAGIC) {
        pvh::load(mem, req, &mut img, &prefix)
    } else if prefix.get(BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2) == Some(&BOOT_FLAG[..]) {
        // A boot sector: a bzImage, or a broken/old one that bzimage::load names precisely.
        bzimage::load(mem, req, &mut img, &prefix)
    } else {
        Err(Error::UnknownFormat {
            path: img.path().to_path_buf(),
        })
    }
}

/// Where an [`Image`]'s bytes are.
enum Data<'a> {
    File(File),
    Bytes(&'a [u8]),
}

/// An open, untrusted input (file or bytes) with bounds-checked access.
pub(crate) struct Image<'a> {
    path: PathBuf,
    data: Data<'a>,
    len: u64,
}

impl<'a> Image<'a> {
    pub(crate) fn open(path: &Path) -> Result<Self, Error> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            return Err(io(std::io::Error::other("is a directory")));
        }
        Ok(Image {
            path: path.to_path_buf(),
            data: Data::File(file),
            len: meta.len(),
        })
    }

    pub(crate) fn from_bytes(name: &str, data: &'a [u8]) -> Self {
        Image {
            path: PathBuf::from(name),
            data: Data::Bytes(data),
            len: data.len() as u64,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(&self, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn truncated(&self, need: u64) -> Error {
        Error::TruncatedFile {
            path: self.path.clone(),
            len: self.len,
            need,
        }
    }

    /// The first [`PREFIX_LEN`] bytes (fewer for a short file).
    fn prefix(&mut self) -> Result<Vec<u8>, Error> {
        match &self.data {
            Data::File(file) => {
                let mut v = Vec::new();
                file.take(PREFIX_LEN)
                    .read_to_end(&mut v)
                    .map_err(|e| self.io_err(e))?;
                Ok(v)
            }
            Data::Bytes(b) => Ok(b[..b.len().min(PREFIX_LEN as usize)].to_vec()),
        }
    }

    /// The in-bounds byte range `[offset, offset + len)` as usize, or a truncation error.
    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, Error> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.len) {
            return Err(self.truncated(offset.saturating_add(len)));
        }
        // Both are <= self.len, which came from a slice length or fits in memory anyway.
        let start = usize::try_from(offset).map_err(|_| self.truncated(u64::MAX))?;
        let count = usize::try_from(len).map_err(|_| self.truncated(u64::MAX))?;
        Ok(start..start + count)
    }

    /// Bounds-checked read of `buf.len()` bytes at `offset`.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let r = self.range(offset, buf.len() as u64)?;
        match &self.data {
            Data::File(file) => file.read_exact_at(buf, offset).map_err(|e| self.io_err(e)),
            Data::Bytes(b) => {
                buf.copy_from_slice(&b[r]);
                Ok(())
            }
        }
    }

    /// Copies `len` bytes at file `offset` straight into guest memory at `gpa`.
    pub(crate) fn copy_to_guest<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        offset: u64,
        len: u64,
        gpa: u64,
    ) -> Result<(), Error> {
        let r = self.range(offset, len)?;
        match &mut self.data {
            Data::File(file) => {
                file.seek(SeekFrom::Start(offset)).map_err(|e| Error::Io {
                    path: self.path.clone(),
                    source: e,
                })?;
                mem.read_exact_volatile_from(GuestAddress(gpa), file, r.len())
                    .map_err(|source| Error::GuestMemory { addr: gpa, source })
            }
            Data::Bytes(b) => write_guest(mem, gpa, &b[r]),
        }
    }
}

/// Writes `cmdline` NUL-terminated at [`layout::CMDLINE_ADDR`]; `max` excludes the NUL.
pub(crate) fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    max: u64,
) -> Result<u64, Error> {
    check_cmdline(cmdline, max)?;
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    write_guest(mem, layout::CMDLINE_ADDR, &bytes)?;
    Ok(layout::CMDLINE_ADDR)
}

/// Checks the command line before anything is written (`max` excludes the NUL).
pub(crate) fn check_cmdline(cmdline: &str, max: u64) -> Result<(), Error> {
    let max = max.min(layout::CMDLINE_MAX_SIZE - 1);
    if cmdline.len() as u64 > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineHasNul);
    }
    Ok(())
}

pub(crate) fn write_guest<M: GuestMemoryBackend>(
    mem: &M,
    addr: u64,
    bytes: &[u8],
) -> Result<(), Error> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { addr, source })
}

const PAGE_SIZE: u64 = 4096;

/// Places `size` bytes page-aligned as high as possible in `[min_addr, limit)`.
pub(crate) fn place_high(size: u64, min_addr: u64, limit: u64) -> Option<u64> {
    let start = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= min_addr).then_some(start)
}

/// Opens the initrd, places it as high as possible in `[min_addr, limit)` and copies it in.
/// Returns `[start, end)`.
pub(crate) fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    initrd: Input,
    min_addr: u64,
    limit: u64,
) -> Result<(u64, u64), Error> {
    let mut img = initrd.open()?;
    let size = img.len();
    let start = place_high(size, min_addr, limit).ok_or(Error::InitrdTooBig {
        size,
        free: limit.saturating_sub(min_addr.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)),
        limit,
    })?;
    img.copy_to_guest(mem, 0, size, start)?;
    Ok((start, start + size))
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use crate::layout;

    /// Writes `bytes` to a fresh file under the temp dir.
    pub fn tmpfile(tag: &str, bytes: &[u8]) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("rhyve-loader-{}-{n}-{tag}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Guest memory laid out as the VMM does it (mmap is lazy: large sizes are cheap).
    pub fn guest(ram: u64) -> GuestMemoryMmap {
        let r: Vec<_> = layout::ram_regions(ram)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&r).unwrap()
    }

    /// The real Debian cloud kernel, if the machine has it (never fetched by tests).
    pub fn debian_kernel(name: &str) -> Option<PathBuf> {
        let p = PathBuf::from("/var/cache/rhyve").join(name);
        if p.exists() {
            return Some(p);
        }
        eprintln!("skipping: {} not present", p.display());
        None
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn probe_formats() {
        assert_eq!(probe(b"\x7fELF\x02\x01"), Some(KernelFormat::ElfPvh));
        let mut b = vec![0u8; 0x300];
        b[0x1fe] = 0x55;
        b[0x1ff] = 0xaa;
        assert_eq!(probe(&b), None);
        b[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(probe(&b), Some(KernelFormat::BzImage));
        assert_eq!(probe(&b[..0x205]), None);
        assert_eq!(probe(b""), None);
        assert_eq!(probe(b"MZ"), None);
    }

    #[test]
    fn missing_file_names_path() {
        let mem = guest(64 << 20);
        let p = Path::new("/nonexistent/rhyve/kernel");
        let cfg = BootConfig {
            kernel: p,
            initrd: None,
            cmdline: "",
            ram_bytes: 64 << 20,
            rsdp_addr: None,
        };
        let e = load(&mem, &cfg).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/rhyve/kernel"), "{e}");
        let dir = std::env::temp_dir();
        let e = load(
            &mem,
            &BootConfig {
                kernel: &dir,
                ..cfg
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }

    #[test]
    fn unknown_format() {
        let mem = guest(64 << 20);
        for bytes in [&b""[..], b"hello world", &[0u8; 0x1000][..]] {
            let p = tmpfile("unknown", bytes);
            let cfg = BootConfig {
                kernel: &p,
                initrd: None,
                cmdline: "",
                ram_bytes: 64 << 20,
                rsdp_addr: None,
            };
            let e = load(&mem, &cfg).unwrap_err();
            assert!(matches!(e, Error::UnknownFormat { .. }), "{e}");
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn placement() {
        assert_eq!(place_high(0x1800, 0x10_0000, 0x20_0000), Some(0x1f_e000));
        assert_eq!(place_high(0x10_0000, 0x10_0000, 0x20_0000), Some(0x10_0000));
        assert_eq!(place_high(0x10_0001, 0x10_0000, 0x20_0000), None);
        assert_eq!(place_high(u64::MAX, 0, 0x20_0000), None);
        assert_eq!(place_high(0, 0x1000, 0x2fff), Some(0x2000));
    }

    #[test]
    fn cmdline_checks() {
        assert!(check_cmdline("console=ttyS0", 2047).is_ok());
        assert!(matches!(
            check_cmdline("abc", 2),
            Err(Error::CmdlineTooLong { len: 3, max: 2 })
        ));
        assert!(matches!(
            check_cmdline("a\0b", 100),
            Err(Error::CmdlineHasNul)
        ));
        let huge = "x".repeat(layout::CMDLINE_MAX_SIZE as usize);
        assert!(matches!(
            check_cmdline(&huge, u64::MAX),
            Err(Error::CmdlineTooLong { .. })
        ));
    }
}
