//! Token-bucket rate limits for a device's I/O (Firecracker's model): a bandwidth bucket in
//! bytes per second and an operations bucket in requests per second, either or both.
//!
//! A request is admitted while every bucket has tokens left, and then charged what it really
//! moved, which may take a bucket into debt: a request larger than the bucket still goes
//! through, and the next waits until the debt is paid. So the long-run rate is the limit, and
//! a burst is at most one bucket (50 ms of the rate) plus one request. When a bucket is empty
//! the device leaves the request in its ring and looks again once the bucket has refilled
//! (the worker's timer), so a limited guest costs the host nothing while it waits.

use std::time::{Duration, Instant};

/// How much of the rate a bucket holds: the largest burst above the rate.
const BURST: Duration = Duration::from_millis(50);

/// Limits of one direction of a device (`None`: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Bytes per second.
    pub bytes_per_sec: Option<u64>,
    /// Requests (frames, for virtio-net) per second.
    pub ops_per_sec: Option<u64>,
}

impl RateLimits {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_sec: u64, now: Instant) -> Bucket {
        let rate = per_sec as f64;
        let capacity = (rate * BURST.as_secs_f64()).max(1.0);
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Until the bucket has tokens again (zero: it has).
    fn wait(&self) -> Duration {
        if self.tokens > 0.0 {
            Duration::ZERO
        } else {
            // Just past the point where the debt is paid.
            Duration::from_secs_f64((-self.tokens + 0.5) / self.rate)
        }
    }
}

/// The buckets of one direction of one device.
#[derive(Debug)]
pub struct RateLimiter {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            bytes: limits.bytes_per_sec.map(|r| Bucket::new(r, now)),
            ops: limits.ops_per_sec.map(|r| Bucket::new(r, now)),
        }
    }

    pub fn unlimited() -> RateLimiter {
        RateLimiter::new(RateLimits::default())
    }

    /// None: the next request may go; Some(d): not before `d` from now.
    pub fn check(&mut self) -> Option<Duration> {
        if self.bytes.is_none() && self.ops.is_none() {
            return None;
        }
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for b in [&mut self.bytes, &mut self.ops].into_iter().flatten() {
            b.refill(now);
            wait = wait.max(b.wait());
        }
        (!wait.is_zero()).then(|| wait.max(Duration::from_millis(1)))
    }

    /// Charges one request that moved `bytes`.
    pub fn charge(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
        if let Some(o) = &mut self.ops {
            o.tokens -= 1.0;
        }
    }
}

/// Limits that may change while the device runs (Firecracker's `PATCH` of a drive or an
/// interface): the worker's [`FollowingLimiter`] takes the new ones at its next check, with
/// fresh buckets.
#[derive(Debug, Default)]
pub struct LiveLimits {
    limits: std::sync::Mutex<RateLimits>,
    generation: std::sync::atomic::AtomicU64,
}

impl LiveLimits {
    pub fn new(limits: RateLimits) -> std::sync::Arc<LiveLimits> {
        std::sync::Arc::new(LiveLimits {
            limits: std::sync::Mutex::new(limits),
            generation: Default::default(),
        })
    }

    pub fn get(&self) -> RateLimits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, limits: RateLimits) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A worker's limiter that follows a [`LiveLimits`].
#[derive(Debug)]
pub struct FollowingLimiter {
    live: std::sync::Arc<LiveLimits>,
    seen: u64,
    limiter: RateLimiter,
}

impl FollowingLimiter {
    pub fn new(live: std::sync::Arc<LiveLimits>) -> FollowingLimiter {
        let seen = live.generation.load(std::sync::atomic::Ordering::Acquire);
        let limiter = RateLimiter::new(live.get());
        FollowingLimiter {
            live,
            seen,
            limiter,
        }
    }

    /// The limiter for the current limits (new buckets once they changed).
    pub fn current(&mut self) -> &mut RateLimiter {
        let g = self
            .live
            .generation
            .load(std::sync::atomic::Ordering::Acquire);
        if g != self.seen {
            self.seen = g;
            self.limiter = RateLimiter::new(self.live.get());
        }
        &mut self.limiter
    }

    pub fn check(&mut self) -> Option<Duration> {
        self.current().check()
    }

    pub fn charge(&mut self, bytes: u64) {
        self.limiter.charge(bytes);
    }
}

/// Parses a rate: a number with an optional K, M or G suffix (powers of 1024, as `-m`).
pub fn parse_rate(v: &str) -> Option<u64> {
    let (digits, shift) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 10),
        b'm' | b'M' => (&v[..v.len() - 1], 20),
        b'g' | b'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n: u64 = digits.parse().ok()?;
    let r = n.checked_mul(1u64 << shift)?;
    (r > 0).then_some(r)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_following_limiter_takes_new_limits_at_its_next_check() {
        let live = LiveLimits::new(RateLimits {
            bytes_per_sec: Some(1000),
            ops_per_sec: None,
        });
        let mut l = FollowingLimiter::new(live.clone());
        assert_eq!(l.check(), None);
        l.charge(10_000);
        assert!(l.check().is_some(), "10 s of debt at 1000 B/s");
        live.set(RateLimits::default());
        assert_eq!(l.check(), None, "unlimited now");
        l.charge(u64::MAX / 2);
        assert_eq!(l.check(), None);
    }

    use super::*;

    #[test]
    fn rates_parse_with_binary_suffixes() {
        assert_eq!(parse_rate("1000"), Some(1000));
        assert_eq!(parse_rate("4M"), Some(4 << 20));
        assert_eq!(parse_rate("2k"), Some(2048));
        assert_eq!(parse_rate("1G"), Some(1 << 30));
        for bad in ["", "0", "M", "-1", "1.5M", "99999999999999G"] {
            assert_eq!(parse_rate(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_request_larger_than_the_bucket_still_goes_then_the_next_waits() {
        let mut l = RateLimiter::new(RateLimits {
            bytes_per_sec: Some(1000),
            ops_per_sec: None,
        });
        assert_eq!(l.check(), None);
        l.charge(10_000);
        let wait = l.check().expect("in debt");
        assert!(
            wait > Duration::from_secs(9) && wait < Duration::from_secs(11),
            "{wait:?}"
        );
        assert!(RateLimiter::unlimited().check().is_none());
    }
}
