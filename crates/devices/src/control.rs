//! How devices, vCPUs and signals ask the VM to stop, and how the main thread waits for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why the VM stopped; maps onto bhyve(8)'s exit statuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Guest reset (i8042 0xFE, 0xCF9, KVM reset event): exit 0.
    Reset,
    /// Guest power-off (ACPI S5) or SIGTERM: exit 1.
    PowerOff,
    /// All vCPUs halted for good: exit 2.
    Halt,
    /// Triple fault: exit 3.
    TripleFault,
    /// pc-testdev debug exit: the process exits with this status, as bhyve does.
    GuestExit(i32),
    /// VMM-side failure (KVM error, emulation failure): exit 4.
    Error(String),
    /// Saved to a snapshot and stopped (bhyvectl --suspend): exit 0, as bhyve.
    Suspended,
}

impl StopReason {
    /// bhyve(8)'s exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::Reset | StopReason::Suspended => 0,
            StopReason::PowerOff => 1,
            StopReason::Halt => 2,
            StopReason::TripleFault => 3,
            StopReason::GuestExit(code) => *code,
            StopReason::Error(_) => 4,
        }
    }
}

/// First stop request wins; later ones are ignored (e.g. a reset racing a power-off).
#[derive(Default)]
pub struct VmControl {
    reason: Mutex<Option<StopReason>>,
    changed: Condvar,
    /// Mirrors `reason.is_some()` so the vCPU loop checks it without a lock on every exit.
    stopping: AtomicBool,
}

impl VmControl {
    /// A control with no stop requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests a stop; returns false if one was already requested.
    pub fn request_stop(&self, reason: StopReason) -> bool {
        let mut guard = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_some() {
            return false;
        }
        *guard = Some(reason);
        self.stopping.store(true, Ordering::Release);
        self.changed.notify_all();
        true
    }

    /// The stop reason, if any.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Blocks until a stop is requested.
    pub fn wait(&self) -> StopReason {
        let mut guard = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = guard.as_ref() {
                return r.clone();
            }
            guard = self.changed.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until a stop is requested or `timeout` passes; the reason, if any.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<StopReason> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = guard.as_ref() {
                return Some(r.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = self
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_request_wins_and_wakes_waiter() {
        let c = Arc::new(VmControl::new());
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait());
        assert!(c.request_stop(StopReason::Reset));
        assert!(!c.request_stop(StopReason::PowerOff));
        assert_eq!(t.join().unwrap(), StopReason::Reset);
    }

    #[test]
    fn wait_timeout_times_out_then_sees_the_stop() {
        let c = VmControl::new();
        assert_eq!(c.wait_timeout(Duration::from_millis(10)), None);
        c.request_stop(StopReason::Halt);
        assert_eq!(
            c.wait_timeout(Duration::from_millis(10)),
            Some(StopReason::Halt)
        );
    }

    #[test]
    fn exit_codes_follow_bhyve() {
        assert_eq!(StopReason::Reset.exit_code(), 0);
        assert_eq!(StopReason::PowerOff.exit_code(), 1);
        assert_eq!(StopReason::Halt.exit_code(), 2);
        assert_eq!(StopReason::TripleFault.exit_code(), 3);
        assert_eq!(StopReason::Error("x".into()).exit_code(), 4);
        assert_eq!(StopReason::GuestExit(0x21).exit_code(), 0x21);
    }
}
