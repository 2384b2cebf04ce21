//! virtio-net in the test bed: TCP throughput between stock Linux in L2 (its virtio_net driver)
//! and L1 over a tap (tests/testbed/scenarios/net-bench: 64 MiB each way through busybox nc,
//! timed by the sender), on rhyve and on QEMU+KVM's userspace virtio-net (`virtio-net-pci`,
//! `vhost=off`) on the same tap setup in the same L1.
//!
//! L1 is an emulated machine on a shared host: a run's figures move with the host's load (and
//! TCP's segment sizes with them). The VMMs alternate, `RHYVE_L2NET_ROUNDS` rounds (default 2),
//! and each VMM's best run per direction is compared; every run is printed too.
//!
//! Where the time goes, for each best run: the VMM process's CPU time during the transfer from
//! L1's /proc (`TESTBED: net-cpu.*` checkpoints): user time outside the guest, system time (KVM
//! and the tap in L1's kernel), time in L2 (guest), and all of L1's busy time. L1 has one
//! emulated CPU and is busy all through a transfer, so a VMM's share sets how much it can gain.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One `NET-BENCH <name> us=N bytes=N rc=0` line of L1's console log (L1's own, or L2's with
/// the `L2| ` prefix).
#[derive(Debug, Clone, PartialEq)]
pub struct NetResult {
    pub name: String,
    pub us: u64,
    pub bytes: u64,
}

impl NetResult {
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / (self.us.max(1) as f64 / 1e6)
    }
}

/// Parses the `NET-BENCH` lines of a console log; a transfer whose `nc` failed (`rc` not 0) or
/// a line missing a field is left out.
pub fn parse_console(log: &str) -> Vec<NetResult> {
    let mut v = Vec::new();
    for l in log.lines() {
        let Some(at) = l.find("NET-BENCH ") else {
            continue;
        };
        let mut words = l[at + "NET-BENCH ".len()..].split_whitespace();
        let Some(name) = words.next() else { continue };
        let (mut us, mut bytes, mut rc) = (None, None, None);
        for w in words {
            let Some((k, val)) = w.split_once('=') else {
                continue;
            };
            let n = val.trim_end_matches('\r').parse::<u64>().ok();
            match k {
                "us" => us = n,
                "bytes" => bytes = n,
                "rc" => rc = n,
                _ => {}
            }
        }
        if let (Some(us), Some(bytes), Some(0)) = (us, bytes, rc) {
            v.push(NetResult {
                name: name.to_string(),
                us,
                bytes,
            });
        }
    }
    v
}

/// One `TESTBED: net-cpu.LABEL=vmm utime=N stime=N gtime=N l1 USER NICE SYSTEM IDLE IOWAIT ...`
/// checkpoint: the VMM's CPU time and L1's, in clock ticks (10 ms).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuMark {
    pub label: String,
    pub utime: u64,
    pub stime: u64,
    pub gtime: u64,
    /// L1's busy CPU time: user nice system irq softirq steal (guest time is part of user).
    pub l1_busy: u64,
}

pub fn parse_cpu(log: &str) -> Vec<CpuMark> {
    let mut v = Vec::new();
    for l in log.lines() {
        let Some(at) = l.find("TESTBED: net-cpu.") else {
            continue;
        };
        let rest = l[at + "TESTBED: net-cpu.".len()..].trim_end_matches('\r');
        let Some((label, rest)) = rest.split_once("=vmm ") else {
            continue;
        };
        let Some((vmm, l1)) = rest.split_once(" l1 ") else {
            continue;
        };
        let field = |k: &str| {
            vmm.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok())
        };
        let l1: Option<Vec<u64>> = l1.split_whitespace().map(|w| w.parse().ok()).collect();
        let (Some(utime), Some(stime), Some(gtime), Some(l1)) =
            (field("utime"), field("stime"), field("gtime"), l1)
        else {
            continue;
        };
        let l1_busy = l1
            .iter()
            .take(8)
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, t)| t)
            .sum();
        v.push(CpuMark {
            label: label.to_string(),
            utime,
            stime,
            gtime,
            l1_busy,
        });
    }
    v
}

/// CPU seconds during one transfer: (VMM user outside the guest, VMM system, guest, L1 busy).
pub fn cpu_split(marks: &[CpuMark], test: &str) -> Option<(f64, f64, f64, f64)> {
    let (from, to) = match test {
        "tcp-l2-to-l1" => ("rx-start", "rx-end"),
        "tcp-l1-to-l2" => ("tx-start", "tx-done"),
        _ => return None,
    };
    let a = marks.iter().find(|m| m.label == from)?;
    let b = marks.iter().find(|m| m.label == to)?;
    let d = |x: u64, y: u64| y.checked_sub(x).map(|t| t as f64 / 100.0);
    let guest = d(a.gtime, b.gtime)?;
    Some((
        (d(a.utime, b.utime)? - guest).max(0.0),
        d(a.stime, b.stime)?,
        guest,
        d(a.l1_busy, b.l1_busy)?,
    ))
}

/// One scenario run: its transfers and its CPU checkpoints.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub results: Vec<NetResult>,
    pub cpu: Vec<CpuMark>,
}

/// The run with the fastest result named `name`, and that result.
pub fn best_run<'a>(runs: &'a [Run], name: &str) -> Option<(&'a Run, &'a NetResult)> {
    runs.iter()
        .filter_map(|run| Some((run, run.results.iter().find(|r| r.name == name)?)))
        .max_by(|a, b| a.1.mib_s().total_cmp(&b.1.mib_s()))
}

/// Runs the `net-bench` scenario once with `vmm`; the parsed console log, or None if the
/// scenario failed (its log is kept in `out`).
fn run_vmm(root: &Path, out: &Path, vmm: &str) -> Option<Run> {
    let status = Command::new(root.join("run-scenario"))
        .arg(root.join("scenarios/net-bench"))
        .args(["--vmm", vmm, "--quiet", "--timeout", "500", "--out"])
        .arg(out)
        .env("RHYVE_BIN", crate::rhyve_bin())
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?;
    if !status.success() {
        eprintln!(
            "test bed: net-bench with {vmm} failed: see {}",
            out.display()
        );
        return None;
    }
    let text = std::fs::read(out.join("console.log")).ok()?;
    let text = String::from_utf8_lossy(&text);
    Some(Run {
        results: parse_console(&text),
        cpu: parse_cpu(&text),
    })
}

pub fn run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testbed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let rounds: usize = std::env::var("RHYVE_L2NET_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let (mut rhyve, mut qemu) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for (vmm, runs) in [("rhyve", &mut rhyve), ("qemu", &mut qemu)] {
            let out = target.join(format!("testbed/net-bench-{vmm}-{round}"));
            if let Some(v) = run_vmm(&root, &out, vmm) {
                runs.push(v);
            }
        }
    }
    print!("{}", report(&qemu, &rhyve, rounds));
}

/// The comparison table: each VMM's best run per test, every run's figure, and the CPU split of
/// the best runs.
pub fn report(qemu: &[Run], rhyve: &[Run], rounds: usize) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    _ = writeln!(
        o,
        "Test bed: L2 Linux virtio_net TCP (nc -e dd, 64 MiB) to/from L1 over a tap, rhyve vs. \
         QEMU+KVM virtio-net-pci vhost=off in one L1; best of {rounds}"
    );
    _ = writeln!(
        o,
        "  {:<14} {:>12} {:>12} {:>11}   all runs (MiB/s) qemu | rhyve",
        "test", "qemu MiB/s", "rhyve MiB/s", "rhyve/qemu"
    );
    let tests = ["tcp-l2-to-l1", "tcp-l1-to-l2"];
    for name in tests {
        let (q, r) = (best_run(qemu, name), best_run(rhyve, name));
        let show = |v: Option<(&Run, &NetResult)>| {
            v.map_or("n/a".into(), |(_, v)| format!("{:.2}", v.mib_s()))
        };
        let ratio = match (r, q) {
            (Some((_, r)), Some((_, q))) => format!("{:.2}", r.mib_s() / q.mib_s()),
            _ => "n/a".into(),
        };
        let all = |runs: &[Run]| {
            runs.iter()
                .map(|run| {
                    run.results
                        .iter()
                        .find(|x| x.name == name)
                        .map_or("n/a".into(), |x| format!("{:.2}", x.mib_s()))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        _ = writeln!(
            o,
            "  {name:<14} {:>12} {:>12} {ratio:>11}   {} | {}",
            show(q),
            show(r),
            all(qemu),
            all(rhyve)
        );
    }
    _ = writeln!(
        o,
        "  CPU seconds during the best runs' transfers (L1 has one CPU, busy throughout):"
    );
    _ = writeln!(
        o,
        "  {:<14} {:<6} {:>14} {:>12} {:>10} {:>9}",
        "test", "vmm", "user w/o L2", "system", "in L2", "L1 busy"
    );
    for name in tests {
        for (vmm, runs) in [("qemu", qemu), ("rhyve", rhyve)] {
            match best_run(runs, name).and_then(|(run, _)| cpu_split(&run.cpu, name)) {
                Some((user, sys, guest, busy)) => {
                    _ = writeln!(
                        o,
                        "  {name:<14} {vmm:<6} {user:>14.2} {sys:>12.2} {guest:>10.2} {busy:>9.2}"
                    )
                }
                None => _ = writeln!(o, "  {name:<14} {vmm:<6} n/a"),
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_net_bench_lines() {
        let log = "TESTBED: vmm-cmd=rhyve ...\r\n\
L2| \x1b[0mNET-BENCH tcp-l2-to-l1 us=2000000 bytes=67108864 rc=0\r\n\
NET-BENCH tcp-l1-to-l2 us=4000000 bytes=67108864 rc=0\n\
NET-BENCH tcp-l1-to-l2 us=1 bytes=67108864 rc=1\n\
L2| NET-BENCH broken us=x bytes=1 rc=0\n\
L2| NET-BENCH norc us=5 bytes=1\n";
        let v = parse_console(log);
        assert_eq!(
            v,
            vec![
                NetResult {
                    name: "tcp-l2-to-l1".into(),
                    us: 2_000_000,
                    bytes: 67108864
                },
                NetResult {
                    name: "tcp-l1-to-l2".into(),
                    us: 4_000_000,
                    bytes: 67108864
                },
            ]
        );
        assert!((v[0].mib_s() - 32.0).abs() < 1e-9);
        assert!((v[1].mib_s() - 16.0).abs() < 1e-9);
    }

    #[test]
    fn best_run_picks_the_fastest_run_per_test() {
        let r = |name: &str, us| NetResult {
            name: name.into(),
            us,
            bytes: 1 << 20,
        };
        let run = |results| Run {
            results,
            cpu: vec![],
        };
        let runs = vec![
            run(vec![r("a", 4_000_000), r("b", 1_000_000)]),
            run(vec![r("a", 2_000_000)]),
            run(vec![]),
        ];
        assert_eq!(best_run(&runs, "a").map(|(_, x)| x.us), Some(2_000_000));
        assert_eq!(best_run(&runs, "b").map(|(_, x)| x.us), Some(1_000_000));
        assert!(best_run(&runs, "c").is_none());
    }

    #[test]
    fn parses_cpu_marks_and_splits_a_transfer() {
        let log = "TESTBED: net-cpu.start=vmm utime=? stime=? gtime=? l1 12 0 209 0 0 0 0 0 0 0\n\
TESTBED: net-cpu.rx-start=vmm utime=100 stime=50 gtime=80 l1 300 0 200 40 5 0 1 0 80 0\r\n\
TESTBED: net-cpu.rx-end=vmm utime=600 stime=330 gtime=540 l1 900 0 650 45 5 0 2 0 540 0\n";
        let m = parse_cpu(log);
        assert_eq!(m.len(), 2, "the mark without a VMM is left out: {m:?}");
        assert_eq!(
            m[0],
            CpuMark {
                label: "rx-start".into(),
                utime: 100,
                stime: 50,
                gtime: 80,
                l1_busy: 300 + 200 + 1,
            }
        );
        let (user, sys, guest, busy) = cpu_split(&m, "tcp-l2-to-l1").expect("both marks");
        assert!((user - 0.40).abs() < 1e-9, "{user}");
        assert!((sys - 2.80).abs() < 1e-9);
        assert!((guest - 4.60).abs() < 1e-9);
        assert!((busy - (1_552.0 - 501.0) / 100.0).abs() < 1e-9, "{busy}");
        assert!(cpu_split(&m, "tcp-l1-to-l2").is_none());
    }

    #[test]
    fn report_compares_best_runs_and_splits_their_cpu() {
        let log = |l2_l1_us: u64, l1_l2_us: u64| {
            format!(
                "TESTBED: net-cpu.rx-start=vmm utime=100 stime=50 gtime=80 l1 300 0 200 40 5 0 1 0 80 0\n\
NET-BENCH tcp-l2-to-l1 us={l2_l1_us} bytes=67108864 rc=0\n\
TESTBED: net-cpu.rx-end=vmm utime=600 stime=330 gtime=540 l1 900 0 650 45 5 0 2 0 540 0\n\
TESTBED: net-cpu.tx-start=vmm utime=600 stime=330 gtime=540 l1 900 0 650 45 5 0 2 0 540 0\n\
TESTBED: net-cpu.tx-done=vmm utime=700 stime=340 gtime=600 l1 1000 0 660 45 5 0 2 0 600 0\n\
L2| NET-BENCH tcp-l1-to-l2 us={l1_l2_us} bytes=67108864 rc=0\n"
            )
        };
        let run = |text: String| Run {
            results: parse_console(&text),
            cpu: parse_cpu(&text),
        };
        let qemu = vec![
            run(log(8_000_000, 4_000_000)),
            run(log(4_000_000, 8_000_000)),
        ];
        let rhyve = vec![run(log(2_000_000, 16_000_000))];
        let out = report(&qemu, &rhyve, 2);
        // best qemu: 16 MiB/s both ways; rhyve 32 and 4 MiB/s
        assert!(
            out.contains(
                "tcp-l2-to-l1          16.00        32.00        2.00   8.00 16.00 | 32.00"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "tcp-l1-to-l2          16.00         4.00        0.25   16.00 8.00 | 4.00"
            ),
            "{out}"
        );
        assert!(
            out.contains("tcp-l2-to-l1   rhyve            0.40         2.80       4.60     10.51"),
            "{out}"
        );
        assert!(
            out.contains("tcp-l1-to-l2   qemu             0.40         0.10       0.60      1.10"),
            "{out}"
        );
    }
}
