//! COM port backends on real KVM with the test guest's `rhyve.test=echo` (prompt on COM1,
//! then one line read from COM1 echoed back): `pty`, `unix=PATH`, `tcp=IP:PORT` (loopback
//! only), and the one-line refusals of bad backends. Network use: 127.0.0.1 only.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use rhyve_tests::harness::{
    self, read_until, require_kvm, rhyve_cmd, scratch_dir, testdev_status, Run, Spawned,
};
use rhyve_tests::TESTGUEST_BZIMAGE;

const PROMPT: &str = "rhyve-guest: type a line";
const EXIT: u32 = 5;

/// A running rhyve with COM1 on `backend`, its stdout and stderr collected in the background.
struct Vm {
    rhyve: Spawned,
    dir: PathBuf,
    name: String,
}

impl Vm {
    fn start(name: &str, backend: &str) -> Vm {
        require_kvm();
        let dir = scratch_dir(name);
        Self::start_in(&dir, name, backend)
    }

    fn start_in(dir: &Path, name: &str, backend: &str) -> Vm {
        let mut cmd: Command = rhyve_cmd(dir);
        cmd.args([
            "-m",
            "64M",
            "-l",
            &format!("com1,{backend}"),
            "-l",
            "pc-testdev",
        ])
        .args(["--kernel", TESTGUEST_BZIMAGE, "--append"])
        .arg(format!("rhyve.test=echo rhyve.exit={EXIT}"))
        .arg(name);
        Vm {
            rhyve: Spawned::spawn(&mut cmd),
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    fn rundir(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Waits for the exit (at most 60 s) and checks what every run must show.
    fn finish(mut self) -> (ExitStatus, String) {
        let status = harness::wait_exit(&mut self.rhyve.child.0, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("rhyve did not exit; stderr:\n{}", self.rhyve.stderr()));
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.rhyve.stderr();
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(
            self.rhyve.stdout().as_str(),
            "",
            "guest output must not reach stdout"
        );
        // What the console backends put in the runtime directory is gone with the VM.
        assert!(
            !self.rundir().join("com1.pty").exists(),
            "pty path file left behind"
        );
        assert!(!self.rundir().exists(), "runtime directory left behind");
        (status, stderr)
    }
}

/// Connects with `connect` until it succeeds (the socket appears once rhyve has built its
/// devices).
fn connect_retry<S>(mut connect: impl FnMut() -> std::io::Result<S>) -> S {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match connect() {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "cannot connect: {e}"),
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The echo exchange on a connected socket. Guest output while nobody is connected is
/// dropped, so the prompt may already be gone when the client gets there: then the line is
/// sent anyway (the guest is waiting for it by then) and rhyve must have counted drops.
fn socket_echo<S: Read + Write + AsRawFd>(s: &mut S, line: &str) -> bool {
    let saw_prompt = read_until(s, PROMPT, Duration::from_secs(3)).is_ok();
    s.write_all(format!("{line}\r").as_bytes()).unwrap();
    let echo = format!("rhyve-guest: echo {line}");
    if let Err(got) = read_until(s, &echo, Duration::from_secs(30)) {
        panic!("no echo of {line:?}; read {got:?}");
    }
    saw_prompt
}

fn check_prompt_or_drops(saw_prompt: bool, stderr: &str) {
    assert!(
        saw_prompt || stderr.contains("guest output bytes dropped"),
        "prompt missed but no drops reported: {stderr}"
    );
}

#[test]
fn pty_backend_carries_bytes_both_ways() {
    let vm = Vm::start("con-pty", "pty");
    // The path file appears in the runtime dir while the VM runs.
    let file = vm.rundir().join("com1.pty");
    let deadline = Instant::now() + Duration::from_secs(30);
    let path = loop {
        if let Ok(s) = std::fs::read_to_string(&file) {
            if s.ends_with('\n') {
                break s.trim().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared: {}",
            file.display(),
            vm.rhyve.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(path.starts_with("/dev/pts/"), "{path}");
    let mut pty = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .unwrap();
    // rhyve keeps the pty open, so the guest's output waited in the pty for us.
    if let Err(got) = read_until(&mut pty, PROMPT, Duration::from_secs(30)) {
        panic!("no prompt on {path}: {got:?}; stderr {}", vm.rhyve.stderr());
    }
    assert!(file.exists(), "path file removed while the VM runs");
    pty.write_all(b"hello over a pty\r").unwrap();
    if let Err(got) = read_until(
        &mut pty,
        "rhyve-guest: echo hello over a pty",
        Duration::from_secs(30),
    ) {
        panic!("no echo: {got:?}");
    }
    let (status, stderr) = vm.finish();
    assert_eq!(status.code(), Some(testdev_status(EXIT)), "{stderr}");
    assert!(
        stderr.lines().any(|l| l == format!("rhyve: com1: {path}")),
        "pty path not announced: {stderr}"
    );
}

#[test]
fn unix_socket_backend_carries_bytes_both_ways() {
    require_kvm();
    let dir = scratch_dir("con-unix");
    let sock = dir.join("com1.sock");
    let vm = Vm::start_in(&dir, "con-unix", &format!("unix={}", sock.display()));
    let mut s = connect_retry(|| UnixStream::connect(&sock));
    let saw_prompt = socket_echo(&mut s, "hello over a unix socket");
    let (status, stderr) = vm.finish();
    assert_eq!(status.code(), Some(testdev_status(EXIT)), "{stderr}");
    check_prompt_or_drops(saw_prompt, &stderr);
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn unix_socket_replaces_a_stale_socket() {
    require_kvm();
    let dir = scratch_dir("con-unix-stale");
    let sock = dir.join("com1.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let vm = Vm::start_in(&dir, "con-unix-stale", &format!("unix={}", sock.display()));
    let mut s = connect_retry(|| UnixStream::connect(&sock));
    socket_echo(&mut s, "stale socket replaced");
    let (status, stderr) = vm.finish();
    assert_eq!(status.code(), Some(testdev_status(EXIT)), "{stderr}");
}

/// A free loopback port (closed again; rhyve binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn tcp_backend_one_client_at_a_time_and_reconnect() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let vm = Vm::start("con-tcp", &format!("tcp={addr}"));
    let mut first = connect_retry(|| TcpStream::connect(&addr));
    let saw_prompt = read_until(&mut first, PROMPT, Duration::from_secs(3)).is_ok();

    // A second client while the first is connected is closed at once.
    let mut second = TcpStream::connect(&addr).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 16];
    assert!(
        matches!(second.read(&mut b), Ok(0)),
        "second client not closed"
    );

    // The first one leaves; the next one gets the console.
    drop(first);
    let echo = "rhyve-guest: echo hello over tcp";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = TcpStream::connect(&addr).unwrap();
        c.write_all(b"hello over tcp\r").unwrap();
        match read_until(&mut c, echo, Duration::from_secs(5)) {
            Ok(_) => break,
            // Closed: connected before rhyve saw the first client go. Try again.
            Err(got) => {
                assert!(got.is_empty(), "no echo: {got:?}");
                assert!(Instant::now() < deadline, "never got the console back");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let (status, stderr) = vm.finish();
    assert_eq!(status.code(), Some(testdev_status(EXIT)), "{stderr}");
    check_prompt_or_drops(saw_prompt, &stderr);
}

/// One line on stderr naming the problem, exit status 4; returns whether a VM object was
/// ever created (its runtime directory exists).
fn refused(backend: &str, needle: &str, name: &str) -> bool {
    let dir = scratch_dir(name);
    let mut cmd = rhyve_cmd(&dir);
    cmd.env("RHYVE_LOG", "error")
        .args([
            "-m",
            "64M",
            "-l",
            &format!("com1,{backend}"),
            "-l",
            "pc-testdev",
        ])
        .args([
            "--kernel",
            TESTGUEST_BZIMAGE,
            "--append",
            "rhyve.test=echo",
            name,
        ]);
    let out = harness::run(
        &mut cmd,
        Run {
            timeout: Duration::from_secs(30),
            input: None,
        },
    )
    .unwrap();
    harness::assert_refused(&out, backend, needle);
    dir.join(name).exists()
}

#[test]
fn bad_backends_are_refused_with_one_line() {
    // Refused while reading the configuration: no VM, no socket, no connection attempt.
    for (backend, needle, name) in [
        (
            "tcp=8.8.8.8:1",
            "-l com1,tcp=8.8.8.8:1: only loopback addresses",
            "con-bad-tcp",
        ),
        ("tcp=0.0.0.0:1", "only loopback", "con-bad-any"),
        ("tcp=nowhere", "expected tcp=IP:PORT", "con-bad-tcp-syntax"),
        ("frob", "unsupported backend", "con-bad-frob"),
    ] {
        assert!(
            !refused(backend, needle, name),
            "{backend}: a VM was created"
        );
    }
    require_kvm();
    refused(
        "unix=/nonexistent/dir/s",
        "-l com1,unix=/nonexistent/dir/s: No such file or directory",
        "con-bad-unix",
    );
    let dir = scratch_dir("con-bad-file");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    refused(
        &format!("unix={}", file.display()),
        "not a socket",
        "con-bad-file",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "file touched");
}
