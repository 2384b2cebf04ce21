//! The control socket: `RUNDIR/NAME/control.sock` (mode 0600), served by its own thread while
//! the VM runs; what rhyvectl talks to. One JSON object per line each way; the protocol is
//! documented in docs/control-protocol.md (keep the two in step, and bump
//! [`PROTOCOL_VERSION`] on incompatible changes).
//!
//! Every client is untrusted input: a malformed or oversized request gets an error response,
//! a client that vanishes mid-request only loses its answer, and nothing a client does can
//! stop the server or the VM except the documented `reset`/`poweroff` requests.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use devices::threads::ThreadKind;
use devices::{Bus, StopReason};
use kvm_bindings::{kvm_debugregs, kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use serde_json::{json, Map, Value};

use crate::runtime::{Action, ActionError, VmController};
use crate::vcpu::VcpuStats;
use crate::vcpu_ctl::VcpuCtl;

pub use vmmapi::control::{Request, PROTOCOL_VERSION, SOCKET_NAME};
/// Longest request line accepted; longer ones are refused and the connection closed.
const MAX_LINE: usize = 64 * 1024;
/// Clients served at once; more are told so and closed.
const MAX_CLIENTS: usize = 16;
/// Each request line must arrive whole within this long of the previous answer (or of the
/// connection): a silent client, or one trickling a byte at a time, gives its slot back.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a register read/write or NMI waits for the vCPU thread.
const VCPU_TIMEOUT: Duration = Duration::from_secs(2);

/// Every request's wire name, for `hello` and errors.
fn request_names() -> Vec<&'static str> {
    Request::ALL.iter().map(|r| r.name()).collect()
}

/// What the server may look at and act on.
pub struct VmHandles {
    pub name: String,
    pub memory: u64,
    pub started: Instant,
    pub vcpus: Vec<Arc<VcpuCtl>>,
    pub stats: Vec<Arc<VcpuStats>>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// The VM's state and the actions on it (pause, resume, stops).
    pub controller: Arc<VmController>,
}

/// The handles plus the server's own state.
struct Shared {
    vm: VmHandles,
    clients: AtomicUsize,
    /// Every client connection (a clone of its socket) and thread, so that stopping the
    /// server can cut them off and wait for them: a client thread holds the VM's handles,
    /// and the VM object is only released once the last of those is gone.
    connections: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
}

/// What to do once the response is on its way.
#[derive(Debug, PartialEq, Eq)]
enum After {
    Nothing,
    Stop(StopReason),
}

/// The running server; dropping it removes the socket and stops accepting.
pub struct ControlServer {
    path: PathBuf,
    listener: Arc<UnixListener>,
    closing: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl ControlServer {
    /// Binds `dir/control.sock` and serves it on a new thread.
    pub fn start(dir: &Path, vm: VmHandles) -> Result<Self> {
        let path = dir.join(SOCKET_NAME);
        let listener = Arc::new(bind_private(&path)?);
        let closing = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            vm,
            clients: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let thread = devices::threads::spawn(ThreadKind::Control, "control", {
            let listener = listener.clone();
            let closing = closing.clone();
            let shared = shared.clone();
            move || accept_loop(&listener, &closing, &shared)
        })
        .context("control socket thread")?;
        log::info!("control socket {}", path.display());
        Ok(Self {
            path,
            listener,
            closing,
            thread: Some(thread),
            shared,
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
        let _ = std::fs::remove_file(&self.path);
        // SAFETY: shutdown(2) on the listener we own (the Arc keeps the fd open); it wakes
        // the accept(2) blocked on it.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Clients still connected: end their reads, then wait for their threads (one in a
        // vCPU request gives up within VCPU_TIMEOUT).
        let connections = match self.shared.connections.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        for (stream, _) in &connections {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for (_, thread) in connections {
            let _ = thread.join();
        }
    }
}

/// A listening Unix socket at `path` that only the owner can connect to: bound, chmod-ed to
/// 0600, and only then listening (before listen(2), connect(2) is refused).
fn bind_private(path: &Path) -> Result<UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    // A leftover from a crashed rhyve of this name (we hold the VM's lock now).
    let _ = std::fs::remove_file(path);
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(anyhow!(
            "control socket path {} is too long for a Unix socket (max {} bytes): use a shorter RHYVE_RUNDIR",
            path.display(),
            addr.sun_path.len() - 1
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("control socket");
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: a valid sockaddr_un of the given length.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("bind {}", path.display()));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    // SAFETY: listen(2) on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), MAX_CLIENTS as i32) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("listen {}", path.display()));
    }
    Ok(UnixListener::from(fd))
}

fn accept_loop(listener: &UnixListener, closing: &AtomicBool, shared: &Arc<Shared>) {
    loop {
        let conn = listener.accept();
        if closing.load(Ordering::Acquire) {
            return;
        }
        let mut stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                log::debug!("control socket: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            let _ = write_response(&mut stream, &error("too many clients"));
            continue;
        }
        let Ok(handle) = stream.try_clone() else {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            continue;
        };
        // Gives the client's slot back when dropped: when the thread ends, or with the
        // closure if the thread cannot be started.
        let slot = ClientSlot(shared.clone());
        let spawned = devices::threads::spawn(ThreadKind::Control, "control client", move || {
            // A bug a client's request hits ends that client, not the VM (which a panic
            // anywhere else in the VMM would stop).
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                serve_client(stream, &slot.0)
            }));
            if served.is_err() {
                log::error!("control socket: a request failed inside rhyve; its client is dropped");
            }
        });
        match spawned {
            Ok(thread) => {
                let mut connections = match shared.connections.lock() {
                    Ok(c) => c,
                    Err(p) => p.into_inner(),
                };
                // Finished clients' entries go; at most MAX_CLIENTS remain.
                connections.retain(|(_, t)| !t.is_finished());
                connections.push((handle, thread));
            }
            Err(e) => log::warn!("control socket: cannot start a client thread: {e}"),
        }
    }
}

struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

fn write_response(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    stream.flush()
}

/// What [`next_line`] read.
enum Line {
    /// A request (its newline included, if it had one).
    Request(Vec<u8>),
    /// Longer than [`MAX_LINE`].
    TooLong,
    /// End of file, an error or the request deadline.
    End,
}

/// Reads the next request line within [`REQUEST_TIMEOUT`]; bytes after it stay in `pending`.
fn next_line(stream: &mut UnixStream, pending: &mut Vec<u8>) -> Line {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            return if line.len() > MAX_LINE {
                Line::TooLong
            } else {
                Line::Request(line)
            };
        }
        if pending.len() > MAX_LINE {
            return Line::TooLong;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Line::End;
        }
        match stream.read(&mut chunk) {
            // A last request without its newline still counts.
            Ok(0) if !pending.is_empty() => return Line::Request(std::mem::take(pending)),
            Ok(0) => return Line::End,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Line::End,
        }
    }
}

/// Serves one client: a request per line until EOF, an error or a request that does not
/// arrive in time.
fn serve_client(mut stream: UnixStream, shared: &Shared) {
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut pending = Vec::new();
    loop {
        let buf = match next_line(&mut stream, &mut pending) {
            Line::Request(buf) => buf,
            Line::TooLong => {
                let _ = write_response(
                    &mut out,
                    &error(&format!("request longer than {MAX_LINE} bytes")),
                );
                return;
            }
            Line::End => return,
        };
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let (response, after) = handle(text, shared);
        // The answer goes out before a stop takes effect, so a client sees it even though
        // the process is about to exit; a client that is gone just misses it.
        let sent = write_response(&mut out, &response);
        if let After::Stop(reason) = after {
            log::info!("control socket: {reason:?} requested");
            shared.vm.controller.request_stop(reason);
        }
        if sent.is_err() {
            return;
        }
    }
}

fn error(msg: &str) -> Value {
    json!({ "version": PROTOCOL_VERSION, "ok": false, "error": msg })
}

fn ok(mut fields: Map<String, Value>) -> Value {
    fields.insert("version".into(), json!(PROTOCOL_VERSION));
    fields.insert("ok".into(), json!(true));
    Value::Object(fields)
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Answers one request line.
fn handle(line: &str, shared: &Shared) -> (Value, After) {
    match dispatch(line, shared) {
        Ok((fields, after)) => (ok(fields), after),
        Err(msg) => (error(&msg), After::Nothing),
    }
}

type Reply = std::result::Result<(Map<String, Value>, After), String>;

fn dispatch(line: &str, shared: &Shared) -> Reply {
    let req: Value = serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))?;
    let Value::Object(req) = req else {
        return Err("malformed request: expected a JSON object".into());
    };
    if let Some(v) = req.get("version") {
        if v.as_u64() != Some(PROTOCOL_VERSION) {
            return Err(format!(
                "unsupported protocol version {v}: this rhyve speaks version {PROTOCOL_VERSION}"
            ));
        }
    }
    let name = match req.get("request") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err("malformed request: \"request\" must be a string".into()),
        None => return Err("malformed request: no \"request\" field".into()),
    };
    let Some(request) = Request::parse(name) else {
        return Err(format!(
            "unknown request {name:?} (known: {})",
            request_names().join(", ")
        ));
    };
    let vm = &shared.vm;
    let done = |fields: Value| Ok((obj(fields), After::Nothing));
    match request {
        Request::Hello => done(json!({
            "server": format!("rhyve {}", env!("CARGO_PKG_VERSION")),
            "requests": request_names(),
        })),
        Request::Info => done(info(shared)),
        Request::Stats => done(stats(vm)),
        Request::GetRegs => {
            let cpu = cpu_arg(&req, vm)?;
            let (r, d) = vm.vcpus[cpu]
                .run_on(|v| Ok((v.registers()?, v.debug_regs()?)), VCPU_TIMEOUT)
                .map_err(|e| e.to_string())?
                .map_err(|e: vmmapi::Error| e.to_string())?;
            let mut m = obj(regs_json(&r.regs, &r.sregs, &d));
            m.insert("cpu".into(), json!(cpu));
            Ok((m, After::Nothing))
        }
        Request::SetRegs => {
            let cpu = cpu_arg(&req, vm)?;
            set_regs(&req, cpu, shared)
        }
        Request::Pause | Request::Resume => {
            let action = if request == Request::Pause {
                Action::Pause
            } else {
                Action::Resume
            };
            let (state, _) = vm.controller.act(&action).map_err(|e| e.to_string())?;
            done(json!({ "state": state.as_str() }))
        }
        Request::Nmi => {
            let cpu = cpu_arg(&req, vm)?;
            vm.vcpus[cpu]
                .run_on(|v| v.nmi(), VCPU_TIMEOUT)
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            done(json!({ "cpu": cpu }))
        }
        Request::Checkpoint => checkpoint(&req, vm),
        Request::Reset | Request::PowerOff => {
            let reason = if request == Request::Reset {
                StopReason::Reset
            } else {
                StopReason::PowerOff
            };
            let (_, stop) =
                vm.controller
                    .act(&Action::Stop(reason.clone()))
                    .map_err(|e| match e {
                        ActionError::Stopping => "the VM is already stopping".to_string(),
                        e => e.to_string(),
                    })?;
            Ok((
                obj(json!({ "exit_status": reason.exit_code() })),
                After::Stop(stop.unwrap_or(reason)),
            ))
        }
    }
}

/// `{"request":"checkpoint","file":PATH,"suspend":BOOL}`: writes the snapshot PATH (+
/// PATH.kern; PATH as rhyve sees it: absolute, and inside its chroot if it has one); with
/// `suspend`, the VM stops once the answer is out (bhyve exits 0).
fn checkpoint(req: &Map<String, Value>, vm: &VmHandles) -> Reply {
    let file = match req.get("file") {
        Some(Value::String(s)) if Path::new(s).is_absolute() => PathBuf::from(s),
        Some(Value::String(s)) => {
            return Err(format!("\"file\" must be an absolute path, not {s:?}"))
        }
        Some(v) => return Err(format!("\"file\" must be a string, not {v}")),
        None => return Err("checkpoint needs a \"file\"".into()),
    };
    let suspend = match req.get("suspend") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(format!("\"suspend\" must be true or false, not {v}")),
    };
    let report = vm
        .controller
        .checkpoint(
            &crate::snapshot::SnapshotFiles::bhyve(&file),
            suspend,
            Vec::new(),
        )
        .map_err(|e| e.to_string())?;
    let fields = obj(json!({
        "file": file.display().to_string(),
        "memory_bytes": report.memory_bytes,
        "state_bytes": report.state_bytes,
        "ms": report.duration.as_secs_f64() * 1e3,
        "suspended": suspend,
    }));
    let after = if suspend {
        After::Stop(StopReason::Suspended)
    } else {
        After::Nothing
    };
    Ok((fields, after))
}

/// The `cpu` field: a vCPU index of this VM (default 0).
fn cpu_arg(req: &Map<String, Value>, vm: &VmHandles) -> std::result::Result<usize, String> {
    let cpu = match req.get("cpu") {
        None => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("\"cpu\" must be a vCPU number, not {v}"))?,
    };
    usize::try_from(cpu)
        .ok()
        .filter(|&c| c < vm.vcpus.len())
        .ok_or_else(|| {
            format!(
                "no vCPU {cpu}: the VM has {} (0..{})",
                vm.vcpus.len(),
                vm.vcpus.len().saturating_sub(1)
            )
        })
}

fn state(shared: &Shared) -> &'static str {
    shared.vm.controller.state().as_str()
}

fn info(shared: &Shared) -> Value {
    let vm = &shared.vm;
    json!({
        "name": vm.name,
        "pid": std::process::id(),
        "state": state(shared),
        "vcpus": vm.vcpus.len(),
        "memory": vm.memory,
        "uptime_ms": vm.started.elapsed().as_millis() as u64,
    })
}

/// One vCPU's nonzero per-device counts.
fn vcpu_devices(s: &VcpuStats, vm: &VmHandles) -> Vec<Value> {
    let mut out = Vec::new();
    for (bus_name, bus, counts) in [
        ("pio", &vm.pio, &s.pio_devices),
        ("mmio", &vm.mmio, &s.mmio_devices),
    ] {
        for ((name, base, _), n) in bus.stats().into_iter().zip(counts.iter()) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                out.push(json!({ "bus": bus_name, "name": name, "base": base, "exits": n }));
            }
        }
    }
    out
}

fn stats(vm: &VmHandles) -> Value {
    let vcpus: Vec<Value> = vm
        .stats
        .iter()
        .enumerate()
        .map(|(cpu, s)| {
            let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let (pio, mmio, intr, other) = (l(&s.pio), l(&s.mmio), l(&s.interrupted), l(&s.other));
            json!({
                "cpu": cpu,
                "exits": {
                    "total": pio + mmio + intr + other,
                    "pio": pio,
                    "mmio": mmio,
                    "interrupted": intr,
                    "other": other,
                },
                "run_ns": l(&s.run_ns),
                "devices": vcpu_devices(s, vm),
            })
        })
        .collect();
    let mut devices = Vec::new();
    for (bus_name, bus) in [("pio", &vm.pio), ("mmio", &vm.mmio)] {
        for (name, base, accesses) in bus.stats() {
            devices
                .push(json!({ "bus": bus_name, "name": name, "base": base, "accesses": accesses }));
        }
    }
    let pci: Vec<Value> = vm
        .controller
        .devices()
        .reports()
        .iter()
        .map(|d| d.to_json())
        .collect();
    let threads: Vec<Value> = devices::threads::running()
        .into_iter()
        .map(|t| json!({ "tid": t.tid, "kind": t.kind.as_str(), "name": t.name }))
        .collect();
    json!({
        "uptime_ms": vm.started.elapsed().as_millis() as u64,
        "vcpus": vcpus,
        "devices": devices,
        "pci": pci,
        "threads": threads,
        "unhandled": { "pio": vm.pio.unhandled(), "mmio": vm.mmio.unhandled() },
    })
}

fn set_regs(req: &Map<String, Value>, cpu: usize, shared: &Shared) -> Reply {
    let regs = match req.get("regs") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("\"regs\" must be an object of register: value".into()),
    };
    let desc = match req.get("desc") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err("\"desc\" must be an object of segment: {base, limit, access}".into())
        }
    };
    if regs.is_empty() && desc.is_empty() {
        return Err("set-regs needs \"regs\" or \"desc\"".into());
    }
    // Validate everything against a scratch copy first: a bad name changes nothing.
    apply_changes(
        &regs,
        &desc,
        &mut kvm_regs::default(),
        &mut kvm_sregs::default(),
        &mut kvm_debugregs::default(),
    )?;
    // Inside while_paused, so a resume cannot slip in between the check and the write.
    let vcpu = &shared.vm.vcpus[cpu];
    let result = shared
        .vm
        .controller
        .while_paused(|| set_regs_on(vcpu, regs, desc))
        .map_err(|e| e.to_string())??;
    let mut m = obj(result);
    m.insert("cpu".into(), json!(cpu));
    Ok((m, After::Nothing))
}

/// Applies the changes on the (paused) vCPU's thread; the registers after.
fn set_regs_on(
    vcpu: &VcpuCtl,
    regs: Map<String, Value>,
    desc: Map<String, Value>,
) -> std::result::Result<Value, String> {
    vcpu.run_on(
        move |v| -> std::result::Result<Value, String> {
            let err = |e: vmmapi::Error| e.to_string();
            let mut r = v.regs().map_err(err)?;
            let mut s = v.sregs().map_err(err)?;
            let mut d = v.debug_regs().map_err(err)?;
            let (gp, sys, dbg) = apply_changes(&regs, &desc, &mut r, &mut s, &mut d)?;
            if sys {
                v.set_sregs(&s).map_err(err)?;
            }
            if gp {
                v.set_regs(&r).map_err(err)?;
            }
            if dbg {
                v.set_debug_regs(&d).map_err(err)?;
            }
            let after = v.registers().map_err(err)?;
            let d = v.debug_regs().map_err(err)?;
            Ok(regs_json(&after.regs, &after.sregs, &d))
        },
        VCPU_TIMEOUT,
    )
    .map_err(|e| e.to_string())?
}

// ---- registers as JSON ----

const GPRS: &[&str] = &[
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "rflags",
];
const CONTROL: &[&str] = &["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"];
const SEGMENTS: &[&str] = &["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr"];
const DEBUG: &[&str] = &["dr0", "dr1", "dr2", "dr3", "dr6", "dr7"];
const TABLES: &[&str] = &["gdtr", "idtr"];

fn gpr_mut<'a>(r: &'a mut kvm_regs, name: &str) -> Option<&'a mut u64> {
    Some(match name {
        "rax" => &mut r.rax,
        "rbx" => &mut r.rbx,
        "rcx" => &mut r.rcx,
        "rdx" => &mut r.rdx,
        "rsi" => &mut r.rsi,
        "rdi" => &mut r.rdi,
        "rbp" => &mut r.rbp,
        "rsp" => &mut r.rsp,
        "r8" => &mut r.r8,
        "r9" => &mut r.r9,
        "r10" => &mut r.r10,
        "r11" => &mut r.r11,
        "r12" => &mut r.r12,
        "r13" => &mut r.r13,
        "r14" => &mut r.r14,
        "r15" => &mut r.r15,
        "rip" => &mut r.rip,
        "rflags" => &mut r.rflags,
        _ => return None,
    })
}

fn control_mut<'a>(s: &'a mut kvm_sregs, name: &str) -> Option<&'a mut u64> {
    Some(match name {
        "cr0" => &mut s.cr0,
        "cr2" => &mut s.cr2,
        "cr3" => &mut s.cr3,
        "cr4" => &mut s.cr4,
        "cr8" => &mut s.cr8,
        "efer" => &mut s.efer,
        "apic_base" => &mut s.apic_base,
        _ => return None,
    })
}

fn debug_mut<'a>(d: &'a mut kvm_debugregs, name: &str) -> Option<&'a mut u64> {
    Some(match name {
        "dr0" => &mut d.db[0],
        "dr1" => &mut d.db[1],
        "dr2" => &mut d.db[2],
        "dr3" => &mut d.db[3],
        "dr6" => &mut d.dr6,
        "dr7" => &mut d.dr7,
        _ => return None,
    })
}

fn segment_mut<'a>(s: &'a mut kvm_sregs, name: &str) -> Option<&'a mut kvm_segment> {
    Some(match name {
        "cs" => &mut s.cs,
        "ds" => &mut s.ds,
        "es" => &mut s.es,
        "fs" => &mut s.fs,
        "gs" => &mut s.gs,
        "ss" => &mut s.ss,
        "tr" => &mut s.tr,
        "ldtr" => &mut s.ldt,
        _ => return None,
    })
}

fn table_mut<'a>(s: &'a mut kvm_sregs, name: &str) -> Option<&'a mut kvm_dtable> {
    Some(match name {
        "gdtr" => &mut s.gdt,
        "idtr" => &mut s.idt,
        _ => return None,
    })
}

/// A segment's attributes in the VMX access-rights layout bhyve(ctl) shows: type, S, DPL, P,
/// AVL, L, D/B, G, and bit 16 "unusable".
pub fn segment_access(s: &kvm_segment) -> u32 {
    u32::from(s.type_ & 0xf)
        | u32::from(s.s & 1) << 4
        | u32::from(s.dpl & 3) << 5
        | u32::from(s.present & 1) << 7
        | u32::from(s.avl & 1) << 12
        | u32::from(s.l & 1) << 13
        | u32::from(s.db & 1) << 14
        | u32::from(s.g & 1) << 15
        | u32::from(s.unusable & 1) << 16
}

fn set_segment_access(s: &mut kvm_segment, a: u32) {
    s.type_ = (a & 0xf) as u8;
    s.s = (a >> 4 & 1) as u8;
    s.dpl = (a >> 5 & 3) as u8;
    s.present = (a >> 7 & 1) as u8;
    s.avl = (a >> 12 & 1) as u8;
    s.l = (a >> 13 & 1) as u8;
    s.db = (a >> 14 & 1) as u8;
    s.g = (a >> 15 & 1) as u8;
    s.unusable = (a >> 16 & 1) as u8;
}

/// The register sets as the protocol's `regs`/`control`/`segments`/`debug` objects.
pub fn regs_json(r: &kvm_regs, s: &kvm_sregs, d: &kvm_debugregs) -> Value {
    let (mut r, mut s, mut d) = (*r, *s, *d);
    let mut gp = Map::new();
    for &n in GPRS {
        gp.insert(n.into(), json!(*gpr_mut(&mut r, n).unwrap_or(&mut 0)));
    }
    let mut ctl = Map::new();
    for &n in CONTROL {
        ctl.insert(n.into(), json!(*control_mut(&mut s, n).unwrap_or(&mut 0)));
    }
    let mut segs = Map::new();
    for &n in SEGMENTS {
        if let Some(seg) = segment_mut(&mut s, n) {
            segs.insert(
                n.into(),
                json!({
                    "selector": seg.selector,
                    "base": seg.base,
                    "limit": seg.limit,
                    "access": segment_access(seg),
                }),
            );
        }
    }
    for &n in TABLES {
        if let Some(t) = table_mut(&mut s, n) {
            segs.insert(n.into(), json!({ "base": t.base, "limit": t.limit }));
        }
    }
    let mut dbg = Map::new();
    for &n in DEBUG {
        dbg.insert(n.into(), json!(*debug_mut(&mut d, n).unwrap_or(&mut 0)));
    }
    json!({ "regs": gp, "control": ctl, "segments": segs, "debug": dbg })
}

/// A register value: a JSON number, or a string in decimal or 0x-hex.
fn reg_value(name: &str, v: &Value) -> std::result::Result<u64, String> {
    let bad = || format!("{name}: {v} is not a 64-bit unsigned value");
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16).map_err(|_| bad()),
                None => s.parse().map_err(|_| bad()),
            }
        }
        _ => Err(bad()),
    }
}

/// Applies `regs` (name → value; segment names set the selector) and `desc` (segment or
/// table → {base, limit, access}); returns which of the three sets changed.
fn apply_changes(
    regs: &Map<String, Value>,
    desc: &Map<String, Value>,
    r: &mut kvm_regs,
    s: &mut kvm_sregs,
    d: &mut kvm_debugregs,
) -> std::result::Result<(bool, bool, bool), String> {
    let (mut gp, mut sys, mut dbg) = (false, false, false);
    for (name, v) in regs {
        let val = reg_value(name, v)?;
        if let Some(slot) = gpr_mut(r, name) {
            *slot = val;
            gp = true;
        } else if let Some(slot) = control_mut(s, name) {
            *slot = val;
            sys = true;
        } else if let Some(slot) = debug_mut(d, name) {
            *slot = val;
            dbg = true;
        } else if let Some(seg) = segment_mut(s, name) {
            seg.selector =
                u16::try_from(val).map_err(|_| format!("{name}: selector {val:#x} > 0xffff"))?;
            sys = true;
        } else {
            return Err(format!(
                "unknown register {name:?} (known: {}, {}, {}, {})",
                GPRS.join(" "),
                CONTROL.join(" "),
                DEBUG.join(" "),
                SEGMENTS.join(" ")
            ));
        }
    }
    for (name, v) in desc {
        let Value::Object(d) = v else {
            return Err(format!("desc {name}: expected {{base, limit, access}}"));
        };
        let field = |k: &str| -> std::result::Result<Option<u64>, String> {
            d.get(k)
                .map(|x| reg_value(&format!("{name}.{k}"), x))
                .transpose()
        };
        if let Some(k) = d
            .keys()
            .find(|k| !["base", "limit", "access"].contains(&k.as_str()))
        {
            return Err(format!("desc {name}: unknown field {k:?}"));
        }
        let (base, limit, access) = (field("base")?, field("limit")?, field("access")?);
        let limit32 = limit
            .map(|l| u32::try_from(l).map_err(|_| format!("desc {name}: limit {l:#x} > 32 bits")))
            .transpose()?;
        if let Some(seg) = segment_mut(s, name) {
            if let Some(b) = base {
                seg.base = b;
            }
            if let Some(l) = limit32 {
                seg.limit = l;
            }
            if let Some(a) = access {
                let a = u32::try_from(a)
                    .ok()
                    .filter(|a| a >> 17 == 0)
                    .ok_or_else(|| format!("desc {name}: access {a:#x} has bits above 16"))?;
                set_segment_access(seg, a);
            }
        } else if let Some(t) = table_mut(s, name) {
            if access.is_some() {
                return Err(format!(
                    "desc {name}: a descriptor table has no access rights"
                ));
            }
            if let Some(b) = base {
                t.base = b;
            }
            if let Some(l) = limit32 {
                t.limit =
                    u16::try_from(l).map_err(|_| format!("desc {name}: limit {l:#x} > 0xffff"))?;
            }
        } else {
            return Err(format!(
                "desc: unknown segment {name:?} (known: {} {})",
                SEGMENTS.join(" "),
                TABLES.join(" ")
            ));
        }
        sys = true;
    }
    Ok((gp, sys, dbg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(ncpus: u32) -> Shared {
        let vcpus: Vec<_> = (0..ncpus).map(|i| Arc::new(VcpuCtl::new(i))).collect();
        let controller = VmController::new(
            vcpus.clone(),
            Arc::default(),
            Arc::new(devices::VmControl::new()),
        );
        controller.started();
        Shared {
            vm: VmHandles {
                name: "t".into(),
                memory: 64 << 20,
                started: Instant::now(),
                vcpus,
                stats: (0..ncpus).map(|_| Arc::default()).collect(),
                pio: Arc::new(Bus::new()),
                mmio: Arc::new(Bus::new()),
                controller: Arc::new(controller),
            },
            clients: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
        }
    }

    fn err_of(line: &str, s: &Shared) -> String {
        let (v, after) = handle(line, s);
        assert_eq!(after, After::Nothing);
        assert_eq!(v["ok"], json!(false), "{v}");
        assert_eq!(v["version"], json!(PROTOCOL_VERSION));
        v["error"].as_str().unwrap().to_string()
    }

    #[test]
    fn malformed_requests_get_errors() {
        let s = shared(1);
        assert!(err_of("{", &s).starts_with("malformed request"));
        assert!(err_of("[1,2]", &s).contains("JSON object"));
        assert!(err_of("{\"cpu\":0}", &s).contains("no \"request\""));
        assert!(err_of("{\"request\":7}", &s).contains("must be a string"));
        assert!(err_of("{\"request\":\"fly\"}", &s).contains("unknown request"));
        assert!(err_of("{\"version\":2,\"request\":\"info\"}", &s).contains("version 2"));
        assert!(err_of("{\"request\":\"get-regs\",\"cpu\":1}", &s).contains("no vCPU 1"));
        assert!(err_of("{\"request\":\"get-regs\",\"cpu\":-1}", &s).contains("vCPU number"));
        assert!(err_of("{\"request\":\"nmi\",\"cpu\":\"x\"}", &s).contains("vCPU number"));
        // The vCPU thread never started here: the request fails instead of hanging.
        assert!(err_of("{\"request\":\"get-regs\"}", &s).contains("not running"));
    }

    #[test]
    fn set_regs_only_while_paused_and_names_are_checked_first() {
        let s = shared(1);
        let running = err_of(r#"{"request":"set-regs","regs":{"rip":4096}}"#, &s);
        assert!(running.contains("paused"), "{running}");
        let bad = err_of(r#"{"request":"set-regs","regs":{"rpi":4096}}"#, &s);
        assert!(bad.contains("unknown register \"rpi\""), "{bad}");
        let neg = err_of(r#"{"request":"set-regs","regs":{"rax":-1}}"#, &s);
        assert!(neg.contains("not a 64-bit"), "{neg}");
        assert!(err_of(r#"{"request":"set-regs"}"#, &s).contains("needs"));
    }

    #[test]
    fn hello_info_stats_and_stop_requests() {
        let s = shared(2);
        let (v, _) = handle(r#"{"request":"hello"}"#, &s);
        assert_eq!(v["ok"], json!(true));
        assert_eq!(v["version"], json!(1));
        let (v, _) = handle(r#"{"request":"info","version":1}"#, &s);
        assert_eq!(v["vcpus"], json!(2));
        assert_eq!(v["state"], json!("running"));
        assert_eq!(v["pid"], json!(std::process::id()));
        let (v, _) = handle(r#"{"request":"stats"}"#, &s);
        assert_eq!(v["vcpus"].as_array().unwrap().len(), 2);
        assert_eq!(v["vcpus"][1]["exits"]["total"], json!(0));
        let (v, after) = handle(r#"{"request":"poweroff"}"#, &s);
        assert_eq!(v["exit_status"], json!(1));
        assert_eq!(after, After::Stop(StopReason::PowerOff));
        let (_, after) = handle(r#"{"request":"reset"}"#, &s);
        assert_eq!(after, After::Stop(StopReason::Reset));
    }

    #[test]
    fn register_changes_and_access_rights_round_trip() {
        let mut r = kvm_regs::default();
        let mut sr = kvm_sregs::default();
        let mut d = kvm_debugregs::default();
        let regs = obj(json!({"rip": "0x1000", "rax": 5, "cr3": 4096, "cs": 16, "dr7": 0x400}));
        let desc = obj(
            json!({"cs": {"base": 0, "limit": 0xffffffffu32, "access": 0xa09b},
                              "gdtr": {"base": "0x5000", "limit": 39}}),
        );
        assert_eq!(
            apply_changes(&regs, &desc, &mut r, &mut sr, &mut d),
            Ok((true, true, true))
        );
        assert_eq!(d.dr7, 0x400);
        assert_eq!(
            (r.rip, r.rax, sr.cr3, sr.cs.selector),
            (0x1000, 5, 4096, 16)
        );
        assert_eq!(
            (sr.cs.l, sr.cs.present, sr.cs.type_, sr.cs.g),
            (1, 1, 0xb, 1)
        );
        assert_eq!(segment_access(&sr.cs), 0xa09b);
        assert_eq!((sr.gdt.base, sr.gdt.limit), (0x5000, 39));
        let v = regs_json(&r, &sr, &d);
        assert_eq!(v["debug"]["dr7"], json!(0x400));
        assert_eq!(v["regs"]["rip"], json!(0x1000));
        assert_eq!(v["segments"]["cs"]["access"], json!(0xa09b));
        assert_eq!(v["control"]["cr3"], json!(4096));
        let bad = obj(json!({"gdtr": {"access": 1}}));
        assert!(apply_changes(&Map::new(), &bad, &mut r, &mut sr, &mut d).is_err());
        let big = obj(json!({"ds": 0x10000}));
        assert!(apply_changes(&big, &Map::new(), &mut r, &mut sr, &mut d).is_err());
    }
}
