//! What a vCPU does with each exit: one exhaustive `match` (bhyve's vmexit_handlers[],
//! Firecracker's handle_kvm_exit). Pure: it sees the exit, the buses and the counters, never
//! the vCPU, so every case is unit-tested without KVM. What needs the vCPU's registers for a
//! report (a triple fault, an internal error) comes back as [`Outcome::Fatal`], and the vCPU
//! loop adds them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::{Bus, StopReason};
use vmmapi::VmExit;

use crate::vcpu::VcpuStats;

/// What the vCPU loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Run the vCPU again.
    Continue,
    /// The VM stops for this reason.
    Stop(StopReason),
    /// The VM stops with an error that the vCPU's state should explain.
    Fatal(Fatal),
}

/// Exits that end the VM with a report of the vCPU's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fatal {
    /// The guest triple-faulted (bhyve exits 3).
    TripleFault,
    /// KVM could not emulate something.
    InternalError,
    /// VM entry failed.
    FailEntry { reason: u64, cpu: u32 },
    /// An exit rhyve does not handle.
    Unhandled(String),
}

/// Counts one event on a counter only this vCPU's thread writes: a plain load and store,
/// no locked read-modify-write on the exit path.
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Counts an access for the device that claimed it; whether one did.
fn count_device(counts: &[AtomicU64], dev: Option<usize>) -> bool {
    if let Some(c) = dev.and_then(|i| counts.get(i)) {
        bump(c);
    }
    dev.is_some()
}

/// One vCPU's exit handling: the buses its accesses go to and its counters.
pub struct ExitHandler {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    stats: Arc<VcpuStats>,
    /// `-e`: an access no device claims stops the VM (bhyve's strictio).
    strict_io: bool,
    /// Unclaimed addresses already logged (a bounded set).
    reported: HashSet<u64>,
}

/// Most unclaimed addresses remembered for logging once each.
const MAX_REPORTED: usize = 1024;

impl ExitHandler {
    pub fn new(pio: Arc<Bus>, mmio: Arc<Bus>, stats: Arc<VcpuStats>, strict_io: bool) -> Self {
        ExitHandler {
            pio,
            mmio,
            stats,
            strict_io,
            reported: HashSet::new(),
        }
    }

    /// Handles one exit.
    #[inline]
    pub fn handle(&mut self, exit: VmExit<'_>) -> Outcome {
        let st = &*self.stats;
        match exit {
            VmExit::IoIn { port, size, data } => {
                bump(&st.pio);
                // `rep ins`: one access per element, in order.
                let mut dev = None;
                for element in data.chunks_mut(size.max(1)) {
                    dev = self.pio.read_indexed(u64::from(port), element);
                }
                let claimed = count_device(&st.pio_devices, dev);
                self.unclaimed(claimed, "in", u64::from(port))
            }
            VmExit::IoOut { port, size, data } => {
                bump(&st.pio);
                let mut dev = None;
                for element in data.chunks(size.max(1)) {
                    dev = self.pio.write_indexed(u64::from(port), element);
                }
                let claimed = count_device(&st.pio_devices, dev);
                self.unclaimed(claimed, "out", u64::from(port))
            }
            VmExit::MmioRead { addr, data } => {
                bump(&st.mmio);
                let dev = self.mmio.read_indexed(addr, data);
                let claimed = count_device(&st.mmio_devices, dev);
                self.unclaimed(claimed, "mmio read", addr)
            }
            VmExit::MmioWrite { addr, data } => {
                bump(&st.mmio);
                let dev = self.mmio.write_indexed(addr, data);
                let claimed = count_device(&st.mmio_devices, dev);
                self.unclaimed(claimed, "mmio write", addr)
            }
            VmExit::Interrupted => {
                // A kick (halt check, pause, stop): answered at the top of the vCPU loop.
                bump(&st.interrupted);
                Outcome::Continue
            }
            // With the in-kernel LAPIC, a HLT reaching userspace means the vCPU can never wake.
            VmExit::Hlt => Outcome::Stop(StopReason::Halt),
            VmExit::Shutdown => Outcome::Fatal(Fatal::TripleFault),
            VmExit::Reset => Outcome::Stop(StopReason::Reset),
            VmExit::PowerOff => Outcome::Stop(StopReason::PowerOff),
            VmExit::Crash => Outcome::Stop(StopReason::Error("guest reported a crash".into())),
            VmExit::InternalError => Outcome::Fatal(Fatal::InternalError),
            VmExit::FailEntry { reason, cpu } => Outcome::Fatal(Fatal::FailEntry { reason, cpu }),
            VmExit::Other(what) => {
                bump(&st.other);
                Outcome::Fatal(Fatal::Unhandled(what))
            }
        }
    }

    /// Accesses nothing claims: logged once per address; fatal with `-e` (bhyve's strictio).
    fn unclaimed(&mut self, claimed: bool, what: &str, addr: u64) -> Outcome {
        if claimed {
            return Outcome::Continue;
        }
        if self.strict_io {
            return Outcome::Stop(StopReason::Error(format!(
                "unhandled {what} at {addr:#x} (-e makes this fatal)"
            )));
        }
        if self.reported.len() < MAX_REPORTED && self.reported.insert(addr) {
            log::debug!("unhandled {what} at {addr:#x}");
        }
        Outcome::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;
    use std::sync::Mutex;

    /// A port device that records every access.
    #[derive(Default)]
    struct Recorder {
        log: Vec<(bool, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x10);
            self.log.push((false, offset, data.to_vec()));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.log.push((true, offset, data.to_vec()));
        }
    }

    fn handler(strict: bool) -> (ExitHandler, Arc<Mutex<Recorder>>) {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut pio = Bus::new();
        pio.insert("rec", 0x3f8, 8, dev.clone()).unwrap();
        let mut mmio = Bus::new();
        mmio.insert("rec", 0xd000_0000, 0x1000, dev.clone())
            .unwrap();
        let stats = Arc::new(VcpuStats::for_buses(pio.len(), mmio.len()));
        let h = ExitHandler::new(Arc::new(pio), Arc::new(mmio), stats, strict);
        (h, dev)
    }

    fn n(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn port_and_mmio_accesses_reach_the_device_at_their_offset() {
        let (mut h, dev) = handler(false);
        let out = [0x41u8];
        let exit = VmExit::IoOut {
            port: 0x3f8,
            size: 1,
            data: &out,
        };
        assert_eq!(h.handle(exit), Outcome::Continue);
        let mut input = [0u8; 2];
        let exit = VmExit::IoIn {
            port: 0x3fd,
            size: 2,
            data: &mut input,
        };
        assert_eq!(h.handle(exit), Outcome::Continue);
        assert_eq!(input, [0x15, 0x15]);
        let mut word = [0u8; 4];
        let exit = VmExit::MmioRead {
            addr: 0xd000_0010,
            data: &mut word,
        };
        assert_eq!(h.handle(exit), Outcome::Continue);
        assert_eq!(word, [0x20; 4]);
        let exit = VmExit::MmioWrite {
            addr: 0xd000_0ffc,
            data: &[1, 2, 3, 4],
        };
        assert_eq!(h.handle(exit), Outcome::Continue);
        let log = &dev.lock().unwrap().log;
        assert_eq!(log[0], (true, 0, vec![0x41]));
        assert_eq!(log[1], (false, 5, vec![0x15, 0x15]));
        assert_eq!(log[2], (false, 0x10, vec![0x20; 4]));
        assert_eq!(log[3], (true, 0xffc, vec![1, 2, 3, 4]));
        let st = &h.stats;
        assert_eq!((n(&st.pio), n(&st.mmio)), (2, 2));
        assert_eq!(n(&st.pio_devices[0]), 2);
        assert_eq!(n(&st.mmio_devices[0]), 2);
    }

    #[test]
    fn rep_outs_is_one_access_per_element() {
        let (mut h, dev) = handler(false);
        let data = *b"abc";
        let exit = VmExit::IoOut {
            port: 0x3f8,
            size: 1,
            data: &data,
        };
        assert_eq!(h.handle(exit), Outcome::Continue);
        let log = &dev.lock().unwrap().log;
        let bytes: Vec<_> = log.iter().map(|(_, o, d)| (*o, d.clone())).collect();
        assert_eq!(bytes, [(0, vec![b'a']), (0, vec![b'b']), (0, vec![b'c'])]);
    }

    #[test]
    fn unclaimed_accesses_continue_unless_strict() {
        let (mut h, _) = handler(false);
        let mut b = [0u8; 1];
        for _ in 0..3 {
            let exit = VmExit::IoIn {
                port: 0x99,
                size: 1,
                data: &mut b,
            };
            assert_eq!(h.handle(exit), Outcome::Continue);
        }
        assert_eq!(h.reported.len(), 1);
        let (mut strict, _) = handler(true);
        let exit = VmExit::MmioWrite {
            addr: 0xe000_0000,
            data: &[0],
        };
        assert_eq!(
            strict.handle(exit),
            Outcome::Stop(StopReason::Error(
                "unhandled mmio write at 0xe0000000 (-e makes this fatal)".into()
            ))
        );
    }

    #[test]
    fn stops_and_fatal_exits() {
        let (mut h, _) = handler(false);
        assert_eq!(h.handle(VmExit::Interrupted), Outcome::Continue);
        assert_eq!(n(&h.stats.interrupted), 1);
        assert_eq!(h.handle(VmExit::Hlt), Outcome::Stop(StopReason::Halt));
        assert_eq!(h.handle(VmExit::Reset), Outcome::Stop(StopReason::Reset));
        assert_eq!(
            h.handle(VmExit::PowerOff),
            Outcome::Stop(StopReason::PowerOff)
        );
        assert!(matches!(
            h.handle(VmExit::Crash),
            Outcome::Stop(StopReason::Error(_))
        ));
        assert_eq!(
            h.handle(VmExit::Shutdown),
            Outcome::Fatal(Fatal::TripleFault)
        );
        assert_eq!(
            h.handle(VmExit::InternalError),
            Outcome::Fatal(Fatal::InternalError)
        );
        assert_eq!(
            h.handle(VmExit::FailEntry { reason: 7, cpu: 1 }),
            Outcome::Fatal(Fatal::FailEntry { reason: 7, cpu: 1 })
        );
        assert_eq!(
            h.handle(VmExit::Other("KVM_EXIT_DEBUG".into())),
            Outcome::Fatal(Fatal::Unhandled("KVM_EXIT_DEBUG".into()))
        );
        assert_eq!(n(&h.stats.other), 1);
    }

    #[test]
    fn a_zero_size_access_does_not_panic() {
        let (mut h, _) = handler(false);
        let exit = VmExit::IoOut {
            port: 0x3f8,
            size: 0,
            data: &[1, 2],
        };
        assert_eq!(h.handle(exit), Outcome::Continue);
    }
}
