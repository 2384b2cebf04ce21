//! Output to rhyve's own stdout and stderr that never blocks the thread producing it.
//!
//! A vCPU writes a stdio console's bytes while holding the UART's lock, and any thread logs.
//! If whoever reads rhyve's stdout or stderr stops reading (a full pipe, a suspended
//! terminal), a plain write blocks that vCPU, then every thread that wants the UART, and a
//! forced power-off never finishes. Here a bounded queue takes the bytes and a writer thread
//! of its own does the blocking write; what does not fit is dropped and counted. O_NONBLOCK
//! on the descriptor is no answer: it is shared with the terminal and the parent shell.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use devices::threads::ThreadKind;

/// Bytes a stream holds for its writer before it drops.
const CAPACITY: usize = 256 << 10;
/// Most bytes one write(2) takes from the queue.
const CHUNK: usize = 16 << 10;

struct State {
    queue: VecDeque<u8>,
    /// The writer holds bytes it took from the queue and has not written yet.
    writing: bool,
}

struct Shared {
    fd: RawFd,
    state: Mutex<State>,
    /// Bytes queued (for the writer) or the queue drained (for flush).
    changed: Condvar,
    dropped: AtomicU64,
    /// Whether a writer thread serves the queue (before, [`flush`] writes it).
    served: AtomicBool,
}

/// One stream (stdout or stderr): a queue, and once started its writer thread.
#[derive(Clone)]
pub struct AsyncOut {
    shared: Arc<Shared>,
}

impl AsyncOut {
    /// A queue for descriptor `fd` (1 or 2, which outlive the process's threads); nothing
    /// writes it until [`AsyncOut::serve`] or a flush.
    fn new(fd: RawFd) -> AsyncOut {
        AsyncOut {
            shared: Arc::new(Shared {
                fd,
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    writing: false,
                }),
                changed: Condvar::new(),
                dropped: AtomicU64::new(0),
                served: AtomicBool::new(false),
            }),
        }
    }

    /// Starts the writer thread, called `name` (once).
    fn serve(&self, name: &str) -> io::Result<()> {
        if self.shared.served.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let writer = self.shared.clone();
        match devices::threads::spawn(ThreadKind::Console, name, move || writer.run()) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.shared.served.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Queues what fits of `buf`; the rest is dropped and counted. Never blocks on the
    /// descriptor.
    pub fn push(&self, buf: &[u8]) -> usize {
        let s = &self.shared;
        let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
        let room = CAPACITY.saturating_sub(st.queue.len());
        let n = buf.len().min(room);
        st.queue.extend(&buf[..n]);
        if n < buf.len() {
            s.dropped
                .fetch_add((buf.len() - n) as u64, Ordering::Relaxed);
        }
        drop(st);
        s.changed.notify_all();
        n
    }

    /// Bytes dropped because the reader did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything queued was written, at most `timeout`; whether it was. Without
    /// a writer thread, writes it here, as far as the descriptor takes it in time.
    pub fn flush_for(&self, timeout: Duration) -> bool {
        let s = &self.shared;
        let deadline = Instant::now() + timeout;
        if !s.served.load(Ordering::Acquire) {
            return s.write_here(deadline);
        }
        let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
        while !st.queue.is_empty() || st.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = s
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Shared {
    fn run(&self) {
        let mut chunk = Vec::with_capacity(CHUNK);
        loop {
            {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.writing = false;
                self.changed.notify_all();
                while st.queue.is_empty() {
                    st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                let n = st.queue.len().min(CHUNK);
                chunk.clear();
                chunk.extend(st.queue.drain(..n));
                st.writing = true;
            }
            if write_all(self.fd, &chunk).is_err() {
                // A closed or broken descriptor: what it would have printed is lost.
                self.dropped
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Writes the queue on the calling thread until `deadline`: a page at a time, each only
    /// once poll(2) says the descriptor has room (so no write blocks for long).
    fn write_here(&self, deadline: Instant) -> bool {
        loop {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.queue.is_empty() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut p = libc::pollfd {
                fd: self.fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, ms) } <= 0 || p.revents & libc::POLLOUT == 0 {
                return false;
            }
            // A pipe with room takes a page without blocking.
            let n = st.queue.len().min(4096);
            let page: Vec<u8> = st.queue.drain(..n).collect();
            drop(st);
            if write_all(self.fd, &page).is_err() {
                self.dropped.fetch_add(page.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writes from a valid buffer to a descriptor the process keeps open.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    // Someone else made it non-blocking: wait until it takes more.
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 1000) };
                    continue;
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

static STDOUT: LazyLock<AsyncOut> = LazyLock::new(|| AsyncOut::new(1));
static STDERR: LazyLock<AsyncOut> = LazyLock::new(|| AsyncOut::new(2));

/// Starts the writer threads (after the sandbox is installed, so they are filtered). What
/// was queued before goes out first.
pub fn start() -> io::Result<()> {
    STDERR.serve("stderr")?;
    STDOUT.serve("stdout")
}

/// Queues `buf` for rhyve's stderr (never blocks; [`flush`] at exit writes what is left).
pub fn stderr(buf: &[u8]) {
    STDERR.push(buf);
}

/// Rhyve's stdout as a stream (for a stdio console).
pub fn stdout() -> AsyncOut {
    STDOUT.clone()
}

/// Before the process exits: lets the queues drain, at most `timeout` in all (a reader
/// that stopped reading does not hold the exit). Returns the bytes dropped on stdout.
pub fn flush(timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    for out in [&*STDOUT, &*STDERR] {
        out.flush_for(deadline.saturating_duration_since(Instant::now()));
    }
    STDOUT.dropped()
}

impl Write for AsyncOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Dropped bytes are counted, not an error: the guest's UART must not stall.
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe whose reader never reads: after 64 KiB every write(2) to it blocks.
    fn stuck_pipe() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        // SAFETY: a valid array of two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    }

    #[test]
    fn a_reader_that_stopped_never_blocks_the_writer() {
        let (r, w) = stuck_pipe();
        let out = AsyncOut::new(w);
        out.serve("test out").unwrap();
        let t0 = Instant::now();
        let line = [b'x'; 1000];
        for _ in 0..2000 {
            out.push(&line);
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
        // 2 MB offered: the pipe took 64 KiB, the queue 256 KiB, the rest is counted.
        assert!(out.dropped() >= 2_000_000 - (CAPACITY as u64) - (1 << 20));
        assert!(!out.flush_for(Duration::from_millis(100)));
        // The reader comes back: what was queued arrives.
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.flush_for(Duration::from_millis(1)) && Instant::now() < deadline {
            // SAFETY: reads into a valid buffer.
            let n = unsafe { libc::read(r, buf.as_mut_ptr().cast(), buf.len()) };
            got += n.max(0) as usize;
        }
        assert!(out.flush_for(Duration::from_secs(1)));
        let delivered = got as u64 + pending(r);
        assert!(delivered >= CAPACITY as u64, "{delivered}");
        assert_eq!(delivered + out.dropped(), 2_000_000);
    }

    /// Bytes still in the pipe.
    fn pending(fd: RawFd) -> u64 {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        n as u64
    }
}

#[cfg(test)]
mod before_start {
    use super::*;

    #[test]
    fn without_a_writer_flush_writes_what_fits_and_gives_up_in_time() {
        let mut fds = [0; 2];
        // SAFETY: a valid array of two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let out = AsyncOut::new(fds[1]);
        out.push(&[b'y'; 100_000]);
        let t0 = Instant::now();
        assert!(
            !out.flush_for(Duration::from_millis(300)),
            "a 64 KiB pipe took 100 kB"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        out.push(b"");
        let mut buf = vec![0u8; 1 << 17];
        // SAFETY: reads into a valid buffer.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 4096, "{n}");
    }
}
