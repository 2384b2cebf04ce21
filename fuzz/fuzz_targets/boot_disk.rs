//! rhyveload's disk discovery on a hostile image: partition tables (MBR, GPT), ext2/3/4 and
//! FAT filesystems, qcow2 (when the image says so), and the boot configurations found in
//! them (grub.cfg, BLS entries, extlinux.conf). An error is fine; a panic is not.
#![no_main]

use std::rc::Rc;

use bootdisk::{find_boot_on_disk, open_qcow2, Disk, MemDisk, Options};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = Options {
        max_file_bytes: 1 << 20,
        ..Options::default()
    };
    let disk: Rc<dyn Disk> = Rc::new(MemDisk {
        data: data.to_vec(),
        name: "fuzz".into(),
    });
    let disk = if data.starts_with(b"QFI\xfb") {
        match open_qcow2(disk) {
            Ok(d) => d,
            Err(_) => return,
        }
    } else {
        disk
    };
    let _ = find_boot_on_disk(disk, &opts);
});
