//! virtio-vsock (virtio 1.2 section 5.10), with Firecracker's host side (see [`muxer`]):
//! stream sockets between the guest (its CID from `cid=`) and unix sockets on the host.
//! Three queues: receive (device to guest), transmit (guest to device), and the event queue,
//! which this device fills only after a snapshot restore, with its one event, TRANSPORT_RESET.
//!
//! `-s N,virtio-vsock,cid=3,path=/run/vm0.vsock`: the device listens on `path` (it must not
//! exist) and removes it when the VM ends.

pub mod muxer;
pub mod packet;

use std::io;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::chain::{self, gather_prefix, scatter, ChainLimits};
use super::worker::WorkerCtl;
use super::{
    check_queues, clear_expired, drain_queue, guest_error, rate_timer, read_config_bytes,
    watch_kicks, ActivateError, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, Worker, CTL_TOKEN,
    TIMER_TOKEN, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::lifecycle::{LifecycleError, Stat};
use crate::threads::WorkerClass;
pub use muxer::VsockStats;
use muxer::{Muxer, TOKEN_LISTENER};
use packet::{Header, HDR_LEN, MAX_PAYLOAD};

/// Device type of virtio-vsock.
pub const TYPE_VSOCK: u32 = 19;
/// Queue size offered (each of the three).
pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// Receive chains filled per round before the worker looks at its other events.
const RX_BATCH: usize = 256;

/// Configuration keys below `pci.B.S.F.`.
pub const KEYS: &[&str] = &["cid", "path"];

/// The device's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID.
    pub cid: u32,
    /// The listening unix socket; guest connections to host port P go to `path_P`.
    pub path: PathBuf,
}

/// A bad `cid=` or `path=`.
#[derive(Debug, thiserror::Error)]
pub enum VsockConfigError {
    #[error("missing {0}= (e.g. -s 4,virtio-vsock,cid=3,path=/run/vm0.vsock)")]
    Missing(&'static str),
    #[error("cid={0}: expected a context ID from 3 to 4294967294 (1 and 2 are the host's)")]
    BadCid(String),
    #[error(
        "path={0}: too long for a unix socket (at most 100 bytes, leaving room for _PORT names)"
    )]
    PathTooLong(String),
    #[error("unknown option {0}")]
    Unknown(String),
}

impl VsockConfig {
    /// From the slot's keys. CID 0 is accepted (firecracker-containerd sends it; the guest
    /// then has no address of its own to be reached at).
    pub fn from_keys<'a>(
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<VsockConfig, VsockConfigError> {
        let (mut cid, mut path) = (None, None);
        for (k, v) in keys {
            match k {
                "cid" => {
                    let n = v
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|&n| !matches!(n, 1 | 2 | u32::MAX))
                        .ok_or_else(|| VsockConfigError::BadCid(v.to_string()))?;
                    cid = Some(n);
                }
                "path" => {
                    // sun_path is 108 bytes: `_4294967295` must still fit after it.
                    if v.len() > 96 {
                        return Err(VsockConfigError::PathTooLong(v.to_string()));
                    }
                    path = Some(PathBuf::from(v));
                }
                other => return Err(VsockConfigError::Unknown(other.to_string())),
            }
        }
        Ok(VsockConfig {
            cid: cid.ok_or(VsockConfigError::Missing("cid"))?,
            path: path
                .filter(|p| !p.as_os_str().is_empty())
                .ok_or(VsockConfigError::Missing("path"))?,
        })
    }
}

/// The listening socket could not be made.
#[derive(Debug, thiserror::Error)]
#[error("path={}: cannot listen on the unix socket: {source}", path.display())]
pub struct VsockBindError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The virtio-vsock device.
pub struct Vsock {
    cfg: VsockConfig,
    listener: Arc<UnixListener>,
    stats: Arc<VsockStats>,
    acked: u64,
    thread: Option<Worker>,
    /// Restored from a snapshot: the next activation tells the driver that every connection
    /// is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), as Firecracker does after a restore.
    transport_reset: bool,
}

impl Vsock {
    /// Binds the listening socket at `cfg.path` (refused if the file exists, as Firecracker).
    pub fn new(cfg: &VsockConfig) -> Result<Vsock, VsockBindError> {
        let listener = UnixListener::bind(&cfg.path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| VsockBindError {
                path: cfg.path.clone(),
                source,
            })?;
        Ok(Vsock {
            cfg: cfg.clone(),
            listener: Arc::new(listener),
            stats: Arc::new(VsockStats::default()),
            acked: 0,
            thread: None,
            transport_reset: false,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u32 {
        self.cfg.cid
    }

    /// The counters.
    pub fn stats(&self) -> Arc<VsockStats> {
        self.stats.clone()
    }

    /// Whether the worker runs.
    pub fn is_active(&self) -> bool {
        self.thread.is_some()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            t.stop();
        }
        // Ours: a new VM on the same path must be able to bind it.
        let _ = std::fs::remove_file(&self.cfg.path);
    }
}

/// The device thread's state.
struct VsockWorker {
    mem: GuestMemoryMmap,
    irq: Arc<dyn VirtioInterrupt>,
    rx: Queue,
    tx: Queue,
    epoll: Epoll,
    timer: TimerFd,
    muxer: Muxer,
    stats: Arc<VsockStats>,
    /// One packet, header then payload, either way.
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// The event queue, when a TRANSPORT_RESET is owed to the driver.
    event: Option<Queue>,
}

/// virtio_vsock_event.id of a transport reset (the only event).
const EVENT_TRANSPORT_RESET: u32 = 0;

impl VsockWorker {
    /// Puts a TRANSPORT_RESET in the driver's first event buffer (Linux posts them at
    /// probe): its sockets learn that the peer forgot them and the CID is read again.
    fn send_transport_reset(&mut self) {
        let Some(mut q) = self.event.take() else {
            return;
        };
        let chain = match q.iter(&self.mem) {
            Ok(mut it) => it.next(),
            Err(_) => None,
        };
        let Some(chain) = chain else {
            log::warn!("virtio-vsock: no event buffer for the transport reset after a restore");
            return;
        };
        let head = chain.head_index();
        let limits = ChainLimits::queue(QUEUE_SIZE);
        let len = match chain::parse(chain, &self.mem, limits).checked() {
            Ok(c) if c.writable_len >= 4 => {
                if !scatter(&self.mem, &c.writable, &EVENT_TRANSPORT_RESET.to_le_bytes()) {
                    self.stats.host_errors.fetch_add(1, Ordering::Relaxed);
                }
                4
            }
            _ => {
                guest_error(
                    &self.stats.guest_errors,
                    format_args!("virtio-vsock: event buffer not writable or under 4 bytes"),
                );
                0
            }
        };
        if q.add_used(&self.mem, head, len).is_ok() {
            self.irq.queue_used(EVQ as u16);
        }
    }

    /// Hands every transmitted packet to the muxer.
    fn process_tx(&mut self) -> bool {
        let limits = ChainLimits::queue(QUEUE_SIZE).with_total((HDR_LEN + MAX_PAYLOAD) as u64);
        let (mem, muxer, epoll, buf, stats) = (
            &self.mem,
            &mut self.muxer,
            &self.epoll,
            &mut self.tx_buf,
            &self.stats,
        );
        let done = drain_queue(&mut self.tx, mem, &stats.guest_errors, |chain| {
            let c = match chain::parse(chain, mem, limits).checked() {
                Ok(c) => c,
                Err(why) => {
                    guest_error(&stats.guest_errors, format_args!("virtio-vsock: tx: {why}"));
                    return 0;
                }
            };
            let mut hdr = [0u8; HDR_LEN];
            let Some(h) =
                gather_prefix(mem, &c.readable, &mut hdr).and_then(|()| Header::parse(&hdr))
            else {
                guest_error(
                    &stats.guest_errors,
                    format_args!("virtio-vsock: tx: packet shorter than its header"),
                );
                return 0;
            };
            let len = h.len as usize;
            if len > MAX_PAYLOAD || (HDR_LEN + len) as u64 > c.readable_len {
                guest_error(
                    &stats.guest_errors,
                    format_args!("virtio-vsock: tx: payload length {len} beyond the buffers"),
                );
                return 0;
            }
            buf.resize(HDR_LEN + len, 0);
            if gather_prefix(mem, &c.readable, buf).is_none() {
                return 0;
            }
            muxer.handle_tx(epoll, &h, &buf[HDR_LEN..]);
            0
        });
        if done.notify {
            self.irq.queue_used(TXQ as u16);
        }
        done.more
    }

    /// Fills receive buffers with what the muxer has; true when the batch ran out first.
    fn process_rx(&mut self) -> bool {
        if !self.muxer.has_rx() {
            return false;
        }
        let limits = ChainLimits::queue(QUEUE_SIZE);
        let mut used = false;
        let mut more = false;
        let mut filled = 0;
        while self.muxer.has_rx() {
            if filled == RX_BATCH {
                more = true;
                break;
            }
            let _ = self.rx.disable_notification(&self.mem);
            let start = self.rx.next_avail();
            let chain = match self.rx.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    guest_error(
                        &self.stats.guest_errors,
                        format_args!("virtio-vsock: unusable receive ring: {e}"),
                    );
                    break;
                }
            };
            let Some(chain) = chain else {
                // No buffers: wait for the guest's kick (unless some arrived meanwhile).
                match self.rx.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let len = match chain::parse(chain, &self.mem, limits).checked() {
                Ok(c) if c.readable.is_empty() && c.writable_len >= HDR_LEN as u64 => {
                    let room = (c.writable_len as usize - HDR_LEN).min(MAX_PAYLOAD);
                    // The payload lands after the header's room: one buffer to copy out.
                    match self.muxer.next_rx(room, &mut self.rx_buf[HDR_LEN..]) {
                        Some((h, n)) => {
                            self.rx_buf[..HDR_LEN].copy_from_slice(&h.to_bytes());
                            if !scatter(&self.mem, &c.writable, &self.rx_buf[..HDR_LEN + n]) {
                                self.stats.host_errors.fetch_add(1, Ordering::Relaxed);
                            }
                            (HDR_LEN + n) as u32
                        }
                        None => {
                            // Nothing fits this buffer: it stays for later.
                            self.rx.set_next_avail(start);
                            let _ = self.rx.enable_notification(&self.mem);
                            break;
                        }
                    }
                }
                Ok(_) => {
                    guest_error(
                        &self.stats.guest_errors,
                        format_args!("virtio-vsock: receive buffer readable or under 44 bytes"),
                    );
                    0
                }
                Err(why) => {
                    guest_error(
                        &self.stats.guest_errors,
                        format_args!("virtio-vsock: rx: {why}"),
                    );
                    0
                }
            };
            match self.rx.add_used(&self.mem, head, len) {
                Ok(()) => used = true,
                Err(e) => guest_error(
                    &self.stats.guest_errors,
                    format_args!("virtio-vsock: cannot return descriptor {head}: {e}"),
                ),
            }
            filled += 1;
        }
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.irq.queue_used(RXQ as u16);
        }
        more
    }

    fn arm_deadline(&mut self) {
        if let Some(at) = self.muxer.expire(Instant::now()) {
            let after = at.saturating_duration_since(Instant::now());
            super::arm_at_most(
                &mut self.timer,
                after.max(std::time::Duration::from_millis(1)),
            );
        }
    }

    fn run(mut self, kicks: Vec<EventFd>, ctl: &WorkerCtl) {
        if let Err(e) = self.muxer.register(&self.epoll) {
            log::error!("virtio-vsock: epoll: {e}");
            return;
        }
        self.muxer.accept(&self.epoll);
        self.send_transport_reset();
        let mut events = vec![EpollEvent::default(); 64];
        let mut tx_due = true;
        loop {
            if tx_due {
                tx_due = self.process_tx();
            }
            // Expired connections owe the guest an RST: before the receive queue is filled.
            self.arm_deadline();
            let rx_more = self.process_rx();
            let timeout = if tx_due || rx_more { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-vsock: epoll_wait failed: {e}");
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
                    TIMER_TOKEN => clear_expired(&mut self.timer),
                    TOKEN_LISTENER => self.muxer.accept(&self.epoll),
                    q if q <= EVQ as u64 => {
                        if let Some(k) = kicks.get(q as usize) {
                            let _ = k.read();
                        }
                        if q == TXQ as u64 {
                            tx_due = true;
                        }
                    }
                    token => self.muxer.stream_event(token, ev.event_set()),
                }
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&u64::from(self.cfg.cid).to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

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
        check_queues(&mem, &queues, &kicks, 3)?;
        let event = queues.pop();
        let (Some(tx), Some(rx)) = (queues.pop(), queues.pop()) else {
            return Err(ActivateError::InvalidQueue(0));
        };
        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        let timer = rate_timer(&epoll).map_err(ActivateError::Worker)?;
        watch_kicks(&epoll, &kicks).map_err(ActivateError::Worker)?;
        let worker = VsockWorker {
            mem,
            irq: interrupt.clone(),
            rx,
            tx,
            epoll,
            timer,
            muxer: Muxer::new(
                u64::from(self.cfg.cid),
                self.cfg.path.clone(),
                self.listener.clone(),
                self.stats.clone(),
            ),
            stats: self.stats.clone(),
            rx_buf: vec![0u8; HDR_LEN + MAX_PAYLOAD],
            tx_buf: Vec::with_capacity(HDR_LEN + MAX_PAYLOAD),
            event: event.filter(|_| std::mem::take(&mut self.transport_reset)),
        };
        let thread = Worker::spawn(WorkerClass::Vsock, interrupt, move |ctl| {
            match ctl.watch(&worker.epoll) {
                Ok(()) => worker.run(kicks, ctl),
                Err(e) => log::error!("virtio-vsock: epoll: {e}"),
            }
        })
        .map_err(ActivateError::Worker)?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Stops the worker; every connection is closed (the guest's driver forgot them too).
    fn reset(&mut self) {
        if let Some(t) = self.thread.take() {
            t.stop();
        }
        self.acked = 0;
    }

    /// No state of its own: connections do not survive a snapshot (their host ends are
    /// gone with the old process); the driver hears so at activation.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), LifecycleError> {
        if !state.is_empty() {
            return Err(LifecycleError::BadState(
                "virtio-vsock: unexpected state".into(),
            ));
        }
        self.transport_reset = true;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), LifecycleError> {
        self.thread.as_ref().map_or(Ok(()), Worker::pause)
    }

    fn resume(&mut self) {
        if let Some(t) = &self.thread {
            t.resume();
        }
    }

    fn counters(&self) -> Vec<Stat> {
        let s = &*self.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_packets", l(&s.rx_packets)),
            ("rx_bytes", l(&s.rx_bytes)),
            ("tx_packets", l(&s.tx_packets)),
            ("tx_bytes", l(&s.tx_bytes)),
            ("host_connects", l(&s.host_connects)),
            ("guest_connects", l(&s.guest_connects)),
            ("resets_sent", l(&s.resets_sent)),
            ("refused", l(&s.refused)),
            ("guest_errors", l(&s.guest_errors)),
            ("host_errors", l(&s.host_errors)),
        ]
    }
}
