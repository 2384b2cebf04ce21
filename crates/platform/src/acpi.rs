//! How a device describes itself to the guest's ACPI tables: a `\_SB` device with a hardware
//! id and its resources. Each device model states its own (`devices::uart::acpi_device`, ...);
//! machine assembly collects those of the devices it actually placed, and the loader encodes
//! them into the DSDT after the devices exist.

/// One ISA-style device in the DSDT: `Device (NAME) { _HID, [_UID,] _CRS { IO..., IRQ } }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiDevice {
    /// The 4-character AML name (`COM1`, `RTC_`).
    pub name: &'static str,
    /// EISA id (`PNP0501`).
    pub hid: &'static str,
    pub uid: Option<u8>,
    /// I/O port ranges: (base, length).
    pub io: Vec<(u16, u8)>,
    /// The ISA IRQ it raises.
    pub irq: Option<u8>,
}
