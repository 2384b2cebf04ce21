//! ACPI PM1a event/control blocks and the 0xCF9 reset register, at bhyve's addresses.
//! The control block's S5 request (SLP_EN with SLP_TYP 5) powers the VM off.

use std::sync::Arc;

use crate::{BusDevice, StopReason, VmControl};

use platform::ports;

/// PM1a event block: status (2 bytes) + enable (2 bytes), at the PM block's base.
pub const PM1A_EVT_LEN: u64 = ports::PM1A_EVT_LEN as u64;
/// PM1a control block (2 bytes).
pub const PM1A_CNT_OFFSET: u64 = ports::PM1A_CNT_OFFSET as u64;
pub const PM1A_CNT_LEN: u64 = ports::PM1A_CNT_LEN as u64;
/// Reset control register.
pub const RESET_PORT: u16 = ports::RESET_PORT;
/// ACPI PM timer, a 32-bit counter (FADT TMR_VAL_EXT).
pub const PM_TIMER_OFFSET: u64 = ports::PM_TIMER_OFFSET as u64;
pub const PM_TIMER_LEN: u64 = ports::PM_TIMER_LEN as u64;
/// The PM timer runs at 3.579545 MHz.
pub const PM_TIMER_HZ: u128 = 3_579_545;

const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 7;
/// The SLP_TYP our _S5 object announces.
pub const SLP_TYP_S5: u16 = 5;
const SCI_EN: u16 = 1;

/// Byte `i` of an access at `offset` within `regs`, if it lands inside.
fn reg_index(offset: u64, i: usize) -> Option<usize> {
    usize::try_from(offset).ok()?.checked_add(i)
}

/// The SCI's GSI (level-triggered active high in the MADT; the FADT's SCI_INT).
pub const SCI_GSI: u32 = platform::irq::SCI_GSI;

/// PM1 status/enable bit 8: the fixed-feature power button.
pub const PWRBTN: u16 = 1 << 8;

/// Drives the SCI line (GSI 9, level-triggered, active high): `true` asserts it.
pub type SciLine = Box<dyn FnMut(bool) + Send>;

/// PM1 event block: status bits are write-one-to-clear. The only event source is the
/// fixed-feature power button; while `status & enable` has a bit set the SCI is asserted
/// (SCI_EN is hardwired to 1 in [`Pm1Control`]: there is no legacy mode to leave).
pub struct Pm1Event {
    status: u16,
    enable: u16,
    sci: SciLine,
    /// The level last driven, to skip redundant line updates.
    sci_level: bool,
}

impl Default for Pm1Event {
    fn default() -> Self {
        Self::new(Box::new(|_| {}))
    }
}

impl Pm1Event {
    /// An event block driving the SCI through `sci`.
    pub fn new(sci: SciLine) -> Self {
        Self {
            status: 0,
            enable: 0,
            sci,
            sci_level: false,
        }
    }

    /// Whether the guest's OS enabled the power button event (PWRBTN_EN).
    pub fn power_button_enabled(&self) -> bool {
        self.enable & PWRBTN != 0
    }

    /// Presses the power button: sets PWRBTN_STS and raises the SCI if the guest enabled
    /// the event. Returns whether the guest listens (PWRBTN_EN set).
    pub fn press_power_button(&mut self) -> bool {
        self.status |= PWRBTN;
        self.update_sci();
        self.power_button_enabled()
    }

    /// Whether the SCI is currently asserted.
    pub fn sci_asserted(&self) -> bool {
        self.sci_level
    }

    fn update_sci(&mut self) {
        // SCI_EN is always set (see Pm1Control), so status & enable alone decide.
        let level = self.status & self.enable != 0;
        if level != self.sci_level {
            self.sci_level = level;
            (self.sci)(level);
        }
    }
}

impl BusDevice for Pm1Event {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = [self.status.to_le_bytes(), self.enable.to_le_bytes()].concat();
        for (i, b) in data.iter_mut().enumerate() {
            *b = reg_index(offset, i)
                .and_then(|j| regs.get(j))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            match reg_index(offset, i).unwrap_or(usize::MAX) {
                0 => self.status &= !u16::from(b),
                1 => self.status &= !(u16::from(b) << 8),
                2 => self.enable = (self.enable & 0xff00) | u16::from(b),
                3 => self.enable = (self.enable & 0x00ff) | (u16::from(b) << 8),
                _ => {}
            }
        }
        self.update_sci();
    }
}

/// PM1 control block.
pub struct Pm1Control {
    value: u16,
    control: Arc<VmControl>,
}

impl Pm1Control {
    /// A control block that reports S5 to `control`.
    pub fn new(control: Arc<VmControl>) -> Self {
        // SCI_EN set: we boot in ACPI mode, there is no SMM to hand over from.
        Self {
            value: SCI_EN,
            control,
        }
    }
}

impl BusDevice for Pm1Control {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = reg_index(offset, i)
                .and_then(|j| bytes.get(j))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.value.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = reg_index(offset, i).and_then(|j| bytes.get_mut(j)) {
                *slot = b;
            }
        }
        let v = u16::from_le_bytes(bytes);
        // SLP_EN is write-only: it triggers the transition and never reads back set.
        self.value = (v & !SLP_EN) | SCI_EN;
        if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLP_TYP_S5 {
            self.control.request_stop(StopReason::PowerOff);
        }
    }
}

/// 0xCF9: bit 2 (RST_CPU) resets the machine.
pub struct ResetControl {
    value: u8,
    control: Arc<VmControl>,
}

impl ResetControl {
    /// A reset register reporting to `control`.
    pub fn new(control: Arc<VmControl>) -> Self {
        Self { value: 0, control }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        self.value = v & 0x0a; // keep SYS_RST and FULL_RST, as chipsets do
        if v & 0x04 != 0 {
            self.control.request_stop(StopReason::Reset);
        }
    }
}

/// The ACPI PM timer: a free-running 32-bit count of 3.579545 MHz ticks since VM start.
pub struct PmTimer {
    start: std::time::Instant,
}

impl PmTimer {
    /// A timer counting from now.
    pub fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
        }
    }

    fn ticks(&self) -> u32 {
        (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u32
    }
}

impl Default for PmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for PmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.ticks().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = reg_index(offset, i)
                .and_then(|j| bytes.get(j))
                .copied()
                .unwrap_or(0);
        }
    }

    /// The counter is read-only.
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// PM1 status and enable; the SCI is driven again from them (the line is level-triggered
/// and the new process starts with it low).
impl crate::lifecycle::Lifecycle for Pm1Event {
    fn save_state(&self) -> Result<Vec<u8>, crate::lifecycle::LifecycleError> {
        let mut w = platform::codec::Writer::new();
        w.u16(self.status).u16(self.enable);
        Ok(w.finish())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::lifecycle::LifecycleError> {
        let mut r = platform::codec::Reader::new(state);
        let (status, enable) = (r.u16("pm1 status")?, r.u16("pm1 enable")?);
        r.finish()?;
        (self.status, self.enable) = (status, enable);
        self.sci_level = false;
        self.update_sci();
        Ok(())
    }
}

/// PM1 control (SLP_TYP and friends, SCI_EN).
impl crate::lifecycle::Lifecycle for Pm1Control {
    fn save_state(&self) -> Result<Vec<u8>, crate::lifecycle::LifecycleError> {
        let mut w = platform::codec::Writer::new();
        w.u16(self.value);
        Ok(w.finish())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::lifecycle::LifecycleError> {
        let mut r = platform::codec::Reader::new(state);
        let value = r.u16("pm1 control")?;
        r.finish()?;
        self.value = value;
        Ok(())
    }
}

/// The count: it goes on from where it was (the guest sees no jump while it was saved).
impl crate::lifecycle::Lifecycle for PmTimer {
    fn save_state(&self) -> Result<Vec<u8>, crate::lifecycle::LifecycleError> {
        let mut w = platform::codec::Writer::new();
        w.u64(self.start.elapsed().as_nanos() as u64);
        Ok(w.finish())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::lifecycle::LifecycleError> {
        let mut r = platform::codec::Reader::new(state);
        let elapsed = std::time::Duration::from_nanos(r.u64("pm timer")?);
        r.finish()?;
        let now = std::time::Instant::now();
        // A count from before this host booted cannot be expressed: start from now.
        self.start = now.checked_sub(elapsed).unwrap_or(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_other_states_do_not() {
        let c = Arc::new(VmControl::new());
        let mut cnt = Pm1Control::new(c.clone());
        cnt.write(0, &(SLP_EN | (1 << SLP_TYP_SHIFT)).to_le_bytes()); // S1: ignored
        assert!(!c.stopping());
        cnt.write(0, &((SLP_TYP_S5 << SLP_TYP_SHIFT) | SCI_EN).to_le_bytes()); // no SLP_EN
        assert!(!c.stopping());
        let mut b = [0u8; 2];
        cnt.read(0, &mut b);
        assert_eq!(u16::from_le_bytes(b) >> SLP_TYP_SHIFT, SLP_TYP_S5);
        cnt.write(0, &(SLP_EN | (SLP_TYP_S5 << SLP_TYP_SHIFT)).to_le_bytes());
        assert_eq!(c.stop_reason(), Some(StopReason::PowerOff));
    }

    #[test]
    fn cf9_reset_and_event_block() {
        let c = Arc::new(VmControl::new());
        let mut r = ResetControl::new(c.clone());
        r.write(0, &[0x02]);
        assert!(!c.stopping());
        r.write(0, &[0x06]);
        assert_eq!(c.stop_reason(), Some(StopReason::Reset));
        let mut evt = Pm1Event::default();
        evt.write(2, &[0x01, 0x01]);
        let mut b = [0u8; 4];
        evt.read(0, &mut b);
        assert_eq!(b, [0, 0, 1, 1]);
        evt.read(u64::MAX - 1, &mut b);
    }

    /// An event block whose SCI level changes are recorded.
    fn recorded_event() -> (Pm1Event, Arc<std::sync::Mutex<Vec<bool>>>) {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = log.clone();
        let evt = Pm1Event::new(Box::new(move |level| l.lock().unwrap().push(level)));
        (evt, log)
    }

    fn regs(evt: &mut Pm1Event) -> (u16, u16) {
        let mut b = [0u8; 4];
        evt.read(0, &mut b);
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        )
    }

    #[test]
    fn power_button_status_enable_and_w1c() {
        let (mut evt, sci) = recorded_event();
        assert!(!evt.power_button_enabled());
        // The guest enables the button (a 16-bit write to the enable register).
        evt.write(2, &PWRBTN.to_le_bytes());
        assert!(evt.power_button_enabled());
        assert_eq!(regs(&mut evt), (0, PWRBTN));
        assert!(sci.lock().unwrap().is_empty());
        assert!(evt.press_power_button());
        assert_eq!(regs(&mut evt), (PWRBTN, PWRBTN));
        assert!(evt.sci_asserted());
        // Writing zeros, or ones to other bits, leaves the status (and the SCI) alone.
        evt.write(0, &[0xff, 0x00]);
        evt.write(0, &[0, 0]);
        assert_eq!(regs(&mut evt).0, PWRBTN);
        assert_eq!(*sci.lock().unwrap(), vec![true]);
        // Write-one-to-clear, by a byte write to the high half.
        evt.write(1, &[0x01]);
        assert_eq!(regs(&mut evt), (0, PWRBTN));
        assert!(!evt.sci_asserted());
        assert_eq!(*sci.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn sci_level_follows_status_and_enable() {
        let (mut evt, sci) = recorded_event();
        // Pressed while disabled: the status latches, no SCI.
        assert!(!evt.press_power_button());
        assert_eq!(regs(&mut evt), (PWRBTN, 0));
        assert!(sci.lock().unwrap().is_empty());
        // Enabling with the status pending raises the SCI; disabling drops it.
        evt.write(3, &[0x01]);
        assert!(evt.sci_asserted());
        evt.write(3, &[0x00]);
        assert!(!evt.sci_asserted());
        evt.write(3, &[0x01]);
        // A second press while pending: still one level, no extra edge.
        assert!(evt.press_power_button());
        assert_eq!(*sci.lock().unwrap(), vec![true, false, true]);
        // A 32-bit write clearing the status and keeping the enable.
        evt.write(0, &[0x00, 0x01, 0x00, 0x01]);
        assert_eq!(regs(&mut evt), (0, PWRBTN));
        assert_eq!(*sci.lock().unwrap(), vec![true, false, true, false]);
    }

    #[test]
    fn pm_timer_counts_at_its_rate() {
        let mut t = PmTimer::new();
        let mut a = [0u8; 4];
        t.read(0, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut b = [0u8; 4];
        t.read(0, &mut b);
        let delta = u32::from_le_bytes(b).wrapping_sub(u32::from_le_bytes(a));
        // 20 ms is 71 591 ticks; allow for a slow scheduler but not for a wrong rate.
        assert!((71_000..72_000 * 5).contains(&delta), "{delta}");
        t.write(0, &[1, 2, 3, 4]);
        let mut odd = [0u8; 2];
        t.read(u64::MAX, &mut odd);
        assert_eq!(odd, [0, 0]);
    }
}
