//! virtio-vsock with Firecracker's host side, driven by the test guest's own vsock driver
//! (guests/testguest/src/vsock.rs) on real /dev/kvm, with real unix sockets: host programs
//! connect with `CONNECT <port>\n`, the guest connects out to `<path>_<port>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use rhyve_tests::harness::{
    self, require_kvm, rhyve_cmd, scratch_dir, testdev_status, wait_exit, Output, Run, Spawned,
};
use rhyve_tests::image::fnv1a64;
use rhyve_tests::TESTGUEST_BZIMAGE;

fn vsock_cmd(dir: &Path, slot: &str, append: &str, name: &str) -> std::process::Command {
    let mut cmd = rhyve_cmd(dir);
    cmd.args(harness::PC_MACHINE)
        .args(["-m", "128M", "-l", "pc-testdev", "-s", slot])
        .args(["--kernel", TESTGUEST_BZIMAGE, "--append", append, name]);
    cmd
}

/// Firecracker's handshake: the `OK <hostport>` line, or None when the stream closed first.
fn handshake(sock: &Path, command: &str) -> (UnixStream, Option<u32>) {
    let mut s = UnixStream::connect(sock).expect("connect to the vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(command.as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => return (s, None),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => panic!("{command:?}: reading the OK line: {e}"),
        }
    }
    let line = String::from_utf8(line).unwrap();
    let port = line
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{command:?}: answer {line:?}"));
    (s, Some(port))
}

/// Sends `data` on `s` from a thread while reading the echo, half-closes, reads to EOF.
fn echo_through(mut s: UnixStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("reading the echo");
    writer.join().unwrap();
    back
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096 * 13) as u8).collect()
}

#[test]
fn vsock_both_ways_with_the_test_guest() {
    require_kvm();
    let dir = scratch_dir("vsock");
    let sock = dir.join("v.sock");
    // The guest's connection out to host port 6000: hello, answer, half-close, then EOF
    // once the guest closed.
    let out_listener = UnixListener::bind(dir.join("v.sock_6000")).unwrap();
    let host_side = std::thread::spawn(move || {
        let (s, _) = out_listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut hello = String::new();
        r.read_line(&mut hello).unwrap();
        let mut w = s;
        w.write_all(b"hello from the host\n").unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        (hello, rest.len())
    });
    let mut vm = Spawned::spawn(&mut vsock_cmd(
        &dir,
        &format!("4,virtio-vsock,cid=7,path={}", sock.display()),
        "rhyve.test=vsock rhyve.vsock.refused=6001 rhyve.vsock.ignore=5001 rhyve.vsock.conns=2",
        "vsock0",
    ));
    vm.wait_for("vsock cid=7");

    // Host-initiated: 1 MiB each way through the guest's echo (16 times the device's credit
    // window of 64 KiB, so the credit updates must flow), then a second connection.
    let (s, port) = handshake(&sock, "CONNECT 5000\n");
    let first = port.expect("an OK line for the guest's listening port");
    assert!((1 << 30..1 << 31).contains(&first), "host port {first}");
    let data = pattern(1 << 20);
    let back = echo_through(s, data.clone());
    assert_eq!(back.len(), data.len(), "echoed bytes");
    assert_eq!(fnv1a64(&back), fnv1a64(&data), "echoed data differs");
    let (s, port) = handshake(&sock, "connect 5000\n");
    assert_eq!(port, Some(first + 1), "host ports go round robin");
    assert_eq!(echo_through(s, b"ping\n".to_vec()), b"ping\n");

    // Nothing listens on 5002 in the guest: its RST closes the stream without OK.
    let t = Instant::now();
    assert_eq!(handshake(&sock, "CONNECT 5002\n").1, None);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // The guest ignores 5001: after Firecracker's 2 s the device resets the connection.
    let t = Instant::now();
    assert_eq!(handshake(&sock, "CONNECT 5001\n").1, None);
    let waited = t.elapsed();
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(6)).contains(&waited),
        "reset after {waited:?}"
    );
    // Not a command: closed.
    assert_eq!(handshake(&sock, "HELLO 5000\n").1, None);

    let status = wait_exit(&mut vm.child.0, Duration::from_secs(60));
    let out = vm.stdout();
    let report = harness::Report::parse(&out);
    assert!(
        report.fails.is_empty(),
        "guest failures {:?}\n{out}\n{}",
        report.fails,
        vm.stderr()
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(testdev_status(0)),
        "{out}\n{}",
        vm.stderr()
    );
    for line in [
        "vsock cid=7",
        "vsock out port=6000 connected",
        "vsock out got=hello from the host",
        "vsock out closed",
        "vsock refused port=6001",
        "vsock echo port=5000 bytes=1048576",
        "vsock echo port=5000 bytes=5",
        "vsock ignored port=5001 reset",
        "vsock done",
        "checks fail=0",
    ] {
        assert!(
            report.lines.iter().any(|l| l == line),
            "missing {line:?}:\n{out}"
        );
    }
    let (hello, after) = host_side.join().unwrap();
    assert_eq!(hello, "hello from the guest\n");
    assert_eq!(after, 0, "bytes after the guest's hello");
    assert!(!sock.exists(), "the socket is removed when the VM ends");
}

fn run(cmd: &mut std::process::Command) -> Output {
    harness::run(cmd, Run::default()).unwrap()
}

#[test]
fn vsock_options_are_checked() {
    require_kvm();
    let dir = scratch_dir("vsock-opts");
    let sock = dir.join("v.sock");
    let slot = |opts: &str| format!("4,virtio-vsock,{opts}");
    for (opts, needle) in [
        (format!("cid=2,path={}", sock.display()), "cid=2"),
        (format!("cid=x,path={}", sock.display()), "cid=x"),
        ("cid=3".to_string(), "missing path="),
        (format!("path={}", sock.display()), "missing cid="),
        (format!("cid=3,path={},bogus=1", sock.display()), "bogus"),
        (format!("cid=3,path=/{}", "d".repeat(120)), "too long"),
    ] {
        let out =
            run(vsock_cmd(&dir, &slot(&opts), "rhyve.test=report", "vo").env("RHYVE_LOG", "error"));
        harness::assert_refused(&out, &opts, needle);
    }
    // The socket must not exist (Firecracker's rule); an existing file is left alone.
    std::fs::write(&sock, b"").unwrap();
    let opts = format!("cid=3,path={}", sock.display());
    let out =
        run(vsock_cmd(&dir, &slot(&opts), "rhyve.test=report", "vo").env("RHYVE_LOG", "error"));
    harness::assert_refused(&out, "existing path", "Address already in use");
    assert!(sock.exists());
}
