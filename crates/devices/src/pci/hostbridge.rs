//! The PCI host bridge at 0:0.0: bhyve's `hostbridge` (vendor/device 0x1275) and
//! `amd_hostbridge` (AMD's 0x1022:0x7432). No BARs, no interrupts.

use super::{ConfigOnlyFunction, PciConfig};

/// Class 06/00/00: bridge, host bridge.
const CLASS_HOST_BRIDGE: (u8, u8, u8) = (0x06, 0x00, 0x00);

/// bhyve's `hostbridge`: NetApp's vendor id 0x1275, device 0x1275.
pub fn hostbridge() -> ConfigOnlyFunction {
    with_ids(0x1275, 0x1275)
}

/// bhyve's `amd_hostbridge`: AMD 0x1022:0x7432.
pub fn amd_hostbridge() -> ConfigOnlyFunction {
    with_ids(0x1022, 0x7432)
}

fn with_ids(vendor: u16, device: u16) -> ConfigOnlyFunction {
    let mut config = PciConfig::new(vendor, device, CLASS_HOST_BRIDGE, 0);
    config.set_subsystem(vendor, device);
    ConfigOnlyFunction::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciDevice;

    #[test]
    fn ids_and_class() {
        let h = hostbridge();
        assert_eq!(h.config().read_u32(0), 0x1275_1275);
        assert_eq!(h.config().read_u32(8) >> 8, 0x06_00_00);
        let a = amd_hostbridge();
        assert_eq!(a.config().read_u32(0), 0x7432_1022);
        assert!((0..6).all(|b| a.config().bar_spec(b).is_none()));
    }
}
