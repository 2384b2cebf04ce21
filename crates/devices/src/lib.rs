//! rhyve's device models, one per file, attached to address-range buses.
//!
//! Devices never see absolute addresses: the [`Bus`] hands them the offset inside their
//! range. Devices that end the VM (reset, power-off, pc-testdev's exit) do so through the
//! shared [`VmControl`], never by exiting the process themselves.

pub mod acpi_pm;
pub mod bus;
pub mod cfi_flash;
pub mod control;
pub mod debugcon;
pub mod fw_cfg;
pub mod i8042;
pub mod lifecycle;
pub mod limited_log;
pub mod pc_testdev;
pub mod pci;
pub mod post;
pub mod rate_limiter;
pub mod rtc;
pub mod threads;
pub mod uart;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// Stack size for every thread rhyve starts (vCPUs, device workers, console, control).
/// Rust's 2 MiB default is exactly one transparent huge page: on hosts with THP "always"
/// each stack became 2 MiB resident. Under 2 MiB a stack cannot hold an aligned huge page,
/// and only the pages a thread touches count; the threads here need a few tens of KiB.
pub const THREAD_STACK_SIZE: usize = 512 << 10;
pub use control::{StopReason, VmControl};
