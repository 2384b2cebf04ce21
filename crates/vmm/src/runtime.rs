//! A running VM's state and the actions on it, in one place: the control socket (rhyvectl)
//! and later the Firecracker API act through [`VmController::act`], never on vCPUs or
//! devices themselves. The rules are a pure function ([`plan`]), unit-tested; the controller
//! carries them out: a pause parks every vCPU first (nothing new reaches the devices), then
//! every device (no more DMA or backend I/O); a resume goes the other way round.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::{StopReason, VmControl};

use crate::registry::DeviceRegistry;
use crate::snapshot::{CheckpointReport, SnapshotFiles, SnapshotParts};
use crate::vcpu_ctl::VcpuCtl;

/// How long a pause waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a VM stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Resources known, nothing built or running yet.
    Configured,
    Running,
    Paused,
    /// A stop was requested (or happened): the VM is going away.
    Stopped,
}

impl VmState {
    /// The name the control protocol uses.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Configured => "configured",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopping",
        }
    }
}

/// What can be asked of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// vCPUs and devices stop (bhyvectl --suspend's first half, Firecracker's Paused).
    Pause,
    Resume,
    /// Stop the VM: bhyve's exit status follows the reason (reset 0, power-off 1).
    Stop(StopReason),
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// the VM is not running yet
    #[error("the VM is not running yet")]
    NotStarted,
    /// the VM is stopping
    #[error("the VM is stopping")]
    Stopping,
    /// the VM is running: registers can only be set while it is paused (rhyvectl --pause)
    #[error("the VM is running: registers can only be set while it is paused (rhyvectl --pause)")]
    NotPaused,
    /// cannot pause: {0}
    #[error("cannot pause: {0}")]
    Pause(String),
    /// the snapshot failed: {0}
    #[error("the snapshot failed: {0}")]
    Snapshot(String),
}

/// What carrying out an action takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Already so.
    Nothing,
    PauseAll,
    ResumeAll,
    /// Request this stop (after answering whoever asked: the answer must get out first).
    Stop(StopReason),
}

/// The rules: what `action` means in `state`.
pub fn plan(state: VmState, action: &Action) -> Result<Step, ActionError> {
    use VmState::*;
    match (state, action) {
        (Stopped, _) => Err(ActionError::Stopping),
        (Configured, _) => Err(ActionError::NotStarted),
        (Running, Action::Pause) => Ok(Step::PauseAll),
        (Paused, Action::Pause) | (Running, Action::Resume) => Ok(Step::Nothing),
        (Paused, Action::Resume) => Ok(Step::ResumeAll),
        (Running | Paused, Action::Stop(reason)) => Ok(Step::Stop(reason.clone())),
    }
}

/// A running VM's handles and state.
pub struct VmController {
    state: Mutex<VmState>,
    vcpus: Vec<Arc<VcpuCtl>>,
    devices: Arc<DeviceRegistry>,
    control: Arc<VmControl>,
    /// What a checkpoint saves besides vCPUs and PCI functions (None: cannot be saved).
    snapshot: Option<SnapshotParts>,
}

impl VmController {
    /// A controller for a VM that is about to start (state [`VmState::Configured`]).
    pub fn new(
        vcpus: Vec<Arc<VcpuCtl>>,
        devices: Arc<DeviceRegistry>,
        control: Arc<VmControl>,
    ) -> Self {
        VmController {
            state: Mutex::new(VmState::Configured),
            vcpus,
            devices,
            control,
            snapshot: None,
        }
    }

    /// Lets [`checkpoint`](Self::checkpoint) save this machine.
    pub fn with_snapshots(mut self, parts: SnapshotParts) -> Self {
        self.snapshot = Some(parts);
        self
    }

    /// Writes the snapshot `file` (+ FILE.kern), pausing a running VM for it. Afterwards the
    /// VM runs again as it was, except with `suspend`: then it stays paused and the caller
    /// requests [`StopReason::Suspended`] once it has answered.
    pub fn checkpoint(
        &self,
        files: &SnapshotFiles,
        suspend: bool,
        extra: Vec<(String, Vec<u8>)>,
    ) -> Result<CheckpointReport, ActionError> {
        let mut state = self.lock();
        let parts = self.snapshot.as_ref().ok_or_else(|| {
            ActionError::Snapshot("this VM cannot be saved (a firmware boot)".into())
        })?;
        let was_running = match *state {
            VmState::Running => {
                self.pause_all()?;
                *state = VmState::Paused;
                true
            }
            VmState::Paused => false,
            VmState::Stopped => return Err(ActionError::Stopping),
            VmState::Configured => return Err(ActionError::NotStarted),
        };
        let result = crate::snapshot::checkpoint(parts, &self.vcpus, &self.devices, files, extra)
            .map_err(|e| ActionError::Snapshot(format!("{e:#}")));
        if was_running && !(suspend && result.is_ok()) {
            self.resume_all();
            *state = VmState::Running;
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, VmState> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.control.stopping() {
            *s = VmState::Stopped;
        }
        s
    }

    /// The vCPU threads run.
    pub fn started(&self) {
        let mut s = self.lock();
        if *s == VmState::Configured {
            *s = VmState::Running;
        }
    }

    /// The vCPU threads exist but were asked to park before running guest code
    /// ([`VcpuCtl::request_pause`] before they started), and the devices were left paused
    /// (a restore that waits for a resume).
    pub fn started_paused(&self) {
        let mut s = self.lock();
        if *s == VmState::Configured {
            *s = VmState::Paused;
        }
    }

    pub fn state(&self) -> VmState {
        *self.lock()
    }

    pub fn devices(&self) -> &DeviceRegistry {
        &self.devices
    }

    /// Carries out `action` (one at a time); returns the new state and, for a stop, the
    /// reason to pass to [`request_stop`](Self::request_stop) once the caller has answered.
    pub fn act(&self, action: &Action) -> Result<(VmState, Option<StopReason>), ActionError> {
        let mut state = self.lock();
        match plan(*state, action)? {
            Step::Nothing => {}
            Step::PauseAll => {
                self.pause_all()?;
                *state = VmState::Paused;
            }
            Step::ResumeAll => {
                self.resume_all();
                *state = VmState::Running;
            }
            Step::Stop(reason) => return Ok((*state, Some(reason))),
        }
        Ok((*state, None))
    }

    /// Stops the VM (bhyve's exit status follows `reason`).
    pub fn request_stop(&self, reason: StopReason) {
        self.control.request_stop(reason);
    }

    /// Runs `f` while the VM is paused and stays so (a resume waits until `f` returns).
    pub fn while_paused<R>(&self, f: impl FnOnce() -> R) -> Result<R, ActionError> {
        let state = self.lock();
        match *state {
            VmState::Paused => Ok(f()),
            VmState::Stopped => Err(ActionError::Stopping),
            _ => Err(ActionError::NotPaused),
        }
    }

    /// Devices first, then vCPUs (the reverse of a pause).
    fn resume_all(&self) {
        self.devices.resume_all();
        self.vcpus.iter().for_each(|v| v.resume());
    }

    /// vCPUs first, then devices; on any failure everything runs again.
    fn pause_all(&self) -> Result<(), ActionError> {
        self.vcpus.iter().for_each(|v| v.request_pause());
        // One deadline for the whole VM, however many vCPUs.
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        for v in &self.vcpus {
            if let Err(e) = v.wait_parked(deadline.saturating_duration_since(Instant::now())) {
                self.vcpus.iter().for_each(|v| v.resume());
                return Err(ActionError::Pause(e.to_string()));
            }
        }
        if let Err(e) = self.devices.pause_all() {
            self.vcpus.iter().for_each(|v| v.resume());
            return Err(ActionError::Pause(e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    #[test]
    fn the_rules() {
        let stop = Action::Stop(StopReason::PowerOff);
        assert_eq!(plan(Running, &Action::Pause), Ok(Step::PauseAll));
        assert_eq!(plan(Paused, &Action::Pause), Ok(Step::Nothing));
        assert_eq!(plan(Paused, &Action::Resume), Ok(Step::ResumeAll));
        assert_eq!(plan(Running, &Action::Resume), Ok(Step::Nothing));
        assert_eq!(
            plan(Paused, &stop),
            Ok(Step::Stop(StopReason::PowerOff)),
            "a paused VM can be powered off"
        );
        for a in [&Action::Pause, &Action::Resume, &stop] {
            assert_eq!(plan(Configured, a), Err(ActionError::NotStarted));
            assert_eq!(plan(Stopped, a), Err(ActionError::Stopping));
        }
    }

    #[test]
    fn a_vm_without_vcpus_or_devices_pauses_resumes_and_stops() {
        let control = Arc::new(VmControl::new());
        let c = VmController::new(Vec::new(), Arc::default(), control.clone());
        assert_eq!(c.act(&Action::Pause), Err(ActionError::NotStarted));
        c.started();
        assert_eq!(c.state(), Running);
        assert_eq!(c.while_paused(|| 1), Err(ActionError::NotPaused));
        assert_eq!(c.act(&Action::Pause), Ok((Paused, None)));
        assert_eq!(c.while_paused(|| 1), Ok(1));
        assert_eq!(c.act(&Action::Resume), Ok((Running, None)));
        let stop = Action::Stop(StopReason::Reset);
        assert_eq!(c.act(&stop), Ok((Running, Some(StopReason::Reset))));
        assert!(
            !control.stopping(),
            "the caller requests the stop after answering"
        );
        c.request_stop(StopReason::Reset);
        assert_eq!(c.state(), Stopped);
        assert_eq!(c.act(&Action::Resume), Err(ActionError::Stopping));
    }
}
