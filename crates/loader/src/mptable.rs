//! Intel MultiProcessor Specification 1.4 tables, as bhyve builds them by default (`-Y`
//! turns them off): a guest without ACPI (or booted with `acpi=off`) finds its CPUs, the
//! I/O APIC and the ISA interrupt routing here.
//!
//! Layout, inside the e820 reserved BIOS area `[0xF0000, 0x100000)` where Linux scans for
//! the floating pointer:
//!
//! | address   | contents                                                    |
//! |-----------|-------------------------------------------------------------|
//! | 0xF0000   | MP floating pointer structure "_MP_" (16 bytes)            |
//! | 0xF0010   | MP configuration table "PCMP": 44-byte header + entries     |
//!
//! Entries, in the order the spec requires (by type): one processor per vCPU, bus 0 "PCI",
//! bus 1 "ISA", one I/O APIC (id = `nr_cpus`), ISA IRQs 0, 1, 3..15 (IRQ 0 on pin 2, the
//! others identity mapped, as KVM's in-kernel PIT/IOAPIC wire them), ExtINT on LINT0 and NMI
//! on LINT1 of every local APIC. Everything is encoded byte by byte, little endian.

use vm_memory::GuestMemoryBackend;

use crate::{layout, write_guest, Error};

/// Guest-physical address of the MP floating pointer structure (16-byte aligned).
pub const MPTABLE_START: u64 = layout::BIOS_START;
/// Guest-physical address of the MP configuration table (right after the floating pointer).
pub const MPC_TABLE_ADDR: u64 = MPTABLE_START + FPS_LEN as u64;
/// Most vCPUs the table describes: APIC ids 0..=253, the I/O APIC takes the next id and
/// 0xFF is the broadcast id.
pub const MAX_CPUS: u32 = 254;

/// Local APIC base address.
pub const LAPIC_ADDR: u32 = platform::map::LAPIC_ADDR;
/// I/O APIC base address.
pub const IOAPIC_ADDR: u32 = platform::map::IOAPIC_ADDR;

const FPS_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;

const SPEC_REV: u8 = 4;
const OEM_ID: &[u8; 8] = b"RHYVE   ";
const PRODUCT_ID: &[u8; 12] = b"RHYVE VM    ";

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
/// Family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX FPU (bit 0) and APIC (bit 9).
const CPU_FEATURES: u32 = 0x201;

const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;

const BUS_PCI: u8 = 0;
const BUS_ISA: u8 = 1;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforms to the bus".
const INT_FLAGS_CONFORMS: u16 = 0;
/// Destination "all local APICs".
const ALL_LAPICS: u8 = 0xFF;

/// ISA IRQs routed to the I/O APIC, as (IRQ, pin): IRQ 2 (the cascade) is absent, IRQ 0
/// (the PIT) is on pin 2.
fn isa_routes() -> impl Iterator<Item = (u8, u8)> {
    (0u8..16)
        .filter(|&irq| irq != 2)
        .map(|irq| (irq, if irq == 0 { 2 } else { irq }))
}

/// Number of configuration table entries for `nr_cpus` processors.
fn entry_count(nr_cpus: u32) -> usize {
    nr_cpus as usize + 2 + 1 + isa_routes().count() + 2
}

/// Total size of the floating pointer plus configuration table for `nr_cpus` processors.
pub fn mptable_size(nr_cpus: u32) -> u64 {
    let entries = entry_count(nr_cpus) - nr_cpus as usize;
    (FPS_LEN + HEADER_LEN + nr_cpus as usize * PROCESSOR_LEN + entries * ENTRY_LEN) as u64
}

/// The byte that makes `bytes` sum to zero (mod 256) once added.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, &b| sum.wrapping_add(b))
        .wrapping_neg()
}

/// Encodes the MP floating pointer pointing at a configuration table at `table_addr`.
fn floating_pointer(table_addr: u32) -> Vec<u8> {
    let mut fps = Vec::with_capacity(FPS_LEN);
    fps.extend_from_slice(b"_MP_");
    fps.extend_from_slice(&table_addr.to_le_bytes());
    fps.push((FPS_LEN / 16) as u8); // length in 16-byte paragraphs
    fps.push(SPEC_REV);
    fps.push(0); // checksum, patched below
    fps.push(0); // feature byte 1: 0 = a configuration table is present
    fps.push(0); // feature byte 2: IMCR bit clear = virtual wire mode
    fps.extend_from_slice(&[0; 3]); // feature bytes 3-5, reserved
    debug_assert_eq!(fps.len(), FPS_LEN);
    fps[10] = checksum(&fps);
    fps
}

/// Encodes the MP configuration table (header and base entries) for processors with the
/// given local APIC ids (the first is the BSP); the I/O APIC takes the next free id.
fn config_table(apic_ids: &[u8]) -> Vec<u8> {
    let nr_cpus = apic_ids.len() as u32;
    // At most 254 ids, each <= 253, are checked by the caller, so this cannot overflow.
    let ioapic_id = apic_ids.iter().copied().max().unwrap_or(0) + 1;
    let mut entries = Vec::new();

    for (cpu, &apic_id) in apic_ids.iter().enumerate() {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.push(ENTRY_PROCESSOR);
        entries.push(apic_id); // local APIC id
        entries.push(LAPIC_VERSION);
        entries.push(flags);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]); // reserved
    }

    for (id, name) in [(BUS_PCI, b"PCI   "), (BUS_ISA, b"ISA   ")] {
        entries.push(ENTRY_BUS);
        entries.push(id);
        entries.extend_from_slice(name);
    }

    entries.push(ENTRY_IOAPIC);
    entries.push(ioapic_id);
    entries.push(IOAPIC_VERSION);
    entries.push(IOAPIC_ENABLED);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());

    for (irq, pin) in isa_routes() {
        entries.push(ENTRY_IOINT);
        entries.push(INT_TYPE_INT);
        entries.extend_from_slice(&INT_FLAGS_CONFORMS.to_le_bytes());
        entries.push(BUS_ISA);
        entries.push(irq);
        entries.push(ioapic_id);
        entries.push(pin);
    }

    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.push(ENTRY_LINT);
        entries.push(int_type);
        entries.extend_from_slice(&INT_FLAGS_CONFORMS.to_le_bytes());
        entries.push(BUS_ISA);
        entries.push(0); // source bus IRQ
        entries.push(ALL_LAPICS);
        entries.push(lint);
    }

    let base_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(base_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(base_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer: none
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&(entry_count(nr_cpus) as u16).to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the MP floating pointer (at [`MPTABLE_START`]) and the configuration table (at
/// [`MPC_TABLE_ADDR`]) for `nr_cpus` vCPUs into guest memory, inside the reserved BIOS area.
///
/// Fails with [`Error::BadCpuCount`] unless `1 <= nr_cpus <= 254`, with
/// [`Error::MpTableTooBig`] if the tables would not end below 1 MiB, and with
/// [`Error::GuestMemory`] if the BIOS area is not guest memory.
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, nr_cpus: u32) -> Result<(), Error> {
    if nr_cpus == 0 || nr_cpus > MAX_CPUS {
        return Err(Error::BadCpuCount(nr_cpus));
    }
    let ids: Vec<u8> = (0..nr_cpus).map(|i| i as u8).collect();
    write_mptable_with_ids(mem, &ids)
}

/// Like [`write_mptable`], with the vCPUs' local APIC ids (as in the MADT and CPUID; the first
/// is the BSP). Ids must be distinct and below 254 so the I/O APIC id fits.
pub fn write_mptable_with_ids<M: GuestMemoryBackend>(
    mem: &M,
    apic_ids: &[u8],
) -> Result<(), Error> {
    let nr_cpus = apic_ids.len() as u32;
    if nr_cpus == 0 || nr_cpus > MAX_CPUS || apic_ids.iter().any(|&id| id >= 254) {
        return Err(Error::BadCpuCount(nr_cpus));
    }
    let end = MPTABLE_START + mptable_size(nr_cpus);
    if end > layout::HIGH_MEMORY_START {
        return Err(Error::MpTableTooBig(end));
    }
    let table = config_table(apic_ids);
    debug_assert_eq!((MPC_TABLE_ADDR + table.len() as u64), end);
    let pointer = floating_pointer(MPC_TABLE_ADDR as u32);
    write_guest(mem, MPTABLE_START, &pointer)?;
    // A second copy in the first KiB of the EBDA, the first place the MP spec (and Linux)
    // looks; Firecracker's tables live there too.
    write_guest(mem, layout::EBDA_START, &pointer)?;
    write_guest(mem, MPC_TABLE_ADDR, &table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn guest(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// What a parser (like Linux's `smp_scan_config` + `smp_read_mpc`) sees.
    #[derive(Debug, Default)]
    struct Parsed {
        cpus: Vec<(u8, u8)>, // (APIC id, flags)
        buses: Vec<(u8, [u8; 6])>,
        ioapics: Vec<(u8, u8, u8, u32)>,
        ioints: Vec<[u8; 8]>,
        lints: Vec<[u8; 8]>,
        lapic_addr: u32,
    }

    /// Scans the BIOS area for "_MP_" like Linux does, checks both checksums and walks the
    /// base table entries.
    fn parse(mem: &GuestMemoryMmap) -> Parsed {
        let bios = read(mem, 0xF0000, 0x10000);
        let fps_off = (0..bios.len())
            .step_by(16)
            .find(|&o| &bios[o..o + 4] == b"_MP_")
            .expect("no _MP_ in the BIOS area");
        let fps = &bios[fps_off..fps_off + 16];
        assert_eq!(fps[8], 1, "length in paragraphs");
        assert_eq!(fps[9], 4, "spec revision");
        assert_eq!(sum(fps), 0, "floating pointer checksum");
        assert_eq!(fps[11], 0, "feature byte 1: config table present");
        assert_eq!(fps[12] & 0x80, 0, "IMCR bit clear");

        let phys = u64::from(u32_at(fps, 4));
        let header = read(mem, phys, HEADER_LEN);
        assert_eq!(&header[0..4], b"PCMP");
        let base_len = usize::from(u16_at(&header, 4));
        assert_eq!(header[6], 4, "table spec revision");
        assert_eq!(&header[8..16], b"RHYVE   ");
        assert_eq!(u16_at(&header, 40), 0, "extended table length");
        assert!(phys + base_len as u64 <= 0x10_0000);
        let table = read(mem, phys, base_len);
        assert_eq!(sum(&table), 0, "config table checksum");

        let mut p = Parsed {
            lapic_addr: u32_at(&table, 36),
            ..Parsed::default()
        };
        let count = u16_at(&table, 34);
        let mut off = HEADER_LEN;
        let mut last_type = 0;
        for _ in 0..count {
            let t = table[off];
            assert!(t >= last_type, "entries sorted by type");
            last_type = t;
            let e8: [u8; 8] = table[off..off + 8].try_into().unwrap();
            match t {
                0 => {
                    p.cpus.push((table[off + 1], table[off + 3]));
                    assert_eq!(table[off + 2], 0x14);
                    assert_eq!(u32_at(&table, off + 4), 0x600);
                    assert_eq!(u32_at(&table, off + 8), 0x201);
                    off += 20;
                    continue;
                }
                1 => p.buses.push((e8[1], e8[2..8].try_into().unwrap())),
                2 => p.ioapics.push((e8[1], e8[2], e8[3], u32_at(&e8, 4))),
                3 => p.ioints.push(e8),
                4 => p.lints.push(e8),
                _ => panic!("unknown entry type {t}"),
            }
            off += 8;
        }
        assert_eq!(off, base_len, "entry_count matches the base table length");
        p
    }

    #[test]
    fn tables_parse_back() {
        for nr_cpus in [1u32, 2, 4, 64, 254] {
            let mem = guest(2 << 20);
            write_mptable(&mem, nr_cpus).unwrap();
            let p = parse(&mem);

            assert_eq!(p.lapic_addr, 0xFEE0_0000);
            assert_eq!(p.cpus.len(), nr_cpus as usize);
            for (i, &(id, flags)) in p.cpus.iter().enumerate() {
                assert_eq!(usize::from(id), i);
                assert_eq!(flags & 1, 1, "cpu {i} enabled");
                assert_eq!(flags & 2 != 0, i == 0, "BSP flag only on cpu 0");
            }

            assert_eq!(p.buses, vec![(0, *b"PCI   "), (1, *b"ISA   ")]);

            assert_eq!(p.ioapics, vec![(nr_cpus as u8, 0x11, 1, 0xFEC0_0000)]);
            let ioapic_id = nr_cpus as u8;

            assert_eq!(p.ioints.len(), 15);
            for e in &p.ioints {
                // INT, conforms/conforms, from ISA bus 1, to our I/O APIC.
                assert_eq!((e[1], u16_at(e, 2), e[4], e[6]), (0, 0, 1, ioapic_id));
                assert_ne!(e[5], 2, "IRQ 2 (cascade) is not routed");
            }
            let pin_of = |irq: u8| p.ioints.iter().find(|e| e[5] == irq).map(|e| e[7]);
            assert_eq!(pin_of(0), Some(2), "PIT IRQ 0 on pin 2");
            for irq in [1u8, 3, 4, 8, 12, 14, 15] {
                assert_eq!(pin_of(irq), Some(irq));
            }

            // ExtINT on LINT0 and NMI on LINT1 of all local APICs.
            let lints: Vec<_> = p.lints.iter().map(|e| (e[1], e[6], e[7])).collect();
            assert_eq!(lints, vec![(3, 0xFF, 0), (1, 0xFF, 1)]);
        }
    }

    #[test]
    fn layout_is_in_the_reserved_bios_area() {
        const {
            assert!(MPTABLE_START.is_multiple_of(16));
            assert!(MPTABLE_START >= layout::BIOS_START);
            // Nothing else in the low-memory layout reaches the BIOS area.
            assert!(layout::CMDLINE_ADDR + layout::CMDLINE_MAX_SIZE <= layout::BIOS_START);
        }
        assert!(MPTABLE_START + mptable_size(MAX_CPUS) <= layout::HIGH_MEMORY_START);
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        let mem = guest(1 << 20);
        for n in [0u32, 255, 1000] {
            assert!(matches!(
                write_mptable(&mem, n),
                Err(Error::BadCpuCount(m)) if m == n
            ));
        }
        // Nothing was written.
        assert!(read(&mem, 0xF0000, 0x10000).iter().all(|&b| b == 0));
    }

    #[test]
    fn memory_without_bios_area_is_an_error() {
        let mem = guest(512 << 10);
        assert!(matches!(
            write_mptable(&mem, 1),
            Err(Error::GuestMemory { addr: 0xF0000, .. })
        ));
    }

    #[test]
    fn exactly_one_mib_is_enough() {
        let mem = guest(1 << 20);
        write_mptable(&mem, MAX_CPUS).unwrap();
        assert_eq!(parse(&mem).cpus.len(), MAX_CPUS as usize);
    }

    #[test]
    fn packed_apic_ids_and_ioapic_after_them() {
        let mem = guest(1 << 20);
        write_mptable_with_ids(&mem, &[0, 1, 2, 4, 5, 6]).unwrap();
        let table = read(&mem, MPC_TABLE_ADDR, mptable_size(6) as usize - FPS_LEN);
        let ids: Vec<u8> = (0..6)
            .map(|i| table[HEADER_LEN + i * PROCESSOR_LEN + 1])
            .collect();
        assert_eq!(ids, [0, 1, 2, 4, 5, 6]);
        let ioapic = HEADER_LEN + 6 * PROCESSOR_LEN + 2 * ENTRY_LEN;
        assert_eq!(table[ioapic], 2, "I/O APIC entry type");
        assert_eq!(
            table[ioapic + 1],
            7,
            "I/O APIC id follows the highest local APIC id"
        );
        assert!(write_mptable_with_ids(&mem, &[0, 254]).is_err());
    }
}
