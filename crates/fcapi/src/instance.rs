//! The started VM as Firecracker's API acts on it, and the API's effects on the host (the
//! logger, the metrics file).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{SystemTime, UNIX_EPOCH};

use devices::lifecycle::DeviceUpdate;
use serde_json::{json, Value};
use vmm::machine::RunningVm;
use vmm::runtime::{Action, VmState};

use crate::api::{Host, Instance};
use crate::model::{Logger, Metrics, RateLimiter};

/// rhyve's VM behind the API.
pub struct FcInstance {
    vm: RunningVm,
    started: std::time::Instant,
}

impl FcInstance {
    pub fn new(vm: RunningVm) -> Self {
        FcInstance {
            vm,
            started: std::time::Instant::now(),
        }
    }
}

impl Instance for FcInstance {
    fn pause(&self) -> Result<(), String> {
        self.vm
            .controller
            .act(&Action::Pause)
            .map(drop)
            .map_err(|e| format!("Failed to pause the microVM: {e}"))
    }

    fn resume(&self) -> Result<(), String> {
        self.vm
            .controller
            .act(&Action::Resume)
            .map(drop)
            .map_err(|e| format!("Failed to resume the microVM: {e}"))
    }

    fn is_paused(&self) -> bool {
        self.vm.controller.state() == VmState::Paused
    }

    fn send_ctrl_alt_del(&self) -> Result<(), String> {
        if self.is_paused() {
            return Err("Cannot send Ctrl-Alt-Del to a paused microVM.".into());
        }
        self.vm
            .keyboard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .press_ctrl_alt_del();
        Ok(())
    }

    fn metrics(&self) -> Value {
        let devices: serde_json::Map<String, Value> = self
            .vm
            .controller
            .devices()
            .reports()
            .iter()
            .map(|r| (r.id.clone(), r.to_json()["counters"].clone()))
            .collect();
        json!({
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "state": self.vm.controller.state().as_str(),
            "devices": devices,
        })
    }

    fn update_drive(
        &self,
        index: usize,
        path: Option<&str>,
        rate: Option<&RateLimiter>,
    ) -> Result<(), String> {
        let id = crate::assemble::drive_device_id(index);
        let devices = self.vm.controller.devices();
        if let Some(path) = path {
            devices
                .update(&id, &DeviceUpdate::BackingFile(path.into()))
                .map_err(|e| format!("Block: {e}"))?;
        }
        if let Some(rate) = rate {
            devices
                .update(&id, &DeviceUpdate::BlockRate(crate::assemble::limits(rate)))
                .map_err(|e| format!("Block: {e}"))?;
        }
        Ok(())
    }

    fn update_network(
        &self,
        position: usize,
        rx: Option<&RateLimiter>,
        tx: Option<&RateLimiter>,
    ) -> Result<(), String> {
        let id = crate::assemble::device_slot_id("virtio-net", position);
        self.vm
            .controller
            .devices()
            .update(
                &id,
                &DeviceUpdate::NetRate {
                    rx: rx.map(crate::assemble::limits),
                    tx: tx.map(crate::assemble::limits),
                },
            )
            .map_err(|e| format!("Failed perform action on device: {e}"))
    }

    fn create_snapshot(
        &self,
        state: &std::path::Path,
        memory: &std::path::Path,
        resources: Vec<u8>,
    ) -> Result<(), String> {
        let files = vmm::snapshot::SnapshotFiles {
            memory: memory.to_path_buf(),
            state: state.to_path_buf(),
        };
        let extra = vec![(crate::api::RESOURCES_SECTION.to_string(), resources)];
        self.vm
            .controller
            .checkpoint(&files, false, extra)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// `PUT /logger`'s effect.
pub fn apply_logger(l: &Logger) -> Result<(), String> {
    crate::logger::configure(&crate::logger::LoggerConfig {
        path: l.log_path.as_deref(),
        // Without a level, Info (Firecracker's).
        level: Some(l.level.map_or(log::LevelFilter::Info, |v| v.filter())),
        show_level: l.show_level,
        show_origin: l.show_log_origin,
        module: l.module.as_deref(),
    })
    .map_err(|e| {
        format!(
            "Failed to open target file: {}: {e}",
            l.log_path.as_deref().unwrap_or("")
        )
    })
}

/// The logger and the metrics file.
#[derive(Default)]
pub struct HostEffects {
    metrics: Option<File>,
}

impl Host for HostEffects {
    fn configure_logger(&mut self, l: &Logger) -> Result<(), String> {
        apply_logger(l)
    }

    fn configure_metrics(&mut self, m: &Metrics) -> Result<(), String> {
        // Non-blocking: a FIFO nobody reads loses lines, it does not stop the API.
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&m.metrics_path)
            .map_err(|e| format!("Failed to open target file: {}: {e}", m.metrics_path))?;
        self.metrics = Some(f);
        Ok(())
    }

    fn flush_metrics(&mut self, metrics: Value) -> Result<(), String> {
        let Some(f) = &mut self.metrics else {
            return Err("The metrics system is not initialized.".into());
        };
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut line = json!({ "utc_timestamp_ms": ms });
        if let (Some(o), Value::Object(m)) = (line.as_object_mut(), metrics) {
            o.extend(m);
        }
        f.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("Failed to write metrics: {e}"))
    }
}
