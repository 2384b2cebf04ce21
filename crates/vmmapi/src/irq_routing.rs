//! The VM's GSI routing table (KVM_SET_GSI_ROUTING): the PC's fixed irqchip routes plus MSI
//! routes allocated at run time, one GSI each, for MSI-X vectors delivered through irqfds.
//!
//! KVM only accepts the table as a whole, so every change re-commits every entry. The
//! bookkeeping ([`GsiTable`]: which GSIs are free, what each routes to, the entry list) is
//! plain data and unit-tested without KVM; [`IrqRouting`] puts it behind a mutex and commits
//! it through the VM fd. [`crate::Vm`] owns one and exposes it as `allocate_msi_gsi`,
//! `set_msi_route`, `remove_route`, `register_irqfd`, `unregister_irqfd`.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;

use crate::{kvm_err, Error, Result};

/// First GSI handed out for MSI routes: 0–23 are the IOAPIC's (and 0–15 the PICs').
pub const FIRST_MSI_GSI: u32 = 24;

/// What one GSI is routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Pin `pin` of in-kernel irqchip `chip` (`KVM_IRQCHIP_*`).
    Irqchip { chip: u32, pin: u32 },
    /// An MSI message.
    Msi { addr: u64, data: u32 },
}

impl Route {
    fn entry(self, gsi: u32) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry {
            gsi,
            ..Default::default()
        };
        match self {
            Route::Irqchip { chip, pin } => {
                e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                e.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
            }
            Route::Msi { addr, data } => {
                e.type_ = KVM_IRQ_ROUTING_MSI;
                e.u.msi = kvm_irq_routing_msi {
                    address_lo: addr as u32,
                    address_hi: (addr >> 32) as u32,
                    data,
                    ..Default::default()
                };
            }
        }
        e
    }
}

/// The PC's wiring, as firmware tables (MP table, MADT) describe it: ISA IRQs 0–15 reach the
/// 8259 pair and the IOAPIC, except that the PIT's IRQ 0 arrives on IOAPIC pin 2 (the
/// interrupt source override every PC has); GSIs 16–23 are IOAPIC-only. KVM's default routing
/// sends GSI 0 to pin 0, which would leave a guest that follows the tables without a timer.
pub fn pc_routes() -> Vec<(u32, Route)> {
    let mut routes = Vec::new();
    for irq in (0..16).filter(|i| *i != 2) {
        let (chip, pin) = if irq < 8 {
            (KVM_IRQCHIP_PIC_MASTER, irq)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, irq - 8)
        };
        routes.push((irq, Route::Irqchip { chip, pin }));
    }
    routes.push((
        0,
        Route::Irqchip {
            chip: KVM_IRQCHIP_IOAPIC,
            pin: 2,
        },
    ));
    for gsi in (1..24).filter(|g| *g != 2) {
        routes.push((
            gsi,
            Route::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: gsi,
            },
        ));
    }
    routes
}

/// The routing table's bookkeeping, without KVM.
#[derive(Debug, Clone)]
pub struct GsiTable {
    /// Fixed routes (a GSI may have several: the PIC and the IOAPIC).
    fixed: Vec<(u32, Route)>,
    /// Allocated MSI GSIs; None until a message is set (no entry is committed for them).
    msi: BTreeMap<u32, Option<(u64, u32)>>,
    /// GSIs must stay below this (KVM's KVM_MAX_IRQ_ROUTES).
    limit: u32,
}

impl GsiTable {
    /// `fixed` routes plus MSI GSIs in [FIRST_MSI_GSI, `limit`).
    pub fn new(fixed: Vec<(u32, Route)>, limit: u32) -> Self {
        let limit = limit.min(KVM_MAX_IRQ_ROUTES as u32);
        Self {
            fixed,
            msi: BTreeMap::new(),
            limit,
        }
    }

    /// The lowest free GSI at or above [`FIRST_MSI_GSI`], now allocated (no route yet).
    pub fn allocate(&mut self) -> Option<u32> {
        // Every route is one entry and KVM takes at most KVM_MAX_IRQ_ROUTES of them.
        if self.fixed.len() + self.msi.len() >= KVM_MAX_IRQ_ROUTES {
            return None;
        }
        let mut gsi = FIRST_MSI_GSI;
        for &used in self.msi.keys() {
            if used != gsi {
                break;
            }
            gsi += 1;
        }
        if gsi >= self.limit {
            return None;
        }
        self.msi.insert(gsi, None);
        Some(gsi)
    }

    /// Routes allocated `gsi` to the MSI message (`addr`, `data`). Returns whether the table
    /// changed (false: same message already set), None when `gsi` is not allocated.
    pub fn set_msi(&mut self, gsi: u32, addr: u64, data: u32) -> Option<bool> {
        let slot = self.msi.get_mut(&gsi)?;
        let changed = *slot != Some((addr, data));
        *slot = Some((addr, data));
        Some(changed)
    }

    /// Frees MSI GSI `gsi`. Returns whether it had a committed route (the table changed).
    pub fn remove(&mut self, gsi: u32) -> bool {
        matches!(self.msi.remove(&gsi), Some(Some(_)))
    }

    /// The MSI message `gsi` routes to, if allocated and set.
    pub fn msi(&self, gsi: u32) -> Option<(u64, u32)> {
        self.msi.get(&gsi).copied().flatten()
    }

    /// Number of allocated MSI GSIs.
    pub fn msi_allocated(&self) -> usize {
        self.msi.len()
    }

    /// Every route KVM must get, fixed ones first.
    pub fn routes(&self) -> Vec<(u32, Route)> {
        let msi = self
            .msi
            .iter()
            .filter_map(|(&gsi, m)| m.map(|(addr, data)| (gsi, Route::Msi { addr, data })));
        self.fixed.iter().copied().chain(msi).collect()
    }

    /// The table as KVM_SET_GSI_ROUTING's argument.
    pub fn kvm_routing(&self) -> Result<KvmIrqRouting> {
        let entries: Vec<_> = self.routes().into_iter().map(|(g, r)| r.entry(g)).collect();
        KvmIrqRouting::from_entries(&entries)
            .map_err(|_| Error::IrqRouting("GSI routing table too large".into()))
    }
}

/// The VM's routing table behind a mutex, committed to KVM on every change.
#[derive(Debug)]
pub struct IrqRouting {
    table: Mutex<GsiTable>,
}

impl IrqRouting {
    /// The PC routes plus MSI GSIs below `limit`; commits them.
    pub(crate) fn new(fd: &VmFd, limit: u32) -> Result<Self> {
        let table = GsiTable::new(pc_routes(), limit);
        commit(fd, &table)?;
        Ok(Self {
            table: Mutex::new(table),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GsiTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn allocate_msi_gsi(&self) -> Result<u32> {
        self.lock()
            .allocate()
            .ok_or_else(|| Error::IrqRouting("no free GSI for an MSI route".into()))
    }

    pub(crate) fn set_msi_route(&self, fd: &VmFd, gsi: u32, addr: u64, data: u32) -> Result<()> {
        let mut t = self.lock();
        let old = t.msi(gsi);
        match t.set_msi(gsi, addr, data) {
            None => Err(Error::IrqRouting(format!(
                "GSI {gsi} is not an allocated MSI GSI"
            ))),
            Some(false) => Ok(()),
            Some(true) => commit(fd, &t).inspect_err(|_| {
                // Keep the bookkeeping equal to what KVM has.
                match old {
                    Some((a, d)) => {
                        let _ = t.set_msi(gsi, a, d);
                    }
                    None => {
                        t.msi.insert(gsi, None);
                    }
                }
            }),
        }
    }

    pub(crate) fn remove_route(&self, fd: &VmFd, gsi: u32) -> Result<()> {
        let mut t = self.lock();
        if t.remove(gsi) {
            commit(fd, &t)?;
        }
        Ok(())
    }

    /// A copy of the bookkeeping (tests, diagnostics).
    pub(crate) fn snapshot(&self) -> GsiTable {
        self.lock().clone()
    }
}

fn commit(fd: &VmFd, table: &GsiTable) -> Result<()> {
    fd.set_gsi_routing(&table.kvm_routing()?)
        .map_err(kvm_err("KVM_SET_GSI_ROUTING"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(limit: u32) -> GsiTable {
        GsiTable::new(pc_routes(), limit)
    }

    #[test]
    fn pc_routes_match_the_firmware_tables() {
        let r = pc_routes();
        // 15 ISA IRQs on the PICs (no IRQ 2), 23 IOAPIC pins (no pin 0: GSI 0 → pin 2).
        assert_eq!(r.len(), 15 + 23);
        let gsi0: Vec<_> = r.iter().filter(|(g, _)| *g == 0).map(|(_, r)| *r).collect();
        assert_eq!(
            gsi0,
            vec![
                Route::Irqchip {
                    chip: KVM_IRQCHIP_PIC_MASTER,
                    pin: 0
                },
                Route::Irqchip {
                    chip: KVM_IRQCHIP_IOAPIC,
                    pin: 2
                }
            ]
        );
        assert!(r.iter().all(|(g, _)| *g != 2));
        assert!(r.contains(&(
            9,
            Route::Irqchip {
                chip: KVM_IRQCHIP_PIC_SLAVE,
                pin: 1
            }
        )));
        assert!(r.contains(&(
            23,
            Route::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: 23
            }
        )));
    }

    #[test]
    fn allocate_set_remove_reuse() {
        let mut t = table(4096);
        let fixed = t.routes().len();
        let a = t.allocate().unwrap();
        let b = t.allocate().unwrap();
        assert_eq!((a, b), (24, 25));
        // Allocated but unrouted GSIs are not committed.
        assert_eq!(t.routes().len(), fixed);
        assert_eq!(t.set_msi(b, 0xfee0_1000, 0x4041), Some(true));
        assert_eq!(t.set_msi(b, 0xfee0_1000, 0x4041), Some(false));
        assert_eq!(t.set_msi(99, 0, 0), None);
        assert_eq!(t.msi(b), Some((0xfee0_1000, 0x4041)));
        assert_eq!(t.msi(a), None);
        let routes = t.routes();
        assert_eq!(routes.len(), fixed + 1);
        assert_eq!(
            routes.last(),
            Some(&(
                25,
                Route::Msi {
                    addr: 0xfee0_1000,
                    data: 0x4041
                }
            ))
        );
        // The lowest free GSI is reused.
        assert!(!t.remove(a));
        assert_eq!(t.allocate(), Some(24));
        assert!(t.remove(b));
        assert!(!t.remove(b));
        assert_eq!(t.allocate(), Some(25));
        assert_eq!(t.allocate(), Some(26));
        assert_eq!(t.msi_allocated(), 3);
    }

    #[test]
    fn limits() {
        let mut t = table(27);
        assert_eq!(t.allocate(), Some(24));
        assert_eq!(t.allocate(), Some(25));
        assert_eq!(t.allocate(), Some(26));
        assert_eq!(t.allocate(), None);
        t.remove(25);
        assert_eq!(t.allocate(), Some(25));
        // A limit above KVM's is clamped; the entry count is bounded too.
        let mut t = table(u32::MAX);
        let mut n = 0;
        while let Some(g) = t.allocate() {
            t.set_msi(g, 0xfee0_0000, g).unwrap();
            n += 1;
        }
        assert_eq!(n + pc_routes().len(), KVM_MAX_IRQ_ROUTES);
        assert!(t.kvm_routing().is_ok());
    }

    #[test]
    fn kvm_entries() {
        let mut t = table(4096);
        let g = t.allocate().unwrap();
        t.set_msi(g, 0x1_fee0_3000, 0x4a).unwrap();
        let k = t.kvm_routing().unwrap();
        let e = k.as_slice().last().copied().unwrap();
        assert_eq!((e.gsi, e.type_), (g, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI entry, as type_ says.
        let m = unsafe { e.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_3000, 1, 0x4a));
        let first = k.as_slice()[0];
        assert_eq!((first.gsi, first.type_), (0, KVM_IRQ_ROUTING_IRQCHIP));
        // SAFETY: an irqchip entry.
        let c = unsafe { first.u.irqchip };
        assert_eq!((c.irqchip, c.pin), (KVM_IRQCHIP_PIC_MASTER, 0));
    }
}
