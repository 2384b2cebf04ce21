//! Which VM object rhyve runs on and where the boot vCPU's state comes from:
//!
//! | `--kernel` | object `NAME`               | rhyve                                          |
//! |------------|-----------------------------|------------------------------------------------|
//! | given      | none                        | direct boot in an ephemeral object (removed on exit) |
//! | given      | idle, persistent            | direct boot in that object (kept on exit)      |
//! | absent     | idle, with a boot-state     | adopts what rhyveload loaded                   |
//! | absent     | none, or no boot-state      | error: nothing to boot                         |
//! | either     | running / stale             | error ("vm0 is running (pid N)", "stale VM object …") |
//!
//! rhyve consumes the boot-state once the guest has run: after a reboot (exit 0) the object
//! stays, empty, and rhyveload must load it again — as bhyve needs bhyveload after each
//! reboot. `-D` (bhyve's "destroy the VM on guest initiated power-off") removes the object
//! when the guest powers off (exit 1, also after SIGTERM's power button).

use crate::memsize::show;
use anyhow::{anyhow, bail, Context, Result};
use devices::StopReason;
use loader::{BootState, EntryState};
use vmmapi::{Hypervisor, Vm, VmObject};

use crate::config::VmConfig;

/// How this run boots.
pub struct Boot {
    /// The persistent object to run in (None: a new ephemeral one), until the VM takes it.
    object: Option<VmObject>,
    /// rhyveload's work (None: a direct `--kernel` boot).
    state: Option<Box<BootState>>,
}

fn no_guest(name: &str) -> anyhow::Error {
    anyhow!(
        "no guest to boot: give --kernel PATH (or -o boot.kernel=PATH), or load VM {name} with rhyveload first"
    )
}

impl Boot {
    /// Decides (see the module table) and locks the object if there is one.
    pub fn prepare(cfg: &VmConfig) -> Result<Self> {
        Self::prepare_in(&vmmapi::rundir_base(), cfg)
    }

    /// [`Boot::prepare`] with objects under `base`.
    fn prepare_in(base: &std::path::Path, cfg: &VmConfig) -> Result<Self> {
        let object = match VmObject::open_in(base, &cfg.name) {
            Ok(o) => Some(o),
            Err(vmmapi::Error::NoObject(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if cfg.kernel.is_some() || cfg.bootrom.is_some() {
            if let Some(o) = &object {
                check_memory(cfg, o)?;
                log::info!(
                    "VM {}: direct or firmware boot in the existing object",
                    cfg.name
                );
            }
            return Ok(Boot {
                object,
                state: None,
            });
        }
        let object = object.ok_or_else(|| no_guest(&cfg.name))?;
        let text = object.read_boot_state()?.ok_or_else(|| {
            anyhow!(
                "VM {} has nothing loaded: run rhyveload again (needed after every guest reboot), or give --kernel PATH",
                cfg.name
            )
        })?;
        let state = BootState::parse(&text).with_context(|| format!("VM {}", cfg.name))?;
        check_memory(cfg, &object)?;
        if state.ram_bytes != object.ram_bytes() {
            bail!(
                "VM {}: boot-state was built for {} of memory, the object has {}",
                cfg.name,
                show(state.ram_bytes),
                show(object.ram_bytes())
            );
        }
        Ok(Boot {
            object: Some(object),
            state: Some(Box::new(state)),
        })
    }

    /// Creates the KVM VM: over the object's RAM file, or in a new ephemeral object.
    pub fn create_vm(&mut self, hv: &Hypervisor, cfg: &VmConfig) -> Result<Vm> {
        let regions = loader::layout::ram_regions(cfg.memory);
        let memory = vmmapi::MemoryOptions {
            huge_pages: cfg.huge_pages,
            wired: cfg.wired,
        };
        Ok(match self.object.take() {
            Some(o) => Vm::create_with(hv, o, &regions, &memory)?,
            None => Vm::create(hv, &cfg.name, &regions, &memory)?,
        })
    }

    /// The boot vCPU's entry state: load `--kernel` now, or take rhyveload's. `rsdp` is where
    /// rhyve just built its ACPI tables.
    pub fn entry(&self, vm: &Vm, cfg: &VmConfig, rsdp: u64) -> Result<EntryState> {
        match &self.state {
            None => {
                let kernel = cfg.kernel.as_deref().ok_or_else(|| no_guest(&cfg.name))?;
                // A direct boot replaces whatever rhyveload left: forget that load before
                // overwriting its memory, so a failed load here never leaves a boot-state
                // pointing into half-replaced RAM.
                vm.object().clear_boot_state()?;
                let loaded = loader::load(
                    vm.ram().memory(),
                    &loader::BootConfig {
                        kernel,
                        initrd: cfg.initrd.as_deref(),
                        cmdline: &cfg.cmdline,
                        ram_bytes: cfg.memory,
                        rsdp_addr: Some(rsdp),
                    },
                )?;
                log::info!(
                    "loaded {:?} kernel at {:#x}..{:#x}, entry {:#x}",
                    loaded.format,
                    loaded.kernel_range.0,
                    loaded.kernel_range.1,
                    loaded.entry.rip
                );
                Ok(loaded.entry)
            }
            Some(state) => {
                if let Some(want) = state.rsdp_addr.filter(|a| *a != rsdp) {
                    bail!(
                        "VM {}: the loaded kernel expects the ACPI RSDP at {want:#x}, rhyve built it at {rsdp:#x} (rhyveload from another version?)",
                        cfg.name
                    );
                }
                log::info!(
                    "VM {}: running what rhyveload loaded: {} {}{} kernel {} initrd {} cmdline {:?}, entry {:#x}",
                    cfg.name,
                    state.source,
                    state.title.as_deref().map(|t| format!("\"{t}\"")).unwrap_or_default(),
                    if state.title.is_some() { "," } else { "" },
                    state.kernel,
                    state.initrd.as_deref().unwrap_or("none"),
                    state.cmdline,
                    state.entry.rip
                );
                Ok(state.entry)
            }
        }
    }
}

fn check_memory(cfg: &VmConfig, object: &VmObject) -> Result<()> {
    if object.ram_bytes() != cfg.memory {
        bail!(
            "-m {}: VM {} has {} of memory (give -m {}, or destroy it: rhyvectl --vm={} --destroy)",
            show(cfg.memory),
            cfg.name,
            show(object.ram_bytes()),
            show(object.ram_bytes()),
            cfg.name
        );
    }
    Ok(())
}

/// Called just before the vCPUs start: from here on the guest may change its memory, so the
/// load is used up (also if rhyve fails later on); a failure before this point keeps it.
pub fn consume_boot_state(vm: &Vm) -> Result<()> {
    let object = vm.object();
    if object.persistent() {
        object.clear_boot_state()?;
    }
    Ok(())
}

/// After the guest ran: `-D` removes the object on power-off.
pub fn on_stop(vm: &Vm, cfg: &VmConfig, reason: &StopReason) {
    let object = vm.object();
    if cfg.destroy_on_poweroff && *reason == StopReason::PowerOff {
        log::info!(
            "VM {}: powered off with -D: destroying the VM object",
            cfg.name
        );
        object.remove_on_drop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, kernel: Option<&str>, mem: u64) -> VmConfig {
        let mut t = crate::config::ConfigTree::default();
        t.set("name", name);
        let t = &mut t;
        t.set("memory.size", &format!("{}M", mem >> 20));
        if let Some(k) = kernel {
            t.set("boot.kernel", k);
        }
        VmConfig::from_tree(t).unwrap()
    }

    #[test]
    fn decisions() {
        let base = std::env::temp_dir().join(format!("rhyve-adopt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mem = 32 << 20;
        let prepare = |c: &VmConfig| Boot::prepare_in(&base, c);

        // Nothing there: direct boot is ephemeral, adoption has nothing to boot.
        let b = prepare(&cfg("a0", Some("/k"), mem)).unwrap();
        assert!(b.object.is_none() && b.state.is_none());
        let e = prepare(&cfg("a0", None, mem)).err().unwrap();
        assert!(e.to_string().starts_with("no guest to boot"), "{e}");

        // An object without boot-state: still nothing; with --kernel it is used.
        drop(VmObject::create_in(&base, "a1", mem).unwrap());
        let e = prepare(&cfg("a1", None, mem)).err().unwrap();
        assert!(
            e.to_string()
                .starts_with("VM a1 has nothing loaded: run rhyveload"),
            "{e}"
        );
        let b = prepare(&cfg("a1", Some("/k"), mem)).unwrap();
        assert!(b.object.is_some() && b.state.is_none());
        drop(b);

        // A loaded object is adopted, at its own size only.
        let o = VmObject::open_in(&base, "a1").unwrap();
        let state = BootState {
            ram_bytes: mem,
            format: loader::KernelFormat::BzImage,
            entry: loader::entry::long_mode(0x10_0200, 0x7000),
            source: "bls".into(),
            title: None,
            kernel: "/vmlinuz".into(),
            initrd: None,
            cmdline: String::new(),
            rsdp_addr: Some(loader::acpi::ACPI_START),
            env: vec![],
        };
        o.write_boot_state(&state.to_text()).unwrap();
        drop(o);
        let b = prepare(&cfg("a1", None, mem)).unwrap();
        assert_eq!(b.state.as_deref(), Some(&state));
        drop(b);
        let e = prepare(&cfg("a1", None, 64 << 20)).err().unwrap();
        assert_eq!(
            e.to_string(),
            "-m 64M: VM a1 has 32M of memory (give -m 32M, or destroy it: rhyvectl --vm=a1 --destroy)"
        );
        // A corrupt boot-state is an error naming the VM.
        let o = VmObject::open_in(&base, "a1").unwrap();
        o.write_boot_state("rhyve-boot-state 1\nrip=x\n").unwrap();
        drop(o);
        let e = prepare(&cfg("a1", None, mem)).err().unwrap();
        assert!(
            format!("{e:#}").starts_with("VM a1: boot-state line 2"),
            "{e:#}"
        );
        // In use: refused.
        let _held = VmObject::open_in(&base, "a1").unwrap();
        let e = prepare(&cfg("a1", None, mem)).err().unwrap();
        assert!(e.to_string().starts_with("a1 is running (pid "), "{e}");
        drop(_held);
        vmmapi::destroy_in(&base, "a1").unwrap();
        let _ = std::fs::remove_dir_all(&base);
    }
}
