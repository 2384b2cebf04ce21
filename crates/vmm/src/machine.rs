//! Machine assembly: VM + RAM + irqchip, devices on the buses, the kernel, vCPU threads,
//! then wait for a stop and turn it into bhyve's exit status.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use devices::pci::{root as pci_root, InterruptSink, PciRoot};
use devices::threads::ThreadKind;
use devices::{acpi_pm, i8042, pc_testdev, post, rtc, uart, Bus, BusDevice, StopReason, VmControl};
use platform::map::PciLayout;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};
use vmmapi::{Hypervisor, Vm};

use crate::boot;
use crate::config::{ConsoleBackend, VmConfig};
use crate::emulations::PciContext;
use crate::exit::ExitHandler;
use crate::irq_lines::{IrqLines, IrqSource};
use crate::registry::{DeviceRegistry, RegisteredDevice};
use crate::runtime::VmController;
use crate::snapshot::{MachineInfo, Restore, SavedDevice, SnapshotParts};
use crate::vcpu::{all_halted, HaltProbe, VcpuContext, VcpuStats};
use crate::vcpu_ctl::VcpuCtl;
use crate::{adopt, console, control_server, signals, terminal};

fn shared(d: impl BusDevice + 'static) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(d))
}

/// The devices every machine has, plus those `-l` asks for.
struct Buses {
    pio: Bus,
    mmio: Bus,
    /// The PM1 event block, shared with the signal thread for the power button.
    pm1_evt: Arc<Mutex<acpi_pm::Pm1Event>>,
    /// The keyboard controller (Firecracker's SendCtrlAltDel types on it).
    keyboard: Arc<Mutex<i8042::I8042>>,
    /// The PCI functions by id.
    registry: DeviceRegistry,
    /// The placed devices' own ACPI descriptions, for the DSDT.
    acpi: Vec<platform::acpi::AcpiDevice>,
    /// The devices outside PCI whose state a snapshot holds, by name.
    saved: Vec<SavedDevice>,
    /// The PCI root (None: no `-s`), for restoring functions.
    pci_root: Option<Arc<PciRoot>>,
}

/// `dev` as a snapshot sees it.
fn saved<T: devices::lifecycle::Lifecycle + Send + 'static>(
    name: &str,
    dev: &Arc<Mutex<T>>,
) -> SavedDevice {
    (name.to_string(), dev.clone())
}

/// What the ACPI tables describe: the vCPUs, and the devices the machine has, as they
/// describe themselves (built after them).
fn acpi_config(cfg: &VmConfig, buses: &Buses) -> loader::acpi::AcpiConfig {
    loader::acpi::AcpiConfig {
        nr_cpus: cfg.cpus,
        apic_ids: cfg.topology.apic_ids(),
        pci: !buses.registry.is_empty(),
        devices: buses.acpi.clone(),
        pci_layout: pci_layout(cfg),
    }
}

/// The PCI root's layout: rhyve's own for direct boot, QEMU's i440FX behind a boot ROM.
fn pci_layout(cfg: &VmConfig) -> PciLayout {
    PciLayout::for_machine(cfg.memory, cfg.bootrom.is_some())
}

fn build_buses(
    vm: &Arc<Vm>,
    cfg: &VmConfig,
    rom: Option<&crate::firmware::BootRom>,
    control: &Arc<VmControl>,
    start: Instant,
) -> Result<Buses> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut registry = DeviceRegistry::default();
    // Level-triggered lines, wire-ORed: the SCI, pc-testdev's lines and every INTx pin.
    let lines = IrqLines::new(vm.clone());
    let mut acpi = vec![i8042::acpi_device(), rtc::acpi_device()];
    let mut saved_devices = Vec::new();
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    vm.register_irqfd(&kbd_irq, platform::irq::KBD_IRQ)?;
    let keyboard = Arc::new(Mutex::new(i8042::I8042::new(
        control.clone(),
        Box::new(move || {
            if let Err(e) = kbd_irq.write(1) {
                log::warn!("i8042: irq {}: {e}", platform::irq::KBD_IRQ);
            }
        }),
    )));
    pio.insert(
        "i8042",
        u64::from(i8042::I8042_BASE),
        i8042::I8042_LEN,
        keyboard.clone(),
    )?;
    saved_devices.push(saved("i8042", &keyboard));
    pio.insert(
        "post",
        u64::from(post::POST_PORT),
        1,
        shared(post::PostCodes::new(start)),
    )?;
    // The SCI: GSI 9, level-triggered (the MADT's interrupt source override).
    let pm1_evt = Arc::new(Mutex::new(acpi_pm::Pm1Event::new({
        let sci = lines.source();
        Box::new(move |level| {
            if let Err(e) = sci.set(acpi_pm::SCI_GSI, level) {
                log::warn!("acpi: SCI (GSI {}): {e}", acpi_pm::SCI_GSI);
            }
        })
    })));
    let pm_base = u64::from(pci_layout(cfg).pm_base());
    pio.insert("pm1a-evt", pm_base, acpi_pm::PM1A_EVT_LEN, pm1_evt.clone())?;
    saved_devices.push(saved("pm1a-evt", &pm1_evt));
    let pm1_cnt = Arc::new(Mutex::new(acpi_pm::Pm1Control::new(control.clone())));
    pio.insert(
        "pm1a-cnt",
        pm_base + acpi_pm::PM1A_CNT_OFFSET,
        acpi_pm::PM1A_CNT_LEN,
        pm1_cnt.clone(),
    )?;
    saved_devices.push(saved("pm1a-cnt", &pm1_cnt));
    let pm_timer = Arc::new(Mutex::new(acpi_pm::PmTimer::new()));
    pio.insert(
        "pm-timer",
        pm_base + acpi_pm::PM_TIMER_OFFSET,
        acpi_pm::PM_TIMER_LEN,
        pm_timer.clone(),
    )?;
    saved_devices.push(saved("pm-timer", &pm_timer));
    let rtc_offset = if cfg.rtc_localtime {
        local_utc_offset()
    } else {
        0
    };
    let rtc = Arc::new(Mutex::new(rtc::Rtc::new(
        rtc_offset,
        cfg.memory,
        Box::new(rtc::host_now),
    )));
    pio.insert("rtc", u64::from(rtc::RTC_PORT), rtc::RTC_LEN, rtc.clone())?;
    saved_devices.push(saved("rtc", &rtc));
    let reset = shared(acpi_pm::ResetControl::new(control.clone()));
    let pci_root = if cfg.pci.is_empty() {
        pio.insert("reset", u64::from(acpi_pm::RESET_PORT), 1, reset)?;
        None
    } else {
        // 0xCF9 sits inside configuration mechanism #1's ports: the PCI device forwards it.
        Some(attach_pci(
            vm,
            &lines,
            cfg,
            &mut pio,
            &mut mmio,
            reset,
            &mut registry,
        )?)
    };

    if let Some(path) = &cfg.debugcon {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("-l debugcon,{}", path.display()))?;
        pio.insert(
            "debugcon",
            u64::from(devices::debugcon::DEBUGCON_PORT),
            1,
            shared(devices::debugcon::DebugCon::new(Box::new(file))),
        )?;
    }
    if let Some(rom) = rom {
        mmio.insert(
            "bootrom",
            rom.base,
            rom.size,
            shared(crate::firmware::RomWrites),
        )?;
        if let Some(mem) = &rom.vars {
            let backing = crate::firmware::KvmFlash {
                vm: vm.clone(),
                mem: mem.clone(),
            };
            mmio.insert(
                "bootvars",
                mem.gpa(),
                mem.len(),
                shared(devices::cfi_flash::CfiFlash::new(Box::new(backing))),
            )?;
        }
    }

    for (index, backend) in &cfg.com {
        let (name, port, irq) = uart::COM_PORTS[*index];
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        vm.register_irqfd(&irqfd, irq)?;
        let host = console::open(name, backend, vm.rundir())
            .with_context(|| format!("-l {name},{backend}"))?;
        let dev = Arc::new(Mutex::new(uart::Uart::new(
            irqfd,
            Box::new(console::ConsoleOut::new(name, host.out, start)),
        )));
        pio.insert(name, u64::from(port), uart::UART_REGS, dev.clone())?;
        saved_devices.push(saved(name, &dev));
        acpi.extend(uart::acpi_device(*index));
        host.input.start(name, dev).context("console thread")?;
    }

    if cfg.pc_testdev {
        use pc_testdev::*;
        pio.insert(
            "pc-testdev exit",
            u64::from(DEBUGEXIT_PORT),
            DEBUGEXIT_LEN,
            shared(DebugExit(control.clone())),
        )?;
        pio.insert(
            "pc-testdev ioport",
            u64::from(IOPORT_BASE),
            IOPORT_LEN,
            shared(Scratch::new(IOPORT_LEN)),
        )?;
        pio.insert("pc-testdev irq", u64::from(IRQ_BASE), IRQ_LEN, {
            let source = lines.source();
            shared(pc_testdev::IrqLines::new(Box::new(move |gsi, level| {
                if let Err(e) = source.set(gsi, level) {
                    log::warn!("pc-testdev: irq {gsi}: {e}");
                }
            })))
        })?;
        mmio.insert(
            "pc-testdev iomem",
            IOMEM_BASE,
            IOMEM_LEN,
            shared(Scratch::new(IOMEM_LEN)),
        )?;
    }
    let mut buses = Buses {
        keyboard,
        pio,
        mmio,
        pm1_evt,
        registry,
        acpi,
        saved: saved_devices,
        pci_root,
    };
    // Last: fw_cfg carries the ACPI tables, which describe the devices placed above.
    if cfg.fw_cfg {
        let dev = crate::firmware::fw_cfg(vm, cfg, &acpi_config(cfg, &buses))?;
        buses.pio.insert(
            "fw_cfg",
            u64::from(devices::fw_cfg::FW_CFG_PORT),
            devices::fw_cfg::FW_CFG_LEN,
            shared(dev),
        )?;
    }
    Ok(buses)
}

/// One MSI-X vector's fast path: an eventfd registered as an irqfd on the vector's own GSI,
/// whose route KVM has as `msg`.
struct MsixIrqfd {
    gsi: u32,
    fd: EventFd,
    /// The message the GSI routes to (None: the last route update failed).
    msg: Option<(u64, u32)>,
}

/// A function's interrupts over KVM: MSI-X vectors through irqfds on GSIs routed to their
/// messages, INTx on its IOAPIC GSI, plain MSI (and the fallback when a vector has no
/// working route) through KVM_SIGNAL_MSI.
struct VmInterrupts {
    vm: Arc<Vm>,
    /// The slot's INTx GSI (u32::MAX: no pin).
    gsi: AtomicU32,
    /// This function's hold on its INTx line (shared with other functions).
    line: IrqSource,
    name: String,
    warned: AtomicBool,
    /// Per vector, created when the table first announces a message for it.
    vectors: Mutex<Vec<Option<MsixIrqfd>>>,
}

impl VmInterrupts {
    fn new(vm: &Arc<Vm>, line: IrqSource, name: String) -> Self {
        Self {
            vm: vm.clone(),
            gsi: AtomicU32::new(u32::MAX),
            line,
            name,
            warned: AtomicBool::new(false),
            vectors: Mutex::new(Vec::new()),
        }
    }

    fn warn_once(&self, what: &str, e: vmmapi::Error) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!("{}: {what}: {e}", self.name);
        }
    }

    /// A GSI routed to (`addr`, `data`) with a fresh eventfd as its irqfd.
    fn new_irqfd(&self, addr: u64, data: u32) -> vmmapi::Result<MsixIrqfd> {
        let gsi = self.vm.allocate_msi_gsi()?;
        let setup = || -> vmmapi::Result<EventFd> {
            self.vm.set_msi_route(gsi, addr, data)?;
            let fd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| vmmapi::Error::Memory(format!("eventfd: {e}")))?;
            self.vm.register_irqfd(&fd, gsi)?;
            Ok(fd)
        };
        match setup() {
            Ok(fd) => Ok(MsixIrqfd {
                gsi,
                fd,
                msg: Some((addr, data)),
            }),
            Err(e) => {
                let _ = self.vm.remove_route(gsi);
                Err(e)
            }
        }
    }
}

impl InterruptSink for VmInterrupts {
    fn msi(&self, addr: u64, data: u32) {
        if let Err(e) = self.vm.signal_msi(addr, data) {
            self.warn_once("MSI", e);
        }
    }

    fn intx(&self, level: bool) {
        let gsi = self.gsi.load(Ordering::Relaxed);
        if gsi != u32::MAX {
            if let Err(e) = self.line.set(gsi, level) {
                self.warn_once("INTx", e);
            }
        }
    }

    /// Points the vector's GSI at the new message (one KVM_SET_GSI_ROUTING), creating the
    /// GSI and irqfd the first time. On failure the vector falls back to KVM_SIGNAL_MSI.
    fn msix_route(&self, vector: u16, addr: u64, data: u32) {
        let mut vectors = self.vectors.lock().unwrap_or_else(|p| p.into_inner());
        let v = usize::from(vector);
        if vectors.len() <= v {
            vectors.resize_with(v + 1, || None);
        }
        match &mut vectors[v] {
            Some(irqfd) => {
                irqfd.msg = None;
                match self.vm.set_msi_route(irqfd.gsi, addr, data) {
                    Ok(()) => irqfd.msg = Some((addr, data)),
                    Err(e) => self.warn_once("MSI-X route", e),
                }
            }
            slot @ None => match self.new_irqfd(addr, data) {
                Ok(irqfd) => {
                    log::debug!(
                        "{}: MSI-X vector {vector} → irqfd on GSI {} ({addr:#x}, {data:#x})",
                        self.name,
                        irqfd.gsi
                    );
                    *slot = Some(irqfd);
                }
                Err(e) => self.warn_once("MSI-X irqfd", e),
            },
        }
    }

    fn intx_irqfd(&self, trigger: &EventFd, resample: &EventFd) -> bool {
        let gsi = self.gsi.load(Ordering::Relaxed);
        if gsi == u32::MAX {
            return false;
        }
        match self.vm.register_irqfd_with_resample(trigger, resample, gsi) {
            Ok(()) => true,
            Err(e) => {
                self.warn_once("INTx irqfd", e);
                false
            }
        }
    }

    fn msix_irqfd(&self, vector: u16) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let vectors = self.vectors.lock().unwrap_or_else(|p| p.into_inner());
        match vectors.get(usize::from(vector)) {
            Some(Some(irqfd)) if irqfd.msg.is_some() => Some(irqfd.fd.as_raw_fd()),
            _ => None,
        }
    }

    /// One eventfd write when the vector's route carries this message; else KVM_SIGNAL_MSI.
    fn msix(&self, vector: u16, addr: u64, data: u32) {
        {
            let vectors = self.vectors.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(Some(irqfd)) = vectors.get(usize::from(vector)) {
                if irqfd.msg == Some((addr, data)) && irqfd.fd.write(1).is_ok() {
                    return;
                }
            }
        }
        self.msi(addr, data);
    }
}

impl Drop for VmInterrupts {
    fn drop(&mut self) {
        let vectors = self.vectors.get_mut().unwrap_or_else(|p| p.into_inner());
        for irqfd in vectors.drain(..).flatten() {
            let _ = self.vm.unregister_irqfd(&irqfd.fd, irqfd.gsi);
            let _ = self.vm.remove_route(irqfd.gsi);
        }
    }
}

/// Builds the PCI root from the `-s` slots, assigns BARs as firmware would and places
/// configuration mechanism #1 (with the reset register at 0xCF9), ECAM and the BAR windows
/// on the buses.
fn attach_pci(
    vm: &Arc<Vm>,
    lines: &Arc<IrqLines>,
    cfg: &VmConfig,
    pio: &mut Bus,
    mmio: &mut Bus,
    reset: Arc<Mutex<dyn BusDevice>>,
    registry: &mut DeviceRegistry,
) -> Result<Arc<PciRoot>> {
    let mut root = PciRoot::new();
    let layout = pci_layout(cfg);
    for s in &cfg.pci {
        let (b, d, f) = (s.bus, s.slot, s.func);
        let sink = Arc::new(VmInterrupts::new(
            vm,
            lines.source(),
            format!("pci {b}:{d}:{f} {}", s.emulation.name),
        ));
        let ctx = PciContext {
            vm,
            bus: b,
            slot: d,
            func: f,
            opts: &s.opts,
            irq: sink.clone(),
            firmware: cfg.bootrom.is_some(),
        };
        let dev = (s.emulation.build)(&ctx)
            .with_context(|| format!("-s {b}:{d}:{f},{}", s.emulation.name))?;
        let pin = dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config()
            .interrupt_pin();
        if let Some(gsi) = pci_root::intx_gsi(d, pin) {
            sink.gsi.store(gsi, Ordering::Relaxed);
        }
        let what = || format!("-s {b}:{d}:{f},{}", s.emulation.name);
        registry
            .add(RegisteredDevice {
                id: s.id.clone(),
                emulation: s.emulation.name,
                address: (b, d, f),
                dev: dev.clone(),
            })
            .map_err(|e| anyhow!("{}: {e}", what()))?;
        match &s.rom {
            Some(path) => {
                let image = std::fs::read(path)
                    .with_context(|| format!("{}: rom={}", what(), path.display()))?;
                root.add_with_rom(b, d, f, dev, image).with_context(what)?;
            }
            None => root.add(b, d, f, dev).with_context(what)?,
        }
        log::info!("pci {b}:{d}:{f}: {}", s.emulation.name);
    }
    // OVMF reads its ACPI timer's address from the PIIX4 PM function at 00:01.3 behind an
    // i440FX host bridge: give firmware one when slot 1 is free.
    if cfg.bootrom.is_some() && !cfg.pci.iter().any(|s| s.bus == 0 && s.slot == 1) {
        let pm = devices::pci::piix4_pm::piix4_pm(layout.pm_base());
        root.add(0, 1, 3, Arc::new(Mutex::new(pm)))?;
    }
    root.assign_resources()?;
    let root = Arc::new(root);
    pio.insert(
        "pci config",
        u64::from(pci_root::CONFIG_IO_PORT),
        pci_root::CONFIG_IO_LEN,
        shared(root.config_io(Some(reset))),
    )?;
    // pc-testdev's IRQ ports sit at the bottom of the I/O window (the allocator skips them).
    let io_base = if cfg.pc_testdev {
        u64::from(pc_testdev::IRQ_BASE) + pc_testdev::IRQ_LEN
    } else {
        pci_root::IO_BASE
    };
    pio.insert(
        "pci io",
        io_base,
        pci_root::IO_END - io_base,
        shared(root.io_window(io_base)),
    )?;
    if layout.has_ecam() {
        mmio.insert(
            "pci ecam",
            pci_root::ECAM_BASE,
            pci_root::ECAM_SIZE,
            shared(root.ecam()),
        )?;
    }
    // The windows the DSDT announces: the same function gives both.
    let (mem32_base, mem32_last) = layout.mem32_window();
    let (mem32_base, mem32_end) = (u64::from(mem32_base), u64::from(mem32_last) + 1);
    let (mem64_base, mem64_last) = layout.mem64_window();
    let mem64_end = mem64_last + 1;
    mmio.insert(
        "pci mem32",
        mem32_base,
        mem32_end - mem32_base,
        shared(root.mem_window(mem32_base)),
    )?;
    mmio.insert(
        "pci mem64",
        mem64_base,
        mem64_end - mem64_base,
        shared(root.mem_window(mem64_base)),
    )?;
    Ok(root)
}

/// The host's offset from UTC in seconds, for a local-time RTC.
fn local_utc_offset() -> i64 {
    let now = rtc::host_now() as libc::time_t;
    // SAFETY: tm is plain data filled by localtime_r from a valid time_t.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to stack values.
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn pin_current_thread(cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data, manipulated with libc's macros' function forms.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::warn!(
                "cannot pin to host CPUs {cpus:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// A machine built from its resources and not yet running: guest RAM holding the kernel (or
/// the boot ROM), the devices on their buses with the ACPI tables that describe them, and
/// the boot vCPU's entry state. [`Machine::build`] is the fresh boot; a restore from a
/// snapshot is the second way to build one. [`Machine::run`] starts it.
pub struct Machine {
    cfg: VmConfig,
    vm: Arc<Vm>,
    /// Kept for the machine's life: its flash mapping backs the `bootvars` device.
    _rom: Option<crate::firmware::BootRom>,
    buses: Buses,
    entry: Option<loader::EntryState>,
    /// A restore: each vCPU's saved state (put back once it is created).
    restored_vcpus: Option<Vec<vmmapi::VcpuState>>,
    control: Arc<VmControl>,
    start: Instant,
}

/// Where a machine's guest comes from.
enum StartFrom {
    /// A kernel, what rhyveload loaded, or a boot ROM.
    Boot(adopt::Boot),
    /// A snapshot (`-r`), read and checked.
    Snapshot(Box<Restore>),
}

/// What a snapshot of this machine must match.
fn machine_info(
    vm: &Vm,
    cfg: &VmConfig,
    registry: &DeviceRegistry,
    saved: &[SavedDevice],
) -> MachineInfo {
    MachineInfo {
        writer: format!("rhyve {}", env!("CARGO_PKG_VERSION")),
        cpus: cfg.cpus,
        regions: vm.ram().regions().iter().map(|r| (r.0, r.2)).collect(),
        pci: registry.layout(),
        legacy: saved.iter().map(|(n, _)| n.clone()).collect(),
        cpuid: vm.cpuid_leaves(0, &cfg.topology),
    }
}

/// Puts the snapshot's VM and device state back into the machine just built from the same
/// options (after checking it is the same machine); returns the vCPUs' states.
fn restore_devices(
    restore: &Restore,
    vm: &Vm,
    cfg: &VmConfig,
    buses: &Buses,
) -> Result<Vec<vmmapi::VcpuState>> {
    restore.check(&machine_info(vm, cfg, &buses.registry, &buses.saved))?;
    let vm_state = restore.decode("vm", vmmapi::VmState::decode)?;
    vm.restore_state(&vm_state)
        .with_context(|| format!("-r {}: the VM's state", restore.file.display()))?;
    for (name, dev) in &buses.saved {
        let dev = dev.clone();
        restore.decode(&format!("dev.{name}"), |b| {
            dev.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(b)
        })?;
    }
    if let Some(root) = &buses.pci_root {
        for (b, d, f) in buses.registry.addresses() {
            restore.decode(&format!("pci.{b}:{d}:{f}"), |bytes| {
                root.restore_function(d, f, bytes)
            })?;
        }
    }
    (0..cfg.cpus)
        .map(|i| restore.decode(&format!("vcpu.{i}"), vmmapi::VcpuState::decode))
        .collect()
}

impl Machine {
    /// Builds the machine `cfg` describes (`start`: the process start, for boot timings).
    pub fn build(cfg: VmConfig, start: Instant) -> Result<Machine> {
        if cfg.acpi {
            log::debug!("-A: ACPI tables are always generated (accepted for compatibility)");
        }
        // Direct boot (--kernel) or what rhyveload loaded into the VM object: see adopt.rs.
        let phase = |what: &str| log::debug!("boot: {what} at {:.1} ms", ms_since(start));
        // A restore (-r): the snapshot is read and checked before anything is built.
        let mut start_from = match &cfg.restore {
            Some(files) => StartFrom::Snapshot(Box::new(Restore::open(files)?)),
            None => StartFrom::Boot(adopt::Boot::prepare(&cfg)?),
        };
        let hv = Hypervisor::open()?;
        let mut vm = match &mut start_from {
            StartFrom::Boot(boot) => boot.create_vm(&hv, &cfg)?,
            StartFrom::Snapshot(r) => {
                r.check_memory(&loader::layout::ram_regions(cfg.memory))?;
                let memory = vmmapi::MemoryOptions {
                    huge_pages: cfg.huge_pages,
                    wired: cfg.wired,
                };
                Vm::create_from_image(&hv, &cfg.name, &r.machine.regions, &memory, &r.image)?
            }
        };
        phase("VM and guest RAM created");
        let rom = match &cfg.bootrom {
            Some(path) => {
                // Whatever rhyveload left in the object is not what runs now.
                vm.object().clear_boot_state()?;
                Some(crate::firmware::load_bootrom(
                    &mut vm,
                    path,
                    cfg.bootvars.as_deref(),
                )?)
            }
            None => None,
        };
        let vm = Arc::new(vm);
        let control = Arc::new(VmControl::new());
        // A vCPU, console, control or signal thread that panics would leave a VM that
        // never finishes: stop it with an error (exit 4). Device workers handle their own
        // (the device needs a reset, the VM runs on).
        let on_panic = Arc::downgrade(&control);
        // (Set once per process: a second machine in the same process keeps the first's.)
        let _ = devices::threads::set_panic_handler(Box::new(move |kind, name| {
            if let Some(control) = on_panic.upgrade() {
                control.request_stop(StopReason::Error(format!(
                    "{} thread '{name}' panicked",
                    kind.as_str()
                )));
            }
        }));
        // Block termination signals before any thread exists, so only the signal thread
        // sees them.
        signals::block_termination_signals()?;
        // Every thread from here on starts filtered (and with the signals blocked).
        crate::sandbox::install(cfg.seccomp, cfg.user)?;
        crate::host_output::start().context("stdout/stderr writers")?;
        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| anyhow!("kick signal handler: {e}"))?;
        // Devices first: the ACPI tables describe the devices that exist.
        let buses = build_buses(&vm, &cfg, rom.as_ref(), &control, start)?;
        phase("devices built");
        let boot = match start_from {
            StartFrom::Boot(boot) => boot,
            StartFrom::Snapshot(r) => {
                let vcpus = restore_devices(&r, &vm, &cfg, &buses)?;
                phase("state restored");
                return Ok(Machine {
                    cfg,
                    vm,
                    _rom: rom,
                    buses,
                    entry: None,
                    restored_vcpus: Some(vcpus),
                    control,
                    start,
                });
            }
        };
        // With a boot ROM the firmware builds the tables (ACPI from fw_cfg) and the vCPU
        // starts at the reset vector. Otherwise boot tables first: the loader hands the RSDP
        // address to the kernel. ACPI tables are always generated, as bhyve does on amd64
        // (-A is accepted for compatibility).
        let entry = if rom.is_some() {
            None
        } else {
            if cfg.mptable {
                let ids: Vec<u8> = cfg.topology.apic_ids().iter().map(|&id| id as u8).collect();
                loader::mptable::write_mptable_with_ids(vm.ram().memory(), &ids)?;
            }
            let acpi = acpi_config(&cfg, &buses);
            let rsdp = loader::acpi::write_acpi_tables(vm.ram().memory(), &acpi)?;
            Some(boot.entry(&vm, &cfg, rsdp)?)
        };
        phase("boot tables written and kernel loaded");
        Ok(Machine {
            cfg,
            vm,
            _rom: rom,
            buses,
            entry,
            restored_vcpus: None,
            control,
            start,
        })
    }

    /// The resources it was built from.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Runs the machine until it stops: vCPU threads, the control socket, halt detection.
    pub fn run(self) -> Result<StopReason> {
        self.run_observed(None)
    }

    /// [`run`](Self::run), and once the vCPUs run, `on_running` gets what others may act
    /// on (Firecracker's API, after its InstanceStart).
    pub fn run_observed(self, on_running: Option<OnRunning>) -> Result<StopReason> {
        // Again (idempotent): the threads started here inherit the mask of this thread,
        // which need not be the one that built the machine.
        signals::block_termination_signals()?;
        let stdio_console = self
            .cfg
            .com
            .iter()
            .any(|(_, b)| *b == ConsoleBackend::Stdio);
        if stdio_console && terminal::stdin_is_tty() {
            terminal::enter_raw().context("stdin terminal")?;
        }
        let Machine {
            cfg,
            vm,
            _rom,
            buses,
            entry,
            restored_vcpus,
            control,
            start,
        } = self;
        let result = run_vcpus(
            &vm,
            &cfg,
            entry.as_ref(),
            restored_vcpus,
            buses,
            &control,
            start,
            on_running,
        );
        // Before the VM object goes: the backends' files live in its directory.
        terminal::restore();
        console::cleanup();
        let reason = result?;
        adopt::on_stop(&vm, &cfg, &reason);
        Ok(reason)
    }
}

/// What others may act on once the vCPUs run.
pub struct RunningVm {
    /// The VM's state and the actions on it.
    pub controller: Arc<VmController>,
    /// The i8042 keyboard controller.
    pub keyboard: Arc<Mutex<i8042::I8042>>,
}

/// Told once the vCPUs run.
pub type OnRunning = Box<dyn FnOnce(RunningVm) + Send>;

/// Builds and runs the VM `cfg` describes; returns bhyve's exit status.
pub fn run(cfg: VmConfig, start: Instant) -> Result<i32> {
    let name = cfg.name.clone();
    let result = Machine::build(cfg, start).and_then(Machine::run);
    // (Again, for a machine that failed to build after opening its consoles.)
    terminal::restore();
    console::cleanup();
    let reason = result?;
    if let StopReason::Error(msg) = &reason {
        return Err(anyhow!("{msg}"));
    }
    log::info!(
        "VM {name} stopped: {reason:?} after {:.3} s",
        start.elapsed().as_secs_f64()
    );
    Ok(reason.exit_code())
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// How often the main thread asks every vCPU whether it is halted for good.
const HALT_CHECK_PERIOD: Duration = Duration::from_millis(250);
/// Consecutive rounds that must find the machine halted before it counts (a vCPU that was
/// woken by an NMI between two answers of one round cannot fake a halt twice in a row).
const HALT_ROUNDS: u32 = 2;

/// Waits for a stop request; meanwhile, every [`HALT_CHECK_PERIOD`], asks each vCPU for its
/// [`crate::vcpu::HaltState`] (one SIGRTMIN kick each) and requests [`StopReason::Halt`]
/// (exit 2, as bhyve) once all of them have answered "halted with interrupts off" (APs that
/// never started count when the BSP is halted) for [`HALT_ROUNDS`] rounds in a row.
fn wait_for_stop(
    control: &VmControl,
    threads: &[JoinHandle<()>],
    probes: &[Arc<HaltProbe>],
) -> StopReason {
    let mut round = 0u64;
    let mut halted_rounds = 0u32;
    loop {
        if let Some(reason) = control.wait_timeout(HALT_CHECK_PERIOD) {
            return reason;
        }
        if round > 0 {
            let answers: Vec<_> = probes.iter().map(|p| p.answer(round)).collect();
            if all_halted(&answers) {
                halted_rounds += 1;
                if halted_rounds >= HALT_ROUNDS {
                    log::info!("every vCPU is halted with interrupts disabled");
                    control.request_stop(StopReason::Halt);
                    continue;
                }
            } else {
                halted_rounds = 0;
            }
        }
        round += 1;
        for (probe, thread) in probes.iter().zip(threads) {
            probe.ask(round);
            if !thread.is_finished() {
                let _ = thread.kill(SIGRTMIN());
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_vcpus(
    vm: &Arc<Vm>,
    cfg: &VmConfig,
    entry: Option<&loader::EntryState>,
    restored_vcpus: Option<Vec<vmmapi::VcpuState>>,
    buses: Buses,
    control: &Arc<VmControl>,
    start: Instant,
    on_running: Option<OnRunning>,
) -> Result<StopReason> {
    let info = machine_info(vm, cfg, &buses.registry, &buses.saved);
    let pio = Arc::new(buses.pio);
    let mmio = Arc::new(buses.mmio);
    let keyboard = buses.keyboard;
    let mut vcpus = Vec::new();
    let restoring = restored_vcpus.is_some();
    let mut states = restored_vcpus.map(Vec::into_iter);
    for id in 0..cfg.cpus {
        let vcpu = vm.create_vcpu(id, &cfg.topology)?;
        if let Some(state) = states.as_mut().and_then(Iterator::next) {
            vcpu.restore_state(&state)
                .with_context(|| format!("-r: vCPU {id}'s state"))?;
        } else if let (0, Some(entry)) = (id, entry) {
            // Without an entry state (a boot ROM) the vCPU keeps KVM's power-on state.
            boot::set_entry_state(&vcpu, entry)?;
        }
        vcpus.push(vcpu);
    }
    signals::spawn_signal_thread(
        control.clone(),
        Arc::downgrade(&buses.pm1_evt),
        cfg.power_grace,
    )?;

    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let probes: Vec<Arc<HaltProbe>> = vcpus.iter().map(|_| Arc::default()).collect();
    let ctls: Vec<Arc<VcpuCtl>> = vcpus
        .iter()
        .map(|v| Arc::new(VcpuCtl::new(v.id())))
        .collect();
    let mut controller = VmController::new(ctls.clone(), Arc::new(buses.registry), control.clone());
    // A firmware boot's ROM, flash and fw_cfg are not saved yet: such a VM refuses.
    if cfg.bootrom.is_none() {
        controller = controller.with_snapshots(SnapshotParts {
            vm: vm.clone(),
            machine: info,
            legacy: buses.saved,
        });
    }
    let controller = Arc::new(controller);
    let stats: Vec<Arc<VcpuStats>> = vcpus
        .iter()
        .map(|_| Arc::new(VcpuStats::for_buses(pio.len(), mmio.len())))
        .collect();
    // Dropped (socket removed) when this function returns, before the runtime directory goes.
    let _control_socket = control_server::ControlServer::start(
        vm.rundir(),
        control_server::VmHandles {
            name: cfg.name.clone(),
            memory: cfg.memory,
            started: start,
            vcpus: ctls.clone(),
            stats: stats.clone(),
            pio: pio.clone(),
            mmio: mmio.clone(),
            controller: controller.clone(),
        },
    )?;
    crate::adopt::consume_boot_state(vm)?;
    // Everything is open: the guest never runs with more than the sandbox leaves.
    crate::sandbox::drop_privileges(cfg.user, cfg.chroot.as_deref())?;
    // Restored devices wait paused for the vCPUs and irqchip to be back: they start now
    // (or at the resume a paused restore waits for).
    let start_paused = restoring && cfg.restore_paused;
    if restoring && !start_paused {
        controller.devices().resume_all();
    }
    if start_paused {
        // Before the threads exist: each parks before its first KVM_RUN.
        ctls.iter().for_each(|c| c.request_pause());
    }
    for (((vcpu, probe), ctl), stats) in vcpus.into_iter().zip(&probes).zip(&ctls).zip(&stats) {
        let id = vcpu.id();
        let pins = cfg
            .pins
            .iter()
            .find(|(v, _)| *v == id)
            .map(|(_, c)| c.clone());
        let ctx = VcpuContext {
            exits: ExitHandler::new(pio.clone(), mmio.clone(), stats.clone(), cfg.strict_io),
            control: control.clone(),
            stats: stats.clone(),
            halt: probe.clone(),
            ctl: ctl.clone(),
        };
        let handle = devices::threads::spawn(
            ThreadKind::Vcpu,
            format!("{}{id}", cfg.vcpu_thread_prefix),
            move || {
                if let Some(cpus) = pins {
                    pin_current_thread(&cpus);
                }
                crate::vcpu::run(vcpu, ctx)
            },
        )?;
        threads.push(handle);
    }
    if start_paused {
        controller.started_paused();
    } else {
        controller.started();
    }
    log::debug!("boot: vCPUs started at {:.1} ms", ms_since(start));
    if let Some(files) = cfg.restore.as_ref().filter(|_| restoring) {
        log::info!(
            "VM {} restored from {}: {} {:.1} ms after rhyve started",
            cfg.name,
            files.memory.display(),
            if start_paused { "paused" } else { "running" },
            ms_since(start)
        );
    }
    if let Some(f) = on_running {
        f(RunningVm {
            controller: controller.clone(),
            keyboard: keyboard.clone(),
        });
    }
    crate::sandbox::enter_main()?;
    let reason = wait_for_stop(control, &threads, &probes);
    // Kick every vCPU out of KVM_RUN until its thread has seen the stop; a signal that lands
    // just before the thread enters KVM_RUN is lost, hence the retries.
    for t in &threads {
        while !t.is_finished() {
            let _ = t.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq_lines::test_vm::{ioapic_irr, vm};

    #[test]
    fn two_functions_on_one_intx_line_do_not_cancel_each_other() {
        let vm = vm("intx-shared");
        let lines = IrqLines::new(vm.clone());
        let a = VmInterrupts::new(&vm, lines.source(), "a".into());
        let b = VmInterrupts::new(&vm, lines.source(), "b".into());
        let gsi = platform::irq::intx_gsi(2, 1).unwrap();
        a.gsi.store(gsi, Ordering::Relaxed);
        b.gsi.store(gsi, Ordering::Relaxed);
        a.intx(true);
        b.intx(true);
        // The guest reads A's ISR (A deasserts): B still has an interrupt pending.
        a.intx(false);
        assert_ne!(
            ioapic_irr(&vm) & (1 << gsi),
            0,
            "A's deassert cancelled B's interrupt"
        );
        b.intx(false);
        assert_eq!(ioapic_irr(&vm) & (1 << gsi), 0);
    }
}
