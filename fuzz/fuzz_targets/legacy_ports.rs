//! The legacy devices' registers under any sequence of guest accesses: the 16550 UART
//! (with host input arriving between accesses), the RTC/CMOS, the i8042 keyboard controller
//! and the ACPI PM1 event, control, reset and timer blocks. Each 8-byte record is
//! (device, offset, width, write?, value: u32). Nothing may panic, and the SCI must be
//! asserted exactly while an enabled PM1 status bit is set.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

use devices::acpi_pm::{Pm1Control, Pm1Event, PmTimer, ResetControl};
use devices::{i8042::I8042, rtc::Rtc, uart::Uart, BusDevice, VmControl};

fuzz_target!(|data: &[u8]| {
    let control = Arc::new(VmControl::new());
    let sci = Arc::new(AtomicBool::new(false));
    let line = sci.clone();
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let mut uart = Uart::new(irq, Box::new(std::io::sink()));
    let mut rtc = Rtc::new(3600, 1 << 30, Box::new(|| 1_700_000_000));
    let mut kbd = I8042::new(control.clone(), Box::new(|| {}));
    let mut evt = Pm1Event::new(Box::new(move |level| line.store(level, Ordering::SeqCst)));
    let mut cnt = Pm1Control::new(control.clone());
    let mut reset = ResetControl::new(control.clone());
    let mut timer = PmTimer::new();
    for rec in data.chunks_exact(8) {
        let offset = u64::from(rec[1] % 16);
        let len = usize::from(rec[2] % 5);
        let mut buf = [0u8; 4];
        buf.copy_from_slice(&rec[4..8]);
        let dev: &mut dyn BusDevice = match rec[0] % 8 {
            0 => &mut uart,
            1 => &mut rtc,
            2 => &mut kbd,
            3 => &mut evt,
            4 => &mut cnt,
            5 => &mut reset,
            6 => &mut timer,
            _ => {
                uart.receive(&rec[3..]);
                continue;
            }
        };
        if rec[3] & 1 == 0 {
            dev.write(offset, &buf[..len]);
        } else {
            dev.read(offset, &mut buf[..len]);
        }
        if rec[0] % 8 == 3 || rec[3] & 2 != 0 {
            let _ = evt.press_power_button();
        }
        assert_eq!(evt.sci_asserted(), sci.load(Ordering::SeqCst));
    }
});
