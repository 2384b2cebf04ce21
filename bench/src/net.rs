//! virtio-net throughput on this machine's KVM: the project's test guest
//! (`rhyve.test=net-bench`, guests/testguest/src/net.rs) on rhyve with a tap in a network
//! namespace this benchmark creates, against the host kernel's own tap path in the same run.
//!
//! For 64-byte and 1514-byte frames:
//! - guest→host: the guest transmits `frames` frames as fast as its ring allows (a full ring
//!   per kick); its ACPI PM timer times them; an AF_PACKET socket on the tap counts what
//!   arrives (loss is reported).
//! - host→guest: this process sends `frames` frames into the tap through AF_PACKET as fast as
//!   the kernel takes them; the guest counts what it receives and times first to last (what
//!   the tap's queue, 1000 frames, cannot hold while rhyve and the guest drain it is dropped
//!   by the kernel and reported as the difference).
//! - baseline: the same frames through the same kind of tap without a VM: this process writes
//!   them to the tap descriptor (what rhyve does) and receives them on AF_PACKET, and the
//!   other way round. That is the ceiling the kernel sets for any VMM on this host.
//!
//! Needs root (network namespace, tap). The namespace is deleted at the end.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rhyve_tests::netns;

const ETHERTYPE: u16 = 0x88b5;
const PM_HZ: f64 = 3_579_545.0;
const VNET_HDR: usize = 12;

/// The benchmark's namespace: `tap0` for rhyve, `tap1` for the kernel-only baseline.
struct Netns(netns::Netns);

impl Netns {
    fn new() -> Option<Netns> {
        let ns = netns::Netns::add(format!("rhyve-bench-{}", std::process::id())).ok()?;
        for cmd in [
            &["ip", "tuntap", "add", "tap0", "mode", "tap"][..],
            &["ip", "link", "set", "tap0", "up"],
            &["ip", "tuntap", "add", "tap1", "mode", "tap"],
            &["ip", "link", "set", "tap1", "up"],
        ] {
            ns.exec(cmd).ok()?;
        }
        // No IPv6 chatter into the measurements.
        let _ = ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        Some(Netns(ns))
    }

    /// AF_PACKET socket for the test ethertype on `ifname`, with large buffers.
    fn packet(&self, ifname: &'static std::ffi::CStr) -> OwnedFd {
        self.0.within(move || {
            let fd = netns::packet_socket(ifname, ETHERTYPE);
            let big: libc::c_int = 8 << 20;
            for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
                // SAFETY: setsockopt reads one int.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        (&big as *const libc::c_int).cast(),
                        4,
                    )
                };
            }
            fd
        })
    }

    /// `tap1` opened as rhyve opens a tap (vnet header), for the baseline.
    fn tap_fd(&self) -> OwnedFd {
        self.0.within(|| {
            let fd = netns::open_tap(
                "tap1",
                libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
                true,
            );
            let sz: libc::c_int = VNET_HDR as i32;
            // SAFETY: reads one int.
            unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &sz) };
            fd
        })
    }
}

fn frame(len: usize, seq: u16) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14] = 1;
    f[16..18].copy_from_slice(&seq.to_be_bytes());
    f
}

fn send(fd: &OwnedFd, buf: &[u8]) -> bool {
    // SAFETY: buf is valid for reads of its length.
    unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) == buf.len() as isize }
}

/// Counts frames on `fd` until `want` arrived or nothing came for `idle`; (count, time of
/// the last arrival).
fn count_frames(fd: &OwnedFd, want: u64, idle: Duration) -> (u64, Instant) {
    let mut buf = vec![0u8; 70000];
    let (mut n, mut last) = (0u64, Instant::now());
    while n < want {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, idle.as_millis() as i32) } <= 0 {
            break;
        }
        // SAFETY: buf is writable for its length.
        let r = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r > 0 {
            n += 1;
            last = Instant::now();
        }
    }
    (n, last)
}

/// Kernel-only ceiling: tap descriptor → AF_PACKET and AF_PACKET → tap descriptor.
fn baseline(ns: &Netns, size: usize, frames: u64) -> (f64, f64) {
    let tap = ns.tap_fd();
    let pk = ns.packet(c"tap1");
    // tap write → stack → AF_PACKET (what a guest's transmit costs the host kernel).
    let mut f = vec![0u8; VNET_HDR];
    f.extend(frame(size, 0));
    let t0 = Instant::now();
    let reader = {
        let pk = pk.try_clone().expect("dup");
        std::thread::spawn(move || count_frames(&pk, frames, Duration::from_millis(500)))
    };
    for _ in 0..frames {
        // SAFETY: f is valid for reads of its length.
        unsafe { libc::write(tap.as_raw_fd(), f.as_ptr().cast(), f.len()) };
    }
    let (got, last) = reader.join().expect("reader");
    let to_host = got as f64 / (last - t0).as_secs_f64();
    // AF_PACKET → tap → read() (what a guest's receive costs the host kernel).
    let fr = frame(size, 0);
    let t0 = Instant::now();
    let tap_r = tap.try_clone().expect("dup");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 70000];
        let mut n = 0u64;
        let mut idle = Instant::now();
        let mut last = Instant::now();
        while n < frames && idle.elapsed() < Duration::from_millis(500) {
            // SAFETY: buf is writable for its length.
            let r = unsafe { libc::read(tap_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r > 0 {
                n += 1;
                idle = Instant::now();
                last = idle;
            } else {
                std::thread::yield_now();
            }
        }
        (n, last)
    });
    for _ in 0..frames {
        send(&pk, &fr);
    }
    let (got, last) = reader.join().expect("reader");
    let to_guest = got as f64 / (last - t0).as_secs_f64();
    (to_host, to_guest)
}

struct GuestRun {
    tx_fps: f64,
    tx_host_got: u64,
    rx_fps: f64,
    rx_got: u64,
}

fn value(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

fn guest(ns: &Netns, size: usize, frames: u64) -> Result<GuestRun, String> {
    let pk = ns.packet(c"tap0");
    let counter = {
        let pk = pk.try_clone().map_err(|e| e.to_string())?;
        std::thread::spawn(move || count_frames(&pk, frames, Duration::from_secs(20)))
    };
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.0.name()])
        .arg(crate::rhyve_bin())
        .args([
            "-m",
            "128M",
            "-s",
            "0,hostbridge",
            "-s",
            "2,virtio-net,tap0",
        ])
        .args(["-s", "31,lpc", "-l", "com1,stdio", "-l", "pc-testdev"])
        .args(["--kernel", rhyve_tests::TESTGUEST_BZIMAGE, "--append"])
        .arg(format!(
            "rhyve.test=net-bench rhyve.bench.frames={frames} rhyve.bench.size={size}"
        ))
        .arg("rhyve-net-bench")
        .env("RHYVE_RUNDIR", std::env::temp_dir().join("rhyve-net-bench"))
        // RHYVE_BENCH_LOG=debug shows rhyve's log (drops, guest errors) on stderr.
        .env(
            "RHYVE_LOG",
            std::env::var("RHYVE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("RHYVE_BENCH_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .map_err(|e| format!("run rhyve: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let wait_for = |what: &str, lines: &mut Vec<String>| -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    lines.push(l.clone());
                    if l.contains("FAIL") {
                        return Err(l);
                    }
                    if l.contains(what) {
                        return Ok(l);
                    }
                }
                Err(_) => return Err(format!("guest never printed {what:?}")),
            }
        }
    };
    let result = (|| {
        let txl = wait_for("net-bench tx frames=", &mut lines)?;
        wait_for("net-bench rx ready", &mut lines)?;
        let (host_got, _) = counter.join().map_err(|_| "counter thread")?;
        let f = frame(size, 0);
        for _ in 0..frames {
            send(&pk, &f);
        }
        // The stop frame may be dropped while the tap queue is full: repeat until seen.
        let mut stop = frame(60, 0);
        stop[14] = 2;
        let done = Arc::new(AtomicBool::new(false));
        let stopper = {
            let pk = pk.try_clone().map_err(|e| e.to_string())?;
            let done = done.clone();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) && send(&pk, &stop) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let rxl = wait_for("net-bench rx frames=", &mut lines);
        done.store(true, Ordering::Relaxed);
        let _ = stopper.join();
        let rxl = rxl?;
        let ticks = value(&txl, "ticks").unwrap_or(1.0);
        let rx_ticks = value(&rxl, "ticks").unwrap_or(1.0);
        let rx_got = value(&rxl, "frames").unwrap_or(0.0);
        Ok(GuestRun {
            tx_fps: frames as f64 / (ticks / PM_HZ),
            tx_host_got: host_got,
            rx_fps: rx_got / (rx_ticks / PM_HZ),
            rx_got: rx_got as u64,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn mbit(fps: f64, size: usize) -> f64 {
    fps * size as f64 * 8.0 / 1e6
}

pub fn run(quick: bool) {
    println!("virtio-net: test guest on rhyve vs the host kernel's tap path (frames/s, Mbit/s)");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("  n/a: needs root (network namespace and tap)");
        return;
    }
    let Some(ns) = Netns::new() else {
        println!("  n/a: cannot create a network namespace with taps (iproute2?)");
        return;
    };
    let frames: u64 = if quick { 500 } else { 3000 };
    for size in [64usize, 1514] {
        let (b_out, b_in) = baseline(&ns, size, frames * 10);
        match guest(&ns, size, frames) {
            Ok(g) => {
                println!(
                    "  {size:>4} B guest->host  rhyve {:>9.0} f/s {:>8.1} Mbit/s ({} of {frames} arrived)   host tap baseline {:>9.0} f/s {:>8.1} Mbit/s",
                    g.tx_fps,
                    mbit(g.tx_fps, size),
                    g.tx_host_got,
                    b_out,
                    mbit(b_out, size)
                );
                println!(
                    "  {size:>4} B host->guest  rhyve {:>9.0} f/s {:>8.1} Mbit/s ({} of {frames} received{})  host tap baseline {:>9.0} f/s {:>8.1} Mbit/s",
                    g.rx_fps,
                    mbit(g.rx_fps, size),
                    g.rx_got,
                    if g.rx_got < frames {
                        ", the rest overflowed the kernel's tap queue"
                    } else {
                        ""
                    },
                    b_in,
                    mbit(b_in, size)
                );
            }
            Err(e) => println!("  {size:>4} B: guest run failed: {e}"),
        }
    }
}
