//! MC146818 RTC/CMOS at ports 0x70/0x71: the time from the host clock (plus a guest-set
//! offset), status registers that never report an update in progress (so guests never spin
//! waiting), and the CMOS NVRAM with the memory-size bytes firmware reads.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::BusDevice;

/// Index port 0x70, data port 0x71.
pub const RTC_PORT: u16 = platform::ports::RTC_PORT;
pub const RTC_LEN: u64 = 2;
/// CMOS register holding the century, announced in the FADT.
pub const CENTURY_REG: u8 = 0x32;

/// The RTC as the DSDT describes it (PNP0B00).
pub fn acpi_device() -> platform::acpi::AcpiDevice {
    platform::acpi::AcpiDevice {
        name: "RTC_",
        hid: "PNP0B00",
        uid: None,
        io: vec![(RTC_PORT, RTC_LEN as u8)],
        irq: Some(platform::irq::RTC_IRQ as u8),
    }
}

const REG_SEC: usize = 0x00;
const REG_MIN: usize = 0x02;
const REG_HOUR: usize = 0x04;
const REG_WDAY: usize = 0x06;
const REG_MDAY: usize = 0x07;
const REG_MON: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;

/// Broken-down time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub min: u32,
    pub sec: u32,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    pub wday: u32,
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl DateTime {
    /// Seconds since the epoch → broken-down time.
    pub fn from_unix(t: i64) -> Self {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: secs / 3600,
            min: secs / 60 % 60,
            sec: secs % 60,
            wday: ((days + 4).rem_euclid(7) + 1) as u32,
        }
    }

    /// Broken-down time → seconds since the epoch.
    pub fn to_unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.min) * 60
            + i64::from(self.sec)
    }
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0x0f)
}

/// Seconds since the epoch, from the host.
pub fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The RTC and its 128 bytes of CMOS.
pub struct Rtc {
    index: usize,
    cmos: [u8; 128],
    /// Added to the host's UTC time: the local-time offset, plus whatever the guest set.
    offset: i64,
    clock: Box<dyn Fn() -> i64 + Send>,
}

impl Rtc {
    /// An RTC showing host time shifted by `offset` seconds (the host's UTC offset for a
    /// local-time RTC, 0 for UTC), with CMOS memory-size bytes for `ram_bytes` of RAM.
    pub fn new(offset: i64, ram_bytes: u64, clock: Box<dyn Fn() -> i64 + Send>) -> Self {
        let mut cmos = [0u8; 128];
        cmos[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        cmos[REG_B] = B_24H;
        cmos[REG_D] = D_VRT;
        // Memory above 1 MiB in KiB (0x17/0x18, 0x30/0x31) capped at 64 MiB, above 16 MiB in
        // 64 KiB units (0x34/0x35), above 4 GiB in 64 KiB units (0x5b-0x5d), as PC firmware.
        let low = platform::map::low_ram_end(ram_bytes);
        let ext_kib = (low.saturating_sub(1 << 20) >> 10).min(0xffff) as u16;
        cmos[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        cmos[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        let above16 = (low.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        cmos[0x34..0x36].copy_from_slice(&above16.to_le_bytes());
        let above4g = (ram_bytes.saturating_sub(low) >> 16).min(0xff_ffff) as u32;
        cmos[0x5b..0x5e].copy_from_slice(&above4g.to_le_bytes()[..3]);
        Self {
            index: 0,
            cmos,
            offset,
            clock,
        }
    }

    fn binary(&self) -> bool {
        self.cmos[REG_B] & B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        if self.binary() {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.binary() {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn now(&self) -> DateTime {
        DateTime::from_unix((self.clock)().saturating_add(self.offset))
    }

    /// Copies the current time into the time registers (unless the guest froze them).
    fn latch(&mut self) {
        if self.cmos[REG_B] & B_SET != 0 {
            return;
        }
        let t = self.now();
        let hour = if self.cmos[REG_B] & B_24H != 0 {
            self.encode(t.hour)
        } else {
            let h12 = match t.hour % 12 {
                0 => 12,
                h => h,
            };
            self.encode(h12) | if t.hour >= 12 { 0x80 } else { 0 }
        };
        self.cmos[REG_SEC] = self.encode(t.sec);
        self.cmos[REG_MIN] = self.encode(t.min);
        self.cmos[REG_HOUR] = hour;
        self.cmos[REG_WDAY] = self.encode(t.wday);
        self.cmos[REG_MDAY] = self.encode(t.day);
        self.cmos[REG_MON] = self.encode(t.month);
        self.cmos[REG_YEAR] = self.encode((t.year.rem_euclid(100)) as u32);
        self.cmos[usize::from(CENTURY_REG)] =
            self.encode((t.year.div_euclid(100)).clamp(0, 99) as u32);
    }

    /// When the guest ends a SET cycle, what it wrote becomes the new time.
    fn commit_guest_time(&mut self) {
        let hour_reg = self.cmos[REG_HOUR];
        let hour = if self.cmos[REG_B] & B_24H != 0 {
            self.decode(hour_reg)
        } else {
            let h = self.decode(hour_reg & 0x7f) % 12;
            h + if hour_reg & 0x80 != 0 { 12 } else { 0 }
        };
        let year = i64::from(self.decode(self.cmos[usize::from(CENTURY_REG)])) * 100
            + i64::from(self.decode(self.cmos[REG_YEAR]));
        let t = DateTime {
            year,
            month: self.decode(self.cmos[REG_MON]).clamp(1, 12),
            day: self.decode(self.cmos[REG_MDAY]).clamp(1, 31),
            hour: hour.min(23),
            min: self.decode(self.cmos[REG_MIN]).min(59),
            sec: self.decode(self.cmos[REG_SEC]).min(59),
            wday: 1,
        };
        self.offset = t.to_unix() - (self.clock)();
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            0 => 0xff, // the index register is write-only
            _ => match self.index {
                REG_A => self.cmos[REG_A] & 0x7f, // UIP never set: no update in progress
                REG_C => 0,                       // no interrupt flags (reading clears them)
                i if i <= REG_YEAR || i == usize::from(CENTURY_REG) => {
                    self.latch();
                    self.cmos[i]
                }
                i => self.cmos[i],
            },
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 is the NMI mask, not part of the index.
            0 => self.index = usize::from(v & 0x7f),
            _ => match self.index {
                REG_B => {
                    let was_set = self.cmos[REG_B] & B_SET != 0;
                    if v & B_SET != 0 && !was_set {
                        self.latch();
                    }
                    self.cmos[REG_B] = v;
                    if was_set && v & B_SET == 0 {
                        self.commit_guest_time();
                    }
                }
                REG_C | REG_D => {} // read-only
                REG_A => self.cmos[REG_A] = v & 0x7f,
                i => self.cmos[i] = v,
            },
        }
    }
}

/// The selected register, CMOS and the guest's offset from host time; the clock goes on
/// from host time, as a real RTC keeps time while the machine is off.
impl crate::lifecycle::Lifecycle for Rtc {
    fn save_state(&self) -> Result<Vec<u8>, crate::lifecycle::LifecycleError> {
        let mut w = platform::codec::Writer::new();
        w.u8(self.index as u8).bytes(&self.cmos).i64(self.offset);
        Ok(w.finish())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::lifecycle::LifecycleError> {
        let mut r = platform::codec::Reader::new(state);
        let index = usize::from(r.u8("rtc index")?);
        let cmos: [u8; 128] = r.bytes("cmos")?.try_into().map_err(|_| {
            crate::lifecycle::LifecycleError::BadState("cmos: not 128 bytes".into())
        })?;
        let offset = r.i64("rtc offset")?;
        r.finish()?;
        if index >= cmos.len() {
            return Err(crate::lifecycle::LifecycleError::BadState(format!(
                "rtc index {index} out of range"
            )));
        }
        (self.index, self.cmos, self.offset) = (index, cmos, offset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtc_at(t: i64) -> Rtc {
        Rtc::new(0, 512 << 20, Box::new(move || t))
    }

    #[test]
    fn saved_cmos_and_selected_register_come_back_and_bad_state_is_refused() {
        use crate::lifecycle::Lifecycle;
        let mut a = rtc_at(1_000_000);
        a.write(0, &[0x40]);
        a.write(1, &[0x5a]); // a CMOS byte the guest owns
        a.write(0, &[0x40]);
        let saved = a.save_state().unwrap();
        let mut b = rtc_at(1_000_000);
        b.restore_state(&saved).unwrap();
        let mut v = [0u8];
        b.read(1, &mut v);
        assert_eq!(v[0], 0x5a, "the selected register and its byte");
        for n in 0..saved.len() {
            assert!(b.restore_state(&saved[..n]).is_err(), "{n} bytes accepted");
        }
        let mut bad = saved.clone();
        bad[0] = 200; // register index out of range
        assert!(b.restore_state(&bad).is_err());
    }

    fn reg(rtc: &mut Rtc, r: u8) -> u8 {
        rtc.write(0, &[r]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn dates_round_trip() {
        // 2026-11-26 10:35:53 UTC, a Thursday.
        let t = 1_795_689_353;
        let d = DateTime::from_unix(t);
        assert_eq!(
            (d.year, d.month, d.day, d.hour, d.min, d.sec, d.wday),
            (2026, 11, 26, 10, 35, 53, 5)
        );
        assert_eq!(d.to_unix(), t);
        for t in [0, 951_782_400, 4_107_542_400, -86_400] {
            assert_eq!(DateTime::from_unix(t).to_unix(), t);
        }
        assert_eq!(DateTime::from_unix(951_782_400).month, 2); // 2000-02-29
    }

    #[test]
    fn bcd_time_and_status() {
        let mut rtc = rtc_at(1_795_689_353);
        assert_eq!(reg(&mut rtc, 0x00), 0x53);
        assert_eq!(reg(&mut rtc, 0x02), 0x35);
        assert_eq!(reg(&mut rtc, 0x04), 0x10);
        assert_eq!(reg(&mut rtc, 0x07), 0x26);
        assert_eq!(reg(&mut rtc, 0x08), 0x11);
        assert_eq!(reg(&mut rtc, 0x09), 0x26);
        assert_eq!(reg(&mut rtc, CENTURY_REG), 0x20);
        assert_eq!(
            reg(&mut rtc, 0x0a) & 0x80,
            0,
            "update in progress never shows"
        );
        assert_eq!(reg(&mut rtc, 0x0d), 0x80, "battery good");
        assert_eq!(
            reg(&mut rtc, 0x8a) & 0x80,
            0,
            "NMI-mask bit is not part of the index"
        );
    }

    #[test]
    fn binary_mode_offset_and_guest_set_time() {
        let mut rtc = Rtc::new(3600, 64 << 20, Box::new(|| 1_795_689_353));
        rtc.write(0, &[0x0b]);
        rtc.write(1, &[B_24H | B_BINARY]);
        assert_eq!(reg(&mut rtc, 0x04), 11, "local time one hour ahead, binary");
        // The guest sets 2030-01-02 03:04:05.
        rtc.write(0, &[0x0b]);
        rtc.write(1, &[B_SET | B_24H | B_BINARY]);
        for (r, v) in [
            (0x09, 30),
            (CENTURY_REG, 20),
            (0x08, 1),
            (0x07, 2),
            (0x04, 3),
            (0x02, 4),
            (0x00, 5),
        ] {
            rtc.write(0, &[r]);
            rtc.write(1, &[v]);
        }
        rtc.write(0, &[0x0b]);
        rtc.write(1, &[B_24H | B_BINARY]);
        assert_eq!(reg(&mut rtc, 0x09), 30);
        assert_eq!(reg(&mut rtc, 0x00), 5);
        assert_eq!(reg(&mut rtc, 0x04), 3);
    }

    #[test]
    fn memory_size_bytes_and_nvram() {
        let mut rtc = Rtc::new(0, 6 << 30, Box::new(|| 0));
        let above16 = u16::from_le_bytes([reg(&mut rtc, 0x34), reg(&mut rtc, 0x35)]);
        assert_eq!(u64::from(above16), ((3u64 << 30) - (16 << 20)) >> 16);
        let above4g = u32::from_le_bytes([
            reg(&mut rtc, 0x5b),
            reg(&mut rtc, 0x5c),
            reg(&mut rtc, 0x5d),
            0,
        ]);
        assert_eq!(u64::from(above4g), (3u64 << 30) >> 16);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        assert_eq!(reg(&mut rtc, 0x40), 0xab);
        // Garbage accesses are harmless.
        rtc.write(5, &[]);
        let mut empty: [u8; 0] = [];
        rtc.read(1, &mut empty);
        rtc.write(0, &[0xff]);
        rtc.write(1, &[0]);
        let mut wide = [0u8; 4];
        rtc.read(1, &mut wide);
    }

    #[test]
    fn twelve_hour_mode() {
        let mut rtc = rtc_at(1_795_689_353 + 4 * 3600); // 14:35 UTC
        rtc.write(0, &[0x0b]);
        rtc.write(1, &[0]);
        assert_eq!(reg(&mut rtc, 0x04), 0x82, "2 pm in BCD with the PM bit");
    }
}
