//! `cargo run --release -p rhyve-bench` — exit-path and boot-time benchmarks.
//!
//! 1. PIO exit round trip: the project's test guest doing N `out`s through rhyve's full
//!    exit dispatch (bus lookup, device lock, stats) against a raw kvm-ioctls loop running
//!    the same instruction on this machine's KVM, in the same run.
//! 2. Time from process start to the guest's first instruction (its first POST code) and to
//!    its first COM1 byte, from rhyve's own timestamps.
//! 3. In the real-KVM test bed (`boot`): VMM start → stock Linux /init and each VMM's own
//!    resident memory, rhyve against QEMU pc and QEMU microvm (same kernel, initramfs and
//!    command line), bzImage and PVH, alternating rounds in one L1. Skipped with `--quick`.
//! 4. virtio-blk throughput (`blk`): the test guest's sequential 1 MiB and random 4 KiB reads and
//!    writes on rhyve against the host doing the same on the same image file.
//! 5. In the test bed (`l2blk`): Linux in L2 timing dd O_DIRECT on rhyve against QEMU+KVM.
//!    Skipped with `--quick`.
//! 6. In the test bed (`l2net`): Linux in L2 moving TCP over virtio-net to/from L1's tap, rhyve
//!    against QEMU+KVM's userspace virtio-net. Skipped with `--quick`.
//! 7. Snapshots (`snapshot`): checkpoint time and size, restore to running vCPUs, against the
//!    same machine's fresh boot and Firecracker's published figures.

mod blk;
mod boot;
mod l2blk;
mod l2net;
mod net;
mod snapshot;

use std::process::Command;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const EXITS: u64 = 200_000;

/// Wall time of a bare kvm-ioctls loop running the project's test guest with `cmdline`: the
/// same guest, entry state, irqchip and PIT as under rhyve, but exits handled by a `match` on
/// the port and nothing else (COM1 output dropped, LSR always "transmitter empty").
fn raw_kvm_guest(cmdline: &str) -> (Duration, u64) {
    const RAM: u64 = 64 << 20;
    let start = Instant::now();
    let kvm = Kvm::new().expect("open /dev/kvm (the benchmark needs KVM)");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    vm.create_pit2(kvm_bindings::kvm_pit_config::default())
        .expect("KVM_CREATE_PIT2");
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest RAM");
    let host = mem.get_host_address(GuestAddress(0)).expect("host address") as u64;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: `mem` backs the slot and outlives the VM (both live until this function returns).
    unsafe { vm.set_user_memory_region(region) }.expect("set memory");
    let kernel = std::path::Path::new(rhyve_tests::TESTGUEST_BZIMAGE);
    let cfg = loader::BootConfig {
        kernel,
        initrd: None,
        cmdline,
        ram_bytes: RAM,
        rsdp_addr: None,
    };
    let loaded = loader::load(&mem, &cfg).expect("load the test guest");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("cpuid");
    vcpu.set_cpuid2(&cpuid).expect("cpuid");
    let (mut regs, mut sregs) = (
        vcpu.get_regs().expect("regs"),
        vcpu.get_sregs().expect("sregs"),
    );
    vmm::boot::apply_entry_state(&loaded.entry, &mut regs, &mut sregs);
    vcpu.set_sregs(&sregs).expect("sregs");
    vcpu.set_regs(&regs).expect("regs");
    let mut exits = 0;
    loop {
        exits += 1;
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0xf4, _) => break,
            VcpuExit::IoOut(..) => {}
            VcpuExit::IoIn(port, data) => data.fill(if port == 0x3fd { 0x60 } else { 0xff }),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    (start.elapsed(), exits)
}

pub(crate) fn rhyve_bin() -> String {
    std::env::var("RHYVE_BIN").unwrap_or_else(|_| {
        let exe = std::env::current_exe().expect("current exe");
        exe.with_file_name("rhyve").display().to_string()
    })
}

/// Wall time and stderr of one rhyve run of the test guest.
fn rhyve_guest(cmdline: &str) -> (Duration, String) {
    rhyve_guest_with(cmdline, &[])
}

/// [`rhyve_guest`] with extra options (e.g. `-o sandbox.seccomp=off`).
fn rhyve_guest_with(cmdline: &str, extra: &[&str]) -> (Duration, String) {
    let start = Instant::now();
    let out = Command::new(rhyve_bin())
        .args(extra)
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

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo run --release -p rhyve-bench -- snapshot`: that part alone.
    if std::env::args().any(|a| a == "snapshot") {
        snapshot::run();
        return;
    }
    let pio = format!("rhyve.test=pio rhyve.count={EXITS}");
    let (mut raw_best, mut rhyve_best, mut open_best) = (f64::MAX, f64::MAX, f64::MAX);
    let no_filters = ["-o", "sandbox.seccomp=off"];
    for _ in 0..5 {
        let (raw_base, _) = raw_kvm_guest("rhyve.test=report");
        let (raw_loaded, exits) = raw_kvm_guest(&pio);
        assert!(
            exits >= EXITS,
            "the guest did not run its loop ({exits} exits)"
        );
        raw_best = raw_best.min(raw_loaded.as_secs_f64() - raw_base.as_secs_f64());
        let (base, _) = rhyve_guest("rhyve.test=report");
        let (loaded, err) = rhyve_guest(&pio);
        assert!(!err.contains("FAIL"), "guest failed: {err}");
        rhyve_best = rhyve_best.min(loaded.as_secs_f64() - base.as_secs_f64());
        let (base, _) = rhyve_guest_with("rhyve.test=report", &no_filters);
        let (loaded, _) = rhyve_guest_with(&pio, &no_filters);
        open_best = open_best.min(loaded.as_secs_f64() - base.as_secs_f64());
    }
    let raw_us = raw_best.max(0.0) * 1e6 / EXITS as f64;
    let rhyve_us = rhyve_best.max(0.0) * 1e6 / EXITS as f64;
    let open_us = open_best.max(0.0) * 1e6 / EXITS as f64;
    println!("PIO exit round trip: the test guest doing {EXITS} `out`s (best of 5, minus a run without them)");
    println!("  raw kvm-ioctls loop      {raw_us:8.3} us/exit");
    println!(
        "  rhyve full dispatch      {rhyve_us:8.3} us/exit   ({:+.1} %, seccomp filters on)",
        (rhyve_us / raw_us - 1.0) * 100.0
    );
    println!(
        "  rhyve, seccomp off       {open_us:8.3} us/exit   ({:+.1} %)",
        (open_us / raw_us - 1.0) * 100.0
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

    blk::run();
    net::run(quick);
    snapshot::run();

    if quick {
        return;
    }
    boot::run();
    boot::run_firmware();
    boot::run_hugepages();
    l2blk::run();
    l2net::run();
}
