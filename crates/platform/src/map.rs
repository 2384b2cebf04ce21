//! The guest-physical address map.

/// Start of the MMIO hole below 4 GiB: RAM beyond this moves above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// ECAM (PCI Express enhanced configuration): 1 MiB per bus, buses 0..=255 decoded.
pub const ECAM_BASE: u64 = 0xE000_0000;
pub const ECAM_SIZE: u64 = 0x1000_0000;

/// The I/O APIC's registers.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// The local APICs' registers.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;

/// Direct boot's 32-bit memory BAR window, first and last address.
pub const PCI_MEM32_WINDOW: (u32, u32) = (0xC000_0000, 0xDFFF_FFFF);
/// Direct boot's 64-bit memory BAR window, first and last address (above any RAM rhyve maps).
pub const PCI_MEM64_WINDOW: (u64, u64) = (0x80_0000_0000, 0x80_0000_0000 + (64 << 30) - 1);
/// The I/O BAR window, first and last port.
pub const PCI_IO_WINDOW: (u16, u16) = (0x2000, 0xFFFF);
/// Where BAR allocation starts in the I/O window: its first page stays free for
/// pc-testdev's IRQ ports at 0x2000.
pub const PCI_IO_ALLOC_BASE: u16 = 0x3000;
/// End (inclusive) of the firmware layout's 32-bit window: just below the I/O APIC, where
/// SeaBIOS's and OVMF's allocators stop.
pub const FIRMWARE_MEM32_LAST: u32 = 0xFEBF_FFFF;
/// End (exclusive) of the firmware layout's 64-bit window: 1 TiB, the top of a 40-bit
/// physical address space, where OVMF may put its 64-bit aperture (SeaBIOS places it lower).
pub const FIRMWARE_MEM64_END: u64 = 1 << 40;

/// The most RAM a guest can have: with the part moved above 4 GiB it still ends below
/// direct boot's 64-bit BAR window (511 GiB).
pub const MAX_RAM: u64 = PCI_MEM64_WINDOW.0 - (MMIO_HOLE_END - MMIO_HOLE_START);

/// End of RAM below the MMIO hole for a guest of `ram_bytes`.
pub fn low_ram_end(ram_bytes: u64) -> u64 {
    ram_bytes.min(MMIO_HOLE_START)
}

/// End (exclusive) of the highest RAM byte's address.
pub fn ram_top(ram_bytes: u64) -> u64 {
    let low = low_ram_end(ram_bytes);
    if ram_bytes > low {
        MMIO_HOLE_END + (ram_bytes - low)
    } else {
        low
    }
}

/// The guest-physical RAM slots the VMM maps: `[0, min(ram, 3 GiB))` and, for larger guests,
/// `[4 GiB, 4 GiB + rest)`. Empty slots are omitted.
pub fn ram_regions(ram_bytes: u64) -> Vec<(u64, u64)> {
    let low = low_ram_end(ram_bytes);
    let high = ram_bytes - low;
    let mut v = Vec::with_capacity(2);
    if low > 0 {
        v.push((0, low));
    }
    if high > 0 {
        v.push((MMIO_HOLE_END, high));
    }
    v
}

/// Whether `[addr, addr + len)` lies within guest RAM (one slot; slots never touch).
pub fn in_ram(ram_bytes: u64, addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    ram_regions(ram_bytes)
        .iter()
        .any(|&(base, size)| addr >= base && end <= base.saturating_add(size))
}

/// How the PCI root is laid out, for the decoding and the DSDT alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PciLayout {
    /// Direct boot: ECAM at [`ECAM_BASE`] (MCFG), BARs in [`PCI_MEM32_WINDOW`] and
    /// [`PCI_MEM64_WINDOW`], assigned by rhyve.
    #[default]
    Direct,
    /// Behind a boot ROM, which places the BARs itself as on QEMU's i440FX: no ECAM, a
    /// 32-bit window from `mem32_base` up to the I/O APIC, a 64-bit one from `mem64_base`
    /// (above RAM) to [`FIRMWARE_MEM64_END`].
    Firmware { mem32_base: u32, mem64_base: u64 },
}

impl PciLayout {
    /// The layout of a machine with `ram_bytes` of RAM, booting firmware or not. Behind a
    /// boot ROM the 32-bit window starts at 2 GiB (3 GiB when low RAM reaches past 2 GiB),
    /// where SeaBIOS's and OVMF's allocators put BARs; the 64-bit one on the first 1 GiB
    /// boundary above both RAM and 4 GiB.
    pub fn for_machine(ram_bytes: u64, firmware: bool) -> Self {
        if !firmware {
            return PciLayout::Direct;
        }
        let mem32_base = if low_ram_end(ram_bytes) <= 0x8000_0000 {
            0x8000_0000
        } else {
            0xC000_0000
        };
        PciLayout::Firmware {
            mem32_base,
            mem64_base: ram_top(ram_bytes).max(MMIO_HOLE_END).div_ceil(1 << 30) << 30,
        }
    }

    /// Whether the root has an ECAM (and so an MCFG and its motherboard reservation).
    pub fn has_ecam(self) -> bool {
        self == PciLayout::Direct
    }

    /// The 32-bit memory BAR window, first and last address.
    pub fn mem32_window(self) -> (u32, u32) {
        match self {
            PciLayout::Direct => PCI_MEM32_WINDOW,
            PciLayout::Firmware { mem32_base, .. } => (mem32_base, FIRMWARE_MEM32_LAST),
        }
    }

    /// The 64-bit memory BAR window, first and last address.
    pub fn mem64_window(self) -> (u64, u64) {
        match self {
            PciLayout::Direct => PCI_MEM64_WINDOW,
            PciLayout::Firmware { mem64_base, .. } => (mem64_base, FIRMWARE_MEM64_END - 1),
        }
    }

    /// Where the ACPI PM block (PM1a event, PM1a control, PM timer at +0, +4, +8) sits:
    /// 0x400 for direct boot; behind a boot ROM 0x600, where QEMU's machines have it, which
    /// leaves port 0x402 to the debug console firmware writes its log to.
    pub fn pm_base(self) -> u16 {
        match self {
            PciLayout::Direct => 0x400,
            PciLayout::Firmware { .. } => 0x600,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_goes_around_the_hole() {
        assert_eq!(ram_regions(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, 1 << 30)]
        );
        assert_eq!(ram_top(1 << 30), 1 << 30);
        assert_eq!(ram_top(4 << 30), 5 << 30);
        assert!(in_ram(4 << 30, MMIO_HOLE_END, 4096));
        assert!(!in_ram(4 << 30, MMIO_HOLE_START, 1));
        assert!(!in_ram(1 << 30, u64::MAX, 2));
    }

    #[test]
    fn the_windows_stay_clear_of_ram_ecam_and_the_apics() {
        let (m32, m32_last) = PCI_MEM32_WINDOW;
        assert!(u64::from(m32) >= MMIO_HOLE_START && u64::from(m32_last) < ECAM_BASE);
        assert!(ECAM_BASE + ECAM_SIZE <= u64::from(IOAPIC_ADDR));
        // The largest guest rhyve maps still ends below the 64-bit window.
        assert!(ram_top(MAX_RAM) <= PCI_MEM64_WINDOW.0);
        for (ram, firmware) in [
            (64 << 20, true),
            (256 << 20, true),
            (3 << 30, true),
            (8 << 30, true),
        ] {
            let l = PciLayout::for_machine(ram, firmware);
            assert!(!l.has_ecam());
            let (base32, last32) = l.mem32_window();
            assert!(u64::from(base32) >= low_ram_end(ram) && last32 < IOAPIC_ADDR);
            let base64 = l.mem64_window().0;
            assert!(
                base64 >= ram_top(ram) && base64 >= MMIO_HOLE_END,
                "{ram:#x}"
            );
            assert_eq!(l.pm_base(), 0x600);
        }
        assert_eq!(PciLayout::for_machine(8 << 30, false), PciLayout::Direct);
        // As the firmware layout always was: 64 MiB of RAM, windows at 2 GiB and 4 GiB.
        assert_eq!(
            PciLayout::for_machine(64 << 20, true),
            PciLayout::Firmware {
                mem32_base: 0x8000_0000,
                mem64_base: 1 << 32
            }
        );
    }
}
