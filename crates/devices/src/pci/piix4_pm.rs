//! The PIIX4 power-management function (Intel 0x8086:0x7113, class 06/80/00) at 00:01.3, as
//! on QEMU's `pc` machine, config space only. OVMF on an i440FX host bridge takes its ACPI
//! timer from here: PMBA (0x40) + 8, once PMREGMISC (0x80) bit 0 says the block is enabled.
//! Both read as already programmed, read-only, with PMBA at the PM block rhyve decodes
//! (0x600 behind a boot ROM, timer at +8), so firmware never moves it.
//!
//! It is function 3 of a slot without a function 0: an OS's bus scan never sees it (no
//! PIIX4 quirks, no second ACPI block), firmware reads it by address.

use super::{ConfigOnlyFunction, PciConfig};

/// PMBA: the PM I/O block's base; bit 0 marks an I/O address.
const PMBA: u16 = 0x40;
/// PMREGMISC: bit 0 (PMIOSE) enables the PM I/O block.
const PMREGMISC: u16 = 0x80;

/// The function for a PM block at `pm_base`.
pub fn piix4_pm(pm_base: u16) -> ConfigOnlyFunction {
    let mut config = PciConfig::new(0x8086, 0x7113, (0x06, 0x80, 0x00), 0x03);
    config.set_subsystem(0x1af4, 0x1100);
    config.set_u32(PMBA, u32::from(pm_base) | 1);
    config.set_u8(PMREGMISC, 1);
    ConfigOnlyFunction::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciDevice;

    #[test]
    fn pm_base_is_programmed_and_stays() {
        let mut f = piix4_pm(0x400);
        assert_eq!(f.config().read_u32(0), 0x7113_8086);
        f.config_mut().write(0x40, &0xb001u32.to_le_bytes());
        f.config_mut().write(0x80, &[0]);
        assert_eq!(f.config().read_u32(0x40), 0x401);
        let mut b = [0u8];
        f.config().read(0x80, &mut b);
        assert_eq!(b[0], 1);
    }
}
