//! A malicious driver (the test guest's `hostile` mode, guests/testguest/src/hostile.rs) on
//! real KVM: descriptor loops, chains longer than the queue, a 4096-entry indirect table,
//! buffers in the PCI hole and past RAM, a length near 2^32, a used ring over the
//! descriptor table, MSI-X entries pointing anywhere, a BAR over RAM and two BARs over each
//! other. Each ring attack must end in a device error or DEVICE_NEEDS_RESET (the guest
//! checks); rhyve's control socket answers while the guest waits, the devices count what
//! they refused, and afterwards both devices still work.

use std::io::Write;
use std::time::Duration;

use rhyve_tests::harness::{
    self, require_kvm, rhyve_cmd, rhyvectl_ok, scratch_dir, testdev_status, Report, Spawned,
    PC_MACHINE,
};
use rhyve_tests::TESTGUEST_BZIMAGE;

#[test]
fn a_malicious_driver_gets_errors_and_rhyve_keeps_answering() {
    require_kvm();
    let base = scratch_dir("hostile");
    let disk = base.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let blk = format!("3,virtio-blk,{}", disk.display());
    let (mut rhyve, mut stdin) = Spawned::spawn_with_stdin(
        rhyve_cmd(&base)
            .args(PC_MACHINE)
            .args([
                "-m",
                "128M",
                "-l",
                "pc-testdev",
                "-s",
                &blk,
                "-s",
                "4,virtio-rnd",
            ])
            .args([
                "--kernel",
                TESTGUEST_BZIMAGE,
                "--append",
                "rhyve.test=hostile",
                "hostile",
            ]),
    );
    rhyve.wait_for("rhyve-guest: hostile attacks done");

    // The VMM answers and the devices counted what they refused.
    let out = rhyvectl_ok(&base, &["--vm=hostile", "--get-stats", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["stats"]["uptime_ms"].as_u64().is_some(), "{out}");
    let pci = v["stats"]["pci"].as_array().unwrap();
    let dev = |id: &str| {
        pci.iter()
            .find(|d| d["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {out}"))
    };
    let rng = dev("virtio-rnd-0.4.0");
    assert!(
        rng["counters"]["guest_errors"].as_u64().unwrap() >= 6,
        "rng guest errors: {rng}"
    );
    assert!(
        rng["counters"]["transport_guest_errors"].as_u64().unwrap() >= 1,
        "the overlapping rings were not counted: {rng}"
    );
    let blk = dev("virtio-blk-0.3.0");
    assert!(
        blk["counters"]["guest_errors"].as_u64().unwrap() >= 6,
        "blk guest errors: {blk}"
    );

    stdin.write_all(b"g").unwrap();
    let status = harness::wait_exit(&mut rhyve.child.0, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("rhyve did not finish: {}", rhyve.stderr()));
    let stdout = rhyve.stdout();
    let stderr = rhyve.stderr();
    assert_eq!(status.code(), Some(testdev_status(0)), "{stdout}\n{stderr}");
    let report = Report::parse(&stdout);
    assert!(report.done, "{stdout}");
    assert!(report.fails.is_empty(), "{:?}\n{stdout}", report.fails);
    let refused = stdout
        .lines()
        .filter(|l| {
            l.starts_with("rhyve-guest: hostile ")
                && (l.ends_with(": device error") || l.ends_with(": needs reset"))
        })
        .count();
    assert_eq!(refused, 13, "{stdout}");
    assert!(stdout.contains("hostile devices still answer"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Guest-triggered warnings are logged once per kind, not once per attack.
    let warnings = stderr.lines().filter(|l| l.contains(": warn: ")).count();
    assert!(warnings <= 6, "{warnings} warnings:\n{stderr}");
}
