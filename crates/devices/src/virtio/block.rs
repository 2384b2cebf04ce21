//! virtio-blk over a raw image file (`-s N,virtio-blk,PATH[,ro][,nocache][,direct]
//! [,sectorsize=L[/P]][,nodelete][,ser=ID]`), virtio 1.2 section 5.2.
//!
//! Options as bhyve(8): `nocache` opens the image with O_DIRECT (guest data is bounced through
//! an aligned buffer; unaligned requests fall back to a second, buffered descriptor), `direct`
//! opens it O_SYNC, `ro` offers VIRTIO_BLK_F_RO and refuses writes, `nodelete` withholds
//! DISCARD/WRITE_ZEROES. The image is flock()ed (exclusive, shared with `ro`) so two VMs can't
//! open it read-write. Requests run on the device's worker thread: zero-copy preadv/pwritev into
//! guest memory, FLUSH is fdatasync, DISCARD is a hole punch, WRITE_ZEROES a zero range (or
//! written zeros). Every guest mistake is answered with IOERR/UNSUPP and counted.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{self, Chain, ChainError, ChainLimits, Segment};
#[cfg(any(test, feature = "fuzzing"))]
use super::drain_queue;
use super::{
    activate_single_queue, drain_queue_limited, guest_error, read_config_bytes, ActivateError,
    GuestMemoryMmap, VirtioDevice, VirtioInterrupt, Worker, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::lifecycle::{DeviceUpdate, LifecycleError, Stat};
use crate::rate_limiter::{parse_rate, FollowingLimiter, LiveLimits, RateLimits};
use crate::threads::WorkerClass;

const F_SIZE_MAX: u32 = 1;
const F_SEG_MAX: u32 = 2;
const F_RO: u32 = 5;
const F_BLK_SIZE: u32 = 6;
const F_FLUSH: u32 = 9;
const F_TOPOLOGY: u32 = 10;
const F_DISCARD: u32 = 13;
const F_WRITE_ZEROES: u32 = 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Queue size offered (the only queue).
pub const QUEUE_SIZE: u16 = 256;
const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u64 = 16;
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const SIZE_MAX: u32 = 1 << 20;
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
const MAX_DISCARD_SEG: u32 = 16;
/// WRITE_ZEROES limits where the image's file system cannot zero a range in place (no
/// FALLOC_FL_ZERO_RANGE, e.g. tmpfs): zeroes are then written, and with the limits above one
/// 64-byte request would be 16 GiB of host writes. 1 MiB in one segment, as a WRITE of the
/// same size would be.
const FALLBACK_ZEROES_SECTORS: u32 = 2048;
const FALLBACK_ZEROES_BYTES: u64 = FALLBACK_ZEROES_SECTORS as u64 * SECTOR_SIZE;
const ID_BYTES: usize = 20;
const BOUNCE_SIZE: usize = 1 << 20;
const DIRECT_ALIGN: usize = 4096;
const IOV_MAX: usize = 1024;
const CONFIG_LEN: usize = 60;

/// Configuration keys virtio-blk reads (below `pci.B.S.F.`).
pub const KEYS: &[&str] = &[
    "path",
    "ro",
    "nocache",
    "direct",
    "sectorsize",
    "nodelete",
    "ser",
    "bw",
    "ops",
];

/// A virtio-blk backend as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image (a file or a block device).
    pub path: PathBuf,
    /// `ro`: open read-only, offer VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// `nocache`: O_DIRECT.
    pub nocache: bool,
    /// `direct`: O_SYNC (bhyve's meaning).
    pub direct: bool,
    /// `sectorsize=L[/P]`: logical sector size (blk_size), default 512.
    pub logical_sector_size: u32,
    /// Physical sector size (topology), default = logical.
    pub physical_sector_size: u32,
    /// `nodelete`: no DISCARD/WRITE_ZEROES.
    pub nodelete: bool,
    /// `ser=ID`: the GET_ID string (at most 20 bytes); default derived from the path.
    pub serial: Option<String>,
    /// `bw=BYTES` (per second, K/M/G suffixes) and `ops=N` (requests per second).
    pub rate: RateLimits,
}

/// A bad virtio-blk option; the message names it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockConfigError {
    /// virtio-blk: no image path given
    #[error("virtio-blk: no image path given (-s N,virtio-blk,PATH)")]
    MissingPath,
    /// virtio-blk: unknown option
    #[error(
        "virtio-blk: unknown option '{0}' (known: path ro nocache direct sectorsize nodelete ser bw ops)"
    )]
    UnknownOption(String),
    /// virtio-blk: bad value of an option
    #[error("virtio-blk: option '{option}={value}': {reason}")]
    BadValue {
        option: String,
        value: String,
        reason: &'static str,
    },
}

fn bad(option: &str, value: &str, reason: &'static str) -> BlockConfigError {
    BlockConfigError::BadValue {
        option: option.into(),
        value: value.into(),
        reason,
    }
}

fn parse_bool(option: &str, value: &str) -> Result<bool, BlockConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "" | "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(bad(option, value, "expected true or false")),
    }
}

fn parse_sector_size(option: &str, v: &str) -> Result<u32, BlockConfigError> {
    let n: u32 = v
        .parse()
        .map_err(|_| bad(option, v, "not a number of bytes"))?;
    if !(512..=65536).contains(&n) || !n.is_power_of_two() {
        return Err(bad(
            option,
            v,
            "sector sizes are powers of two from 512 to 65536",
        ));
    }
    Ok(n)
}

impl BlockConfig {
    /// A read-write image with bhyve's defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlockConfig {
            path: path.into(),
            readonly: false,
            nocache: false,
            direct: false,
            logical_sector_size: 512,
            physical_sector_size: 512,
            nodelete: false,
            serial: None,
            rate: RateLimits::default(),
        }
    }

    /// Parses bhyve's option string `PATH[,ro][,nocache][,direct][,sectorsize=L[/P]]
    /// [,nodelete][,ser=ID]` plus rhyve's rate limits `[,bw=BYTES][,ops=N]` (the part after
    /// `virtio-blk,`; `path=PATH` works too).
    pub fn parse(opts: &str) -> Result<Self, BlockConfigError> {
        let mut keys = Vec::new();
        for (n, opt) in opts.split(',').enumerate() {
            match opt.split_once('=') {
                Some((k, v)) => keys.push((k, v)),
                None if n == 0 => keys.push(("path", opt)),
                None if opt.is_empty() => {}
                None => keys.push((opt, "true")),
            }
        }
        Self::from_keys(keys)
    }

    /// Builds the configuration from `pci.B.S.F.<key>` pairs (key without the prefix; the
    /// slot's `device` key is ignored), as the configuration tree stores `-s` options.
    pub fn from_keys<'a>(
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, BlockConfigError> {
        let mut c = BlockConfig::new("");
        let mut physical = None;
        for (k, v) in keys {
            match k {
                "path" => c.path = PathBuf::from(v),
                "ro" => c.readonly = parse_bool(k, v)?,
                "nocache" => c.nocache = parse_bool(k, v)?,
                "direct" => c.direct = parse_bool(k, v)?,
                "nodelete" => c.nodelete = parse_bool(k, v)?,
                "sectorsize" => {
                    let (l, p) = match v.split_once('/') {
                        Some((l, p)) => (l, Some(p)),
                        None => (v, None),
                    };
                    c.logical_sector_size = parse_sector_size(k, l)?;
                    physical = match p {
                        Some(p) => Some(parse_sector_size(k, p)?),
                        None => None,
                    };
                }
                "ser" => {
                    if v.len() > ID_BYTES {
                        return Err(bad(k, v, "a serial number is at most 20 bytes"));
                    }
                    c.serial = Some(v.to_string());
                }
                "bw" => {
                    c.rate.bytes_per_sec = Some(
                        parse_rate(v)
                            .ok_or_else(|| bad(k, v, "expected bytes per second, e.g. 50M"))?,
                    );
                }
                "ops" => {
                    c.rate.ops_per_sec = Some(
                        parse_rate(v)
                            .ok_or_else(|| bad(k, v, "expected requests per second, e.g. 1000"))?,
                    );
                }
                "device" => {}
                _ => return Err(BlockConfigError::UnknownOption(k.to_string())),
            }
        }
        c.physical_sector_size = physical.unwrap_or(c.logical_sector_size);
        if c.physical_sector_size < c.logical_sector_size {
            let v = format!("{}/{}", c.logical_sector_size, c.physical_sector_size);
            return Err(bad(
                "sectorsize",
                &v,
                "the physical sector size must not be smaller than the logical one",
            ));
        }
        if c.path.as_os_str().is_empty() {
            return Err(BlockConfigError::MissingPath);
        }
        Ok(c)
    }
}

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// virtio-blk: cannot open the image
    #[error("virtio-blk: cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// virtio-blk: the image is locked by someone else
    #[error("virtio-blk: {path} is in use: another VM or process holds a lock on it")]
    Locked { path: PathBuf },
    /// virtio-blk: flock failed
    #[error("virtio-blk: cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// Request counters (rhyvectl --get-stats).
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Completed IN requests.
    pub reads: AtomicU64,
    /// Completed OUT requests.
    pub writes: AtomicU64,
    /// Completed FLUSH requests.
    pub flushes: AtomicU64,
    /// Completed DISCARD requests.
    pub discards: AtomicU64,
    /// Completed WRITE_ZEROES requests.
    pub write_zeroes: AtomicU64,
    /// GET_ID requests.
    pub get_ids: AtomicU64,
    /// Bytes read from the image for the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written to the image for the guest.
    pub bytes_written: AtomicU64,
    /// Host I/O failures answered with IOERR.
    pub io_errors: AtomicU64,
    /// Guest mistakes: malformed chains, out-of-range sectors, writes to a read-only disk.
    pub guest_errors: AtomicU64,
    /// Requests answered with UNSUPP.
    pub unsupported: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The open image, shared by the device and its worker.
struct Disk {
    /// The image; O_DIRECT when `direct_io`.
    file: File,
    /// With O_DIRECT, a buffered descriptor of the same image for unaligned requests.
    buffered: Option<File>,
    direct_io: bool,
    /// Bytes exposed to the guest (a multiple of the logical sector size).
    size: u64,
    logical: u32,
    readonly: bool,
    discard: bool,
    /// fallocate(FALLOC_FL_ZERO_RANGE) works here (probed at open): WRITE_ZEROES is cheap.
    zeroes_in_place: bool,
    id: [u8; ID_BYTES],
    stats: Arc<BlockStats>,
}

/// FNV-1a: a default serial number that is stable across runs and Rust versions.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn default_id(path: &Path) -> String {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let h = fnv1a(canon.as_os_str().as_encoded_bytes());
    format!(
        "RHYVE-{:04X}-{:04X}-{:04X}",
        (h >> 32) & 0xffff,
        (h >> 16) & 0xffff,
        h & 0xffff
    )
}

/// Whether the image's file system zeroes ranges in place: a block device does (the kernel
/// issues the device's own zeroing), a regular file if an unnamed scratch file next to it
/// (O_TMPFILE, gone when closed) takes FALLOC_FL_ZERO_RANGE. Unknown counts as no.
fn zero_range_works(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match file.metadata() {
        Ok(m) if m.file_type().is_block_device() => return true,
        Ok(m) if m.is_file() => {}
        _ => return false,
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(probe) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    else {
        return false;
    };
    let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    probe.set_len(4096).is_ok() && fallocate(&probe, mode, 0, 4096).is_ok()
}

impl Disk {
    /// WRITE_ZEROES limits: sectors per segment, segments per request.
    fn write_zeroes_limits(&self) -> (u32, u32) {
        if self.zeroes_in_place {
            (MAX_DISCARD_SECTORS, MAX_DISCARD_SEG)
        } else {
            (FALLBACK_ZEROES_SECTORS, 1)
        }
    }

    fn open(cfg: &BlockConfig) -> Result<Disk, BlockError> {
        let path = &cfg.path;
        let open_err = |source| BlockError::Open {
            path: path.clone(),
            source,
        };
        let sync = if cfg.direct { libc::O_SYNC } else { 0 };
        let open = |extra: i32| {
            OpenOptions::new()
                .read(true)
                .write(!cfg.readonly)
                .custom_flags(sync | extra)
                .open(path)
        };
        let (file, direct_io) = if cfg.nocache {
            match open(libc::O_DIRECT) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::warn!(
                        "virtio-blk: {} does not support O_DIRECT; nocache ignored",
                        path.display()
                    );
                    (open(0).map_err(open_err)?, false)
                }
                Err(e) => return Err(open_err(e)),
            }
        } else {
            (open(0).map_err(open_err)?, false)
        };
        if file.metadata().map_err(open_err)?.is_dir() {
            return Err(open_err(io::Error::other("is a directory")));
        }
        let locked = if cfg.readonly {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(BlockError::Locked { path: path.clone() }),
            Err(TryLockError::Error(source)) => {
                return Err(BlockError::Lock {
                    path: path.clone(),
                    source,
                })
            }
        }
        // Not locked itself: a second open file description would conflict with our own lock.
        let buffered = if direct_io {
            Some(open(0).map_err(open_err)?)
        } else {
            None
        };
        let len = (&file).seek(SeekFrom::End(0)).map_err(open_err)?;
        let logical = u64::from(cfg.logical_sector_size);
        let size = len / logical * logical;
        if size != len {
            log::warn!(
                "virtio-blk: {}: size {len} is not a multiple of {logical}; the last {} bytes are not exposed",
                path.display(),
                len - size
            );
        }
        let serial = cfg.serial.clone().unwrap_or_else(|| default_id(path));
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let zeroes_in_place = zero_range_works(&file, path);
        Ok(Disk {
            file,
            buffered,
            direct_io,
            size,
            logical: cfg.logical_sector_size,
            readonly: cfg.readonly,
            discard: !cfg.nodelete && !cfg.readonly,
            zeroes_in_place,
            id,
            stats: Arc::new(BlockStats::default()),
        })
    }

    /// The sectors the guest sees, in config-space order.
    fn capacity_bytes(&self) -> [u8; 8] {
        (self.size / SECTOR_SIZE).to_le_bytes()
    }

    /// The byte offset of `len` bytes at `sector`, if inside the disk and sector-aligned.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len)?;
        let l = u64::from(self.logical);
        (end <= self.size && off.is_multiple_of(l) && len.is_multiple_of(l)).then_some(off)
    }
}

/// A page-aligned bounce buffer, allocated on first use.
#[derive(Default)]
struct Bounce(Vec<u8>);

impl Bounce {
    fn get(&mut self) -> &mut [u8] {
        if self.0.is_empty() {
            self.0 = vec![0u8; BOUNCE_SIZE + DIRECT_ALIGN];
        }
        let start = self.0.as_ptr().align_offset(DIRECT_ALIGN);
        &mut self.0[start..start + BOUNCE_SIZE]
    }
}

/// What this device accepts in one chain: at most [`QUEUE_SIZE`] descriptors (the largest
/// queue it offers: a driver that made its queue smaller may still send as many segments
/// through an indirect table), SEG_MAX data segments plus header and status when the driver
/// negotiated SEG_MAX, descriptors of SIZE_MAX bytes at most when it negotiated SIZE_MAX. A
/// driver that did not accept a limit is not held to it.
fn chain_limits(acked: u64) -> ChainLimits {
    let mut limits = ChainLimits::queue(QUEUE_SIZE);
    if acked & (1 << F_SEG_MAX) != 0 {
        limits.max_descriptors = limits.max_descriptors.min(SEG_MAX as usize + 2);
    }
    if acked & (1 << F_SIZE_MAX) != 0 {
        limits.max_segment = SIZE_MAX;
    }
    limits
}

/// The guest ranges covering bytes `[start, start + len)` of `segs` laid end to end.
fn pieces(segs: &[Segment], start: u64, len: u64) -> Option<Vec<(GuestAddress, usize)>> {
    let mut out = Vec::new();
    let (mut skip, mut left) = (start, len);
    for s in segs {
        if left == 0 {
            break;
        }
        let seg_len = s.len as u64;
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(left);
        out.push((s.addr.checked_add(skip)?, usize::try_from(n).ok()?));
        left -= n;
        skip = 0;
    }
    (left == 0).then_some(out)
}

fn gather(mem: &GuestMemoryMmap, segs: &[Segment], start: u64, out: &mut [u8]) -> Option<()> {
    let mut done = 0;
    for (a, n) in pieces(segs, start, out.len() as u64)? {
        mem.read_slice(&mut out[done..done + n], a).ok()?;
        done += n;
    }
    Some(())
}

fn scatter(
    mem: &GuestMemoryMmap,
    ps: &[(GuestAddress, usize)],
    start: usize,
    data: &[u8],
) -> io::Result<()> {
    let (mut skip, mut done) = (start, 0);
    for &(a, n) in ps {
        if done == data.len() {
            break;
        }
        if skip >= n {
            skip -= n;
            continue;
        }
        let k = (n - skip).min(data.len() - done);
        mem.write_slice(&data[done..done + k], a.unchecked_add(skip as u64))
            .map_err(io::Error::other)?;
        done += k;
        skip = 0;
    }
    Ok(())
}

fn gather_pieces(
    mem: &GuestMemoryMmap,
    ps: &[(GuestAddress, usize)],
    start: usize,
    out: &mut [u8],
) -> io::Result<()> {
    let (mut skip, mut done) = (start, 0);
    for &(a, n) in ps {
        if done == out.len() {
            break;
        }
        if skip >= n {
            skip -= n;
            continue;
        }
        let k = (n - skip).min(out.len() - done);
        mem.read_slice(&mut out[done..done + k], a.unchecked_add(skip as u64))
            .map_err(io::Error::other)?;
        done += k;
        skip = 0;
    }
    Ok(())
}

/// Host iovecs for guest ranges (a range may cross memory regions).
fn iovecs(mem: &GuestMemoryMmap, ps: &[(GuestAddress, usize)]) -> io::Result<Vec<libc::iovec>> {
    let mut iov = Vec::with_capacity(ps.len());
    for &(a, n) in ps {
        for s in mem.get_slices(a, n) {
            let s = s.map_err(io::Error::other)?;
            iov.push(libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            });
        }
    }
    Ok(iov)
}

/// preadv/pwritev until every iovec is done; a short transfer at end of file is an error.
fn rw_vectored(fd: RawFd, iov: &mut [libc::iovec], mut off: u64, write: bool) -> io::Result<()> {
    let mut first = 0;
    while first < iov.len() {
        if iov[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let cnt = (iov.len() - first).min(IOV_MAX) as libc::c_int;
        let off_t = libc::off_t::try_from(off)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let p = iov[first..].as_ptr();
        // SAFETY: `p` points to `cnt` initialised iovecs; each describes memory inside a guest
        // RAM mapping (from get_slices) that stays mapped while the caller holds `mem`, so the
        // kernel only reads/writes memory we own. The guest touching the same bytes at the same
        // time is its own race, exactly as with DMA on real hardware.
        let r = unsafe {
            if write {
                libc::pwritev(fd, p, cnt, off_t)
            } else {
                libc::preadv(fd, p, cnt, off_t)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                if write {
                    io::ErrorKind::WriteZero
                } else {
                    io::ErrorKind::UnexpectedEof
                },
                "short transfer: the image shrank?",
            ));
        }
        let mut n = r as usize;
        off += n as u64;
        while n > 0 && first < iov.len() {
            let cur = &mut iov[first];
            if n >= cur.iov_len {
                n -= cur.iov_len;
                first += 1;
            } else {
                cur.iov_base = cur.iov_base.cast::<u8>().wrapping_add(n).cast();
                cur.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Reads `len` bytes at `off` into the guest ranges `ps`.
fn read_to_guest(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    ps: &[(GuestAddress, usize)],
    off: u64,
    len: u64,
    bounce: &mut Bounce,
) -> io::Result<()> {
    if disk.direct_io {
        let r = (|| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(BOUNCE_SIZE as u64) as usize;
                let buf = &mut bounce.get()[..n];
                disk.file.read_exact_at(buf, off + done)?;
                scatter(mem, ps, done as usize, buf)?;
                done += n as u64;
            }
            Ok(())
        })();
        match r {
            Err(e) if is_einval(&e) => {} // unaligned for the host: go buffered
            r => return r,
        }
    }
    let f = disk.buffered.as_ref().unwrap_or(&disk.file);
    rw_vectored(f.as_raw_fd(), &mut iovecs(mem, ps)?, off, false)
}

/// Writes `len` bytes from the guest ranges `ps` at `off`.
fn write_from_guest(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    ps: &[(GuestAddress, usize)],
    off: u64,
    len: u64,
    bounce: &mut Bounce,
) -> io::Result<()> {
    if disk.direct_io {
        let r = (|| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(BOUNCE_SIZE as u64) as usize;
                let buf = &mut bounce.get()[..n];
                gather_pieces(mem, ps, done as usize, buf)?;
                disk.file.write_all_at(buf, off + done)?;
                done += n as u64;
            }
            Ok(())
        })();
        match r {
            Err(e) if is_einval(&e) => {}
            r => return r,
        }
    }
    let f = disk.buffered.as_ref().unwrap_or(&disk.file);
    rw_vectored(f.as_raw_fd(), &mut iovecs(mem, ps)?, off, true)
}

fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    let (o, l) = match (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::Error::from_raw_os_error(libc::EOVERFLOW)),
    };
    // SAFETY: a plain syscall on a descriptor we own; no memory is passed.
    if unsafe { libc::fallocate(f.as_raw_fd(), mode, o, l) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn write_zeroes(
    disk: &Disk,
    off: u64,
    len: u64,
    unmap: bool,
    bounce: &mut Bounce,
) -> io::Result<()> {
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    if unmap && fallocate(&disk.file, libc::FALLOC_FL_PUNCH_HOLE | keep, off, len).is_ok() {
        return Ok(());
    }
    if fallocate(&disk.file, libc::FALLOC_FL_ZERO_RANGE | keep, off, len).is_ok() {
        return Ok(());
    }
    if len > FALLBACK_ZEROES_BYTES {
        return Err(io::ErrorKind::Unsupported.into());
    }
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(BOUNCE_SIZE as u64) as usize;
        let buf = &mut bounce.get()[..n];
        buf.fill(0);
        match disk.file.write_all_at(buf, off + done) {
            Err(e) if is_einval(&e) && disk.buffered.is_some() => {
                if let Some(b) = &disk.buffered {
                    b.write_all_at(buf, off + done)?;
                }
            }
            r => r?,
        }
        done += n as u64;
    }
    Ok(())
}

/// Handles one request chain; returns the used length (bytes written to the guest).
fn process_request(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    limits: ChainLimits,
    bounce: &mut Bounce,
) -> u32 {
    let st = &disk.stats;
    let bufs = chain::parse(chain, mem, limits);
    if let Some(e @ ChainError::TooManyDescriptors(_)) = bufs.fault {
        // The walk stopped early: the last writable byte seen is not the status byte, and a
        // write there would land in a data buffer.
        guest_error(&st.guest_errors, format_args!("virtio-blk: {e}"));
        return 0;
    }
    // The status byte is the last byte of the device-writable part.
    let Some(status_at) = bufs
        .writable
        .last()
        .and_then(|s| s.addr.checked_add(s.len as u64 - 1))
    else {
        guest_error(
            &st.guest_errors,
            format_args!("virtio-blk: request without a status byte"),
        );
        return 0;
    };
    let (status, written) = match bufs.fault {
        Some(why) => {
            guest_error(&st.guest_errors, format_args!("virtio-blk: {why}"));
            (S_IOERR, 0)
        }
        None => execute(disk, mem, &bufs, bounce),
    };
    if mem.write_obj(status, status_at).is_err() {
        return 0;
    }
    written.saturating_add(1)
}

/// Runs a well-formed chain; returns (status, data bytes written to the guest).
fn execute(disk: &Disk, mem: &GuestMemoryMmap, b: &Chain, bounce: &mut Bounce) -> (u8, u32) {
    let st = &disk.stats;
    let gerr = |why: &str| {
        guest_error(&st.guest_errors, format_args!("virtio-blk: {why}"));
        (S_IOERR, 0)
    };
    let mut hdr = [0u8; HEADER_LEN as usize];
    if b.readable_len < HEADER_LEN || gather(mem, &b.readable, 0, &mut hdr).is_none() {
        return gerr("request without a 16-byte header");
    }
    let typ = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let data_out = b.readable_len - HEADER_LEN;
    let data_in = b.writable_len - 1;
    let ioerr = |e: io::Error| {
        bump(&st.io_errors, 1);
        log::error!("virtio-blk: host I/O error: {e}");
        (S_IOERR, 0)
    };
    match typ {
        T_IN => {
            if data_out != 0 {
                return gerr("IN request with device-readable data buffers");
            }
            // A transfer of nothing is a malformed request, not a no-op (virtio 1.2 §5.2.6:
            // data is a whole number of sectors, at least one).
            if data_in == 0 {
                return gerr("IN request without data buffers");
            }
            let Some(off) = disk.range(sector, data_in) else {
                return gerr("IN beyond the disk end or not sector-aligned");
            };
            let Some(ps) = pieces(&b.writable, 0, data_in) else {
                return gerr("IN buffers inconsistent");
            };
            match read_to_guest(disk, mem, &ps, off, data_in, bounce) {
                Ok(()) => {
                    bump(&st.reads, 1);
                    bump(&st.bytes_read, data_in);
                    (S_OK, data_in as u32)
                }
                Err(e) => ioerr(e),
            }
        }
        T_OUT => {
            if disk.readonly {
                return gerr("write to a read-only disk");
            }
            if data_in != 0 {
                return gerr("OUT request with device-writable data buffers");
            }
            if data_out == 0 {
                return gerr("OUT request without data buffers");
            }
            let Some(off) = disk.range(sector, data_out) else {
                return gerr("OUT beyond the disk end or not sector-aligned");
            };
            let Some(ps) = pieces(&b.readable, HEADER_LEN, data_out) else {
                return gerr("OUT buffers inconsistent");
            };
            match write_from_guest(disk, mem, &ps, off, data_out, bounce) {
                Ok(()) => {
                    bump(&st.writes, 1);
                    bump(&st.bytes_written, data_out);
                    (S_OK, 0)
                }
                Err(e) => ioerr(e),
            }
        }
        T_FLUSH => match disk.file.sync_data() {
            Ok(()) => {
                bump(&st.flushes, 1);
                (S_OK, 0)
            }
            Err(e) => ioerr(e),
        },
        T_GET_ID => {
            bump(&st.get_ids, 1);
            let n = data_in.min(ID_BYTES as u64) as usize;
            match pieces(&b.writable, 0, n as u64).map(|ps| scatter(mem, &ps, 0, &disk.id[..n])) {
                Some(Ok(())) => (S_OK, n as u32),
                _ => gerr("GET_ID buffer unusable"),
            }
        }
        T_DISCARD | T_WRITE_ZEROES if disk.discard => {
            if data_in != 0 || data_out == 0 || !data_out.is_multiple_of(16) {
                return gerr("DISCARD/WRITE_ZEROES without whole 16-byte segments");
            }
            let nseg = data_out / 16;
            let (max_sectors, max_segs) = if typ == T_DISCARD {
                (MAX_DISCARD_SECTORS, MAX_DISCARD_SEG)
            } else {
                disk.write_zeroes_limits()
            };
            if nseg > u64::from(max_segs) {
                return gerr("DISCARD/WRITE_ZEROES with too many segments");
            }
            let mut ranges = Vec::with_capacity(nseg as usize);
            for i in 0..nseg {
                let mut s = [0u8; 16];
                if gather(mem, &b.readable, HEADER_LEN + 16 * i, &mut s).is_none() {
                    return gerr("DISCARD/WRITE_ZEROES segment unreadable");
                }
                let mut sec = [0u8; 8];
                sec.copy_from_slice(&s[0..8]);
                let sec = u64::from_le_bytes(sec);
                let num = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
                let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
                let allowed = if typ == T_DISCARD {
                    0
                } else {
                    WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    bump(&st.unsupported, 1);
                    return (S_UNSUPP, 0);
                }
                if num > max_sectors {
                    return gerr("DISCARD/WRITE_ZEROES segment above the advertised maximum");
                }
                let len = u64::from(num) * SECTOR_SIZE;
                let Some(off) = disk.range(sec, len) else {
                    return gerr("DISCARD/WRITE_ZEROES beyond the disk end or not aligned");
                };
                ranges.push((off, len, flags & WRITE_ZEROES_FLAG_UNMAP != 0));
            }
            for (off, len, unmap) in ranges {
                if typ == T_DISCARD {
                    // Advisory: a filesystem without hole punching simply keeps the data.
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    if let Err(e) = fallocate(&disk.file, mode, off, len) {
                        log::debug!("virtio-blk: discard not done: {e}");
                    }
                } else {
                    match write_zeroes(disk, off, len, unmap, bounce) {
                        Ok(()) => {}
                        // Too much to write out: the guest zeroes it itself (Linux falls
                        // back to plain writes on UNSUPP).
                        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                            bump(&st.unsupported, 1);
                            return (S_UNSUPP, 0);
                        }
                        Err(e) => return ioerr(e),
                    }
                }
            }
            bump(
                if typ == T_DISCARD {
                    &st.discards
                } else {
                    &st.write_zeroes
                },
                1,
            );
            (S_OK, 0)
        }
        _ => {
            bump(&st.unsupported, 1);
            log::debug!("virtio-blk: unsupported request type {typ}");
            (S_UNSUPP, 0)
        }
    }
}

/// The virtio-blk device.
pub struct Block {
    /// The image the worker serves: it takes the current one for each batch, so a new
    /// backing file ([`DeviceUpdate::BackingFile`]) applies from the next batch on.
    disk: Arc<RwLock<Arc<Disk>>>,
    /// What the image was opened with (a new backing file is opened the same way).
    cfg: BlockConfig,
    /// The limits, which `PATCH /drives` may change while the worker runs.
    rate: Arc<LiveLimits>,
    config: [u8; CONFIG_LEN],
    features: u64,
    acked: u64,
    worker: Option<Worker>,
}

fn put(cfg: &mut [u8], off: usize, bytes: &[u8]) {
    cfg[off..off + bytes.len()].copy_from_slice(bytes);
}

impl Block {
    /// Opens (and locks) the image.
    pub fn new(cfg: &BlockConfig) -> Result<Block, BlockError> {
        let disk = Disk::open(cfg)?;
        let bit = |b: u32| 1u64 << b;
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(F_SEG_MAX)
            | bit(F_SIZE_MAX)
            | bit(F_BLK_SIZE)
            | bit(F_FLUSH);
        if disk.readonly {
            features |= bit(F_RO);
        }
        if disk.discard {
            features |= bit(F_DISCARD) | bit(F_WRITE_ZEROES);
        }
        let ratio = cfg.physical_sector_size / cfg.logical_sector_size;
        if ratio > 1 {
            features |= bit(F_TOPOLOGY);
        }
        let mut c = [0u8; CONFIG_LEN];
        put(&mut c, 0, &(disk.size / SECTOR_SIZE).to_le_bytes());
        put(&mut c, 8, &SIZE_MAX.to_le_bytes());
        put(&mut c, 12, &SEG_MAX.to_le_bytes());
        put(&mut c, 20, &disk.logical.to_le_bytes());
        c[24] = ratio.trailing_zeros() as u8; // physical_block_exp
        put(&mut c, 26, &(ratio as u16).to_le_bytes()); // min_io_size, in logical blocks
        put(&mut c, 34, &1u16.to_le_bytes()); // num_queues
        if disk.discard {
            let align = disk.logical / SECTOR_SIZE as u32;
            put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes());
            put(&mut c, 44, &align.to_le_bytes());
            let (zero_sectors, zero_segs) = disk.write_zeroes_limits();
            put(&mut c, 48, &zero_sectors.to_le_bytes());
            put(&mut c, 52, &zero_segs.to_le_bytes());
            c[56] = 1; // write_zeroes_may_unmap
        }
        Ok(Block {
            disk: Arc::new(RwLock::new(Arc::new(disk))),
            cfg: cfg.clone(),
            rate: LiveLimits::new(cfg.rate),
            config: c,
            features,
            acked: 0,
            worker: None,
        })
    }

    fn current(&self) -> Arc<Disk> {
        self.disk.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The request counters.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.current().stats.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.current().size / SECTOR_SIZE
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Whether the worker runs (between activate and reset).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-blk: ignored write of {} byte(s) to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let current = self.disk.clone();
        let mut bounce = Bounce::default();
        let limits = chain_limits(self.acked);
        let mut limiter = FollowingLimiter::new(self.rate.clone());
        activate_single_queue(
            &mut self.worker,
            WorkerClass::Block,
            mem,
            interrupt,
            queues,
            kicks,
            move |queue, mem| {
                let disk = current.read().unwrap_or_else(|p| p.into_inner()).clone();
                let errors = &disk.stats.guest_errors;
                drain_queue_limited(queue, mem, errors, limiter.current(), |chain| {
                    let moved = || {
                        let st = &disk.stats;
                        st.bytes_read.load(Ordering::Relaxed)
                            + st.bytes_written.load(Ordering::Relaxed)
                    };
                    let before = moved();
                    let used = process_request(&disk, mem, chain, limits, &mut bounce);
                    (used, moved() - before)
                })
            },
        )
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.acked = 0;
    }

    fn pause(&mut self) -> Result<(), LifecycleError> {
        self.worker.as_ref().map_or(Ok(()), Worker::pause)
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    /// A new backing file: opened (and locked) as the first was, the same serial and
    /// counters; the old one is closed once the worker's batch in flight is done.
    fn update(&mut self, update: &DeviceUpdate) -> Result<bool, String> {
        let path = match update {
            DeviceUpdate::BackingFile(path) => path,
            DeviceUpdate::BlockRate(limits) => {
                self.rate.set(*limits);
                log::info!("virtio-blk: rate limits now {limits:?}");
                return Ok(false);
            }
            DeviceUpdate::NetRate { .. } => return Err("not a network device".into()),
        };
        let old = self.current();
        let mut cfg = self.cfg.clone();
        cfg.path = path.clone();
        cfg.serial = Some(
            String::from_utf8_lossy(&old.id)
                .trim_end_matches('\0')
                .to_string(),
        );
        let mut disk = Disk::open(&cfg).map_err(|e| e.to_string())?;
        disk.stats = old.stats.clone();
        put(&mut self.config, 0, &disk.capacity_bytes());
        log::info!(
            "virtio-blk: now serving {} ({} sectors)",
            path.display(),
            disk.size / SECTOR_SIZE
        );
        self.cfg = cfg;
        *self.disk.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(disk);
        Ok(true)
    }

    fn counters(&self) -> Vec<Stat> {
        let disk = self.current();
        let s = &*disk.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("reads", l(&s.reads)),
            ("writes", l(&s.writes)),
            ("flushes", l(&s.flushes)),
            ("discards", l(&s.discards)),
            ("write_zeroes", l(&s.write_zeroes)),
            ("get_ids", l(&s.get_ids)),
            ("bytes_read", l(&s.bytes_read)),
            ("bytes_written", l(&s.bytes_written)),
            ("io_errors", l(&s.io_errors)),
            ("guest_errors", l(&s.guest_errors)),
            ("unsupported", l(&s.unsupported)),
        ]
    }
}

/// Synchronous request processing for fuzz/: the worker's code on one queue, no thread.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use super::*;

    /// One disk image and the worker's scratch buffer.
    pub struct Harness {
        disk: Disk,
        bounce: Bounce,
    }

    impl Harness {
        pub fn new(cfg: &BlockConfig) -> Result<Harness, BlockError> {
            Ok(Harness {
                disk: Disk::open(cfg)?,
                bounce: Bounce::default(),
            })
        }

        /// Processes what `queue` has available, as the worker would after a kick, with the
        /// driver's `acked` features.
        pub fn drain(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, acked: u64) {
            let limits = chain_limits(acked);
            let (disk, bounce) = (&self.disk, &mut self.bounce);
            drain_queue(queue, mem, &disk.stats.guest_errors, |chain| {
                process_request(disk, mem, chain, limits, bounce)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use vm_memory::GuestAddress;

    const DISK_SECTORS: u64 = 64;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn image(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    struct H {
        drv: Driver,
        q: Queue,
        disk: Disk,
        bounce: Bounce,
        /// The features the "driver" accepted: SEG_MAX and SIZE_MAX, as Linux does.
        acked: u64,
        _dir: TempDir,
        path: PathBuf,
    }

    fn harness_with(cfg: impl FnOnce(&mut BlockConfig)) -> H {
        let dir = TempDir::new("blk");
        let path = image(&dir, "disk.img", &pattern(DISK_SECTORS as usize * 512, 7));
        let mut c = BlockConfig::new(&path);
        cfg(&mut c);
        let disk = Disk::open(&c).unwrap();
        let drv = Driver::new(QUEUE_SIZE);
        let q = drv.queue();
        H {
            drv,
            q,
            disk,
            bounce: Bounce::default(),
            acked: 1 << F_SEG_MAX | 1 << F_SIZE_MAX,
            _dir: dir,
            path,
        }
    }

    fn harness() -> H {
        harness_with(|_| {})
    }

    impl H {
        fn run(&mut self) {
            let (disk, mem, bounce) = (&self.disk, &self.drv.mem, &mut self.bounce);
            let limits = chain_limits(self.acked);
            drain_queue(&mut self.q, mem, &disk.stats.guest_errors, |c| {
                process_request(disk, mem, c, limits, bounce)
            });
        }

        /// Sends a request; returns (status, used length, data read).
        fn req(&mut self, typ: u32, sector: u64, out: &[u8], in_len: u32) -> (u8, u32, Vec<u8>) {
            let mut hdr = Vec::new();
            hdr.extend_from_slice(&typ.to_le_bytes());
            hdr.extend_from_slice(&0u32.to_le_bytes());
            hdr.extend_from_slice(&sector.to_le_bytes());
            let h = self.drv.buf(&hdr);
            let mut descs = vec![(h, 16, false)];
            if !out.is_empty() {
                descs.push((self.drv.buf(out), out.len() as u32, false));
            }
            let din = self.drv.alloc(u64::from(in_len));
            if in_len > 0 {
                descs.push((din, in_len, true));
            }
            let s = self.drv.buf(&[0xff]);
            descs.push((s, 1, true));
            self.send(&descs);
            let (_, len) = self.drv.used(self.drv.used_idx().wrapping_sub(1));
            (
                self.drv.read(s, 1)[0],
                len,
                self.drv.read(din, in_len as usize),
            )
        }

        fn send(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
            let before = self.drv.used_idx();
            let head = self.drv.push_chain(descs);
            self.run();
            assert_eq!(
                self.drv.used_idx(),
                before.wrapping_add(1),
                "chain not returned"
            );
            assert_eq!(self.drv.used(before).0, u32::from(head));
            head
        }

        fn file(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    fn seg(sector: u64, num: u32, flags: u32) -> Vec<u8> {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend_from_slice(&num.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    }

    #[test]
    fn parses_bhyve_option_strings() {
        let c = BlockConfig::parse("/img,ro,nocache,direct,sectorsize=512/4096,nodelete,ser=ABC")
            .unwrap();
        assert_eq!(c.path, PathBuf::from("/img"));
        assert!(c.readonly && c.nocache && c.direct && c.nodelete);
        assert_eq!((c.logical_sector_size, c.physical_sector_size), (512, 4096));
        assert_eq!(c.serial.as_deref(), Some("ABC"));
        let c = BlockConfig::parse("path=/x,sectorsize=4096").unwrap();
        assert_eq!(
            (c.logical_sector_size, c.physical_sector_size),
            (4096, 4096)
        );
        assert!(!c.readonly);
        let keys = [("device", "virtio-blk"), ("path", "/y"), ("ro", "false")];
        assert!(!BlockConfig::from_keys(keys).unwrap().readonly);

        let e = BlockConfig::parse("/img,frob").unwrap_err();
        assert!(e.to_string().contains("'frob'"), "{e}");
        let e = BlockConfig::parse("/img,sectorsize=513").unwrap_err();
        assert!(e.to_string().contains("sectorsize=513"), "{e}");
        let e = BlockConfig::parse("/img,sectorsize=4096/512").unwrap_err();
        assert!(e.to_string().contains("sectorsize"), "{e}");
        let e = BlockConfig::parse("/img,ro=maybe").unwrap_err();
        assert!(e.to_string().contains("ro=maybe"), "{e}");
        let e = BlockConfig::parse("/img,ser=123456789012345678901").unwrap_err();
        assert!(e.to_string().contains("ser="), "{e}");
        assert_eq!(BlockConfig::parse(""), Err(BlockConfigError::MissingPath));
        assert_eq!(BlockConfig::parse("ro"), Ok(BlockConfig::new("ro")));
    }

    #[test]
    fn features_and_config_space() {
        let dir = TempDir::new("blk");
        let p = image(&dir, "d", &vec![0u8; 8192 + 100]);
        let b = Block::new(
            &BlockConfig::parse(&format!("{},sectorsize=512/4096", p.display())).unwrap(),
        )
        .unwrap();
        let f = b.features();
        for bit in [
            32,
            28,
            F_SEG_MAX,
            F_SIZE_MAX,
            F_BLK_SIZE,
            F_FLUSH,
            F_DISCARD,
            F_WRITE_ZEROES,
            F_TOPOLOGY,
        ] {
            assert!(f & (1 << bit) != 0, "bit {bit}");
        }
        assert_eq!(f & (1 << F_RO), 0);
        let mut cfg = [0u8; 60];
        b.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 16);
        assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
        assert_eq!(cfg[24], 3);
        assert_eq!(
            u32::from_le_bytes(cfg[40..44].try_into().unwrap()),
            MAX_DISCARD_SEG
        );
        assert_eq!(cfg[56], 1);
        assert_eq!(b.capacity(), 16);
        assert_eq!(b.device_type(), 2);
        assert_eq!(b.queue_max_sizes(), &[256]);
    }

    #[test]
    fn write_read_flush_round_trip() {
        let mut h = harness();
        let data = pattern(1024, 99);
        assert_eq!(h.req(T_OUT, 3, &data, 0).0, S_OK);
        assert_eq!(&h.file()[3 * 512..5 * 512], &data[..]);
        let (s, len, got) = h.req(T_IN, 3, &[], 1024);
        assert_eq!((s, len), (S_OK, 1025));
        assert_eq!(got, data);
        // Untouched neighbours read back from the file.
        let (s, _, got) = h.req(T_IN, 0, &[], 512);
        assert_eq!(s, S_OK);
        assert_eq!(got, &h.file()[..512]);
        assert_eq!(h.req(T_FLUSH, 0, &[], 0).0, S_OK);
        let st = &h.disk.stats;
        assert_eq!(st.writes.load(Ordering::Relaxed), 1);
        assert_eq!(st.reads.load(Ordering::Relaxed), 2);
        assert_eq!(st.flushes.load(Ordering::Relaxed), 1);
        assert_eq!(st.guest_errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn last_sector_and_beyond_the_end() {
        let mut h = harness();
        let last = DISK_SECTORS - 1;
        let data = pattern(512, 3);
        assert_eq!(h.req(T_OUT, last, &data, 0).0, S_OK);
        assert_eq!(&h.file()[last as usize * 512..], &data[..]);
        assert_eq!(h.req(T_IN, last, &[], 512).2, data);
        let before = h.file();
        assert_eq!(h.req(T_OUT, last, &pattern(1024, 1), 0).0, S_IOERR);
        assert_eq!(h.req(T_OUT, DISK_SECTORS, &data, 0).0, S_IOERR);
        assert_eq!(h.req(T_IN, DISK_SECTORS, &[], 512).0, S_IOERR);
        assert_eq!(h.req(T_IN, u64::MAX, &[], 512).0, S_IOERR);
        assert_eq!(h.req(T_IN, u64::MAX / 512 + 1, &[], 512).0, S_IOERR);
        assert_eq!(h.req(T_OUT, u64::MAX / 512, &data, 0).0, S_IOERR);
        assert_eq!(h.req(T_IN, 0, &[], 100).0, S_IOERR); // not a whole sector
        assert_eq!(h.file(), before);
        assert_eq!(h.disk.stats.guest_errors.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn get_id_serial_and_stable_default() {
        let mut h = harness_with(|c| c.serial = Some("SER-123".into()));
        let (s, len, id) = h.req(T_GET_ID, 0, &[], 20);
        assert_eq!((s, len), (S_OK, 21));
        assert_eq!(&id[..7], b"SER-123");
        assert!(id[7..].iter().all(|&b| b == 0));
        let dir = TempDir::new("blk");
        let p = image(&dir, "x", &[0u8; 512]);
        let a = Disk::open(&BlockConfig::new(&p)).unwrap().id;
        let b = Disk::open(&BlockConfig::new(&p)).map(|d| d.id);
        // The first Disk was dropped (unlocked) before the second open.
        assert_eq!(a, b.unwrap());
        assert!(a.starts_with(b"RHYVE-") && a.iter().all(|&c| c != 0));
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut h = harness_with(|c| c.readonly = true);
        let before = h.file();
        assert_eq!(h.req(T_OUT, 0, &pattern(512, 1), 0).0, S_IOERR);
        assert_eq!(h.req(T_DISCARD, 0, &seg(0, 1, 0), 0).0, S_UNSUPP);
        assert_eq!(h.req(T_WRITE_ZEROES, 0, &seg(0, 1, 0), 0).0, S_UNSUPP);
        assert_eq!(h.req(T_IN, 0, &[], 512).2, &before[..512]);
        assert_eq!(h.req(T_FLUSH, 0, &[], 0).0, S_OK);
        assert_eq!(h.file(), before);
        let b =
            Block::new(&BlockConfig::parse(&format!("{},ro", h.path.display())).unwrap()).unwrap();
        assert!(b.features() & (1 << F_RO) != 0);
        assert_eq!(b.features() & (1 << F_DISCARD | 1 << F_WRITE_ZEROES), 0);
    }

    #[test]
    fn image_lock_refuses_a_second_writer() {
        let dir = TempDir::new("blk");
        let p = image(&dir, "d", &[0u8; 4096]);
        let rw = Block::new(&BlockConfig::new(&p)).unwrap();
        let e = Block::new(&BlockConfig::new(&p)).err().unwrap();
        assert!(matches!(e, BlockError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("in use"));
        let mut ro = BlockConfig::new(&p);
        ro.readonly = true;
        assert!(matches!(Block::new(&ro), Err(BlockError::Locked { .. })));
        drop(rw);
        let r1 = Block::new(&ro).unwrap();
        let _r2 = Block::new(&ro).unwrap();
        assert!(matches!(
            Block::new(&BlockConfig::new(&p)),
            Err(BlockError::Locked { .. })
        ));
        drop(r1);
        let e = Block::new(&BlockConfig::new(dir.path("missing")))
            .err()
            .unwrap();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn discard_and_write_zeroes() {
        let mut h = harness();
        assert_eq!(h.req(T_WRITE_ZEROES, 0, &seg(2, 2, 0), 0).0, S_OK);
        assert!(h.file()[1024..2048].iter().all(|&b| b == 0));
        assert_ne!(h.file()[2048], 0);
        let mut two = seg(10, 1, WRITE_ZEROES_FLAG_UNMAP);
        two.extend(seg(20, 3, 0));
        assert_eq!(h.req(T_WRITE_ZEROES, 0, &two, 0).0, S_OK);
        let f = h.file();
        assert!(f[10 * 512..11 * 512].iter().all(|&b| b == 0));
        assert!(f[20 * 512..23 * 512].iter().all(|&b| b == 0));
        assert_eq!(f.len() as u64, DISK_SECTORS * 512, "size kept");
        assert_eq!(h.req(T_DISCARD, 0, &seg(30, 4, 0), 0).0, S_OK);
        assert_eq!(h.req(T_DISCARD, 0, &seg(30, 4, 1), 0).0, S_UNSUPP);
        assert_eq!(h.req(T_WRITE_ZEROES, 0, &seg(0, 1, 2), 0).0, S_UNSUPP);
        assert_eq!(h.req(T_DISCARD, 0, &seg(DISK_SECTORS, 1, 0), 0).0, S_IOERR);
        assert_eq!(h.req(T_WRITE_ZEROES, 0, &seg(u64::MAX, 1, 0), 0).0, S_IOERR);
        assert_eq!(h.req(T_DISCARD, 0, &seg(0, 1, 0)[..8], 0).0, S_IOERR);
        assert_eq!(h.req(T_DISCARD, 0, &[], 0).0, S_IOERR);
        assert_eq!(h.req(T_DISCARD, 0, &seg(0, 1, 0).repeat(17), 0).0, S_IOERR);
        assert_eq!(h.disk.stats.write_zeroes.load(Ordering::Relaxed), 2);
        assert_eq!(h.disk.stats.discards.load(Ordering::Relaxed), 1);

        let mut h = harness_with(|c| c.nodelete = true);
        assert_eq!(h.req(T_DISCARD, 0, &seg(0, 1, 0), 0).0, S_UNSUPP);
        assert_eq!(h.req(T_WRITE_ZEROES, 0, &seg(0, 1, 0), 0).0, S_UNSUPP);
    }

    #[test]
    fn write_zeroes_where_zeroing_is_not_in_place_stays_bounded() {
        use std::os::unix::fs::MetadataExt;
        // tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: zeroes would be written out,
        // into host memory.
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "this test needs the tmpfs at /dev/shm");
        let path = shm.join(format!("rhyve-blk-zeroes-{}.img", std::process::id()));
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let _remove = Remove(path.clone());
        File::create(&path).unwrap().set_len(2 << 30).unwrap();
        let disk = Disk::open(&BlockConfig::new(&path)).unwrap();
        assert!(!disk.zeroes_in_place);
        assert_eq!(disk.write_zeroes_limits(), (FALLBACK_ZEROES_SECTORS, 1));
        let drv = Driver::new(QUEUE_SIZE);
        let mut h = H {
            q: drv.queue(),
            drv,
            disk,
            bounce: Bounce::default(),
            acked: 1 << F_SEG_MAX | 1 << F_SIZE_MAX,
            _dir: TempDir::new("blk-shm"),
            path: path.clone(),
        };
        // A 32-byte request for 2 GiB of zeroes (two 1 GiB segments, the in-place limits).
        let mut big = seg(0, MAX_DISCARD_SECTORS, 0);
        big.extend(seg(u64::from(MAX_DISCARD_SECTORS), MAX_DISCARD_SECTORS, 0));
        assert_eq!(h.req(T_WRITE_ZEROES, 0, &big, 0).0, S_IOERR);
        assert_eq!(h.req(T_WRITE_ZEROES, 0, &big[..16], 0).0, S_IOERR);
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated < 16 << 20,
            "{allocated} bytes of host memory written"
        );
        // Within the advertised limit the zeroes are written.
        let n = FALLBACK_ZEROES_SECTORS;
        assert_eq!(h.req(T_WRITE_ZEROES, 0, &seg(8, n, 0), 0).0, S_OK);
        let (st, _, data) = h.req(T_IN, 8, &[], 4096);
        assert_eq!(st, S_OK);
        assert!(data.iter().all(|&b| b == 0));
    }

    #[test]
    fn malformed_chains_get_errors_not_panics() {
        let mut h = harness();
        let before = h.file();
        let hdr = |t: u32, s: u64| {
            let mut v = t.to_le_bytes().to_vec();
            v.extend_from_slice(&[0; 4]);
            v.extend_from_slice(&s.to_le_bytes());
            v
        };
        // Header only: nowhere to put a status.
        let hd = h.drv.buf(&hdr(T_IN, 0));
        h.send(&[(hd, 16, false)]);
        assert_eq!(h.drv.used(h.drv.used_idx() - 1).1, 0);
        // Short header.
        let hd = h.drv.buf(&hdr(T_IN, 0)[..8]);
        let st = h.drv.buf(&[0xff]);
        h.send(&[(hd, 8, false), (st, 1, true)]);
        assert_eq!(h.drv.read(st, 1)[0], S_IOERR);
        // Readable after writable.
        let hd = h.drv.buf(&hdr(T_OUT, 0));
        let d = h.drv.buf(&[1; 512]);
        let st = h.drv.buf(&[0xff]);
        h.send(&[(hd, 16, false), (st, 1, true), (d, 512, false)]);
        // (status is the last writable byte: st)
        assert_eq!(h.drv.read(st, 1)[0], S_IOERR);
        // IN with a readable data buffer; OUT with a writable one.
        let hd = h.drv.buf(&hdr(T_IN, 0));
        let st = h.drv.buf(&[0xff]);
        h.send(&[(hd, 16, false), (d, 512, false), (st, 1, true)]);
        assert_eq!(h.drv.read(st, 1)[0], S_IOERR);
        let hd = h.drv.buf(&hdr(T_OUT, 0));
        let st = h.drv.buf(&[0xff]);
        h.send(&[(hd, 16, false), (d, 512, true), (st, 1, true)]);
        assert_eq!(h.drv.read(st, 1)[0], S_IOERR);
        // A data buffer outside guest memory.
        let hd = h.drv.buf(&hdr(T_IN, 0));
        let st = h.drv.buf(&[0xff]);
        h.send(&[(hd, 16, false), (u64::MAX - 100, 512, true), (st, 1, true)]);
        assert_eq!(h.drv.read(st, 1)[0], S_IOERR);
        h.send(&[
            (hd, 16, false),
            ((MEM_SIZE - 256) as u64, 512, true),
            (st, 1, true),
        ]);
        assert_eq!(h.drv.read(st, 1)[0], S_IOERR);
        // Unknown request type.
        assert_eq!(h.req(0x1234, 0, &[], 0).0, S_UNSUPP);
        // A chain that loops on itself.
        let hd = h.drv.buf(&hdr(T_IN, 0));
        h.drv.write_desc(DESC, 200, hd, 16, F_NEXT, 200);
        h.drv.publish(200);
        h.run();
        // Next descriptor index out of range.
        h.drv.write_desc(DESC, 201, hd, 16, F_NEXT, 9999);
        h.drv.publish(201);
        h.run();
        // A bad indirect table (length not a multiple of 16).
        h.drv.write_desc(DESC, 202, hd, 15, F_INDIRECT, 0);
        h.drv.publish(202);
        h.run();
        assert_eq!(h.file(), before);
        assert!(h.disk.stats.guest_errors.load(Ordering::Relaxed) >= 10);
    }

    #[test]
    fn seg_max_and_size_max_hold_once_negotiated() {
        assert_eq!(chain_limits(0), ChainLimits::queue(QUEUE_SIZE));
        let both = chain_limits(1 << F_SEG_MAX | 1 << F_SIZE_MAX);
        assert_eq!(both.max_descriptors, SEG_MAX as usize + 2);
        assert_eq!(both.max_segment, SIZE_MAX);

        let mut h = harness();
        let mut hdr = T_IN.to_le_bytes().to_vec();
        hdr.extend_from_slice(&[0; 12]);
        // One descriptor above SIZE_MAX.
        let hd = h.drv.buf(&hdr);
        let st = h.drv.buf(&[0xff]);
        let big = h.drv.alloc(u64::from(SIZE_MAX) + 512);
        h.send(&[(hd, 16, false), (big, SIZE_MAX + 512, true), (st, 1, true)]);
        assert_eq!(h.drv.read(st, 1)[0], S_IOERR);
        // An indirect table of 1000 descriptors, each its own buffer: the walk stops at
        // SEG_MAX + 2 and, not knowing where the status byte is, writes nothing.
        let errors = h.disk.stats.guest_errors.load(Ordering::Relaxed);
        let n = 1000u16;
        let table = h.drv.alloc(16 * u64::from(n));
        let bufs = h.drv.alloc(u64::from(n));
        h.drv.write_desc(table, 0, hd, 16, F_NEXT, 1);
        for i in 1..n {
            let last = i + 1 == n;
            let flags = F_WRITE | if last { 0 } else { F_NEXT };
            h.drv
                .write_desc(table, i, bufs + u64::from(i), 1, flags, i + 1);
        }
        h.drv
            .write_desc(DESC, 210, table, 16 * u32::from(n), F_INDIRECT, 0);
        h.drv.publish(210);
        h.run();
        assert_eq!(h.drv.used(h.drv.used_idx() - 1), (210, 0));
        assert_eq!(h.drv.read(bufs, usize::from(n)), vec![0; usize::from(n)]);
        assert_eq!(
            h.disk.stats.guest_errors.load(Ordering::Relaxed),
            errors + 1
        );
    }

    #[test]
    fn any_layout_and_indirect_descriptors() {
        let mut h = harness();
        let mut hdr = T_OUT.to_le_bytes().to_vec();
        hdr.extend_from_slice(&[0; 4]);
        hdr.extend_from_slice(&5u64.to_le_bytes());
        let data = pattern(1024, 42);
        // Header split in two, data split unevenly.
        let a = h.drv.buf(&hdr[..5]);
        let b = h.drv.buf(&hdr[5..]);
        let d1 = h.drv.buf(&data[..100]);
        let d2 = h.drv.buf(&data[100..]);
        let st = h.drv.buf(&[0xff]);
        h.send(&[
            (a, 5, false),
            (b, 11, false),
            (d1, 100, false),
            (d2, 924, false),
            (st, 1, true),
        ]);
        assert_eq!(h.drv.read(st, 1)[0], S_OK);
        assert_eq!(&h.file()[5 * 512..7 * 512], &data[..]);
        // Read back with data and status in one writable descriptor, through an indirect table.
        let mut hdr_in = T_IN.to_le_bytes().to_vec();
        hdr_in.extend_from_slice(&[0; 4]);
        hdr_in.extend_from_slice(&5u64.to_le_bytes());
        let hd = h.drv.buf(&hdr_in);
        let din = h.drv.alloc(1025);
        let table = h.drv.alloc(32);
        h.drv.write_desc(table, 0, hd, 16, F_NEXT, 1);
        h.drv.write_desc(table, 1, din, 1025, F_WRITE, 0);
        h.drv.write_desc(DESC, 100, table, 32, F_INDIRECT, 0);
        h.drv.publish(100);
        h.run();
        assert_eq!(h.drv.used(h.drv.used_idx() - 1), (100, 1025));
        let got = h.drv.read(din, 1025);
        assert_eq!(&got[..1024], &data[..]);
        assert_eq!(got[1024], S_OK);
    }

    #[test]
    fn nocache_and_direct_with_unaligned_guest_buffers() {
        for opts in ["nocache", "direct", "nocache,direct"] {
            let mut h = harness_with(|c| {
                c.nocache = opts.contains("nocache");
                c.direct = opts.contains("direct");
            });
            // Guest buffers at odd addresses: bounced.
            h.drv.alloc(3);
            let data = pattern(4096 + 512, 5);
            let d = h.drv.buf(&data);
            assert_ne!(d % 512, 0);
            assert_eq!(h.req(T_OUT, 8, &data, 0).0, S_OK, "{opts}");
            assert_eq!(&h.file()[8 * 512..8 * 512 + data.len()], &data[..]);
            // A 512-byte request at a 512-aligned offset (may be below the host's block size).
            assert_eq!(h.req(T_OUT, 1, &data[..512], 0).0, S_OK);
            assert_eq!(h.req(T_IN, 1, &[], 512).2, &data[..512]);
            assert_eq!(h.req(T_IN, 8, &[], data.len() as u32).2, data);
            assert_eq!(h.req(T_WRITE_ZEROES, 0, &seg(8, 1, 0), 0).0, S_OK);
            assert!(h.file()[8 * 512..9 * 512].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn logical_4k_sectors_require_alignment() {
        let mut h = harness_with(|c| c.logical_sector_size = 4096);
        assert_eq!(h.req(T_IN, 1, &[], 4096).0, S_IOERR);
        assert_eq!(h.req(T_IN, 8, &[], 512).0, S_IOERR);
        assert_eq!(h.req(T_IN, 8, &[], 4096).0, S_OK);
    }

    #[test]
    fn hostile_random_descriptor_tables() {
        let mut h = harness();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let size = u64::from(QUEUE_SIZE);
        for round in 0..3000 {
            // Random descriptors, biased towards plausible ones.
            for _ in 0..rng.below(8) + 1 {
                let idx = rng.below(size) as u16;
                let addr = match rng.below(4) {
                    0 => rng.next(),
                    1 => (MEM_SIZE as u64).wrapping_sub(rng.below(1024)),
                    _ => DATA + rng.below(0x10000),
                };
                let len = match rng.below(4) {
                    0 => rng.next() as u32,
                    1 => 16,
                    _ => rng.below(2048) as u32,
                };
                let flags = (rng.next() & 7) as u16;
                let next = if rng.below(4) == 0 {
                    rng.next() as u16
                } else {
                    rng.below(size) as u16
                };
                h.drv.write_desc(DESC, idx, addr, len, flags, next);
            }
            // Random request headers in the data area.
            for _ in 0..4 {
                let a = DATA + rng.below(0x10000);
                let typ = [
                    T_IN,
                    T_OUT,
                    T_FLUSH,
                    T_GET_ID,
                    T_DISCARD,
                    T_WRITE_ZEROES,
                    rng.next() as u32,
                ][rng.below(7) as usize];
                let sector = if rng.below(2) == 0 {
                    rng.below(DISK_SECTORS + 2)
                } else {
                    rng.next()
                };
                let mut hdr = typ.to_le_bytes().to_vec();
                hdr.extend_from_slice(&[0; 4]);
                hdr.extend_from_slice(&sector.to_le_bytes());
                let _ = h.drv.mem.write_slice(&hdr, GuestAddress(a));
            }
            for _ in 0..rng.below(4) + 1 {
                h.drv.publish(rng.below(size + 8) as u16);
            }
            if round % 97 == 0 {
                h.drv.set_avail_idx(rng.next() as u16); // corrupt avail index
            }
            h.run();
            if round % 97 == 0 {
                // What a device reset does: fresh rings, fresh queue.
                h.drv = Driver::new(QUEUE_SIZE);
                h.q = h.drv.queue();
            }
        }
        assert!(h.disk.stats.guest_errors.load(Ordering::Relaxed) > 0);
        // The device still works afterwards.
        h.drv = Driver::new(QUEUE_SIZE);
        h.q = h.drv.queue();
        let data = pattern(512, 9);
        assert_eq!(h.req(T_OUT, 1, &data, 0).0, S_OK);
        assert_eq!(h.req(T_IN, 1, &[], 512).2, data);
    }

    #[test]
    fn activate_kick_interrupt_reset_reactivate() {
        let dir = TempDir::new("blk");
        let p = image(&dir, "d", &vec![0u8; 64 * 512]);
        let mut b = Block::new(&BlockConfig::new(&p)).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        for round in 0..2u8 {
            let mut drv = Driver::new(QUEUE_SIZE);
            let kick = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
            b.activate(
                drv.mem.clone(),
                irq.clone(),
                vec![drv.queue()],
                vec![kick.try_clone().unwrap()],
            )
            .unwrap();
            assert!(matches!(
                b.activate(
                    drv.mem.clone(),
                    irq.clone(),
                    vec![drv.queue()],
                    vec![kick.try_clone().unwrap()]
                ),
                Err(ActivateError::AlreadyActive)
            ));
            let irqs = irq.used.load(Ordering::SeqCst);
            let mut hdr = T_OUT.to_le_bytes().to_vec();
            hdr.extend_from_slice(&[0; 4]);
            hdr.extend_from_slice(&u64::from(round).to_le_bytes());
            let hd = drv.buf(&hdr);
            let d = drv.buf(&[round + 1; 512]);
            let st = drv.buf(&[0xff]);
            drv.push_chain(&[(hd, 16, false), (d, 512, false), (st, 1, true)]);
            kick.write(1).unwrap();
            assert!(wait_for(|| drv.used_idx() == 1));
            assert!(wait_for(|| irq.used.load(Ordering::SeqCst) > irqs));
            assert_eq!(drv.read(st, 1)[0], S_OK);
            b.reset();
            assert!(!b.is_active());
        }
        let f = std::fs::read(&p).unwrap();
        assert!(f[..512].iter().all(|&x| x == 1));
        assert!(f[512..1024].iter().all(|&x| x == 2));
        assert_eq!(b.stats().writes.load(Ordering::Relaxed), 2);
        assert!(b
            .activate(Driver::new(16).mem, irq, vec![], vec![])
            .is_err());
    }
}
