//! Control of a running vCPU from other threads (the control socket): pause/resume, and work
//! that must run on the vCPU's own thread — register reads and writes, NMI injection — since
//! KVM serialises every vCPU ioctl behind a running KVM_RUN.
//!
//! The pattern is [`crate::vcpu::HaltProbe`]'s: the controller posts a request, raises a flag
//! and kicks the vCPU out of KVM_RUN with SIGRTMIN; the vCPU thread looks at the flag between
//! runs (one relaxed load on the hot path) and serves the request. A kick that lands just
//! before the thread enters KVM_RUN is lost, so the controller repeats it until answered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::VmControl;
use vmm_sys_util::signal::SIGRTMIN;
use vmmapi::Vcpu;

/// Work for the vCPU thread.
type Job = Box<dyn FnOnce(&Vcpu) + Send>;

/// How often an unanswered request kicks the vCPU again.
const KICK_RETRY: Duration = Duration::from_millis(5);
/// How often a parked vCPU looks at the VM's stop flag (the stop path kicks with signals,
/// which do not wake a condition variable).
const PARKED_CHECK: Duration = Duration::from_millis(20);

/// Why a request to a vCPU failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    /// The vCPU thread has ended (the VM is stopping) or never started.
    #[error("vCPU {0} is not running")]
    Gone(u32),
    /// The vCPU did not answer in time.
    #[error("vCPU {0} did not answer within {1} ms")]
    Timeout(u32, u128),
}

#[derive(Default)]
struct Inner {
    /// A pause was requested and not yet resumed.
    pause: bool,
    /// The vCPU thread is parked (out of KVM_RUN, waiting for resume).
    parked: bool,
    jobs: Vec<Job>,
    /// The vCPU thread, while its loop runs.
    thread: Option<libc::pthread_t>,
    /// The loop has ended: nothing will serve requests any more.
    gone: bool,
}

/// One vCPU's control block, shared by its thread and the control server.
pub struct VcpuCtl {
    id: u32,
    /// Something for the vCPU thread to look at (a job or a pause).
    pending: AtomicBool,
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// The vCPU thread's registration; dropping it (the loop ended) fails every later request.
pub struct Attached<'a>(&'a VcpuCtl);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.gone = true;
        g.thread = None;
        g.parked = false;
        // Dropping the jobs drops their reply channels: waiters see the vCPU is gone.
        g.jobs.clear();
        self.0.changed.notify_all();
    }
}

impl VcpuCtl {
    pub fn new(id: u32) -> Self {
        Self {
            id,
            pending: AtomicBool::new(false),
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
        }
    }

    /// The vCPU's index.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- the vCPU thread's side ----

    /// Called once by the vCPU thread before its loop: kicks go to this thread from now on.
    pub fn attach(&self) -> Attached<'_> {
        let mut g = self.lock();
        // SAFETY: pthread_self has no preconditions.
        g.thread = Some(unsafe { libc::pthread_self() });
        g.gone = false;
        Attached(self)
    }

    /// Whether a job or a pause is waiting for the vCPU thread.
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// Called by the vCPU thread between runs: runs posted jobs, and parks while paused
    /// (serving jobs meanwhile) until resumed or the VM stops.
    pub fn poll(&self, vcpu: &Vcpu, control: &VmControl) {
        // A plain load on the hot path; the lock only when something is pending.
        if !self.pending.load(Ordering::Relaxed) {
            return;
        }
        let mut g = self.lock();
        self.pending.store(false, Ordering::Relaxed);
        loop {
            let jobs = std::mem::take(&mut g.jobs);
            if !jobs.is_empty() {
                drop(g);
                for job in jobs {
                    job(vcpu);
                }
                g = self.lock();
                continue;
            }
            if !g.pause || control.stopping() {
                break;
            }
            if !g.parked {
                g.parked = true;
                self.changed.notify_all();
            }
            g = self
                .changed
                .wait_timeout(g, PARKED_CHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if g.parked {
            g.parked = false;
            self.changed.notify_all();
        }
    }

    // ---- the controller's side ----

    /// Sends SIGRTMIN to the vCPU thread (its handler does nothing: the point is the EINTR
    /// out of KVM_RUN). Under the lock, so the thread cannot end in between.
    fn kick_locked(g: &Inner) {
        if let Some(t) = g.thread {
            if !g.gone && !g.parked {
                // SAFETY: `t` is a live thread: it clears `thread` under this lock before
                // it ends.
                unsafe { libc::pthread_kill(t, SIGRTMIN()) };
            }
        }
    }

    /// Runs `f` on the vCPU's thread between two runs and returns its result.
    pub fn run_on<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Vcpu) -> R + Send + 'static,
        timeout: Duration,
    ) -> Result<R, CtlError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let abandoned = Arc::new(AtomicBool::new(false));
        {
            let abandoned = abandoned.clone();
            let mut g = self.lock();
            if g.gone || g.thread.is_none() {
                return Err(CtlError::Gone(self.id));
            }
            g.jobs.push(Box::new(move |v: &Vcpu| {
                // A request its client gave up on is not carried out late (an NMI reported
                // as failed must not arrive anyway).
                if !abandoned.load(Ordering::Acquire) {
                    let _ = tx.send(f(v));
                }
            }));
            self.pending.store(true, Ordering::Release);
            // Wakes a parked vCPU; a running one needs the kick.
            self.changed.notify_all();
            Self::kick_locked(&g);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match rx.recv_timeout(KICK_RETRY) {
                Ok(r) => return Ok(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(CtlError::Gone(self.id)),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline {
                        abandoned.store(true, Ordering::Release);
                        // It may have run just now: then its answer counts.
                        return match rx.try_recv() {
                            Ok(r) => Ok(r),
                            Err(_) => Err(CtlError::Timeout(self.id, timeout.as_millis())),
                        };
                    }
                    Self::kick_locked(&self.lock());
                }
            }
        }
    }

    /// Asks the vCPU to park at its next turn (see [`Self::wait_parked`]).
    pub fn request_pause(&self) {
        let mut g = self.lock();
        g.pause = true;
        self.pending.store(true, Ordering::Release);
        Self::kick_locked(&g);
    }

    /// Waits until the vCPU is parked, kicking it meanwhile.
    pub fn wait_parked(&self, timeout: Duration) -> Result<(), CtlError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if g.gone {
                return Err(CtlError::Gone(self.id));
            }
            if g.parked {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CtlError::Timeout(self.id, timeout.as_millis()));
            }
            Self::kick_locked(&g);
            g = self
                .changed
                .wait_timeout(g, KICK_RETRY)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut g = self.lock();
        g.pause = false;
        self.changed.notify_all();
    }

    /// Whether the vCPU is parked right now.
    #[cfg(test)]
    pub fn parked(&self) -> bool {
        self.lock().parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kicks go to test threads that never run a vCPU: give SIGRTMIN a no-op handler, as
    /// rhyve does, so they are harmless.
    fn harmless_kicks() {
        extern "C" fn nop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        vmm_sys_util::signal::register_signal_handler(SIGRTMIN(), nop).unwrap();
    }

    #[test]
    fn requests_to_a_vcpu_that_never_started_fail_at_once() {
        let c = VcpuCtl::new(3);
        assert_eq!(
            c.run_on(|_| 1, Duration::from_secs(5)),
            Err(CtlError::Gone(3))
        );
    }

    #[test]
    fn an_ended_vcpu_fails_pending_and_later_requests() {
        harmless_kicks();
        let c = std::sync::Arc::new(VcpuCtl::new(1));
        let attached = c.attach();
        // Park request never answered: the thread ends instead.
        c.request_pause();
        let c2 = c.clone();
        let waiter = std::thread::spawn(move || c2.wait_parked(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        drop(attached);
        assert_eq!(waiter.join().unwrap(), Err(CtlError::Gone(1)));
        assert_eq!(
            c.run_on(|_| 1, Duration::from_secs(1)),
            Err(CtlError::Gone(1))
        );
    }

    #[test]
    fn waiting_for_a_park_times_out() {
        // Attached to this test thread, which never polls.
        harmless_kicks();
        let c = VcpuCtl::new(0);
        let _a = c.attach();
        c.request_pause();
        assert_eq!(
            c.wait_parked(Duration::from_millis(30)),
            Err(CtlError::Timeout(0, 30))
        );
        c.resume();
        assert!(!c.parked());
    }
}
