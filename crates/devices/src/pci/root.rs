//! The PCI root complex: the functions on bus 0, configuration mechanism #1, ECAM, the BAR
//! allocator (what firmware would do; Linux keeps the assignments) and the BAR windows.
//!
//! BAR dispatch needs no bus re-registration when the guest moves a BAR: the windows are
//! fixed bus devices ([`PciRoot::io_window`], [`PciRoot::mem_window`]) that look the address
//! up in a decode table, rebuilt for a function after each config write that moves one of
//! its BARs or changes its decode bits (`PciDevice::bar_moved` is called then).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::config::{CMD_IO, CMD_MEM, COMMAND, NUM_BARS};
use super::{BarKind, PciDevice};
use crate::BusDevice;

use platform::alloc::RangeAllocator;
use platform::map;

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC (8 ports).
pub const CONFIG_IO_PORT: u16 = platform::ports::PCI_CONFIG_PORT;
pub const CONFIG_IO_LEN: u64 = platform::ports::PCI_CONFIG_LEN as u64;
/// ECAM: 1 MiB per bus, buses 0..=255.
pub const ECAM_BASE: u64 = map::ECAM_BASE;
pub const ECAM_SIZE: u64 = map::ECAM_SIZE;
/// Direct boot's 32-bit memory BAR window `[MEM32_BASE, MEM32_END)`.
pub const MEM32_BASE: u64 = map::PCI_MEM32_WINDOW.0 as u64;
pub const MEM32_END: u64 = map::PCI_MEM32_WINDOW.1 as u64 + 1;
/// Direct boot's 64-bit memory BAR window (above any RAM this VMM maps).
pub const MEM64_BASE: u64 = map::PCI_MEM64_WINDOW.0;
pub const MEM64_SIZE: u64 = map::PCI_MEM64_WINDOW.1 - map::PCI_MEM64_WINDOW.0 + 1;
/// I/O BAR window `[IO_BASE, IO_END)`.
pub const IO_BASE: u64 = map::PCI_IO_WINDOW.0 as u64;
pub const IO_END: u64 = map::PCI_IO_WINDOW.1 as u64 + 1;
/// Where the allocator starts handing out I/O BARs: the first page of the window stays free
/// for pc-testdev's IRQ ports at 0x2000.
pub const IO_ALLOC_BASE: u64 = map::PCI_IO_ALLOC_BASE as u64;
/// 64-bit BARs up to this size are placed below 4 GiB, as bhyve does.
const MEM64_LOW_LIMIT: u64 = 128 << 20;

/// Slots per bus and functions per slot.
pub const SLOTS: u8 = platform::irq::PCI_SLOTS;
pub const FUNCTIONS: u8 = 8;

pub use platform::irq::intx_gsi;

/// PCI assembly errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// Only bus 0 exists; slots 0..=31, functions 0..=7.
    #[error("PCI address {0}:{1}:{2} is out of range (bus 0, slot 0-31, function 0-7)")]
    OutOfRange(u8, u8, u8),
    /// Two devices at one address.
    #[error("PCI slot {0}:{1}:{2} is already used")]
    Duplicate(u8, u8, u8),
    /// `rom=` larger than a ROM BAR can decode.
    #[error("the expansion ROM of {0}:{1} is {2} bytes: at most 16 MiB")]
    RomTooBig(u8, u8, u64),
    /// The BAR windows are full.
    #[error("no room for BAR {bar} ({size:#x} bytes) of {slot}:{func} in its window")]
    NoSpace {
        slot: u8,
        func: u8,
        bar: usize,
        size: u64,
    },
}

/// A function on the bus.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

struct Function {
    slot: u8,
    func: u8,
    dev: SharedPciDevice,
    /// The expansion ROM's contents (`rom=PATH`), served by the root itself.
    rom: Option<Arc<[u8]>>,
}

/// The decode table's pseudo BAR number for an expansion ROM.
const ROM_BAR: usize = NUM_BARS;

#[derive(Debug, Clone, Copy)]
struct Decode {
    io: bool,
    base: u64,
    len: u64,
    function: usize,
    bar: usize,
}

fn lock(d: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

fn decoded_bars(d: &dyn PciDevice) -> [Option<u64>; NUM_BARS] {
    std::array::from_fn(|b| d.config().bar_address(b))
}

/// The functions of bus 0 and their decode state.
#[derive(Default)]
pub struct PciRoot {
    functions: Vec<Function>,
    config_address: AtomicU32,
    decode: RwLock<Vec<Decode>>,
}

impl PciRoot {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `dev` at `bus:slot:func`.
    pub fn add(
        &mut self,
        bus: u8,
        slot: u8,
        func: u8,
        dev: SharedPciDevice,
    ) -> Result<(), PciError> {
        if bus != 0 || slot >= SLOTS || func >= FUNCTIONS {
            return Err(PciError::OutOfRange(bus, slot, func));
        }
        if self.find(slot, func).is_some() {
            return Err(PciError::Duplicate(bus, slot, func));
        }
        self.functions.push(Function {
            slot,
            func,
            dev,
            rom: None,
        });
        Ok(())
    }

    /// Places `dev` with an expansion ROM holding `rom` (its decode size rounded up to a
    /// power of two); firmware assigns the ROM BAR and runs the image.
    pub fn add_with_rom(
        &mut self,
        bus: u8,
        slot: u8,
        func: u8,
        dev: SharedPciDevice,
        rom: Vec<u8>,
    ) -> Result<(), PciError> {
        if !lock(&dev).config_mut().set_expansion_rom(rom.len() as u64) {
            return Err(PciError::RomTooBig(slot, func, rom.len() as u64));
        }
        self.add(bus, slot, func, dev)?;
        if let Some(f) = self.functions.last_mut() {
            f.rom = Some(rom.into());
        }
        Ok(())
    }

    fn find(&self, slot: u8, func: u8) -> Option<usize> {
        self.functions
            .iter()
            .position(|f| f.slot == slot && f.func == func)
    }

    /// What firmware does before the OS runs: sets the multifunction bit where a slot has
    /// several functions, the interrupt line of functions with a pin, assigns every BAR an
    /// address in its window (largest first, naturally aligned) and enables decoding.
    pub fn assign_resources(&mut self) -> Result<(), PciError> {
        let mut io = RangeAllocator::new(IO_ALLOC_BASE, IO_END);
        let mut mem32 = RangeAllocator::new(MEM32_BASE, MEM32_END);
        let mut mem64 = RangeAllocator::new(MEM64_BASE, MEM64_BASE + MEM64_SIZE);
        let mut bars = Vec::new();
        for (i, f) in self.functions.iter().enumerate() {
            let multi = self.functions.iter().filter(|g| g.slot == f.slot).count() > 1;
            let mut d = lock(&f.dev);
            let c = d.config_mut();
            if f.func == 0 {
                c.set_multifunction(multi);
            }
            if let Some(gsi) = intx_gsi(f.slot, c.interrupt_pin()) {
                c.set_interrupt_line(gsi as u8);
            }
            for b in 0..NUM_BARS {
                if let Some(spec) = c.bar_spec(b) {
                    bars.push((i, b, spec));
                }
            }
        }
        bars.sort_by_key(|&(i, b, s)| (std::cmp::Reverse(s.size), i, b));
        for (i, b, spec) in bars {
            let window = match spec.kind {
                BarKind::Io => &mut io,
                BarKind::Mem64 if spec.size > MEM64_LOW_LIMIT => &mut mem64,
                BarKind::Mem32 | BarKind::Mem64 => &mut mem32,
            };
            let f = &self.functions[i];
            let addr = window.allocate(spec.size).ok_or(PciError::NoSpace {
                slot: f.slot,
                func: f.func,
                bar: b,
                size: spec.size,
            })?;
            let mut d = lock(&f.dev);
            let c = d.config_mut();
            c.set_bar_address(b, addr);
            let bit = if spec.kind == BarKind::Io {
                CMD_IO
            } else {
                CMD_MEM
            };
            let cmd = c.command() | bit;
            c.set_u16(COMMAND, cmd);
        }
        for i in 0..self.functions.len() {
            let f = &self.functions[i];
            let mut d = lock(&f.dev);
            for (b, a) in decoded_bars(&*d).into_iter().enumerate() {
                if a.is_some() {
                    d.bar_moved(b, a);
                }
            }
            drop(d);
            self.update_decode(i);
        }
        Ok(())
    }

    /// Rebuilds function `i`'s entries in the decode table.
    fn update_decode(&self, i: usize) {
        let Some(f) = self.functions.get(i) else {
            return;
        };
        let entries: Vec<Decode> = {
            let d = lock(&f.dev);
            let c = d.config();
            let rom = c.rom_address().zip(c.rom_size()).map(|(base, len)| Decode {
                io: false,
                base,
                len,
                function: i,
                bar: ROM_BAR,
            });
            (0..NUM_BARS)
                .filter_map(|b| {
                    let spec = c.bar_spec(b)?;
                    let base = c.bar_address(b)?;
                    Some(Decode {
                        io: spec.kind == BarKind::Io,
                        base,
                        len: spec.size,
                        function: i,
                        bar: b,
                    })
                })
                .chain(rom)
                .collect()
        };
        let mut t = self.decode.write().unwrap_or_else(|p| p.into_inner());
        t.retain(|e| e.function != i);
        t.extend(entries);
    }

    /// Puts a snapshot's state back into function `slot:func` (bus 0), then decodes its BARs
    /// where the saved config space has them (the device hears of each move, as after a
    /// guest write).
    pub fn restore_function(
        &self,
        slot: u8,
        func: u8,
        state: &[u8],
    ) -> Result<(), crate::lifecycle::LifecycleError> {
        let i = self.find(slot, func).ok_or_else(|| {
            crate::lifecycle::LifecycleError::BadState(format!("no function at 0:{slot}:{func}"))
        })?;
        {
            let mut d = lock(&self.functions[i].dev);
            let before = decoded_bars(&*d);
            d.restore_state(state)?;
            let after = decoded_bars(&*d);
            for b in 0..NUM_BARS {
                if before[b] != after[b] {
                    d.bar_moved(b, after[b]);
                }
            }
        }
        self.update_decode(i);
        Ok(())
    }

    /// Reads `data.len()` bytes of function `slot:func`'s config space at `reg` (bus 0);
    /// absent functions and other buses read all-ones.
    pub fn config_read(&self, bus: u8, slot: u8, func: u8, reg: u64, data: &mut [u8]) {
        match self.find(slot, func).filter(|_| bus == 0) {
            Some(i) => lock(&self.functions[i].dev).config().read(reg, data),
            None => data.fill(0xff),
        }
    }

    /// Writes config space; BAR moves and decode changes reach the device and the decode table.
    pub fn config_write(&self, bus: u8, slot: u8, func: u8, reg: u64, data: &[u8]) {
        let Some(i) = self.find(slot, func).filter(|_| bus == 0) else {
            return;
        };
        let Ok(reg16) = u16::try_from(reg) else {
            return;
        };
        let moved = {
            let mut d = lock(&self.functions[i].dev);
            let before = decoded_bars(&*d);
            let rom_before = d.config().rom_address();
            d.config_mut().write(reg, data);
            let after = decoded_bars(&*d);
            let mut moved = d.config().rom_address() != rom_before;
            for b in 0..NUM_BARS {
                if before[b] != after[b] {
                    d.bar_moved(b, after[b]);
                    moved = true;
                }
            }
            d.config_written(reg16, data.len());
            moved
        };
        if moved {
            self.update_decode(i);
        }
    }

    /// Which decoded BAR holds `[addr, addr + len)`: (function, BAR or [`ROM_BAR`], offset).
    fn decode_hit(&self, io: bool, addr: u64, len: usize) -> Option<(usize, usize, u64)> {
        let t = self.decode.read().unwrap_or_else(|p| p.into_inner());
        t.iter()
            .find(|e| {
                e.io == io
                    && addr >= e.base
                    && addr
                        .checked_add(len as u64)
                        .is_some_and(|end| end <= e.base.saturating_add(e.len))
            })
            .map(|e| (e.function, e.bar, addr - e.base))
    }

    fn bar_read(&self, io: bool, addr: u64, data: &mut [u8]) {
        let Some((i, bar, off)) = self.decode_hit(io, addr, data.len()) else {
            data.fill(0xff);
            return;
        };
        let Some(f) = self.functions.get(i) else {
            data.fill(0xff);
            return;
        };
        if bar == ROM_BAR {
            // Served from the image, zeros past its end.
            let image = f.rom.as_deref().unwrap_or(&[]);
            for (k, b) in data.iter_mut().enumerate() {
                let at = usize::try_from(off).ok().and_then(|o| o.checked_add(k));
                *b = at.and_then(|a| image.get(a)).copied().unwrap_or(0);
            }
            return;
        }
        lock(&f.dev).bar_read(bar, off, data);
    }

    fn bar_write(&self, io: bool, addr: u64, data: &[u8]) {
        let Some((i, bar, off)) = self.decode_hit(io, addr, data.len()) else {
            return;
        };
        // A ROM drops writes.
        if let (Some(f), false) = (self.functions.get(i), bar == ROM_BAR) {
            lock(&f.dev).bar_write(bar, off, data);
        }
    }

    /// Bus device for configuration mechanism #1 at 0xCF8..0xD00. A byte access to 0xCF9
    /// goes to `reset` (the chipset's reset control register shares the range).
    pub fn config_io(self: &Arc<Self>, reset: Option<Arc<Mutex<dyn BusDevice>>>) -> ConfigIo {
        ConfigIo {
            root: self.clone(),
            reset,
        }
    }

    /// Bus device for ECAM at [`ECAM_BASE`], [`ECAM_SIZE`] long.
    pub fn ecam(self: &Arc<Self>) -> Ecam {
        Ecam { root: self.clone() }
    }

    /// Bus device dispatching memory accesses to BARs; it is placed at `base` on the MMIO bus.
    pub fn mem_window(self: &Arc<Self>, base: u64) -> BarWindow {
        BarWindow {
            root: self.clone(),
            base,
            io: false,
        }
    }

    /// Bus device dispatching port accesses to I/O BARs; it is placed at `base` on the port bus.
    pub fn io_window(self: &Arc<Self>, base: u64) -> BarWindow {
        BarWindow {
            root: self.clone(),
            base,
            io: true,
        }
    }
}

/// Configuration mechanism #1.
pub struct ConfigIo {
    root: Arc<PciRoot>,
    reset: Option<Arc<Mutex<dyn BusDevice>>>,
}

impl ConfigIo {
    /// (bus, slot, func, register) for a data-port access at `offset` 0..4, if enabled.
    fn target(&self, offset: u64) -> Option<(u8, u8, u8, u64)> {
        let a = self.root.config_address.load(Ordering::Relaxed);
        if a & (1 << 31) == 0 {
            return None;
        }
        let (bus, slot, func) = (
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
        );
        Some((bus, slot, func, u64::from(a & 0xfc) + offset))
    }
}

impl BusDevice for ConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(
                &self
                    .root
                    .config_address
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            ),
            (1, 1) if self.reset.is_some() => {
                if let Some(r) = &self.reset {
                    r.lock().unwrap_or_else(|p| p.into_inner()).read(0, data);
                }
            }
            (4..=7, _) => match self.target(offset - 4) {
                Some((b, s, f, reg)) => self.root.config_read(b, s, f, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                self.root
                    .config_address
                    .store(u32::from_le_bytes(v) & 0x80ff_fffc, Ordering::Relaxed);
            }
            (1, 1) => {
                if let Some(r) = &self.reset {
                    r.lock().unwrap_or_else(|p| p.into_inner()).write(0, data);
                }
            }
            (4..=7, _) => {
                if let Some((b, s, f, reg)) = self.target(offset - 4) {
                    self.root.config_write(b, s, f, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: offset = bus << 20 | slot << 15 | func << 12 | register.
pub struct Ecam {
    root: Arc<PciRoot>,
}

fn ecam_decode(offset: u64, len: usize) -> Option<(u8, u8, u8, u64)> {
    let reg = offset & 0xfff;
    if offset >= ECAM_SIZE || reg + len as u64 > 0x1000 {
        return None;
    }
    Some((
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 7) as u8,
        reg,
    ))
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match ecam_decode(offset, data.len()) {
            Some((b, s, f, reg)) => self.root.config_read(b, s, f, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((b, s, f, reg)) = ecam_decode(offset, data.len()) {
            self.root.config_write(b, s, f, reg, data);
        }
    }
}

/// A fixed window on the port or MMIO bus that forwards accesses to whichever decoded BAR
/// contains them; unclaimed reads return all-ones.
pub struct BarWindow {
    root: Arc<PciRoot>,
    base: u64,
    io: bool,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.root
            .bar_read(self.io, self.base.wrapping_add(offset), data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.root
            .bar_write(self.io, self.base.wrapping_add(offset), data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::hostbridge::{amd_hostbridge, hostbridge};
    use crate::pci::{BarSpec, PciConfig};

    /// A function with a 4 KiB memory BAR 0, 64-bit BAR 2 and an I/O BAR 4 that records
    /// accesses and moves.
    struct Probe {
        config: PciConfig,
        log: Vec<String>,
        mem: [u8; 16],
    }

    impl Probe {
        fn new() -> Self {
            let mut config = PciConfig::new(0x1234, 0x5678, (0xff, 0, 0), 0);
            config.add_bar(
                0,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: 0x1000,
                    prefetchable: false,
                },
            );
            config.add_bar(
                2,
                BarSpec {
                    kind: BarKind::Mem64,
                    size: 0x4000,
                    prefetchable: true,
                },
            );
            config.add_bar(
                4,
                BarSpec {
                    kind: BarKind::Io,
                    size: 0x20,
                    prefetchable: false,
                },
            );
            config.set_interrupt_pin(1);
            Self {
                config,
                log: Vec::new(),
                mem: [0; 16],
            }
        }
    }

    impl crate::lifecycle::Lifecycle for Probe {}

    impl PciDevice for Probe {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self
                    .mem
                    .get(offset as usize + i)
                    .copied()
                    .unwrap_or(bar as u8);
            }
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.log.push(format!("w{bar}@{offset:#x}"));
            for (i, b) in data.iter().enumerate() {
                if let Some(m) = self.mem.get_mut(offset as usize + i) {
                    *m = *b;
                }
            }
        }
        fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
            self.log.push(format!("moved{bar}:{addr:x?}"));
        }
    }

    fn machine() -> (Arc<PciRoot>, Arc<Mutex<Probe>>) {
        let mut root = PciRoot::new();
        root.add(0, 0, 0, Arc::new(Mutex::new(hostbridge())))
            .unwrap();
        let probe = Arc::new(Mutex::new(Probe::new()));
        root.add(0, 3, 0, probe.clone()).unwrap();
        root.add(0, 3, 1, Arc::new(Mutex::new(amd_hostbridge())))
            .unwrap();
        assert_eq!(
            root.add(0, 3, 0, Arc::new(Mutex::new(hostbridge()))),
            Err(PciError::Duplicate(0, 3, 0))
        );
        for (b, s, f) in [(1, 0, 0), (0, 32, 0), (0, 0, 8)] {
            assert_eq!(
                root.add(b, s, f, Arc::new(Mutex::new(hostbridge()))),
                Err(PciError::OutOfRange(b, s, f))
            );
        }
        root.assign_resources().unwrap();
        (Arc::new(root), probe)
    }

    fn cf8_read(io: &mut ConfigIo, slot: u8, func: u8, reg: u8, len: usize) -> u32 {
        let a =
            0x8000_0000u32 | u32::from(slot) << 11 | u32::from(func) << 8 | u32::from(reg & 0xfc);
        io.write(0, &a.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4 + u64::from(reg & 3), &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn mechanism_1() {
        let (root, probe) = machine();
        let mut io = root.config_io(None);
        assert_eq!(cf8_read(&mut io, 0, 0, 0, 4), 0x1275_1275);
        assert_eq!(cf8_read(&mut io, 3, 0, 0, 4), 0x5678_1234);
        assert_eq!(cf8_read(&mut io, 3, 0, 2, 2), 0x5678);
        assert_eq!(cf8_read(&mut io, 3, 0, 3, 1), 0x56);
        assert_eq!(cf8_read(&mut io, 3, 0, 0x0e, 1), 0x80, "multifunction");
        assert_eq!(cf8_read(&mut io, 3, 1, 0, 4), 0x7432_1022);
        assert_eq!(cf8_read(&mut io, 3, 0, 0x3c, 1), 19, "interrupt line");
        assert_eq!(cf8_read(&mut io, 5, 0, 0, 4), 0xffff_ffff);
        assert_eq!(cf8_read(&mut io, 3, 7, 0, 2), 0xffff);
        // Other buses and a disabled address register read all-ones.
        io.write(0, &0x8001_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        io.write(0, &0x0000_1800u32.to_le_bytes());
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // CONFIG_ADDRESS reads back (reserved bits clear); byte accesses don't latch it.
        io.write(0, &0xffff_ffffu32.to_le_bytes());
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
        io.write(0, &[0]);
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
        // BAR sizing through the data port, with a byte write to the command register.
        let a = 0x8000_0000u32 | 3 << 11 | 0x10;
        io.write(0, &a.to_le_bytes());
        io.write(4, &[0xff; 4]);
        io.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_f000);
        io.write(4, &0xc800_0000u32.to_le_bytes());
        assert!(probe
            .lock()
            .unwrap()
            .log
            .iter()
            .any(|l| l == "moved0:Some(c8000000)"));
        io.write(0, &(0x8000_0000u32 | 3 << 11 | 0x04).to_le_bytes());
        io.write(4, &[0]);
        assert!(probe.lock().unwrap().log.iter().any(|l| l == "moved0:None"));
        // Hostile sizes/offsets.
        let mut big = [0u8; 8];
        io.read(0, &mut big);
        io.write(7, &[1, 2, 3]);
        io.read(u64::MAX, &mut b);
        io.write(u64::MAX, &b);
    }

    #[test]
    fn reset_shares_cf9() {
        struct R(Vec<u8>);
        impl BusDevice for R {
            fn read(&mut self, _: u64, d: &mut [u8]) {
                d.fill(0x42);
            }
            fn write(&mut self, _: u64, d: &[u8]) {
                self.0.extend_from_slice(d);
            }
        }
        let (root, _) = machine();
        let r = Arc::new(Mutex::new(R(Vec::new())));
        let mut io = root.config_io(Some(r.clone()));
        io.write(1, &[6]);
        let mut b = [0u8];
        io.read(1, &mut b);
        assert_eq!((b[0], r.lock().unwrap().0.clone()), (0x42, vec![6]));
    }

    #[test]
    fn ecam_and_bar_windows() {
        let (root, probe) = machine();
        let mut ecam = root.ecam();
        let mut b = [0u8; 4];
        ecam.read(3 << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x5678_1234);
        ecam.read(3 << 15 | 1 << 12 | 2, &mut b[..2]);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x7432);
        ecam.read(1 << 20, &mut b);
        assert_eq!(b, [0xff; 4], "bus 1");
        ecam.read(0xfff, &mut b);
        assert_eq!(b, [0xff; 4], "crosses a function");
        ecam.read(ECAM_SIZE + 4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Extended config space exists (and is zero) for present functions.
        ecam.read(3 << 15 | 0x100, &mut b);
        assert_eq!(b, [0; 4]);

        // The allocator placed the BARs, largest first, and enabled decoding.
        let (bar0, bar2, bar4) = {
            let p = probe.lock().unwrap();
            let c = p.config();
            (
                c.bar_address(0).unwrap(),
                c.bar_address(2).unwrap(),
                c.bar_address(4).unwrap(),
            )
        };
        assert_eq!(bar2, MEM32_BASE);
        assert_eq!(bar0, MEM32_BASE + 0x4000);
        assert_eq!(bar4, IO_ALLOC_BASE);
        let mut mem = root.mem_window(MEM32_BASE);
        let mut pio = root.io_window(IO_BASE);
        mem.write(bar0 - MEM32_BASE + 4, &[9, 8]);
        mem.read(bar0 - MEM32_BASE + 4, &mut b[..2]);
        assert_eq!(&b[..2], &[9, 8]);
        pio.write(bar4 - IO_BASE + 1, &[7]);
        assert!(probe.lock().unwrap().log.iter().any(|l| l == "w4@0x1"));
        // Outside any BAR, or straddling a BAR's end: all-ones.
        mem.read(0x100_0000, &mut b);
        assert_eq!(b, [0xff; 4]);
        mem.read(bar0 - MEM32_BASE + 0xffe, &mut b);
        assert_eq!(b, [0xff; 4]);
        mem.read(u64::MAX, &mut b);

        // The guest moves BAR 0 through ECAM: the window follows without re-registration.
        ecam.write(3 << 15 | 0x10, &0xd000_0000u32.to_le_bytes());
        mem.read(0xd000_0000 - MEM32_BASE + 4, &mut b[..2]);
        assert_eq!(&b[..2], &[9, 8]);
        mem.read(bar0 - MEM32_BASE + 4, &mut b[..2]);
        assert_eq!(&b[..2], &[0xff, 0xff]);
        // Disabling memory decode hides every memory BAR.
        ecam.write(3 << 15 | 0x04, &[CMD_IO as u8, 0]);
        mem.read(0xd000_0000 - MEM32_BASE + 4, &mut b[..2]);
        assert_eq!(&b[..2], &[0xff, 0xff]);
        let log = probe.lock().unwrap().log.clone();
        assert!(
            log.contains(&"moved0:Some(d0000000)".to_string()),
            "{log:?}"
        );
        assert!(log.contains(&"moved2:None".to_string()), "{log:?}");
    }

    #[test]
    fn expansion_rom_sizing_decode_and_writes() {
        let mut root = PciRoot::new();
        let image: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        root.add_with_rom(0, 4, 0, Arc::new(Mutex::new(hostbridge())), image.clone())
            .unwrap();
        let big = vec![0u8; (16 << 20) + 1];
        assert!(root
            .add_with_rom(0, 5, 0, Arc::new(Mutex::new(hostbridge())), big)
            .is_err());
        let root = Arc::new(root);
        let mut ecam = root.ecam();
        let reg = 4 << 15 | 0x30;
        let mut b = [0u8; 4];
        // Sizing: 3000 bytes decode as 4 KiB, bit 0 (enable) writable.
        ecam.write(reg, &u32::MAX.to_le_bytes());
        ecam.read(reg, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_f001);
        // Placed and enabled, but memory decoding off: nothing there yet.
        ecam.write(reg, &(0xc100_0000u32 | 1).to_le_bytes());
        let mut mem = root.mem_window(MEM32_BASE);
        mem.read(0x100_0000, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.write(4 << 15 | 0x04, &[CMD_MEM as u8, 0]);
        mem.read(0x100_0000 + 8, &mut b);
        assert_eq!(&b, &image[8..12]);
        // Past the image, inside the decode: zeros. Writes change nothing.
        mem.read(0x100_0000 + 3998, &mut b[..2]);
        assert_eq!(&b[..2], &[0, 0]);
        mem.write(0x100_0000 + 8, &[0; 4]);
        mem.read(0x100_0000 + 8, &mut b);
        assert_eq!(&b, &image[8..12]);
        // Disabled again: gone.
        ecam.write(reg, &0xc100_0000u32.to_le_bytes());
        mem.read(0x100_0000 + 8, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn allocator_exhaustion() {
        struct Huge(PciConfig);
        impl crate::lifecycle::Lifecycle for Huge {}

        impl PciDevice for Huge {
            fn config(&self) -> &PciConfig {
                &self.0
            }
            fn config_mut(&mut self) -> &mut PciConfig {
                &mut self.0
            }
            fn bar_read(&mut self, _: usize, _: u64, _: &mut [u8]) {}
            fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
        }
        let mut c = PciConfig::new(1, 1, (0xff, 0, 0), 0);
        c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: 1 << 30,
                prefetchable: false,
            },
        );
        let mut root = PciRoot::new();
        root.add(0, 1, 0, Arc::new(Mutex::new(Huge(c)))).unwrap();
        assert!(matches!(
            root.assign_resources(),
            Err(PciError::NoSpace { .. })
        ));
        let mut c = PciConfig::new(1, 1, (0xff, 0, 0), 0);
        c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem64,
                size: 1 << 30,
                prefetchable: true,
            },
        );
        let mut root = PciRoot::new();
        let d = Arc::new(Mutex::new(Huge(c)));
        root.add(0, 1, 0, d.clone()).unwrap();
        root.assign_resources().unwrap();
        assert_eq!(d.lock().unwrap().config().bar_address(0), Some(MEM64_BASE));
    }
}
