//! Boots the project's test guests through rhyve on real /dev/kvm and checks, from inside the
//! guest, what the loader gave it: memory map, command line, initrd bytes, CPU mode, GDT.

use std::path::Path;
use std::time::Duration;

use rhyve_tests::harness::{
    self, require_kvm, rhyve_cmd, scratch_dir, testdev_status, Output, Run,
};
use rhyve_tests::image::{fnv1a64, initrd_fixture};
use rhyve_tests::{TESTGUEST_BZIMAGE, TESTGUEST_PVH};

const MEM: &str = "128M";
const MEM_BYTES: u64 = 128 << 20;

fn boot(kernel: &str, initrd: Option<&Path>, cmdline: &str, name: &str, opts: Run) -> Output {
    require_kvm();
    let dir = scratch_dir(name);
    let mut cmd = rhyve_cmd(&dir);
    cmd.args(rhyve_tests::harness::PC_MACHINE).args([
        "-m",
        MEM,
        "-l",
        "pc-testdev",
        "--kernel",
        kernel,
    ]);
    if let Some(i) = initrd {
        cmd.arg("--initrd").arg(i);
    }
    cmd.args(["--append", cmdline, name]);
    let out = harness::run(&mut cmd, opts).expect("spawn rhyve");
    assert!(
        !out.timed_out,
        "rhyve timed out\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    assert!(
        !out.stderr.contains("panicked"),
        "rhyve panicked: {}",
        out.stderr
    );
    assert!(!dir.join(name).exists(), "runtime directory left behind");
    out
}

fn quick(kernel: &str, cmdline: &str, name: &str) -> Output {
    boot(
        kernel,
        None,
        cmdline,
        name,
        Run {
            timeout: Duration::from_secs(60),
            input: None,
        },
    )
}

/// The report must describe exactly what the loader built.
fn check_report(out: &Output, kind: &str, initrd: &[u8], cmdline: &str) {
    let r = out.clean_report();
    assert_eq!(r.boot.as_deref(), Some(kind));
    assert_eq!(r.cmdline.as_deref(), Some(cmdline));
    let want: Vec<(u64, u64, u32)> = loader::e820_map(MEM_BYTES)
        .iter()
        .map(|e| (e.addr, e.size, e.kind as u32))
        .collect();
    let got: Vec<(u64, u64, u32)> = r.e820.iter().map(|e| (e.addr, e.size, e.typ)).collect();
    assert_eq!(got, want, "memory map differs from the one rhyve built");
    let rd = r.initrd.flatten().expect("guest saw no initrd");
    assert_eq!(rd.size, initrd.len() as u64);
    assert_eq!(rd.fnv1a64, Some(fnv1a64(initrd)), "initrd bytes differ");
    assert_eq!(rd.addr % 4096, 0, "initrd not page aligned");
    assert!(rd.addr + rd.size <= MEM_BYTES, "initrd beyond RAM");
    assert_eq!(r.value("cpu", "lm"), Some("1"));
    assert_eq!(r.value("cpu", "pg"), Some("1"));
    assert_eq!(r.value("gdt", "cs_l"), Some("1"));
    assert_eq!(
        out.code(),
        Some(testdev_status(0)),
        "stderr: {}",
        out.stderr
    );
}

fn with_initrd(kernel: &str, kind: &str, name: &str) {
    let dir = scratch_dir(&format!("{name}-initrd"));
    let bytes = initrd_fixture(8192 + 123, 42);
    let path = dir.join("initrd.img");
    std::fs::write(&path, &bytes).unwrap();
    let cmdline = "console=ttyS0 rhyve.test=report root=/dev/vda1 quote=\"a b\"";
    let out = boot(
        kernel,
        Some(&path),
        cmdline,
        name,
        Run {
            timeout: Duration::from_secs(60),
            input: None,
        },
    );
    check_report(&out, kind, &bytes, cmdline);
    // Boot timing is logged for the benchmark: first COM1 byte after process start.
    assert!(out.stderr.contains("first com1 byte at"), "{}", out.stderr);
}

#[test]
fn bzimage_guest_checks_what_the_loader_built() {
    with_initrd(TESTGUEST_BZIMAGE, "bzimage", "tg-bz-report");
}

#[test]
fn pvh_guest_checks_what_the_loader_built() {
    with_initrd(TESTGUEST_PVH, "pvh", "tg-pvh-report");
    let out = quick(TESTGUEST_PVH, "rhyve.test=report", "tg-pvh-entry");
    assert!(
        out.report()
            .line("entry32")
            .is_some_and(|l| l.contains("pe=1 pg=0")),
        "{}",
        out.stdout
    );
}

#[test]
fn guest_echoes_a_line_typed_on_com1() {
    for (kernel, name) in [
        (TESTGUEST_BZIMAGE, "tg-bz-echo"),
        (TESTGUEST_PVH, "tg-pvh-echo"),
    ] {
        let opts = Run {
            timeout: Duration::from_secs(60),
            input: Some((
                "rhyve-guest: type a line".into(),
                b"hello from the host\r".to_vec(),
            )),
        };
        let out = boot(kernel, None, "rhyve.test=echo rhyve.exit=5", name, opts);
        assert!(
            out.stdout.contains("rhyve-guest: echo hello from the host"),
            "{}",
            out.stdout
        );
        assert_eq!(out.code(), Some(testdev_status(5)));
    }
}

#[test]
fn pc_testdev_exit_status_is_chosen_by_the_guest() {
    let out = quick(
        TESTGUEST_BZIMAGE,
        "rhyve.test=report rhyve.exit=0x21",
        "tg-exit",
    );
    assert_eq!(out.code(), Some(0x43));
}

#[test]
fn triple_fault_exits_3_with_registers_logged() {
    for (kernel, name) in [
        (TESTGUEST_BZIMAGE, "tg-bz-tf"),
        (TESTGUEST_PVH, "tg-pvh-tf"),
    ] {
        let out = quick(kernel, "rhyve.test=triplefault", name);
        assert_eq!(out.code(), Some(3), "{}", out.stderr);
        assert!(
            out.stderr.contains("triple fault") && out.stderr.contains("rip="),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn acpi_s5_powers_off_with_exit_1() {
    let out = quick(TESTGUEST_BZIMAGE, "rhyve.test=poweroff", "tg-off");
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("PowerOff"), "{}", out.stderr);
}

#[test]
fn i8042_reset_exits_0() {
    let out = quick(TESTGUEST_PVH, "rhyve.test=reset", "tg-reset");
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("Reset"), "{}", out.stderr);
}

#[test]
fn post_codes_are_timestamped() {
    let out = quick(TESTGUEST_BZIMAGE, "rhyve.test=post", "tg-post");
    assert_eq!(out.code(), Some(testdev_status(0)));
    for code in 1..=5 {
        assert!(
            out.stderr.contains(&format!("POST {code:#04x} at ")),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn guest_exceptions_reach_the_guest_idt() {
    let out = quick(TESTGUEST_BZIMAGE, "rhyve.test=pagefault", "tg-pf");
    assert_eq!(out.code(), Some(testdev_status(0x7f)));
    let fault = out.report().faults.join(" ");
    assert!(
        fault.contains("vector=14") && fault.contains("cr2=0x10000000000"),
        "{}",
        out.stdout
    );
}

/// Starts a guest that waits for console input, once its VM object (RAM file) exists.
fn start_waiting_guest(dir: &Path, name: &str) -> harness::KillOnDrop {
    require_kvm();
    let mut cmd = rhyve_cmd(dir);
    cmd.args(["-m", MEM, "-l", "com1,stdio", "--kernel", TESTGUEST_BZIMAGE])
        .args(["--append", "rhyve.test=echo", name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let guard = harness::KillOnDrop(cmd.spawn().expect("spawn rhyve"));
    let memory = dir.join(name).join("memory");
    let ram_file_ready = || std::fs::metadata(&memory).is_ok_and(|m| m.len() == MEM_BYTES);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ram_file_ready() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        ram_file_ready(),
        "VM object with its guest RAM file never appeared"
    );
    // Let the guest reach its input loop.
    std::thread::sleep(Duration::from_millis(300));
    guard
}

#[test]
fn sigterm_powers_off_with_exit_1() {
    let dir = scratch_dir("tg-term");
    let mut guard = start_waiting_guest(&dir, "tg-term");
    let child = &mut guard.0;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = harness::wait_exit(child, Duration::from_secs(30)).expect("rhyve ignored SIGTERM");
    assert_eq!(status.code(), Some(1));
    assert!(
        !dir.join("tg-term").exists(),
        "runtime directory left behind"
    );
}

#[test]
fn two_vms_with_one_name_are_refused() {
    let dir = scratch_dir("tg-dup");
    let _first = start_waiting_guest(&dir, "dupvm");
    let mut second = rhyve_cmd(&dir);
    second.args(["-m", MEM, "--kernel", TESTGUEST_BZIMAGE, "dupvm"]);
    let out = harness::run(&mut second, Run::default()).unwrap();
    assert_eq!(out.code(), Some(4));
    assert!(
        out.stderr.contains("dupvm is running (pid "),
        "{}",
        out.stderr
    );
}

/// bhyve exits 2 when every vCPU is halted with interrupts off. The guest's S5 write goes to
/// a port nothing claims (rhyve.pm1a_cnt=0x10), so it reports the failure and `cli; hlt`s —
/// which, with KVM's in-kernel LAPIC, never reaches userspace: rhyve's periodic halt check
/// must find it. With `-c 2` the AP is never started and counts as halted with the BSP.
#[test]
fn cli_hlt_on_every_vcpu_exits_2() {
    for (cpus, name) in [("1", "tg-halt"), ("2", "tg-halt-smp")] {
        require_kvm();
        let dir = scratch_dir(name);
        let mut cmd = rhyve_cmd(&dir);
        cmd.args(["-c", cpus, "-m", MEM, "-s", "0,hostbridge", "-s", "31,lpc"])
            .args([
                "-l",
                "com1,stdio",
                "-l",
                "pc-testdev",
                "--kernel",
                TESTGUEST_BZIMAGE,
            ])
            .args(["--append", "rhyve.test=poweroff rhyve.pm1a_cnt=0x10", name]);
        let out = harness::run(
            &mut cmd,
            Run {
                timeout: Duration::from_secs(30),
                input: None,
            },
        )
        .expect("spawn rhyve");
        assert!(!out.timed_out, "no halt detected\n{}", out.stderr);
        assert!(
            out.stdout.contains("still running after ACPI S5"),
            "{}",
            out.stdout
        );
        assert_eq!(out.code(), Some(2), "{}\n{}", out.stdout, out.stderr);
    }
}
