//! Raw terminal mode for a stdio console, restored on every exit path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);
/// The same settings for a signal handler (no lock there): set once, never changed.
static SAVED_FOR_SIGNALS: OnceLock<libc::termios> = OnceLock::new();
static RAW: AtomicBool = AtomicBool::new(false);

/// Whether the terminal is in raw mode (log lines then need "\r\n").
pub fn is_raw() -> bool {
    RAW.load(Ordering::Relaxed)
}

/// Whether stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(0) == 1 }
}

/// Puts stdin's terminal into raw mode: keys, including ^C, go to the guest.
/// Output post-processing stays on so log lines from rhyve remain readable.
pub fn enter_raw() -> std::io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it or fails.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a termios on our stack.
    if unsafe { libc::tcgetattr(0, &mut tio) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(tio);
    let _ = SAVED_FOR_SIGNALS.set(tio);
    let mut raw = tio;
    // SAFETY: cfmakeraw only edits the struct we pass.
    unsafe { libc::cfmakeraw(&mut raw) };
    raw.c_oflag |= libc::OPOST | libc::ONLCR;
    // SAFETY: valid termios pointer.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    RAW.store(true, Ordering::Relaxed);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // A device worker's panic is caught and the VM runs on (the device needs a reset):
        // the guest's console must stay raw, or a Ctrl-C meant for it would stop rhyve.
        if !devices::threads::current_kind().is_some_and(|k| k.is_device_worker()) {
            restore();
        }
        previous(info);
    }));
    Ok(())
}

/// Restores the saved terminal settings (idempotent).
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(tio) = saved {
        // SAFETY: restoring settings we read earlier.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &tio) };
        RAW.store(false, Ordering::Relaxed);
    }
}

/// [`restore`] for a signal handler about to end the process: no lock, one tcsetattr
/// (async-signal-safe), only while the terminal is raw.
pub fn restore_from_signal_handler() {
    if let (true, Some(tio)) = (is_raw(), SAVED_FOR_SIGNALS.get()) {
        // SAFETY: restoring settings we read earlier; tcsetattr is async-signal-safe.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, tio) };
    }
}
