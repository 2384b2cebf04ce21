//! `cargo run --release -p rhyve-bench` — exit-path and boot-time benchmarks.
//!
//! 1. PIO exit round trip: the project's test guest doing N `out`s through rhyve's full
//!    exit dispatch (bus lookup, device lock, stats) against a raw kvm-ioctls loop running
//!    the same instruction on this machine's KVM, in the same run.
//! 2. Time from process start to the guest's first instruction (its first POST code) and to
//!    its first COM1 byte, from rhyve's own timestamps.
//! 3. In the real-KVM test bed (tests/testbed): VMM start → stock Linux /init, rhyve against
//!    QEMU+KVM (`-kernel`, same kernel and initramfs) in the same L1. Skipped with `--quick`.

use std::process::Command;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

const EXITS: u64 = 200_000;

/// Per-exit cost of a bare KVM_RUN loop: a real-mode guest doing `out 0x80, al; jmp $-2`.
fn raw_kvm_loop(exits: u64) -> Duration {
    let kvm = Kvm::new().expect("open /dev/kvm (the benchmark needs KVM)");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let size = 0x10000usize;
    // SAFETY: anonymous private mapping, checked below, unmapped at process exit.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED, "mmap");
    let code: [u8; 4] = [0xe6, 0x80, 0xeb, 0xfc]; // out 0x80, al; jmp short -4
                                                  // SAFETY: the mapping is `size` bytes long and writable.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), (mem as *mut u8).add(0x1000), code.len())
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region is backed by the mapping above for the life of the process.
    unsafe { vm.set_user_memory_region(region) }.expect("set memory");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("regs");
    let start = Instant::now();
    let mut n = 0;
    while n < exits {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x80, _) => n += 1,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    start.elapsed()
}

fn rhyve_bin() -> String {
    std::env::var("RHYVE_BIN").unwrap_or_else(|_| {
        let exe = std::env::current_exe().expect("current exe");
        exe.with_file_name("rhyve").display().to_string()
    })
}

/// Wall time and stderr of one rhyve run of the test guest.
fn rhyve_guest(cmdline: &str) -> (Duration, String) {
    let start = Instant::now();
    let out = Command::new(rhyve_bin())
        .args([
            "-m",
            "64M",
            "-l",
            "com1,/dev/null",
            "-l",
            "pc-testdev",
            "--kernel",
            rhyve_tests::TESTGUEST_BZIMAGE,
            "--append",
            cmdline,
            "rhyve-bench",
        ])
        .env("RHYVE_LOG", "info")
        .env("RHYVE_RUNDIR", std::env::temp_dir().join("rhyve-bench"))
        .output()
        .expect("run rhyve (build it first: cargo build --release --workspace)");
    (
        start.elapsed(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ms_after(stderr: &str, marker: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.contains(marker))?;
    let at = line.split(" at ").nth(1)?;
    at.trim_end_matches(" ms").trim().parse().ok()
}

/// `l2-init-ms` of one test-bed scenario run with `vmm`.
fn testbed_l2_init_ms(scenario: &str, vmm: &str) -> Option<f64> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testbed");
    let status = Command::new(root.join("run-scenario"))
        .arg(root.join("scenarios").join(scenario))
        .args(["--vmm", vmm])
        .env("RHYVE_BIN", rhyve_bin())
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?;
    if !status.success() {
        eprintln!("test bed: {scenario} with {vmm} failed");
        return None;
    }
    let results = root
        .join("../../target/testbed")
        .join(format!("{scenario}-{vmm}"))
        .join("results.json");
    let text = std::fs::read_to_string(results).ok()?;
    let at = text.find("\"l2-init-ms\"")?;
    let rest = &text[at + "\"l2-init-ms\"".len()..];
    let digits: String = rest
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut raw_best = Duration::MAX;
    let mut rhyve_best = f64::MAX;
    for _ in 0..3 {
        raw_best = raw_best.min(raw_kvm_loop(EXITS));
        let (base, _) = rhyve_guest("rhyve.test=report");
        let (loaded, err) = rhyve_guest(&format!("rhyve.test=pio rhyve.count={EXITS}"));
        assert!(!err.contains("FAIL"), "guest failed: {err}");
        rhyve_best = rhyve_best.min((loaded.as_secs_f64() - base.as_secs_f64()).max(0.0));
    }
    let raw_us = raw_best.as_secs_f64() * 1e6 / EXITS as f64;
    let rhyve_us = rhyve_best * 1e6 / EXITS as f64;
    println!("PIO exit round trip ({EXITS} exits, best of 3)");
    println!("  raw kvm-ioctls loop      {raw_us:8.3} us/exit");
    println!(
        "  rhyve full dispatch      {rhyve_us:8.3} us/exit   ({:+.1} %)",
        (rhyve_us / raw_us - 1.0) * 100.0
    );

    let (_, err) = rhyve_guest("rhyve.test=report");
    println!("Boot timeline of the test guest (rhyve's timestamps from process start)");
    match ms_after(&err, "POST ") {
        Some(ms) => println!("  first guest instruction  {ms:8.3} ms (its first POST code)"),
        None => println!("  first guest instruction  n/a (no POST code seen)"),
    }
    match ms_after(&err, "first com1 byte") {
        Some(ms) => println!("  first COM1 byte          {ms:8.3} ms"),
        None => println!("  first COM1 byte          n/a"),
    }

    if quick {
        return;
    }
    println!("Test bed: VMM start -> stock Linux /init inside L1 (ms, lower is better)");
    for scenario in ["boot-bzimage", "boot-pvh"] {
        let rhyve = testbed_l2_init_ms(scenario, "rhyve");
        let qemu = testbed_l2_init_ms(scenario, "qemu");
        let show = |v: Option<f64>| {
            v.map(|v| format!("{v:8.0}"))
                .unwrap_or_else(|| "     n/a".into())
        };
        let ratio = match (rhyve, qemu) {
            (Some(r), Some(q)) if q > 0.0 => format!("{:.2}x", r / q),
            _ => "n/a".into(),
        };
        println!(
            "  {scenario:<14} rhyve {}   qemu {}   rhyve/qemu {ratio}",
            show(rhyve),
            show(qemu)
        );
    }
}
