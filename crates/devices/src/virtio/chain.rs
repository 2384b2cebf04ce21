//! One descriptor-chain parser for every virtio device: a chain becomes its device-readable and
//! device-writable buffers, within limits the device states (virtio 1.2 2.7.4, 2.7.5.3).
//!
//! The walk's cost is bounded by [`ChainLimits::max_descriptors`] whatever the guest wrote (an
//! indirect table can hold 65 535 entries; the spec allows no chain longer than the queue), and
//! every fault is reported: the device answers with its error status, it never panics.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::GuestMemoryMmap;

/// One non-empty descriptor's buffer (not necessarily inside guest memory if the chain has a
/// fault: use the buffers only when [`Chain::fault`] is `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: usize,
}

/// What a device accepts in one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainLimits {
    /// Descriptors per chain, empty ones included (the queue size, or less with SEG_MAX).
    pub max_descriptors: usize,
    /// Bytes per chain, both directions together.
    pub max_total: u64,
    /// Bytes per descriptor (SIZE_MAX when negotiated).
    pub max_segment: u32,
}

impl ChainLimits {
    /// At most `queue_size` descriptors, no other limit.
    pub fn queue(queue_size: u16) -> Self {
        ChainLimits {
            max_descriptors: usize::from(queue_size),
            max_total: u64::MAX,
            max_segment: u32::MAX,
        }
    }

    /// These limits with at most `bytes` per chain.
    pub fn with_total(self, bytes: u64) -> Self {
        ChainLimits {
            max_total: bytes,
            ..self
        }
    }
}

/// What is wrong with a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// empty or unreadable descriptor chain
    #[error("empty or unreadable descriptor chain")]
    Empty,
    /// descriptor chain longer than {0} descriptors
    #[error("descriptor chain longer than {0} descriptors")]
    TooManyDescriptors(usize),
    /// chain larger than {0} bytes
    #[error("chain larger than {0} bytes")]
    TooLarge(u64),
    /// descriptor larger than {0} bytes
    #[error("descriptor larger than {0} bytes")]
    SegmentTooLarge(u32),
    /// buffer outside guest memory
    #[error("buffer outside guest memory")]
    OutsideMemory,
    /// device-readable descriptor after a device-writable one
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// descriptor chain loops, ends at a bad index or has a bad indirect table
    #[error("descriptor chain loops, ends at a bad index or has a bad indirect table")]
    Broken,
}

/// A parsed chain.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
    pub readable_len: u64,
    pub writable_len: u64,
    /// The first thing wrong with the chain. The walk goes on after faults that leave the
    /// rest readable (so a block request can still find its status byte) and stops at once
    /// at [`ChainError::TooManyDescriptors`].
    pub fault: Option<ChainError>,
}

impl Chain {
    /// The buffers, or the fault.
    pub fn checked(self) -> Result<Chain, ChainError> {
        match self.fault {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }

    /// Records `e` unless an earlier fault was recorded.
    fn note_fault(&mut self, e: ChainError) {
        self.fault.get_or_insert(e);
    }
}

/// Walks `chain` within `limits`.
pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    limits: ChainLimits,
) -> Chain {
    let mut c = Chain::default();
    let (mut count, mut last_has_next) = (0usize, false);
    for d in chain {
        count += 1;
        if count > limits.max_descriptors {
            c.fault = Some(ChainError::TooManyDescriptors(limits.max_descriptors));
            return c;
        }
        last_has_next = d.has_next();
        if d.len() > limits.max_segment {
            c.note_fault(ChainError::SegmentTooLarge(limits.max_segment));
        }
        let len = u64::from(d.len());
        if c.readable_len + c.writable_len + len > limits.max_total {
            c.note_fault(ChainError::TooLarge(limits.max_total));
        }
        if !d.is_write_only() && !c.writable.is_empty() {
            c.note_fault(ChainError::ReadableAfterWritable);
        }
        if len == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), len as usize) {
            c.note_fault(ChainError::OutsideMemory);
        }
        let seg = Segment {
            addr: d.addr(),
            len: len as usize,
        };
        if d.is_write_only() {
            c.writable_len += len;
            c.writable.push(seg);
        } else {
            c.readable_len += len;
            c.readable.push(seg);
        }
    }
    if count == 0 {
        c.fault = Some(ChainError::Empty);
    } else if last_has_next {
        c.note_fault(ChainError::Broken);
    }
    c
}

/// Copies `data` into `segs` laid end to end; false if guest memory refused a write.
pub(crate) fn scatter(mem: &GuestMemoryMmap, segs: &[Segment], data: &[u8]) -> bool {
    let mut done = 0;
    for &Segment { addr: a, len: n } in segs {
        if done == data.len() {
            break;
        }
        let k = n.min(data.len() - done);
        if mem.write_slice(&data[done..done + k], a).is_err() {
            return false;
        }
        done += k;
    }
    true
}

/// Fills `out` from the start of `segs` laid end to end (which must hold that much).
pub(crate) fn gather_prefix(mem: &GuestMemoryMmap, segs: &[Segment], out: &mut [u8]) -> Option<()> {
    let mut done = 0;
    for &Segment { addr: a, len: n } in segs {
        if done == out.len() {
            break;
        }
        let k = n.min(out.len() - done);
        mem.read_slice(&mut out[done..done + k], a).ok()?;
        done += k;
    }
    (done == out.len()).then_some(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use virtio_queue::QueueOwnedT;

    /// Parses the next available chain of `drv`'s queue.
    fn first(drv: &Driver, limits: ChainLimits) -> Chain {
        let mut q = drv.queue();
        let chain = q.iter(&drv.mem).unwrap().next().expect("a chain");
        parse(chain, &drv.mem, limits)
    }

    #[test]
    fn splits_readable_and_writable() {
        let mut drv = Driver::new(16);
        let (a, b, c) = (drv.alloc(16), drv.alloc(512), drv.alloc(1));
        drv.push_chain(&[(a, 16, false), (b, 512, true), (c, 1, true)]);
        let ch = first(&drv, ChainLimits::queue(16)).checked().unwrap();
        assert_eq!(ch.readable.len(), 1);
        assert_eq!(ch.writable.len(), 2);
        assert_eq!((ch.readable_len, ch.writable_len), (16, 513));
        assert_eq!(ch.writable[1].addr, GuestAddress(c));
    }

    #[test]
    fn faults_are_found_and_reported_once() {
        let mut drv = Driver::new(16);
        let a = drv.alloc(16);
        // Readable after writable, then a buffer past the end of memory.
        drv.push_chain(&[(a, 16, true), (a, 16, false), (1 << 40, 16, true)]);
        let ch = first(&drv, ChainLimits::queue(16));
        assert_eq!(ch.fault, Some(ChainError::ReadableAfterWritable));
        // The walk went on: the last writable buffer is known (for a status byte).
        assert_eq!(ch.writable.last().unwrap().addr, GuestAddress(1 << 40));

        let mut drv = Driver::new(16);
        let a = drv.alloc(4096);
        drv.push_chain(&[(a, 4096, false)]);
        let limits = ChainLimits {
            max_segment: 4095,
            ..ChainLimits::queue(16)
        };
        assert_eq!(
            first(&drv, limits).fault,
            Some(ChainError::SegmentTooLarge(4095))
        );
        assert_eq!(
            first(&drv, ChainLimits::queue(16).with_total(100)).fault,
            Some(ChainError::TooLarge(100))
        );
    }

    #[test]
    fn a_huge_indirect_table_stops_at_the_limit() {
        let mut drv = Driver::new(16);
        // 4096 chained empty descriptors in one indirect table.
        let n = 4096u16;
        let table = drv.alloc(16 * u64::from(n));
        for i in 0..n {
            let flags = if i + 1 < n { F_NEXT } else { 0 };
            drv.write_desc(table, i, 0, 0, flags, i + 1);
        }
        drv.write_desc(DESC, 0, table, 16 * u32::from(n), F_INDIRECT, 0);
        drv.publish(0);
        let ch = first(&drv, ChainLimits::queue(16));
        assert_eq!(ch.fault, Some(ChainError::TooManyDescriptors(16)));
    }

    #[test]
    fn a_loop_is_broken() {
        let mut drv = Driver::new(4);
        let a = drv.alloc(8);
        for i in 0..4u16 {
            drv.write_desc(DESC, i, a, 8, F_NEXT, (i + 1) % 4);
        }
        drv.publish(0);
        // The queue's own walk ends after queue-size descriptors; our limit is larger.
        let ch = first(&drv, ChainLimits::queue(64));
        assert!(matches!(
            ch.fault,
            Some(ChainError::Broken) | Some(ChainError::TooManyDescriptors(_))
        ));
    }
}
