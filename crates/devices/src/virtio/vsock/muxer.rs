//! The host side of virtio-vsock, as Firecracker defines it: guest connections end on unix
//! sockets.
//!
//! - Host-initiated: a program connects to the listening socket at `uds_path` and writes
//!   `CONNECT <port>\n`; the device sends the guest a REQUEST from a host port it picks
//!   (from 2^30 up, round robin below 2^31) and, once the guest answers RESPONSE, writes
//!   `OK <hostport>\n` on the stream, which then carries the connection. No answer within
//!   [`CONNECT_TIMEOUT`]: RST to the guest, the stream is closed. A bad command closes it.
//! - Guest-initiated: a REQUEST to CID 2, port P connects to the unix socket `<uds_path>_P`;
//!   nothing listening there: RST.
//!
//! Flow control is virtio-vsock's credit: the guest may have at most [`CONN_BUF`] bytes in
//! flight towards a host stream (what the stream does not take yet waits here), and the
//! device reads a host stream only as far as the guest's advertised buffer has room. A guest
//! that sends beyond its credit, or anything out of order, gets an RST on that connection;
//! the device and the other connections go on.
//!
//! Streams are registered edge-triggered: `readable` remembers that a stream has data the
//! guest has no room or credit for yet.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;
use crate::virtio::guest_error;

/// Receive buffer the device advertises per connection (bytes the guest may have in flight).
pub const CONN_BUF: u32 = 256 * 1024;
/// Forwarded bytes after which the guest is told of its new credit without being asked.
const CREDIT_THRESHOLD: u32 = 64 * 1024;
/// Connections at most (Firecracker's limit); more are refused.
pub const MAX_CONNS: usize = 1023;
/// How long the guest has to accept a host-initiated connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(2000);
const HOST_PORT_FIRST: u32 = 1 << 30;
const HOST_PORT_END: u32 = 1 << 31;
/// `CONNECT 4294967295\n` with room for spaces.
const MAX_COMMAND: usize = 32;
/// RSTs to unknown connections waiting for a receive buffer, at most (a guest that sends
/// garbage without receiving must not grow this).
const MAX_STRAY: usize = 256;

/// The listening socket's epoll token (the worker's kicks are 0..=2).
pub const TOKEN_LISTENER: u64 = 3;
const FIRST_STREAM_TOKEN: u64 = 16;

/// Counters (rhyvectl --get-stats).
#[derive(Debug, Default)]
pub struct VsockStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub host_connects: AtomicU64,
    pub guest_connects: AtomicU64,
    pub resets_sent: AtomicU64,
    pub refused: AtomicU64,
    pub guest_errors: AtomicU64,
    pub host_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Control packets owed to the guest.
#[derive(Debug, Default)]
struct Owed {
    rst: bool,
    request: bool,
    response: bool,
    shutdown: bool,
    credit_update: bool,
}

impl Owed {
    fn any(&self) -> bool {
        self.rst || self.request || self.response || self.shutdown || self.credit_update
    }
}

#[derive(Debug)]
enum State {
    /// A host program connected; its `CONNECT <port>` line so far.
    Command(Vec<u8>),
    /// REQUEST sent to the guest, waiting for RESPONSE.
    LocalInit,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// The host's port and the guest's.
    local_port: u32,
    peer_port: u32,
    /// The stream may have data (edge-triggered: until a read says EAGAIN).
    readable: bool,
    /// Bytes for the host stream it has not taken yet: the `OK` line, then guest data.
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are not guest data (not counted in `fwd_cnt`).
    uncounted: usize,
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_told: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    host_eof: bool,
    host_write_shut: bool,
    owed: Owed,
    queued: bool,
    /// Removed once the owed RST went out (or at once, when none is owed).
    dead: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Conn {
        Conn {
            stream,
            state,
            local_port: 0,
            peer_port: 0,
            readable: true,
            tx_buf: VecDeque::new(),
            uncounted: 0,
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_eof: false,
            host_write_shut: false,
            owed: Owed::default(),
            queued: false,
            dead: false,
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    fn can_send_data(&self) -> bool {
        self.established()
            && self.readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    fn wants_rx(&self) -> bool {
        self.owed.any() || self.can_send_data()
    }

    fn kill(&mut self) {
        self.owed = Owed {
            rst: true,
            ..Owed::default()
        };
        self.dead = true;
    }

    fn header(&mut self, cid: u64, op: u16, len: usize, flags: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        self.owed.credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: len as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, its payload (if any) read into `buf[..room]`.
    fn next_packet(&mut self, cid: u64, room: usize, buf: &mut [u8]) -> Option<(Header, usize)> {
        if self.owed.rst {
            self.owed = Owed::default();
            return Some((self.header(cid, OP_RST, 0, 0), 0));
        }
        if std::mem::take(&mut self.owed.request) {
            return Some((self.header(cid, OP_REQUEST, 0, 0), 0));
        }
        if std::mem::take(&mut self.owed.response) {
            return Some((self.header(cid, OP_RESPONSE, 0, 0), 0));
        }
        if self.can_send_data() {
            let n = room
                .min(self.peer_credit() as usize)
                .min(MAX_PAYLOAD)
                .min(buf.len());
            if n > 0 {
                loop {
                    match self.stream.read(&mut buf[..n]) {
                        Ok(0) => {
                            // The host will send no more; the guest may still send (half-close).
                            self.host_eof = true;
                            self.readable = false;
                            self.owed.shutdown = true;
                            break;
                        }
                        Ok(k) => {
                            self.rx_cnt += k as u32;
                            return Some((self.header(cid, OP_RW, k, 0), k));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.readable = false;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::debug!("virtio-vsock: host stream read: {e}");
                            self.kill();
                            self.owed = Owed::default();
                            return Some((self.header(cid, OP_RST, 0, 0), 0));
                        }
                    }
                }
            }
        }
        if std::mem::take(&mut self.owed.shutdown) {
            return Some((self.header(cid, OP_SHUTDOWN, 0, SHUTDOWN_SEND), 0));
        }
        if self.owed.credit_update {
            return Some((self.header(cid, OP_CREDIT_UPDATE, 0, 0), 0));
        }
        None
    }

    /// Writes what the host stream takes; false when the stream is broken.
    fn flush(&mut self) -> bool {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let control = n.min(self.uncounted);
                    self.uncounted -= control;
                    self.fwd_cnt += (n - control) as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("virtio-vsock: host stream write: {e}");
                    return false;
                }
            }
        }
        if self.tx_buf.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            if !self.host_write_shut {
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
                self.host_write_shut = true;
            }
            if self.peer_shutdown & SHUTDOWN_RCV != 0 {
                // Both ways shut and all delivered: the RST that completes the close.
                self.kill();
            }
        }
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= CREDIT_THRESHOLD {
            self.owed.credit_update = true;
        }
        true
    }
}

/// `CONNECT <port>` (the verb in any case).
fn parse_command(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim();
    let (verb, port) = line.split_once(char::is_whitespace)?;
    verb.eq_ignore_ascii_case("connect")
        .then(|| port.trim().parse().ok())
        .flatten()
}

/// Connects to a unix socket without waiting: a listener whose backlog is full refuses
/// (EAGAIN) rather than blocking the device.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un at least `len` bytes long; `fd` is ours.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Every connection of one device, and the listening socket.
pub struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    conns: HashMap<u64, Conn>,
    /// (host port, guest port) → stream token.
    by_key: HashMap<(u32, u32), u64>,
    next_token: u64,
    /// Connections with something for the guest.
    ready: VecDeque<u64>,
    /// RSTs for packets that belong to no connection.
    stray: VecDeque<Header>,
    /// Host-initiated connections waiting for the guest's RESPONSE, oldest first.
    deadlines: VecDeque<(Instant, u64)>,
    next_host_port: u32,
    stats: Arc<VsockStats>,
}

impl Muxer {
    pub fn new(
        cid: u64,
        uds_path: PathBuf,
        listener: Arc<UnixListener>,
        stats: Arc<VsockStats>,
    ) -> Muxer {
        Muxer {
            cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            by_key: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            ready: VecDeque::new(),
            stray: VecDeque::new(),
            deadlines: VecDeque::new(),
            next_host_port: HOST_PORT_FIRST,
            stats,
        }
    }

    /// Puts the listening socket in `epoll` under [`TOKEN_LISTENER`].
    pub fn register(&self, epoll: &Epoll) -> io::Result<()> {
        epoll.ctl(
            ControlOperation::Add,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )
    }

    /// Open connections (streams still sending their command included).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn add_stream(&mut self, epoll: &Epoll, stream: UnixStream, state: State) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = stream.set_nonblocking(true).and_then(|()| {
            epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(events, token),
            )
        }) {
            bump(&self.stats.host_errors, 1);
            log::error!("virtio-vsock: cannot watch a stream: {e}");
            return None;
        }
        self.conns.insert(token, Conn::new(stream, state));
        Some(token)
    }

    fn remove(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            if !matches!(c.state, State::Command(_)) {
                self.by_key.remove(&(c.local_port, c.peer_port));
            }
        }
    }

    fn mark_ready(&mut self, token: u64) {
        if let Some(c) = self.conns.get_mut(&token) {
            if !c.queued && c.wants_rx() {
                c.queued = true;
                self.ready.push_back(token);
            }
        }
    }

    fn reset_stray(&mut self, hdr: &Header) {
        bump(&self.stats.refused, 1);
        if self.stray.len() >= MAX_STRAY {
            return;
        }
        self.stray.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            kind: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Takes the host programs waiting on the listening socket.
    pub fn accept(&mut self, epoll: &Epoll) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNS {
                        bump(&self.stats.refused, 1);
                        log::warn!("virtio-vsock: {MAX_CONNS} connections open, one refused");
                        continue;
                    }
                    if let Some(t) = self.add_stream(epoll, stream, State::Command(Vec::new())) {
                        self.read_command(t);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: the program waits in the backlog until later.
                    bump(&self.stats.host_errors, 1);
                    log::warn!("virtio-vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads a host program's command one byte at a time (what follows the newline is the
    /// connection's data, left in the stream for later).
    fn read_command(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let State::Command(line) = &mut c.state else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match c.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_command(line),
                Ok(_) if line.len() >= MAX_COMMAND => break None,
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(port) = port else {
            log::debug!("virtio-vsock: a host program sent no valid CONNECT command");
            self.remove(token);
            return;
        };
        let Some(local) = self.free_host_port(port) else {
            self.remove(token);
            return;
        };
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.state = State::LocalInit;
        c.local_port = local;
        c.peer_port = port;
        c.owed.request = true;
        self.by_key.insert((local, port), token);
        self.deadlines
            .push_back((Instant::now() + CONNECT_TIMEOUT, token));
        bump(&self.stats.host_connects, 1);
        self.mark_ready(token);
    }

    fn free_host_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNS {
            let p = self.next_host_port;
            self.next_host_port = if p + 1 >= HOST_PORT_END {
                HOST_PORT_FIRST
            } else {
                p + 1
            };
            if !self.by_key.contains_key(&(p, peer_port)) {
                return Some(p);
            }
        }
        None
    }

    /// An event on a stream.
    pub fn stream_event(&mut self, token: u64, events: EventSet) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.readable = true;
        }
        if matches!(c.state, State::Command(_)) {
            self.read_command(token);
            return;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) && !c.flush() {
            c.kill();
        }
        self.finish_if_dead(token);
    }

    /// A dead connection with nothing owed goes now; one with an RST owed is queued.
    fn finish_if_dead(&mut self, token: u64) {
        match self.conns.get(&token) {
            Some(c) if c.dead && !c.owed.rst => self.remove(token),
            Some(_) => self.mark_ready(token),
            None => {}
        }
    }

    /// A packet from the guest's transmit queue (`payload` is `hdr.len` bytes).
    pub fn handle_tx(&mut self, epoll: &Epoll, hdr: &Header, payload: &[u8]) {
        bump(&self.stats.tx_packets, 1);
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            guest_error(
                &self.stats.guest_errors,
                format_args!(
                    "virtio-vsock: packet from CID {} to CID {} dropped (the guest is {}, the host 2)",
                    hdr.src_cid, hdr.dst_cid, self.cid
                ),
            );
            return;
        }
        if hdr.kind != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.reset_stray(hdr);
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(&token) = self.by_key.get(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(epoll, hdr),
                OP_RST => {}
                _ => self.reset_stray(hdr),
            }
            return;
        };
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (&c.state, hdr.op) {
            (_, OP_RST) => {
                c.dead = true;
                c.owed = Owed::default();
            }
            (State::LocalInit, OP_RESPONSE) => {
                c.state = State::Established;
                let ok = format!("OK {}\n", c.local_port);
                c.uncounted = ok.len();
                c.tx_buf.extend(ok.as_bytes());
                if !c.flush() {
                    c.kill();
                }
            }
            (State::Established, OP_RW) => {
                bump(&self.stats.tx_bytes, payload.len() as u64);
                if c.peer_shutdown & SHUTDOWN_SEND != 0
                    || c.tx_buf.len() + payload.len() > CONN_BUF as usize + MAX_COMMAND
                {
                    guest_error(
                        &self.stats.guest_errors,
                        format_args!(
                            "virtio-vsock: data beyond the credit or after SHUTDOWN on port {}: reset",
                            hdr.dst_port
                        ),
                    );
                    c.kill();
                } else {
                    c.tx_buf.extend(payload);
                    if !c.flush() {
                        c.kill();
                    }
                }
            }
            (State::Established, OP_CREDIT_UPDATE) => {}
            (State::Established, OP_CREDIT_REQUEST) => c.owed.credit_update = true,
            (State::Established, OP_SHUTDOWN) => {
                c.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if !c.flush() {
                    c.kill();
                }
            }
            _ => {
                guest_error(
                    &self.stats.guest_errors,
                    format_args!(
                        "virtio-vsock: op {} out of place on port {}: reset",
                        hdr.op, hdr.dst_port
                    ),
                );
                c.kill();
            }
        }
        self.finish_if_dead(token);
    }

    /// A guest REQUEST to host port P: connect to `<uds_path>_P`.
    fn guest_connect(&mut self, epoll: &Epoll, hdr: &Header) {
        if self.conns.len() >= MAX_CONNS {
            log::warn!("virtio-vsock: {MAX_CONNS} connections open, the guest's refused");
            self.reset_stray(hdr);
            return;
        }
        let mut path = self.uds_path.as_os_str().to_owned();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!(
                    "virtio-vsock: guest port {} to host port {}: {}: {e}",
                    hdr.src_port,
                    hdr.dst_port,
                    Path::new(&path).display()
                );
                self.reset_stray(hdr);
                return;
            }
        };
        let Some(token) = self.add_stream(epoll, stream, State::Established) else {
            self.reset_stray(hdr);
            return;
        };
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(c) = self.conns.get_mut(&token) {
            c.local_port = key.0;
            c.peer_port = key.1;
            c.peer_buf_alloc = hdr.buf_alloc;
            c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
            c.owed.response = true;
        }
        self.by_key.insert(key, token);
        bump(&self.stats.guest_connects, 1);
        self.mark_ready(token);
    }

    /// Whether a packet waits for a receive buffer.
    pub fn has_rx(&self) -> bool {
        !self.stray.is_empty() || !self.ready.is_empty()
    }

    /// The next packet for the guest, its payload (at most `room` bytes) in `buf`. None when
    /// nothing fits (data needs `room` > 0) or nothing waits.
    pub fn next_rx(&mut self, room: usize, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(h) = self.stray.pop_front() {
            bump(&self.stats.resets_sent, 1);
            bump(&self.stats.rx_packets, 1);
            return Some((h, 0));
        }
        for _ in 0..self.ready.len() {
            let token = self.ready.pop_front()?;
            let Some(c) = self.conns.get_mut(&token) else {
                continue;
            };
            c.queued = false;
            let pkt = c.next_packet(self.cid, room, buf);
            if c.dead && !c.owed.rst {
                self.remove(token);
            } else if c.wants_rx() {
                c.queued = true;
                self.ready.push_back(token);
            }
            if let Some((h, n)) = pkt {
                bump(&self.stats.rx_packets, 1);
                bump(&self.stats.rx_bytes, n as u64);
                if h.op == OP_RST {
                    bump(&self.stats.resets_sent, 1);
                }
                return Some((h, n));
            }
        }
        None
    }

    /// Resets host-initiated connections the guest did not accept in time; returns when
    /// the next one expires.
    pub fn expire(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&(at, token)) = self.deadlines.front() {
            if at > now {
                return Some(at);
            }
            self.deadlines.pop_front();
            if let Some(c) = self.conns.get_mut(&token) {
                if matches!(c.state, State::LocalInit) {
                    log::debug!(
                        "virtio-vsock: the guest did not accept port {} in time",
                        c.peer_port
                    );
                    c.kill();
                    self.mark_ready(token);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn muxer(tag: &str) -> (Muxer, Epoll, PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("rhyve-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        let m = Muxer::new(GUEST, path.clone(), Arc::new(l), Arc::default());
        let epoll = Epoll::new().unwrap();
        m.register(&epoll).unwrap();
        (m, epoll, path, dir)
    }

    fn pkt(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    fn next(m: &mut Muxer) -> Option<Header> {
        let mut buf = vec![0u8; 4096];
        m.next_rx(4096, &mut buf).map(|(h, _)| h)
    }

    #[test]
    fn strays_and_refusals_get_rst_bad_cids_are_dropped() {
        let (mut m, epoll, _, dir) = muxer("stray");
        // RW for no connection: RST back, ports swapped.
        m.handle_tx(&epoll, &pkt(OP_RW, 1000, 7, 0), &[]);
        let h = next(&mut m).unwrap();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (OP_RST, 7, 1000, GUEST)
        );
        // An RST for nothing gets nothing; a spoofed source CID is dropped.
        m.handle_tx(&epoll, &pkt(OP_RST, 1000, 7, 0), &[]);
        let mut spoofed = pkt(OP_REQUEST, 1000, 7, 0);
        spoofed.src_cid = 9;
        m.handle_tx(&epoll, &spoofed, &[]);
        assert!(next(&mut m).is_none());
        // Nothing listens at v.sock_7: RST.
        m.handle_tx(&epoll, &pkt(OP_REQUEST, 1000, 7, 0), &[]);
        assert_eq!(next(&mut m).unwrap().op, OP_RST);
        assert_eq!(m.connections(), 0);
        // Garbage never grows the queue past its bound.
        for p in 0..10_000 {
            m.handle_tx(&epoll, &pkt(OP_CREDIT_UPDATE, p, 7, 0), &[]);
        }
        let mut n = 0;
        while next(&mut m).is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_STRAY);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn guest_connection_data_and_credit_abuse() {
        let (mut m, epoll, path, dir) = muxer("conn");
        let target = UnixListener::bind(format!("{}_80", path.display())).unwrap();
        m.handle_tx(&epoll, &pkt(OP_REQUEST, 1000, 80, 0), &[]);
        let (mut host, _) = target.accept().unwrap();
        let h = next(&mut m).unwrap();
        assert_eq!((h.op, h.buf_alloc), (OP_RESPONSE, CONN_BUF));
        m.handle_tx(&epoll, &pkt(OP_RW, 1000, 80, 5), b"hello");
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // The host answers: one RW within the guest's 4096-byte credit.
        host.write_all(b"world").unwrap();
        m.stream_event(FIRST_STREAM_TOKEN, EventSet::IN);
        let mut buf = vec![0u8; 4096];
        let (h, n) = m.next_rx(4096, &mut buf).unwrap();
        assert_eq!((h.op, &buf[..n]), (OP_RW, &b"world"[..]));
        // The host reads nothing: 4 MiB is more than its socket plus the device's buffer
        // hold, so a guest ignoring its credit gets the connection reset (the host stream is
        // closed), and the device holds at most CONN_BUF meanwhile.
        let big = vec![0u8; MAX_PAYLOAD];
        for _ in 0..64 {
            m.handle_tx(&epoll, &pkt(OP_RW, 1000, 80, MAX_PAYLOAD as u32), &big);
        }
        let mut last = None;
        while let Some(h) = next(&mut m) {
            last = Some(h.op);
        }
        assert_eq!(last, Some(OP_RST));
        assert_eq!(m.connections(), 0);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.len() < 4 << 20);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn connect_commands() {
        assert_eq!(parse_command(b"CONNECT 52"), Some(52));
        assert_eq!(parse_command(b"connect  52 \r"), Some(52));
        assert_eq!(parse_command(b"CONNECT"), None);
        assert_eq!(parse_command(b"CONNECT -1"), None);
        assert_eq!(parse_command(b"LISTEN 52"), None);
        assert_eq!(parse_command(&[0xff, b' ', b'1']), None);
    }
}
