//! rhyve's test guests and the helpers integration tests use to boot them.
//!
//! The images are built from guests/ by this package's build script; see guests/README.md for
//! the guest's command line keys and its report format.

pub mod harness;
pub mod image;
pub mod netns;

/// The test guest as a bzImage (Linux boot protocol 2.15, 64-bit entry at payload offset 0x200).
pub const TESTGUEST_BZIMAGE: &str = env!("RHYVE_TESTGUEST_BZIMAGE");
/// The same guest as an ELF with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY).
pub const TESTGUEST_PVH: &str = env!("RHYVE_TESTGUEST_PVH");

/// Image path by short name, as `rhyve-guest-path NAME` takes it.
pub fn guest_path(name: &str) -> Option<&'static str> {
    match name {
        "bzimage" | "testguest.bzimage" => Some(TESTGUEST_BZIMAGE),
        "pvh" | "testguest.pvh" => Some(TESTGUEST_PVH),
        _ => None,
    }
}

/// Names `guest_path` knows.
pub const GUEST_NAMES: &[&str] = &["bzimage", "pvh"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_header() {
        let img = std::fs::read(TESTGUEST_BZIMAGE).unwrap();
        let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap());
        assert_eq!(u16_at(0x1fe), 0xaa55);
        assert_eq!(&img[0x202..0x206], b"HdrS");
        assert_eq!(u16_at(0x206), 0x020f);
        assert_eq!(img[0x211] & 1, 1, "LOADED_HIGH");
        assert_eq!(
            u16_at(0x236),
            3,
            "XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G"
        );
        assert_eq!(u32_at(0x230), 0x20_0000);
        assert_eq!(u32_at(0x238), 2047);
        let setup_len = (img[0x1f1] as usize + 1) * 512;
        let payload = &img[setup_len..];
        assert_eq!(payload.len(), u32_at(0x1f4) as usize * 16, "syssize");
        assert!(u32_at(0x260) as usize >= payload.len(), "init_size");
        assert_eq!(
            &payload[u32_at(0x268) as usize..][..4],
            b"LToP",
            "kernel_info"
        );
        // startup_64 starts with `lea rsp, [rip+..]` (48 8d 25).
        assert_eq!(&payload[0x200..0x203], &[0x48, 0x8d, 0x25]);
    }

    #[test]
    fn pvh_note() {
        let elf = std::fs::read(TESTGUEST_PVH).unwrap();
        let entry = image::pvh_entry(&elf).unwrap();
        assert!((0x10_0000..0x20_0000).contains(&entry));
    }

    #[test]
    fn fixture_is_deterministic() {
        let a = image::initrd_fixture(4096, 7);
        assert_eq!(a, image::initrd_fixture(4096, 7));
        assert_ne!(a, image::initrd_fixture(4096, 8));
        assert_eq!(image::fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(image::fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
