//! Warnings a guest can trigger at will (a BAR moved onto an address KVM refuses for an
//! ioeventfd, console output the host cannot take, offloads the tap refuses): the first of
//! each kind per device is logged, the rest are only counted (and logged at debug level), so
//! a guest cannot fill the host's logs or slow rhyve down by logging.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// One kind of guest-triggered warning of one device.
#[derive(Debug, Default)]
pub struct LimitedWarning {
    count: AtomicU64,
}

impl LimitedWarning {
    pub const fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
        }
    }

    /// Logs `args` at warn level the first time, at debug level after.
    pub fn warn(&self, args: fmt::Arguments) {
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!("{args} (further ones are only counted)");
        } else {
            log::debug!("{args}");
        }
    }

    /// How often it happened.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// A logger for this crate's tests: records every warning, so a test can count them.
#[cfg(test)]
pub(crate) mod capture {
    use std::sync::{Mutex, Once};

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::Level::Warn
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                LINES.lock().unwrap().push(r.args().to_string());
            }
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture;

    /// Starts recording (call before what logs).
    pub(crate) fn install() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            let _ = log::set_logger(&CAPTURE);
            log::set_max_level(log::LevelFilter::Debug);
        });
    }

    /// Warnings logged since [`install`] (by any test of this binary) that contain `needle`.
    pub(crate) fn warnings_with(needle: &str) -> usize {
        LINES
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}
