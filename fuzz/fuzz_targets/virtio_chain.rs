//! Split virtqueue chains (direct, indirect, loops, bad indices) as the guest lays them out.
//! Input: a flags byte (queue size, EVENT_IDX), the avail ring's index and entries, then the
//! descriptor table (at 0) and whatever follows it (indirect tables, at 0x3000); the used ring
//! is at 0x2000. Every available chain goes through the shared parser with two devices'
//! limits. Nothing may panic, and the parser's promises must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use devices::virtio::chain::{self, ChainLimits};

const MEM: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&size_byte, rest)) = data.split_first() else {
        return;
    };
    let size = 1u16 << (size_byte % 9); // 1..=256
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // avail: flags = 0, then idx and ring[size] from the input.
    let avail_len = (2 + 2 * usize::from(size)).min(rest.len());
    let (avail, rest) = rest.split_at(avail_len);
    mem.write_slice(avail, GuestAddress(0x1002)).unwrap();
    let table_len = (16 * usize::from(size)).min(rest.len());
    let (table, rest) = rest.split_at(table_len);
    mem.write_slice(table, GuestAddress(0)).unwrap();
    let tail = &rest[..rest.len().min(MEM - 0x3000)];
    mem.write_slice(tail, GuestAddress(0x3000)).unwrap();
    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.try_set_desc_table_address(GuestAddress(0)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(0x1000)).unwrap();
    q.try_set_used_ring_address(GuestAddress(0x2000)).unwrap();
    q.set_event_idx(size_byte & 0x80 != 0);
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let limits = [
        ChainLimits::queue(size),
        ChainLimits {
            max_descriptors: 4,
            max_total: 4096,
            max_segment: 512,
        },
    ];
    let Ok(iter) = q.iter(&mem) else { return };
    for (i, c) in iter.enumerate().take(512) {
        let limit = limits[i % 2];
        let parsed = chain::parse(c, &mem, limit);
        let n = parsed.readable.len() + parsed.writable.len();
        assert!(n <= limit.max_descriptors);
        if parsed.fault.is_none() {
            assert!(parsed.readable_len + parsed.writable_len <= limit.max_total);
            assert!(parsed
                .readable
                .iter()
                .chain(&parsed.writable)
                .all(|s| s.len > 0 && s.len as u64 <= u64::from(limit.max_segment)));
        }
    }
});
