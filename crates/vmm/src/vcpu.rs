//! The vCPU threads: one loop per vCPU, every exit dispatched in one `match`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::{Bus, StopReason, VmControl};
use vmmapi::{MpState, Vcpu, VmExit};

use crate::vcpu_ctl::VcpuCtl;

/// Exit counters per vCPU (rhyvectl --get-stats reads them later).
#[derive(Default, Debug)]
pub struct VcpuStats {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
    /// Nanoseconds spent inside KVM_RUN (including in-kernel HLT), published after each exit.
    pub run_ns: AtomicU64,
    /// This vCPU's exits per device, in the port-I/O and MMIO buses' device order.
    pub pio_devices: Box<[AtomicU64]>,
    pub mmio_devices: Box<[AtomicU64]>,
}

impl VcpuStats {
    /// Counters for buses with `pio` and `mmio` devices.
    pub fn for_buses(pio: usize, mmio: usize) -> Self {
        let zeros = |n| (0..n).map(|_| AtomicU64::new(0)).collect();
        Self {
            pio_devices: zeros(pio),
            mmio_devices: zeros(mmio),
            ..Self::default()
        }
    }
}

/// CLOCK_MONOTONIC_COARSE in ns, for the time in KVM_RUN: a vDSO read of the kernel's last
/// tick, about a quarter of CLOCK_MONOTONIC's cost on the exit path (measured here: 15 vs
/// 62 ns a pair, against ~4.5 µs a PIO exit). Its resolution is one tick (a few ms), but the
/// ticks that land inside KVM_RUN stretches are counted in proportion to the time spent there,
/// so the sum is right on average, and exact to a tick for long stretches.
fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
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

/// What a vCPU answers to the main thread's periodic "are you halted for good?" (bhyve exits
/// 2 when every vCPU sits in HLT with interrupts disabled; with KVM's in-kernel LAPIC a HLT
/// never reaches userspace, so the main thread asks: see [`HaltProbe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaltState {
    /// Running guest code, or halted with interrupts enabled (an interrupt can wake it).
    Active = 0,
    /// In HLT with RFLAGS.IF clear: only an NMI or INIT could wake it.
    HaltedForGood = 1,
    /// An AP that was never started (or was sent INIT): it runs no guest code, and counts
    /// as halted only when the BSP is halted for good too.
    WaitingForSipi = 2,
}

impl HaltState {
    fn from_bits(v: u64) -> Self {
        match v & 3 {
            1 => HaltState::HaltedForGood,
            2 => HaltState::WaitingForSipi,
            _ => HaltState::Active,
        }
    }
}

/// One vCPU's side of halt detection. The main thread [`ask`](Self::ask)s with a new round
/// number and kicks the vCPU out of KVM_RUN (SIGRTMIN); the vCPU thread notices the question
/// at its next loop turn, reads KVM_GET_MP_STATE and RFLAGS, and publishes its
/// [`HaltState`] tagged with the round. Cost: one kick and two ioctls per vCPU per period.
#[derive(Default, Debug)]
pub struct HaltProbe {
    /// The round asked about (0: no question pending).
    asked: AtomicU64,
    /// The last answer: `round << 2 | HaltState`.
    answer: AtomicU64,
}

impl HaltProbe {
    /// Asks the vCPU to report its state for `round` (> 0); the caller then kicks it.
    pub fn ask(&self, round: u64) {
        self.asked.store(round, Ordering::Release);
    }

    /// The vCPU's answer for `round`, if it gave one.
    pub fn answer(&self, round: u64) -> Option<HaltState> {
        let a = self.answer.load(Ordering::Acquire);
        (a >> 2 == round).then(|| HaltState::from_bits(a))
    }

    /// Whether a question waits for an answer.
    fn is_pending(&self) -> bool {
        self.asked.load(Ordering::Relaxed) != 0
    }

    /// Called by the vCPU thread between runs: answers a pending question.
    fn poll(&self, vcpu: &Vcpu) {
        // A plain load on the hot path; the swap only when a question is pending.
        if self.asked.load(Ordering::Relaxed) == 0 {
            return;
        }
        let round = self.asked.swap(0, Ordering::AcqRel);
        if round == 0 {
            return;
        }
        let state = halt_state(vcpu);
        self.answer
            .store(round << 2 | state as u64, Ordering::Release);
    }
}

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// Where this (not running) vCPU stands, from the in-kernel LAPIC's view and RFLAGS.IF.
fn halt_state(vcpu: &Vcpu) -> HaltState {
    match vcpu.mp_state() {
        Ok(s) if s.waiting_for_sipi() => HaltState::WaitingForSipi,
        Ok(MpState::Halted) => match vcpu.regs() {
            Ok(r) if r.rflags & RFLAGS_IF == 0 => HaltState::HaltedForGood,
            _ => HaltState::Active,
        },
        _ => HaltState::Active,
    }
}

/// Whether a round's answers say the machine is halted for good: every vCPU answered, each is
/// halted with interrupts off or an AP that never started, and the BSP (vCPU 0) is halted.
pub fn all_halted(answers: &[Option<HaltState>]) -> bool {
    answers.first() == Some(&Some(HaltState::HaltedForGood))
        && answers.iter().all(|a| {
            matches!(
                a,
                Some(HaltState::HaltedForGood) | Some(HaltState::WaitingForSipi)
            )
        })
}

/// What one vCPU needs to run.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VmControl>,
    pub stats: Arc<VcpuStats>,
    pub halt: Arc<HaltProbe>,
    /// Pause/resume, register access and NMI from the control socket.
    pub ctl: Arc<VcpuCtl>,
    pub strict_io: bool,
}

/// A one-line register summary for error reports.
fn describe_state(vcpu: &Vcpu) -> String {
    match vcpu.registers() {
        Ok(r) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            r.regs.rip, r.regs.rsp, r.regs.rflags, r.regs.rax, r.regs.rbx, r.regs.rcx, r.regs.rdx,
            r.regs.rsi, r.regs.rdi, r.sregs.cr0, r.sregs.cr3, r.sregs.cr4, r.sregs.efer, r.sregs.cs.selector
        ),
        Err(e) => format!("registers unavailable: {e}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `vcpu` until the VM stops.
pub fn run(mut vcpu: Vcpu, ctx: VcpuContext) {
    let id = vcpu.id();
    let mut reported_ports = HashSet::new();
    let _attached = ctx.ctl.attach();
    let mut run_ns = 0u64;
    // The last exit was I/O or MMIO: KVM completes it (IN data into RAX, RIP past the
    // instruction) only on the next KVM_RUN, so until then the registers are not the guest's.
    let mut exit_incomplete = false;
    let mut immediate_exit = false;
    loop {
        // Registers are wanted right after an I/O exit: first let KVM finish that exit
        // without running guest code (KVM_RUN with immediate_exit returns EINTR once it
        // has), then answer on the next turn.
        let completing = exit_incomplete && (ctx.ctl.is_pending() || ctx.halt.is_pending());
        if completing != immediate_exit {
            vcpu.set_immediate_exit(completing);
            immediate_exit = completing;
        }
        if !completing {
            ctx.halt.poll(&vcpu);
            ctx.ctl.poll(&vcpu, &ctx.control);
            if ctx.control.stopping() {
                return;
            }
        }
        let entered = coarse_ns();
        let exit = vcpu.run();
        // Only this thread writes the counter: a plain store, no read-modify-write.
        run_ns += coarse_ns().saturating_sub(entered);
        ctx.stats.run_ns.store(run_ns, Ordering::Relaxed);
        exit_incomplete = matches!(
            exit,
            Ok(VmExit::IoIn { .. })
                | Ok(VmExit::IoOut { .. })
                | Ok(VmExit::MmioRead { .. })
                | Ok(VmExit::MmioWrite { .. })
        );
        let outcome: Option<StopReason> = match exit {
            Ok(VmExit::IoIn { port, size, data }) => {
                bump(&ctx.stats.pio);
                // `rep ins`: one access per element, in order.
                let mut dev = None;
                for element in data.chunks_mut(size) {
                    dev = ctx.pio.read_indexed(u64::from(port), element);
                }
                let claimed = count_device(&ctx.stats.pio_devices, dev);
                unclaimed(&ctx, claimed, "in", u64::from(port), &mut reported_ports)
            }
            Ok(VmExit::IoOut { port, size, data }) => {
                bump(&ctx.stats.pio);
                let mut dev = None;
                for element in data.chunks(size) {
                    dev = ctx.pio.write_indexed(u64::from(port), element);
                }
                let claimed = count_device(&ctx.stats.pio_devices, dev);
                unclaimed(&ctx, claimed, "out", u64::from(port), &mut reported_ports)
            }
            Ok(VmExit::MmioRead { addr, data }) => {
                bump(&ctx.stats.mmio);
                let dev = ctx.mmio.read_indexed(addr, data);
                let claimed = count_device(&ctx.stats.mmio_devices, dev);
                unclaimed(&ctx, claimed, "mmio read", addr, &mut reported_ports)
            }
            Ok(VmExit::MmioWrite { addr, data }) => {
                bump(&ctx.stats.mmio);
                let dev = ctx.mmio.write_indexed(addr, data);
                let claimed = count_device(&ctx.stats.mmio_devices, dev);
                unclaimed(&ctx, claimed, "mmio write", addr, &mut reported_ports)
            }
            Ok(VmExit::Interrupted) => {
                // Perhaps a kick from the halt check: answered at the top of the loop.
                bump(&ctx.stats.interrupted);
                None
            }
            // With the in-kernel LAPIC, a HLT reaching userspace means the vCPU can never wake.
            Ok(VmExit::Hlt) => Some(StopReason::Halt),
            Ok(VmExit::Shutdown) => {
                log::warn!("vcpu {id}: triple fault: {}", describe_state(&vcpu));
                Some(StopReason::TripleFault)
            }
            Ok(VmExit::Reset) => Some(StopReason::Reset),
            Ok(VmExit::PowerOff) => Some(StopReason::PowerOff),
            Ok(VmExit::Crash) => Some(StopReason::Error(format!(
                "vcpu {id}: guest reported a crash"
            ))),
            Ok(VmExit::InternalError) => {
                let ie = vcpu.internal_error();
                let bytes = vcpu
                    .instruction_bytes()
                    .map(|b| hex(&b))
                    .unwrap_or_else(|e| e.to_string());
                let data: Vec<String> = ie.data.iter().map(|d| format!("{d:#x}")).collect();
                Some(StopReason::Error(format!(
                    "vcpu {id}: KVM internal error: {} (suberror {}, data [{}]); instruction bytes at RIP: [{bytes}]; {}",
                    ie.kind(),
                    ie.suberror,
                    data.join(", "),
                    describe_state(&vcpu)
                )))
            }
            Ok(VmExit::FailEntry { reason, cpu }) => Some(StopReason::Error(format!(
                "vcpu {id}: VM entry failed (hardware reason {reason:#x}, host cpu {cpu}); {}",
                describe_state(&vcpu)
            ))),
            Ok(VmExit::Other(what)) => {
                bump(&ctx.stats.other);
                Some(StopReason::Error(format!(
                    "vcpu {id}: unhandled exit {what}; {}",
                    describe_state(&vcpu)
                )))
            }
            Err(e) => Some(StopReason::Error(format!("vcpu {id}: {e}"))),
        };
        if let Some(reason) = outcome {
            ctx.control.request_stop(reason);
            return;
        }
    }
}

/// Accesses nothing claims: logged once per address; fatal with `-e` (bhyve's strictio).
fn unclaimed(
    ctx: &VcpuContext,
    claimed: bool,
    what: &str,
    addr: u64,
    seen: &mut HashSet<u64>,
) -> Option<StopReason> {
    if claimed {
        return None;
    }
    if ctx.strict_io {
        return Some(StopReason::Error(format!(
            "unhandled {what} at {addr:#x} (-e makes this fatal)"
        )));
    }
    if seen.len() < 1024 && seen.insert(addr) {
        log::debug!("unhandled {what} at {addr:#x}");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use HaltState::*;

    #[test]
    fn halted_only_when_every_vcpu_answered_and_the_bsp_is_halted() {
        assert!(all_halted(&[Some(HaltedForGood)]));
        assert!(all_halted(&[Some(HaltedForGood), Some(WaitingForSipi)]));
        assert!(all_halted(&[Some(HaltedForGood), Some(HaltedForGood)]));
        assert!(!all_halted(&[Some(WaitingForSipi), Some(HaltedForGood)]));
        assert!(!all_halted(&[Some(HaltedForGood), None]));
        assert!(!all_halted(&[Some(HaltedForGood), Some(Active)]));
        assert!(!all_halted(&[Some(Active)]));
        assert!(!all_halted(&[]));
    }

    #[test]
    fn the_coarse_clock_moves_forward() {
        let a = coarse_ns();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = coarse_ns();
        // At least one tick passed; never more than the sleep plus a generous margin.
        assert!(b > a && b - a < 5_000_000_000, "{a} {b}");
    }

    #[test]
    fn device_counts_follow_the_bus_index() {
        let s = VcpuStats::for_buses(3, 1);
        assert!(count_device(&s.pio_devices, Some(2)));
        assert!(count_device(&s.pio_devices, Some(2)));
        assert!(!count_device(&s.pio_devices, None));
        // An index past the counters (a bus that grew) is claimed but not counted.
        assert!(count_device(&s.mmio_devices, Some(5)));
        let n: Vec<u64> = s
            .pio_devices
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        assert_eq!(n, [0, 0, 2]);
        bump(&s.pio);
        assert_eq!(s.pio.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn answers_belong_to_their_round() {
        let p = HaltProbe::default();
        assert_eq!(p.answer(1), None);
        p.answer
            .store(3 << 2 | HaltedForGood as u64, Ordering::Release);
        assert_eq!(p.answer(3), Some(HaltedForGood));
        assert_eq!(p.answer(4), None);
    }
}
