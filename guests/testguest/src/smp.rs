//! `rhyve.test=smp`: start every AP the MADT lists with INIT / SIPI / SIPI through the xAPIC
//! ICR, have each print its APIC ID, then read the RTC and check the PM timer.
//!
//! The APs enter a real-mode trampoline copied to [`TRAMP`] (0x70000: usable low RAM, clear of
//! the loader's structures, which end at 0x2ffff; see crates/loader/src/layout.rs). It loads
//! its own GDT (0x08 code32, 0x10 code64, 0x18 data, like asm.rs's 32-bit entry), enables PAE
//! with the BSP's CR3 (both boot paths identity-map 4 GiB, 0x70000 included), sets EFER.LME and
//! paging, takes a ticket with `lock xadd` for its own 1 KiB stack in [`STACKS`], and calls
//! `ap_main`. COM1 lines are serialized with a spin lock (`xchg`).

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::acpi;
use crate::fail;
use crate::io::{self, line, P};

/// Where the trampoline runs (SIPI vector 0x70).
const TRAMP: u64 = 0x70000;
/// Trampoline data slots (offsets fixed by `.org` in the assembly below).
const SLOT_CR3: u64 = 0x140;
const SLOT_STACKS: u64 = 0x148;
const SLOT_ENTRY: u64 = 0x150;
const SLOT_TICKET: u64 = 0x158;
/// AP stacks: 1 KiB each in [0x71000, 0x9f000) (below the EBDA at 0x9fc00).
const STACKS: u64 = 0x71000;
const STACK_SIZE: u64 = 0x400;
const MAX_APS: usize = ((0x9f000 - STACKS) / STACK_SIZE) as usize;

const LAPIC: u64 = 0xFEE0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xF0;
const ICR_LO: u64 = 0x300;
const ICR_HI: u64 = 0x310;
const ICR_BUSY: u32 = 1 << 12;
const ICR_INIT: u32 = 0x4500; // INIT, level assert
const ICR_SIPI: u32 = 0x4600; // start-up, assert; | vector

const PM_TIMER: u16 = 0x408;
const PM_HZ: u64 = 3_579_545;

core::arch::global_asm!(
    r#"
    .set AP_TRAMP, 0x70000
    .pushsection .rodata.ap_tramp, "a", @progbits
    .balign 16
    .globl ap_tramp_start
ap_tramp_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl 0x130
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(AP_TRAMP + ap_pm32 - ap_tramp_start)
    .code32
ap_pm32:
    movl $0x18, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl AP_TRAMP + 0x140, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmp $0x10, $(AP_TRAMP + ap_lm64 - ap_tramp_start)
    .code64
ap_lm64:
    movl $0x18, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $1, %eax
    lock xaddl %eax, AP_TRAMP + 0x158
    incl %eax
    imull $0x400, %eax, %eax
    addq AP_TRAMP + 0x148, %rax
    movq %rax, %rsp
    xorl %ebp, %ebp
    movq AP_TRAMP + 0x150, %rax
    call *%rax
1:  cli
    hlt
    jmp 1b
    .code64

    .org 0x100
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .org 0x130
    .word 0x1f
    .long AP_TRAMP + 0x100
    .org 0x140
    .quad 0, 0, 0, 0
    .globl ap_tramp_end
ap_tramp_end:
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

/// APs that reached `ap_main`.
static UP: AtomicU32 = AtomicU32::new(0);
/// FAIL lines printed by APs.
static AP_FAILS: AtomicU32 = AtomicU32::new(0);
/// Bit per APIC ID (0..255) seen by `ap_main`.
static SEEN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// COM1 lock.
static CONSOLE: AtomicBool = AtomicBool::new(false);
/// The BSP's IDT descriptor (limit, base), for the APs' `lidt`.
static mut IDTR: [u8; 10] = [0; 10];

/// One COM1 line under the spin lock (`xchg`), so AP and BSP lines never interleave.
fn sline(parts: &[P]) {
    while CONSOLE.swap(true, Ordering::Acquire) {
        io::pause();
    }
    line(parts);
    CONSOLE.store(false, Ordering::Release);
}

fn lapic_rd(reg: u64) -> u32 {
    io::mmio_read::<u32>(LAPIC + reg)
}

fn lapic_wr(reg: u64, v: u32) {
    io::mmio_write::<u32>(LAPIC + reg, v)
}

fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    // SAFETY: CPUID is unprivileged and has no side effects.
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, sub) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// The APIC IDs CPUID reports: leaf 1 EBX[31:24] and (if present) leaf 0xB EDX.
fn cpuid_ids() -> (u32, Option<u32>) {
    let max = cpuid(0, 0).0;
    let initial = cpuid(1, 0).1 >> 24;
    let x2 = (max >= 0xb && cpuid(0xb, 0).1 != 0).then(|| cpuid(0xb, 0).3);
    (initial, x2)
}

fn pm_now() -> u32 {
    io::inl(PM_TIMER)
}

/// Busy-waits `ticks` PM-timer ticks (32-bit counter, wraps).
fn pm_wait(ticks: u32) {
    let t0 = pm_now();
    while pm_now().wrapping_sub(t0) < ticks {
        io::pause();
    }
}

fn send_ipi(apic_id: u32, lo: u32) {
    lapic_wr(ICR_HI, apic_id << 24);
    lapic_wr(ICR_LO, lo);
    for _ in 0..100_000 {
        if lapic_rd(ICR_LO) & ICR_BUSY == 0 {
            return;
        }
        io::pause();
    }
    sline(&[
        P::S("FAIL smp: ICR still busy for APIC "),
        P::D(apic_id as u64),
    ]);
    AP_FAILS.fetch_add(1, Ordering::Relaxed);
}

#[no_mangle]
extern "C" fn rhyve_ap_main() -> ! {
    // SAFETY: IDTR was written by the BSP before the first SIPI; the IDT it names is static.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) core::ptr::addr_of!(IDTR), options(readonly, nostack))
    };
    let id = lapic_rd(LAPIC_ID) >> 24;
    let (initial, x2) = cpuid_ids();
    sline(&[P::S("ap apic_id="), P::D(id as u64), P::S(" up")]);
    if initial != id || x2.is_some_and(|x| x != id) {
        sline(&[
            P::S("FAIL ap "),
            P::D(id as u64),
            P::S(": CPUID leaf 1 APIC id "),
            P::D(initial as u64),
            P::S(", leaf 0xb x2APIC id "),
            P::D(x2.unwrap_or(u32::MAX) as u64),
        ]);
        AP_FAILS.fetch_add(1, Ordering::Relaxed);
    }
    SEEN[(id as usize / 64) & 3].fetch_or(1 << (id % 64), Ordering::SeqCst);
    UP.fetch_add(1, Ordering::SeqCst);
    io::halt()
}

fn seen(id: u32) -> bool {
    id < 256 && SEEN[id as usize / 64].load(Ordering::SeqCst) & (1 << (id % 64)) != 0
}

/// `rhyve.test=smp`. Returns the number of FAIL lines the APs printed.
pub fn test(boot_rsdp: u64) -> u32 {
    let t = acpi::walk(boot_rsdp, false);
    acpi::print_madt(&t);
    let bsp = lapic_rd(LAPIC_ID) >> 24;
    let (initial, x2) = cpuid_ids();
    let (_, l1b, _, _) = cpuid(1, 0);
    let max = cpuid(0, 0).0;
    let (smt, core) = if max >= 0xb {
        (cpuid(0xb, 0), cpuid(0xb, 1))
    } else {
        ((0, 0, 0, 0), (0, 0, 0, 0))
    };
    line(&[
        P::S("cpuid bsp apic_id="),
        P::D(bsp as u64),
        P::S(" logical="),
        P::D(((l1b >> 16) & 0xff) as u64),
        P::S(" smt_shift="),
        P::D((smt.0 & 0x1f) as u64),
        P::S(" threads="),
        P::D((smt.1 & 0xffff) as u64),
        P::S(" core_shift="),
        P::D((core.0 & 0x1f) as u64),
        P::S(" per_package="),
        P::D((core.1 & 0xffff) as u64),
    ]);
    if initial != bsp || x2.is_some_and(|x| x != bsp) {
        fail(&[P::S("smp: BSP CPUID APIC id differs from the LAPIC's")]);
    }

    let aps: usize = t.apic_ids[..t.nr_cpus]
        .iter()
        .filter(|&&id| id != bsp)
        .count();
    if t.nr_cpus > 0 && !t.apic_ids[..t.nr_cpus].contains(&bsp) {
        fail(&[P::S("smp: the BSP's APIC id is not in the MADT")]);
    }
    if aps > MAX_APS {
        fail(&[P::S("smp: more APs than stacks: "), P::D(aps as u64)]);
    }

    // Trampoline and its data.
    let start = core::ptr::addr_of!(ap_tramp_start) as u64;
    let len = core::ptr::addr_of!(ap_tramp_end) as u64 - start;
    // SAFETY: [TRAMP, TRAMP + len) is free low RAM (see the module comment); identity-mapped.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMP as usize as *mut u8, len as usize);
        let cr3: u64;
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags));
        io::mmio_write::<u64>(TRAMP + SLOT_CR3, cr3);
        io::mmio_write::<u64>(TRAMP + SLOT_STACKS, STACKS);
        io::mmio_write::<u64>(TRAMP + SLOT_ENTRY, rhyve_ap_main as usize as u64);
        io::mmio_write::<u64>(TRAMP + SLOT_TICKET, 0);
        core::arch::asm!("sidt [{}]", in(reg) core::ptr::addr_of_mut!(IDTR), options(nostack));
    }

    // Software-enable the BSP's APIC (spurious vector 0xFF), then INIT, SIPI, SIPI.
    lapic_wr(LAPIC_SVR, lapic_rd(LAPIC_SVR) | 0x1ff);
    let targets = || {
        t.apic_ids[..t.nr_cpus]
            .iter()
            .copied()
            .filter(move |&id| id != bsp)
            .take(MAX_APS)
    };
    targets().for_each(|id| send_ipi(id, ICR_INIT));
    pm_wait((PM_HZ / 100) as u32); // 10 ms
    let vector = (TRAMP >> 12) as u32;
    targets().for_each(|id| send_ipi(id, ICR_SIPI | vector));
    pm_wait((PM_HZ / 5000) as u32); // 200 µs
    targets().for_each(|id| {
        if !seen(id) {
            send_ipi(id, ICR_SIPI | vector)
        }
    });
    // Up to 5 s for every AP (each instruction is slow under this machine's KVM).
    let want = aps.min(MAX_APS) as u32;
    let t0 = pm_now();
    while UP.load(Ordering::SeqCst) < want && (pm_now().wrapping_sub(t0) as u64) < 5 * PM_HZ {
        io::pause();
    }
    let up = UP.load(Ordering::SeqCst);
    sline(&[
        P::S("smp cpus="),
        P::D(t.nr_cpus as u64),
        P::S(" up="),
        P::D(up as u64 + 1),
    ]);
    for id in targets() {
        if !seen(id) {
            sline(&[
                P::S("FAIL smp: AP with APIC id "),
                P::D(id as u64),
                P::S(" did not come up"),
            ]);
            AP_FAILS.fetch_add(1, Ordering::Relaxed);
        }
    }

    rtc();
    pmtimer();
    AP_FAILS.load(Ordering::SeqCst)
}

fn cmos(reg: u8) -> u8 {
    io::outb(0x70, reg);
    io::inb(0x71)
}

/// Two BCD digits of `v` < 100 (printed with `P::H(_, 2)` as a zero-padded decimal).
fn dd(v: u32) -> P<'static> {
    P::H(((v / 10) << 4 | (v % 10)) as u64, 2)
}

fn rtc_raw() -> [u8; 7] {
    let mut n = 0;
    while cmos(0x0a) & 0x80 != 0 && n < 100_000 {
        n += 1;
    }
    [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32].map(cmos)
}

/// Reads the CMOS clock (per register B: BCD or binary, 12 or 24 hours) and prints it.
fn rtc() {
    let mut r = rtc_raw();
    for _ in 0..5 {
        let again = rtc_raw();
        if again == r {
            break;
        }
        r = again;
    }
    let b = cmos(0x0b);
    let binary = b & 0x04 != 0;
    let h24 = b & 0x02 != 0;
    let conv = |v: u8| -> u32 {
        if binary {
            v as u32
        } else {
            (v >> 4) as u32 * 10 + (v & 0xf) as u32
        }
    };
    let (sec, min) = (conv(r[0]), conv(r[1]));
    let mut hour = conv(r[2] & 0x7f);
    if !h24 {
        hour %= 12;
        if r[2] & 0x80 != 0 {
            hour += 12;
        }
    }
    let (day, month, year) = (conv(r[3]), conv(r[4]), conv(r[5]));
    let century = match conv(r[6]) {
        c @ 19..=21 => c,
        _ => 20,
    };
    line(&[
        P::S("rtc "),
        P::D((century * 100 + year) as u64),
        P::S("-"),
        dd(month),
        P::S("-"),
        dd(day),
        P::S(" "),
        dd(hour),
        P::S(":"),
        dd(min),
        P::S(":"),
        dd(sec),
        P::S(" regb=0x"),
        P::H(b as u64, 2),
    ]);
    if sec > 59 || min > 59 || hour > 23 || !(1..=31).contains(&day) || !(1..=12).contains(&month) {
        fail(&[P::S("rtc: value out of range")]);
    }
}

/// PM timer: it must advance, monotonically (mod 2^32), at 3.579545 MHz (measured over one
/// RTC second, edge to edge).
fn pmtimer() {
    let mut prev = pm_now();
    let mut advanced = 0;
    for _ in 0..1000 {
        let now = pm_now();
        let d = now.wrapping_sub(prev);
        if d >= 1 << 31 {
            fail(&[
                P::S("pmtimer went backwards: "),
                P::X(prev as u64),
                P::S(" -> "),
                P::X(now as u64),
            ]);
            return;
        }
        if d > 0 {
            advanced += 1;
        }
        prev = now;
    }
    if advanced == 0 {
        fail(&[P::S("pmtimer does not advance")]);
        return;
    }
    line(&[P::S("pmtimer ok")]);
    // Rate: PM ticks between two RTC second edges.
    let edge = || {
        let s = cmos(0x00);
        let t0 = pm_now();
        loop {
            let t = pm_now();
            if cmos(0x00) != s {
                return Some(t);
            }
            if t.wrapping_sub(t0) as u64 > 3 * PM_HZ {
                return None;
            }
        }
    };
    let (Some(a), Some(b)) = (edge(), edge()) else {
        fail(&[P::S("pmtimer: RTC seconds do not tick")]);
        return;
    };
    let hz = b.wrapping_sub(a) as u64;
    line(&[
        P::S("pmtimer hz="),
        P::D(hz),
        P::S(" (ticks per RTC second)"),
    ]);
    if hz < PM_HZ * 9 / 10 || hz > PM_HZ * 11 / 10 {
        fail(&[P::S("pmtimer: rate off by more than 10% against the RTC")]);
    }
}
