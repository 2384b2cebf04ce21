//! `rhyve.test=virtio-blk`: a polled virtio-blk driver (Virtio 1.2 §5.2) that writes a known
//! pattern, reads it back, and sends malformed requests.
//!
//! Pattern (the host test checks the image file against it): byte `i` (0..511) of sector `s`
//! is `(s * 31 + i * 7 + 0x5a) & 0xff`.

use crate::fail;
use crate::io::{line, P};
use crate::virtio::{self, Buf, Dma, Queue};

/// Feature bits (§5.2.3).
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types and status values (§5.2.6).
pub(crate) const T_IN: u32 = 0;
pub(crate) const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
pub(crate) const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

pub(crate) const SECTOR: usize = 512;

/// Device-visible memory: write data, read data, the request header, the status byte.
#[repr(C)]
struct Mem {
    w: [u8; 8 * SECTOR],
    r: [u8; 8 * SECTOR],
    /// struct virtio_blk_req's header: le32 type, le32 reserved, le64 sector.
    hdr: [u8; 16],
    status: [u8; 16],
}
static mut MEM: Dma<{ core::mem::size_of::<Mem>() }> = Dma([0; core::mem::size_of::<Mem>()]);

fn mem() -> &'static mut Mem {
    // SAFETY: Dma is page-aligned and Mem (bytes only) fits exactly; single CPU, and the device
    // only touches it while `request` waits for it.
    unsafe { &mut *(core::ptr::addr_of_mut!(MEM) as *mut Mem) }
}

fn addr<T>(p: &T) -> u64 {
    p as *const T as u64
}

/// Fills `buf` with the pattern of the sectors starting at `first`.
fn pattern(buf: &mut [u8], first: u64) {
    for (k, sec) in buf.chunks_mut(SECTOR).enumerate() {
        let mut v = ((first + k as u64) * 31 + 0x5a) as u8;
        for b in sec {
            *b = v;
            v = v.wrapping_add(7);
        }
    }
}

/// Index of the first byte of `buf` that differs from the pattern, if any.
fn mismatch(buf: &[u8], first: u64) -> Option<usize> {
    for (k, sec) in buf.chunks(SECTOR).enumerate() {
        let mut v = ((first + k as u64) * 31 + 0x5a) as u8;
        for (i, &b) in sec.iter().enumerate() {
            if b != v {
                return Some(k * SECTOR + i);
            }
            v = v.wrapping_add(7);
        }
    }
    None
}

/// Posts one request without waiting for it: header (device-readable), `data` (at most 2
/// buffers), status byte (device-writable) — the layout of §5.2.6.
pub(crate) fn post(q: &mut Queue, typ: u32, sector: u64, data: &[Buf]) {
    let m = mem();
    m.hdr[..4].copy_from_slice(&typ.to_le_bytes());
    m.hdr[4..8].fill(0);
    m.hdr[8..].copy_from_slice(&sector.to_le_bytes());
    m.status[0] = 0xff;
    let mut chain = [Buf(0, 0, false); 4];
    chain[0] = Buf(addr(&m.hdr), 16, false);
    chain[1..=data.len()].copy_from_slice(data);
    chain[data.len() + 1] = Buf(addr(&m.status), 1, true);
    q.post(&chain[..data.len() + 2]);
}

/// The status of the request [`post`] sent (of type `typ`), once the device used it; None
/// (after a FAIL) if the device left the status byte alone.
pub(crate) fn status(typ: u32) -> Option<u8> {
    // SAFETY: the device wrote it; read it as memory the compiler cannot have cached.
    let st = unsafe { core::ptr::addr_of!(mem().status[0]).read_volatile() };
    if st == 0xff {
        fail(&[
            P::S("blk: request type "),
            P::X(typ as u64),
            P::S(" completed without status"),
        ]);
        return None;
    }
    Some(st)
}

/// One request, [`post`]ed and polled for. Returns the status, or None (after a FAIL) if the
/// device did not complete it or left the status byte alone.
fn request(q: &mut Queue, typ: u32, sector: u64, data: &[Buf]) -> Option<u8> {
    post(q, typ, sector, data);
    q.poll()?;
    status(typ)
}

/// A read or write of `len` bytes at `sector` from/into the write (`OUT`) or read (`IN`)
/// buffer, in `segs` data descriptors. Fails unless the status is OK.
fn rw(q: &mut Queue, typ: u32, sector: u64, len: usize, segs: usize) -> bool {
    let m = mem();
    let base = if typ == T_IN {
        m.r[..len].fill(0xee);
        addr(&m.r)
    } else {
        addr(&m.w)
    };
    let seg = (len / segs) as u32;
    let bufs = [0, 1].map(|k| Buf(base + (k * seg) as u64, seg, typ == T_IN));
    let st = request(q, typ, sector, &bufs[..segs]);
    if st != Some(S_OK) {
        if let Some(st) = st {
            fail(&[
                P::S(if typ == T_IN {
                    "blk: read"
                } else {
                    "blk: write"
                }),
                P::S(" sector="),
                P::D(sector),
                P::S(" status="),
                P::D(st as u64),
            ]);
        }
        return false;
    }
    true
}

/// `rhyve.blk.swap=1`: waits (polling, no time limit) for the device configuration to
/// change (the VMM swapped the backing file), then reports the new capacity and the first
/// byte of sector 0 as the new medium has it.
fn new_medium(d: &virtio::Dev, q: &mut Queue) {
    let gen = d.config_generation();
    line(&[P::S("blk waiting for a new medium")]);
    while d.config_generation() == gen {
        crate::io::pause();
    }
    let capacity = u64::from_le_bytes(d.config::<8>(0));
    if rw(q, T_IN, 0, SECTOR, 1) {
        line(&[
            P::S("blk new medium capacity="),
            P::D(capacity),
            P::S(" first="),
            P::X(mem().r[0] as u64),
        ]);
    }
}

/// Write the pattern to `sector`, `n` sectors.
fn write(q: &mut Queue, sector: u64, n: usize) -> bool {
    pattern(&mut mem().w[..n * SECTOR], sector);
    rw(q, T_OUT, sector, n * SECTOR, 1)
}

/// Read `n` sectors at `sector` and compare with the pattern.
fn verify(q: &mut Queue, sector: u64, n: usize, segs: usize) -> bool {
    if !rw(q, T_IN, sector, n * SECTOR, segs) {
        return false;
    }
    if let Some(at) = mismatch(&mem().r[..n * SECTOR], sector) {
        fail(&[
            P::S("blk: read back sector="),
            P::D(sector + (at / SECTOR) as u64),
            P::S(" byte="),
            P::D((at % SECTOR) as u64),
            P::S(" is "),
            P::X(mem().r[at] as u64),
        ]);
        return false;
    }
    true
}

/// Finds the virtio-blk function (probe as [`virtio::probe`]), negotiates `wanted`, sets up
/// request queue 0 and sets DRIVER_OK. None after a FAIL.
pub(crate) fn open(window: &mut u64, reassign: bool, wanted: u64) -> Option<(virtio::Dev, Queue)> {
    let mut d = virtio::probe(&[0x1042, 0x1001], window, reassign)?;
    if !d.negotiate(wanted) {
        return None;
    }
    let q = d.queue(0)?;
    if !d.driver_ok() {
        return None;
    }
    if d.device == 0 {
        fail(&[P::S("blk: no device configuration capability")]);
        return None;
    }
    Some((d, q))
}

/// struct virtio_blk_config (§5.2.4): le64 capacity @0, in 512-byte sectors.
pub(crate) fn capacity(d: &virtio::Dev) -> u64 {
    u64::from_le_bytes(d.config::<8>(0))
}

/// `empty_ok`: accept status OK for a write without data (QEMU 7.2 does that: a 0-byte write).
pub fn test(window: &mut u64, reassign: bool, ro_cmdline: bool, empty_ok: bool, swap: bool) {
    let wanted = F_FLUSH | F_BLK_SIZE | F_SEG_MAX | F_DISCARD | F_WRITE_ZEROES | F_RO;
    let Some((d, mut q)) = open(window, reassign, wanted) else {
        return;
    };
    // struct virtio_blk_config (§5.2.4): le32 seg_max @12, le32 blk_size @20.
    let capacity = capacity(&d);
    let seg_max = u32::from_le_bytes(d.config::<4>(12));
    let blk_size = u32::from_le_bytes(d.config::<4>(20));
    line(&[P::S("blk capacity="), P::D(capacity)]);
    line(&[
        P::S("blk config seg_max="),
        P::D(if d.features & F_SEG_MAX != 0 {
            seg_max as u64
        } else {
            0
        }),
        P::S(" blk_size="),
        P::D(if d.features & F_BLK_SIZE != 0 {
            blk_size as u64
        } else {
            0
        }),
    ]);
    // Two data descriptors in one request unless the device limits us to one segment.
    let segs = if d.features & F_SEG_MAX != 0 && seg_max < 2 {
        1
    } else {
        2
    };
    let ro_feature = d.features & F_RO != 0;
    let last = capacity.wrapping_sub(1);

    if ro_cmdline || ro_feature {
        // §5.2.6.2: with RO the device must fail writes with IOERR and write nothing. We
        // write anyway (the pattern, to sector 0) to check that; the host checks the image.
        line(&[
            P::S("blk ro cmdline="),
            P::D(ro_cmdline as u64),
            P::S(" feature="),
            P::D(ro_feature as u64),
        ]);
        pattern(&mut mem().w[..SECTOR], 0);
        let st = request(
            &mut q,
            T_OUT,
            0,
            &[Buf(addr(&mem().w), SECTOR as u32, false)],
        );
        if let Some(st) = st {
            line(&[P::S("blk ro write status="), P::D(st as u64)]);
            if st == S_OK {
                fail(&[P::S("blk: write to a read-only disk succeeded")]);
            }
        }
        if rw(&mut q, T_IN, 0, SECTOR, 1) {
            line(&[P::S("blk ro read ok")]);
        }
    } else if capacity < 10 {
        fail(&[P::S("blk: capacity below 10 sectors")]);
    } else {
        let wrote = write(&mut q, 0, 1) && write(&mut q, 1, 8) && write(&mut q, last, 1);
        if d.features & F_FLUSH != 0 {
            if let Some(st) = request(&mut q, T_FLUSH, 0, &[]) {
                line(&[P::S("blk flush status="), P::D(st as u64)]);
                if st != S_OK {
                    fail(&[P::S("blk: flush failed")]);
                }
            }
        } else {
            line(&[P::S("blk flush not offered")]);
        }
        if wrote
            && verify(&mut q, 0, 1, 1)
            && verify(&mut q, 1, 8, segs)
            && verify(&mut q, last, 1, 1)
        {
            line(&[
                P::S("blk write/read ok sectors=0,1-8,"),
                P::D(last),
                P::S(" segs="),
                P::D(segs as u64),
            ]);
        }
    }

    // VIRTIO_BLK_T_GET_ID: 20 bytes, NUL-padded (not terminated if all 20 are used).
    let r = addr(&mem().r);
    mem().r[..20].fill(0);
    match request(&mut q, T_GET_ID, 0, &[Buf(r, 20, true)]) {
        Some(S_OK) => {
            let id = &mem().r[..20];
            let n = id.iter().position(|&c| c == 0).unwrap_or(20);
            line(&[P::S("blk id="), P::B(&id[..n])]);
        }
        Some(st) => fail(&[P::S("blk: GET_ID status="), P::D(st as u64)]),
        None => {}
    }

    // Malformed requests (§5.2.6.2): each must complete with an error status.
    type Bad = (&'static str, u32, u64, u32, bool, &'static [u8]);
    let bad: [Bad; 4] = [
        // (name, type, sector, data length (0: no data descriptor), data device-writable,
        //  acceptable statuses)
        (
            "beyond-end",
            T_IN,
            capacity,
            SECTOR as u32,
            true,
            &[S_IOERR],
        ),
        ("header-only", T_OUT, 0, 0, false, &[S_IOERR, S_UNSUPP]),
        ("unknown-type", 0x99, 0, SECTOR as u32, true, &[S_UNSUPP]),
        ("odd-length", T_IN, 0, 700, true, &[S_IOERR]),
    ];
    for (name, typ, sector, len, wr, ok) in bad {
        let data = [Buf(r, len, wr)];
        let st = request(&mut q, typ, sector, &data[..(len != 0) as usize]);
        let Some(st) = st else { continue };
        line(&[
            P::S("blk bad-request "),
            P::S(name),
            P::S(" status="),
            P::D(st as u64),
        ]);
        if st == S_OK && name == "header-only" && empty_ok {
            line(&[P::S("blk header-only accepted (rhyve.blk.empty_ok=1)")]);
        } else if st == S_OK {
            fail(&[P::S("blk: bad request "), P::S(name), P::S(" returned OK")]);
        } else if !ok.contains(&st) {
            fail(&[P::S("blk: bad request "), P::S(name), P::S(" wrong status")]);
        }
    }
    // The device must still work after them.
    let still = if ro_cmdline || ro_feature || capacity < 10 {
        rw(&mut q, T_IN, 0, SECTOR, 1)
    } else {
        verify(&mut q, 0, 1, 1)
    };
    if still {
        line(&[P::S("blk after-bad read ok")]);
    }
    if swap {
        new_medium(&d, &mut q);
    }
    d.reset();
    line(&[P::S("blk done")]);
}
