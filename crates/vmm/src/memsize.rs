//! The `-m memsize[K|k|M|m|G|g|T|t]` grammar bhyve(8) and bhyveload(8) share.

/// Smallest RAM rhyve accepts.
pub const MIN: u64 = 16 << 20;
/// Largest RAM rhyve accepts: the platform's limit (RAM must end below the 64-bit BARs).
pub const MAX: u64 = platform::map::MAX_RAM;

/// A number with an optional K/M/G/T suffix (either case); no suffix means MiB. None for
/// anything else, zero, or an overflow (the range check is the caller's).
pub fn parse(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.chars().last()? {
        'k' | 'K' => (&v[..v.len() - 1], 1u64 << 10),
        'm' | 'M' => (&v[..v.len() - 1], 1 << 20),
        'g' | 'G' => (&v[..v.len() - 1], 1 << 30),
        't' | 'T' => (&v[..v.len() - 1], 1 << 40),
        c if c.is_ascii_digit() => (v, 1 << 20),
        _ => return None,
    };
    let n: u64 = num.parse().ok()?;
    n.checked_mul(mult).filter(|b| *b != 0)
}

/// Human form for messages: "128M", "3G", else bytes.
pub fn show(bytes: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse("512"), Some(512 << 20));
        assert_eq!(parse("2g"), Some(2 << 30));
        assert_eq!(parse("1024k"), Some(1 << 20));
        for bad in ["", "M", "0", "-1", "1X", "99999999999T", "1.5G"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(show(128 << 20), "128M");
        assert_eq!(show(3 << 30), "3G");
        assert_eq!(show(1000), "1000 bytes");
    }
}
