//! A named VM: KVM VM fd, guest RAM, in-kernel irqchip and PIT.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::flash::FlashMemory;
use crate::irq_routing::{GsiTable, IrqRouting};
use crate::{
    cpuid, cpuid::Topology, kvm_err, Error, GuestRam, Hypervisor, MemoryOptions, Result, Vcpu,
    VmObject,
};

/// KVM wants three pages for the VMX real-mode TSS and one for the identity map; put them
/// where QEMU does (0xFEFFC000–0xFEFFFFFF, reserved in its e820): in the PCI hole, above the
/// I/O APIC and below the 16 MiB a boot ROM may take under 4 GiB.
pub const TSS_ADDRESS: usize = 0xfeff_d000;
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfeff_c000;
/// The four pages at [`IDENTITY_MAP_ADDRESS`] that KVM may use (for an e820 reservation).
pub const KVM_PRIVATE_LEN: u64 = 0x4000;

/// A virtual machine (bhyve: `vm_create` + `vm_setup_memory`).
pub struct Vm {
    name: String,
    pub(crate) fd: VmFd,
    ram: GuestRam,
    /// Read-only slots (boot ROMs), after RAM's slots.
    roms: Vec<RomMapping>,
    /// Device-programmed, file-backed slots (firmware variable stores).
    flash: Vec<Arc<FlashMemory>>,
    /// Memory slots by number: RAM's first, then ROMs, flash and device memory as they come.
    slots: Mutex<Vec<Slot>>,
    /// KVM's VFIO pseudo-device (one per VM), once a passed-through function's group joined.
    kvm_vfio: Mutex<Option<kvm_ioctls::DeviceFd>>,
    supported_cpuid: CpuId,
    /// The MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST), for snapshots.
    msr_indices: Vec<u32>,
    /// The GSI routing table: the PC's pins, then MSI routes (None: KVM cannot route).
    routing: Option<IrqRouting>,
    // Dropped last: releases (or, if ephemeral, removes) the VM object once KVM objects
    // are gone.
    object: VmObject,
}

impl Vm {
    /// Creates VM `name` with guest RAM laid out as `ram_regions` (guest physical address,
    /// length) — e.g. below and above the 3–4 GiB PCI hole — backed by one file in the VM's
    /// runtime directory. Also creates the in-kernel IOAPIC/PIC/LAPIC and the PIT.
    pub fn create(
        hv: &Hypervisor,
        name: &str,
        ram_regions: &[(u64, u64)],
        memory: &MemoryOptions,
    ) -> Result<Self> {
        let object = VmObject::create_ephemeral(name)?;
        if let Some(pid) = object.stale_pid() {
            log::warn!("VM {name}: cleared a stale runtime directory left by pid {pid}");
        }
        Self::create_with(hv, object, ram_regions, memory)
    }

    /// Creates the VM of an existing `object` (ephemeral or persistent), mapping the object's
    /// `memory` file as guest RAM. For a persistent object the regions must add up to its
    /// RAM size, and what the file holds (e.g. a kernel rhyveload put there) is kept.
    pub fn create_with(
        hv: &Hypervisor,
        object: VmObject,
        ram_regions: &[(u64, u64)],
        memory: &MemoryOptions,
    ) -> Result<Self> {
        Self::create_inner(hv, object, ram_regions, memory, None)
    }

    /// Creates VM `name` (an ephemeral object) whose guest RAM is a snapshot's memory
    /// `image`, mapped privately ([`GuestRam::from_image`]); the regions must add up to the
    /// image's size.
    pub fn create_from_image(
        hv: &Hypervisor,
        name: &str,
        ram_regions: &[(u64, u64)],
        memory: &MemoryOptions,
        image: &std::fs::File,
    ) -> Result<Self> {
        let object = VmObject::create_ephemeral(name)?;
        if let Some(pid) = object.stale_pid() {
            log::warn!("VM {name}: cleared a stale runtime directory left by pid {pid}");
        }
        Self::create_inner(hv, object, ram_regions, memory, Some(image))
    }

    fn create_inner(
        hv: &Hypervisor,
        object: VmObject,
        ram_regions: &[(u64, u64)],
        memory: &MemoryOptions,
        image: Option<&std::fs::File>,
    ) -> Result<Self> {
        let name = object.name().to_string();
        let total: u64 = ram_regions.iter().map(|r| r.1).sum();
        if object.persistent() && total != object.ram_bytes() {
            return Err(Error::Memory(format!(
                "VM {name} has {} MiB of RAM, not {} MiB",
                object.ram_bytes() >> 20,
                total >> 20
            )));
        }
        if image.is_none() {
            warn_if_ram_may_not_fit(object.path(), total);
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
        // KVM_CAP_IRQ_ROUTING answers with the number of routes (KVM_MAX_IRQ_ROUTES); GSIs
        // must stay below it. The PC routes are needed either way, the MSI routes are not:
        // without the capability, MSIs go through KVM_SIGNAL_MSI.
        let routing = match fd.check_extension_int(Cap::IrqRouting) {
            n if n > 0 => Some(IrqRouting::new(&fd, n as u32)?),
            _ => {
                log::warn!("KVM lacks KVM_CAP_IRQ_ROUTING: the PIT stays on IOAPIC pin 0");
                None
            }
        };
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let ram = match image {
            Some(image) => GuestRam::from_image(image, ram_regions, memory)?,
            None => GuestRam::new(&object.memory_file()?, ram_regions, memory)?,
        };
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
        let msr_indices = hv
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let slots = Mutex::new(vec![Slot::Fixed; ram.regions().len()]);
        Ok(Self {
            name,
            fd,
            ram,
            roms: Vec::new(),
            flash: Vec::new(),
            slots,
            kvm_vfio: Mutex::new(None),
            supported_cpuid,
            msr_indices,
            routing,
            object,
        })
    }

    /// Maps `bytes` read-only at `gpa` (bhyve's boot ROM): guest reads come from a private
    /// copy, guest writes exit as MMIO writes (the caller decides what they do).
    pub fn map_rom(&mut self, gpa: u64, bytes: &[u8]) -> Result<()> {
        let fail = |what: &str| Error::Memory(format!("boot ROM at {gpa:#x}: {what}"));
        if bytes.is_empty() || !bytes.len().is_multiple_of(4096) || !gpa.is_multiple_of(4096) {
            return Err(fail("size and address must be multiples of 4 KiB"));
        }
        self.require_readonly_mem().map_err(&fail)?;
        let rom = RomMapping::new(bytes).map_err(|e| fail(&e.to_string()))?;
        let slot = self.next_slot();
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: bytes.len() as u64,
            userspace_addr: rom.addr as u64,
            flags: kvm_bindings::KVM_MEM_READONLY,
        };
        // SAFETY: the mapping lives in self.roms, dropped after the VM fd.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (read-only)"))?;
        self.roms.push(rom);
        Ok(())
    }

    /// Maps `file` at `gpa` as flash (bhyve's boot ROM VARSFILE): shared with the file,
    /// read-only to the guest while [`Vm::set_flash_mapped`] says so, every guest write an
    /// MMIO exit for the flash device, which programs it through the returned handle.
    /// Starts mapped (read-array mode).
    pub fn map_flash(&mut self, gpa: u64, file: std::fs::File) -> Result<Arc<FlashMemory>> {
        self.require_readonly_mem()
            .map_err(|e| Error::Memory(format!("flash at {gpa:#x}: {e}")))?;
        let flash = Arc::new(FlashMemory::new(file, gpa, self.next_slot())?);
        self.flash.push(flash.clone());
        self.set_flash_mapped(&flash, true)?;
        Ok(flash)
    }

    /// Adds (true) or removes (false) `flash`'s read-only slot: removed, guest reads exit to
    /// the device too (a flash answering status or ID reads instead of its array).
    pub fn set_flash_mapped(&self, flash: &FlashMemory, on: bool) -> Result<()> {
        // Only this VM's own flash: another's slot number could name one of our RAM slots.
        if !self.flash.iter().any(|f| std::ptr::eq(&**f, flash)) {
            return Err(Error::Memory(format!(
                "flash at {:#x} is not mapped in VM {}",
                flash.gpa(),
                self.name
            )));
        }
        if flash.mapped().load(Ordering::SeqCst) == on {
            return Ok(());
        }
        let region = kvm_userspace_memory_region {
            slot: flash.slot(),
            guest_phys_addr: flash.gpa(),
            memory_size: if on { flash.len() } else { 0 },
            userspace_addr: flash.host_addr(),
            flags: kvm_bindings::KVM_MEM_READONLY,
        };
        // SAFETY: the mapping is kept alive by self.flash, dropped after the VM fd; a zero
        // size deletes the slot.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (flash)"))?;
        flash.mapped().store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Boot ROMs and flash both need read-only slots (guest writes exit instead of landing).
    fn require_readonly_mem(&self) -> std::result::Result<(), &'static str> {
        if self.fd.check_extension_int(Cap::ReadonlyMem) <= 0 {
            return Err("KVM cannot map read-only memory (KVM_CAP_READONLY_MEM)");
        }
        Ok(())
    }

    /// A free slot number, taken for `use_`.
    fn next_slot(&self) -> u32 {
        self.take_slot(Slot::Fixed)
    }

    fn take_slot(&self, use_: Slot) -> u32 {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.iter().position(|s| matches!(s, Slot::Free)) {
            Some(i) => {
                slots[i] = use_;
                i as u32
            }
            None => {
                slots.push(use_);
                (slots.len() - 1) as u32
            }
        }
    }

    /// Maps `memory` at `gpa` after creation, without exits: guest accesses go straight to
    /// it (a passed-through device's BAR, mapped at the address the guest programmed; when
    /// the guest moves the BAR, unmap and map again). `readonly` makes guest writes exit as
    /// MMIO writes instead. The slot keeps `memory` alive until it is unmapped.
    pub fn map_device_memory(
        &self,
        gpa: u64,
        memory: Arc<dyn HostMemory>,
        readonly: bool,
    ) -> Result<MemorySlot> {
        let fail = |what: String| Error::Memory(format!("device memory at {gpa:#x}: {what}"));
        let (addr, len) = (memory.host_addr(), memory.len());
        let aligned = |v: u64| v.is_multiple_of(4096);
        if len == 0 || !aligned(len) || !aligned(gpa) || !aligned(addr) {
            return Err(fail(format!(
                "{len} bytes at host {addr:#x}: sizes and addresses must be multiples of 4 KiB"
            )));
        }
        if gpa.checked_add(len).is_none() {
            return Err(fail(format!("{len} bytes run past the address space")));
        }
        if readonly {
            self.require_readonly_mem().map_err(|e| fail(e.into()))?;
        }
        let slot = self.take_slot(Slot::Device {
            _keep: memory.clone(),
        });
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: addr,
            flags: if readonly {
                kvm_bindings::KVM_MEM_READONLY
            } else {
                0
            },
        };
        // SAFETY: `memory` promises a mapping of `len` bytes at `addr` for as long as it
        // lives; the slot table holds it until the slot is deleted (or the VM fd is gone).
        if let Err(e) = unsafe { self.fd.set_user_memory_region(region) } {
            self.free_slot(slot);
            return Err(kvm_err("KVM_SET_USER_MEMORY_REGION (device memory)")(e));
        }
        Ok(MemorySlot { slot, gpa, len })
    }

    /// Removes a slot [`Vm::map_device_memory`] added; guest accesses there exit again.
    pub fn unmap_device_memory(&self, mapped: MemorySlot) -> Result<()> {
        let is_device = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            matches!(slots.get(mapped.slot as usize), Some(Slot::Device { .. }))
        };
        if !is_device {
            return Err(Error::Memory(format!(
                "slot {} is not device memory of VM {}",
                mapped.slot, self.name
            )));
        }
        let region = kvm_userspace_memory_region {
            slot: mapped.slot,
            guest_phys_addr: mapped.gpa,
            memory_size: 0,
            userspace_addr: 0,
            flags: 0,
        };
        // SAFETY: a zero size deletes the slot; nothing is mapped.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        self.free_slot(mapped.slot);
        Ok(())
    }

    fn free_slot(&self, slot: u32) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get_mut(slot as usize) {
            *s = Slot::Free;
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The runtime directory (`memory`, `pid`, …).
    pub fn rundir(&self) -> &Path {
        self.object.path()
    }

    /// The VM object (its directory, boot-state, lifetime).
    pub fn object(&self) -> &VmObject {
        &self.object
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Creates vCPU `index` (0-based) of the topology `topo`, with CPUID and in-kernel LAPIC
    /// set up for an OS. The KVM vCPU id, and so the LAPIC ID, is the vCPU's packed APIC ID
    /// ([`Topology::apic_id`]); vCPU 0 (APIC ID 0) is the bootstrap processor.
    pub fn create_vcpu(&self, index: u32, topo: &Topology) -> Result<Vcpu> {
        let id = index;
        let fd = self
            .fd
            .create_vcpu(u64::from(topo.apic_id(index)))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&self.supported_cpuid, index, topo);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let vcpu = Vcpu::new(id, fd, self.ram.clone(), self.fd.run_size());
        vcpu.setup_lapic()?;
        vcpu.set_boot_msrs()?;
        Ok(vcpu)
    }

    /// Tells KVM that the VFIO group `group` (an open /dev/vfio/N) belongs to this VM, so it
    /// handles the device's DMA coherency (KVM_DEV_TYPE_VFIO, created with the first group).
    pub fn add_vfio_group(&self, group: std::os::fd::RawFd) -> Result<()> {
        let mut dev = self.kvm_vfio.lock().unwrap_or_else(|p| p.into_inner());
        if dev.is_none() {
            let mut create = kvm_bindings::kvm_create_device {
                type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
                fd: 0,
                flags: 0,
            };
            *dev = Some(
                self.fd
                    .create_device(&mut create)
                    .map_err(kvm_err("KVM_CREATE_DEVICE (VFIO)"))?,
            );
        }
        let attr = kvm_bindings::kvm_device_attr {
            flags: 0,
            group: kvm_bindings::KVM_DEV_VFIO_GROUP,
            attr: u64::from(kvm_bindings::KVM_DEV_VFIO_GROUP_ADD),
            addr: &group as *const std::os::fd::RawFd as u64,
        };
        if let Some(d) = dev.as_ref() {
            d.set_device_attr(&attr)
                .map_err(kvm_err("KVM_SET_DEVICE_ATTR (VFIO group)"))?;
        }
        Ok(())
    }

    /// The MSRs a vCPU snapshot holds.
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// The CPUID vCPU `index` gets, as (function, index, eax, ebx, ecx, edx) per leaf: what
    /// a snapshot records so that a restore on another CPU can be refused.
    pub fn cpuid_leaves(&self, index: u32, topo: &Topology) -> Vec<[u32; 6]> {
        cpuid::for_vcpu(&self.supported_cpuid, index, topo)
            .as_slice()
            .iter()
            .map(|e| [e.function, e.index, e.eax, e.ebx, e.ecx, e.edx])
            .collect()
    }

    /// Signals `fd` → GSI `gsi` in the in-kernel irqchip (KVM_IRQFD): a write to the eventfd
    /// injects whatever `gsi` routes to, without a userspace ioctl.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// A level-triggered irqfd: a write to `fd` asserts `gsi` until the guest's EOI, which
    /// deasserts it and signals `resample` (a passed-through function's INTx).
    pub fn register_irqfd_with_resample(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<()> {
        self.fd
            .register_irqfd_with_resample(fd, resample, gsi)
            .map_err(kvm_err("KVM_IRQFD (resample)"))
    }

    /// Undoes [`Vm::register_irqfd`] (same fd and GSI).
    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(kvm_err("KVM_IRQFD (deassign)"))
    }

    fn routing(&self) -> Result<&IrqRouting> {
        self.routing
            .as_ref()
            .ok_or(crate::Error::MissingCap("KVM_CAP_IRQ_ROUTING"))
    }

    /// Allocates a GSI for an MSI route (the lowest free one from 24 up, below KVM's limit).
    /// It routes nowhere until [`Vm::set_msi_route`].
    pub fn allocate_msi_gsi(&self) -> Result<u32> {
        self.routing()?.allocate_msi_gsi()
    }

    /// Routes MSI GSI `gsi` to the message (`addr`, `data`) and commits the whole table
    /// (KVM_SET_GSI_ROUTING; nothing is done when the route is unchanged). Irqfds on `gsi`
    /// deliver the new message once this returns.
    pub fn set_msi_route(&self, gsi: u32, addr: u64, data: u32) -> Result<()> {
        self.routing()?.set_msi_route(&self.fd, gsi, addr, data)
    }

    /// Removes `gsi`'s MSI route and frees the GSI (unregister its irqfds first).
    pub fn remove_route(&self, gsi: u32) -> Result<()> {
        self.routing()?.remove_route(&self.fd, gsi)
    }

    /// A copy of the routing table's bookkeeping (None: no KVM_CAP_IRQ_ROUTING).
    pub fn gsi_table(&self) -> Option<GsiTable> {
        self.routing.as_ref().map(IrqRouting::snapshot)
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

/// Guest RAM is a sparse file filled as the guest touches it: when its filesystem runs out,
/// the guest (or rhyve writing into guest memory) faults with SIGBUS. Said up front, since a
/// small tmpfs /run is common; not refused, because most guests never touch all their RAM.
fn warn_if_ram_may_not_fit(dir: &std::path::Path, ram_bytes: u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: statvfs fills the plain struct it is given from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `c` outlives the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return;
    }
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < ram_bytes {
        log::warn!(
            "{}: {} MiB free for {} MiB of guest RAM: the guest is killed if it fills it (set RHYVE_RUNDIR to a larger filesystem)",
            dir.display(),
            free >> 20,
            ram_bytes >> 20
        );
    }
}

/// What a memory slot number is used for.
#[derive(Clone)]
enum Slot {
    Free,
    /// RAM, a ROM or flash: mapped for the VM's life (or by its owner's own rules).
    Fixed,
    /// Device memory, kept alive while mapped.
    Device {
        _keep: Arc<dyn HostMemory>,
    },
}

/// Host memory a device maps into the guest after creation (a VFIO region's mmap).
///
/// # Safety
/// `host_addr()..host_addr() + len()` must stay a valid, mapped host range for as long as
/// the value lives: KVM lets the guest access it directly.
pub unsafe trait HostMemory: Send + Sync {
    fn host_addr(&self) -> u64;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A device-memory slot, from [`Vm::map_device_memory`]. Not `Copy`: the one handle is
/// given back to unmap it, so a stale copy can never remove a later mapping that reused the
/// slot number.
#[derive(Debug, PartialEq, Eq)]
pub struct MemorySlot {
    slot: u32,
    gpa: u64,
    len: u64,
}

impl MemorySlot {
    /// Where it is mapped in the guest.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A private read-only host mapping holding a ROM image.
struct RomMapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing aliases it mutably.
unsafe impl Send for RomMapping {}
// SAFETY: read-only after construction.
unsafe impl Sync for RomMapping {}

impl RomMapping {
    fn new(bytes: &[u8]) -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let rom = RomMapping {
            addr,
            len: bytes.len(),
        };
        // SAFETY: the mapping is bytes.len() long and writable; the source does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr.cast::<u8>(), bytes.len()) };
        // SAFETY: our own mapping.
        if unsafe { libc::mprotect(addr, bytes.len(), libc::PROT_READ) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(rom)
    }
}

impl Drop for RomMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, which KVM no longer uses (the VM fd is gone).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the machine's KVM (skipped without it): the committed table with MSI routes is
    /// accepted, irqfds attach to them, GSIs are freed and reused.
    #[test]
    fn msi_routes_and_irqfds_on_kvm() {
        let hv = Hypervisor::open()
            .unwrap_or_else(|e| panic!("this test needs KVM and could not open it: {e}"));
        // Under the default (or $RHYVE_RUNDIR) base, removed when the Vm drops.
        let name = format!("vmmapi-test-irq-{}", std::process::id());
        let vm = Vm::create(&hv, &name, &[(0, 2 << 20)], &MemoryOptions::default()).unwrap();
        let t = vm
            .gsi_table()
            .expect("KVM without KVM_CAP_IRQ_ROUTING: MSI routes cannot be tested");
        assert_eq!(t.msi_allocated(), 0);
        let a = vm.allocate_msi_gsi().unwrap();
        let b = vm.allocate_msi_gsi().unwrap();
        assert_eq!((a, b), (24, 25));
        vm.set_msi_route(a, 0xfee0_0000, 0x41).unwrap();
        vm.set_msi_route(b, 0xfee0_1000, 0x42).unwrap();
        vm.set_msi_route(b, 0xfee0_1000, 0x43).unwrap();
        assert!(vm.set_msi_route(77, 0xfee0_0000, 0x44).is_err());
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&fd, b).unwrap();
        fd.write(1).unwrap();
        let t = vm.gsi_table().unwrap();
        assert_eq!(t.msi(b), Some((0xfee0_1000, 0x43)));
        vm.unregister_irqfd(&fd, b).unwrap();
        vm.remove_route(a).unwrap();
        assert_eq!(vm.allocate_msi_gsi().unwrap(), a);
        assert_eq!(vm.gsi_table().unwrap().msi(a), None);
    }
}
