//! The byte encoding of saved state (snapshots): little-endian integers and length-prefixed
//! byte strings, written by [`Writer`] and read back by [`Reader`], which checks every
//! length against what is left, so a truncated or corrupt state is an error, never a panic
//! or a huge allocation. Devices, vmmapi and the snapshot file all use it.

use std::fmt;

/// Why saved state could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// It ends before `what` (a field name).
    Truncated(&'static str),
    /// A field has a value the decoder does not accept.
    Invalid(String),
    /// Bytes are left over after the last field.
    Trailing(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated(what) => write!(f, "truncated at {what}"),
            DecodeError::Invalid(msg) => f.write_str(msg),
            DecodeError::Trailing(n) => write!(f, "{n} unexpected bytes at the end"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Builds an encoded state.
#[derive(Default, Debug)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A length (u32) and the bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }

    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// Bytes of a length both sides know (no prefix).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads an encoded state; every getter names its field for the error.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::Invalid(format!(
                "{what}: {v} is not a boolean"
            ))),
        }
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed byte string (the length is checked against what is left first).
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    pub fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(what)?)
            .map_err(|_| DecodeError::Invalid(format!("{what}: not UTF-8")))
    }

    /// `n` bytes without a prefix.
    pub fn raw(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        self.take(n, what)
    }

    /// A count of items each at least `min_item` bytes long: refused when the rest of the
    /// input cannot hold that many (no allocation sized by a corrupt count).
    pub fn count(&mut self, min_item: usize, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_item.max(1)) > self.buf.len() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n)
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Succeeds only when everything was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_truncation_is_an_error() {
        let mut w = Writer::new();
        w.u8(1).bool(true).u16(0x1234).u32(7).u64(u64::MAX).i64(-5);
        w.bytes(b"abc").str("name");
        let buf = w.finish();
        let read = |b: &[u8]| -> Result<(), DecodeError> {
            let mut r = Reader::new(b);
            assert_eq!(r.u8("a")?, 1);
            assert!(r.bool("b")?);
            assert_eq!(r.u16("c")?, 0x1234);
            assert_eq!(r.u32("d")?, 7);
            assert_eq!(r.u64("e")?, u64::MAX);
            assert_eq!(r.i64("f")?, -5);
            assert_eq!(r.bytes("g")?, b"abc");
            assert_eq!(r.str("h")?, "name");
            r.finish()
        };
        assert_eq!(read(&buf), Ok(()));
        for n in 0..buf.len() {
            assert!(read(&buf[..n]).is_err(), "{n} bytes decoded");
        }
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(read(&long), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn a_huge_length_or_count_is_refused_without_allocating() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 1]);
        assert!(r.bytes("x").is_err());
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 1]);
        assert!(r.count(8, "x").is_err());
        let mut r = Reader::new(&[2]);
        assert!(r.bool("x").is_err());
    }
}
