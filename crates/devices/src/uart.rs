//! 16550A UART (COM1–COM4), built on vm-superio's `Serial`, interrupting through an irqfd.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::limited_log::LimitedWarning;
use crate::BusDevice;

/// COM1..COM4: (name, port, irq), as the platform places them.
pub const COM_PORTS: [(&str, u16, u32); 4] = {
    use platform::{irq::COM_IRQS as I, ports::COM_PORTS as P};
    [
        ("com1", P[0], I[0]),
        ("com2", P[1], I[1]),
        ("com3", P[2], I[2]),
        ("com4", P[3], I[3]),
    ]
};

/// The 8 registers of a 16550.
pub const UART_REGS: u64 = 8;

/// COM`index + 1` as the DSDT describes it: a PNP0501 at its port and IRQ.
pub fn acpi_device(index: usize) -> Option<platform::acpi::AcpiDevice> {
    const NAMES: [&str; 4] = ["COM1", "COM2", "COM3", "COM4"];
    let (_, port, irq) = *COM_PORTS.get(index)?;
    Some(platform::acpi::AcpiDevice {
        name: NAMES[index],
        hid: "PNP0501",
        uid: Some(index as u8 + 1),
        io: vec![(port, UART_REGS as u8)],
        irq: Some(irq as u8),
    })
}

/// Raises the UART's interrupt by signalling an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550 UART whose transmitter writes to `W`.
pub struct Uart {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    output_failed: LimitedWarning,
}

impl Uart {
    /// A UART signalling `irq` and writing transmitted bytes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), out),
            output_failed: LimitedWarning::new(),
        }
    }

    /// Queues received bytes for the guest; returns how many fit in the 64-byte FIFO.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }

    /// Free space in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        self.serial.fifo_capacity()
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The 16550 is byte-wide; wider reads see the register then zeros.
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, value) {
                self.output_failed
                    .warn(format_args!("uart: host-side output failed: {e}"));
            }
        }
    }
}

/// The 16550's registers and receive FIFO (vm-superio's `SerialState`).
impl crate::lifecycle::Lifecycle for Uart {
    fn save_state(&self) -> Result<Vec<u8>, crate::lifecycle::LifecycleError> {
        let s = self.serial.state();
        let mut w = platform::codec::Writer::new();
        w.u8(s.baud_divisor_low)
            .u8(s.baud_divisor_high)
            .u8(s.interrupt_enable)
            .u8(s.interrupt_identification)
            .u8(s.line_control)
            .u8(s.line_status)
            .u8(s.modem_control)
            .u8(s.modem_status)
            .u8(s.scratch)
            .bytes(&s.in_buffer);
        Ok(w.finish())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::lifecycle::LifecycleError> {
        use crate::lifecycle::LifecycleError;
        let mut r = platform::codec::Reader::new(state);
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: r.u8("uart divisor")?,
            baud_divisor_high: r.u8("uart divisor")?,
            interrupt_enable: r.u8("uart IER")?,
            interrupt_identification: r.u8("uart IIR")?,
            line_control: r.u8("uart LCR")?,
            line_status: r.u8("uart LSR")?,
            modem_control: r.u8("uart MCR")?,
            modem_status: r.u8("uart MSR")?,
            scratch: r.u8("uart SCR")?,
            in_buffer: r.bytes("uart FIFO")?.to_vec(),
        };
        r.finish()?;
        let irq = self
            .serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| LifecycleError::BadState(format!("uart: eventfd: {e}")))?;
        // Serial keeps its trigger and writer: move the writer into the restored one.
        let placeholder = Serial::new(
            IrqTrigger(
                irq.try_clone()
                    .map_err(|e| LifecycleError::BadState(format!("uart: eventfd: {e}")))?,
            ),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let out = std::mem::replace(&mut self.serial, placeholder).into_writer();
        self.serial = Serial::from_state(&s, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| LifecycleError::BadState(format!("uart: {e:?}")))?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Output that the host never takes.
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("broken console sink"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_guest_writing_to_a_broken_console_logs_one_warning() {
        crate::limited_log::capture::install();
        let mut u = Uart::new(EventFd::new(0).unwrap(), Box::new(Broken));
        for _ in 0..1000 {
            u.write(0, b"x");
        }
        assert_eq!(
            crate::limited_log::capture::warnings_with("broken console sink"),
            1
        );
        assert_eq!(u.output_failed.count(), 1000);
    }

    #[test]
    fn each_com_port_describes_its_own_port_and_irq() {
        let com1 = acpi_device(0).unwrap();
        assert_eq!(
            (com1.name, com1.hid, com1.uid),
            ("COM1", "PNP0501", Some(1))
        );
        assert_eq!((com1.io, com1.irq), (vec![(0x3f8, 8)], Some(4)));
        let com4 = acpi_device(3).unwrap();
        assert_eq!(
            (com4.name, com4.io, com4.irq),
            ("COM4", vec![(0x2e8, 8)], Some(3))
        );
        assert!(acpi_device(4).is_none());
    }

    /// What the UART transmits, kept for the test to read (also used by `debugcon`'s).
    #[derive(Clone, Default)]
    pub(crate) struct Sink(pub(crate) Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_receive_and_interrupt() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = Uart::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        uart.write(0, b"h");
        uart.write(0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        uart.write(1, &[1]); // IER: receive-data-available interrupt
        assert_eq!(uart.receive(&[b'x'; 100]), 64);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        uart.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8; 2];
        uart.read(0, &mut rbr);
        assert_eq!(rbr, [b'x', 0]);
    }

    #[test]
    fn odd_offsets_and_empty_accesses_are_harmless() {
        let mut uart = Uart::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        uart.write(1000, &[1]);
        uart.write(0, &[]);
        let mut d: [u8; 0] = [];
        uart.read(3, &mut d);
        let mut b = [0u8];
        uart.read(u64::MAX, &mut b);
    }
}
