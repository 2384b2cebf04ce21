//! Guest-physical memory layout: the RAM slots, the e820 map, and the fixed low-memory
//! addresses the loader writes its boot structures to.
//!
//! Low memory (all below the EBDA at 0x9fc00, none overlapping; checked by a test):
//!
//! | range               | contents                                                     |
//! |---------------------|--------------------------------------------------------------|
//! | 0x0500 – 0x052f     | GDT: null, 0x08 code32, 0x10 code64, 0x18 data, 0x20 TSS (16 B) |
//! | 0x0540 – 0x0547     | IDT (empty: limit 0, the kernel installs its own)            |
//! | 0x0580 – 0x05e7     | TSS (zeroed; only there so TR is valid for KVM)              |
//! | 0x1000 – 0x1037     | PVH `hvm_start_info`                                         |
//! | 0x1040 – 0x105f     | PVH module list (one entry: the initrd)                      |
//! | 0x2000 – 0x2bff     | PVH memory map (up to 128 entries)                           |
//! | 0x7000 – 0x7fff     | bzImage zero page (`boot_params`)                            |
//! | 0x8000 – 0x8fff     | boot stack (RSP = 0x8ff0)                                    |
//! | 0x9000 – 0x9fff     | PML4                                                         |
//! | 0xa000 – 0xafff     | PDPT                                                         |
//! | 0xb000 – 0xefff     | 4 page directories (2 MiB pages, identity map of 0–4 GiB)    |
//! | 0x20000 – 0x2ffff   | kernel command line (NUL-terminated)                         |

// The RAM layout is the platform's; the loader places its own structures inside it.
pub use platform::map::{in_ram, low_ram_end, ram_regions, MMIO_HOLE_END, MMIO_HOLE_START};

/// PCI ECAM: reserved in the e820 map, as firmware does, so the OS accepts the MCFG area
/// and never puts anything else there.
pub const PCI_ECAM_START: u64 = platform::map::ECAM_BASE;
/// End of the ECAM window (buses 0–255).
pub const PCI_ECAM_END: u64 = platform::map::ECAM_BASE + platform::map::ECAM_SIZE;

/// Start of the extended BIOS data area; low RAM reported to the guest ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the EBDA (start of the legacy VGA window).
pub const EBDA_END: u64 = 0xa_0000;
/// The BIOS area reported as reserved (the ACPI RSDP may live here later).
pub const BIOS_START: u64 = 0xf_0000;
/// Start of "high" memory (1 MiB): where kernels are loaded.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Number of 8-byte GDT slots (the 64-bit TSS descriptor takes two).
pub const GDT_ENTRIES: usize = 6;
/// Interrupt descriptor table (empty).
pub const IDT_ADDR: u64 = 0x540;
/// Task state segment referenced by TR.
pub const TSS_ADDR: u64 = 0x580;
/// Size of a 32/64-bit TSS (limit + 1).
pub const TSS_SIZE: u64 = 0x68;

/// Selector of the flat 32-bit code segment (PVH entry).
pub const SEL_CODE32: u16 = 0x08;
/// Selector of the 64-bit code segment (Linux's `__BOOT_CS`).
pub const SEL_CODE64: u16 = 0x10;
/// Selector of the flat data segment (Linux's `__BOOT_DS`).
pub const SEL_DATA: u16 = 0x18;
/// Selector of the TSS.
pub const SEL_TSS: u16 = 0x20;

/// PVH `hvm_start_info` (RBX at the PVH entry).
pub const PVH_START_INFO_ADDR: u64 = 0x1000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x1040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x2000;
/// Most memory map entries we hand to a PVH kernel (bounds the table at 0x2000).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 128;

/// bzImage zero page (`boot_params`, RSI at the 64-bit entry).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (the stack page is 0x8000–0x8fff).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of 4 consecutive page directories.
pub const PD_ADDR: u64 = 0xb000;
/// Number of page directories (each maps 1 GiB with 2 MiB pages).
pub const PD_COUNT: u64 = 4;

/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room for the command line, terminating NUL included.
pub const CMDLINE_MAX_SIZE: u64 = 0x1_0000;

/// Every fixed low-memory structure as (name, start, length), for overlap checks and docs.
pub const LOW_MEMORY_STRUCTURES: &[(&str, u64, u64)] = &[
    ("gdt", GDT_ADDR, GDT_ENTRIES as u64 * 8),
    ("idt", IDT_ADDR, 8),
    ("tss", TSS_ADDR, TSS_SIZE),
    ("pvh start_info", PVH_START_INFO_ADDR, 0x38),
    ("pvh modlist", PVH_MODLIST_ADDR, 0x20),
    (
        "pvh memmap",
        PVH_MEMMAP_ADDR,
        PVH_MEMMAP_MAX_ENTRIES as u64 * 24,
    ),
    ("zero page", ZERO_PAGE_ADDR, 0x1000),
    ("stack", 0x8000, 0x1000),
    ("pml4", PML4_ADDR, 0x1000),
    ("pdpt", PDPT_ADDR, 0x1000),
    ("pd", PD_ADDR, PD_COUNT * 0x1000),
    ("cmdline", CMDLINE_ADDR, CMDLINE_MAX_SIZE),
];

/// End of the low memory the loader owns: kernels and initrds must stay above this.
pub const LOW_MEMORY_END: u64 = HIGH_MEMORY_START;

/// Type of an e820 entry (values as in the ACPI/e820 spec and `hvm_memmap_table_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved, not usable.
    Reserved = 2,
    /// ACPI reclaimable.
    Acpi = 3,
    /// ACPI NVS.
    Nvs = 4,
}

/// One e820 map entry: `[addr, addr + size)` of type `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Kind,
}

/// The e820 map for a guest with `ram_bytes` of RAM laid out as [`ram_regions`].
pub fn e820_map(ram_bytes: u64) -> Vec<E820Entry> {
    let low = low_ram_end(ram_bytes);
    let mut v = Vec::with_capacity(6);
    let mut push = |addr: u64, end: u64, kind| {
        if end > addr {
            v.push(E820Entry {
                addr,
                size: end - addr,
                kind,
            });
        }
    };
    push(0, low.min(EBDA_START), E820Kind::Ram);
    push(EBDA_START, EBDA_END, E820Kind::Reserved);
    push(BIOS_START, HIGH_MEMORY_START, E820Kind::Reserved);
    push(HIGH_MEMORY_START, low, E820Kind::Ram);
    push(PCI_ECAM_START, PCI_ECAM_END, E820Kind::Reserved);
    let high = ram_bytes - low;
    push(
        MMIO_HOLE_END,
        MMIO_HOLE_END.saturating_add(high),
        E820Kind::Ram,
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn low_structures_do_not_overlap_and_stay_below_ebda() {
        let mut v: Vec<_> = LOW_MEMORY_STRUCTURES.to_vec();
        v.sort_by_key(|s| s.1);
        for s in &v {
            assert!(s.1 >= 0x500, "{} below 0x500", s.0);
            assert!(s.1 + s.2 <= EBDA_START, "{} reaches the EBDA", s.0);
        }
        for w in v.windows(2) {
            assert!(w[0].1 + w[0].2 <= w[1].1, "{} overlaps {}", w[0].0, w[1].0);
        }
        assert!((0x8000..0x9000).contains(&BOOT_STACK_POINTER));
        assert_eq!(BOOT_STACK_POINTER % 16, 0);
    }

    #[test]
    fn e820_small_guest() {
        let m = e820_map(256 * MIB);
        assert_eq!(
            m,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x400,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: 0xf0000,
                    size: 0x10000,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: 0x100000,
                    size: 255 * MIB,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0xE000_0000,
                    size: 256 * MIB,
                    kind: E820Kind::Reserved
                },
            ]
        );
        assert_eq!(ram_regions(256 * MIB), vec![(0, 256 * MIB)]);
    }

    #[test]
    fn e820_large_guest_splits_around_hole() {
        let m = e820_map(5 * GIB);
        assert_eq!(m.len(), 6);
        assert_eq!(
            m[3],
            E820Entry {
                addr: MIB,
                size: 3 * GIB - MIB,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(
            m[5],
            E820Entry {
                addr: 4 * GIB,
                size: 2 * GIB,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(ram_regions(5 * GIB), vec![(0, 3 * GIB), (4 * GIB, 2 * GIB)]);
        // Exactly 3 GiB: no high slot.
        assert_eq!(ram_regions(3 * GIB), vec![(0, 3 * GIB)]);
        assert_eq!(e820_map(3 * GIB).len(), 5);
    }

    #[test]
    fn e820_tiny_guest_has_no_negative_ranges() {
        let m = e820_map(0x8_0000);
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: 0x8_0000,
                kind: E820Kind::Ram
            }
        );
        assert!(m.iter().all(|e| e.kind != E820Kind::Ram || e.addr == 0));
        assert!(ram_regions(0).is_empty());
    }

    #[test]
    fn in_ram_checks_slots() {
        assert!(in_ram(5 * GIB, 0, 3 * GIB));
        assert!(!in_ram(5 * GIB, 3 * GIB - 1, 2));
        assert!(in_ram(5 * GIB, 4 * GIB, 2 * GIB));
        assert!(!in_ram(5 * GIB, 4 * GIB, 2 * GIB + 1));
        assert!(!in_ram(5 * GIB, u64::MAX, 2));
    }
}
