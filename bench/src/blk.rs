//! virtio-blk throughput on this machine's KVM: the project's test guest (`rhyve.test=blk-bench`,
//! guests/testguest/src/bench.rs) on rhyve against this process doing the same requests
//! directly on the same image file, in the same run.
//!
//! Both sides, in this order, over the first [`REGION`] bytes of one preallocated image
//! (written in full and fdatasync'ed before anything is timed, so both start page-cache warm):
//! - seq-write: 1 MiB writes from offset 0 up, then a flush (guest: virtio FLUSH, which rhyve
//!   turns into fdatasync; host: fdatasync), flush inside the timed span;
//! - seq-read: 1 MiB reads over the same region;
//! - rand-write: [`OPS`] 4 KiB writes at `(xorshift64() % blocks) * 4096` from
//!   [`SEED_WRITE`], then a flush;
//! - rand-read: the same with [`SEED_READ`].
//!
//! The host side is buffered pread/pwrite (`FileExt::{read_at,write_at}`), one request at a
//! time — what rhyve does by default (buffered, fdatasync on FLUSH). The guest runs the random
//! tests twice: with 16 requests in flight and with 1. Guest time is the guest's ACPI PM timer
//! (3.579545 MHz) from before its first request to after its last completion: VM start and
//! device setup are excluded, as is the host's open(). Best of [`ROUNDS`] on each side.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const REGION: u64 = 64 << 20;
pub const OPS: u64 = 2000;
pub const SEED_WRITE: u64 = 0x2545_f491_4f6c_dd1d;
pub const SEED_READ: u64 = 0x9e37_79b9_7f4a_7c15;
const ROUNDS: usize = 3;
const PM_HZ: f64 = 3_579_545.0;
const SEQ: usize = 1 << 20;
const SMALL: usize = 4096;

/// The guest's generator (xorshift64, Marsaglia 13/7/17).
pub struct Prng(pub u64);
impl Prng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// 4 KiB-aligned offsets of a random test, and the generator's final state (the guest prints
/// it as `prng=`).
pub fn offsets(seed: u64, ops: u64, region: u64) -> (Vec<u64>, u64) {
    let mut r = Prng(seed);
    let blocks = region / SMALL as u64;
    let v = (0..ops)
        .map(|_| (r.next_u64() % blocks) * SMALL as u64)
        .collect();
    (v, r.0)
}

/// One `rhyve-guest: bench <name> ...` result line.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestResult {
    pub name: String,
    pub bytes: u64,
    pub ops: u64,
    pub ticks: u64,
    pub qd: u64,
    pub prng: Option<u64>,
}

impl GuestResult {
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / (self.ticks.max(1) as f64 / PM_HZ)
    }
}

/// Parses the guest's `bench <name> MiB/s=... bytes=N ops=N ticks=N qd=N [k=v ...]` lines
/// (with or without the `rhyve-guest: ` prefix); `config` and `done` lines are skipped.
pub fn parse_guest(out: &str) -> Vec<GuestResult> {
    let mut v = Vec::new();
    for l in out.lines() {
        let l = l.trim_end_matches('\r');
        let l = l.strip_prefix("rhyve-guest: ").unwrap_or(l);
        let Some(rest) = l.strip_prefix("bench ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(name) = words.next() else { continue };
        let mut kv = std::collections::HashMap::new();
        for w in words {
            if let Some((k, val)) = w.split_once('=') {
                kv.insert(k, val);
            }
        }
        let num = |k: &str| kv.get(k).and_then(|s| s.parse::<u64>().ok());
        let (Some(bytes), Some(ops), Some(ticks), Some(qd)) =
            (num("bytes"), num("ops"), num("ticks"), num("qd"))
        else {
            continue;
        };
        let prng = kv
            .get("prng")
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
        v.push(GuestResult {
            name: name.to_string(),
            bytes,
            ops,
            ticks,
            qd,
            prng,
        });
    }
    v
}

/// The image, removed on drop.
struct Image(PathBuf);
impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn make_image(path: &Path) -> std::io::Result<()> {
    let f = File::create(path)?;
    let buf = vec![0xa5u8; SEQ];
    for i in 0..REGION / SEQ as u64 {
        f.write_all_at(&buf, i * SEQ as u64)?;
    }
    f.sync_all()
}

/// The host's pass: (name, MiB/s) per test, in the guest's order.
fn host_pass(path: &Path) -> std::io::Result<Vec<(String, f64)>> {
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let mut big = vec![0x3cu8; SEQ];
    let mut small = vec![0x5au8; SMALL];
    let mib = |bytes: u64, t: Instant| bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let mut out = Vec::new();

    let t = Instant::now();
    for i in 0..REGION / SEQ as u64 {
        f.write_all_at(&big, i * SEQ as u64)?;
    }
    f.sync_data()?;
    out.push(("seq-write".into(), mib(REGION, t)));

    let t = Instant::now();
    for i in 0..REGION / SEQ as u64 {
        f.read_exact_at(&mut big, i * SEQ as u64)?;
    }
    out.push(("seq-read".into(), mib(REGION, t)));

    let (offs, _) = offsets(SEED_WRITE, OPS, REGION);
    let t = Instant::now();
    for &o in &offs {
        f.write_all_at(&small, o)?;
    }
    f.sync_data()?;
    out.push(("rand-write".into(), mib(OPS * SMALL as u64, t)));

    let (offs, _) = offsets(SEED_READ, OPS, REGION);
    let t = Instant::now();
    for &o in &offs {
        f.read_exact_at(&mut small, o)?;
    }
    out.push(("rand-read".into(), mib(OPS * SMALL as u64, t)));
    std::hint::black_box((&big, &small));
    Ok(out)
}

/// One rhyve run of the bench guest with `qd` requests in flight; its stdout (COM1).
fn guest_pass(image: &Path, qd: u64) -> Result<Vec<GuestResult>, String> {
    let out = Command::new(crate::rhyve_bin())
        .args(["-m", "128M", "-s", "0,hostbridge", "-s", "31,lpc", "-s"])
        .arg(format!("3,virtio-blk,{}", image.display()))
        .args(["-l", "com1,stdio", "-l", "pc-testdev", "--kernel"])
        .arg(rhyve_tests::TESTGUEST_BZIMAGE)
        .arg("--append")
        .arg(format!(
            "rhyve.test=blk-bench rhyve.bench.mib={} rhyve.bench.ops={OPS} rhyve.bench.qd={qd}",
            REGION >> 20
        ))
        .arg("rhyve-bench-blk")
        .env("RHYVE_RUNDIR", std::env::temp_dir().join("rhyve-bench"))
        .output()
        .map_err(|e| format!("run rhyve: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.contains("FAIL") || !stdout.contains("bench done") {
        return Err(format!(
            "guest failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let res = parse_guest(&stdout);
    // Same offsets on both sides: the guest's generator must end where ours does.
    for r in &res {
        let seed = match r.name.as_str() {
            "rand-write" => SEED_WRITE,
            "rand-read" => SEED_READ,
            _ => continue,
        };
        let (_, end) = offsets(seed, r.ops, REGION);
        if r.prng != Some(end) || r.ops != OPS {
            return Err(format!(
                "{}: guest offsets differ from the host's (prng {:?}, want {end:#x})",
                r.name, r.prng
            ));
        }
    }
    Ok(res)
}

fn best(v: &mut Option<f64>, x: f64) {
    *v = Some(v.map_or(x, |b| b.max(x)));
}

pub fn run() {
    let path = std::env::temp_dir().join(format!("rhyve-bench-blk-{}.img", std::process::id()));
    let img = Image(path.clone());
    if let Err(e) = make_image(&img.0) {
        println!(
            "virtio-blk on this KVM: cannot create {}: {e}",
            path.display()
        );
        return;
    }
    // Rows: (test, guest qd) -> best host MiB/s, best guest MiB/s.
    let rows: [(&str, u64); 6] = [
        ("seq-write", 1),
        ("seq-read", 1),
        ("rand-write", 16),
        ("rand-read", 16),
        ("rand-write", 1),
        ("rand-read", 1),
    ];
    let mut host = [None; 6];
    let mut guest = [None; 6];
    for _ in 0..ROUNDS {
        match host_pass(&img.0) {
            Ok(h) => {
                for (i, (name, _)) in rows.iter().enumerate() {
                    if let Some((_, m)) = h.iter().find(|(n, _)| n == name) {
                        best(&mut host[i], *m);
                    }
                }
            }
            Err(e) => println!("  host pass failed: {e}"),
        }
        for qd in [16, 1] {
            match guest_pass(&img.0, qd) {
                Ok(g) => {
                    for r in g {
                        // Sequential tests run at qd 1 in both guest runs: best of both.
                        if let Some(i) = rows.iter().position(|&(n, q)| n == r.name && q == r.qd) {
                            best(&mut guest[i], r.mib_s());
                        }
                    }
                }
                Err(e) => println!("  rhyve guest run (qd {qd}) failed: {e}"),
            }
        }
    }
    drop(img);
    println!(
        "virtio-blk, this machine's KVM: test guest on rhyve vs. the host on the same {} MiB image file",
        REGION >> 20
    );
    println!(
        "  (buffered, page-cache warm; writes end with a flush = fdatasync; host: pread/pwrite one at a time; best of {ROUNDS})"
    );
    println!(
        "  {:<28} {:>12} {:>18} {:>7}",
        "test", "host MiB/s", "rhyve-guest MiB/s", "ratio"
    );
    for (i, (name, qd)) in rows.iter().enumerate() {
        let size = if name.starts_with("seq") {
            "1 MiB"
        } else {
            "4 KiB"
        };
        let label = format!("{name} {size} guest-qd{qd}");
        let ops = if name.starts_with("seq") {
            format!("{}x", REGION >> 20)
        } else {
            format!("{OPS}x")
        };
        let show = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.1}"));
        let ratio = match (host[i], guest[i]) {
            (Some(h), Some(g)) if h > 0.0 => format!("{:.3}", g / h),
            _ => "n/a".into(),
        };
        println!(
            "  {:<28} {:>12} {:>18} {:>7}   ({ops})",
            label,
            show(host[i]),
            show(guest[i]),
            ratio
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_result_lines() {
        let out = "rhyve-guest: bench config region=67108864 ops=2000 qd=16 qsize=64 size_max=1048576 seg_max=254\n\
rhyve-guest: bench seq-write MiB/s=581.39 bytes=67108864 ops=64 ticks=394036 qd=1 segs=1\n\
rhyve-guest: bench rand-read MiB/s=35.18 bytes=8192000 ops=2000 ticks=794884 qd=16 iops=9006 prng=0xc8025c367c3730d8\r\n\
rhyve-guest: bench done\n\
rhyve-guest: checks fail=0\n";
        let v = parse_guest(out);
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0],
            GuestResult {
                name: "seq-write".into(),
                bytes: 67108864,
                ops: 64,
                ticks: 394036,
                qd: 1,
                prng: None
            }
        );
        assert_eq!(v[1].name, "rand-read");
        assert_eq!(v[1].qd, 16);
        assert_eq!(v[1].prng, Some(0xc802_5c36_7c37_30d8));
        // The guest's own integer figure, recomputed.
        assert!((v[0].mib_s() - 581.39).abs() < 0.01, "{}", v[0].mib_s());
        assert!((v[1].mib_s() - 35.18).abs() < 0.01, "{}", v[1].mib_s());
    }

    #[test]
    fn skips_malformed_lines() {
        assert!(
            parse_guest("bench seq-read MiB/s=1 bytes=x ops=1 ticks=1 qd=1\nbench\n").is_empty()
        );
    }

    /// The final states the guest printed for 2000 offsets over 64 MiB (its own xorshift64):
    /// the host replays exactly the guest's sequence.
    #[test]
    fn host_offsets_match_the_guest_generator() {
        let (w, end) = offsets(SEED_WRITE, 2000, 64 << 20);
        assert_eq!(end, 0xfc52_231d_0550_adfa);
        assert_eq!(w.len(), 2000);
        assert!(w.iter().all(|&o| o % 4096 == 0 && o < 64 << 20));
        assert_eq!(offsets(SEED_READ, 2000, 64 << 20).1, 0xc802_5c36_7c37_30d8);
    }
}
