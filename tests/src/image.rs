//! Packaging the test guest's ELF into boot images, in plain Rust (no objcopy).
//!
//! Used by build.rs (included with `#[path]`) and exported by the library so tests can inspect
//! images. The ELF comes from guests/testguest: one PT_LOAD at 0x100000 with `startup_32` at
//! offset 0 and `startup_64` at 0x200, plus a non-allocated `.rhyve.setup` section holding the
//! real-mode setup sectors with the setup header at 0x1f1.

use std::fmt;

/// Where the payload is linked and must be loaded (relocatable_kernel = 0).
pub const LOAD_ADDR: u64 = 0x10_0000;

#[derive(Debug)]
pub struct ImageError(pub String);

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ImageError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ImageError> {
    Err(ImageError(msg.into()))
}

fn bytes<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], ImageError> {
    match off.checked_add(N).and_then(|end| b.get(off..end)) {
        Some(s) => Ok(s.try_into().expect("slice has length N")),
        None => err(format!("ELF truncated: {N} bytes at {off:#x}")),
    }
}
fn u16_at(b: &[u8], off: usize) -> Result<u16, ImageError> {
    bytes(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize) -> Result<u32, ImageError> {
    bytes(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Result<u64, ImageError> {
    bytes(b, off).map(u64::from_le_bytes)
}
fn range(b: &[u8], off: u64, len: u64) -> Result<&[u8], ImageError> {
    let r = usize::try_from(off)
        .ok()
        .zip(usize::try_from(len).ok())
        .and_then(|(o, l)| b.get(o..o.checked_add(l)?));
    r.ok_or_else(|| ImageError(format!("ELF truncated: {len:#x} bytes at {off:#x}")))
}

/// The parts of a little-endian ELF64 executable the packager needs.
pub struct Elf<'a> {
    data: &'a [u8],
    /// (p_paddr, file bytes, p_memsz) of each PT_LOAD.
    pub loads: Vec<(u64, &'a [u8], u64)>,
    sections: Vec<(String, u32, u64, u64, u32)>, // name, type, offset, size, link
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ImageError> {
        if data.get(..6) != Some(b"\x7fELF\x02\x01") {
            return err("not a little-endian ELF64 file");
        }
        let phoff = u64_at(data, 0x20)?;
        let shoff = u64_at(data, 0x28)?;
        let (phentsize, phnum) = (u16_at(data, 0x36)? as u64, u16_at(data, 0x38)? as u64);
        let (shentsize, shnum) = (u16_at(data, 0x3a)? as u64, u16_at(data, 0x3c)? as u64);
        let shstrndx = u16_at(data, 0x3e)? as u64;
        let mut loads = Vec::new();
        for i in 0..phnum {
            let ph = range(data, phoff + i * phentsize, 56)?;
            if u32_at(ph, 0)? == 1 {
                let (off, paddr) = (u64_at(ph, 8)?, u64_at(ph, 24)?);
                let (filesz, memsz) = (u64_at(ph, 32)?, u64_at(ph, 40)?);
                loads.push((paddr, range(data, off, filesz)?, memsz));
            }
        }
        let mut raw = Vec::new();
        for i in 0..shnum {
            let sh = range(data, shoff + i * shentsize, 64)?;
            let (name, typ, link) = (u32_at(sh, 0)?, u32_at(sh, 4)?, u32_at(sh, 40)?);
            raw.push((name, typ, u64_at(sh, 24)?, u64_at(sh, 32)?, link));
        }
        let Some(&(_, _, stroff, strsize, _)) = raw.get(shstrndx as usize) else {
            return err("ELF has no section name table");
        };
        let strtab = range(data, stroff, strsize)?;
        let sections = raw
            .into_iter()
            .map(|(name, typ, off, size, link)| (cstr(strtab, name as usize), typ, off, size, link))
            .collect();
        Ok(Elf {
            data,
            loads,
            sections,
        })
    }

    pub fn section(&self, name: &str) -> Option<&'a [u8]> {
        let s = self.sections.iter().find(|s| s.0 == name)?;
        range(self.data, s.2, s.3).ok()
    }

    /// Value of a symbol from .symtab.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        const SHT_SYMTAB: u32 = 2;
        let symtab = self.sections.iter().find(|s| s.1 == SHT_SYMTAB)?;
        let strs = self.sections.get(symtab.4 as usize)?;
        let strs = range(self.data, strs.2, strs.3).ok()?;
        let syms = range(self.data, symtab.2, symtab.3).ok()?;
        syms.chunks_exact(24).find_map(|s| {
            let n = u32::from_le_bytes(s[0..4].try_into().ok()?) as usize;
            (cstr(strs, n) == name).then(|| u64::from_le_bytes(s[8..16].try_into().unwrap()))
        })
    }
}

fn cstr(tab: &[u8], off: usize) -> String {
    let s = tab.get(off..).unwrap_or_default();
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..end]).into_owned()
}

/// Build a bzImage: the setup sectors (header patched) followed by the flat payload.
pub fn bzimage(elf_bytes: &[u8]) -> Result<Vec<u8>, ImageError> {
    let elf = Elf::parse(elf_bytes)?;
    let sym = |n: &str| {
        elf.symbol(n)
            .ok_or_else(|| ImageError(format!("no symbol {n}")))
    };
    if sym("startup_32")? != LOAD_ADDR || sym("startup_64")? != LOAD_ADDR + 0x200 {
        return err("startup_32/startup_64 must be at 0x100000/0x100200");
    }
    let Some(setup) = elf.section(".rhyve.setup") else {
        return err("no .rhyve.setup section");
    };
    if setup.len() < 1024 || setup.len() % 512 != 0 || setup.len() > 0x8000 {
        return err(format!(
            "setup is {:#x} bytes: want 2..=64 sectors",
            setup.len()
        ));
    }
    if setup.get(0x202..0x206) != Some(b"HdrS") || setup[0x1fe..0x200] != [0x55, 0xaa] {
        return err("setup header magic missing at 0x1fe/0x202");
    }

    // Flatten the PT_LOADs from LOAD_ADDR; .bss stays out (init_size covers it).
    let mut payload = Vec::new();
    let mut mem_end = LOAD_ADDR;
    for &(paddr, data, memsz) in &elf.loads {
        let Some(off) = paddr.checked_sub(LOAD_ADDR) else {
            return err(format!("PT_LOAD at {paddr:#x} below {LOAD_ADDR:#x}"));
        };
        let off = off as usize;
        if payload.len() < off + data.len() {
            payload.resize(off + data.len(), 0);
        }
        payload[off..off + data.len()].copy_from_slice(data);
        mem_end = mem_end.max(paddr + memsz);
    }
    payload.resize(payload.len().next_multiple_of(16), 0);
    let init_size = (mem_end - LOAD_ADDR).next_multiple_of(4096);
    let kernel_info = sym("kernel_info")? - LOAD_ADDR;

    let mut img = setup.to_vec();
    img[0x1f1] = (setup.len() / 512 - 1) as u8;
    img[0x1f4..0x1f8].copy_from_slice(&((payload.len() / 16) as u32).to_le_bytes());
    img[0x260..0x264].copy_from_slice(&(init_size as u32).to_le_bytes());
    img[0x268..0x26c].copy_from_slice(&(kernel_info as u32).to_le_bytes());
    img.extend_from_slice(&payload);
    Ok(img)
}

/// The PVH image is the ELF itself; this checks it carries XEN_ELFNOTE_PHYS32_ENTRY.
pub fn pvh_entry(elf_bytes: &[u8]) -> Result<u32, ImageError> {
    let elf = Elf::parse(elf_bytes)?;
    let Some(note) = elf.section(".note.Xen") else {
        return err("no .note.Xen section");
    };
    // namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry
    if note.len() < 20 || note[..16] != *b"\x04\0\0\0\x04\0\0\0\x12\0\0\0Xen\0" {
        return err("malformed PVH note");
    }
    u32_at(note, 16)
}

/// FNV-1a 64: the guest reports `fnv1a64=` of the initrd it received.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Deterministic initrd contents: `len` bytes from an xorshift64 stream seeded by `seed`.
pub fn initrd_fixture(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect()
}
