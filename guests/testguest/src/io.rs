//! Port I/O, control registers and the serial console (COM1 unless `rhyve.uart=`).

use core::arch::asm;
use core::sync::atomic::{AtomicU16, AtomicU8, Ordering};

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; the ports used here are the test's subject.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn outw(port: u16, v: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// MMIO read of a `T` (u8/u16/u32/u64: one access of that width) at physical address `addr`,
/// which the identity map covers (below 4 GiB).
pub fn mmio_read<T: Copy>(addr: u64) -> T {
    // SAFETY: device registers below 4 GiB, identity-mapped; a wrong address faults into our
    // IDT, which reports it.
    unsafe { (addr as usize as *const T).read_volatile() }
}

pub fn mmio_write<T: Copy>(addr: u64, v: T) {
    // SAFETY: as for `mmio_read`.
    unsafe { (addr as usize as *mut T).write_volatile(v) }
}

/// Time-stamp counter: bounds polling loops without knowing how fast instructions run.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the TSC (this machine's KVM handles it, see guests.md).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

pub fn pause() {
    // SAFETY: `pause` is a hint with no architectural effect.
    unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) }
}

/// Stop for good: interrupts off, then `hlt` (a VMM sees a halt exit).
pub fn halt() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects (we run at CPL 0).
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// The console UART's base port: COM1 (0x3f8) unless `rhyve.uart=` chose another
/// (COM2 0x2f8, COM3 0x3e8, COM4 0x2e8). Set once, before `uart_init`.
static BASE: AtomicU16 = AtomicU16::new(0x3f8);
// Register offsets from the base.
const THR: u16 = 0;
const RBR: u16 = 0;
const DLL: u16 = 0;
const DLM: u16 = 1;
const IER: u16 = 1;
const FCR_IIR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LSR_DR: u8 = 1 << 0;
const LSR_THRE: u8 = 1 << 5;

/// Port of UART register `reg` (an offset) on the console UART.
fn reg(reg: u16) -> u16 {
    BASE.load(Ordering::Relaxed) + reg
}

/// Moves the console to the UART at `base` (call `uart_init` afterwards).
pub fn set_uart_base(base: u16) {
    BASE.store(base, Ordering::Relaxed);
}

/// Bytes we may still write before polling THRE again. With a 16550A FIFO, THRE means the
/// 16-byte FIFO is empty, so one poll covers 16 bytes: half the exits of a poll per byte.
static TX_ROOM: AtomicU8 = AtomicU8::new(0);
static TX_BURST: AtomicU8 = AtomicU8::new(1);

/// 115200 8N1, FIFO on, interrupts off (we poll).
pub fn uart_init() {
    outb(reg(IER), 0);
    outb(reg(LCR), 0x80); // DLAB: the next two registers are the divisor
    outb(reg(DLL), 1); // divisor 1 = 115200 baud
    outb(reg(DLM), 0);
    outb(reg(LCR), 0x03); // 8 data bits, no parity, 1 stop bit
    outb(reg(FCR_IIR), 0x07); // enable + clear both FIFOs
    outb(reg(MCR), 0x03); // DTR, RTS
    let fifo = inb(reg(FCR_IIR)) & 0xc0 == 0xc0;
    TX_BURST.store(if fifo { 16 } else { 1 }, Ordering::Relaxed);
}

pub fn putc(b: u8) {
    let room = TX_ROOM.load(Ordering::Relaxed);
    let room = if room == 0 {
        // Bounded so that a UART model that never reports THRE still gets our output.
        for _ in 0..100_000 {
            if inb(reg(LSR)) & LSR_THRE != 0 {
                break;
            }
            pause();
        }
        TX_BURST.load(Ordering::Relaxed)
    } else {
        room
    };
    outb(reg(THR), b);
    TX_ROOM.store(room - 1, Ordering::Relaxed);
}

pub fn getc() -> u8 {
    while inb(reg(LSR)) & LSR_DR == 0 {
        pause();
    }
    inb(reg(RBR))
}

/// A piece of a report line.
pub enum P<'a> {
    S(&'a str),
    /// Raw bytes; anything outside printable ASCII is shown as `\xNN` so a line stays a line.
    B(&'a [u8]),
    /// `0x` + minimal hex digits.
    X(u64),
    /// 16 hex digits, no prefix.
    X16(u64),
    /// Exactly this many hex digits, no prefix.
    H(u64, u32),
    /// Decimal.
    D(u64),
}

pub fn put(p: &P) {
    match *p {
        P::S(s) => s.bytes().for_each(putc),
        P::B(b) => {
            for &c in b {
                if (0x20..0x7f).contains(&c) && c != b'\\' {
                    putc(c);
                } else {
                    putc(b'\\');
                    putc(b'x');
                    hex(c as u64, 2);
                }
            }
        }
        P::X(v) => {
            putc(b'0');
            putc(b'x');
            let digits = (64 - v.leading_zeros()).div_ceil(4).max(1);
            hex(v, digits);
        }
        P::X16(v) => hex(v, 16),
        P::H(v, digits) => hex(v, digits),
        P::D(v) => {
            let mut buf = [0u8; 20];
            let mut i = buf.len();
            let mut v = v;
            loop {
                i -= 1;
                buf[i] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            buf[i..].iter().copied().for_each(putc);
        }
    }
}

fn hex(v: u64, digits: u32) {
    for i in (0..digits).rev() {
        let d = ((v >> (i * 4)) & 0xf) as u8;
        putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
    }
}

/// One report line: `rhyve-guest: ` + parts + `\n`.
pub fn line(parts: &[P]) {
    put(&P::S("rhyve-guest: "));
    parts.iter().for_each(put);
    putc(b'\n');
}
