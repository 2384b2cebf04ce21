//! rhyve in Firecracker's mode (`--api-sock`): a third-party Firecracker client from PyPI
//! (firecracker-python, installed by scripts/install-test-deps) and curl drive it as they
//! would drive Firecracker, and every endpoint's refusals carry Firecracker's wording.
//! Needs /dev/kvm; the network test also root (a namespace with a tap).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rhyve_tests::harness::{self, require_kvm, rhyve_bin, scratch_dir, wait_exit, Spawned};
use rhyve_tests::{netns, TESTGUEST_BZIMAGE};

/// firecracker-python's interpreter (scripts/install-test-deps makes it).
fn fc_python() -> PathBuf {
    let cache = std::env::var("RHYVE_CACHE").unwrap_or_else(|_| "/var/cache/rhyve".into());
    let py = Path::new(&cache).join("fc-venv/bin/python");
    assert!(
        py.exists(),
        "{} not found: run scripts/install-test-deps (it installs firecracker-python)",
        py.display()
    );
    py
}

fn drive_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("firecracker/drive.py")
}

/// One HTTP request on the API socket (its own connection); the status and body.
fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {resp:?}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The fault message of a 400 answer.
fn fault(sock: &Path, method: &str, path: &str, body: Option<&str>) -> String {
    let (status, text) = http(sock, method, path, body);
    assert_eq!(status, 400, "{method} {path}: {text}");
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message: {text}"))
        .to_string()
}

fn ok(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, text) = http(sock, method, path, Some(body));
    assert_eq!(status, 204, "{method} {path} {body}: {text}");
}

/// rhyve in Firecracker's mode on a fresh socket, as `prefix` (e.g. `ip netns exec NS`) runs it.
struct Fc {
    rhyve: Spawned,
    sock: PathBuf,
    dir: PathBuf,
}

impl Fc {
    fn start(tag: &str, prefix: &[&str], extra: &[&str]) -> Fc {
        require_kvm();
        let dir = scratch_dir(tag);
        let sock = dir.join("api.sock");
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(rhyve_bin());
                c
            }
            None => Command::new(rhyve_bin()),
        };
        cmd.env("RHYVE_RUNDIR", dir.join("run"))
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", tag, "--level", "Info"])
            .args(extra);
        let rhyve = Spawned::spawn(&mut cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "no API socket: {}",
                rhyve.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Fc { rhyve, sock, dir }
    }

    fn exit_code(&mut self, timeout: Duration) -> i32 {
        let s = wait_exit(&mut self.rhyve.child.0, timeout).unwrap_or_else(|| {
            panic!(
                "rhyve did not exit\nstdout:\n{}\nstderr:\n{}",
                self.rhyve.stdout(),
                self.rhyve.stderr()
            )
        });
        s.code().unwrap_or(-1)
    }

    fn terminate(&mut self) -> i32 {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.rhyve.child.0.id() as i32, libc::SIGTERM) };
        self.exit_code(Duration::from_secs(30))
    }

    /// The names of rhyve's threads (/proc/PID/task/*/comm).
    fn thread_names(&self) -> Vec<String> {
        let task = format!("/proc/{}/task", self.rhyve.child.0.id());
        std::fs::read_dir(&task)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .map(|s| s.trim().to_string())
            .collect()
    }
}

/// firecracker-python's drive.py, its stdin a pipe for the later steps.
struct Driver {
    child: harness::KillOnDrop,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Driver {
    fn start(sock: &Path, scenario: &str, opts: &[String]) -> Driver {
        let mut child = Command::new(fc_python())
            .arg(drive_script())
            .arg(sock)
            .arg(scenario)
            .arg(TESTGUEST_BZIMAGE)
            .args(opts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run drive.py");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Driver {
            child: harness::KillOnDrop(child),
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`; returns it.
    fn expect(&mut self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "drive.py: no {prefix:?} (it said {:?}, status {:?})",
                    self.seen,
                    self.child.0.try_wait()
                ),
            }
        }
    }

    fn step(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.expect(&format!("step {cmd} ok"));
    }

    fn state(&mut self) -> String {
        writeln!(self.stdin, "state").unwrap();
        self.stdin.flush().unwrap();
        self.expect("answer state ")
            .trim_start_matches("answer state ")
            .to_string()
    }
}

fn ticks(out: &str) -> usize {
    out.lines()
        .filter(|l| l.contains("rhyve-guest: tick "))
        .count()
}

#[test]
fn firecracker_python_pauses_resumes_and_sends_ctrl_alt_del() {
    let mut fc = Fc::start("fcpy-cad", &[], &[]);
    let mut d = Driver::start(
        &fc.sock,
        "ctrlaltdel",
        &[
            "cpus=2".into(),
            "boot_args=console=ttyS0 reboot=k panic=1 pci=off rhyve.test=ctrlaltdel".into(),
        ],
    );
    let describe = d.expect("answer describe ");
    assert!(
        describe.contains(r#""state": "Not started""#) && describe.contains(r#""id": "fcpy-cad""#),
        "{describe}"
    );
    d.expect("step start ok");
    fc.rhyve.wait_for("waiting for ctrl-alt-del");
    fc.rhyve.wait_for("rhyve-guest: tick 3");
    // Kata Containers finds the vCPUs by these names.
    let names = fc.thread_names();
    for want in ["fc_vcpu 0", "fc_vcpu 1", "fc_api"] {
        assert!(names.iter().any(|n| n == want), "no {want:?} in {names:?}");
    }
    // The guest saw Firecracker's command line less pci=off (its devices are PCI).
    let out = fc.rhyve.stdout();
    assert!(
        out.contains("cmdline=console=ttyS0 reboot=k panic=1 rhyve.test=ctrlaltdel"),
        "{out}"
    );
    assert_eq!(d.state(), "Running");
    // The instance id is rhyve's VM name: rhyvectl finds it.
    let stats = harness::rhyvectl_ok(&fc.dir.join("run"), &["--vm=fcpy-cad", "--get-stats"]);
    assert!(
        stats.contains("virtio") || stats.contains("vcpu"),
        "{stats}"
    );
    d.step("pause");
    assert_eq!(d.state(), "Paused");
    let paused = ticks(&fc.rhyve.stdout());
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        ticks(&fc.rhyve.stdout()),
        paused,
        "the guest ticked while paused"
    );
    d.step("resume");
    assert_eq!(d.state(), "Running");
    fc.rhyve
        .wait_for(&format!("rhyve-guest: tick {}", paused + 3));
    d.step("ctrlaltdel");
    fc.rhyve.wait_for("ctrl-alt-del pressed");
    // The guest resets through the i8042 (reboot=k): Firecracker exits 0.
    assert_eq!(
        fc.exit_code(Duration::from_secs(30)),
        0,
        "{}",
        fc.rhyve.stderr()
    );
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test creates a network namespace and a tap: run it as root"
    );
}

/// `ip netns exec NS ARGS` must succeed.
fn in_ns(ns: &netns::Netns, args: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ip netns exec")
        .success()
}

#[test]
fn firecracker_python_boots_a_drive_and_a_tap_and_the_guest_answers_ping() {
    require_root();
    require_kvm();
    static N: AtomicU32 = AtomicU32::new(0);
    let ns = netns::Netns::add(format!(
        "rhyve-test-fcnet-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    for cmd in [
        &["ip", "link", "set", "lo", "up"][..],
        &["ip", "tuntap", "add", "tap0", "mode", "tap"],
        &["ip", "link", "set", "tap0", "up"],
        &["ip", "addr", "add", "10.0.0.1/24", "dev", "tap0"],
    ] {
        ns.exec(cmd).unwrap_or_else(|e| panic!("{e}"));
    }
    let netns_name = ns.name().to_string();
    let mut fc = Fc::start("fcpy-net", &["ip", "netns", "exec", &netns_name], &[]);
    let disk = fc.dir.join("rootfs.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut d = Driver::start(
        &fc.sock,
        "net",
        &[
            format!("drive={}", disk.display()),
            "tap=tap0".into(),
            "boot_args=console=ttyS0 reboot=k panic=1 pci=off rhyve.test=virtio-net rhyve.net.ip=10.0.0.2"
                .into(),
        ],
    );
    for step in ["machine-config", "boot-source", "drive", "network"] {
        d.expect(&format!("step {step} ok"));
    }
    let config = d.expect("answer vm-config ");
    let config: serde_json::Value =
        serde_json::from_str(config.trim_start_matches("answer vm-config ")).unwrap();
    assert_eq!(config["drives"][0]["drive_id"], "rootfs", "{config}");
    assert_eq!(config["drives"][0]["is_root_device"], true);
    assert_eq!(config["network-interfaces"][0]["host_dev_name"], "tap0");
    assert_eq!(config["machine-config"]["mem_size_mib"], 128);
    d.expect("step start ok");
    fc.rhyve.wait_for("net echo ready");
    let out = fc.rhyve.stdout();
    // The root drive is /dev/vda, writable, as Firecracker adds it; the MAC is the API's.
    assert!(out.contains("root=/dev/vda rw"), "{out}");
    assert!(out.contains("mac=06:00:ac:10:00:02"), "{out}");
    let ping = |count: &str, wait: &str| {
        in_ns(
            &ns,
            &["ping", "-c", count, "-i", "0.3", "-W", wait, "10.0.0.2"],
        )
    };
    assert!(ping("3", "10"), "no answer to ping\n{}", fc.rhyve.stderr());
    d.step("pause");
    assert!(!ping("1", "1"), "a paused guest answered ping");
    d.step("resume");
    assert!(ping("2", "10"), "no answer to ping after resume");
    // PATCH /network-interfaces: one frame a second into the guest, so most of ten quick
    // pings go unanswered in time; with the bucket off again, all are answered.
    let answered = |count: &str| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "ping",
                "-c",
                count,
                "-i",
                "0.1",
                "-W",
                "1",
            ])
            .arg("10.0.0.2")
            .output()
            .expect("ping");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split(" received")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("ping said {text}"))
    };
    assert_eq!(answered("10"), 10, "unlimited");
    d.step("limit-rx");
    let limited = answered("10");
    assert!(
        limited <= 4,
        "{limited} of 10 pings answered at one frame a second"
    );
    d.step("unlimit-rx");
    // The worker takes the new limits at its next check (at most a second away).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(answered("10"), 10, "unlimited again");
    writeln!(d.stdin, "quit").unwrap();
    // As Firecracker, SIGTERM ends the VMM; the guest has no ACPI to shut down with.
    assert_eq!(fc.terminate(), 0, "{}", fc.rhyve.stderr());
    drop(ns);
}

#[test]
fn getting_started_with_curl() {
    let mut fc = Fc::start("fc-curl", &[], &[]);
    let disk = fc.dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8192 * 512)
        .unwrap();
    let log = fc.dir.join("fc.log");
    let sock = fc.sock.clone();
    let curl = |fc: &Fc, method: &str, path: &str, body: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--unix-socket"])
            .arg(&sock)
            .args(["-X", method, &format!("http://localhost{path}")])
            .args([
                "-H",
                "Accept: application/json",
                "-H",
                "Content-Type: application/json",
            ])
            .args(["-d", body, "-w", "%{http_code}"])
            .output()
            .expect("curl (apt install curl)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.ends_with("204"),
            "{method} {path} {body}: {text}\n{}",
            fc.rhyve.stderr()
        );
    };
    // Firecracker's getting-started.md, in its order.
    curl(
        &fc,
        "PUT",
        "/logger",
        &format!(
            r#"{{"log_path": "{}", "level": "Debug", "show_level": true, "show_log_origin": true}}"#,
            log.display()
        ),
    );
    curl(
        &fc,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{TESTGUEST_BZIMAGE}", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off rhyve.test=virtio-blk rhyve.blk.swap=1"}}"#
        ),
    );
    curl(
        &fc,
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
            disk.display()
        ),
    );
    curl(
        &fc,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    curl(
        &fc,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    fc.rhyve.wait_for("blk waiting for a new medium");
    // PATCH /drives swaps the backing file under the running guest, which sees a
    // configuration change with the new capacity and reads the new image.
    let second = fc.dir.join("second.img");
    let mut image = vec![0u8; 16384 * 512];
    image[0] = 0xab;
    std::fs::write(&second, &image).unwrap();
    let (status, text) = http(
        &fc.sock,
        "PATCH",
        "/drives/rootfs",
        Some(r#"{"drive_id": "rootfs", "path_on_host": "/nonexistent.img"}"#),
    );
    assert_eq!(status, 400);
    assert!(
        text.contains("Drive config error: Unable to patch the block device: Block: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2) /nonexistent.img Please verify the request arguments."),
        "{text}"
    );
    curl(
        &fc,
        "PATCH",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}"}}"#,
            second.display()
        ),
    );
    fc.rhyve
        .wait_for("blk new medium capacity=16384 first=0xab");
    fc.rhyve.wait_for("blk done");
    let out = fc.rhyve.stdout();
    for line in [
        "blk capacity=8192",
        "blk write/read ok",
        "blk id=rootfs",
        "blk flush status=0",
    ] {
        assert!(out.contains(line), "missing {line:?}:\n{out}");
    }
    // The guest ends halted (no pc-testdev in this machine): a guest stop, exit 0.
    assert_eq!(
        fc.exit_code(Duration::from_secs(30)),
        0,
        "{}",
        fc.rhyve.stderr()
    );
    // What the guest wrote is in the image; the log went to the file, as asked.
    let bytes = std::fs::read(&disk).unwrap();
    assert_eq!(bytes[0], 0x5a, "sector 0 not written");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("[fc-curl:fc_api:DEBUG:") && log.contains("PUT /actions: 204"),
        "{log}"
    );
}

#[test]
fn every_endpoint_refuses_with_firecracker_s_wording() {
    let mut fc = Fc::start("fc-errors", &[], &[]);
    let s = fc.sock.clone();
    let kernel = format!(
        r#"{{"kernel_image_path": "{TESTGUEST_BZIMAGE}", "boot_args": "console=ttyS0 rhyve.test=ctrlaltdel"}}"#
    );
    let cases: Vec<(&str, &str, Option<&str>, &str)> = vec![
        ("PUT", "/machine-config", Some("{"), "An error occurred when deserializing the json body of a request: EOF while parsing an object at line 1 column 1."),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "foo": 1}"#), "unknown field `foo`, expected one of `vcpu_count`, `mem_size_mib`, `smt`, `cpu_template`, `track_dirty_pages`, `huge_pages`"),
        ("PUT", "/machine-config", Some(r#"{"mem_size_mib": 128}"#), "missing field `vcpu_count`"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 33, "mem_size_mib": 128}"#), "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled."),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 3, "mem_size_mib": 128, "smt": true}"#), "must be 1 or an even number if SMT is enabled"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#), "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."),
        ("PATCH", "/machine-config", Some("{}"), "Empty PATCH request."),
        ("PUT", "/machine-config", None, "Empty PUT request."),
        ("GET", "/machine-config", Some("{}"), "GET request cannot have a body."),
        ("PUT", "/boot-source", Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#), "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"),
        ("PATCH", "/boot-source", Some("{}"), "Invalid request method and/or path: PATCH boot-source."),
        ("GET", "/foo/bar", None, "Invalid request method and/or path: GET foo."),
        ("PUT", "/drives/root-fs", Some("{}"), "API Resource IDs can only contain alphanumeric characters and underscores."),
        ("PUT", "/drives/", Some("{}"), "The ID cannot be empty."),
        ("PUT", "/drives/a", Some(r#"{"drive_id": "b", "path_on_host": "/dev/null", "is_root_device": false}"#), "The id from the path does not match the id from the body!"),
        ("PUT", "/drives/a", Some(r#"{"drive_id": "a", "path_on_host": "/nonexistent.img", "is_root_device": false}"#), "Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2) /nonexistent.img"),
        ("PUT", "/network-interfaces/a", Some(r#"{"iface_id": "b", "host_dev_name": "tap0"}"#), "The id from the path [a] does not match the id from the body [b]!"),
        ("PUT", "/network-interfaces/a", Some(r#"{"iface_id": "a", "host_dev_name": "tap0", "guest_mac": "zz"}"#), "The provided MAC address is invalid."),
        ("PUT", "/actions", Some(r#"{"action_type": "Reboot"}"#), "unknown variant `Reboot`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`"),
        ("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#), "Start microvm error: Cannot start microvm without kernel configuration."),
        ("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#), "The requested operation is not supported before starting the microVM."),
        ("PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#), "The requested operation is not supported before starting the microVM."),
        ("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), "The requested operation is not supported before starting the microVM."),
        ("PATCH", "/vm", Some(r#"{"state": "Frozen"}"#), "unknown variant `Frozen`, expected `Paused` or `Resumed`"),
        ("PATCH", "/drives/rootfs", Some(r#"{"drive_id": "rootfs"}"#), "The requested operation is not supported before starting the microVM."),
        ("PUT", "/logger", Some(r#"{"level": "Loud"}"#), "Invalid LevelFilter"),
        ("PUT", "/snapshot", Some("{}"), "Missing snapshot operation type."),
    ];
    for (method, path, body, want) in &cases {
        let got = fault(&s, method, path, *body);
        assert!(
            got.contains(want),
            "{method} {path} {body:?}:\n  got  {got:?}\n  want {want:?}"
        );
    }
    // A body over the 51 200-byte limit, refused by its Content-Length, as micro-http does.
    let big = format!(r#"{{"boot_args": "{}"}}"#, "x".repeat(60_000));
    let (status, text) = http(&s, "PUT", "/boot-source", Some(&big));
    assert_eq!(status, 400);
    assert!(
        text.contains(&format!(
            "Request payload with size {} is larger than the limit of 51200 allowed by server.",
            big.len()
        )),
        "{text}"
    );
    // The API still serves, one request at a time; GET / shows the state.
    let (status, info) = http(&s, "GET", "/", None);
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "Firecracker");
    let (_, version) = http(&s, "GET", "/version", None);
    assert!(version.contains("firecracker_version"), "{version}");
    // After boot: the pre-boot resources are refused.
    ok(&s, "PUT", "/boot-source", &kernel);
    ok(&s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    fc.rhyve.wait_for("waiting for ctrl-alt-del");
    let after = "The requested operation is not supported after starting the microVM.";
    for (method, path, body) in [
        ("PUT", "/boot-source", kernel.as_str()),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        ),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
        ("PUT", "/logger", r#"{"level": "Info"}"#),
    ] {
        assert_eq!(
            fault(&s, method, path, Some(body)),
            after,
            "{method} {path}"
        );
    }
    // FlushMetrics after boot without a metrics file: 204, as Firecracker.
    ok(&s, "PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let (status, info) = http(&s, "GET", "/", None);
    assert_eq!(
        (status, info.contains(r#""state":"Running""#)),
        (200, true),
        "{info}"
    );
    assert_eq!(fc.terminate(), 0, "{}", fc.rhyve.stderr());
}

#[test]
fn a_config_file_boots_at_once_with_or_without_the_api() {
    require_kvm();
    let dir = scratch_dir("fc-config");
    let config = dir.join("vm.json");
    let metrics = dir.join("metrics.json");
    let write = |test: &str| {
        std::fs::write(
            &config,
            serde_json::json!({
                "boot-source": {
                    "kernel_image_path": TESTGUEST_BZIMAGE,
                    "boot_args": format!("console=ttyS0 rhyve.test={test}")
                },
                "drives": [],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                "metrics": {"metrics_path": metrics},
                "cpu-config": null
            })
            .to_string(),
        )
        .unwrap();
    };
    write("report");
    let out = Command::new(rhyve_bin())
        .env("RHYVE_RUNDIR", dir.join("run"))
        .args(["--no-api", "--id", "cfg1", "--config-file"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("rhyve-guest: report done"), "{stdout}");
    // The report guest ends with pc-testdev's exit, absent here: it halts, a guest stop.
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    write("ctrlaltdel");
    let sock = dir.join("api.sock");
    let mut rhyve = Spawned::spawn(
        Command::new(rhyve_bin())
            .env("RHYVE_RUNDIR", dir.join("run"))
            .args(["--id", "cfg2", "--api-sock"])
            .arg(&sock)
            .arg("--config-file")
            .arg(&config),
    );
    rhyve.wait_for("waiting for ctrl-alt-del");
    let (status, info) = http(&sock, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(info.contains(r#""state":"Running""#), "{info}");
    // The file's metrics are set up as a PUT /metrics would be: a flush writes a line.
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
    );
    let lines = std::fs::read_to_string(&metrics).unwrap_or_default();
    assert!(
        lines.contains("utc_timestamp_ms"),
        "metrics file: {lines:?}"
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    rhyve.wait_for("ctrl-alt-del pressed");
    let code = wait_exit(&mut rhyve.child.0, Duration::from_secs(30)).map(|s| s.code());
    assert_eq!(code, Some(Some(0)), "{}", rhyve.stderr());

    // A bad configuration file: Firecracker's message, exit 1.
    std::fs::write(
        &config,
        r#"{"boot-source": {"kernel_image_path": "/nonexistent"}, "drives": []}"#,
    )
    .unwrap();
    let out = Command::new(rhyve_bin())
        .env("RHYVE_RUNDIR", dir.join("run"))
        .args(["--no-api", "--config-file"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Configuration for VMM from one single json failed: Boot source error: The kernel file cannot be opened"),
        "{err}"
    );
}

#[test]
fn the_command_line_is_firecracker_s() {
    let dir = scratch_dir("fc-cli");
    let run = |args: &[&str]| {
        Command::new(rhyve_bin())
            .env("RHYVE_RUNDIR", dir.join("run"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // Kata parses the second word as the version.
    let v = run(&["--api-sock", "/nonexistent/x", "--version"]);
    let text = String::from_utf8_lossy(&v.stdout);
    let word = text.split_whitespace().nth(1).unwrap_or("");
    assert!(
        text.starts_with("Firecracker v") && word.trim_start_matches('v').split('.').count() == 3,
        "{text}"
    );
    let o = run(&["--no-api"]);
    assert_eq!(o.status.code(), Some(153));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("Argument 'config-file' required, but not found."));
    let o = run(&["--api-sock", "/tmp/x", "--bogus"]);
    assert_eq!(o.status.code(), Some(153));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Found argument '--bogus'"));
    let o = run(&["--api-sock", "/tmp/x", "--level", "loud"]);
    assert_eq!(o.status.code(), Some(152));
    // The socket file exists: refused, exit 1, as Firecracker.
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, "").unwrap();
    let o = run(&["--api-sock", taken.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!(
            "Failed to open the API socket at: {}. Check that it is not already used.",
            taken.display()
        )),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `PUT /vsock` as firecracker-containerd sends it (guest_cid 0 is accepted; then a real
/// CID), the path taken refused with Firecracker's message, and both directions through the
/// test guest's vsock driver: `CONNECT 5000` echoes, the guest's connection to host port
/// 6000 reaches `<uds_path>_6000`.
#[test]
fn put_vsock_connects_both_ways() {
    let mut fc = Fc::start("fcvsock", &[], &[]);
    let (sock, dir) = (fc.sock.clone(), fc.dir.clone());
    let vsock = dir.join("v.sock");
    let out_listener = std::os::unix::net::UnixListener::bind(dir.join("v.sock_6000")).unwrap();
    let host_side = std::thread::spawn(move || {
        let (mut s, _) = out_listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hello = [0u8; 21];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"hello from the host\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        String::from_utf8_lossy(&hello).into_owned()
    });
    let body = |cid: u32, path: &Path| {
        format!(
            r#"{{"vsock_id": "vsock0", "guest_cid": {cid}, "uds_path": "{}"}}"#,
            path.display()
        )
    };
    ok(&sock, "PUT", "/vsock", &body(0, &vsock));
    assert!(!vsock.exists(), "the bind at PUT is undone until the start");
    let taken = dir.join("taken");
    std::fs::write(&taken, b"").unwrap();
    assert_eq!(
        fault(&sock, "PUT", "/vsock", Some(&body(3, &taken))),
        "Vsock config error: Cannot create backend for vsock device: Error binding to the host-side Unix socket: Address already in use (os error 98)"
    );
    ok(&sock, "PUT", "/vsock", &body(3, &vsock));
    let (_, cfg) = http(&sock, "GET", "/vm/config", None);
    assert!(
        cfg.contains(r#""guest_cid":3"#) && !cfg.contains("vsock_id"),
        "{cfg}"
    );
    ok(
        &sock,
        "PUT",
        "/boot-source",
        &serde_json::json!({
            "kernel_image_path": TESTGUEST_BZIMAGE,
            "boot_args": "console=ttyS0 rhyve.test=vsock rhyve.vsock.conns=1"
        })
        .to_string(),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    fc.rhyve.wait_for("vsock cid=3");
    let mut s = UnixStream::connect(&vsock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut okline = String::new();
    r.read_line(&mut okline).unwrap();
    assert!(okline.starts_with("OK 1073741"), "{okline:?}");
    s.write_all(b"echo me\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = String::new();
    r.read_to_string(&mut back).unwrap();
    assert_eq!(back, "echo me\n");
    // The whole end of the report (the stream is read as it comes).
    fc.rhyve.wait_for("vsock done\nrhyve-guest: checks fail=0");
    assert_eq!(host_side.join().unwrap(), "hello from the guest\n");
    let out = fc.rhyve.stdout();
    for line in [
        "vsock out got=hello from the host",
        "vsock echo port=5000 bytes=8",
    ] {
        assert!(out.contains(line), "missing {line:?}\n{out}");
    }
    // (Its exit through pc-testdev then fails: Firecracker's machine has none.)
    assert!(
        out.contains("vsock done\nrhyve-guest: checks fail=0"),
        "{out}"
    );
    assert_eq!(fc.terminate(), 0, "{}", fc.rhyve.stderr());
}

/// Every `tick N` the guest printed, in order.
fn tick_numbers(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.split("rhyve-guest: tick ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The last `tick N` the guest printed (0: none).
fn last_tick(out: &str) -> u64 {
    tick_numbers(out).last().copied().unwrap_or(0)
}

#[test]
fn snapshot_create_then_load_in_a_new_process_continues_the_guest() {
    let mut fc = Fc::start("fc-snap", &[], &[]);
    let s = fc.sock.clone();
    ok(
        &s,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{TESTGUEST_BZIMAGE}", "boot_args": "console=ttyS0 rhyve.test=ctrlaltdel"}}"#
        ),
    );
    ok(
        &s,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    );
    ok(&s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    fc.rhyve.wait_for("rhyve-guest: tick 3");
    let (state, mem) = (fc.dir.join("vm.snap"), fc.dir.join("vm.mem"));
    let create = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    assert!(
        fault(&s, "PUT", "/snapshot/create", Some(&create)).contains("must be paused"),
        "a running VM is not snapshotted"
    );
    ok(&s, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    ok(&s, "PUT", "/snapshot/create", &create);
    let before = last_tick(&fc.rhyve.stdout());
    assert!(before >= 3);
    // The first process goes; a second one loads the snapshot, paused until resumed.
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(fc.rhyve.child.0.id() as i32, libc::SIGKILL) };
    let _ = fc.exit_code(Duration::from_secs(10));

    let mut fc2 = Fc::start("fc-snap", &[], &[]);
    let s2 = fc2.sock.clone();
    assert!(fault(
        &s2,
        "PUT",
        "/snapshot/load",
        Some(&format!(r#"{{"snapshot_path": "{}"}}"#, state.display()))
    )
    .starts_with("missing field"));
    ok(
        &s2,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
            state.display(),
            mem.display()
        ),
    );
    let (status, info) = http(&s2, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        last_tick(&fc2.rhyve.stdout()),
        0,
        "the loaded VM ran before its resume"
    );
    assert_eq!(
        fault(
            &s2,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        ),
        "The requested operation is not supported after starting the microVM."
    );
    ok(&s2, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    // The guest's count goes on from where it was (its memory, vCPUs and PM timer).
    fc2.rhyve
        .wait_for(&format!("rhyve-guest: tick {}", before + 2));
    let after = fc2.rhyve.stdout();
    assert_eq!(tick_numbers(&after).first(), Some(&(before + 1)), "{after}");
    // Its keyboard works: Ctrl-Alt-Del resets it and Firecracker's process exits 0.
    ok(
        &s2,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    fc2.rhyve.wait_for("ctrl-alt-del pressed");
    assert_eq!(
        fc2.exit_code(Duration::from_secs(30)),
        0,
        "{}",
        fc2.rhyve.stderr()
    );
}
