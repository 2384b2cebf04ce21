//! The stdio console on a real terminal (a pty): raw mode while the guest runs, so ^C reaches
//! the guest instead of killing rhyve, and the terminal settings restored on every exit path.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rhyve_tests::harness::{require_kvm, rhyve_cmd, scratch_dir, testdev_status, KillOnDrop};
use rhyve_tests::TESTGUEST_BZIMAGE;

/// A pty pair: (controller, terminal).
fn openpty() -> (File, OwnedFd) {
    // SAFETY: plain libc pty calls; every result is checked before use.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(master >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let name = libc::ptsname(master);
        assert!(!name.is_null());
        let slave = libc::open(name, libc::O_RDWR | libc::O_NOCTTY);
        assert!(slave >= 0, "open pty");
        (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave))
    }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

fn same(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
}

fn spawn_on_pty(name: &str, cmdline: &str, tty: &OwnedFd) -> Child {
    spawn_on_pty_with(name, cmdline, tty, None)
}

/// [`spawn_on_pty`] with `RHYVE_TEST_FAULT` set to `fault`.
fn spawn_on_pty_with(name: &str, cmdline: &str, tty: &OwnedFd, fault: Option<&str>) -> Child {
    let dir = scratch_dir(name);
    let mut cmd = rhyve_cmd(&dir);
    if let Some(f) = fault {
        cmd.env("RHYVE_TEST_FAULT", f);
    }
    cmd.args([
        "-m",
        "64M",
        "-l",
        "com1,stdio",
        "-l",
        "pc-testdev",
        "--kernel",
        TESTGUEST_BZIMAGE,
        "--append",
        cmdline,
        name,
    ]);
    cmd.stdin(Stdio::from(tty.try_clone().unwrap()))
        .stdout(Stdio::from(tty.try_clone().unwrap()))
        .stderr(Stdio::from(tty.try_clone().unwrap()))
        .process_group(0);
    cmd.spawn().expect("spawn rhyve")
}

/// Reads the pty until `needle` shows up (or the deadline passes); returns all text read.
fn read_until(master: &mut File, needle: &str, deadline: Instant) -> String {
    let mut text = String::new();
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut buf = [0u8; 1024];
    while !text.contains(needle) && Instant::now() < deadline {
        match master.read(&mut buf) {
            Ok(n) if n > 0 => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    text
}

fn wait(child: &mut Child, deadline: Instant) -> i32 {
    match rhyve_tests::harness::wait_exit(child, deadline.saturating_duration_since(Instant::now()))
    {
        Some(s) => s.code().unwrap_or(-1),
        None => {
            let _ = child.kill();
            panic!("rhyve did not exit");
        }
    }
}

#[test]
fn ctrl_c_goes_to_the_guest_and_the_terminal_is_restored() {
    require_kvm();
    let (mut master, tty) = openpty();
    let before = termios(&tty);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut guard = KillOnDrop(spawn_on_pty(
        "pty-echo",
        "rhyve.test=echo rhyve.exit=3",
        &tty,
    ));
    let child = &mut guard.0;
    let seen = read_until(&mut master, "type a line", deadline);
    assert!(seen.contains("type a line"), "{seen}");
    assert!(
        !same(&termios(&tty), &before),
        "terminal not in raw mode while the guest runs"
    );
    master.write_all(b"ab\x03cd\r").unwrap();
    let seen = read_until(&mut master, "rhyve-guest: echo", deadline);
    let code = wait(child, deadline);
    assert_eq!(
        code,
        testdev_status(3),
        "rhyve was killed by ^C? output: {seen}"
    );
    let rest = read_until(&mut master, "\n", Instant::now() + Duration::from_secs(2));
    assert!(
        format!("{seen}{rest}").contains("echo ab\\x03cd"),
        "{seen}{rest}"
    );
    assert!(
        same(&termios(&tty), &before),
        "terminal settings not restored"
    );
}

#[test]
fn sigterm_restores_the_terminal() {
    require_kvm();
    let (mut master, tty) = openpty();
    let before = termios(&tty);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut guard = KillOnDrop(spawn_on_pty("pty-term", "rhyve.test=echo", &tty));
    let child = &mut guard.0;
    let seen = read_until(&mut master, "type a line", deadline);
    assert!(seen.contains("type a line"), "{seen}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait(child, deadline), 1);
    assert!(
        same(&termios(&tty), &before),
        "terminal settings not restored after SIGTERM"
    );
}

#[test]
fn a_forbidden_call_or_a_panic_in_a_vcpu_restores_the_terminal() {
    require_kvm();
    for fault in ["syscall:vcpu", "panic:vcpu"] {
        let (mut master, tty) = openpty();
        let before = termios(&tty);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut guard = KillOnDrop(spawn_on_pty_with(
            "pty-fault",
            "rhyve.test=echo",
            &tty,
            Some(fault),
        ));
        let child = &mut guard.0;
        assert_eq!(wait(child, deadline), 4, "{fault}");
        let seen = read_until(
            &mut master,
            "stopping",
            Instant::now() + Duration::from_secs(2),
        );
        assert!(
            same(&termios(&tty), &before),
            "{fault}: terminal settings not restored: {seen}"
        );
    }
}
