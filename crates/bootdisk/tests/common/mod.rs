//! Builds real disk images with the real tools (sfdisk, sgdisk, mkfs.ext4 -d, mkfs.vfat +
//! mtools, qemu-img). A missing tool fails the test with the package to install; never a skip.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Finds a tool in PATH or the sbin directories (root's tools live there even when PATH lacks
/// them); panics naming the Debian package when it is missing.
pub fn need(tool: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    let pkg = match tool {
        "sfdisk" => "fdisk",
        "sgdisk" => "gdisk",
        "mkfs.ext4" | "mkfs.ext3" | "mkfs.ext2" => "e2fsprogs",
        "mkfs.vfat" => "dosfstools",
        "mcopy" | "mmd" => "mtools",
        "qemu-img" => "qemu-utils",
        "losetup" => "mount",
        _ => "?",
    };
    panic!(
        "required tool `{tool}` not found (Debian package {pkg}): run scripts/install-test-deps"
    );
}

/// Runs a tool, panicking with its output when it fails.
pub fn run(tool: &str, args: &[&str], stdin: Option<&str>) {
    let mut c = Command::new(need(tool));
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {tool}: {e}"));
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch directory removed on drop.
pub struct Tmp(pub PathBuf);

impl Tmp {
    pub fn new(tag: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!(
            "bootdisk-it-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }
    pub fn p(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*): the fake kernels and initrds.
pub fn rand_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A directory tree to put into a filesystem.
pub enum Item<'a> {
    File(&'a str, &'a [u8]),
    Link(&'a str, &'a str),
    Dir(&'a str),
}

pub fn make_tree(root: &Path, items: &[Item]) {
    std::fs::create_dir_all(root).unwrap();
    for it in items {
        match it {
            Item::File(p, data) => {
                let f = root.join(p.trim_start_matches('/'));
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, data).unwrap();
            }
            Item::Link(p, target) => {
                let f = root.join(p.trim_start_matches('/'));
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                symlink(target, f).unwrap();
            }
            Item::Dir(p) => std::fs::create_dir_all(root.join(p.trim_start_matches('/'))).unwrap(),
        }
    }
}

/// `mkfs.ext4 -d` of `items` into a new file of `mib` MiB, with a fixed UUID.
pub fn mkext4(t: &Tmp, name: &str, mib: u32, uuid: &str, items: &[Item]) -> PathBuf {
    let dir = t.p(&format!("{name}.d"));
    make_tree(&dir, items);
    let out = t.p(name);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-U",
            uuid,
            "-d",
            dir.to_str().unwrap(),
            out.to_str().unwrap(),
            &format!("{mib}M"),
        ],
        None,
    );
    out
}

/// mkfs.vfat of `kib` KiB, then mmd/mcopy of the files (directories created as needed).
pub fn mkfat(t: &Tmp, name: &str, kib: u32, extra: &[&str], files: &[(&str, &[u8])]) -> PathBuf {
    let out = t.p(name);
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["-C"];
    args.extend_from_slice(extra);
    let o = out.to_str().unwrap().to_string();
    let k = kib.to_string();
    args.push(&o);
    args.push(&k);
    run("mkfs.vfat", &args, None);
    let mut made = std::collections::HashSet::new();
    for (i, (dest, data)) in files.iter().enumerate() {
        let comps: Vec<&str> = dest.trim_start_matches('/').split('/').collect();
        for n in 1..comps.len() {
            let d = format!("::/{}", comps[..n].join("/"));
            if made.insert(d.clone()) {
                run("mmd", &["-i", &o, &d], None);
            }
        }
        let src = t.p(&format!("{name}.src{i}"));
        std::fs::write(&src, data).unwrap();
        run(
            "mcopy",
            &[
                "-i",
                &o,
                src.to_str().unwrap(),
                &format!("::/{}", comps.join("/")),
            ],
            None,
        );
    }
    out
}

/// A sparse file of `mib` MiB.
pub fn blank(path: &Path, mib: u64) {
    let f = File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

/// GPT with `sgdisk`: parts are (first sector, last sector, type code like "ef00").
pub fn gpt(path: &Path, mib: u64, parts: &[(u64, u64, &str)]) {
    blank(path, mib);
    let mut args = vec!["-o".to_string()];
    for (i, (a, b, ty)) in parts.iter().enumerate() {
        args.push(format!("-n{}:{a}:{b}", i + 1));
        args.push(format!("-t{}:{ty}", i + 1));
    }
    args.push(path.to_str().unwrap().to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run("sgdisk", &a, None);
}

/// MBR with `sfdisk`: parts are (start sector, size in sectors, type hex like "83").
pub fn mbr(path: &Path, mib: u64, parts: &[(u64, u64, &str)]) {
    blank(path, mib);
    let mut script = String::from("label: dos\n");
    for (a, n, ty) in parts {
        script.push_str(&format!("start={a}, size={n}, type={ty}\n"));
    }
    run("sfdisk", &["-q", path.to_str().unwrap()], Some(&script));
}

/// Copies a filesystem image into a disk image at `sector`.
pub fn place(disk: &Path, sector: u64, fs_image: &Path) {
    let data = std::fs::read(fs_image).unwrap();
    let mut f = OpenOptions::new().write(true).open(disk).unwrap();
    f.seek(SeekFrom::Start(sector * 512)).unwrap();
    f.write_all(&data).unwrap();
}

pub fn to_qcow2(raw: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["convert", "-O", "qcow2"];
    args.extend_from_slice(extra);
    args.push(raw.to_str().unwrap());
    args.push(out.to_str().unwrap());
    run("qemu-img", &args, None);
}

pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

/// A read-only loop device over an image file, detached on drop.
pub struct Loop(pub PathBuf);

impl Loop {
    pub fn attach(image: &Path) -> Loop {
        let out = Command::new(need("losetup"))
            .args(["-f", "--show", "-r"])
            .arg(image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup failed (needs root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(need("losetup"))
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}
