//! Device memory mapped into a running VM after creation (what a passed-through BAR needs),
//! on this machine's KVM: a 64-bit guest reads an address in the PCI window; mapped, the read
//! reaches the host memory with no exit; unmapped, it is an MMIO exit again; mapped again (a
//! reused slot), no exit.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vmmapi::{HostMemory, Hypervisor, MemoryOptions, Vm, VmExit};

/// Where the guest reads: inside direct boot's 32-bit BAR window.
const BAR: u64 = 0xD000_0000;
/// The guest's code.
const CODE: u64 = 0x10_0000;

/// One anonymous page, filled with a byte.
struct Page(*mut libc::c_void);

// SAFETY: a private mapping owned by the value.
unsafe impl Send for Page {}
// SAFETY: as above.
unsafe impl Sync for Page {}

impl Page {
    fn new(fill: u8) -> Page {
        // SAFETY: a fresh anonymous mapping of one page.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the page is ours and writable.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), fill, 4096) };
        Page(p)
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer in any VM (the slot holding it is gone).
        unsafe { libc::munmap(self.0, 4096) };
    }
}

// SAFETY: the page stays mapped for the value's life.
unsafe impl HostMemory for Page {
    fn host_addr(&self) -> u64 {
        self.0 as u64
    }
    fn len(&self) -> u64 {
        4096
    }
}

/// Runs the guest from CODE until its `out` to port 0x80; the MMIO reads on the way (each
/// answered with 0x33) and the byte it wrote.
fn read_once(vm: &Vm, vcpu: &mut vmmapi::Vcpu) -> (Vec<u64>, u8) {
    let entry = loader::entry::long_mode(CODE, 0);
    vmm::boot::set_entry_state(vcpu, &entry).unwrap();
    let mut mmio = Vec::new();
    for _ in 0..10 {
        match vcpu.run().unwrap() {
            VmExit::MmioRead { addr, data } => {
                mmio.push(addr);
                data.fill(0x33);
            }
            VmExit::IoOut {
                port: 0x80, data, ..
            } => return (mmio, data[0]),
            VmExit::Interrupted => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let _ = vm;
    panic!("the guest never wrote port 0x80");
}

#[test]
fn device_memory_is_mapped_without_exits_and_unmapped_again() {
    let hv = Hypervisor::open()
        .unwrap_or_else(|e| panic!("this test boots a guest on KVM and could not open it: {e}"));
    let base = std::env::temp_dir().join(format!("rhyve-devmem-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    std::env::set_var("RHYVE_RUNDIR", &base);
    let vm = Vm::create(&hv, "devmem", &[(0, 4 << 20)], &MemoryOptions::default()).unwrap();
    let mem = vm.ram().memory();
    loader::entry::write_descriptor_tables(mem).unwrap();
    loader::entry::write_page_tables(mem).unwrap();
    // movabs al, [BAR]; out 0x80, al; (then spin: the test never runs it)
    let mut code = vec![0xA0];
    code.extend_from_slice(&BAR.to_le_bytes());
    code.extend_from_slice(&[0xE6, 0x80, 0xEB, 0xFE]);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let mut vcpu = vm.create_vcpu(0, &vmmapi::Topology::flat(1)).unwrap();

    // Not mapped: the read is an exit.
    assert_eq!(read_once(&vm, &mut vcpu), (vec![BAR], 0x33));
    // Mapped: it reads the page, no exit.
    let slot = vm
        .map_device_memory(BAR, Arc::new(Page::new(0x5A)), false)
        .unwrap();
    assert_eq!(slot.gpa(), BAR);
    assert_eq!(read_once(&vm, &mut vcpu), (vec![], 0x5A));
    // Unmapped: exits again (the handle is consumed: it cannot be unmapped twice).
    vm.unmap_device_memory(slot).unwrap();
    assert_eq!(read_once(&vm, &mut vcpu), (vec![BAR], 0x33));
    // Another page in the freed slot.
    let again = vm
        .map_device_memory(BAR, Arc::new(Page::new(0xC3)), true)
        .unwrap();
    assert_eq!(read_once(&vm, &mut vcpu), (vec![], 0xC3));
    // Bad requests are refused, not mapped: unaligned, overlapping what is there.
    assert!(vm
        .map_device_memory(BAR + 1, Arc::new(Page::new(0)), false)
        .is_err());
    assert!(vm
        .map_device_memory(BAR, Arc::new(Page::new(0)), false)
        .is_err());
    assert!(vm
        .map_device_memory(0, Arc::new(Page::new(0)), false)
        .is_err());
    vm.unmap_device_memory(again).unwrap();
    drop(vcpu);
    drop(vm);
    let _ = std::fs::remove_dir_all(&base);
}
