//! A virtual CPU: registers, LAPIC, MSRs and the run loop's typed exits.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, Msrs,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::{kvm_err, Error, GuestRam, Result};

/// Why `run()` returned: what the guest touched or did (bhyve: `struct vm_exit`).
#[derive(Debug)]
pub enum VmExit<'a> {
    /// `in` from an I/O port the kernel does not handle; fill `data`: `data.len() / size`
    /// accesses of `size` bytes each to `port` (more than one for `rep ins`).
    IoIn {
        port: u16,
        size: usize,
        data: &'a mut [u8],
    },
    /// `out` to an I/O port the kernel does not handle: `data.len() / size` accesses of
    /// `size` bytes (more than one for `rep outs`).
    IoOut {
        port: u16,
        size: usize,
        data: &'a [u8],
    },
    /// Read from guest-physical memory that is not RAM; fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// Write to guest-physical memory that is not RAM.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// HLT that the kernel did not absorb.
    Hlt,
    /// Triple fault (x86 shutdown).
    Shutdown,
    /// The guest asked for a reset through a kernel-emulated path.
    Reset,
    /// The guest asked for power-off through a kernel-emulated path.
    PowerOff,
    /// The guest reported a crash (e.g. Hyper-V/pvpanic-like).
    Crash,
    /// KVM could not handle something; details via [`Vcpu::internal_error`].
    InternalError,
    /// VM entry failed (invalid guest state).
    FailEntry { reason: u64, cpu: u32 },
    /// The run was interrupted by a signal or `immediate_exit`: check for stop requests.
    Interrupted,
    /// Anything else, by KVM exit name.
    Other(String),
}

/// Details of a KVM_EXIT_INTERNAL_ERROR.
#[derive(Debug, Clone)]
pub struct InternalError {
    /// 1 = emulation failure, 2 = simultaneous exception, 3 = delivery event, …
    pub suberror: u32,
    /// Extra words KVM provided.
    pub data: Vec<u64>,
}

impl InternalError {
    /// Human name of the sub-error.
    pub fn kind(&self) -> &'static str {
        match self.suberror {
            1 => "emulation failure",
            2 => "simultaneous exception",
            3 => "exception during event delivery",
            4 => "unexpected exit reason",
            _ => "unknown internal error",
        }
    }
}

/// KVM's multiprocessing states (`KVM_MP_STATE_*`) that x86 vCPUs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpState {
    /// Running guest code (or about to).
    Runnable,
    /// An AP that has not received INIT yet.
    Uninitialized,
    /// An AP after INIT, waiting for a SIPI.
    InitReceived,
    /// Halted in HLT until an interrupt it accepts arrives.
    Halted,
    /// An AP that received its SIPI and is about to start.
    SipiReceived,
    /// Any other state, by number.
    Other(u32),
}

impl MpState {
    fn from_raw(v: u32) -> Self {
        match v {
            KVM_MP_STATE_RUNNABLE => MpState::Runnable,
            KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
            KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
            KVM_MP_STATE_HALTED => MpState::Halted,
            KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
            other => MpState::Other(other),
        }
    }

    /// An AP parked before its start (no INIT/SIPI yet): it runs no guest code.
    pub fn waiting_for_sipi(self) -> bool {
        matches!(self, MpState::Uninitialized | MpState::InitReceived)
    }
}

/// General and control registers in one snapshot, for diagnostics.
#[derive(Debug, Clone, Copy)]
pub struct Registers {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

/// One vCPU. Not `Sync`: it belongs to its thread.
pub struct Vcpu {
    pub(crate) id: u32,
    pub(crate) fd: VcpuFd,
    ram: GuestRam,
    /// Bytes of the mmap'ed `kvm_run` (bounds the I/O data KVM points into it).
    run_size: usize,
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

impl Vcpu {
    pub(crate) fn new(id: u32, fd: VcpuFd, ram: GuestRam, run_size: usize) -> Self {
        Self {
            id,
            fd,
            ram,
            run_size,
        }
    }

    /// The vCPU index (0-based, as in `-p` and the `vcpu N` thread names; the APIC ID is
    /// [`crate::Topology::apic_id`] of it).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Runs the guest until the next exit userspace must handle.
    pub fn run(&mut self) -> Result<VmExit<'_>> {
        // kvm-ioctls' I/O exits lack the access size, which string I/O (`rep ins/outs`:
        // several accesses in one exit) needs: those are decoded from kvm_run below.
        // The exits that carry data are re-read from kvm_run once kvm-ioctls' borrow ended.
        let done = match self.fd.run() {
            Ok(VcpuExit::IoIn(..)) => return self.io_exit(true),
            Ok(VcpuExit::IoOut(..)) => return self.io_exit(false),
            Ok(VcpuExit::MmioRead(..)) | Ok(VcpuExit::MmioWrite(..)) => None,
            other => Some(Self::other_exit(other)?),
        };
        match done {
            Some(exit) => Ok(exit),
            None => Ok(self.mmio_exit()),
        }
    }

    /// The MMIO exit KVM just returned, from `kvm_run`.
    fn mmio_exit(&mut self) -> VmExit<'_> {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last KVM_RUN ended with KVM_EXIT_MMIO (kvm-ioctls said so), which
        // makes `mmio` the union's live member.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = (mmio.len as usize).min(mmio.data.len());
        let addr = mmio.phys_addr;
        if mmio.is_write != 0 {
            VmExit::MmioWrite {
                addr,
                data: &mmio.data[..len],
            }
        } else {
            VmExit::MmioRead {
                addr,
                data: &mut mmio.data[..len],
            }
        }
    }

    /// The I/O exit KVM just returned, from `kvm_run`.
    fn io_exit(&mut self, input: bool) -> Result<VmExit<'_>> {
        let run_size = self.run_size;
        let run = self.fd.get_kvm_run();
        // SAFETY: the last KVM_RUN ended with KVM_EXIT_IO (kvm-ioctls said so), which makes
        // `io` the union's live member.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let len = size * io.count as usize;
        let offset = usize::try_from(io.data_offset).unwrap_or(usize::MAX);
        if size == 0 || offset.checked_add(len).is_none_or(|end| end > run_size) {
            return Ok(VmExit::Other(format!(
                "I/O exit with data outside kvm_run (offset {offset:#x}, {len} bytes)"
            )));
        }
        // SAFETY: [offset, offset + len) lies in this vCPU's kvm_run mapping (checked just
        // above), which lives as long as self.fd; the slice borrows self mutably meanwhile.
        let data = unsafe {
            std::slice::from_raw_parts_mut((run as *mut kvm_run).cast::<u8>().add(offset), len)
        };
        Ok(if input {
            VmExit::IoIn {
                port: io.port,
                size,
                data,
            }
        } else {
            VmExit::IoOut {
                port: io.port,
                size,
                data,
            }
        })
    }

    /// Every exit without data, as kvm-ioctls decoded it (I/O and MMIO are read from
    /// kvm_run by the caller).
    fn other_exit(
        exit: std::result::Result<VcpuExit<'_>, kvm_ioctls::Error>,
    ) -> Result<VmExit<'static>> {
        match exit {
            Ok(exit) => Ok(match exit {
                VcpuExit::Hlt => VmExit::Hlt,
                VcpuExit::Shutdown => VmExit::Shutdown,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    KVM_SYSTEM_EVENT_CRASH => VmExit::Crash,
                    other => VmExit::Other(format!("system event {other}")),
                },
                VcpuExit::InternalError => VmExit::InternalError,
                VcpuExit::FailEntry(reason, cpu) => VmExit::FailEntry { reason, cpu },
                VcpuExit::Intr => VmExit::Interrupted,
                other => VmExit::Other(format!("{other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(Error::Kvm {
                op: "KVM_RUN",
                source: e,
            }),
        }
    }

    /// Makes the next (or current, if a signal interrupts it) `run()` return at once.
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    /// Details of the last [`VmExit::InternalError`].
    pub fn internal_error(&mut self) -> InternalError {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        InternalError {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
        }
    }

    /// General-purpose registers.
    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))
    }

    /// Sets general-purpose registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// Segment, control and descriptor-table registers.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))
    }

    /// Sets segment, control and descriptor-table registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(kvm_err("KVM_SET_SREGS"))
    }

    /// x87/SSE state.
    pub fn fpu(&self) -> Result<kvm_fpu> {
        self.fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))
    }

    /// Sets x87/SSE state.
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.fd.set_fpu(fpu).map_err(kvm_err("KVM_SET_FPU"))
    }

    /// Reads the given MSRs; returns (index, value) for those KVM returned.
    pub fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| Error::Memory("too many MSRs".into()))?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS"))?;
        Ok(msrs
            .as_slice()
            .iter()
            .take(n)
            .map(|e| (e.index, e.data))
            .collect())
    }

    /// Writes MSRs in order until KVM refuses one; returns how many it accepted.
    pub(crate) fn write_msrs(&self, values: &[(u32, u64)]) -> Result<usize> {
        let entries: Vec<kvm_msr_entry> = values
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| Error::Memory("too many MSRs".into()))?;
        self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))
    }

    /// Writes MSRs; fails unless KVM accepted all of them.
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let n = self.write_msrs(values)?;
        if n != values.len() {
            let bad = values.get(n).map(|v| v.0).unwrap_or(0);
            return Err(Error::Kvm {
                op: "KVM_SET_MSRS",
                source: vmm_sys_util::errno::Error::new(libc::EINVAL),
            })
            .inspect_err(|_| log::error!("KVM refused MSR {bad:#x}"));
        }
        Ok(())
    }

    /// Debug registers DR0–DR3, DR6, DR7 (KVM_GET_DEBUGREGS).
    pub fn debug_regs(&self) -> Result<kvm_debugregs> {
        self.fd
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))
    }

    /// Sets the debug registers (KVM_SET_DEBUGREGS).
    pub fn set_debug_regs(&self, d: &kvm_debugregs) -> Result<()> {
        self.fd
            .set_debug_regs(d)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))
    }

    /// Queues a non-maskable interrupt (KVM_NMI), delivered at the next guest entry through
    /// the in-kernel LAPIC (bhyvectl --inject-nmi). Call it from the vCPU's thread, or while
    /// the vCPU is out of KVM_RUN: KVM serialises vCPU ioctls behind the running one.
    pub fn nmi(&self) -> Result<()> {
        self.fd.nmi().map_err(kvm_err("KVM_NMI"))
    }

    /// The in-kernel LAPIC's register page.
    pub fn lapic(&self) -> Result<kvm_lapic_state> {
        self.fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))
    }

    /// Sets the in-kernel LAPIC's register page.
    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()> {
        self.fd.set_lapic(lapic).map_err(kvm_err("KVM_SET_LAPIC"))
    }

    /// The vCPU's multiprocessing state (KVM_GET_MP_STATE): what the in-kernel LAPIC says
    /// the vCPU is doing, e.g. halted in HLT or an AP still waiting for INIT/SIPI.
    pub fn mp_state(&self) -> Result<MpState> {
        let s = self
            .fd
            .get_mp_state()
            .map_err(kvm_err("KVM_GET_MP_STATE"))?;
        Ok(MpState::from_raw(s.mp_state))
    }

    /// Both register sets, for reports.
    pub fn registers(&self) -> Result<Registers> {
        Ok(Registers {
            regs: self.regs()?,
            sregs: self.sregs()?,
        })
    }

    /// Up to 15 instruction bytes at the guest's current RIP (through its page tables).
    pub fn instruction_bytes(&self) -> Result<Vec<u8>> {
        let r = self.registers()?;
        let linear = r.sregs.cs.base.wrapping_add(r.regs.rip);
        let gpa = if r.sregs.cr0 & 0x8000_0000 != 0 {
            let t = self
                .fd
                .translate_gva(linear)
                .map_err(kvm_err("KVM_TRANSLATE"))?;
            if t.valid == 0 {
                return Ok(Vec::new());
            }
            t.physical_address
        } else {
            linear
        };
        let mut bytes = vec![0u8; 15];
        let n = self
            .ram
            .memory()
            .read(&mut bytes, GuestAddress(gpa))
            .unwrap_or(0);
        bytes.truncate(n);
        Ok(bytes)
    }

    /// LINT0 = ExtINT (legacy PIC), LINT1 = NMI, as firmware leaves them for an OS.
    pub(crate) fn setup_lapic(&self) -> Result<()> {
        let mut lapic = self.lapic()?;
        let set_mode = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
            let mut word = [0u8; 4];
            for (i, b) in word.iter_mut().enumerate() {
                *b = regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(word) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                regs[off + i] = *b as std::os::raw::c_char;
            }
        };
        set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.set_lapic(&lapic)
    }

    /// MSR values an OS expects at boot (fast strings on, write-back MTRR default).
    pub(crate) fn set_boot_msrs(&self) -> Result<()> {
        self.set_msrs(&[
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
            (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
        ])
    }
}
