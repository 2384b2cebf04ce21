//! Firecracker's command line (`firecracker --api-sock PATH --id ID ...`).
//!
//! rhyve is in this mode when it is run as `firecracker` (a link to rhyve, what an
//! orchestrator's configuration points at) or when an argument is one of Firecracker's own
//! flags; bhyve's command line has no `--api-sock`, `--config-file`, `--no-api` or `--id`.

use std::path::PathBuf;

/// Firecracker's default API socket.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
pub const DEFAULT_ID: &str = "anonymous-instance";

/// Flags that take a value.
const WITH_VALUE: &[&str] = &[
    "api-sock",
    "id",
    "config-file",
    "level",
    "log-path",
    "module",
    "metadata",
    "http-api-max-payload-size",
    "mmds-size-limit",
    "start-time-us",
    "start-time-cpu-us",
    "parent-cpu-time-us",
    "seccomp-filter",
];
/// Flags alone.
const SWITCHES: &[&str] = &[
    "no-api",
    "boot-timer",
    "show-level",
    "show-log-origin",
    "no-seccomp",
    "version",
    "help",
];
/// Flags bhyve's mode does not have: one of them selects this mode.
const FIRECRACKER_ONLY: &[&str] = &["api-sock", "config-file", "no-api", "id"];

/// Whether argv (program name first) is a Firecracker command line.
pub fn is_firecracker_invocation(program: &str, args: &[String]) -> bool {
    let base = std::path::Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    base == "firecracker"
        || args.iter().any(|a| {
            a.strip_prefix("--")
                .map(|f| f.split('=').next().unwrap_or(""))
                .is_some_and(|f| FIRECRACKER_ONLY.contains(&f))
        })
}

/// A Firecracker-mode run.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub api_sock: PathBuf,
    pub id: String,
    pub config_file: Option<String>,
    pub no_api: bool,
    pub boot_timer: bool,
    pub level: log::LevelFilter,
    pub log_path: Option<String>,
    pub show_level: bool,
    pub show_log_origin: bool,
    pub module: Option<String>,
    pub max_payload: usize,
    pub seccomp: bool,
}

#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Options),
    Version,
    Help,
}

fn level(v: &str) -> Result<log::LevelFilter, String> {
    Ok(match v.to_ascii_lowercase().as_str() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" | "warning" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => {
            return Err(format!(
                "Invalid value for logger level: Failed to parse string to level filter: {v}.\
                 Possible values: [Error, Warning, Info, Debug]"
            ))
        }
    })
}

fn unexpected(arg: &str) -> String {
    format!("Found argument '{arg}' which wasn't expected, or isn't valid in this context.")
}

/// The instance id: as Firecracker's, 1 to 64 letters, digits and '-'.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut o = Options {
        api_sock: PathBuf::from(DEFAULT_API_SOCK),
        id: DEFAULT_ID.into(),
        config_file: None,
        no_api: false,
        boot_timer: false,
        level: log::LevelFilter::Warn,
        log_path: None,
        show_level: false,
        show_log_origin: false,
        module: None,
        max_payload: crate::server::MAX_PAYLOAD,
        seccomp: true,
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(unexpected(arg));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        let value =
            if WITH_VALUE.contains(&name) {
                match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        // A value that looks like a flag is a missing value, as Firecracker's.
                        args.get(i).filter(|v| !v.starts_with("--")).cloned().ok_or_else(|| {
                        format!("The argument '{name}' requires a value, but none was supplied.")
                    })?
                    }
                }
            } else if SWITCHES.contains(&name) {
                if inline.is_some() {
                    return Err(format!("The argument '--{name}' takes no value."));
                }
                String::new()
            } else {
                return Err(unexpected(arg));
            };
        match name {
            "api-sock" => o.api_sock = PathBuf::from(value),
            "id" => {
                if !valid_id(&value) {
                    return Err(format!(
                        "Invalid instance ID: {value:?}: 1 to 64 letters, digits or '-'."
                    ));
                }
                o.id = value
            }
            "config-file" => o.config_file = Some(value),
            "level" => o.level = level(&value)?,
            "log-path" => o.log_path = Some(value),
            "module" => o.module = Some(value),
            "http-api-max-payload-size" => {
                o.max_payload = value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("Invalid value for --{name}: {value:?}"))?
            }
            "metadata" => return Err("--metadata: MMDS is not available in rhyve.".into()),
            "seccomp-filter" => {
                return Err(
                    "--seccomp-filter: rhyve has its own filters per thread; use --no-seccomp \
                     to turn them off."
                        .into(),
                )
            }
            // Jailer's timing arguments and the MMDS limit: accepted, nothing to do.
            "start-time-us" | "start-time-cpu-us" | "parent-cpu-time-us" | "mmds-size-limit" => {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("Invalid value for --{name}: {value:?}"))?;
            }
            "no-api" => o.no_api = true,
            "boot-timer" => o.boot_timer = true,
            "show-level" => o.show_level = true,
            "show-log-origin" => o.show_log_origin = true,
            "no-seccomp" => o.seccomp = false,
            "version" => return Ok(Parsed::Version),
            "help" => return Ok(Parsed::Help),
            _ => unreachable!("every listed flag is handled"),
        }
        i += 1;
    }
    if o.no_api && o.config_file.is_none() {
        return Err("Argument 'config-file' required, but not found.".into());
    }
    Ok(Parsed::Run(o))
}

/// `--help`.
pub fn help(program: &str) -> String {
    format!(
        "{program} (rhyve in Firecracker's mode; Firecracker API v{})

USAGE: {program} [--api-sock PATH] [--id ID] [--config-file FILE] [--no-api] [--boot-timer]
       [--level LEVEL] [--log-path PATH] [--show-level] [--show-log-origin] [--module M]
       [--http-api-max-payload-size BYTES] [--no-seccomp] [--version] [--help]

  --api-sock PATH      the API's unix socket (default {DEFAULT_API_SOCK}); refused if it exists
  --id ID              the instance id, also rhyve's VM name (default {DEFAULT_ID})
  --config-file FILE   the resources as one JSON document (the API's bodies); boots at once
  --no-api             no API socket (needs --config-file)
  --boot-timer         accepted (rhyve has no boot-timer device)
  --level LEVEL        Off, Error, Warning, Info, Debug or Trace
  --log-path PATH      log to this file or FIFO instead of stderr
  --no-seccomp         no seccomp filters

The guest's serial console (COM1) is on stdin/stdout. rhyve's virtio devices are PCI
functions: `pci=off` is removed from the kernel command line.
",
        crate::api::FIRECRACKER_VERSION
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_mode_is_chosen_by_name_or_flag() {
        assert!(is_firecracker_invocation("/usr/bin/firecracker", &[]));
        assert!(is_firecracker_invocation(
            "rhyve",
            &args(&["--api-sock", "/x"])
        ));
        assert!(is_firecracker_invocation("rhyve", &args(&["--id=vm1"])));
        assert!(!is_firecracker_invocation("rhyve", &args(&["--version"])));
        assert!(!is_firecracker_invocation(
            "rhyve",
            &args(&["-m", "1G", "vm0"])
        ));
    }

    #[test]
    fn flags_with_and_without_values() {
        let Parsed::Run(o) = parse(&args(&[
            "--api-sock",
            "/tmp/a.sock",
            "--id=vm-1",
            "--level",
            "Debug",
            "--start-time-us",
            "123",
            "--show-level",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(o.api_sock, PathBuf::from("/tmp/a.sock"));
        assert_eq!(o.id, "vm-1");
        assert_eq!(o.level, log::LevelFilter::Debug);
        assert!(o.show_level);
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(parse(&args(&["--no-api"]))
            .unwrap_err()
            .contains("config-file"));
        assert!(parse(&args(&["--id", "a_b"])).unwrap_err().contains("a_b"));
        assert!(parse(&args(&["--frob"])).unwrap_err().contains("--frob"));
        assert!(parse(&args(&["--api-sock"]))
            .unwrap_err()
            .contains("api-sock"));
        assert!(parse(&args(&["--id", "--no-api"]))
            .unwrap_err()
            .contains("'id' requires"));
        assert_eq!(parse(&args(&["--version"])), Ok(Parsed::Version));
    }
}
