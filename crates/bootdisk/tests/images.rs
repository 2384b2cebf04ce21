//! Real images built with the real tools, each kind of boot configuration, the right entry
//! chosen and the kernel/initrd bytes equal to what was put in; corrupt images give clean errors.

mod common;

use bootdisk::{find_boot_in_image, BootSource, Error, Options};
use common::*;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

const ROOT_UUID: &str = "0b3a9a5e-63f4-4a43-9d52-3c1c5f1a7e01";
const BOOT_UUID: &str = "5d1f6c2e-8a55-4f1b-b5e0-7a0c4d9e2b02";

// GPT layout used below (16 MiB disk): ESP sectors 2048..=10239, root 10240..=26623.
const ESP: (u64, u64) = (2048, 10239);
const ROOT: (u64, u64) = (10240, 26623);

fn opts() -> Options {
    Options::default()
}

fn with_entry(e: &str) -> Options {
    Options {
        entry: Some(e.into()),
        ..Options::default()
    }
}

fn boot(img: &Path, o: &Options) -> bootdisk::BootSelection {
    find_boot_in_image(img, o).unwrap_or_else(|e| panic!("{}: {e}", img.display()))
}

fn err(img: &Path, o: &Options) -> Error {
    match find_boot_in_image(img, o) {
        Ok(s) => panic!("{}: expected an error, got {:?}", img.display(), s.title),
        Err(e) => {
            let m = e.to_string();
            assert!(!m.contains('\n') && !m.is_empty(), "one-line error: {m}");
            e
        }
    }
}

/// GPT: ESP (FAT) with BLS entries and kernels, plus an ext4 root that also has Debian
/// symlinks (BLS must win). Returns the disk and the two kernels/initrds.
fn bls_disk(t: &Tmp) -> (std::path::PathBuf, [Vec<u8>; 4]) {
    let (k1, i1, k2, i2) = (
        rand_bytes(1, 70_001),
        rand_bytes(2, 30_003),
        rand_bytes(3, 80_000),
        rand_bytes(4, 12_345),
    );
    let e1 = "title Debian 6.1\nversion 6.1.0\nlinux /debian/6.1/linux\ninitrd /debian/6.1/initrd\noptions root=UUID=0b3a9a5e-63f4-4a43-9d52-3c1c5f1a7e01 ro quiet\n";
    let e2 = "# newer\ntitle Debian 6.10\nversion 6.10.0\nlinux /debian/6.10/linux\ninitrd /debian/6.10/initrd\noptions root=UUID=0b3a9a5e-63f4-4a43-9d52-3c1c5f1a7e01 ro\noptions console=ttyS0\n";
    let esp = mkfat(
        t,
        "esp.img",
        4096,
        &[],
        &[
            ("/loader/entries/debian-6.1.conf", e1.as_bytes()),
            ("/loader/entries/debian-6.10.conf", e2.as_bytes()),
            ("/debian/6.1/linux", &k1),
            ("/debian/6.1/initrd", &i1),
            ("/debian/6.10/linux", &k2),
            ("/debian/6.10/initrd", &i2),
        ],
    );
    let other = rand_bytes(9, 100);
    let root = mkext4(
        t,
        "root.img",
        8,
        ROOT_UUID,
        &[
            Item::File("/boot/vmlinuz-old", &other),
            Item::Link("/vmlinuz", "boot/vmlinuz-old"),
            Item::File("/etc/hostname", b"guest\n"),
        ],
    );
    let disk = t.p("disk.img");
    gpt(
        &disk,
        16,
        &[(ESP.0, ESP.1, "ef00"), (ROOT.0, ROOT.1, "8300")],
    );
    place(&disk, ESP.0, &esp);
    place(&disk, ROOT.0, &root);
    (disk, [k1, i1, k2, i2])
}

#[test]
fn bls_entries_on_an_esp_in_gpt_raw_and_qcow2() {
    let t = Tmp::new("bls");
    let (disk, [k1, i1, k2, i2]) = bls_disk(&t);
    let q = t.p("disk.qcow2");
    to_qcow2(&disk, &q, &[]);
    for img in [&disk, &q] {
        let s = boot(img, &opts());
        assert_eq!(s.source, BootSource::Bls);
        assert_eq!(
            s.title.as_deref(),
            Some("Debian 6.10"),
            "highest version sorts first"
        );
        assert_eq!(s.kernel_path, "/debian/6.10/linux");
        assert!(s.kernel == k2, "kernel bytes differ");
        assert!(s.initrd.as_deref() == Some(&i2[..]), "initrd bytes differ");
        assert_eq!(s.cmdline, format!("root=UUID={ROOT_UUID} ro console=ttyS0"));
        for sel in ["debian-6.1", "Debian 6.1", "1", "debian-6.1.conf"] {
            let s = boot(img, &with_entry(sel));
            assert_eq!(s.title.as_deref(), Some("Debian 6.1"), "entry={sel}");
            assert!(s.kernel == k1 && s.initrd.as_deref() == Some(&i1[..]));
            assert_eq!(s.cmdline, format!("root=UUID={ROOT_UUID} ro quiet"));
        }
        // The Debian symlinks on the root partition are reachable by naming them.
        let s = boot(img, &with_entry("/vmlinuz"));
        assert_eq!(s.source, BootSource::DebianSymlinks);
        assert_eq!(s.kernel, rand_bytes(9, 100));
        let o = Options {
            cmdline: Some("root=/dev/vda2 console=ttyS0".into()),
            ..opts()
        };
        assert_eq!(boot(img, &o).cmdline, "root=/dev/vda2 console=ttyS0");
        let o = Options {
            max_file_bytes: 50_000,
            ..opts()
        };
        assert!(matches!(
            err(img, &o),
            Error::FileTooBig { size: 80_000, .. }
        ));
        assert!(matches!(
            err(img, &with_entry("nope")),
            Error::EntryNotFound { .. }
        ));
    }
}

#[test]
fn block_device_through_a_loop_device() {
    let t = Tmp::new("loopdev");
    let (disk, [_, _, k2, i2]) = bls_disk(&t);
    let dev = Loop::attach(&disk);
    assert!(std::fs::metadata(&dev.0)
        .unwrap()
        .file_type()
        .is_block_device());
    let s = boot(&dev.0, &opts());
    assert_eq!(s.title.as_deref(), Some("Debian 6.10"));
    assert!(s.kernel == k2 && s.initrd.as_deref() == Some(&i2[..]));
}

const GRUB_CFG: &str = r#"#
# DO NOT EDIT THIS FILE
#
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="1>1"
fi
if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi
export menuentry_id_option
function load_video {
  if [ x$feature_all_video_module = xy ]; then
    insmod all_video
  else
    insmod efi_gop
  fi
}
set kver=6.1.0-13-amd64
set rootopts="root=UUID=0b3a9a5e-63f4-4a43-9d52-3c1c5f1a7e01 ro"
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-simple-x' {
	load_video
	insmod gzio
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	insmod part_msdos
	insmod ext2
	search --no-floppy --fs-uuid --set=root 0b3a9a5e-63f4-4a43-9d52-3c1c5f1a7e01
	echo	'Loading Linux 6.1.0-13-amd64 ...'
	linux	/boot/vmlinuz-${kver} $rootopts quiet
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-$kver
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-x' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-13-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-13-amd64-advanced-x' {
		linux	/boot/vmlinuz-6.1.0-13-amd64 ${rootopts} quiet
		initrd	/boot/initrd.img-6.1.0-13-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-13-amd64 (recovery mode)' --class debian $menuentry_id_option 'gnulinux-6.1.0-13-amd64-recovery-x' {
		linux	/boot/vmlinuz-6.1.0-13-amd64 ${rootopts} single
		initrd	/boot/initrd.img-6.1.0-13-amd64 /boot/microcode.img
	}
}
"#;

#[test]
fn bls_on_a_whole_disk_fat32_esp_with_long_names() {
    let t = Tmp::new("fat32");
    let (k, i) = (rand_bytes(81, 150_000), rand_bytes(82, 65_537));
    let e = "title Arch Linux\nlinux /EFI/Arch Linux/vmlinuz-linux\ninitrd /EFI/Arch Linux/initramfs-linux.img\noptions root=PARTUUID=abc rw\n";
    // mtools needs a full-size FAT32 (65525+ clusters): 33 MiB, sparse (about 1 MiB written).
    let esp = mkfat(
        &t,
        "esp.img",
        34000,
        &["-F", "32", "-s", "1"],
        &[
            ("/loader/loader.conf", b"timeout 3\ndefault arch-*\n"),
            (
                "/loader/entries/arch-fallback.conf",
                b"title Fallback\nlinux /nope\n",
            ),
            ("/loader/entries/arch-linux.conf", e.as_bytes()),
            ("/EFI/Arch Linux/vmlinuz-linux", &k),
            ("/EFI/Arch Linux/initramfs-linux.img", &i),
        ],
    );
    // loader.conf's "default arch-*" matches both; the first in sort order (arch-linux sorts
    // before arch-fallback: file names in descending order) wins.
    let s = boot(&esp, &opts());
    assert_eq!(
        (s.source, s.title.as_deref()),
        (BootSource::Bls, Some("Arch Linux"))
    );
    assert!(s.kernel == k && s.initrd.as_deref() == Some(&i[..]));
    assert_eq!(s.kernel_path, "/EFI/Arch Linux/vmlinuz-linux");
    assert_eq!(s.cmdline, "root=PARTUUID=abc rw");
    let e = err(&esp, &with_entry("Fallback"));
    assert!(matches!(e, Error::NoKernel(_)), "{e}");
}

#[test]
fn grub_cfg_on_an_mbr_root_partition_with_default_and_variables() {
    let t = Tmp::new("grub");
    let (k, i, ucode) = (
        rand_bytes(11, 50_000),
        rand_bytes(12, 20_001),
        rand_bytes(13, 3),
    );
    let root = mkext4(
        &t,
        "root.img",
        8,
        ROOT_UUID,
        &[
            Item::File("/boot/grub/grub.cfg", GRUB_CFG.as_bytes()),
            Item::File("/boot/vmlinuz-6.1.0-13-amd64", &k),
            Item::File("/boot/initrd.img-6.1.0-13-amd64", &i),
            Item::File("/boot/microcode.img", &ucode),
            Item::Link("/vmlinuz", "boot/vmlinuz-6.1.0-13-amd64"),
        ],
    );
    let disk = t.p("disk.img");
    mbr(&disk, 12, &[(2048, 16384, "83")]);
    place(&disk, 2048, &root);
    let s = boot(&disk, &opts());
    assert_eq!(s.source, BootSource::Grub);
    assert_eq!(
        s.title.as_deref(),
        Some("Debian GNU/Linux, with Linux 6.1.0-13-amd64 (recovery mode)"),
        "set default=\"1>1\" picks the second entry of the submenu"
    );
    assert!(s.kernel == k);
    // Two initrds are concatenated, the second 4-byte aligned.
    let mut want = i.clone();
    want.resize(want.len().next_multiple_of(4), 0);
    want.extend_from_slice(&ucode);
    assert!(s.initrd.as_deref() == Some(&want[..]));
    assert_eq!(
        s.initrd_path.as_deref(),
        Some("/boot/initrd.img-6.1.0-13-amd64 /boot/microcode.img")
    );
    assert_eq!(s.cmdline, format!("root=UUID={ROOT_UUID} ro single"));
    let s = boot(&disk, &with_entry("gnulinux-simple-x"));
    assert_eq!(s.title.as_deref(), Some("Debian GNU/Linux"));
    assert_eq!(s.cmdline, format!("root=UUID={ROOT_UUID} ro quiet"));
    assert!(s.initrd.as_deref() == Some(&i[..]));
    assert_eq!(
        boot(&disk, &with_entry("0")).title.as_deref(),
        Some("Debian GNU/Linux")
    );
    assert_eq!(
        boot(&disk, &with_entry("1>0")).title.as_deref(),
        Some("Debian GNU/Linux, with Linux 6.1.0-13-amd64")
    );
}

#[test]
fn grub_on_a_separate_boot_partition_with_saved_default() {
    let t = Tmp::new("grubboot");
    let (k1, k2, i2) = (
        rand_bytes(21, 40_000),
        rand_bytes(22, 41_000),
        rand_bytes(23, 999),
    );
    let cfg = "set default=saved\nmenuentry 'one' --id one { linux /vmlinuz-1 root=/dev/vda2 }\nmenuentry 'two' --id two {\n linux /boot/vmlinuz-2 root=/dev/vda2 ro\n initrd /initrd-2\n}\n";
    let env = format!(
        "# GRUB Environment Block\nsaved_entry=two\n{}",
        "#".repeat(1024 - 41)
    );
    let bootp = mkext4(
        &t,
        "boot.img",
        4,
        BOOT_UUID,
        &[
            Item::File("/grub/grub.cfg", cfg.as_bytes()),
            Item::File("/grub/grubenv", env.as_bytes()),
            Item::File("/vmlinuz-1", &k1),
            Item::File("/vmlinuz-2", &k2),
            Item::File("/initrd-2", &i2),
        ],
    );
    let root = mkext4(
        &t,
        "root.img",
        6,
        ROOT_UUID,
        &[Item::Dir("/boot"), Item::File("/etc/fstab", b"")],
    );
    let disk = t.p("disk.img");
    mbr(&disk, 12, &[(2048, 8192, "83"), (10240, 12288, "83")]);
    place(&disk, 2048, &bootp);
    place(&disk, 10240, &root);
    let s = boot(&disk, &opts());
    assert_eq!(
        (s.source, s.title.as_deref()),
        (BootSource::Grub, Some("two"))
    );
    assert!(
        s.kernel == k2,
        "/boot prefix stripped on the /boot partition"
    );
    assert_eq!(s.kernel_path, "/vmlinuz-2");
    assert!(s.initrd.as_deref() == Some(&i2[..]));
    assert_eq!(s.cmdline, "root=/dev/vda2 ro");
    assert!(boot(&disk, &with_entry("one")).kernel == k1);
}

#[test]
fn extlinux_on_a_whole_disk_ext4_and_syslinux_on_an_mbr_esp() {
    let t = Tmp::new("extlinux");
    let (k, i, kr) = (
        rand_bytes(31, 33_333),
        rand_bytes(32, 4444),
        rand_bytes(33, 555),
    );
    let conf = "UI menu.c32\nPROMPT 0\nTIMEOUT 50\nDEFAULT linux\nLABEL rescue\n  MENU LABEL Rescue\n  KERNEL ../vmlinuz-rescue\n  APPEND root=/dev/vda ro single\nLABEL linux\n  MENU LABEL Linux 6.6\n  LINUX ../vmlinuz-6.6\n  APPEND root=/dev/vda rw initrd=../initrd-6.6 console=ttyS0\n";
    let img = mkext4(
        &t,
        "whole.img",
        6,
        ROOT_UUID,
        &[
            Item::File("/boot/extlinux/extlinux.conf", conf.as_bytes()),
            Item::File("/boot/vmlinuz-6.6", &k),
            Item::File("/boot/initrd-6.6", &i),
            Item::File("/boot/vmlinuz-rescue", &kr),
        ],
    );
    let s = boot(&img, &opts());
    assert_eq!(
        (s.source, s.title.as_deref()),
        (BootSource::Extlinux, Some("Linux 6.6"))
    );
    assert!(s.kernel == k && s.initrd.as_deref() == Some(&i[..]));
    assert_eq!(s.kernel_path, "/boot/vmlinuz-6.6");
    assert_eq!(s.cmdline, "root=/dev/vda rw console=ttyS0");
    let s = boot(&img, &with_entry("rescue"));
    assert!(s.kernel == kr && s.initrd.is_none());
    assert_eq!(s.cmdline, "root=/dev/vda ro single");

    // syslinux.cfg on a FAT16 partition of type 0xef in an MBR.
    let cfg =
        "default vm\nlabel vm\n kernel /vmlinuz\n initrd /initrd.img\n append root=/dev/vda2\n";
    let esp = mkfat(
        &t,
        "esp.img",
        8192,
        &["-F", "16", "-s", "1"],
        &[
            ("/syslinux/syslinux.cfg", cfg.as_bytes()),
            ("/vmlinuz", &k),
            ("/initrd.img", &i),
        ],
    );
    let disk = t.p("disk.img");
    mbr(&disk, 10, &[(2048, 16384, "ef")]);
    place(&disk, 2048, &esp);
    let s = boot(&disk, &opts());
    assert_eq!(
        (s.source, s.title.as_deref()),
        (BootSource::Extlinux, Some("vm"))
    );
    assert!(s.kernel == k && s.initrd.as_deref() == Some(&i[..]));
    assert_eq!(s.cmdline, "root=/dev/vda2");
}

#[test]
fn debian_symlinks_on_gpt_and_on_a_separate_boot_partition() {
    let t = Tmp::new("debian");
    let (k, i) = (rand_bytes(41, 60_000), rand_bytes(42, 7_000));
    let root = mkext4(
        &t,
        "root.img",
        8,
        ROOT_UUID,
        &[
            Item::File("/boot/vmlinuz-6.1.0-13-amd64", &k),
            Item::File("/boot/initrd.img-6.1.0-13-amd64", &i),
            Item::Link("/vmlinuz", "boot/vmlinuz-6.1.0-13-amd64"),
            Item::Link("/initrd.img", "/boot/initrd.img-6.1.0-13-amd64"),
            Item::Link("/vmlinuz.old", "boot/vmlinuz-6.1.0-12-amd64"),
        ],
    );
    let disk = t.p("disk.img");
    gpt(&disk, 16, &[(ROOT.0, ROOT.1, "8300")]);
    place(&disk, ROOT.0, &root);
    let s = boot(&disk, &opts());
    assert_eq!(s.source, BootSource::DebianSymlinks);
    assert_eq!(s.kernel_path, "/boot/vmlinuz-6.1.0-13-amd64");
    assert_eq!(
        s.initrd_path.as_deref(),
        Some("/boot/initrd.img-6.1.0-13-amd64")
    );
    assert!(s.kernel == k && s.initrd.as_deref() == Some(&i[..]));
    assert_eq!(s.cmdline, format!("root=UUID={ROOT_UUID} ro"));

    // Separate /boot: the root's /vmlinuz points into an empty /boot directory; the files
    // are at the top of partition 1.
    let bootp = mkext4(
        &t,
        "boot.img",
        4,
        BOOT_UUID,
        &[
            Item::File("/vmlinuz-6.1.0-13-amd64", &k),
            Item::File("/initrd.img-6.1.0-13-amd64", &i),
        ],
    );
    let root2 = mkext4(
        &t,
        "root2.img",
        6,
        ROOT_UUID,
        &[
            Item::Dir("/boot"),
            Item::Link("/vmlinuz", "boot/vmlinuz-6.1.0-13-amd64"),
            Item::Link("/initrd.img", "boot/initrd.img-6.1.0-13-amd64"),
        ],
    );
    let disk2 = t.p("disk2.img");
    mbr(&disk2, 12, &[(2048, 8192, "83"), (10240, 12288, "83")]);
    place(&disk2, 2048, &bootp);
    place(&disk2, 10240, &root2);
    let s = boot(&disk2, &opts());
    assert_eq!(s.source, BootSource::DebianSymlinks);
    assert!(s.kernel == k && s.initrd.as_deref() == Some(&i[..]));
    assert_eq!(s.kernel_path, "/vmlinuz-6.1.0-13-amd64");
    assert_eq!(s.cmdline, format!("root=UUID={ROOT_UUID} ro"));
}

#[test]
fn ext2_and_ext3_and_bls_on_the_root_filesystem() {
    let t = Tmp::new("ext23");
    let (k, i) = (rand_bytes(91, 30_000), rand_bytes(92, 5_000));
    let items = [
        Item::File("/boot/vmlinuz-6.5", &k),
        Item::File("/boot/initramfs-6.5.img", &i),
        Item::File(
            "/boot/loader/entries/fedora-6.5.conf",
            b"title Fedora 6.5\nversion 6.5\nlinux /vmlinuz-6.5\ninitrd /initramfs-6.5.img\noptions root=/dev/vda ro\n",
        ),
    ];
    // ext2 with the 128-byte inodes of older systems too.
    for (n, (fs, inode)) in [("ext2", "256"), ("ext3", "256"), ("ext2", "128")]
        .into_iter()
        .enumerate()
    {
        let dir = t.p(&format!("{n}.d"));
        make_tree(&dir, &items);
        let img = t.p(&format!("{n}.img"));
        run(
            &format!("mkfs.{fs}"),
            &[
                "-q",
                "-F",
                "-I",
                inode,
                "-d",
                dir.to_str().unwrap(),
                img.to_str().unwrap(),
                "4M",
            ],
            None,
        );
        // BLS paths on the root filesystem are relative to /boot.
        let s = boot(&img, &opts());
        assert_eq!(
            (s.source, s.title.as_deref()),
            (BootSource::Bls, Some("Fedora 6.5")),
            "{fs}"
        );
        assert_eq!(s.kernel_path, "/boot/vmlinuz-6.5");
        assert!(s.kernel == k && s.initrd.as_deref() == Some(&i[..]), "{fs}");
        assert_eq!(s.cmdline, "root=/dev/vda ro");
    }
}

#[test]
fn mbr_logical_partitions_in_an_extended_partition() {
    let t = Tmp::new("logical");
    let k = rand_bytes(101, 25_000);
    let root = mkext4(
        &t,
        "root.img",
        4,
        ROOT_UUID,
        &[
            Item::File("/boot/vmlinuz-1", &k),
            Item::Link("/vmlinuz", "boot/vmlinuz-1"),
        ],
    );
    let esp = mkfat(&t, "esp.img", 4096, &[], &[("/EFI/BOOT/README", b"x")]);
    let disk = t.p("disk.img");
    blank(&disk, 12);
    let d = disk.to_str().unwrap();
    let script = format!(
        "label: dos\n{d}1 : start=2048, size=22528, type=5\n{d}5 : start=4096, size=8192, type=ef\n{d}6 : start=14336, size=8192, type=83\n"
    );
    run("sfdisk", &["-q", d], Some(&script));
    place(&disk, 4096, &esp);
    place(&disk, 14336, &root);
    let s = boot(&disk, &opts());
    assert_eq!(s.source, BootSource::DebianSymlinks);
    assert!(s.kernel == k && s.initrd.is_none());
    // Without an initrd the root is named by device: the second logical partition is vda6.
    assert_eq!(s.cmdline, "root=/dev/vda6 ro");
}

#[test]
fn corrupt_images_give_clean_errors() {
    let t = Tmp::new("corrupt");
    let k = rand_bytes(51, 20_000);
    let whole = mkext4(
        &t,
        "whole.img",
        4,
        ROOT_UUID,
        &[
            Item::File("/boot/vmlinuz-1", &k),
            Item::Link("/vmlinuz", "boot/vmlinuz-1"),
        ],
    );
    assert!(boot(&whole, &opts()).kernel == k, "the intact image boots");

    // Truncated: a whole-disk ext4 cut to 1 MiB, and a GPT disk cut before its last partition.
    let cut = t.p("cut.img");
    std::fs::copy(&whole, &cut).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let e = err(&cut, &opts());
    assert!(
        matches!(e, Error::Truncated { .. } | Error::CorruptFs(_)),
        "truncated ext4: {e}"
    );
    let (disk, _) = bls_disk(&t);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(12 << 20)
        .unwrap();
    // The backup GPT header is gone with the tail; the primary names a partition past the end.
    let e = err(&disk, &opts());
    assert!(
        matches!(e, Error::PartitionBeyondEnd { index: 2, .. }),
        "{e}"
    );

    // MBR partition beyond the end of the image.
    let mdisk = t.p("mbr.img");
    mbr(&mdisk, 8, &[(2048, 8192, "83")]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mdisk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let e = err(&mdisk, &opts());
    assert!(
        matches!(e, Error::PartitionBeyondEnd { index: 1, .. }),
        "{e}"
    );

    // Zeroed superblock: nothing recognisable left.
    let zero = t.p("zero.img");
    std::fs::copy(&whole, &zero).unwrap();
    patch(&zero, 1024, &[0u8; 1024]);
    let e = err(&zero, &opts());
    assert!(matches!(e, Error::NoFilesystem(_)), "{e}");
    assert!(e
        .to_string()
        .contains("no partition table and no filesystem"));

    // Empty partitions: a table but no filesystem.
    let nofs = t.p("nofs.img");
    gpt(&nofs, 4, &[(2048, 4095, "8300")]);
    assert!(matches!(
        err(&nofs, &opts()),
        Error::NoFilesystemInPartitions(_)
    ));

    // A filesystem with nothing to boot lists what was looked for.
    let empty = mkext4(&t, "empty.img", 4, ROOT_UUID, &[Item::File("/etc/x", b"")]);
    let e = err(&empty, &opts());
    let m = e.to_string();
    assert!(matches!(e, Error::NoKernel(_)), "{m}");
    for w in [
        "/loader/entries",
        "/boot/grub/grub.cfg",
        "extlinux.conf",
        "/vmlinuz",
    ] {
        assert!(m.contains(w), "{m}");
    }

    // Looping symlinks.
    let looping = mkext4(
        &t,
        "loop.img",
        4,
        ROOT_UUID,
        &[
            Item::Dir("/boot"),
            Item::Link("/vmlinuz", "boot/k"),
            Item::Link("/boot/k", "../vmlinuz.1"),
            Item::Link("/vmlinuz.1", "/boot/../vmlinuz"),
        ],
    );
    let e = err(&looping, &opts());
    assert!(matches!(e, Error::SymlinkLoop { .. }), "{e}");
}

#[test]
fn qcow2_bad_l1_backing_file_and_compression_are_refused() {
    let t = Tmp::new("qcow2");
    let k = rand_bytes(61, 30_000);
    let whole = mkext4(
        &t,
        "whole.img",
        4,
        ROOT_UUID,
        &[
            Item::File("/boot/vmlinuz-1", &k),
            Item::Link("/vmlinuz", "boot/vmlinuz-1"),
        ],
    );
    let q = t.p("ok.qcow2");
    to_qcow2(&whole, &q, &[]);
    assert!(boot(&q, &opts()).kernel == k);

    let bad = t.p("bad-l1.qcow2");
    std::fs::copy(&q, &bad).unwrap();
    patch(&bad, 40, &(0x7fff_0000_0000u64).to_be_bytes());
    let e = err(&bad, &opts());
    assert!(matches!(e, Error::CorruptQcow2(_)), "{e}");
    assert!(e.to_string().contains("L1"), "{e}");

    let unaligned = t.p("unaligned-l1.qcow2");
    std::fs::copy(&q, &unaligned).unwrap();
    patch(&unaligned, 40, &(0x10200u64).to_be_bytes());
    assert!(matches!(err(&unaligned, &opts()), Error::CorruptQcow2(_)));

    let overlay = t.p("overlay.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            q.to_str().unwrap(),
            "-F",
            "qcow2",
            overlay.to_str().unwrap(),
        ],
        None,
    );
    let e = err(&overlay, &opts());
    assert!(
        matches!(e, Error::UnsupportedQcow2(_)) && e.to_string().contains("backing file"),
        "{e}"
    );

    let comp = t.p("compressed.qcow2");
    to_qcow2(&whole, &comp, &["-c"]);
    let e = err(&comp, &opts());
    assert!(e.to_string().contains("compressed"), "{e}");
}
