//! Stock Debian Linux directly on this machine's KVM: it accepts our boot protocol (banner,
//! exact command line, our e820 map), then dies on this KVM's emulator gaps — and rhyve must
//! report that (exit reason, RIP, instruction bytes) and exit 4, never hang.
//! The kernel comes from scripts/fetch-debian-kernel (cached outside the repo).

use std::path::PathBuf;
use std::time::Duration;

use rhyve_tests::harness::{self, require_kvm, rhyve_cmd, scratch_dir, Output, Run};

const MEM_BYTES: u64 = 512 << 20;
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave clearcpuid=cx16,rdtscp nopti nokaslr mitigations=off rhyve.marker=42";

fn kernel(name: &str) -> PathBuf {
    let cache = std::env::var("RHYVE_CACHE").unwrap_or_else(|_| "/var/cache/rhyve".into());
    let p = PathBuf::from(cache).join(name);
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-debian-kernel first (.ci/run does)",
        p.display()
    );
    p
}

/// What Linux prints for a map after its own sanitising (merge touching ranges of one type).
fn printed_e820(extra_isa_hole: bool) -> Vec<String> {
    let mut map: Vec<(u64, u64, u32)> = loader::e820_map(MEM_BYTES)
        .iter()
        .map(|e| (e.addr, e.addr + e.size, e.kind as u32))
        .collect();
    if extra_isa_hole {
        // Linux's PVH entry reserves the legacy ISA window itself.
        map.push((0xa0000, 0x100000, 2));
    }
    map.sort();
    let mut merged: Vec<(u64, u64, u32)> = Vec::new();
    for (s, e, t) in map {
        match merged.last_mut() {
            Some(last) if last.2 == t && s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e, t)),
        }
    }
    merged
        .iter()
        .map(|(s, e, t)| {
            let kind = if *t == 1 { "usable" } else { "reserved" };
            format!("BIOS-e820: [mem {s:#018x}-{:#018x}] {kind}", e - 1)
        })
        .collect()
}

fn boot(kernel: PathBuf, name: &str, cpus: &str) -> Output {
    let dir = scratch_dir(name);
    let mut cmd = rhyve_cmd(&dir);
    cmd.args(rhyve_tests::harness::PC_MACHINE)
        .args(["-c", cpus, "-m", "512M", "--kernel"])
        .arg(kernel)
        .args(["--append", CMDLINE, name]);
    harness::run(
        &mut cmd,
        Run {
            timeout: Duration::from_secs(900),
            input: None,
        },
    )
    .expect("spawn rhyve")
}

/// Early boot with `-c 2`: our ACPI tables listed, both CPUs allowed, no complaints.
fn check_acpi_smp(out: &Output) {
    for table in ["RSDP", "XSDT", "FACP", "DSDT", "FACS", "APIC", "MCFG"] {
        assert!(
            out.stdout.contains(&format!("ACPI: {table} 0x")),
            "no ACPI {table} line:\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains("smpboot: Allowing 2 CPUs"),
        "{}",
        out.stdout
    );
    for complaint in [
        "ACPI BIOS Error",
        "ACPI BIOS Warning",
        "ACPI Error",
        "Incorrect checksum",
    ] {
        assert!(
            !out.stdout.contains(complaint),
            "{complaint}:\n{}",
            out.stdout
        );
    }
}

fn check(out: &Output, pvh: bool) {
    assert!(!out.timed_out, "rhyve hung\n{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("Linux version 6."),
        "no banner:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("Command line: {CMDLINE}\n"))
            || out.stdout.contains(&format!("Command line: {CMDLINE}\r")),
        "command line differs:\n{}",
        out.stdout
    );
    let printed: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.find("BIOS-e820:").map(|i| l[i..].trim_end()))
        .collect();
    assert_eq!(printed, printed_e820(pvh), "e820 map differs");
    assert!(
        out.stdout.contains("Hypervisor detected: KVM"),
        "{}",
        out.stdout
    );
    assert_eq!(out.code(), Some(4), "stderr: {}", out.stderr);
    let err = out
        .stderr
        .lines()
        .find(|l| l.contains("KVM internal error"))
        .unwrap_or_else(|| panic!("no internal error report: {}", out.stderr));
    assert!(
        err.contains("emulation failure")
            && err.contains("instruction bytes at RIP: [")
            && err.contains("rip=0x"),
        "{err}"
    );
}

#[test]
fn debian_kernel_accepts_our_boot_protocol_then_fails_cleanly() {
    require_kvm();
    let (vmlinux, vmlinuz) = (kernel("vmlinux"), kernel("vmlinuz"));
    // Both run at once: each takes minutes on this KVM and they use one core each.
    let pvh = std::thread::spawn(move || boot(vmlinux, "deb-pvh", "2"));
    let bz = boot(vmlinuz, "deb-bz", "1");
    let pvh = pvh.join().unwrap();
    check(&pvh, true);
    check_acpi_smp(&pvh);
    check(&bz, false);
}
