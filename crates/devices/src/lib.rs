//! rhyve's device models, one per file, attached to address-range buses.
//!
//! Devices never see absolute addresses: the [`Bus`] hands them the offset inside their
//! range. Devices that end the VM (reset, power-off, pc-testdev's exit) do so through the
//! shared [`VmControl`], never by exiting the process themselves.

pub mod acpi_pm;
pub mod bus;
pub mod control;
pub mod i8042;
pub mod pc_testdev;
pub mod pci;
pub mod post;
pub mod rtc;
pub mod uart;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use control::{StopReason, VmControl};
