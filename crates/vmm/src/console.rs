//! Host ends of the COM ports: stdio, a device path, a new pty, a unix socket or a TCP
//! socket (bhyve's `tcp=ip:port`), each with a reader thread feeding the UART.
//!
//! Guest output is written from the vCPU thread, one byte per transmit-register write, so
//! every backend but stdio writes without blocking: bytes nobody can take right now (a full
//! pty buffer, no client on a socket) are dropped and counted, reported at exit.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::threads::ThreadKind;
use devices::uart::Uart;

use crate::config::ConsoleBackend;

/// Writes guest output to the host and logs when the first byte arrives (boot timing).
pub struct ConsoleOut {
    sink: Box<dyn Write + Send>,
    port: &'static str,
    start: Instant,
    seen_first: bool,
}

impl ConsoleOut {
    /// Output for COM `port` going to `sink`.
    pub fn new(port: &'static str, sink: Box<dyn Write + Send>, start: Instant) -> Self {
        Self {
            sink,
            port,
            start,
            seen_first: false,
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.seen_first && !buf.is_empty() {
            self.seen_first = true;
            log::info!(
                "first {} byte at {:.3} ms",
                self.port,
                self.start.elapsed().as_secs_f64() * 1e3
            );
        }
        self.sink.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.flush()
    }
}

/// Files to remove and drop counters to report when the VM stops.
struct Registry {
    files: Vec<PathBuf>,
    dropped: Vec<(&'static str, Arc<AtomicU64>)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    files: Vec::new(),
    dropped: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes the files the backends created (pty path files, unix sockets) and logs how many
/// guest output bytes each port dropped. Called once the vCPUs have stopped.
pub fn cleanup() {
    let mut r = registry();
    for f in r.files.drain(..) {
        let _ = std::fs::remove_file(f);
    }
    for (port, n) in r.dropped.drain(..) {
        let n = n.load(Ordering::Relaxed);
        if n > 0 {
            log::info!("{port}: {n} guest output bytes dropped (nobody reading)");
        }
    }
}

fn drop_counter(port: &'static str) -> Arc<AtomicU64> {
    let c = Arc::new(AtomicU64::new(0));
    registry().dropped.push((port, c.clone()));
    c
}

/// Writes to a non-blocking fd; what does not fit now is dropped and counted.
struct NonBlockingOut {
    file: File,
    dropped: Arc<AtomicU64>,
}

impl Write for NonBlockingOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.file.write(buf) {
            Ok(n) => {
                self.dropped
                    .fetch_add((buf.len() - n) as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return self.write(buf),
            Err(_) => {
                // EAGAIN (buffer full), EIO (pty hung up), ...: the guest must not stall.
                self.dropped.fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Blocking reads from a non-blocking fd: waits in poll(2) while there is nothing to read.
struct PollIn(File);

impl Read for PollIn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut p = libc::pollfd {
                        fd: self.0.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, -1) };
                }
                other => return other,
            }
        }
    }
}

/// Feeds bytes from `input` into `uart` until EOF, waiting while the guest's FIFO is full
/// (backpressure instead of an unbounded buffer).
fn feed(name: &str, input: &mut dyn Read, uart: &Mutex<Uart>) {
    let mut buf = [0u8; 64];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("{name}: console input stopped: {e}");
                return;
            }
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = uart
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .receive(pending);
            pending = &pending[taken..];
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Spawns a thread feeding `input` into `uart` until EOF.
pub fn spawn_reader(
    name: &str,
    mut input: Box<dyn Read + Send>,
    uart: Arc<Mutex<Uart>>,
) -> std::io::Result<()> {
    let label = name.to_string();
    devices::threads::spawn(ThreadKind::Console, format!("{name} input"), move || {
        feed(&label, &mut *input, &uart)
    })?;
    Ok(())
}

/// The connected client of a socket backend: (connection number, its socket).
type Client = Arc<Mutex<Option<(u64, OwnedFd)>>>;

/// Guest output to the socket client, if any, with send(MSG_DONTWAIT): never blocks.
struct SocketOut {
    client: Client,
    dropped: Arc<AtomicU64>,
}

impl Write for SocketOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let sent = match client.as_ref() {
            None => 0,
            Some((_, fd)) => {
                // SAFETY: send(2) on an open socket from a valid buffer.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                usize::try_from(n).unwrap_or(0)
            }
        };
        self.dropped
            .fetch_add((buf.len() - sent) as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<(Box<dyn Read + Send>, OwnedFd)> {
        Ok(match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                let fd = OwnedFd::from(s.try_clone()?);
                (Box::new(s), fd)
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                log::info!("console client {peer} connected");
                let _ = s.set_nodelay(true);
                let fd = OwnedFd::from(s.try_clone()?);
                (Box::new(s), fd)
            }
        })
    }
}

/// Accepts one client at a time (a second one is closed at once); its input feeds the UART,
/// and guest output goes to it until it disconnects.
fn spawn_listener(
    name: &'static str,
    listener: Listener,
    client: Client,
    uart: Arc<Mutex<Uart>>,
) -> std::io::Result<()> {
    devices::threads::spawn(ThreadKind::Console, format!("{name} listen"), move || {
        let mut generation = 0u64;
        loop {
            let (mut input, fd) = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("{name}: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let mut slot = client.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                log::warn!("{name}: a client is already connected; closing the new one");
                continue;
            }
            generation += 1;
            *slot = Some((generation, fd));
            drop(slot);
            log::info!("{name}: client connected");
            let (client, uart, id) = (client.clone(), uart.clone(), generation);
            let spawned =
                devices::threads::spawn(ThreadKind::Console, format!("{name} client"), move || {
                    feed(name, &mut *input, &uart);
                    let mut slot = client.lock().unwrap_or_else(|e| e.into_inner());
                    if slot.as_ref().map(|(g, _)| *g) == Some(id) {
                        *slot = None;
                    }
                    log::info!("{name}: client disconnected");
                });
            if let Err(e) = spawned {
                log::warn!("{name}: client thread: {e}");
            }
        }
    })?;
    Ok(())
}

/// The host end of one COM port: where guest output goes, and how input is started once
/// the UART exists.
pub struct HostEnd {
    pub out: Box<dyn Write + Send>,
    pub input: HostInput,
}

/// The input side of a [`HostEnd`], started with [`HostInput::start`].
pub struct HostInput(Input);

enum Input {
    Reader(Box<dyn Read + Send>),
    Listener(Listener, Client),
    /// The reader and the pty's own slave fd (held open so the master never sees a hangup
    /// and output is buffered until someone attaches).
    Pty(Box<dyn Read + Send>, OwnedFd),
}

impl HostInput {
    /// Starts feeding host input into `uart`.
    pub fn start(self, name: &'static str, uart: Arc<Mutex<Uart>>) -> std::io::Result<()> {
        match self.0 {
            Input::Reader(r) => spawn_reader(name, r, uart),
            Input::Pty(r, slave) => {
                // The slave fd lives as long as the process (the reader never returns on a
                // pty whose slave is open).
                std::mem::forget(slave);
                spawn_reader(name, r, uart)
            }
            Input::Listener(l, c) => spawn_listener(name, l, c, uart),
        }
    }
}

/// Opens the host end of COM port `name` (e.g. "com2"). `rundir` is the VM's runtime
/// directory, where a pty's path is written as `NAME.pty`.
pub fn open(
    name: &'static str,
    backend: &ConsoleBackend,
    rundir: &Path,
) -> std::io::Result<HostEnd> {
    match backend {
        ConsoleBackend::Stdio => Ok(HostEnd {
            out: Box::new(crate::host_output::stdout()),
            input: HostInput(Input::Reader(Box::new(std::io::stdin()))),
        }),
        ConsoleBackend::Path(p) => {
            let (r, w) = open_path(p)?;
            Ok(HostEnd {
                out: Box::new(NonBlockingOut {
                    file: w,
                    dropped: drop_counter(name),
                }),
                input: HostInput(Input::Reader(Box::new(PollIn(r)))),
            })
        }
        ConsoleBackend::Pty => {
            let (master, slave, path) = open_pty()?;
            let file = rundir.join(format!("{name}.pty"));
            std::fs::write(&file, format!("{}\n", path.display()))?;
            registry().files.push(file);
            crate::host_output::stderr(format!("rhyve: {name}: {}\n", path.display()).as_bytes());
            let w = master.try_clone()?;
            Ok(HostEnd {
                out: Box::new(NonBlockingOut {
                    file: w,
                    dropped: drop_counter(name),
                }),
                input: HostInput(Input::Pty(Box::new(PollIn(master)), slave)),
            })
        }
        ConsoleBackend::Unix(p) => {
            let l = bind_unix(p)?;
            registry().files.push(p.clone());
            Ok(socket_end(name, Listener::Unix(l)))
        }
        ConsoleBackend::Tcp(addr) => {
            let l = TcpListener::bind(addr)?;
            if addr.port() == 0 {
                let line = format!("rhyve: {name}: tcp={}\n", l.local_addr()?);
                crate::host_output::stderr(line.as_bytes());
            }
            Ok(socket_end(name, Listener::Tcp(l)))
        }
    }
}

fn socket_end(name: &'static str, l: Listener) -> HostEnd {
    let client: Client = Arc::new(Mutex::new(None));
    HostEnd {
        out: Box::new(SocketOut {
            client: client.clone(),
            dropped: drop_counter(name),
        }),
        input: HostInput(Input::Listener(l, client)),
    }
}

/// Listens at `path`, replacing a stale socket (nobody accepting) but nothing else.
fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::io::{Error, ErrorKind};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ))
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
            Err(e) => return Err(e),
        },
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(last_err());
        }
    }
    Ok(())
}

/// A new pty pair in raw mode: (master, non-blocking; slave; the slave's path).
fn open_pty() -> std::io::Result<(File, OwnedFd, PathBuf)> {
    // SAFETY: the libc pty calls, each result checked; fds are owned right after creation.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(last_err());
        }
        let master = File::from_raw_fd(m);
        if libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
            return Err(last_err());
        }
        let mut buf = [0 as libc::c_char; 128];
        let rc = libc::ptsname_r(m, buf.as_mut_ptr(), buf.len());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let cpath = std::ffi::CStr::from_ptr(buf.as_ptr());
        let path = PathBuf::from(cpath.to_string_lossy().into_owned());
        let s = libc::open(
            cpath.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(last_err());
        }
        let slave = OwnedFd::from_raw_fd(s);
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(s, &mut t) != 0 {
            return Err(last_err());
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(s, libc::TCSANOW, &t) != 0 {
            return Err(last_err());
        }
        set_nonblocking(m)?;
        Ok((master, slave, path))
    }
}

/// Opens a device path backend for reading and writing, non-blocking (a tty without
/// carrier must not hang the open, and output must not stall the guest).
pub fn open_path(path: &Path) -> std::io::Result<(File, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)?;
    let g = f.try_clone()?;
    Ok((f, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pty_pair_is_raw_and_nonblocking() {
        let (mut master, slave, path) = open_pty().unwrap();
        assert!(path.starts_with("/dev/pts"));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut out = NonBlockingOut {
            file: master.try_clone().unwrap(),
            dropped: dropped.clone(),
        };
        // Nobody reads the slave: the pty fills up and writes are dropped, never blocking.
        let chunk = [b'x'; 4096];
        for _ in 0..64 {
            assert_eq!(out.write(&chunk).unwrap(), 4096);
        }
        assert!(dropped.load(Ordering::Relaxed) > 0);
        // Raw: a CR typed on the slave reaches the master unchanged, without echo.
        let mut other = File::options().read(true).write(true).open(&path).unwrap();
        let mut drain = vec![0u8; 1 << 20];
        // Empty what is pending towards the slave so the test sees its own bytes below.
        set_nonblocking(other.as_raw_fd()).unwrap();
        while other.read(&mut drain).map(|n| n > 0).unwrap_or(false) {}
        other.write_all(b"a\r").unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 2 && Instant::now() < deadline {
            let mut b = [0u8; 16];
            match master.read(&mut b) {
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        assert_eq!(got, b"a\r");
        drop(slave);
    }

    #[test]
    fn unix_socket_refuses_non_sockets_and_replaces_stale_ones() {
        let dir = std::env::temp_dir().join(format!("rhyve-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(bind_unix(&file).is_err());
        let sock = dir.join("s");
        let l = bind_unix(&sock).unwrap();
        assert!(bind_unix(&sock).is_err(), "live socket");
        drop(l);
        let _l = bind_unix(&sock).expect("stale socket replaced");
        assert!(bind_unix(&dir.join("missing/s")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn socket_output_without_client_is_dropped() {
        let client: Client = Arc::new(Mutex::new(None));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut out = SocketOut {
            client: client.clone(),
            dropped: dropped.clone(),
        };
        assert_eq!(out.write(b"abc").unwrap(), 3);
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
        let (a, mut b) = UnixStream::pair().unwrap();
        *client.lock().unwrap() = Some((1, OwnedFd::from(a)));
        out.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
    }
}
