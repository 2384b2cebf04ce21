//! virtio-blk in the test bed: stock Linux in L2 timing `dd` with O_DIRECT against /dev/vda
//! (tests/testbed/scenarios/blk-bench/init.sh), on rhyve and on QEMU+KVM
//! (`aio=threads`) in the same L1, in the same run. L1's /tmp is ramfs: the image is buffered
//! on both VMMs. Each dd's time includes its process start in L2 and, for writes, the final
//! `conv=fsync` (a virtio FLUSH).

use std::path::Path;
use std::process::Command;

/// One `L2-BENCH <name> ms=N [us=N] bytes=N` line of L1's console log.
#[derive(Debug, Clone, PartialEq)]
pub struct L2Result {
    pub name: String,
    pub us: u64,
    pub bytes: u64,
}

impl L2Result {
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / (self.us.max(1) as f64 / 1e6)
    }
}

/// Parses the `L2-BENCH` lines of a console log (`L2| ` prefix, firmware noise before the
/// marker and `\r` tolerated); `us=` wins over `ms=`.
pub fn parse_console(log: &str) -> Vec<L2Result> {
    let mut v = Vec::new();
    for l in log.lines() {
        let Some(at) = l.find("L2-BENCH ") else {
            continue;
        };
        let mut words = l[at + "L2-BENCH ".len()..].split_whitespace();
        let Some(name) = words.next() else { continue };
        let (mut ms, mut us, mut bytes) = (None, None, None);
        for w in words {
            let Some((k, val)) = w.split_once('=') else {
                continue;
            };
            let n = val.trim_end_matches('\r').parse::<u64>().ok();
            match k {
                "ms" => ms = n,
                "us" => us = n,
                "bytes" => bytes = n,
                _ => {}
            }
        }
        let (Some(us), Some(bytes)) = (us.or(ms.map(|m| m * 1000)), bytes) else {
            continue;
        };
        v.push(L2Result {
            name: name.to_string(),
            us,
            bytes,
        });
    }
    v
}

/// Runs the `blk-bench` scenario with `vmm` and parses its console log.
fn run_vmm(root: &Path, vmm: &str) -> Option<Vec<L2Result>> {
    let status = Command::new(root.join("run-scenario"))
        .arg(root.join("scenarios/blk-bench"))
        .args(["--vmm", vmm, "--quiet"])
        .env("RHYVE_BIN", crate::rhyve_bin())
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?;
    if !status.success() {
        eprintln!("test bed: blk-bench with {vmm} failed");
        return None;
    }
    let log = root
        .join("../../target/testbed")
        .join(format!("blk-bench-{vmm}"))
        .join("console.log");
    let text = std::fs::read(log).ok()?;
    Some(parse_console(&String::from_utf8_lossy(&text)))
}

pub fn run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testbed");
    let rhyve = run_vmm(&root, "rhyve").unwrap_or_default();
    let qemu = run_vmm(&root, "qemu").unwrap_or_default();
    println!("Test bed: L2 Linux dd O_DIRECT on /dev/vda (virtio-blk), rhyve vs. QEMU+KVM aio=threads in one L1");
    println!(
        "  {:<14} {:>12} {:>12} {:>11}   {:>8}",
        "test", "qemu MiB/s", "rhyve MiB/s", "rhyve/qemu", "MiB"
    );
    let mut names: Vec<&str> = qemu.iter().map(|r| r.name.as_str()).collect();
    for r in &rhyve {
        if !names.contains(&r.name.as_str()) {
            names.push(&r.name);
        }
    }
    if names.is_empty() {
        println!("  n/a (no L2-BENCH lines)");
    }
    for name in names {
        let q = qemu.iter().find(|r| r.name == name);
        let r = rhyve.iter().find(|r| r.name == name);
        let show = |v: Option<&L2Result>| v.map_or("n/a".into(), |v| format!("{:.1}", v.mib_s()));
        let ratio = match (r, q) {
            (Some(r), Some(q)) => format!("{:.2}", r.mib_s() / q.mib_s()),
            _ => "n/a".into(),
        };
        let mib = r.or(q).map_or(0, |v| v.bytes >> 20);
        println!(
            "  {name:<14} {:>12} {:>12} {ratio:>11}   {mib:>8}",
            show(q),
            show(r)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_l2_bench_lines() {
        let log = "TESTBED: vmm-cmd=rhyve ...\r\n\
L2| L2-VDA-SIZE=131072\n\
L2| \x1b[0mL2-BENCH seq-write-1m ms=144 us=144882 bytes=33554432\r\n\
L2| L2-BENCH seq-read-4k ms=1505 bytes=8388608\n\
L2| L2-BENCH-DONE\n\
L2| L2-BENCH-FAILED seq-read-1m dd: error\n\
L2| L2-BENCH broken ms=x bytes=1\n";
        let v = parse_console(log);
        assert_eq!(
            v,
            vec![
                L2Result {
                    name: "seq-write-1m".into(),
                    us: 144882,
                    bytes: 33554432
                },
                L2Result {
                    name: "seq-read-4k".into(),
                    us: 1_505_000,
                    bytes: 8388608
                },
            ]
        );
        assert!((v[0].mib_s() - 32.0 / 0.144882).abs() < 1e-6);
    }
}
