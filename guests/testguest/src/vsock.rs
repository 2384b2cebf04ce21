//! `rhyve.test=vsock`: a polled virtio-vsock driver (Virtio 1.2 §5.10): receive, transmit and
//! event queues, stream connections with credit-based flow control (§5.10.6.3).
//!
//! What it does, all at once in one loop:
//! - connects out to host port `rhyve.vsock.out=P` (default 6000; 0: skip), sends
//!   `hello from the guest\n`, prints what the host answers until the host's SHUTDOWN
//!   (`vsock out got=...`), then closes (SHUTDOWN, the device's RST: `vsock out closed`);
//! - with `rhyve.vsock.refused=P`, connects to host port P, where nothing must listen:
//!   the device's RST prints `vsock refused port=P`;
//! - listens on `rhyve.vsock.port=P` (default 5000) and echoes every byte of each connection
//!   the host makes there, within the device's credit, until the host's SHUTDOWN; then
//!   closes and prints `vsock echo port=P bytes=N`; `rhyve.vsock.conns=N` such connections
//!   (default 1) end the test;
//! - with `rhyve.vsock.ignore=P`, a host connection to port P gets no answer: the device
//!   must reset it after its timeout (`vsock ignored port=P reset`).
//! A REQUEST to any other port gets an RST, as from a real stack. `vsock done` at the end.
//!
//! Memory: rings and buffers at the fixed guest-physical [`BASE`] (the VM needs 80 MiB).

use crate::fail;
use crate::io::{self, line, P};
use crate::net::{num_arg, Clock, Ring, PM_HZ};
use crate::virtio;

const BASE: u64 = 0x300_0000;
const RX_RING: u64 = BASE;
const TX_RING: u64 = BASE + 0x1000;
const EV_RING: u64 = BASE + 0x2000;
const EV_BUF: u64 = BASE + 0x3000;
/// Transmit headers, one 64-byte slot per transmit slot.
const TX_HDR: u64 = BASE + 0x4000;
/// Transmit payloads, [`CHUNK`] bytes per slot.
const TX_DATA: u64 = BASE + 0x10_0000;
const RX_BUF: u64 = BASE + 0x20_0000;
const RX_SLOT: u64 = 0x1100;
/// Each connection's receive ring of [`BUF_ALLOC`] bytes.
const CONN_MEM: u64 = BASE + 0x40_0000;

const HDR: u64 = 44;
const CHUNK: u64 = 4096;
/// Our receive buffer per connection: what we advertise, so the device never sends more.
const BUF_ALLOC: u32 = 64 * 1024;
const TX_SLOTS: u16 = 32;
const RX_COUNT: u16 = 32;
const MAX_CONNS: usize = 4;
const HOST_CID: u64 = 2;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;

const OUT_PORT: u32 = 49152;
const REFUSED_PORT: u32 = 49153;
const HELLO: &[u8] = b"hello from the guest\n";

#[derive(Clone, Copy, PartialEq, Eq)]
enum St {
    Free,
    Connecting,
    Open,
    /// We sent SHUTDOWN, waiting for the device's RST.
    Closing,
}

#[derive(Clone, Copy)]
struct Conn {
    st: St,
    local: u32,
    peer: u32,
    echo: bool,
    /// Bytes received, and consumed (echoed, or read for the out connection).
    received: u32,
    consumed: u32,
    sent: u32,
    peer_alloc: u32,
    peer_fwd: u32,
    /// The host said SHUTDOWN.
    peer_done: bool,
}

const FREE: Conn = Conn {
    st: St::Free,
    local: 0,
    peer: 0,
    echo: false,
    received: 0,
    consumed: 0,
    sent: 0,
    peer_alloc: 0,
    peer_fwd: 0,
    peer_done: false,
};

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_alloc
            .saturating_sub(self.sent.wrapping_sub(self.peer_fwd))
    }
    fn pending(&self) -> u32 {
        self.received.wrapping_sub(self.consumed)
    }
}

fn copy(dst: u64, src: u64, n: u64) {
    // SAFETY: both ranges are in this test's fixed buffers (identity-mapped RAM above the
    // image, checked at open) and do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(
            src as usize as *const u8,
            dst as usize as *mut u8,
            n as usize,
        )
    }
}

fn r32(a: u64) -> u32 {
    u32::from_le(io::mmio_read(a))
}

struct Vsock {
    dev: virtio::Dev,
    rx: Ring,
    tx: Ring,
    _ev: Ring,
    cid: u64,
    conns: [Conn; MAX_CONNS],
    tx_busy: u32,
    listen: u32,
    ignore: u32,
    ignored: Option<(u32, u32)>,
    ignored_reset: bool,
    echo_done: u64,
    out_done: bool,
    refused_done: bool,
    rx_dirty: bool,
}

impl Vsock {
    fn open(window: &mut u64) -> Option<Vsock> {
        extern "C" {
            static _image_end: u8;
        }
        if core::ptr::addr_of!(_image_end) as u64 > BASE {
            fail(&[P::S("vsock: image overlaps the vsock buffers")]);
            return None;
        }
        let mut dev = virtio::probe(&[0x1053], window, false)?;
        if !dev.negotiate(0) {
            return None;
        }
        let cfg = dev.config::<8>(0);
        let cid = u64::from_le_bytes(cfg);
        line(&[P::S("vsock cid="), P::D(cid)]);
        let rx = Ring::setup(&dev, 0, RX_RING)?;
        let tx = Ring::setup(&dev, 1, TX_RING)?;
        let mut ev = Ring::setup(&dev, 2, EV_RING)?;
        if !dev.driver_ok() {
            return None;
        }
        for i in 0..4u16 {
            ev.desc(i, EV_BUF + 8 * i as u64, 8, 2);
            ev.offer(i);
        }
        ev.publish(true);
        let mut v = Vsock {
            dev,
            rx,
            tx,
            _ev: ev,
            cid,
            conns: [FREE; MAX_CONNS],
            tx_busy: 0,
            listen: 0,
            ignore: 0,
            ignored: None,
            ignored_reset: false,
            echo_done: 0,
            out_done: false,
            refused_done: false,
            rx_dirty: false,
        };
        for i in 0..RX_COUNT.min(v.rx.size) {
            v.post_rx(i);
        }
        v.rx.publish(true);
        Some(v)
    }

    fn post_rx(&mut self, i: u16) {
        self.rx
            .desc(i, RX_BUF + i as u64 * RX_SLOT, (HDR + CHUNK) as u32, 2);
        self.rx.offer(i);
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.used() {
            let slot = id / 2;
            if id % 2 != 0 || slot >= TX_SLOTS {
                fail(&[
                    P::S("vsock: transmit used id out of range "),
                    P::D(id as u64),
                ]);
                continue;
            }
            self.tx_busy &= !(1 << slot);
        }
    }

    fn free_slot(&mut self) -> Option<u16> {
        self.reclaim_tx();
        (0..TX_SLOTS).find(|s| self.tx_busy & (1 << s) == 0)
    }

    /// Sends one packet on (local, peer) with `len` payload bytes from `src` (in two
    /// descriptors: header, payload). Waits up to 5 s for a transmit slot.
    fn send(
        &mut self,
        local: u32,
        peer: u32,
        op: u16,
        flags: u32,
        fwd: u32,
        src: u64,
        len: u64,
    ) -> bool {
        let mut clock = Clock::new();
        let slot = loop {
            if let Some(s) = self.free_slot() {
                break s;
            }
            if clock.elapsed() > 5 * PM_HZ {
                fail(&[P::S("vsock: no transmit slot came back (timeout)")]);
                return false;
            }
            io::pause();
        };
        let h = TX_HDR + 64 * slot as u64;
        io::mmio_write(h, self.cid);
        io::mmio_write(h + 8, HOST_CID);
        io::mmio_write(h + 16, local);
        io::mmio_write(h + 20, peer);
        io::mmio_write(h + 24, len as u32);
        io::mmio_write(h + 28, 1u16); // VIRTIO_VSOCK_TYPE_STREAM
        io::mmio_write(h + 30, op);
        io::mmio_write(h + 32, flags);
        io::mmio_write(h + 36, BUF_ALLOC);
        io::mmio_write(h + 40, fwd);
        let d = 2 * slot;
        if len > 0 {
            let data = TX_DATA + CHUNK * slot as u64;
            copy(data, src, len);
            self.tx.desc(d, h, HDR as u32, 1);
            self.tx.desc(d + 1, data, len as u32, 0);
        } else {
            self.tx.desc(d, h, HDR as u32, 0);
        }
        self.tx_busy |= 1 << slot;
        self.tx.offer(d);
        self.tx.publish(false);
        true
    }

    fn send_ctl(&mut self, ci: usize, op: u16, flags: u32) {
        let c = self.conns[ci];
        self.send(c.local, c.peer, op, flags, c.consumed, 0, 0);
    }

    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.st != St::Free && c.local == local && c.peer == peer)
    }

    fn connect(&mut self, ci: usize, local: u32, peer: u32) {
        self.conns[ci] = Conn {
            st: St::Connecting,
            local,
            peer,
            ..FREE
        };
        self.send(local, peer, OP_REQUEST, 0, 0, 0, 0);
    }

    /// Handles every used receive buffer and gives it back.
    fn poll(&mut self) {
        while let Some((id, len)) = self.rx.used() {
            if id >= RX_COUNT {
                fail(&[
                    P::S("vsock: receive used id out of range "),
                    P::D(id as u64),
                ]);
                continue;
            }
            self.handle(RX_BUF + id as u64 * RX_SLOT, len);
            self.post_rx(id);
            self.rx_dirty = true;
        }
        if self.rx_dirty {
            self.rx_dirty = false;
            self.rx.publish(false);
        }
    }

    fn handle(&mut self, at: u64, used_len: u32) {
        let src_cid: u64 = io::mmio_read(at);
        let dst_cid: u64 = io::mmio_read(at + 8);
        let (src_port, dst_port, plen) = (r32(at + 16), r32(at + 20), r32(at + 24));
        let op: u16 = io::mmio_read(at + 30);
        let flags = r32(at + 32);
        if src_cid != HOST_CID
            || dst_cid != self.cid
            || used_len as u64 != HDR + plen as u64
            || plen as u64 > CHUNK
        {
            fail(&[
                P::S("vsock: bad packet from cid "),
                P::D(src_cid),
                P::S(" to "),
                P::D(dst_cid),
                P::S(" op "),
                P::D(op as u64),
                P::S(" len "),
                P::D(plen as u64),
                P::S(" used "),
                P::D(used_len as u64),
            ]);
            return;
        }
        let Some(ci) = self.find(dst_port, src_port) else {
            return self.unknown(op, dst_port, src_port);
        };
        let c = &mut self.conns[ci];
        c.peer_alloc = r32(at + 36);
        c.peer_fwd = r32(at + 40);
        match (c.st, op) {
            (St::Connecting, OP_RESPONSE) => {
                c.st = St::Open;
                if ci == 1 {
                    fail(&[P::S("vsock: connected to a port nothing listens on")]);
                }
                line(&[
                    P::S("vsock out port="),
                    P::D(c.peer as u64),
                    P::S(" connected"),
                ]);
                let (l, p) = (c.local, c.peer);
                self.send(l, p, OP_RW, 0, 0, HELLO.as_ptr() as u64, HELLO.len() as u64);
                self.conns[ci].sent = HELLO.len() as u32;
            }
            (St::Connecting, OP_RST) => {
                c.st = St::Free;
                if ci == 1 {
                    line(&[P::S("vsock refused port="), P::D(c.peer as u64)]);
                    self.refused_done = true;
                } else {
                    fail(&[P::S("vsock: the host refused port "), P::D(c.peer as u64)]);
                    self.out_done = true;
                }
            }
            (St::Open, OP_RW) => {
                if c.pending() + plen > BUF_ALLOC {
                    fail(&[P::S("vsock: the device sent beyond our credit")]);
                    return;
                }
                let base = CONN_MEM + ci as u64 * BUF_ALLOC as u64;
                let pos = (c.received % BUF_ALLOC) as u64;
                let first = (plen as u64).min(BUF_ALLOC as u64 - pos);
                copy(base + pos, at + HDR, first);
                copy(base, at + HDR + first, plen as u64 - first);
                c.received = c.received.wrapping_add(plen);
            }
            // SEND: the host sends no more (it may still read).
            (St::Open, OP_SHUTDOWN) => c.peer_done |= flags & 2 != 0,
            (St::Open | St::Closing, OP_CREDIT_UPDATE) => {}
            (St::Open, OP_CREDIT_REQUEST) => self.send_ctl(ci, OP_CREDIT_UPDATE, 0),
            (St::Closing, OP_RST) => {
                c.st = St::Free;
                if c.echo {
                    line(&[
                        P::S("vsock echo port="),
                        P::D(c.local as u64),
                        P::S(" bytes="),
                        P::D(c.received as u64),
                    ]);
                    self.echo_done += 1;
                } else {
                    line(&[P::S("vsock out closed")]);
                    self.out_done = true;
                }
            }
            (St::Closing, _) => {}
            (st, op) => {
                fail(&[
                    P::S("vsock: op "),
                    P::D(op as u64),
                    P::S(" in state "),
                    P::D(st as u64),
                    P::S(" port "),
                    P::D(dst_port as u64),
                ]);
                c.st = St::Free;
                self.send(dst_port, src_port, OP_RST, 0, 0, 0, 0);
            }
        }
    }

    /// A packet for no connection of ours.
    fn unknown(&mut self, op: u16, local: u32, peer: u32) {
        match op {
            OP_REQUEST if local == self.listen => {
                let Some(ci) = (2..MAX_CONNS).find(|&i| self.conns[i].st == St::Free) else {
                    self.send(local, peer, OP_RST, 0, 0, 0, 0);
                    return;
                };
                self.conns[ci] = Conn {
                    st: St::Open,
                    local,
                    peer,
                    echo: true,
                    ..FREE
                };
                self.send_ctl(ci, OP_RESPONSE, 0);
            }
            OP_REQUEST if local == self.ignore => self.ignored = Some((local, peer)),
            OP_RST if self.ignored == Some((local, peer)) => {
                line(&[
                    P::S("vsock ignored port="),
                    P::D(local as u64),
                    P::S(" reset"),
                ]);
                self.ignored_reset = true;
            }
            OP_RST => {}
            _ => {
                self.send(local, peer, OP_RST, 0, 0, 0, 0);
            }
        }
    }

    /// Echoes what the echo connections hold, as far as the device's credit goes, and
    /// closes the connections the host finished.
    fn pump(&mut self) {
        for ci in 0..MAX_CONNS {
            let c = self.conns[ci];
            if c.st != St::Open {
                continue;
            }
            if !c.echo {
                if c.peer_done {
                    self.out_received(ci);
                    self.conns[ci].st = St::Closing;
                    self.send_ctl(ci, OP_SHUTDOWN, SHUTDOWN_BOTH);
                }
                continue;
            }
            let base = CONN_MEM + ci as u64 * BUF_ALLOC as u64;
            loop {
                let c = self.conns[ci];
                let pos = (c.consumed % BUF_ALLOC) as u64;
                let n = (c.pending().min(c.credit()) as u64)
                    .min(CHUNK)
                    .min(BUF_ALLOC as u64 - pos);
                if n == 0 || self.free_slot().is_none() {
                    break;
                }
                let fwd = c.consumed.wrapping_add(n as u32);
                if !self.send(c.local, c.peer, OP_RW, 0, fwd, base + pos, n) {
                    return;
                }
                let c = &mut self.conns[ci];
                c.consumed = fwd;
                c.sent = c.sent.wrapping_add(n as u32);
            }
            let c = self.conns[ci];
            if c.peer_done && c.pending() == 0 {
                self.conns[ci].st = St::Closing;
                self.send_ctl(ci, OP_SHUTDOWN, SHUTDOWN_BOTH);
            }
        }
    }

    /// Prints what the host sent on the out connection.
    fn out_received(&mut self, ci: usize) {
        let c = &mut self.conns[ci];
        let n = c.pending().min(200) as usize;
        let base = CONN_MEM + ci as u64 * BUF_ALLOC as u64;
        // SAFETY: the connection's own receive ring, written by `handle` above.
        let text = unsafe { core::slice::from_raw_parts(base as usize as *const u8, n) };
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        line(&[P::S("vsock out got="), P::B(text)]);
        c.consumed = c.received;
    }
}

pub fn test(window: &mut u64, cmdline: &[u8]) {
    let listen = num_arg(cmdline, b"rhyve.vsock.port", 5000) as u32;
    let out = num_arg(cmdline, b"rhyve.vsock.out", 6000) as u32;
    let refused = num_arg(cmdline, b"rhyve.vsock.refused", 0) as u32;
    let ignore = num_arg(cmdline, b"rhyve.vsock.ignore", 0) as u32;
    let wanted = num_arg(cmdline, b"rhyve.vsock.conns", 1);
    let Some(mut v) = Vsock::open(window) else {
        return;
    };
    v.listen = listen;
    v.ignore = ignore;
    v.out_done = out == 0;
    v.refused_done = refused == 0;
    if out != 0 {
        v.connect(0, OUT_PORT, out);
    }
    if refused != 0 {
        v.connect(1, REFUSED_PORT, refused);
    }
    let mut clock = Clock::new();
    loop {
        v.poll();
        v.pump();
        if v.out_done && v.refused_done && v.echo_done >= wanted && (ignore == 0 || v.ignored_reset)
        {
            break;
        }
        if clock.elapsed() > 60 * PM_HZ {
            fail(&[
                P::S("vsock: timeout: out done="),
                P::D(v.out_done as u64),
                P::S(" refused done="),
                P::D(v.refused_done as u64),
                P::S(" echoed connections="),
                P::D(v.echo_done),
                P::S(" ignored reset="),
                P::D(v.ignored_reset as u64),
            ]);
            break;
        }
        io::pause();
    }
    v.dev.reset();
    line(&[P::S("vsock done")]);
}
