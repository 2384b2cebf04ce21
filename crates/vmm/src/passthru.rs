//! `-s SLOT,passthru,B/S/F` (bhyve's pci_passthru): a host PCI function given to the guest
//! through VFIO ([`vmmapi::vfio`]). The guest's DMA goes through the host IOMMU, which maps
//! guest-physical addresses onto guest RAM; MMIO BARs are mapped straight into the guest
//! (KVM memory slots at the addresses the guest programs, no exits); the BAR holding the
//! MSI-X table and PBA, and I/O BARs, trap and are forwarded, the table itself emulated.
//!
//! Configuration space is rhyve's image of the function's: identity, class, subsystem and
//! capabilities copied from the device at start (read-only to the guest), BARs, the command
//! register and MSI-X emulated. Command writes reach the device (decode, bus mastering).
//! MSI-X vectors the guest unmasks become VFIO eventfds that are KVM irqfds on GSIs routed to
//! the guest's messages: an interrupt goes from the device to the guest without rhyve.
//!
//! INTx goes the same way: VFIO's trigger eventfd is a level-triggered KVM irqfd on the
//! slot's GSI, and KVM's resample eventfd (the guest's EOI) is VFIO's unmask. VFIO allows one
//! of INTx and MSI-X at a time: INTx is off while the guest has MSI-X enabled.
//!
//! Plain MSI is rhyve's one-vector capability (in the device's place in the list): once the
//! guest enables it, its message gets a GSI and irqfd as an MSI-X vector would, and that
//! eventfd is VFIO's MSI trigger. VFIO has one of INTx, MSI and MSI-X on at a time.
//!
//! Not yet: multi-message MSI, masking a vector while its interrupt stays routed, extended
//! (PCIe) config space, the expansion ROM, snapshots.

use std::os::fd::RawFd;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use devices::lifecycle::Lifecycle;
use devices::pci::config::{
    CAPABILITIES_PTR, CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_VENDOR, COMMAND, MSI_CAP_LEN, NUM_BARS,
};
use devices::pci::msi::MsiRegs;
use devices::pci::{BarKind, BarSpec, InterruptSink, MsixTable, PciConfig, PciDevice};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
};
use vmm_sys_util::eventfd::EventFd;
use vmmapi::vfio::{RegionMapping, VfioDevice};
use vmmapi::{MemorySlot, Vm};

const CAP_ID_PM: u8 = 0x01;
const CAP_ID_PCIE: u8 = 0x10;

/// The host function `spec` names: `B/S/F` (bhyve, domain 0) or `DDDD:BB:SS.F` (sysfs).
pub fn host_function(spec: &str) -> Result<String> {
    let bad = || {
        anyhow!("{spec:?}: expected the host function as bus/slot/function (e.g. 0/5/0) or DDDD:BB:SS.F")
    };
    if let [b, s, f] = spec.split('/').collect::<Vec<_>>()[..] {
        let num = |v: &str, max: u32| v.parse::<u32>().ok().filter(|n| *n <= max);
        let (b, s, f) = (
            num(b, 255).ok_or_else(bad)?,
            num(s, 31).ok_or_else(bad)?,
            num(f, 7).ok_or_else(bad)?,
        );
        return Ok(vmmapi::vfio::sysfs_name(0, b as u8, s as u8, f as u8));
    }
    let (dbs, f) = spec.rsplit_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = dbs.split(':').collect();
    let hex = |v: &str, max: u32| u32::from_str_radix(v, 16).ok().filter(|n| *n <= max);
    let (d, b, s) = match parts[..] {
        [d, b, s] => (hex(d, 0xffff), hex(b, 0xff), hex(s, 0x1f)),
        [b, s] => (Some(0), hex(b, 0xff), hex(s, 0x1f)),
        _ => return Err(bad()),
    };
    let f = hex(f, 7).ok_or_else(bad)?;
    match (d, b, s) {
        (Some(d), Some(b), Some(s)) => Ok(vmmapi::vfio::sysfs_name(
            d as u16, b as u8, s as u8, f as u8,
        )),
        _ => Err(bad()),
    }
}

/// One BAR of the function.
struct Bar {
    /// The VFIO region (= BAR index).
    region: u32,
    /// Mapped into the guest when it decodes (None: it traps, forwarded or emulated).
    mapping: Option<Arc<RegionMapping>>,
    slot: Option<MemorySlot>,
    /// Its first mapping was logged (the guest turns decoding off and on while sizing BARs).
    logged: bool,
}

/// Where the MSI-X table and PBA live, and the VFIO eventfds last handed over.
struct Msix {
    table: MsixTable,
    table_bar: usize,
    table_offset: u64,
    pba_bar: usize,
    pba_offset: u64,
    /// The eventfds VFIO has per vector (None: MSI-X off at the device).
    given: Option<Vec<RawFd>>,
}

/// The function's INTx: VFIO's trigger and unmask eventfds, once KVM has them.
struct Intx {
    trigger: EventFd,
    resample: EventFd,
    /// KVM asserts the slot's GSI on `trigger` (set up at the first config write: the slot's
    /// GSI is known once the machine is built).
    routed: bool,
    /// VFIO signals `trigger` (off while MSI-X is on).
    on: bool,
}

/// Command register bits the guest controls on the device: I/O and memory decode, bus
/// mastering, INTx disable (which VFIO virtualises).
const COMMAND_GUEST: u16 = 0x7 | (1 << 10);

/// Where an access inside the MSI-X table's or PBA's BAR lands.
enum MsixPart {
    /// At this offset in the table.
    Table(u64),
    /// At this offset in the PBA.
    Pba(u64),
}

impl Msix {
    /// The table or PBA an access of `len` bytes at `offset` in BAR `bar` falls in wholly.
    fn part(&self, bar: usize, offset: u64, len: usize) -> Option<MsixPart> {
        let end = offset.checked_add(len as u64)?;
        let inside = |b: usize, start: u64, size: u64| {
            bar == b && offset >= start && end <= start.saturating_add(size)
        };
        if inside(self.table_bar, self.table_offset, self.table.table_len()) {
            Some(MsixPart::Table(offset - self.table_offset))
        } else if inside(self.pba_bar, self.pba_offset, self.table.pba_len()) {
            Some(MsixPart::Pba(offset - self.pba_offset))
        } else {
            None
        }
    }
}

/// A passed-through host function.
pub struct Passthru {
    config: PciConfig,
    dev: VfioDevice,
    vm: Arc<Vm>,
    sink: Arc<dyn InterruptSink>,
    bars: [Option<Bar>; NUM_BARS],
    msix: Option<Msix>,
    /// The message VFIO's MSI trigger raises (None: MSI off at the device).
    msi_given: Option<(u64, u32)>,
    intx: Option<Intx>,
    /// The real command register's bits rhyve keeps (not the guest's to change).
    command_fixed: u16,
}

fn cfg_u8(cfg: &[u8], o: usize) -> u8 {
    cfg.get(o).copied().unwrap_or(0)
}
fn cfg_u16(cfg: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([cfg_u8(cfg, o), cfg_u8(cfg, o + 1)])
}
fn cfg_u32(cfg: &[u8], o: usize) -> u32 {
    u32::from(cfg_u16(cfg, o)) | u32::from(cfg_u16(cfg, o + 2)) << 16
}

impl Passthru {
    /// Opens host function `name` through VFIO, maps guest RAM for its DMA, resets it and
    /// builds the guest's view of it.
    pub fn open(vm: &Arc<Vm>, name: &str, sink: Arc<dyn InterruptSink>) -> Result<Self> {
        let dev = VfioDevice::open(name)?;
        if !dev.reset() {
            log::info!("passthru {name}: no reset through VFIO (the device starts as it is)");
        }
        dev.map_guest_ram(vm.ram())?;
        vm.add_vfio_group(dev.group_fd())?;
        let mut raw = [0u8; 256];
        if !dev.read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut raw) {
            bail!("{name}: cannot read its configuration space through VFIO");
        }
        let vendor = cfg_u16(&raw, 0);
        if vendor == 0xffff {
            bail!("{name}: its configuration space reads all-ones (is it powered?)");
        }
        let class = (cfg_u8(&raw, 0xb), cfg_u8(&raw, 0xa), cfg_u8(&raw, 0x9));
        if cfg_u8(&raw, 0xe) & 0x7f != 0 {
            bail!(
                "{name}: a bridge (header type {:#x}) cannot be passed through",
                cfg_u8(&raw, 0xe)
            );
        }
        let mut config = PciConfig::new(vendor, cfg_u16(&raw, 2), class, cfg_u8(&raw, 8));
        config.set_subsystem(cfg_u16(&raw, 0x2c), cfg_u16(&raw, 0x2e));
        let pin = cfg_u8(&raw, 0x3d).min(4);
        let intx = if pin != 0 && dev.irq_count(VFIO_PCI_INTX_IRQ_INDEX) > 0 {
            let fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| anyhow!("eventfd: {e}"));
            Some(Intx {
                trigger: fd()?,
                resample: fd()?,
                routed: false,
                on: false,
            })
        } else {
            None
        };
        config.set_interrupt_pin(if intx.is_some() { pin } else { 0 });
        let mut bars: [Option<Bar>; NUM_BARS] = Default::default();
        let mut i = 0;
        while i < NUM_BARS {
            let region = dev.region(i as u32);
            let reg = cfg_u32(&raw, 0x10 + 4 * i);
            if region.size == 0 {
                i += 1;
                continue;
            }
            let kind = if reg & 1 != 0 {
                BarKind::Io
            } else if reg & 0b110 == 0b100 {
                BarKind::Mem64
            } else {
                BarKind::Mem32
            };
            let spec = BarSpec {
                kind,
                size: region.size,
                prefetchable: kind != BarKind::Io && reg & 0b1000 != 0,
            };
            if !config.add_bar(i, spec) {
                bail!(
                    "{name}: BAR {i} ({:?}, {} bytes) cannot be declared",
                    kind,
                    region.size
                );
            }
            bars[i] = Some(Bar {
                region: i as u32,
                mapping: None,
                slot: None,
                logged: false,
            });
            i += if kind == BarKind::Mem64 { 2 } else { 1 };
        }
        let msix = copy_capabilities(
            &raw,
            &mut config,
            name,
            dev.irq_count(VFIO_PCI_MSI_IRQ_INDEX),
        )?;
        // BARs that can be mapped straight into the guest: memory, mmap-able, not the MSI-X
        // table's or PBA's.
        for (i, bar) in bars.iter_mut().enumerate() {
            let Some(bar) = bar else { continue };
            let msix_bar = msix
                .as_ref()
                .is_some_and(|m| m.table_bar == i || m.pba_bar == i);
            let spec = config.bar_spec(i);
            let region = dev.region(bar.region);
            if msix_bar || spec.is_none_or(|s| s.kind == BarKind::Io) || !region.mmap {
                continue;
            }
            match dev.map_region(bar.region) {
                Ok(m) => bar.mapping = Some(Arc::new(m)),
                Err(e) => log::warn!("passthru {name}: BAR {i} traps: {e}"),
            }
        }
        if let Some(m) = &msix {
            let have = dev.irq_count(VFIO_PCI_MSIX_IRQ_INDEX);
            if usize::from(m.table.vectors() as u16) > have as usize {
                bail!(
                    "{name}: its MSI-X capability has {} vectors, VFIO offers {have}",
                    m.table.vectors()
                );
            }
        }
        // Decoding, bus mastering and INTx disable are the guest's; the rest stays the device's.
        let command_fixed = cfg_u16(&raw, COMMAND as usize) & !COMMAND_GUEST;
        log::info!(
            "passthru {name}: {vendor:04x}:{:04x} class {:02x}{:02x}{:02x}, MSI-X {}",
            cfg_u16(&raw, 2),
            class.0,
            class.1,
            class.2,
            msix.as_ref().map_or("none".to_string(), |m| format!(
                "{} vectors",
                m.table.vectors()
            ))
        );
        Ok(Self {
            config,
            dev,
            vm: vm.clone(),
            sink,
            bars,
            msix,
            msi_given: None,
            intx,
            command_fixed,
        })
    }

    /// INTx on at the device unless MSI-X is: routed to KVM on first use.
    fn sync_intx(&mut self) {
        let msix_on =
            self.msix.as_ref().is_some_and(|m| m.given.is_some()) || self.msi_given.is_some();
        let Some(i) = &mut self.intx else { return };
        if !i.routed {
            i.routed = self.sink.intx_irqfd(&i.trigger, &i.resample);
        }
        if !i.routed || i.on || msix_on {
            return;
        }
        use std::os::fd::AsRawFd;
        let on = self
            .dev
            .set_irq_eventfds(VFIO_PCI_INTX_IRQ_INDEX, 0, &[i.trigger.as_raw_fd()])
            .and_then(|()| {
                self.dev
                    .set_irq_unmask_eventfd(VFIO_PCI_INTX_IRQ_INDEX, i.resample.as_raw_fd())
            });
        match on {
            Ok(()) => i.on = true,
            Err(e) => log::warn!("passthru: {e}"),
        }
    }

    /// Hands VFIO the irqfd of every vector the table has routed (-1: not yet), or turns
    /// MSI-X off at the device when the guest did.
    fn sync_msix(&mut self) {
        let Some(m) = &mut self.msix else { return };
        if !m.table.enabled() {
            if m.given.take().is_some() {
                if let Err(e) = self.dev.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX) {
                    log::warn!("passthru: {e}");
                }
                self.sync_intx();
            }
            return;
        }
        // VFIO has one of INTx, MSI and MSI-X at a time (the guest enables one).
        if self.msi_given.take().is_some() {
            let _ = self.dev.disable_irqs(VFIO_PCI_MSI_IRQ_INDEX);
        }
        if let Some(i) = self.intx.as_mut().filter(|i| i.on) {
            if let Err(e) = self.dev.disable_irqs(VFIO_PCI_INTX_IRQ_INDEX) {
                log::warn!("passthru: {e}");
            }
            i.on = false;
        }
        let Some(m) = &mut self.msix else { return };
        if m.given.is_none() {
            // MSI may have used the sink's vector 0 meanwhile.
            m.table.reannounce(self.sink.as_ref());
        }
        let fds: Vec<RawFd> = (0..m.table.vectors() as u16)
            .map(|v| self.sink.msix_irqfd(v).unwrap_or(-1))
            .collect();
        if m.given.as_ref() == Some(&fds) {
            return;
        }
        match self.dev.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &fds) {
            Ok(()) => m.given = Some(fds),
            Err(e) => log::warn!("passthru: {e}"),
        }
    }

    /// MSI as the guest has it: on (with its message routed to a GSI whose irqfd is VFIO's
    /// trigger) or off.
    fn sync_msi(&mut self) {
        let Some(cap) = self.config.msi() else { return };
        let regs = MsiRegs::read(&self.config, cap);
        let msix_on = self.msix.as_ref().is_some_and(|m| m.given.is_some());
        if !regs.enabled || msix_on {
            if self.msi_given.take().is_some() {
                if let Err(e) = self.dev.disable_irqs(VFIO_PCI_MSI_IRQ_INDEX) {
                    log::warn!("passthru: {e}");
                }
            }
            return;
        }
        let msg = (regs.addr, regs.data);
        if self.msi_given == Some(msg) {
            return;
        }
        // The sink's vector 0: MSI and MSI-X are never on together.
        self.sink.msix_route(0, msg.0, msg.1);
        let Some(fd) = self.sink.msix_irqfd(0) else {
            log::warn!("passthru {}: no irqfd for its MSI message", self.dev.name());
            return;
        };
        if let Some(i) = self.intx.as_mut().filter(|i| i.on) {
            let _ = self.dev.disable_irqs(VFIO_PCI_INTX_IRQ_INDEX);
            i.on = false;
        }
        match self.dev.set_irq_eventfds(VFIO_PCI_MSI_IRQ_INDEX, 0, &[fd]) {
            Ok(()) => self.msi_given = Some(msg),
            Err(e) => log::warn!("passthru: {e}"),
        }
    }

    /// The guest's command register, with rhyve's fixed bits, written to the device.
    fn sync_command(&self) {
        let guest = self.config.command() & COMMAND_GUEST;
        let value = (self.command_fixed | guest).to_le_bytes();
        if !self
            .dev
            .write(VFIO_PCI_CONFIG_REGION_INDEX, u64::from(COMMAND), &value)
        {
            log::warn!(
                "passthru {}: cannot write its command register",
                self.dev.name()
            );
        }
    }
}

/// Copies the device's capability list into `config` in its order: MSI-X emulated (with
/// the device's table and PBA places), MSI as rhyve's one-vector capability (when VFIO has
/// an MSI vector), every other capability as read-only bytes. Returns the MSI-X state if the
/// device has it.
fn copy_capabilities(
    raw: &[u8],
    config: &mut PciConfig,
    name: &str,
    msi_vectors: u32,
) -> Result<Option<Msix>> {
    // Offsets in list order, guarding against loops.
    let mut offsets = Vec::new();
    let mut at = usize::from(cfg_u8(raw, CAPABILITIES_PTR as usize) & !3);
    while (0x40..0x100).contains(&at) && !offsets.contains(&at) && offsets.len() < 48 {
        offsets.push(at);
        at = usize::from(cfg_u8(raw, at + 1) & !3);
    }
    let mut sorted = offsets.clone();
    sorted.sort_unstable();
    let mut msix = None;
    for &off in &offsets {
        let id = cfg_u8(raw, off);
        // Up to the next capability (or the end of the header's space).
        let room = sorted.iter().find(|&&o| o > off).copied().unwrap_or(0x100) - off;
        let len = match id {
            CAP_ID_PM => 8,
            CAP_ID_VENDOR => usize::from(cfg_u8(raw, off + 2)).max(3),
            CAP_ID_PCIE if cfg_u8(raw, off + 2) & 0xf >= 2 => 0x3c,
            CAP_ID_PCIE => 0x14,
            _ => room,
        }
        .min(room);
        match id {
            CAP_ID_MSI if msi_vectors == 0 => {
                log::info!("passthru {name}: MSI left out (VFIO offers no MSI vector)");
            }
            CAP_ID_MSI => {
                if config.add_msi_capability().is_none() {
                    log::warn!("passthru {name}: MSI left out (no room)");
                }
            }
            CAP_ID_MSIX => {
                let vectors = (cfg_u16(raw, off + 2) & 0x7ff) + 1;
                let table = cfg_u32(raw, off + 4);
                let pba = cfg_u32(raw, off + 8);
                let (tbar, tofs) = ((table & 7) as u8, table & !7);
                let (pbar, pofs) = ((pba & 7) as u8, pba & !7);
                if config.bar_spec(usize::from(tbar)).is_none()
                    || config.bar_spec(usize::from(pbar)).is_none()
                {
                    bail!("{name}: its MSI-X table or PBA is in a BAR it does not have");
                }
                config
                    .add_msix_capability(vectors, tbar, tofs, pbar, pofs)
                    .ok_or_else(|| anyhow!("{name}: no room for its MSI-X capability"))?;
                msix = Some(Msix {
                    table: MsixTable::new(vectors),
                    table_bar: usize::from(tbar),
                    table_offset: u64::from(tofs),
                    pba_bar: usize::from(pbar),
                    pba_offset: u64::from(pofs),
                    given: None,
                });
            }
            _ => {
                let body = raw.get(off + 2..off + len).unwrap_or(&[]);
                if config.add_capability(id, body).is_none() {
                    log::warn!("passthru {name}: capability {id:#x} left out (no room)");
                }
            }
        }
    }
    Ok(msix)
}

impl Drop for Passthru {
    fn drop(&mut self) {
        for bar in self.bars.iter_mut().flatten() {
            if let Some(slot) = bar.slot.take() {
                let _ = self.vm.unmap_device_memory(slot);
            }
        }
        if self.msix.as_ref().is_some_and(|m| m.given.is_some()) {
            let _ = self.dev.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX);
        }
        if self.intx.as_ref().is_some_and(|i| i.on) {
            let _ = self.dev.disable_irqs(VFIO_PCI_INTX_IRQ_INDEX);
        }
        if self.msi_given.is_some() {
            let _ = self.dev.disable_irqs(VFIO_PCI_MSI_IRQ_INDEX);
        }
    }
}

/// Nothing to pause (the device runs on its own); no snapshot of a host device.
impl Lifecycle for Passthru {}

impl PciDevice for Passthru {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some(m) = &self.msix {
            match m.part(bar, offset, data.len()) {
                Some(MsixPart::Table(o)) => return m.table.table_read(o, data),
                Some(MsixPart::Pba(o)) => return m.table.pba_read(o, data),
                None => {}
            }
        }
        let Some(b) = self.bars.get(bar).and_then(|b| b.as_ref()) else {
            return data.fill(0xff);
        };
        if !self.dev.read(b.region, offset, data) {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(m) = &mut self.msix {
            match m.part(bar, offset, data.len()) {
                Some(MsixPart::Table(o)) => {
                    m.table.table_write(o, data, self.sink.as_ref());
                    return self.sync_msix();
                }
                Some(MsixPart::Pba(_)) => return, // read-only
                None => {}
            }
        }
        if let Some(b) = self.bars.get(bar).and_then(|b| b.as_ref()) {
            let _ = self.dev.write(b.region, offset, data);
        }
    }

    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        let Some(b) = self.bars.get_mut(bar).and_then(|b| b.as_mut()) else {
            return;
        };
        if let Some(slot) = b.slot.take() {
            if let Err(e) = self.vm.unmap_device_memory(slot) {
                log::warn!("passthru {}: BAR {bar}: {e}", self.dev.name());
            }
        }
        if let (Some(addr), Some(map)) = (addr, &b.mapping) {
            let memory: Arc<dyn vmmapi::HostMemory> = map.clone();
            match self.vm.map_device_memory(addr, memory, false) {
                Ok(slot) => {
                    let level = if b.logged {
                        log::Level::Debug
                    } else {
                        log::Level::Info
                    };
                    log::log!(
                        level,
                        "passthru {}: BAR {bar} mapped into the guest at {addr:#x} ({} KiB)",
                        self.dev.name(),
                        vmmapi::HostMemory::len(&**map) >> 10
                    );
                    b.logged = true;
                    b.slot = Some(slot);
                }
                // Accesses then exit and are forwarded: slower, still right.
                Err(e) => log::warn!("passthru {}: BAR {bar}: {e}", self.dev.name()),
            }
        }
    }

    fn config_written(&mut self, offset: u16, len: usize) {
        let end = offset.saturating_add(len as u16);
        if offset < COMMAND + 2 && end > COMMAND {
            self.sync_command();
        }
        if let Some(cap) = self.config.msi() {
            if offset < cap.offset + MSI_CAP_LEN && end > cap.offset {
                self.sync_msi();
            }
        }
        self.sync_intx();
        let Some(cap) = self.config.msix() else {
            return;
        };
        if offset < cap.offset + 4 && end > cap.offset + 2 {
            if let Some(m) = &mut self.msix {
                m.table.control_written(&self.config, self.sink.as_ref());
            }
            self.sync_msix();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_functions_as_bhyve_and_sysfs_write_them() {
        assert_eq!(host_function("0/5/0").unwrap(), "0000:00:05.0");
        assert_eq!(host_function("3/31/7").unwrap(), "0000:03:1f.7");
        assert_eq!(host_function("0000:3a:00.1").unwrap(), "0000:3a:00.1");
        assert_eq!(host_function("3a:00.1").unwrap(), "0000:3a:00.1");
        for bad in [
            "0/32/0",
            "0/5",
            "1/2/8",
            "x",
            "0000:00:20.0",
            "00:05",
            "0000:00:05.8",
            "",
        ] {
            assert!(host_function(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn accesses_land_in_the_msix_table_or_pba_only_when_wholly_inside() {
        let m = Msix {
            table: MsixTable::new(4),
            table_bar: 1,
            table_offset: 0x1000,
            pba_bar: 1,
            pba_offset: 0x1800,
            given: None,
        };
        assert!(matches!(m.part(1, 0x1000, 4), Some(MsixPart::Table(0))));
        assert!(matches!(m.part(1, 0x103c, 4), Some(MsixPart::Table(0x3c))));
        assert!(m.part(1, 0x103e, 4).is_none(), "straddles the table's end");
        assert!(matches!(m.part(1, 0x1800, 8), Some(MsixPart::Pba(0))));
        assert!(m.part(0, 0x1000, 4).is_none(), "another BAR");
        assert!(m.part(1, 0x0ffc, 4).is_none());
        assert!(m.part(1, u64::MAX - 1, 4).is_none());
    }

    #[test]
    fn capabilities_are_copied_with_msi_and_msix_emulated() {
        let mut raw = [0u8; 256];
        raw[0x34] = 0x40;
        // PM at 0x40 → MSI at 0x48 → vendor (len 16) at 0x60 → MSI-X at 0x70 → end.
        raw[0x40..0x44].copy_from_slice(&[CAP_ID_PM, 0x48, 0x03, 0x00]);
        raw[0x48..0x4c].copy_from_slice(&[CAP_ID_MSI, 0x60, 0x80, 0x00]);
        raw[0x60..0x63].copy_from_slice(&[CAP_ID_VENDOR, 0x70, 16]);
        raw[0x63..0x70].copy_from_slice(&[7; 13]);
        raw[0x70..0x72].copy_from_slice(&[CAP_ID_MSIX, 0x00]);
        raw[0x72..0x74].copy_from_slice(&(3u16).to_le_bytes()); // 4 vectors
        raw[0x74..0x78].copy_from_slice(&(0x1000u32 | 1).to_le_bytes());
        raw[0x78..0x7c].copy_from_slice(&(0x1800u32 | 1).to_le_bytes());
        let mut config = PciConfig::new(0x1af4, 0x1042, (1, 0, 0), 1);
        let spec = BarSpec {
            kind: BarKind::Mem32,
            size: 0x2000,
            prefetchable: false,
        };
        assert!(config.add_bar(1, spec));
        let mut without_msi = config.clone();
        let m = copy_capabilities(&raw, &mut config, "t", 1)
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.table_bar, m.table_offset, m.pba_bar, m.pba_offset),
            (1, 0x1000, 1, 0x1800)
        );
        assert_eq!(m.table.vectors(), 4);
        // The guest's list: PM, rhyve's MSI, vendor (its 16 bytes), MSI-X.
        let ids = |config: &PciConfig| {
            let mut ids = Vec::new();
            let mut at = config.read_u8(CAPABILITIES_PTR);
            while at != 0 {
                ids.push(config.read_u8(u16::from(at)));
                if config.read_u8(u16::from(at)) == CAP_ID_VENDOR {
                    assert_eq!(config.read_u8(u16::from(at) + 2), 16);
                    assert_eq!(config.read_u8(u16::from(at) + 15), 7);
                }
                at = config.read_u8(u16::from(at) + 1);
            }
            ids
        };
        assert_eq!(
            ids(&config),
            [CAP_ID_PM, CAP_ID_MSI, CAP_ID_VENDOR, CAP_ID_MSIX]
        );
        assert!(config.msi().is_some());
        // Without an MSI vector at VFIO, no MSI for the guest.
        copy_capabilities(&raw, &mut without_msi, "t", 0).unwrap();
        assert_eq!(ids(&without_msi), [CAP_ID_PM, CAP_ID_VENDOR, CAP_ID_MSIX]);
        // A looping list ends.
        let mut looping = [0u8; 256];
        looping[0x34] = 0x40;
        looping[0x40..0x42].copy_from_slice(&[CAP_ID_PM, 0x40]);
        let mut c = PciConfig::new(1, 2, (0, 0, 0), 0);
        assert!(copy_capabilities(&looping, &mut c, "t", 0)
            .unwrap()
            .is_none());
    }
}
