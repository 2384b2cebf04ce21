//! The PCI bus (bhyve's pci_emul): functions at (bus, slot, function) with their configuration
//! space, reached through configuration mechanism #1 (0xCF8/0xCFC) and ECAM, BARs the guest
//! can size and move, INTx routed to IOAPIC pins and MSI-X.
//!
//! - [`config::PciConfig`]: one function's config space (BARs, capabilities, MSI-X capability).
//! - [`msi::Msi`]: the device side of a function's MSI capability (one vector, masking).
//! - [`msix::MsixTable`]: an MSI-X table + PBA a device exposes in one of its BARs.
//! - [`root::PciRoot`]: the functions, the BAR allocator and the bus devices to put on the
//!   port and MMIO buses (config mechanism #1, ECAM, the BAR windows).
//! - [`hostbridge`], [`lpc`]: the bridges bhyve users place with `-s 0,hostbridge -s 31,lpc`.
//!
//! Address map (the ACPI `\_SB.PCI0._CRS` and MCFG describe the same):
//!
//! | window                          | use                                      |
//! |---------------------------------|------------------------------------------|
//! | I/O 0xCF8–0xCFF                 | configuration mechanism #1 (+ 0xCF9 reset) |
//! | I/O [0x2000, 0x10000)           | I/O BARs                                  |
//! | [0xC000_0000, 0xE000_0000)      | 32-bit memory BARs                        |
//! | [0xE000_0000, 0xF000_0000)      | ECAM, buses 0–255                         |
//! | [0x80_0000_0000, +64 GiB)       | 64-bit memory BARs larger than 128 MiB    |
//!
//! INTx: slot S, pin P (1 = INTA# … 4 = INTD#) → IOAPIC GSI 16 + ((S + P − 1) mod 8)
//! ([`root::intx_gsi`]), level-triggered, active low as PCI wants.

pub mod config;
pub mod hostbridge;
pub mod lpc;
pub mod msi;
pub mod msix;
pub mod piix4_pm;
pub mod root;

use crate::lifecycle::Lifecycle;

pub use config::PciConfig;
pub use msi::{Msi, MsiNotify};
pub use msix::{MsixNotify, MsixTable};
pub use root::{intx_gsi, PciError, PciRoot};

/// What address space a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// Memory below 4 GiB.
    Mem32,
    /// Memory anywhere in the 64-bit space (takes two BAR slots).
    Mem64,
}

/// A BAR a function declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    pub kind: BarKind,
    /// Size in bytes, a power of two.
    pub size: u64,
    pub prefetchable: bool,
}

/// How a function raises interrupts; implemented by the VMM over KVM, by recorders in tests.
///
/// MSI-X vectors have two paths. The slow one, [`InterruptSink::msix_route`], runs when the
/// guest reprograms the table: [`MsixTable`] announces each vector's message before the
/// vector can first fire with it (MSI-X enabled, vector and function unmasked) and again
/// whenever the guest changes it. The fast one, [`InterruptSink::msix`], raises a vector.
/// Over KVM the announcement points the vector's own GSI route at the message
/// (KVM_SET_GSI_ROUTING) and raising it is one write to the irqfd on that GSI — no ioctl per
/// interrupt, and the device worker never leaves its thread. Devices stay KVM-agnostic: they
/// only ever talk to `MsixTable`, which keeps the masking and pending-bit semantics and
/// decides when a route changes. `msix` still gets the message, so a sink whose route could
/// not be set up (no free GSI, an ioctl failed) can always fall back to [`InterruptSink::msi`].
pub trait InterruptSink: Send + Sync {
    /// Delivers one MSI message now.
    fn msi(&self, addr: u64, data: u32);
    /// Drives the function's INTx pin.
    fn intx(&self, level: bool);
    /// MSI-X vector `vector` will from now on be raised with message (`addr`, `data`).
    /// Called outside the interrupt path (table or capability writes), before the first
    /// [`InterruptSink::msix`] with that message. Default: nothing to prepare.
    fn msix_route(&self, vector: u16, addr: u64, data: u32) {
        let _ = (vector, addr, data);
    }
    /// Raises MSI-X vector `vector`, whose message (`addr`, `data`) was announced with
    /// [`InterruptSink::msix_route`]. Default: [`InterruptSink::msi`].
    fn msix(&self, vector: u16, addr: u64, data: u32) {
        let _ = vector;
        self.msi(addr, data);
    }
    /// The eventfd whose write raises `vector` with its announced message, if the sink has
    /// one (a passed-through device's interrupts are handed to it, so they skip rhyve).
    fn msix_irqfd(&self, vector: u16) -> Option<std::os::fd::RawFd> {
        let _ = vector;
        None
    }
    /// Makes `trigger` assert the function's INTx line until the guest's EOI, which
    /// deasserts it and signals `resample` (a passed-through device's INTx, without rhyve
    /// in the path). False: the sink cannot.
    fn intx_irqfd(
        &self,
        trigger: &vmm_sys_util::eventfd::EventFd,
        resample: &vmm_sys_util::eventfd::EventFd,
    ) -> bool {
        let _ = (trigger, resample);
        false
    }
}

/// A PCI function; its [`Lifecycle`] is how the VMM pauses it and reads its counters.
pub trait PciDevice: Lifecycle + Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// Guest read at `offset` inside BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Guest write at `offset` inside BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// A BAR got a new guest address or was enabled/disabled (None = not decoded):
    /// re-register ioeventfds.
    fn bar_moved(&mut self, _bar: usize, _addr: Option<u64>) {}
    /// Called after every config-space write the PciConfig accepted (e.g. MSI-X enable toggled).
    fn config_written(&mut self, _offset: u16, _len: usize) {}
}

/// A function that is only its configuration space — no BARs, no interrupts — as bridges
/// are (`hostbridge`, `amd_hostbridge`, `lpc`).
pub struct ConfigOnlyFunction {
    config: PciConfig,
}

impl ConfigOnlyFunction {
    /// A function with `config` as its whole state.
    pub fn new(config: PciConfig) -> Self {
        Self { config }
    }
}

/// Configuration space only: nothing to pause, no counters; the state is the config space.
impl Lifecycle for ConfigOnlyFunction {
    fn save_state(&self) -> Result<Vec<u8>, crate::lifecycle::LifecycleError> {
        let mut w = platform::codec::Writer::new();
        self.config.save_state(&mut w);
        Ok(w.finish())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::lifecycle::LifecycleError> {
        let mut r = platform::codec::Reader::new(state);
        self.config.restore_state(&mut r)?;
        Ok(r.finish()?)
    }
}

impl PciDevice for ConfigOnlyFunction {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
