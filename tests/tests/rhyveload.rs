//! rhyveload + rhyve end to end, on real /dev/kvm: real disk images built with the system's
//! tools (sgdisk/sfdisk, mkfs.ext4 -d, mkfs.vfat + mcopy, qemu-img) holding the test guest
//! under each boot configuration; rhyveload picks an entry, rhyve runs it, and the guest
//! reports the command line and the initrd bytes it got. Plus the named-VM life cycle: the
//! bhyve reboot loop, -D, one process per name, stale objects after kill -9.

use std::io::Read;
use std::os::unix::fs::{symlink, FileExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rhyve_tests::harness::{
    self, require_kvm, rhyve_bin, rhyve_cmd, scratch_dir, testdev_status, KillOnDrop, Output, Run,
};
use rhyve_tests::image::{fnv1a64, initrd_fixture};
use rhyve_tests::{TESTGUEST_BZIMAGE, TESTGUEST_PVH};

const MEM: &str = "128M";

fn rhyveload_bin() -> PathBuf {
    let p = rhyve_bin().with_file_name("rhyveload");
    assert!(
        p.exists(),
        "{} not found: build it first (cargo build --release --workspace)",
        p.display()
    );
    p
}

fn quick() -> Run {
    Run {
        timeout: Duration::from_secs(60),
        input: None,
    }
}

/// Runs rhyveload with a private runtime dir; never panics the tool unnoticed.
fn rhyveload(rundir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(rhyveload_bin());
    cmd.env("RHYVE_RUNDIR", rundir).args(args);
    let out = harness::run(&mut cmd, quick()).expect("spawn rhyveload");
    assert!(!out.timed_out, "rhyveload hung: {}", out.stderr);
    assert!(
        !out.stderr.contains("panicked"),
        "rhyveload panicked: {}",
        out.stderr
    );
    out
}

/// `key: value` lines rhyveload prints.
fn printed<'a>(out: &'a Output, key: &str) -> Option<&'a str> {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
}

fn loaded_ok(out: &Output) {
    assert_eq!(
        out.code(),
        Some(0),
        "rhyveload failed:\n{}{}",
        out.stdout,
        out.stderr
    );
}

/// rhyve VMNAME without --kernel: runs what rhyveload loaded.
fn rhyve_adopt(rundir: &Path, name: &str, extra: &[&str]) -> Output {
    require_kvm();
    let mut cmd = rhyve_cmd(rundir);
    cmd.args(["-m", MEM, "-s", "0,hostbridge", "-s", "31,lpc"])
        .args(["-l", "com1,stdio", "-l", "pc-testdev"])
        .args(extra)
        .arg(name);
    let out = harness::run(&mut cmd, quick()).expect("spawn rhyve");
    assert!(
        !out.timed_out,
        "rhyve timed out\n{}\n{}",
        out.stdout, out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    out
}

/// The guest ran the report and got exactly this command line and initrd.
fn check_guest(out: &Output, cmdline: &str, initrd: &[u8], boot: &str) {
    let r = out.clean_report();
    assert_eq!(r.boot.as_deref(), Some(boot));
    assert_eq!(r.cmdline.as_deref(), Some(cmdline));
    let rd = r.initrd.flatten().expect("guest saw no initrd");
    assert_eq!(rd.size, initrd.len() as u64);
    assert_eq!(rd.fnv1a64, Some(fnv1a64(initrd)), "initrd bytes differ");
    assert_eq!(out.code(), Some(testdev_status(0)), "{}", out.stderr);
}

fn tool(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A file tree: (path relative to the root, contents); `@target` makes a symlink.
fn tree(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (rel, data) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        match data.strip_prefix(b"@") {
            Some(target) => symlink(std::str::from_utf8(target).unwrap(), &p).unwrap(),
            None => std::fs::write(&p, data).unwrap(),
        }
    }
}

fn ext4(img: &Path, root: &Path, mib: u64) {
    std::fs::File::create(img)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(root)
            .arg(img),
    );
}

fn fat(img: &Path, root: &Path, mib: u64) {
    tool(
        Command::new("mkfs.vfat")
            .arg("-C")
            .arg(img)
            .arg((mib << 10).to_string()),
    );
    for e in std::fs::read_dir(root).unwrap().flatten() {
        tool(
            Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-s", "-i"])
                .arg(img)
                .arg(e.path())
                .arg("::/"),
        );
    }
}

/// A disk of `mib` MiB with the given filesystem images at 1 MiB-aligned partitions.
fn partitioned(disk: &Path, mib: u64, gpt: bool, parts: &[&Path]) {
    std::fs::File::create(disk)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let mut start = 2048u64;
    let mut script = String::new();
    for (i, p) in parts.iter().enumerate() {
        let sectors = std::fs::metadata(p).unwrap().len() / 512;
        if gpt {
            tool(
                Command::new("sgdisk")
                    .arg(format!("-n{}:{start}:{}", i + 1, start + sectors - 1))
                    .arg(format!("-t{}:8300", i + 1))
                    .arg(disk),
            );
        } else {
            script.push_str(&format!("start={start}, size={sectors}, type=83\n"));
        }
        let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
        f.write_all_at(&std::fs::read(p).unwrap(), start * 512)
            .unwrap();
        start += sectors;
    }
    if !gpt {
        let mut c = Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel"])
            .arg(disk)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sfdisk");
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "sfdisk: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn qcow2(raw: &Path, out: &Path) {
    tool(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(out),
    );
}

fn kernel() -> Vec<u8> {
    std::fs::read(TESTGUEST_BZIMAGE).unwrap()
}

fn object_exists(rundir: &Path, name: &str) -> bool {
    rundir.join(name).exists()
}

/// Fedora-style: a GPT disk with a /boot partition holding BLS entries (two kernels;
/// loader.conf picks the older one) and a root partition.
#[test]
fn bls_entries_on_a_gpt_boot_partition() {
    require_kvm();
    let dir = scratch_dir("rl-bls");
    let (rd_old, rd_new) = (initrd_fixture(9000, 1), initrd_fixture(7001, 2));
    let boot = dir.join("boot");
    tree(
        &boot,
        &[
            (
                "loader/entries/fedora-6.5.conf",
                b"title Fedora 6.5\nversion 6.5\nlinux /vmlinuz-6.5\ninitrd /initramfs-6.5.img\n\
                  options console=ttyS0 rhyve.test=report root=UUID=1234 ro bls=6.5\n"
                    .to_vec(),
            ),
            (
                "loader/entries/fedora-6.6.conf",
                b"title Fedora 6.6\nversion 6.6\nlinux /vmlinuz-6.6\ninitrd /initramfs-6.6.img\n\
                  options rhyve.test=report root=UUID=1234 bls=6.6\n"
                    .to_vec(),
            ),
            (
                "loader/loader.conf",
                b"default fedora-6.5*\ntimeout 3\n".to_vec(),
            ),
            ("vmlinuz-6.5", kernel()),
            ("initramfs-6.5.img", rd_old.clone()),
            ("vmlinuz-6.6", kernel()),
            ("initramfs-6.6.img", rd_new.clone()),
        ],
    );
    let root = dir.join("root");
    tree(&root, &[("etc/hostname", b"guest\n".to_vec())]);
    ext4(&dir.join("boot.fs"), &boot, 8);
    ext4(&dir.join("root.fs"), &root, 4);
    let disk = dir.join("disk.img");
    partitioned(
        &disk,
        16,
        true,
        &[&dir.join("boot.fs"), &dir.join("root.fs")],
    );
    let run = dir.join("run");
    let d = disk.to_str().unwrap();

    let out = rhyveload(&run, &["-m", MEM, "-d", d, "bls"]);
    loaded_ok(&out);
    assert_eq!(printed(&out, "source"), Some("bls"));
    assert_eq!(printed(&out, "title"), Some("Fedora 6.5"));
    assert_eq!(printed(&out, "kernel"), Some("/vmlinuz-6.5"));
    assert_eq!(printed(&out, "initrd"), Some("/initramfs-6.5.img"));
    let cmdline = "console=ttyS0 rhyve.test=report root=UUID=1234 ro bls=6.5";
    assert_eq!(printed(&out, "cmdline"), Some(cmdline));
    check_guest(&rhyve_adopt(&run, "bls", &[]), cmdline, &rd_old, "bzimage");

    // -e entry= picks the other one; the object (now idle, same size) is reused.
    let out = rhyveload(&run, &["-m", MEM, "-d", d, "-e", "entry=fedora-6.6", "bls"]);
    loaded_ok(&out);
    assert_eq!(printed(&out, "title"), Some("Fedora 6.6"));
    let cmdline = "rhyve.test=report root=UUID=1234 bls=6.6";
    check_guest(&rhyve_adopt(&run, "bls", &[]), cmdline, &rd_new, "bzimage");
    assert!(
        object_exists(&run, "bls"),
        "rhyveload's object is persistent"
    );
}

/// Debian-style grub.cfg on an MBR disk, read through qcow2; `set default` picks entry 1.
#[test]
fn grub_cfg_on_mbr_ext4_in_qcow2() {
    require_kvm();
    let dir = scratch_dir("rl-grub");
    let (rd_a, rd_b) = (initrd_fixture(4096, 3), initrd_fixture(12345, 4));
    let root = dir.join("root");
    tree(
        &root,
        &[
            (
                "boot/grub/grub.cfg",
                b"set default=\"1\"\nset timeout=5\n\
                  menuentry 'Debian GNU/Linux, with Linux 6.1-a' --class debian --id a {\n\
                  \tinsmod ext2\n\tlinux /boot/vmlinuz-a root=/dev/vda1 ro rhyve.test=report which=a\n\
                  \tinitrd /boot/initrd.img-a\n}\n\
                  menuentry 'Debian GNU/Linux, with Linux 6.1-b' --class debian --id b {\n\
                  \tlinux /boot/vmlinuz-b root=/dev/vda1 ro quiet rhyve.test=report which=b\n\
                  \tinitrd /boot/initrd.img-b\n}\n"
                    .to_vec(),
            ),
            ("boot/vmlinuz-a", kernel()),
            ("boot/initrd.img-a", rd_a.clone()),
            ("boot/vmlinuz-b", kernel()),
            ("boot/initrd.img-b", rd_b.clone()),
        ],
    );
    ext4(&dir.join("root.fs"), &root, 8);
    let raw = dir.join("disk.raw");
    partitioned(&raw, 12, false, &[&dir.join("root.fs")]);
    let disk = dir.join("disk.qcow2");
    qcow2(&raw, &disk);
    let run = dir.join("run");

    let out = rhyveload(&run, &["-m", MEM, "-d", disk.to_str().unwrap(), "grub"]);
    loaded_ok(&out);
    assert_eq!(printed(&out, "source"), Some("grub"));
    assert_eq!(
        printed(&out, "title"),
        Some("Debian GNU/Linux, with Linux 6.1-b")
    );
    assert_eq!(printed(&out, "kernel"), Some("/boot/vmlinuz-b"));
    let cmdline = "root=/dev/vda1 ro quiet rhyve.test=report which=b";
    check_guest(&rhyve_adopt(&run, "grub", &[]), cmdline, &rd_b, "bzimage");
}

/// extlinux.conf on a whole-disk FAT filesystem (no partition table), with a PVH (ELF)
/// kernel; -e cmdline= replaces the entry's command line.
#[test]
fn extlinux_on_fat_with_a_pvh_kernel() {
    require_kvm();
    let dir = scratch_dir("rl-extlinux");
    let rd = initrd_fixture(5555, 5);
    let root = dir.join("root");
    tree(
        &root,
        &[
            (
                "extlinux/extlinux.conf",
                b"DEFAULT pvh\nTIMEOUT 30\n\
                  LABEL other\n  KERNEL /nothing\n\
                  LABEL pvh\n  MENU LABEL PVH guest\n  KERNEL /vmlinux\n  INITRD /initrd.img\n  \
                  APPEND rhyve.test=report extlinux=1\n"
                    .to_vec(),
            ),
            ("vmlinux", std::fs::read(TESTGUEST_PVH).unwrap()),
            ("initrd.img", rd.clone()),
        ],
    );
    let disk = dir.join("fat.img");
    fat(&disk, &root, 8);
    let run = dir.join("run");
    let d = disk.to_str().unwrap();

    let out = rhyveload(&run, &["-m", MEM, "-d", d, "ext"]);
    loaded_ok(&out);
    assert_eq!(printed(&out, "source"), Some("extlinux"));
    assert_eq!(printed(&out, "kernel"), Some("/vmlinux"));
    check_guest(
        &rhyve_adopt(&run, "ext", &[]),
        "rhyve.test=report extlinux=1",
        &rd,
        "pvh",
    );

    let cmdline = "console=ttyS0 rhyve.test=report replaced=1";
    let out = rhyveload(&run, &["-d", d, "-e", &format!("cmdline={cmdline}"), "ext"]);
    loaded_ok(&out);
    assert_eq!(
        printed(&out, "memory"),
        Some("128M"),
        "the object's size is kept"
    );
    assert_eq!(printed(&out, "cmdline"), Some(cmdline));
    check_guest(&rhyve_adopt(&run, "ext", &[]), cmdline, &rd, "pvh");
}

/// Debian's /vmlinuz and /initrd.img symlinks, on an ext4 image and as a host directory (-h).
#[test]
fn debian_symlinks_on_ext4_and_in_a_host_directory() {
    require_kvm();
    let dir = scratch_dir("rl-deb");
    let rd = initrd_fixture(10240, 6);
    let root = dir.join("root");
    tree(
        &root,
        &[
            ("boot/vmlinuz-6.1.0-13-amd64", kernel()),
            ("boot/initrd.img-6.1.0-13-amd64", rd.clone()),
            ("vmlinuz", b"@boot/vmlinuz-6.1.0-13-amd64".to_vec()),
            ("initrd.img", b"@boot/initrd.img-6.1.0-13-amd64".to_vec()),
        ],
    );
    let img = dir.join("root.img");
    ext4(&img, &root, 8);
    let run = dir.join("run");
    let cmdline = "root=/dev/vda rhyve.test=report debian=1";
    let e = format!("cmdline={cmdline}");

    for (opt, path, name) in [("-d", &img, "deb-disk"), ("-h", &root, "deb-host")] {
        let out = rhyveload(
            &run,
            &["-m", MEM, opt, path.to_str().unwrap(), "-e", &e, name],
        );
        loaded_ok(&out);
        assert_eq!(printed(&out, "source"), Some("debian-symlinks"), "{opt}");
        assert!(
            printed(&out, "kernel").is_some_and(|k| k.contains("vmlinuz")),
            "{}",
            out.stdout
        );
        check_guest(&rhyve_adopt(&run, name, &[]), cmdline, &rd, "bzimage");
    }
}

/// `while rhyveload && rhyve; do :; done`: a guest that reboots (exit 0) keeps the object but
/// must be loaded again; the one that powers off with -D removes it.
#[test]
fn reboot_loop_and_destroy_on_poweroff() {
    require_kvm();
    let dir = scratch_dir("rl-loop");
    let root = dir.join("root");
    tree(
        &root,
        &[
            ("vmlinuz", kernel()),
            ("initrd.img", initrd_fixture(3000, 7)),
        ],
    );
    let run = dir.join("run");
    let h = root.to_str().unwrap();

    let out = rhyveload(
        &run,
        &["-m", MEM, "-h", h, "-e", "cmdline=rhyve.test=reset", "loop"],
    );
    loaded_ok(&out);
    let first = rhyve_adopt(&run, "loop", &["-D"]);
    assert_eq!(first.code(), Some(0), "reboot: {}", first.stderr);
    assert!(first
        .stdout
        .contains("rhyve-guest: cmdline=rhyve.test=reset"));
    assert!(object_exists(&run, "loop"), "a reboot keeps the object");
    assert!(!run.join("loop/boot-state").exists(), "boot-state consumed");

    // Without rhyveload again there is nothing to run.
    let again = rhyve_adopt(&run, "loop", &[]);
    assert_eq!(again.code(), Some(4));
    assert_eq!(
        again.stderr.trim(),
        "rhyve: VM loop has nothing loaded: run rhyveload again (needed after every guest \
         reboot), or give --kernel PATH"
    );

    // A different size is refused while the object exists.
    let out = rhyveload(&run, &["-m", "64M", "-h", h, "loop"]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr
            .starts_with("rhyveload: -m 64M: VM loop exists with 128M of memory"),
        "{}",
        out.stderr
    );
    // So is rhyve with another -m.
    let out = rhyveload(
        &run,
        &["-h", h, "-e", "cmdline=rhyve.test=poweroff", "loop"],
    );
    loaded_ok(&out);
    let mut cmd = rhyve_cmd(&run);
    cmd.args(["-m", "256M", "loop"]);
    let wrong = harness::run(&mut cmd, quick()).unwrap();
    assert_eq!(wrong.code(), Some(4));
    assert!(
        wrong
            .stderr
            .starts_with("rhyve: -m 256M: VM loop has 128M of memory"),
        "{}",
        wrong.stderr
    );

    // A rhyve that fails before the guest runs leaves the load in place for the next try.
    let broken = rhyve_adopt(&run, "loop", &["-s", "2,virtio-blk,/nonexistent/disk.img"]);
    assert_eq!(broken.code(), Some(4), "{}", broken.stderr);
    assert!(run.join("loop/boot-state").exists(), "unused load kept");

    let second = rhyve_adopt(&run, "loop", &["-D"]);
    assert_eq!(second.code(), Some(1), "power-off: {}", second.stderr);
    assert!(
        !object_exists(&run, "loop"),
        "-D destroys the object on power-off"
    );

    // Without -D a power-off keeps it.
    loaded_ok(&rhyveload(
        &run,
        &[
            "-m",
            MEM,
            "-h",
            h,
            "-e",
            "cmdline=rhyve.test=poweroff",
            "keep",
        ],
    ));
    assert_eq!(rhyve_adopt(&run, "keep", &[]).code(), Some(1));
    assert!(object_exists(&run, "keep"));
    // --kernel boots directly inside an existing object, which stays afterwards.
    let rd = initrd_fixture(3000, 7);
    let initrd = format!("{h}/initrd.img");
    let direct = rhyve_adopt(
        &run,
        "keep",
        &[
            "--kernel",
            TESTGUEST_BZIMAGE,
            "--initrd",
            &initrd,
            "--append",
            "rhyve.test=report direct=1",
        ],
    );
    check_guest(&direct, "rhyve.test=report direct=1", &rd, "bzimage");
    assert!(object_exists(&run, "keep"));
}

/// SIGTERM presses the power button; the guest's ACPI power-off (exit 1) with -D destroys
/// the object too, as bhyve's -D does for any guest-initiated power-off.
#[test]
fn sigterm_power_off_with_d_destroys_the_object() {
    require_kvm();
    let dir = scratch_dir("rl-term");
    let root = dir.join("root");
    tree(&root, &[("vmlinuz", kernel())]);
    let run = dir.join("run");
    let e = "cmdline=rhyve.test=powerbutton";
    loaded_ok(&rhyveload(
        &run,
        &["-m", MEM, "-h", root.to_str().unwrap(), "-e", e, "pb"],
    ));
    let mut cmd = rhyve_cmd(&run);
    cmd.args(rhyve_tests::harness::PC_MACHINE)
        .args(["-D", "-m", MEM, "pb"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut guard = KillOnDrop(cmd.spawn().expect("spawn rhyve"));
    let mut stdout = guard.0.stdout.take().unwrap();
    let seen = harness::read_until(
        &mut stdout,
        "waiting for the power button",
        Duration::from_secs(30),
    );
    assert!(seen.is_ok(), "guest never armed the power button: {seen:?}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
    let status =
        harness::wait_exit(&mut guard.0, Duration::from_secs(30)).expect("rhyve ignored SIGTERM");
    assert_eq!(status.code(), Some(1));
    assert!(
        !object_exists(&run, "pb"),
        "-D destroys the object on power-off"
    );
}

/// One process per VM name (flock), and what a kill -9 leaves: a stale object that rhyve and
/// rhyveload report, and that can be destroyed.
#[test]
fn one_process_per_name_and_stale_objects() {
    require_kvm();
    let dir = scratch_dir("rl-stale");
    let root = dir.join("root");
    tree(&root, &[("vmlinuz", kernel())]);
    let run = dir.join("run");
    let h = root.to_str().unwrap();
    loaded_ok(&rhyveload(
        &run,
        &["-m", MEM, "-h", h, "-e", "cmdline=rhyve.test=echo", "st"],
    ));

    let mut cmd = rhyve_cmd(&run);
    cmd.args(["-m", MEM, "-l", "com1,stdio", "st"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut guard = KillOnDrop(cmd.spawn().expect("spawn rhyve"));
    let pid = guard.0.id();
    let mut stdout = guard.0.stdout.take().unwrap();
    let seen = harness::read_until(&mut stdout, "type a line", Duration::from_secs(30));
    assert!(seen.is_ok(), "guest never waited for input: {seen:?}");

    let busy = format!("st is running (pid {pid})");
    let mut second = rhyve_cmd(&run);
    second.args(["-m", MEM, "st"]);
    let out = harness::run(&mut second, quick()).unwrap();
    assert_eq!(out.code(), Some(4));
    assert_eq!(out.stderr.trim(), format!("rhyve: {busy}"));
    let out = rhyveload(&run, &["-m", MEM, "-h", h, "st"]);
    assert_eq!(out.code(), Some(1));
    assert_eq!(out.stderr.trim(), format!("rhyveload: {busy}"));

    // SAFETY: killing our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = guard.0.wait();
    let mut rest = String::new();
    let _ = stdout.read_to_string(&mut rest);

    let stale =
        format!("stale VM object st (pid {pid} gone); remove it with rhyvectl --vm=st --destroy");
    let out = rhyveload(&run, &["-m", MEM, "-h", h, "st"]);
    assert_eq!(out.code(), Some(1));
    assert_eq!(out.stderr.trim(), format!("rhyveload: {stale}"));
    let out = rhyve_adopt(&run, "st", &[]);
    assert_eq!(out.code(), Some(4));
    assert_eq!(out.stderr.trim(), format!("rhyve: {stale}"));
    let listed = vmmapi::list_in(&run).unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|o| (o.name.as_str(), o.state))
            .collect::<Vec<_>>(),
        [("st", vmmapi::ObjectState::Stale { pid: pid as i32 })]
    );

    vmmapi::destroy_in(&run, "st").unwrap();
    assert!(!object_exists(&run, "st"));
    loaded_ok(&rhyveload(&run, &["-m", MEM, "-h", h, "st"]));
}

/// Broken inputs: one line on stderr, exit 1, no panic, no object left behind.
#[test]
fn corrupt_images_fail_cleanly() {
    let dir = scratch_dir("rl-bad");
    let run = dir.join("run");
    let garbage = dir.join("garbage.img");
    std::fs::write(&garbage, initrd_fixture(1 << 20, 9)).unwrap();
    let empty_fs = dir.join("empty.img");
    let empty_root = dir.join("empty");
    tree(&empty_root, &[("etc/motd", b"hi\n".to_vec())]);
    ext4(&empty_fs, &empty_root, 4);
    let truncated = dir.join("trunc.qcow2");
    qcow2(&empty_fs, &truncated);
    let q = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &q[..q.len().min(1024)]).unwrap();
    let not_a_kernel = dir.join("notkernel");
    tree(
        &not_a_kernel,
        &[
            ("vmlinuz", b"this is not a kernel".to_vec()),
            ("initrd.img", vec![0; 100]),
        ],
    );

    let cases: [(&str, &Path, &str); 5] = [
        ("-d", &garbage, "garbage"),
        ("-d", &empty_fs, "no-kernel"),
        ("-d", &truncated, "trunc"),
        ("-d", Path::new("/nonexistent/disk.img"), "missing"),
        ("-h", &not_a_kernel, "notkernel"),
    ];
    for (opt, path, name) in cases {
        let out = rhyveload(&run, &["-m", MEM, opt, path.to_str().unwrap(), name]);
        assert_eq!(out.code(), Some(1), "{name}: {}{}", out.stdout, out.stderr);
        let err = out.stderr.trim_end();
        assert!(
            err.starts_with("rhyveload: ") && !err.contains('\n'),
            "{name}: not one line: {err:?}"
        );
        assert!(!object_exists(&run, name), "{name}: object left behind");
    }
    let out = rhyveload(
        &run,
        &["-m", MEM, "-h", not_a_kernel.to_str().unwrap(), "x"],
    );
    let want = format!(
        "rhyveload: {}: /vmlinuz: unknown kernel format",
        not_a_kernel.display()
    );
    assert!(out.stderr.starts_with(&want), "{}", out.stderr);

    // Command-line mistakes: one line, naming the argument.
    for (argv, want) in [
        (
            &["-m", "12Q", "-h", "/", "vm"][..],
            "rhyveload: -m 12Q: invalid memory size",
        ),
        (&["-h", "/"][..], "rhyveload: missing vmname"),
        (
            &["-c", "/nonexistent/tty", "-h", "/", "vm"][..],
            "rhyveload: -c /nonexistent/tty: no such device",
        ),
        (
            &["-l", "/boot/userboot.so", "-d", "x", "vm"][..],
            "rhyveload: -l /boot/userboot.so: other OS loaders are not supported",
        ),
    ] {
        let out = rhyveload(&run, argv);
        assert_eq!(out.code(), Some(1), "{argv:?}");
        let err = out.stderr.trim_end();
        assert!(
            err.starts_with(want) && !err.contains('\n'),
            "{argv:?}: {err:?}"
        );
    }
    assert!(!object_exists(&run, "vm"));
}

/// Timing sanity: a load of the test guest from an image is quick (no busy loops, no
/// whole-disk copies).
#[test]
fn loading_is_fast() {
    let dir = scratch_dir("rl-fast");
    let root = dir.join("root");
    tree(
        &root,
        &[
            ("vmlinuz", kernel()),
            ("initrd.img", initrd_fixture(1 << 20, 10)),
        ],
    );
    let run = dir.join("run");
    let t = Instant::now();
    loaded_ok(&rhyveload(
        &run,
        &["-m", "1G", "-h", root.to_str().unwrap(), "fast"],
    ));
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "rhyveload took {took:?}");
}

/// A stock Debian kernel (the uncompressed vmlinux: its PVH entry is quick here) in an ext4
/// image with a Debian grub.cfg: rhyveload finds and loads it, rhyve adopts it with 2 vCPUs,
/// and the kernel prints our command line and finds rhyve's ACPI tables where the boot-state
/// said they would be. It is stopped once that is seen (on this KVM it later dies at its
/// int3 self-test; debian_direct.rs covers that part).
#[test]
fn debian_kernel_from_a_grub_disk_image() {
    require_kvm();
    let cache = std::env::var("RHYVE_CACHE").unwrap_or_else(|_| "/var/cache/rhyve".into());
    let vmlinux = Path::new(&cache).join("vmlinux");
    assert!(
        vmlinux.exists(),
        "{} missing: run scripts/fetch-debian-kernel first (.ci/run does)",
        vmlinux.display()
    );
    let dir = scratch_dir("rl-debian");
    let root = dir.join("root");
    let cmdline = "root=/dev/vda1 ro console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave \
                   clearcpuid=cx16,rdtscp nopti nokaslr mitigations=off rhyve.marker=rhyveload";
    tree(
        &root,
        &[
            (
                "boot/grub/grub.cfg",
                format!(
                    "set default=0\nmenuentry 'Debian GNU/Linux' --id debian {{\n\
                     \tlinux /boot/vmlinux-6.1 {cmdline}\n}}\n"
                )
                .into_bytes(),
            ),
            ("boot/vmlinux-6.1", std::fs::read(&vmlinux).unwrap()),
        ],
    );
    let img = dir.join("root.img");
    ext4(&img, &root, 80);
    let run = dir.join("run");
    let out = rhyveload(&run, &["-m", "512M", "-d", img.to_str().unwrap(), "deb"]);
    loaded_ok(&out);
    assert_eq!(printed(&out, "kernel"), Some("/boot/vmlinux-6.1"));

    let mut cmd = rhyve_cmd(&run);
    cmd.args([
        "-c",
        "2",
        "-m",
        "512M",
        "-s",
        "0,hostbridge",
        "-s",
        "31,lpc",
    ])
    .args(["-l", "com1,stdio", "deb"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut guard = KillOnDrop(cmd.spawn().expect("spawn rhyve"));
    let mut stdout = guard.0.stdout.take().unwrap();
    let seen = harness::read_until(&mut stdout, "ACPI: XSDT", Duration::from_secs(120));
    let text = seen.unwrap_or_else(|t| panic!("kernel never reached its ACPI tables:\n{t}"));
    assert!(text.contains("Linux version 6."), "{text}");
    assert!(
        text.contains(&format!("Command line: {cmdline}\n"))
            || text.contains(&format!("Command line: {cmdline}\r")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "ACPI: RSDP 0x{:016X} 000024 (v02 RHYVE",
            loader::acpi::ACPI_START
        )),
        "{text}"
    );
    // SAFETY: killing our own child.
    unsafe { libc::kill(guard.0.id() as i32, libc::SIGKILL) };
    let _ = guard.0.wait();
    vmmapi::destroy_in(&run, "deb").unwrap();
}
