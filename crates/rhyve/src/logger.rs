//! A minimal stderr logger; level from `RHYVE_LOG` (error, warn, info, debug, trace).

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let eol = if crate::terminal::is_raw() {
                "\r\n"
            } else {
                "\n"
            };
            let level = r.level().to_string().to_lowercase();
            // Queued (never blocking the thread that logs) once the VM runs.
            vmm::host_output::stderr(format!("rhyve: {level}: {}{eol}", r.args()).as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the logger.
pub fn init() {
    let level = match std::env::var("RHYVE_LOG").unwrap_or_default().as_str() {
        "error" => log::LevelFilter::Error,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        "off" => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
