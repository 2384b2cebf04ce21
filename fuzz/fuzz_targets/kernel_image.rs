//! The host-side kernel loader on a hostile image: bzImage headers (setup sectors, protocol
//! version, init_size, handover, relocation) and ELF vmlinux with PVH notes, loaded into a
//! 64 MiB guest with an initrd and a command line. An error is fine; a panic is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const RAM: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let cfg = loader::BootBytes {
        kernel: data,
        kernel_name: "fuzz",
        initrd: Some(("initrd", &data[..data.len().min(4096)])),
        cmdline: "console=ttyS0",
        ram_bytes: RAM,
        rsdp_addr: Some(0xf_2000),
    };
    let _ = loader::load_bytes(&mem, &cfg);
});
