//! One function's 4 KiB configuration space (type 0 header): per-byte write masks, BARs with
//! the standard sizing semantics, and a capability list.
//!
//! BAR sizing needs no special case: a BAR register's write mask covers only its address bits
//! (`!(size - 1)`), so writing all-ones reads back the size mask with the type bits, as on
//! hardware. A 64-bit BAR takes two slots; the upper slot's mask is the upper half.

use super::{BarKind, BarSpec};

/// Size of a function's configuration space (PCIe extended).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Number of BAR registers in a type 0 header.
pub const NUM_BARS: usize = 6;

/// Register offsets.
pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION_ID: u16 = 0x08;
pub const CLASS_PROG: u16 = 0x09;
pub const CACHE_LINE_SIZE: u16 = 0x0C;
pub const HEADER_TYPE: u16 = 0x0E;
pub const BAR0: u16 = 0x10;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2C;
pub const SUBSYSTEM_ID: u16 = 0x2E;
pub const CAPABILITIES_PTR: u16 = 0x34;
/// Expansion ROM base address: bits 31..11 the address, bit 0 decode enable.
pub const EXPANSION_ROM: u16 = 0x30;
const ROM_ENABLE: u32 = 1;
/// Smallest expansion ROM decode (PCI LB 3.0 §6.2.5.2).
pub const MIN_ROM_SIZE: u64 = 2048;
/// Largest expansion ROM rhyve maps.
pub const MAX_ROM_SIZE: u64 = 16 << 20;
pub const INTERRUPT_LINE: u16 = 0x3C;
pub const INTERRUPT_PIN: u16 = 0x3D;

/// Command register bits.
pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEM: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Writable command bits: I/O, memory, bus master, parity, SERR#, INTx disable.
const CMD_WRITABLE: u16 =
    CMD_IO | CMD_MEM | CMD_BUS_MASTER | (1 << 6) | (1 << 8) | CMD_INTX_DISABLE;
/// Status: capabilities list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status: INTx asserted (read-only, maintained by the device through [`PciConfig::set_intx_status`]).
pub const STATUS_INTERRUPT: u16 = 1 << 3;

/// Capability IDs.
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;
/// MSI-X message control bits.
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// MSI message control bits (PCI LB 3.0 §6.8.1.3).
pub const MSI_ENABLE: u16 = 1 << 0;
pub const MSI_64BIT: u16 = 1 << 7;
pub const MSI_PER_VECTOR_MASK: u16 = 1 << 8;
/// MSI capability register offsets (64-bit, per-vector masking layout).
pub const MSI_CONTROL: u16 = 0x02;
pub const MSI_ADDR_LO: u16 = 0x04;
pub const MSI_ADDR_HI: u16 = 0x08;
pub const MSI_DATA: u16 = 0x0C;
pub const MSI_MASK: u16 = 0x10;
pub const MSI_PENDING: u16 = 0x14;
/// Length of that capability.
pub const MSI_CAP_LEN: u16 = 0x18;

/// First capability offset; the list lives in [0x40, 0x100).
const CAP_START: u16 = 0x40;
const CAP_END: u16 = 0x100;

/// Where a function's MSI-X capability, table and PBA live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset of the capability in config space.
    pub offset: u16,
    /// Number of table entries (1..=2048).
    pub vectors: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// Where a function's MSI capability lives (64-bit addresses, per-vector masking, one vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCapability {
    /// Offset of the capability in config space.
    pub offset: u16,
}

/// A function's configuration space.
#[derive(Clone)]
pub struct PciConfig {
    data: Box<[u8; CONFIG_SPACE_SIZE]>,
    wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<BarSpec>; NUM_BARS],
    /// Offset of the last capability (to chain the next), 0 when none.
    last_cap: u16,
    /// Next free capability offset.
    next_cap: u16,
    msix: Option<MsixCapability>,
    msi: Option<MsiCapability>,
    /// Size of the expansion ROM's decode (a power of two), when there is one.
    rom_size: Option<u64>,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("vendor", &format_args!("{:#06x}", self.read_u16(VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.read_u16(DEVICE_ID)))
            .field("bars", &self.bars)
            .finish()
    }
}

impl PciConfig {
    /// A type 0 header with the given identity; `class` is (base class, subclass, prog-if).
    pub fn new(vendor: u16, device: u16, class: (u8, u8, u8), revision: u8) -> Self {
        let mut c = Self {
            data: Box::new([0; CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; NUM_BARS],
            last_cap: 0,
            next_cap: CAP_START,
            msix: None,
            msi: None,
            rom_size: None,
        };
        c.set_u16(VENDOR_ID, vendor);
        c.set_u16(DEVICE_ID, device);
        c.set_u8(REVISION_ID, revision);
        c.set_u8(CLASS_PROG, class.2);
        c.set_u8(CLASS_PROG + 1, class.1);
        c.set_u8(CLASS_PROG + 2, class.0);
        c.set_wmask_u16(COMMAND, CMD_WRITABLE);
        c.set_wmask_u16(CACHE_LINE_SIZE, 0xffff); // cache line size, latency timer
        c.set_u8(INTERRUPT_LINE, 0xff);
        c.set_wmask_u16(INTERRUPT_LINE, 0x00ff);
        c
    }

    /// Subsystem vendor and device id.
    pub fn set_subsystem(&mut self, vendor: u16, device: u16) {
        self.set_u16(SUBSYSTEM_VENDOR_ID, vendor);
        self.set_u16(SUBSYSTEM_ID, device);
    }

    /// Interrupt pin: 0 none, 1..=4 INTA#..INTD#.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_u8(INTERRUPT_PIN, pin.min(4));
    }

    /// The interrupt pin register (0 none, 1..=4 INTA#..INTD#).
    pub fn interrupt_pin(&self) -> u8 {
        self.read_u8(INTERRUPT_PIN)
    }

    /// Sets the interrupt line register (firmware's routing information for the OS).
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.set_u8(INTERRUPT_LINE, line);
    }

    /// Header type bit 7: the slot has more than one function.
    pub fn set_multifunction(&mut self, on: bool) {
        let v = self.read_u8(HEADER_TYPE) & 0x7f;
        self.set_u8(HEADER_TYPE, v | if on { 0x80 } else { 0 });
    }

    /// Reflects the INTx level in the status register.
    pub fn set_intx_status(&mut self, asserted: bool) {
        let s = self.read_u16(STATUS) & !STATUS_INTERRUPT;
        self.set_u16(STATUS, s | if asserted { STATUS_INTERRUPT } else { 0 });
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// Declares BAR `bar` (a 64-bit BAR also takes `bar + 1`). Sizes are rounded up to a power
    /// of two and to the minimum (16 bytes memory, 4 bytes I/O). Returns false (and changes
    /// nothing) if the slot is taken or out of range.
    pub fn add_bar(&mut self, bar: usize, spec: BarSpec) -> bool {
        let slots = if spec.kind == BarKind::Mem64 { 2 } else { 1 };
        if bar + slots > NUM_BARS || (bar..bar + slots).any(|b| self.bar_taken(b)) {
            return false;
        }
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        let max = match spec.kind {
            BarKind::Io => 1 << 16,
            BarKind::Mem32 => 1 << 31,
            BarKind::Mem64 => 1 << 62,
        };
        let size = spec
            .size
            .max(min)
            .checked_next_power_of_two()
            .unwrap_or(max)
            .min(max);
        let spec = BarSpec { size, ..spec };
        let reg = BAR0 + 4 * bar as u16;
        let mask = !(size - 1);
        match spec.kind {
            BarKind::Io => {
                self.set_u32(reg, 1);
                self.set_wmask_u32(reg, (mask as u32) & 0xffff_fffc);
            }
            BarKind::Mem32 | BarKind::Mem64 => {
                let mut flags = if spec.prefetchable { 1 << 3 } else { 0 };
                if spec.kind == BarKind::Mem64 {
                    flags |= 0b10 << 1;
                }
                self.set_u32(reg, flags);
                self.set_wmask_u32(reg, (mask as u32) & 0xffff_fff0);
                if spec.kind == BarKind::Mem64 {
                    self.set_wmask_u32(reg + 4, (mask >> 32) as u32);
                }
            }
        }
        self.bars[bar] = Some(spec);
        true
    }

    fn bar_taken(&self, bar: usize) -> bool {
        self.bars.get(bar).is_some_and(|b| b.is_some())
            || (bar > 0
                && self
                    .bars
                    .get(bar - 1)
                    .is_some_and(|b| b.is_some_and(|s| s.kind == BarKind::Mem64)))
    }

    /// Declares an expansion ROM of `len` bytes (decode size: the next power of two, at
    /// least [`MIN_ROM_SIZE`]); false (nothing changed) when larger than [`MAX_ROM_SIZE`].
    pub fn set_expansion_rom(&mut self, len: u64) -> bool {
        let Some(size) = len.max(MIN_ROM_SIZE).checked_next_power_of_two() else {
            return false;
        };
        if size > MAX_ROM_SIZE {
            return false;
        }
        self.set_u32(EXPANSION_ROM, 0);
        self.set_wmask_u32(
            EXPANSION_ROM,
            (!(size as u32 - 1) & 0xffff_f800) | ROM_ENABLE,
        );
        self.rom_size = Some(size);
        true
    }

    /// The expansion ROM's decode size, if it has one.
    pub fn rom_size(&self) -> Option<u64> {
        self.rom_size
    }

    /// Where the expansion ROM decodes: its enable bit and memory decoding on, a non-zero
    /// address; None otherwise.
    pub fn rom_address(&self) -> Option<u64> {
        self.rom_size?;
        let reg = self.read_u32(EXPANSION_ROM);
        if reg & ROM_ENABLE == 0 || self.command() & CMD_MEM == 0 {
            return None;
        }
        Some(u64::from(reg & 0xffff_f800)).filter(|a| *a != 0)
    }

    /// The BAR declared at `bar` (None for an unused slot or a 64-bit BAR's upper half).
    pub fn bar_spec(&self, bar: usize) -> Option<BarSpec> {
        self.bars.get(bar).copied().flatten()
    }

    /// The address programmed in BAR `bar`, whatever the command register says.
    pub fn bar_raw_address(&self, bar: usize) -> Option<u64> {
        let spec = self.bar_spec(bar)?;
        let reg = BAR0 + 4 * bar as u16;
        let lo = u64::from(self.read_u32(reg));
        Some(match spec.kind {
            BarKind::Io => lo & !0x3,
            BarKind::Mem32 => lo & !0xf,
            BarKind::Mem64 => (lo & !0xf) | u64::from(self.read_u32(reg + 4)) << 32,
        })
    }

    /// The guest address of BAR `bar` when the command register decodes its kind and the
    /// BAR holds a non-zero address; None otherwise.
    pub fn bar_address(&self, bar: usize) -> Option<u64> {
        let spec = self.bar_spec(bar)?;
        let bit = if spec.kind == BarKind::Io {
            CMD_IO
        } else {
            CMD_MEM
        };
        if self.command() & bit == 0 {
            return None;
        }
        self.bar_raw_address(bar).filter(|a| *a != 0)
    }

    /// Programs BAR `bar`'s address, as firmware does (the mask applies).
    pub fn set_bar_address(&mut self, bar: usize, addr: u64) {
        let Some(spec) = self.bar_spec(bar) else {
            return;
        };
        let reg = BAR0 + 4 * bar as u16;
        let mask = !(spec.size - 1);
        let lo_flags = self.read_u32(reg) & if spec.kind == BarKind::Io { 0x3 } else { 0xf };
        self.set_u32(reg, (addr & mask) as u32 | lo_flags);
        if spec.kind == BarKind::Mem64 {
            self.set_u32(reg + 4, ((addr & mask) >> 32) as u32);
        }
    }

    /// Appends a capability with `id` and `body` (the bytes after ID and next pointer);
    /// returns its offset, or None when the list in [0x40, 0x100) is full. The body is
    /// read-only until [`PciConfig::set_wmask`] makes parts of it writable.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Option<u16> {
        let off = self.next_cap;
        let len = 2u16.checked_add(u16::try_from(body.len()).ok()?)?;
        let end = off.checked_add(len)?;
        if end > CAP_END {
            return None;
        }
        self.set_u8(off, id);
        self.set_u8(off + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_u8(off + 2 + i as u16, *b);
        }
        if self.last_cap == 0 {
            self.set_u8(CAPABILITIES_PTR, off as u8);
        } else {
            self.set_u8(self.last_cap + 1, off as u8);
        }
        let status = self.read_u16(STATUS);
        self.set_u16(STATUS, status | STATUS_CAP_LIST);
        self.last_cap = off;
        self.next_cap = (end + 3) & !3;
        Some(off)
    }

    /// Adds an MSI-X capability for `vectors` vectors with its table and PBA in the given
    /// BARs/offsets (the BARs must be declared by the device). Enable and function mask are
    /// guest-writable.
    pub fn add_msix_capability(
        &mut self,
        vectors: u16,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Option<MsixCapability> {
        if !(1..=2048).contains(&vectors) || table_bar > 5 || pba_bar > 5 {
            return None;
        }
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&((table_offset & !7) | u32::from(table_bar)).to_le_bytes());
        body[6..10].copy_from_slice(&((pba_offset & !7) | u32::from(pba_bar)).to_le_bytes());
        let offset = self.add_capability(CAP_ID_MSIX, &body)?;
        self.set_wmask_u16(offset + 2, MSIX_ENABLE | MSIX_FUNCTION_MASK);
        let cap = MsixCapability {
            offset,
            vectors,
            table_bar,
            table_offset: table_offset & !7,
            pba_bar,
            pba_offset: pba_offset & !7,
        };
        self.msix = Some(cap);
        Some(cap)
    }

    /// The MSI-X capability, if any.
    pub fn msix(&self) -> Option<MsixCapability> {
        self.msix
    }

    /// MSI-X message control (0 without the capability).
    pub fn msix_control(&self) -> u16 {
        self.msix.map_or(0, |c| self.read_u16(c.offset + 2))
    }

    /// Adds an MSI capability (PCI LB 3.0 §6.8.1): 64-bit message address, per-vector
    /// masking, one vector (Multiple Message Capable = 0, so Multiple Message Enable stays 0).
    /// Guest-writable: the enable bit, address low (bits 31:2) and high, the 16-bit data and
    /// the vector's mask bit. The pending bits are the device's ([`crate::pci::msi::Msi`]).
    pub fn add_msi_capability(&mut self) -> Option<MsiCapability> {
        if self.msi.is_some() {
            return None;
        }
        let mut body = [0u8; (MSI_CAP_LEN - 2) as usize];
        body[0..2].copy_from_slice(&(MSI_64BIT | MSI_PER_VECTOR_MASK).to_le_bytes());
        let offset = self.add_capability(CAP_ID_MSI, &body)?;
        self.set_wmask_u16(offset + MSI_CONTROL, MSI_ENABLE);
        self.set_wmask_u32(offset + MSI_ADDR_LO, 0xffff_fffc);
        self.set_wmask_u32(offset + MSI_ADDR_HI, 0xffff_ffff);
        self.set_wmask_u16(offset + MSI_DATA, 0xffff);
        self.set_wmask_u32(offset + MSI_MASK, 1);
        let cap = MsiCapability { offset };
        self.msi = Some(cap);
        Some(cap)
    }

    /// The MSI capability, if any.
    pub fn msi(&self) -> Option<MsiCapability> {
        self.msi
    }

    /// Makes `mask` bits of the bytes from `offset` guest-writable (e.g. a capability field).
    pub fn set_wmask(&mut self, offset: u16, mask: &[u8]) {
        for (i, m) in mask.iter().enumerate() {
            if let Some(w) = self.wmask.get_mut(usize::from(offset) + i) {
                *w = *m;
            }
        }
    }

    fn set_wmask_u16(&mut self, offset: u16, v: u16) {
        self.set_wmask(offset, &v.to_le_bytes());
    }

    fn set_wmask_u32(&mut self, offset: u16, v: u32) {
        self.set_wmask(offset, &v.to_le_bytes());
    }

    /// Guest read: out-of-range bytes read as all-ones.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.data.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Guest write: only write-mask bits change; out-of-range bytes are dropped.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
            else {
                return;
            };
            let (Some(d), Some(m)) = (self.data.get_mut(o), self.wmask.get(o)) else {
                return;
            };
            *d = (*d & !m) | (b & m);
        }
    }

    /// Device-side byte write, ignoring the write mask.
    pub fn set_u8(&mut self, offset: u16, v: u8) {
        if let Some(d) = self.data.get_mut(usize::from(offset)) {
            *d = v;
        }
    }

    /// Device-side little-endian 16-bit write.
    pub fn set_u16(&mut self, offset: u16, v: u16) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.set_u8(offset.wrapping_add(i as u16), b);
        }
    }

    /// Device-side little-endian 32-bit write.
    pub fn set_u32(&mut self, offset: u16, v: u32) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.set_u8(offset.wrapping_add(i as u16), b);
        }
    }

    /// Byte at `offset` (0xff beyond the space).
    pub fn read_u8(&self, offset: u16) -> u8 {
        self.data.get(usize::from(offset)).copied().unwrap_or(0xff)
    }

    /// Little-endian 16-bit value at `offset`.
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(u64::from(offset), &mut b);
        u16::from_le_bytes(b)
    }

    /// Little-endian 32-bit value at `offset`.
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }
}

impl PciConfig {
    /// The config space as the guest left it, for a snapshot (the layout — BARs,
    /// capabilities, write masks — is the device's and is rebuilt by it).
    pub fn save_state(&self, w: &mut platform::codec::Writer) {
        w.bytes(&self.data[..]);
    }

    /// Puts back what [`save_state`](Self::save_state) wrote into a function built the same
    /// way; the identity (vendor, device, class) must match.
    pub fn restore_state(
        &mut self,
        r: &mut platform::codec::Reader<'_>,
    ) -> Result<(), crate::lifecycle::LifecycleError> {
        let data = r.bytes("PCI config space")?;
        let data: &[u8; CONFIG_SPACE_SIZE] = data.try_into().map_err(|_| {
            crate::lifecycle::LifecycleError::BadState(format!(
                "PCI config space of {} bytes",
                data.len()
            ))
        })?;
        // Vendor/device ids, revision and class code: what the function is.
        if data[..4] != self.data[..4] || data[8..12] != self.data[8..12] {
            return Err(crate::lifecycle::LifecycleError::BadState(format!(
                "the saved function is {:02x}{:02x}:{:02x}{:02x}, this one {:02x}{:02x}:{:02x}{:02x}",
                data[1], data[0], data[3], data[2], self.data[1], self.data[0], self.data[3],
                self.data[2]
            )));
        }
        self.data.copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(0x1af4, 0x1042, (1, 0, 0), 1)
    }

    fn size_bar(c: &mut PciConfig, reg: u16) -> u32 {
        let old = c.read_u32(reg);
        c.write(u64::from(reg), &[0xff; 4]);
        let v = c.read_u32(reg);
        c.write(u64::from(reg), &old.to_le_bytes());
        v
    }

    #[test]
    fn identity_and_header() {
        let c = cfg();
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(8), 0x0100_0001);
        assert_eq!(c.read_u8(HEADER_TYPE), 0);
        assert_eq!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        // Read-only registers ignore writes.
        let mut c = c;
        c.write(0, &[0; 4]);
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        c.write(u64::from(COMMAND), &[0xff, 0xff]);
        assert_eq!(c.command(), CMD_WRITABLE);
    }

    #[test]
    fn bar_sizing_32_64_io() {
        let mut c = cfg();
        assert!(c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: 0x1000,
                prefetchable: false
            }
        ));
        assert!(c.add_bar(
            1,
            BarSpec {
                kind: BarKind::Io,
                size: 0x20,
                prefetchable: false
            }
        ));
        assert!(c.add_bar(
            2,
            BarSpec {
                kind: BarKind::Mem64,
                size: 0x4000,
                prefetchable: true
            }
        ));
        // BAR 3 is BAR 2's upper half; 5 cannot hold a 64-bit BAR.
        assert!(!c.add_bar(
            3,
            BarSpec {
                kind: BarKind::Mem32,
                size: 16,
                prefetchable: false
            }
        ));
        assert!(!c.add_bar(
            5,
            BarSpec {
                kind: BarKind::Mem64,
                size: 16,
                prefetchable: false
            }
        ));
        assert!(!c.add_bar(
            6,
            BarSpec {
                kind: BarKind::Io,
                size: 4,
                prefetchable: false
            }
        ));
        assert_eq!(size_bar(&mut c, 0x10), 0xffff_f000);
        assert_eq!(size_bar(&mut c, 0x14), 0xffff_ffe1);
        assert_eq!(size_bar(&mut c, 0x18), 0xffff_c00c);
        assert_eq!(size_bar(&mut c, 0x1c), 0xffff_ffff);
        assert_eq!(size_bar(&mut c, 0x20), 0);
        // Program addresses; decode only with the command bits.
        c.write(0x10, &0xc000_1234u32.to_le_bytes());
        c.write(0x14, &0x2345u32.to_le_bytes());
        c.write(0x18, &0x8000_0000u32.to_le_bytes());
        c.write(0x1c, &0x80u32.to_le_bytes());
        assert_eq!(c.bar_address(0), None);
        c.write(u64::from(COMMAND), &[CMD_MEM as u8, 0]);
        assert_eq!(c.bar_address(0), Some(0xc000_1000));
        assert_eq!(c.bar_address(1), None);
        assert_eq!(c.bar_address(2), Some(0x80_8000_0000));
        assert_eq!(c.bar_address(3), None);
        c.write(u64::from(COMMAND), &[(CMD_MEM | CMD_IO) as u8, 0]);
        assert_eq!(c.bar_address(1), Some(0x2340));
        c.set_bar_address(0, 0xd000_0fff);
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        // Odd sizes round up.
        let mut c = cfg();
        assert!(c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: 3,
                prefetchable: false
            }
        ));
        assert_eq!(c.bar_spec(0).unwrap().size, 16);
        assert!(c.add_bar(
            1,
            BarSpec {
                kind: BarKind::Mem32,
                size: u64::MAX,
                prefetchable: false
            }
        ));
        assert_eq!(size_bar(&mut c, 0x14), 0x8000_0000);
    }

    #[test]
    fn capability_list_walk() {
        let mut c = cfg();
        let a = c.add_capability(CAP_ID_VENDOR, &[14, 1, 2, 3]).unwrap();
        let m = c.add_msix_capability(4, 1, 0, 1, 0x800).unwrap();
        let b = c.add_capability(CAP_ID_VENDOR, &[3]).unwrap();
        assert_ne!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        let mut found = Vec::new();
        let mut p = c.read_u8(CAPABILITIES_PTR);
        while p != 0 {
            assert_eq!(p % 4, 0);
            found.push((u16::from(p), c.read_u8(u16::from(p))));
            p = c.read_u8(u16::from(p) + 1);
        }
        assert_eq!(
            found,
            vec![
                (a, CAP_ID_VENDOR),
                (m.offset, CAP_ID_MSIX),
                (b, CAP_ID_VENDOR)
            ]
        );
        assert_eq!(c.read_u16(m.offset + 2), 3);
        assert_eq!(c.read_u32(m.offset + 8), 0x801);
        // Only enable/function mask are writable in message control.
        c.write(u64::from(m.offset + 2), &[0xff, 0xff]);
        assert_eq!(c.msix_control(), 0xc003);
        c.write(u64::from(m.offset), &[0, 0]);
        assert_eq!(c.read_u8(m.offset), CAP_ID_MSIX);
        // The list is bounded.
        assert!(c.add_capability(CAP_ID_VENDOR, &[0; 300]).is_none());
        while c.add_capability(CAP_ID_VENDOR, &[0; 20]).is_some() {}
        assert!(c.next_cap <= CAP_END + 3);
    }

    #[test]
    fn hostile_offsets() {
        let mut c = cfg();
        let mut b = [0u8; 8];
        c.read(4094, &mut b);
        assert_eq!(&b[2..], &[0xff; 6]);
        c.read(u64::MAX - 2, &mut b);
        assert_eq!(b, [0xff; 8]);
        c.write(u64::MAX, &[1, 2, 3]);
        c.write(4095, &[1, 2, 3]);
        c.write(0, &[]);
        c.read(0, &mut []);
        assert_eq!(c.read_u16(u16::MAX), 0xffff);
    }
}
