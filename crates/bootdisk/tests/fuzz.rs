//! Fuzz-style robustness test: random mutations (byte writes, bit flips, truncation) of small
//! real ext4, FAT, GPT and qcow2 images must give an Ok or an Error, never a panic. Bounded
//! iterations with fixed seeds, so a failure is reproducible and the test stays fast.

mod common;

use bootdisk::{find_boot_on_disk, open_qcow2, Disk, MemDisk, Options};
use common::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

/// Per image; BOOTDISK_FUZZ_ITERATIONS raises it for a longer hunt.
fn iterations() -> u64 {
    std::env::var("BOOTDISK_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Mutates `image` `ITERATIONS` times (restoring it in between) and runs the whole discovery
/// on each. `hot` are the byte ranges holding most metadata, where most mutations land.
/// Returns how many runs succeeded (the rest gave errors).
fn fuzz(name: &str, image: Vec<u8>, hot: &[(u64, u64)], qcow: bool) -> u64 {
    let opts = Options {
        max_file_bytes: 1 << 20,
        ..Options::default()
    };
    // The unmutated image must boot, or the mutations test nothing.
    let run = |data: Vec<u8>| -> (Vec<u8>, bool) {
        let mem = Rc::new(MemDisk {
            data,
            name: name.into(),
        });
        let disk: Rc<dyn Disk> = mem.clone();
        let ok = match if qcow { open_qcow2(disk) } else { Ok(disk) } {
            Ok(d) => find_boot_on_disk(d, &opts).is_ok(),
            Err(_) => false,
        };
        let data = Rc::try_unwrap(mem)
            .ok()
            .expect("no reference to the image outlives a run")
            .data;
        (data, ok)
    };
    let (mut image, ok) = run(image);
    assert!(ok, "{name}: the unmutated image must boot");
    let len = image.len() as u64;
    let mut oks = 0;
    for it in 0..iterations() {
        let mut rng = Rng(0x5eed_0000 + it * 7919 + len);
        let mut saved = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let pos = if rng.below(10) < 8 {
                let (a, b) = hot[rng.below(hot.len() as u64) as usize];
                let (a, b) = (a.min(len - 1), b.min(len));
                a + rng.below(b.saturating_sub(a))
            } else {
                rng.below(len)
            } as usize;
            saved.push((pos, image[pos]));
            image[pos] = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                2 => image[pos] ^ (1 << rng.below(8)),
                _ => rng.next() as u8,
            };
        }
        let truncate = rng.below(20) == 0;
        let tail = if truncate {
            let at = rng.below(len) as usize;
            image.split_off(at)
        } else {
            Vec::new()
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| run(std::mem::take(&mut image))));
        match outcome {
            Ok((back, ok)) => {
                image = back;
                oks += ok as u64;
            }
            Err(_) => panic!(
                "{name}: iteration {it} panicked (mutations {saved:?}, truncated {truncate})"
            ),
        }
        image.extend_from_slice(&tail);
        for (pos, b) in saved.into_iter().rev() {
            image[pos] = b;
        }
    }
    oks
}

#[test]
fn mutated_real_images_never_panic() {
    let t = Tmp::new("fuzz");
    let k = rand_bytes(71, 9_000);
    let i = rand_bytes(72, 3_000);
    let cfg = "set default=0\nmenuentry 'x' { linux /boot/vmlinuz-1 root=/dev/vda\n initrd /boot/initrd-1 }\n";
    let ext = mkext4(
        &t,
        "ext.img",
        2,
        "0b3a9a5e-63f4-4a43-9d52-3c1c5f1a7e01",
        &[
            Item::File("/boot/grub/grub.cfg", cfg.as_bytes()),
            Item::File("/boot/vmlinuz-1", &k),
            Item::File("/boot/initrd-1", &i),
            Item::Link("/vmlinuz", "boot/vmlinuz-1"),
        ],
    );
    let bls = "title x\nlinux /k\ninitrd /i\noptions root=/dev/vda2\n";
    let fat = mkfat(
        &t,
        "fat.img",
        1024,
        &[],
        &[
            ("/loader/entries/x.conf", bls.as_bytes()),
            ("/k", &k),
            ("/i", &i),
        ],
    );
    let gptd = t.p("gpt.img");
    gpt(&gptd, 4, &[(2048, 4095, "ef00"), (4096, 8158, "8300")]);
    place(&gptd, 2048, &fat);
    let q = t.p("ext.qcow2");
    to_qcow2(&ext, &q, &[]);

    let start = std::time::Instant::now();
    let mut report = Vec::new();
    let gpt_len = std::fs::metadata(&gptd).unwrap().len();
    let gpt_hot = [
        (0, 34 * 512),
        (2048 * 512, 2048 * 512 + (16 << 10)),
        (gpt_len - 33 * 512, gpt_len),
    ];
    type Case<'a> = (&'a str, &'a std::path::Path, &'a [(u64, u64)], bool);
    let cases: [Case; 4] = [
        ("ext4", &ext, &[(0, 96 << 10)], false),
        ("fat", &fat, &[(0, 16 << 10)], false),
        ("gpt", &gptd, &gpt_hot, false),
        ("qcow2", &q, &[(0, 512 << 10)], true),
    ];
    for (name, path, hot, qcow) in cases {
        let data = std::fs::read(path).unwrap();
        let oks = fuzz(name, data, hot, qcow);
        report.push(format!("{name}: {oks}/{} still booted", iterations()));
    }
    eprintln!("{} in {:?}", report.join(", "), start.elapsed());
}
