//! i8042 keyboard controller, as much as a guest needs to reset the machine (0xFE → 0x64).

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::{BusDevice, StopReason, VmControl};

/// Data port 0x60 and command port 0x64 are 4 apart; the device spans both.
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u64 = 5;

/// Turns the controller's reset line into a VM reset request.
pub struct ResetLine(pub Arc<VmControl>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_stop(StopReason::Reset);
        Ok(())
    }
}

/// The i8042 at 0x60/0x64.
pub struct I8042 {
    dev: I8042Device<ResetLine>,
}

impl I8042 {
    /// A controller whose reset pulse asks `control` for a reset.
    pub fn new(control: Arc<VmControl>) -> Self {
        Self {
            dev: I8042Device::new(ResetLine(control)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.dev.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.dev.write(off, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulse_reset_line() {
        let control = Arc::new(VmControl::new());
        let mut kbd = I8042::new(control.clone());
        kbd.write(0, &[0xfe]); // data port: not a reset
        assert!(!control.stopping());
        kbd.write(4, &[0xfe]);
        assert_eq!(control.stop_reason(), Some(StopReason::Reset));
    }
}
