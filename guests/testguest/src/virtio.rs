//! A minimal virtio-pci (modern) driver with one split virtqueue, polled, and `rhyve.test=virtio-rng`.
//!
//! Written from the Virtio 1.2 specification (section numbers below are from it), not from
//! rhyve's device code: §4.1.4 the vendor capabilities, §4.1.4.3 the common configuration
//! layout, §3.1.1 the initialization sequence, §2.7 split virtqueues, §4.1.5.2 notifications.
//! Memory is identity-mapped, so guest-virtual addresses are the guest-physical addresses the
//! device is given.

use crate::fail;
use crate::io::{self, line, P};
use crate::pci::{self, Cfg, Kind};
use core::sync::atomic::{compiler_fence, Ordering};

pub const VENDOR: u16 = 0x1af4;

/// Device status bits (§2.1).
pub const ACKNOWLEDGE: u8 = 1;
pub const DRIVER: u8 = 2;
pub const DRIVER_OK: u8 = 4;
pub const FEATURES_OK: u8 = 8;
pub const NEEDS_RESET: u8 = 64;
const FAILED: u8 = 128;

/// VIRTIO_F_VERSION_1 (§6): a modern device must offer it and we must accept it.
pub const F_VERSION_1: u64 = 1 << 32;

/// virtio_pci_common_cfg field offsets (§4.1.4.3).
const C_DFSELECT: u64 = 0x00;
const C_DF: u64 = 0x04;
const C_GFSELECT: u64 = 0x08;
const C_GF: u64 = 0x0c;
pub const C_NUM_QUEUES: u64 = 0x12;
pub const C_STATUS: u64 = 0x14;
const C_CFGGEN: u64 = 0x15;
pub const C_Q_SELECT: u64 = 0x16;
pub const C_Q_SIZE: u64 = 0x18;
pub const C_Q_ENABLE: u64 = 0x1c;
pub const C_Q_NOFF: u64 = 0x1e;
pub const C_Q_DESC: u64 = 0x20;
pub const C_Q_DRIVER: u64 = 0x28;
pub const C_Q_DEVICE: u64 = 0x30;

/// Split-ring descriptor flags (§2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Our queues have at most this many entries.
const QMAX: u16 = 16;

/// Ring layout of [`Dev::queue_at`] for up to 64 entries (§2.7: descriptors 16-aligned,
/// avail 2-aligned, used 4-aligned).
pub const RING_MAX: u16 = 64;
pub const RING_DESC: u64 = 0;
pub const RING_AVAIL: u64 = 0x400;
pub const RING_USED: u64 = 0x600;

/// A virtio-pci function, initialised up to FEATURES_OK.
pub struct Dev {
    pub common: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub isr: u64,
    /// Device-specific configuration (0: none, e.g. virtio-rng).
    pub device: u64,
    pub features: u64,
}

/// Finds `vendor:devices`, gives unassigned memory BARs addresses from `*window`, turns on
/// memory decode and bus mastering, and parses the virtio capabilities. Prints what it found.
/// `reassign`: move every memory BAR into the window, assigned or not (tests relocation).
pub fn probe(devices: &[u16], window: &mut u64, reassign: bool) -> Option<Dev> {
    let cfg = Cfg::Ports;
    let Some(f) = pci::find(cfg, VENDOR, devices) else {
        fail(&[P::S("virtio: no device 0x1af4:"), P::X(devices[0] as u64)]);
        return None;
    };
    let mut name = [0; 7];
    let name = f.show(&mut name);
    line(&[
        P::S("virtio "),
        P::B(name),
        P::S(" device=0x"),
        P::H(cfg.r16(f, 2) as u64, 4),
    ]);
    // BAR addresses, assigning any memory BAR left at 0 (or out of our 4 GiB map). Naturally
    // aligned, as a BAR's address must be (PCI LB §6.2.5.1). Decoding stays off meanwhile.
    let mut addr = [0u64; 6];
    let sized = pci::bars(cfg, f);
    let old_cmd = cfg.r16(f, 0x04);
    cfg.w16(f, 0x04, old_cmd & !(pci::CMD_IO | pci::CMD_MEM));
    let mut cmd = pci::CMD_MEM | pci::CMD_BUS_MASTER;
    for (i, bar) in sized.iter().enumerate() {
        let Some(bar) = bar else { continue };
        addr[i] = bar.addr;
        if bar.kind == Kind::Io {
            cmd |= pci::CMD_IO;
            continue;
        }
        if !reassign && bar.addr != 0 && bar.addr + bar.size <= 1 << 32 {
            continue;
        }
        let a = (*window + bar.size - 1) & !(bar.size - 1);
        *window = a + bar.size;
        let off = 0x10 + 4 * i as u16;
        cfg.w32(f, off, a as u32 | (cfg.r32(f, off) & 0xf));
        if bar.kind == Kind::Mem64 {
            cfg.w32(f, off + 4, (a >> 32) as u32);
        }
        addr[i] = a;
        line(&[
            P::S("bar-assign "),
            P::B(name),
            P::S(" "),
            P::D(i as u64),
            P::S(" addr="),
            P::X(a),
            P::S(" size="),
            P::X(bar.size),
        ]);
    }
    cfg.w16(f, 0x04, old_cmd | cmd);

    // Vendor-specific capabilities (id 0x09), struct virtio_pci_cap (§4.1.4): cfg_type at +3,
    // bar at +4, offset at +8, length at +12; the notify capability adds
    // notify_off_multiplier at +16 (§4.1.4.4). The first of each type is the one to use.
    let mut d = Dev {
        common: 0,
        notify: 0,
        notify_mult: 0,
        isr: 0,
        device: 0,
        features: 0,
    };
    let mut pci_cfg = 0u8;
    let mut common_cap = (0u8, 0u32);
    pci::for_each_cap(cfg, f, |id, off| {
        if id != 0x09 {
            return;
        }
        let o = off as u16;
        let (ty, bar) = (cfg.r8(f, o + 3), cfg.r8(f, o + 4));
        let (offset, len) = (cfg.r32(f, o + 8), cfg.r32(f, o + 12));
        line(&[
            P::S("virtio cap type="),
            P::D(ty as u64),
            P::S(" bar="),
            P::D(bar as u64),
            P::S(" off="),
            P::X(offset as u64),
            P::S(" len="),
            P::X(len as u64),
        ]);
        if bar > 5 && ty != 5 {
            return;
        }
        let at = addr[bar as usize % 6] + offset as u64;
        match ty {
            1 if d.common == 0 => {
                d.common = at;
                common_cap = (bar, offset);
            }
            2 if d.notify == 0 => {
                d.notify = at;
                d.notify_mult = cfg.r32(f, o + 16);
                line(&[
                    P::S("virtio notify_off_multiplier="),
                    P::D(d.notify_mult as u64),
                ]);
            }
            3 if d.isr == 0 => d.isr = at,
            4 if d.device == 0 => d.device = at,
            5 if pci_cfg == 0 => pci_cfg = off,
            _ => {}
        }
    });
    if d.common == 0 || d.notify == 0 || d.isr == 0 {
        fail(&[P::S("virtio: common, notify or ISR capability missing")]);
        return None;
    }
    // VIRTIO_PCI_CAP_PCI_CFG (§4.1.4.9): a window into the BARs through config space. Read
    // num_queues through it (bar, length 2, offset, then pci_cfg_data at +16) and directly.
    if pci_cfg != 0 {
        let o = pci_cfg as u16;
        cfg.w8(f, o + 4, common_cap.0);
        cfg.w32(f, o + 12, 2);
        cfg.w32(f, o + 8, common_cap.1 + C_NUM_QUEUES as u32);
        let via_cfg = cfg.r16(f, o + 16);
        let direct: u16 = io::mmio_read(d.common + C_NUM_QUEUES);
        line(&[P::S("virtio pci-cfg num_queues="), P::D(via_cfg as u64)]);
        if via_cfg != direct {
            fail(&[
                P::S("virtio pci-cfg window read "),
                P::D(via_cfg as u64),
                P::S(", direct "),
                P::D(direct as u64),
            ]);
        }
    } else {
        line(&[P::S("virtio pci-cfg none")]);
    }
    Some(d)
}

impl Dev {
    fn c8(&self, off: u64) -> u8 {
        io::mmio_read(self.common + off)
    }
    fn c16(&self, off: u64) -> u16 {
        io::mmio_read(self.common + off)
    }
    fn c32(&self, off: u64) -> u32 {
        io::mmio_read(self.common + off)
    }
    fn w8(&self, off: u64, v: u8) {
        io::mmio_write(self.common + off, v)
    }
    fn w16(&self, off: u64, v: u16) {
        io::mmio_write(self.common + off, v)
    }
    fn w32(&self, off: u64, v: u32) {
        io::mmio_write(self.common + off, v)
    }
    /// 64-bit fields as two 32-bit writes, low then high (§4.1.3.1 allows it; Linux does it).
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.c8(C_STATUS)
    }

    /// Writing 0 resets; the driver must then wait until device_status reads 0 (§4.1.4.3.2).
    pub fn reset(&self) {
        self.w8(C_STATUS, 0);
        let t0 = io::rdtsc();
        while self.status() != 0 {
            if io::rdtsc() - t0 > TIMEOUT_TSC {
                fail(&[P::S("virtio reset: device_status stays non-zero")]);
                return;
            }
            io::pause();
        }
    }

    /// §3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, read the 64 feature bits, accept
    /// `VERSION_1 | (offered & wanted)`, FEATURES_OK and check it stuck.
    pub fn negotiate(&mut self, wanted: u64) -> bool {
        self.reset();
        self.w8(C_STATUS, ACKNOWLEDGE);
        self.w8(C_STATUS, ACKNOWLEDGE | DRIVER);
        let mut offered = 0u64;
        for sel in 0..2 {
            self.w32(C_DFSELECT, sel);
            offered |= (self.c32(C_DF) as u64) << (32 * sel);
        }
        let accepted = offered & (wanted | F_VERSION_1);
        line(&[
            P::S("virtio features offered=0x"),
            P::H(offered, 16),
            P::S(" accepted=0x"),
            P::H(accepted, 16),
        ]);
        if offered & F_VERSION_1 == 0 {
            fail(&[P::S("virtio: VERSION_1 not offered (not a modern device)")]);
            self.w8(C_STATUS, self.status() | FAILED);
            return false;
        }
        for sel in 0..2 {
            self.w32(C_GFSELECT, sel);
            self.w32(C_GF, (accepted >> (32 * sel)) as u32);
        }
        self.w8(C_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let st = self.status();
        if st & FEATURES_OK == 0 {
            fail(&[
                P::S("virtio: FEATURES_OK did not stick, status="),
                P::X(st as u64),
            ]);
            self.w8(C_STATUS, st | FAILED);
            return false;
        }
        self.features = accepted;
        true
    }

    /// §3.1.1 step 8: DRIVER_OK; the device must not ask for a reset.
    pub fn driver_ok(&self) -> bool {
        self.w8(C_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        let st = self.status();
        line(&[P::S("virtio status=0x"), P::H(st as u64, 2)]);
        if st & (NEEDS_RESET | FAILED) != 0 || st & DRIVER_OK == 0 {
            fail(&[P::S("virtio: bad status after DRIVER_OK")]);
            return false;
        }
        true
    }

    /// The device configuration's generation (it changes with the configuration).
    pub fn config_generation(&self) -> u8 {
        self.c8(C_CFGGEN)
    }

    /// Reads `N` bytes of device configuration, retrying until config_generation is stable
    /// around them (§4.1.4.3.1, §2.5.1). Reads are 32-bit (fields here are 32/64-bit).
    pub fn config<const N: usize>(&self, off: u64) -> [u8; N] {
        let mut out = [0u8; N];
        loop {
            let gen = self.c8(C_CFGGEN);
            for (i, c) in out.chunks_mut(4).enumerate() {
                let v: u32 = io::mmio_read(self.device + off + 4 * i as u64);
                c.copy_from_slice(&v.to_le_bytes()[..c.len()]);
            }
            if self.c8(C_CFGGEN) == gen {
                return out;
            }
        }
    }

    /// §4.1.5.1.3 for a driver that keeps its own ring in the page(s) at `base` (laid out as
    /// [`RING_DESC`], [`RING_AVAIL`], [`RING_USED`], room for [`RING_MAX`] entries): selects
    /// queue `index`, sizes it min(device max, RING_MAX), clears `clear` bytes at `base`, gives
    /// the device the ring addresses and enables it. Returns (size, notify address); None
    /// (reported, naming `who`) when the device offers fewer than 4 entries.
    pub fn queue_at(&self, who: &str, index: u16, base: u64, clear: usize) -> Option<(u16, u64)> {
        self.w16(C_Q_SELECT, index);
        let max = self.c16(C_Q_SIZE);
        if max < 4 {
            fail(&[
                P::S(who),
                P::S(": queue "),
                P::D(index as u64),
                P::S(" too small: "),
                P::D(max as u64),
            ]);
            return None;
        }
        let size = max.min(RING_MAX);
        self.w16(C_Q_SIZE, size);
        // SAFETY: the caller's own fixed region (checked against the image end by the caller).
        unsafe { core::ptr::write_bytes(base as usize as *mut u8, 0, clear) };
        self.w64(C_Q_DESC, base + RING_DESC);
        self.w64(C_Q_DRIVER, base + RING_AVAIL);
        self.w64(C_Q_DEVICE, base + RING_USED);
        let notify = self.notify + self.c16(C_Q_NOFF) as u64 * self.notify_mult as u64;
        self.w16(C_Q_ENABLE, 1);
        Some((size, notify))
    }

    /// §4.1.5.1.3: select the queue, size min(queue_size, 16), ring addresses, enable.
    pub fn queue(&self, index: u16) -> Option<Queue> {
        self.w16(C_Q_SELECT, index);
        let max = self.c16(C_Q_SIZE);
        if max == 0 {
            fail(&[
                P::S("virtio: queue "),
                P::D(index as u64),
                P::S(" not available"),
            ]);
            return None;
        }
        let size = max.min(QMAX);
        self.w16(C_Q_SIZE, size);
        // One queue at a time (each test drives one device): only the device and this Queue
        // touch QMEM from here on.
        let base = core::ptr::addr_of_mut!(QMEM) as u64;
        // SAFETY: as above; clear whatever a previous queue left.
        unsafe { core::ptr::write_bytes(base as usize as *mut u8, 0, 4096) };
        let q = Queue {
            index,
            size,
            desc: base + Q_DESC,
            avail: base + Q_AVAIL,
            used: base + Q_USED,
            notify: self.notify + self.c16(C_Q_NOFF) as u64 * self.notify_mult as u64,
            next_avail: 0,
            next_used: 0,
        };
        self.w64(C_Q_DESC, q.desc);
        self.w64(C_Q_DRIVER, q.avail);
        self.w64(C_Q_DEVICE, q.used);
        self.w16(C_Q_ENABLE, 1);
        line(&[
            P::S("virtio queue "),
            P::D(index as u64),
            P::S(" size="),
            P::D(size as u64),
            P::S(" max="),
            P::D(max as u64),
            P::S(" notify="),
            P::X(q.notify),
        ]);
        Some(q)
    }
}

/// Polling gives up after this many TSC ticks (a few seconds at any plausible TSC rate).
pub const TIMEOUT_TSC: u64 = 10_000_000_000;

/// One 4 KiB page for the split ring (§2.7): descriptor table (16 bytes x 16, align 16),
/// available ring (align 2), used ring (align 4).
#[repr(C, align(4096))]
struct QueueMem([u8; 4096]);
static mut QMEM: QueueMem = QueueMem([0; 4096]);
const Q_DESC: u64 = 0;
const Q_AVAIL: u64 = 0x100;
const Q_USED: u64 = 0x200;

/// A buffer of a request: address, length, device-writable?
#[derive(Clone, Copy)]
pub struct Buf(pub u64, pub u32, pub bool);

pub struct Queue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    next_avail: u16,
    next_used: u16,
}

impl Queue {
    /// Posts one descriptor chain (descriptors 0..n: one request in flight at a time) and
    /// notifies the device.
    pub fn post(&mut self, chain: &[Buf]) {
        for (i, b) in chain.iter().enumerate() {
            // struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } (§2.7.5)
            let d = self.desc + 16 * i as u64;
            let mut flags = if b.2 { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < chain.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            io::mmio_write(d, b.0);
            io::mmio_write(d + 8, b.1);
            io::mmio_write(d + 12, flags);
            io::mmio_write(d + 14, i as u16 + 1);
        }
        // struct virtq_avail { le16 flags; le16 idx; le16 ring[]; } (§2.7.6): the ring entry,
        // then (ordered after it: x86 keeps stores in order, the fence stops the compiler) idx.
        let slot = self.next_avail % self.size;
        io::mmio_write(self.avail + 4 + 2 * slot as u64, 0u16);
        compiler_fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        io::mmio_write(self.avail + 2, self.next_avail);
        compiler_fence(Ordering::SeqCst);
        // §4.1.5.2: without VIRTIO_F_NOTIFICATION_DATA, write the queue index.
        io::mmio_write(self.notify, self.index);
    }

    /// Has the device used a buffer we have not taken yet?
    pub fn has_used(&self) -> bool {
        // struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[]; }
        io::mmio_read::<u16>(self.used + 2) != self.next_used
    }

    /// Takes the next used element: (id, len); None if there is none.
    pub fn used(&mut self) -> Option<(u32, u32)> {
        if !self.has_used() {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let e = self.used + 4 + 8 * (self.next_used % self.size) as u64;
        self.next_used = self.next_used.wrapping_add(1);
        let (id, len) = (io::mmio_read::<u32>(e), io::mmio_read::<u32>(e + 4));
        if id != 0 {
            fail(&[
                P::S("virtio: used id "),
                P::D(id as u64),
                P::S(", posted 0"),
            ]);
        }
        Some((id, len))
    }

    /// [`post`](Self::post)s the chain and [`poll`](Self::poll)s for it.
    pub fn run(&mut self, chain: &[Buf]) -> Option<(u32, u32)> {
        self.post(chain);
        self.poll()
    }

    /// Polls the used ring (at most [`TIMEOUT_TSC`]) and takes the next used element:
    /// (id, len).
    pub fn poll(&mut self) -> Option<(u32, u32)> {
        let t0 = io::rdtsc();
        while !self.has_used() {
            if io::rdtsc() - t0 > TIMEOUT_TSC {
                fail(&[P::S("virtio: no used buffer (timeout)")]);
                return None;
            }
            io::pause();
        }
        self.used()
    }
}

/// Buffers the virtio tests give the device.
#[repr(C, align(4096))]
pub struct Dma<const N: usize>(pub [u8; N]);

static mut RNG_BUF: Dma<128> = Dma([0; 128]);

/// `rhyve.test=virtio-rng` (§5.4): one request queue; two 64-byte device-writable buffers must
/// come back non-zero and different.
pub fn rng_test(window: &mut u64, reassign: bool) {
    let Some(mut d) = probe(&[0x1044, 0x1005], window, reassign) else {
        return;
    };
    if !d.negotiate(0) {
        return;
    }
    let Some(mut q) = d.queue(0) else { return };
    if !d.driver_ok() {
        return;
    }
    // SAFETY: only this test and the device use RNG_BUF.
    let buf = unsafe { &mut (*core::ptr::addr_of_mut!(RNG_BUF)).0 };
    let base = buf.as_ptr() as u64;
    let mut lens = [0u32; 2];
    for (k, len) in lens.iter_mut().enumerate() {
        let Some((_, l)) = q.run(&[Buf(base + 64 * k as u64, 64, true)]) else {
            return;
        };
        *len = l.min(64);
    }
    let (a, b) = buf.split_at(64);
    let mut hex = [0u8; 32];
    for (i, &c) in a[..16].iter().enumerate() {
        let h = |v: u8| if v < 10 { b'0' + v } else { b'a' + v - 10 };
        hex[2 * i] = h(c >> 4);
        hex[2 * i + 1] = h(c & 15);
    }
    line(&[
        P::S("rng bytes="),
        P::B(&hex),
        P::S(" len="),
        P::D(lens[0] as u64),
        P::S(","),
        P::D(lens[1] as u64),
    ]);
    if lens[0] == 0 || lens[1] == 0 {
        fail(&[P::S("rng: device returned 0 bytes")]);
    } else if a[..lens[0] as usize].iter().all(|&c| c == 0) {
        fail(&[P::S("rng: bytes are all zero")]);
    } else if a[..64] == b[..64] {
        fail(&[P::S("rng: both reads returned the same bytes")]);
    }
    d.reset();
    line(&[P::S("rng done")]);
}
