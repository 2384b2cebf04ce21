//! The x86 PC that rhyve emulates, stated once: where RAM, the PCI windows, ECAM and the
//! interrupt controllers sit ([`map`]), which interrupt line each device uses ([`irq`]),
//! the legacy I/O ports ([`ports`]), the allocator that hands out BAR space ([`alloc`]),
//! and how a device describes itself to ACPI ([`acpi`]).
//! The loader (e820, ACPI tables), the devices (decoding) and machine assembly (bus
//! placement) all read it from here, so the tables a guest reads and the decoding it gets
//! cannot drift apart.
//!
//! ```text
//! [0, 3 GiB)                  RAM (low part)
//! [3 GiB, 3.5 GiB)            32-bit PCI BARs (direct boot)
//! [3.5 GiB, 3.75 GiB)         ECAM, bus 0 (direct boot)
//! 0xFEC0_0000                 I/O APIC
//! 0xFEE0_0000                 local APICs
//! [4 GiB, 4 GiB + rest)       RAM above 3 GiB of a larger guest
//! [512 GiB, 576 GiB)          64-bit PCI BARs (direct boot)
//! ```

pub mod acpi;
pub mod alloc;
pub mod codec;
pub mod irq;
pub mod map;
pub mod ports;
