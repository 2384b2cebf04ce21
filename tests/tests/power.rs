//! Power control on real KVM with the project's test guest: the 0xCF9 reset register (exit 0)
//! and the ACPI fixed-feature power button pressed by SIGTERM — a guest that handles it powers
//! off through S5 (exit 1); one that enabled it but ignores it is forced off after
//! `power.grace` or a second signal (exit 1); one that never enabled it is powered off at once.

use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use rhyve_tests::harness::{self, require_kvm, rhyve_cmd, scratch_dir, Run, Spawned};
use rhyve_tests::TESTGUEST_BZIMAGE;

const WAITING: &str = "rhyve-guest: waiting for the power button";
const PRESSED: &str = "rhyve-guest: power button pressed";
const IGNORING: &str = "rhyve-guest: ignoring the power button";
/// Exit status of a powered-off VM (bhyve).
const POWERED_OFF: i32 = 1;

fn command(dir: &std::path::Path, name: &str, cmdline: &str, opts: &[&str]) -> Command {
    let mut cmd = rhyve_cmd(dir);
    cmd.args(rhyve_tests::harness::PC_MACHINE)
        .args(["-m", "64M", "-l", "pc-testdev"])
        .args(opts)
        .args(["--kernel", TESTGUEST_BZIMAGE, "--append", cmdline, name]);
    cmd
}

#[test]
fn cf9_reset_exits_0() {
    require_kvm();
    let name = "pwr-cf9";
    let dir = scratch_dir(name);
    let out = harness::run(
        &mut command(&dir, name, "rhyve.test=cf9", &[]),
        Run {
            timeout: Duration::from_secs(60),
            input: None,
        },
    )
    .expect("spawn rhyve");
    assert!(!out.timed_out, "timed out: {}", out.stderr);
    let r = out.report();
    assert!(
        r.done && r.fails.is_empty() && r.faults.is_empty(),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("FAIL"), "{}", out.stdout);
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(!dir.join(name).exists(), "runtime directory left behind");
}

/// A running rhyve whose stdout (the guest's COM1) and stderr are collected in the background.
struct Vm {
    rhyve: Spawned,
    rundir: PathBuf,
}

impl Vm {
    fn start(name: &str, cmdline: &str, opts: &[&str]) -> Vm {
        require_kvm();
        let dir = scratch_dir(name);
        let mut cmd = command(&dir, name, cmdline, opts);
        Vm {
            rhyve: Spawned::spawn(&mut cmd),
            rundir: dir.join(name),
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, which has not been reaped (KillOnDrop owns it).
        let rc = unsafe { libc::kill(self.rhyve.child.0.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// The exit status if rhyve exits within `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = harness::wait_exit(&mut self.rhyve.child.0, timeout)?;
        // Let the collectors drain the pipes.
        std::thread::sleep(Duration::from_millis(100));
        Some(status)
    }

    /// Waits (at most 60 s) for the exit and checks what every run must show.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let Some(status) = self.wait_exit(Duration::from_secs(60)) else {
            panic!(
                "rhyve did not exit\nstdout:\n{}\nstderr:\n{}",
                self.rhyve.stdout(),
                self.rhyve.stderr()
            );
        };
        let (stdout, stderr) = (self.rhyve.stdout(), self.rhyve.stderr());
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !stdout.contains("rhyve-guest: FAIL"),
            "guest checks failed:\n{stdout}"
        );
        assert!(!self.rundir.exists(), "runtime directory left behind");
        (status, stdout, stderr)
    }
}

#[test]
fn sigterm_presses_the_power_button_and_the_guest_powers_off() {
    let mut vm = Vm::start("pwr-button", "rhyve.test=powerbutton", &[]);
    vm.rhyve.wait_for(WAITING);
    vm.signal(libc::SIGTERM);
    let (status, stdout, stderr) = vm.finish();
    assert!(
        stdout.contains(PRESSED),
        "guest never saw the press:\n{stdout}"
    );
    assert_eq!(status.code(), Some(POWERED_OFF), "{stderr}");
    assert!(
        stderr.contains("ACPI power button pressed"),
        "no press logged: {stderr}"
    );
    assert!(
        !stderr.contains("forcing"),
        "the guest's own S5 was expected, not a forced power-off: {stderr}"
    );
}

#[test]
fn ignored_power_button_is_forced_off_after_the_grace_period() {
    let mut vm = Vm::start("pwr-grace", "rhyve.test=pbignore", &["-o", "power.grace=1"]);
    vm.rhyve.wait_for(IGNORING);
    let t0 = Instant::now();
    vm.signal(libc::SIGTERM);
    let (status, stdout, stderr) = vm.finish();
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(POWERED_OFF), "{stderr}");
    assert!(!stdout.contains(PRESSED), "{stdout}");
    assert!(
        stderr.contains("ACPI power button pressed"),
        "no press logged: {stderr}"
    );
    assert!(
        stderr.contains("forcing"),
        "no forced power-off warning: {stderr}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(20),
        "forced off after {took:?}, expected ~1 s"
    );
}

#[test]
fn ignored_power_button_second_signal_forces_off() {
    let mut vm = Vm::start("pwr-twice", "rhyve.test=pbignore", &[]);
    vm.rhyve.wait_for(IGNORING);
    vm.signal(libc::SIGTERM);
    // No grace period: the VM keeps running while the guest ignores the button.
    assert_eq!(
        vm.wait_exit(Duration::from_millis(500)),
        None,
        "exited on the first signal; stderr: {}",
        vm.rhyve.stderr()
    );
    vm.signal(libc::SIGTERM);
    let (status, _, stderr) = vm.finish();
    assert_eq!(status.code(), Some(POWERED_OFF), "{stderr}");
    assert!(
        stderr.contains("again: forcing power-off"),
        "no forced power-off warning: {stderr}"
    );
}

#[test]
fn sigterm_without_power_button_enabled_powers_off_at_once() {
    // `echo` waits for input and never enables PWRBTN_EN (no ACPI OS).
    let mut vm = Vm::start("pwr-noacpi", "rhyve.test=echo", &[]);
    vm.rhyve.wait_for("rhyve-guest: type a line");
    vm.signal(libc::SIGTERM);
    let (status, stdout, stderr) = vm.finish();
    assert_eq!(status.code(), Some(POWERED_OFF), "{stderr}");
    assert!(!stdout.contains("rhyve-guest: echo"), "{stdout}");
    assert!(
        stderr.contains("has not enabled the ACPI power button"),
        "{stderr}"
    );
    assert!(!stderr.contains("forcing"), "{stderr}");
}
