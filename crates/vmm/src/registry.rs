//! The devices of a built machine, by id: what the VMM pauses and resumes (after and before
//! the vCPUs), what `rhyvectl --get-stats` reports per device, and what a snapshot will walk.

use std::sync::MutexGuard;

use devices::lifecycle::{DeviceState, Stat};
use devices::pci::root::SharedPciDevice;
use devices::pci::PciDevice;
use serde_json::{json, Value};

/// A PCI function's saved state, by its (bus, slot, function) address.
pub type SavedFunction = ((u8, u8, u8), Vec<u8>);

/// One registered device.
pub struct RegisteredDevice {
    /// Unique in the machine (the resources' id).
    pub id: String,
    /// The emulation's name (`virtio-blk`, `hostbridge`, ...).
    pub emulation: &'static str,
    /// Its PCI address (bus, slot, function).
    pub address: (u8, u8, u8),
    pub dev: SharedPciDevice,
}

impl RegisteredDevice {
    fn lock(&self) -> MutexGuard<'_, dyn PciDevice + 'static> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one device reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    pub id: String,
    pub emulation: &'static str,
    pub address: (u8, u8, u8),
    pub state: DeviceState,
    pub counters: Vec<Stat>,
}

impl DeviceReport {
    /// The report as the control protocol's `stats.pci[]` entries.
    pub fn to_json(&self) -> Value {
        let (b, s, f) = self.address;
        let counters: serde_json::Map<String, Value> = self
            .counters
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        json!({
            "id": self.id,
            "emulation": self.emulation,
            "address": format!("{b}:{s}:{f}"),
            "state": self.state.as_str(),
            "counters": counters,
        })
    }
}

/// The machine's devices, in the order they were added.
#[derive(Default)]
pub struct DeviceRegistry {
    devices: Vec<RegisteredDevice>,
}

impl DeviceRegistry {
    /// Adds a device; ids must be unique.
    pub fn add(&mut self, device: RegisteredDevice) -> Result<(), String> {
        if self.devices.iter().any(|d| d.id == device.id) {
            return Err(format!("device id {:?} is used twice", device.id));
        }
        self.devices.push(device);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Pauses every device; if one cannot be paused, those already paused are resumed and
    /// the error names the device.
    pub fn pause_all(&self) -> Result<(), String> {
        for (i, d) in self.devices.iter().enumerate() {
            if let Err(e) = d.lock().pause() {
                for done in &self.devices[..i] {
                    done.lock().resume();
                }
                return Err(format!("{}: {e}", d.id));
            }
        }
        Ok(())
    }

    /// Resumes every device.
    pub fn resume_all(&self) {
        for d in &self.devices {
            d.lock().resume();
        }
    }

    /// Applies `update` to device `id` (while the guest runs).
    pub fn update(
        &self,
        id: &str,
        update: &devices::lifecycle::DeviceUpdate,
    ) -> Result<(), String> {
        let d = self
            .devices
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| format!("no device {id}"))?;
        let mut dev = d.lock();
        dev.update(update)
    }

    /// Every function's saved state, by address (the VM is paused); a function that cannot
    /// be saved fails the whole snapshot, naming it.
    pub fn save_all(&self) -> Result<Vec<SavedFunction>, String> {
        self.devices
            .iter()
            .map(|d| {
                let state = d.lock().save_state().map_err(|e| {
                    let (b, s, f) = d.address;
                    format!("{} ({b}:{s}:{f} {}): {e}", d.id, d.emulation)
                })?;
                Ok((d.address, state))
            })
            .collect()
    }

    /// The functions as a snapshot lists them: `B:D:F emulation`.
    pub fn layout(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| {
                let (b, s, f) = d.address;
                format!("{b}:{s}:{f} {}", d.emulation)
            })
            .collect()
    }

    /// The functions' addresses.
    pub fn addresses(&self) -> Vec<(u8, u8, u8)> {
        self.devices.iter().map(|d| d.address).collect()
    }

    /// Every device's state and counters.
    pub fn reports(&self) -> Vec<DeviceReport> {
        self.devices
            .iter()
            .map(|d| {
                let dev = d.lock();
                DeviceReport {
                    id: d.id.clone(),
                    emulation: d.emulation,
                    address: d.address,
                    state: dev.state(),
                    counters: dev.stats(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::lifecycle::{Lifecycle, LifecycleError};
    use devices::pci::{PciConfig, PciDevice};
    use std::sync::{Arc, Mutex};

    /// A function that counts pauses and can refuse them.
    struct Counting {
        config: PciConfig,
        paused: bool,
        refuse: bool,
        pauses: u64,
    }

    impl Lifecycle for Counting {
        fn pause(&mut self) -> Result<(), LifecycleError> {
            if self.refuse {
                return Err(LifecycleError::PauseTimeout(std::time::Duration::ZERO));
            }
            self.paused = true;
            self.pauses += 1;
            Ok(())
        }
        fn resume(&mut self) {
            self.paused = false;
        }
        fn state(&self) -> DeviceState {
            if self.paused {
                DeviceState::Paused
            } else {
                DeviceState::Active
            }
        }
        fn stats(&self) -> Vec<Stat> {
            vec![("pauses", self.pauses)]
        }
    }

    impl PciDevice for Counting {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    }

    fn device(id: &str, slot: u8, refuse: bool) -> RegisteredDevice {
        let dev = Counting {
            config: PciConfig::new(0x1af4, 0x1040, (0xff, 0, 0), 0),
            paused: false,
            refuse,
            pauses: 0,
        };
        RegisteredDevice {
            id: id.into(),
            emulation: "counting",
            address: (0, slot, 0),
            dev: Arc::new(Mutex::new(dev)),
        }
    }

    #[test]
    fn pause_all_or_none() {
        let mut r = DeviceRegistry::default();
        r.add(device("a", 2, false)).unwrap();
        r.add(device("b", 3, false)).unwrap();
        assert!(r.add(device("a", 4, false)).is_err());
        r.pause_all().unwrap();
        assert!(r.reports().iter().all(|d| d.state == DeviceState::Paused));
        r.resume_all();
        r.add(device("c", 5, true)).unwrap();
        assert_eq!(
            r.pause_all().unwrap_err(),
            "c: the device's worker did not stop within 0ns"
        );
        let reports = r.reports();
        assert!(reports.iter().all(|d| d.state == DeviceState::Active));
        assert_eq!(reports[0].counters, vec![("pauses", 2)]);
        let j = reports[1].to_json();
        assert_eq!(j["id"], "b");
        assert_eq!(j["address"], "0:3:0");
        assert_eq!(j["state"], "active");
        assert_eq!(j["counters"]["pauses"], 2);
    }
}
