//! virtio-net as a guest drives it: receive, transmit and control queues laid out by the
//! input (rhyve_fuzz::guest_queues), transmit frames with any header (checksum and GSO
//! requests, lengths, splits), control commands (RX mode, MAC table, offloads, unknown
//! classes), and one frame from the host into the receive buffers. The first 8 bytes are the
//! negotiated features. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let (feat, rest) = data.split_at(8);
    let mut f = [0u8; 8];
    f.copy_from_slice(feat);
    let features = u64::from_le_bytes(f) | (1 << 32);
    // The host's frame: the last bytes, as long as the input's second byte says.
    let host_len = usize::from(rest[0]).min(rest.len() - 1);
    let (host_frame, rest) = rest[1..].split_at(host_len);
    let (mem, mut queues) = rhyve_fuzz::guest_queues(rest, 3);
    let ctrl = queues.pop().flatten();
    let (Some(tx), Some(rx)) = (queues.pop().flatten(), queues.pop().flatten()) else {
        return;
    };
    devices::virtio::net::fuzzing::run(&mem, [rx, tx], ctrl, features, host_frame);
});
