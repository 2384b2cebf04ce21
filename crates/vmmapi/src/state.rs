//! A vCPU's and a VM's KVM state, saved and put back for snapshots: what KVM keeps in the
//! kernel and userspace never sees otherwise (in-kernel LAPIC, irqchip, PIT, kvmclock).
//!
//! Encoded with [`platform::codec`]; KVM's structs go as their raw bytes (zerocopy, so no
//! `unsafe`), each checked for its exact size when read back.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use platform::codec::{DecodeError, Reader, Writer};
use zerocopy::{FromBytes, IntoBytes};

use crate::{kvm_err, Error, Result, Vcpu, Vm};

/// MSR_IA32_TSC: put back last, after everything that KVM may recompute the TSC from.
const MSR_IA32_TSC: u32 = 0x10;

fn put<T: IntoBytes + zerocopy::Immutable>(w: &mut Writer, v: &T) {
    w.bytes(v.as_bytes());
}

fn get<T: FromBytes>(
    r: &mut Reader<'_>,
    what: &'static str,
) -> std::result::Result<T, DecodeError> {
    let b = r.bytes(what)?;
    T::read_from_bytes(b).map_err(|_| {
        DecodeError::Invalid(format!(
            "{what}: {} bytes, this KVM's is {}",
            b.len(),
            std::mem::size_of::<T>()
        ))
    })
}

/// Everything of one vCPU that a restore needs (Firecracker's VcpuState, with XSAVE in
/// place of the FPU state it includes).
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
    /// Every MSR KVM reports (KVM_GET_MSR_INDEX_LIST) that it would read back.
    pub msrs: Vec<(u32, u64)>,
    /// The TSC frequency, when KVM tells it.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        put(&mut w, &self.regs);
        put(&mut w, &self.sregs);
        put(&mut w, &self.xsave);
        put(&mut w, &self.xcrs);
        put(&mut w, &self.lapic);
        put(&mut w, &self.mp_state);
        put(&mut w, &self.events);
        put(&mut w, &self.debug_regs);
        w.u32(self.msrs.len() as u32);
        for &(index, value) in &self.msrs {
            w.u32(index).u64(value);
        }
        w.u32(self.tsc_khz.unwrap_or(0));
        w.finish()
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let regs = get(&mut r, "regs")?;
        let sregs = get(&mut r, "sregs")?;
        let xsave = get(&mut r, "xsave")?;
        let xcrs = get(&mut r, "xcrs")?;
        let lapic = get(&mut r, "lapic")?;
        let mp_state = get(&mut r, "mp_state")?;
        let events = get(&mut r, "vcpu events")?;
        let debug_regs = get(&mut r, "debug regs")?;
        let n = r.count(12, "MSR count")?;
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push((r.u32("MSR index")?, r.u64("MSR value")?));
        }
        let tsc_khz = Some(r.u32("TSC frequency")?).filter(|&k| k != 0);
        r.finish()?;
        Ok(Self {
            regs,
            sregs,
            xsave,
            xcrs,
            lapic,
            mp_state,
            events,
            debug_regs,
            msrs,
            tsc_khz,
        })
    }
}

impl Vcpu {
    /// Reads MSRs `indices`, skipping those KVM lists but refuses to read (KVM_GET_MSRS
    /// stops at the first one it cannot read).
    fn readable_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let got = self.msrs(rest)?;
            let n = got.len();
            out.extend(got);
            // The one at `n` failed: skip it.
            rest = rest.get(n + 1..).unwrap_or(&[]);
        }
        Ok(out)
    }

    /// The vCPU's whole state. Call it on the vCPU's thread while it is out of KVM_RUN with
    /// its last I/O exit completed (see vmm's vCPU loop).
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState> {
        let fd = &self.fd;
        Ok(VcpuState {
            mp_state: fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            regs: self.regs()?,
            sregs: self.sregs()?,
            xsave: fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
            lapic: self.lapic()?,
            events: fd
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            debug_regs: self.debug_regs()?,
            msrs: self.readable_msrs(msr_indices)?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Puts `state` back (a freshly created vCPU with the same CPUID). The order follows
    /// what KVM derives from what: special registers (EFER, CR4) before the MSRs and XSAVE
    /// that depend on them, the LAPIC before the MSRs (TSC deadline), the TSC itself last
    /// among the MSRs, and pending events after everything.
    pub fn restore_state(&self, state: &VcpuState) -> Result<()> {
        let fd = &self.fd;
        if let Some(khz) = state.tsc_khz {
            // A host with another TSC rate: KVM scales, when it can.
            if fd.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = fd.set_tsc_khz(khz) {
                    log::warn!("vcpu {}: cannot set the TSC to {khz} kHz: {e}", self.id);
                }
            }
        }
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        // SAFETY: a 4 KiB kvm_xsave holds all the state of a guest whose XSAVE area has not
        // been enlarged with ARCH_REQ_XCOMP_GUEST_PERM (rhyve never asks for AMX state), so
        // KVM reads no more than the struct.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        // A host without XSAVE has no XCRs: KVM_GET_XCRS gave none, KVM_SET_XCRS would
        // refuse any (EINVAL).
        if state.xcrs.nr_xcrs > 0 {
            fd.set_xcrs(&state.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        self.set_lapic(&state.lapic)?;
        let (tsc, others): (Vec<_>, Vec<_>) =
            state.msrs.iter().partition(|(i, _)| *i == MSR_IA32_TSC);
        self.restore_msrs(&others)?;
        self.restore_msrs(&tsc)?;
        fd.set_mp_state(state.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        self.set_debug_regs(&state.debug_regs)?;
        fd.set_vcpu_events(&state.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Writes `msrs`; one KVM refuses is named in the error (the snapshot came from a KVM
    /// that lets the guest have it, this one does not).
    fn restore_msrs(&self, msrs: &[(u32, u64)]) -> Result<()> {
        if msrs.is_empty() {
            return Ok(());
        }
        let n = self.write_msrs(msrs)?;
        match msrs.get(n) {
            None => Ok(()),
            Some((index, value)) => Err(Error::State(format!(
                "this KVM refuses MSR {index:#x} = {value:#x} of the saved vCPU {}",
                self.id
            ))),
        }
    }
}

/// The VM-wide in-kernel state: both PICs, the IOAPIC, the PIT and kvmclock.
#[derive(Clone)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        put(&mut w, &self.pic_master);
        put(&mut w, &self.pic_slave);
        put(&mut w, &self.ioapic);
        put(&mut w, &self.pit);
        put(&mut w, &self.clock);
        w.finish()
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let s = Self {
            pic_master: get(&mut r, "PIC master")?,
            pic_slave: get(&mut r, "PIC slave")?,
            ioapic: get(&mut r, "IOAPIC")?,
            pit: get(&mut r, "PIT")?,
            clock: get(&mut r, "kvmclock")?,
        };
        r.finish()?;
        let chips = [
            (s.pic_master.chip_id, KVM_IRQCHIP_PIC_MASTER),
            (s.pic_slave.chip_id, KVM_IRQCHIP_PIC_SLAVE),
            (s.ioapic.chip_id, KVM_IRQCHIP_IOAPIC),
        ];
        if chips.iter().any(|(got, want)| got != want) {
            return Err(DecodeError::Invalid("irqchip ids out of order".into()));
        }
        Ok(s)
    }
}

impl Vm {
    fn irqchip(&self, id: u32) -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }

    /// The in-kernel devices' state. Call it with every vCPU paused.
    pub fn save_state(&self) -> Result<VmState> {
        let mut clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        // Only the clock value goes back (KVM_SET_CLOCK refuses unknown flags).
        clock.flags = 0;
        Ok(VmState {
            pic_master: self.irqchip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.irqchip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Puts `state` back, before any vCPU runs.
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        self.fd
            .set_clock(&state.clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hypervisor, MemoryOptions, Topology};

    fn vm(hv: &Hypervisor, tag: &str) -> Vm {
        let name = format!("vmmapi-test-state-{tag}-{}", std::process::id());
        Vm::create(hv, &name, &[(0, 2 << 20)], &MemoryOptions::default()).unwrap()
    }

    /// On the machine's KVM: a vCPU's and a VM's state, changed from their defaults, goes
    /// through its encoding into a second VM and reads back the same there.
    #[test]
    fn vcpu_and_vm_state_survive_encoding_into_another_vm() {
        let hv = Hypervisor::open()
            .unwrap_or_else(|e| panic!("this test needs KVM and could not open it: {e}"));
        let topo = Topology::flat(1);
        let a = vm(&hv, "a");
        let va = a.create_vcpu(0, &topo).unwrap();
        let mut regs = va.regs().unwrap();
        (regs.rax, regs.rip, regs.rsp) = (0x1234_5678, 0xfff0, 0x7000);
        va.set_regs(&regs).unwrap();
        va.set_msrs(&[(0xc000_0102, 0xdead_b000)]).unwrap(); // KERNEL_GS_BASE
        let saved = va.save_state(a.msr_indices()).unwrap();
        assert!(
            saved
                .msrs
                .iter()
                .any(|&(i, v)| i == 0xc000_0102 && v == 0xdead_b000),
            "KERNEL_GS_BASE not among the {} saved MSRs",
            saved.msrs.len()
        );
        let vm_saved = a.save_state().unwrap();
        let bytes = saved.encode();
        let vm_bytes = vm_saved.encode();

        let b = vm(&hv, "b");
        let vb = b.create_vcpu(0, &topo).unwrap();
        b.restore_state(&VmState::decode(&vm_bytes).unwrap())
            .unwrap();
        vb.restore_state(&VcpuState::decode(&bytes).unwrap())
            .unwrap();
        let back = vb.regs().unwrap();
        assert_eq!(
            (back.rax, back.rip, back.rsp),
            (0x1234_5678, 0xfff0, 0x7000)
        );
        assert_eq!(
            vb.msrs(&[0xc000_0102]).unwrap(),
            vec![(0xc000_0102, 0xdead_b000)]
        );
        assert_eq!(vb.lapic().unwrap().regs[..], saved.lapic.regs[..]);

        // Cut anywhere, it is refused (never a panic).
        for n in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(VcpuState::decode(&bytes[..n]).is_err(), "{n} bytes decoded");
        }
        assert!(VmState::decode(&vm_bytes[..vm_bytes.len() - 1]).is_err());
    }
}
