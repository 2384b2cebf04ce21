//! Transport-agnostic virtio 1.2 devices (split virtqueues, through the `virtio-queue` crate).
//!
//! A device here knows nothing about PCI: it offers features and a config space, and once the
//! driver sets DRIVER_OK the transport hands it ready [`Queue`]s, one kick [`EventFd`] per queue
//! (an ioeventfd, so the vCPU never waits) and a [`VirtioInterrupt`] to signal used buffers.
//! Each device then runs its own worker thread ([`QueueWorker`]); [`VirtioDevice::reset`] stops
//! it and drops the queues, after which the device can be activated again.
//!
//! Guest memory is a plain [`GuestMemoryMmap`] clone: rhyve has no memory hotplug, the regions
//! are `Arc`s, so the clone is cheap and the mapping outlives every worker.

pub mod block;
pub mod chain;
pub mod net;
pub mod pci;
pub mod rng;
pub mod tap;
pub mod vsock;
pub mod worker;

use std::fmt;
use std::io;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::lifecycle::{LifecycleError, Stat};
use crate::rate_limiter::RateLimiter;
use crate::threads::WorkerClass;
pub(crate) use worker::{
    arm_at_most, clear_expired, rate_timer, watch_kicks, Worker, CTL_TOKEN, TIMER_TOKEN,
};

pub use block::{Block, BlockConfig, BlockConfigError, BlockError, BlockStats};
pub use net::{Net, NetConfig, NetConfigError, NetStats, TYPE_NET};
pub use pci::{IoEventRegistrar, VirtioPci};
pub use rng::{Rng, RngStats};
pub use vsock::{Vsock, VsockConfig, TYPE_VSOCK};

/// Guest memory as the devices see it (the same type as `vmmapi::GuestMemoryMmap`).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Feature bit: the device conforms to virtio 1.x (required by the modern transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: indirect descriptor tables (handled by `virtio-queue`'s chain iterator).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Device type of virtio-blk.
pub const TYPE_BLOCK: u32 = 2;
/// Device type of virtio-rng (bhyve's `virtio-rnd`).
pub const TYPE_RNG: u32 = 4;

/// What the transport offers a device; implemented by virtio-pci (MSI-X/INTx).
pub trait VirtioInterrupt: Send + Sync {
    /// Signal "used buffer" for `queue` (the MSI-X vector of that queue, or INTx + ISR bit 0).
    fn queue_used(&self, queue: u16);
    /// Signal a configuration change (the config MSI-X vector, or INTx + ISR bit 1).
    fn config_changed(&self);
    /// The device failed (its worker panicked): set DEVICE_NEEDS_RESET and signal a
    /// configuration change, so the driver resets it.
    fn device_failed(&self);
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// the device expects {expected} queue(s) and kick eventfd(s), the transport gave {queues} and {kicks}
    #[error("the device expects {expected} queue(s) and kick eventfd(s), the transport gave {queues} and {kicks}")]
    QueueCount {
        expected: usize,
        queues: usize,
        kicks: usize,
    },
    /// queue {0} is not ready or its rings lie outside guest memory
    #[error("queue {0} is not ready or its rings lie outside guest memory")]
    InvalidQueue(usize),
    /// queue {0}'s rings overlap each other or another queue's
    #[error("queue {0}'s rings overlap each other or another queue's")]
    OverlappingRings(usize),
    /// the device is already active (reset it first)
    #[error("the device is already active (reset it first)")]
    AlreadyActive,
    /// cannot start the device's worker thread
    #[error("cannot start the device's worker thread: {0}")]
    Worker(#[source] io::Error),
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// Virtio device type: [`TYPE_BLOCK`], [`TYPE_RNG`].
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered features, including `VIRTIO_F_VERSION_1` (bit 32).
    fn features(&self) -> u64;
    /// What the driver accepted; bits that were not offered are ignored.
    fn ack_features(&mut self, features: u64);
    /// Reads device-specific config space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific config space (read-only fields ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Driver set DRIVER_OK: start processing. `queues` are ready queues (size, ring addresses
    /// and `ready` set by the transport), `kicks` one eventfd per queue (the ioeventfd of its
    /// notify address). Refused while already active.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
    ) -> Result<(), ActivateError>;
    /// Device reset (status 0): stops the worker thread (waits for the request in flight) and
    /// drops the queues; the device can be activated again. A no-op when not active.
    fn reset(&mut self);
    /// Parks the worker (no guest-memory or backend access until [`resume`](Self::resume));
    /// Ok at once when not active. (Activation comes from a vCPU's write, and the VMM
    /// pauses vCPUs before devices.)
    fn pause(&mut self) -> Result<(), LifecycleError>;
    /// Lets the worker go on.
    fn resume(&mut self);
    /// The device's counters, for `rhyvectl --get-stats`.
    /// Applies a change to the backend; Ok(true) when the device configuration changed
    /// (the transport then tells the driver).
    fn update(&mut self, _update: &crate::lifecycle::DeviceUpdate) -> Result<bool, String> {
        Err("this device cannot be changed while it runs".into())
    }
    fn counters(&self) -> Vec<Stat>;
    /// The device's own state for a snapshot, besides what the transport saves (features,
    /// queues); none for most devices.
    fn save_state(&self) -> Result<Vec<u8>, LifecycleError> {
        Ok(Vec::new())
    }
    /// Puts [`save_state`](Self::save_state)'s bytes back, before activation.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), LifecycleError> {
        match state {
            [] => Ok(()),
            _ => Err(LifecycleError::BadState(format!(
                "{} bytes of device state for a device that has none",
                state.len()
            ))),
        }
    }
    /// Activated again from a snapshot (e.g. vsock tells the driver its connections are gone).
    fn restored(&mut self) {}
}

/// Checks the queue and kick counts and that every queue is usable in `mem`.
pub(crate) fn check_queues(
    mem: &GuestMemoryMmap,
    queues: &[Queue],
    kicks: &[EventFd],
    expected: usize,
) -> Result<(), ActivateError> {
    if queues.len() != expected || kicks.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            queues: queues.len(),
            kicks: kicks.len(),
        });
    }
    if let Some(i) = queues.iter().position(|q| !q.is_valid(mem)) {
        return Err(ActivateError::InvalidQueue(i));
    }
    match overlapping(queues) {
        Some(i) => Err(ActivateError::OverlappingRings(i)),
        None => Ok(()),
    }
}

/// The first queue whose rings overlap each other or another queue's: a used ring over a
/// descriptor table (or another queue's ring) would have the device rewrite what it is about
/// to read. Refused at activation, the device then needs a reset.
pub(crate) fn overlapping<'a>(queues: impl IntoIterator<Item = &'a Queue>) -> Option<usize> {
    let areas: Vec<(usize, u64, u64)> = queues
        .into_iter()
        .enumerate()
        .flat_map(|(i, q)| {
            let n = u64::from(q.size());
            [
                (i, q.desc_table(), 16 * n),
                (i, q.avail_ring(), 6 + 2 * n),
                (i, q.used_ring(), 6 + 8 * n),
            ]
        })
        .collect();
    for (k, &(i, a, alen)) in areas.iter().enumerate() {
        for &(_, b, blen) in &areas[k + 1..] {
            if a < b.saturating_add(blen) && b < a.saturating_add(alen) {
                return Some(i);
            }
        }
    }
    None
}

/// Activation shared by the one-queue devices: refuses a second activation, checks the
/// queues, and starts `name`'s worker, which at start and on every kick runs `drain` on the
/// queue (returning whether chains were used) and then signals the queue once per batch.
pub(crate) fn activate_single_queue<F>(
    worker: &mut Option<Worker>,
    class: WorkerClass,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    mut queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    mut drain: F,
) -> Result<(), ActivateError>
where
    F: FnMut(&mut Queue, &GuestMemoryMmap) -> Drained + Send + 'static,
{
    if worker.is_some() {
        return Err(ActivateError::AlreadyActive);
    }
    check_queues(&mem, &queues, &kicks, 1)?;
    let Some(mut queue) = queues.pop() else {
        return Err(ActivateError::InvalidQueue(0));
    };
    let irq = interrupt.clone();
    let started = spawn_queue_worker(class, interrupt, kicks, move |_| {
        let done = drain(&mut queue, &mem);
        if done.notify {
            irq.queue_used(0);
        }
        done
    })
    .map_err(ActivateError::Worker)?;
    *worker = Some(started);
    Ok(())
}

/// Counts a guest mistake; logs the first one of each counter at warn level, the rest at debug.
pub(crate) fn guest_error(counter: &AtomicU64, args: fmt::Arguments) {
    if counter.fetch_add(1, Ordering::Relaxed) == 0 {
        log::warn!("{args} (further guest errors of this device are only counted)");
    } else {
        log::debug!("{args}");
    }
}

/// Chains one [`drain_queue`] call handles at most: a driver that keeps the ring full (another
/// vCPU adding as fast as the worker takes) must not keep the worker from its control events
/// (pause, stop, reset) for ever.
pub(crate) const DRAIN_BUDGET: usize = 256;

/// What a [`drain_queue`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Chains were used and the driver wants an interrupt.
    pub notify: bool,
    /// The budget ran out with chains still available: call again (after control events).
    pub more: bool,
    /// The rate limit stopped the drain: call again after this long (no kick will come).
    pub wait: Option<std::time::Duration>,
}

/// Pops the available chains of `queue` (re-checking after re-enabling notifications, so no
/// kick is lost), at most [`DRAIN_BUDGET`], hands each to `handle`, which returns the used
/// length, and puts it in the used ring. A corrupt avail ring (index too far ahead) or a head
/// outside the queue is counted in `errors` and skipped; nothing here panics on guest data.
pub(crate) fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    errors: &AtomicU64,
    mut handle: F,
) -> Drained
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    drain_queue_limited(queue, mem, errors, &mut RateLimiter::unlimited(), |c| {
        (handle(c), 0)
    })
}

/// [`drain_queue`] under `limiter`: `handle` returns the used length and the bytes the
/// request moved (what the limiter is charged). A chain the limiter does not admit yet stays
/// available (the ring's position goes back to it) and [`Drained::wait`] says when to retry.
pub(crate) fn drain_queue_limited<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    errors: &AtomicU64,
    limiter: &mut RateLimiter,
    mut handle: F,
) -> Drained
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> (u32, u64),
{
    let mut used = false;
    let mut budget = DRAIN_BUDGET;
    let mut more = false;
    let mut wait = None;
    'drain: loop {
        // Without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY: no kicks while we are busy.
        let _ = queue.disable_notification(mem);
        let start = queue.next_avail();
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(iter) => iter.take(budget).collect(),
            Err(e) => {
                guest_error(errors, format_args!("virtio: unusable avail ring: {e}"));
                break;
            }
        };
        budget -= chains.len();
        for (k, chain) in chains.into_iter().enumerate() {
            if let Some(w) = limiter.check() {
                // Not yet: this chain and the ones after it stay in the ring.
                queue.set_next_avail(start.wrapping_add(k as u16));
                wait = Some(w);
                break 'drain;
            }
            let head = chain.head_index();
            let (len, moved) = handle(chain);
            limiter.charge(moved);
            match queue.add_used(mem, head, len) {
                Ok(()) => used = true,
                Err(e) => guest_error(
                    errors,
                    format_args!("virtio: cannot return descriptor {head}: {e}"),
                ),
            }
        }
        if budget == 0 {
            // Notifications stay off: the caller comes back without a kick.
            more = true;
            break;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue, // more arrived while notifications were off
            Ok(false) => break,
            Err(e) => {
                guest_error(errors, format_args!("virtio: cannot re-enable kicks: {e}"));
                break;
            }
        }
    }
    Drained {
        notify: used && queue.needs_notification(mem).unwrap_or(true),
        more,
        wait,
    }
}

/// Starts the worker for a device whose work is all in its queues: it runs `handler(i)` once
/// per queue at start (buffers may have been made available before DRIVER_OK) and then on
/// each kick of queue `i`. A handler whose budget ran out ([`Drained::more`]) kicks its queue
/// itself, so the next round looks at control events first; one the rate limit stopped
/// ([`Drained::wait`]) is run again when the worker's timer fires.
pub(crate) fn spawn_queue_worker<F>(
    class: WorkerClass,
    interrupt: Arc<dyn VirtioInterrupt>,
    kicks: Vec<EventFd>,
    mut handler: F,
) -> io::Result<Worker>
where
    F: FnMut(usize) -> Drained + Send + 'static,
{
    let epoll = Epoll::new()?;
    let timer = rate_timer(&epoll)?;
    watch_kicks(&epoll, &kicks)?;
    Worker::spawn(class, interrupt, move |ctl| {
        if let Err(e) = ctl.watch(&epoll) {
            log::error!("virtio worker: epoll: {e}");
            return;
        }
        let mut timer = timer;
        let run = |i: usize, handler: &mut F, timer: &mut TimerFd| {
            let done = handler(i);
            if done.more {
                if let Some(k) = kicks.get(i) {
                    let _ = k.write(1);
                }
            }
            if let Some(w) = done.wait {
                arm_at_most(timer, w);
            }
        };
        for i in 0..kicks.len() {
            run(i, &mut handler, &mut timer);
        }
        let mut events = vec![EpollEvent::default(); kicks.len() + 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio worker: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == CTL_TOKEN {
                    if !ctl.on_event() {
                        return;
                    }
                } else if token == TIMER_TOKEN {
                    clear_expired(&mut timer);
                    for i in 0..kicks.len() {
                        run(i, &mut handler, &mut timer);
                    }
                } else if let Some(kick) = kicks.get(token as usize) {
                    // Non-blocking or not, epoll said it is readable: this clears it.
                    let _ = kick.read();
                    run(token as usize, &mut handler, &mut timer);
                }
            }
        }
    })
}

/// Copies `len` bytes of config space image `config` at `offset` into `data` (zeros past the end).
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A hand-built driver side of one split virtqueue in real guest memory.

    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};
    use vm_memory::{Address, Bytes, GuestAddress};

    pub const F_NEXT: u16 = 1;
    pub const F_WRITE: u16 = 2;
    pub const F_INDIRECT: u16 = 4;

    pub const MEM_SIZE: usize = 4 << 20;
    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x3000;
    pub const USED: u64 = 0x4000;
    pub const DATA: u64 = 0x10000;

    /// The driver: descriptor table, avail ring and used ring of one queue, plus a bump
    /// allocator for buffers.
    pub struct Driver {
        pub mem: GuestMemoryMmap,
        pub size: u16,
        next_desc: u16,
        avail_idx: u16,
        next_data: u64,
    }

    impl Driver {
        pub fn new(size: u16) -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            Driver {
                mem,
                size,
                next_desc: 0,
                avail_idx: 0,
                next_data: DATA,
            }
        }

        /// The device-side queue, set up as the transport will: size, addresses, ready.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
            q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
            q.set_ready(true);
            assert!(q.is_valid(&self.mem));
            q
        }

        /// Allocates `len` bytes of (zeroed) buffer space, 16-aligned.
        pub fn alloc(&mut self, len: u64) -> u64 {
            let a = self.next_data;
            self.next_data = (a + len + 15) & !15;
            assert!(
                self.next_data <= MEM_SIZE as u64,
                "test driver out of memory"
            );
            let zeros = vec![0u8; len as usize];
            self.mem.write_slice(&zeros, GuestAddress(a)).unwrap();
            a
        }

        /// Allocates a buffer holding `bytes`.
        pub fn buf(&mut self, bytes: &[u8]) -> u64 {
            let a = self.alloc(bytes.len() as u64);
            self.mem.write_slice(bytes, GuestAddress(a)).unwrap();
            a
        }

        pub fn write_desc(&self, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let base = GuestAddress(table + 16 * u64::from(idx));
            self.mem.write_obj(addr.to_le(), base).unwrap();
            self.mem
                .write_obj(len.to_le(), base.unchecked_add(8))
                .unwrap();
            self.mem
                .write_obj(flags.to_le(), base.unchecked_add(12))
                .unwrap();
            self.mem
                .write_obj(next.to_le(), base.unchecked_add(14))
                .unwrap();
        }

        /// Writes a chain of `(addr, len, device-writable)` descriptors and makes it available.
        pub fn push_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in descs.iter().enumerate() {
                let idx = (head + i as u16) % self.size;
                let last = i + 1 == descs.len();
                let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                self.write_desc(DESC, idx, addr, len, flags, (idx + 1) % self.size);
            }
            self.next_desc = (head + descs.len() as u16) % self.size;
            self.publish(head);
            head
        }

        /// Puts `head` in the avail ring and bumps avail.idx.
        pub fn publish(&mut self, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            self.mem
                .write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.set_avail_idx(self.avail_idx);
        }

        pub fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx.to_le(), GuestAddress(AVAIL + 2))
                .unwrap();
        }

        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        /// Used ring element `i`: (descriptor id, length).
        pub fn used(&self, i: u16) -> (u32, u32) {
            let a = USED + 4 + 8 * u64::from(i % self.size);
            (
                self.mem.read_obj(GuestAddress(a)).unwrap(),
                self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
            )
        }

        pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    /// An interrupt that counts.
    #[derive(Default)]
    pub struct CountingInterrupt {
        pub used: AtomicU64,
        pub config: AtomicU64,
        pub failed: AtomicU64,
    }

    impl VirtioInterrupt for CountingInterrupt {
        fn queue_used(&self, _queue: u16) {
            self.used.fetch_add(1, Ordering::SeqCst);
        }
        fn config_changed(&self) {
            self.config.fetch_add(1, Ordering::SeqCst);
        }
        fn device_failed(&self) {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Waits until `f` holds (5 s at most).
    pub fn wait_for(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        f()
    }

    /// A deterministic xorshift PRNG for the hostile tests.
    pub struct XorShift(pub u64);

    impl XorShift {
        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// A unique scratch directory under the system temp dir, removed on drop.
    pub struct TempDir(pub std::path::PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "rhyve-virtio-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub fn path(&self, name: &str) -> std::path::PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn config_bytes_past_the_end_read_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn rings_that_overlap_are_refused() {
        let drv = Driver::new(16);
        let kick = || EventFd::new(0).unwrap();
        assert!(check_queues(&drv.mem, &[drv.queue()], &[kick()], 1).is_ok());
        // The used ring over the descriptor table.
        let mut q = drv.queue();
        q.try_set_used_ring_address(vm_memory::GuestAddress(DESC + 0x40))
            .unwrap();
        assert!(matches!(
            check_queues(&drv.mem, &[q], &[kick()], 1),
            Err(ActivateError::OverlappingRings(0))
        ));
        // Two queues on the same rings.
        assert!(matches!(
            check_queues(&drv.mem, &[drv.queue(), drv.queue()], &[kick(), kick()], 2),
            Err(ActivateError::OverlappingRings(0))
        ));
    }

    #[test]
    fn drain_survives_a_corrupt_avail_index() {
        let drv = Driver::new(16);
        let mut q = drv.queue();
        drv.set_avail_idx(1000); // more than the queue size ahead
        let errors = AtomicU64::new(0);
        let done = drain_queue(&mut q, &drv.mem, &errors, |_| 0);
        assert_eq!(done, Drained::default());
        assert_eq!(errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn drain_skips_heads_outside_the_queue() {
        let mut drv = Driver::new(16);
        let mut q = drv.queue();
        drv.publish(200);
        let errors = AtomicU64::new(0);
        let mut seen = 0;
        drain_queue(&mut q, &drv.mem, &errors, |_| {
            seen += 1;
            0
        });
        assert_eq!(seen, 1);
        assert_eq!(errors.load(Ordering::Relaxed), 1);
        assert_eq!(drv.used_idx(), 0);
    }

    #[test]
    fn wrong_queue_count_is_refused() {
        let drv = Driver::new(16);
        let err = check_queues(&drv.mem, &[], &[], 1).unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { expected: 1, .. }));
        let mut q = drv.queue();
        q.set_ready(false);
        let k = EventFd::new(EFD_NONBLOCK).unwrap();
        let err = check_queues(&drv.mem, &[q], &[k], 1).unwrap_err();
        assert!(matches!(err, ActivateError::InvalidQueue(0)));
    }
}
