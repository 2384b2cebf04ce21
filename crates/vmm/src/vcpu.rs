//! The vCPU threads: one loop per vCPU, every exit dispatched in one `match`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::{StopReason, VmControl};
use vmmapi::{MpState, Vcpu, VmExit};

use crate::exit::{ExitHandler, Fatal, Outcome};
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
    /// Its exits' handling (the buses, its counters).
    pub exits: ExitHandler,
    pub control: Arc<VmControl>,
    /// Its counters (the handler's), for the time in KVM_RUN.
    pub stats: Arc<VcpuStats>,
    pub halt: Arc<HaltProbe>,
    /// Pause/resume, register access and NMI from the control socket.
    pub ctl: Arc<VcpuCtl>,
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
pub fn run(mut vcpu: Vcpu, mut ctx: VcpuContext) {
    let id = vcpu.id();
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
        let outcome = match exit {
            Ok(exit) => {
                exit_incomplete = matches!(
                    exit,
                    VmExit::IoIn { .. }
                        | VmExit::IoOut { .. }
                        | VmExit::MmioRead { .. }
                        | VmExit::MmioWrite { .. }
                );
                ctx.exits.handle(exit)
            }
            Err(e) => {
                exit_incomplete = false;
                Outcome::Stop(StopReason::Error(format!("{e}")))
            }
        };
        let reason = match outcome {
            Outcome::Continue => continue,
            Outcome::Stop(StopReason::Error(msg)) => StopReason::Error(format!("vcpu {id}: {msg}")),
            Outcome::Stop(reason) => reason,
            Outcome::Fatal(fatal) => fatal_report(&mut vcpu, fatal),
        };
        ctx.control.request_stop(reason);
        return;
    }
}

/// The stop a fatal exit means, with what the vCPU's state says about it.
fn fatal_report(vcpu: &mut Vcpu, fatal: Fatal) -> StopReason {
    let id = vcpu.id();
    match fatal {
        Fatal::TripleFault => {
            log::warn!("vcpu {id}: triple fault: {}", describe_state(vcpu));
            StopReason::TripleFault
        }
        Fatal::InternalError => {
            let ie = vcpu.internal_error();
            let bytes = vcpu
                .instruction_bytes()
                .map(|b| hex(&b))
                .unwrap_or_else(|e| e.to_string());
            let data: Vec<String> = ie.data.iter().map(|d| format!("{d:#x}")).collect();
            StopReason::Error(format!(
                "vcpu {id}: KVM internal error: {} (suberror {}, data [{}]); instruction bytes at RIP: [{bytes}]; {}",
                ie.kind(),
                ie.suberror,
                data.join(", "),
                describe_state(vcpu)
            ))
        }
        Fatal::FailEntry { reason, cpu } => StopReason::Error(format!(
            "vcpu {id}: VM entry failed (hardware reason {reason:#x}, host cpu {cpu}); {}",
            describe_state(vcpu)
        )),
        Fatal::Unhandled(what) => StopReason::Error(format!(
            "vcpu {id}: unhandled exit {what}; {}",
            describe_state(vcpu)
        )),
    }
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
    fn answers_belong_to_their_round() {
        let p = HaltProbe::default();
        assert_eq!(p.answer(1), None);
        p.answer
            .store(3 << 2 | HaltedForGood as u64, Ordering::Release);
        assert_eq!(p.answer(3), Some(HaltedForGood));
        assert_eq!(p.answer(4), None);
    }
}
