//! The vCPU threads: one loop per vCPU, every exit dispatched in one `match`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::{Bus, StopReason, VmControl};
use vmmapi::{Vcpu, VmExit};

/// Exit counters per vCPU (rhyvectl --get-stats reads them later).
#[derive(Default, Debug)]
pub struct VcpuStats {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

/// What one vCPU needs to run.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VmControl>,
    pub stats: Arc<VcpuStats>,
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
    loop {
        if ctx.control.stopping() {
            return;
        }
        let outcome: Option<StopReason> = match vcpu.run() {
            Ok(VmExit::IoIn { port, data }) => {
                ctx.stats.pio.fetch_add(1, Ordering::Relaxed);
                let claimed = ctx.pio.read(u64::from(port), data);
                unclaimed(&ctx, claimed, "in", u64::from(port), &mut reported_ports)
            }
            Ok(VmExit::IoOut { port, data }) => {
                ctx.stats.pio.fetch_add(1, Ordering::Relaxed);
                let claimed = ctx.pio.write(u64::from(port), data);
                unclaimed(&ctx, claimed, "out", u64::from(port), &mut reported_ports)
            }
            Ok(VmExit::MmioRead { addr, data }) => {
                ctx.stats.mmio.fetch_add(1, Ordering::Relaxed);
                let claimed = ctx.mmio.read(addr, data);
                unclaimed(&ctx, claimed, "mmio read", addr, &mut reported_ports)
            }
            Ok(VmExit::MmioWrite { addr, data }) => {
                ctx.stats.mmio.fetch_add(1, Ordering::Relaxed);
                let claimed = ctx.mmio.write(addr, data);
                unclaimed(&ctx, claimed, "mmio write", addr, &mut reported_ports)
            }
            Ok(VmExit::Interrupted) => {
                ctx.stats.interrupted.fetch_add(1, Ordering::Relaxed);
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
                ctx.stats.other.fetch_add(1, Ordering::Relaxed);
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
