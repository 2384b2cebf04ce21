//! Every thread rhyve starts goes through [`spawn`]: named, given its [`ThreadKind`] and a
//! small stack, and listed in a registry while it runs. One place to apply per-kind policy
//! (seccomp filters differ for a vCPU, a device worker and the control server), and a way to
//! show that no thread escapes it: `rhyvectl --get-stats` lists [`running`], which a test
//! compares with /proc/PID/task.

use std::io;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// What a thread does (what it may need from the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Runs one vCPU: KVM_RUN and the device emulation of its exits.
    Vcpu,
    /// A device's worker: virtqueues, disk and tap I/O.
    DeviceWorker,
    /// Feeds a console's host input to a UART.
    Console,
    /// The control socket and its clients.
    Control,
    /// Turns termination signals into ACPI power-button presses.
    Signal,
}

impl ThreadKind {
    /// The kind's name in stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceWorker => "device",
            ThreadKind::Console => "console",
            ThreadKind::Control => "control",
            ThreadKind::Signal => "signal",
        }
    }
}

/// One running thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadInfo {
    /// The kernel's thread id (a /proc/PID/task entry).
    pub tid: i32,
    pub kind: ThreadKind,
    pub name: String,
}

static RUNNING: Mutex<Vec<ThreadInfo>> = Mutex::new(Vec::new());

std::thread_local! {
    /// The kind of the current thread, if [`spawn`] started it.
    static KIND: std::cell::Cell<Option<ThreadKind>> = const { std::cell::Cell::new(None) };
}

/// Whether the current thread was started by [`spawn`] as `kind` (for a panic hook).
pub fn current_is(kind: ThreadKind) -> bool {
    KIND.with(|k| k.get() == Some(kind))
}

/// Threads started through [`spawn`] that have not ended.
pub fn running() -> Vec<ThreadInfo> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Takes the thread out of the registry when it ends, however it ends.
struct Registered(i32);

impl Drop for Registered {
    fn drop(&mut self) {
        let mut r = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|t| t.tid != self.0);
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid(2) has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Starts `f` on a thread of `kind` called `name` (at most 15 bytes reach the kernel).
pub fn spawn<F, T>(kind: ThreadKind, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    std::thread::Builder::new()
        .stack_size(crate::THREAD_STACK_SIZE)
        .name(name.clone())
        .spawn(move || {
            let tid = gettid();
            KIND.with(|k| k.set(Some(kind)));
            RUNNING
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ThreadInfo { tid, kind, name });
            let _registered = Registered(tid);
            f()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_listed_while_they_run() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = spawn(ThreadKind::DeviceWorker, "test worker", move || {
            let me = gettid();
            assert!(current_is(ThreadKind::DeviceWorker));
            let _ = rx.recv();
            me
        })
        .unwrap();
        let listed = || {
            running()
                .into_iter()
                .find(|t| t.name == "test worker")
                .map(|t| (t.kind, t.tid))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while listed().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (kind, tid) = listed().expect("the thread is listed");
        assert!(!current_is(ThreadKind::DeviceWorker));
        assert_eq!(kind, ThreadKind::DeviceWorker);
        assert!(std::path::Path::new(&format!("/proc/self/task/{tid}")).exists());
        tx.send(()).unwrap();
        assert_eq!(t.join().unwrap(), tid);
        assert!(listed().is_none());
    }
}
