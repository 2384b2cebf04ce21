//! `rhyve.test=hostile`: a malicious driver. It attacks virtio-rnd (slot 4) and virtio-blk
//! (slot 3; the ring attacks in a request's data descriptor) with what a compromised guest
//! kernel could send, and checks each attack ends in a
//! device error (the request comes back with nothing done) or DEVICE_NEEDS_RESET, never in a
//! hang or a dead VMM; between attacks it resets the device and shows it works again. Then it
//! prints `hostile attacks done`, waits for one byte on COM1 (the test asks rhyve's control
//! socket for the devices' counters meanwhile) and shows both devices still answer.
//!
//! The attacks on the ring (virtio 1.2 §2.7): a descriptor that links to itself, a chain
//! longer than the queue (every descriptor links to the next, the last to the first), an
//! indirect table of 4096 entries, buffers in the PCI hole and past the end of RAM, a length
//! near 2^32, and a used ring laid over the descriptor table. On the transport: MSI-X entries
//! pointing at no local APIC, the device's BAR over guest RAM and over the other device's BAR.

use core::sync::atomic::{compiler_fence, Ordering};

use crate::fail;
use crate::io::{self, line, P};
use crate::pci::{self, Bdf, Cfg};
use crate::virtio::{self, Buf, Dev, Dma};

const RNG_IDS: [u16; 2] = [0x1044, 0x1005];
const BLK_IDS: [u16; 2] = [0x1042, 0x1001];
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const C_Q_MSIX_VECTOR: u64 = 0x1a;
const CAP_MSIX: u8 = 0x11;

/// The ring page (virtio::RING_* layout) and the buffers the attacks point at.
static mut RING: Dma<4096> = Dma([0; 4096]);
static mut BUF: Dma<4096> = Dma([0; 4096]);
/// An indirect table of 4096 descriptors (64 KiB).
static mut TABLE: Dma<65536> = Dma([0; 65536]);

/// How long the device gets to answer one attack (the other tests' timeout).
const ANSWER_TSC: u64 = virtio::TIMEOUT_TSC;

fn addr_of<const N: usize>(d: *mut Dma<N>) -> u64 {
    d as u64
}

/// A queue 0 of our own layout on `RING`.
struct Ring {
    base: u64,
    size: u16,
    notify: u64,
    next_avail: u16,
    next_used: u16,
}

/// How an attack ended.
#[derive(PartialEq, Eq, Clone, Copy)]
enum End {
    /// The chain came back with nothing written.
    Error,
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// The chain came back with this many bytes written.
    Done(u32),
    /// Neither, in time.
    Nothing,
}

impl Ring {
    /// Resets `d`, negotiates nothing optional, sets queue 0 up on `RING` with the used ring
    /// at `used` (normally `RING_USED`), DRIVER_OK. None if the device refused on the way.
    fn start(d: &mut Dev, used: u64) -> Option<Ring> {
        if !d.negotiate(0) {
            return None;
        }
        let base = addr_of(core::ptr::addr_of_mut!(RING));
        let (size, notify) = d.queue_at("hostile", 0, base, 4096)?;
        io::mmio_write(d.common + virtio::C_Q_DEVICE, (base + used) as u32);
        io::mmio_write(
            d.common + virtio::C_Q_DEVICE + 4,
            ((base + used) >> 32) as u32,
        );
        use virtio::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
        io::mmio_write(
            d.common + virtio::C_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        Some(Ring {
            base,
            size,
            notify,
            next_avail: 0,
            next_used: 0,
        })
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.base + virtio::RING_DESC + 16 * u64::from(i % self.size);
        io::mmio_write(d, addr);
        io::mmio_write(d + 8, len);
        io::mmio_write(d + 12, flags);
        io::mmio_write(d + 14, next);
    }

    /// Makes `head` available, kicks, and waits for the used ring or NEEDS_RESET; `used` is
    /// where the used ring is (its idx at +2).
    fn submit(&mut self, d: &Dev, head: u16, used: u64) -> End {
        let slot = self.next_avail % self.size;
        io::mmio_write(
            self.base + virtio::RING_AVAIL + 4 + 2 * u64::from(slot),
            head,
        );
        compiler_fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        io::mmio_write(self.base + virtio::RING_AVAIL + 2, self.next_avail);
        compiler_fence(Ordering::SeqCst);
        io::mmio_write(self.notify, 0u16);
        let t0 = io::rdtsc();
        loop {
            if d.status() & virtio::NEEDS_RESET != 0 {
                return End::NeedsReset;
            }
            let idx: u16 = io::mmio_read(self.base + used + 2);
            if idx != self.next_used {
                let e = self.base + used + 4 + 8 * u64::from(self.next_used % self.size);
                self.next_used = self.next_used.wrapping_add(1);
                let len: u32 = io::mmio_read(e + 4);
                return if len == 0 { End::Error } else { End::Done(len) };
            }
            if io::rdtsc() - t0 > ANSWER_TSC {
                return End::Nothing;
            }
            io::pause();
        }
    }
}

fn show(name: &str, end: End) {
    let what = match end {
        End::Error => "device error",
        End::NeedsReset => "needs reset",
        End::Done(_) => "done",
        End::Nothing => "no answer",
    };
    line(&[P::S("hostile "), P::S(name), P::S(": "), P::S(what)]);
}

/// An attack on the ring that must end in an error or NEEDS_RESET.
fn expect_refused(name: &str, end: End) {
    show(name, end);
    if !matches!(end, End::Error | End::NeedsReset) {
        fail(&[P::S("hostile "), P::S(name), P::S(": not refused")]);
    }
}

/// One good request on a fresh ring: the device works (again).
fn rng_works(d: &mut Dev, after: &str) -> bool {
    let buf = addr_of(core::ptr::addr_of_mut!(BUF));
    let Some(mut r) = Ring::start(d, virtio::RING_USED) else {
        fail(&[P::S("hostile: rng does not start after "), P::S(after)]);
        return false;
    };
    r.desc(0, buf, 64, virtio::VIRTQ_DESC_F_WRITE, 0);
    match r.submit(d, 0, virtio::RING_USED) {
        End::Done(n) if n > 0 => true,
        e => {
            show("rng after", e);
            fail(&[P::S("hostile: rng broken after "), P::S(after)]);
            false
        }
    }
}

/// Writes an attack's descriptors into the ring; returns the head to make available.
type LayOut<'a> = &'a dyn Fn(&Ring) -> u16;

fn ring_attacks(d: &mut Dev) {
    let buf = addr_of(core::ptr::addr_of_mut!(BUF));
    let table = addr_of(core::ptr::addr_of_mut!(TABLE));
    const W: u16 = virtio::VIRTQ_DESC_F_WRITE;
    const N: u16 = virtio::VIRTQ_DESC_F_NEXT;
    let attacks: [(&str, LayOut); 6] = [
        ("descriptor loop", &|r| {
            r.desc(0, buf, 64, W | N, 0);
            0
        }),
        ("chain longer than the queue", &|r| {
            for i in 0..r.size {
                r.desc(i, buf, 16, W | N, (i + 1) % r.size);
            }
            0
        }),
        ("indirect table of 4096 entries", &|r| {
            for i in 0..4096u64 {
                let e = table + 16 * i;
                io::mmio_write(e, buf);
                io::mmio_write(e + 8, 1u32);
                io::mmio_write(e + 12, if i < 4095 { W | N } else { W });
                io::mmio_write(e + 14, (i + 1) as u16);
            }
            r.desc(0, table, 65536, VIRTQ_DESC_F_INDIRECT, 0);
            0
        }),
        ("buffer in the PCI hole", &|r| {
            r.desc(0, 0xd000_0000, 64, W, 0);
            0
        }),
        ("buffer past the end of RAM", &|r| {
            r.desc(0, 1 << 40, 64, W, 0);
            0
        }),
        ("length near 2^32", &|r| {
            r.desc(0, buf, 0xffff_fff0, W, 0);
            0
        }),
    ];
    for (name, lay) in attacks {
        let Some(mut r) = Ring::start(d, virtio::RING_USED) else {
            fail(&[P::S("hostile: rng does not start before "), P::S(name)]);
            return;
        };
        let head = lay(&r);
        let end = r.submit(d, head, virtio::RING_USED);
        expect_refused(name, end);
        rng_works(d, name);
    }
    // The used ring over the descriptor table: refused when the driver sets DRIVER_OK.
    match Ring::start(d, virtio::RING_DESC + 0x40) {
        Some(mut r) => {
            r.desc(0, buf, 64, W, 0);
            let end = if d.status() & virtio::NEEDS_RESET != 0 {
                End::NeedsReset
            } else {
                r.submit(d, 0, virtio::RING_DESC + 0x40)
            };
            expect_refused("used ring over the descriptor table", end);
        }
        None => fail(&[P::S("hostile: rng refused the features")]),
    }
    rng_works(d, "used ring over the descriptor table");
}

/// The ring attacks on virtio-blk: an IN request of sector 0 (header, data, status) whose
/// data descriptor is the bad one. Refused means the chain came back with nothing or with a
/// non-zero status byte.
fn blk_ring_attacks(d: &mut Dev) {
    static mut REQ: Dma<32> = Dma([0; 32]);
    let req = addr_of(core::ptr::addr_of_mut!(REQ));
    let buf = addr_of(core::ptr::addr_of_mut!(BUF));
    let table = addr_of(core::ptr::addr_of_mut!(TABLE));
    let status = req + 16;
    const W: u16 = virtio::VIRTQ_DESC_F_WRITE;
    const N: u16 = virtio::VIRTQ_DESC_F_NEXT;
    // Each lays out descriptors from 1 on and returns 1 for the header to go at 0 (linked
    // to 1), or 0 when it wrote descriptor 0 itself (the indirect table holds the header).
    let attacks: [(&str, LayOut); 6] = [
        ("blk descriptor loop", &|r| {
            r.desc(1, buf, 512, W | N, 1);
            1
        }),
        ("blk chain longer than the queue", &|r| {
            for i in 1..r.size {
                r.desc(i, buf, 16, W | N, (i + 1) % r.size);
            }
            1
        }),
        ("blk indirect table of 4096 entries", &|r| {
            for i in 0..4096u64 {
                let e = table + 16 * i;
                io::mmio_write(e, if i == 0 { req } else { buf });
                io::mmio_write(e + 8, if i == 0 { 16u32 } else { 1u32 });
                let f = if i == 0 {
                    N
                } else if i < 4095 {
                    W | N
                } else {
                    W
                };
                io::mmio_write(e + 12, f);
                io::mmio_write(e + 14, (i + 1) as u16);
            }
            r.desc(0, table, 65536, VIRTQ_DESC_F_INDIRECT, 0);
            0
        }),
        ("blk data in the PCI hole", &|r| {
            r.desc(1, 0xd000_0000, 512, W | N, 2);
            r.desc(2, status, 1, W, 0);
            1
        }),
        ("blk data past the end of RAM", &|r| {
            r.desc(1, 1 << 40, 512, W | N, 2);
            r.desc(2, status, 1, W, 0);
            1
        }),
        ("blk data length near 2^32", &|r| {
            r.desc(1, buf, 0xffff_fff0, W | N, 2);
            r.desc(2, status, 1, W, 0);
            1
        }),
    ];
    for (name, lay) in attacks {
        let Some(mut r) = Ring::start(d, virtio::RING_USED) else {
            fail(&[P::S("hostile: blk does not start before "), P::S(name)]);
            return;
        };
        // struct virtio_blk_req: IN, reserved, sector 0; status preset to "untouched".
        io::mmio_write(req, 0u64);
        io::mmio_write(req + 8, 0u64);
        io::mmio_write(status, 0xffu8);
        if lay(&r) != 0 {
            r.desc(0, req, 16, N, 1);
        }
        let end = match r.submit(d, 0, virtio::RING_USED) {
            End::Done(_) if io::mmio_read::<u8>(status) != 0 => End::Error,
            e => e,
        };
        expect_refused(name, end);
    }
}

/// MSI-X table entry 0 pointing at no local APIC (and the next at the I/O APIC), MSI-X on:
/// the request completes, the message goes nowhere.
fn msix_anywhere(d: &mut Dev, f: Bdf) {
    let cfg = Cfg::Ports;
    let mut cap = 0u16;
    pci::for_each_cap(cfg, f, |id, off| {
        if id == CAP_MSIX && cap == 0 {
            cap = u16::from(off);
        }
    });
    let t = cfg.r32(f, cap + 4);
    let Some(bar) = pci::bars(cfg, f)[(t & 7) as usize % 6] else {
        fail(&[P::S("hostile msix: table BAR not assigned")]);
        return;
    };
    let table = bar.addr + u64::from(t & !7);
    for (i, (addr, data)) in [(0x1234_5000u64, 0xffffu32), (0xfec0_0000, 0x41)]
        .iter()
        .enumerate()
    {
        let e = table + 16 * i as u64;
        io::mmio_write(e, *addr as u32);
        io::mmio_write(e + 4, (*addr >> 32) as u32);
        io::mmio_write(e + 8, *data);
        io::mmio_write(e + 12, 0u32);
    }
    let ctl = cfg.r16(f, cap + 2);
    cfg.w16(f, cap + 2, (ctl | 1 << 15) & !(1 << 14));
    let buf = addr_of(core::ptr::addr_of_mut!(BUF));
    if let Some(mut r) = Ring::start(d, virtio::RING_USED) {
        io::mmio_write(d.common + virtio::C_Q_SELECT, 0u16);
        io::mmio_write(d.common + C_Q_MSIX_VECTOR, 0u16);
        r.desc(0, buf, 64, virtio::VIRTQ_DESC_F_WRITE, 0);
        let end = r.submit(d, 0, virtio::RING_USED);
        show("msi-x entries pointing anywhere", end);
        if !matches!(end, End::Done(_)) {
            fail(&[P::S("hostile msix: the request did not complete")]);
        }
    }
    cfg.w16(f, cap + 2, ctl & !(1 << 15));
}

/// BAR 4 of `f` moved to `to` (memory decode on), then back.
fn move_bar(f: Bdf, to: u64) -> u64 {
    let cfg = Cfg::Ports;
    let off = 0x10 + 4 * 4;
    let old = cfg.r32(f, off);
    let old_hi = cfg.r32(f, off + 4);
    cfg.w32(f, off, to as u32 | (old & 0xf));
    cfg.w32(f, off + 4, (to >> 32) as u32);
    (u64::from(old_hi) << 32) | u64::from(old & !0xf)
}

fn restore_bar(f: Bdf, addr: u64) {
    let cfg = Cfg::Ports;
    let off = 0x10 + 4 * 4;
    let old = cfg.r32(f, off);
    cfg.w32(f, off, addr as u32 | (old & 0xf));
    cfg.w32(f, off + 4, (addr >> 32) as u32);
}

fn bar_attacks(rng: &mut Dev, rng_f: Bdf, blk: &Dev, blk_f: Bdf) {
    // Over guest RAM (32 MiB, below our image's end? no: the image sits at 1 MiB and is far
    // smaller): RAM wins, the device is unreachable there until it moves back.
    let home = move_bar(rng_f, 0x0200_0000);
    let seen: u16 = io::mmio_read(0x0200_0000 + virtio::C_NUM_QUEUES);
    line(&[
        P::S("hostile BAR over RAM: reads 0x"),
        P::H(u64::from(seen), 4),
    ]);
    restore_bar(rng_f, home);
    rng_works(rng, "BAR over RAM");
    // Over the other device's BAR.
    let blk_home = move_bar(blk_f, home);
    let seen: u16 = io::mmio_read(home + virtio::C_NUM_QUEUES);
    line(&[
        P::S("hostile BARs over each other: reads 0x"),
        P::H(u64::from(seen), 4),
    ]);
    restore_bar(blk_f, blk_home);
    rng_works(rng, "BARs over each other");
    let nq: u16 = io::mmio_read(blk.common + virtio::C_NUM_QUEUES);
    if nq != 1 {
        fail(&[
            P::S("hostile: blk num_queues after the BAR overlap: "),
            P::D(u64::from(nq)),
        ]);
    }
}

/// One read of sector 0 through virtio-blk's normal path (virtio::Queue).
fn blk_works(d: &mut Dev) -> bool {
    static mut HDR: Dma<32> = Dma([0; 32]);
    let hdr = addr_of(core::ptr::addr_of_mut!(HDR));
    let buf = addr_of(core::ptr::addr_of_mut!(BUF));
    if !d.negotiate(0) {
        return false;
    }
    let Some(mut q) = d.queue(0) else {
        return false;
    };
    if !d.driver_ok() {
        return false;
    }
    // struct virtio_blk_req: type IN (0), reserved, sector 0; then data, then status.
    io::mmio_write(hdr, 0u64);
    io::mmio_write(hdr + 8, 0u64);
    io::mmio_write(hdr + 16, 0xffu8);
    let chain = [
        Buf(hdr, 16, false),
        Buf(buf, 512, true),
        Buf(hdr + 16, 1, true),
    ];
    let ok = q.run(&chain).is_some() && io::mmio_read::<u8>(hdr + 16) == 0;
    if !ok {
        fail(&[P::S("hostile: virtio-blk does not answer")]);
    }
    d.reset();
    ok
}

pub fn test(window: &mut u64) {
    let Some(mut rng) = virtio::probe(&RNG_IDS, window, false) else {
        return;
    };
    let Some(mut blk) = virtio::probe(&BLK_IDS, window, false) else {
        return;
    };
    let cfg = Cfg::Ports;
    let (Some(rng_f), Some(blk_f)) = (
        pci::find(cfg, virtio::VENDOR, &RNG_IDS),
        pci::find(cfg, virtio::VENDOR, &BLK_IDS),
    ) else {
        return;
    };
    if !rng_works(&mut rng, "start") || !blk_works(&mut blk) {
        return;
    }
    ring_attacks(&mut rng);
    blk_ring_attacks(&mut blk);
    if !blk_works(&mut blk) {
        return;
    }
    msix_anywhere(&mut rng, rng_f);
    rng.reset();
    bar_attacks(&mut rng, rng_f, &blk, blk_f);
    rng.reset();
    line(&[P::S("hostile attacks done")]);
    // The test reads rhyve's counters now, then sends a byte.
    let _ = io::getc();
    if rng_works(&mut rng, "the attacks") && blk_works(&mut blk) {
        line(&[P::S("hostile devices still answer")]);
    }
    rng.reset();
}
