//! i8042 PS/2 controller with a keyboard on its first port and nothing on the AUX port.
//!
//! Enough of the controller and of an AT keyboard for Linux's i8042 and atkbd drivers to
//! probe quickly and cleanly (self test, CTR read/write, AUX detection failing at once,
//! keyboard reset and ID), plus the reset line: command 0xFE, any pulse command 0xF0..=0xFF
//! with bit 0 clear, or an output-port write (0xD1) with bit 0 clear resets the VM.
//!
//! Nobody types but the VMM: [`I8042::press_ctrl_alt_del`] (Firecracker's SendCtrlAltDel);
//! every other byte is a controller or keyboard reply.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::{BusDevice, StopReason, VmControl};

/// Data port 0x60 and command port 0x64 are 4 apart; the device spans both.
pub const I8042_BASE: u16 = platform::ports::I8042_BASE;
pub const I8042_LEN: u64 = 5;

/// The keyboard controller as the DSDT describes it (PNP0303: data 0x60, command 0x64).
pub fn acpi_device() -> platform::acpi::AcpiDevice {
    platform::acpi::AcpiDevice {
        name: "KBD_",
        hid: "PNP0303",
        uid: None,
        io: vec![(I8042_BASE, 1), (I8042_BASE + 4, 1)],
        irq: Some(platform::irq::KBD_IRQ as u8),
    }
}

/// Offset of the data port (0x60).
const DATA: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
const STATUS_CMD: u64 = 4;

// Status register bits.
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
const STS_CMD: u8 = 0x08;
const STS_KEYLOCK: u8 = 0x10;

// Controller configuration byte (CTR) bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_XLATE: u8 = 0x40;
/// Keyboard interrupt on, self test passed, scancode translation on; no AUX interrupt.
const CTR_INITIAL: u8 = CTR_KBDINT | CTR_SYS | CTR_XLATE;

/// Output port: bit 0 is the CPU reset line (active low), bit 1 is A20.
const OUTPORT_INITIAL: u8 = 0x03;
const OUTPORT_RESET: u8 = 0x01;

/// Bytes the output buffer holds before further ones are dropped.
pub const OUTPUT_CAP: usize = 16;

// Controller replies.
const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// AUX interface test: "clock line stuck low" — there is no AUX port.
const AUX_ABSENT: u8 = 0x01;
/// Input port: bit 7 set means the keyboard is not inhibited.
const INPORT: u8 = 0x80;

// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;
const KBD_ID: u8 = 0xab;
/// Second ID byte of an MF2 keyboard, untranslated and translated.
const KBD_ID_RAW: u8 = 0x83;
const KBD_ID_XLATE: u8 = 0x41;

/// What the next data-port write means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataDest {
    /// A command for the keyboard.
    Keyboard,
    /// 0x60: the new CTR.
    Ctr,
    /// 0xD1: the new output port.
    OutputPort,
    /// 0xD2: a byte to queue as if the keyboard had sent it.
    KbdOutput,
    /// 0xD3: a byte to loop back as AUX data.
    AuxLoop,
    /// 0xD4: a byte for the (absent) AUX device.
    AuxWrite,
    /// The parameter of keyboard command `0`.
    KbdParam(u8),
}

/// The i8042 at 0x60/0x64.
pub struct I8042 {
    control: Arc<VmControl>,
    irq1: Box<dyn Fn() + Send>,
    out: VecDeque<u8>,
    /// What a data read returns when the output buffer is empty: the last byte read.
    last: u8,
    ctr: u8,
    outport: u8,
    /// Last write went to the command port (status bit 3).
    last_was_cmd: bool,
    dest: DataDest,
}

impl I8042 {
    /// A controller whose reset line asks `control` for a reset and whose keyboard
    /// interrupt calls `irq1` (an edge on IRQ 1).
    pub fn new(control: Arc<VmControl>, irq1: Box<dyn Fn() + Send>) -> Self {
        Self {
            control,
            irq1,
            out: VecDeque::with_capacity(OUTPUT_CAP),
            last: 0,
            ctr: CTR_INITIAL,
            outport: OUTPORT_INITIAL,
            last_was_cmd: false,
            dest: DataDest::Keyboard,
        }
    }

    fn status(&self) -> u8 {
        let mut s = STS_SYS | STS_KEYLOCK;
        if !self.out.is_empty() {
            s |= STS_OBF;
        }
        if self.last_was_cmd {
            s |= STS_CMD;
        }
        s
    }

    fn irq_if_enabled(&self) {
        if self.ctr & CTR_KBDINT != 0 && !self.out.is_empty() {
            (self.irq1)();
        }
    }

    /// Queues a byte; interrupts when it is the one now in the output buffer.
    fn push(&mut self, byte: u8) {
        if self.out.len() >= OUTPUT_CAP {
            log::debug!("i8042: output buffer full, dropping {byte:#04x}");
            return;
        }
        self.out.push_back(byte);
        if self.out.len() == 1 {
            self.irq_if_enabled();
        }
    }

    /// A controller reply: it takes the output register, replacing anything stale (a
    /// real 8042 has a one-byte output buffer), so the guest reads the reply next.
    fn reply(&mut self, byte: u8) {
        self.out.clear();
        self.push(byte);
    }

    fn read_data(&mut self) -> u8 {
        if let Some(byte) = self.out.pop_front() {
            self.last = byte;
            // The next byte moves into the output buffer.
            self.irq_if_enabled();
        }
        self.last
    }

    /// Ctrl-Alt-Del pressed and released: the scan codes of the set the guest reads (set 1
    /// while the controller translates, else set 2), one interrupt for the first byte and
    /// one per byte read after it.
    pub fn press_ctrl_alt_del(&mut self) {
        const SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
        const SET2: &[u8] = &[
            0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
        ];
        let codes = if self.ctr & CTR_XLATE != 0 {
            SET1
        } else {
            SET2
        };
        for &b in codes {
            self.push(b);
        }
    }

    fn pulse_reset(&self) {
        log::info!("i8042: reset line pulsed");
        self.control.request_stop(StopReason::Reset);
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_was_cmd = true;
        // A new command cancels one still waiting for its data byte.
        self.dest = DataDest::Keyboard;
        match cmd {
            0x20 => self.reply(self.ctr),
            0x60 => self.dest = DataDest::Ctr,
            0xa7 | 0xa8 => {} // disable / enable AUX: there is none
            0xa9 => self.reply(AUX_ABSENT),
            0xaa => {
                self.ctr |= CTR_SYS;
                self.reply(SELF_TEST_OK);
            }
            0xab => self.reply(INTERFACE_OK),
            0xad => self.ctr |= CTR_KBDDIS,
            0xae => self.ctr &= !CTR_KBDDIS,
            0xc0 => self.reply(INPORT),
            0xd0 => self.reply(self.outport),
            0xd1 => self.dest = DataDest::OutputPort,
            0xd2 => self.dest = DataDest::KbdOutput,
            0xd3 => self.dest = DataDest::AuxLoop,
            0xd4 => self.dest = DataDest::AuxWrite,
            0xf0..=0xff if cmd & OUTPORT_RESET == 0 => self.pulse_reset(),
            _ => log::debug!("i8042: ignoring controller command {cmd:#04x}"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_cmd = false;
        let dest = std::mem::replace(&mut self.dest, DataDest::Keyboard);
        match dest {
            DataDest::Keyboard => self.keyboard_command(value),
            DataDest::Ctr => {
                self.ctr = value;
                // Bytes already waiting interrupt once the guest turns the interrupt on.
                self.irq_if_enabled();
            }
            DataDest::OutputPort => {
                self.outport = value;
                if value & OUTPORT_RESET == 0 {
                    self.pulse_reset();
                }
            }
            DataDest::KbdOutput => self.push(value),
            // Loop the byte back, but never flagged as AUX data: Linux's loop test then
            // fails at once (no 500 ms timeout), and the AUX test reply that follows
            // replaces the byte.
            DataDest::AuxLoop => self.push(value),
            DataDest::AuxWrite => {} // no AUX device to hear it, no reply
            DataDest::KbdParam(cmd) => self.keyboard_param(cmd, value),
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            0xff => {
                // Reset: ACK, then basic assurance test passed.
                self.push(KBD_ACK);
                self.push(KBD_BAT_OK);
            }
            0xf2 => {
                self.push(KBD_ACK);
                self.push(KBD_ID);
                self.push(if self.ctr & CTR_XLATE != 0 {
                    KBD_ID_XLATE
                } else {
                    KBD_ID_RAW
                });
            }
            0xed | 0xf3 | 0xf0 => {
                // Set LEDs / typematic rate / scancode set: a parameter follows.
                self.push(KBD_ACK);
                self.dest = DataDest::KbdParam(cmd);
            }
            0xee => self.push(KBD_ECHO),
            // Enable, disable, set defaults, and anything else: acknowledge.
            _ => self.push(KBD_ACK),
        }
    }

    fn keyboard_param(&mut self, cmd: u8, value: u8) {
        self.push(KBD_ACK);
        if cmd == 0xf0 && value == 0 {
            // "Get current scancode set": set 2, as seen through translation if it is on.
            self.push(if self.ctr & CTR_XLATE != 0 {
                0x41
            } else {
                0x02
            });
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Bytes past the first, and ports this controller does not decode, float high.
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        match offset {
            DATA => *first = self.read_data(),
            STATUS_CMD => *first = self.status(),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            DATA => self.write_data(value),
            STATUS_CMD => self.write_command(value),
            _ => {}
        }
    }
}

/// The controller's registers and output buffer.
impl crate::lifecycle::Lifecycle for I8042 {
    fn save_state(&self) -> Result<Vec<u8>, crate::lifecycle::LifecycleError> {
        let out: Vec<u8> = self.out.iter().copied().collect();
        let dest = match self.dest {
            DataDest::Keyboard => (0, 0),
            DataDest::Ctr => (1, 0),
            DataDest::OutputPort => (2, 0),
            DataDest::KbdOutput => (3, 0),
            DataDest::AuxLoop => (4, 0),
            DataDest::AuxWrite => (5, 0),
            DataDest::KbdParam(cmd) => (6, cmd),
        };
        let mut w = platform::codec::Writer::new();
        w.bytes(&out)
            .u8(self.last)
            .u8(self.ctr)
            .u8(self.outport)
            .bool(self.last_was_cmd)
            .u8(dest.0)
            .u8(dest.1);
        Ok(w.finish())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::lifecycle::LifecycleError> {
        use crate::lifecycle::LifecycleError;
        let mut r = platform::codec::Reader::new(state);
        let out = r.bytes("i8042 output")?;
        if out.len() > OUTPUT_CAP {
            return Err(LifecycleError::BadState(
                "i8042: output buffer too long".into(),
            ));
        }
        let (last, ctr, outport) = (r.u8("i8042")?, r.u8("i8042 ctr")?, r.u8("i8042 port")?);
        let last_was_cmd = r.bool("i8042 cmd")?;
        let (dest, cmd) = (r.u8("i8042 dest")?, r.u8("i8042 param")?);
        if dest != 6 && cmd != 0 {
            return Err(LifecycleError::BadState(format!(
                "i8042: a parameter byte {cmd:#x} without a command awaiting it"
            )));
        }
        let dest = match dest {
            0 => DataDest::Keyboard,
            1 => DataDest::Ctr,
            2 => DataDest::OutputPort,
            3 => DataDest::KbdOutput,
            4 => DataDest::AuxLoop,
            5 => DataDest::AuxWrite,
            6 => DataDest::KbdParam(cmd),
            v => {
                return Err(LifecycleError::BadState(format!(
                    "i8042: data destination {v}"
                )))
            }
        };
        r.finish()?;
        self.out = out.iter().copied().collect();
        (self.last, self.ctr, self.outport) = (last, ctr, outport);
        (self.last_was_cmd, self.dest) = (last_was_cmd, dest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Rig {
        kbd: I8042,
        control: Arc<VmControl>,
        irqs: Arc<AtomicUsize>,
    }

    impl Rig {
        fn new() -> Self {
            let control = Arc::new(VmControl::new());
            let irqs = Arc::new(AtomicUsize::new(0));
            let counter = irqs.clone();
            let kbd = I8042::new(
                control.clone(),
                Box::new(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                }),
            );
            Self { kbd, control, irqs }
        }

        fn status(&mut self) -> u8 {
            let mut b = [0];
            self.kbd.read(STATUS_CMD, &mut b);
            b[0]
        }

        fn data(&mut self) -> u8 {
            let mut b = [0];
            self.kbd.read(DATA, &mut b);
            b[0]
        }

        fn cmd(&mut self, v: u8) {
            self.kbd.write(STATUS_CMD, &[v]);
        }

        fn put(&mut self, v: u8) {
            self.kbd.write(DATA, &[v]);
        }

        fn irqs(&self) -> usize {
            self.irqs.load(Ordering::SeqCst)
        }

        /// Reads everything in the output buffer, checking OBF along the way.
        fn drain(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            while self.status() & STS_OBF != 0 {
                v.push(self.data());
                assert!(v.len() <= OUTPUT_CAP, "output buffer never empties");
            }
            v
        }
    }

    #[test]
    fn ctrl_alt_del_in_the_set_the_guest_reads() {
        let mut r = Rig::new();
        r.kbd.press_ctrl_alt_del();
        assert_eq!(r.irqs(), 1, "one interrupt for the first byte");
        assert_eq!(r.drain(), [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        // Translation off (CTR bit 6 clear): set 2.
        r.cmd(0x60);
        r.put(CTR_KBDINT | CTR_SYS);
        r.kbd.press_ctrl_alt_del();
        assert_eq!(
            r.drain(),
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
    }

    #[test]
    fn initial_status() {
        let mut r = Rig::new();
        let s = r.status();
        assert_eq!(s & STS_OBF, 0);
        assert_ne!(s & STS_SYS, 0);
        assert_ne!(s & STS_KEYLOCK, 0);
        assert_eq!(s & 0x20, 0, "never AUX data");
        assert_eq!(s & 0x02, 0, "input buffer always empty");
        assert!(!r.control.stopping());
    }

    #[test]
    fn linux_probe_sequence() {
        let mut r = Rig::new();
        assert!(r.drain().is_empty()); // i8042_flush

        // Self test.
        r.cmd(0xaa);
        assert_ne!(r.status() & STS_CMD, 0);
        assert_ne!(r.status() & STS_OBF, 0);
        assert_eq!(r.data(), 0x55);
        assert_eq!(r.status() & STS_OBF, 0);

        // Read CTR (twice, as Linux does until stable).
        for _ in 0..2 {
            r.cmd(0x20);
            assert_ne!(r.status() & STS_OBF, 0);
            assert_eq!(r.data(), CTR_INITIAL);
        }
        assert_eq!(CTR_INITIAL & 0x02, 0, "no AUX interrupt");

        // Write CTR: ports disabled, interrupts off.
        let ctr = (CTR_INITIAL | 0x30) & !0x03;
        r.cmd(0x60);
        r.put(ctr);
        assert_eq!(r.status() & STS_CMD, 0);
        assert_eq!(r.status() & STS_OBF, 0);
        let irqs_before = r.irqs();
        r.cmd(0x20);
        assert_eq!(r.data(), ctr);

        // AUX loop: no AUX-flagged reply, and the AUX test that follows reads "absent".
        r.cmd(0xd3);
        r.put(0x5a);
        assert_eq!(r.status() & 0x20, 0);
        r.cmd(0xa9);
        assert_eq!(r.data(), 0x01);
        assert!(r.drain().is_empty());

        // Keyboard interface test.
        r.cmd(0xab);
        assert_eq!(r.data(), 0x00);

        // Enable the keyboard port with its interrupt.
        assert_eq!(r.irqs(), irqs_before, "interrupts were off");
        r.cmd(0x60);
        r.put((ctr & !CTR_KBDDIS) | CTR_KBDINT);
        r.cmd(0x20);
        assert_eq!(r.data() & (CTR_KBDDIS | CTR_KBDINT), CTR_KBDINT);
        assert!(!r.control.stopping());
    }

    #[test]
    fn keyboard_reset_and_id_raise_irq1() {
        let mut r = Rig::new();
        r.put(0xff);
        assert_eq!(r.irqs(), 1, "first byte interrupts");
        assert_eq!(r.data(), 0xfa);
        assert_eq!(r.irqs(), 2, "second byte interrupts once the first is read");
        assert_eq!(r.data(), 0xaa);
        assert_eq!(r.irqs(), 2, "nothing left, no interrupt");
        assert_eq!(r.status() & STS_OBF, 0);
        // Empty buffer: the last byte again.
        assert_eq!(r.data(), 0xaa);

        r.put(0xf2);
        assert_eq!(r.drain(), vec![0xfa, 0xab, KBD_ID_XLATE]);
        r.cmd(0x60);
        r.put(CTR_KBDINT | CTR_SYS); // translation off
        r.put(0xf2);
        assert_eq!(r.drain(), vec![0xfa, 0xab, KBD_ID_RAW]);
    }

    #[test]
    fn no_irq_when_kbd_interrupt_off() {
        let mut r = Rig::new();
        r.cmd(0x60);
        r.put(CTR_SYS);
        r.put(0xff);
        assert_eq!(r.drain(), vec![0xfa, 0xaa]);
        assert_eq!(r.irqs(), 0);
        // Turning the interrupt on with a byte waiting interrupts.
        r.put(0xf4);
        r.cmd(0x60);
        r.put(CTR_SYS | CTR_KBDINT);
        assert_eq!(r.irqs(), 1);
        assert_eq!(r.data(), 0xfa);
    }

    #[test]
    fn keyboard_commands_with_parameters() {
        let mut r = Rig::new();
        r.put(0xed); // set LEDs
        assert_eq!(r.drain(), vec![0xfa]);
        r.put(0xff); // the parameter, not a reset
        assert_eq!(r.drain(), vec![0xfa]);
        r.put(0xf3); // typematic
        r.put(0x00);
        assert_eq!(r.drain(), vec![0xfa, 0xfa]);
        r.put(0xee);
        assert_eq!(r.drain(), vec![0xee]);
        for c in [0xf4, 0xf5, 0xf6, 0x12] {
            r.put(c);
            assert_eq!(r.drain(), vec![0xfa]);
        }
        r.cmd(0xd2); // write keyboard output buffer
        r.put(0x1c);
        assert_eq!(r.drain(), vec![0x1c]);
        r.cmd(0xd4); // to the absent AUX device: swallowed
        r.put(0xff);
        assert!(r.drain().is_empty());
        assert!(!r.control.stopping());
    }

    #[test]
    fn reset_via_fe() {
        let mut r = Rig::new();
        r.put(0xfe); // data port: not a reset
        assert!(!r.control.stopping());
        r.cmd(0xfe);
        assert_eq!(r.control.stop_reason(), Some(StopReason::Reset));
    }

    #[test]
    fn pulse_commands() {
        let mut r = Rig::new();
        r.cmd(0xff); // pulses nothing
        r.cmd(0xf1);
        assert!(!r.control.stopping());
        r.cmd(0xf0);
        assert_eq!(r.control.stop_reason(), Some(StopReason::Reset));
    }

    #[test]
    fn reset_via_output_port() {
        let mut r = Rig::new();
        r.cmd(0xd0);
        assert_eq!(r.data(), OUTPORT_INITIAL);
        r.cmd(0xd1);
        r.put(0x03); // A20 on, reset line high: nothing
        assert!(!r.control.stopping());
        r.cmd(0xd1);
        r.put(0x02);
        assert_eq!(r.control.stop_reason(), Some(StopReason::Reset));
    }

    #[test]
    fn command_cancels_pending_data() {
        let mut r = Rig::new();
        r.cmd(0xd1);
        r.cmd(0xae);
        r.put(0x00); // a keyboard command now, not an output-port write
        assert!(!r.control.stopping());
        assert_eq!(r.drain(), vec![0xfa]);
    }

    #[test]
    fn output_buffer_is_capped() {
        let mut r = Rig::new();
        for _ in 0..20 {
            r.put(0xff);
        }
        let got = r.drain();
        assert_eq!(got.len(), OUTPUT_CAP);
        assert!(got.chunks(2).all(|c| c == [0xfa, 0xaa]));
        assert_eq!(r.irqs(), OUTPUT_CAP);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut r = Rig::new();
        let mut empty: [u8; 0] = [];
        for off in [0, 1, 2, 3, 4, 5, 0x1000, u64::MAX] {
            r.kbd.read(off, &mut empty);
            r.kbd.write(off, &[]);
        }
        for off in [1, 2, 3, 5, 0x1000, u64::MAX] {
            let mut b = [0u8; 8];
            r.kbd.read(off, &mut b);
            assert_eq!(b, [0xff; 8]);
            r.kbd.write(off, &[0xfe, 0xfe, 0xfe]);
        }
        assert!(!r.control.stopping());
        // Wide access to the data port: first byte only.
        r.put(0xee);
        let mut w = [0u8; 4];
        r.kbd.read(DATA, &mut w);
        assert_eq!(w, [0xee, 0xff, 0xff, 0xff]);
        r.kbd.read(STATUS_CMD, &mut w);
        assert_eq!(w[0] & STS_OBF, 0);
        r.kbd.write(STATUS_CMD, &[0xfe, 0x00]);
        assert_eq!(r.control.stop_reason(), Some(StopReason::Reset));
    }
}
