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

/// The identity firmware wants (QEMU's `pc` machine): Intel's i440FX 0x8086:0x1237 with
/// subsystem 0x1af4:0x1100 ("QEMU virtual machine"). SeaBIOS reads fw_cfg only behind this
/// subsystem ID and shadows itself on this device ID; OVMF accepts only a few host bridges,
/// this one among them.
pub const FIRMWARE_IDENTITY: HostBridgeIds = HostBridgeIds {
    vendor: 0x8086,
    device: 0x1237,
    subsystem_vendor: 0x1af4,
    subsystem: 0x1100,
};

/// A host bridge's IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostBridgeIds {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A host bridge with `ids`.
pub fn with_identity(ids: HostBridgeIds) -> ConfigOnlyFunction {
    let mut config = PciConfig::new(ids.vendor, ids.device, CLASS_HOST_BRIDGE, 0);
    config.set_subsystem(ids.subsystem_vendor, ids.subsystem);
    ConfigOnlyFunction::new(config)
}

fn with_ids(vendor: u16, device: u16) -> ConfigOnlyFunction {
    with_identity(HostBridgeIds {
        vendor,
        device,
        subsystem_vendor: vendor,
        subsystem: device,
    })
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
