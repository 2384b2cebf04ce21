//! vCPU entry state: GDT, TSS, page tables, control registers, for the 64-bit Linux boot
//! protocol entry and the 32-bit PVH entry.

use vm_memory::GuestMemoryBackend;

use crate::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, GDT_ENTRIES, IDT_ADDR, PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR,
    SEL_CODE32, SEL_CODE64, SEL_DATA, SEL_TSS, TSS_ADDR, TSS_SIZE,
};
use crate::{write_guest as write, Error};

/// CR0: protection enable.
pub const CR0_PE: u64 = 1 << 0;
/// CR0: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0: native FPU error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension (required for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS: bit 1 is reserved and always set; IF clear (interrupts off).
pub const RFLAGS_RESERVED: u64 = 1 << 1;

/// A segment register as KVM's `kvm_segment` wants it: `limit` is in bytes (already scaled
/// by `g`), `present == false` means "unusable".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (inclusive), scaled by granularity.
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (32-bit) / big.
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// 4 KiB granularity.
    pub g: bool,
}

/// Register state for the boot vCPU at the kernel's entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntryState {
    /// Entry point.
    pub rip: u64,
    /// Stack pointer (a small scratch stack; both protocols set up their own quickly).
    pub rsp: u64,
    /// Zero page address (64-bit Linux boot protocol), else 0.
    pub rsi: u64,
    /// `hvm_start_info` address (PVH), else 0.
    pub rbx: u64,
    /// RFLAGS (interrupts off).
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3 (PML4 address in long mode, 0 for PVH).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER MSR.
    pub efer: u64,
    /// CS.
    pub cs: Segment,
    /// DS, ES, FS, GS and SS.
    pub data: Segment,
    /// TR (a busy TSS, as KVM requires a valid one).
    pub tr: Segment,
    /// LDTR (unusable).
    pub ldt: Segment,
    /// GDTR base.
    pub gdt_base: u64,
    /// GDTR limit.
    pub gdt_limit: u16,
    /// IDTR base.
    pub idt_base: u64,
    /// IDTR limit.
    pub idt_limit: u16,
}

/// Encodes a GDT descriptor. `flags` holds access byte (bits 0–7) and G/DB/L/AVL (bits 12–15).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Decodes a GDT descriptor into the cached form KVM takes.
fn segment_from_gdt(selector: u16, desc: u64) -> Segment {
    let g = (desc >> 55) & 1 == 1;
    let raw_limit = ((desc & 0xffff) | ((desc >> 32) & 0x000f_0000)) as u32;
    Segment {
        base: ((desc >> 16) & 0x00ff_ffff) | (((desc >> 56) & 0xff) << 24),
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        s: (desc >> 44) & 1 == 1,
        dpl: ((desc >> 45) & 3) as u8,
        present: (desc >> 47) & 1 == 1,
        l: (desc >> 53) & 1 == 1,
        db: (desc >> 54) & 1 == 1,
        g,
    }
}

/// The GDT: null, flat 32-bit code (0x08), 64-bit code (0x10), flat data (0x18), and a
/// 16-byte busy-TSS descriptor (0x20) — Linux wants `__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18.
pub fn gdt() -> [u64; GDT_ENTRIES] {
    [
        0,
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        // TSS addresses are below 4 GiB, so the upper half of the descriptor is zero.
        gdt_entry(0x008b, TSS_ADDR as u32, (TSS_SIZE - 1) as u32),
        0,
    ]
}

/// An unusable LDT (type 2 = LDT, not present), which KVM accepts.
fn ldt() -> Segment {
    Segment {
        type_: 2,
        ..Segment::default()
    }
}

/// Writes GDT, empty IDT and TSS to their fixed addresses.
pub fn write_descriptor_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    let gdt: Vec<u8> = gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, GDT_ADDR, &gdt)?;
    write(mem, IDT_ADDR, &[0; 8])?;
    let mut tss = [0u8; TSS_SIZE as usize];
    // I/O map base beyond the limit: no I/O permission bitmap.
    tss[0x66..0x68].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    write(mem, TSS_ADDR, &tss)
}

/// Writes identity-mapping page tables for [0, 4 GiB) with 2 MiB pages.
pub fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let mut pml4 = [0u8; 0x1000];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | PRESENT_RW).to_le_bytes());
    let mut pdpt = [0u8; 0x1000];
    for i in 0..PD_COUNT {
        let e = (PD_ADDR + i * 0x1000) | PRESENT_RW;
        let o = (i * 8) as usize;
        pdpt[o..o + 8].copy_from_slice(&e.to_le_bytes());
    }
    let pds: Vec<u8> = (0..PD_COUNT * 512)
        .flat_map(|j| ((j << 21) | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes())
        .collect();
    write(mem, PML4_ADDR, &pml4)?;
    write(mem, PDPT_ADDR, &pdpt)?;
    write(mem, PD_ADDR, &pds)
}

fn common(rip: u64) -> EntryState {
    let g = gdt();
    EntryState {
        rip,
        rsp: BOOT_STACK_POINTER,
        rflags: RFLAGS_RESERVED,
        data: segment_from_gdt(SEL_DATA, g[usize::from(SEL_DATA >> 3)]),
        tr: segment_from_gdt(SEL_TSS, g[usize::from(SEL_TSS >> 3)]),
        ldt: ldt(),
        gdt_base: GDT_ADDR,
        gdt_limit: (GDT_ENTRIES * 8 - 1) as u16,
        idt_base: IDT_ADDR,
        idt_limit: 0,
        ..EntryState::default()
    }
}

/// 64-bit Linux boot protocol entry: long mode, paging on (identity map), RSI = zero page.
pub fn long_mode(rip: u64, zero_page: u64) -> EntryState {
    EntryState {
        rsi: zero_page,
        cr0: CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr3: PML4_ADDR,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        cs: segment_from_gdt(SEL_CODE64, gdt()[usize::from(SEL_CODE64 >> 3)]),
        ..common(rip)
    }
}

/// PVH entry: 32-bit protected mode, paging off, flat CS = 0x08, RBX = `hvm_start_info`.
pub fn pvh(rip: u64, start_info: u64) -> EntryState {
    EntryState {
        rbx: start_info,
        cr0: CR0_PE | CR0_ET,
        cs: segment_from_gdt(SEL_CODE32, gdt()[usize::from(SEL_CODE32 >> 3)]),
        ..common(rip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn read_u64(m: &GuestMemoryMmap, a: u64) -> u64 {
        m.read_obj(GuestAddress(a)).unwrap()
    }

    #[test]
    fn gdt_matches_known_encodings() {
        let g = gdt();
        assert_eq!(g[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(g[2], 0x00af_9b00_0000_ffff);
        assert_eq!(g[3], 0x00cf_9300_0000_ffff);
        assert_eq!(g[4], 0x0000_8b00_0580_0067);
    }

    #[test]
    fn long_mode_state() {
        let s = long_mode(0x10_0200, 0x7000);
        assert_eq!(s.rip, 0x10_0200);
        assert_eq!(s.rsi, 0x7000);
        assert_eq!(s.cr0, 0x8000_0031);
        assert_eq!(s.cr4, 0x20);
        assert_eq!(s.efer, 0x500);
        assert_eq!(s.rflags, 2);
        let cs = s.cs;
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.s, cs.present),
            (0x10, 0xb, true, false, true, true, true)
        );
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        let d = s.data;
        assert_eq!(
            (d.selector, d.type_, d.db, d.s, d.present, d.limit),
            (0x18, 3, true, true, true, 0xffff_ffff)
        );
        let tr = s.tr;
        assert_eq!(
            (tr.selector, tr.type_, tr.present, tr.s, tr.base, tr.limit),
            (0x20, 11, true, false, TSS_ADDR, 0x67)
        );
        assert_eq!((s.ldt.type_, s.ldt.present), (2, false));
        assert_eq!((s.gdt_base, s.gdt_limit, s.idt_limit), (0x500, 47, 0));
    }

    #[test]
    fn pvh_state() {
        let s = pvh(0x100_0850, 0x1000);
        assert_eq!((s.rip, s.rbx, s.rsi), (0x100_0850, 0x1000, 0));
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (0x11, 0, 0, 0));
        assert_eq!(
            (s.cs.selector, s.cs.l, s.cs.db, s.cs.type_),
            (0x08, false, true, 0xb)
        );
        assert_eq!(s.data.selector, 0x18);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = mem();
        write_page_tables(&m).unwrap();
        assert_eq!(read_u64(&m, PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(read_u64(&m, PML4_ADDR + 8), 0);
        for i in 0..4 {
            assert_eq!(read_u64(&m, PDPT_ADDR + i * 8), (PD_ADDR + i * 0x1000) | 3);
        }
        assert_eq!(read_u64(&m, PDPT_ADDR + 32), 0);
        assert_eq!(read_u64(&m, PD_ADDR), 0x83);
        assert_eq!(read_u64(&m, PD_ADDR + 8), 0x20_0083);
        // Last 2 MiB page below 4 GiB.
        assert_eq!(read_u64(&m, PD_ADDR + 4 * 0x1000 - 8), 0xffe0_0083);
    }

    #[test]
    fn descriptor_tables_written() {
        let m = mem();
        write_descriptor_tables(&m).unwrap();
        for (i, d) in gdt().iter().enumerate() {
            assert_eq!(read_u64(&m, GDT_ADDR + i as u64 * 8), *d);
        }
        let iomap: u16 = m.read_obj(GuestAddress(TSS_ADDR + 0x66)).unwrap();
        assert_eq!(iomap, 0x68);
    }
}
