//! bhyve's `-l pc-testdev` (QEMU's pc-testdev layout): lets test guests end the VM with a
//! chosen status, and provides scratch port/memory and IRQ lines to poke.

use std::sync::Arc;

use crate::{BusDevice, StopReason, VmControl};

/// Debug-exit port: a write of N exits the VMM with status (N << 1) | 1.
pub const DEBUGEXIT_PORT: u16 = 0xf4;
pub const DEBUGEXIT_LEN: u64 = 4;
/// A 32-bit scratch I/O register.
pub const IOPORT_BASE: u16 = 0xe0;
pub const IOPORT_LEN: u64 = 4;
/// Scratch MMIO window.
pub const IOMEM_BASE: u64 = 0xff00_0000;
pub const IOMEM_LEN: u64 = 0x1_0000;
/// IRQ lines: byte N (0..24) = level of GSI N.
pub const IRQ_BASE: u16 = 0x2000;
pub const IRQ_LEN: u64 = 24;

fn le_u32(data: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    for (w, b) in word.iter_mut().zip(data) {
        *w = *b;
    }
    u32::from_le_bytes(word)
}

/// The debug-exit port.
pub struct DebugExit(pub Arc<VmControl>);

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Statuses are truncated to 8 bits by the OS anyway; keep the same arithmetic as bhyve.
        let value = le_u32(data);
        let status = (value.wrapping_shl(1) | 1) as i32 & 0xff;
        self.0.request_stop(StopReason::GuestExit(status));
    }
}

/// Scratch storage, for the I/O-port and MMIO windows.
pub struct Scratch(Vec<u8>);

impl Scratch {
    /// `len` zeroed bytes.
    pub fn new(len: u64) -> Self {
        Self(vec![0; len as usize])
    }
}

impl BusDevice for Scratch {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.0.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.0.get_mut(o))
            {
                *slot = *b;
            }
        }
    }
}

/// IRQ line driver: a write of v to byte N sets GSI N's level to (v != 0).
pub struct IrqLines {
    set_line: Box<dyn Fn(u32, bool) + Send>,
}

impl IrqLines {
    /// Drives lines through `set_line(gsi, level)`.
    pub fn new(set_line: Box<dyn Fn(u32, bool) + Send>) -> Self {
        Self { set_line }
    }
}

impl BusDevice for IrqLines {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &level) in data.iter().enumerate() {
            let Some(gsi) = offset.checked_add(i as u64) else {
                return;
            };
            if gsi < IRQ_LEN {
                (self.set_line)(gsi as u32, level != 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn debug_exit_status() {
        let c = Arc::new(VmControl::new());
        DebugExit(c.clone()).write(0, &[0x10, 0, 0, 0]);
        assert_eq!(c.stop_reason(), Some(StopReason::GuestExit(0x21)));
        let c = Arc::new(VmControl::new());
        DebugExit(c.clone()).write(0, &[0]);
        assert_eq!(c.stop_reason(), Some(StopReason::GuestExit(1)));
        let c = Arc::new(VmControl::new());
        DebugExit(c.clone()).write(0, &[]);
        assert_eq!(c.stop_reason(), Some(StopReason::GuestExit(1)));
    }

    #[test]
    fn scratch_bounds() {
        let mut s = Scratch::new(4);
        s.write(2, &[1, 2, 3, 4]);
        let mut b = [9u8; 4];
        s.read(2, &mut b);
        assert_eq!(b, [1, 2, 0, 0]);
        s.write(u64::MAX, &[1, 2]);
        s.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn irq_lines_in_range_only() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut lines = IrqLines::new(Box::new(move |g, l| s2.lock().unwrap().push((g, l))));
        lines.write(5, &[1, 0]);
        lines.write(23, &[1, 1, 1]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(5, true), (6, false), (23, true)]
        );
    }
}
