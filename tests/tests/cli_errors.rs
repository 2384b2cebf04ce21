//! Bad input gets one line on stderr naming the problem and exit status 4 — never a panic.

use std::time::Duration;

use rhyve_tests::harness::{self, rhyve_cmd, scratch_dir, Run};
use rhyve_tests::TESTGUEST_BZIMAGE;

fn rhyve_fails(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let dir = scratch_dir("cli");
    let mut cmd = rhyve_cmd(&dir);
    cmd.env("RHYVE_LOG", "error").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = harness::run(
        &mut cmd,
        Run {
            timeout: Duration::from_secs(30),
            input: None,
        },
    )
    .unwrap();
    harness::assert_refused(&out, &format!("{args:?}"), needle);
}

fn scratch_file(name: &str, bytes: &[u8]) -> String {
    let p = scratch_dir("cli-files").join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn missing_kvm_device() {
    rhyve_fails(
        &["--kernel", TESTGUEST_BZIMAGE, "vm0"],
        &[("RHYVE_KVM_DEV", "/nonexistent/kvm")],
        "/nonexistent/kvm",
    );
}

#[test]
fn unreadable_kernel() {
    rhyve_fails(
        &["--kernel", "/nonexistent/bzImage", "vm0"],
        &[],
        "/nonexistent/bzImage",
    );
}

#[test]
fn garbage_kernel() {
    let junk = scratch_file("junk.bin", &[0x5a; 8192]);
    rhyve_fails(&["--kernel", &junk, "vm-junk"], &[], "junk.bin");
}

#[test]
fn truncated_kernel() {
    let whole = std::fs::read(TESTGUEST_BZIMAGE).unwrap();
    let cut = scratch_file("truncated.bzimage", &whole[..600]);
    rhyve_fails(&["--kernel", &cut, "vm-cut"], &[], "trunc");
}

#[test]
fn initrd_too_big_for_ram() {
    let dir = scratch_dir("cli-big");
    let big = dir.join("big.initrd");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(64 << 20).unwrap(); // sparse: 64 MiB in a 32 MiB guest
    rhyve_fails(
        &[
            "-m",
            "32M",
            "--kernel",
            TESTGUEST_BZIMAGE,
            "--initrd",
            big.to_str().unwrap(),
            "vm-big",
        ],
        &[],
        "initrd",
    );
}

#[test]
fn unknown_slot_emulation() {
    rhyve_fails(
        &["-s", "3,virtio-frob", "--kernel", TESTGUEST_BZIMAGE, "vm0"],
        &[],
        "virtio-frob",
    );
}

#[test]
fn bad_memory_size() {
    rhyve_fails(&["-m", "12Q", "vm0"], &[], "-m 12Q");
    rhyve_fails(
        &["-m", "1M", "--kernel", TESTGUEST_BZIMAGE, "vm0"],
        &[],
        "-m",
    );
}

#[test]
fn duplicate_slot() {
    rhyve_fails(
        &["-s", "0,hostbridge", "-s", "0:0,lpc", "vm0"],
        &[],
        "already used",
    );
}

#[test]
fn out_of_range_slot() {
    rhyve_fails(&["-s", "32,lpc", "vm0"], &[], "invalid slot");
}

#[test]
fn unknown_config_key() {
    rhyve_fails(
        &["-o", "memory.sise=1G", "--kernel", TESTGUEST_BZIMAGE, "vm0"],
        &[],
        "memory.sise",
    );
}

#[test]
fn unknown_config_key_in_file() {
    let file = scratch_file("vm.conf", b"# comment\nmemory.size=64M\nbogus.key=1\n");
    rhyve_fails(&["-k", &file, "vm0"], &[], "bogus.key");
}

#[test]
fn bad_vm_name() {
    rhyve_fails(
        &["--kernel", TESTGUEST_BZIMAGE, "../etc"],
        &[],
        "invalid VM name",
    );
}

#[test]
fn missing_kernel_and_name() {
    rhyve_fails(&["vm0"], &[], "--kernel");
    rhyve_fails(&["-c", "2"], &[], "missing VM name");
}

#[test]
fn help_lists_emulations() {
    let dir = scratch_dir("cli-help");
    for (args, needle) in [
        (vec!["-s", "help"], "hostbridge"),
        (vec!["-l", "help"], "pc-testdev"),
        (vec!["--help"], "EXIT STATUS"),
    ] {
        let mut cmd = rhyve_cmd(&dir);
        cmd.args(&args);
        let out = harness::run(&mut cmd, Run::default()).unwrap();
        assert_eq!(out.code(), Some(0));
        assert!(out.stdout.contains(needle), "{args:?}: {}", out.stdout);
    }
}

/// `-s N,passthru,...` on this host: a bad address, a function that does not exist, and a
/// real one that cannot be passed through (no IOMMU group here; on a host with an IOMMU, one
/// bound to another driver than vfio-pci) are each one line naming what to do, exit 4.
#[test]
fn passthru_refusals_name_the_cause() {
    let run = |spec: &str, needle: &str| {
        let slot = format!("4,passthru,{spec}");
        rhyve_fails(
            &[
                "-s",
                "0,hostbridge",
                "-s",
                &slot,
                "--kernel",
                TESTGUEST_BZIMAGE,
                "vm0",
            ],
            &[],
            needle,
        );
    };
    run("zz", "expected the host function as bus/slot/function");
    run("0/5", "expected the host function");
    let devices: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let absent = (0..32u8)
        .map(|s| format!("0000:00:{s:02x}.7"))
        .find(|n| !devices.contains(n))
        .expect("a free address on bus 0");
    run(&absent, "no such PCI function on this host");
    let dev = |n: &str| std::path::Path::new("/sys/bus/pci/devices").join(n);
    let driver = |n: &str| {
        std::fs::read_link(dev(n).join("driver"))
            .ok()
            .and_then(|l| l.file_name().map(|f| f.to_string_lossy().into_owned()))
    };
    if let Some(n) = devices
        .iter()
        .find(|n| !dev(n).join("iommu_group").exists())
    {
        run(n, "has no IOMMU group: the host has no IOMMU");
    } else if let Some(n) = devices
        .iter()
        .find(|n| driver(n).is_some_and(|d| d != "vfio-pci"))
    {
        run(n, "not vfio-pci: modprobe vfio-pci; echo vfio-pci > ");
    } else {
        panic!("no PCI function on this host to refuse: {devices:?}");
    }
}
