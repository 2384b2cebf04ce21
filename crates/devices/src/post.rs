//! Port 0x80 POST codes, timestamped from VMM start for boot-time measurement.

use std::time::{Duration, Instant};

/// POST code port.
pub const POST_PORT: u16 = 0x80;

/// Codes kept; a guest spamming the port cannot grow memory beyond this.
const MAX_RECORDS: usize = 4096;

/// Records (time since VMM start, code).
pub struct PostCodes {
    start: Instant,
    records: Vec<(Duration, u8)>,
    dropped: u64,
}

impl PostCodes {
    /// A recorder timing from `start` (the VMM's process start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            records: Vec::new(),
            dropped: 0,
        }
    }

    /// What was recorded, oldest first.
    pub fn records(&self) -> &[(Duration, u8)] {
        &self.records
    }

    /// Codes not kept because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl crate::BusDevice for PostCodes {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Reads return the last code written, like many chipsets' POST latch.
        let last = self.records.last().map(|r| r.1).unwrap_or(0);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = last;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&code) = data.first() else { return };
        let at = self.start.elapsed();
        if self.records.len() < MAX_RECORDS {
            self.records.push((at, code));
            log::info!("POST {code:#04x} at {:.3} ms", at.as_secs_f64() * 1e3);
        } else {
            self.dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    #[test]
    fn records_in_order_and_bounded() {
        let mut p = PostCodes::new(Instant::now());
        p.write(0, &[1]);
        p.write(0, &[2, 0, 0, 0]);
        p.write(0, &[]);
        assert_eq!(
            p.records().iter().map(|r| r.1).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(p.records()[0].0 <= p.records()[1].0);
        let mut b = [0u8; 2];
        p.read(0, &mut b);
        assert_eq!(b, [2, 0]);
        for _ in 0..MAX_RECORDS + 10 {
            p.write(0, &[3]);
        }
        assert_eq!(p.records().len(), MAX_RECORDS);
        assert_eq!(p.dropped(), 12);
    }
}
