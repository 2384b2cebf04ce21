//! seccomp-BPF filters, one per thread kind (Firecracker's model): a thread gets the system
//! calls its kind needs and nothing else, so a guest that takes over a device worker cannot
//! open files, create sockets or start processes.
//!
//! - Each thread [`devices::threads::spawn`] starts applies its kind's filter to itself
//!   before its body runs; the main thread applies its own once the machine runs
//!   ([`enter_main`]). Threads a filtered thread asks for at run time are created by the
//!   spawner thread, whose filter is the union of the others (a thread inherits its
//!   creator's filters and they only narrow).
//! - `-o sandbox.seccomp=on` (default): a forbidden call raises SIGSYS; the handler names the
//!   thread and the call on stderr and ends rhyve with exit status 4 (bhyve's "error").
//! - `log`: forbidden calls are allowed and logged by the kernel (audit, `dmesg`), to find
//!   what a new code path needs. `off`: no filters.
//!
//! The lists are what the code paths need on x86_64 Linux with glibc; the whole test suite
//! runs with them on.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use devices::threads::{ThreadKind, WorkerClass};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `sandbox.seccomp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Filters on, a forbidden call ends rhyve (exit 4).
    #[default]
    On,
    /// Filters on, forbidden calls are allowed and logged by the kernel.
    Log,
    /// No filters.
    Off,
}

impl SeccompMode {
    pub fn parse(v: &str) -> Option<SeccompMode> {
        match v {
            "on" | "true" | "yes" | "1" => Some(SeccompMode::On),
            "log" => Some(SeccompMode::Log),
            "off" | "false" | "no" | "0" => Some(SeccompMode::Off),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        }
    }
}

/// What a filter is for: the thread kinds, plus the main thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Profile {
    Main,
    Thread(ThreadKind),
}

const PROFILES: &[Profile] = &[
    Profile::Main,
    Profile::Thread(ThreadKind::Vcpu),
    Profile::Thread(ThreadKind::DeviceWorker(WorkerClass::Block)),
    Profile::Thread(ThreadKind::DeviceWorker(WorkerClass::Net)),
    Profile::Thread(ThreadKind::DeviceWorker(WorkerClass::Rng)),
    Profile::Thread(ThreadKind::DeviceWorker(WorkerClass::Vsock)),
    Profile::Thread(ThreadKind::Console),
    Profile::Thread(ThreadKind::Control),
    Profile::Thread(ThreadKind::Signal),
    Profile::Thread(ThreadKind::Api),
    Profile::Thread(ThreadKind::Spawner),
];

/// The filters this process uses, compiled once.
static PROGRAMS: OnceLock<BTreeMap<Profile, BpfProgram>> = OnceLock::new();

/// A rule set: syscall → conditions (an empty list allows every call of it).
type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn allow(rules: &mut Rules, calls: &[libc::c_long]) {
    for &nr in calls {
        // An unconditional entry wins over any conditional one.
        rules.insert(nr, Vec::new());
    }
}

/// Allows `nr` when every condition `(argument, comparison, value)` holds (32-bit
/// arguments), unless it is already allowed unconditionally.
fn allow_if(rules: &mut Rules, nr: libc::c_long, conds: &[(u8, SeccompCmpOp, u64)]) -> Result<()> {
    if rules.get(&nr).is_some_and(|r| r.is_empty()) {
        return Ok(());
    }
    let conds = conds
        .iter()
        .map(|(arg, op, value)| {
            SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *value)
                .map_err(|e| anyhow!("seccomp condition: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let rule = SeccompRule::new(conds).map_err(|e| anyhow!("seccomp rule: {e}"))?;
    rules.entry(nr).or_default().push(rule);
    Ok(())
}

/// Allows `nr` when argument `arg` masked with `mask` equals `value`.
fn allow_masked(rules: &mut Rules, nr: libc::c_long, arg: u8, mask: u64, value: u64) -> Result<()> {
    allow_if(rules, nr, &[(arg, SeccompCmpOp::MaskedEq(mask), value)])
}

/// Allows `nr` when every `(argument, value)` pair matches exactly.
fn allow_when(rules: &mut Rules, nr: libc::c_long, args: &[(u8, u64)]) -> Result<()> {
    let conds: Vec<_> = args
        .iter()
        .map(|&(arg, value)| (arg, SeccompCmpOp::Eq, value))
        .collect();
    allow_if(rules, nr, &conds)
}

/// The KVM ioctls' request type (the `_IOC_TYPE` byte).
const IOCTL_KVM: u64 = 0xAE;

/// Every KVM ioctl (on /dev/kvm, the VM and vCPU descriptors: nothing else of type 0xAE).
fn allow_kvm_ioctls(rules: &mut Rules) -> Result<()> {
    allow_masked(rules, libc::SYS_ioctl, 1, 0xFF00, IOCTL_KVM << 8)
}

/// The terminal (TCSETS on stdin, and the TCGETS tcsetattr adds: restoring it on a panic or
/// a forbidden call). Only that:
/// other 'T' ioctls would let a thread type into the user's shell (TIOCSTI), attach line
/// disciplines or reconfigure taps.
fn allow_terminal_restore(rules: &mut Rules) -> Result<()> {
    allow_when(rules, libc::SYS_ioctl, &[(0, 0), (1, libc::TCSETS)])?;
    // glibc's tcsetattr reads the settings back (TCGETS) to check what a pty kept.
    allow_when(rules, libc::SYS_ioctl, &[(0, 0), (1, libc::TCGETS)])
}

/// `_IOW(ty, nr, size)`.
const fn iow(ty: u64, nr: u64, size: u64) -> u64 {
    (1 << 30) | (size << 16) | (ty << 8) | nr
}
/// KVM_IRQ_LINE (struct kvm_irq_level, 8 bytes): an INTx pin or the SCI.
const KVM_IRQ_LINE: u64 = iow(IOCTL_KVM, 0x61, 8);
/// KVM_SIGNAL_MSI (struct kvm_msi, 32 bytes): an MSI without an irqfd.
const KVM_SIGNAL_MSI: u64 = iow(IOCTL_KVM, 0xa5, 32);

fn allow_exact(rules: &mut Rules, nr: libc::c_long, arg: u8, value: u64) -> Result<()> {
    allow_when(rules, nr, &[(arg, value)])
}

/// What raising an interrupt may take: KVM_IRQ_LINE for INTx and the SCI, KVM_SIGNAL_MSI
/// for a message without an irqfd (an irqfd is a write).
fn interrupts(rules: &mut Rules) -> Result<()> {
    allow_exact(rules, libc::SYS_ioctl, 1, KVM_IRQ_LINE)?;
    allow_exact(rules, libc::SYS_ioctl, 1, KVM_SIGNAL_MSI)
}

/// What every thread needs: memory, locks, time, signals, logging to stderr, its own exit,
/// the runtime's fault handling, and the calls of this module's SIGSYS handler (poll, write,
/// the terminal's restore, exit).
fn base(rules: &mut Rules, pid: u64) -> Result<()> {
    use libc::*;
    allow(
        rules,
        &[
            SYS_futex,
            SYS_restart_syscall,
            SYS_rt_sigreturn,
            SYS_rt_sigprocmask,
            SYS_sigaltstack,
            SYS_mmap,
            SYS_munmap,
            SYS_mprotect,
            SYS_madvise,
            SYS_mremap,
            SYS_brk,
            SYS_exit,
            SYS_exit_group,
            SYS_sched_yield,
            SYS_gettid,
            SYS_getpid,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_write,
            SYS_writev,
            SYS_close,
            SYS_getrandom,
            SYS_poll,
            // Rust's SIGSEGV/SIGBUS handler puts the default action back (a real fault
            // then dumps core instead of looking like a forbidden call).
            SYS_rt_sigaction,
        ],
    );
    allow_terminal_restore(rules)?;
    // glibc's malloc asks for the CPU count (of this thread) when it adds a ninth arena.
    allow_when(rules, SYS_sched_getaffinity, &[(0, 0)])?;
    // abort(3) after a failed assertion in the runtime raises SIGABRT at this process.
    allow_when(rules, SYS_tgkill, &[(0, pid), (2, SIGABRT as u64)])
}

/// Signals to threads of this process only (kicking a vCPU out of KVM_RUN).
fn allow_own_signals(rules: &mut Rules, pid: u64) -> Result<()> {
    allow_when(rules, libc::SYS_tgkill, &[(0, pid)])
}

fn event_loop(rules: &mut Rules) {
    use libc::*;
    allow(
        rules,
        &[
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_epoll_ctl,
            SYS_read,
            SYS_poll,
            SYS_ppoll,
        ],
    );
}

/// Serving clients on a listening socket (consoles, the control socket).
fn socket_server(rules: &mut Rules) {
    use libc::*;
    allow(
        rules,
        &[
            SYS_accept4,
            SYS_accept,
            SYS_recvfrom,
            SYS_recvmsg,
            SYS_sendto,
            SYS_sendmsg,
            SYS_shutdown,
            SYS_setsockopt,
            SYS_fcntl,
        ],
    );
}

/// Activating a virtio device (the driver's DRIVER_OK on a vCPU, or the resume of a device
/// restored from a snapshot): its worker's eventfds, epoll and rate-limit timer, copies of
/// the queues' kick eventfds, the tap's offloads.
fn device_activation(rules: &mut Rules) -> Result<()> {
    use libc::*;
    allow_exact(rules, SYS_ioctl, 1, TUNSETOFFLOAD)?;
    allow_exact(rules, SYS_fcntl, 1, F_DUPFD_CLOEXEC as u64)?;
    allow(
        rules,
        &[SYS_eventfd2, SYS_epoll_create1, SYS_timerfd_create],
    );
    Ok(())
}

/// Writing a snapshot (rhyvectl --checkpoint, the API's /snapshot/create): FILE and
/// FILE.kern created under temporary names, written, synced and renamed into place.
fn snapshot_files(rules: &mut Rules) {
    use libc::*;
    allow(
        rules,
        &[
            SYS_openat,
            SYS_write,
            SYS_pwrite64,
            // /proc/self/pagemap: which pages of a restored VM it wrote.
            SYS_pread64,
            SYS_ftruncate,
            SYS_fsync,
            SYS_fdatasync,
            SYS_lseek,
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            SYS_rename,
            SYS_renameat,
            SYS_renameat2,
            SYS_unlink,
            SYS_unlinkat,
            SYS_close,
        ],
    );
}

fn rules_for(profile: Profile) -> Result<Rules> {
    use libc::*;
    let pid = u64::from(std::process::id());
    let mut r = Rules::new();
    base(&mut r, pid)?;
    match profile {
        Profile::Thread(ThreadKind::Vcpu) => {
            event_loop(&mut r);
            allow_kvm_ioctls(&mut r)?;
            device_activation(&mut r)?;
            // A passed-through function's MSI-X table written: its vectors' eventfds.
            allow_exact(&mut r, SYS_ioctl, 1, vmmapi::vfio::DEVICE_SET_IRQS)?;
            // -p vcpu:hostcpu, for this thread only.
            allow_when(&mut r, SYS_sched_setaffinity, &[(0, 0)])?;
            allow(
                &mut r,
                &[
                    // The UEFI variable store (-l bootrom,ROM,VARSFILE) is written back.
                    SYS_pwrite64,
                    SYS_pread64,
                    SYS_msync,
                    SYS_fdatasync,
                    SYS_fsync,
                    // Console output to a socket client (send(2)).
                    SYS_sendto,
                ],
            );
        }
        Profile::Thread(ThreadKind::DeviceWorker(class)) => {
            event_loop(&mut r);
            interrupts(&mut r)?;
            // The rate-limit timer.
            allow(&mut r, &[SYS_timerfd_settime, SYS_timerfd_gettime]);
            match class {
                WorkerClass::Block => allow(
                    &mut r,
                    &[
                        SYS_preadv,
                        SYS_pwritev,
                        SYS_pread64,
                        SYS_pwrite64,
                        SYS_fdatasync,
                        SYS_fsync,
                        SYS_fallocate,
                    ],
                ),
                WorkerClass::Net => {
                    allow(&mut r, &[SYS_readv]);
                    // The guest's offloads, from the control queue.
                    allow_exact(&mut r, SYS_ioctl, 1, TUNSETOFFLOAD)?;
                }
                WorkerClass::Rng => {}
                WorkerClass::Vsock => {
                    // Host programs connecting to the listening socket, and the guest's
                    // connections out to `path_PORT`: unix sockets only.
                    socket_server(&mut r);
                    allow_when(&mut r, SYS_socket, &[(0, AF_UNIX as u64)])?;
                    allow(&mut r, &[SYS_connect]);
                    // std's set_nonblocking on an accepted stream.
                    allow_exact(&mut r, SYS_ioctl, 1, FIONBIO)?;
                }
            }
        }
        Profile::Thread(ThreadKind::Console) => {
            event_loop(&mut r);
            socket_server(&mut r);
        }
        Profile::Thread(ThreadKind::Control) => {
            event_loop(&mut r);
            socket_server(&mut r);
            // Kicks a vCPU out of KVM_RUN (pause, registers: the vCPU thread itself does
            // the KVM calls).
            allow_own_signals(&mut r, pid)?;
            snapshot_files(&mut r);
        }
        Profile::Thread(ThreadKind::Signal) => {
            allow(&mut r, &[SYS_rt_sigtimedwait, SYS_read]);
            // The power button raises the SCI.
            interrupts(&mut r)?;
        }
        Profile::Thread(ThreadKind::Api) => {
            event_loop(&mut r);
            socket_server(&mut r);
            // Pause and resume kick the vCPUs out of KVM_RUN.
            allow_own_signals(&mut r, pid)?;
            // PATCH /drives opens (and locks) the new backing file, as virtio-blk's setup
            // does, with its probe of in-place zeroing (an unnamed scratch file).
            allow(
                &mut r,
                &[
                    SYS_openat,
                    SYS_fstat,
                    SYS_newfstatat,
                    SYS_statx,
                    SYS_lseek,
                    SYS_flock,
                    SYS_fallocate,
                    SYS_ftruncate,
                ],
            );
            // PUT /snapshot/create.
            snapshot_files(&mut r);
            // PATCH /vm's resume of a VM loaded paused starts its restored devices.
            device_activation(&mut r)?;
        }
        Profile::Main => {
            event_loop(&mut r);
            // Teardown closes the VM, its vCPUs and irqfds; a device reset may set offloads.
            allow_kvm_ioctls(&mut r)?;
            allow_exact(&mut r, SYS_ioctl, 1, TUNSETOFFLOAD)?;
            // Teardown turns a passed-through function's MSI-X off.
            allow_exact(&mut r, SYS_ioctl, 1, vmmapi::vfio::DEVICE_SET_IRQS)?;
            // Kicks vCPUs (halt probes, the stop).
            allow_own_signals(&mut r, pid)?;
            allow(
                &mut r,
                &[
                    // Teardown: the runtime directory and its files, locks, write-back.
                    SYS_unlink,
                    SYS_unlinkat,
                    SYS_rename,
                    SYS_renameat,
                    SYS_renameat2,
                    SYS_ftruncate,
                    SYS_rmdir,
                    SYS_umount2,
                    SYS_openat,
                    SYS_fstat,
                    SYS_statx,
                    SYS_newfstatat,
                    SYS_getdents64,
                    SYS_lseek,
                    SYS_flock,
                    SYS_fcntl,
                    SYS_fsync,
                    SYS_fdatasync,
                    SYS_msync,
                    SYS_shutdown,
                    SYS_munlock,
                    SYS_munlockall,
                ],
            );
        }
        Profile::Thread(ThreadKind::Spawner) => {
            for &p in PROFILES {
                if p != Profile::Thread(ThreadKind::Spawner) {
                    merge(&mut r, rules_for(p)?);
                }
            }
            // Creating a thread, and what the new thread does before its own filter.
            allow(
                &mut r,
                &[
                    SYS_clone,
                    SYS_clone3,
                    SYS_set_robust_list,
                    SYS_rseq,
                    SYS_prctl,
                    SYS_seccomp,
                    SYS_sched_getaffinity,
                ],
            );
        }
    }
    Ok(r)
}

/// Adds `more` to `into` (the union of two filters).
fn merge(into: &mut Rules, more: Rules) {
    for (nr, rules) in more {
        match into.get_mut(&nr) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) if rules.is_empty() => existing.clear(),
            Some(existing) => existing.extend(rules),
            None => {
                into.insert(nr, rules);
            }
        }
    }
}

/// glibc changes the identity of every thread (each one makes the call itself, from a signal
/// handler): [`drop_privileges`] needs these in every filter, for `user`'s ids only.
fn identity_change(rules: &mut Rules, (uid, gid): (u32, u32)) -> Result<()> {
    allow_exact(rules, libc::SYS_setgroups, 0, 0)?;
    allow_exact(rules, libc::SYS_setresgid, 0, u64::from(gid))?;
    allow_exact(rules, libc::SYS_setresuid, 0, u64::from(uid))
}

fn compile(profile: Profile, mode: SeccompMode, user: Option<(u32, u32)>) -> Result<BpfProgram> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let mut rules = rules_for(profile)?;
    if let Some(user) = user {
        identity_change(&mut rules, user)?;
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| anyhow!("seccomp filter for {profile:?}: {e}"))?;
    filter
        .try_into()
        .map_err(|e| anyhow!("seccomp filter for {profile:?}: {e}"))
}

/// Whether this kernel can filter system calls (seccomp with filters and `action`).
fn kernel_supports(action: u32) -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer; it fails with EINVAL without CONFIG_SECCOMP.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } < 0 {
        return false;
    }
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 from the pointer, valid for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    r == 0
}

/// Prepares the filters for `mode` and has every thread started from now on apply its own;
/// with `user`, they allow [`drop_privileges`] to that identity. Call before any thread
/// exists; [`enter_main`] later filters the calling thread.
pub fn install(mode: SeccompMode, user: Option<(u32, u32)>) -> Result<()> {
    // A second machine build in one process (a Firecracker InstanceStart after a failed
    // one) keeps the filters of the first.
    if mode == SeccompMode::Off || PROGRAMS.get().is_some() {
        return Ok(());
    }
    let action = match mode {
        SeccompMode::Log => libc::SECCOMP_RET_LOG,
        _ => libc::SECCOMP_RET_TRAP,
    };
    if !kernel_supports(action) {
        bail!(
            "sandbox.seccomp={}: this kernel has no seccomp filters (or not this action); \
             run with -o sandbox.seccomp=off",
            mode.as_str()
        );
    }
    // glibc's free() in a thread's arena may shrink that arena's heap, and the first time it
    // does it reads /proc/sys/vm/overcommit_memory: an open no thread may make. A trim
    // threshold no heap reaches means heaps are not shrunk (memory is still freed for reuse).
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
    let mut by_kind = BTreeMap::new();
    for &p in PROFILES {
        by_kind.insert(p, compile(p, mode, user)?);
    }
    if PROGRAMS.set(by_kind).is_err() {
        bail!("the sandbox is already installed");
    }
    if mode == SeccompMode::On {
        install_sigsys_handler()?;
    }
    // The default hook's backtrace reads /proc/self/exe and the working directory, which no
    // filter allows: the message alone (`-o sandbox.seccomp=off` for a backtrace).
    std::panic::set_hook(Box::new(|info| {
        let name = std::thread::current().name().unwrap_or("main").to_string();
        let eol = if crate::terminal::is_raw() {
            "\r\n"
        } else {
            "\n"
        };
        crate::host_output::stderr(format!("rhyve: thread '{name}' {info}{eol}").as_bytes());
    }));
    devices::threads::set_policy(Box::new(|kind| apply(Profile::Thread(kind))))
        .map_err(|e| anyhow!("sandbox: {e}"))
}

/// Like Firecracker's jailer, once every device, tap, image and socket is open: `chroot`
/// into `root` (then `/` is its top), and become `user` (no supplementary groups, then the
/// group, then the user: no way back to root). Every thread changes with the process (glibc
/// has each one make the calls). What rhyve opens later by name then resolves inside the
/// new root with the new identity: nothing, but the runtime directory's removal at exit,
/// which is left to the next rhyve of that name or `rhyvectl --destroy`.
pub fn drop_privileges(user: Option<(u32, u32)>, root: Option<&std::path::Path>) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if let Some(root) = root {
        let c = std::ffi::CString::new(root.as_os_str().as_bytes())
            .map_err(|_| anyhow!("sandbox.chroot={}: a NUL in the path", root.display()))?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::chroot(c.as_ptr()) } != 0 {
            bail!(
                "sandbox.chroot={}: chroot: {}",
                root.display(),
                std::io::Error::last_os_error()
            );
        }
        std::env::set_current_dir("/")
            .map_err(|e| anyhow!("sandbox.chroot={}: chdir /: {e}", root.display()))?;
    }
    if let Some((uid, gid)) = user {
        let failed = |what: &str| {
            anyhow!(
                "sandbox.user={uid}:{gid}: {what}: {}",
                std::io::Error::last_os_error()
            )
        };
        // SAFETY: setgroups with an empty list reads no memory.
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return Err(failed("setgroups"));
        }
        // SAFETY: plain identity calls.
        if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
            return Err(failed("setresgid"));
        }
        // SAFETY: as above; after it the process has no capabilities left.
        if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
            return Err(failed("setresuid"));
        }
        let (mut r, mut e, mut s) = (0, 0, 0);
        // SAFETY: getresuid writes three ids.
        unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
        if (r, e, s) != (uid, uid, uid) {
            bail!("sandbox.user={uid}:{gid}: still running as {r}/{e}/{s}");
        }
    }
    Ok(())
}

/// Filters the calling thread, which started before the sandbox was installed (Firecracker's
/// API thread serves requests before the VM exists), as a thread of `kind`.
pub fn enter(kind: ThreadKind) -> Result<()> {
    apply(Profile::Thread(kind)).map_err(|e| anyhow!("sandbox: {} thread: {e}", kind.as_str()))
}

/// Filters the calling (main) thread, once the machine is set up.
pub fn enter_main() -> Result<()> {
    if PROGRAMS.get().is_none() {
        return Ok(());
    }
    apply(Profile::Main).map_err(|e| anyhow!("sandbox: main thread: {e}"))?;
    devices::threads::main_policy_applied();
    Ok(())
}

fn apply(profile: Profile) -> std::io::Result<()> {
    let Some(programs) = PROGRAMS.get() else {
        return Ok(());
    };
    let Some(program) = programs.get(&profile) else {
        return Err(std::io::Error::other(format!(
            "no seccomp filter for {profile:?}"
        )));
    };
    seccompiler::apply_filter(program)
        .map_err(|e| std::io::Error::other(format!("seccomp: {e}")))?;
    Ok(())
}

fn install_sigsys_handler() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| anyhow!("SIGSYS handler: {e}"))
}

/// Formats `n` in decimal into `buf`, returning the digits (no allocation: signal context).
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

/// A forbidden system call: name it and end the process (exit 4). Only async-signal-safe
/// calls (poll, write, the terminal's restore, _exit), all allowed in every filter.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo. For SIGSYS from seccomp (si_code at offset
    // 8 is SYS_SECCOMP, 1) its _sigsys member has the call address (8 bytes) at offset 16,
    // then the system call number (int) at offset 24.
    let (code, nr) = unsafe {
        let p = info.cast::<u8>();
        (
            p.add(8).cast::<i32>().read_unaligned(),
            p.add(24).cast::<i32>().read_unaligned(),
        )
    };
    let kind = devices::threads::current_kind().map_or("main", |k| k.as_str());
    let mut digits = [0u8; 10];
    let nr = decimal(nr as u32, &mut digits);
    crate::terminal::restore_from_signal_handler();
    let eol: &[u8] = b"\n";
    let parts: [&[u8]; 6] = if code == 1 {
        [
            b"rhyve: seccomp: a ",
            kind.as_bytes(),
            b" thread made a forbidden system call (",
            nr,
            b"); stopping",
            eol,
        ]
    } else {
        [
            b"rhyve: SIGSYS from outside; stopping",
            eol,
            b"",
            b"",
            b"",
            b"",
        ]
    };
    for p in parts {
        // A stderr nobody reads must not hold the exit: write only what it takes now.
        let mut pfd = libc::pollfd {
            fd: 2,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd; then a write of a valid buffer to stderr.
        unsafe {
            if libc::poll(&mut pfd, 1, 0) == 1 {
                libc::write(2, p.as_ptr().cast(), p.len());
            }
        }
    }
    // SAFETY: _exit is async-signal-safe; exit status 4 is bhyve's "error".
    unsafe { libc::_exit(4) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_the_spawner_allows_what_the_others_do() {
        let spawner = rules_for(Profile::Thread(ThreadKind::Spawner)).unwrap();
        for &p in PROFILES {
            compile(p, SeccompMode::On, None).unwrap();
            compile(p, SeccompMode::On, Some((65534, 65534))).unwrap();
            for (nr, rules) in rules_for(p).unwrap() {
                let s = spawner.get(&nr).unwrap_or_else(|| panic!("{p:?}: {nr}"));
                assert!(s.is_empty() || !rules.is_empty(), "{p:?}: {nr} conditional");
            }
        }
    }

    #[test]
    fn workers_cannot_open_files_or_make_sockets() {
        for class in [WorkerClass::Block, WorkerClass::Net, WorkerClass::Rng] {
            let r = rules_for(Profile::Thread(ThreadKind::DeviceWorker(class))).unwrap();
            for nr in [
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_execve,
                libc::SYS_clone,
            ] {
                assert!(!r.contains_key(&nr), "{class:?} allows {nr}");
            }
        }
        // virtio-vsock makes unix sockets only, and opens no files.
        let vsock = rules_for(Profile::Thread(ThreadKind::DeviceWorker(
            WorkerClass::Vsock,
        )))
        .unwrap();
        assert!(vsock.get(&libc::SYS_socket).is_some_and(|r| !r.is_empty()));
        for nr in [libc::SYS_openat, libc::SYS_execve, libc::SYS_clone] {
            assert!(!vsock.contains_key(&nr), "vsock allows {nr}");
        }
        let vcpu = rules_for(Profile::Thread(ThreadKind::Vcpu)).unwrap();
        assert!(!vcpu.contains_key(&libc::SYS_openat));
        assert!(!vcpu.contains_key(&libc::SYS_clone));
    }

    #[test]
    fn decimal_digits() {
        let mut b = [0u8; 10];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(435, &mut b), b"435");
        assert_eq!(decimal(u32::MAX, &mut b), b"4294967295");
    }
}
