//! Host ends of the COM ports: stdio or a device path, with a reader thread feeding the UART.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::uart::Uart;

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

/// Stdout, unbuffered so the guest's output appears as it is written.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        let n = out.write(buf)?;
        out.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Feeds bytes from `input` into `uart` until EOF, waiting while the guest's FIFO is full
/// (backpressure instead of an unbounded buffer).
pub fn spawn_reader(
    name: &str,
    mut input: Box<dyn Read + Send>,
    uart: Arc<Mutex<Uart>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("{name} input"))
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("console input stopped: {e}");
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
        })?;
    Ok(())
}

/// Opens a device path backend for reading and writing.
pub fn open_path(path: &std::path::Path) -> std::io::Result<(File, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    let g = f.try_clone()?;
    Ok((f, g))
}
