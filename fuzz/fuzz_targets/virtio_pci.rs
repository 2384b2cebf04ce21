//! The virtio-pci transport under any sequence of guest accesses: common configuration
//! (feature selection and negotiation, status including DRIVER_OK and reset, queue
//! selection, sizes, addresses anywhere, enable), notify, ISR and device configuration in
//! BAR 4, the MSI-X table and PBA in BAR 1, and configuration space (capabilities, the
//! PCI-configuration access window). Behind it a virtio-rnd, whose worker really starts on
//! DRIVER_OK over guest memory the input also fills. Each 12-byte record is (target,
//! offset: u16, width, value: u64). Nothing may panic.
#![no_main]

use std::io;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use devices::pci::{InterruptSink, PciDevice};
use devices::virtio::pci::{IoEventRegistrar, VirtioPci, MSIX_BAR, VIRTIO_BAR};
use devices::virtio::Rng;

struct NoInterrupts;

impl InterruptSink for NoInterrupts {
    fn msi(&self, _: u64, _: u32) {}
    fn intx(&self, _: bool) {}
}

struct NoIoEvents;

impl IoEventRegistrar for NoIoEvents {
    fn register(&self, _: &EventFd, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn unregister(&self, _: &EventFd, _: u64) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // The first 4 KiB (if that long) are guest memory at 0: rings and buffers.
    let (ram, ops) = data.split_at(data.len().min(4096));
    let (mem, _) = rhyve_fuzz::guest_queues(&[], 0);
    let _ = mem.write_slice(ram, GuestAddress(0));
    let Ok(mut pci) = VirtioPci::new(
        Box::new(Rng::new()),
        mem,
        Arc::new(NoInterrupts),
        Box::new(NoIoEvents),
    ) else {
        return;
    };
    pci.bar_moved(VIRTIO_BAR, Some(0xc000_0000));
    for rec in ops.chunks_exact(12) {
        let offset = u64::from(u16::from_le_bytes([rec[1], rec[2]]));
        let len = [1usize, 2, 4, 8][usize::from(rec[3] % 4)];
        let mut value = [0u8; 8];
        value.copy_from_slice(&rec[4..12]);
        let write = rec[0] & 0x80 == 0;
        match rec[0] % 4 {
            0 => {
                if write {
                    pci.bar_write(VIRTIO_BAR, offset % 0x4000, &value[..len]);
                } else {
                    pci.bar_read(VIRTIO_BAR, offset % 0x4000, &mut value[..len]);
                }
            }
            1 => {
                if write {
                    pci.bar_write(MSIX_BAR, offset % 0x1000, &value[..len]);
                } else {
                    pci.bar_read(MSIX_BAR, offset % 0x1000, &mut value[..len]);
                }
            }
            2 => {
                let off = offset % 0x1000;
                if write {
                    pci.config_mut().write(off, &value[..len.min(4)]);
                    pci.config_written(off as u16, len.min(4));
                } else {
                    pci.config().read(off, &mut value[..len.min(4)]);
                }
            }
            _ => pci.bar_moved(VIRTIO_BAR, (offset != 0).then_some(0xc000_0000 + (offset << 14))),
        }
    }
    // Dropping the device stops its worker, if DRIVER_OK started one.
});
