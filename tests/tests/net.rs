//! virtio-net over real taps, driven by the test guest's own virtio-net driver
//! (guests/testguest/src/net.rs). Every test makes its own network namespace with a tap in it
//! (deleted afterwards, also on failure), runs rhyve there, and talks to the guest through an
//! AF_PACKET socket on the tap opened inside that namespace. Needs root (netns, taps) and
//! /dev/kvm; without them the tests fail, they never skip.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rhyve_tests::harness::{self, read_until, require_kvm, rhyve_bin, scratch_dir, KillOnDrop};
use rhyve_tests::{netns, TESTGUEST_BZIMAGE};

const ETHERTYPE: u16 = 0x88b5;
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Frame sizes the guest sends (guests/README.md), before its MTU + 14 frame.
const SIZES: [usize; 9] = [60, 61, 64, 100, 128, 256, 511, 1024, 1500];

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the virtio-net tests create network namespaces and taps: run them as root (uid is {uid})"
    );
}

/// A network namespace holding `tap0` (up, 10.0.0.1/24); deleted on drop.
struct Netns {
    inner: netns::Netns,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        require_root();
        require_kvm();
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "rhyve-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let inner = netns::Netns::add(name).unwrap_or_else(|e| panic!("{e}"));
        let ns = Netns { inner };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "tuntap", "add", "tap0", "mode", "tap"]);
        ns.exec(&["ip", "link", "set", "tap0", "up"]);
        ns.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "tap0"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        self.inner.exec(args).unwrap_or_else(|e| panic!("{e}"));
    }

    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.inner.within(f)
    }

    /// `rhyve` inside the namespace, stdout piped (the guest's console).
    fn rhyve(&self, tag: &str, slot: &str, cmdline: &str) -> Command {
        self.rhyve_slots(tag, &[slot], cmdline)
    }

    /// The same with several `-s` slots.
    fn rhyve_slots(&self, tag: &str, slots: &[&str], cmdline: &str) -> Command {
        self.rhyve_in(&scratch_dir(tag), tag, slots, cmdline)
    }

    /// The same with RHYVE_RUNDIR `dir`.
    fn rhyve_in(&self, dir: &std::path::Path, tag: &str, slots: &[&str], cmdline: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.inner.name()])
            .arg(rhyve_bin())
            .env("RHYVE_RUNDIR", dir)
            .env("RHYVE_LOG", "info")
            .args(rhyve_tests::harness::PC_MACHINE)
            .args(["-m", "128M", "-l", "pc-testdev"])
            .args(slots.iter().flat_map(|s| ["-s", s]))
            .args([
                "--kernel",
                TESTGUEST_BZIMAGE,
                "--append",
                cmdline,
                &format!("vm-{tag}"),
            ]);
        cmd
    }
}

/// An AF_PACKET socket for our test ethertype on `tap0` of `ns`.
struct Packet(OwnedFd);

impl Packet {
    fn open(ns: &Netns) -> Packet {
        Packet(ns.within(|| netns::packet_socket(c"tap0", ETHERTYPE)))
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: frame is a valid buffer for the call.
        let r = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            r,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut p = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, 1000) as i32) } <= 0 {
                continue;
            }
            let mut buf = vec![0u8; 70000];
            // SAFETY: buf is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
    }
}

fn pattern(k: usize, seq: u16) -> u8 {
    ((k * 7 + seq as usize * 31 + 0x5a) & 0xff) as u8
}

/// A test frame as the guest builds it (guests/README.md), from `src` to `dst`.
fn frame(dst: [u8; 6], src: [u8; 6], kind: u8, seq: u16, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.push(kind);
    f.push(0);
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&(len as u16).to_be_bytes());
    f.extend((20..len).map(|k| pattern(k, seq)));
    f
}

fn mac_text(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// bhyve-style default MAC: 58:9c:fc + FNV-1a("slot-func-name") (crates/devices/.../net.rs).
fn default_mac(name: &str, slot: u8) -> [u8; 6] {
    let h = format!("{slot}-0-{name}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    [0x58, 0x9c, 0xfc, (h >> 16) as u8, (h >> 8) as u8, h as u8]
}

/// A running guest: the process, its console so far.
struct Guest {
    child: KillOnDrop,
    stdout: std::process::ChildStdout,
    console: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Guest {
    fn start(mut cmd: Command) -> Guest {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn rhyve");
        let stdout = child.stdout.take().unwrap();
        let stderr = harness::collect(child.stderr.take().unwrap());
        Guest {
            child: KillOnDrop(child),
            stdout,
            console: String::new(),
            stderr,
        }
    }

    fn wait_for(&mut self, what: &str, secs: u64) {
        // An earlier read may already have taken this line with the one before it.
        if self.console.contains(what) {
            return;
        }
        match read_until(&mut self.stdout, what, Duration::from_secs(secs)) {
            Ok(t) => self.console.push_str(&t),
            Err(t) => panic!(
                "guest never printed {what:?}\nconsole:\n{}{t}\nstderr:\n{}",
                self.console,
                self.stderr.lock().unwrap()
            ),
        }
    }

    /// The value of `key=` in the guest's line starting with `prefix`.
    fn value(&self, prefix: &str, key: &str) -> String {
        let line = self
            .console
            .lines()
            .filter_map(|l| l.strip_prefix("rhyve-guest: "))
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{}", self.console));
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
            .to_string()
    }

    /// Waits for the exit; asserts a clean guest (`checks fail=0`, pc-testdev status 0).
    fn finish(mut self) -> String {
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        self.console.push_str(&rest);
        let status = harness::wait_exit(&mut self.child.0, Duration::from_secs(30))
            .expect("rhyve did not exit");
        let stderr = self.stderr.lock().unwrap().clone();
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !self.console.contains("rhyve-guest: FAIL"),
            "guest failures:\n{}\nstderr:\n{stderr}",
            self.console
        );
        assert!(
            self.console.contains("rhyve-guest: net done")
                || self.console.contains("rhyve-guest: net-bench done"),
            "{}",
            self.console
        );
        assert_eq!(
            self.console
                .lines()
                .rfind(|l| l.contains("checks fail="))
                .map(str::trim),
            Some("rhyve-guest: checks fail=0")
        );
        assert_eq!(
            status.code(),
            Some(harness::testdev_status(0)),
            "console:\n{}\nstderr:\n{stderr}",
            self.console
        );
        self.console
    }
}

/// Receives the guest's transmit phase: one frame per size up to `max`, then the frame sent
/// after the malformed chains; checks every byte.
fn check_guest_frames(pk: &Packet, g: &Guest, mac: [u8; 6], max: usize) {
    let sizes: Vec<usize> = SIZES
        .iter()
        .copied()
        .filter(|&s| s < max)
        .chain([max, 60])
        .collect();
    for (seq, &len) in sizes.iter().enumerate() {
        let f = pk.recv(Duration::from_secs(30)).unwrap_or_else(|| {
            panic!(
                "no frame {seq} ({len} bytes) from the guest\n{}",
                g.stderr.lock().unwrap()
            )
        });
        let want = frame([0xff; 6], mac, 1, seq as u16, len);
        assert_eq!(f.len(), len, "frame {seq}: length");
        if let Some(i) = f.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("frame {seq} ({len} bytes) differs at byte {i}: {f:02x?}");
        }
    }
}

/// Host→guest frames of `sizes`, one at a time, each echoed with the MACs swapped; then a
/// burst of `burst` frames sent at once, all echoed in order (the guest has few buffers, so
/// the device must hold back rather than drop).
fn echo(pk: &Packet, mac: [u8; 6], sizes: &[usize], burst: usize) -> usize {
    let lens: Vec<usize> = (0..burst).map(|i| 60 + (i * 37) % 1400).collect();
    echo_sizes(pk, mac, sizes, &lens)
}

fn echo_sizes(pk: &Packet, mac: [u8; 6], sizes: &[usize], burst: &[usize]) -> usize {
    let mut seq = 1000u16;
    let mut n = 0;
    for &len in sizes {
        let f = frame(mac, HOST_MAC, 1, seq, len);
        pk.send(&f);
        let r = pk
            .recv(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("no echo of a {len}-byte frame"));
        let mut want = frame(HOST_MAC, mac, 1, seq, len);
        want.truncate(len);
        assert_eq!(r.len(), len, "echo length");
        assert!(r == want, "echo of {len} bytes differs");
        seq += 1;
        n += 1;
    }
    let frames: Vec<Vec<u8>> = burst
        .iter()
        .enumerate()
        .map(|(i, &len)| frame(mac, HOST_MAC, 1, seq + i as u16, len))
        .collect();
    for f in &frames {
        pk.send(f);
    }
    for (i, f) in frames.iter().enumerate() {
        let r = pk
            .recv(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("burst: echo {i} of {} missing", burst.len()));
        let mut want = f.clone();
        want[..6].copy_from_slice(&HOST_MAC);
        want[6..12].copy_from_slice(&mac);
        assert!(r == want, "burst echo {i} differs (order or content)");
    }
    n + burst.len()
}

fn stop(pk: &Packet, mac: [u8; 6]) {
    pk.send(&frame(mac, HOST_MAC, 2, 0, 60));
}

#[test]
fn frames_both_ways_ping_and_default_mac() {
    let ns = Netns::new("net");
    let pk = Packet::open(&ns);
    let mut g = Guest::start(ns.rhyve(
        "net",
        "2,virtio-net,tap0",
        "rhyve.test=virtio-net rhyve.net.ip=10.0.0.2",
    ));
    g.wait_for("net echo ready", 60);
    let mac = parse_mac(&g.value("net mac=", "mac"));
    assert_eq!(mac, default_mac("vm-net", 2), "default MAC");
    assert_eq!(g.value("net mac=", "status"), "0x1");
    assert_eq!(g.value("net mac=", "mtu"), "1500");
    assert_eq!(g.value("net tx malformed", "returned"), "2");
    check_guest_frames(&pk, &g, mac, 1514);
    let echoed = echo(&pk, mac, &[60, 61, 100, 1000, 1514], 40);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.inner.name(),
            "ping",
            "-c",
            "3",
            "-i",
            "0.3",
        ])
        .args(["-W", "10", "10.0.0.2"])
        .output()
        .expect("ping (iputils-ping installed?)");
    let ping = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed:\n{ping}");
    assert!(ping.contains("3 received"), "{ping}");
    stop(&pk, mac);
    g.wait_for("net done", 30);
    assert_eq!(g.value("net echo frames", "frames"), echoed.to_string());
    assert_eq!(g.value("net echo frames", "icmp"), "3");
    assert!(g.value("net echo frames", "arp").parse::<u32>().unwrap() >= 1);
    let stderr = g.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains(&format!("mac {}", mac_text(&mac))),
        "{stderr}"
    );
    g.finish();
}

fn mount_tmpfs(dir: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated strings for the call; a tmpfs on the test's own scratch dir
    // (detached when the test process exits).
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"huge=advise".as_ptr().cast(),
        )
    };
    assert_eq!(r, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
}

/// The virtio-net function's entry in `rhyvectl --get-stats --json`.
fn net_stats(dir: &std::path::Path, vm: &str) -> serde_json::Value {
    let out = harness::rhyvectl_ok(dir, &[&format!("--vm={vm}"), "--get-stats", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON stats");
    v["stats"]["pci"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["emulation"] == "virtio-net").cloned())
        .unwrap_or_else(|| panic!("no virtio-net in {out}"))
}

#[test]
fn a_paused_vm_takes_no_frames_into_guest_ram_until_resumed() {
    let ns = Netns::new("netpause");
    // No router solicitations or MLD reports from the host side: the counts stay exact.
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    let pk = Packet::open(&ns);
    let dir = scratch_dir("netpause");
    // The runtime base gets its huge-page tmpfs here, in the test's mount namespace, as an
    // administrator would mount it: rhyve (inside `ip netns exec`, a mount namespace of its
    // own) then has no reason to mount one that rhyvectl out here could not see.
    mount_tmpfs(&dir);
    let vm = "vm-netpause";
    let mut g = Guest::start(ns.rhyve_in(
        &dir,
        "netpause",
        &["2,virtio-net,tap0"],
        "rhyve.test=virtio-net",
    ));
    g.wait_for("net echo ready", 60);
    let mac = parse_mac(&g.value("net mac=", "mac"));
    check_guest_frames(&pk, &g, mac, 1514);
    let mut echoed = echo(&pk, mac, &[60], 0);
    let before = net_stats(&dir, vm);
    assert_eq!(before["id"], "virtio-net-0.2.0");
    assert_eq!(before["state"], "active");
    let rx = before["counters"]["rx_frames"].as_u64().unwrap();
    assert!(rx >= 1, "{before}");

    harness::rhyvectl_ok(&dir, &[&format!("--vm={vm}"), "--pause"]);
    assert_eq!(net_stats(&dir, vm)["state"], "paused");
    let memory = dir.join(vm).join("memory");
    let ram = std::fs::read(&memory).unwrap();
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|i| frame(mac, HOST_MAC, 1, 2000 + i, 100 + 50 * usize::from(i)))
        .collect();
    for f in &frames {
        pk.send(f);
    }
    std::thread::sleep(Duration::from_millis(700));
    // Nothing wrote guest RAM: not the vCPUs (parked), not virtio-net (parked with frames
    // waiting on its tap).
    assert!(
        std::fs::read(&memory).unwrap() == ram,
        "guest RAM changed while paused"
    );
    let paused = net_stats(&dir, vm);
    assert_eq!(
        paused["counters"]["rx_frames"].as_u64(),
        Some(rx),
        "{paused}"
    );
    assert!(
        pk.recv(Duration::from_millis(100)).is_none(),
        "an echo while paused"
    );

    harness::rhyvectl_ok(&dir, &[&format!("--vm={vm}"), "--resume"]);
    for (i, f) in frames.iter().enumerate() {
        let r = pk
            .recv(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("echo {i} missing after resume"));
        let mut want = f.clone();
        want[..6].copy_from_slice(&HOST_MAC);
        want[6..12].copy_from_slice(&mac);
        assert!(r == want, "echo {i} after resume differs");
    }
    echoed += frames.len();
    let after = net_stats(&dir, vm);
    assert_eq!(after["state"], "active");
    assert_eq!(
        after["counters"]["rx_frames"].as_u64(),
        Some(rx + frames.len() as u64)
    );
    stop(&pk, mac);
    g.wait_for("net done", 30);
    assert_eq!(g.value("net echo frames", "frames"), echoed.to_string());
    g.finish();
}

#[test]
fn mergeable_buffers_jumbo_mtu_and_configured_mac() {
    let ns = Netns::new("netmrg");
    ns.exec(&["ip", "link", "set", "tap0", "mtu", "9000"]);
    let pk = Packet::open(&ns);
    let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    let mut g = Guest::start(ns.rhyve(
        "netmrg",
        "2,virtio-net,tap0,mac=02:11:22:33:44:55,mtu=9000",
        "rhyve.test=virtio-net rhyve.net.mrg=1 rhyve.net.evidx=1",
    ));
    g.wait_for("net echo ready", 60);
    assert_eq!(g.value("net mac=", "mac"), "02:11:22:33:44:55");
    assert_eq!(g.value("net mac=", "mtu"), "9000");
    assert_eq!(g.value("net mac=", "mrg"), "1");
    assert_eq!(g.value("net mac=", "evidx"), "1");
    check_guest_frames(&pk, &g, mac, 9014);
    // 9014 bytes span 36 of the guest's 64 256-byte buffers: in a burst the second jumbo frame
    // finds too few posted buffers, and the device must be kicked (EVENT_IDX) when the guest
    // reposts the first one's.
    let echoed = echo(&pk, mac, &[60, 244, 245, 1514, 4000, 9014], 20)
        + echo_sizes(&pk, mac, &[], &[9014, 9014, 3000, 9014, 9014]);
    stop(&pk, mac);
    g.wait_for("net done", 30);
    assert_eq!(g.value("net echo frames", "frames"), echoed.to_string());
    g.finish();
}

/// Opens `tap0` in `ns` as an orchestrator would; the descriptor is inheritable.
fn open_tap_fd(ns: &Netns, vnet_hdr: bool) -> OwnedFd {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    ns.within(move || netns::open_tap("tap0", flags, false))
}

/// Runs the transmit phase and two echoes over a tap descriptor rhyve inherits.
fn fd_backend(vnet_hdr: bool) {
    let ns = Netns::new("netfd");
    let pk = Packet::open(&ns);
    let tap = open_tap_fd(&ns, vnet_hdr);
    let fd: RawFd = tap.as_raw_fd();
    let mut cmd = ns.rhyve(
        "netfd",
        &format!("2,virtio-net,fd={fd}"),
        "rhyve.test=virtio-net",
    );
    // SAFETY: between fork and exec only async-signal-safe fcntl: keep the tap open in rhyve.
    unsafe {
        cmd.pre_exec(move || {
            let fl = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, fl & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut g = Guest::start(cmd);
    drop(tap); // rhyve holds it now
    g.wait_for("net echo ready", 60);
    let mac = parse_mac(&g.value("net mac=", "mac"));
    check_guest_frames(&pk, &g, mac, 1514);
    let n = echo(&pk, mac, &[60, 1514], 4);
    stop(&pk, mac);
    g.wait_for("net done", 30);
    assert_eq!(g.value("net echo frames", "frames"), n.to_string());
    g.finish();
}

#[test]
fn inherited_tap_fd_with_vnet_header() {
    fd_backend(true);
}

#[test]
fn inherited_tap_fd_without_vnet_header() {
    fd_backend(false);
}

/// rhyve's exit status and stderr for a VM that must not start.
fn refused(ns: &Netns, slot: &str) -> (Option<i32>, String) {
    refused_slots(ns, &[slot])
}

fn refused_slots(ns: &Netns, slots: &[&str]) -> (Option<i32>, String) {
    let out = ns
        .rhyve_slots("netbad", slots, "rhyve.test=report")
        .env("RHYVE_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(code: Option<i32>, stderr: &str, words: &[&str]) {
    assert_eq!(code, Some(4), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line:\n{stderr}");
    for w in words {
        assert!(lines[0].contains(w), "{w:?} not in {:?}", lines[0]);
    }
}

#[test]
fn missing_wrong_or_busy_taps_exit_4_with_one_line() {
    let ns = Netns::new("netbad");
    let (code, err) = refused(&ns, "2,virtio-net,nosuch0");
    assert_one_line_error(code, &err, &["0:2:0", "virtio-net", "nosuch0", "no such"]);
    let (code, err) = refused(&ns, "2,virtio-net,lo");
    assert_one_line_error(code, &err, &["0:2:0", "lo", "not a tap"]);
    let held = open_tap_fd(&ns, true);
    let (code, err) = refused(&ns, "3,virtio-net,tap0");
    assert_one_line_error(code, &err, &["0:3:0", "tap0", "busy"]);
    drop(held);
    let (code, err) = refused(&ns, "2,virtio-net,fd=999");
    assert_one_line_error(code, &err, &["0:2:0", "fd=999"]);
    let (code, err) = refused(&ns, "2,virtio-net,tap0,mac=01:00:00:00:00:01");
    assert_one_line_error(code, &err, &["mac", "multicast"]);
    let (code, err) = refused(&ns, "2,virtio-net,tap0,mtu=10");
    assert_one_line_error(code, &err, &["mtu"]);
    let (code, err) = refused(&ns, "2,virtio-net");
    assert_one_line_error(code, &err, &["virtio-net", "backend"]);
    // Two functions on one inherited descriptor (both would own it): the second is refused.
    let (code, err) = refused_slots(&ns, &["3,virtio-net,fd=3", "4,virtio-net,fd=3"]);
    assert_one_line_error(code, &err, &["0:4:0", "virtio-net", "fd=3", "0:3:0"]);
}

/// CPU ticks (user + system) of rhyve's `virtio-net` thread.
fn device_thread_ticks(pid: u32) -> u64 {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == "virtio-net" {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            // After "(comm)": state is field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        }
    }
    panic!("no virtio-net thread in rhyve (pid {pid})");
}

fn tap_tx_dropped(ns: &Netns) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.inner.name(), "cat"])
        .arg("/sys/class/net/tap0/statistics/tx_dropped")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn no_receive_buffers_means_no_polling_and_no_loss_inside_rhyve() {
    let ns = Netns::new("netbp");
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    let pk = Packet::open(&ns);
    let mut g = Guest::start(ns.rhyve(
        "netbp",
        "2,virtio-net,tap0",
        "rhyve.test=virtio-net rhyve.net.norx=1",
    ));
    g.wait_for("net norx waiting", 60);
    let mac = parse_mac(&g.value("net mac=", "mac"));
    let pid = g.child.0.id();
    let dropped_before = tap_tx_dropped(&ns);
    const FLOOD: u16 = 2000;
    for seq in 0..FLOOD {
        pk.send(&frame(mac, HOST_MAC, 1, seq, 100));
    }
    let t0 = device_thread_ticks(pid);
    std::thread::sleep(Duration::from_millis(1500));
    let busy = device_thread_ticks(pid) - t0;
    assert!(
        busy <= 5,
        "the device thread used {busy} ticks in 1.5 s without receive buffers: it polls"
    );
    let dropped = tap_tx_dropped(&ns) - dropped_before;
    assert!(
        dropped > 0,
        "the tap's own queue should overflow, not rhyve's"
    );
    g.wait_for("net norx posting", 30);
    // The guest now takes frames; stop it once the queue has drained.
    // Each short read can end inside the line, so look for it in all that was read.
    let mut done = false;
    for _ in 0..400 {
        stop(&pk, mac);
        let (Ok(t) | Err(t)) = read_until(&mut g.stdout, "net done", Duration::from_millis(50));
        g.console.push_str(&t);
        if g.console.contains("net done") {
            done = true;
            break;
        }
    }
    assert!(done, "guest never finished\n{}", g.console);
    let received: u64 = g.value("net norx received", "received").parse().unwrap();
    assert_eq!(
        g.value("net norx received", "first"),
        "0",
        "the first frame is kept"
    );
    assert_eq!(
        g.value("net norx received", "gaps"),
        "0",
        "frames in order, none lost"
    );
    assert_eq!(
        received + dropped,
        u64::from(FLOOD),
        "every frame is either delivered or dropped by the kernel's tap queue"
    );
    g.finish();
}
