//! MSI-X: the vector table and pending bit array a function exposes in a BAR.
//!
//! The device forwards guest accesses to the table and PBA ranges of its BAR here, calls
//! [`MsixTable::control_written`] from `PciDevice::config_written` (enable / function mask
//! live in the capability's message control), and raises vector `v` with
//! [`MsixTable::notify`]: delivered now when enabled and unmasked, otherwise its pending bit is
//! set and the message goes out when the vector (or the function) is unmasked.
//!
//! Each vector's message is announced to the sink ([`InterruptSink::msix_route`]) when the
//! vector becomes able to fire — MSI-X enabled, function and vector unmasked — and whenever
//! the guest changes the address or data of such a vector; raising it is then
//! [`InterruptSink::msix`] (over KVM: one irqfd write on the vector's own GSI). Masked
//! vectors are not routed: the guest programs entries masked and unmasks them when ready,
//! so the route follows what the guest finished writing, not every intermediate dword.

use super::config::{PciConfig, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use super::InterruptSink;

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: usize = 16;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// Outcome of [`MsixTable::notify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixNotify {
    /// The message was sent.
    Delivered,
    /// The vector or function is masked: the pending bit is set.
    Pending,
    /// MSI-X is disabled (use INTx) or the vector does not exist.
    Disabled,
}

/// One function's MSI-X table and PBA.
#[derive(Debug, Clone)]
pub struct MsixTable {
    table: Vec<u8>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// The message last announced to the sink per vector.
    routed: Vec<Option<(u64, u32)>>,
}

impl MsixTable {
    /// A table of `vectors` entries (clamped to 1..=2048), all masked as after reset.
    pub fn new(vectors: u16) -> Self {
        let n = usize::from(vectors.clamp(1, 2048));
        let mut table = vec![0u8; n * ENTRY_SIZE];
        for e in table.chunks_mut(ENTRY_SIZE) {
            e[12..16].copy_from_slice(&VECTOR_MASKED.to_le_bytes());
        }
        Self {
            table,
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routed: vec![None; n],
        }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> usize {
        self.table.len() / ENTRY_SIZE
    }

    /// Size in bytes of the table region.
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64
    }

    /// Size in bytes of the PBA region (whole qwords).
    pub fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// Whether MSI-X is enabled (message control bit 15).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Back to the reset state (entries masked, nothing pending, disabled).
    pub fn reset(&mut self) {
        *self = Self::new(self.vectors() as u16);
    }

    fn entry_u32(&self, v: usize, field: usize) -> u32 {
        let o = v * ENTRY_SIZE + field * 4;
        self.table
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    fn masked(&self, v: usize) -> bool {
        self.function_masked || self.entry_u32(v, 3) & VECTOR_MASKED != 0
    }

    fn is_pending(&self, v: usize) -> bool {
        self.pending
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if let Some(w) = self.pending.get_mut(v / 64) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    fn message(&self, v: usize) -> (u64, u32) {
        let addr = u64::from(self.entry_u32(v, 0)) | u64::from(self.entry_u32(v, 1)) << 32;
        (addr, self.entry_u32(v, 2))
    }

    /// Announces vector `v`'s message to the sink if it can fire and the sink has not seen
    /// this message yet. Returns the message.
    fn sync_route(&mut self, v: usize, sink: &dyn InterruptSink) -> (u64, u32) {
        let msg = self.message(v);
        if self.enabled && !self.masked(v) {
            if let Some(r) = self.routed.get_mut(v) {
                if *r != Some(msg) {
                    *r = Some(msg);
                    sink.msix_route(v as u16, msg.0, msg.1);
                }
            }
        }
        msg
    }

    fn sync_routes(&mut self, vectors: std::ops::Range<usize>, sink: &dyn InterruptSink) {
        for v in vectors {
            self.sync_route(v, sink);
        }
    }

    fn send(&mut self, v: usize, sink: &dyn InterruptSink) {
        let (addr, data) = self.sync_route(v, sink);
        sink.msix(v as u16, addr, data);
    }

    /// Raises `vector`: delivered when enabled and unmasked, else left pending.
    pub fn notify(&mut self, vector: u16, sink: &dyn InterruptSink) -> MsixNotify {
        let v = usize::from(vector);
        if !self.enabled || v >= self.vectors() {
            return MsixNotify::Disabled;
        }
        if self.masked(v) {
            self.set_pending(v, true);
            MsixNotify::Pending
        } else {
            self.send(v, sink);
            MsixNotify::Delivered
        }
    }

    fn deliver_unmasked_pending(&mut self, sink: &dyn InterruptSink) {
        if !self.enabled {
            return;
        }
        for v in 0..self.vectors() {
            if self.is_pending(v) && !self.masked(v) {
                self.set_pending(v, false);
                self.send(v, sink);
            }
        }
    }

    /// Re-reads enable / function mask from `cfg`'s MSI-X capability; an unmask delivers
    /// pending messages. Call from `PciDevice::config_written`.
    pub fn control_written(&mut self, cfg: &PciConfig, sink: &dyn InterruptSink) {
        let ctl = cfg.msix_control();
        self.enabled = ctl & MSIX_ENABLE != 0;
        self.function_masked = ctl & MSIX_FUNCTION_MASK != 0;
        self.sync_routes(0..self.vectors(), sink);
        self.deliver_unmasked_pending(sink);
    }

    /// Announces every vector that can fire again, whatever the sink was told before (its
    /// routes were reused meanwhile, e.g. for a passed-through function's MSI).
    pub fn reannounce(&mut self, sink: &dyn InterruptSink) {
        self.routed.iter_mut().for_each(|r| *r = None);
        self.sync_routes(0..self.vectors(), sink);
    }

    /// Guest read of the table at `offset` (relative to the table start).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.table.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Guest write to the table; only bit 0 of vector control is writable there. A vector
    /// that can fire gets its new message routed; unmasking a pending vector delivers it.
    pub fn table_write(&mut self, offset: u64, data: &[u8], sink: &dyn InterruptSink) {
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
            else {
                break;
            };
            let Some(slot) = self.table.get_mut(o) else {
                break;
            };
            *slot = match o % ENTRY_SIZE {
                12 => *b & VECTOR_MASKED as u8,
                13..=15 => 0,
                _ => *b,
            };
        }
        let n = self.vectors();
        let entry = |o: u64| usize::try_from(o / ENTRY_SIZE as u64).map_or(n, |v| v.min(n));
        let end = offset.saturating_add(data.len() as u64 + ENTRY_SIZE as u64 - 1);
        self.sync_routes(entry(offset)..entry(end), sink);
        self.deliver_unmasked_pending(sink);
    }

    /// Guest read of the PBA at `offset` (relative to the PBA start); writes are ignored.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.pending.get(o / 8).map(|w| w.to_le_bytes()[o % 8]))
                .unwrap_or(0);
        }
    }
}

impl MsixTable {
    /// The table and pending bits (enable and function mask live in config space).
    pub fn save_state(&self, w: &mut platform::codec::Writer) {
        w.bytes(&self.table);
        w.u32(self.pending.len() as u32);
        for p in &self.pending {
            w.u64(*p);
        }
    }

    /// Puts back [`save_state`](Self::save_state)'s table; call
    /// [`control_written`](Self::control_written) afterwards with the restored config
    /// space, which announces every live vector's route to the (new) sink.
    pub fn restore_state(
        &mut self,
        r: &mut platform::codec::Reader<'_>,
    ) -> Result<(), crate::lifecycle::LifecycleError> {
        let table = r.bytes("MSI-X table")?;
        let n = r.count(8, "MSI-X pending")?;
        if table.len() != self.table.len() || n != self.pending.len() {
            return Err(crate::lifecycle::LifecycleError::BadState(format!(
                "MSI-X table of {} bytes, this function's has {}",
                table.len(),
                self.table.len()
            )));
        }
        self.table.copy_from_slice(table);
        for p in self.pending.iter_mut() {
            *p = r.u64("MSI-X pending")?;
        }
        self.routed.fill(None);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pci::{BarKind, BarSpec};

    /// One call on the sink, in order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Event {
        Route(u16, u64, u32),
        Fire(u16, u64, u32),
    }

    /// Records every message and INTx level, and the MSI-X routes and vectors in order.
    #[derive(Default)]
    pub struct Recorder {
        pub msis: Mutex<Vec<(u64, u32)>>,
        pub intx: Mutex<Vec<bool>>,
        pub events: Mutex<Vec<Event>>,
        /// The message each vector is routed to, as a KVM sink would have it.
        pub routes: Mutex<std::collections::BTreeMap<u16, (u64, u32)>>,
    }

    impl Recorder {
        /// Takes the recorded MSI-X events.
        pub fn take_events(&self) -> Vec<Event> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    impl InterruptSink for Recorder {
        fn msi(&self, addr: u64, data: u32) {
            self.msis.lock().unwrap().push((addr, data));
        }
        fn intx(&self, level: bool) {
            self.intx.lock().unwrap().push(level);
        }
        fn msix_route(&self, vector: u16, addr: u64, data: u32) {
            self.routes.lock().unwrap().insert(vector, (addr, data));
            self.events
                .lock()
                .unwrap()
                .push(Event::Route(vector, addr, data));
        }
        fn msix(&self, vector: u16, addr: u64, data: u32) {
            // Every vector fires with the message last routed for it.
            let routed = self.routes.lock().unwrap().get(&vector).copied();
            assert_eq!(routed, Some((addr, data)), "vector {vector} fired unrouted");
            self.events
                .lock()
                .unwrap()
                .push(Event::Fire(vector, addr, data));
            self.msi(addr, data);
        }
    }

    fn setup() -> (PciConfig, MsixTable, u16) {
        let mut c = PciConfig::new(1, 2, (0xff, 0, 0), 0);
        c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: 0x1000,
                prefetchable: false,
            },
        );
        let cap = c.add_msix_capability(3, 0, 0, 0, 0x800).unwrap();
        (c, MsixTable::new(3), cap.offset)
    }

    fn program(t: &mut MsixTable, v: u64, addr: u64, data: u32, s: &Recorder) {
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..12].copy_from_slice(&data.to_le_bytes());
        e[12] = 1; // still masked
        t.table_write(v * 16, &e, s);
    }

    #[test]
    fn mask_pending_unmask() {
        let s = Recorder::default();
        let (mut c, mut t, cap) = setup();
        assert_eq!(t.notify(0, &s), MsixNotify::Disabled);
        program(&mut t, 0, 0xfee0_0000, 0x41, &s);
        program(&mut t, 2, 0xfee0_1000, 0x42, &s);
        // Enable with the function masked.
        c.write(
            u64::from(cap + 2),
            &(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes(),
        );
        t.control_written(&c, &s);
        assert_eq!(t.notify(0, &s), MsixNotify::Pending);
        assert_eq!(t.notify(2, &s), MsixNotify::Pending);
        assert_eq!(t.notify(3, &s), MsixNotify::Disabled);
        let mut pba = [0u8; 8];
        t.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b101);
        // Function unmasked: vectors are still individually masked.
        c.write(u64::from(cap + 2), &MSIX_ENABLE.to_le_bytes());
        t.control_written(&c, &s);
        assert!(s.msis.lock().unwrap().is_empty());
        // Unmask vector 2: its pending message goes out, the bit clears.
        t.table_write(2 * 16 + 12, &[0, 0, 0, 0], &s);
        assert_eq!(*s.msis.lock().unwrap(), vec![(0xfee0_1000, 0x42)]);
        t.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b001);
        assert_eq!(t.notify(2, &s), MsixNotify::Delivered);
        assert_eq!(s.msis.lock().unwrap().len(), 2);
        // Reserved vector-control bits read as zero.
        t.table_write(12, &[0xff, 0xff, 0xff, 0xff], &s);
        let mut vc = [0u8; 4];
        t.table_read(12, &mut vc);
        assert_eq!(vc, [1, 0, 0, 0]);
    }

    fn control(c: &mut PciConfig, cap: u16, t: &mut MsixTable, ctl: u16, s: &Recorder) {
        c.write(u64::from(cap + 2), &ctl.to_le_bytes());
        t.control_written(c, s);
    }

    #[test]
    fn reannounce_routes_every_vector_that_can_fire_again() {
        use Event::Route;
        let s = Recorder::default();
        let (mut c, mut t, cap) = setup();
        program(&mut t, 0, 0xfee0_0000, 0x41, &s);
        program(&mut t, 1, 0xfee0_0000, 0x51, &s);
        t.table_write(12, &[0, 0, 0, 0], &s); // vector 0 unmasked, vector 1 stays masked
        control(&mut c, cap, &mut t, MSIX_ENABLE, &s);
        assert_eq!(s.take_events(), [Route(0, 0xfee0_0000, 0x41)]);
        control(&mut c, cap, &mut t, MSIX_ENABLE, &s);
        assert_eq!(s.take_events(), [], "announced once");
        t.reannounce(&s);
        assert_eq!(s.take_events(), [Route(0, 0xfee0_0000, 0x41)]);
    }

    #[test]
    fn routes_follow_the_live_message() {
        use Event::{Fire, Route};
        let s = Recorder::default();
        let (mut c, mut t, cap) = setup();
        // Programmed while disabled and masked: nothing to route yet.
        program(&mut t, 0, 0xfee0_0000, 0x41, &s);
        program(&mut t, 1, 0xfee0_1000, 0x42, &s);
        control(&mut c, cap, &mut t, MSIX_ENABLE, &s);
        assert!(s.take_events().is_empty());
        // Unmasking routes the vector, once.
        t.table_write(12, &[0, 0, 0, 0], &s);
        t.table_write(12, &[0, 0, 0, 0], &s);
        assert_eq!(s.take_events(), vec![Route(0, 0xfee0_0000, 0x41)]);
        assert_eq!(t.notify(0, &s), MsixNotify::Delivered);
        assert_eq!(t.notify(0, &s), MsixNotify::Delivered);
        assert_eq!(
            s.take_events(),
            vec![Fire(0, 0xfee0_0000, 0x41), Fire(0, 0xfee0_0000, 0x41)]
        );
        // Rewriting a live entry (data, then address high) re-routes it on each change;
        // rewriting the same value does not.
        t.table_write(8, &0x51u32.to_le_bytes(), &s);
        t.table_write(8, &0x51u32.to_le_bytes(), &s);
        t.table_write(4, &1u32.to_le_bytes(), &s);
        assert_eq!(
            s.take_events(),
            vec![Route(0, 0xfee0_0000, 0x51), Route(0, 0x1_fee0_0000, 0x51)]
        );
        // A masked vector's new message is routed on unmask, then its pending bit fires.
        t.table_write(12, &[1, 0, 0, 0], &s);
        assert_eq!(t.notify(0, &s), MsixNotify::Pending);
        t.table_write(0, &0xfee0_2000u64.to_le_bytes(), &s);
        assert!(s.take_events().is_empty());
        t.table_write(12, &[0, 0, 0, 0], &s);
        assert_eq!(
            s.take_events(),
            vec![Route(0, 0xfee0_2000, 0x51), Fire(0, 0xfee0_2000, 0x51)]
        );
        // Function mask: no routes, pending bits; unmasking the function routes the vectors
        // that became live (vector 1 unmasked meanwhile) before delivering their messages.
        control(&mut c, cap, &mut t, MSIX_ENABLE | MSIX_FUNCTION_MASK, &s);
        t.table_write(16 + 12, &[0, 0, 0, 0], &s);
        assert_eq!(t.notify(1, &s), MsixNotify::Pending);
        assert!(s.take_events().is_empty());
        control(&mut c, cap, &mut t, MSIX_ENABLE, &s);
        assert_eq!(
            s.take_events(),
            vec![Route(1, 0xfee0_1000, 0x42), Fire(1, 0xfee0_1000, 0x42)]
        );
        // Disabling and re-enabling keeps the routes the sink has.
        control(&mut c, cap, &mut t, 0, &s);
        assert_eq!(t.notify(1, &s), MsixNotify::Disabled);
        control(&mut c, cap, &mut t, MSIX_ENABLE, &s);
        assert!(s.take_events().is_empty());
        // After a reset everything is announced again when it goes live.
        t.reset();
        t.control_written(&c, &s);
        program(&mut t, 2, 0xfee0_3000, 0x43, &s);
        t.table_write(2 * 16 + 12, &[0, 0, 0, 0], &s);
        assert_eq!(t.notify(2, &s), MsixNotify::Delivered);
        assert_eq!(
            s.take_events(),
            vec![Route(2, 0xfee0_3000, 0x43), Fire(2, 0xfee0_3000, 0x43)]
        );
    }

    #[test]
    fn hostile_accesses() {
        let s = Recorder::default();
        let mut t = MsixTable::new(0);
        assert_eq!(t.vectors(), 1);
        let mut b = [0u8; 7];
        t.table_read(u64::MAX - 3, &mut b);
        t.table_write(u64::MAX, &[1, 2, 3], &s);
        t.table_write(10, &[0xff; 100], &s);
        t.pba_read(u64::MAX, &mut b);
        t.pba_read(5, &mut b);
        assert_eq!(t.notify(u16::MAX, &s), MsixNotify::Disabled);
        assert_eq!(MsixTable::new(u16::MAX).vectors(), 2048);
    }
}
