//! Address-range buses (one for port I/O, one for MMIO).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Bus construction errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing device's range.
    #[error("{new} at {base:#x}+{len:#x} overlaps {existing}")]
    Overlap {
        new: String,
        existing: String,
        base: u64,
        len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("{name}: invalid range {base:#x}+{len:#x}")]
    BadRange { name: String, base: u64, len: u64 },
}

/// One device's place on the bus, with its access counter (rhyvectl --get-stats).
pub struct BusEntry {
    pub base: u64,
    pub len: u64,
    pub name: String,
    pub device: Arc<Mutex<dyn BusDevice>>,
    pub accesses: AtomicU64,
}

/// Devices keyed by non-overlapping address ranges, sorted by base.
#[derive(Default)]
pub struct Bus {
    entries: Vec<BusEntry>,
    unhandled: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at [base, base+len); overlapping ranges are refused.
    pub fn insert(
        &mut self,
        name: &str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| BusError::BadRange {
                name: name.to_string(),
                base,
                len,
            })?;
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap {
                new: name.to_string(),
                existing: e.name.clone(),
                base,
                len,
            });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(
            at,
            BusEntry {
                base,
                len,
                name: name.to_string(),
                device,
                accesses: AtomicU64::new(0),
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(usize, &BusEntry)> {
        let idx = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let e = self.entries.get(idx)?;
        let last = addr.checked_add(size.max(1) as u64 - 1)?;
        (last < e.base + e.len).then_some((idx, e))
    }

    /// Dispatches a read; unclaimed addresses read as all-ones (a floating ISA bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.read_indexed(addr, data).is_some()
    }

    /// Dispatches a write; unclaimed addresses are ignored (and counted).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.write_indexed(addr, data).is_some()
    }

    /// Number of devices on the bus (the indices [`Self::read_indexed`] returns are below it).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the bus has no devices.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// [`Self::read`], returning which device (index in [`Self::stats`] order) claimed it, so
    /// a vCPU can keep its own per-device counts.
    pub fn read_indexed(&self, addr: u64, data: &mut [u8]) -> Option<usize> {
        match self.find(addr, data.len()) {
            Some((i, e)) => {
                e.accesses.fetch_add(1, Ordering::Relaxed);
                e.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(addr - e.base, data);
                Some(i)
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
                None
            }
        }
    }

    /// [`Self::write`], returning which device claimed it (see [`Self::read_indexed`]).
    pub fn write_indexed(&self, addr: u64, data: &[u8]) -> Option<usize> {
        match self.find(addr, data.len()) {
            Some((i, e)) => {
                e.accesses.fetch_add(1, Ordering::Relaxed);
                e.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(addr - e.base, data);
                Some(i)
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// (name, base, accesses) per device, for statistics.
    pub fn stats(&self) -> Vec<(String, u64, u64)> {
        self.entries
            .iter()
            .map(|e| (e.name.clone(), e.base, e.accesses.load(Ordering::Relaxed)))
            .collect()
    }

    /// Accesses no device claimed.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(Vec<u8>);
    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.0.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = self.0.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
    }

    fn dev(n: usize) -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(Scratch(vec![0; n])))
    }

    #[test]
    fn offsets_are_relative_and_overlaps_refused() {
        let mut bus = Bus::new();
        bus.insert("a", 0x3f8, 8, dev(8)).unwrap();
        bus.insert("b", 0x2f8, 8, dev(8)).unwrap();
        assert!(matches!(
            bus.insert("c", 0x3fc, 8, dev(8)),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert("d", 0x3f0, 9, dev(8)),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert("e", u64::MAX, 2, dev(8)),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert("f", 0x10, 0, dev(8)),
            Err(BusError::BadRange { .. })
        ));
        assert!(bus.write(0x3f9, &[0x42]));
        let mut b = [0u8];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b[0], 0x42);
        assert!(bus.read(0x2f9, &mut b));
        assert_eq!(b[0], 0);
        // Indices follow the stats order (sorted by base).
        assert_eq!(bus.len(), 2);
        assert_eq!(bus.read_indexed(0x2f8, &mut b), Some(0));
        assert_eq!(bus.write_indexed(0x3ff, &[1]), Some(1));
        assert_eq!(bus.write_indexed(0x400, &[1]), None);
        assert_eq!(bus.stats()[1].0, "a");
    }

    #[test]
    fn unclaimed_and_straddling_accesses() {
        let mut bus = Bus::new();
        bus.insert("a", 0x100, 4, dev(4)).unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x200, &mut b));
        assert_eq!(b, [0xff; 4]);
        // An access running past the device's end is not the device's.
        assert!(!bus.read(0x102, &mut b));
        assert!(!bus.write(u64::MAX, &[1, 2]));
        assert_eq!(bus.unhandled(), 3);
    }
}
