//! SIGTERM/SIGINT/SIGHUP handling on a dedicated thread (sigwait), so no async-signal
//! context ever touches VMM state.
//!
//! As bhyve: the first signal presses the ACPI power button, and the guest's orderly S5
//! ends the VM (exit status 1). A second signal, or `power.grace` seconds after the first,
//! forces the power-off. A guest that never enabled the power button event (PWRBTN_EN; no
//! ACPI OS) is powered off at once. With a stdio console in raw mode ^C reaches the guest
//! as a byte, so a SIGINT that arrives here was sent on purpose and is handled the same way.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use devices::acpi_pm::Pm1Event;
use devices::threads::ThreadKind;
use devices::{StopReason, VmControl};

const TERMINATION: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERMINATION {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in the calling thread (and threads it spawns later).
pub fn block_termination_signals() -> std::io::Result<()> {
    let set = sigset();
    // SAFETY: valid sigset pointer; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// What a termination signal (or the grace period running out) leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The power button was pressed; wait for the guest's S5.
    Pressed,
    /// Power the VM off now.
    PowerOff,
}

/// The power-button policy, apart from the signals and the device.
#[derive(Debug)]
pub struct PowerPolicy {
    grace: Option<Duration>,
    pressed_at: Option<Instant>,
}

impl PowerPolicy {
    /// `grace`: how long the guest may take after the button press (None: no limit).
    pub fn new(grace: Option<Duration>) -> Self {
        Self {
            grace,
            pressed_at: None,
        }
    }

    /// A termination signal at `now`; `press` presses the button and reports whether the
    /// guest listens to it (PWRBTN_EN).
    pub fn on_signal(&mut self, now: Instant, press: impl FnOnce() -> bool) -> Action {
        if self.pressed_at.is_some() {
            return Action::PowerOff;
        }
        if !press() {
            return Action::PowerOff;
        }
        self.pressed_at = Some(now);
        Action::Pressed
    }

    /// Whether the button was pressed already.
    pub fn pressed(&self) -> bool {
        self.pressed_at.is_some()
    }

    /// When the grace period after the press ends, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        Some(self.pressed_at? + self.grace?)
    }
}

/// Waits for a termination signal until `deadline`; None when the deadline passed first.
fn wait_signal(deadline: Option<Instant>) -> Option<libc::c_int> {
    let set = sigset();
    loop {
        match deadline {
            None => {
                let mut sig: libc::c_int = 0;
                // SAFETY: valid pointers; the signals are blocked in every thread.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    return Some(sig);
                }
            }
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                let ts = libc::timespec {
                    tv_sec: left.as_secs().min(i32::MAX as u64) as libc::time_t,
                    tv_nsec: left.subsec_nanos() as libc::c_long,
                };
                // SAFETY: valid pointers; a null siginfo is allowed.
                let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
                if sig > 0 {
                    return Some(sig);
                }
                // EAGAIN (timeout) or EINTR: recompute what is left.
            }
        }
    }
}

/// Waits for termination signals and turns them into power-button presses and stop requests.
/// `pm1` is weak: the device (which holds the VM for its SCI line) must go away with the
/// machine, or the VM's runtime directory would outlive it.
pub fn spawn_signal_thread(
    control: Arc<VmControl>,
    pm1: Weak<Mutex<Pm1Event>>,
    grace: Option<Duration>,
) -> std::io::Result<()> {
    devices::threads::spawn(ThreadKind::Signal, "signals", move || {
        let mut policy = PowerPolicy::new(grace);
        loop {
            let Some(sig) = wait_signal(policy.deadline()) else {
                log::warn!(
                    "the guest did not power off within power.grace={:?}: forcing it",
                    grace.unwrap_or_default()
                );
                control.request_stop(StopReason::PowerOff);
                return;
            };
            let press = || {
                pm1.upgrade().is_some_and(|pm1| {
                    pm1.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .press_power_button()
                })
            };
            let first = !policy.pressed();
            match policy.on_signal(Instant::now(), press) {
                Action::Pressed => {
                    log::info!("signal {sig}: ACPI power button pressed");
                }
                Action::PowerOff if first => {
                    log::info!(
                        "signal {sig}: the guest has not enabled the ACPI power button: \
                             powering it off"
                    );
                    control.request_stop(StopReason::PowerOff);
                }
                Action::PowerOff => {
                    log::warn!("signal {sig} again: forcing power-off");
                    control.request_stop(StopReason::PowerOff);
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_signal_presses_second_forces() {
        let mut p = PowerPolicy::new(None);
        let t0 = Instant::now();
        assert_eq!(p.on_signal(t0, || true), Action::Pressed);
        assert_eq!(p.deadline(), None, "no grace: no timeout");
        assert!(p.pressed());
        let mut pressed_again = false;
        let a = p.on_signal(t0, || {
            pressed_again = true;
            true
        });
        assert_eq!(a, Action::PowerOff);
        assert!(
            !pressed_again,
            "the second signal does not press the button"
        );
    }

    #[test]
    fn guest_without_power_button_is_powered_off_at_once() {
        let mut p = PowerPolicy::new(Some(Duration::from_secs(5)));
        assert_eq!(p.on_signal(Instant::now(), || false), Action::PowerOff);
        assert_eq!(p.deadline(), None);
    }

    #[test]
    fn grace_runs_from_the_press() {
        let mut p = PowerPolicy::new(Some(Duration::from_secs(5)));
        assert_eq!(p.deadline(), None, "nothing pressed yet");
        let t0 = Instant::now();
        assert_eq!(p.on_signal(t0, || true), Action::Pressed);
        assert_eq!(p.deadline(), Some(t0 + Duration::from_secs(5)));
    }

    #[test]
    fn wait_times_out_at_the_deadline() {
        let t0 = Instant::now();
        // Termination signals are not pending in the test process: the wait must time out.
        assert_eq!(wait_signal(Some(t0 + Duration::from_millis(30))), None);
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert_eq!(wait_signal(Some(t0)), None);
    }
}
