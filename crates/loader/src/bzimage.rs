//! Linux bzImage through the 64-bit boot protocol (Documentation/arch/x86/boot.rst): the
//! protected-mode kernel goes to 1 MiB, the zero page carries the setup header, command line,
//! e820 map and initrd, and the vCPU starts in long mode at load address + 0x200.

use std::mem::size_of;

use linux_loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE,
    LOADED_HIGH, XLF_KERNEL_64,
};
use vm_memory::{ByteValued, GuestMemoryBackend};

use crate::layout::{self, HIGH_MEMORY_START, ZERO_PAGE_ADDR};
use crate::{entry, Error, Image, KernelFormat, LoadedKernel, Request};

/// The setup header starts here in both the file and the zero page.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// The byte holding the setup header's length (the offset of its `jmp` at 0x200).
const HEADER_JUMP_OFFSET: usize = 0x201;
/// "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// Oldest protocol accepted (cmdline_size appears in 2.06).
const MIN_PROTOCOL: u16 = 0x0206;
/// xloadflags (and thus a declared 64-bit entry) appear in 2.12.
const XLOADFLAGS_PROTOCOL: u16 = 0x020c;
/// A 2.12+ header extends at least to the end of init_size.
const HEADER_END_2_12: usize = 0x264;
/// "Undefined" boot loader id: we have no id assigned.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Heap end a loader placing setup at 0x90000 would report. The 64-bit entry skips the
/// real-mode setup code that uses it, so the value only has to be plausible.
const HEAP_END_PTR: u16 = 0xfe00 - 0x200;
/// Protocol default when initrd_addr_max is absent.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;

/// Validates the setup header from the file's first bytes and returns it.
fn parse_header(img: &Image, prefix: &[u8]) -> Result<setup_header, Error> {
    let truncated = |need: usize| Error::TruncatedHeader {
        path: img.path().to_path_buf(),
        len: img.len(),
        need: need as u64,
    };
    let jump = *prefix
        .get(HEADER_JUMP_OFFSET)
        .ok_or_else(|| truncated(HEADER_JUMP_OFFSET + 5))?;
    let hdr_end = HEADER_JUMP_OFFSET + 1 + usize::from(jump);
    if prefix.len() < hdr_end.max(0x206) {
        return Err(truncated(hdr_end.max(0x206)));
    }
    // The header is as long as its jump says; fields past it stay zero (as in a zero page).
    let mut hdr = setup_header::default();
    let copy_len = (hdr_end - SETUP_HEADER_OFFSET).min(size_of::<setup_header>());
    hdr.as_mut_slice()[..copy_len]
        .copy_from_slice(&prefix[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + copy_len]);

    if { hdr.boot_flag } != BOOT_FLAG {
        return Err(Error::BadMagic("no 0xAA55 boot flag at 0x1fe"));
    }
    if prefix[0x202..0x206] != HDRS_MAGIC.to_le_bytes() {
        return Err(Error::BadMagic("no \"HdrS\" at 0x202 (pre-2.00 zImage?)"));
    }
    let version = hdr.version;
    if version < MIN_PROTOCOL {
        return Err(Error::ProtocolTooOld(version));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(Error::NotLoadedHigh);
    }
    if version < XLOADFLAGS_PROTOCOL || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Not64Bit {
            version,
            xloadflags: if version < XLOADFLAGS_PROTOCOL {
                0
            } else {
                hdr.xloadflags
            },
        });
    }
    if hdr_end < HEADER_END_2_12 {
        return Err(Error::BadSetupHeader(
            "setup header shorter than its protocol version requires",
        ));
    }
    Ok(hdr)
}

/// Where the kernel goes and what it occupies.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    load_addr: u64,
    payload_offset: u64,
    payload_len: u64,
    /// End of everything the kernel touches while booting.
    end: u64,
}

fn plan(hdr: &setup_header, file_len: u64, ram_bytes: u64) -> Result<Plan, Error> {
    let setup_sects = match hdr.setup_sects {
        0 => 4, // the protocol's "0 means 4"
        n => u64::from(n),
    };
    let payload_offset = (setup_sects + 1) * 512;
    let payload_len = match file_len.checked_sub(payload_offset) {
        Some(n) if n > 0 => n,
        _ => {
            return Err(Error::NoProtectedModeKernel {
                setup_end: payload_offset,
            })
        }
    };
    let pref = hdr.pref_address;
    let relocatable = hdr.relocatable_kernel != 0;
    let load_addr = if relocatable || pref == 0 {
        HIGH_MEMORY_START
    } else {
        pref
    };
    if load_addr < HIGH_MEMORY_START {
        return Err(Error::KernelOverlapsLowMemory(load_addr));
    }
    // Where the decompressor will run from (head_64.S): the load address aligned up, but not
    // below LOAD_PHYSICAL_ADDR (= pref_address) — init_size counts from there.
    let runtime_start = if relocatable {
        let align = hdr.kernel_alignment;
        if !align.is_power_of_two() {
            return Err(Error::BadKernelAlignment(align));
        }
        let mask = u64::from(align) - 1;
        load_addr.checked_add(mask).map(|a| (a & !mask).max(pref))
    } else {
        Some(load_addr)
    };
    let end = runtime_start
        .and_then(|s| s.checked_add(u64::from(hdr.init_size)))
        .zip(load_addr.checked_add(payload_len))
        .map(|(a, b)| a.max(b));
    let ram_end = layout::low_ram_end(ram_bytes);
    match end {
        Some(end) if end <= ram_end => Ok(Plan {
            load_addr,
            payload_offset,
            payload_len,
            end,
        }),
        _ => Err(Error::KernelDoesNotFit {
            start: load_addr,
            end: end.unwrap_or(u64::MAX),
            ram_end,
        }),
    }
}

pub(crate) fn load<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &Request,
    img: &mut Image,
    prefix: &[u8],
) -> Result<LoadedKernel, Error> {
    let hdr = parse_header(img, prefix)?;
    let plan = plan(&hdr, img.len(), cfg.ram_bytes)?;
    crate::check_cmdline(cfg.cmdline, u64::from(hdr.cmdline_size))?;

    let initrd_range = match cfg.initrd {
        Some(path) => {
            let max = match hdr.initrd_addr_max {
                0 => DEFAULT_INITRD_ADDR_MAX,
                n => u64::from(n),
            };
            let limit = (max + 1).min(layout::low_ram_end(cfg.ram_bytes));
            Some(crate::load_initrd(mem, path, plan.end, limit)?)
        }
        None => None,
    };
    img.copy_to_guest(mem, plan.payload_offset, plan.payload_len, plan.load_addr)?;
    let cmdline_addr = crate::write_cmdline(mem, cfg.cmdline, u64::from(hdr.cmdline_size))?;

    let e820 = layout::e820_map(cfg.ram_bytes);
    let mut hdr = hdr;
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = HEAP_END_PTR;
    hdr.cmd_line_ptr = cmdline_addr as u32;
    let (initrd_start, initrd_size) = initrd_range.map_or((0, 0), |(s, e)| (s, e - s));
    hdr.ramdisk_image = initrd_start as u32;
    hdr.ramdisk_size = initrd_size as u32;
    let mut bp = boot_params {
        hdr,
        ext_cmd_line_ptr: (cmdline_addr >> 32) as u32,
        ext_ramdisk_image: (initrd_start >> 32) as u32,
        ext_ramdisk_size: (initrd_size >> 32) as u32,
        acpi_rsdp_addr: cfg.rsdp_addr.unwrap_or(0),
        ..Default::default()
    };
    for (slot, e) in bp.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    bp.e820_entries = e820.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    crate::write_guest(mem, ZERO_PAGE_ADDR, bp.as_slice())?;

    entry::write_descriptor_tables(mem)?;
    entry::write_page_tables(mem)?;

    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        entry: entry::long_mode(plan.load_addr + ENTRY_64_OFFSET, ZERO_PAGE_ADDR),
        kernel_range: (plan.load_addr, plan.end),
        initrd_range,
        e820,
        cmdline_addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{debian_kernel, guest, tmpfile};
    use crate::{load as load_kernel, BootConfig, E820Kind};
    use linux_loader::bootparam::XLF_CAN_BE_LOADED_ABOVE_4G;
    use std::path::Path;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;
    const PAYLOAD_LEN: usize = 0x3000;

    /// A header shaped like Debian's 6.1 kernel (protocol 2.15, relocatable, 64-bit).
    fn header() -> setup_header {
        setup_header {
            setup_sects: 1,
            boot_flag: BOOT_FLAG,
            jump: 0x6aeb, // jmp +0x6a: header ends at 0x26c
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            pref_address: 0x100_0000,
            init_size: 0x20_0000,
            ..Default::default()
        }
    }

    fn payload() -> Vec<u8> {
        (0..PAYLOAD_LEN).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn image(hdr: setup_header) -> Vec<u8> {
        let sects = if hdr.setup_sects == 0 {
            4
        } else {
            hdr.setup_sects as usize
        };
        let mut f = vec![0u8; (sects + 1) * 512];
        f[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size_of::<setup_header>()]
            .copy_from_slice(hdr.as_slice());
        f.extend(payload());
        f
    }

    fn cfg<'a>(
        kernel: &'a Path,
        initrd: Option<&'a Path>,
        cmdline: &'a str,
        ram: u64,
    ) -> BootConfig<'a> {
        BootConfig {
            kernel,
            initrd,
            cmdline,
            ram_bytes: ram,
            rsdp_addr: None,
        }
    }

    fn try_load(hdr: setup_header, ram: u64) -> Result<(GuestMemoryMmap, LoadedKernel), Error> {
        try_load_bytes(&image(hdr), ram, "console=ttyS0", None)
    }

    fn try_load_bytes(
        bytes: &[u8],
        ram: u64,
        cmdline: &str,
        initrd: Option<&[u8]>,
    ) -> Result<(GuestMemoryMmap, LoadedKernel), Error> {
        let k = tmpfile("bzimage", bytes);
        let i = initrd.map(|b| tmpfile("initrd", b));
        let mem = guest(ram);
        let r = load_kernel(&mem, &cfg(&k, i.as_deref(), cmdline, ram));
        std::fs::remove_file(k).unwrap();
        if let Some(i) = i {
            std::fs::remove_file(i).unwrap();
        }
        r.map(|l| (mem, l))
    }

    fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
    }

    /// `load_bytes` builds exactly what `load` builds from files (the rhyveload path).
    #[test]
    fn bytes_and_files_load_the_same() {
        let ram = 64 * MIB;
        let kernel = image(header());
        let initrd: Vec<u8> = (0..5000u32).map(|i| (i * 13) as u8).collect();
        let (file_mem, from_file) =
            try_load_bytes(&kernel, ram, "root=/dev/vda1", Some(&initrd)).unwrap();
        let mem = guest(ram);
        let from_bytes = crate::load_bytes(
            &mem,
            &crate::BootBytes {
                kernel: &kernel,
                kernel_name: "/boot/vmlinuz",
                initrd: Some(("/boot/initrd.img", &initrd)),
                cmdline: "root=/dev/vda1",
                ram_bytes: ram,
                rsdp_addr: None,
            },
        )
        .unwrap();
        assert_eq!(from_bytes.entry, from_file.entry);
        assert_eq!(from_bytes.initrd_range, from_file.initrd_range);
        assert_eq!(from_bytes.kernel_range, from_file.kernel_range);
        let mut a = vec![0u8; 32 * MIB as usize];
        let mut b = a.clone();
        mem.read_slice(&mut a, GuestAddress(0)).unwrap();
        file_mem.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b, "guest memory differs");
        // Errors name the in-guest path.
        let e = crate::load_bytes(
            &mem,
            &crate::BootBytes {
                kernel: b"not a kernel",
                kernel_name: "/boot/vmlinuz-broken",
                initrd: None,
                cmdline: "",
                ram_bytes: ram,
                rsdp_addr: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("/boot/vmlinuz-broken"), "{e}");
    }

    #[test]
    fn loads_kernel_zero_page_and_initrd() {
        let ram = 256 * MIB;
        let initrd: Vec<u8> = (0..0x1_2345u32).map(|i| i as u8).collect();
        let k = tmpfile("bzimage", &image(header()));
        let i = tmpfile("initrd", &initrd);
        let mem = guest(ram);
        let c = BootConfig {
            rsdp_addr: Some(0xf_0000),
            ..cfg(&k, Some(&i), "console=ttyS0 quiet", ram)
        };
        let l = load_kernel(&mem, &c).unwrap();

        assert_eq!(l.format, KernelFormat::BzImage);
        // Runtime start = max(align_up(1 MiB, 2 MiB), pref 16 MiB); + init_size 2 MiB.
        assert_eq!(l.kernel_range, (MIB, 18 * MIB));
        assert_eq!(l.entry.rip, 0x10_0200);
        assert_eq!(l.entry.rsi, ZERO_PAGE_ADDR);
        assert_eq!(l.entry.cr3, layout::PML4_ADDR);
        assert_eq!(l.cmdline_addr, layout::CMDLINE_ADDR);

        let mut got = vec![0u8; PAYLOAD_LEN];
        mem.read_slice(&mut got, GuestAddress(MIB)).unwrap();
        assert_eq!(got, payload());

        let (is, ie) = l.initrd_range.unwrap();
        assert_eq!(ie - is, initrd.len() as u64);
        assert_eq!(is % 4096, 0);
        assert!(ie <= ram && is >= l.kernel_range.1);
        assert!(ram - ie < 4096 + 0x1000, "placed as high as possible");
        let mut got = vec![0u8; initrd.len()];
        mem.read_slice(&mut got, GuestAddress(is)).unwrap();
        assert_eq!(got, initrd);

        let bp = zero_page(&mem);
        let h = bp.hdr;
        assert_eq!({ h.type_of_loader }, 0xff);
        assert_eq!({ h.boot_flag }, BOOT_FLAG);
        assert_eq!({ h.version }, 0x020f);
        assert_eq!({ h.loadflags }, LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!({ h.heap_end_ptr }, 0xfc00);
        assert_eq!({ h.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ bp.ext_cmd_line_ptr }, 0);
        assert_eq!({ h.ramdisk_image } as u64, is);
        assert_eq!({ h.ramdisk_size } as u64, ie - is);
        assert_eq!(({ bp.ext_ramdisk_image }, { bp.ext_ramdisk_size }), (0, 0));
        assert_eq!({ bp.acpi_rsdp_addr }, 0xf_0000);
        assert_eq!({ bp.sentinel }, 0);
        assert_eq!(bp.e820_entries, 5);
        let e3 = bp.e820_table[3];
        assert_eq!(
            ({ e3.addr }, { e3.size }, { e3.r#type }),
            (MIB, 255 * MIB, E820Kind::Ram as u32)
        );
        let e1 = bp.e820_table[1];
        assert_eq!(({ e1.addr }, { e1.r#type }), (0x9_fc00, 2));

        let mut cl = [0u8; 21];
        mem.read_slice(&mut cl, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0 quiet\0\0");
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_ADDR)).unwrap();
        assert_eq!(pml4, layout::PDPT_ADDR | 3);
        std::fs::remove_file(k).unwrap();
        std::fs::remove_file(i).unwrap();
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let mut h = header();
        h.initrd_addr_max = 0x2ff_ffff;
        let (_, l) = try_load_bytes(&image(h), 256 * MIB, "", Some(&[1; 5000])).unwrap();
        let (s, e) = l.initrd_range.unwrap();
        assert_eq!((s, e), (0x300_0000 - 0x2000, 0x300_0000 - 0x2000 + 5000));
    }

    #[test]
    fn initrd_too_big() {
        let mut h = header();
        h.initrd_addr_max = 0x12f_ffff; // 1 MiB above the kernel's 18 MiB end
        let e = try_load_bytes(&image(h), 256 * MIB, "", Some(&vec![0; 0x10_0001])).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InitrdTooBig {
                    size: 0x10_0001,
                    free: 0x10_0000,
                    limit: 0x130_0000
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let mut h = header();
        h.setup_sects = 0;
        let (mem, _) = try_load(h, 64 * MIB).unwrap();
        let mut got = vec![0u8; PAYLOAD_LEN];
        mem.read_slice(&mut got, GuestAddress(MIB)).unwrap();
        assert_eq!(got, payload());
    }

    #[test]
    fn non_relocatable_goes_to_pref_address() {
        let mut h = header();
        h.relocatable_kernel = 0;
        h.pref_address = 0x200_0000;
        let (mem, l) = try_load(h, 64 * MIB).unwrap();
        assert_eq!(l.kernel_range, (0x200_0000, 0x220_0000));
        assert_eq!(l.entry.rip, 0x200_0200);
        let mut got = vec![0u8; PAYLOAD_LEN];
        mem.read_slice(&mut got, GuestAddress(0x200_0000)).unwrap();
        assert_eq!(got, payload());

        h.pref_address = 0x8_0000;
        assert!(matches!(
            try_load(h, 64 * MIB),
            Err(Error::KernelOverlapsLowMemory(0x8_0000))
        ));
    }

    #[test]
    fn kernel_must_fit_in_low_ram() {
        assert!(matches!(
            try_load(header(), 16 * MIB),
            Err(Error::KernelDoesNotFit {
                start: MIB,
                end: 0x120_0000,
                ram_end: 0x100_0000
            })
        ));
        let mut h = header();
        h.init_size = u32::MAX;
        h.pref_address = u64::MAX - 10;
        let e = try_load(h, 64 * MIB).unwrap_err();
        assert!(
            matches!(e, Error::KernelDoesNotFit { end: u64::MAX, .. }),
            "{e}"
        );
        h.relocatable_kernel = 0;
        let e = try_load(h, 64 * MIB).unwrap_err();
        assert!(matches!(e, Error::KernelDoesNotFit { .. }), "{e}");
    }

    #[test]
    fn header_errors() {
        let ram = 64 * MIB;
        let mut h = header();
        h.version = 0x0205;
        let e = try_load(h, ram).unwrap_err();
        assert!(matches!(e, Error::ProtocolTooOld(0x0205)), "{e}");
        assert!(e.to_string().contains("2.05"), "{e}");

        let mut h = header();
        h.loadflags = 0;
        assert!(matches!(try_load(h, ram), Err(Error::NotLoadedHigh)));

        let mut h = header();
        h.xloadflags = 0;
        assert!(matches!(
            try_load(h, ram),
            Err(Error::Not64Bit {
                version: 0x20f,
                xloadflags: 0
            })
        ));
        let mut h = header();
        h.version = 0x020b;
        assert!(matches!(
            try_load(h, ram),
            Err(Error::Not64Bit { version: 0x20b, .. })
        ));

        let mut h = header();
        h.kernel_alignment = 0x30_0000;
        assert!(matches!(
            try_load(h, ram),
            Err(Error::BadKernelAlignment(0x30_0000))
        ));
        h.kernel_alignment = 0;
        assert!(matches!(
            try_load(h, ram),
            Err(Error::BadKernelAlignment(0))
        ));

        let mut h = header();
        h.jump = 0x50eb; // header would end at 0x252, before pref_address and init_size
        assert!(matches!(try_load(h, ram), Err(Error::BadSetupHeader(_))));

        let mut bytes = image(header());
        bytes[0x202] = b'X';
        assert!(matches!(
            try_load_bytes(&bytes, ram, "", None),
            Err(Error::BadMagic(_))
        ));
    }

    #[test]
    fn truncated_files() {
        let full = image(header());
        // Boot sector only.
        let e = try_load_bytes(&full[..0x200], 64 * MIB, "", None).unwrap_err();
        assert!(
            matches!(e, Error::TruncatedHeader { len: 0x200, .. }),
            "{e}"
        );
        // Header cut short of where its jump says it ends.
        let e = try_load_bytes(&full[..0x250], 64 * MIB, "", None).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TruncatedHeader {
                    len: 0x250,
                    need: 0x26c,
                    ..
                }
            ),
            "{e}"
        );
        // Setup sectors but no protected-mode kernel.
        let e = try_load_bytes(&full[..0x400], 64 * MIB, "", None).unwrap_err();
        assert!(
            matches!(e, Error::NoProtectedModeKernel { setup_end: 0x400 }),
            "{e}"
        );
    }

    #[test]
    fn cmdline_bounded_by_cmdline_size() {
        let mut h = header();
        h.cmdline_size = 10;
        let ok = try_load_bytes(&image(h), 64 * MIB, "0123456789", None);
        assert!(ok.is_ok());
        let e = try_load_bytes(&image(h), 64 * MIB, "0123456789a", None).unwrap_err();
        assert!(
            matches!(e, Error::CmdlineTooLong { len: 11, max: 10 }),
            "{e}"
        );
    }

    #[test]
    fn missing_initrd_names_path() {
        let k = tmpfile("bzimage", &image(header()));
        let mem = guest(64 * MIB);
        let p = Path::new("/nonexistent/initrd.img");
        let e = load_kernel(&mem, &cfg(&k, Some(p), "", 64 * MIB)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/initrd.img"), "{e}");
        std::fs::remove_file(k).unwrap();
    }

    #[test]
    fn debian_bzimage() {
        let Some(k) = debian_kernel("vmlinuz") else {
            return;
        };
        let ram = 512 * MIB;
        let mem = guest(ram);
        let initrd = tmpfile("initrd", &[0x42; 10_000]);
        let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr";
        let l = load_kernel(&mem, &cfg(&k, Some(&initrd), cmdline, ram)).unwrap();
        std::fs::remove_file(&initrd).unwrap();
        assert_eq!(l.format, KernelFormat::BzImage);
        assert_eq!(l.entry.rip, 0x10_0200);
        let bp = zero_page(&mem);
        let h = bp.hdr;
        assert!({ h.version } >= 0x020c);
        assert_eq!({ h.header }, HDRS_MAGIC);
        assert_eq!({ h.type_of_loader }, 0xff);
        // Runtime start is LOAD_PHYSICAL_ADDR (16 MiB) for Debian; init_size counts from there.
        assert_eq!(
            l.kernel_range.1,
            { h.pref_address }.max(MIB) + u64::from(h.init_size)
        );
        let (is, ie) = l.initrd_range.unwrap();
        assert!(is >= l.kernel_range.1 && ie <= ram.min(u64::from(h.initrd_addr_max) + 1));
        let mut cl = vec![0u8; cmdline.len() + 1];
        mem.read_slice(&mut cl, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cl[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(cl[cmdline.len()], 0);
    }
}
