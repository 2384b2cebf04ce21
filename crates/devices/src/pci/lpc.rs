//! The LPC (PCI-to-ISA) bridge, bhyve's `lpc` at slot 31: Intel 0x8086:0x7000 (the PIIX3
//! ISA bridge), class 06/01/00. The legacy devices it carries (UARTs, RTC, i8042, PM) stay
//! on the port bus where `-l` puts them; this function only makes the bridge visible.

use super::{ConfigOnlyFunction, PciConfig};

/// The LPC bridge with bhyve's identity.
pub fn lpc_bridge() -> ConfigOnlyFunction {
    let mut config = PciConfig::new(0x8086, 0x7000, (0x06, 0x01, 0x00), 0);
    config.set_subsystem(0x8086, 0x7000);
    ConfigOnlyFunction::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciDevice;

    #[test]
    fn ids_and_class() {
        let l = lpc_bridge();
        assert_eq!(l.config().read_u32(0), 0x7000_8086);
        assert_eq!(l.config().read_u32(8) >> 8, 0x06_01_00);
        assert_eq!(l.config().interrupt_pin(), 0);
    }
}
