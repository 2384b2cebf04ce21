//! The parts of rhyve other programs reuse (the benchmark's raw KVM loop boots the same
//! guest with the same entry state).

pub mod boot;
pub mod memsize;
