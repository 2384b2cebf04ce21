//! `rhyve.test=blk-bench`: virtio-blk throughput, timed by the ACPI PM timer.
//!
//! Four runs over the first `rhyve.bench.mib` MiB (default 64) of the disk, in this order:
//! - `seq-write`: 1 MiB OUT requests from offset 0 up, one in flight, then one FLUSH (timed);
//! - `seq-read`: 1 MiB IN requests over the same region, one in flight;
//! - `rand-write`: `rhyve.bench.ops` (default 2000) 4 KiB OUT requests at 4 KiB-aligned offsets
//!   from [`Prng`] (seed [`SEED_WRITE`]), up to `rhyve.bench.qd` (default 16, max 16) in
//!   flight, then one FLUSH (timed);
//! - `rand-read`: the same with IN requests and seed [`SEED_READ`].
//!
//! A 1 MiB request is header + data + status; the data is split into as many descriptors as
//! SIZE_MAX requires (one with rhyve's and QEMU's 1 MiB / unlimited). The driver is polled, its
//! own split ring (size min(device max, 64)) so that several requests can be in flight; the
//! device is found and negotiated with `virtio.rs`. Buffers live at a fixed guest-physical
//! address ([`BASE`], identity-mapped; the VM needs at least 64 MiB of RAM).
//!
//! Timing: the ACPI PM timer (port 0x408, 32-bit, 3.579545 MHz), read before the first request
//! is posted and after the last completion (and the FLUSH, for writes). Integer arithmetic only.
//! Output, one line per run (`rhyve-bench` recomputes the rate from `bytes` and `ticks`):
//!
//! ```text
//! rhyve-guest: bench config region=<bytes> ops=<n> qd=<n> qsize=<n> size_max=<n> seg_max=<n>
//! rhyve-guest: bench seq-write MiB/s=<int>.<2 digits> bytes=<n> ops=<n> ticks=<n> qd=1 segs=<n>
//! rhyve-guest: bench rand-read MiB/s=... bytes=... ops=... ticks=... qd=<n> iops=<n> prng=0x<16 hex>
//! rhyve-guest: bench done
//! ```
//! `prng` is the generator's state after the last offset: the host replays the same sequence
//! and checks it.

use core::sync::atomic::{compiler_fence, Ordering};

use crate::fail;
use crate::io::{self, line, P};
use crate::virtio::{self, Dev, RING_AVAIL as R_AVAIL, RING_DESC as R_DESC, RING_USED as R_USED};

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

/// ACPI PM timer port and rate (Hz).
const PM_TMR: u16 = 0x408;
const PM_HZ: u64 = 3_579_545;

/// Fixed seeds, shared with the host side (bench/src/blk.rs).
pub const SEED_WRITE: u64 = 0x2545_f491_4f6c_dd1d;
pub const SEED_READ: u64 = 0x9e37_79b9_7f4a_7c15;

/// Guest-physical layout: ring page, request headers/statuses page, then the 1 MiB data buffer.
const BASE: u64 = 0x200_0000;
const RING: u64 = BASE;
const HDRS: u64 = BASE + 0x1000;
const STATUS: u64 = BASE + 0x1800;
const DATA: u64 = BASE + 0x10_0000;
const SEQ: u64 = 1 << 20;
const SMALL: u64 = 4096;

const MAX_QD: u64 = 16;

const TIMEOUT_TSC: u64 = 20_000_000_000;

/// xorshift64 (Marsaglia); offsets are `(next % blocks) * 4096`.
pub struct Prng(pub u64);
impl Prng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn pm_timer() -> u32 {
    io::inl(PM_TMR)
}

struct Ring {
    size: u16,
    notify: u64,
    next_avail: u16,
    next_used: u16,
    /// Max bytes per data descriptor.
    size_max: u64,
    seg_max: u64,
}

impl Ring {
    fn setup(d: &Dev, size_max: u64, seg_max: u64) -> Option<Ring> {
        let (size, notify) = d.queue_at("bench", 0, RING, 0x2000)?;
        Some(Ring {
            size,
            notify,
            next_avail: 0,
            next_used: 0,
            size_max,
            seg_max,
        })
    }

    fn desc(&self, i: u64, addr: u64, len: u32, write: bool, next: Option<u64>) {
        let d = RING + R_DESC + 16 * i;
        let mut flags = if write { 2u16 } else { 0 };
        if next.is_some() {
            flags |= 1;
        }
        io::mmio_write(d, addr);
        io::mmio_write(d + 8, len);
        io::mmio_write(d + 12, flags);
        io::mmio_write(d + 14, next.unwrap_or(0) as u16);
    }

    /// Writes the chain of slot `slot` (header, data in `size_max` pieces, status) starting at
    /// descriptor `first` and puts it in the available ring (not yet published).
    fn post(&mut self, slot: u64, first: u64, typ: u32, offset: u64, data: u64, len: u64) {
        let hdr = HDRS + 16 * slot;
        io::mmio_write(hdr, typ);
        io::mmio_write(hdr + 4, 0u32);
        io::mmio_write(hdr + 8, offset / 512);
        io::mmio_write(STATUS + slot, 0xffu8);
        let mut i = first;
        self.desc(i, hdr, 16, false, Some(i + 1));
        let mut done = 0;
        while done < len {
            i += 1;
            let n = (len - done).min(self.size_max);
            self.desc(i, data + done, n as u32, typ == T_IN, Some(i + 1));
            done += n;
        }
        self.desc(i + 1, STATUS + slot, 1, true, None);
        let at = RING + R_AVAIL + 4 + 2 * (self.next_avail % self.size) as u64;
        io::mmio_write(at, first as u16);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes the posted chains (avail.idx) and notifies the device (§4.1.5.2).
    fn kick(&self) {
        compiler_fence(Ordering::SeqCst);
        io::mmio_write(RING + R_AVAIL + 2, self.next_avail);
        compiler_fence(Ordering::SeqCst);
        io::mmio_write(self.notify, 0u16);
    }

    /// Waits for at least one used element; returns the head descriptor of each new one
    /// through `f`. False (after a FAIL) on timeout.
    fn reap(&mut self, mut f: impl FnMut(u64)) -> bool {
        let t0 = io::rdtsc();
        let mut idx: u16 = io::mmio_read(RING + R_USED + 2);
        while idx == self.next_used {
            if io::rdtsc() - t0 > TIMEOUT_TSC {
                fail(&[P::S("bench: no used buffer (timeout)")]);
                return false;
            }
            io::pause();
            idx = io::mmio_read(RING + R_USED + 2);
        }
        compiler_fence(Ordering::SeqCst);
        while self.next_used != idx {
            let e = RING + R_USED + 4 + 8 * (self.next_used % self.size) as u64;
            f(io::mmio_read::<u32>(e) as u64);
            self.next_used = self.next_used.wrapping_add(1);
        }
        true
    }

    fn segs(&self, len: u64) -> u64 {
        len.div_ceil(self.size_max)
    }
}

fn status_ok(slot: u64, what: &str) -> bool {
    let st: u8 = io::mmio_read(STATUS + slot);
    if st != 0 {
        fail(&[
            P::S("bench: "),
            P::S(what),
            P::S(" request status="),
            P::D(st as u64),
        ]);
    }
    st == 0
}

/// One request at a time, wait for it.
fn one(r: &mut Ring, typ: u32, offset: u64, len: u64, what: &str) -> bool {
    r.post(0, 0, typ, offset, DATA, len);
    r.kick();
    r.reap(|_| {}) && status_ok(0, what)
}

/// `bench NAME MiB/s=... bytes= ops= ticks= qd= KEY=VAL [prng=0x...]`.
fn show(name: &str, bytes: u64, ops: u64, ticks: u64, qd: u64, kv: (&str, u64), prng: Option<u64>) {
    let ticks = ticks.max(1);
    // MiB/s x 100 = bytes x PM_HZ x 100 / ticks / 2^20 (bytes <= 2^32: no overflow).
    let centi = bytes * PM_HZ / ticks * 100 / (1 << 20);
    let frac = centi % 100;
    let head = [
        P::S("bench "),
        P::S(name),
        P::S(" MiB/s="),
        P::D(centi / 100),
        P::S(if frac < 10 { ".0" } else { "." }),
        P::D(frac),
        P::S(" bytes="),
        P::D(bytes),
        P::S(" ops="),
        P::D(ops),
        P::S(" ticks="),
        P::D(ticks),
        P::S(" qd="),
        P::D(qd),
        P::S(" "),
        P::S(kv.0),
        P::S("="),
        P::D(kv.1),
    ];
    match prng {
        Some(v) => {
            let mut all = [const { P::S("") }; 20];
            for (i, p) in head.into_iter().enumerate() {
                all[i] = p;
            }
            all[18] = P::S(" prng=0x");
            all[19] = P::H(v, 16);
            line(&all);
        }
        None => line(&head),
    }
}

fn seq(r: &mut Ring, typ: u32, region: u64, has_flush: bool) -> bool {
    let name = if typ == T_IN { "seq-read" } else { "seq-write" };
    let t0 = pm_timer();
    let mut off = 0;
    while off < region {
        if !one(r, typ, off, SEQ, name) {
            return false;
        }
        off += SEQ;
    }
    if typ == T_OUT && has_flush && !one(r, T_FLUSH, 0, 0, "flush") {
        return false;
    }
    let ticks = pm_timer().wrapping_sub(t0) as u64;
    show(
        name,
        region,
        region / SEQ,
        ticks,
        1,
        ("segs", r.segs(SEQ)),
        None,
    );
    true
}

fn random(r: &mut Ring, typ: u32, region: u64, ops: u64, qd: u64, has_flush: bool) -> bool {
    let name = if typ == T_IN {
        "rand-read"
    } else {
        "rand-write"
    };
    let mut rng = Prng(if typ == T_IN { SEED_READ } else { SEED_WRITE });
    let blocks = region / SMALL;
    let per = 2 + r.segs(SMALL);
    let t0 = pm_timer();
    let (mut posted, mut done) = (0u64, 0u64);
    // Slots 0..qd: slot k's chain starts at descriptor k * per, its data at DATA + k * 4 KiB.
    let mut free = [0u64; MAX_QD as usize];
    let mut nfree = qd as usize;
    for (k, f) in free.iter_mut().enumerate().take(qd as usize) {
        *f = k as u64;
    }
    let mut ok = true;
    while done < ops {
        let mut added = false;
        while nfree > 0 && posted < ops {
            nfree -= 1;
            let slot = free[nfree];
            let off = (rng.next() % blocks) * SMALL;
            r.post(slot, slot * per, typ, off, DATA + slot * SMALL, SMALL);
            posted += 1;
            added = true;
        }
        if added {
            r.kick();
        }
        let got = r.reap(|head| {
            let slot = head / per;
            ok &= status_ok(slot, name);
            free[nfree] = slot;
            nfree += 1;
            done += 1;
        });
        if !got || !ok {
            return false;
        }
    }
    if typ == T_OUT && has_flush && !one(r, T_FLUSH, 0, 0, "flush") {
        return false;
    }
    let ticks = pm_timer().wrapping_sub(t0) as u64;
    let iops = ops * PM_HZ / ticks.max(1);
    show(
        name,
        ops * SMALL,
        ops,
        ticks,
        qd,
        ("iops", iops),
        Some(rng.0),
    );
    true
}

/// `rhyve.bench.mib=`, `rhyve.bench.ops=`, `rhyve.bench.qd=` from the command line.
fn arg(cmdline: &[u8], key: &[u8], default: u64) -> u64 {
    for word in cmdline.split(|c| c.is_ascii_whitespace()) {
        if word.len() > key.len() && word.starts_with(key) && word[key.len()] == b'=' {
            return match crate::parse_num(&word[key.len() + 1..]) {
                Some(n) => n,
                None => {
                    fail(&[P::S("bench: bad value "), P::B(word)]);
                    default
                }
            };
        }
    }
    default
}

pub fn run(window: &mut u64, cmdline: &[u8]) {
    extern "C" {
        static _image_end: u8;
    }
    let img_end = core::ptr::addr_of!(_image_end) as u64;
    if img_end > BASE {
        fail(&[P::S("bench: image overlaps the bench buffers")]);
        return;
    }
    let region = arg(cmdline, b"rhyve.bench.mib", 64) << 20;
    let ops = arg(cmdline, b"rhyve.bench.ops", 2000);
    let qd = arg(cmdline, b"rhyve.bench.qd", MAX_QD).clamp(1, MAX_QD);
    if region == 0 || region > 1 << 32 || ops == 0 {
        fail(&[P::S("bench: region must be 1..4096 MiB, ops > 0")]);
        return;
    }
    let Some(mut d) = virtio::probe(&[0x1042, 0x1001], window, false) else {
        return;
    };
    if !d.negotiate(F_FLUSH | F_SIZE_MAX | F_SEG_MAX) {
        return;
    }
    let cfg = |off| u32::from_le_bytes(d.config::<4>(off)) as u64;
    // struct virtio_blk_config: capacity @0, size_max @8, seg_max @12.
    let capacity = u64::from_le_bytes(d.config::<8>(0));
    let size_max = match cfg(8) {
        n if d.features & F_SIZE_MAX != 0 && n >= 4096 => n & !4095,
        _ => SEQ,
    };
    let seg_max = match cfg(12) {
        n if d.features & F_SEG_MAX != 0 && n > 0 => n,
        _ => 254,
    };
    let Some(mut r) = Ring::setup(&d, size_max, seg_max) else {
        return;
    };
    if !d.driver_ok() {
        return;
    }
    let qd = qd.min(r.size as u64 / (2 + r.segs(SMALL)));
    line(&[
        P::S("bench config region="),
        P::D(region),
        P::S(" ops="),
        P::D(ops),
        P::S(" qd="),
        P::D(qd),
        P::S(" qsize="),
        P::D(r.size as u64),
        P::S(" size_max="),
        P::D(size_max),
        P::S(" seg_max="),
        P::D(seg_max),
    ]);
    if capacity * 512 < region {
        fail(&[P::S("bench: disk smaller than the region")]);
        return;
    }
    let segs = r.segs(SEQ);
    if segs > r.seg_max || segs + 2 > r.size as u64 {
        fail(&[P::S("bench: 1 MiB needs too many segments")]);
        return;
    }
    let flush = d.features & F_FLUSH != 0;
    let _ = seq(&mut r, T_OUT, region, flush)
        && seq(&mut r, T_IN, region, flush)
        && random(&mut r, T_OUT, region, ops, qd, flush)
        && random(&mut r, T_IN, region, ops, qd, flush);
    d.reset();
    line(&[P::S("bench done")]);
}
