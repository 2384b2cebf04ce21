//! virtio-blk requests as a guest sends them: one queue laid out by the input (see
//! rhyve_fuzz::guest_queues), its chains' headers, segments and data wherever the input puts
//! them, processed by the device's own request code against a 1 MiB image file (reads,
//! writes, flush, GET_ID, DISCARD, WRITE_ZEROES, unknown types). The first byte picks the
//! negotiated features (SEG_MAX, SIZE_MAX). Nothing may panic.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;

use devices::virtio::block::fuzzing::Harness;
use devices::virtio::block::BlockConfig;

fn harness() -> &'static Mutex<Harness> {
    static H: OnceLock<Mutex<Harness>> = OnceLock::new();
    H.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("rhyve-fuzz-blk-{}.img", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .unwrap();
        Mutex::new(Harness::new(&BlockConfig::new(&path)).unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&features, rest)) = data.split_first() else {
        return;
    };
    // SEG_MAX (bit 2) and SIZE_MAX (bit 1) as the driver may or may not accept them.
    let acked = (u64::from(features & 1) << 1) | (u64::from(features & 2) << 1) | (1 << 32);
    let (mem, mut queues) = rhyve_fuzz::guest_queues(rest, 1);
    let Some(mut q) = queues.pop().flatten() else {
        return;
    };
    let mut h = harness().lock().unwrap_or_else(|p| p.into_inner());
    h.drain(&mut q, &mem, acked);
});
