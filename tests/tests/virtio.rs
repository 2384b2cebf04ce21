//! PCI and virtio devices driven by the project's test guest, whose PCI/virtio driver is
//! written from the specs (guests/testguest/src/{pci,virtio,blk}.rs), on real /dev/kvm with
//! real image files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rhyve_tests::harness::{
    self, require_kvm, rhyve_cmd, scratch_dir, testdev_status, KillOnDrop, Output, Run,
};
use rhyve_tests::TESTGUEST_BZIMAGE;

const SECTORS: u64 = 8192; // a 4 MiB disk

/// Byte `i` of sector `s` as the guest writes it (guests/README.md).
fn pattern(s: u64, i: u64) -> u8 {
    ((s * 31 + i * 7 + 0x5a) & 0xff) as u8
}

fn zero_image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(SECTORS * 512).unwrap();
    p
}

fn boot(slots: &[String], cmdline: &str, name: &str) -> Output {
    require_kvm();
    let dir = scratch_dir(name);
    let mut cmd = rhyve_cmd(&dir);
    cmd.args(rhyve_tests::harness::PC_MACHINE)
        .args(["-m", "128M", "-l", "pc-testdev"]);
    for s in slots {
        cmd.args(["-s", s]);
    }
    cmd.args(["--kernel", TESTGUEST_BZIMAGE, "--append", cmdline, name]);
    let out = harness::run(
        &mut cmd,
        Run {
            timeout: Duration::from_secs(120),
            input: None,
        },
    )
    .unwrap();
    assert!(!out.timed_out, "timed out\n{}\n{}", out.stdout, out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    out
}

fn assert_clean(out: &Output) {
    let r = out.report();
    assert!(
        r.fails.is_empty() && r.faults.is_empty(),
        "guest reported failures: {:?} {:?}\n{}",
        r.fails,
        r.faults,
        out.stdout
    );
    assert_eq!(
        r.lines
            .iter()
            .rfind(|l| l.starts_with("checks fail="))
            .map(String::as_str),
        Some("checks fail=0")
    );
    assert_eq!(
        out.code(),
        Some(testdev_status(0)),
        "stderr: {}",
        out.stderr
    );
}

fn has(out: &Output, line: &str) -> bool {
    out.report().lines.iter().any(|l| l == line)
}

#[test]
fn guest_enumerates_pci_through_cf8_and_ecam() {
    let dir = scratch_dir("pci-enum");
    let img = zero_image(&dir, "d.img");
    let out = boot(
        &[
            format!("3,virtio-blk,{}", img.display()),
            "4,virtio-rnd".into(),
        ],
        "rhyve.test=pci",
        "v-pci",
    );
    assert_clean(&out);
    for line in [
        "pci 00:00.0 vendor=0x1275 device=0x1275 class=0x060000 hdr=0x00",
        "pci 00:03.0 vendor=0x1af4 device=0x1042 class=0x010000 hdr=0x00",
        "pci 00:04.0 vendor=0x1af4 device=0x1044 class=0xff0000 hdr=0x00",
        "pci 00:1f.0 vendor=0x8086 device=0x7000 class=0x060100 hdr=0x00",
        "pci functions=4",
    ] {
        assert!(has(&out, line), "missing {line:?}:\n{}", out.stdout);
    }
    let report = out.report();
    let caps: Vec<&String> = report
        .lines
        .iter()
        .filter(|l| l.starts_with("cap 00:03.0"))
        .collect();
    assert!(
        caps.iter().any(|l| l.contains("id=0x11")),
        "no MSI-X capability: {caps:?}"
    );
    assert!(
        caps.iter().any(|l| l.contains("id=0x05")),
        "no MSI capability: {caps:?}"
    );
    assert!(
        caps.iter().filter(|l| l.contains("id=0x09")).count() >= 4,
        "virtio capabilities: {caps:?}"
    );
}

#[test]
fn virtio_blk_reads_writes_flushes_and_refuses_bad_requests() {
    let dir = scratch_dir("blk-rw");
    let img = zero_image(&dir, "d.img");
    let out = boot(
        &[format!("3,virtio-blk,{},ser=rhyve-disk-1", img.display())],
        "rhyve.test=virtio-blk",
        "v-blk",
    );
    assert_clean(&out);
    for line in [
        format!("blk capacity={SECTORS}"),
        format!("blk write/read ok sectors=0,1-8,{} segs=2", SECTORS - 1),
        "blk flush status=0".into(),
        "blk id=rhyve-disk-1".into(),
        "blk bad-request beyond-end status=1".into(),
        "blk bad-request unknown-type status=2".into(),
        "blk bad-request odd-length status=1".into(),
        "blk after-bad read ok".into(),
        "blk done".into(),
    ] {
        assert!(has(&out, &line), "missing {line:?}:\n{}", out.stdout);
    }
    assert!(
        out.stdout.contains("blk bad-request header-only status=1")
            || out.stdout.contains("blk bad-request header-only status=2")
    );
    // The image, byte for byte: the pattern in sectors 0..=8 and the last one, zeros elsewhere.
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len() as u64, SECTORS * 512);
    for (n, b) in bytes.iter().enumerate() {
        let (s, i) = (n as u64 / 512, n as u64 % 512);
        let want = if s <= 8 || s == SECTORS - 1 {
            pattern(s, i)
        } else {
            0
        };
        assert_eq!(*b, want, "image byte {n} (sector {s}, offset {i})");
    }
}

#[test]
fn virtio_blk_read_only_refuses_writes() {
    let dir = scratch_dir("blk-ro");
    let img = zero_image(&dir, "ro.img");
    let out = boot(
        &[format!("3,virtio-blk,{},ro", img.display())],
        "rhyve.test=virtio-blk rhyve.blk.ro=1",
        "v-blk-ro",
    );
    assert_clean(&out);
    assert!(has(&out, "blk ro write status=1"), "{}", out.stdout);
    assert!(has(&out, "blk ro read ok"), "{}", out.stdout);
    assert!(
        std::fs::read(&img).unwrap().iter().all(|b| *b == 0),
        "read-only image was modified"
    );
}

#[test]
fn virtio_rnd_returns_random_bytes() {
    let out = boot(&["4,virtio-rnd".into()], "rhyve.test=virtio-rng", "v-rng");
    assert_clean(&out);
    let line = out
        .report()
        .lines
        .iter()
        .find(|l| l.starts_with("rng bytes="))
        .cloned()
        .unwrap_or_default();
    let hex = line
        .trim_start_matches("rng bytes=")
        .split(' ')
        .next()
        .unwrap_or("");
    assert_eq!(hex.len(), 32, "{line}");
    assert!(hex.chars().any(|c| c != '0'), "{line}");
}

/// Device interrupts reach the vCPU through all three PCI mechanisms: the guest, interrupts
/// off, finds virtio-rnd's used-buffer vector in its local APIC's IRR after MSI-X (irqfd),
/// MSI (KVM_SIGNAL_MSI) and INTx (KVM_IRQ_LINE on the slot's I/O APIC GSI: slot 4, INTA# →
/// 20) in turn (guests/testguest/src/irq.rs).
#[test]
fn interrupts_reach_the_guest_through_msix_msi_and_intx() {
    let out = boot(&["4,virtio-rnd".into()], "rhyve.test=irq", "v-irq");
    assert_clean(&out);
    for line in [
        "irq msix vector=0x41 seen=1",
        "irq msi vector=0x42 seen=1",
        "irq intx gsi=20 vector=0x43 seen=1",
        "irq intx isr=0x1 then=0x0",
        "irq done",
    ] {
        assert!(has(&out, line), "missing {line:?}:\n{}", out.stdout);
    }
    assert_eq!(out.code(), Some(1));
}

#[test]
fn flushed_data_survives_sigkill() {
    require_kvm();
    let dir = scratch_dir("blk-kill");
    let img = zero_image(&dir, "k.img");
    let mut cmd = rhyve_cmd(&dir);
    cmd.args([
        "-m",
        "128M",
        "-s",
        "0,hostbridge",
        "-s",
        &format!("3,virtio-blk,{}", img.display()),
        "-l",
        "com1,stdio",
    ])
    .args([
        "-l",
        "pc-testdev",
        "--kernel",
        TESTGUEST_BZIMAGE,
        "--append",
        "rhyve.test=virtio-blk",
        "v-kill",
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let mut guard = KillOnDrop(cmd.spawn().unwrap());
    let mut stdout = guard.0.stdout.take().unwrap();
    // Read until the guest reports its flush done, then SIGKILL rhyve at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    use std::io::Read;
    while !seen.contains("blk flush status=0") {
        assert!(Instant::now() < deadline, "no flush reported:\n{seen}");
        match stdout.read(&mut buf) {
            Ok(0) => panic!("rhyve exited before the flush:\n{seen}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("{e}"),
        }
    }
    guard.0.kill().unwrap();
    guard.0.wait().unwrap();
    let bytes = std::fs::read(&img).unwrap();
    for s in (0..=8).chain([SECTORS - 1]) {
        for i in 0..512 {
            assert_eq!(
                bytes[(s * 512 + i) as usize],
                pattern(s, i),
                "sector {s} byte {i} lost"
            );
        }
    }
}

#[test]
fn image_errors_name_the_slot() {
    require_kvm();
    let dir = scratch_dir("blk-err");
    let mut cmd = rhyve_cmd(&dir);
    cmd.env("RHYVE_LOG", "error").args([
        "-s",
        "3,virtio-blk,/nonexistent/disk.img",
        "--kernel",
        TESTGUEST_BZIMAGE,
        "v-err",
    ]);
    let out = harness::run(&mut cmd, Run::default()).unwrap();
    assert_eq!(out.code(), Some(4));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/disk.img"),
        "{}",
        out.stderr
    );
}

#[test]
fn two_vms_cannot_open_one_image_read_write() {
    require_kvm();
    let dir = scratch_dir("blk-lock");
    let img = zero_image(&dir, "shared.img");
    let slot = format!("3,virtio-blk,{}", img.display());
    let mut first = rhyve_cmd(&dir);
    first
        .args([
            "-m",
            "64M",
            "-s",
            &slot,
            "-l",
            "com1,stdio",
            "--kernel",
            TESTGUEST_BZIMAGE,
        ])
        .args(["--append", "rhyve.test=echo", "v-lock1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _guard = KillOnDrop(first.spawn().unwrap());
    let pid = dir.join("v-lock1").join("memory");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pid.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut second = rhyve_cmd(&dir);
    second.env("RHYVE_LOG", "error").args([
        "-m",
        "64M",
        "-s",
        &slot,
        "--kernel",
        TESTGUEST_BZIMAGE,
        "v-lock2",
    ]);
    let out = harness::run(&mut second, Run::default()).unwrap();
    assert_eq!(out.code(), Some(4), "{}", out.stderr);
    assert!(out.stderr.contains("in use"), "{}", out.stderr);
}

/// `bench RUN ... bytes=N ops=N ticks=N` from the guest's blk-bench: (bytes/s, ops/s), by the
/// ACPI PM timer (3.579545 MHz).
fn bench_rates(out: &Output, run: &str) -> (f64, f64) {
    let prefix = format!("rhyve-guest: bench {run} ");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {run} in\n{}\n{}", out.stdout, out.stderr));
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    let secs = field("ticks=") / 3_579_545.0;
    (field("bytes=") / secs, field("ops=") / secs)
}

#[test]
fn virtio_blk_keeps_to_its_rate_limits() {
    let dir = scratch_dir("v-blk-rate");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    // Bandwidth: 48 MiB each way in 1 MiB requests at 16 MiB/s, about 3 s per run. (A run
    // of N requests spans N - 1 intervals of the limit plus the bucket's burst: many
    // requests keep that under a few per cent.)
    let out = boot(
        &[format!("3,virtio-blk,{},bw=16M", img.display())],
        "rhyve.test=blk-bench rhyve.bench.mib=48 rhyve.bench.ops=32",
        "v-blk-bw",
    );
    assert_clean(&out);
    let limit = f64::from(16u32 << 20);
    for run in ["seq-write", "seq-read"] {
        let (bw, _) = bench_rates(&out, run);
        assert!(
            (bw - limit).abs() <= limit * 0.1,
            "{run}: {:.2} MiB/s against a 16 MiB/s limit",
            bw / f64::from(1u32 << 20)
        );
    }
    // Operations: 200 random 4 KiB requests each way at 100 per second.
    let out = boot(
        &[format!("3,virtio-blk,{},ops=100", img.display())],
        "rhyve.test=blk-bench rhyve.bench.mib=1 rhyve.bench.ops=200",
        "v-blk-ops",
    );
    assert_clean(&out);
    for run in ["rand-write", "rand-read"] {
        let (_, iops) = bench_rates(&out, run);
        assert!(
            (iops - 100.0).abs() <= 10.0,
            "{run}: {iops:.1} requests/s against a limit of 100"
        );
    }
}
