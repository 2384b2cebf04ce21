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
//! most one frame waits inside rhyve. Transmit handles the whole available ring per kick and
//! interrupts once per batch. Malformed chains are dropped, counted and logged once; a frame
//! larger than the posted receive buffers is dropped and counted.

use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN};
use super::{
    check_queues, drain_queue, guest_error, read_config_bytes, ActivateError, GuestMemoryMmap,
    VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};

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
const CONFIG_LEN: usize = 12;
/// bhyve's MTU bounds: at least Ethernet's minimum payload, at most what fits 64 KiB.
pub const MTU_MIN: u16 = 68;
pub const MTU_MAX: u16 = 65535 - 14;

/// Configuration keys virtio-net reads (below `pci.B.S.F.`).
pub const KEYS: &[&str] = &["path", "fd", "mac", "mtu"];

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
    #[error("virtio-net: unknown option '{0}' (known: a tap name, fd, mac, mtu)")]
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
        for (k, v) in keys {
            match k {
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
        Ok(NetConfig { backend, mac, mtu })
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

/// One descriptor's buffer.
type Seg = (GuestAddress, usize);

/// Walks a chain: its device-readable and device-writable buffers, or what is wrong with it.
fn walk(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    limit: usize,
) -> Result<(Vec<Seg>, Vec<Seg>), &'static str> {
    let (mut r, mut w) = (Vec::new(), Vec::new());
    let (mut total, mut count, mut last_has_next) = (0usize, 0usize, false);
    for d in chain {
        count += 1;
        last_has_next = d.has_next();
        let len = d.len() as usize;
        total = total.saturating_add(len);
        if total > limit {
            return Err("chain longer than the largest frame");
        }
        if len == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), len) {
            return Err("buffer outside guest memory");
        }
        if d.is_write_only() {
            w.push((d.addr(), len));
        } else {
            if !w.is_empty() {
                return Err("device-readable descriptor after a device-writable one");
            }
            r.push((d.addr(), len));
        }
    }
    if count == 0 {
        return Err("empty or unreadable descriptor chain");
    }
    if last_has_next {
        return Err("descriptor chain loops, ends at a bad index or has a bad indirect table");
    }
    Ok((r, w))
}

fn seg_len(segs: &[Seg]) -> usize {
    segs.iter().map(|s| s.1).sum()
}

/// Copies `data` into `segs` laid end to end; false if guest memory refused a write.
fn scatter(mem: &GuestMemoryMmap, segs: &[Seg], data: &[u8]) -> bool {
    let mut done = 0;
    for &(a, n) in segs {
        if done == data.len() {
            break;
        }
        let k = n.min(data.len() - done);
        if mem.write_slice(&data[done..done + k], a).is_err() {
            return false;
        }
        done += k;
    }
    true
}

/// Copies `segs` laid end to end into `out` (which must be at least as long); the length.
fn gather(mem: &GuestMemoryMmap, segs: &[Seg], out: &mut [u8]) -> Option<usize> {
    let mut done = 0;
    for &(a, n) in segs {
        mem.read_slice(out.get_mut(done..done + n)?, a).ok()?;
        done += n;
    }
    Some(done)
}

/// State shared by the device and its thread.
struct Shared {
    tap: Tap,
    stats: NetStats,
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
}

const TOKEN_TAP: u64 = 3;
const TOKEN_STOP: u64 = 4;

impl Worker {
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
    /// runs out of buffers, or a batch is done; one interrupt for all of them.
    fn process_rx(&mut self) {
        let shared = self.shared.clone();
        let st = &shared.stats;
        let mut used = false;
        let _ = self.rx.disable_notification(&self.mem);
        for _ in 0..RX_BATCH {
            let len = match self.pending {
                Some(l) => l,
                None => {
                    let tap = &shared.tap;
                    let off = if tap.vnet_hdr() { 0 } else { VNET_HDR_LEN };
                    match tap.read(&mut self.rx_buf[off..]) {
                        Ok(n) if n + off <= VNET_HDR_LEN => continue, // nothing to deliver
                        Ok(n) => {
                            if off != 0 {
                                self.rx_buf[..VNET_HDR_LEN].fill(0);
                            }
                            self.pending = Some(n + off);
                            n + off
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // E.g. the interface was deleted: stop polling rather than spin.
                            bump(&st.host_errors, 1);
                            log::error!("virtio-net: reading tap {}: {e}", tap.name());
                            self.poll_tap(false);
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
                }
                Rx::Dropped => {
                    self.pending = None;
                    used = true; // chains may have been returned
                }
                Rx::NoBuffers(seen) => {
                    // Ask for a kick, then look again: buffers may have arrived in between.
                    let _ = self.rx.enable_notification(&self.mem);
                    let now = self.rx.avail_idx(&self.mem, Ordering::Acquire).ok();
                    if now.is_some() && now != seen {
                        let _ = self.rx.disable_notification(&self.mem);
                        continue;
                    }
                    self.poll_tap(false);
                    break;
                }
            }
        }
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.irq.queue_used(RXQ as u16);
        }
    }

    /// Puts the frame in `rx_buf[..len]` into the guest's receive buffers.
    fn deliver(&mut self, len: usize) -> Rx {
        let mrg = self.has(F_MRG_RXBUF);
        let st = &self.shared.stats;
        let mem = &self.mem;
        let mut chains: Vec<(u16, Vec<Seg>)> = Vec::new();
        let mut room = 0usize;
        let mut bad = None;
        let seen = self.rx.avail_idx(mem, Ordering::Acquire).ok();
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
                match walk(chain, mem, usize::MAX) {
                    Ok((r, w)) if r.is_empty() => {
                        room += seg_len(&w);
                        chains.push((head, w));
                    }
                    Ok(_) => {
                        bad = Some((head, "receive chain with device-readable buffers"));
                        break;
                    }
                    Err(why) => {
                        bad = Some((head, why));
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

    /// Sends every available transmit chain to the tap; one interrupt for the batch.
    fn process_tx(&mut self) {
        let shared = &self.shared;
        let st = &shared.stats;
        let buf = &mut self.tx_buf;
        let mem = &self.mem;
        let notify = drain_queue(&mut self.tx, mem, &st.guest_errors, |chain| {
            let frame = match walk(chain, mem, VNET_HDR_LEN + MAX_FRAME) {
                Ok((r, w)) if w.is_empty() => gather(mem, &r, buf),
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
            let Some(n) = frame.filter(|&n| n >= VNET_HDR_LEN + ETH_HLEN) else {
                guest_error(
                    &st.guest_errors,
                    format_args!("virtio-net: transmit chain too short for header and frame"),
                );
                return 0;
            };
            let data = if shared.tap.vnet_hdr() {
                &buf[..n]
            } else {
                &buf[VNET_HDR_LEN..n]
            };
            match shared.tap.write(data) {
                Ok(_) => {
                    bump(&st.tx_frames, 1);
                    bump(&st.tx_bytes, (n - VNET_HDR_LEN) as u64);
                }
                Err(e) => {
                    // Link down (EIO), full queue, or a GSO header the kernel refused.
                    guest_error(
                        &st.tx_dropped,
                        format_args!("virtio-net: tap {} refused a frame: {e}", shared.tap.name()),
                    );
                }
            }
            0
        });
        if notify {
            self.irq.queue_used(TXQ as u16);
        }
    }

    /// Answers control commands (5.1.6.5): RX mode and MAC table are accepted (the tap
    /// delivers everything; the guest filters), OFFLOADS_SET goes to the tap.
    fn process_ctrl(&mut self) {
        let Some(ctrl) = self.ctrl.as_mut() else {
            return;
        };
        let shared = &self.shared;
        let st = &shared.stats;
        let mem = &self.mem;
        let features = &mut self.features;
        let notify = drain_queue(ctrl, mem, &st.guest_errors, |chain| {
            let (r, w) = match walk(chain, mem, 1 << 16) {
                Ok(rw) => rw,
                Err(why) => {
                    guest_error(&st.guest_errors, format_args!("virtio-net: control: {why}"));
                    return 0;
                }
            };
            let Some(&(ack_seg, ack_len)) = w.last() else {
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
                                Ok(()) => CTRL_OK,
                                Err(e) => {
                                    log::warn!("virtio-net: TUNSETOFFLOAD: {e}");
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
        if notify {
            self.irq.queue_used(CTRLQ as u16);
        }
    }

    fn run(mut self, kicks: Vec<EventFd>, stop: EventFd) {
        self.process_ctrl();
        self.process_tx();
        self.process_rx();
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-net: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        let _ = stop.read();
                        return;
                    }
                    TOKEN_TAP => self.process_rx(),
                    q => {
                        if let Some(k) = kicks.get(q as usize) {
                            let _ = k.read();
                        }
                        match q as usize {
                            RXQ => {
                                self.poll_tap(true);
                                self.process_rx();
                            }
                            TXQ => self.process_tx(),
                            _ => self.process_ctrl(),
                        }
                    }
                }
            }
        }
    }
}

/// The running device thread.
struct NetThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl NetThread {
    fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(h) = self.handle.take() {
            if let Err(e) = self.stop.write(1) {
                log::error!("virtio-net: cannot signal stop: {e}");
                return;
            }
            if h.join().is_err() {
                log::error!("virtio-net: device thread panicked");
            }
        }
    }
}

impl Drop for NetThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The virtio-net device.
pub struct Net {
    shared: Arc<Shared>,
    config: [u8; CONFIG_LEN],
    features: u64,
    acked: u64,
    thread: Option<NetThread>,
}

impl Net {
    /// Opens the tap (or adopts the descriptor). `default_mac` is used without `mac=`.
    pub fn new(cfg: &NetConfig, default_mac: [u8; 6]) -> Result<Net, TapError> {
        let tap = match &cfg.backend {
            Backend::Tap(name) => Tap::open(name)?,
            Backend::Fd(fd) => Tap::from_fd(*fd)?,
        };
        Ok(Self::with_tap(tap, cfg.mac.unwrap_or(default_mac), cfg.mtu))
    }

    /// A device on an open tap.
    pub fn with_tap(tap: Tap, mac: [u8; 6], mtu: u16) -> Net {
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
        let (Some(tx), Some(rx)) = (queues.pop(), queues.pop()) else {
            return Err(ActivateError::InvalidQueue(0));
        };
        if let Err(e) = self.shared.tap.set_offload(tun_offloads(self.acked)) {
            log::warn!(
                "virtio-net: tap {}: TUNSETOFFLOAD: {e}",
                self.shared.tap.name()
            );
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        for (i, k) in kicks.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    k.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(ActivateError::Worker)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STOP),
            )
            .map_err(ActivateError::Worker)?;
        let mut worker = Worker {
            shared: self.shared.clone(),
            mem,
            irq: interrupt,
            features: self.acked,
            rx,
            tx,
            ctrl,
            epoll,
            tap_polled: false,
            rx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME],
            pending: None,
            tx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME],
        };
        worker.poll_tap(true);
        let stop_thread = stop.try_clone().map_err(ActivateError::Worker)?;
        let handle = std::thread::Builder::new()
            .name("virtio-net".into())
            .spawn(move || worker.run(kicks, stop_thread))
            .map_err(ActivateError::Worker)?;
        self.thread = Some(NetThread {
            stop,
            handle: Some(handle),
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(t) = self.thread.take() {
            t.stop();
        }
        if let Err(e) = self.shared.tap.set_offload(0) {
            log::warn!("virtio-net: TUNSETOFFLOAD 0 on reset: {e}");
        }
        self.acked = 0;
    }
}
