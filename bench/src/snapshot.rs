//! Snapshots (`snapshot`): what `rhyvectl --checkpoint` takes and writes, and how soon
//! `rhyve -r` has the vCPUs running, for Firecracker's two reference machines (2 vCPUs,
//! 256 and 512 MiB). The guest is the test guest ticking on the PM timer, with an 8 MiB
//! initrd of random bytes so that the memory image holds real data; in the same run, the
//! same machine's fresh boot to its first guest instruction is the baseline.
//! Firecracker's published figures (tests/integration_tests/performance/test_snapshot_perf.py,
//! x86_64): Full snapshot create 180 ms (256 MiB) / 280 ms (512 MiB); load 9 ms
//! (m5d.metal, host kernel 4.14).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rhyve_tests::harness::{wait_exit, Spawned};

const ROUNDS: usize = 5;
// The guest hashes its initrd byte by byte before it ticks: a few MiB keep that short here.
const INITRD_MIB: usize = 8;

fn rundir() -> PathBuf {
    std::env::temp_dir().join("rhyve-bench-snap")
}

fn machine(mem: &str) -> Vec<String> {
    [
        "-c",
        "2",
        "-m",
        mem,
        "-s",
        "0,hostbridge",
        "-s",
        "31,lpc",
        "-l",
        "com1,stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn rhyve(args: &[String]) -> Spawned {
    Spawned::spawn(
        Command::new(crate::rhyve_bin())
            .args(args)
            .env("RHYVE_LOG", "info")
            .env("RHYVE_RUNDIR", rundir()),
    )
}

fn rhyvectl(args: &[&str]) -> String {
    let bin = Path::new(&crate::rhyve_bin()).with_file_name("rhyvectl");
    let out = Command::new(bin)
        .args(args)
        .env("RHYVE_RUNDIR", rundir())
        .output()
        .expect("run rhyvectl");
    assert!(
        out.status.success(),
        "rhyvectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A deterministic pseudo-random initrd (splitmix64): pages that are data, not zeros.
fn initrd() -> PathBuf {
    let path = std::env::temp_dir().join(format!("rhyve-bench-initrd-{INITRD_MIB}m"));
    if std::fs::metadata(&path).map(|m| m.len()).ok() == Some((INITRD_MIB << 20) as u64) {
        return path;
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = Vec::with_capacity(INITRD_MIB << 20);
    while buf.len() < INITRD_MIB << 20 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        buf.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&buf))
        .expect("write the bench initrd");
    path
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `… running 12.3 ms after rhyve started` from a restore's log.
fn restored_ms(stderr: &str) -> Option<f64> {
    let l = stderr.lines().find(|l| l.contains(" restored from "))?;
    l.split("running ")
        .nth(1)?
        .split(" ms")
        .next()?
        .trim()
        .parse()
        .ok()
}

fn stop(vm: &mut Spawned, name: &str) {
    rhyvectl(&[&format!("--vm={name}"), "--force-poweroff"]);
    let _ = wait_exit(&mut vm.child.0, Duration::from_secs(10));
}

fn one(mem: &str) {
    let name = format!("snap-bench-{mem}");
    let file = std::env::temp_dir().join(format!("rhyve-bench-{name}"));
    let initrd = initrd();
    let mut boot = machine(mem);
    boot.extend([
        "--kernel".into(),
        rhyve_tests::TESTGUEST_BZIMAGE.into(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--append".into(),
        "rhyve.test=ctrlaltdel".into(),
        name.clone(),
    ]);
    let mut vm = rhyve(&boot);
    vm.wait_for("rhyve-guest: tick 2");
    let boot_ms = crate::ms_after(&vm.stderr(), "POST ");
    let (mut create_ms, mut wall_ms, mut mem_mib, mut state_kib) = (vec![], vec![], 0.0, 0.0);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let out = rhyvectl(&[
            &format!("--vm={name}"),
            &format!("--checkpoint={}", file.display()),
            "--json",
        ]);
        wall_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("rhyvectl --json");
        let c = &v["checkpoint"];
        create_ms.push(c["ms"].as_f64().unwrap_or(f64::NAN));
        mem_mib = c["memory_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20);
        state_kib = c["state_bytes"].as_f64().unwrap_or(0.0) / 1024.0;
    }
    stop(&mut vm, &name);
    let image_kib = std::fs::metadata(&file)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) / 2)
        .unwrap_or(0);

    let mut restore = machine(mem);
    restore.extend(["-r".into(), file.display().to_string(), name.clone()]);
    let mut restore_ms = vec![];
    for _ in 0..ROUNDS {
        let mut vm = rhyve(&restore);
        // It runs: the guest's next tick.
        vm.wait_for("rhyve-guest: tick ");
        restore_ms.push(restored_ms(&vm.stderr()).unwrap_or(f64::NAN));
        stop(&mut vm, &name);
    }
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(crate_state(&file));
    println!("  2 vCPUs, {mem}:");
    println!(
        "    create (paused VM → files)  {:8.1} ms median  (rhyvectl round trip {:.1} ms; Firecracker: {} ms)",
        median(create_ms),
        median(wall_ms),
        if mem == "256M" { 180 } else { 280 }
    );
    println!(
        "    size                        {mem_mib:8.1} MiB of memory data ({} KiB on disk), {state_kib:.1} KiB of state",
        image_kib
    );
    println!(
        "    restore → vCPUs running     {:8.1} ms median from process start (Firecracker load: 9 ms)",
        median(restore_ms)
    );
    match boot_ms {
        Some(b) => println!("    fresh boot → first instr.   {b:8.1} ms (same machine, baseline)"),
        None => println!("    fresh boot → first instr.        n/a"),
    }
}

fn crate_state(file: &Path) -> PathBuf {
    vmm::snapshot::state_path(file)
}

pub fn run() {
    println!(
        "Snapshots: rhyvectl --checkpoint and rhyve -r of the test guest with a {INITRD_MIB} MiB random initrd ({ROUNDS} rounds)"
    );
    for mem in ["256M", "512M"] {
        one(mem);
    }
}
