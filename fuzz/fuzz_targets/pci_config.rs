//! A PCI function's configuration space under a sequence of guest reads and writes of any
//! offset and width (BAR sizing and moves, MSI and MSI-X capability writes, command bits):
//! each 8-byte record is (op, offset: u16, len, value: u32).
#![no_main]

use libfuzzer_sys::fuzz_target;

use devices::pci::config::PciConfig;
use devices::pci::{BarKind, BarSpec};

fuzz_target!(|data: &[u8]| {
    let mut c = PciConfig::new(0x1af4, 0x1041, (0x02, 0x00, 0x00), 1);
    let bar = |kind, size| BarSpec {
        kind,
        size,
        prefetchable: false,
    };
    c.add_bar(0, bar(BarKind::Mem32, 0x1000));
    c.add_bar(1, bar(BarKind::Io, 0x20));
    c.add_bar(2, bar(BarKind::Mem64, 0x4000));
    let _ = c.add_msix_capability(4, 0, 0, 0, 0x800);
    let _ = c.add_msi_capability();
    c.set_interrupt_pin(1);
    for rec in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([rec[1], rec[2]]));
        let len = usize::from(rec[3] % 9);
        let value = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]).to_le_bytes();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&value);
        if rec[0] & 1 == 0 {
            c.write(offset, &buf[..len]);
        } else {
            c.read(offset, &mut buf[..len]);
        }
        for b in 0..6 {
            let _ = c.bar_address(b);
        }
    }
});
