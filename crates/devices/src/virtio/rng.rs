//! virtio-rng (bhyve's `virtio-rnd`), virtio 1.2 section 5.4: one queue whose device-writable
//! buffers are filled from the host's getrandom(2), at most [`MAX_PER_REQUEST`] bytes per chain.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{self, ChainLimits};
use super::{
    activate_single_queue, drain_queue, guest_error, ActivateError, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt, Worker, TYPE_RNG, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::lifecycle::{LifecycleError, Stat};
use crate::threads::WorkerClass;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Entropy handed out per request at most (the rest of a larger buffer is left untouched).
pub const MAX_PER_REQUEST: usize = 64 * 1024;

/// Counters (rhyvectl --get-stats).
#[derive(Debug, Default)]
pub struct RngStats {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Random bytes given to the guest.
    pub bytes: AtomicU64,
    /// Guest mistakes: device-readable or out-of-memory buffers.
    pub guest_errors: AtomicU64,
    /// getrandom failures.
    pub host_errors: AtomicU64,
}

/// Fills `buf` from getrandom(2).
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we borrow
        // mutably for the duration of the call.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

/// Fills the device-writable buffers of one chain; returns the bytes written. A chain with
/// device-readable buffers, a buffer outside guest memory or more descriptors than the queue
/// holds gets nothing.
fn process_request(
    stats: &RngStats,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    scratch: &mut Vec<u8>,
) -> u32 {
    let limits = ChainLimits::queue(QUEUE_SIZE);
    let bufs = match chain::parse(chain, mem, limits).checked() {
        Ok(c) if c.readable.is_empty() => c,
        Ok(_) => {
            guest_error(
                &stats.guest_errors,
                format_args!("virtio-rnd: device-readable buffer in a request"),
            );
            return 0;
        }
        Err(why) => {
            guest_error(&stats.guest_errors, format_args!("virtio-rnd: {why}"));
            return 0;
        }
    };
    let mut written = 0usize;
    for seg in &bufs.writable {
        let n = seg.len.min(MAX_PER_REQUEST - written);
        if n == 0 {
            break;
        }
        scratch.resize(n, 0);
        if let Err(e) = getrandom(scratch) {
            stats.host_errors.fetch_add(1, Ordering::Relaxed);
            log::error!("virtio-rnd: getrandom failed: {e}");
            break;
        }
        if mem.write_slice(scratch, seg.addr).is_err() {
            break;
        }
        written += n;
    }
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats.bytes.fetch_add(written as u64, Ordering::Relaxed);
    written as u32
}

/// The virtio-rng device.
pub struct Rng {
    stats: Arc<RngStats>,
    acked: u64,
    worker: Option<Worker>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Rng {
            stats: Arc::new(RngStats::default()),
            acked: 0,
            worker: None,
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<RngStats> {
        self.stats.clone()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Whether the worker runs.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no config space
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let stats = self.stats.clone();
        let mut scratch = Vec::new();
        activate_single_queue(
            &mut self.worker,
            WorkerClass::Rng,
            mem,
            interrupt,
            queues,
            kicks,
            move |queue, mem| {
                drain_queue(queue, mem, &stats.guest_errors, |chain| {
                    process_request(&stats, mem, chain, &mut scratch)
                })
            },
        )
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.acked = 0;
    }

    fn pause(&mut self) -> Result<(), LifecycleError> {
        self.worker.as_ref().map_or(Ok(()), Worker::pause)
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    fn counters(&self) -> Vec<Stat> {
        let s = &*self.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("requests", l(&s.requests)),
            ("bytes", l(&s.bytes)),
            ("guest_errors", l(&s.guest_errors)),
            ("host_errors", l(&s.host_errors)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn run(drv: &Driver, q: &mut Queue, stats: &RngStats) {
        let mut scratch = Vec::new();
        drain_queue(q, &drv.mem, &stats.guest_errors, |c| {
            process_request(stats, &drv.mem, c, &mut scratch)
        });
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mut drv = Driver::new(16);
        let mut q = drv.queue();
        let stats = RngStats::default();
        let a = drv.alloc(64);
        let b = drv.alloc(4096);
        drv.push_chain(&[(a, 64, true), (b, 4096, true)]);
        run(&drv, &mut q, &stats);
        assert_eq!(drv.used_idx(), 1);
        assert_eq!(drv.used(0), (0, 4160));
        let bytes = [drv.read(a, 64), drv.read(b, 4096)].concat();
        // 4160 random bytes are not all zero, and take many distinct values.
        let mut seen = [false; 256];
        bytes.iter().for_each(|&x| seen[x as usize] = true);
        assert!(seen.iter().filter(|&&s| s).count() > 200);
        assert_eq!(stats.bytes.load(Ordering::Relaxed), 4160);
    }

    #[test]
    fn bounded_per_request_and_hostile_buffers() {
        let mut drv = Driver::new(16);
        let mut q = drv.queue();
        let stats = RngStats::default();
        let big = drv.alloc(MAX_PER_REQUEST as u64 + 4096);
        drv.push_chain(&[(big, MAX_PER_REQUEST as u32 + 4096, true)]);
        run(&drv, &mut q, &stats);
        assert_eq!(drv.used(0).1, MAX_PER_REQUEST as u32);
        assert!(drv
            .read(big + MAX_PER_REQUEST as u64, 4096)
            .iter()
            .all(|&x| x == 0));
        // A readable descriptor makes the chain a guest error (one per chain): nothing written.
        let r = drv.buf(&[7; 16]);
        let w = drv.alloc(64);
        drv.push_chain(&[(w, 64, true), (r, 16, false)]);
        run(&drv, &mut q, &stats);
        assert_eq!(drv.used(1).1, 0);
        assert_eq!(drv.read(r, 16), vec![7; 16]);
        assert_eq!(drv.read(w, 64), vec![0; 64]);
        assert_eq!(stats.guest_errors.load(Ordering::Relaxed), 1);
        // So does a buffer outside guest memory, even after a good one.
        drv.push_chain(&[(w, 64, true), (u64::MAX - 8, 64, true)]);
        run(&drv, &mut q, &stats);
        assert_eq!(drv.used(2).1, 0);
        assert_eq!(drv.read(w, 64), vec![0; 64]);
        assert_eq!(stats.guest_errors.load(Ordering::Relaxed), 2);
        // Random descriptor tables: no panic, and the queue keeps being served.
        let mut rng = XorShift(12345);
        for _ in 0..2000 {
            let idx = rng.below(16) as u16;
            let addr = if rng.below(2) == 0 {
                rng.next()
            } else {
                DATA + rng.below(0x1000)
            };
            let len = if rng.below(2) == 0 {
                rng.next() as u32
            } else {
                rng.below(512) as u32
            };
            drv.write_desc(
                DESC,
                idx,
                addr,
                len,
                (rng.next() & 7) as u16,
                rng.below(20) as u16,
            );
            drv.publish(rng.below(20) as u16);
            run(&drv, &mut q, &stats);
        }
    }

    #[test]
    fn activate_kick_reset() {
        let mut dev = Rng::new();
        assert_eq!(dev.device_type(), 4);
        assert!(dev.features() & (1 << 32) != 0);
        dev.ack_features(u64::MAX);
        assert_eq!(dev.acked_features(), dev.features());
        let mut drv = Driver::new(16);
        let irq = Arc::new(CountingInterrupt::default());
        let kick = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        dev.activate(
            drv.mem.clone(),
            irq.clone(),
            vec![drv.queue()],
            vec![kick.try_clone().unwrap()],
        )
        .unwrap();
        let a = drv.alloc(32);
        drv.push_chain(&[(a, 32, true)]);
        kick.write(1).unwrap();
        assert!(wait_for(|| drv.used_idx() == 1));
        assert!(wait_for(|| irq.used.load(Ordering::SeqCst) >= 1));
        assert_eq!(drv.used(0).1, 32);
        dev.reset();
        assert!(!dev.is_active());
        assert_eq!(dev.acked_features(), 0);
        let drv = Driver::new(16);
        dev.activate(drv.mem.clone(), irq, vec![drv.queue()], vec![kick])
            .unwrap();
        dev.reset();
    }
}
