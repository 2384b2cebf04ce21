//! A named VM: KVM VM fd, guest RAM, in-kernel irqchip and PIT.

use std::path::Path;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_pit_config, kvm_userspace_memory_region,
    CpuId, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{cpuid, kvm_err, GuestRam, Hypervisor, Result, RunDir, Vcpu};

/// KVM wants three pages for the VMX real-mode TSS and one for the identity map; put them
/// just under the 4 GiB boundary, in the PCI hole, where no RAM lives.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// One GSI → irqchip pin route.
fn route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    e
}

/// The PC's wiring, as firmware tables (MP table, MADT) describe it: ISA IRQs 0–15 reach the
/// 8259 pair and the IOAPIC, except that the PIT's IRQ 0 arrives on IOAPIC pin 2 (the
/// interrupt source override every PC has); GSIs 16–23 are IOAPIC-only. KVM's default routing
/// sends GSI 0 to pin 0, which would leave a guest that follows the tables without a timer.
fn pc_gsi_routing() -> Result<KvmIrqRouting> {
    let mut entries = Vec::new();
    for irq in 0..16 {
        if irq != 2 {
            let (chip, pin) = if irq < 8 {
                (KVM_IRQCHIP_PIC_MASTER, irq)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, irq - 8)
            };
            entries.push(route(irq, chip, pin));
        }
    }
    entries.push(route(0, KVM_IRQCHIP_IOAPIC, 2));
    for gsi in (1..24).filter(|g| *g != 2) {
        entries.push(route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    KvmIrqRouting::from_entries(&entries)
        .map_err(|_| crate::Error::Memory("GSI routing table too large".into()))
}

/// A virtual machine (bhyve: `vm_create` + `vm_setup_memory`).
pub struct Vm {
    name: String,
    fd: VmFd,
    ram: GuestRam,
    supported_cpuid: CpuId,
    // Dropped last: removes the runtime directory once KVM objects are gone.
    rundir: RunDir,
}

impl Vm {
    /// Creates VM `name` with guest RAM laid out as `ram_regions` (guest physical address,
    /// length) — e.g. below and above the 3–4 GiB PCI hole — backed by one file in the VM's
    /// runtime directory. Also creates the in-kernel IOAPIC/PIC/LAPIC and the PIT.
    pub fn create(hv: &Hypervisor, name: &str, ram_regions: &[(u64, u64)]) -> Result<Self> {
        let rundir = RunDir::create(name)?;
        if let Some(pid) = rundir.stale_pid {
            log::warn!("VM {name}: cleared a stale runtime directory left by pid {pid}");
        }
        let fd = hv.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Only needed on Intel hosts for real-mode emulation; some KVMs refuse it.
        if let Err(e) = fd.set_tss_address(TSS_ADDRESS) {
            log::debug!("KVM_SET_TSS_ADDR not available: {e}");
        }
        if let Err(e) = fd.set_identity_map_address(IDENTITY_MAP_ADDRESS) {
            log::debug!("KVM_SET_IDENTITY_MAP_ADDR not available: {e}");
        }
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.set_gsi_routing(&pc_gsi_routing()?)
            .map_err(kvm_err("KVM_SET_GSI_ROUTING"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let file = rundir.create_memory_file()?;
        let ram = GuestRam::new(&file, ram_regions)?;
        for (slot, &(gpa, offset, len)) in ram.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: ram.host_addr(offset),
                flags: 0,
            };
            // SAFETY: the host range belongs to `ram`'s mapping, which this Vm keeps alive
            // at least as long as the VM fd (fields drop in declaration order).
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let supported_cpuid = hv
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Self {
            name: name.to_string(),
            fd,
            ram,
            supported_cpuid,
            rundir,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The runtime directory (`memory`, `pid`, …).
    pub fn rundir(&self) -> &Path {
        self.rundir.path()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Creates vCPU `id` of `nr_vcpus`, with CPUID and in-kernel LAPIC set up for an OS.
    pub fn create_vcpu(&self, id: u32, nr_vcpus: u32) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&self.supported_cpuid, id, nr_vcpus);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let vcpu = Vcpu::new(id, fd, self.ram.clone());
        vcpu.setup_lapic()?;
        vcpu.set_boot_msrs()?;
        Ok(vcpu)
    }

    /// Signals `fd` → GSI `gsi` in the in-kernel irqchip (KVM_IRQFD).
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// A guest write to port `port` signals `fd` without leaving the kernel (KVM_IOEVENTFD).
    pub fn register_pio_eventfd(&self, fd: &EventFd, port: u16) -> Result<()> {
        self.fd
            .register_ioevent(
                fd,
                &IoEventAddress::Pio(u64::from(port)),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    /// A guest write of any width to guest-physical `addr` signals `fd` without leaving the
    /// kernel (KVM_IOEVENTFD, MMIO, no datamatch): virtqueue notify addresses.
    pub fn register_mmio_eventfd(&self, fd: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    /// Removes an ioeventfd registered with [`Vm::register_mmio_eventfd`] (same fd and address).
    pub fn unregister_mmio_eventfd(&self, fd: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
            .map_err(kvm_err("KVM_IOEVENTFD (deassign)"))
    }

    /// Drives an irqchip input line (KVM_IRQ_LINE).
    pub fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        self.fd
            .set_irq_line(gsi, level)
            .map_err(kvm_err("KVM_IRQ_LINE"))
    }

    /// Delivers one MSI message now (KVM_SIGNAL_MSI): `addr` is the message address
    /// (0xFEEx_xxxx: destination APIC id, mode), `data` the vector and delivery mode. Returns
    /// whether the interrupt reached a local APIC (false: blocked or no such destination).
    pub fn signal_msi(&self, addr: u64, data: u32) -> Result<bool> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        self.fd
            .signal_msi(msi)
            .map(|n| n > 0)
            .map_err(kvm_err("KVM_SIGNAL_MSI"))
    }

    /// The raw kvm-ioctls VM handle, for features this API does not wrap yet.
    pub fn raw(&self) -> &VmFd {
        &self.fd
    }
}
