//! A virtio device's worker thread and how the VMM steers it: pause (the worker parks where
//! it touches no guest memory and the VMM waits until it has), resume, stop; and what happens
//! when it panics: the device is marked NEEDS_RESET through its transport, the panic is
//! logged, and the VM keeps running (the driver may reset the device and start it again).
//!
//! The worker waits in epoll on its kicks (and tap) plus one control eventfd, registered
//! under [`CTL_TOKEN`]; when that fires it calls [`WorkerCtl::on_event`], which parks while
//! a pause is asked for and says whether to stop.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::VirtioInterrupt;
use crate::lifecycle::LifecycleError;
use crate::threads::{self, ThreadKind, WorkerClass};

/// The epoll token of the control eventfd.
pub(crate) const CTL_TOKEN: u64 = u64::MAX;
/// The epoll token of a worker's rate-limit timer.
pub(crate) const TIMER_TOKEN: u64 = u64::MAX - 1;
/// How long a pause waits for the worker to park (it finishes the batch in hand first).
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct CtlState {
    want: Want,
    /// The worker is parked in [`WorkerCtl::on_event`].
    parked: bool,
}

/// The worker's side of the steering, shared with its [`Worker`] handle.
pub(crate) struct WorkerCtl {
    event: EventFd,
    state: Mutex<CtlState>,
    changed: Condvar,
    /// The worker's body panicked (it has ended).
    failed: AtomicBool,
}

impl WorkerCtl {
    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The descriptor to register in the worker's epoll under [`CTL_TOKEN`].
    pub(crate) fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Puts the control eventfd in the worker's `epoll` under [`CTL_TOKEN`].
    pub(crate) fn watch(&self, epoll: &Epoll) -> io::Result<()> {
        epoll.ctl(
            ControlOperation::Add,
            self.fd(),
            EpollEvent::new(EventSet::IN, CTL_TOKEN),
        )
    }

    /// Called by the worker when the control eventfd is readable: parks while paused;
    /// false when the worker must return.
    pub(crate) fn on_event(&self) -> bool {
        let _ = self.event.read();
        let mut s = self.lock();
        loop {
            match s.want {
                Want::Run => return true,
                Want::Stop => return false,
                Want::Pause => {
                    if !s.parked {
                        s.parked = true;
                        self.changed.notify_all();
                    }
                    s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                    if s.want != Want::Pause {
                        s.parked = false;
                    }
                }
            }
        }
    }

    fn ask(&self, want: Want) {
        self.lock().want = want;
        self.changed.notify_all();
        if let Err(e) = self.event.write(1) {
            log::error!("virtio worker: cannot signal the worker: {e}");
        }
    }
}

/// Puts each queue's kick eventfd in `epoll`, its token the queue's index.
pub(crate) fn watch_kicks(epoll: &Epoll, kicks: &[EventFd]) -> io::Result<()> {
    for (i, k) in kicks.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            k.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    Ok(())
}

/// A timer for a worker's rate limits, in `epoll` under [`TIMER_TOKEN`].
pub(crate) fn rate_timer(epoll: &Epoll) -> io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    epoll.ctl(
        ControlOperation::Add,
        timer.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TIMER_TOKEN),
    )?;
    Ok(timer)
}

/// Clears `timer`'s expiry after epoll reported it, unless it was armed again meanwhile
/// (re-arming cleared it, and a read would then block until the new deadline).
pub(crate) fn clear_expired(timer: &mut TimerFd) {
    if !timer.is_armed().unwrap_or(true) {
        let _ = timer.wait();
    }
}

/// Arms `timer` for `after`, unless it already fires sooner (one timer serves several
/// limits: the earliest deadline wins, the others re-arm when it fires).
pub(crate) fn arm_at_most(timer: &mut TimerFd, after: Duration) {
    // SAFETY: itimerspec is plain data; timerfd_gettime fills it or fails.
    let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: a timerfd we own and a valid itimerspec.
    if unsafe { libc::timerfd_gettime(timer.as_raw_fd(), &mut spec) } == 0 {
        let v = spec.it_value;
        let left = Duration::new(
            v.tv_sec.max(0) as u64,
            v.tv_nsec.clamp(0, 999_999_999) as u32,
        );
        if !left.is_zero() && left <= after {
            return;
        }
    }
    if let Err(e) = timer.reset(after, None) {
        log::error!("virtio worker: timerfd: {e}");
    }
}

/// A running worker thread.
pub(crate) struct Worker {
    ctl: Arc<WorkerCtl>,
    handle: Option<JoinHandle<()>>,
    name: String,
}

impl Worker {
    /// Starts `body` on a device-worker thread of `class`. `body` must register
    /// [`WorkerCtl::fd`] in its epoll and call [`WorkerCtl::on_event`] when it fires. If the
    /// body panics, `interrupt` is told the device failed.
    pub(crate) fn spawn<F>(
        class: WorkerClass,
        interrupt: Arc<dyn VirtioInterrupt>,
        body: F,
    ) -> io::Result<Worker>
    where
        F: FnOnce(&WorkerCtl) + Send + 'static,
    {
        let ctl = Arc::new(WorkerCtl {
            event: EventFd::new(EFD_NONBLOCK)?,
            state: Mutex::new(CtlState {
                want: Want::Run,
                parked: false,
            }),
            changed: Condvar::new(),
            failed: AtomicBool::new(false),
        });
        let thread_ctl = ctl.clone();
        let name = class.thread_name();
        let handle = threads::spawn(ThreadKind::DeviceWorker(class), name, move || {
            // The body owns only its device's queues and backend: after a panic they are
            // dropped and nothing else is left half-updated, so unwinding past them is sound.
            if catch_unwind(AssertUnwindSafe(|| body(&thread_ctl))).is_err() {
                thread_ctl.failed.store(true, Ordering::Release);
                // Wake a pause waiting for a park that will never come.
                thread_ctl.changed.notify_all();
                log::error!("{name}: worker panicked; the device needs a reset");
                interrupt.device_failed();
            }
        })?;
        Ok(Worker {
            ctl,
            handle: Some(handle),
            name: name.to_string(),
        })
    }

    /// Whether the worker panicked.
    pub(crate) fn failed(&self) -> bool {
        self.ctl.failed.load(Ordering::Acquire)
    }

    /// Asks the worker to park and waits until it has (or has ended).
    pub(crate) fn pause(&self) -> Result<(), LifecycleError> {
        self.ctl.ask(Want::Pause);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut s = self.ctl.lock();
        while !s.parked && !self.failed() && !self.finished() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(s);
                self.resume();
                return Err(LifecycleError::PauseTimeout(PAUSE_TIMEOUT));
            }
            // Short waits: a worker that ends without parking does not notify.
            let wait = left.min(Duration::from_millis(20));
            s = self
                .ctl
                .changed
                .wait_timeout(s, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    pub(crate) fn resume(&self) {
        self.ctl.ask(Want::Run);
    }

    fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stops the thread and waits for it (the batch in hand completes first).
    pub(crate) fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(h) = self.handle.take() {
            self.ctl.ask(Want::Stop);
            if h.join().is_err() {
                log::error!("{}: worker thread ended abnormally", self.name);
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::CountingInterrupt;
    use super::*;
    use std::sync::atomic::AtomicU64;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    /// A worker that counts kicks of one eventfd, and panics on a kick while `boom` is set.
    fn counting_worker(
        kick: &EventFd,
        irq: Arc<CountingInterrupt>,
        boom: Arc<AtomicBool>,
    ) -> (Worker, Arc<AtomicU64>) {
        let count = Arc::new(AtomicU64::new(0));
        let kick = kick.try_clone().unwrap();
        let c = count.clone();
        let w = Worker::spawn(WorkerClass::Rng, irq, move |ctl| {
            let epoll = Epoll::new().unwrap();
            epoll
                .ctl(
                    ControlOperation::Add,
                    kick.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, 0),
                )
                .unwrap();
            epoll
                .ctl(
                    ControlOperation::Add,
                    ctl.fd(),
                    EpollEvent::new(EventSet::IN, CTL_TOKEN),
                )
                .unwrap();
            let mut events = [EpollEvent::default(); 2];
            loop {
                let n = epoll.wait(-1, &mut events).unwrap_or(0);
                for ev in &events[..n] {
                    if ev.data() == CTL_TOKEN {
                        if !ctl.on_event() {
                            return;
                        }
                    } else {
                        let _ = kick.read();
                        assert!(!boom.load(Ordering::SeqCst), "injected worker failure");
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
        .unwrap();
        (w, count)
    }

    #[test]
    fn a_paused_worker_does_nothing_until_resumed() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let (w, count) = counting_worker(&kick, irq, Arc::default());
        kick.write(1).unwrap();
        assert!(super::super::testutil::wait_for(|| count
            .load(Ordering::SeqCst)
            == 1));
        w.pause().unwrap();
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // Pausing twice is fine; so is stopping while paused (below).
        w.pause().unwrap();
        w.resume();
        assert!(super::super::testutil::wait_for(|| count
            .load(Ordering::SeqCst)
            == 2));
        w.pause().unwrap();
        w.stop();
    }

    #[test]
    fn a_panicking_worker_reports_the_failure_and_pause_does_not_hang() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let boom = Arc::new(AtomicBool::new(true));
        let (w, count) = counting_worker(&kick, irq.clone(), boom);
        kick.write(1).unwrap();
        assert!(super::super::testutil::wait_for(|| w.failed()));
        assert!(super::super::testutil::wait_for(|| irq
            .failed
            .load(Ordering::SeqCst)
            == 1));
        assert_eq!(count.load(Ordering::SeqCst), 0);
        let t = Instant::now();
        w.pause().unwrap();
        assert!(t.elapsed() < PAUSE_TIMEOUT);
        w.stop();
    }
}
