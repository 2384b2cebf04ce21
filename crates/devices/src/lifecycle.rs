//! What the VMM can do with any device besides emulating it: pause and resume (a paused
//! device touches neither guest memory nor its backend), ask its state and counters, and save
//! or restore its state (snapshots: [`platform::codec`] bytes, put back into a device built
//! the same way, before any vCPU runs).
//! In the spirit of Cloud Hypervisor's Pausable/Snapshottable and crosvm's sleep/wake.

use std::fmt;

/// Where a device stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// Working (for virtio: the driver set DRIVER_OK).
    Active,
    /// Present, not started by its driver (or reset).
    Inactive,
    /// Paused by the VMM.
    Paused,
    /// Failed (a worker panicked, or the driver's setup was refused): the driver must reset it.
    NeedsReset,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Active => "active",
            DeviceState::Inactive => "inactive",
            DeviceState::Paused => "paused",
            DeviceState::NeedsReset => "needs-reset",
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a lifecycle action failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// the device's worker did not stop within {0:?}
    #[error("the device's worker did not stop within {0:?}")]
    PauseTimeout(std::time::Duration),
    /// the device cannot save or restore its state yet
    #[error("the device cannot save or restore its state yet")]
    Unsupported,
    /// the saved state does not fit this device
    #[error("{0}")]
    BadState(String),
}

impl From<platform::codec::DecodeError> for LifecycleError {
    fn from(e: platform::codec::DecodeError) -> Self {
        LifecycleError::BadState(e.to_string())
    }
}

/// A change to a running device's backend (Firecracker's `PATCH /drives/{id}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceUpdate {
    /// virtio-blk: serve this image from now on (same options; the guest sees a
    /// configuration change with the new capacity).
    BackingFile(std::path::PathBuf),
    /// virtio-blk: these limits from now on.
    BlockRate(crate::rate_limiter::RateLimits),
    /// virtio-net: new limits for what the guest receives and/or sends.
    NetRate {
        rx: Option<crate::rate_limiter::RateLimits>,
        tx: Option<crate::rate_limiter::RateLimits>,
    },
}

/// A named counter.
pub type Stat = (&'static str, u64);

/// The VMM's handle on a device. Every method has a default for devices without a worker or
/// counters (their state lives in registers that only vCPUs touch, and vCPUs pause first).
pub trait Lifecycle {
    /// Stops every access to guest memory and to the backend; returns once the worker is
    /// parked. Idempotent.
    fn pause(&mut self) -> Result<(), LifecycleError> {
        Ok(())
    }
    /// Undoes [`pause`](Self::pause); work that arrived meanwhile is done now.
    fn resume(&mut self) {}
    fn state(&self) -> DeviceState {
        DeviceState::Active
    }
    /// Counters for `rhyvectl --get-stats`.
    fn stats(&self) -> Vec<Stat> {
        Vec::new()
    }
    /// The device's state, for a snapshot.
    fn save_state(&self) -> Result<Vec<u8>, LifecycleError> {
        Err(LifecycleError::Unsupported)
    }
    /// Puts back what [`save_state`](Self::save_state) returned.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), LifecycleError> {
        Err(LifecycleError::Unsupported)
    }
    /// Applies `update` while the guest runs; the error is for the user.
    fn update(&mut self, _update: &DeviceUpdate) -> Result<(), String> {
        Err("this device cannot be changed while it runs".into())
    }
}
