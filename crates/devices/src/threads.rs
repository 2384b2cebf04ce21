//! Every thread rhyve starts goes through [`spawn`]: named, given its [`ThreadKind`] and a
//! small stack, and listed in a registry while it runs. It is the one place per-kind policy
//! is applied ([`set_policy`]: the seccomp filters differ for a vCPU, each device's worker and
//! the control server), and `rhyvectl --get-stats` lists [`running`], which a test compares
//! with /proc/PID/task.
//!
//! Once a policy is set, threads that other restricted threads ask for are created by one
//! spawner thread. A thread inherits the seccomp filters of the thread that created it, and
//! filters only ever narrow: a worker created by a vCPU thread could do no more than the
//! vCPU filter allows. The spawner's own policy is the union of the others, so each new
//! thread ends up with exactly its kind's. The main thread, unrestricted until the end of
//! setup, creates its threads itself.

use std::io;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

/// Which device a worker thread serves (what it may need from the kernel differs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkerClass {
    /// virtio-blk: reads and writes the disk image.
    Block,
    /// virtio-net: reads and writes the tap.
    Net,
    /// virtio-rnd: the host's random numbers.
    Rng,
    /// virtio-vsock: the guest's connections on unix sockets.
    Vsock,
}

impl WorkerClass {
    /// The worker thread's name.
    pub fn thread_name(self) -> &'static str {
        match self {
            WorkerClass::Block => "virtio-blk",
            WorkerClass::Net => "virtio-net",
            WorkerClass::Rng => "virtio-rnd",
            WorkerClass::Vsock => "virtio-vsock",
        }
    }
}

/// What a thread does (what it may need from the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// Runs one vCPU: KVM_RUN and the device emulation of its exits.
    Vcpu,
    /// A device's worker: virtqueues, disk and tap I/O.
    DeviceWorker(WorkerClass),
    /// Feeds a console's host input to a UART.
    Console,
    /// The control socket and its clients.
    Control,
    /// Turns termination signals into ACPI power-button presses.
    Signal,
    /// Firecracker's API socket (fcapi): the requests after the VM started.
    Api,
    /// Creates the other threads once a policy is set (see the module's documentation).
    Spawner,
}

impl ThreadKind {
    /// The kind's name in stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceWorker(_) => "device",
            ThreadKind::Console => "console",
            ThreadKind::Control => "control",
            ThreadKind::Signal => "signal",
            ThreadKind::Api => "api",
            ThreadKind::Spawner => "spawner",
        }
    }

    /// Whether this is a device worker of any class.
    pub fn is_device_worker(self) -> bool {
        matches!(self, ThreadKind::DeviceWorker(_))
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

/// Applied by each new thread to itself, before it runs anything else; a thread whose
/// policy fails never runs its body and its [`spawn`] fails.
pub type Policy = Box<dyn Fn(ThreadKind) -> io::Result<()> + Send + Sync>;

static RUNNING: Mutex<Vec<ThreadInfo>> = Mutex::new(Vec::new());
static POLICY: OnceLock<Policy> = OnceLock::new();

/// Told when a thread (other than a device worker, which handles its own) panicked.
pub type PanicHandler = Box<dyn Fn(ThreadKind, &str) + Send + Sync>;
static ON_PANIC: OnceLock<PanicHandler> = OnceLock::new();

type Job = Box<dyn FnOnce() + Send>;
static SPAWNER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);
/// The main thread applied its own policy ([`main_policy_applied`]): from then on even its
/// spawns go through the spawner.
static MAIN_RESTRICTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

std::thread_local! {
    /// The kind of the current thread, if [`spawn`] started it.
    static KIND: std::cell::Cell<Option<ThreadKind>> = const { std::cell::Cell::new(None) };
}

/// Whether the current thread was started by [`spawn`] as `kind` (for a panic hook).
pub fn current_is(kind: ThreadKind) -> bool {
    current_kind() == Some(kind)
}

/// The kind of the current thread (None: the main thread or one [`spawn`] did not start).
/// Safe in a signal handler: a const-initialised thread local without destructor.
pub fn current_kind() -> Option<ThreadKind> {
    KIND.with(|k| k.get())
}

/// Threads started through [`spawn`] that have not ended.
pub fn running() -> Vec<ThreadInfo> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Sets the policy every thread started from now on applies to itself, and starts the
/// spawner that creates them. Once per process.
pub fn set_policy(policy: Policy) -> io::Result<()> {
    POLICY
        .set(policy)
        .map_err(|_| io::Error::other("a thread policy is already set"))?;
    let (tx, rx) = mpsc::channel::<Job>();
    spawn_here(ThreadKind::Spawner, "spawner".to_string(), move || {
        for job in rx {
            job();
        }
    })?;
    *SPAWNER.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    Ok(())
}

/// Tells [`spawn`] that the main thread now runs under its own policy. Until then the main
/// thread creates threads itself: they get their own filter and nothing stacked under it
/// (one filter less to run on each of a vCPU's KVM_RUN calls).
pub fn main_policy_applied() {
    MAIN_RESTRICTED.store(true, std::sync::atomic::Ordering::Release);
}

/// Sets what happens when a thread's body panics (once per process): the VMM stops the VM
/// with an error rather than run on with a dead vCPU or control thread. The thread still
/// ends with the panic (its join returns the error).
pub fn set_panic_handler(handler: PanicHandler) -> io::Result<()> {
    ON_PANIC
        .set(handler)
        .map_err(|_| io::Error::other("a panic handler is already set"))
}

/// `RHYVE_TEST_FAULT=panic:KIND` or `syscall:KIND` (KIND as [`ThreadKind::as_str`]): the
/// first thread of that kind panics, or makes a system call no seccomp filter allows, as
/// soon as its policy is applied. How the tests show what a thread's failure does; unset,
/// this costs one environment lookup per process.
fn inject_fault(kind: ThreadKind) {
    static FAULT: OnceLock<Option<(String, String)>> = OnceLock::new();
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var("RHYVE_TEST_FAULT").ok()?;
        let (what, who) = v.split_once(':')?;
        Some((what.to_string(), who.to_string()))
    });
    let Some((what, who)) = fault else { return };
    if who != kind.as_str() || DONE.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    match what.as_str() {
        "panic" => panic!("injected fault (RHYVE_TEST_FAULT)"),
        // personality(0xffffffff) only queries the execution domain; no filter allows it.
        // SAFETY: a syscall without pointers.
        "syscall" => unsafe {
            libc::syscall(libc::SYS_personality, 0xffff_ffffu64);
        },
        _ => {}
    }
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
    let spawner = SPAWNER.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // The unrestricted main thread (setup) and the spawner create threads themselves.
    let unrestricted_main =
        current_kind().is_none() && !MAIN_RESTRICTED.load(std::sync::atomic::Ordering::Acquire);
    match spawner {
        Some(spawner) if !current_is(ThreadKind::Spawner) && !unrestricted_main => {
            let (tx, rx) = mpsc::channel();
            let job: Job = Box::new(move || {
                let _ = tx.send(spawn_here(kind, name, f));
            });
            spawner
                .send(job)
                .map_err(|_| io::Error::other("the thread spawner has ended"))?;
            rx.recv()
                .map_err(|_| io::Error::other("the thread spawner has ended"))?
        }
        _ => spawn_here(kind, name, f),
    }
}

/// Creates the thread on the calling thread; it applies the policy before `f`.
fn spawn_here<F, T>(kind: ThreadKind, name: String, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
    let handle = std::thread::Builder::new()
        .stack_size(crate::THREAD_STACK_SIZE)
        .name(name.clone())
        .spawn(move || {
            let applied = POLICY.get().map_or(Ok(()), |p| p(kind));
            let failed = applied.is_err();
            let _ = ready_tx.send(applied);
            if failed {
                // Without the hook's report: spawn_here reports the error.
                std::panic::resume_unwind(Box::new(()));
            }
            let tid = gettid();
            KIND.with(|k| k.set(Some(kind)));
            RUNNING
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ThreadInfo {
                    tid,
                    kind,
                    name: name.clone(),
                });
            let _registered = Registered(tid);
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                inject_fault(kind);
                f()
            })) {
                Ok(v) => v,
                Err(panic) => {
                    if let Some(h) = ON_PANIC.get() {
                        h(kind, &name);
                    }
                    std::panic::resume_unwind(panic)
                }
            }
        })?;
    let ready = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the new thread ended at once")));
    if let Err(e) = ready {
        let _ = handle.join();
        return Err(io::Error::new(
            e.kind(),
            format!("{} thread policy: {e}", kind.as_str()),
        ));
    }
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_listed_while_they_run() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = spawn(
            ThreadKind::DeviceWorker(WorkerClass::Rng),
            "test worker",
            move || {
                let me = gettid();
                assert!(current_is(ThreadKind::DeviceWorker(WorkerClass::Rng)));
                let _ = rx.recv();
                me
            },
        )
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
        assert!(!current_is(ThreadKind::DeviceWorker(WorkerClass::Rng)));
        assert_eq!(kind, ThreadKind::DeviceWorker(WorkerClass::Rng));
        assert!(std::path::Path::new(&format!("/proc/self/task/{tid}")).exists());
        tx.send(()).unwrap();
        assert_eq!(t.join().unwrap(), tid);
        assert!(listed().is_none());
    }
}
