//! The irqchip's level-triggered input lines, wire-ORed across the devices that share one.
//!
//! KVM_IRQ_LINE from userspace has a single source: the last call decides the line. Several
//! PCI functions share an INTx GSI (the swizzle maps 4 pins of 32 slots onto a few lines), and
//! pc-testdev can drive any line, the SCI's included. Without this, one device lowering the
//! line (a guest reading its ISR) cancels another's pending interrupt, which the guest then
//! never sees. Here the line is high while any of its sources holds it high, as on a board.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vmmapi::Vm;

/// The shared lines of one VM.
pub struct IrqLines {
    vm: Arc<Vm>,
    /// GSI → the sources holding it high.
    asserted: Mutex<BTreeMap<u32, BTreeSet<u32>>>,
    next_source: AtomicU32,
}

/// One device's hold on the lines it drives.
pub struct IrqSource {
    lines: Arc<IrqLines>,
    id: u32,
}

impl IrqLines {
    pub fn new(vm: Arc<Vm>) -> Arc<Self> {
        Arc::new(Self {
            vm,
            asserted: Mutex::new(BTreeMap::new()),
            next_source: AtomicU32::new(0),
        })
    }

    /// A new source (one per device that drives lines).
    pub fn source(self: &Arc<Self>) -> IrqSource {
        IrqSource {
            lines: self.clone(),
            id: self.next_source.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Whether any source holds `gsi` high.
    pub fn is_high(&self, gsi: u32) -> bool {
        let asserted = self.asserted.lock().unwrap_or_else(|p| p.into_inner());
        asserted.get(&gsi).is_some_and(|s| !s.is_empty())
    }
}

impl IrqSource {
    /// Sets this source's level on `gsi`; the line follows the OR of all its sources.
    pub fn set(&self, gsi: u32, level: bool) -> vmmapi::Result<()> {
        let mut asserted = self
            .lines
            .asserted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let holders = asserted.entry(gsi).or_default();
        let was_high = !holders.is_empty();
        if level {
            holders.insert(self.id);
        } else {
            holders.remove(&self.id);
        }
        let high = !holders.is_empty();
        if high != was_high {
            // Under the lock: two sources' changes reach KVM in the order they were made.
            self.lines.vm.set_irq_line(gsi, high)?;
        }
        Ok(())
    }
}

/// A small VM with its irqchip, and what its IOAPIC sees, for tests on real KVM.
#[cfg(test)]
pub(crate) mod test_vm {
    use super::*;
    use vmmapi::{Hypervisor, MemoryOptions};

    /// The IOAPIC's IRR: which input lines KVM sees asserted.
    pub(crate) fn ioapic_irr(vm: &Vm) -> u32 {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.raw().get_irqchip(&mut chip).expect("KVM_GET_IRQCHIP");
        // SAFETY: chip_id IOAPIC selects the ioapic member of the union.
        unsafe { chip.chip.ioapic.irr }
    }

    pub(crate) fn vm(name: &str) -> Arc<Vm> {
        let hv = Hypervisor::open()
            .unwrap_or_else(|e| panic!("this test needs KVM and could not open it: {e}"));
        let base = std::env::temp_dir().join(format!("rhyve-irq-lines-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        std::env::set_var("RHYVE_RUNDIR", &base);
        let vm = Vm::create(&hv, name, &[(0, 2 << 20)], &MemoryOptions::default()).unwrap();
        Arc::new(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::test_vm::{ioapic_irr, vm};
    use super::*;

    #[test]
    fn a_shared_line_stays_high_until_every_source_lowers_it() {
        let vm = vm("irq-shared");
        let lines = IrqLines::new(vm.clone());
        let (a, b) = (lines.source(), lines.source());
        let bit = 1 << 16;
        a.set(16, true).unwrap();
        b.set(16, true).unwrap();
        // The guest reads device A's ISR: A lowers its pin; B's interrupt is still pending.
        a.set(16, false).unwrap();
        assert_ne!(
            ioapic_irr(&vm) & bit,
            0,
            "B's pending interrupt was cancelled"
        );
        assert!(lines.is_high(16));
        b.set(16, false).unwrap();
        assert_eq!(ioapic_irr(&vm) & bit, 0);
        // Lowering a line one does not hold changes nothing.
        b.set(16, true).unwrap();
        a.set(16, false).unwrap();
        assert_ne!(ioapic_irr(&vm) & bit, 0);
    }

    #[test]
    fn another_device_cannot_lower_the_sci() {
        let vm = vm("irq-sci");
        let lines = IrqLines::new(vm.clone());
        let (pm, testdev) = (lines.source(), lines.source());
        let sci = platform::irq::SCI_GSI;
        pm.set(sci, true).unwrap();
        testdev.set(sci, false).unwrap();
        assert_ne!(
            ioapic_irr(&vm) & (1 << sci),
            0,
            "pc-testdev overrode the SCI"
        );
    }
}
