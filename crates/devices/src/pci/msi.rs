//! MSI (PCI Local Bus 3.0 §6.8.1): the one-vector, 64-bit, per-vector-masking capability
//! [`PciConfig::add_msi_capability`] declares, and [`Msi`], the device side of it.
//!
//! The registers live in the function's config space, written by the guest; [`Msi`] reads
//! them from there. A device raises its vector with [`Msi::notify`]: the message
//! (address, data) goes to [`InterruptSink::msi`] when MSI is enabled and the vector is
//! unmasked, otherwise (enabled, masked) the pending bit is set and the message goes out when
//! the guest unmasks it — [`Msi::config_written`], called from `PciDevice::config_written`,
//! delivers it then. While MSI is disabled nothing is sent or latched (the function uses
//! INTx, or MSI-X, which takes precedence over MSI when both are enabled — the device's
//! choice, see `virtio::pci`).
//!
//! A device whose interrupts are raised on another thread than the one owning its
//! [`PciConfig`] uses [`Msi::notify_latched`]: it works on the registers as of the last
//! [`Msi::config_written`] (the guest can only change them through config writes, each of
//! which is followed by that call, so they are the live values), and the pending bit reaches
//! config space at the next [`Msi::publish`] (or `config_written`).
//!
//! With Multiple Message Enable fixed at 0 the data register is sent as written; bits 1:0 of
//! the address are reserved (read as 0).

use super::config::{
    PciConfig, MSI_ADDR_HI, MSI_ADDR_LO, MSI_CONTROL, MSI_DATA, MSI_ENABLE, MSI_MASK, MSI_PENDING,
};
use super::InterruptSink;

pub use super::config::MsiCapability;

/// Outcome of [`Msi::notify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsiNotify {
    /// The message was sent.
    Delivered,
    /// The vector is masked: its pending bit is set.
    Pending,
    /// MSI is disabled (or the function has no MSI capability): use INTx.
    Disabled,
}

/// The guest-programmed MSI registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiRegs {
    pub enabled: bool,
    pub masked: bool,
    pub addr: u64,
    pub data: u32,
}

impl MsiRegs {
    /// Reads the registers of the capability at `cap` in `cfg`.
    pub fn read(cfg: &PciConfig, cap: MsiCapability) -> Self {
        let o = cap.offset;
        Self {
            enabled: cfg.read_u16(o + MSI_CONTROL) & MSI_ENABLE != 0,
            masked: cfg.read_u32(o + MSI_MASK) & 1 != 0,
            addr: u64::from(cfg.read_u32(o + MSI_ADDR_LO) & !3)
                | u64::from(cfg.read_u32(o + MSI_ADDR_HI)) << 32,
            data: u32::from(cfg.read_u16(o + MSI_DATA)),
        }
    }
}

/// One function's MSI state: the capability's registers (as last read) and the pending bit.
#[derive(Debug, Clone)]
pub struct Msi {
    cap: MsiCapability,
    regs: MsiRegs,
    pending: bool,
}

impl Msi {
    /// For the capability at `cap` (from [`PciConfig::add_msi_capability`]); disabled.
    pub fn new(cap: MsiCapability) -> Self {
        Self {
            cap,
            regs: MsiRegs::default(),
            pending: false,
        }
    }

    /// For `cfg`'s MSI capability, None without one.
    pub fn from_config(cfg: &PciConfig) -> Option<Self> {
        let cap = cfg.msi()?;
        let mut m = Self::new(cap);
        m.regs = MsiRegs::read(cfg, cap);
        Some(m)
    }

    /// Whether MSI is enabled (as of the last [`Msi::config_written`] or [`Msi::notify`]).
    pub fn enabled(&self) -> bool {
        self.regs.enabled
    }

    /// The registers as last read.
    pub fn regs(&self) -> MsiRegs {
        self.regs
    }

    /// Whether the vector's message is pending (raised while masked).
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Raises the vector with the live registers of `cfg`; updates the pending bit there.
    pub fn notify(&mut self, cfg: &mut PciConfig, sink: &dyn InterruptSink) -> MsiNotify {
        self.regs = MsiRegs::read(cfg, self.cap);
        let r = self.notify_latched(sink);
        self.publish(cfg);
        r
    }

    /// Raises the vector with the registers as of the last [`Msi::config_written`]; the pending
    /// bit reaches config space at the next [`Msi::publish`].
    pub fn notify_latched(&mut self, sink: &dyn InterruptSink) -> MsiNotify {
        if !self.regs.enabled {
            return MsiNotify::Disabled;
        }
        if self.regs.masked {
            self.pending = true;
            return MsiNotify::Pending;
        }
        sink.msi(self.regs.addr, self.regs.data);
        MsiNotify::Delivered
    }

    /// Re-reads the registers after a guest config write: an unmasked pending vector is
    /// delivered (and its pending bit cleared); disabling MSI drops a pending message.
    /// Call from `PciDevice::config_written`.
    pub fn config_written(&mut self, cfg: &mut PciConfig, sink: &dyn InterruptSink) {
        self.regs = MsiRegs::read(cfg, self.cap);
        if !self.regs.enabled {
            self.pending = false;
        } else if self.pending && !self.regs.masked {
            self.pending = false;
            sink.msi(self.regs.addr, self.regs.data);
        }
        self.publish(cfg);
    }

    /// Writes the pending bit into config space (read-only to the guest).
    pub fn publish(&self, cfg: &mut PciConfig) {
        cfg.set_u32(self.cap.offset + MSI_PENDING, u32::from(self.pending));
    }

    /// Back to no message pending (the registers are the guest's: they stay).
    pub fn clear_pending(&mut self, cfg: &mut PciConfig) {
        self.pending = false;
        self.publish(cfg);
    }
}

impl Msi {
    /// Takes registers and pending bit from a restored config space (both live there).
    pub fn restore_from(&mut self, cfg: &PciConfig) {
        self.regs = MsiRegs::read(cfg, self.cap);
        self.pending = self.regs.enabled && cfg.read_u32(self.cap.offset + MSI_PENDING) & 1 != 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{
        CAPABILITIES_PTR, CAP_ID_MSI, MSI_64BIT, MSI_CAP_LEN, MSI_PER_VECTOR_MASK, STATUS,
        STATUS_CAP_LIST,
    };
    use crate::pci::msix::tests::Recorder;

    fn setup() -> (PciConfig, Msi, u16) {
        let mut c = PciConfig::new(1, 2, (0xff, 0, 0), 0);
        let cap = c.add_msi_capability().unwrap();
        let m = Msi::from_config(&c).unwrap();
        (c, m, cap.offset)
    }

    /// A guest config write followed by the device hook, as PciRoot does it.
    fn w(c: &mut PciConfig, m: &mut Msi, s: &Recorder, off: u16, data: &[u8]) {
        c.write(u64::from(off), data);
        m.config_written(c, s);
    }

    #[test]
    fn capability_layout_and_write_masks() {
        let (mut c, _, cap) = setup();
        assert_ne!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(u16::from(c.read_u8(CAPABILITIES_PTR)), cap);
        assert_eq!(c.read_u8(cap), CAP_ID_MSI);
        assert_eq!(c.read_u8(cap + 1), 0);
        // 64-bit, per-vector masking, MMC = 0, disabled.
        assert_eq!(
            c.read_u16(cap + MSI_CONTROL),
            MSI_64BIT | MSI_PER_VECTOR_MASK
        );
        // Every writable field at once: only the writable bits stick.
        c.write(u64::from(cap), &[0xff; MSI_CAP_LEN as usize]);
        assert_eq!(c.read_u8(cap), CAP_ID_MSI);
        assert_eq!(c.read_u8(cap + 1), 0);
        assert_eq!(
            c.read_u16(cap + MSI_CONTROL),
            MSI_64BIT | MSI_PER_VECTOR_MASK | MSI_ENABLE
        );
        assert_eq!(c.read_u32(cap + MSI_ADDR_LO), 0xffff_fffc);
        assert_eq!(c.read_u32(cap + MSI_ADDR_HI), 0xffff_ffff);
        assert_eq!(c.read_u32(cap + MSI_DATA), 0x0000_ffff); // reserved upper half
        assert_eq!(c.read_u32(cap + MSI_MASK), 1);
        assert_eq!(c.read_u32(cap + MSI_PENDING), 0);
        // One MSI capability per function.
        assert!(c.add_msi_capability().is_none());
    }

    #[test]
    fn disabled_masked_pending_unmask() {
        let s = Recorder::default();
        let (mut c, mut m, cap) = setup();
        assert_eq!(m.notify(&mut c, &s), MsiNotify::Disabled);
        // Program while disabled: nothing goes out, nothing is latched.
        w(
            &mut c,
            &mut m,
            &s,
            cap + MSI_ADDR_LO,
            &0xfee0_1000u32.to_le_bytes(),
        );
        w(&mut c, &mut m, &s, cap + MSI_ADDR_HI, &0u32.to_le_bytes());
        w(&mut c, &mut m, &s, cap + MSI_DATA, &0x4142u16.to_le_bytes());
        w(&mut c, &mut m, &s, cap + MSI_MASK, &1u32.to_le_bytes());
        assert_eq!(m.notify(&mut c, &s), MsiNotify::Disabled);
        assert!(!m.pending());
        // Enabled, masked: pending, visible in config space.
        w(
            &mut c,
            &mut m,
            &s,
            cap + MSI_CONTROL,
            &MSI_ENABLE.to_le_bytes(),
        );
        assert!(m.enabled());
        assert_eq!(m.notify(&mut c, &s), MsiNotify::Pending);
        assert_eq!(m.notify(&mut c, &s), MsiNotify::Pending);
        assert_eq!(c.read_u32(cap + MSI_PENDING), 1);
        assert!(s.msis.lock().unwrap().is_empty());
        // The guest cannot clear the pending bit itself.
        w(&mut c, &mut m, &s, cap + MSI_PENDING, &0u32.to_le_bytes());
        assert_eq!(c.read_u32(cap + MSI_PENDING), 1);
        assert!(s.msis.lock().unwrap().is_empty());
        // Unmask: the one pending message (not two) goes out with the live registers.
        w(&mut c, &mut m, &s, cap + MSI_MASK, &0u32.to_le_bytes());
        assert_eq!(*s.msis.lock().unwrap(), vec![(0xfee0_1000, 0x4142)]);
        assert_eq!(c.read_u32(cap + MSI_PENDING), 0);
        // Unmasked: delivered at once; a 64-bit address is sent whole.
        w(&mut c, &mut m, &s, cap + MSI_ADDR_HI, &1u32.to_le_bytes());
        assert_eq!(m.notify(&mut c, &s), MsiNotify::Delivered);
        assert_eq!(s.msis.lock().unwrap()[1], (0x1_fee0_1000, 0x4142));
        // Masked, pending, then disabled: the message is dropped, not sent on re-enable.
        w(&mut c, &mut m, &s, cap + MSI_MASK, &1u32.to_le_bytes());
        assert_eq!(m.notify(&mut c, &s), MsiNotify::Pending);
        w(&mut c, &mut m, &s, cap + MSI_CONTROL, &0u16.to_le_bytes());
        assert_eq!(c.read_u32(cap + MSI_PENDING), 0);
        w(
            &mut c,
            &mut m,
            &s,
            cap + MSI_CONTROL,
            &MSI_ENABLE.to_le_bytes(),
        );
        w(&mut c, &mut m, &s, cap + MSI_MASK, &0u32.to_le_bytes());
        assert_eq!(s.msis.lock().unwrap().len(), 2);
        assert!(s.intx.lock().unwrap().is_empty());
    }

    #[test]
    fn latched_notify_publishes_later() {
        let s = Recorder::default();
        let (mut c, mut m, cap) = setup();
        w(
            &mut c,
            &mut m,
            &s,
            cap + MSI_ADDR_LO,
            &0xfee0_0000u32.to_le_bytes(),
        );
        w(&mut c, &mut m, &s, cap + MSI_DATA, &0x42u16.to_le_bytes());
        w(&mut c, &mut m, &s, cap + MSI_MASK, &1u32.to_le_bytes());
        w(
            &mut c,
            &mut m,
            &s,
            cap + MSI_CONTROL,
            &MSI_ENABLE.to_le_bytes(),
        );
        assert_eq!(m.notify_latched(&s), MsiNotify::Pending);
        assert_eq!(c.read_u32(cap + MSI_PENDING), 0);
        m.publish(&mut c);
        assert_eq!(c.read_u32(cap + MSI_PENDING), 1);
        w(&mut c, &mut m, &s, cap + MSI_MASK, &0u32.to_le_bytes());
        assert_eq!(*s.msis.lock().unwrap(), vec![(0xfee0_0000, 0x42)]);
        assert_eq!(m.notify_latched(&s), MsiNotify::Delivered);
        m.clear_pending(&mut c);
        assert!(!m.pending());
    }

    #[test]
    fn hostile_writes() {
        let s = Recorder::default();
        let (mut c, mut m, cap) = setup();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Anywhere in and around the capability, any width, any value.
            let off = cap.wrapping_sub(4) + (x % u64::from(MSI_CAP_LEN + 8)) as u16;
            let n = ((x >> 8) % 9) as usize;
            let v = (x >> 16).to_le_bytes();
            w(&mut c, &mut m, &s, off, &v[..n]);
            if x & 3 == 0 {
                let r = m.notify(&mut c, &s);
                let regs = MsiRegs::read(&c, MsiCapability { offset: cap });
                let expect = match (regs.enabled, regs.masked) {
                    (false, _) => MsiNotify::Disabled,
                    (true, true) => MsiNotify::Pending,
                    (true, false) => MsiNotify::Delivered,
                };
                assert_eq!(r, expect);
            }
            // Invariants: read-only bits hold, pending only while enabled and masked.
            assert_eq!(c.read_u8(cap), CAP_ID_MSI);
            assert_eq!(
                c.read_u16(cap + MSI_CONTROL) & !MSI_ENABLE,
                MSI_64BIT | MSI_PER_VECTOR_MASK
            );
            assert_eq!(c.read_u32(cap + MSI_ADDR_LO) & 3, 0);
            assert_eq!(c.read_u16(cap + MSI_DATA + 2), 0);
            assert_eq!(c.read_u32(cap + MSI_MASK) & !1, 0);
            let p = c.read_u32(cap + MSI_PENDING);
            assert!(p <= 1);
            assert_eq!(p == 1, m.pending());
            if p == 1 {
                assert!(m.enabled() && m.regs().masked);
            }
        }
        // Every message that went out carried the data register as written (16 bits).
        assert!(s
            .msis
            .lock()
            .unwrap()
            .iter()
            .all(|&(a, d)| a & 3 == 0 && d <= 0xffff));
        assert!(s.intx.lock().unwrap().is_empty());
    }
}
