//! ELF vmlinux through the PVH boot protocol (xen/include/public/arch-x86/hvm/start_info.h):
//! PT_LOAD segments go to their physical addresses, `hvm_start_info` describes command line,
//! initrd module and memory map, and the vCPU starts in 32-bit protected mode, paging off,
//! at the address in the XEN_ELFNOTE_PHYS32_ENTRY note with RBX = `hvm_start_info`.

use std::mem::size_of;

use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, EM_X86_64, PT_LOAD, PT_NOTE,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{ByteValued, GuestMemoryBackend};

use crate::layout::{
    self, HIGH_MEMORY_START, PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX_ENTRIES, PVH_MODLIST_ADDR,
    PVH_START_INFO_ADDR,
};
use crate::{entry, Error, Image, KernelFormat, LoadedKernel, Request};

/// Note type carrying the 32-bit physical PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Note name for Xen notes, NUL included.
const XEN_NOTE_NAME: &[u8] = b"Xen\0";
/// Note segments larger than this are refused (vmlinux has ~0x200 bytes of notes).
const MAX_NOTE_SEGMENT: u64 = 1 << 20;
/// Most program headers accepted (vmlinux has ~5).
const MAX_PHDRS: u16 = 256;
/// `hvm_start_info` version with the memory map fields.
const START_INFO_VERSION: u32 = 1;
/// Chunk for zero-filling the part of a segment beyond its file data.
const ZERO_CHUNK: usize = 64 * 1024;

fn bad(what: &'static str) -> Error {
    Error::BadElf(what)
}

fn read_obj<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let mut v = T::default();
    v.as_mut_slice()
        .copy_from_slice(bytes.get(..size_of::<T>())?);
    Some(v)
}

/// Finds the PVH entry point in one note segment (4-byte aligned notes).
fn find_pvh_entry(notes: &[u8]) -> Result<Option<u32>, Error> {
    let align4 = |n: u32| (u64::from(n) + 3) & !3;
    let mut off = 0u64;
    let len = notes.len() as u64;
    while off.saturating_add(12) <= len {
        let word = |i: u64| -> u32 {
            let at = (off + i * 4) as usize;
            u32::from_le_bytes([notes[at], notes[at + 1], notes[at + 2], notes[at + 3]])
        };
        let (namesz, descsz, kind) = (word(0), word(1), word(2));
        let name_off = off + 12;
        let desc_off = name_off + align4(namesz);
        let next = desc_off + align4(descsz);
        if desc_off + u64::from(descsz) > len {
            return Err(bad("ELF note runs past the end of its segment"));
        }
        let name = &notes[name_off as usize..(name_off + u64::from(namesz)) as usize];
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == XEN_NOTE_NAME {
            let desc = &notes[desc_off as usize..(desc_off + u64::from(descsz)) as usize];
            // Linux stores it as a pointer-sized value (8 bytes), the ABI as 32 bits.
            let entry = match *desc {
                [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
                [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
                _ => return Err(bad("PVH entry note descriptor is not 4 or 8 bytes")),
            };
            return u32::try_from(entry)
                .map(Some)
                .map_err(|_| bad("PVH entry point is above 4 GiB"));
        }
        off = next;
    }
    Ok(None)
}

/// The parsed, validated parts of the ELF file we use.
struct Elf {
    entry: u32,
    loads: Vec<Elf64_Phdr>,
}

fn parse(img: &Image, prefix: &[u8]) -> Result<Elf, Error> {
    let ehdr: Elf64_Ehdr = read_obj(prefix).ok_or_else(|| Error::TruncatedHeader {
        path: img.path().to_path_buf(),
        len: img.len(),
        need: size_of::<Elf64_Ehdr>() as u64,
    })?;
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64 {
        return Err(bad("not a 64-bit ELF file"));
    }
    if ehdr.e_ident[EI_DATA] != ELFDATA2LSB {
        return Err(bad("not little-endian"));
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(bad("not an x86-64 ELF file"));
    }
    if usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>() {
        return Err(bad("unexpected program header size"));
    }
    if ehdr.e_phnum == 0 || ehdr.e_phnum > MAX_PHDRS {
        return Err(bad("program header count is 0 or implausibly large"));
    }
    let mut table = vec![0u8; usize::from(ehdr.e_phnum) * size_of::<Elf64_Phdr>()];
    img.read_at(ehdr.e_phoff, &mut table)?;
    let phdrs: Vec<Elf64_Phdr> = table
        .chunks_exact(size_of::<Elf64_Phdr>())
        .filter_map(read_obj)
        .collect();

    let mut entry = None;
    for p in phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
        if p.p_filesz > MAX_NOTE_SEGMENT {
            return Err(bad("note segment implausibly large"));
        }
        let mut notes = vec![0u8; p.p_filesz as usize];
        img.read_at(p.p_offset, &mut notes)?;
        if let Some(e) = find_pvh_entry(&notes)? {
            entry = Some(e);
            break;
        }
    }
    let entry = entry.ok_or(Error::NoPvhNote)?;

    let loads: Vec<Elf64_Phdr> = phdrs
        .into_iter()
        .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
        .collect();
    if loads.is_empty() {
        return Err(bad("no loadable segment"));
    }
    for p in &loads {
        if p.p_filesz > p.p_memsz {
            return Err(bad("segment file size exceeds its memory size"));
        }
        if p.p_offset
            .checked_add(p.p_filesz)
            .is_none_or(|e| e > img.len())
        {
            return Err(Error::TruncatedFile {
                path: img.path().to_path_buf(),
                len: img.len(),
                need: p.p_offset.saturating_add(p.p_filesz),
            });
        }
        if p.p_paddr < HIGH_MEMORY_START {
            return Err(Error::KernelOverlapsLowMemory(p.p_paddr));
        }
    }
    Ok(Elf { entry, loads })
}

pub(crate) fn load<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &Request,
    img: &mut Image,
    prefix: &[u8],
) -> Result<LoadedKernel, Error> {
    let elf = parse(img, prefix)?;
    for p in &elf.loads {
        if !layout::in_ram(cfg.ram_bytes, p.p_paddr, p.p_memsz) {
            return Err(Error::ElfSegmentOutsideRam {
                paddr: p.p_paddr,
                memsz: p.p_memsz,
            });
        }
    }
    // in_ram guarantees paddr + memsz does not overflow.
    let start = elf.loads.iter().map(|p| p.p_paddr).min().unwrap_or(0);
    let end = elf
        .loads
        .iter()
        .map(|p| p.p_paddr + p.p_memsz)
        .max()
        .unwrap_or(0);
    let entry_in_segment = elf
        .loads
        .iter()
        .any(|p| (p.p_paddr..p.p_paddr + p.p_filesz).contains(&u64::from(elf.entry)));
    if !entry_in_segment {
        return Err(bad("PVH entry point is not inside a loaded segment"));
    }
    crate::check_cmdline(cfg.cmdline, u64::MAX)?;

    let initrd_range = match cfg.initrd {
        Some(path) => Some(crate::load_initrd(
            mem,
            path,
            end,
            layout::low_ram_end(cfg.ram_bytes),
        )?),
        None => None,
    };
    for p in &elf.loads {
        img.copy_to_guest(mem, p.p_offset, p.p_filesz, p.p_paddr)?;
        // Guest RAM is usually fresh and zero, but the contract of memsz is "zeroed".
        let zeros = [0u8; ZERO_CHUNK];
        let mut at = p.p_paddr + p.p_filesz;
        let seg_end = p.p_paddr + p.p_memsz;
        while at < seg_end {
            let n = (seg_end - at).min(ZERO_CHUNK as u64);
            crate::write_guest(mem, at, &zeros[..n as usize])?;
            at += n;
        }
    }
    let cmdline_addr = crate::write_cmdline(mem, cfg.cmdline, u64::MAX)?;

    let e820 = layout::e820_map(cfg.ram_bytes);
    let memmap: Vec<u8> = e820
        .iter()
        .take(PVH_MEMMAP_MAX_ENTRIES)
        .flat_map(|e| {
            hvm_memmap_table_entry {
                addr: e.addr,
                size: e.size,
                type_: e.kind as u32,
                reserved: 0,
            }
            .as_slice()
            .to_vec()
        })
        .collect();
    crate::write_guest(mem, PVH_MEMMAP_ADDR, &memmap)?;

    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: cfg.rsdp_addr.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: e820.len().min(PVH_MEMMAP_MAX_ENTRIES) as u32,
        ..Default::default()
    };
    if let Some((s, e)) = initrd_range {
        let module = hvm_modlist_entry {
            paddr: s,
            size: e - s,
            ..Default::default()
        };
        crate::write_guest(mem, PVH_MODLIST_ADDR, module.as_slice())?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    crate::write_guest(mem, PVH_START_INFO_ADDR, info.as_slice())?;
    entry::write_descriptor_tables(mem)?;

    Ok(LoadedKernel {
        format: KernelFormat::ElfPvh,
        entry: entry::pvh(u64::from(elf.entry), PVH_START_INFO_ADDR),
        kernel_range: (start, end),
        initrd_range,
        e820,
        cmdline_addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{debian_kernel, guest, tmpfile};
    use crate::BootConfig;
    use crate::{load as load_kernel, E820Kind};
    use std::path::Path;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((name.len() as u32).to_le_bytes());
        v.extend((desc.len() as u32).to_le_bytes());
        v.extend(kind.to_le_bytes());
        v.extend(name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    struct Seg {
        paddr: u64,
        data: Vec<u8>,
        memsz: u64,
    }

    /// A minimal ELF: header, program headers, note segment, then segment data.
    fn elf(notes: &[u8], segs: &[Seg]) -> Vec<u8> {
        let phnum = segs.len() + 1;
        let phoff = size_of::<Elf64_Ehdr>();
        let mut data_off = phoff + phnum * size_of::<Elf64_Phdr>();
        let mut ehdr = Elf64_Ehdr {
            e_type: 2,
            e_machine: EM_X86_64,
            e_version: 1,
            e_phoff: phoff as u64,
            e_ehsize: size_of::<Elf64_Ehdr>() as u16,
            e_phentsize: size_of::<Elf64_Phdr>() as u16,
            e_phnum: phnum as u16,
            ..Default::default()
        };
        ehdr.e_ident[..4].copy_from_slice(b"\x7fELF");
        ehdr.e_ident[EI_CLASS] = ELFCLASS64;
        ehdr.e_ident[EI_DATA] = ELFDATA2LSB;
        ehdr.e_ident[6] = 1;
        let mut phdrs = vec![Elf64_Phdr {
            p_type: PT_NOTE,
            p_offset: data_off as u64,
            p_filesz: notes.len() as u64,
            p_memsz: notes.len() as u64,
            p_align: 4,
            ..Default::default()
        }];
        let mut blob = notes.to_vec();
        data_off += notes.len();
        for s in segs {
            phdrs.push(Elf64_Phdr {
                p_type: PT_LOAD,
                p_offset: data_off as u64,
                p_paddr: s.paddr,
                p_vaddr: s.paddr,
                p_filesz: s.data.len() as u64,
                p_memsz: s.memsz,
                ..Default::default()
            });
            blob.extend(&s.data);
            data_off += s.data.len();
        }
        let mut f = ehdr.as_slice().to_vec();
        for p in &phdrs {
            f.extend(p.as_slice());
        }
        f.extend(blob);
        f
    }

    fn pvh_note(entry: u64) -> Vec<u8> {
        let mut n = note(b"Xen\0", 6, b"linux\0");
        n.extend(note(b"GNU\0", 3, &[1; 20]));
        n.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &entry.to_le_bytes(),
        ));
        n
    }

    fn text() -> Vec<u8> {
        (0..0x2000u32).map(|i| (i % 253) as u8).collect()
    }

    fn standard() -> Vec<u8> {
        elf(
            &pvh_note(0x100_0010),
            &[
                Seg {
                    paddr: 0x100_0000,
                    data: text(),
                    memsz: 0x3000,
                },
                Seg {
                    paddr: 0x200_0000,
                    data: vec![9; 16],
                    memsz: 0x10,
                },
            ],
        )
    }

    fn try_load(
        bytes: &[u8],
        ram: u64,
        initrd: Option<&[u8]>,
    ) -> Result<(GuestMemoryMmap, LoadedKernel), Error> {
        let k = tmpfile("vmlinux", bytes);
        let i = initrd.map(|b| tmpfile("initrd", b));
        let mem = guest(ram);
        // Dirty the bss to prove it gets zeroed.
        mem.write_slice(&[0xff; 0x100], GuestAddress(0x100_2000))
            .unwrap();
        let cfg = BootConfig {
            kernel: &k,
            initrd: i.as_deref(),
            cmdline: "console=ttyS0",
            ram_bytes: ram,
            rsdp_addr: Some(0xf_0000),
        };
        let r = load_kernel(&mem, &cfg);
        std::fs::remove_file(k).unwrap();
        if let Some(i) = i {
            std::fs::remove_file(i).unwrap();
        }
        r.map(|l| (mem, l))
    }

    #[test]
    fn loads_segments_and_start_info() {
        let ram = 128 * MIB;
        let (mem, l) = try_load(&standard(), ram, Some(&[7; 3000])).unwrap();
        assert_eq!(l.format, KernelFormat::ElfPvh);
        assert_eq!(l.kernel_range, (0x100_0000, 0x200_0010));
        assert_eq!(l.entry.rip, 0x100_0010);
        assert_eq!(l.entry.rbx, PVH_START_INFO_ADDR);
        assert_eq!(
            (l.entry.cr0, l.entry.efer, l.entry.cs.selector),
            (0x11, 0, 0x08)
        );

        let mut got = vec![0u8; 0x3000];
        mem.read_slice(&mut got, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(&got[..0x2000], &text()[..]);
        assert!(got[0x2000..].iter().all(|&b| b == 0), "bss zeroed");

        let (is, ie) = l.initrd_range.unwrap();
        assert_eq!((is, ie), (ram - 0x1000, ram - 0x1000 + 3000));

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, layout::CMDLINE_ADDR);
        assert_eq!(info.rsdp_paddr, 0xf_0000);
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, PVH_MODLIST_ADDR));
        assert_eq!(
            (info.memmap_paddr, info.memmap_entries),
            (PVH_MEMMAP_ADDR, 5)
        );
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((m.paddr, m.size, m.cmdline_paddr), (is, 3000, 0));
        let e: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_ADDR + 3 * 24))
            .unwrap();
        assert_eq!(
            (e.addr, e.size, e.type_),
            (MIB, ram - MIB, E820Kind::Ram as u32)
        );

        let mut cl = [0u8; 14];
        mem.read_slice(&mut cl, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
    }

    #[test]
    fn no_initrd_means_no_modules() {
        let (mem, l) = try_load(&standard(), 64 * MIB, None).unwrap();
        assert!(l.initrd_range.is_none());
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }

    #[test]
    fn four_byte_entry_note() {
        let n = note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x100_0020u32.to_le_bytes(),
        );
        let f = elf(
            &n,
            &[Seg {
                paddr: 0x100_0000,
                data: text(),
                memsz: 0x2000,
            }],
        );
        assert_eq!(
            try_load(&f, 64 * MIB, None).unwrap().1.entry.rip,
            0x100_0020
        );
    }

    #[test]
    fn without_pvh_note() {
        let n = note(b"Xen\0", 6, b"linux\0");
        let f = elf(
            &n,
            &[Seg {
                paddr: 0x100_0000,
                data: text(),
                memsz: 0x2000,
            }],
        );
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::NoPvhNote)
        ));
        // Right type, wrong owner.
        let n = note(b"Gnu\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4]);
        let f = elf(
            &n,
            &[Seg {
                paddr: 0x100_0000,
                data: text(),
                memsz: 0x2000,
            }],
        );
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::NoPvhNote)
        ));
    }

    #[test]
    fn bad_notes() {
        let mut n = pvh_note(0x100_0010);
        n.truncate(n.len() - 4); // last descriptor cut
        let f = elf(
            &n,
            &[Seg {
                paddr: 0x100_0000,
                data: text(),
                memsz: 0x2000,
            }],
        );
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::BadElf(_))
        ));
        let n = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 3]);
        let f = elf(
            &n,
            &[Seg {
                paddr: 0x100_0000,
                data: text(),
                memsz: 0x2000,
            }],
        );
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::BadElf(_))
        ));
        let f = elf(
            &pvh_note(1 << 32),
            &[Seg {
                paddr: 0x100_0000,
                data: text(),
                memsz: 0x2000,
            }],
        );
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::BadElf(_))
        ));
        let f = elf(
            &pvh_note(0x300_0000),
            &[Seg {
                paddr: 0x100_0000,
                data: text(),
                memsz: 0x2000,
            }],
        );
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::BadElf(_))
        ));
        // namesz near u32::MAX must not overflow.
        let mut n = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 18, 0, 0, 0];
        n.extend([0; 16]);
        let f = elf(
            &n,
            &[Seg {
                paddr: 0x100_0000,
                data: text(),
                memsz: 0x2000,
            }],
        );
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::BadElf(_))
        ));
    }

    #[test]
    fn segment_errors() {
        let seg = |paddr, memsz| Seg {
            paddr,
            data: text(),
            memsz,
        };
        let n = pvh_note(0x100_0010);
        let e = try_load(
            &elf(&n, &[seg(0x100_0000, 0x2000), seg(0x3ff_f000, 0x2000)]),
            64 * MIB,
            None,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::ElfSegmentOutsideRam {
                    paddr: 0x3ff_f000,
                    memsz: 0x2000
                }
            ),
            "{e}"
        );
        let e = try_load(&elf(&n, &[seg(0x100_0000, u64::MAX)]), 64 * MIB, None).unwrap_err();
        assert!(matches!(e, Error::ElfSegmentOutsideRam { .. }), "{e}");
        let e = try_load(
            &elf(&n, &[seg(0x100_0000, 0x2000), seg(0xc000_0000, 0x2000)]),
            4 << 30,
            None,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::ElfSegmentOutsideRam { .. }),
            "in the MMIO hole: {e}"
        );
        let e = try_load(&elf(&n, &[seg(0x100_0000, 0x1000)]), 64 * MIB, None).unwrap_err();
        assert!(matches!(e, Error::BadElf(_)), "filesz > memsz: {e}");
        let e = try_load(&elf(&n, &[seg(0x8000, 0x2000)]), 64 * MIB, None).unwrap_err();
        assert!(matches!(e, Error::KernelOverlapsLowMemory(0x8000)), "{e}");
        let mut f = elf(&n, &[seg(0x100_0000, 0x2000)]);
        f.truncate(f.len() - 1);
        let e = try_load(&f, 64 * MIB, None).unwrap_err();
        assert!(matches!(e, Error::TruncatedFile { .. }), "{e}");
    }

    #[test]
    fn initrd_too_big() {
        let k = tmpfile("vmlinux", &standard());
        let i = tmpfile("initrd", &[]);
        // Sparse: 32 MiB + 1 page does not fit between the kernel end (32 MiB) and 64 MiB.
        std::fs::File::options()
            .write(true)
            .open(&i)
            .unwrap()
            .set_len(32 * MIB + 1)
            .unwrap();
        let mem = guest(64 * MIB);
        let cfg = BootConfig {
            kernel: &k,
            initrd: Some(&i),
            cmdline: "",
            ram_bytes: 64 * MIB,
            rsdp_addr: None,
        };
        let e = load_kernel(&mem, &cfg).unwrap_err();
        let free = 64 * MIB - 0x200_1000;
        assert!(
            matches!(e, Error::InitrdTooBig { size, free: f, limit } if size == 32 * MIB + 1 && f == free && limit == 64 * MIB),
            "{e}"
        );
        std::fs::remove_file(k).unwrap();
        std::fs::remove_file(i).unwrap();
    }

    #[test]
    fn header_errors() {
        let good = standard();
        let e = try_load(&good[..40], 64 * MIB, None).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TruncatedHeader {
                    len: 40,
                    need: 64,
                    ..
                }
            ),
            "{e}"
        );
        let mut f = good.clone();
        f[EI_CLASS] = 1;
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::BadElf(_))
        ));
        let mut f = good.clone();
        f[18] = 3; // e_machine = EM_386
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::BadElf(_))
        ));
        let mut f = good.clone();
        f[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // e_phoff
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::TruncatedFile { .. })
        ));
        let mut f = good;
        f[56..58].copy_from_slice(&0u16.to_le_bytes()); // e_phnum
        assert!(matches!(
            try_load(&f, 64 * MIB, None),
            Err(Error::BadElf(_))
        ));
    }

    #[test]
    fn cmdline_too_long() {
        let k = tmpfile("vmlinux", &standard());
        let mem = guest(64 * MIB);
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE as usize);
        let cfg = BootConfig {
            kernel: &k,
            initrd: None,
            cmdline: &long,
            ram_bytes: 64 * MIB,
            rsdp_addr: None,
        };
        let e = load_kernel(&mem, &cfg).unwrap_err();
        assert!(matches!(e, Error::CmdlineTooLong { .. }), "{e}");
        std::fs::remove_file(k).unwrap();
    }

    #[test]
    fn debian_vmlinux_pvh() {
        let Some(k) = debian_kernel("vmlinux") else {
            return;
        };
        let ram = 512 * MIB;
        let mem = guest(ram);
        let cfg = BootConfig {
            kernel: Path::new(&k),
            initrd: None,
            cmdline: "console=ttyS0",
            ram_bytes: ram,
            rsdp_addr: None,
        };
        let l = load_kernel(&mem, &cfg).unwrap();
        assert_eq!(l.format, KernelFormat::ElfPvh);
        assert_eq!(l.kernel_range.0, 0x100_0000);
        assert!((l.kernel_range.0..l.kernel_range.1).contains(&l.entry.rip));
        // The first segment is the kernel text at 16 MiB, from file offset 0x200000 (checked
        // against the file itself rather than hard-coding the build).
        let img = Image::open(&k).unwrap();
        let mut want = [0u8; 64];
        let mut prefix = vec![0u8; 4096];
        img.read_at(0, &mut prefix).unwrap();
        let elf = parse(&img, &prefix).unwrap();
        img.read_at(elf.loads[0].p_offset, &mut want).unwrap();
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(elf.loads[0].p_paddr))
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(u64::from(elf.entry), l.entry.rip);
    }
}
