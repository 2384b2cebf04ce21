//! rhyve's test guest. Boots as a bzImage (64-bit or 32-bit boot protocol) or through PVH,
//! reports what the loader gave it on COM1, then runs the test chosen by `rhyve.test=` on the
//! kernel command line. See guests/README.md for the cmdline keys and the report format.
#![no_std]
#![no_main]

mod acpi;
mod asm;
mod bench;
mod blk;
mod boot;
mod hostile;
mod io;
mod irq;
mod net;
mod pci;
mod smp;
mod snapshot;
mod virtio;
mod vsock;

use boot::BootInfo;
use core::arch::asm;
use core::mem::offset_of;
use io::{line, P};

/// Filled by the entry code in asm.rs (`entry_state`, offsets `ES_*`).
#[repr(C)]
struct EntryState {
    /// 0 = bzImage 64-bit entry, 1 = bzImage 32-bit entry, 2 = PVH.
    kind: u64,
    /// boot_params or hvm_start_info address.
    info: u64,
    /// CR0 at a 32-bit entry (0 for the 64-bit entry).
    cr0_32: u64,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    rflags: u64,
    cs: u64,
    ds: u64,
    es: u64,
    ss: u64,
    gdt_limit: u16,
    gdt_base: [u8; 8],
    _pad: [u8; 6],
}

// The asm side hard-codes these offsets.
const _: () = {
    assert!(offset_of!(EntryState, cr0_32) == 16);
    assert!(offset_of!(EntryState, rflags) == 56);
    assert!(offset_of!(EntryState, ss) == 88);
    assert!(offset_of!(EntryState, gdt_limit) == 96);
    assert!(core::mem::size_of::<EntryState>() == 112);
};

extern "C" {
    static entry_state: EntryState;
    static isr_stubs: u8;
    static irq_stubs: u8;
    static stack_bottom: u8;
    static _image_start: u8;
    static _image_end: u8;
}

const KIND_BZ64: u64 = 0;
const KIND_PVH: u64 = 2;

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_IF: u64 = 1 << 9;

const TESTDEV_PORT: u16 = 0xf4;
/// pc-testdev code for "the guest took an unexpected exception".
const EXIT_FAULT: u32 = 0x7f;
/// pc-testdev code for "bad command line".
const EXIT_USAGE: u32 = 0x7e;

/// Counts FAIL lines, for the `checks fail=N` summary.
static mut FAILS: u64 = 0;

fn fail(parts: &[P]) {
    io::put(&P::S("rhyve-guest: FAIL "));
    parts.iter().for_each(io::put);
    io::putc(b'\n');
    // SAFETY: single CPU, no interrupts: nothing else touches FAILS concurrently.
    unsafe { *core::ptr::addr_of_mut!(FAILS) += 1 };
}

fn fails() -> u64 {
    // SAFETY: see `fail`.
    unsafe { *core::ptr::addr_of!(FAILS) }
}

/// Gates up to the last interrupt vector irq.rs handles.
const IDT_VECTORS: usize = irq::IRQ_FIRST as usize + irq::IRQ_VECTORS;

#[repr(C, align(16))]
struct Idt([u64; 2 * IDT_VECTORS]);
static mut IDT: Idt = Idt([0; 2 * IDT_VECTORS]);

/// 32 interrupt gates to the exception stubs in asm.rs, so a guest bug prints its vector and
/// RIP, and gates for the interrupt vectors irq.rs counts (taken only while it waits).
fn install_idt(cs: u16) {
    let stubs = core::ptr::addr_of!(isr_stubs) as u64;
    let irqs = core::ptr::addr_of!(irq_stubs) as u64;
    // SAFETY: single CPU, the IDT is written once before any exception can use it.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    let first = irq::IRQ_FIRST as usize;
    let handlers = (0..32)
        .map(|v| (v, stubs + 16 * v as u64))
        .chain((0..irq::IRQ_VECTORS).map(|n| (first + n, irqs + 16 * n as u64)));
    for (v, h) in handlers {
        // Present, DPL 0, 64-bit interrupt gate (type 0xE: IF cleared on entry), IST 0.
        idt.0[2 * v] = (h & 0xffff) | (cs as u64) << 16 | 0x8e00 << 32 | ((h >> 16) & 0xffff) << 48;
        idt.0[2 * v + 1] = h >> 32;
    }
    let desc = DescPtr {
        limit: (IDT_VECTORS * 16 - 1) as u16,
        base: idt.0.as_ptr() as u64,
    };
    // SAFETY: the IDT is static, complete, and its gates point at valid handlers.
    unsafe { asm!("lidt [{}]", in(reg) &desc, options(readonly, nostack, preserves_flags)) }
}

#[repr(C, packed)]
struct DescPtr {
    limit: u16,
    base: u64,
}

/// Called by `isr_common` with a pointer to [vector, (error code), rip, cs, rflags, rsp, ss].
#[no_mangle]
extern "C" fn rhyve_fault(frame: *const u64) -> ! {
    // SAFETY: the CPU and our stub pushed at least these words.
    let vec = unsafe { frame.read() };
    let has_err = matches!(vec, 8 | 10..=14 | 17 | 21 | 29 | 30);
    let (err, rip) = if has_err {
        // SAFETY: as above, the frame has an error code word.
        unsafe { (frame.add(1).read(), frame.add(2).read()) }
    } else {
        // SAFETY: as above.
        (0, unsafe { frame.add(1).read() })
    };
    line(&[
        P::S("FAULT vector="),
        P::D(vec),
        P::S(" rip="),
        P::X(rip),
        P::S(" err="),
        P::X(err),
        P::S(" cr2="),
        P::X(io::cr2()),
    ]);
    exit(EXIT_FAULT)
}

/// pc-testdev / isa-debug-exit: the VMM exits with status (n << 1) | 1.
fn exit(n: u32) -> ! {
    io::outl(TESTDEV_PORT, n);
    fail(&[P::S("pc-testdev exit returned (no device at port 0xf4?)")]);
    io::halt()
}

/// The cmdline's `key=value` words.
struct Args {
    test: &'static [u8],
    exit: u32,
    pm1a_cnt: u16,
    slp_typ: u16,
    count: u64,
    /// ECAM base for `rhyve.test=pci` (0: none).
    ecam: u64,
    /// Where the virtio tests put BARs the firmware left unassigned.
    mmio: u64,
    blk_ro: bool,
    blk_empty_ok: bool,
    blk_swap: bool,
    reassign: bool,
}

fn parse_num(v: &[u8]) -> Option<u64> {
    let (digits, radix) = match v {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (v, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        n = n.checked_mul(radix as u64)?.checked_add(d as u64)?;
    }
    Some(n)
}

fn parse_args(cmdline: &'static [u8]) -> Args {
    let mut a = Args {
        test: b"report",
        exit: 0,
        pm1a_cnt: 0x404,
        slp_typ: 5,
        count: 0,
        ecam: 0xe000_0000,
        mmio: 0xc000_0000,
        blk_ro: false,
        blk_empty_ok: false,
        blk_swap: false,
        reassign: false,
    };
    for word in cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
    {
        let Some(eq) = word.iter().position(|&c| c == b'=') else {
            continue;
        };
        let (key, val) = (&word[..eq], &word[eq + 1..]);
        let num = |max: u64| parse_num(val).filter(|&n| n <= max);
        let bad = match key {
            b"rhyve.test" => {
                a.test = val;
                false
            }
            b"rhyve.exit" => num(u32::MAX as u64).map(|n| a.exit = n as u32).is_none(),
            b"rhyve.pm1a_cnt" => num(0xffff).map(|n| a.pm1a_cnt = n as u16).is_none(),
            b"rhyve.slp_typ" => num(7).map(|n| a.slp_typ = n as u16).is_none(),
            b"rhyve.count" => num(u64::MAX).map(|n| a.count = n).is_none(),
            // Below 4 GiB: the identity map covers no more.
            b"rhyve.ecam" => num(0xffff_ffff).map(|n| a.ecam = n).is_none(),
            b"rhyve.mmio" => num(0xffff_ffff).map(|n| a.mmio = n).is_none(),
            b"rhyve.blk.ro" => num(1).map(|n| a.blk_ro = n == 1).is_none(),
            b"rhyve.pci.reassign" => num(1).map(|n| a.reassign = n == 1).is_none(),
            b"rhyve.blk.empty_ok" => num(1).map(|n| a.blk_empty_ok = n == 1).is_none(),
            b"rhyve.blk.swap" => num(1).map(|n| a.blk_swap = n == 1).is_none(),
            // Applied before the report (uart_from_cmdline); here only checked.
            b"rhyve.uart" => parse_uart(val).is_none(),
            _ => false,
        };
        if bad {
            fail(&[P::S("bad value: "), P::B(word)]);
        }
    }
    a
}

/// Walk the 4-level page tables at CR3: where does `va` map to?
fn translate(cr3: u64, va: u64) -> Option<u64> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR;
    for level in (1..=4).rev() {
        let idx = (va >> (12 + 9 * (level - 1))) & 0x1ff;
        // SAFETY: page tables live in identity-mapped low memory (a bad pointer faults into
        // our IDT, which reports it).
        let e = unsafe { ((table + 8 * idx) as usize as *const u64).read_volatile() };
        if e & 1 == 0 {
            return None;
        }
        let huge = level > 1 && level < 4 && e & (1 << 7) != 0;
        if huge || level == 1 {
            let page_bits = 12 + 9 * (level - 1);
            let base = e & ADDR & !((1u64 << page_bits) - 1);
            return Some(base | (va & ((1u64 << page_bits) - 1)));
        }
        table = e & ADDR;
    }
    None
}

/// What the loader passed (read before anything is printed: `rhyve.uart=` picks the console).
fn boot_info(st: &EntryState) -> BootInfo {
    if st.kind == KIND_PVH {
        BootInfo::from_start_info(st.info)
    } else {
        BootInfo::from_boot_params(st.info)
    }
}

/// The console UART the cmdline asks for (`rhyve.uart=PORT`), if any and sane; a bad value
/// is reported by `parse_args` once the console runs (on COM1).
fn uart_from_cmdline(cmdline: &[u8]) -> Option<u16> {
    cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter_map(|w| w.strip_prefix(b"rhyve.uart="))
        .last()
        .and_then(parse_uart)
}

/// A UART base: 8 registers, inside the 16-bit port space, not port 0.
fn parse_uart(v: &[u8]) -> Option<u16> {
    parse_num(v)
        .filter(|&n| (1..=0xfff8).contains(&n))
        .map(|n| n as u16)
}

fn report(st: &EntryState, bi: BootInfo) -> BootInfo {
    let pvh = st.kind == KIND_PVH;
    line(&[P::S(if pvh { "boot=pvh" } else { "boot=bzimage" })]);
    if st.kind == KIND_BZ64 {
        line(&[P::S("entry64")]);
    } else {
        let (pe, pg) = (st.cr0_32 & CR0_PE != 0, st.cr0_32 & CR0_PG != 0);
        line(&[
            P::S("entry32 pe="),
            P::D(pe as u64),
            P::S(" pg="),
            P::D(pg as u64),
        ]);
        if !pe || pg {
            fail(&[P::S("entry32 needs protected mode without paging")]);
        }
    }
    bi.problems.iter().flatten().for_each(|p| fail(&[P::S(p)]));

    line(&[P::S("cmdline="), P::B(bi.cmdline)]);
    if bi.cmdline_unterminated {
        fail(&[P::S("cmdline not NUL-terminated within 4096 bytes")]);
    }
    for e in bi.e820() {
        line(&[
            P::S("e820 "),
            P::X16(e.addr),
            P::S(" "),
            P::X16(e.size),
            P::S(" "),
            P::D(e.typ as u64),
        ]);
    }
    let img_start = core::ptr::addr_of!(_image_start) as u64;
    let img_end = core::ptr::addr_of!(_image_end) as u64;
    if bi.e820().is_empty() {
        fail(&[P::S("e820 map is empty")]);
    } else if !bi.in_ram(img_start, img_end) {
        fail(&[
            P::S("e820: image "),
            P::X(img_start),
            P::S(".."),
            P::X(img_end),
            P::S(" not in RAM"),
        ]);
    }
    match bi.initrd {
        None => line(&[P::S("initrd none")]),
        Some((addr, size)) => {
            let end = addr.saturating_add(size);
            if end > 1 << 32 {
                line(&[P::S("initrd addr="), P::X(addr), P::S(" size="), P::D(size)]);
                fail(&[P::S("initrd above 4 GiB: not hashed")]);
            } else {
                let h = boot::fnv1a64(addr, size);
                line(&[
                    P::S("initrd addr="),
                    P::X(addr),
                    P::S(" size="),
                    P::D(size),
                    P::S(" fnv1a64=0x"),
                    P::X16(h),
                ]);
            }
            if !bi.in_ram(addr, end) {
                fail(&[P::S("initrd not in e820 RAM")]);
            }
            if addr < img_end && img_start < end {
                fail(&[P::S("initrd overlaps the kernel image")]);
            }
        }
    }
    line(&[P::S("rsdp="), P::X(bi.rsdp)]);

    let bit = |v: u64, b: u64| P::D((v & b != 0) as u64);
    line(&[
        P::S("cpu lm="),
        bit(st.efer, EFER_LMA),
        P::S(" pg="),
        bit(st.cr0, CR0_PG),
        P::S(" pae="),
        bit(st.cr4, CR4_PAE),
        P::S(" pe="),
        bit(st.cr0, CR0_PE),
    ]);
    if st.efer & EFER_LMA == 0
        || st.cr0 & (CR0_PG | CR0_PE) != CR0_PG | CR0_PE
        || st.cr4 & CR4_PAE == 0
    {
        fail(&[P::S("cpu not in long mode with PAE paging")]);
    }

    let gdt_base = u64::from_le_bytes(st.gdt_base);
    let cs_desc = if st.cs & !7 != 0 && (st.cs | 7) <= st.gdt_limit as u64 {
        // SAFETY: inside the GDT limit the CPU itself reads; identity-mapped low memory.
        Some(unsafe { ((gdt_base + (st.cs & !7)) as usize as *const u64).read_unaligned() })
    } else {
        None
    };
    let cs_l = cs_desc.map_or(0, |d| (d >> 53) & 1);
    line(&[
        P::S("gdt base="),
        P::X(gdt_base),
        P::S(" limit="),
        P::X(st.gdt_limit as u64),
        P::S(" cs="),
        P::X(st.cs),
        P::S(" cs_l="),
        P::D(cs_l),
    ]);
    if cs_l != 1 {
        fail(&[P::S(
            "CS descriptor is not 64-bit code (L=0 or outside the GDT)",
        )]);
    }
    let if_ = (st.rflags & RFLAGS_IF != 0) as u64;
    line(&[
        P::S("segs ds="),
        P::X(st.ds),
        P::S(" es="),
        P::X(st.es),
        P::S(" ss="),
        P::X(st.ss),
        P::S(" if="),
        P::D(if_),
    ]);
    if if_ != 0 {
        fail(&[P::S("interrupts enabled at entry")]);
    }
    if st.kind == KIND_BZ64 && (st.cs != 0x10 || st.ds != 0x18 || st.es != 0x18 || st.ss != 0x18) {
        fail(&[P::S(
            "64-bit boot protocol wants CS=0x10 (__BOOT_CS), DS=ES=SS=0x18 (__BOOT_DS)",
        )]);
    }

    // The 64-bit boot protocol promises an identity map of (at least) the first 4 GiB. Probing
    // every 2 MiB would cost ~100k emulated instructions here: probe both ends of every
    // 128 MiB instead (catches missing tables and wrong PDPT/PD entries alike).
    let probes = (0..32u64).flat_map(|i| [i << 27, ((i + 1) << 27) - 0x1000]);
    let bad = probes
        .chain([st.info])
        .find(|&va| translate(st.cr3, va) != Some(va));
    match bad {
        None => line(&[P::S("paging identity=4g")]),
        Some(va) => fail(&[P::S("identity map broken at "), P::X(va)]),
    }
    bi
}

fn echo(args: &Args) -> ! {
    line(&[P::S("type a line")]);
    let mut buf = [0u8; 256];
    let mut n = 0;
    loop {
        let c = io::getc();
        if c == b'\r' || c == b'\n' {
            break;
        }
        if n < buf.len() {
            buf[n] = c;
            n += 1;
        }
    }
    line(&[P::S("echo "), P::B(&buf[..n])]);
    exit(args.exit)
}

const RESET_CONTROL: u16 = 0xcf9;
/// PM1a event block (bhyve's address): status (W1C) at +0, enable at +2.
const PM1A_STS: u16 = 0x400;
const PM1A_EN: u16 = 0x402;
/// PWRBTN_STS / PWRBTN_EN.
const PWRBTN: u16 = 1 << 8;

/// Does what an ACPI OS does with the fixed-feature power button, polled (IF stays 0): enable
/// the event, wait for its status bit, acknowledge it, then power off through S5.
fn power_button(args: &Args) -> ! {
    io::outw(PM1A_EN, PWRBTN);
    line(&[P::S("waiting for the power button")]);
    // No bound: the host test's timeout is the limit.
    while io::inw(PM1A_STS) & PWRBTN == 0 {
        io::pause();
    }
    io::outw(PM1A_STS, PWRBTN); // write 1 to clear
    if io::inw(PM1A_STS) & PWRBTN != 0 {
        fail(&[P::S("PWRBTN_STS still set after writing 1 to clear it")]);
    }
    line(&[P::S("power button pressed")]);
    poweroff(args)
}

/// The ACPI PM timer (3.579545 MHz, 24 bits), at PM1a + 8.
const PM_TIMER: u16 = 0x408;
const PM_TIMER_HZ: u32 = 3_579_545;

/// Polls the i8042 (IF stays 0) for Ctrl-Alt-Del in scan code set 1, printing `tick N`
/// every 100 ms meanwhile (a pause on the host stops the ticks), then resets through the
/// i8042 as Linux's `reboot=k` does.
fn ctrl_alt_del() -> ! {
    line(&[P::S("waiting for ctrl-alt-del")]);
    let (mut ctrl, mut alt, mut extended) = (false, false, false);
    let mut last = io::inl(PM_TIMER);
    let mut ticks = 0u64;
    loop {
        if io::inb(0x64) & 1 != 0 {
            match (io::inb(0x60), extended) {
                (0xe0, _) => {
                    extended = true;
                    continue;
                }
                (0x1d, false) => ctrl = true,
                (0x9d, false) => ctrl = false,
                (0x38, false) => alt = true,
                (0xb8, false) => alt = false,
                (0x53, true) if ctrl && alt => {
                    line(&[P::S("ctrl-alt-del pressed")]);
                    io::outb(0x64, 0xfe);
                    fail(&[P::S("still running after i8042 reset")]);
                    io::halt()
                }
                _ => {}
            }
            extended = false;
        }
        let now = io::inl(PM_TIMER);
        if now.wrapping_sub(last) & 0xff_ffff >= PM_TIMER_HZ / 10 {
            last = now;
            ticks += 1;
            line(&[P::S("tick "), P::D(ticks)]);
        }
        io::pause();
    }
}

fn poweroff(args: &Args) -> ! {
    io::outw(args.pm1a_cnt, 1 << 13 | args.slp_typ << 10);
    fail(&[
        P::S("still running after ACPI S5 (PM1a_CNT "),
        P::X(args.pm1a_cnt as u64),
        P::S(")"),
    ]);
    io::halt()
}

fn triple_fault() -> ! {
    let desc = DescPtr { limit: 0, base: 0 };
    // SAFETY: deliberately unsafe: with an empty IDT, #UD escalates to #DF and a shutdown.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &desc, options(noreturn, nostack)) }
}

#[no_mangle]
extern "C" fn rhyve_main() -> ! {
    // A POST code first: the VMM timestamps it, which times "start to first guest code".
    io::outb(0x80, 0xa0);
    // SAFETY: written by the entry code before this call, never again.
    let st = unsafe { &*core::ptr::addr_of!(entry_state) };
    install_idt(st.cs as u16);
    let bi = boot_info(st);
    if let Some(base) = uart_from_cmdline(bi.cmdline) {
        io::set_uart_base(base);
    }
    io::uart_init();
    let bi = report(st, bi);
    let args = parse_args(bi.cmdline);
    // The stack grows down towards the rest of .bss: a dirty bottom word means it overflowed.
    // SAFETY: `stack_bottom` is the lowest word of our stack, zeroed at entry.
    if unsafe {
        core::ptr::addr_of!(stack_bottom)
            .cast::<u64>()
            .read_volatile()
    } != 0
    {
        fail(&[P::S("stack overflow")]);
    }
    line(&[P::S("checks fail="), P::D(fails())]);
    line(&[P::S("report done")]);
    match args.test {
        b"report" => exit(args.exit),
        b"echo" => echo(&args),
        b"triplefault" => triple_fault(),
        b"poweroff" => poweroff(&args),
        b"cf9" => {
            // Reset control register: RST_CPU | SYS_RST (a hard reset).
            io::outb(RESET_CONTROL, 0x06);
            fail(&[P::S("still running after 0x06 to port 0xcf9")]);
            io::halt()
        }
        b"powerbutton" => power_button(&args),
        b"ctrlaltdel" => ctrl_alt_del(),
        b"pbignore" => {
            // Enables the power button event, then never looks at it: the VMM's grace period
            // (or a second signal) must end the VM.
            io::outw(PM1A_EN, PWRBTN);
            line(&[P::S("ignoring the power button")]);
            loop {
                io::pause();
            }
        }
        b"reset" => {
            io::outb(0x64, 0xfe);
            fail(&[P::S("still running after i8042 reset (0xfe to port 0x64)")]);
            io::halt()
        }
        b"pio" => {
            // Exit-path benchmark: rhyve.count port writes to pc-testdev's scratch register.
            // Two instructions per exit (`out dx, al; loop`), like the raw KVM loop it is
            // compared with, so the comparison measures the VMM, not the guest's loop.
            if args.count > 0 {
                // SAFETY: port writes to pc-testdev's scratch register; rcx/rdx are declared.
                unsafe {
                    asm!("2: out dx, al", "loop 2b", inout("rcx") args.count => _, in("dx") 0xe0u16, in("al") 0u8, options(nostack))
                };
            }
            exit(args.exit)
        }
        b"pci" | b"virtio-blk" | b"virtio-rng" | b"blk-bench" | b"irq" | b"virtio-net"
        | b"net-bench" | b"hostile" | b"vsock" | b"snapshot" => {
            let mut window = args.mmio;
            match args.test {
                b"pci" => pci::test(args.ecam),
                b"virtio-blk" => blk::test(
                    &mut window,
                    args.reassign,
                    args.blk_ro,
                    args.blk_empty_ok,
                    args.blk_swap,
                ),
                b"blk-bench" => bench::run(&mut window, bi.cmdline),
                b"irq" => irq::test(&mut window),
                b"virtio-net" => net::test(&mut window, bi.cmdline),
                b"net-bench" => net::bench(&mut window, bi.cmdline),
                b"hostile" => hostile::test(&mut window),
                b"vsock" => vsock::test(&mut window, bi.cmdline),
                // Ticks forever; returns only when the setup failed.
                b"snapshot" => snapshot::test(&mut window, bi.cmdline),
                _ => virtio::rng_test(&mut window, args.reassign),
            }
            line(&[P::S("checks fail="), P::D(fails())]);
            exit(args.exit)
        }
        b"acpi" => {
            acpi::test(bi.rsdp);
            line(&[P::S("checks fail="), P::D(fails())]);
            exit(args.exit)
        }
        b"smp" => {
            let ap_fails = smp::test(bi.rsdp);
            line(&[P::S("checks fail="), P::D(fails() + ap_fails as u64)]);
            exit(args.exit)
        }
        b"post" => {
            (1..=5).for_each(|c| io::outb(0x80, c));
            exit(args.exit)
        }
        b"fault" => {
            // SAFETY: deliberately faults: #UD goes through our IDT, which reports and exits.
            unsafe { asm!("ud2", options(noreturn, nostack)) }
        }
        b"pagefault" => {
            // 1 TiB is outside every identity map a boot protocol sets up: #PF, CR2 = 1 TiB.
            // SAFETY: deliberately faults; our IDT reports and exits.
            let v = unsafe { ((1u64 << 40) as usize as *const u64).read_volatile() };
            fail(&[P::S("read of unmapped 0x10000000000 returned "), P::X(v)]);
            exit(args.exit)
        }
        other => {
            fail(&[P::S("unknown rhyve.test="), P::B(other)]);
            exit(EXIT_USAGE)
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // No core::fmt (it would double the image): a bare marker is enough to find the bug.
    fail(&[P::S("panic")]);
    exit(EXIT_FAULT)
}
