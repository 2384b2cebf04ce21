//! vmmapi — rhyve's libvmmapi: a small, safe API over Linux KVM.
//!
//! bhyve's libvmmapi wraps `/dev/vmm/NAME`; here a VM is a named object too:
//! [`Hypervisor::open`] opens `/dev/kvm` (path overridable with `RHYVE_KVM_DEV`)
//! and checks the capabilities rhyve relies on, [`Vm::create`] makes a named VM
//! whose guest RAM is one shared, file-backed mapping living in the VM's runtime
//! directory (so the host can read guest memory like bhyve's `/dev/vmm/NAME`),
//! and [`Vcpu::run`] returns a typed [`VmExit`].
//!
//! ```no_run
//! use vmmapi::{Hypervisor, Vm, VmExit};
//! let hv = Hypervisor::open()?;
//! let vm = Vm::create(&hv, "vm0", &[(0, 256 << 20)], &Default::default())?;
//! let mut vcpu = vm.create_vcpu(0, &vmmapi::Topology::flat(1))?;
//! match vcpu.run()? {
//!     VmExit::IoOut { port, data, .. } => println!("out {port:#x} {data:?}"),
//!     other => println!("{other:?}"),
//! }
//! # Ok::<(), vmmapi::Error>(())
//! ```

pub mod control;
mod cpuid;
mod flash;
pub mod hugepages;
mod hypervisor;
pub mod irq_routing;
mod memory;
mod object;
mod rundir;
mod state;
mod vcpu;
pub mod vfio;
mod vm;

pub use cpuid::Topology;
pub use flash::FlashMemory;
pub use hugepages::HugePages;
pub use hypervisor::{Hypervisor, KVM_DEV_ENV, REQUIRED_CAPS};
pub use irq_routing::{GsiTable, IrqRouting, Route};
pub use memory::{GuestRam, MemoryOptions};
pub use object::{
    base as rundir_base, destroy, destroy_in, list, list_in, ObjectInfo, ObjectState, VmObject,
    BOOT_STATE_FILE, CONFIG_FILE, MEMORY_FILE, PID_FILE,
};
pub use rundir::{valid_name as valid_vm_name, RunDir, RUNDIR_ENV};
pub use state::{VcpuState, VmState};
pub use vcpu::{InternalError, MpState, Registers, Vcpu, VmExit};
pub use vm::{HostMemory, MemorySlot, Vm, IDENTITY_MAP_ADDRESS, KVM_PRIVATE_LEN};

/// Guest memory type used throughout rhyve (rust-vmm's vm-memory).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Everything that can go wrong talking to KVM. The doc comment is the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// cannot open the KVM device
    #[error("cannot open {path}: {source} (is the kvm module loaded and do you have access?)")]
    OpenKvm {
        path: String,
        source: std::io::Error,
    },
    /// KVM API version mismatch
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// missing capability
    #[error("KVM lacks a capability rhyve needs: {0}")]
    MissingCap(&'static str),
    /// a KVM ioctl failed
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    /// guest memory could not be set up
    #[error("guest memory: {0}")]
    Memory(String),
    /// runtime directory problem
    #[error("VM runtime directory {path}: {msg}")]
    RunDir { path: String, msg: String },
    /// another live process owns this VM name
    #[error("a VM named {name:?} already exists (pid {pid})")]
    VmExists { name: String, pid: i32 },
    /// a live process uses this VM object
    #[error("{name} is running (pid {pid})")]
    InUse { name: String, pid: i32 },
    /// the object's last user died without releasing it
    #[error(
        "stale VM object {name} (pid {pid} gone); remove it with rhyvectl --vm={name} --destroy"
    )]
    Stale { name: String, pid: i32 },
    /// create: the object is already there (idle)
    #[error("VM object {0} already exists")]
    Exists(String),
    /// open/destroy: no such object
    #[error("no VM object named {0}")]
    NoObject(String),
    /// GSI routing problem
    #[error("interrupt routing: {0}")]
    IrqRouting(String),
    /// saved state that this KVM does not accept
    #[error("{0}")]
    State(String),
    /// a host PCI function cannot be passed through (the message says why and what to do)
    #[error("{0}")]
    Vfio(String),
    /// bad VM name
    #[error("invalid VM name {0:?}: use letters, digits, '-', '_' and '.', at most 64 characters")]
    BadName(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
