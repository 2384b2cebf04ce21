//! virtio-net over a Linux tap (`-s N,virtio-net,TAP[,mac=xx:xx:xx:xx:xx:xx][,mtu=N]` or
//! `-s N,virtio-net,fd=N`), virtio 1.2 section 5.1.
//!
//! One receive and one transmit queue plus the control queue. Everything runs on one device
//! thread driven by epoll: the tap's readability and the three queues' kicks (ioeventfds).
//! The 12-byte `virtio_net_hdr` goes through to the tap unchanged (IFF_VNET_HDR), so checksum
//! and TSO offloads cost nothing here; the guest's receive offloads are pushed to the tap with
//! TUNSETOFFLOAD when negotiated (and by the control queue's OFFLOADS_SET).
//!
//! Backpressure: when the guest has posted no receive buffers the device stops polling the tap
//! (it stays in the kernel's queue, which drops on overflow) until the next receive kick; at
//! most one frame waits inside rhyve. Transmit handles up to a ring's worth of chains per turn
//! (writev straight from guest memory), interrupts once per batch, and lets receive, control
//! and stop have their turn before the next batch; receive copies each frame
//! once, from the tap into the guest's buffers (its size decides how many mergeable buffers it
//! takes), and interrupts once per batch. Malformed chains (also: longer than the queue) are
//! dropped, counted and logged once; a frame larger than the posted receive buffers is dropped
//! and counted. vnet headers are checked against the offloads negotiated (transmit) and
//! currently enabled (receive); frames using others are dropped and counted.

use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::chain::{self, gather_prefix, scatter, ChainError, ChainLimits, Segment as Seg};
use super::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN};
use super::worker::{
    arm_at_most, clear_expired, rate_timer, watch_kicks, Worker as DeviceThread, WorkerCtl,
    CTL_TOKEN, TIMER_TOKEN,
};
use super::{
    check_queues, drain_queue, guest_error, overlapping, read_config_bytes, ActivateError,
    GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::lifecycle::DeviceUpdate;
use crate::lifecycle::{LifecycleError, Stat};
use crate::limited_log::LimitedWarning;
use crate::rate_limiter::{parse_rate, FollowingLimiter, LiveLimits, RateLimits};
use crate::threads::WorkerClass;

/// Device type of virtio-net.
pub const TYPE_NET: u32 = 1;

const F_CSUM: u32 = 0;
const F_GUEST_CSUM: u32 = 1;
const F_CTRL_GUEST_OFFLOADS: u32 = 2;
const F_MTU: u32 = 3;
const F_MAC: u32 = 5;
const F_GUEST_TSO4: u32 = 7;
const F_GUEST_TSO6: u32 = 8;
const F_GUEST_ECN: u32 = 9;
const F_HOST_TSO4: u32 = 11;
const F_HOST_TSO6: u32 = 12;
const F_HOST_ECN: u32 = 13;
const F_MRG_RXBUF: u32 = 15;
const F_STATUS: u32 = 16;
const F_CTRL_VQ: u32 = 17;
const F_CTRL_RX: u32 = 18;
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

const S_LINK_UP: u16 = 1;

// struct virtio_net_hdr (5.1.6): flags and gso_type.
const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

const CTRL_RX: u8 = 0;
const CTRL_MAC: u8 = 1;
const CTRL_MAC_TABLE_SET: u8 = 0;
const CTRL_GUEST_OFFLOADS: u8 = 5;
const CTRL_GUEST_OFFLOADS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;

/// Queue sizes offered: receive, transmit, control.
pub const QUEUE_SIZES: [u16; 3] = [256, 256, 64];
const RXQ: usize = 0;
const TXQ: usize = 1;
const CTRLQ: usize = 2;

/// The largest frame in either direction (a 64 KiB GSO packet plus Ethernet and VLAN
/// headers), without the vnet header.
pub const MAX_FRAME: usize = 65535 + 14 + 4;
const ETH_HLEN: usize = 14;
/// Frames handled per wakeup before looking at the other queues again.
const RX_BATCH: usize = 256;
/// Transmit chains handled per wakeup before looking at the other queues again.
const TX_BATCH: usize = 256;
const CONFIG_LEN: usize = 12;
/// bhyve's MTU bounds: at least Ethernet's minimum payload, at most what fits 64 KiB.
pub const MTU_MIN: u16 = 68;
pub const MTU_MAX: u16 = 65535 - 14;

/// Configuration keys virtio-net reads (below `pci.B.S.F.`).
pub const KEYS: &[&str] = &[
    "path", "fd", "mac", "mtu", "tx_bw", "tx_ops", "rx_bw", "rx_ops",
];

/// Where frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A tap interface by name (must exist).
    Tap(String),
    /// A tap descriptor inherited from whoever started rhyve.
    Fd(RawFd),
}

/// A virtio-net device as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: Backend,
    /// `mac=`: otherwise derived from the VM name and slot ([`default_mac`]).
    pub mac: Option<[u8; 6]>,
    /// `mtu=`: the MTU announced to the guest (VIRTIO_NET_F_MTU), 1500 by default.
    pub mtu: u16,
    /// `tx_bw=`/`tx_ops=`: what the guest may send (bytes, frames per second).
    pub tx_rate: RateLimits,
    /// `rx_bw=`/`rx_ops=`: what the guest may receive.
    pub rx_rate: RateLimits,
}

/// A bad virtio-net option; the message names it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetConfigError {
    /// no backend
    #[error("virtio-net: no backend given (-s N,virtio-net,TAP or -s N,virtio-net,fd=N)")]
    MissingBackend,
    /// both
    #[error("virtio-net: give either a tap name or fd=N, not both")]
    TwoBackends,
    /// unknown option
    #[error(
        "virtio-net: unknown option '{0}' (known: a tap name, fd, mac, mtu, tx_bw, tx_ops, rx_bw, rx_ops)"
    )]
    UnknownOption(String),
    /// bad value
    #[error("virtio-net: option '{option}={value}': {reason}")]
    BadValue {
        option: String,
        value: String,
        reason: &'static str,
    },
}

fn bad(option: &str, value: &str, reason: &'static str) -> NetConfigError {
    NetConfigError::BadValue {
        option: option.into(),
        value: value.into(),
        reason,
    }
}

/// Parses `xx:xx:xx:xx:xx:xx` (also `-` separated); refuses multicast and all-zero addresses.
pub fn parse_mac(v: &str) -> Result<[u8; 6], NetConfigError> {
    let parts: Vec<&str> = v.split([':', '-']).collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(bad("mac", v, "expected six hex bytes xx:xx:xx:xx:xx:xx"));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.is_empty() || p.len() > 2 {
            return Err(bad("mac", v, "expected six hex bytes xx:xx:xx:xx:xx:xx"));
        }
        *m = u8::from_str_radix(p, 16)
            .map_err(|_| bad("mac", v, "expected six hex bytes xx:xx:xx:xx:xx:xx"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad(
            "mac",
            v,
            "a multicast address cannot be a NIC's address",
        ));
    }
    if mac == [0; 6] {
        return Err(bad("mac", v, "the all-zero address is not usable"));
    }
    Ok(mac)
}

/// The MAC of a NIC without `mac=`: FreeBSD's OUI 58:9c:fc (as bhyve) and three bytes of a
/// hash of "slot-func-vmname", so a VM keeps its address across runs.
pub fn default_mac(vm_name: &str, slot: u8, func: u8) -> [u8; 6] {
    let s = format!("{slot}-{func}-{vm_name}");
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    [0x58, 0x9c, 0xfc, (h >> 16) as u8, (h >> 8) as u8, h as u8]
}

impl NetConfig {
    /// Builds the configuration from `pci.B.S.F.<key>` pairs (bhyve's bare first word is
    /// stored as `path`, the tap name).
    pub fn from_keys<'a>(
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, NetConfigError> {
        let (mut tap, mut fd, mut mac, mut mtu) = (None, None, None, 1500u16);
        let (mut tx_rate, mut rx_rate) = (RateLimits::default(), RateLimits::default());
        let rate = |k: &str, v: &str| {
            parse_rate(v).ok_or_else(|| bad(k, v, "expected a rate per second, e.g. 10M or 1000"))
        };
        for (k, v) in keys {
            match k {
                "tx_bw" => tx_rate.bytes_per_sec = Some(rate(k, v)?),
                "tx_ops" => tx_rate.ops_per_sec = Some(rate(k, v)?),
                "rx_bw" => rx_rate.bytes_per_sec = Some(rate(k, v)?),
                "rx_ops" => rx_rate.ops_per_sec = Some(rate(k, v)?),
                "path" => tap = Some(v.trim_start_matches("/dev/").to_string()),
                "fd" => {
                    let n: RawFd = v
                        .parse()
                        .map_err(|_| bad(k, v, "not a file descriptor number"))?;
                    if n < 0 {
                        return Err(bad(k, v, "not a file descriptor number"));
                    }
                    fd = Some(n);
                }
                "mac" => mac = Some(parse_mac(v)?),
                "mtu" => {
                    mtu = v
                        .parse()
                        .ok()
                        .filter(|m| (MTU_MIN..=MTU_MAX).contains(m))
                        .ok_or_else(|| bad(k, v, "the MTU must be a number from 68 to 65521"))?
                }
                "device" => {}
                _ => return Err(NetConfigError::UnknownOption(k.to_string())),
            }
        }
        let backend = match (tap, fd) {
            (Some(t), None) if !t.is_empty() => Backend::Tap(t),
            (None, Some(f)) => Backend::Fd(f),
            (Some(_), Some(_)) => return Err(NetConfigError::TwoBackends),
            _ => return Err(NetConfigError::MissingBackend),
        };
        Ok(NetConfig {
            backend,
            mac,
            mtu,
            tx_rate,
            rx_rate,
        })
    }
}

/// Counters (rhyvectl --get-stats).
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames and bytes (without the vnet header) given to the guest.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the tap dropped: bigger than the buffers the guest posted.
    pub rx_dropped: AtomicU64,
    /// Frames and bytes the guest sent that reached the tap.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Guest frames the tap refused (link down, queue full, bad GSO header).
    pub tx_dropped: AtomicU64,
    /// Guest mistakes: malformed chains (dropped frames), bad control commands.
    pub guest_errors: AtomicU64,
    /// Host-side failures reading the tap.
    pub host_errors: AtomicU64,
    /// Control queue commands answered.
    pub ctrl_commands: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The TUN_F_* offloads matching the guest's receive features.
fn tun_offloads(features: u64) -> u32 {
    let has = |b: u32| features & (1u64 << b) != 0;
    if !has(F_GUEST_CSUM) {
        return 0; // TSO without checksum offload is not allowed (virtio 5.1.3.1)
    }
    let mut f = TUN_F_CSUM;
    if has(F_GUEST_TSO4) {
        f |= TUN_F_TSO4;
    }
    if has(F_GUEST_TSO6) {
        f |= TUN_F_TSO6;
    }
    if has(F_GUEST_ECN) && f & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
        f |= TUN_F_TSO_ECN;
    }
    f
}

/// Walks a chain: its device-readable and device-writable buffers, or what is wrong with it.
/// A chain may hold at most `max_descs` descriptors (the queue size, virtio 1.2 2.7.5.3.1),
/// zero-length ones included: an indirect table of 65535 empty descriptors would otherwise
/// cost a walk of that length per chain.
fn walk(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    limit: usize,
    max_descs: usize,
) -> Result<(Vec<Seg>, Vec<Seg>), ChainError> {
    let limits = ChainLimits {
        max_descriptors: max_descs,
        max_total: limit as u64,
        max_segment: u32::MAX,
    };
    let c = chain::parse(chain, mem, limits).checked()?;
    Ok((c.readable, c.writable))
}

/// Whether a receive header from the tap uses only the TUN_F_* offloads in `enabled`.
fn rx_hdr_ok(flags: u8, gso_type: u8, enabled: u32) -> bool {
    let on = |f: u32| enabled & f != 0;
    if flags & HDR_F_NEEDS_CSUM != 0 && !on(TUN_F_CSUM) {
        return false;
    }
    if gso_type & GSO_ECN != 0 && !on(TUN_F_TSO_ECN) {
        return false;
    }
    match gso_type & !GSO_ECN {
        GSO_NONE => gso_type & GSO_ECN == 0,
        GSO_TCPV4 => on(TUN_F_TSO4),
        GSO_TCPV6 => on(TUN_F_TSO6),
        _ => false,
    }
}

/// Whether a transmit header asks only for offloads the driver negotiated (5.1.6.2.1): the
/// host kernel would otherwise get GSO types and checksum requests nobody agreed on.
fn tx_hdr_check(flags: u8, gso_type: u8, features: u64) -> Result<(), &'static str> {
    let has = |b: u32| features & (1u64 << b) != 0;
    if flags & HDR_F_NEEDS_CSUM != 0 && !has(F_CSUM) {
        return Err("transmit header asks for a checksum without VIRTIO_NET_F_CSUM");
    }
    match gso_type & !GSO_ECN {
        GSO_NONE if gso_type & GSO_ECN == 0 => {}
        GSO_TCPV4 if has(F_HOST_TSO4) => {}
        GSO_TCPV6 if has(F_HOST_TSO6) => {}
        _ => return Err("transmit header with a GSO type that was not negotiated"),
    }
    if gso_type & GSO_ECN != 0 && !has(F_HOST_ECN) {
        return Err("transmit header with ECN without VIRTIO_NET_F_HOST_ECN");
    }
    Ok(())
}

fn seg_len(segs: &[Seg]) -> usize {
    segs.iter().map(|s| s.len).sum()
}

/// Copies `segs` laid end to end into `out` (which must be at least as long); the length.
fn gather(mem: &GuestMemoryMmap, segs: &[Seg], out: &mut [u8]) -> Option<usize> {
    let mut done = 0;
    for &Seg { addr: a, len: n } in segs {
        mem.read_slice(out.get_mut(done..done + n)?, a).ok()?;
        done += n;
    }
    Some(done)
}

/// Host iovecs for `segs` laid end to end, without their first `skip` bytes; None if a
/// range is not plain guest RAM or the chain needs more than IOV_MAX pieces.
fn guest_iovecs(mem: &GuestMemoryMmap, segs: &[Seg], mut skip: usize) -> Option<Vec<libc::iovec>> {
    let mut iov = Vec::with_capacity(segs.len());
    for &Seg { addr: a, len: n } in segs {
        if skip >= n {
            skip -= n;
            continue;
        }
        for slice in mem.get_slices(a.checked_add(skip as u64)?, n - skip) {
            let slice = slice.ok()?;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        skip = 0;
    }
    // IOV_MAX is 1024, one of which the checked header may take.
    (iov.len() < 1024).then_some(iov)
}

/// Sends one transmit chain to the tap; malformed chains and refused frames are counted.
fn transmit(
    shared: &Shared,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    (tx_size, features): (usize, u64),
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u64 {
    let st = &shared.stats;
    let segs = match walk(chain, mem, VNET_HDR_LEN + MAX_FRAME, tx_size) {
        Ok((r, w)) if w.is_empty() => r,
        Ok(_) => {
            guest_error(
                &st.guest_errors,
                format_args!("virtio-net: transmit chain with device-writable buffers"),
            );
            return 0;
        }
        Err(why) => {
            guest_error(
                &st.guest_errors,
                format_args!("virtio-net: transmit: {why}"),
            );
            return 0;
        }
    };
    let n = seg_len(&segs);
    if n < VNET_HDR_LEN + ETH_HLEN {
        guest_error(
            &st.guest_errors,
            format_args!("virtio-net: transmit chain too short for header and frame"),
        );
        return 0;
    }
    // The header is read once, checked, and the checked copy is what the tap gets: the
    // guest (another vCPU) may rewrite its buffer between the check and the kernel's read.
    let mut hdr = [0u8; VNET_HDR_LEN];
    let checked = gather_prefix(mem, &segs, &mut hdr)
        .ok_or("transmit header unreadable")
        .and_then(|()| tx_hdr_check(hdr[0], hdr[1], features));
    if let Err(why) = checked {
        guest_error(&st.guest_errors, format_args!("virtio-net: {why}"));
        return 0;
    }
    let with_hdr = shared.tap.vnet_hdr();
    // Straight from guest memory after the header; through the copy buffer only for very
    // long chains.
    let sent = match guest_iovecs(mem, &segs, VNET_HDR_LEN) {
        Some(mut iov) => {
            if with_hdr {
                iov.insert(
                    0,
                    libc::iovec {
                        iov_base: hdr.as_mut_ptr().cast(),
                        iov_len: hdr.len(),
                    },
                );
            }
            shared.tap.writev(&iov)
        }
        None => match gather(mem, &segs, buf) {
            Some(n) => {
                buf[..VNET_HDR_LEN].copy_from_slice(&hdr);
                let from = if with_hdr { 0 } else { VNET_HDR_LEN };
                shared.tap.write(&buf[from..n])
            }
            None => Err(io::Error::other("guest buffer unreadable")),
        },
    };
    match sent {
        Ok(_) => {
            bump(&st.tx_frames, 1);
            bump(&st.tx_bytes, (n - VNET_HDR_LEN) as u64);
            (n - VNET_HDR_LEN) as u64
        }
        Err(e) => {
            // Link down (EIO), full queue, or a GSO header the kernel refused.
            guest_error(
                &st.tx_dropped,
                format_args!("virtio-net: tap {} refused a frame: {e}", shared.tap.name()),
            );
            0
        }
    }
}

/// State shared by the device and its thread.
struct Shared {
    tap: Tap,
    stats: NetStats,
    /// The tap refused the offloads the guest asked for (every activation or command).
    offload_failed: LimitedWarning,
    /// Limits on what the guest sends and receives (`PATCH /network-interfaces` may change
    /// them while the worker runs).
    tx_rate: Arc<LiveLimits>,
    rx_rate: Arc<LiveLimits>,
}

/// What happened to the frame waiting in the receive buffer.
enum Rx {
    /// In the guest's buffers.
    Delivered,
    /// Thrown away (too big, or the chains were unusable).
    Dropped,
    /// Not enough buffers posted (the avail index seen): wait for a receive kick.
    NoBuffers(Option<Wrapping<u16>>),
}

/// The device thread's state.
struct Worker {
    shared: Arc<Shared>,
    mem: GuestMemoryMmap,
    irq: Arc<dyn VirtioInterrupt>,
    features: u64,
    rx: Queue,
    tx: Queue,
    ctrl: Option<Queue>,
    epoll: Epoll,
    /// Whether the tap is in the epoll set (false while the guest has no receive buffers).
    tap_polled: bool,
    /// The receive frame: vnet header at 0..12, then the frame.
    rx_buf: Vec<u8>,
    /// Length (header included) of the frame waiting in `rx_buf`, if any.
    pending: Option<usize>,
    tx_buf: Vec<u8>,
    /// The TUN_F_* receive offloads currently on (negotiated, then OFFLOADS_SET): frames the
    /// tap queued under older settings (before a reset or OFFLOADS_SET) must not reach the
    /// guest with header fields it has not enabled.
    rx_offloads: u32,
    /// Transmit chains per call of `process_tx` ([`TX_BATCH`]; smaller in tests).
    tx_batch: usize,
    tx_limit: FollowingLimiter,
    rx_limit: FollowingLimiter,
    /// Fires when a rate limit lets traffic go again.
    timer: TimerFd,
    /// Receiving waits for `rx_limit` (the tap is out of the epoll set meanwhile).
    rx_limited: bool,
}

const TOKEN_TAP: u64 = 3;

impl Worker {
    fn new(
        shared: Arc<Shared>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn VirtioInterrupt>,
        features: u64,
        [rx, tx]: [Queue; 2],
        ctrl: Option<Queue>,
    ) -> io::Result<Worker> {
        let epoll = Epoll::new()?;
        let timer = rate_timer(&epoll)?;
        Ok(Worker {
            tx_limit: FollowingLimiter::new(shared.tx_rate.clone()),
            rx_limit: FollowingLimiter::new(shared.rx_rate.clone()),
            timer,
            rx_limited: false,
            shared,
            mem,
            irq,
            features,
            rx,
            tx,
            ctrl,
            epoll,
            tap_polled: false,
            rx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME],
            pending: None,
            tx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME],
            tx_batch: TX_BATCH,
            rx_offloads: tun_offloads(features),
        })
    }

    fn has(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    fn poll_tap(&mut self, on: bool) {
        if on == self.tap_polled {
            return;
        }
        let fd = self.shared.tap.as_raw_fd();
        let r = if on {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_TAP),
            )
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        match r {
            Ok(()) => self.tap_polled = on,
            Err(e) => log::error!("virtio-net: epoll on the tap: {e}"),
        }
    }

    /// Moves frames from the tap into the receive queue until the tap is empty, the guest
    /// runs out of buffers, or a batch is done; one interrupt for all of them. True if the
    /// batch ran out: the caller comes back after looking at the other events, since a frame
    /// may be held back with kicks off (the guest moving its avail index on every look) and
    /// an empty tap would never wake us for it.
    fn process_rx(&mut self) -> bool {
        let shared = self.shared.clone();
        let st = &shared.stats;
        let mut used = false;
        let _ = self.rx.disable_notification(&self.mem);
        let mut more = true;
        for _ in 0..RX_BATCH {
            if let Some(w) = self.rx_limit.check() {
                // The tap stays unread (out of the epoll set) until the timer.
                // Transmit and receive share the timer: the earlier deadline wins.
                arm_at_most(&mut self.timer, w);
                self.rx_limited = true;
                self.poll_tap(false);
                more = false;
                break;
            }
            let len = match self.pending {
                Some(l) => l,
                None => {
                    let tap = &shared.tap;
                    let off = if tap.vnet_hdr() { 0 } else { VNET_HDR_LEN };
                    match tap.read(&mut self.rx_buf[off..]) {
                        Ok(n) if n + off <= VNET_HDR_LEN => continue, // nothing to deliver
                        Ok(n) if n + off > self.rx_buf.len() => {
                            // tun reports the untruncated length of a frame longer than the
                            // buffer (a peer MTU above ours): what we have is not the frame.
                            bump(&st.rx_dropped, 1);
                            continue;
                        }
                        Ok(n) => {
                            if off != 0 {
                                self.rx_buf[..VNET_HDR_LEN].fill(0);
                            }
                            self.pending = Some(n + off);
                            n + off
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            more = false;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // E.g. the interface was deleted: stop polling rather than spin.
                            guest_error(
                                &st.host_errors,
                                format_args!("virtio-net: reading tap {}: {e}", tap.name()),
                            );
                            self.poll_tap(false);
                            more = false;
                            break;
                        }
                    }
                }
            };
            match self.deliver(len) {
                Rx::Delivered => {
                    self.pending = None;
                    used = true;
                    bump(&st.rx_frames, 1);
                    bump(&st.rx_bytes, (len - VNET_HDR_LEN) as u64);
                    self.rx_limit.charge((len - VNET_HDR_LEN) as u64);
                }
                Rx::Dropped => {
                    self.pending = None;
                    used = true; // chains may have been returned
                }
                Rx::NoBuffers(seen) => {
                    // Ask for a kick, then look again: buffers may have arrived in between.
                    self.ask_for_rx_kick(seen);
                    // Only a readable index that moved is progress: a corrupt ring (seen is
                    // None) must not make the loop spin (it would come back at once anyway,
                    // the tap being level-triggered).
                    let now = self.rx.avail_idx(&self.mem, Ordering::Acquire).ok();
                    if let (Some(a), Some(b)) = (seen, now) {
                        if a != b {
                            let _ = self.rx.disable_notification(&self.mem);
                            continue;
                        }
                    }
                    self.poll_tap(false);
                    more = false;
                    break;
                }
            }
        }
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.irq.queue_used(RXQ as u16);
        }
        more
    }

    /// Re-enables receive kicks. With EVENT_IDX the kick must come on the driver's *next*
    /// buffer: avail_event is set to the avail index `seen`, not to the device's position,
    /// which lags behind it when posted mergeable buffers were too few for the frame (the
    /// driver only kicks when its index crosses avail_event: a stale one means no kick ever).
    fn ask_for_rx_kick(&mut self, seen: Option<Wrapping<u16>>) {
        let _ = self.rx.enable_notification(&self.mem);
        if let (true, Some(idx)) = (self.rx.event_idx_enabled(), seen) {
            // struct virtq_used: flags, idx, ring[size], then le16 avail_event (2.7.10).
            let at = self.rx.used_ring() + 4 + 8 * u64::from(self.rx.size());
            let _ = self.mem.write_obj(idx.0.to_le(), GuestAddress(at));
        }
        // The avail index read that follows must not pass the store above.
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Puts the frame in `rx_buf[..len]` into the guest's receive buffers.
    fn deliver(&mut self, len: usize) -> Rx {
        let mrg = self.has(F_MRG_RXBUF);
        let st = &self.shared.stats;
        let mem = &self.mem;
        let mut chains: Vec<(u16, Vec<Seg>)> = Vec::new();
        let mut room = 0usize;
        let mut bad = None;
        if !rx_hdr_ok(self.rx_buf[0], self.rx_buf[1], self.rx_offloads) {
            bump(&st.rx_dropped, 1);
            log::debug!("virtio-net: dropped a frame with offloads the guest has not enabled");
            return Rx::Dropped;
        }
        let seen = self.rx.avail_idx(mem, Ordering::Acquire).ok();
        let rx_size = usize::from(self.rx.size());
        {
            let mut iter = match self.rx.iter(mem) {
                Ok(i) => i,
                Err(e) => {
                    guest_error(
                        &st.guest_errors,
                        format_args!("virtio-net: unusable receive ring: {e}"),
                    );
                    return Rx::NoBuffers(None);
                }
            };
            while room < len {
                let Some(chain) = iter.next() else { break };
                let head = chain.head_index();
                match walk(chain, mem, usize::MAX, rx_size) {
                    Ok((r, w)) if r.is_empty() => {
                        room += seg_len(&w);
                        chains.push((head, w));
                    }
                    Ok(_) => {
                        bad = Some((head, "receive chain with device-readable buffers".into()));
                        break;
                    }
                    Err(why) => {
                        bad = Some((head, why.to_string()));
                        break;
                    }
                }
                if !mrg {
                    break; // the whole frame must fit one chain
                }
            }
        }
        if let Some((head, why)) = bad {
            // Give back what we took with nothing in it; the frame is lost.
            guest_error(&st.guest_errors, format_args!("virtio-net: {why}"));
            for &(h, _) in &chains {
                let _ = self.rx.add_used(mem, h, 0);
            }
            let _ = self.rx.add_used(mem, head, 0);
            return Rx::Dropped;
        }
        if room < len {
            let whole_ring = chains.len() >= usize::from(self.rx.size());
            if chains.is_empty() || (mrg && !whole_ring) {
                // Wait for more buffers: put the chains back.
                for _ in 0..chains.len() {
                    self.rx.go_to_previous_position();
                }
                return Rx::NoBuffers(seen);
            }
            // Can never fit: drop the frame, keep the buffers for the next one.
            for _ in 0..chains.len() {
                self.rx.go_to_previous_position();
            }
            bump(&st.rx_dropped, 1);
            log::debug!(
                "virtio-net: dropped a {}-byte frame: the guest's buffers hold {room}",
                len - VNET_HDR_LEN
            );
            return Rx::Dropped;
        }
        // Header fixups: num_buffers, and no checksum hints the guest did not ask for.
        let n = chains.len() as u16;
        self.rx_buf[10..12].copy_from_slice(&n.to_le_bytes());
        if !self.has(F_GUEST_CSUM) {
            self.rx_buf[0] = 0;
        }
        let mut done = 0;
        for (head, segs) in &chains {
            let k = seg_len(segs).min(len - done);
            if !scatter(mem, segs, &self.rx_buf[done..done + k]) {
                guest_error(
                    &st.guest_errors,
                    format_args!("virtio-net: receive buffer not writable"),
                );
            }
            done += k;
            if let Err(e) = self.rx.add_used(mem, *head, k as u32) {
                guest_error(
                    &st.guest_errors,
                    format_args!("virtio-net: cannot return receive buffer {head}: {e}"),
                );
            }
        }
        Rx::Delivered
    }

    /// Sends available transmit chains to the tap, at most [`TX_BATCH`] per call, one
    /// interrupt for the batch. True if chains may remain: the caller comes back after the
    /// other queues and the tap had their turn (a guest flooding transmit must not starve
    /// receive, control or stop); kicks stay off meanwhile.
    fn process_tx(&mut self) -> bool {
        let shared = &*self.shared;
        let st = &shared.stats;
        let mem = &self.mem;
        let tx_size = usize::from(self.tx.size());
        let features = self.features;
        let mut used = false;
        let mut budget = self.tx_batch;
        let more = loop {
            // Without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY: no kicks while we are busy.
            let _ = self.tx.disable_notification(mem);
            let start = self.tx.next_avail();
            let chains: Vec<_> = match self.tx.iter(mem) {
                Ok(iter) => iter.take(budget).collect(),
                Err(e) => {
                    guest_error(
                        &st.guest_errors,
                        format_args!("virtio-net: unusable transmit ring: {e}"),
                    );
                    break false;
                }
            };
            budget -= chains.len();
            let mut limited = None;
            for (k, chain) in chains.into_iter().enumerate() {
                if let Some(w) = self.tx_limit.check() {
                    // This frame and the ones after it wait in the ring for the timer.
                    self.tx.set_next_avail(start.wrapping_add(k as u16));
                    limited = Some(w);
                    break;
                }
                let head = chain.head_index();
                let sent = transmit(shared, mem, &mut self.tx_buf, (tx_size, features), chain);
                self.tx_limit.charge(sent);
                match self.tx.add_used(mem, head, 0) {
                    Ok(()) => used = true,
                    Err(e) => guest_error(
                        &st.guest_errors,
                        format_args!("virtio-net: cannot return transmit chain {head}: {e}"),
                    ),
                }
            }
            if let Some(w) = limited {
                // Transmit and receive share the timer: the earlier deadline wins.
                arm_at_most(&mut self.timer, w);
                break false;
            }
            if budget == 0 {
                break true;
            }
            match self.tx.enable_notification(mem) {
                Ok(true) => continue, // more arrived while notifications were off
                Ok(false) => break false,
                Err(e) => {
                    guest_error(
                        &st.guest_errors,
                        format_args!("virtio-net: cannot re-enable transmit kicks: {e}"),
                    );
                    break false;
                }
            }
        };
        if used && self.tx.needs_notification(mem).unwrap_or(true) {
            self.irq.queue_used(TXQ as u16);
        }
        more
    }

    /// Answers control commands (5.1.6.5): RX mode and MAC table are accepted (the tap
    /// delivers everything; the guest filters), OFFLOADS_SET goes to the tap.
    /// Handles control commands; true when the budget ran out with commands left.
    fn process_ctrl(&mut self) -> bool {
        let Some(ctrl) = self.ctrl.as_mut() else {
            return false;
        };
        let shared = &self.shared;
        let st = &shared.stats;
        let mem = &self.mem;
        let features = &mut self.features;
        let rx_offloads = &mut self.rx_offloads;
        let ctrl_size = usize::from(ctrl.size());
        let done = drain_queue(ctrl, mem, &st.guest_errors, |chain| {
            let (r, w) = match walk(chain, mem, 1 << 16, ctrl_size) {
                Ok(rw) => rw,
                Err(why) => {
                    guest_error(&st.guest_errors, format_args!("virtio-net: control: {why}"));
                    return 0;
                }
            };
            let Some(&Seg {
                addr: ack_seg,
                len: ack_len,
            }) = w.last()
            else {
                guest_error(
                    &st.guest_errors,
                    format_args!("virtio-net: control command without an ack byte"),
                );
                return 0;
            };
            let mut cmd = vec![0u8; seg_len(&r)];
            let ack = if gather(mem, &r, &mut cmd).is_none() || cmd.len() < 2 {
                CTRL_ERR
            } else {
                let has = |b: u32| *features & (1u64 << b) != 0;
                match (cmd[0], cmd[1]) {
                    (CTRL_RX, 0..=5) if has(F_CTRL_RX) && cmd.len() >= 3 => CTRL_OK,
                    (CTRL_MAC, CTRL_MAC_TABLE_SET) if has(F_CTRL_RX) => CTRL_OK,
                    (CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET)
                        if has(F_CTRL_GUEST_OFFLOADS) && cmd.len() >= 10 =>
                    {
                        let mut v = [0u8; 8];
                        v.copy_from_slice(&cmd[2..10]);
                        let want = u64::from_le_bytes(v);
                        let guest_bits = (1u64 << F_GUEST_CSUM)
                            | (1 << F_GUEST_TSO4)
                            | (1 << F_GUEST_TSO6)
                            | (1 << F_GUEST_ECN);
                        // Only offloads that were negotiated can be turned back on.
                        if want & !(*features & guest_bits) != 0 {
                            CTRL_ERR
                        } else {
                            match shared.tap.set_offload(tun_offloads(want)) {
                                Ok(()) => {
                                    *rx_offloads = tun_offloads(want);
                                    CTRL_OK
                                }
                                Err(e) => {
                                    shared
                                        .offload_failed
                                        .warn(format_args!("virtio-net: TUNSETOFFLOAD: {e}"));
                                    CTRL_ERR
                                }
                            }
                        }
                    }
                    (class, command) => {
                        log::debug!("virtio-net: control class {class} command {command} refused");
                        CTRL_ERR
                    }
                }
            };
            bump(&st.ctrl_commands, 1);
            let at = ack_seg.checked_add(ack_len as u64 - 1);
            match at.map(|a| mem.write_obj(ack, a)) {
                Some(Ok(())) => 1,
                _ => 0,
            }
        });
        if done.notify {
            self.irq.queue_used(CTRLQ as u16);
        }
        done.more
    }

    fn run(mut self, kicks: Vec<EventFd>, ctl: &WorkerCtl) {
        // Work left after a batch: done after the next (non-blocking) look at the events.
        let mut ctrl_due = self.process_ctrl();
        let mut tx_due = self.process_tx();
        let mut rx_due = self.process_rx();
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let timeout = if tx_due || rx_due || ctrl_due { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-net: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    CTL_TOKEN => {
                        if !ctl.on_event() {
                            return;
                        }
                    }
                    TOKEN_TAP => rx_due = true,
                    TIMER_TOKEN => {
                        clear_expired(&mut self.timer);
                        if self.rx_limited {
                            self.rx_limited = false;
                            self.poll_tap(true);
                            rx_due = true;
                        }
                        tx_due = true;
                    }
                    q => {
                        if let Some(k) = kicks.get(q as usize) {
                            let _ = k.read();
                        }
                        match q as usize {
                            RXQ => {
                                self.poll_tap(true);
                                rx_due = true;
                            }
                            TXQ => tx_due = true,
                            _ => ctrl_due = true,
                        }
                    }
                }
            }
            if ctrl_due {
                ctrl_due = self.process_ctrl();
            }
            if tx_due {
                tx_due = self.process_tx();
            }
            if rx_due {
                rx_due = self.process_rx();
            }
        }
    }
}

/// The virtio-net device.
pub struct Net {
    shared: Arc<Shared>,
    config: [u8; CONFIG_LEN],
    features: u64,
    acked: u64,
    thread: Option<DeviceThread>,
}

impl Net {
    /// Opens the tap (or adopts the descriptor). `default_mac` is used without `mac=`.
    pub fn new(cfg: &NetConfig, default_mac: [u8; 6]) -> Result<Net, TapError> {
        let tap = match &cfg.backend {
            Backend::Tap(name) => Tap::open(name)?,
            Backend::Fd(fd) => Tap::from_fd(*fd)?,
        };
        let rates = (cfg.tx_rate, cfg.rx_rate);
        Ok(Self::with_tap_limited(
            tap,
            cfg.mac.unwrap_or(default_mac),
            cfg.mtu,
            rates,
        ))
    }

    /// A device on an open tap, without rate limits.
    pub fn with_tap(tap: Tap, mac: [u8; 6], mtu: u16) -> Net {
        Self::with_tap_limited(tap, mac, mtu, Default::default())
    }

    /// A device on an open tap with (transmit, receive) limits.
    fn with_tap_limited(
        tap: Tap,
        mac: [u8; 6],
        mtu: u16,
        (tx_rate, rx_rate): (RateLimits, RateLimits),
    ) -> Net {
        let bit = |b: u32| 1u64 << b;
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(F_MAC)
            | bit(F_MTU)
            | bit(F_STATUS)
            | bit(F_MRG_RXBUF)
            | bit(F_CTRL_VQ)
            | bit(F_CTRL_RX);
        if tap.vnet_hdr() {
            features |= bit(F_CSUM)
                | bit(F_GUEST_CSUM)
                | bit(F_CTRL_GUEST_OFFLOADS)
                | bit(F_GUEST_TSO4)
                | bit(F_GUEST_TSO6)
                | bit(F_GUEST_ECN)
                | bit(F_HOST_TSO4)
                | bit(F_HOST_TSO6)
                | bit(F_HOST_ECN);
        }
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&mac);
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c[10..12].copy_from_slice(&mtu.to_le_bytes());
        Net {
            shared: Arc::new(Shared {
                tap,
                stats: NetStats::default(),
                offload_failed: LimitedWarning::new(),
                tx_rate: LiveLimits::new(tx_rate),
                rx_rate: LiveLimits::new(rx_rate),
            }),
            config: c,
            features,
            acked: 0,
            thread: None,
        }
    }

    /// The counters.
    pub fn stats(&self) -> &NetStats {
        &self.shared.stats
    }

    /// The guest's MAC address (config space).
    pub fn mac(&self) -> [u8; 6] {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.config[..6]);
        m
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.shared.tap.name()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Whether the device thread runs.
    pub fn is_active(&self) -> bool {
        self.thread.is_some()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
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
        // VERSION_1: the MAC is read-only for the driver (5.1.4.2).
        log::debug!(
            "virtio-net: ignored write of {} byte(s) to config at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<Queue>,
        kicks: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if self.thread.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let with_ctrl = self.acked & (1u64 << F_CTRL_VQ) != 0;
        if queues.len() != QUEUE_SIZES.len() || kicks.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                queues: queues.len(),
                kicks: kicks.len(),
            });
        }
        // The control queue is optional (only with CTRL_VQ; a driver may leave it off).
        let ctrl = queues.pop().filter(|q| with_ctrl && q.is_valid(&mem));
        check_queues(&mem, &queues, &kicks[..2], 2)?;
        if let Some(i) = overlapping(queues.iter().chain(&ctrl)) {
            return Err(ActivateError::OverlappingRings(i));
        }
        let (Some(tx), Some(rx)) = (queues.pop(), queues.pop()) else {
            return Err(ActivateError::InvalidQueue(0));
        };
        if let Err(e) = self.shared.tap.set_offload(tun_offloads(self.acked)) {
            self.shared.offload_failed.warn(format_args!(
                "virtio-net: tap {}: TUNSETOFFLOAD: {e}",
                self.shared.tap.name()
            ));
        }
        let mut worker = Worker::new(
            self.shared.clone(),
            mem,
            interrupt.clone(),
            self.acked,
            [rx, tx],
            ctrl,
        )
        .map_err(ActivateError::Worker)?;
        watch_kicks(&worker.epoll, &kicks).map_err(ActivateError::Worker)?;
        worker.poll_tap(true);
        let thread = DeviceThread::spawn(WorkerClass::Net, interrupt, move |ctl| {
            match ctl.watch(&worker.epoll) {
                Ok(()) => worker.run(kicks, ctl),
                Err(e) => log::error!("virtio-net: epoll: {e}"),
            }
        })
        .map_err(ActivateError::Worker)?;
        self.thread = Some(thread);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(t) = self.thread.take() {
            t.stop();
        }
        if let Err(e) = self.shared.tap.set_offload(0) {
            self.shared
                .offload_failed
                .warn(format_args!("virtio-net: TUNSETOFFLOAD 0 on reset: {e}"));
        }
        self.acked = 0;
    }

    fn pause(&mut self) -> Result<(), LifecycleError> {
        self.thread.as_ref().map_or(Ok(()), DeviceThread::pause)
    }

    fn resume(&mut self) {
        if let Some(t) = &self.thread {
            t.resume();
        }
    }

    /// New rate limits, taken by the worker at its next check of each direction.
    fn update(&mut self, update: &DeviceUpdate) -> Result<bool, String> {
        let DeviceUpdate::NetRate { rx, tx } = update else {
            return Err("not a block device".into());
        };
        if let Some(rx) = rx {
            self.shared.rx_rate.set(*rx);
        }
        if let Some(tx) = tx {
            self.shared.tx_rate.set(*tx);
        }
        log::info!("virtio-net: rate limits now rx {rx:?} tx {tx:?}");
        Ok(false)
    }

    fn counters(&self) -> Vec<Stat> {
        let s = &self.shared.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_frames", l(&s.rx_frames)),
            ("rx_bytes", l(&s.rx_bytes)),
            ("rx_dropped", l(&s.rx_dropped)),
            ("tx_frames", l(&s.tx_frames)),
            ("tx_bytes", l(&s.tx_bytes)),
            ("tx_dropped", l(&s.tx_dropped)),
            ("guest_errors", l(&s.guest_errors)),
            ("host_errors", l(&s.host_errors)),
            ("ctrl_commands", l(&s.ctrl_commands)),
        ]
    }
}

/// Synchronous transmit and control-queue processing for fuzz/: the worker's code on a tap
/// stand-in (a socket pair), no thread.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use super::*;

    /// Sends what the transmit queue (`queues[1]`) and the control queue have available
    /// through the worker's code, with `features` negotiated; then receives one frame the
    /// "host" sends into the receive queue (`queues[0]`).
    pub fn run(
        mem: &GuestMemoryMmap,
        queues: [Queue; 2],
        ctrl: Option<Queue>,
        features: u64,
        host_frame: &[u8],
    ) {
        let (tap, peer) = Tap::socket_pair(true);
        let shared = Arc::new(Shared {
            tap,
            stats: NetStats::default(),
            offload_failed: LimitedWarning::new(),
            tx_rate: LiveLimits::new(RateLimits::default()),
            rx_rate: LiveLimits::new(RateLimits::default()),
        });
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(NoInterrupt);
        let Ok(mut w) = Worker::new(shared, mem.clone(), irq, features, queues, ctrl) else {
            return;
        };
        w.process_ctrl();
        w.process_tx();
        let _ = std::io::Write::write(&mut &peer, host_frame);
        w.poll_tap(true);
        w.process_rx();
    }

    struct NoInterrupt;

    impl VirtioInterrupt for NoInterrupt {
        fn queue_used(&self, _: u16) {}
        fn config_changed(&self) {}
        fn device_failed(&self) {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// One split ring of the test driver, at `[base, base + 0x2c04)` of the shared memory.
    struct Ring {
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Ring {
        fn new(i: u64, size: u16) -> Ring {
            let base = 0x1000 + i * 0x3000;
            Ring {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x1400,
                size,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        fn queue(&self, mem: &GuestMemoryMmap) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.try_set_desc_table_address(GuestAddress(self.desc))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used))
                .unwrap();
            q.set_ready(true);
            assert!(q.is_valid(mem));
            q
        }

        fn write_desc(&self, d: &Driver, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let b = GuestAddress(self.desc + 16 * u64::from(idx % self.size));
            d.mem.write_obj(addr, b).unwrap();
            d.mem.write_obj(len, b.unchecked_add(8)).unwrap();
            d.mem.write_obj(flags, b.unchecked_add(12)).unwrap();
            d.mem.write_obj(next, b.unchecked_add(14)).unwrap();
        }

        /// A chain of `(addr, len, device-writable)`, made available.
        fn push(&mut self, d: &Driver, descs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(a, l, w)) in descs.iter().enumerate() {
                let idx = (head + i as u16) % self.size;
                let last = i + 1 == descs.len();
                let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                self.write_desc(d, idx, a, l, flags, (idx + 1) % self.size);
            }
            self.next_desc = (head + descs.len() as u16) % self.size;
            self.publish(d, head);
            head
        }

        fn publish(&mut self, d: &Driver, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            d.mem
                .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            d.mem
                .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        fn used_idx(&self, d: &Driver) -> u16 {
            d.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        fn used(&self, d: &Driver, i: u16) -> (u32, u32) {
            let a = self.used + 4 + 8 * u64::from(i % self.size);
            (
                d.mem.read_obj(GuestAddress(a)).unwrap(),
                d.mem.read_obj(GuestAddress(a + 4)).unwrap(),
            )
        }
    }

    struct H {
        drv: Driver,
        rx: Ring,
        tx: Ring,
        ctrl: Ring,
        w: Worker,
        peer: File,
        irq: Arc<CountingInterrupt>,
    }

    fn bits(b: &[u32]) -> u64 {
        b.iter()
            .fold(1u64 << VIRTIO_F_VERSION_1, |a, &x| a | 1 << x)
    }

    fn harness(features: u64, vnet_hdr: bool) -> H {
        harness_rated(
            features,
            vnet_hdr,
            RateLimits::default(),
            RateLimits::default(),
        )
    }

    fn harness_rated(features: u64, vnet_hdr: bool, tx_rate: RateLimits, rx_rate: RateLimits) -> H {
        let drv = Driver::new(256);
        let (rx, tx, ctrl) = (Ring::new(0, 256), Ring::new(1, 256), Ring::new(2, 64));
        let (tap, peer) = Tap::socket_pair(vnet_hdr);
        let shared = Arc::new(Shared {
            tap,
            stats: NetStats::default(),
            offload_failed: LimitedWarning::new(),
            tx_rate: LiveLimits::new(tx_rate),
            rx_rate: LiveLimits::new(rx_rate),
        });
        let irq = Arc::new(CountingInterrupt::default());
        let w = Worker::new(
            shared,
            drv.mem.clone(),
            irq.clone(),
            features,
            [rx.queue(&drv.mem), tx.queue(&drv.mem)],
            Some(ctrl.queue(&drv.mem)),
        )
        .unwrap();
        let mut h = H {
            drv,
            rx,
            tx,
            ctrl,
            w,
            peer,
            irq,
        };
        h.w.poll_tap(true);
        h
    }

    fn stats(h: &H) -> &NetStats {
        &h.w.shared.stats
    }

    fn n(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// A frame of `len` bytes (pattern seeded by `seed`).
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect()
    }

    fn with_hdr(f: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; VNET_HDR_LEN];
        v.extend_from_slice(f);
        v
    }

    /// What the host side got, one datagram, if any.
    fn host_recv(h: &mut H) -> Option<Vec<u8>> {
        let mut b = vec![0u8; 70000];
        match h.peer.read(&mut b) {
            Ok(n) => {
                b.truncate(n);
                Some(b)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }

    fn host_send(h: &mut H, data: &[u8]) {
        assert_eq!(h.peer.write(data).unwrap(), data.len());
    }

    #[test]
    fn options_macs_and_errors() {
        let kv = |s: &'static str| {
            s.split(',')
                .map(|o| o.split_once('=').unwrap_or(("path", o)))
                .collect::<Vec<_>>()
        };
        let c = NetConfig::from_keys(kv("tap0")).unwrap();
        assert_eq!(c.backend, Backend::Tap("tap0".into()));
        assert_eq!((c.mac, c.mtu), (None, 1500));
        let c = NetConfig::from_keys(kv("/dev/tap3,mac=02:aa:bb:cc:dd:ee,mtu=9000")).unwrap();
        assert_eq!(c.backend, Backend::Tap("tap3".into()));
        assert_eq!(c.mac, Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]));
        assert_eq!(c.mtu, 9000);
        assert_eq!(
            NetConfig::from_keys(kv("fd=7")).unwrap().backend,
            Backend::Fd(7)
        );
        for bad in [
            "tap0,mac=01:00:00:00:00:00",
            "tap0,mac=00:00:00:00:00:00",
            "tap0,mac=zz:00:00:00:00:01",
            "tap0,mac=02:00:00:00:00",
            "tap0,mac=02:00:00:00:00:00:00",
            "tap0,mac=002:00:00:00:00:00",
            "tap0,mtu=67",
            "tap0,mtu=65522",
            "tap0,mtu=x",
            "fd=-1",
            "fd=x",
        ] {
            let e = NetConfig::from_keys(kv(bad)).unwrap_err();
            assert!(matches!(e, NetConfigError::BadValue { .. }), "{bad}: {e}");
        }
        assert_eq!(
            NetConfig::from_keys(kv("tap0,fd=3")).unwrap_err(),
            NetConfigError::TwoBackends
        );
        assert_eq!(
            NetConfig::from_keys(Vec::new()).unwrap_err(),
            NetConfigError::MissingBackend
        );
        assert!(matches!(
            NetConfig::from_keys(kv("tap0,frob=1")).unwrap_err(),
            NetConfigError::UnknownOption(_)
        ));
        let m = default_mac("vm0", 2, 0);
        assert_eq!(&m[..3], &[0x58, 0x9c, 0xfc]);
        assert_eq!(m, default_mac("vm0", 2, 0), "stable");
        assert_ne!(m, default_mac("vm0", 3, 0));
        assert_ne!(m, default_mac("vm1", 2, 0));
    }

    #[test]
    fn features_config_and_offloads() {
        let (tap, _peer) = Tap::socket_pair(true);
        let mut net = Net::with_tap(tap, [2, 1, 2, 3, 4, 5], 9000);
        let f = net.features();
        for b in [
            F_MAC,
            F_STATUS,
            F_MTU,
            F_CSUM,
            F_GUEST_TSO4,
            F_MRG_RXBUF,
            F_CTRL_VQ,
        ] {
            assert!(f & (1 << b) != 0, "feature {b}");
        }
        let mut cfg = [0u8; 14];
        net.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), S_LINK_UP);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
        assert_eq!(&cfg[12..], &[0, 0]);
        net.write_config(0, &[0xff; 6]);
        assert_eq!(net.mac(), [2, 1, 2, 3, 4, 5], "read-only");
        net.ack_features(u64::MAX);
        assert_eq!(net.acked_features(), f);
        assert_eq!(
            tun_offloads(bits(&[
                F_GUEST_CSUM,
                F_GUEST_TSO4,
                F_GUEST_TSO6,
                F_GUEST_ECN
            ])),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        assert_eq!(tun_offloads(bits(&[F_GUEST_TSO4])), 0, "TSO needs CSUM");
        assert_eq!(tun_offloads(bits(&[F_GUEST_CSUM, F_GUEST_ECN])), TUN_F_CSUM);
        // A tap without a vnet header offers no offloads.
        let (tap, _peer) = Tap::socket_pair(false);
        let f = Net::with_tap(tap, [2, 0, 0, 0, 0, 1], 1500).features();
        assert_eq!(f & (1 << F_CSUM | 1 << F_GUEST_CSUM | 1 << F_HOST_TSO4), 0);
    }

    #[test]
    fn the_header_the_tap_gets_is_the_one_that_was_checked() {
        use std::sync::atomic::AtomicBool;
        // Without VIRTIO_NET_F_CSUM a header asking for a checksum is refused. Another vCPU
        // flips that flag on and off while the frames go out: a frame may be refused or
        // sent, but what reaches the tap must never carry the flag.
        let mut h = harness(bits(&[]), true);
        let f = frame(60, 9);
        let a = h.drv.buf(&with_hdr(&f));
        let mem = h.drv.mem.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut flag = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    flag ^= HDR_F_NEEDS_CSUM;
                    mem.write_obj(flag, GuestAddress(a)).unwrap();
                }
            })
        };
        let (mut sent, mut bad) = (0, 0);
        for _ in 0..40 {
            for _ in 0..100 {
                h.tx.push(&h.drv, &[(a, (VNET_HDR_LEN + f.len()) as u32, false)]);
            }
            h.w.process_tx();
            while let Some(d) = host_recv(&mut h) {
                sent += 1;
                if d[0] & HDR_F_NEEDS_CSUM != 0 {
                    bad += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        assert!(sent > 0, "no frame went out");
        assert_eq!(
            bad, 0,
            "{bad} of {sent} frames reached the tap with an unchecked header"
        );
    }

    #[test]
    fn transmit_any_layout_one_interrupt_per_batch() {
        let mut h = harness(bits(&[]), true);
        let f1 = frame(60, 1);
        let f2 = frame(1514, 2);
        let f3 = frame(65535 + 14, 3);
        // Header + frame in one descriptor; split unevenly; an indirect table.
        let a = h.drv.buf(&with_hdr(&f1));
        h.tx.push(&h.drv, &[(a, 72, false)]);
        let b = h.drv.buf(&with_hdr(&f2));
        h.tx.push(
            &h.drv,
            &[(b, 5, false), (b + 5, 700, false), (b + 705, 821, false)],
        );
        let c = h.drv.buf(&with_hdr(&f3));
        let table = h.drv.alloc(32);
        let t = Ring {
            desc: table,
            ..Ring::new(1, 2)
        };
        t.write_desc(&h.drv, 0, c, 12, F_NEXT, 1);
        t.write_desc(&h.drv, 1, c + 12, f3.len() as u32, 0, 0);
        let head = h.tx.next_desc;
        h.tx.write_desc(&h.drv, head, table, 32, F_INDIRECT, 0);
        h.tx.next_desc += 1;
        h.tx.publish(&h.drv, head);
        h.w.process_tx();
        assert_eq!(h.tx.used_idx(&h.drv), 3);
        assert_eq!(h.irq.used.load(Ordering::SeqCst), 1, "one interrupt");
        for (i, f) in [&f1, &f2, &f3].into_iter().enumerate() {
            assert_eq!(h.tx.used(&h.drv, i as u16).1, 0);
            assert!(host_recv(&mut h).unwrap() == with_hdr(f), "frame {i}");
        }
        assert!(host_recv(&mut h).is_none());
        assert_eq!(n(&stats(&h).tx_frames), 3);
        assert_eq!(n(&stats(&h).guest_errors), 0);
    }

    #[test]
    fn transmit_strips_the_header_for_a_tap_without_one() {
        let mut h = harness(bits(&[]), false);
        let f = frame(100, 9);
        let a = h.drv.buf(&with_hdr(&f));
        h.tx.push(&h.drv, &[(a, 112, false)]);
        h.w.process_tx();
        assert_eq!(host_recv(&mut h).unwrap(), f);
        // The header split over descriptors, the last one shared with the frame.
        h.tx.push(
            &h.drv,
            &[(a, 5, false), (a + 5, 4, false), (a + 9, 103, false)],
        );
        h.w.process_tx();
        assert_eq!(host_recv(&mut h).unwrap(), f);
    }

    #[test]
    fn chains_longer_than_the_queue_are_refused() {
        let mut h = harness(bits(&[F_MRG_RXBUF]), true);
        let f = with_hdr(&frame(100, 3));
        let a = h.drv.buf(&f);
        // An indirect table of `n` descriptors: n - 1 empty ones, then the whole frame.
        let indirect = |h: &mut H, n: u16, write: bool| {
            let table = h.drv.alloc(16 * u64::from(n));
            let t = Ring {
                desc: table,
                ..Ring::new(1, n)
            };
            let w = if write { F_WRITE } else { 0 };
            for i in 0..n - 1 {
                t.write_desc(&h.drv, i, a, 0, F_NEXT | w, i + 1);
            }
            t.write_desc(&h.drv, n - 1, a, f.len() as u32, w, 0);
            (table, 16 * u32::from(n))
        };
        // Transmit: 256 descriptors pass, 257 do not.
        for (n, ok) in [(256u16, true), (257, false), (4000, false)] {
            let (table, len) = indirect(&mut h, n, false);
            let head = h.tx.next_desc;
            h.tx.write_desc(&h.drv, head, table, len, F_INDIRECT, 0);
            h.tx.next_desc += 1;
            h.tx.publish(&h.drv, head);
            h.w.process_tx();
            assert_eq!(host_recv(&mut h).is_some(), ok, "{n} descriptors");
        }
        assert_eq!(n(&stats(&h).guest_errors), 2);
        // Receive: the chain is given back unused, the frame is lost, nothing blocks.
        let (table, len) = indirect(&mut h, 5000, true);
        let head = h.rx.next_desc;
        h.rx.write_desc(&h.drv, head, table, len, F_INDIRECT, 0);
        h.rx.next_desc += 1;
        h.rx.publish(&h.drv, head);
        host_send(&mut h, &with_hdr(&frame(64, 1)));
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 1);
        assert_eq!(h.rx.used(&h.drv, 0), (u32::from(head), 0));
        assert_eq!(n(&stats(&h).guest_errors), 3);
    }

    #[test]
    fn transmit_is_done_in_batches() {
        let mut h = harness(bits(&[]), true);
        assert_eq!(h.w.tx_batch, TX_BATCH);
        // (The real batch is a whole ring; a guest refilling it meanwhile kept us forever.)
        h.w.tx_batch = 100;
        let f = with_hdr(&frame(60, 1));
        let a = h.drv.buf(&f);
        for _ in 0..250 {
            h.tx.push(&h.drv, &[(a, f.len() as u32, false)]);
        }
        let flags = |h: &H| -> u16 { h.drv.mem.read_obj(GuestAddress(h.tx.used)).unwrap() };
        for (used, more) in [(100, true), (200, true), (250, false)] {
            assert_eq!(h.w.process_tx(), more);
            assert_eq!(h.tx.used_idx(&h.drv), used);
            assert_eq!(
                flags(&h) & 1,
                u16::from(more),
                "kicks off while more is to do"
            );
        }
        assert_eq!(h.irq.used.load(Ordering::SeqCst), 3);
        let mut got = 0;
        while host_recv(&mut h).is_some() {
            got += 1;
        }
        assert_eq!(got, 250);
    }

    #[test]
    fn transmit_headers_must_match_the_negotiated_offloads() {
        let f = frame(200, 4);
        let send = |h: &mut H, flags: u8, gso: u8| -> bool {
            let mut b = with_hdr(&f);
            b[0] = flags;
            b[1] = gso;
            let a = h.drv.buf(&b);
            // The header split over three descriptors.
            h.tx.push(
                &h.drv,
                &[(a, 1, false), (a + 1, 4, false), (a + 5, 207, false)],
            );
            h.w.process_tx();
            host_recv(h).is_some()
        };
        let mut h = harness(bits(&[]), true);
        assert!(send(&mut h, 0, GSO_NONE));
        assert!(!send(&mut h, HDR_F_NEEDS_CSUM, GSO_NONE));
        assert!(!send(&mut h, 0, GSO_TCPV4));
        assert!(!send(&mut h, 0, GSO_ECN));
        assert_eq!(n(&stats(&h).guest_errors), 3);
        let mut h = harness(bits(&[F_CSUM, F_HOST_TSO4]), true);
        assert!(send(&mut h, HDR_F_NEEDS_CSUM, GSO_NONE));
        assert!(send(&mut h, HDR_F_NEEDS_CSUM, GSO_TCPV4));
        assert!(!send(&mut h, HDR_F_NEEDS_CSUM, GSO_TCPV6));
        assert!(!send(&mut h, HDR_F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN));
        assert!(!send(&mut h, HDR_F_NEEDS_CSUM, 3)); // UDP (UFO): never offered
        assert!(!send(&mut h, HDR_F_NEEDS_CSUM, 5)); // UDP_L4: never offered
        assert_eq!(n(&stats(&h).guest_errors), 4);
        let mut h = harness(bits(&[F_CSUM, F_HOST_TSO6, F_HOST_ECN]), true);
        assert!(send(&mut h, HDR_F_NEEDS_CSUM, GSO_TCPV6 | GSO_ECN));
        assert!(!send(&mut h, HDR_F_NEEDS_CSUM, GSO_ECN));
        assert_eq!(n(&stats(&h).tx_frames), 1);
    }

    #[test]
    fn malformed_transmit_chains_are_dropped_and_counted() {
        let mut h = harness(bits(&[]), true);
        let f = with_hdr(&frame(200, 4));
        let a = h.drv.buf(&f);
        let big = h.drv.alloc((VNET_HDR_LEN + MAX_FRAME + 1) as u64);
        h.tx.push(&h.drv, &[(a, 8, false)]); // shorter than the header
        h.tx.push(&h.drv, &[(a, 12 + 13, false)]); // no room for an Ethernet header
        h.tx.push(&h.drv, &[(a, 12, false), (a + 12, 200, true)]); // device-writable
        h.tx.push(
            &h.drv,
            &[(big, (VNET_HDR_LEN + MAX_FRAME + 1) as u32, false)],
        ); // too long
        h.tx.push(&h.drv, &[(a, 12, false), (u64::MAX - 50, 100, false)]); // bad address
        h.tx.push(&h.drv, &[((MEM_SIZE - 10) as u64, 100, false)]); // crosses the end
        h.tx.write_desc(&h.drv, 100, a, 16, F_NEXT, 100); // loops
        h.tx.publish(&h.drv, 100);
        h.tx.publish(&h.drv, 9999); // head out of range
        h.w.process_tx();
        assert!(host_recv(&mut h).is_none(), "nothing reaches the tap");
        assert_eq!(n(&stats(&h).tx_frames), 0);
        assert!(n(&stats(&h).guest_errors) >= 8);
        assert_eq!(h.tx.used_idx(&h.drv), 7, "every valid head comes back");
        // Still works.
        h.tx.push(&h.drv, &[(a, f.len() as u32, false)]);
        h.w.process_tx();
        assert_eq!(host_recv(&mut h).unwrap(), f);
    }

    /// Posts `count` receive buffers of `size` bytes; their addresses.
    fn post_rx(h: &mut H, count: usize, size: u32) -> Vec<u64> {
        (0..count)
            .map(|_| {
                let a = h.drv.alloc(u64::from(size));
                h.rx.push(&h.drv, &[(a, size, true)]);
                a
            })
            .collect()
    }

    /// Runs the worker's side for `secs`: `step` as its loop would, sleeping on its timer
    /// while a rate limit holds it back; returns what `count` saw.
    fn run_limited(h: &mut H, secs: f64, mut step: impl FnMut(&mut H) -> usize) -> usize {
        let t0 = std::time::Instant::now();
        let mut seen = 0;
        while t0.elapsed().as_secs_f64() < secs {
            seen += step(h);
            if h.w.timer.is_armed().unwrap() {
                let _ = h.w.timer.wait();
                if h.w.rx_limited {
                    h.w.rx_limited = false;
                    h.w.poll_tap(true);
                }
            }
        }
        seen
    }

    const PER_SEC: u64 = 200;

    fn ops(n: u64) -> RateLimits {
        RateLimits {
            bytes_per_sec: None,
            ops_per_sec: Some(n),
        }
    }

    #[test]
    fn transmit_keeps_to_its_rate_limit() {
        let mut h = harness_rated(bits(&[]), true, ops(PER_SEC), RateLimits::default());
        let f = with_hdr(&frame(60, 3));
        for _ in 0..256 {
            let a = h.drv.buf(&f);
            h.tx.push(&h.drv, &[(a, f.len() as u32, false)]);
        }
        let sent = run_limited(&mut h, 1.0, |h| {
            h.w.process_tx();
            std::iter::from_fn(|| host_recv(h)).count()
        });
        // One second at 200 frames/s, plus at most the 50 ms bucket and one frame.
        let want = PER_SEC as usize;
        assert!(
            sent >= want * 9 / 10 && sent <= want * 11 / 10 + 11,
            "{sent} frames in 1 s"
        );
        // What was held back is still in the ring, not lost.
        assert_eq!(h.tx.used_idx(&h.drv) as usize, sent);
    }

    #[test]
    fn receive_keeps_to_its_rate_limit() {
        let mut h = harness_rated(bits(&[]), true, RateLimits::default(), ops(PER_SEC));
        post_rx(&mut h, 256, 1526);
        for i in 0..256 {
            host_send(&mut h, &with_hdr(&frame(60, i as u8)));
        }
        let got = run_limited(&mut h, 1.0, |h| {
            let before = h.rx.used_idx(&h.drv);
            h.w.process_rx();
            h.rx.used_idx(&h.drv).wrapping_sub(before) as usize
        });
        let want = PER_SEC as usize;
        assert!(
            got >= want * 9 / 10 && got <= want * 11 / 10 + 11,
            "{got} frames in 1 s"
        );
        assert_eq!(n(&stats(&h).rx_dropped), 0);
    }

    #[test]
    fn receive_into_single_buffers_and_drop_oversized() {
        let mut h = harness(bits(&[F_GUEST_CSUM]), true);
        let bufs = post_rx(&mut h, 2, 1526);
        let f1 = frame(1514, 5);
        let mut hdr_f1 = with_hdr(&f1);
        hdr_f1[0] = 1; // NEEDS_CSUM from the host: kept, GUEST_CSUM was negotiated
        host_send(&mut h, &hdr_f1);
        host_send(&mut h, &with_hdr(&frame(1515, 6))); // one byte too many: dropped
        let f3 = frame(60, 7);
        host_send(&mut h, &with_hdr(&f3));
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 2);
        assert_eq!(h.rx.used(&h.drv, 0), (0, 1526));
        assert_eq!(h.rx.used(&h.drv, 1), (1, 72));
        let got = h.drv.read(bufs[0], 1526);
        assert_eq!(got[0], 1);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(&got[12..], &f1[..]);
        assert_eq!(&h.drv.read(bufs[1], 72)[12..], &f3[..]);
        assert_eq!(n(&stats(&h).rx_dropped), 1);
        assert_eq!(n(&stats(&h).rx_frames), 2);
        assert_eq!(h.irq.used.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn receive_drops_frames_with_offloads_the_guest_has_not_enabled() {
        let feats = bits(&[F_CTRL_VQ, F_CTRL_GUEST_OFFLOADS, F_GUEST_CSUM, F_GUEST_TSO4]);
        let mut h = harness(feats, true);
        let bufs = post_rx(&mut h, 8, 2000);
        let send = |h: &mut H, flags: u8, gso: u8, seed: u8| {
            let mut f = with_hdr(&frame(100, seed));
            f[0] = flags;
            f[1] = gso;
            host_send(h, &f);
        };
        // Negotiated: checksum and TCPv4 segments; not TCPv6, not ECN.
        send(&mut h, HDR_F_NEEDS_CSUM, GSO_TCPV4, 1);
        send(&mut h, HDR_F_NEEDS_CSUM, GSO_TCPV6, 2);
        send(&mut h, HDR_F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 3);
        send(&mut h, 0, 3, 4); // UDP
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 1);
        assert_eq!(h.drv.read(bufs[0], 13)[12], frame(100, 1)[0]);
        assert_eq!(n(&stats(&h).rx_dropped), 3);
        // The guest turns the offloads off; frames the tap queued before that are dropped.
        send(&mut h, HDR_F_NEEDS_CSUM, GSO_NONE, 5);
        send(&mut h, 0, GSO_TCPV4, 6);
        let mut off = vec![CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET];
        off.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(ctrl(&mut h, &off), CTRL_OK);
        send(&mut h, 0, GSO_NONE, 7);
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 2);
        assert_eq!(h.drv.read(bufs[1], 13)[12], frame(100, 7)[0]);
        assert_eq!(n(&stats(&h).rx_dropped), 5);
        // On again.
        off.truncate(2);
        off.extend_from_slice(&(1u64 << F_GUEST_CSUM).to_le_bytes());
        assert_eq!(ctrl(&mut h, &off), CTRL_OK);
        send(&mut h, HDR_F_NEEDS_CSUM, GSO_NONE, 8);
        send(&mut h, HDR_F_NEEDS_CSUM, GSO_TCPV4, 9);
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 3);
        assert_eq!(n(&stats(&h).rx_dropped), 6);
        assert_eq!(n(&stats(&h).guest_errors), 0);
    }

    #[test]
    fn receive_clears_checksum_hints_without_guest_csum() {
        let mut h = harness(bits(&[]), true);
        let b = post_rx(&mut h, 1, 200);
        let mut f = with_hdr(&frame(100, 1));
        f[0] = 2; // DATA_VALID
        host_send(&mut h, &f);
        h.w.process_rx();
        assert_eq!(h.drv.read(b[0], 1)[0], 0);
    }

    #[test]
    fn mergeable_buffers_carry_num_buffers() {
        let mut h = harness(bits(&[F_MRG_RXBUF]), false);
        let bufs = post_rx(&mut h, 8, 100);
        let f = frame(300, 8); // 312 bytes with the header: 4 buffers
        host_send(&mut h, &f);
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 4);
        let mut all = Vec::new();
        for i in 0..4u16 {
            let (id, len) = h.rx.used(&h.drv, i);
            assert_eq!(id, u32::from(i));
            all.extend(h.drv.read(bufs[i as usize], len as usize));
        }
        assert_eq!(u16::from_le_bytes([all[10], all[11]]), 4);
        assert_eq!(&all[..10], &[0; 10], "zero header from a tap without one");
        assert_eq!(&all[12..], &f[..]);
        // Bigger than every buffer of the whole ring: dropped (4 buffers left of 8 x 100).
        host_send(&mut h, &frame(2000, 1));
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 4);
        assert!(
            h.w.pending.is_some(),
            "waits: the ring is not full of buffers"
        );
    }

    #[test]
    fn no_buffers_stops_polling_the_tap_until_the_kick() {
        let mut h = harness(bits(&[]), true);
        for i in 0..5u8 {
            host_send(&mut h, &with_hdr(&frame(64, i)));
        }
        h.w.process_rx();
        assert!(h.w.pending.is_some(), "one frame waits inside rhyve");
        assert!(!h.w.tap_polled, "the tap is not polled without buffers");
        let flags: u16 = h.drv.mem.read_obj(GuestAddress(h.rx.used)).unwrap();
        assert_eq!(flags & 1, 0, "kicks are enabled");
        // Two buffers, then the kick.
        let bufs = post_rx(&mut h, 2, 100);
        h.w.poll_tap(true);
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 2);
        assert_eq!(&h.drv.read(bufs[0], 76)[12..], &frame(64, 0)[..]);
        assert_eq!(&h.drv.read(bufs[1], 76)[12..], &frame(64, 1)[..]);
        assert!(!h.w.tap_polled);
        let bufs = post_rx(&mut h, 10, 100);
        h.w.poll_tap(true);
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 5);
        assert_eq!(&h.drv.read(bufs[2], 76)[12..], &frame(64, 4)[..]);
        assert!(h.w.tap_polled, "buffers left: polling again");
        assert_eq!(n(&stats(&h).rx_dropped), 0, "nothing lost");
    }

    #[test]
    fn corrupt_receive_avail_index_stops_polling_without_spinning() {
        for bad_ring in [false, true] {
            let mut h = harness(bits(&[]), true);
            if bad_ring {
                // The avail index far more than the queue size ahead.
                h.drv
                    .mem
                    .write_obj(1000u16, GuestAddress(h.rx.avail + 2))
                    .unwrap();
            } else {
                // An avail ring at guest address 0 holding an index that is just as bad.
                h.w.rx.set_ready(false);
                h.w.rx.try_set_avail_ring_address(GuestAddress(0)).unwrap();
                h.w.rx.set_ready(true);
                h.drv.mem.write_obj(777u16, GuestAddress(2)).unwrap();
            }
            host_send(&mut h, &with_hdr(&frame(64, 1)));
            host_send(&mut h, &with_hdr(&frame(64, 2)));
            h.w.process_rx();
            assert!(h.w.pending.is_some(), "the frame waits");
            assert!(!h.w.tap_polled, "the tap is out of the epoll set");
            assert!(n(&stats(&h).guest_errors) <= 1, "no spinning");
        }
    }

    #[test]
    fn receive_asks_to_be_called_again_when_its_batch_runs_out() {
        let mut h = harness(bits(&[]), true);
        post_rx(&mut h, 256, 100);
        for i in 0..RX_BATCH + 2 {
            host_send(&mut h, &with_hdr(&frame(64, i as u8)));
        }
        assert!(h.w.process_rx(), "batch done, frames left: come back");
        assert_eq!(usize::from(h.rx.used_idx(&h.drv)), RX_BATCH);
        assert!(!h.w.process_rx(), "no buffers: wait for the kick");
        assert!(h.w.pending.is_some() && !h.w.tap_polled);
        let flags: u16 = h.drv.mem.read_obj(GuestAddress(h.rx.used)).unwrap();
        assert_eq!(flags & 1, 0, "kicks are enabled");
    }

    #[test]
    fn event_idx_asks_for_the_next_receive_buffer_only_when_out() {
        let mut h = harness(bits(&[VIRTIO_RING_F_EVENT_IDX]), true);
        h.w.rx.set_event_idx(true);
        let avail_event = |h: &H| -> u16 {
            let at = h.rx.used + 4 + 8 * u64::from(h.rx.size);
            h.drv.mem.read_obj(GuestAddress(at)).unwrap()
        };
        post_rx(&mut h, 3, 200);
        for i in 0..4u8 {
            host_send(&mut h, &with_hdr(&frame(100, i)));
        }
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 3);
        assert!(h.w.pending.is_some() && !h.w.tap_polled);
        assert_eq!(avail_event(&h), 3, "kick me when buffer 3 is posted");
        // The guest posts one more (and would kick): the waiting frame goes in.
        post_rx(&mut h, 1, 200);
        h.w.poll_tap(true);
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 4);
        assert!(h.w.pending.is_none());
    }

    #[test]
    fn event_idx_with_too_few_mergeable_buffers_still_gets_a_kick() {
        // A 300-byte frame, 2 posted buffers of 100 bytes: the device must wait, and ask to be
        // kicked on the driver's next buffer (avail_event = 2), not at its own position (0),
        // which the driver has already passed and would never kick for again.
        let mut h = harness(bits(&[VIRTIO_RING_F_EVENT_IDX, F_MRG_RXBUF]), true);
        h.w.rx.set_event_idx(true);
        let avail_event = |h: &H| -> u16 {
            let at = h.rx.used + 4 + 8 * u64::from(h.rx.size);
            h.drv.mem.read_obj(GuestAddress(at)).unwrap()
        };
        post_rx(&mut h, 2, 100);
        host_send(&mut h, &with_hdr(&frame(300, 1)));
        h.w.process_rx();
        assert_eq!(h.rx.used_idx(&h.drv), 0);
        assert!(h.w.pending.is_some() && !h.w.tap_polled);
        assert_eq!(avail_event(&h), 2);
        // Linux's vring_need_event for the next buffer: (new - event - 1) < (new - old).
        let (old, new) = (2u16, 3u16);
        assert!(new.wrapping_sub(avail_event(&h)).wrapping_sub(1) < new.wrapping_sub(old));
        post_rx(&mut h, 2, 100);
        h.w.poll_tap(true);
        h.w.process_rx();
        assert_eq!(
            h.rx.used_idx(&h.drv),
            4,
            "312 bytes in four 100-byte buffers"
        );
    }

    fn ctrl(h: &mut H, cmd: &[u8]) -> u8 {
        let c = h.drv.buf(cmd);
        let ack = h.drv.buf(&[0xee]);
        h.ctrl
            .push(&h.drv, &[(c, cmd.len() as u32, false), (ack, 1, true)]);
        h.w.process_ctrl();
        h.drv.read(ack, 1)[0]
    }

    #[test]
    fn control_queue_commands() {
        let feats = bits(&[
            F_CTRL_VQ,
            F_CTRL_RX,
            F_CTRL_GUEST_OFFLOADS,
            F_GUEST_CSUM,
            F_GUEST_TSO4,
        ]);
        let mut h = harness(feats, true);
        assert_eq!(ctrl(&mut h, &[CTRL_RX, 0, 1]), CTRL_OK); // promiscuous on
        assert_eq!(ctrl(&mut h, &[CTRL_RX, 1, 0]), CTRL_OK); // all-multicast off
        assert_eq!(ctrl(&mut h, &[CTRL_RX, 9, 0]), CTRL_ERR);
        let mut table = vec![CTRL_MAC, CTRL_MAC_TABLE_SET];
        table.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0x5e, 0, 0, 1]);
        assert_eq!(ctrl(&mut h, &table), CTRL_OK);
        assert_eq!(ctrl(&mut h, &[CTRL_MAC, 1, 2, 0, 0, 0, 0, 1]), CTRL_ERR);
        assert_eq!(ctrl(&mut h, &[42, 0]), CTRL_ERR);
        assert_eq!(ctrl(&mut h, &[CTRL_RX]), CTRL_ERR, "too short");
        let mut off = vec![CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET];
        off.extend_from_slice(&(1u64 << F_GUEST_CSUM | 1 << F_GUEST_TSO4).to_le_bytes());
        assert_eq!(ctrl(&mut h, &off), CTRL_OK);
        assert_eq!(h.w.shared.tap.test_offload(), TUN_F_CSUM | TUN_F_TSO4);
        off.truncate(2);
        off.extend_from_slice(&(1u64 << F_GUEST_TSO6).to_le_bytes()); // not negotiated
        assert_eq!(ctrl(&mut h, &off), CTRL_ERR);
        off.truncate(2);
        off.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(ctrl(&mut h, &off), CTRL_OK);
        assert_eq!(h.w.shared.tap.test_offload(), 0);
        // No ack byte; ack before the command: counted, no panic.
        let c = h.drv.buf(&[CTRL_RX, 0, 1]);
        h.ctrl.push(&h.drv, &[(c, 3, false)]);
        h.ctrl.push(&h.drv, &[(c, 1, true), (c, 3, false)]);
        h.w.process_ctrl();
        assert!(n(&stats(&h).guest_errors) >= 2);
        // Without CTRL_RX negotiated, RX commands are refused.
        let mut h = harness(bits(&[F_CTRL_VQ]), true);
        assert_eq!(ctrl(&mut h, &[CTRL_RX, 0, 1]), CTRL_ERR);
    }

    #[test]
    fn hostile_random_descriptor_tables() {
        for mrg in [false, true] {
            let feats = match mrg {
                true => bits(&[F_CTRL_VQ, F_CTRL_RX, F_MRG_RXBUF]),
                false => bits(&[F_CTRL_VQ, F_CTRL_RX]),
            };
            let mut h = harness(feats, true);
            let mut rng = XorShift(0x2545_f491_4f6c_dd1d ^ mrg as u64);
            for round in 0..1500 {
                for ring in 0..3 {
                    let r = [&h.rx, &h.tx, &h.ctrl][ring];
                    let size = u64::from(r.size);
                    for _ in 0..rng.below(6) + 1 {
                        let idx = rng.below(size) as u16;
                        let addr = match rng.below(4) {
                            0 => rng.next(),
                            1 => (MEM_SIZE as u64).wrapping_sub(rng.below(4096)),
                            _ => DATA + rng.below(0x20000),
                        };
                        let len = match rng.below(4) {
                            0 => rng.next() as u32,
                            1 => rng.below(16) as u32,
                            _ => rng.below(4096) as u32,
                        };
                        let next = if rng.below(4) == 0 {
                            rng.next() as u16
                        } else {
                            rng.below(size) as u16
                        };
                        r.write_desc(&h.drv, idx, addr, len, (rng.next() & 7) as u16, next);
                    }
                }
                for _ in 0..rng.below(3) {
                    let head = rng.below(300) as u16;
                    match rng.below(3) {
                        0 => h.rx.publish(&h.drv, head),
                        1 => h.tx.publish(&h.drv, head),
                        _ => h.ctrl.publish(&h.drv, head),
                    }
                }
                if rng.below(3) == 0 {
                    let len = rng.below(3000) as usize + 1;
                    let _ = h.peer.write(&frame(len, round as u8));
                }
                if round % 211 == 0 {
                    // A corrupt avail index.
                    let _ = h
                        .drv
                        .mem
                        .write_obj(rng.next() as u16, GuestAddress(h.rx.avail + 2));
                }
                h.w.process_tx();
                h.w.process_ctrl();
                h.w.poll_tap(true);
                h.w.process_rx();
                while host_recv(&mut h).is_some() {}
            }
            assert!(n(&stats(&h).guest_errors) > 0);
        }
    }

    #[test]
    fn a_paused_device_leaves_guest_ram_alone_while_frames_arrive() {
        let (tap, mut peer) = Tap::socket_pair(true);
        let mut net = Net::with_tap(tap, [2, 0, 0, 0, 0, 9], 1500);
        let irq = Arc::new(CountingInterrupt::default());
        net.ack_features(bits(&[F_MRG_RXBUF]));
        let mut drv = Driver::new(256);
        let (mut rx, mut tx, ctrl) = (Ring::new(0, 256), Ring::new(1, 256), Ring::new(2, 64));
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let mut unready = ctrl.queue(&drv.mem);
        unready.set_ready(false);
        net.activate(
            drv.mem.clone(),
            irq,
            vec![rx.queue(&drv.mem), tx.queue(&drv.mem), unready],
            kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        )
        .unwrap();
        // Receive buffers posted, then paused: frames from the host and a transmit kick.
        let b = drv.alloc(2048);
        rx.push(&drv, &[(b, 2048, true)]);
        kicks[RXQ].write(1).unwrap();
        net.pause().unwrap();
        let g = with_hdr(&frame(500, 4));
        peer.write_all(&g).unwrap();
        let f = with_hdr(&frame(300, 3));
        let a = drv.buf(&f);
        tx.push(&drv, &[(a, f.len() as u32, false)]);
        kicks[TXQ].write(1).unwrap();
        let before = drv.read(0, MEM_SIZE);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            drv.read(0, MEM_SIZE) == before,
            "guest RAM written while paused"
        );
        let mut got = vec![0u8; 4096];
        assert!(peer.read(&mut got).is_err(), "a frame left while paused");
        // Resumed: both directions go through.
        net.resume();
        assert!(wait_for(|| rx.used_idx(&drv) == 1));
        assert_eq!(drv.read(b + 12, g.len() - 12), g[12..]);
        assert!(wait_for(|| tx.used_idx(&drv) == 1));
        assert_eq!(peer.read(&mut got).unwrap(), f.len());
        let stats: std::collections::HashMap<_, _> = net.counters().into_iter().collect();
        assert_eq!((stats["rx_frames"], stats["tx_frames"]), (1, 1));
        net.reset();
    }

    #[test]
    fn activate_runs_the_thread_reset_stops_it() {
        let (tap, mut peer) = Tap::socket_pair(true);
        let mut net = Net::with_tap(tap, [2, 0, 0, 0, 0, 9], 1500);
        let irq = Arc::new(CountingInterrupt::default());
        net.ack_features(bits(&[F_GUEST_CSUM, F_GUEST_TSO4, F_MRG_RXBUF]));
        for _round in 0..2 {
            let mut drv = Driver::new(256);
            let (mut rx, mut tx, ctrl) = (Ring::new(0, 256), Ring::new(1, 256), Ring::new(2, 64));
            let kicks: Vec<EventFd> = (0..3)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect();
            let mut unready = ctrl.queue(&drv.mem);
            unready.set_ready(false); // CTRL_VQ not negotiated: the queue may stay off
            net.activate(
                drv.mem.clone(),
                irq.clone(),
                vec![rx.queue(&drv.mem), tx.queue(&drv.mem), unready],
                kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            )
            .unwrap();
            assert!(net.is_active());
            assert_eq!(net.shared.tap.test_offload(), TUN_F_CSUM | TUN_F_TSO4);
            // Guest → host through a kick.
            let f = with_hdr(&frame(300, 3));
            let a = drv.buf(&f);
            tx.push(&drv, &[(a, f.len() as u32, false)]);
            kicks[TXQ].write(1).unwrap();
            let mut got = vec![0u8; 4096];
            assert!(wait_for(|| match peer.read(&mut got) {
                Ok(n) => {
                    got.truncate(n);
                    true
                }
                Err(_) => false,
            }));
            assert_eq!(got, f);
            // Host → guest: the frame waits until a buffer is posted and kicked.
            let g = with_hdr(&frame(500, 4));
            peer.write_all(&g).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(rx.used_idx(&drv), 0);
            let b = drv.alloc(2048);
            rx.push(&drv, &[(b, 2048, true)]);
            kicks[RXQ].write(1).unwrap();
            assert!(wait_for(|| rx.used_idx(&drv) == 1));
            let mut want = g.clone();
            want[10] = 1; // num_buffers
            assert_eq!(drv.read(b, g.len()), want);
            assert!(wait_for(|| irq.used.load(Ordering::SeqCst) >= 2));
            net.reset();
            assert!(!net.is_active());
            assert_eq!(net.shared.tap.test_offload(), 0);
            net.ack_features(bits(&[F_GUEST_CSUM, F_GUEST_TSO4, F_MRG_RXBUF]));
            drv = Driver::new(16);
            let _ = drv;
        }
        // Wrong queue counts are refused.
        let drv = Driver::new(16);
        assert!(matches!(
            net.activate(drv.mem.clone(), irq, vec![], vec![]),
            Err(ActivateError::QueueCount { .. })
        ));
    }
}
