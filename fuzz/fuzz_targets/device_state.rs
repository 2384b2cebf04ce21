//! Saved device state as a snapshot's FILE.kern carries it (the user's file, but it can be
//! corrupt or crafted): `restore_state` of the UART, the RTC/CMOS, the i8042 and the ACPI PM1
//! event, control and timer blocks, then guest accesses against whatever was accepted. Input:
//! the device (1 byte), the state's length (2 bytes, LE), the state, then 8-byte access
//! records as in `legacy_ports`. A refused state is fine; a panic is not, and neither is an
//! accepted state that `save_state` does not give back the same.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

use devices::acpi_pm::{Pm1Control, Pm1Event, PmTimer};
use devices::lifecycle::Lifecycle;
use devices::{i8042::I8042, rtc::Rtc, uart::Uart, BusDevice, VmControl};

trait Device: Lifecycle + BusDevice {}
impl<T: Lifecycle + BusDevice> Device for T {}

fuzz_target!(|data: &[u8]| {
    let [which, lo, hi, rest @ ..] = data else {
        return;
    };
    let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
    let (state, accesses) = rest.split_at(len);
    let control = Arc::new(VmControl::new());
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let mut dev: Box<dyn Device> = match which % 6 {
        0 => Box::new(Uart::new(irq, Box::new(std::io::sink()))),
        1 => Box::new(Rtc::new(3600, 1 << 30, Box::new(|| 1_700_000_000))),
        2 => Box::new(I8042::new(control.clone(), Box::new(|| {}))),
        3 => Box::new(Pm1Event::new(Box::new(|_| {}))),
        4 => Box::new(Pm1Control::new(control.clone())),
        _ => Box::new(PmTimer::new()),
    };
    if dev.restore_state(state).is_err() {
        return;
    }
    // What was accepted is what a second snapshot saves (the PM timer's count and the RTC's
    // clock move on with time, so only the others are compared).
    if which % 6 < 5 && which % 6 != 1 {
        let saved = dev.save_state().expect("a restored device saves");
        assert_eq!(saved, state, "restore then save changed the state");
    }
    for rec in accesses.chunks_exact(8) {
        let offset = u64::from(rec[1] % 16);
        let width = usize::from(rec[2] % 5);
        let mut buf = [0u8; 4];
        buf.copy_from_slice(&rec[4..8]);
        if rec[3] & 1 == 0 {
            dev.write(offset, &buf[..width]);
        } else {
            dev.read(offset, &mut buf[..width]);
        }
    }
});
