//! virtio-net in the test bed: TCP throughput between stock Linux in L2 (its virtio_net driver)
//! and L1 over a tap (tests/testbed/scenarios/net-bench: 64 MiB each way through busybox nc,
//! timed by the sender), on rhyve and on QEMU+KVM's userspace virtio-net (`virtio-net-pci`,
//! `vhost=off`) on the same tap setup in the same L1.
//!
//! L1 is an emulated machine on a shared host: a run's figures move with the host's load (and
//! TCP's segment sizes with them). The VMMs alternate, `RHYVE_L2NET_ROUNDS` rounds (default 2),
//! and each VMM's best run per direction is compared; every run is printed too.

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

/// The fastest result named `name` among `runs`.
pub fn best<'a>(runs: &'a [Vec<NetResult>], name: &str) -> Option<&'a NetResult> {
    runs.iter()
        .flatten()
        .filter(|r| r.name == name)
        .max_by(|a, b| a.mib_s().total_cmp(&b.mib_s()))
}

/// Runs the `net-bench` scenario once with `vmm`; the parsed console log, or None if the
/// scenario failed (its log is kept in `out`).
fn run_vmm(root: &Path, out: &Path, vmm: &str) -> Option<Vec<NetResult>> {
    let status = Command::new(root.join("run-scenario"))
        .arg(root.join("scenarios/net-bench"))
        .args(["--vmm", vmm, "--quiet", "--timeout", "1000", "--out"])
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
    Some(parse_console(&String::from_utf8_lossy(&text)))
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
    println!(
        "Test bed: L2 Linux virtio_net TCP (busybox nc, 64 MiB) to/from L1 over a tap, rhyve vs. \
         QEMU+KVM virtio-net-pci vhost=off in one L1; best of {rounds}"
    );
    println!(
        "  {:<14} {:>12} {:>12} {:>11}   runs (MiB/s) qemu | rhyve",
        "test", "qemu MiB/s", "rhyve MiB/s", "rhyve/qemu"
    );
    for name in ["tcp-l2-to-l1", "tcp-l1-to-l2"] {
        let (q, r) = (best(&qemu, name), best(&rhyve, name));
        let show = |v: Option<&NetResult>| v.map_or("n/a".into(), |v| format!("{:.2}", v.mib_s()));
        let ratio = match (r, q) {
            (Some(r), Some(q)) => format!("{:.2}", r.mib_s() / q.mib_s()),
            _ => "n/a".into(),
        };
        let all = |runs: &[Vec<NetResult>]| {
            runs.iter()
                .map(|v| {
                    v.iter()
                        .find(|x| x.name == name)
                        .map_or("n/a".into(), |x| format!("{:.2}", x.mib_s()))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "  {name:<14} {:>12} {:>12} {ratio:>11}   {} | {}",
            show(q),
            show(r),
            all(&qemu),
            all(&rhyve)
        );
    }
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
    fn best_picks_the_fastest_run_per_test() {
        let r = |name: &str, us| NetResult {
            name: name.into(),
            us,
            bytes: 1 << 20,
        };
        let runs = vec![
            vec![r("a", 4_000_000), r("b", 1_000_000)],
            vec![r("a", 2_000_000)],
            vec![],
        ];
        assert_eq!(best(&runs, "a").map(|x| x.us), Some(2_000_000));
        assert_eq!(best(&runs, "b").map(|x| x.us), Some(1_000_000));
        assert!(best(&runs, "c").is_none());
    }
}
