//! rhyve's VMM as a library: what bhyve's `bhyve` binary does, minus its command line.
//!
//! - [`config`]: the VM's resources ([`config::VmConfig`], every device with an id), from
//!   bhyve_config(5)'s dotted keys or built directly.
//! - [`emulations`]: the `-s` emulations by name (bhyve's pci_emul table).
//! - [`machine`]: assembly (guest RAM, irqchip, buses, PCI, firmware or kernel) and the run
//!   until a stop, as bhyve's exit status.
//! - [`vcpu`], [`vcpu_ctl`], [`exit`]: one thread per vCPU, how others reach it, and the
//!   pure handler of its exits.
//! - [`registry`]: the machine's devices by id (pause, state, counters).
//! - [`runtime`]: the VM's states and the actions on it (pause, resume, stop), in one place.
//! - [`control_server`]: the VM's control socket (rhyvectl).
//! - [`snapshot`]: checkpoints (FILE + FILE.kern) and what a restore checks and reads.
//! - [`console`], [`terminal`], [`signals`]: the host side of the consoles and the signals.
//! - [`adopt`], [`boot`], [`firmware`]: what runs first: rhyveload's load, a kernel, a ROM.

pub mod adopt;
pub mod boot;
pub mod config;
pub mod console;
pub mod control_server;
pub mod emulations;
pub mod exit;
pub mod firmware;
pub mod host_output;
pub mod irq_lines;
pub mod machine;
pub mod memsize;
pub mod passthru;
pub mod registry;
pub mod runtime;
pub mod sandbox;
pub mod signals;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod vcpu_ctl;
