//! The LPC (PCI-to-ISA) bridge, bhyve's `lpc` at slot 31: Intel 0x8086:0x7000 (the PIIX3
//! ISA bridge), class 06/01/00. The legacy devices it carries (UARTs, RTC, i8042, PM) stay
//! on the port bus where `-l` puts them; this function only makes the bridge visible.

use super::{PciConfig, PciDevice};

/// The LPC bridge function.
pub struct LpcBridge {
    config: PciConfig,
}

impl LpcBridge {
    /// The bridge with bhyve's identity.
    pub fn new() -> Self {
        let mut config = PciConfig::new(0x8086, 0x7000, (0x06, 0x01, 0x00), 0);
        config.set_subsystem(0x8086, 0x7000);
        Self { config }
    }
}

impl Default for LpcBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for LpcBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_class() {
        let l = LpcBridge::new();
        assert_eq!(l.config().read_u32(0), 0x7000_8086);
        assert_eq!(l.config().read_u32(8) >> 8, 0x06_01_00);
        assert_eq!(l.config().interrupt_pin(), 0);
    }
}
