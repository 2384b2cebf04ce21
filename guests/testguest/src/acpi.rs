//! `rhyve.test=acpi`: find the RSDP, check every table's checksum, list the tables, and
//! report the MADT's local APICs and the MCFG's ECAM base. `smp.rs` uses the same walk (quietly)
//! to learn which APs to start.

use crate::fail;
use crate::io::{line, P};

/// Most local APICs we record (8-bit xAPIC IDs).
pub const MAX_CPUS: usize = 256;

/// What the walk found.
pub struct Tables {
    pub rsdp: u64,
    /// Enabled local APIC IDs from the MADT, in table order (the first is the BSP's).
    pub apic_ids: [u32; MAX_CPUS],
    pub nr_cpus: usize,
    pub madt: bool,
    /// ECAM base of segment 0 from the MCFG.
    pub mcfg_base: Option<u64>,
    pub bad_checksums: u32,
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: ACPI tables live below 4 GiB in the identity map (a bad pointer faults into our
    // IDT, which reports it).
    unsafe { core::ptr::read_unaligned(addr as usize as *const T) }
}

fn sum(addr: u64, len: u64) -> u8 {
    // SAFETY: as for `rd`.
    let b = unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len as usize) };
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

fn sig(addr: u64) -> [u8; 4] {
    rd(addr)
}

/// Scan the BIOS area for "RSD PTR " on 16-byte boundaries (valid first-20-byte checksum).
fn scan() -> u64 {
    let mut a = 0xE0000u64;
    while a < 0x10_0000 {
        if rd::<[u8; 8]>(a) == *b"RSD PTR " && sum(a, 20) == 0 {
            return a;
        }
        a += 16;
    }
    0
}

/// Walks RSDP → XSDT (or RSDT) → tables, checking every checksum. With `verbose`, prints a
/// line per table; FAIL lines are printed either way.
pub fn walk(boot_rsdp: u64, verbose: bool) -> Tables {
    let mut t = Tables {
        rsdp: 0,
        apic_ids: [0; MAX_CPUS],
        nr_cpus: 0,
        madt: false,
        mcfg_base: None,
        bad_checksums: 0,
    };
    let (rsdp, how) = if boot_rsdp != 0 {
        (boot_rsdp, "boot")
    } else {
        (scan(), "scan")
    };
    if rsdp == 0 {
        fail(&[P::S(
            "acpi: no RSDP (none from the loader, none in 0xE0000-0xFFFFF)",
        )]);
        return t;
    }
    t.rsdp = rsdp;
    if rd::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        fail(&[P::S("acpi: no RSDP signature at "), P::X(rsdp)]);
        return t;
    }
    let rev: u8 = rd(rsdp + 15);
    let mut ok = sum(rsdp, 20) == 0;
    if rev >= 2 {
        let len = rd::<u32>(rsdp + 20) as u64;
        ok &= (36..=4096).contains(&len) && sum(rsdp, len) == 0;
    }
    if verbose {
        line(&[
            P::S("acpi rsdp addr="),
            P::X(rsdp),
            P::S(" from="),
            P::S(how),
            P::S(" rev="),
            P::D(rev as u64),
            P::S(" oem="),
            P::B(&rd::<[u8; 6]>(rsdp + 9)),
            P::S(if ok { " checksum=ok" } else { " checksum=bad" }),
        ]);
    }
    if !ok {
        t.bad_checksums += 1;
        fail(&[P::S("acpi: RSDP checksum")]);
    }
    let (root, entry_size) = if rev >= 2 && rd::<u64>(rsdp + 24) != 0 {
        (rd::<u64>(rsdp + 24), 8)
    } else {
        (rd::<u32>(rsdp + 16) as u64, 4)
    };
    let Some(root_len) = table(&mut t, root, verbose) else {
        return t;
    };
    let n = (root_len - 36) / entry_size;
    for i in 0..n {
        let e = root + 36 + i * entry_size;
        let addr = if entry_size == 8 {
            rd::<u64>(e)
        } else {
            rd::<u32>(e) as u64
        };
        let Some(len) = table(&mut t, addr, verbose) else {
            continue;
        };
        match &sig(addr) {
            b"FACP" => fadt(&mut t, addr, len, verbose),
            b"APIC" => madt(&mut t, addr, len),
            b"MCFG" if len >= 44 + 16 => t.mcfg_base = Some(rd::<u64>(addr + 44)),
            _ => {}
        }
    }
    t
}

/// Checks one SDT's length and checksum; prints `acpi table SIG len=N`.
fn table(t: &mut Tables, addr: u64, verbose: bool) -> Option<u64> {
    if addr == 0 || addr >= 1 << 32 {
        fail(&[P::S("acpi: table pointer out of range: "), P::X(addr)]);
        return None;
    }
    let len = rd::<u32>(addr + 4) as u64;
    let s = sig(addr);
    if !(36..=1 << 20).contains(&len) {
        fail(&[
            P::S("acpi: table "),
            P::B(&s),
            P::S(" bad length "),
            P::D(len),
        ]);
        return None;
    }
    let ok = sum(addr, len) == 0;
    if verbose {
        line(&[
            P::S("acpi table "),
            P::B(&s),
            P::S(" len="),
            P::D(len),
            P::S(" addr="),
            P::X(addr),
            P::S(if ok { " checksum=ok" } else { " checksum=bad" }),
        ]);
    }
    if !ok {
        t.bad_checksums += 1;
        fail(&[
            P::S("acpi: checksum of "),
            P::B(&s),
            P::S(" at "),
            P::X(addr),
        ]);
    }
    Some(len)
}

/// The FADT's DSDT (X_DSDT when set) and FACS (no checksum: signature and length only).
fn fadt(t: &mut Tables, addr: u64, len: u64, verbose: bool) {
    let x_dsdt = if len >= 148 { rd::<u64>(addr + 140) } else { 0 };
    let dsdt = if x_dsdt != 0 {
        x_dsdt
    } else {
        rd::<u32>(addr + 40) as u64
    };
    if dsdt != 0 {
        if sig(dsdt) != *b"DSDT" {
            fail(&[P::S("acpi: FADT's DSDT pointer has no DSDT signature")]);
        } else {
            table(t, dsdt, verbose);
        }
    }
    let facs = rd::<u32>(addr + 36) as u64;
    if facs != 0 {
        let flen = rd::<u32>(facs + 4);
        if sig(facs) != *b"FACS" || flen < 64 {
            fail(&[P::S("acpi: bad FACS at "), P::X(facs)]);
        } else if verbose {
            line(&[
                P::S("acpi table FACS len="),
                P::D(flen as u64),
                P::S(" addr="),
                P::X(facs),
            ]);
        }
    }
}

/// Local APIC (type 0) and x2APIC (type 9) entries that are enabled (or online capable).
fn madt(t: &mut Tables, addr: u64, len: u64) {
    t.madt = true;
    let mut off = 44;
    while off + 2 <= len {
        let (typ, elen) = (rd::<u8>(addr + off), rd::<u8>(addr + off + 1) as u64);
        if elen < 2 || off + elen > len {
            fail(&[
                P::S("acpi: MADT entry with bad length at offset "),
                P::D(off),
            ]);
            return;
        }
        let id = match typ {
            0 if elen >= 8 && rd::<u32>(addr + off + 4) & 3 != 0 => {
                Some(rd::<u8>(addr + off + 3) as u32)
            }
            9 if elen >= 16 && rd::<u32>(addr + off + 8) & 3 != 0 => {
                Some(rd::<u32>(addr + off + 4))
            }
            _ => None,
        };
        if let Some(id) = id {
            if t.nr_cpus < MAX_CPUS {
                t.apic_ids[t.nr_cpus] = id;
                t.nr_cpus += 1;
            }
        }
        off += elen;
    }
}

/// `rhyve.test=acpi`.
pub fn test(boot_rsdp: u64) {
    let t = walk(boot_rsdp, true);
    if !t.madt {
        fail(&[P::S("acpi: no MADT")]);
    } else {
        print_madt(&t);
    }
    match t.mcfg_base {
        Some(b) => line(&[P::S("acpi mcfg base="), P::X(b)]),
        None => line(&[P::S("acpi mcfg none")]),
    }
    line(&[P::S("acpi bad_checksums="), P::D(t.bad_checksums as u64)]);
}

pub fn print_madt(t: &Tables) {
    crate::io::put(&P::S("rhyve-guest: acpi madt cpus="));
    crate::io::put(&P::D(t.nr_cpus as u64));
    crate::io::put(&P::S(" apic_ids="));
    for (i, id) in t.apic_ids[..t.nr_cpus].iter().enumerate() {
        if i > 0 {
            crate::io::putc(b',');
        }
        crate::io::put(&P::D(*id as u64));
    }
    crate::io::putc(b'\n');
}
