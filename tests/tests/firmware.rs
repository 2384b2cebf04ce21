//! Firmware boot (`-l bootrom`) on this machine's KVM with Debian's stock SeaBIOS: it finds
//! fw_cfg behind the firmware host-bridge identity, prints its banner on COM1 through
//! `etc/sercon-port`, assigns the PCI BARs itself, and boots a virtio-blk disk with its own
//! virtio driver. The disk's boot sector (tests/firmware/mbr.S, assembled here) prints with
//! `rep outsb`, reads COM1's status with `rep insb` (string I/O: one access per element) and
//! an unassigned port (all-ones, as OVMF insists),
//! reads 64 sectors through int 13h, checks them and ends through pc-testdev. Bad boot-ROM
//! input is one line and exit 4.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rhyve_tests::harness::{self, require_kvm, rhyve_cmd, scratch_dir, testdev_status, Run};

/// Debian's `seabios` package: the 256 KiB build QEMU's pc machine uses.
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
/// pc-testdev codes the boot sector ends with.
const MBR_OK: u32 = 0x10;

fn seabios() -> &'static str {
    assert!(
        Path::new(SEABIOS).is_file(),
        "{SEABIOS} is missing: install Debian's seabios (scripts/install-test-deps)"
    );
    SEABIOS
}

/// How the boot sector ends once the data checked out (mbr.S's END_MODE).
#[derive(Clone, Copy)]
enum End {
    TestDev = 0,
    Reset = 1,
    Halt = 2,
}

/// Assembles tests/firmware/mbr.S into a 512-byte boot sector.
fn boot_sector(dir: &Path, end: End) -> Vec<u8> {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/firmware/mbr.S");
    let obj = dir.join("mbr.o");
    let bin = dir.join("mbr.bin");
    let tool = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| {
            panic!("{cmd:?}: {e} (binutils is needed: scripts/install-test-deps)")
        });
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    tool(
        Command::new("as")
            .arg("--32")
            .arg(format!("--defsym=END_MODE={}", end as u32))
            .arg("-o")
            .arg(&obj)
            .arg(src),
    );
    tool(
        Command::new("ld")
            .args([
                "-m",
                "elf_i386",
                "-Ttext",
                "0x7c00",
                "--oformat",
                "binary",
                "-o",
            ])
            .arg(&bin)
            .arg(&obj),
    );
    let mbr = std::fs::read(&bin).unwrap();
    assert_eq!(mbr.len(), 512, "the boot sector must be one sector");
    assert_eq!(&mbr[510..], &[0x55, 0xaa]);
    mbr
}

/// A 4 MiB raw disk: the boot sector, and the sectors it checks (LBA 1–32, 2048–2079), each
/// its LBA as a word then 510 bytes of LBA ^ 0x5a.
fn boot_disk(dir: &Path, end: End) -> PathBuf {
    let mut img = vec![0u8; 4 << 20];
    img[..512].copy_from_slice(&boot_sector(dir, end));
    for lba in (1..=32).chain(2048..=2079) {
        let s = &mut img[lba * 512..(lba + 1) * 512];
        s.fill((lba as u8) ^ 0x5a);
        s[..2].copy_from_slice(&(lba as u16).to_le_bytes());
    }
    let path = dir.join("boot.img");
    std::fs::write(&path, img).unwrap();
    path
}

/// SeaBIOS boots a disk whose boot sector ends as `end`; returns the exit status.
fn seabios_boot(name: &str, end: End) -> Option<i32> {
    require_kvm();
    let dir = scratch_dir(name);
    let disk = boot_disk(&dir, end);
    let debug_log = dir.join("seabios.log");
    let mut cmd = rhyve_cmd(&dir);
    cmd.args(["-m", "128M", "-s", "0,hostbridge", "-s", "31,lpc"])
        .arg("-s")
        .arg(format!("2,virtio-blk,{},bootindex=1", disk.display()))
        .args(["-l", "com1,stdio", "-l", "pc-testdev"])
        .arg("-l")
        .arg(format!("debugcon,{}", debug_log.display()))
        .arg("-l")
        .arg(format!("bootrom,{}", seabios()))
        .arg(name);
    let out = harness::run(
        &mut cmd,
        Run {
            timeout: Duration::from_secs(120),
            input: None,
        },
    )
    .expect("spawn rhyve");
    let all = format!("stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(!out.timed_out, "timed out\n{all}");
    // SeaBIOS's banner reaches COM1 only through fw_cfg's etc/sercon-port.
    assert!(out.stdout.contains("SeaBIOS (version"), "{all}");
    assert!(out.stdout.contains("Booting from Hard Disk"), "{all}");
    assert!(out.stdout.contains("rhyve-mbr: started"), "{all}");
    assert!(
        out.stdout
            .contains("rhyve-mbr: read 64 sectors through int 13h: data ok"),
        "{all}"
    );
    assert!(!out.stderr.contains("panicked"), "{all}");
    assert!(!dir.join(name).exists(), "runtime directory left behind");
    // SeaBIOS's own log (port 0x402): what it took from fw_cfg and how it drove the disk.
    let log = std::fs::read_to_string(&debug_log).unwrap_or_default();
    for line in [
        "Running on QEMU (i440fx)",
        "Found QEMU fw_cfg",
        "QEMU fw_cfg DMA interface supported",
        "qemu/e820: addr 0x0000000000000000 len 0x0000000008000000 [RAM]",
        // bootindex=1 became fw_cfg's bootorder.
        "1: /pci@i0cf8/scsi@2/disk@0,0",
        // The FADT (and through it the DSDT) came through etc/table-loader.
        "table(50434146)=",
        "ACPI: parse DSDT at",
        "found virtio-blk at 00:02.0",
        "using modern (1.0) virtio mode",
        "Booting from Hard Disk",
    ] {
        assert!(log.contains(line), "SeaBIOS log lacks {line:?}:\n{log}");
    }
    out.code()
}

#[test]
fn seabios_boots_a_virtio_blk_disk_through_int13h() {
    let code = seabios_boot("fw-seabios", End::TestDev);
    assert_eq!(code, Some(testdev_status(MBR_OK)));
}

/// bhyve's exit statuses hold behind firmware: a reset (i8042 pulse) exits 0, a vCPU halted
/// with interrupts off exits 2.
#[test]
fn reset_and_halt_after_firmware_boot() {
    assert_eq!(seabios_boot("fw-reset", End::Reset), Some(0), "reset");
    assert_eq!(seabios_boot("fw-halt", End::Halt), Some(2), "halt");
}

/// `rhyve ARGS` exits 4 with one line on stderr containing `needle`.
fn refused(args: &[&str], needle: &str) {
    let dir = scratch_dir("fw-bad");
    let mut cmd = rhyve_cmd(&dir);
    cmd.env("RHYVE_LOG", "error").args(args);
    let out = harness::run(
        &mut cmd,
        Run {
            timeout: Duration::from_secs(30),
            input: None,
        },
    )
    .unwrap();
    harness::assert_refused(&out, &format!("{args:?}"), needle);
}

#[test]
fn bad_boot_roms_are_one_line_and_exit_4() {
    require_kvm();
    let dir = scratch_dir("fw-bad-files");
    let write = |name: &str, len: usize| {
        let p = dir.join(name);
        std::fs::write(&p, vec![0xf4u8; len]).unwrap();
        p.display().to_string()
    };
    let odd = write("odd.rom", 4097);
    let big = write("big.rom", (16 << 20) + 4096);
    let empty = write("empty.rom", 0);
    let good = write("good.rom", 64 << 10);
    let small_vars = write("small-vars.fd", 100);
    let rom = |p: &str| format!("bootrom,{p}");
    let base = ["-m", "64M", "-s", "0,hostbridge", "-s", "31,lpc", "-l"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            with(&[&rom("/nonexistent/bios.bin"), "vm0"]),
            "/nonexistent/bios.bin".into(),
        ),
        (with(&[&rom(&odd), "vm0"]), "multiple of 4 KiB".into()),
        (with(&[&rom(&big), "vm0"]), "at most 16 MiB".into()),
        (with(&[&rom(&empty), "vm0"]), "non-zero".into()),
        (
            with(&[&rom(&good), "--kernel", &good, "vm0"]),
            "exclude each other".into(),
        ),
        (
            with(&[&format!("bootrom,{good},/nonexistent/vars.fd"), "vm0"]),
            "/nonexistent/vars.fd".into(),
        ),
        (
            with(&[&format!("bootrom,{good},{small_vars}"), "vm0"]),
            "variable store is 100 bytes".into(),
        ),
        (
            with(&[&format!("bootrom,{good},{odd}"), "vm0"]),
            "variable store is 4097 bytes".into(),
        ),
        (
            with(&[&format!("bootrom,{good},{big}"), "vm0"]),
            "at most 16320 KiB next to this ROM".into(),
        ),
        (
            with(&[&format!("bootrom,{good},"), "vm0"]),
            "bootrom,ROMFILE".into(),
        ),
        (with(&["bootrom", "vm0"]), "bootrom,ROMFILE".into()),
        (
            with(&[&rom(&good), "-f", "opt/x", "vm0"]),
            "-f opt/x".into(),
        ),
        (
            with(&[&rom(&good), "-f", "opt/x,file=/nonexistent/f", "vm0"]),
            "/nonexistent/f".into(),
        ),
        (
            with(&["com1,stdio", "-f", "opt/x,string=1", "vm0"]),
            "need fw_cfg".into(),
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&args, &needle);
    }
}
