//! What the loader handed us: Linux boot_params (bzImage) or hvm_start_info (PVH).

use core::ptr;

pub const MAX_E820: usize = 128;
/// Cmdline bytes we look at; the header promises cmdline_size 2047 (+ NUL).
const MAX_CMDLINE: usize = 4096;
pub const PVH_MAGIC: u32 = 0x336e_c578;

#[derive(Clone, Copy)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub typ: u32,
}

/// The memory map lives here, not in BootInfo: 3 KiB copied around would cost stack and
/// (emulated, slow) instructions.
static mut E820_MAP: [E820; MAX_E820] = [E820 {
    addr: 0,
    size: 0,
    typ: 0,
}; MAX_E820];

pub struct BootInfo {
    pub cmdline: &'static [u8],
    /// The cmdline had no NUL within the bytes we looked at.
    pub cmdline_unterminated: bool,
    e820_len: usize,
    /// (address, size)
    pub initrd: Option<(u64, u64)>,
    pub rsdp: u64,
    /// Problems with the structure itself, reported as FAIL lines.
    pub problems: [Option<&'static str>; 4],
}

/// Reads guest-physical memory: everything we read lies in the identity-mapped first 4 GiB.
fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: the loader gave us this address; the boot protocols promise it is identity
    // mapped (bzImage) or we mapped the first 4 GiB ourselves (32-bit entries). A bad address
    // faults into our IDT, which reports it.
    unsafe { ptr::read_unaligned(addr as usize as *const T) }
}

fn cstr(addr: u64) -> (&'static [u8], bool) {
    if addr == 0 {
        return (&[], false);
    }
    let mut n = 0;
    while n < MAX_CMDLINE && rd::<u8>(addr + n as u64) != 0 {
        n += 1;
    }
    // SAFETY: the `n` bytes at `addr` were just read; guest memory is never freed.
    let s = unsafe { core::slice::from_raw_parts(addr as usize as *const u8, n) };
    (s, n == MAX_CMDLINE)
}

impl BootInfo {
    fn empty() -> Self {
        BootInfo {
            cmdline: &[],
            cmdline_unterminated: false,
            e820_len: 0,
            initrd: None,
            rsdp: 0,
            problems: [None; 4],
        }
    }

    fn problem(&mut self, what: &'static str) {
        if let Some(slot) = self.problems.iter_mut().find(|p| p.is_none()) {
            *slot = Some(what);
        }
    }

    /// Linux boot_params ("zero page"), offsets from Documentation/arch/x86/zero-page.rst.
    pub fn from_boot_params(bp: u64) -> Self {
        let mut bi = Self::empty();
        if bp == 0 {
            bi.problem("boot_params pointer is 0");
            return bi;
        }
        if rd::<u16>(bp + 0x1fe) != 0xaa55 || rd::<[u8; 4]>(bp + 0x202) != *b"HdrS" {
            bi.problem("boot_params.hdr: no boot_flag 0xAA55 / HdrS (setup header not copied)");
        }
        let n = rd::<u8>(bp + 0x1e8) as usize;
        if n > MAX_E820 {
            bi.problem("boot_params.e820_entries > 128");
        }
        bi.e820_len = n.min(MAX_E820);
        for i in 0..bi.e820_len {
            let e = bp + 0x2d0 + 20 * i as u64;
            bi.set_e820(
                i,
                E820 {
                    addr: rd(e),
                    size: rd(e + 8),
                    typ: rd(e + 16),
                },
            );
        }
        let cmd = rd::<u32>(bp + 0x228) as u64 | (rd::<u32>(bp + 0xc8) as u64) << 32;
        (bi.cmdline, bi.cmdline_unterminated) = cstr(cmd);
        let rd_addr = rd::<u32>(bp + 0x218) as u64 | (rd::<u32>(bp + 0xc0) as u64) << 32;
        let rd_size = rd::<u32>(bp + 0x21c) as u64 | (rd::<u32>(bp + 0xc4) as u64) << 32;
        if rd_addr != 0 || rd_size != 0 {
            bi.initrd = Some((rd_addr, rd_size));
        }
        bi.rsdp = rd(bp + 0x70);
        bi
    }

    /// PVH hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
    pub fn from_start_info(si: u64) -> Self {
        let mut bi = Self::empty();
        if si == 0 || rd::<u32>(si) != PVH_MAGIC {
            bi.problem("hvm_start_info.magic != 0x336ec578");
            return bi;
        }
        let version = rd::<u32>(si + 4);
        let nr_modules = rd::<u32>(si + 12);
        let modlist = rd::<u64>(si + 16);
        (bi.cmdline, bi.cmdline_unterminated) = cstr(rd(si + 24));
        bi.rsdp = rd(si + 32);
        if nr_modules > 0 && modlist != 0 {
            bi.initrd = Some((rd(modlist), rd(modlist + 8)));
        }
        if version >= 1 {
            let map = rd::<u64>(si + 40);
            let n = rd::<u32>(si + 48) as usize;
            if n > MAX_E820 {
                bi.problem("hvm_start_info.memmap_entries > 128");
            }
            bi.e820_len = n.min(MAX_E820);
            for i in 0..bi.e820_len {
                let e = map + 24 * i as u64;
                bi.set_e820(
                    i,
                    E820 {
                        addr: rd(e),
                        size: rd(e + 8),
                        typ: rd(e + 16),
                    },
                );
            }
        } else {
            bi.problem("hvm_start_info.version 0: no memory map");
        }
        bi
    }

    fn set_e820(&mut self, i: usize, e: E820) {
        // SAFETY: single CPU; the map is written before any reader slices it.
        unsafe { (*ptr::addr_of_mut!(E820_MAP))[i] = e };
    }

    pub fn e820(&self) -> &[E820] {
        // SAFETY: written only by `set_e820`, during parsing, before this is called.
        unsafe {
            core::slice::from_raw_parts(ptr::addr_of!(E820_MAP).cast::<E820>(), self.e820_len)
        }
    }

    /// Is [start, end) inside one usable-RAM (type 1) entry?
    pub fn in_ram(&self, start: u64, end: u64) -> bool {
        self.e820()
            .iter()
            .any(|e| e.typ == 1 && e.addr <= start && end <= e.addr.saturating_add(e.size))
    }
}

/// FNV-1a, 64 bit: the initrd's fingerprint in the report (rhyve-tests computes the same).
/// Every guest instruction is emulated on this machine's KVM (~1 µs each), so this reads
/// 8 bytes per load and keeps the per-byte work to xor + multiply.
pub fn fnv1a64(addr: u64, len: u64) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut p = addr;
    let end = addr + len;
    while end - p >= 8 {
        let mut w = rd::<u64>(p);
        // Unrolled by hand: opt-level "s" keeps a loop here, doubling the instructions.
        macro_rules! byte {
            () => {
                h = (h ^ (w & 0xff)).wrapping_mul(PRIME);
                w >>= 8;
            };
        }
        byte!();
        byte!();
        byte!();
        byte!();
        byte!();
        byte!();
        byte!();
        byte!();
        let _ = w;
        p += 8;
    }
    while p < end {
        h = (h ^ rd::<u8>(p) as u64).wrapping_mul(PRIME);
        p += 1;
    }
    h
}
