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
