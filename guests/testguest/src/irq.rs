//! `rhyve.test=irq`: do device interrupts reach this vCPU? The virtio-rng function raises its
//! used-buffer interrupt through MSI-X, then MSI, then INTx via the I/O APIC; each time the
//! guest checks that the vector landed in its local APIC's IRR.
//!
//! Interrupts stay off (RFLAGS.IF = 0) throughout: an accepted interrupt then waits in the
//! IRR (Intel SDM vol. 3 §11.8.4, "Interrupt Acceptance for Fixed Interrupts") and no handler
//! or IDT entry is needed. Nothing can take it out of the IRR without IF = 1, so each mechanism
//! gets its own vector (0x41 MSI-X, 0x42 MSI, 0x43 INTx) and the guest checks the bit is clear
//! before the device is kicked: a set bit afterwards is that mechanism's doing.
//!
//! From the specifications: PCI LB 3.0 §6.8.1 (MSI capability), §6.8.2 (MSI-X capability and
//! table); Intel SDM vol. 3 §11.11 (MSI address 0xFEExxxxx with the destination APIC ID in
//! bits 19:12, data = vector, fixed delivery, edge), §11.4.1/§11.9 (xAPIC registers: SVR 0xF0
//! bit 8 software-enables the APIC, IRR at 0x200 + 0x10 × (vector / 32)); the 82093AA I/O APIC
//! datasheet (IOREGSEL at +0x00, IOWIN at +0x10, redirection entry N at registers
//! 0x10 + 2N / 0x11 + 2N); virtio 1.2 §4.1.4.3 (queue_msix_vector), §4.1.4.5 (ISR). The INTx
//! GSI is the one rhyve's ACPI _PRT gives slot S, pin INTA#: 16 + (S mod 8), level-triggered,
//! active low as ACPI assumes for a _PRT GSI (KVM's I/O APIC takes the asserted line either
//! way: KVM_IRQ_LINE level 1 is "asserted", the polarity bit is not consulted).
//!
//! The second half is for tests that do take interrupts (`rhyve.test=snapshot`): handlers
//! for vectors [`IRQ_FIRST`].. (asm.rs: count, EOI, return) and [`wait`], the only place
//! with IF = 1; the local APIC timer as a periodic tick; MSI-X routing of a virtio queue.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::fail;
use crate::io::{self, line, P};
use crate::pci::{self, Bdf, Cfg};
use crate::virtio::{self, Buf, Dev, Dma, Queue};

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_IRR: u64 = 0x200;
/// LVT timer, initial count, current count, divide configuration (SDM vol. 3 §11.5.4).
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_CUR: u64 = 0x390;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const IOAPIC: u64 = 0xfec0_0000;

const VEC_MSIX: u8 = 0x41;
const VEC_MSI: u8 = 0x42;
const VEC_INTX: u8 = 0x43;
/// MSI address: the local APIC window, destination APIC ID 0, physical mode.
const MSI_ADDR: u64 = 0xfee0_0000;

/// How long to wait for a vector to show up in the IRR (each read is an exit).
const SPINS: u64 = 1_000_000;

const CAP_MSI: u8 = 0x05;
const CAP_MSIX: u8 = 0x11;
/// virtio_pci_common_cfg: queue_select, queue_msix_vector, config_msix_vector.
const C_Q_SELECT: u64 = 0x16;
const C_Q_MSIX_VECTOR: u64 = 0x1a;
const C_MSIX_CONFIG: u64 = 0x10;

static mut BUF: Dma<64> = Dma([0; 64]);

fn irr(vector: u8) -> bool {
    let reg = LAPIC + LAPIC_IRR + 0x10 * u64::from(vector / 32);
    io::mmio_read::<u32>(reg) & (1 << (vector % 32)) != 0
}

/// Polls the IRR for `vector`, at most SPINS reads.
fn wait_irr(vector: u8) -> bool {
    for _ in 0..SPINS {
        if irr(vector) {
            return true;
        }
        io::pause();
    }
    false
}

fn ioapic_write(reg: u32, v: u32) {
    io::mmio_write(IOAPIC, reg);
    io::mmio_write(IOAPIC + 0x10, v);
}

fn ioapic_read(reg: u32) -> u32 {
    io::mmio_write(IOAPIC, reg);
    io::mmio_read(IOAPIC + 0x10)
}

/// One request on the queue with `vector` expected afterwards; prints the
/// `irq NAME ... vector=0xVV seen=0|1` line (FAIL when not seen).
fn fire(q: &mut Queue, name: &str, extra: &[P], vector: u8) -> bool {
    if irr(vector) {
        fail(&[
            P::S("irq "),
            P::S(name),
            P::S(": vector "),
            P::X(u64::from(vector)),
            P::S(" already pending before the kick"),
        ]);
        return false;
    }
    // SAFETY: only this test and the device use BUF.
    let base = unsafe { (*core::ptr::addr_of!(BUF)).0.as_ptr() as u64 };
    if q.run(&[Buf(base, 64, true)]).is_none() {
        return false;
    }
    let seen = wait_irr(vector);
    io::put(&P::S("rhyve-guest: irq "));
    io::put(&P::S(name));
    extra.iter().for_each(io::put);
    io::put(&P::S(" vector="));
    io::put(&P::X(u64::from(vector)));
    io::put(&P::S(" seen="));
    io::put(&P::D(seen as u64));
    io::putc(b'\n');
    if !seen {
        fail(&[
            P::S("irq "),
            P::S(name),
            P::S(": vector "),
            P::X(u64::from(vector)),
            P::S(" never reached the local APIC IRR"),
        ]);
    }
    seen
}

/// The offsets of the MSI-X and MSI capabilities (0: none).
pub fn caps(cfg: Cfg, f: Bdf) -> (u16, u16) {
    let (mut msix, mut msi) = (0u16, 0u16);
    pci::for_each_cap(cfg, f, |id, off| match id {
        CAP_MSIX if msix == 0 => msix = u16::from(off),
        CAP_MSI if msi == 0 => msi = u16::from(off),
        _ => {}
    });
    (msix, msi)
}

/// The MSI-X table's address: BAR (BIR) + offset from the capability's table dword.
fn msix_table(cfg: Cfg, f: Bdf, cap: u16) -> Option<u64> {
    let t = cfg.r32(f, cap + 4);
    let bar = pci::bars(cfg, f)[(t & 7) as usize % 6]?;
    Some(bar.addr + u64::from(t & !7))
}

/// MSI-X table entry `entry` of `f` (capability at `cap`) = a fixed, edge-triggered
/// `vector` for local APIC 0, unmasked; then MSI-X enabled, the function unmasked. False
/// (reported, naming `who`) when the table's BAR is unassigned.
pub fn msix_route(cfg: Cfg, f: Bdf, cap: u16, entry: u16, vector: u8, who: &str) -> bool {
    let Some(table) = msix_table(cfg, f, cap) else {
        fail(&[P::S(who), P::S(": MSI-X table BAR not assigned")]);
        return false;
    };
    // Address, data = vector (fixed, edge), vector control = unmasked.
    let e = table + 16 * u64::from(entry);
    io::mmio_write(e, MSI_ADDR as u32);
    io::mmio_write(e + 4, (MSI_ADDR >> 32) as u32);
    io::mmio_write(e + 8, u32::from(vector));
    io::mmio_write(e + 12, 0u32);
    // Message control: MSI-X enable (bit 15), function unmasked (bit 14 clear).
    let ctl = cfg.r16(f, cap + 2);
    cfg.w16(f, cap + 2, (ctl | 1 << 15) & !(1 << 14));
    true
}

/// virtio 1.2 §4.1.4.3: queue `index` signals MSI-X table entry `entry` (NO_VECTOR 0xffff:
/// none); the device must read it back. False (reported, naming `who`) otherwise.
pub fn queue_vector(d: &Dev, index: u16, entry: u16, who: &str) -> bool {
    io::mmio_write(d.common + C_Q_SELECT, index);
    io::mmio_write(d.common + C_Q_MSIX_VECTOR, entry);
    let v: u16 = io::mmio_read(d.common + C_Q_MSIX_VECTOR);
    if v != entry {
        fail(&[
            P::S(who),
            P::S(": queue_msix_vector reads back "),
            P::X(u64::from(v)),
        ]);
    }
    v == entry
}

/// No configuration-change interrupts wanted (virtio 1.2 §4.1.5.1.2: NO_VECTOR).
pub fn no_config_vector(d: &Dev) {
    io::mmio_write(d.common + C_MSIX_CONFIG, 0xffffu16);
}

fn msix(cfg: Cfg, f: Bdf, d: &Dev, q: &mut Queue, cap: u16) {
    if msix_route(cfg, f, cap, 0, VEC_MSIX, "irq msix") && queue_vector(d, 0, 0, "irq msix") {
        fire(q, "msix", &[], VEC_MSIX);
    }
}

fn msi(cfg: Cfg, f: Bdf, q: &mut Queue, msix_cap: u16, cap: u16) {
    let ctl = cfg.r16(f, msix_cap + 2);
    cfg.w16(f, msix_cap + 2, ctl & !(1 << 15));
    // 64-bit layout (control bit 7) with per-vector masking (bit 8): +4 address low, +8 high,
    // +0xC data, +0x10 mask bits.
    let mctl = cfg.r16(f, cap + 2);
    if mctl & (1 << 7) == 0 || mctl & (1 << 8) == 0 {
        fail(&[
            P::S("irq msi: not a 64-bit maskable capability, control="),
            P::X(u64::from(mctl)),
        ]);
        return;
    }
    cfg.w32(f, cap + 4, MSI_ADDR as u32);
    cfg.w32(f, cap + 8, (MSI_ADDR >> 32) as u32);
    cfg.w16(f, cap + 0xc, u16::from(VEC_MSI));
    cfg.w32(f, cap + 0x10, 0);
    cfg.w16(f, cap + 2, mctl | 1);
    fire(q, "msi", &[], VEC_MSI);
}

fn intx(cfg: Cfg, f: Bdf, d: &Dev, q: &mut Queue, msi_cap: u16) {
    let mctl = cfg.r16(f, msi_cap + 2);
    cfg.w16(f, msi_cap + 2, mctl & !1);
    // Command register: INTx Disable (bit 10) clear.
    let cmd = cfg.r16(f, 0x04);
    cfg.w16(f, 0x04, cmd & !(1 << 10));
    let pin = cfg.r8(f, 0x3d);
    if pin != 1 {
        fail(&[
            P::S("irq intx: interrupt pin "),
            P::D(u64::from(pin)),
            P::S(", want 1 (INTA#)"),
        ]);
        return;
    }
    // Bits the MSI round left in the ISR (it is set with MSI too) go first.
    let _: u8 = io::mmio_read(d.isr);
    let gsi = 16 + (u32::from(f.dev) + u32::from(pin) - 1) % 8;
    let max = (ioapic_read(1) >> 16) & 0xff;
    if gsi > max {
        fail(&[P::S("irq intx: I/O APIC has no pin "), P::D(u64::from(gsi))]);
        return;
    }
    // Redirection entry: destination APIC 0 (high dword bits 31:24); vector, fixed delivery,
    // physical, active low (bit 13), level (bit 15), unmasked (bit 16 clear).
    let reg = 0x10 + 2 * gsi;
    ioapic_write(reg + 1, 0);
    ioapic_write(reg, u32::from(VEC_INTX) | 1 << 13 | 1 << 15);
    let ok = fire(q, "intx", &[P::S(" gsi="), P::D(u64::from(gsi))], VEC_INTX);
    // Reading the ISR deasserts the line; the queue-interrupt bit must have been set.
    let isr: u8 = io::mmio_read(d.isr);
    let again: u8 = io::mmio_read(d.isr);
    line(&[
        P::S("irq intx isr="),
        P::X(u64::from(isr)),
        P::S(" then="),
        P::X(u64::from(again)),
    ]);
    if ok && (isr & 1 == 0 || again != 0) {
        fail(&[P::S("irq intx: ISR should read 1 then 0")]);
    }
    ioapic_write(reg, 1 << 16); // masked again
}

/// xAPIC software enable (SVR bit 8), spurious vector 0xFF. Accepted fixed interrupts are
/// discarded while the APIC is software-disabled.
pub fn lapic_enable() {
    let svr: u32 = io::mmio_read(LAPIC + LAPIC_SVR);
    io::mmio_write(LAPIC + LAPIC_SVR, svr | 0x1ff);
}

pub fn test(window: &mut u64) {
    const IDS: [u16; 2] = [0x1044, 0x1005];
    lapic_enable();
    let Some(mut d) = virtio::probe(&IDS, window, false) else {
        return;
    };
    let cfg = Cfg::Ports;
    let Some(f) = pci::find(cfg, virtio::VENDOR, &IDS) else {
        return;
    };
    let (msix_cap, msi_cap) = caps(cfg, f);
    line(&[
        P::S("irq caps msix="),
        P::X(u64::from(msix_cap)),
        P::S(" msi="),
        P::X(u64::from(msi_cap)),
    ]);
    if msix_cap == 0 || msi_cap == 0 {
        fail(&[P::S("irq: MSI-X or MSI capability missing")]);
        return;
    }
    if !d.negotiate(0) {
        return;
    }
    let Some(mut q) = d.queue(0) else { return };
    no_config_vector(&d);
    if !d.driver_ok() {
        return;
    }
    msix(cfg, f, &d, &mut q, msix_cap);
    msi(cfg, f, &mut q, msix_cap, msi_cap);
    intx(cfg, f, &d, &mut q, msi_cap);
    d.reset();
    line(&[P::S("irq done")]);
}

/// The first vector with a counting handler (asm.rs `irq_stubs`), and how many there are.
pub const IRQ_FIRST: u8 = 0x40;
pub const IRQ_VECTORS: usize = 8;

/// Interrupts taken per vector, from IRQ_FIRST (incremented by asm.rs's handlers).
#[no_mangle]
static IRQ_COUNTS: [AtomicU64; IRQ_VECTORS] = [const { AtomicU64::new(0) }; IRQ_VECTORS];

/// How many times `vector` (IRQ_FIRST..) has been taken.
pub fn count(vector: u8) -> u64 {
    IRQ_COUNTS[usize::from(vector.wrapping_sub(IRQ_FIRST)) % IRQ_VECTORS].load(Ordering::Relaxed)
}

/// Halts with interrupts enabled until one (any) has been taken: the only window with IF = 1.
/// `sti` delays interrupts by one instruction, so one pending before is taken in the `hlt`.
fn sti_hlt() {
    // SAFETY: the handlers for every vector that can arrive are installed (main.rs), they
    // preserve all registers and flags, and only write IRQ_COUNTS and the local APIC's EOI.
    // No `nostack`: the handlers use the stack below ours.
    unsafe { core::arch::asm!("sti", "hlt", "cli") }
}

/// Waits until `done()` holds, halting between checks. `ticks`: the most timer ticks
/// (interrupts of `timer`) to wait; false once they passed.
pub fn wait(timer: u8, ticks: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = count(timer);
    loop {
        if done() {
            return true;
        }
        if count(timer).wrapping_sub(start) >= ticks {
            return false;
        }
        sti_hlt();
    }
}

/// The local APIC timer, periodic at `vector` every `ms` milliseconds, calibrated against the
/// ACPI PM timer (10 ms of it, one-shot and masked, divide by 16). Returns the initial count.
pub fn start_timer(vector: u8, ms: u64) -> u32 {
    io::mmio_write(LAPIC + LAPIC_TIMER_DIV, 0x3u32);
    io::mmio_write(LAPIC + LAPIC_LVT_TIMER, LVT_MASKED | u32::from(vector));
    io::mmio_write(LAPIC + LAPIC_TIMER_INIT, u32::MAX);
    let mut c = crate::net::Clock::new();
    while c.elapsed() < crate::net::PM_HZ / 100 {
        io::pause();
    }
    let cur: u32 = io::mmio_read(LAPIC + LAPIC_TIMER_CUR);
    let per_10ms = u64::from(u32::MAX - cur).max(1);
    let init = (per_10ms * ms / 10).clamp(1, u64::from(u32::MAX)) as u32;
    io::mmio_write(LAPIC + LAPIC_LVT_TIMER, LVT_PERIODIC | u32::from(vector));
    io::mmio_write(LAPIC + LAPIC_TIMER_INIT, init);
    init
}
