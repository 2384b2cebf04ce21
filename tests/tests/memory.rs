//! Guest RAM on real KVM, read from outside as another tool would: the RAM file's
//! allocated blocks and contents, and rhyve's mappings in /proc.
//! - Huge pages by default: rhyve mounts a `huge=advise` tmpfs on an empty runtime base and
//!   the RAM mapping gets 2 MiB pages; `memory.hugepages=off` gets 4 KiB pages; a base it may
//!   not mount over (not empty) still boots, with one warning; `memory.hugepages=on` there is
//!   an error (exit 4).
//! - `-S` (memory.wired) allocates and locks all of it before the guest runs, as bhyve's
//!   wired memory; without it the RAM file fills as the guest touches pages.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rhyve_tests::harness::{self, require_kvm, rhyve_cmd, scratch_dir, Spawned, PC_MACHINE};
use rhyve_tests::TESTGUEST_BZIMAGE;

const RAM: u64 = 64 << 20;
const WARNING: &str = "guest RAM on 4 KiB pages";

/// What was seen of a VM while its echo guest waited for input.
struct Seen {
    /// Allocated bytes of the RAM file.
    allocated: u64,
    /// rhyve's locked memory (VmLck), bytes.
    locked: u64,
    /// Bytes of the RAM mapping mapped by 2 MiB pages (smaps ShmemPmdMapped + FilePmdMapped).
    pmd_mapped: u64,
    /// The RAM file, read by this (another) process.
    contents: Vec<u8>,
    stderr: String,
}

fn rundir(name: &str) -> PathBuf {
    scratch_dir(name)
}

fn kib_field(text: &str, field: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(field))
        .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// The smaps entries (header line and fields) of mappings of `file`.
fn smaps_of(pid: u32, file: &Path) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("rhyve's smaps");
    let name = file.to_string_lossy().to_string();
    let mut out = String::new();
    let mut inside = false;
    for line in smaps.lines() {
        let header = line.split_whitespace().next().is_some_and(|f| {
            f.contains('-') && f.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        });
        if header {
            inside = line.ends_with(&name);
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn run(base: &Path, name: &str, opts: &[&str], marker: &str) -> Seen {
    require_kvm();
    let mut cmd = rhyve_cmd(base);
    let append = format!("rhyve.test=echo rhyve.marker={marker}");
    cmd.args(PC_MACHINE).args(["-m", "64M"]).args(opts).args([
        "--kernel",
        TESTGUEST_BZIMAGE,
        "--append",
        &append,
        name,
    ]);
    let mut vm = Spawned::spawn(&mut cmd);
    vm.wait_for("rhyve-guest: type a line");
    let pid = vm.child.0.id();
    let file = base.join(name).join("memory");
    let allocated = std::fs::metadata(&file)
        .expect("RAM file of the running VM")
        .blocks()
        * 512;
    let contents = std::fs::read(&file).expect("read the RAM file while the VM runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let locked = kib_field(&status, "VmLck:");
    let maps = smaps_of(pid, &file);
    assert!(
        !maps.is_empty(),
        "no mapping of {} in rhyve",
        file.display()
    );
    let pmd_mapped = kib_field(&maps, "ShmemPmdMapped:") + kib_field(&maps, "FilePmdMapped:");
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let exit = harness::wait_exit(&mut vm.child.0, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(100));
    let stderr = vm.stderr();
    assert_eq!(exit.and_then(|s| s.code()), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    Seen {
        allocated,
        locked,
        pmd_mapped,
        contents,
        stderr,
    }
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn ram_is_on_huge_pages_by_default_and_readable_while_the_guest_runs() {
    let base = rundir("mem-huge");
    let seen = run(&base, "mem-huge", &[], "huge-4f1c9e");
    assert!(
        seen.pmd_mapped >= 2 << 20,
        "{} bytes of guest RAM on 2 MiB pages\n{}",
        seen.pmd_mapped,
        seen.stderr
    );
    assert!(!seen.stderr.contains(WARNING), "{}", seen.stderr);
    // The loader put the command line into guest RAM; another process sees it in the file.
    assert_eq!(seen.contents.len() as u64, RAM);
    assert!(holds(&seen.contents, "rhyve.marker=huge-4f1c9e"));
}

#[test]
fn hugepages_off_maps_4k_pages_without_a_warning() {
    let base = rundir("mem-4k");
    let seen = run(
        &base,
        "mem-4k",
        &["-o", "memory.hugepages=off"],
        "small-77ab",
    );
    assert_eq!(seen.pmd_mapped, 0, "{}", seen.stderr);
    assert!(!seen.stderr.contains(WARNING), "{}", seen.stderr);
    assert!(holds(&seen.contents, "rhyve.marker=small-77ab"));
}

#[test]
fn without_huge_pages_the_vm_still_boots_and_warns_once() {
    // A base that is not empty is never mounted over (it could hide VM objects).
    let base = rundir("mem-fallback");
    std::fs::write(base.join("unrelated"), b"x").unwrap();
    let seen = run(&base, "mem-fallback", &[], "fallback-31d0");
    assert_eq!(seen.pmd_mapped, 0, "{}", seen.stderr);
    assert_eq!(seen.stderr.matches(WARNING).count(), 1, "{}", seen.stderr);
    let line = seen.stderr.lines().find(|l| l.contains(WARNING)).unwrap();
    assert!(line.contains("is not empty"), "{line}");
    assert!(holds(&seen.contents, "rhyve.marker=fallback-31d0"));
}

#[test]
fn hugepages_on_without_huge_pages_is_an_error() {
    require_kvm();
    let base = rundir("mem-on");
    std::fs::write(base.join("unrelated"), b"x").unwrap();
    let out = harness::run(
        rhyve_cmd(&base)
            .args(PC_MACHINE)
            .args(["-m", "64M", "-o", "memory.hugepages=on"])
            .args(["--kernel", TESTGUEST_BZIMAGE, "mem-on"]),
        harness::Run {
            timeout: Duration::from_secs(60),
            input: None,
        },
    )
    .expect("spawn rhyve");
    assert_eq!(out.code(), Some(4), "{}", out.stderr);
    assert!(
        out.stderr.contains("memory.hugepages=on: no huge pages"),
        "{}",
        out.stderr
    );
    assert!(!base.join("mem-on").exists(), "object left behind");
}

#[test]
fn bad_hugepages_value_is_refused() {
    let base = rundir("mem-bad");
    let out = harness::run(
        rhyve_cmd(&base)
            .args(["-m", "64M", "-o", "memory.hugepages=1G"])
            .args(["--kernel", TESTGUEST_BZIMAGE, "mem-bad"]),
        harness::Run {
            timeout: Duration::from_secs(20),
            input: None,
        },
    )
    .expect("spawn rhyve");
    assert_eq!(out.code(), Some(4), "{}", out.stderr);
    assert!(out.stderr.contains("memory.hugepages=1G"), "{}", out.stderr);
}

#[test]
fn wired_memory_is_allocated_and_locked_before_the_guest_runs() {
    let base = rundir("mem-wired");
    let seen = run(&base, "mem-wired", &["-S"], "wired-0e2");
    assert!(
        seen.allocated >= RAM,
        "-S: {} of {RAM} bytes allocated",
        seen.allocated
    );
    assert!(seen.locked >= RAM, "-S: {} bytes locked", seen.locked);
    // Wiring populates through the same mapping: still huge pages.
    assert!(
        seen.pmd_mapped >= RAM / 2,
        "{} bytes on 2 MiB pages",
        seen.pmd_mapped
    );
}

#[test]
fn unwired_memory_is_allocated_on_demand() {
    let base = rundir("mem-lazy");
    let seen = run(
        &base,
        "mem-lazy",
        &["-o", "memory.hugepages=off"],
        "lazy-5a",
    );
    assert!(
        seen.allocated < RAM,
        "{} of {RAM} bytes allocated without -S",
        seen.allocated
    );
    assert_eq!(seen.locked, 0);
}
