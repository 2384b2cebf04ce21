//! `rhyve.test=snapshot`: a guest that keeps its devices busy forever, so that a snapshot
//! taken at any moment (and restored, perhaps more than once) catches it in the middle of
//! something, and whatever the restore lost shows up in the next tick's line.
//!
//! Ticks come from the local APIC timer (periodic, every [`TICK_MS`] or `rhyve.snap.ms=`);
//! between them the guest halts (a tick whose work outlasts the period is followed at once
//! by the next: with `rhyve.snap.ms=1` the devices are never idle). Each tick N:
//! - virtio-blk: writes sector N mod [`SECTORS`] with the tick's pattern (word k of the
//!   sector is `N << 16 | sector << 8 | k`, 64 little-endian u64), reads it back into a
//!   buffer filled with all-ones and compares;
//! - virtio-net: ICMP echo request (id 0x5248, sequence N mod 2^16, 16 bytes of payload: N
//!   as a big-endian u64, then `rhyvesnp`) from `rhyve.net.ip` to `rhyve.net.peer` (default:
//!   the same /24, host part 1), waits for the reply. The peer's MAC comes from an ARP
//!   request (on the first tick and before every retry). ARP requests and ICMP echo requests
//!   for our address are answered meanwhile. An exchange is tried [`ATTEMPTS`] times, each
//!   with a [`REPLY_MS`] deadline: a frame in flight when the snapshot was taken is gone
//!   after the restore, as on a real network;
//! - every completion (blk request, transmitted frame, received frame) is awaited by its
//!   MSI-X interrupt (blk queue 0 → vector 0x41, net receive → 0x42, transmit → 0x43), at
//!   most [`DONE_MS`]: a buffer the device used without its interrupt is a FAIL
//!   (`irq=bad`), one never used too (`blk=bad` / `net=bad`), never a hang.
//!
//! Then one line: `snap tick=N blk=ok|bad irq=ok|bad net=ok|bad fails=F retries=R` (F: FAIL
//! lines so far, R: exchange attempts beyond the first so far).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::io::{line, P};
use crate::net::{self, r16be, r8, w16be, w8, Nic, Reply, HDR, TX_BUF};
use crate::pci::{self, Cfg};
use crate::virtio::{self, Buf, Dma, Queue};
use crate::{blk, fail, fails, irq};

const VEC_TIMER: u8 = irq::IRQ_FIRST;
const VEC_BLK: u8 = irq::IRQ_FIRST + 1;
const VEC_RX: u8 = irq::IRQ_FIRST + 2;
const VEC_TX: u8 = irq::IRQ_FIRST + 3;

/// The tick's period, unless `rhyve.snap.ms=` gives another (1..1000).
pub const TICK_MS: u64 = 20;
/// A completion (and its interrupt) must come within this long.
const DONE_MS: u64 = 1000;
/// The reply to one ARP or echo request must come within this long.
const REPLY_MS: u64 = 250;
/// Tries of one exchange (ARP + echo) before the tick's net is bad.
const ATTEMPTS: u64 = 4;
/// The sectors the ticks write, round-robin.
pub const SECTORS: u64 = 64;
const ICMP_ID: u16 = 0x5248;
const PAYLOAD_TAG: &[u8; 8] = b"rhyvesnp";

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
/// Frames go out at least this long (Ethernet's minimum without FCS).
const MIN_FRAME: u64 = 60;

/// The sector written (first 512 bytes) and the one read back.
static mut DATA: Dma<1024> = Dma([0; 1024]);

fn data() -> (u64, u64) {
    // Only the address: the device and this module's volatile word accessors use the memory.
    let base = core::ptr::addr_of!(DATA) as u64;
    (base, base + blk::SECTOR as u64)
}

/// The tick's period in ms, once the timer runs.
static PERIOD_MS: AtomicU64 = AtomicU64::new(TICK_MS);

/// `ms` as timer ticks (at least one).
fn ticks(ms: u64) -> u64 {
    (ms / PERIOD_MS.load(Ordering::Relaxed).max(1)).max(1)
}

fn w64(a: u64, v: u64) {
    crate::io::mmio_write(a, v)
}
fn r64(a: u64) -> u64 {
    crate::io::mmio_read(a)
}

/// Word `k` of sector `sector` as tick `n` writes it.
fn word(n: u64, sector: u64, k: u64) -> u64 {
    n << 16 | sector << 8 | k
}

/// Waits (halting) until `vector` was taken since `since` and `ready()` holds. Returns
/// (completed, interrupt seen); a completion without its interrupt is a FAIL naming `what`.
fn completion(vector: u8, since: u64, what: &str, ready: impl Fn() -> bool) -> (bool, bool) {
    if irq::wait(VEC_TIMER, ticks(DONE_MS), || {
        irq::count(vector) != since && ready()
    }) {
        return (true, true);
    }
    if ready() {
        fail(&[
            P::S("snap: "),
            P::S(what),
            P::S(" completed without its interrupt (vector "),
            P::X(u64::from(vector)),
            P::S(")"),
        ]);
        return (true, false);
    }
    fail(&[P::S("snap: "), P::S(what), P::S(" not completed (timeout)")]);
    (false, true)
}

/// Routes `entries` of function `devices`' MSI-X table to `vectors`, and its queues 0..
/// to those entries; no configuration interrupt.
fn route(d: &virtio::Dev, devices: &[u16], vectors: &[u8], who: &str) -> bool {
    let cfg = Cfg::Ports;
    let Some(f) = pci::find(cfg, virtio::VENDOR, devices) else {
        return false;
    };
    let (cap, _) = irq::caps(cfg, f);
    if cap == 0 {
        fail(&[P::S(who), P::S(": no MSI-X capability")]);
        return false;
    }
    irq::no_config_vector(d);
    vectors.iter().enumerate().all(|(i, &v)| {
        irq::msix_route(cfg, f, cap, i as u16, v, who)
            && irq::queue_vector(d, i as u16, i as u16, who)
    })
}

/// One virtio-blk request of one sector at `buf`, completed by interrupt. (status OK,
/// interrupt seen).
fn blk_request(q: &mut Queue, typ: u32, sector: u64, buf: Buf) -> (bool, bool) {
    let since = irq::count(VEC_BLK);
    blk::post(q, typ, sector, &[buf]);
    let what = if typ == blk::T_IN {
        "blk read"
    } else {
        "blk write"
    };
    let (done, irq_ok) = completion(VEC_BLK, since, what, || q.has_used());
    if !done {
        return (false, irq_ok);
    }
    q.used();
    match blk::status(typ) {
        Some(blk::S_OK) => (true, irq_ok),
        Some(st) => {
            fail(&[
                P::S("snap: "),
                P::S(what),
                P::S(" sector="),
                P::D(sector),
                P::S(" status="),
                P::D(u64::from(st)),
            ]);
            (false, irq_ok)
        }
        None => (false, irq_ok),
    }
}

/// Tick `n`'s sector: write, read back, compare. (blk ok, interrupts seen).
fn blk_tick(q: &mut Queue, n: u64) -> (bool, bool) {
    let sector = n % SECTORS;
    let (w, r) = data();
    for k in 0..64 {
        w64(w + 8 * k, word(n, sector, k));
        w64(r + 8 * k, u64::MAX);
    }
    let len = blk::SECTOR as u32;
    let (wrote, irq_w) = blk_request(q, blk::T_OUT, sector, Buf(w, len, false));
    if !wrote {
        return (false, irq_w);
    }
    let (read, irq_r) = blk_request(q, blk::T_IN, sector, Buf(r, len, true));
    if !read {
        return (false, irq_w && irq_r);
    }
    let bad = (0..64).find(|&k| r64(r + 8 * k) != word(n, sector, k));
    if let Some(k) = bad {
        fail(&[
            P::S("snap: blk read back sector="),
            P::D(sector),
            P::S(" word="),
            P::D(k),
            P::S(" is "),
            P::X(r64(r + 8 * k)),
            P::S(", wrote "),
            P::X(word(n, sector, k)),
        ]);
    }
    (bad.is_none(), irq_w && irq_r)
}

fn ip_at(a: u64) -> [u8; 4] {
    [r8(a), r8(a + 1), r8(a + 2), r8(a + 3)]
}

fn put(a: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        w8(a + i as u64, b);
    }
}

/// The guest's side of the network.
struct Net {
    nic: Nic,
    ip: [u8; 4],
    peer: [u8; 4],
    peer_mac: Option<[u8; 6]>,
    /// VEC_RX's count when the receive ring was last drained.
    rx_since: u64,
    retries: u64,
}

impl Net {
    /// Transmits the chain at `at` (a zeroed virtio-net header, then `len` bytes of frame),
    /// completed by interrupt. (sent, interrupt seen).
    fn transmit(&mut self, at: u64, len: u64) -> (bool, bool) {
        net::zero_hdr(at);
        let since = irq::count(VEC_TX);
        self.nic.post_tx(&[(at, (HDR + len) as u32, 0)]);
        let tx = &self.nic.tx;
        let r = completion(VEC_TX, since, "net transmit", || tx.has_used());
        if r.0 {
            self.nic.tx.used();
        }
        r
    }

    /// Takes received frames until `wanted(frame, len)` says one is what we wait for, or
    /// `ticks` pass; answers ARP and echo requests for our address meanwhile. (found,
    /// interrupts seen).
    fn receive(&mut self, ticks: u64, mut wanted: impl FnMut(u64, u64) -> bool) -> (bool, bool) {
        let start = irq::count(VEC_TIMER);
        let mut irq_ok = true;
        loop {
            let waited = irq::count(VEC_TIMER).wrapping_sub(start);
            if waited >= ticks {
                return (false, irq_ok);
            }
            let since = self.rx_since;
            let rx = &self.nic.rx;
            let got = irq::wait(VEC_TIMER, ticks - waited, || {
                irq::count(VEC_RX) != since && rx.has_used()
            });
            if !got && !rx.has_used() {
                return (false, irq_ok);
            }
            if !got {
                // The deadline passed with a frame in the ring but no interrupt for it.
                fail(&[P::S(
                    "snap: net receive completed without its interrupt (vector 0x42)",
                )]);
                irq_ok = false;
            }
            self.rx_since = irq::count(VEC_RX);
            let (found, irq_tx) = self.drain(&mut wanted);
            irq_ok &= irq_tx;
            if found {
                return (true, irq_ok);
            }
        }
    }

    /// Handles every frame in the receive ring. (a wanted one was among them, transmit
    /// interrupts seen).
    fn drain(&mut self, wanted: &mut impl FnMut(u64, u64) -> bool) -> (bool, bool) {
        let (mut found, mut irq_ok) = (false, true);
        while let Some((id, len)) = self.nic.rx.used() {
            let at = self.nic.rx_addr(id);
            let flen = u64::from(len).saturating_sub(HDR);
            if !found && wanted(at + HDR, flen) {
                found = true;
            } else if let Reply::Arp | Reply::Icmp =
                net::answer(at + HDR, flen, &self.nic.mac, Some(self.ip))
            {
                // The reply was made in place: send the buffer back out.
                let (_, i) = self.transmit(at, flen);
                irq_ok &= i;
            }
            self.nic.repost(&[(id, len)]);
        }
        (found, irq_ok)
    }

    /// An Ethernet header at `f` to `dst` from us.
    fn eth(&self, f: u64, dst: &[u8; 6], ty: u16) {
        put(f, dst);
        put(f + 6, &self.nic.mac);
        w16be(f + 12, ty);
    }

    /// Resolves the peer's MAC. (resolved, interrupts seen).
    fn arp(&mut self) -> (bool, bool) {
        let f = TX_BUF + HDR;
        self.eth(f, &[0xff; 6], ETH_ARP);
        // htype 1, ptype IPv4, hlen 6, plen 4, op 1 (request), sha, spa, tha 0, tpa.
        w16be(f + 14, 1);
        w16be(f + 16, ETH_IPV4);
        w8(f + 18, 6);
        w8(f + 19, 4);
        w16be(f + 20, 1);
        put(f + 22, &self.nic.mac);
        put(f + 28, &self.ip);
        put(f + 32, &[0; 6]);
        put(f + 38, &self.peer);
        put(f + 42, &[0; (MIN_FRAME - 42) as usize]);
        let (sent, mut irq_ok) = self.transmit(TX_BUF, MIN_FRAME);
        if !sent {
            return (false, irq_ok);
        }
        let (ip, peer) = (self.ip, self.peer);
        let mut mac = None;
        let (found, i) = self.receive(ticks(REPLY_MS), |f, len| {
            let reply = len >= 42
                && r16be(f + 12) == ETH_ARP
                && r16be(f + 20) == 2
                && ip_at(f + 28) == peer
                && ip_at(f + 38) == ip;
            if reply {
                let mut m = [0u8; 6];
                m.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = r8(f + 22 + i as u64));
                mac = Some(m);
            }
            reply
        });
        irq_ok &= i;
        self.peer_mac = mac;
        (found, irq_ok)
    }

    /// ICMP echo request `n` to the peer and its reply. (answered, interrupts seen).
    fn ping(&mut self, n: u64, mac: &[u8; 6]) -> (bool, bool) {
        let f = TX_BUF + HDR;
        self.eth(f, mac, ETH_IPV4);
        // IPv4: version 4, IHL 5, total 20 + 8 + 16, id, DF, TTL 64, ICMP.
        let ipv4 = f + 14;
        put(ipv4, &[0x45, 0]);
        w16be(ipv4 + 2, 44);
        w16be(ipv4 + 4, n as u16);
        w16be(ipv4 + 6, 0x4000);
        put(ipv4 + 8, &[64, 1, 0, 0]);
        put(ipv4 + 12, &self.ip);
        put(ipv4 + 16, &self.peer);
        w16be(ipv4 + 10, net::checksum(0, ipv4, 20));
        let icmp = ipv4 + 20;
        put(icmp, &[8, 0, 0, 0]);
        w16be(icmp + 4, ICMP_ID);
        w16be(icmp + 6, n as u16);
        put(icmp + 8, &n.to_be_bytes());
        put(icmp + 16, PAYLOAD_TAG);
        w16be(icmp + 2, net::checksum(0, icmp, 24));
        put(f + 58, &[0; (MIN_FRAME - 58) as usize]);
        let (sent, mut irq_ok) = self.transmit(TX_BUF, MIN_FRAME);
        if !sent {
            return (false, irq_ok);
        }
        let (ip, peer) = (self.ip, self.peer);
        let (found, i) = self.receive(ticks(REPLY_MS), |f, len| {
            if len < 58 || r16be(f + 12) != ETH_IPV4 || r8(f + 23) != 1 {
                return false;
            }
            let ihl = u64::from(r8(f + 14) & 15) * 4;
            let icmp = f + 14 + ihl;
            ihl >= 20
                && len >= 14 + ihl + 24
                && ip_at(f + 26) == peer
                && ip_at(f + 30) == ip
                && r8(icmp) == 0
                && r16be(icmp + 4) == ICMP_ID
                && r16be(icmp + 6) == n as u16
                && (0..8).all(|i| r8(icmp + 8 + i) == n.to_be_bytes()[i as usize])
                && (0..8).all(|i| r8(icmp + 16 + i) == PAYLOAD_TAG[i as usize])
        });
        irq_ok &= i;
        (found, irq_ok)
    }

    /// Tick `n`'s exchange with the peer. (net ok, interrupts seen).
    fn tick(&mut self, n: u64) -> (bool, bool) {
        let mut irq_ok = true;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                self.retries += 1;
                // The peer may be another interface now (a new tap has a new MAC).
                self.peer_mac = None;
            }
            let mac = match self.peer_mac {
                Some(m) => m,
                None => {
                    let (ok, i) = self.arp();
                    irq_ok &= i;
                    match self.peer_mac {
                        Some(m) if ok => m,
                        _ => {
                            retry(n, attempt, "no ARP reply");
                            continue;
                        }
                    }
                }
            };
            let (ok, i) = self.ping(n, &mac);
            irq_ok &= i;
            if ok {
                return (true, irq_ok);
            }
            retry(n, attempt, "no echo reply");
        }
        fail(&[
            P::S("snap: net tick="),
            P::D(n),
            P::S(": no exchange with the peer in "),
            P::D(ATTEMPTS),
            P::S(" attempts"),
        ]);
        (false, irq_ok)
    }
}

/// An attempt of tick `n`'s exchange failed (not a FAIL: the next attempt may succeed).
fn retry(n: u64, attempt: u64, why: &str) {
    line(&[
        P::S("snap retry tick="),
        P::D(n),
        P::S(" attempt="),
        P::D(attempt + 1),
        P::S(" "),
        P::S(why),
    ]);
}

fn ok(v: bool) -> P<'static> {
    P::S(if v { "ok" } else { "bad" })
}

/// `rhyve.test=snapshot`: sets up, then ticks forever (returns only if the setup failed).
pub fn test(window: &mut u64, cmdline: &'static [u8]) {
    let Some(ip) = net::arg(cmdline, b"rhyve.net.ip").and_then(net::parse_ip) else {
        fail(&[P::S("snap: rhyve.net.ip=A.B.C.D missing or bad")]);
        return;
    };
    let peer = match net::arg(cmdline, b"rhyve.net.peer") {
        None => [ip[0], ip[1], ip[2], 1],
        Some(v) => match net::parse_ip(v) {
            Some(p) => p,
            None => {
                fail(&[P::S("snap: bad rhyve.net.peer")]);
                return;
            }
        },
    };
    irq::lapic_enable();
    let Some((bd, mut bq)) = blk::open(window, false, 0) else {
        return;
    };
    let capacity = blk::capacity(&bd);
    if capacity < SECTORS {
        fail(&[
            P::S("snap: the disk has "),
            P::D(capacity),
            P::S(" sectors, fewer than "),
            P::D(SECTORS),
        ]);
        return;
    }
    if !route(&bd, &[0x1042, 0x1001], &[VEC_BLK], "snap blk") {
        return;
    }
    let Some(nic) = Nic::open(window, false, true, false) else {
        return;
    };
    if !route(&nic.dev, &[0x1041, 0x1000], &[VEC_RX, VEC_TX], "snap net") {
        return;
    }
    let mut net = Net {
        nic,
        ip,
        peer,
        peer_mac: None,
        rx_since: irq::count(VEC_RX),
        retries: 0,
    };
    // Frames that arrived before their queue had a vector came without an interrupt.
    net.drain(&mut |_, _| false);
    let ms = net::num_arg(cmdline, b"rhyve.snap.ms", TICK_MS).clamp(1, 1000);
    PERIOD_MS.store(ms, Ordering::Relaxed);
    let period = irq::start_timer(VEC_TIMER, ms);
    line(&[
        P::S("snap start capacity="),
        P::D(capacity),
        P::S(" sectors="),
        P::D(SECTORS),
        P::S(" tick_ms="),
        P::D(ms),
        P::S(" lapic_count="),
        P::D(u64::from(period)),
    ]);
    let mut n = 0u64;
    let mut last = irq::count(VEC_TIMER);
    loop {
        irq::wait(VEC_TIMER, u64::MAX, || irq::count(VEC_TIMER) != last);
        last = irq::count(VEC_TIMER);
        n += 1;
        let (blk_ok, irq_blk) = blk_tick(&mut bq, n);
        let (net_ok, irq_net) = net.tick(n);
        line(&[
            P::S("snap tick="),
            P::D(n),
            P::S(" blk="),
            ok(blk_ok),
            P::S(" irq="),
            ok(irq_blk && irq_net),
            P::S(" net="),
            ok(net_ok),
            P::S(" fails="),
            P::D(fails()),
            P::S(" retries="),
            P::D(net.retries),
        ]);
    }
}
