//! Resource allocation: naturally aligned blocks out of a window, as firmware hands out
//! BARs (largest first keeps the holes small).

/// A window `[base, end)` handed out upward in naturally aligned blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeAllocator {
    next: u64,
    end: u64,
}

impl RangeAllocator {
    /// The window `[base, end)`.
    pub fn new(base: u64, end: u64) -> Self {
        RangeAllocator { next: base, end }
    }

    /// A block of `size` bytes (a power of two) aligned to its size; None when the window
    /// has no room left or `size` is not a power of two.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        let addr = self.next.checked_add(size - 1)? & !(size - 1);
        let end = addr.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_blocks_until_the_window_is_full() {
        let mut a = RangeAllocator::new(0x1000, 0x10000);
        assert_eq!(a.allocate(0x4000), Some(0x4000));
        assert_eq!(a.allocate(0x100), Some(0x8000));
        assert_eq!(a.allocate(0x1000), Some(0x9000));
        assert_eq!(a.allocate(0x8000), None);
        assert_eq!(a.allocate(0x6000), None, "not a power of two");
        assert_eq!(a.allocate(0x1000), Some(0xa000));
        let mut top = RangeAllocator::new(u64::MAX - 0xfff, u64::MAX);
        assert_eq!(top.allocate(0x1000), None, "no overflow past 2^64");
    }
}
