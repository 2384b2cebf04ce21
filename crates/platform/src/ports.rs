//! The legacy I/O ports (the PCI I/O BAR window is in [`crate::map`]).

/// COM1..COM4's register blocks (8 ports each).
pub const COM_PORTS: [u16; 4] = [0x3f8, 0x2f8, 0x3e8, 0x2e8];
/// The i8042 (data 0x60, command/status 0x64).
pub const I8042_BASE: u16 = 0x60;
/// The RTC/CMOS index and data ports.
pub const RTC_PORT: u16 = 0x70;
/// The POST code port.
pub const POST_PORT: u16 = 0x80;
/// PCI configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC.
pub const PCI_CONFIG_PORT: u16 = 0xCF8;
pub const PCI_CONFIG_LEN: u16 = 8;
/// The reset control register (inside mechanism #1's range, forwarded by the PCI root).
pub const RESET_PORT: u16 = 0xCF9;
/// Offsets inside the ACPI PM block (its base is [`crate::map::PciLayout::pm_base`]).
pub const PM1A_EVT_OFFSET: u16 = 0;
pub const PM1A_EVT_LEN: u16 = 4;
pub const PM1A_CNT_OFFSET: u16 = 4;
pub const PM1A_CNT_LEN: u16 = 2;
pub const PM_TIMER_OFFSET: u16 = 8;
pub const PM_TIMER_LEN: u16 = 4;
