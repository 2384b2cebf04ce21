//! Firecracker's command line and REST API on rhyve's VMM, so that orchestrators written for
//! Firecracker (firecracker-containerd, Kata Containers, flintlock, the SDKs) can drive rhyve.
//!
//! - [`cli`]: `--api-sock`, `--id`, `--config-file`, `--no-api`, ... and when rhyve is in this
//!   mode ([`is_firecracker_invocation`]).
//! - [`model`]: the API's JSON bodies. [`api`]: the requests and their answers, by
//!   Firecracker's rules. [`server`]: HTTP on the unix socket (hyper).
//! - [`assemble`]: Firecracker's resources as rhyve's configuration keys: the machine is the
//!   one bhyve's command line would build (PCI virtio devices, COM1 on stdio).
//! - [`instance`]: the started VM as the API acts on it. [`logger`]: Firecracker's log lines.

pub mod api;
pub mod assemble;
pub mod cli;
pub mod instance;
pub mod logger;
pub mod model;
pub mod server;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::{Api, Instance};
use model::VmResources;
use vmm::machine::Machine;

/// Firecracker's exit codes (its `FcExitCode`).
pub mod exit_code {
    pub const OK: i32 = 0;
    pub const GENERIC_ERROR: i32 = 1;
    pub const BAD_CONFIGURATION: i32 = 152;
    pub const ARG_PARSING: i32 = 153;
}

pub use cli::is_firecracker_invocation;

/// A start request from the API thread to the main thread, which builds and runs machines.
struct StartRequest {
    cfg: vmm::config::VmConfig,
    reply: mpsc::Sender<Result<Box<dyn Instance>, String>>,
}

/// Runs rhyve in Firecracker's mode; returns the exit status.
pub fn main(program: &str, args: &[String], start: Instant) -> i32 {
    let opts = match cli::parse(args) {
        Ok(cli::Parsed::Run(o)) => o,
        Ok(cli::Parsed::Version) => {
            println!("Firecracker v{}\n", api::FIRECRACKER_VERSION);
            return exit_code::OK;
        }
        Ok(cli::Parsed::Help) => {
            print!("{}", cli::help(program));
            return exit_code::OK;
        }
        Err(e) => {
            eprintln!("Arguments parsing error: {e} \n\nFor more information try --help.");
            // A bad --level is a bad configuration (152), the rest argument errors (153).
            return if e.starts_with("Invalid value for logger level") {
                exit_code::BAD_CONFIGURATION
            } else {
                exit_code::ARG_PARSING
            };
        }
    };
    logger::init(&opts.id, opts.level);
    if let Err(e) = logger::configure(&logger::LoggerConfig {
        path: opts.log_path.as_deref(),
        level: None,
        show_level: Some(opts.show_level),
        show_origin: Some(opts.show_log_origin),
        module: opts.module.as_deref(),
    }) {
        eprintln!("Failed to open the log file {:?}: {e}", opts.log_path);
        return exit_code::GENERIC_ERROR;
    }
    let resources = match &opts.config_file {
        None => VmResources::default(),
        Some(path) => match read_config_file(path) {
            Ok(r) => r,
            Err(e) => {
                log::error!("Configuration for VMM from one single json failed: {e}");
                return exit_code::GENERIC_ERROR;
            }
        },
    };
    // The configuration file's logger, before anything it should see is logged.
    if let Some(l) = &resources.logger {
        if let Err(e) = instance::apply_logger(l) {
            log::error!("{e}");
            return exit_code::BAD_CONFIGURATION;
        }
    }
    let code = if opts.no_api {
        run_without_api(&opts, &resources, start)
    } else {
        run_with_api(&opts, resources, start)
    };
    // The socket stays, as Firecracker's (an orchestrator removes it).
    code
}

fn read_config_file(path: &str) -> Result<VmResources, String> {
    let text = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let res: VmResources = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    // Through the API's own checks, part by part, as Firecracker does.
    api::check_resources(&res)?;
    Ok(res)
}

/// `--no-api --config-file`: boots at once, nothing to talk to.
fn run_without_api(opts: &cli::Options, res: &VmResources, start: Instant) -> i32 {
    let cfg = match assemble::vm_config(&opts.id, res) {
        Ok(c) => with_options(c, opts),
        Err(e) => {
            log::error!("Building VMM configured from cmdline json failed: {e}");
            return exit_code::BAD_CONFIGURATION;
        }
    };
    match Machine::build(cfg, start).and_then(Machine::run) {
        Ok(reason) => exit_status(&reason),
        Err(e) => {
            log::error!("{e:#}");
            exit_code::GENERIC_ERROR
        }
    }
}

fn run_with_api(opts: &cli::Options, resources: VmResources, start: Instant) -> i32 {
    // Refused if the file exists, as Firecracker: another instance may be serving it.
    let listener = match std::os::unix::net::UnixListener::bind(&opts.api_sock) {
        Ok(l) => l,
        Err(e) => {
            log::error!(
                "Failed to open the API socket at: {}. Check that it is not already used. ({e})",
                opts.api_sock.display()
            );
            return exit_code::GENERIC_ERROR;
        }
    };
    let (tx, rx) = mpsc::channel::<StartRequest>();
    let tx = Mutex::new(tx);
    let run_opts = opts.clone();
    let starter: api::Starter = Box::new(move |id, res, from| {
        let mut cfg = with_options(assemble::vm_config(id, res)?, &run_opts);
        if let Some(from) = from {
            cfg.restore = Some(vmm::snapshot::SnapshotFiles {
                memory: from.memory.clone(),
                state: from.state.clone(),
            });
            cfg.restore_paused = !from.resume;
        }
        let (reply, answer) = mpsc::channel();
        tx.lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(StartRequest { cfg, reply })
            .map_err(|_| "the VMM has ended".to_string())?;
        answer
            .recv()
            .map_err(|_| "the VMM ended while starting".to_string())?
    });
    let boot_at_once = opts.config_file.is_some();
    // The configuration file's metrics file, as a PUT /metrics would open it.
    let mut host = instance::HostEffects::default();
    if let Some(m) = &resources.metrics {
        if let Err(e) = api::Host::configure_metrics(&mut host, m) {
            log::error!(
                "Metrics error: Cannot initialize the metrics system due to bad user input: {e}"
            );
            return exit_code::BAD_CONFIGURATION;
        }
    }
    let api = Arc::new(Mutex::new(Api::new(
        &opts.id,
        resources,
        starter,
        Box::new(host),
    )));
    let max_payload = opts.max_payload;
    let spawned = devices::threads::spawn(devices::threads::ThreadKind::Api, "fc_api", {
        let api = api.clone();
        move || {
            // Termination signals are the main thread's (before boot they end the
            // process; after it, the signal thread's).
            if let Err(e) = vmm::signals::block_termination_signals() {
                log::warn!("api thread: signal mask: {e}");
            }
            if boot_at_once {
                let mut a = api.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(r) = a.start() {
                    log::error!("Building VMM configured from cmdline json failed: {r:?}");
                    std::process::exit(exit_code::BAD_CONFIGURATION);
                }
            }
            if let Err(e) = server::run(listener, api, max_payload) {
                log::error!("api socket: {e}");
            }
        }
    });
    if let Err(e) = spawned {
        log::error!("api thread: {e}");
        return exit_code::GENERIC_ERROR;
    }
    log::info!("API server listening on {}", opts.api_sock.display());
    // The main thread builds and runs the machine InstanceStart asks for.
    while let Ok(req) = rx.recv() {
        let StartRequest { cfg, reply } = req;
        let machine = match Machine::build(cfg, start) {
            Ok(m) => m,
            Err(e) => {
                let _ = reply.send(Err(format!("{e:#}")));
                continue;
            }
        };
        let on_running: vmm::machine::OnRunning = Box::new(move |running| {
            let _ = reply.send(Ok(Box::new(instance::FcInstance::new(running))));
        });
        return match machine.run_observed(Some(on_running)) {
            Ok(reason) => {
                log::info!("Vmm is stopping: {reason:?}");
                exit_status(&reason)
            }
            Err(e) => {
                log::error!("{e:#}");
                exit_code::GENERIC_ERROR
            }
        };
    }
    exit_code::GENERIC_ERROR
}

/// What the command line adds to the machine: `--no-seccomp`.
fn with_options(mut cfg: vmm::config::VmConfig, opts: &cli::Options) -> vmm::config::VmConfig {
    if !opts.seccomp {
        cfg.seccomp = vmm::sandbox::SeccompMode::Off;
    }
    cfg
}

/// A stop as Firecracker's exit status: the guest's own stop (a reset, Firecracker's
/// `reboot=k` shutdown, a power-off, a halt) is 0; a triple fault or an error is 1.
pub fn exit_status(reason: &devices::StopReason) -> i32 {
    use devices::StopReason::*;
    match reason {
        Error(msg) => {
            log::error!("{msg}");
            exit_code::GENERIC_ERROR
        }
        TripleFault => exit_code::GENERIC_ERROR,
        // pc-testdev's exit, as in bhyve's mode (tests).
        GuestExit(code) => *code,
        Reset | PowerOff | Halt | Suspended => exit_code::OK,
    }
}
