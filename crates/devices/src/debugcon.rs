//! QEMU's ISA debug console at port 0x402: firmware debug output (SeaBIOS, OVMF's DEBUG
//! builds and OVMF's debug log) byte by byte. Reads return 0xE9, the value firmware checks
//! to know the port is there.

use std::io::Write;

/// The port SeaBIOS and OVMF write their debug log to.
pub const DEBUGCON_PORT: u16 = 0x402;
/// What a read returns (QEMU's `isa-debugcon` readback).
const PRESENT: u8 = 0xe9;

/// The device, writing to `out`.
pub struct DebugCon {
    out: Box<dyn Write + Send>,
    failed: bool,
}

impl DebugCon {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out, failed: false }
    }
}

impl crate::BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(PRESENT);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Firmware writes one byte per OUT; a failing sink is reported once, then ignored.
        if !self.failed {
            if let Err(e) = self.out.write_all(data).and_then(|()| self.out.flush()) {
                log::warn!("debugcon: {e}; further output dropped");
                self.failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uart::tests::Sink;
    use crate::BusDevice;

    #[test]
    fn reads_e9_and_writes_through() {
        let sink = Sink::default();
        let got = sink.0.clone();
        let mut d = DebugCon::new(Box::new(sink));
        let mut b = [0u8];
        d.read(0, &mut b);
        assert_eq!(b[0], 0xe9);
        d.write(0, b"ok\n");
        assert_eq!(&*got.lock().unwrap(), b"ok\n");
    }
}
