//! Opening /dev/kvm and checking what it can do.

use kvm_ioctls::{Cap, Kvm};

use crate::{Error, Result};

/// Environment variable overriding the KVM device path (tests use it).
pub const KVM_DEV_ENV: &str = "RHYVE_KVM_DEV";

/// Capabilities the VMM cannot work without, with a human name each.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// An open KVM device: the system-level handle (bhyve: the vmm.ko module).
pub struct Hypervisor {
    pub(crate) kvm: Kvm,
}

impl Hypervisor {
    /// Opens `/dev/kvm` (or `$RHYVE_KVM_DEV`) and checks API version and capabilities.
    pub fn open() -> Result<Self> {
        let path = std::env::var(KVM_DEV_ENV).unwrap_or_else(|_| "/dev/kvm".to_string());
        Self::open_path(&path)
    }

    /// Opens a specific KVM device node.
    pub fn open_path(path: &str) -> Result<Self> {
        let open_err = |source| Error::OpenKvm {
            path: path.to_string(),
            source,
        };
        let cpath = std::ffi::CString::new(path)
            .map_err(|_| open_err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
        let kvm = Kvm::new_with_path(&cpath)
            .map_err(|e| open_err(std::io::Error::from_raw_os_error(e.errno())))?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(Error::MissingCap(name));
            }
        }
        Ok(Self { kvm })
    }

    /// The maximum number of vCPUs KVM recommends for one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_nr_vcpus()
    }

    /// Whether an optional capability is present.
    pub fn has_cap(&self, cap: Cap) -> bool {
        self.kvm.check_extension(cap)
    }

    /// The raw kvm-ioctls handle, for features this API does not wrap yet.
    pub fn raw(&self) -> &Kvm {
        &self.kvm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_a_clear_error() {
        let err = Hypervisor::open_path("/nonexistent/kvm")
            .err()
            .map(|e| e.to_string());
        let msg = err.unwrap_or_default();
        assert!(msg.contains("/nonexistent/kvm"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn non_kvm_device_is_refused() {
        // /dev/null opens but is not KVM: the API-version ioctl must fail cleanly.
        assert!(Hypervisor::open_path("/dev/null").is_err());
    }
}
