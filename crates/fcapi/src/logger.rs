//! The log in Firecracker's API mode: lines as Firecracker writes them
//! (`TIMESTAMP [ID:THREAD:LEVEL:ORIGIN] message`, level and origin optional), on stderr until
//! `--log-path` or `PUT /logger` names a file or FIFO.
//!
//! The file is opened non-blocking: a FIFO nobody reads loses lines instead of stopping the
//! thread that logs (a vCPU, a device worker).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

struct Settings {
    id: String,
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
    /// Only records whose module path starts with this.
    module: Option<String>,
}

struct FcLogger {
    settings: Mutex<Settings>,
}

static LOGGER: OnceLock<FcLogger> = OnceLock::new();

fn logger() -> &'static FcLogger {
    LOGGER.get_or_init(|| FcLogger {
        settings: Mutex::new(Settings {
            id: String::new(),
            file: None,
            show_level: false,
            show_origin: false,
            module: None,
        }),
    })
}

/// Installs the logger for instance `id` at `level`.
pub fn init(id: &str, level: log::LevelFilter) {
    let l = logger();
    l.settings.lock().unwrap_or_else(|p| p.into_inner()).id = id.to_string();
    if log::set_logger(l).is_ok() {
        log::set_max_level(level);
    }
}

/// What `PUT /logger` (or the command line) asks for.
pub struct LoggerConfig<'a> {
    pub path: Option<&'a str>,
    pub level: Option<log::LevelFilter>,
    pub show_level: Option<bool>,
    pub show_origin: Option<bool>,
    pub module: Option<&'a str>,
}

/// Applies `c`; the file must exist (Firecracker's FIFO) or is created.
pub fn configure(c: &LoggerConfig) -> std::io::Result<()> {
    let file = match c.path {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(p)?,
        ),
        None => None,
    };
    let mut s = logger().settings.lock().unwrap_or_else(|p| p.into_inner());
    if file.is_some() {
        s.file = file;
    }
    if let Some(v) = c.show_level {
        s.show_level = v;
    }
    if let Some(v) = c.show_origin {
        s.show_origin = v;
    }
    if let Some(m) = c.module {
        s.module = Some(m.to_string());
    }
    if let Some(level) = c.level {
        log::set_max_level(level);
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.NNNNNNNNN` in UTC (no time zone file to read under seccomp).
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

fn level_name(l: log::Level) -> &'static str {
    match l {
        log::Level::Error => "ERROR",
        log::Level::Warn => "WARN",
        log::Level::Info => "INFO",
        log::Level::Debug => "DEBUG",
        log::Level::Trace => "TRACE",
    }
}

impl log::Log for FcLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut s = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = &s.module {
            if !r.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let thread = std::thread::current();
        let mut tag = format!("{}:{}", s.id, thread.name().unwrap_or("main"));
        if s.show_level {
            tag.push(':');
            tag.push_str(level_name(r.level()));
        }
        if s.show_origin {
            tag.push_str(&format!(
                ":{}:{}",
                r.file().unwrap_or("?"),
                r.line().unwrap_or(0)
            ));
        }
        let eol = if vmm::terminal::is_raw() {
            "\r\n"
        } else {
            "\n"
        };
        let line = format!("{} [{tag}] {}{eol}", timestamp(SystemTime::now()), r.args());
        match &mut s.file {
            // A full FIFO drops the line (the file is non-blocking).
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => vmm::host_output::stderr(line.as_bytes()),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_civil_time() {
        let t = UNIX_EPOCH + Duration::new(951_782_400 + 3661, 5); // 2000-02-29 01:01:01
        assert_eq!(timestamp(t), "2000-02-29T01:01:01.000000005");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
    }
}
