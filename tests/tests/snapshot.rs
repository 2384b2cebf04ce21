//! Snapshots end to end: `rhyvectl --checkpoint` / `--suspend` of a running test guest and
//! `rhyve -r FILE` in a new process, with the guest's `rhyve.test=snapshot` mode
//! (guests/testguest/src/snapshot.rs) keeping a real disk image (virtio-blk) and a real tap
//! (virtio-net) busy, every completion by MSI-X interrupt, and printing one line per 20 ms
//! tick: `snap tick=N blk=ok|bad irq=ok|bad net=ok|bad fails=F retries=R`. A restore must
//! continue the ticks where the snapshot caught them, with every device still working;
//! damaged or mismatched snapshots must be refused before anything runs.
//!
//! Each test makes its own network namespace with `tap0` (10.0.0.1/24; the guest is
//! 10.0.0.2 and pings it): the guest's traffic never leaves it. Needs root and /dev/kvm;
//! without them the tests fail, they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rhyve_tests::harness::{
    self, assert_refused, require_kvm, rhyve_bin, rhyvectl, rhyvectl_ok, scratch_dir, Run, Spawned,
};
use rhyve_tests::{netns, TESTGUEST_BZIMAGE};
use vmm::snapshot::{state_path, MachineInfo, Snapshot};

/// The sectors the guest writes round-robin (guests/testguest/src/snapshot.rs), and the
/// disk's size (more than those).
const SECTORS: u64 = 64;
const DISK_SECTORS: u64 = 2048;
const CMDLINE: &str = "rhyve.test=snapshot rhyve.net.ip=10.0.0.2";
/// Ticks come every 20 ms; every wait here is far longer.
const TICK_WAIT: Duration = Duration::from_secs(30);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the snapshot tests create network namespaces and taps: run them as root (uid is {uid})"
    );
}

/// One `snap tick=` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tick {
    n: u64,
    blk: bool,
    irq: bool,
    net: bool,
    fails: u64,
    retries: u64,
}

impl Tick {
    fn parse(line: &str) -> Option<Tick> {
        let rest = line.strip_prefix("rhyve-guest: snap tick=")?;
        let mut words = rest.split(' ');
        let n = words.next()?.parse().ok()?;
        let mut kv = |key: &str| words.next()?.strip_prefix(key)?.strip_prefix('=');
        let flag = |v: Option<&str>| match v? {
            "ok" => Some(true),
            "bad" => Some(false),
            _ => None,
        };
        let blk = flag(kv("blk"))?;
        let irq = flag(kv("irq"))?;
        let net = flag(kv("net"))?;
        let fails = kv("fails")?.parse().ok()?;
        let retries = kv("retries")?.parse().ok()?;
        words.next().is_none().then_some(Tick {
            n,
            blk,
            irq,
            net,
            fails,
            retries,
        })
    }

    fn clean(&self) -> bool {
        self.blk && self.irq && self.net && self.fails == 0
    }
}

/// The complete tick lines of a console. (The first line of a restored VM may be the rest of
/// a line the snapshot caught half printed: it does not parse, and is left out.)
fn ticks(console: &str) -> Vec<Tick> {
    // Up to the last newline: a line still being printed is not complete yet.
    let complete = console.rfind('\n').map_or("", |end| &console[..end]);
    complete.lines().filter_map(Tick::parse).collect()
}

/// Whether the console's last line is unfinished.
fn ends_mid_line(console: &str) -> bool {
    !console.is_empty() && !console.ends_with('\n')
}

/// Asserts `t` is a run of consecutive, clean ticks.
fn assert_clean_run(t: &[Tick], what: &str, g: &Spawned) {
    assert!(!t.is_empty(), "{what}: no ticks\n{}", g.stderr());
    for w in t.windows(2) {
        assert_eq!(
            w[1].n,
            w[0].n + 1,
            "{what}: tick {} follows {}\nconsole:\n{}",
            w[1].n,
            w[0].n,
            g.stdout()
        );
    }
    if let Some(bad) = t.iter().find(|t| !t.clean()) {
        panic!(
            "{what}: tick {bad:?} is not clean\nconsole:\n{}\nstderr:\n{}",
            g.stdout(),
            g.stderr()
        );
    }
    let console = g.stdout();
    assert!(
        !console.contains("rhyve-guest: FAIL") && !console.contains("rhyve-guest: FAULT"),
        "{what}:\n{console}"
    );
    assert!(!g.stderr().contains("panicked"), "{what}: {}", g.stderr());
}

/// A network namespace with `tap0`, a disk image and a runtime directory for one VM.
struct Bed {
    ns: netns::Netns,
    dir: PathBuf,
    rundir: PathBuf,
    disk: PathBuf,
    name: String,
}

impl Bed {
    fn new(tag: &str) -> Bed {
        require_root();
        require_kvm();
        static N: AtomicU32 = AtomicU32::new(0);
        let ns_name = format!(
            "rhyve-test-snap-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ns = netns::Netns::add(ns_name).unwrap_or_else(|e| panic!("{e}"));
        let dir = scratch_dir(&format!("snap-{tag}"));
        let rundir = dir.join("run");
        std::fs::create_dir(&rundir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(DISK_SECTORS * 512))
            .unwrap();
        let bed = Bed {
            ns,
            dir,
            rundir,
            disk,
            name: format!("snap-{tag}"),
        };
        bed.exec(&["ip", "link", "set", "lo", "up"]);
        bed.add_tap();
        bed
    }

    fn exec(&self, args: &[&str]) {
        self.ns.exec(args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A persistent tap0, up, 10.0.0.1/24 (a new one has a new MAC address).
    fn add_tap(&self) {
        self.exec(&["ip", "tuntap", "add", "tap0", "mode", "tap"]);
        self.exec(&["ip", "link", "set", "tap0", "up"]);
        self.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "tap0"]);
    }

    /// Deletes tap0 and makes a new one of the same name.
    fn recreate_tap(&self) {
        self.exec(&["ip", "link", "del", "tap0"]);
        self.add_tap();
    }

    fn vm(&self) -> String {
        format!("--vm={}", self.name)
    }

    /// The machine's options (the same for the boot and every restore), with the -m, -c and
    /// -s options given replacing the defaults (128M, 1 vCPU, the disk in slot 2, the tap in
    /// slot 3).
    fn machine(&self, memory: &str, cpus: &str, slots: &[String]) -> Vec<String> {
        let mut a: Vec<String> = harness::PC_MACHINE.iter().map(|s| s.to_string()).collect();
        a.extend(["-m", memory, "-c", cpus, "-l", "pc-testdev"].map(String::from));
        for s in slots {
            a.extend(["-s".to_string(), s.clone()]);
        }
        a
    }

    fn slots(&self) -> Vec<String> {
        vec![
            format!("2,virtio-blk,{}", self.disk.display()),
            "3,virtio-net,tap0".to_string(),
        ]
    }

    /// rhyve in the namespace with `args` then the VM's name; `log`: info logging.
    fn rhyve(&self, args: &[String], log: bool) -> Command {
        let mut cmd = Command::new(rhyve_bin());
        cmd.env("RHYVE_RUNDIR", &self.rundir)
            .args(args)
            .arg(&self.name);
        if log {
            cmd.env("RHYVE_LOG", "info");
        } else {
            cmd.env_remove("RHYVE_LOG");
        }
        self.ns.enter_on_exec(&mut cmd);
        cmd
    }

    /// Boots the guest in its snapshot mode, `extra` added to its command line.
    fn boot(&self, extra: &str) -> Spawned {
        let mut args = self.machine("128M", "1", &self.slots());
        let cmdline = format!("{CMDLINE} {extra}");
        args.extend(["--kernel", TESTGUEST_BZIMAGE, "--append", &cmdline].map(String::from));
        Spawned::spawn(&mut self.rhyve(&args, true))
    }

    /// `rhyve -r FILE` with the boot's options.
    fn restore(&self, file: &Path) -> Spawned {
        let mut args = vec!["-r".to_string(), file.display().to_string()];
        args.extend(self.machine("128M", "1", &self.slots()));
        Spawned::spawn(&mut self.rhyve(&args, true))
    }

    fn ctl(&self, args: &[&str]) -> String {
        rhyvectl_ok(&self.rundir, args)
    }

    /// After a `kill -9`: the stale object goes.
    fn destroy_stale(&self) {
        let out = self.ctl(&[&self.vm(), "--destroy"]);
        assert!(out.contains(&format!("destroyed {}", self.name)), "{out}");
    }

    /// Checks the disk image: the 64 sectors hold consecutive ticks' patterns, the newest at
    /// least `last` (the last tick seen). Word k of sector s, tick n: `n << 16 | s << 8 | k`.
    fn check_disk(&self, last: u64) {
        let img = std::fs::read(&self.disk).unwrap();
        let word = |s: u64, k: u64| {
            let at = (s * 512 + 8 * k) as usize;
            u64::from_le_bytes(img[at..at + 8].try_into().unwrap())
        };
        let mut ns: Vec<u64> = (0..SECTORS)
            .map(|s| {
                let n = word(s, 0) >> 16;
                for k in 0..64 {
                    assert_eq!(
                        word(s, k),
                        n << 16 | s << 8 | k,
                        "disk sector {s} word {k} (tick {n})"
                    );
                }
                assert_eq!(n % SECTORS, s, "disk sector {s} holds tick {n}");
                n
            })
            .collect();
        ns.sort_unstable();
        let (lo, hi) = (ns[0], ns[ns.len() - 1]);
        assert_eq!(
            hi - lo,
            SECTORS - 1,
            "the disk's sectors hold ticks {lo}..={hi}, not the newest 64"
        );
        assert!(
            hi >= last,
            "the disk's newest tick {hi} is older than {last}"
        );
    }
}

/// Waits until the console's ticks satisfy `done`; panics (with the console) if rhyve
/// exits first or after TICK_WAIT.
fn wait_ticks(g: &mut Spawned, what: &str, done: impl Fn(&[Tick]) -> bool) -> Vec<Tick> {
    let deadline = Instant::now() + TICK_WAIT;
    loop {
        let t = ticks(&g.stdout());
        if done(&t) {
            return t;
        }
        if let Some(s) = g.child.0.try_wait().unwrap() {
            panic!(
                "{what}: rhyve exited ({s})\nconsole:\n{}\nstderr:\n{}",
                g.stdout(),
                g.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no such ticks\nconsole:\n{}\nstderr:\n{}",
            g.stdout(),
            g.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn last_tick(g: &Spawned) -> u64 {
    ticks(&g.stdout()).last().map_or(0, |t| t.n)
}

/// `kill -9`, and what the console and stderr had.
fn kill9(mut g: Spawned) -> (String, String) {
    g.child.0.kill().unwrap();
    let status = g.child.0.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    // The collectors read to the end of the pipes.
    std::thread::sleep(Duration::from_millis(100));
    (g.stdout(), g.stderr())
}

/// Checkpoints the running VM to `file`; returns the last tick seen before the request and
/// the last seen once it returned (the guest went on meanwhile).
fn checkpoint(bed: &Bed, g: &Spawned, file: &Path) -> (u64, u64) {
    let before = last_tick(g);
    let out = bed.ctl(&[&bed.vm(), &format!("--checkpoint={}", file.display())]);
    assert!(out.contains("checkpoint"), "{out}");
    // Lines the guest printed before the pause may still be on their way through rhyve's
    // output queue and the pipe.
    std::thread::sleep(Duration::from_millis(30));
    (before, last_tick(g))
}

/// Waits for `n` clean, consecutive ticks of a restored VM, the last at least `upto`;
/// returns them. The first must continue the snapshot: after `before` (the last tick seen
/// before the checkpoint was asked for) and at most one past `after` (the last seen once it
/// returned), plus one more if the snapshot caught a line half printed.
fn restored_ticks(
    g: &mut Spawned,
    what: &str,
    (before, after): (u64, u64),
    n: usize,
    upto: u64,
) -> Vec<Tick> {
    let t = wait_ticks(g, what, |t| {
        t.len() >= n && t.last().is_some_and(|l| l.n >= upto)
    });
    let first = t[0].n;
    assert!(
        first > before && first <= after + 2,
        "{what}: the restored guest's first tick is {first}; the snapshot was taken after \
         tick {before} and by tick {after}\nconsole:\n{}",
        g.stdout()
    );
    assert_clean_run(&t, what, g);
    assert!(
        g.stderr().contains("restored from"),
        "{what}: {}",
        g.stderr()
    );
    t
}

#[test]
fn checkpoint_kill_restore_twice_counter_continues() {
    let bed = Bed::new("ckpt");
    let snap = bed.dir.join("snap");
    // A tick every 1 ms: a tick's work takes longer, so the devices are never idle and a
    // checkpoint always catches requests and frames in flight.
    let mut g = bed.boot("rhyve.snap.ms=1");
    wait_ticks(&mut g, "boot", |t| t.last().is_some_and(|t| t.n >= 10));
    failed_snapshot(&bed, &mut g, "checkpoint");
    let (before, after) = checkpoint(&bed, &g, &snap);
    assert!(state_path(&snap).exists() && snap.exists());
    // A checkpoint leaves the VM running.
    wait_ticks(&mut g, "after the checkpoint", |t| {
        t.last().is_some_and(|t| t.n >= after + 3)
    });
    let (console, _) = kill9(g);
    let original = ticks(&console);
    assert_eq!(original[0].n, 1, "{console}");
    assert!(original.iter().all(Tick::clean), "{console}");
    bed.destroy_stale();

    // The first restore: the same tap (still there), the same disk.
    let mut r1 = bed.restore(&snap);
    let t1 = restored_ticks(&mut r1, "restore 1", (before, after), 20, 0);
    // A restored VM checkpoints too: to the same FILE, which it maps (the new one replaces
    // it; the running VM keeps the old).
    let (before2, after2) = checkpoint(&bed, &r1, &snap);
    assert!(before2 >= t1.last().unwrap().n);
    wait_ticks(&mut r1, "restore 1 after its checkpoint", |t| {
        t.last().is_some_and(|t| t.n >= after2 + 3)
    });
    kill9(r1);
    bed.destroy_stale();

    // The second restore (of the restored VM's snapshot), onto a new tap0: a new MAC
    // address the guest learns again (at most one retry of an exchange per restore: the
    // frame in flight at the snapshot is gone too).
    bed.recreate_tap();
    let mut r2 = bed.restore(&snap);
    // Past 64 ticks in all, so that every disk sector has been written.
    let t2 = restored_ticks(&mut r2, "restore 2", (before2, after2), 25, SECTORS + 16);
    let retries = t2.last().unwrap().retries;
    assert!(retries <= 2, "{} retries\n{}", retries, r2.stdout());
    let last = t2.last().unwrap().n;
    kill9(r2);
    bed.destroy_stale();
    bed.check_disk(last);
}

/// `rhyvectl --suspend=FILE`: rhyve exits with status 0. Returns the tick the guest will
/// print first once restored (nothing ran after the snapshot: the very next one).
fn suspend(bed: &Bed, mut g: Spawned, file: &Path) -> u64 {
    let out = bed.ctl(&[&bed.vm(), &format!("--suspend={}", file.display())]);
    assert!(out.contains("suspended to"), "{out}");
    let status = harness::wait_exit(&mut g.child.0, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("rhyve still runs after --suspend\n{}", g.stderr()));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", g.stderr());
    // The collectors read to the end of the pipes.
    std::thread::sleep(Duration::from_millis(100));
    let console = g.stdout();
    let before = ticks(&console);
    assert_clean_run(&before, "before the suspend", &g);
    before.last().unwrap().n + 1 + u64::from(ends_mid_line(&console))
}

/// A checkpoint or suspend to FILE in a directory that does not exist fails (rhyvectl exit
/// status 1, one line), and the VM runs on.
fn failed_snapshot(bed: &Bed, g: &mut Spawned, what: &str) {
    let file = bed.dir.join("no-such-dir").join("snap");
    let o = rhyvectl(
        &bed.rundir,
        &[&bed.vm(), &format!("--{what}={}", file.display())],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "--{what}: {err}");
    assert_eq!(err.lines().count(), 1, "--{what}: {err}");
    assert!(err.contains("no-such-dir"), "--{what}: {err}");
    assert!(!state_path(&file).exists());
    let seen = last_tick(g);
    wait_ticks(g, &format!("after a failed --{what}"), |t| {
        t.last().is_some_and(|t| t.n >= seen + 3)
    });
}

#[test]
fn suspend_exits_zero_and_restores() {
    let bed = Bed::new("suspend");
    let (snap, again) = (bed.dir.join("suspended"), bed.dir.join("again"));
    let mut g = bed.boot("");
    wait_ticks(&mut g, "boot", |t| t.last().is_some_and(|t| t.n >= 5));
    failed_snapshot(&bed, &mut g, "suspend");
    let next = suspend(&bed, g, &snap);

    // The suspended VM's object went with it: the same name restores at once, and goes on
    // with the very next tick.
    let mut r = bed.restore(&snap);
    let t = restored_ticks(&mut r, "restore", (next - 1, next - 1), 15, 0);
    assert_eq!(t[0].n, next, "{}", r.stdout());
    // A restored VM suspends and comes back the same way.
    let next = suspend(&bed, r, &again);
    let mut r = bed.restore(&again);
    let t = restored_ticks(&mut r, "restore again", (next - 1, next - 1), 10, 0);
    assert_eq!(t[0].n, next, "{}", r.stdout());
    kill9(r);
    bed.destroy_stale();
}

/// `rhyve -r FILE ARGS` that must be refused: exit status 4 and one line naming `needle`.
fn refused(bed: &Bed, file: &Path, args: &[String], what: &str, needle: &str) {
    let mut a = vec!["-r".to_string(), file.display().to_string()];
    a.extend_from_slice(args);
    let out = harness::run(
        &mut bed.rhyve(&a, false),
        Run {
            timeout: Duration::from_secs(20),
            input: None,
        },
    )
    .unwrap();
    assert!(!out.timed_out, "{what}: still running\n{}", out.stdout);
    assert_refused(&out, what, needle);
    assert!(
        !out.stdout.contains("rhyve-guest:"),
        "{what}: the guest ran\n{}",
        out.stdout
    );
}

#[test]
fn damaged_or_mismatched_snapshots_are_refused() {
    let bed = Bed::new("refuse");
    let snap = bed.dir.join("good");
    let mut g = bed.boot("");
    wait_ticks(&mut g, "boot", |t| t.last().is_some_and(|t| t.n >= 3));
    let next = suspend(&bed, g, &snap);

    let kern = std::fs::read(state_path(&snap)).unwrap();
    let machine = bed.machine("128M", "1", &bed.slots());
    // A copy of the snapshot whose FILE.kern is `state` (FILE itself is the same file).
    let variant = |name: &str, state: &[u8]| -> PathBuf {
        let file = bed.dir.join(name);
        std::fs::hard_link(&snap, &file).unwrap();
        std::fs::write(state_path(&file), state).unwrap();
        file
    };

    let mut flipped = kern.clone();
    let mid = 32 + (kern.len() - 32) / 2;
    flipped[mid] ^= 0x10;
    let file = variant("flipped", &flipped);
    refused(&bed, &file, &machine, "a flipped byte", "checksum mismatch");

    let file = variant("truncated", &kern[..kern.len() - 100]);
    refused(&bed, &file, &machine, "truncated", "truncated");

    let mut v2 = kern.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    let file = variant("version2", &v2);
    refused(
        &bed,
        &file,
        &machine,
        "another format version",
        "snapshot format version 2",
    );

    // Taken on "another CPU": one CPUID register of leaf 1 (feature flags) differs, in a
    // file whose checksum is right.
    let mut s = Snapshot::decode(&kern).unwrap();
    let mut m = MachineInfo::decode(s.section("machine").unwrap()).unwrap();
    let leaf = m
        .cpuid
        .iter_mut()
        .find(|l| l[0] == 1 && l[1] == 0)
        .expect("CPUID leaf 1");
    leaf[4] ^= 1 << 0; // ECX.SSE3
    s.replace("machine", m.encode()).unwrap();
    let file = variant("othercpu", &s.encode());
    refused(
        &bed,
        &file,
        &machine,
        "another CPU",
        "the snapshot was taken on a CPU with other features: CPUID leaf 0x1.0x0 ecx",
    );

    // Every section cut short, in a file whose checksum is right: refused, naming it.
    let good = Snapshot::decode(&kern).unwrap();
    let names: Vec<String> = good.names().map(String::from).collect();
    assert!(names.len() > 5, "{names:?}");
    for name in &names {
        let mut s = good.clone();
        let data = s.section(name).unwrap().to_vec();
        s.replace(name, data[..data.len() / 2].to_vec()).unwrap();
        let file = variant(&format!("short-{name}"), &s.encode());
        refused(
            &bed,
            &file,
            &machine,
            &format!("section {name} cut short"),
            name,
        );
    }

    // The good snapshot with other options.
    let other = |memory: &str, cpus: &str, slots: &[String]| bed.machine(memory, cpus, slots);
    refused(
        &bed,
        &snap,
        &other("256M", "1", &bed.slots()),
        "another -m",
        "-m 256M: the snapshot has 128M of memory",
    );
    refused(
        &bed,
        &snap,
        &other("128M", "2", &bed.slots()),
        "another -c",
        "-c 2: the snapshot has 1 vCPUs",
    );
    let blk_only = &bed.slots()[..1];
    refused(
        &bed,
        &snap,
        &other("128M", "1", blk_only),
        "a missing -s device",
        "-s: the snapshot's PCI devices are",
    );
    let rnd = [bed.slots()[0].clone(), "3,virtio-rnd".to_string()];
    refused(
        &bed,
        &snap,
        &other("128M", "1", &rnd),
        "another -s device",
        "-s: the snapshot's PCI devices are",
    );
    // The same devices, configured otherwise: a disk of another size, another MAC.
    let small = bed.dir.join("small.img");
    std::fs::File::create(&small)
        .and_then(|f| f.set_len(SECTORS * 512))
        .unwrap();
    let other_disk = [
        format!("2,virtio-blk,{}", small.display()),
        bed.slots()[1].clone(),
    ];
    refused(
        &bed,
        &snap,
        &other("128M", "1", &other_disk),
        "a disk of another size",
        "pci.0:2:0",
    );
    let other_mac = [
        bed.slots()[0].clone(),
        "3,virtio-net,tap0,mac=02:00:00:00:00:99".to_string(),
    ];
    refused(
        &bed,
        &snap,
        &other("128M", "1", &other_mac),
        "another MAC address",
        "pci.0:3:0",
    );
    // FILE (guest RAM) of another size than the snapshot's RAM.
    let short_ram = bed.dir.join("shortram");
    std::fs::copy(&snap, &short_ram).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short_ram)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    std::fs::write(state_path(&short_ram), &kern).unwrap();
    refused(
        &bed,
        &short_ram,
        &machine,
        "a short memory image",
        "memory image",
    );
    let missing = bed.dir.join("missing");
    refused(&bed, &missing, &machine, "a missing FILE", "missing.kern");
    // FILE.kern without FILE.
    let lonely = bed.dir.join("lonely");
    std::fs::write(state_path(&lonely), &kern).unwrap();
    refused(&bed, &lonely, &machine, "FILE.kern without FILE", "lonely");

    // None of that left anything behind: the good snapshot still restores, from the tick it
    // was suspended at.
    let listed = rhyvectl(&bed.rundir, &["--list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(!listed.contains(&bed.name), "{listed}");
    let mut r = bed.restore(&snap);
    let t = restored_ticks(&mut r, "the good snapshot", (next - 1, next - 1), 5, 0);
    assert_eq!(t[0].n, next, "{}", r.stdout());
    kill9(r);
    bed.destroy_stale();
}
