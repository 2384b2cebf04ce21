//! What the fuzz targets share: split virtqueues laid out in guest memory from the input.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM of every target: queues at 0x4000 * i, buffers anywhere.
pub const MEM: usize = 256 << 10;
/// Where the input's tail (buffers, indirect tables, headers) goes.
pub const TAIL: u64 = 0x10000;

/// Guest memory holding `n` queues described by `data`: per queue a size byte (bit 7:
/// EVENT_IDX), then its avail ring (idx, entries) and its descriptor table; what is left
/// goes to [`TAIL`]. Queue `i` has its table at 0x4000 * i, avail at +0x1000, used at
/// +0x2000. Queues the layout makes invalid are None.
pub fn guest_queues(data: &[u8], n: usize) -> (GuestMemoryMmap, Vec<Option<Queue>>) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut rest = data;
    let mut queues = Vec::with_capacity(n);
    for i in 0..n {
        let base = 0x4000 * i as u64;
        let Some((&size_byte, r)) = rest.split_first() else {
            queues.push(None);
            continue;
        };
        rest = r;
        let size = 1u16 << (size_byte % 9); // 1..=256
        let avail_len = (2 + 2 * usize::from(size)).min(rest.len());
        let (avail, r) = rest.split_at(avail_len);
        mem.write_slice(avail, GuestAddress(base + 0x1002)).unwrap();
        let table_len = (16 * usize::from(size)).min(r.len());
        let (table, r) = r.split_at(table_len);
        mem.write_slice(table, GuestAddress(base)).unwrap();
        rest = r;
        let mut q = Queue::new(256).unwrap();
        q.set_size(size);
        q.try_set_desc_table_address(GuestAddress(base)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(base + 0x1000))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(base + 0x2000))
            .unwrap();
        q.set_event_idx(size_byte & 0x80 != 0);
        q.set_ready(true);
        queues.push(q.is_valid(&mem).then_some(q));
    }
    let tail = &rest[..rest.len().min(MEM - TAIL as usize)];
    mem.write_slice(tail, GuestAddress(TAIL)).unwrap();
    (mem, queues)
}
