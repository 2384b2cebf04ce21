//! rhyvectl against real rhyve processes on real KVM, each with a private RHYVE_RUNDIR. The
//! guest is the project's test guest in its `pio` mode with a count that never runs out, so
//! it keeps doing port writes (stats grow) until rhyvectl ends it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rhyve_tests::harness::{
    require_kvm, rhyve_cmd, rhyvectl as ctl, rhyvectl_ok as ctl_ok, scratch_dir, Spawned,
};
use rhyve_tests::TESTGUEST_BZIMAGE;

/// ~10^11 port writes: hours at this machine's exit rate.
const FOREVER: &str = "rhyve.test=pio rhyve.count=100000000000";
/// The test guest's payload is linked at 1 MiB.
const GUEST_BASE: u64 = 0x10_0000;

/// Spinning guests are heavy on this 2-core machine: one VM test at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// rhyvectl that must fail; its one-line stderr.
fn ctl_err(base: &Path, args: &[&str]) -> String {
    let o = ctl(base, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "rhyvectl {args:?} should have failed");
    assert_eq!(err.lines().count(), 1, "error should be one line: {err:?}");
    assert!(err.starts_with("rhyvectl: "), "{err}");
    err
}

/// `key[cpu]\t\t0x…` from bhyvectl-style output.
fn reg(out: &str, name: &str) -> u64 {
    let prefix = format!("{name}[");
    let line = out
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {name} in {out}"));
    let hex = line.rsplit("0x").next().unwrap();
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// A stat line's number (`exits, port I/O    \t123`).
fn stat(out: &str, label: &str) -> u64 {
    out.lines()
        .find(|l| l.starts_with(label))
        .and_then(|l| l.rsplit('\t').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in {out}"))
}

/// A running rhyve.
struct Vm {
    rhyve: Spawned,
    base: PathBuf,
    name: String,
}

impl Vm {
    fn start(name: &str, cmdline: &str) -> Vm {
        Self::start_in(&scratch_dir(name), name, cmdline)
    }

    fn start_in(base: &Path, name: &str, cmdline: &str) -> Vm {
        Self::start_with(base, name, cmdline, &[])
    }

    fn start_with(base: &Path, name: &str, cmdline: &str, extra: &[&str]) -> Vm {
        require_kvm();
        let rhyve = Spawned::spawn(
            rhyve_cmd(base)
                .args(["-m", "64M", "-l", "com1,stdio", "-l", "pc-testdev"])
                .args(extra)
                .args(["--kernel", TESTGUEST_BZIMAGE, "--append", cmdline, name]),
        );
        let mut vm = Vm {
            rhyve,
            base: base.to_path_buf(),
            name: name.to_string(),
        };
        vm.rhyve.wait_for("rhyve-guest: report done");
        // The socket is up before the vCPUs start; the guest's report shows they run.
        assert!(vm.dir().join("control.sock").exists());
        vm
    }

    fn dir(&self) -> PathBuf {
        self.base.join(&self.name)
    }

    fn vm_arg(&self) -> String {
        format!("--vm={}", self.name)
    }

    fn running(&mut self) -> bool {
        self.rhyve.child.0.try_wait().unwrap().is_none()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let s = rhyve_tests::harness::wait_exit(&mut self.rhyve.child.0, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("rhyve did not exit: {}", self.rhyve.stderr()));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !self.rhyve.stderr().contains("panicked"),
            "{}",
            self.rhyve.stderr()
        );
        s
    }

    fn stats(&self) -> String {
        ctl_ok(&self.base, &[&self.vm_arg(), "--get-stats"])
    }
}

/// Whether a task of `pid` is a kernel worker living in the process (KVM's
/// kvm-nx-lpage-recovery): PF_USER_WORKER (0x4000) or PF_KTHREAD in /proc's flags field.
fn kernel_worker(pid: u32, tid: u64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
    // After "(comm) ": state is field 3, flags field 9.
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let flags: u64 = rest
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    flags & (0x4000 | 0x20_0000) != 0
}

#[test]
fn every_thread_is_listed_by_kind_and_devices_report_their_counters() {
    let _one = one_at_a_time();
    let base = scratch_dir("ctl-threads");
    let mut vm = Vm::start_with(
        &base,
        "ctl-threads",
        FOREVER,
        &[
            "-c",
            "2",
            "-s",
            "0,hostbridge",
            "-s",
            "4,virtio-rnd",
            "-s",
            "31,lpc",
        ],
    );
    let pid = vm.rhyve.child.0.id();
    let out = ctl_ok(&base, &[&vm.vm_arg(), "--get-stats", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let threads = v["stats"]["threads"].as_array().unwrap();
    let kind_of = |tid: u64| {
        threads
            .iter()
            .find(|t| t["tid"].as_u64() == Some(tid))
            .map(|t| t["kind"].as_str().unwrap().to_string())
    };
    // Every thread but the main one was started through the spawn helper, with its kind.
    let mut kinds = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u64 = t.unwrap().file_name().to_str().unwrap().parse().unwrap();
        if tid == u64::from(pid) || kernel_worker(pid, tid) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        let kind = kind_of(tid)
            .unwrap_or_else(|| panic!("thread {tid} ({}) is not listed: {out}", comm.trim()));
        kinds.push(kind);
    }
    for want in ["vcpu", "control", "signal"] {
        assert!(
            kinds.iter().any(|k| k == want),
            "no {want} thread: {kinds:?}"
        );
    }
    assert_eq!(kinds.iter().filter(|k| *k == "vcpu").count(), 2);
    // The PCI functions by id, with their state and counters (the rng is never started by
    // this guest: inactive, nothing counted).
    let pci = v["stats"]["pci"].as_array().unwrap();
    let ids: Vec<&str> = pci.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["hostbridge-0.0.0", "virtio-rnd-0.4.0", "lpc-0.31.0"]);
    let rng = &pci[1];
    assert_eq!(rng["address"], "0:4:0");
    assert_eq!(rng["state"], "inactive");
    assert_eq!(rng["counters"]["requests"], 0);
    assert_eq!(rng["counters"]["transport_guest_errors"], 0);
    let text = vm.stats();
    assert!(text.contains("PCI devices:"), "{text}");
    assert!(text.contains("virtio-rnd-0.4.0"), "{text}");
    ctl_ok(&base, &[&vm.vm_arg(), "--force-poweroff"]);
    assert_eq!(vm.wait_exit().code(), Some(1));
}

#[test]
fn list_stats_registers_pause_resume_and_nmi() {
    let _one = one_at_a_time();
    let mut vm = Vm::start("ctl-main", FOREVER);
    let base = vm.base.clone();
    let name = vm.vm_arg();
    let pid = vm.rhyve.child.0.id().to_string();

    // --list: the VM, running, with its vCPUs, memory and pid.
    let list = ctl_ok(&base, &["--list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with("ctl-main "))
        .unwrap_or_else(|| panic!("not listed: {list}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[1..5], ["running", "1", "64M", pid.as_str()], "{row}");
    let json = ctl_ok(&base, &["--list", "--json"]);
    assert!(json.contains("\"name\":\"ctl-main\""), "{json}");
    assert!(json.contains(&format!("\"pid\":{pid}")), "{json}");

    // --get-stats: port-I/O exits, the pc-testdev port's accesses and run time all grow.
    let s1 = vm.stats();
    std::thread::sleep(Duration::from_millis(300));
    let s2 = vm.stats();
    for label in ["exits, port I/O", "exits, total"] {
        assert!(stat(&s2, label) > stat(&s1, label), "{label}:\n{s1}\n{s2}");
    }
    let port = |s: &str| stat(s, "  pio  0x000000e0  pc-testdev ioport");
    assert!(port(&s2) > port(&s1) && port(&s1) > 0, "{s1}\n{s2}");
    // The same port among vCPU 0's own per-device exits.
    let mine = |s: &str| stat(s, "    pio  0x000000e0  pc-testdev ioport");
    assert!(mine(&s2) > mine(&s1) && mine(&s1) > 0, "{s1}\n{s2}");
    assert!(mine(&s1) <= port(&s1), "{s1}");
    let run_s = |s: &str| {
        let l = s
            .lines()
            .find(|l| l.starts_with("time in KVM_RUN"))
            .unwrap();
        l.rsplit('\t')
            .next()
            .unwrap()
            .trim_end_matches(" s")
            .parse::<f64>()
            .unwrap()
    };
    assert!(run_s(&s2) > run_s(&s1) && run_s(&s1) > 0.0, "{s1}\n{s2}");

    // --get-all: RIP inside the guest's code, long mode, paging on.
    let image_len = std::fs::metadata(TESTGUEST_BZIMAGE).unwrap().len();
    let all = ctl_ok(&base, &[&name, "--get-all"]);
    let rip = reg(&all, "rip");
    assert!(
        (GUEST_BASE..GUEST_BASE + image_len).contains(&rip),
        "rip {rip:#x} outside the guest: {all}"
    );
    assert_eq!(reg(&all, "efer") & 0x500, 0x500, "LME|LMA: {all}");
    assert_ne!(reg(&all, "cr0") & (1 << 31), 0, "CR0.PG: {all}");
    assert!(all.contains("cs desc[0]\t"), "{all}");
    assert!(all.contains("dr7[0]\t"), "{all}");
    assert!(all.contains("vcpu0 stats:"), "{all}");

    // Registers can't be set on a running VM.
    let err = ctl_err(&base, &[&name, "--set-rip=0x100000"]);
    assert!(err.contains("paused"), "{err}");

    // --pause: RIP and the exit counters stand still.
    ctl_ok(&base, &[&name, "--pause"]);
    let r1 = reg(&ctl_ok(&base, &[&name, "--get-rip"]), "rip");
    let p1 = stat(&vm.stats(), "exits, port I/O");
    std::thread::sleep(Duration::from_millis(200));
    let r2 = reg(&ctl_ok(&base, &[&name, "--get-rip"]), "rip");
    let p2 = stat(&vm.stats(), "exits, port I/O");
    assert_eq!(r1, r2, "RIP moved while paused");
    assert_eq!(p1, p2, "exits while paused");
    let info = ctl_ok(&base, &["--list"]);
    assert!(info.contains("paused"), "{info}");

    // Setting registers while paused: RAX is the byte the loop writes (any value will do);
    // RIP is written back unchanged so the loop carries on.
    let rip_arg = format!("--set-rip={r1:#x}");
    let set = ctl_ok(
        &base,
        &[&name, "--set-rax=0x5a", &rip_arg, "--get-rax", "--get-rip"],
    );
    assert_eq!(reg(&set, "rax"), 0x5a, "{set}");
    assert_eq!(reg(&set, "rip"), r1, "{set}");
    // A debug register (DR7 stays 0, so the breakpoint address is inert).
    let dr = ctl_ok(
        &base,
        &[&name, "--set-dr0=0x1234", "--get-dr0", "--get-dr7"],
    );
    assert_eq!(
        (reg(&dr, "dr0"), reg(&dr, "dr7") & 0xff),
        (0x1234, 0),
        "{dr}"
    );
    let bad = ctl_err(&base, &[&name, "--cpu=1", "--get-rip"]);
    assert!(bad.contains("no vCPU 1"), "{bad}");

    // --resume: it runs again.
    ctl_ok(&base, &[&name, "--resume"]);
    std::thread::sleep(Duration::from_millis(200));
    let p3 = stat(&vm.stats(), "exits, port I/O");
    assert!(p3 > p2, "no exits after resume ({p2} → {p3})");
    assert!(vm.running());

    // --inject-nmi: the guest's IDT sends vector 2 to its fault handler, which reports it and
    // ends the VM through pc-testdev (0x7f → status 255).
    ctl_ok(&base, &[&name, "--inject-nmi"]);
    let status = vm.wait_exit();
    assert!(
        vm.rhyve.stdout().contains("rhyve-guest: FAULT vector=2"),
        "{}",
        vm.rhyve.stdout()
    );
    assert_eq!(status.code(), Some(255), "{}", vm.rhyve.stderr());
    assert!(!vm.dir().exists(), "runtime directory left behind");
}

#[test]
fn pause_reaches_an_ap_that_never_started() {
    let _one = one_at_a_time();
    // The test guest starts no AP in this mode: vCPU 1 sits in KVM_RUN waiting for a SIPI
    // and must still be kicked out and parked.
    let base = scratch_dir("ctl-smp");
    let mut vm = Vm::start_with(&base, "ctl-smp", FOREVER, &["-c", "2"]);
    ctl_ok(&base, &["--vm=ctl-smp", "--pause"]);
    let ap = ctl_ok(&base, &["--vm=ctl-smp", "--cpu=1", "--get-rip", "--get-cs"]);
    // The architectural reset state of an AP.
    assert_eq!((reg(&ap, "rip"), reg(&ap, "cs")), (0xfff0, 0xf000), "{ap}");
    let a = stat(&vm.stats(), "exits, port I/O");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        stat(&vm.stats(), "exits, port I/O"),
        a,
        "BSP ran while paused"
    );
    ctl_ok(&base, &["--vm=ctl-smp", "--resume"]);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        stat(&vm.stats(), "exits, port I/O") > a,
        "BSP did not resume"
    );
    let both = ctl_ok(&base, &["--vm=ctl-smp", "--get-stats"]);
    assert!(
        both.contains("vcpu0 stats:") && both.contains("vcpu1 stats:"),
        "{both}"
    );
    // A paused VM can still be powered off: the parked vCPUs see the stop.
    ctl_ok(&base, &["--vm=ctl-smp", "--pause"]);
    ctl_ok(&base, &["--vm=ctl-smp", "--force-poweroff"]);
    assert_eq!(vm.wait_exit().code(), Some(1), "{}", vm.rhyve.stderr());
}

#[test]
fn force_poweroff_exits_1_and_force_reset_exits_0() {
    let _one = one_at_a_time();
    for (opt, code) in [("--force-poweroff", 1), ("--force-reset", 0)] {
        let mut vm = Vm::start("ctl-force", FOREVER);
        let out = ctl_ok(&vm.base.clone(), &[&vm.vm_arg(), opt, "--json"]);
        assert!(out.contains(&format!("\"exit_status\":{code}")), "{out}");
        let status = vm.wait_exit();
        assert_eq!(status.code(), Some(code), "{opt}: {}", vm.rhyve.stderr());
        assert!(!vm.dir().exists(), "runtime directory left behind");
        // Nothing to talk to any more.
        let err = ctl_err(&vm.base.clone(), &[&vm.vm_arg(), "--get-rip"]);
        assert!(err.contains("no VM named ctl-force"), "{err}");
    }
}

#[test]
fn clients_still_connected_do_not_keep_the_object_alive() {
    let _one = one_at_a_time();
    let mut vm = Vm::start("ctl-idle-client", FOREVER);
    // Two clients that connect and then say nothing (one mid-line) while the VM powers off.
    let sock = vm.dir().join("control.sock");
    let idle = UnixStream::connect(&sock).expect("connect control.sock");
    let mut half = UnixStream::connect(&sock).expect("connect control.sock");
    half.write_all(b"{\"request\":").unwrap();
    ctl_ok(&vm.base.clone(), &[&vm.vm_arg(), "--force-poweroff"]);
    let status = vm.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", vm.rhyve.stderr());
    assert!(
        !vm.dir().exists(),
        "runtime directory left behind while clients were connected"
    );
    drop((idle, half));
}

#[test]
fn create_list_destroy_objects_and_destroy_a_running_vm() {
    let _one = one_at_a_time();
    let base = scratch_dir("ctl-objects");
    // An idle persistent object.
    let out = ctl_ok(&base, &["--vm=idle0", "--create", "--set-mem=32"]);
    assert!(out.contains("created idle0 (32 MiB)"), "{out}");
    let err = ctl_err(&base, &["--vm=idle0", "--create"]);
    assert!(err.contains("exists"), "{err}");
    let list = ctl_ok(&base, &["--list"]);
    let row = list.lines().find(|l| l.starts_with("idle0 ")).expect(&list);
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols,
        ["idle0", "created", "-", "32M", "-", "persistent"],
        "{row}"
    );
    let err = ctl_err(&base, &["--vm=idle0", "--get-stats"]);
    assert!(err.contains("not running"), "{err}");
    ctl_ok(&base, &["--vm=idle0", "--destroy"]);
    assert!(!base.join("idle0").exists());
    let err = ctl_err(&base, &["--vm=idle0", "--destroy"]);
    assert!(err.contains("idle0"), "{err}");

    // A running VM: powered off (exit 1), then gone.
    let mut vm = Vm::start_in(&base, "busy0", FOREVER);
    let out = ctl_ok(&base, &["--vm=busy0", "--destroy"]);
    assert!(out.contains("destroyed busy0"), "{out}");
    assert_eq!(vm.wait_exit().code(), Some(1), "{}", vm.rhyve.stderr());
    assert!(!base.join("busy0").exists());
    assert!(!ctl_ok(&base, &["--list"]).contains("busy0"));

    // A persistent object made by rhyvectl, booted by rhyve: a reset keeps it (as bhyve's VM
    // survives a reboot), --destroy of the running VM powers it off and removes it.
    ctl_ok(&base, &["--vm=kept0", "--create", "--set-mem=64M"]);
    let mut vm = Vm::start_in(&base, "kept0", FOREVER);
    let list = ctl_ok(&base, &["--list"]);
    let row = list.lines().find(|l| l.starts_with("kept0 ")).expect(&list);
    let pid = vm.rhyve.child.0.id().to_string();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols,
        ["kept0", "running", "1", "64M", &pid, "persistent"],
        "{row}"
    );
    ctl_ok(&base, &["--vm=kept0", "--force-reset"]);
    assert_eq!(vm.wait_exit().code(), Some(0), "{}", vm.rhyve.stderr());
    assert!(base.join("kept0").is_dir(), "a reset must keep the object");
    let list = ctl_ok(&base, &["--list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("kept0 ") && l.contains("created")),
        "{list}"
    );
    assert!(
        !base.join("kept0/control.sock").exists(),
        "socket left behind"
    );
    let mut vm = Vm::start_in(&base, "kept0", FOREVER);
    ctl_ok(&base, &["--vm=kept0", "--destroy"]);
    assert_eq!(vm.wait_exit().code(), Some(1), "{}", vm.rhyve.stderr());
    assert!(!base.join("kept0").exists(), "object left behind");
}

#[test]
fn a_killed_rhyve_leaves_a_stale_object_that_destroy_removes() {
    let _one = one_at_a_time();
    let mut vm = Vm::start("ctl-stale", FOREVER);
    let pid = vm.rhyve.child.0.id();
    vm.rhyve.child.0.kill().unwrap();
    vm.rhyve.child.0.wait().unwrap();
    let base = vm.base.clone();
    let list = ctl_ok(&base, &["--list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with("ctl-stale "))
        .expect(&list);
    assert!(
        row.contains("stale") && row.contains(&pid.to_string()),
        "{row}"
    );
    let err = ctl_err(&base, &["--vm=ctl-stale", "--get-rip"]);
    assert!(err.contains("stale"), "{err}");
    ctl_ok(&base, &["--vm=ctl-stale", "--destroy"]);
    assert!(!vm.dir().exists());
}

#[test]
fn two_rhyves_cannot_run_the_same_name() {
    let _one = one_at_a_time();
    let mut vm = Vm::start("ctl-twice", FOREVER);
    let second = rhyve_cmd(&vm.base)
        .args(["-m", "64M", "-l", "pc-testdev"])
        .args([
            "--kernel",
            TESTGUEST_BZIMAGE,
            "--append",
            FOREVER,
            "ctl-twice",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("spawn the second rhyve");
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(4), "{err}");
    let pid = vm.rhyve.child.0.id().to_string();
    assert!(err.contains("ctl-twice") && err.contains(&pid), "{err}");
    // The first one is untouched: socket in place, still counting exits.
    assert!(vm.running());
    let a = stat(&vm.stats(), "exits, port I/O");
    std::thread::sleep(Duration::from_millis(100));
    assert!(stat(&vm.stats(), "exits, port I/O") > a);
    ctl_ok(&vm.base.clone(), &[&vm.vm_arg(), "--force-poweroff"]);
    assert_eq!(vm.wait_exit().code(), Some(1));
}

/// One request line, one response line.
fn ask(conn: &mut BufReader<UnixStream>, line: &[u8]) -> String {
    conn.get_mut().write_all(line).unwrap();
    let mut answer = String::new();
    conn.read_line(&mut answer).unwrap();
    answer
}

#[test]
fn malformed_requests_get_errors_and_the_vm_keeps_running() {
    let _one = one_at_a_time();
    let mut vm = Vm::start("ctl-hostile", FOREVER);
    let sock = vm.dir().join("control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let connect = || {
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        BufReader::new(s)
    };
    let mut c = connect();
    let hello = ask(&mut c, b"{\"request\":\"hello\"}\n");
    assert!(
        hello.contains("\"ok\":true") && hello.contains("\"version\":1"),
        "{hello}"
    );
    for (bad, why) in [
        (&b"this is not json\n"[..], "malformed request"),
        (b"{\"request\":\"get-regs\",\"cpu\":99}\n", "no vCPU 99"),
        (b"{\"request\":\"explode\"}\n", "unknown request"),
        (b"{\"version\":99,\"request\":\"info\"}\n", "version 99"),
        (b"\xff\xfe{\n", "malformed request"),
        (b"[]\n", "JSON object"),
        (
            b"{\"request\":\"set-regs\",\"regs\":{\"rip\":1}}\n",
            "paused",
        ),
    ] {
        let a = ask(&mut c, bad);
        assert!(
            a.contains("\"ok\":false") && a.contains(why),
            "{bad:?}: {a}"
        );
    }
    // Still the same connection, still answering.
    let info = ask(&mut c, b"{\"request\":\"info\"}\n");
    assert!(info.contains("\"state\":\"running\""), "{info}");

    // An endless line is cut off with an error, not buffered forever.
    let mut c2 = connect();
    let huge = vec![b'x'; 200 * 1024];
    let _ = c2.get_mut().write_all(&huge);
    let mut a = String::new();
    c2.read_line(&mut a).unwrap();
    assert!(a.contains("longer than"), "{a}");

    // Clients that vanish: mid-line, right after a request, after pausing nothing.
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"{\"request\":\"sta").unwrap();
    }
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"{\"request\":\"get-regs\"}\n").unwrap();
    }
    {
        let _s = UnixStream::connect(&sock).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(vm.running(), "{}", vm.rhyve.stderr());
    let a = stat(&vm.stats(), "exits, port I/O");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        stat(&vm.stats(), "exits, port I/O") > a,
        "the guest stopped"
    );
    ctl_ok(&vm.base.clone(), &[&vm.vm_arg(), "--force-poweroff"]);
    assert_eq!(vm.wait_exit().code(), Some(1));
}

#[test]
fn bad_command_lines_fail_with_one_line() {
    let base = scratch_dir("ctl-usage");
    for (args, needle) in [
        (&["--vm=x", "--get-rpi"][..], "--get-rpi"),
        (&["--get-rip"], "--vm"),
        (&["--vm=x", "--set-rip=nope"], "--set-rip"),
        (&["--vm=../etc", "--get-rip"], "invalid VM name"),
        (&["--vm=nosuch", "--get-rip"], "no VM named nosuch"),
    ] {
        let err = ctl_err(&base, args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn clients_that_trickle_bytes_give_their_slots_back() {
    let _one = one_at_a_time();
    let mut vm = Vm::start("ctl-trickle", FOREVER);
    let sock = vm.dir().join("control.sock");
    // Every slot taken by a client that sends a byte every 200 ms and never a newline.
    let mut tricklers: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let t0 = std::time::Instant::now();
    let mut served = None;
    while t0.elapsed() < Duration::from_secs(30) {
        for t in &mut tricklers {
            let _ = t.write_all(b" ");
        }
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c = BufReader::new(s);
        // A refused client may find the socket closed before it writes.
        let _ = c.get_mut().write_all(b"{\"request\":\"hello\"}\n");
        let mut a = String::new();
        let _ = c.read_line(&mut a);
        if a.contains("\"ok\":true") {
            served = Some(t0.elapsed());
            break;
        }
        assert!(a.contains("too many clients"), "{a}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let served = served.expect("the trickling clients kept every slot for 30 s");
    // The control server cut them off: their reads end.
    let mut buf = [0u8; 64];
    let mut t = tricklers.remove(0);
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match std::io::Read::read(&mut t, &mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a trickling client was not disconnected (after {served:?}): {other:?}"),
    }
    ctl_ok(&vm.base.clone(), &[&vm.vm_arg(), "--force-poweroff"]);
    assert_eq!(vm.wait_exit().code(), Some(1));
}
