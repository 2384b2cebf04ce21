//! Boot time and memory overhead in the test bed (`tests/testbed/scenarios/boot-compare`): one
//! L1 with both VMMs boots the same stock Debian kernel, initramfs and command line to L2's
//! /init with rhyve, QEMU pc (`-kernel`) and QEMU microvm, as bzImage and as PVH vmlinux,
//! in alternating order, and reads each VMM's own resident memory (every mapping but the
//! guest RAM block) while L2 sits at /init. Also the firmware boot (SeaBIOS + GRUB, rhyve
//! against QEMU) and huge pages against 4 KiB pages for guest RAM.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const VMMS: [&str; 3] = ["rhyve", "pc", "microvm"];
const KERNELS: [(&str, &str); 2] = [("bz", "bzImage"), ("pvh", "PVH")];

/// `TESTBED: key=value` lines of L1's console log whose value is a number.
pub fn metrics(log: &str) -> BTreeMap<String, u64> {
    log.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("TESTBED: "))
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// Values of `prefix.VMM-KERNEL-ROUND` for every round, in round order.
fn series(m: &BTreeMap<String, u64>, prefix: &str, vmm: &str, kernel: &str) -> Vec<u64> {
    let head = format!("{prefix}.{vmm}-{kernel}-");
    let mut v: Vec<(u32, u64)> = m
        .iter()
        .filter_map(|(k, val)| Some((k.strip_prefix(&head)?.parse().ok()?, *val)))
        .collect();
    v.sort();
    v.into_iter().map(|(_, val)| val).collect()
}

fn median(v: &[u64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort();
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2] as f64),
        n => Some((s[n / 2 - 1] + s[n / 2]) as f64 / 2.0),
    }
}

/// Runs test-bed `scenario` with `--vmm vmm` and returns the `TESTBED:` metrics of its L1
/// console log (whatever it printed, also after a failure, which is reported).
fn testbed_metrics(scenario: &str, vmm: &str) -> BTreeMap<String, u64> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testbed");
    let status = Command::new(root.join("run-scenario"))
        .arg(root.join("scenarios").join(scenario))
        .args(["--vmm", vmm, "--quiet", "--timeout", "900"])
        .env("RHYVE_BIN", crate::rhyve_bin())
        .stdout(std::process::Stdio::null())
        .status();
    let log_path = root.join(format!("../../target/testbed/{scenario}-{vmm}/console.log"));
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.is_ok_and(|s| s.success()) {
        println!("Test bed {scenario}: failed, see {}", log_path.display());
    }
    metrics(&log)
}

pub fn run() {
    let m = testbed_metrics("boot-compare", "both");
    println!(
        "Test bed: VMM start -> stock Linux /init in one L1 (ms, median of {} alternating rounds; \
         best in brackets)",
        m.get("boot-compare-rounds").copied().unwrap_or(0)
    );
    for (kernel, label) in KERNELS {
        let times: Vec<Vec<u64>> = VMMS
            .iter()
            .map(|v| series(&m, "l2-init-ms", v, kernel))
            .collect();
        let med: Vec<Option<f64>> = times.iter().map(|t| median(t)).collect();
        let mut line = format!("  {label:<8}");
        for (i, v) in VMMS.iter().enumerate() {
            let best = times[i].iter().min();
            match (med[i], best) {
                (Some(md), Some(b)) => line += &format!("  {v} {md:6.0} [{b:5}]"),
                _ => line += &format!("  {v}    n/a"),
            }
        }
        let ratio = |j: usize| match (med[0], med[j]) {
            (Some(r), Some(q)) if q > 0.0 => format!("{:.2}x", r / q),
            _ => "n/a".into(),
        };
        println!("{line}   rhyve/pc {}  rhyve/microvm {}", ratio(1), ratio(2));
    }
    println!("  VMM's own resident memory at L2's /init (all but guest RAM; KiB, median):");
    for (kernel, label) in KERNELS {
        let mut line = format!("  {label:<8}");
        for v in VMMS {
            match median(&series(&m, "rss-own-kb", v, kernel)) {
                Some(kb) => line += &format!("  {v} {kb:7.0}"),
                None => line += &format!("  {v}     n/a"),
            }
        }
        println!("{line}");
    }
}

/// Firmware boot, both VMMs in one L1 per firmware: `scenarios/seabios-grub` (SeaBIOS boots
/// GRUB i386-pc from a virtio-blk disk's MBR; kernel and initramfs read through int 13h by
/// SeaBIOS's own virtio-blk driver) and `scenarios/ovmf` (OVMF with a fresh VARSFILE boots
/// GRUB from an EFI system partition through its own virtio-blk driver; first boot, then the
/// second on the variables the first left), each to L2's /init on rhyve and on QEMU+KVM.
pub fn run_firmware() {
    let show = |v: Option<&u64>| v.map_or("n/a".to_string(), |v| format!("{v} ms"));
    let line = |m: &BTreeMap<String, u64>, what: &str, rhyve: &str, qemu: &str| {
        let (r, q) = (m.get(rhyve), m.get(qemu));
        let ratio = match (r, q) {
            (Some(r), Some(q)) if *q > 0 => format!("{:.2}x", *r as f64 / *q as f64),
            _ => "n/a".into(),
        };
        println!(
            "  {what:<32} rhyve {:>9}  QEMU {:>9}  rhyve/QEMU {ratio}",
            show(r),
            show(q)
        );
    };
    println!("Test bed: VMM start -> stock Linux /init through firmware and GRUB from virtio-blk");
    let m = testbed_metrics("seabios-grub", "both");
    line(
        &m,
        "SeaBIOS + GRUB (MBR)",
        "l2-init-ms.rhyve",
        "l2-init-ms.qemu",
    );
    let m = testbed_metrics("ovmf", "both");
    line(
        &m,
        "OVMF + GRUB (ESP), first boot",
        "l2-init-ms.rhyve-first",
        "l2-init-ms.qemu-first",
    );
    line(
        &m,
        "OVMF + GRUB (ESP), second boot",
        "l2-init-ms.rhyve-second",
        "l2-init-ms.qemu-second",
    );
}

/// Huge pages against 4 KiB pages for guest RAM (`scenarios/hugepages`, rhyve, PVH boot to
/// /init, 2 alternating rounds): KVM's nested-paging faults, rhyve's minor faults, boot time.
pub fn run_hugepages() {
    let m = testbed_metrics("hugepages", "rhyve");
    println!("Test bed: guest RAM on huge pages vs 4 KiB pages (rhyve, PVH to /init, median of 2)");
    for hp in ["on", "off"] {
        let med = |what: &str| {
            let v: Vec<u64> = (1..=2)
                .filter_map(|r| m.get(&format!("{what}.{hp}-{r}")).copied())
                .collect();
            median(&v).map_or("n/a".to_string(), |x| format!("{x:.0}"))
        };
        println!(
            "  memory.hugepages={hp:<3}  NPT faults {:>6}  rhyve minor faults {:>6}  /init {:>5} ms",
            med("npt-faults"),
            med("host-minflt"),
            med("l2-init-ms")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_come_in_round_order() {
        let log = "TESTBED: l2-init-ms.rhyve-bz-2=900\r\nnoise\nTESTBED: l2-init-ms.rhyve-bz-1=1000\n\
                   TESTBED: l2-init-ms.pc-bz-1=2000\nTESTBED: vmm-cmd=x y\nTESTBED: rss-own-kb.rhyve-pvh-1=4000\n";
        let m = metrics(log);
        assert_eq!(series(&m, "l2-init-ms", "rhyve", "bz"), vec![1000, 900]);
        assert_eq!(series(&m, "l2-init-ms", "pc", "bz"), vec![2000]);
        assert_eq!(series(&m, "rss-own-kb", "rhyve", "pvh"), vec![4000]);
        assert!(series(&m, "l2-init-ms", "microvm", "bz").is_empty());
        assert_eq!(median(&[3, 1, 2]), Some(2.0));
        assert_eq!(median(&[4, 1]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
