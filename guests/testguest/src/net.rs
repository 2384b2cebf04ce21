//! `rhyve.test=virtio-net` and `rhyve.test=net-bench`: a polled virtio-net driver (Virtio 1.2
//! §5.1) with one receive and one transmit queue, found and negotiated through `virtio.rs`.
//!
//! Test frames are Ethernet type 0x88b5 (local experimental): after the 14-byte header, byte
//! 14 is the kind (1 data, 2 stop), 15 reserved, 16..18 the sequence number and 18..20 the
//! frame length (big-endian); byte `k` from 20 on is `(k * 7 + seq * 31 + 0x5a) & 0xff`.
//!
//! `virtio-net`: sends one data frame of each size in [`SIZES`] (up to MTU + 14) to the
//! broadcast address, then two malformed transmit chains, then echoes every data frame it
//! receives (source and destination swapped) until a stop frame. With `rhyve.net.ip=A.B.C.D`
//! it also answers ARP requests and ICMP echo requests for that address (enough for `ping`).
//! `rhyve.net.mrg=1` negotiates MRG_RXBUF and posts 256-byte receive buffers, so a frame spans
//! several of them.
//!
//! `net-bench`: `rhyve.bench.frames=N` frames of `rhyve.bench.size=S` bytes guest→host, as
//! fast as the ring allows, then counts frames host→guest until a stop frame; both timed by
//! the ACPI PM timer.
//!
//! Memory: rings and buffers at the fixed guest-physical [`BASE`] (identity-mapped; the VM
//! needs at least 64 MiB).

use core::sync::atomic::{compiler_fence, Ordering};

use crate::fail;
use crate::io::{self, line, P};
use crate::virtio::{self, Dev, RING_AVAIL as R_AVAIL, RING_DESC as R_DESC, RING_USED as R_USED};

const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_EVENT_IDX: u64 = 1 << 29;

pub const ETHERTYPE: u16 = 0x88b5;
pub const KIND_DATA: u8 = 1;
pub const KIND_STOP: u8 = 2;
pub(crate) const HDR: u64 = 12;

/// Frame sizes sent by `virtio-net` (those above MTU + 14 are skipped; MTU + 14 is added).
pub const SIZES: [u64; 9] = [60, 61, 64, 100, 128, 256, 511, 1024, 1500];

const BASE: u64 = 0x300_0000;
const RX_RING: u64 = BASE;
const TX_RING: u64 = BASE + 0x1000;
/// A zeroed vnet header and the malformed-chain scratch.
const TX_HDR: u64 = BASE + 0x2000;
/// Transmit frames: up to 64 slots of 0x2400 (9216) bytes.
pub(crate) const TX_BUF: u64 = BASE + 0x10_0000;
const TX_SLOT: u64 = 0x2400;
/// Receive buffers.
const RX_BUF: u64 = BASE + 0x20_0000;
const RX_SLOT_MAX: u64 = 0x2400;

const PM_TMR: u16 = 0x408;
pub(crate) const PM_HZ: u64 = 3_579_545;

/// A split ring at a fixed page (§2.7), polled.
pub(crate) struct Ring {
    base: u64,
    index: u16,
    pub(crate) size: u16,
    notify: u64,
    next_avail: u16,
    next_used: u16,
    /// VIRTIO_F_EVENT_IDX negotiated: kick by avail_event instead of the NO_NOTIFY flag.
    event_idx: bool,
    /// avail.idx as last published.
    published: u16,
}

impl Ring {
    pub(crate) fn setup(d: &Dev, index: u16, base: u64) -> Option<Ring> {
        let (size, notify) = d.queue_at("net", index, base, 0x1000)?;
        Some(Ring {
            base,
            size,
            notify,
            next_avail: 0,
            next_used: 0,
            event_idx: d.features & F_EVENT_IDX != 0,
            published: 0,
            index,
        })
    }

    /// Descriptor `i`: `flags` bit 0 NEXT (to i + 1), bit 1 WRITE.
    pub(crate) fn desc(&self, i: u16, addr: u64, len: u32, flags: u16) {
        let d = self.base + R_DESC + 16 * i as u64;
        io::mmio_write(d, addr);
        io::mmio_write(d + 8, len);
        io::mmio_write(d + 12, flags);
        io::mmio_write(d + 14, (i + 1) % self.size);
    }

    /// Puts `head` in the available ring (published by `publish`).
    pub(crate) fn offer(&mut self, head: u16) {
        let at = self.base + R_AVAIL + 4 + 2 * (self.next_avail % self.size) as u64;
        io::mmio_write(at, head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes avail.idx and notifies the device if it asked for it (§2.7.10): with
    /// EVENT_IDX when the new entries cross avail_event (the `le16` after the used ring),
    /// otherwise unless it set VIRTQ_USED_F_NO_NOTIFY.
    pub(crate) fn publish(&mut self, force_kick: bool) {
        compiler_fence(Ordering::SeqCst);
        io::mmio_write(self.base + R_AVAIL + 2, self.next_avail);
        compiler_fence(Ordering::SeqCst);
        // The device's flag/event is read after idx is visible (x86: stores then loads may
        // pass, hence mfence: a missed kick would stall the test).
        // SAFETY: a fence has no other effect.
        unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
        let (old, new) = (self.published, self.next_avail);
        self.published = new;
        let kick = if self.event_idx {
            let event: u16 = io::mmio_read(self.base + R_USED + 4 + 8 * self.size as u64);
            // vring_need_event(event, new, old)
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            io::mmio_read::<u16>(self.base + R_USED) & 1 == 0
        };
        if force_kick || kick {
            io::mmio_write(self.notify, self.index);
        }
    }

    /// Has the device used an element we have not taken yet?
    pub(crate) fn has_used(&self) -> bool {
        io::mmio_read::<u16>(self.base + R_USED + 2) != self.next_used
    }

    /// The next used element (id, len), if any.
    pub(crate) fn used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let e = self.base + R_USED + 4 + 8 * (self.next_used % self.size) as u64;
        self.next_used = self.next_used.wrapping_add(1);
        Some((io::mmio_read::<u32>(e) as u16, io::mmio_read(e + 4)))
    }

    /// Waits (at most `secs` seconds of PM timer) for the next used element.
    fn wait_used(&mut self, secs: u64) -> Option<(u16, u32)> {
        let mut clock = Clock::new();
        loop {
            if let Some(u) = self.used() {
                return Some(u);
            }
            if clock.elapsed() > secs * PM_HZ {
                return None;
            }
            io::pause();
        }
    }
}

/// Elapsed PM-timer ticks, wrap-safe however long it runs.
pub(crate) struct Clock {
    last: u32,
    total: u64,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            last: io::inl(PM_TMR),
            total: 0,
        }
    }
    pub(crate) fn elapsed(&mut self) -> u64 {
        let now = io::inl(PM_TMR);
        self.total += now.wrapping_sub(self.last) as u64;
        self.last = now;
        self.total
    }
}

pub(crate) fn w8(a: u64, v: u8) {
    io::mmio_write(a, v)
}
pub(crate) fn r8(a: u64) -> u8 {
    io::mmio_read(a)
}
pub(crate) fn w16be(a: u64, v: u16) {
    io::mmio_write(a, v.to_be())
}
pub(crate) fn r16be(a: u64) -> u16 {
    u16::from_be(io::mmio_read(a))
}

/// The device, its two rings and what was negotiated.
pub(crate) struct Nic {
    pub(crate) dev: Dev,
    pub(crate) rx: Ring,
    pub(crate) tx: Ring,
    pub(crate) mac: [u8; 6],
    mrg: bool,
    /// Receive buffer size and count.
    rx_slot: u64,
    rx_count: u16,
}

pub(crate) fn arg<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|c| c.is_ascii_whitespace())
        .find(|w| w.len() > key.len() && w.starts_with(key) && w[key.len()] == b'=')
        .map(|w| &w[key.len() + 1..])
}

pub(crate) fn num_arg(cmdline: &[u8], key: &[u8], default: u64) -> u64 {
    match arg(cmdline, key) {
        None => default,
        Some(v) => crate::parse_num(v).unwrap_or_else(|| {
            fail(&[P::S("net: bad value for "), P::B(key)]);
            default
        }),
    }
}

pub(crate) fn parse_ip(v: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = v.split(|&c| c == b'.');
    for b in ip.iter_mut() {
        let n = crate::parse_num(parts.next()?)?;
        *b = u8::try_from(n).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn hex_mac(mac: &[u8; 6], out: &mut [u8; 17]) {
    let h = |v: u8| if v < 10 { b'0' + v } else { b'a' + v - 10 };
    for (i, &b) in mac.iter().enumerate() {
        out[3 * i] = h(b >> 4);
        out[3 * i + 1] = h(b & 15);
        if i < 5 {
            out[3 * i + 2] = b':';
        }
    }
}

impl Nic {
    pub(crate) fn open(window: &mut u64, want_mrg: bool, post: bool, evidx: bool) -> Option<Nic> {
        extern "C" {
            static _image_end: u8;
        }
        if core::ptr::addr_of!(_image_end) as u64 > BASE {
            fail(&[P::S("net: image overlaps the net buffers")]);
            return None;
        }
        let mut dev = virtio::probe(&[0x1041, 0x1000], window, false)?;
        let wanted = F_MAC
            | F_STATUS
            | F_MTU
            | if want_mrg { F_MRG_RXBUF } else { 0 }
            | if evidx { F_EVENT_IDX } else { 0 };
        if !dev.negotiate(wanted) {
            return None;
        }
        // struct virtio_net_config: mac[6] @0, status @6, max_virtqueue_pairs @8, mtu @10.
        let cfg = dev.config::<12>(0);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&cfg[..6]);
        let status = u16::from_le_bytes([cfg[6], cfg[7]]);
        let mtu = if dev.features & F_MTU != 0 {
            u16::from_le_bytes([cfg[10], cfg[11]]) as u64
        } else {
            1500
        };
        let mrg = dev.features & F_MRG_RXBUF != 0;
        let mut text = [0u8; 17];
        hex_mac(&mac, &mut text);
        line(&[
            P::S("net mac="),
            P::B(&text),
            P::S(" status=0x"),
            P::H(status as u64, 1),
            P::S(" mtu="),
            P::D(mtu),
            P::S(" mrg="),
            P::D(mrg as u64),
            P::S(" evidx="),
            P::D((dev.features & F_EVENT_IDX != 0) as u64),
        ]);
        if dev.features & F_MAC == 0 {
            fail(&[P::S("net: MAC not offered")]);
        }
        if dev.features & F_STATUS != 0 && status & 1 == 0 {
            fail(&[P::S("net: link is down")]);
        }
        let rx = Ring::setup(&dev, 0, RX_RING)?;
        let tx = Ring::setup(&dev, 1, TX_RING)?;
        if !dev.driver_ok() {
            return None;
        }
        let mtu = mtu.min(9000);
        let (rx_slot, rx_count) = if mrg {
            (256, rx.size)
        } else {
            ((HDR + 14 + mtu + 15) & !15, rx.size.min(16))
        };
        let mut nic = Nic {
            dev,
            rx,
            tx,
            mac,
            mrg,
            rx_slot: rx_slot.min(RX_SLOT_MAX),
            rx_count,
        };
        if post {
            nic.post_all_rx();
        }
        Some(nic)
    }

    fn post_all_rx(&mut self) {
        for i in 0..self.rx_count {
            self.post_rx(i);
        }
        self.rx.publish(true);
    }

    pub(crate) fn rx_addr(&self, i: u16) -> u64 {
        RX_BUF + i as u64 * self.rx_slot
    }

    /// Offers receive buffer `i` (descriptor `i`, device-writable).
    fn post_rx(&mut self, i: u16) {
        self.rx.desc(i, self.rx_addr(i), self.rx_slot as u32, 2);
        self.rx.offer(i);
    }

    /// Offers the chain `bufs` (address, length, flags) from descriptor 0 for transmission.
    pub(crate) fn post_tx(&mut self, bufs: &[(u64, u32, u16)]) {
        for (i, &(a, l, f)) in bufs.iter().enumerate() {
            let next = if i + 1 < bufs.len() { 1 } else { 0 };
            self.tx.desc(i as u16, a, l, f | next);
        }
        self.tx.offer(0);
        self.tx.publish(false);
    }

    /// Sends the chain `bufs` (address, length, flags) from descriptor 0 and waits for it.
    fn send(&mut self, bufs: &[(u64, u32, u16)]) -> bool {
        self.post_tx(bufs);
        match self.tx.wait_used(5) {
            Some(_) => true,
            None => {
                fail(&[P::S("net: transmit not completed (timeout)")]);
                false
            }
        }
    }

    /// Waits for one received frame: (buffers used: up to 64 (id, len)), or None at the
    /// deadline.
    fn receive(&mut self, clock: &mut Clock, limit: u64, got: &mut [(u16, u32); 64]) -> usize {
        let first = loop {
            if let Some(u) = self.rx.used() {
                break u;
            }
            if clock.elapsed() > limit {
                return 0;
            }
            io::pause();
        };
        got[0] = first;
        if !self.mrg {
            return 1;
        }
        let n = (u16::from_le(io::mmio_read(self.rx_addr(first.0) + 10)) as usize).clamp(1, 64);
        for slot in got.iter_mut().take(n).skip(1) {
            match self.rx.wait_used(5) {
                Some(u) => *slot = u,
                None => {
                    fail(&[P::S("net: num_buffers larger than the buffers used")]);
                    return 0;
                }
            }
        }
        n
    }

    /// Gives the buffers of a handled frame back.
    pub(crate) fn repost(&mut self, got: &[(u16, u32)]) {
        for &(id, _) in got {
            if id < self.rx_count {
                self.post_rx(id);
            } else {
                fail(&[P::S("net: used id out of range "), P::D(id as u64)]);
            }
        }
        self.rx.publish(false);
    }
}

/// Writes test frame `seq` of `len` bytes at `at` (broadcast, from `mac`).
fn build_frame(at: u64, mac: &[u8; 6], seq: u16, len: u64, pattern: bool) {
    for i in 0..6 {
        w8(at + i, 0xff);
        w8(at + 6 + i, mac[i as usize]);
    }
    w16be(at + 12, ETHERTYPE);
    w8(at + 14, KIND_DATA);
    w8(at + 15, 0);
    w16be(at + 16, seq);
    w16be(at + 18, len as u16);
    if pattern {
        let mut v = (20u64 * 7 + seq as u64 * 31 + 0x5a) as u8;
        for k in 20..len {
            w8(at + k, v);
            v = v.wrapping_add(7);
        }
    }
}

pub(crate) fn zero_hdr(at: u64) {
    io::mmio_write(at, 0u64);
    io::mmio_write(at + 8, 0u32);
}

pub(crate) fn checksum(mut sum: u32, at: u64, len: u64) -> u16 {
    let mut i = 0;
    while i + 1 < len {
        sum += r16be(at + i) as u32;
        i += 2;
    }
    if i < len {
        sum += (r8(at + i) as u32) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn swap(a: u64, b: u64, n: u64) {
    for i in 0..n {
        let (x, y) = (r8(a + i), r8(b + i));
        w8(a + i, y);
        w8(b + i, x);
    }
}

/// What a received frame asks for.
pub(crate) enum Reply {
    None,
    Echo,
    Arp,
    Icmp,
    Stop,
}

/// Classifies the frame at `f` (`len` bytes, contiguous within the first buffer) and turns
/// it into its reply in place.
pub(crate) fn answer(f: u64, len: u64, mac: &[u8; 6], ip: Option<[u8; 4]>) -> Reply {
    if len < 14 {
        return Reply::None;
    }
    let ty = r16be(f + 12);
    let ours = |at: u64| ip.is_some_and(|ip| (0..4).all(|i| r8(at + i) == ip[i as usize]));
    match ty {
        ETHERTYPE if len >= 20 => match r8(f + 14) {
            KIND_STOP => Reply::Stop,
            KIND_DATA => {
                swap(f, f + 6, 6);
                Reply::Echo
            }
            _ => Reply::None,
        },
        // ARP request (op 1) for our address: Ethernet/IPv4 only.
        0x0806 if len >= 42 && r16be(f + 20) == 1 && ours(f + 38) => {
            for i in 0..6 {
                w8(f + i, r8(f + 22 + i)); // to the sender
                w8(f + 6 + i, mac[i as usize]);
                w8(f + 32 + i, r8(f + 22 + i)); // tha = sha
                w8(f + 22 + i, mac[i as usize]); // sha = us
            }
            swap(f + 28, f + 38, 4); // spa <-> tpa
            w16be(f + 20, 2);
            Reply::Arp
        }
        // IPv4, ICMP echo request to us.
        0x0800 if len >= 42 && r8(f + 23) == 1 && ours(f + 30) => {
            let ihl = (r8(f + 14) & 15) as u64 * 4;
            let total = r16be(f + 16) as u64;
            let icmp = f + 14 + ihl;
            if ihl < 20 || total < ihl + 8 || 14 + total > len || r8(icmp) != 8 {
                return Reply::None;
            }
            swap(f, f + 6, 6);
            swap(f + 26, f + 30, 4); // addresses: the header checksum stays valid
            w8(icmp, 0);
            w16be(icmp + 2, 0);
            let c = checksum(0, icmp, total - ihl);
            w16be(icmp + 2, c);
            Reply::Icmp
        }
        _ => Reply::None,
    }
}

/// `rhyve.test=virtio-net`.
pub fn test(window: &mut u64, cmdline: &'static [u8]) {
    let mrg = num_arg(cmdline, b"rhyve.net.mrg", 0) == 1;
    let ip = match arg(cmdline, b"rhyve.net.ip") {
        None => None,
        Some(v) => match parse_ip(v) {
            Some(ip) => Some(ip),
            None => {
                fail(&[P::S("net: bad rhyve.net.ip")]);
                None
            }
        },
    };
    let norx = num_arg(cmdline, b"rhyve.net.norx", 0) == 1;
    let evidx = num_arg(cmdline, b"rhyve.net.evidx", 0) == 1;
    let Some(mut nic) = Nic::open(window, mrg, !norx, evidx) else {
        return;
    };
    if norx {
        no_buffers_then_receive(&mut nic);
        return;
    }
    let mtu = u16::from_le_bytes({
        let c = nic.dev.config::<12>(0);
        [c[10], c[11]]
    }) as u64;
    let max = if nic.dev.features & F_MTU != 0 {
        (mtu + 14).min(TX_SLOT - HDR)
    } else {
        1514
    };
    // Transmit: every size up to max, then max itself; alternately header and frame in one
    // descriptor and in two.
    let (mut sent, mut bytes, mut seq) = (0u64, 0u64, 0u16);
    for len in SIZES.iter().copied().filter(|&l| l < max).chain([max]) {
        zero_hdr(TX_BUF);
        build_frame(TX_BUF + HDR, &nic.mac, seq, len, true);
        let ok = if seq % 2 == 0 {
            nic.send(&[(TX_BUF, (HDR + len) as u32, 0)])
        } else {
            nic.send(&[(TX_BUF, HDR as u32, 0), (TX_BUF + HDR, len as u32, 0)])
        };
        if !ok {
            return;
        }
        sent += 1;
        bytes += len;
        seq += 1;
    }
    line(&[
        P::S("net tx frames="),
        P::D(sent),
        P::S(" bytes="),
        P::D(bytes),
        P::S(" max="),
        P::D(max),
    ]);
    // Malformed: 8 bytes (shorter than the header); a device-writable buffer. Both must come
    // back used, and nothing may reach the wire.
    zero_hdr(TX_HDR);
    build_frame(TX_BUF + HDR, &nic.mac, 0xbad, 100, false);
    let bad1 = nic.send(&[(TX_HDR, 8, 0)]);
    let bad2 = nic.send(&[(TX_HDR, HDR as u32, 0), (TX_BUF + HDR, 100, 2)]);
    line(&[
        P::S("net tx malformed returned="),
        P::D(bad1 as u64 + bad2 as u64),
    ]);
    // Then a good frame again: the device still works.
    zero_hdr(TX_BUF);
    build_frame(TX_BUF + HDR, &nic.mac, seq, 60, true);
    if !nic.send(&[(TX_BUF, (HDR + 60) as u32, 0)]) {
        return;
    }
    line(&[P::S("net tx after-malformed seq="), P::D(seq as u64)]);

    line(&[P::S("net echo ready")]);
    let (mut echoed, mut arp, mut icmp, mut other) = (0u64, 0u64, 0u64, 0u64);
    let mut got = [(0u16, 0u32); 64];
    let mut clock = Clock::new();
    loop {
        let n = nic.receive(&mut clock, 120 * PM_HZ, &mut got);
        if n == 0 {
            fail(&[P::S("net: no stop frame (timeout)")]);
            break;
        }
        clock = Clock::new();
        let first = nic.rx_addr(got[0].0);
        let total: u64 = got[..n].iter().map(|g| g.1 as u64).sum();
        let flen = total.saturating_sub(HDR);
        // The reply logic reads headers (at most 14 + 60 + 8 bytes) from the first buffer.
        let in_first = (got[0].1 as u64).saturating_sub(HDR);
        let reply = answer(first + HDR, in_first.min(flen), &nic.mac, ip);
        let reply = match reply {
            Reply::Stop => break,
            Reply::None => {
                other += 1;
                nic.repost(&got[..n]);
                continue;
            }
            r => r,
        };
        zero_hdr(first);
        let mut chain = [(0u64, 0u32, 0u16); 64];
        for (c, g) in chain.iter_mut().zip(&got[..n]) {
            *c = (nic.rx_addr(g.0), g.1, 0);
        }
        if !nic.send(&chain[..n]) {
            return;
        }
        match reply {
            Reply::Echo => echoed += 1,
            Reply::Arp => arp += 1,
            _ => icmp += 1,
        }
        nic.repost(&got[..n]);
    }
    line(&[
        P::S("net echo frames="),
        P::D(echoed),
        P::S(" arp="),
        P::D(arp),
        P::S(" icmp="),
        P::D(icmp),
        P::S(" other="),
        P::D(other),
    ]);
    nic.dev.reset();
    line(&[P::S("net done")]);
}

/// `rhyve.net.norx=1`: posts no receive buffers for 3 s (the host floods the tap meanwhile:
/// the device must hold back, not spin), then posts them and receives until a stop frame,
/// checking the data frames' sequence numbers run without a gap from the first one.
fn no_buffers_then_receive(nic: &mut Nic) {
    line(&[P::S("net norx waiting")]);
    let mut c = Clock::new();
    while c.elapsed() < 3 * PM_HZ {
        io::pause();
    }
    line(&[P::S("net norx posting")]);
    nic.post_all_rx();
    let (mut count, mut first, mut next, mut gaps) = (0u64, None, 0u16, 0u64);
    let mut got = [(0u16, 0u32); 64];
    let mut clock = Clock::new();
    loop {
        if nic.receive(&mut clock, 60 * PM_HZ, &mut got) == 0 {
            fail(&[P::S("net: no stop frame (timeout)")]);
            break;
        }
        clock = Clock::new();
        let f = nic.rx_addr(got[0].0) + HDR;
        let len = (got[0].1 as u64).saturating_sub(HDR);
        if len >= 20 && r16be(f + 12) == ETHERTYPE {
            if r8(f + 14) == KIND_STOP {
                break;
            }
            let seq = r16be(f + 16);
            if first.is_none() {
                first = Some(seq);
            } else if seq != next {
                gaps += 1;
            }
            next = seq.wrapping_add(1);
            count += 1;
        }
        nic.repost(&got[..1]);
    }
    line(&[
        P::S("net norx received="),
        P::D(count),
        P::S(" first="),
        P::D(first.unwrap_or(0) as u64),
        P::S(" last="),
        P::D(next.wrapping_sub(1) as u64),
        P::S(" gaps="),
        P::D(gaps),
    ]);
    nic.dev.reset();
    line(&[P::S("net done")]);
}

/// `rhyve.test=net-bench`.
pub fn bench(window: &mut u64, cmdline: &'static [u8]) {
    let frames = num_arg(cmdline, b"rhyve.bench.frames", 2000);
    let size = num_arg(cmdline, b"rhyve.bench.size", 64).clamp(60, TX_SLOT - HDR);
    let Some(mut nic) = Nic::open(window, false, true, false) else {
        return;
    };
    // Guest → host: the ring's slots each hold a ready frame; post as many as fit, kick
    // once, reap, repeat.
    let slots = nic.tx.size.min(64);
    for s in 0..slots {
        let at = TX_BUF + s as u64 * TX_SLOT;
        zero_hdr(at);
        build_frame(at + HDR, &nic.mac, s, size, false);
        nic.tx.desc(s, at, (HDR + size) as u32, 0);
    }
    let t0 = io::inl(PM_TMR);
    let (mut posted, mut done) = (0u64, 0u64);
    let mut free = slots as u64;
    let mut next_slot = 0u16;
    while done < frames {
        let mut added = false;
        while free > 0 && posted < frames {
            nic.tx.offer(next_slot);
            next_slot = (next_slot + 1) % slots;
            free -= 1;
            posted += 1;
            added = true;
        }
        if added {
            nic.tx.publish(false);
        }
        let mut got = false;
        while nic.tx.used().is_some() {
            free += 1;
            done += 1;
            got = true;
        }
        if !got {
            let mut c = Clock::new();
            while io::mmio_read::<u16>(nic.tx.base + R_USED + 2) == nic.tx.next_used {
                if c.elapsed() > 5 * PM_HZ {
                    fail(&[P::S("net-bench: transmit stalled")]);
                    return;
                }
                io::pause();
            }
        }
    }
    let ticks = (io::inl(PM_TMR).wrapping_sub(t0) as u64).max(1);
    line(&[
        P::S("net-bench tx frames="),
        P::D(frames),
        P::S(" size="),
        P::D(size),
        P::S(" ticks="),
        P::D(ticks),
        P::S(" fps="),
        P::D(frames * PM_HZ / ticks),
    ]);
    // Host → guest: count until a stop frame; time from the first frame to the last.
    line(&[P::S("net-bench rx ready")]);
    let (mut count, mut rx_bytes) = (0u64, 0u64);
    let mut first = 0u32;
    let mut last = 0u32;
    let mut idle = Clock::new();
    let mut stop = false;
    while !stop {
        let mut n = 0;
        while let Some((id, len)) = nic.rx.used() {
            let f = nic.rx_addr(id) + HDR;
            if len as u64 >= HDR + 20 && r16be(f + 12) == ETHERTYPE && r8(f + 14) == KIND_STOP {
                stop = true;
            } else {
                if count == 0 {
                    first = io::inl(PM_TMR);
                }
                count += 1;
                rx_bytes += (len as u64).saturating_sub(HDR);
            }
            if id < nic.rx_count {
                nic.post_rx(id);
            }
            n += 1;
        }
        if n > 0 {
            last = io::inl(PM_TMR);
            nic.rx.publish(false);
            idle = Clock::new();
        } else if idle.elapsed() > 60 * PM_HZ {
            fail(&[P::S("net-bench: no stop frame (timeout)")]);
            break;
        } else {
            io::pause();
        }
    }
    let ticks = (last.wrapping_sub(first) as u64).max(1);
    line(&[
        P::S("net-bench rx frames="),
        P::D(count),
        P::S(" bytes="),
        P::D(rx_bytes),
        P::S(" ticks="),
        P::D(ticks),
    ]);
    nic.dev.reset();
    line(&[P::S("net-bench done")]);
}
