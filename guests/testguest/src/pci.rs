//! PCI configuration space on bus 0 and `rhyve.test=pci`.
//!
//! Written from the specifications, not from rhyve's device code:
//! - PCI Local Bus Specification 3.0 (PCI LB): §3.2.2.3.2 configuration mechanism #1 (CONFIG_ADDRESS
//!   at 0xCF8, CONFIG_DATA at 0xCFC..0xCFF), §6.1 the type 0/1 header, §6.2.5.1 sizing a BAR,
//!   §6.7 the capabilities list.
//! - PCI Express Base Specification 4.0 (PCIe): §7.2.2 ECAM (4 KiB of config space per function
//!   at base + bus<<20 | device<<15 | function<<12).

use crate::fail;
use crate::io::{self, line, P};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Command register (PCI LB §6.2.2) bits.
pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEM: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Status register: a capabilities list exists (PCI LB §6.2.3).
const STATUS_CAP_LIST: u16 = 1 << 4;

/// A function on bus 0.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    /// `00:SS.F`, as lspci prints it.
    pub fn show(self, out: &mut [u8; 7]) -> &[u8] {
        let h = |v: u8| if v < 10 { b'0' + v } else { b'a' + v - 10 };
        *out = [
            b'0',
            b'0',
            b':',
            h(self.dev >> 4),
            h(self.dev & 15),
            b'.',
            b'0' + self.func,
        ];
        out
    }
}

/// How configuration space is reached.
#[derive(Clone, Copy)]
pub enum Cfg {
    /// Mechanism #1: a dword address to 0xCF8 (bit 31 enable, bus 23:16, device 15:11,
    /// function 10:8, register 7:2), then a 1/2/4-byte access at 0xCFC + (offset & 3).
    Ports,
    /// ECAM (PCIe §7.2.2) at this base; identity-mapped (below 4 GiB).
    Ecam(u64),
}

impl Cfg {
    fn select(f: Bdf, off: u16) -> u16 {
        let a = 1u32 << 31 | (f.dev as u32) << 11 | (f.func as u32) << 8 | (off as u32 & 0xfc);
        io::outl(CONFIG_ADDRESS, a);
        CONFIG_DATA + (off & 3)
    }

    fn ecam(base: u64, f: Bdf, off: u16) -> u64 {
        base + ((f.dev as u64) << 15 | (f.func as u64) << 12 | off as u64)
    }

    pub fn r32(self, f: Bdf, off: u16) -> u32 {
        match self {
            Cfg::Ports => io::inl(Self::select(f, off)),
            Cfg::Ecam(b) => io::mmio_read(Self::ecam(b, f, off)),
        }
    }

    pub fn r16(self, f: Bdf, off: u16) -> u16 {
        match self {
            Cfg::Ports => io::inw(Self::select(f, off)),
            Cfg::Ecam(b) => io::mmio_read(Self::ecam(b, f, off)),
        }
    }

    pub fn r8(self, f: Bdf, off: u16) -> u8 {
        match self {
            Cfg::Ports => io::inb(Self::select(f, off)),
            Cfg::Ecam(b) => io::mmio_read(Self::ecam(b, f, off)),
        }
    }

    pub fn w32(self, f: Bdf, off: u16, v: u32) {
        match self {
            Cfg::Ports => io::outl(Self::select(f, off), v),
            Cfg::Ecam(b) => io::mmio_write(Self::ecam(b, f, off), v),
        }
    }

    pub fn w16(self, f: Bdf, off: u16, v: u16) {
        match self {
            Cfg::Ports => io::outw(Self::select(f, off), v),
            Cfg::Ecam(b) => io::mmio_write(Self::ecam(b, f, off), v),
        }
    }

    pub fn w8(self, f: Bdf, off: u16, v: u8) {
        match self {
            Cfg::Ports => io::outb(Self::select(f, off), v),
            Cfg::Ecam(b) => io::mmio_write(Self::ecam(b, f, off), v),
        }
    }
}

/// Calls `each` for every function on bus 0: function 0 of every device whose vendor ID is not
/// 0xFFFF, and functions 1..7 when header type bit 7 (multi-function) is set (PCI LB §6.2.1).
pub fn for_each_function(cfg: Cfg, mut each: impl FnMut(Bdf)) {
    for dev in 0..32 {
        let f0 = Bdf { dev, func: 0 };
        if cfg.r16(f0, 0) == 0xffff {
            continue;
        }
        let funcs = if cfg.r8(f0, 0x0e) & 0x80 != 0 { 8 } else { 1 };
        for func in 0..funcs {
            let f = Bdf { dev, func };
            if cfg.r16(f, 0) != 0xffff {
                each(f);
            }
        }
    }
}

/// First function with this vendor ID and one of these device IDs.
pub fn find(cfg: Cfg, vendor: u16, devices: &[u16]) -> Option<Bdf> {
    let mut found = None;
    for_each_function(cfg, |f| {
        let id = cfg.r32(f, 0);
        if found.is_none() && id as u16 == vendor && devices.contains(&((id >> 16) as u16)) {
            found = Some(f);
        }
    });
    found
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Io,
    Mem32,
    Mem64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub kind: Kind,
    pub size: u64,
    pub addr: u64,
}

/// Sizes BARs 0..5 (type 0 header) or 0..1 (type 1), PCI LB §6.2.5.1: decoding off, write
/// all-ones, read back, restore. The size is the lowest writable address bit. A 64-bit memory
/// BAR (type bits 2:1 = 10b) takes the next slot too, which then stays `None`.
pub fn bars(cfg: Cfg, f: Bdf) -> [Option<Bar>; 6] {
    let n = match cfg.r8(f, 0x0e) & 0x7f {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    let mut out = [None; 6];
    let cmd = cfg.r16(f, 0x04);
    cfg.w16(f, 0x04, cmd & !(CMD_IO | CMD_MEM));
    let probe = |off: u16| {
        let orig = cfg.r32(f, off);
        cfg.w32(f, off, !0);
        let mask = cfg.r32(f, off);
        cfg.w32(f, off, orig);
        (orig, mask)
    };
    let mut i = 0;
    while i < n {
        let off = 0x10 + 4 * i as u16;
        let (lo, lo_mask) = probe(off);
        let bar = if lo & 1 != 0 {
            // I/O: bits 1:0 are flags; a 16-bit decoder reads 0 in bits 31:16.
            let m = (lo_mask & !3) as u64;
            (Kind::Io, (lo & !3) as u64, m)
        } else if lo & 6 == 4 && i + 1 < n {
            let (hi, hi_mask) = probe(off + 4);
            let m = (hi_mask as u64) << 32 | (lo_mask & !0xf) as u64;
            i += 1;
            (Kind::Mem64, (hi as u64) << 32 | (lo & !0xf) as u64, m)
        } else {
            (Kind::Mem32, (lo & !0xf) as u64, (lo_mask & !0xf) as u64)
        };
        let (kind, addr, m) = bar;
        if m != 0 {
            let slot = if kind == Kind::Mem64 { i - 1 } else { i };
            out[slot] = Some(Bar {
                kind,
                size: m & m.wrapping_neg(),
                addr,
            });
        }
        i += 1;
    }
    cfg.w16(f, 0x04, cmd);
    out
}

/// Calls `each(id, offset)` for every entry of the capabilities list (PCI LB §6.7); at most 48
/// entries (the most that fit in 192 bytes), so a looping list cannot hang us.
pub fn for_each_cap(cfg: Cfg, f: Bdf, mut each: impl FnMut(u8, u8)) {
    if cfg.r16(f, 0x06) & STATUS_CAP_LIST == 0 {
        return;
    }
    let ptr_reg = if cfg.r8(f, 0x0e) & 0x7f == 2 {
        0x14
    } else {
        0x34
    };
    let mut ptr = cfg.r8(f, ptr_reg) & 0xfc;
    for _ in 0..48 {
        if ptr < 0x40 {
            return;
        }
        let (id, next) = (cfg.r8(f, ptr as u16), cfg.r8(f, ptr as u16 + 1));
        each(id, ptr);
        ptr = next & 0xfc;
    }
    fail(&[P::S("pci capability list does not end")]);
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Io => "io",
        Kind::Mem32 => "mem32",
        Kind::Mem64 => "mem64",
    }
}

/// Byte and word reads at every offset of the header must agree with the dword reads (the
/// first difference is reported).
fn check_widths(cfg: Cfg, name: &str, f: Bdf, dw: &[u32; 16]) {
    for (i, &d) in dw.iter().enumerate() {
        let off = 4 * i as u16;
        let words = [cfg.r16(f, off), cfg.r16(f, off + 2)];
        let bytes = [0, 1, 2, 3].map(|k| cfg.r8(f, off + k));
        if words != [d as u16, (d >> 16) as u16] || bytes != d.to_le_bytes() {
            let mut b = [0; 7];
            fail(&[
                P::S("pci "),
                P::S(name),
                P::S(" byte/word reads disagree with the dword at "),
                P::B(f.show(&mut b)),
                P::S(" off="),
                P::X(off as u64),
            ]);
            return;
        }
    }
}

/// `rhyve.test=pci`: enumerate bus 0 through both mechanisms, check they agree, size the BARs
/// and walk the capability lists. `ecam` 0 means "no ECAM" (QEMU's pc machine).
pub fn test(ecam: u64) {
    let ports = Cfg::Ports;
    // CONFIG_ADDRESS is a read/write register (PCI LB §3.2.2.3.2).
    io::outl(CONFIG_ADDRESS, 0x8000_0804);
    let back = io::inl(CONFIG_ADDRESS);
    if back != 0x8000_0804 {
        fail(&[P::S("pci 0xcf8 reads back "), P::X(back as u64)]);
    }
    let ecam = (ecam != 0).then_some(Cfg::Ecam(ecam));
    if ecam.is_none() {
        line(&[P::S("pci ecam none")]);
    }
    // Every device slot through both: presence must agree, not just what mechanism #1 finds.
    if let Some(e) = ecam {
        for dev in 0..32 {
            let f = Bdf { dev, func: 0 };
            let (a, b) = (ports.r32(f, 0), e.r32(f, 0));
            if a != b {
                fail(&[
                    P::S("pci slot "),
                    P::D(dev as u64),
                    P::S(" id: ports "),
                    P::X(a as u64),
                    P::S(" ecam "),
                    P::X(b as u64),
                ]);
            }
        }
    }
    let mut count = 0;
    for_each_function(ports, |f| {
        count += 1;
        let mut name = [0; 7];
        let name = f.show(&mut name);
        // The whole 256-byte space by dwords: ports and ECAM must read the same.
        let mut dw = [0u32; 64];
        for (i, d) in dw.iter_mut().enumerate() {
            *d = ports.r32(f, 4 * i as u16);
        }
        if let Some(e) = ecam {
            // The first difference only: a wrong ECAM base would otherwise print 64 lines.
            for (i, &d) in dw.iter().enumerate() {
                let v = e.r32(f, 4 * i as u16);
                if v != d {
                    fail(&[
                        P::S("pci "),
                        P::B(name),
                        P::S(" off="),
                        P::X(4 * i as u64),
                        P::S(" ports="),
                        P::X(d as u64),
                        P::S(" ecam="),
                        P::X(v as u64),
                    ]);
                    break;
                }
            }
        }
        let hdr: &[u32; 16] = dw[..16].try_into().unwrap();
        check_widths(ports, "ports", f, hdr);
        if let Some(e) = ecam {
            check_widths(e, "ecam", f, hdr);
        }
        line(&[
            P::S("pci "),
            P::B(name),
            P::S(" vendor=0x"),
            P::H(dw[0] as u64 & 0xffff, 4),
            P::S(" device=0x"),
            P::H(dw[0] as u64 >> 16, 4),
            P::S(" class=0x"),
            P::H(dw[2] as u64 >> 8, 6),
            P::S(" hdr=0x"),
            P::H((dw[3] >> 16) as u64 & 0xff, 2),
        ]);
        let sized = bars(ports, f);
        if let Some(e) = ecam {
            // Sizing through ECAM exercises MMIO config writes; the answers must match.
            if bars(e, f) != sized {
                fail(&[P::S("pci "), P::B(name), P::S(" BAR sizes differ via ECAM")]);
            }
        }
        for (i, bar) in sized.iter().enumerate() {
            let Some(bar) = bar else { continue };
            line(&[
                P::S("bar "),
                P::B(name),
                P::S(" "),
                P::D(i as u64),
                P::S(" kind="),
                P::S(kind_name(bar.kind)),
                P::S(" size="),
                P::X(bar.size),
                P::S(" addr="),
                P::X(bar.addr),
            ]);
        }
        // Sizing must leave the BARs as they were.
        for (i, &d) in dw[4..10].iter().enumerate() {
            let now = ports.r32(f, 0x10 + 4 * i as u16);
            if now != d {
                fail(&[
                    P::S("pci "),
                    P::B(name),
                    P::S(" BAR "),
                    P::D(i as u64),
                    P::S(" not restored: "),
                    P::X(now as u64),
                ]);
            }
        }
        for_each_cap(ports, f, |id, off| {
            line(&[
                P::S("cap "),
                P::B(name),
                P::S(" id=0x"),
                P::H(id as u64, 2),
                P::S(" off=0x"),
                P::H(off as u64, 2),
            ]);
        });
    });
    if count == 0 {
        fail(&[P::S("pci no functions on bus 0")]);
    }
    line(&[P::S("pci functions="), P::D(count)]);
}
