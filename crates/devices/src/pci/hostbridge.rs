//! The PCI host bridge at 0:0.0: bhyve's `hostbridge` (vendor/device 0x1275) and
//! `amd_hostbridge` (AMD's 0x1022:0x7432). No BARs, no interrupts.

use super::{PciConfig, PciDevice};

/// Class 06/00/00: bridge, host bridge.
const CLASS_HOST_BRIDGE: (u8, u8, u8) = (0x06, 0x00, 0x00);

/// A host bridge function.
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    /// bhyve's `hostbridge`: NetApp's vendor id 0x1275, device 0x1275.
    pub fn new() -> Self {
        Self::with_ids(0x1275, 0x1275)
    }

    /// bhyve's `amd_hostbridge`: AMD 0x1022:0x7432.
    pub fn amd() -> Self {
        Self::with_ids(0x1022, 0x7432)
    }

    fn with_ids(vendor: u16, device: u16) -> Self {
        let mut config = PciConfig::new(vendor, device, CLASS_HOST_BRIDGE, 0);
        config.set_subsystem(vendor, device);
        Self { config }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
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
        let h = HostBridge::new();
        assert_eq!(h.config().read_u32(0), 0x1275_1275);
        assert_eq!(h.config().read_u32(8) >> 8, 0x06_00_00);
        let a = HostBridge::amd();
        assert_eq!(a.config().read_u32(0), 0x7432_1022);
        assert!((0..6).all(|b| a.config().bar_spec(b).is_none()));
    }
}
