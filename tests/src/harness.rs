//! Running a VMM (or QEMU) with a deadline and reading the test guest's report.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished (or killed) run produced.
#[derive(Debug)]
pub struct Output {
    /// None when the process was killed (timeout) or died by a signal.
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn report(&self) -> Report {
        Report::parse(&self.stdout)
    }

    /// The guest's report, asserted complete and free of failed checks and faults.
    pub fn clean_report(&self) -> Report {
        let r = self.report();
        assert!(
            r.done,
            "no complete report:\n{}\n{}",
            self.stdout, self.stderr
        );
        assert!(
            r.fails.is_empty() && r.faults.is_empty(),
            "guest checks failed: {:?} {:?}",
            r.fails,
            r.faults
        );
        r
    }
}

/// Options for [`run`].
pub struct Run {
    pub timeout: Duration,
    /// Once stdout contains the first string, write the bytes to stdin (the echo test waits for
    /// "rhyve-guest: type a line"; bytes sent earlier may be dropped by the UART's FIFO reset).
    pub input: Option<(String, Vec<u8>)>,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            timeout: Duration::from_secs(30),
            input: None,
        }
    }
}

/// The pc-testdev convention: `out` N to port 0xf4 ends the VMM with status (N << 1) | 1.
/// Asserts bad input was refused as the command line promises: exit status 4 and one line
/// on stderr, `rhyve: ...` containing `needle`, no panic. `what` names the case.
pub fn assert_refused(out: &Output, what: &str, needle: &str) {
    assert_eq!(out.code(), Some(4), "{what}: stderr {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line, got {lines:?}");
    assert!(
        lines[0].starts_with("rhyve: ") && lines[0].contains(needle),
        "{what}: {}",
        lines[0]
    );
    assert!(!out.stderr.contains("panicked"), "{what}: {}", out.stderr);
}

pub const fn testdev_status(n: u32) -> i32 {
    ((n << 1) | 1) as i32
}

/// Run `cmd` to completion or until `opts.timeout`, then kill its whole process group.
/// Never hangs: output read so far is returned either way.
pub fn run(cmd: &mut Command, opts: Run) -> std::io::Result<Output> {
    let start = Instant::now();
    cmd.stdin(if opts.input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;

    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let pipe_reader = |mut r: Box<dyn Read + Send>, is_stdout: bool| {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 || tx.send((is_stdout, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        })
    };
    let out_thread = pipe_reader(Box::new(child.stdout.take().unwrap()), true);
    let err_thread = pipe_reader(Box::new(child.stderr.take().unwrap()), false);
    drop(tx);

    let mut stdin = child.stdin.take();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut timed_out = false;
    let status = loop {
        // One chunk per round, so a guest that never stops printing still meets its deadline.
        if let Ok((is_stdout, chunk)) = rx.recv_timeout(Duration::from_millis(10)) {
            if is_stdout { &mut stdout } else { &mut stderr }.extend_from_slice(&chunk);
        }
        if let (Some((pattern, bytes)), Some(pipe)) = (&opts.input, stdin.as_mut()) {
            if String::from_utf8_lossy(&stdout).contains(pattern.as_str()) {
                let _ = pipe.write_all(bytes).and_then(|_| pipe.flush());
                stdin = None;
            }
        }
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() >= opts.timeout {
            timed_out = true;
            // SAFETY: kill(2) on the process group we created for this child.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
    };
    // The group is dead or exited; anything a straggler still holds open is abandoned after a
    // grace period rather than waited for.
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Ok((is_stdout, chunk)) =
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        if is_stdout { &mut stdout } else { &mut stderr }.extend_from_slice(&chunk);
    }
    if out_thread.is_finished() && err_thread.is_finished() {
        let _ = (out_thread.join(), err_thread.join());
    }
    Ok(Output {
        status: status.filter(|s| s.code().is_some()),
        timed_out,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// One `e820 <addr> <size> <type>` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub typ: u32,
}

/// The `initrd addr=… size=… fnv1a64=…` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
    pub fnv1a64: Option<u64>,
}

/// The test guest's `rhyve-guest: ` lines, parsed. See guests/README.md.
#[derive(Debug, Default)]
pub struct Report {
    /// Every `rhyve-guest: ` line, prefix removed, in order.
    pub lines: Vec<String>,
    /// "bzimage" or "pvh".
    pub boot: Option<String>,
    pub cmdline: Option<String>,
    pub e820: Vec<E820>,
    /// None: no initrd line; Some(None): `initrd none`.
    pub initrd: Option<Option<Initrd>>,
    /// Text after `FAIL `.
    pub fails: Vec<String>,
    /// Text after `FAULT `.
    pub faults: Vec<String>,
    /// `report done` was seen.
    pub done: bool,
}

fn num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl Report {
    pub fn parse(output: &str) -> Report {
        let mut r = Report::default();
        for raw in output.lines() {
            let Some(l) = raw
                .trim_end_matches('\r')
                .split_once("rhyve-guest: ")
                .map(|x| x.1)
            else {
                continue;
            };
            r.lines.push(l.to_string());
            if let Some(b) = l.strip_prefix("boot=") {
                r.boot = Some(b.to_string());
            } else if let Some(c) = l.strip_prefix("cmdline=") {
                r.cmdline = Some(c.to_string());
            } else if let Some(e) = l.strip_prefix("e820 ") {
                let f: Vec<&str> = e.split(' ').collect();
                if let [a, s, t] = f[..] {
                    if let (Ok(addr), Ok(size), Ok(typ)) = (
                        u64::from_str_radix(a, 16),
                        u64::from_str_radix(s, 16),
                        t.parse(),
                    ) {
                        r.e820.push(E820 { addr, size, typ });
                    }
                }
            } else if l == "initrd none" {
                r.initrd = Some(None);
            } else if l.starts_with("initrd ") {
                let v = |k| kv(l, k).and_then(num);
                if let (Some(addr), Some(size)) = (v("addr"), v("size")) {
                    r.initrd = Some(Some(Initrd {
                        addr,
                        size,
                        fnv1a64: v("fnv1a64"),
                    }));
                }
            } else if let Some(f) = l.strip_prefix("FAIL ") {
                r.fails.push(f.to_string());
            } else if let Some(f) = l.strip_prefix("FAULT ") {
                r.faults.push(f.to_string());
            } else if l == "report done" {
                r.done = true;
            }
        }
        r
    }

    /// The first line starting with `word` (e.g. "cpu", "gdt", "segs", "entry32").
    pub fn line(&self, word: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|l| l.split(' ').next() == Some(word))
            .map(String::as_str)
    }

    /// `key=value` from the line starting with `word`: `r.value("cpu", "lm") == Some("1")`.
    pub fn value(&self, word: &str, key: &str) -> Option<&str> {
        kv(self.line(word)?, key)
    }
}

fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// A spawned rhyve: stdin closed, stdout (the guest's COM1) and stderr collected in the
/// background, killed when dropped.
pub struct Spawned {
    pub child: KillOnDrop,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Spawned {
    pub fn spawn(cmd: &mut Command) -> Spawned {
        Self::spawn_stdin(cmd.stdin(Stdio::null())).0
    }

    /// As [`Spawned::spawn`], with stdin a pipe the caller writes (the guest's COM1 input
    /// with `-l com1,stdio`).
    pub fn spawn_with_stdin(cmd: &mut Command) -> (Spawned, std::process::ChildStdin) {
        let (spawned, stdin) = Self::spawn_stdin(cmd.stdin(Stdio::piped()));
        (spawned, stdin.expect("piped stdin"))
    }

    fn spawn_stdin(cmd: &mut Command) -> (Spawned, Option<std::process::ChildStdin>) {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rhyve");
        let stdin = child.stdin.take();
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        let spawned = Spawned {
            child: KillOnDrop(child),
            stdout,
            stderr,
        };
        (spawned, stdin)
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (at most 60 s) until the guest printed `text`; panics if rhyve exits first.
    pub fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.stdout().contains(text) {
            if let Some(s) = self.child.0.try_wait().expect("try_wait") {
                panic!(
                    "rhyve exited ({s}) before {text:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The child's exit status if it exits within `timeout` (polled every 5 ms).
pub fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Kills (and reaps) a child process when dropped, so a failing test leaks no VM.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The rhyve binary under test: `$RHYVE_BIN`, else `rhyve` next to the test's target dir
/// (target/<profile>/rhyve). Build it first: `cargo build --release --workspace`.
pub fn rhyve_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("RHYVE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/rhyve
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("rhyve"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release --workspace) or set RHYVE_BIN",
        bin.display()
    );
    bin
}

/// Fails loudly (never skips) when KVM is missing: every boot test needs it.
pub fn require_kvm() {
    let dev = std::env::var("RHYVE_KVM_DEV").unwrap_or_else(|_| "/dev/kvm".into());
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
    {
        panic!("these tests boot real guests and need {dev}: {e}");
    }
}

/// target/<profile>/rhyvectl, next to rhyve.
pub fn rhyvectl_bin() -> std::path::PathBuf {
    let bin = rhyve_bin().with_file_name("rhyvectl");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release -p rhyvectl)",
        bin.display()
    );
    bin
}

/// Runs rhyvectl with `args` against the VMs under `base`.
pub fn rhyvectl(base: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(rhyvectl_bin())
        .env("RHYVE_RUNDIR", base)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rhyvectl")
}

/// rhyvectl that must succeed; its stdout.
pub fn rhyvectl_ok(base: &std::path::Path, args: &[&str]) -> String {
    let o = rhyvectl(base, args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "rhyvectl {args:?} failed ({}): {err}\n{out}",
        o.status
    );
    out
}

/// The PC most tests boot: host bridge, LPC bridge, COM1 on stdio (the test guest's console).
pub const PC_MACHINE: [&str; 6] = ["-s", "0,hostbridge", "-s", "31,lpc", "-l", "com1,stdio"];

/// A `rhyve` command with a private runtime directory and info logging.
pub fn rhyve_cmd(rundir: &std::path::Path) -> Command {
    let mut cmd = Command::new(rhyve_bin());
    cmd.env("RHYVE_RUNDIR", rundir).env("RHYVE_LOG", "info");
    cmd
}

/// A fresh scratch directory under the system temp dir, unique per call (tests run in
/// parallel threads of one process).
/// rhyve mounts its huge-page tmpfs on an empty runtime base (vmmapi::hugepages); mounts in
/// or under scratch dirs are detached when the test process exits.
pub fn scratch_dir(tag: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("rhyve-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    unmount_at_exit(&d);
    d
}

static SCRATCH_DIRS: Mutex<Vec<std::ffi::CString>> = Mutex::new(Vec::new());

fn unmount_at_exit(dir: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    extern "C" fn unmount_all() {
        let dirs = SCRATCH_DIRS.lock().unwrap_or_else(|e| e.into_inner());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        // Mount points in or under a scratch dir (tests also use subdirectories as bases).
        let points = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|p| {
                dirs.iter().any(|d| {
                    let d = d.to_bytes();
                    p.as_bytes().starts_with(d)
                        && matches!(p.as_bytes().get(d.len()), None | Some(b'/'))
                })
            });
        for point in points.collect::<Vec<_>>().iter().rev() {
            if let Ok(c) = std::ffi::CString::new(*point) {
                // SAFETY: a NUL-terminated path; a lazy unmount of a test's own tmpfs.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    static REGISTER: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain function that only reads a static.
    REGISTER.call_once(|| unsafe {
        libc::atexit(unmount_all);
    });
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
        SCRATCH_DIRS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c);
    }
}

/// Collects everything `r` yields, on a thread, into a shared string.
pub fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let s = Arc::new(Mutex::new(String::new()));
    let out = s.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    s
}

/// Reads from `r` until the text contains `pattern` (Ok) or EOF/timeout (Err), returning
/// what was read.
pub fn read_until<R: Read + AsRawFd>(
    r: &mut R,
    pattern: &str,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if text.contains(pattern) {
            return Ok(text);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(text);
        }
        let mut p = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, 1000) as i32) };
        if n <= 0 {
            continue;
        }
        let mut buf = [0u8; 1024];
        match r.read(&mut buf) {
            Ok(0) => return Err(text),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_report() {
        let out = "noise\nrhyve-guest: boot=bzimage\r\nrhyve-guest: entry64\n\
            rhyve-guest: cmdline=rhyve.test=report  a=b\n\
            rhyve-guest: e820 0000000000000000 000000000009fc00 1\n\
            rhyve-guest: initrd addr=0x7000000 size=4096 fnv1a64=0x00000000000000ff\n\
            rhyve-guest: cpu lm=1 pg=1 pae=1 pe=1\n\
            rhyve-guest: FAIL something broke\nrhyve-guest: report done\n";
        let r = Report::parse(out);
        assert_eq!(r.boot.as_deref(), Some("bzimage"));
        assert_eq!(r.cmdline.as_deref(), Some("rhyve.test=report  a=b"));
        assert_eq!(
            r.e820,
            [E820 {
                addr: 0,
                size: 0x9fc00,
                typ: 1
            }]
        );
        let i = Initrd {
            addr: 0x700_0000,
            size: 4096,
            fnv1a64: Some(0xff),
        };
        assert_eq!(r.initrd, Some(Some(i)));
        assert_eq!(r.value("cpu", "pae"), Some("1"));
        assert_eq!(r.fails, ["something broke"]);
        assert!(r.done);
    }

    #[test]
    fn timeout_kills() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; sleep 30"]);
        let o = run(
            &mut cmd,
            Run {
                timeout: Duration::from_millis(300),
                input: None,
            },
        )
        .unwrap();
        assert!(o.timed_out);
        assert!(o.status.is_none());
        assert_eq!(o.stdout, "started\n");
        assert!(o.elapsed < Duration::from_secs(5));
    }

    #[test]
    fn input_after_prompt() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'rhyve-guest: type a line'; read l; echo \"got $l\"; exit 3",
        ]);
        let input = Some(("type a line".to_string(), b"hello\n".to_vec()));
        let o = run(
            &mut cmd,
            Run {
                timeout: Duration::from_secs(10),
                input,
            },
        )
        .unwrap();
        assert_eq!(o.code(), Some(3));
        assert!(o.stdout.contains("got hello"), "{}", o.stdout);
    }
}
