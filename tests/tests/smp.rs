//! ACPI tables, SMP bring-up, CPUID topology, RTC and PM timer, checked from inside the test
//! guest on real /dev/kvm (`rhyve.test=acpi` and `rhyve.test=smp`, see guests/README.md).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rhyve_tests::harness::{
    self, require_kvm, rhyve_cmd, scratch_dir, testdev_status, KillOnDrop, Output, Run,
};
use rhyve_tests::{TESTGUEST_BZIMAGE, TESTGUEST_PVH};

/// Boots the test guest with `-c cpus` (plus `extra` options and environment).
fn boot(
    kernel: &str,
    cpus: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    test: &str,
    name: &str,
) -> Output {
    require_kvm();
    let dir = scratch_dir(name);
    let mut cmd = rhyve_cmd(&dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(["-c", cpus, "-m", "128M"]);
    cmd.args(extra);
    cmd.args(rhyve_tests::harness::PC_MACHINE).args([
        "-l",
        "pc-testdev",
        "--kernel",
        kernel,
        "--append",
        &format!("rhyve.test={test}"),
        name,
    ]);
    let out = harness::run(
        &mut cmd,
        Run {
            timeout: Duration::from_secs(60),
            input: None,
        },
    )
    .expect("spawn rhyve");
    assert!(
        !out.timed_out,
        "rhyve timed out\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    let r = out.report();
    assert!(
        r.fails.is_empty() && r.faults.is_empty(),
        "guest checks failed: {:?} {:?}\n{}",
        r.fails,
        r.faults,
        out.stdout
    );
    assert_eq!(
        out.code(),
        Some(testdev_status(0)),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    out
}

fn lines_with<'a>(out: &'a Output, prefix: &str) -> Vec<&'a str> {
    out.stdout
        .lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .split_once("rhyve-guest: ")
                .map(|x| x.1)
        })
        .filter(|l| l.starts_with(prefix))
        .collect()
}

fn check_acpi(kernel: &str, cpus: &str, apic_ids: &str, name: &str) {
    let out = boot(kernel, cpus, &[], &[], "acpi", name);
    let tables = lines_with(&out, "acpi table ");
    let sigs: BTreeSet<&str> = tables.iter().filter_map(|l| l.split(' ').nth(2)).collect();
    for sig in ["XSDT", "FACP", "DSDT", "FACS", "APIC", "MCFG"] {
        assert!(sigs.contains(sig), "{sig} missing: {tables:?}");
    }
    for t in tables.iter().filter(|t| !t.contains(" FACS ")) {
        assert!(t.ends_with("checksum=ok"), "{t}");
    }
    assert!(
        lines_with(&out, "acpi rsdp ")[0].ends_with("checksum=ok"),
        "{}",
        out.stdout
    );
    let ncpus = apic_ids.split(',').count();
    assert_eq!(
        lines_with(&out, "acpi madt "),
        vec![format!("acpi madt cpus={ncpus} apic_ids={apic_ids}").as_str()]
    );
    assert_eq!(
        lines_with(&out, "acpi mcfg "),
        vec!["acpi mcfg base=0xe0000000"]
    );
    assert_eq!(
        lines_with(&out, "acpi bad_checksums="),
        vec!["acpi bad_checksums=0"]
    );
}

#[test]
fn acpi_tables_checksums_madt_and_mcfg() {
    check_acpi(TESTGUEST_BZIMAGE, "4", "0,1,2,3", "acpi-c4");
}

#[test]
fn acpi_madt_uses_packed_topology_ids() {
    // 3 cores need 2 bits: socket 1 starts at APIC ID 4.
    check_acpi(
        TESTGUEST_PVH,
        "6,sockets=2,cores=3",
        "0,1,2,4,5,6",
        "acpi-topo",
    );
}

/// Boots `rhyve.test=smp` and checks every AP came up with the MADT's APIC IDs, plus the BSP's
/// CPUID topology line.
fn check_smp(kernel: &str, cpus: &str, ids: &[u32], cpuid: &str, name: &str) -> Output {
    let out = boot(kernel, cpus, &[], &[], "smp", name);
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    assert_eq!(
        lines_with(&out, "acpi madt "),
        vec![format!("acpi madt cpus={} apic_ids={}", ids.len(), list.join(",")).as_str()]
    );
    let aps: BTreeSet<u32> = lines_with(&out, "ap apic_id=")
        .iter()
        .map(|l| {
            l.strip_prefix("ap apic_id=")
                .and_then(|l| l.strip_suffix(" up"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("bad AP line {l}"))
        })
        .collect();
    assert_eq!(aps, ids[1..].iter().copied().collect(), "{}", out.stdout);
    assert_eq!(lines_with(&out, "ap apic_id=").len(), ids.len() - 1);
    let n = ids.len();
    assert_eq!(
        lines_with(&out, "smp "),
        vec![format!("smp cpus={n} up={n}").as_str()]
    );
    assert_eq!(
        lines_with(&out, "cpuid bsp "),
        vec![format!("cpuid bsp apic_id=0 {cpuid}").as_str()]
    );
    assert_eq!(lines_with(&out, "pmtimer ok"), vec!["pmtimer ok"]);
    out
}

#[test]
fn smp_starts_every_ap() {
    check_smp(
        TESTGUEST_BZIMAGE,
        "4",
        &[0, 1, 2, 3],
        "logical=1 smt_shift=0 threads=1 core_shift=0 per_package=1",
        "smp-c4",
    );
}

#[test]
fn smp_topology_sockets_cores() {
    check_smp(
        TESTGUEST_BZIMAGE,
        "4,sockets=2,cores=2,threads=1",
        &[0, 1, 2, 3],
        "logical=2 smt_shift=0 threads=1 core_shift=1 per_package=2",
        "smp-s2c2",
    );
    check_smp(
        TESTGUEST_PVH,
        "4,sockets=1,cores=2,threads=2",
        &[0, 1, 2, 3],
        "logical=4 smt_shift=1 threads=2 core_shift=2 per_package=4",
        "smp-c2t2",
    );
    check_smp(
        TESTGUEST_PVH,
        "6,sockets=2,cores=3,threads=1",
        &[0, 1, 2, 4, 5, 6],
        "logical=3 smt_shift=0 threads=1 core_shift=2 per_package=3",
        "smp-s2c3",
    );
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `rtc YYYY-MM-DD HH:MM:SS ...` → seconds since the epoch of that wall-clock reading.
fn rtc_seconds(out: &Output) -> i64 {
    let l = lines_with(out, "rtc ");
    assert_eq!(l.len(), 1, "{}", out.stdout);
    let f: Vec<&str> = l[0].split(' ').collect();
    let date: Vec<i64> = f[1].split('-').map(|x| x.parse().unwrap()).collect();
    let time: Vec<i64> = f[2].split(':').map(|x| x.parse().unwrap()).collect();
    days_from_civil(date[0], date[1], date[2]) * 86400 + time[0] * 3600 + time[1] * 60 + time[2]
}

/// The host's wall clock now, as local time (or UTC), in the same "seconds" as `rtc_seconds`.
fn host_seconds(utc: bool) -> i64 {
    // SAFETY: time(NULL) only returns the time; tm is plain data filled by *_r.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        let r = if utc {
            libc::gmtime_r(&now, &mut tm)
        } else {
            libc::localtime_r(&now, &mut tm)
        };
        assert!(!r.is_null());
        days_from_civil(
            tm.tm_year as i64 + 1900,
            tm.tm_mon as i64 + 1,
            tm.tm_mday as i64,
        ) * 86400
            + tm.tm_hour as i64 * 3600
            + tm.tm_min as i64 * 60
            + tm.tm_sec as i64
    }
}

fn assert_close(guest: i64, host: i64, what: &str, out: &Output) {
    assert!(
        (guest - host).abs() <= 120,
        "{what}: guest RTC {guest} vs host {host} (diff {} s)\n{}",
        guest - host,
        out.stdout
    );
}

#[test]
fn rtc_local_time_and_utc() {
    // Host local time, whatever this machine's zone is.
    let out = boot(TESTGUEST_BZIMAGE, "2", &[], &[], "smp", "rtc-local");
    assert_close(rtc_seconds(&out), host_seconds(false), "local", &out);
    // A zone 5:30 east of UTC (POSIX TZ string: no tzdata needed) tells local from UTC even
    // on a UTC host: local time by default, UTC with -u.
    let tz = [("TZ", "RHY-5:30")];
    let out = boot(TESTGUEST_BZIMAGE, "2", &[], &tz, "smp", "rtc-tz");
    assert_close(
        rtc_seconds(&out),
        host_seconds(true) + 5 * 3600 + 1800,
        "TZ=RHY-5:30",
        &out,
    );
    let out = boot(TESTGUEST_PVH, "2", &["-u"], &tz, "smp", "rtc-utc");
    assert_close(rtc_seconds(&out), host_seconds(true), "-u", &out);
}

#[test]
fn days_from_civil_known_dates() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2000, 3, 1), 11017);
    assert_eq!(days_from_civil(2026, 11, 26), 20783);
}

#[test]
fn vcpu_threads_are_named_and_pinned() {
    require_kvm();
    let dir = scratch_dir("smp-pin");
    let mut cmd = rhyve_cmd(&dir);
    cmd.args([
        "-c",
        "2",
        "-p",
        "0:1",
        "-p",
        "1:0",
        "-l",
        "com1,stdio",
        "--kernel",
        TESTGUEST_BZIMAGE,
    ])
    .args(["--append", "rhyve.test=echo", "smp-pin"])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let guard = KillOnDrop(cmd.spawn().unwrap());
    let pid = guard.0.id();
    // Wait until both vCPU threads exist, then read their names and CPU affinity.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pins = std::collections::BTreeMap::new();
    while pins.len() < 2 && Instant::now() < deadline {
        pins.clear();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            if let Some(n) = comm.trim().strip_prefix("vcpu ") {
                let allowed = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .unwrap_or("")
                    .trim()
                    .to_string();
                pins.insert(n.to_string(), allowed);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(pins.get("0").map(String::as_str), Some("1"), "{pins:?}");
    assert_eq!(pins.get("1").map(String::as_str), Some("0"), "{pins:?}");
}
