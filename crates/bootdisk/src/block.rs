//! Block layer: something with a length that can be read at any offset. Raw image files and
//! block devices read through `pread`; qcow2 (qcow2.rs) and partitions (a `Slice`) build on it.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

/// A read-only disk. `read_at` fills the whole buffer or fails; reads past `len` are errors.
pub trait Disk {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Name for error messages.
    fn name(&self) -> &str;
}

/// Checks that `len` bytes at `offset` lie inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> Result<()> {
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::Truncated { offset, len, size }),
    }
}

/// A raw image file or a block device.
pub struct RawDisk {
    file: File,
    len: u64,
    name: String,
}

impl RawDisk {
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let mut file = File::open(path).map_err(|e| Error::io(&name, e))?;
        // Seeking to the end gives the size of block devices too (metadata().len() is 0 there).
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(&name, e))?;
        Ok(RawDisk { file, len, name })
    }
}

impl Disk for RawDisk {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len(), self.len)?;
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                // The file shrank under us: report it like any other short image.
                Error::Truncated {
                    offset,
                    len: buf.len() as u64,
                    size: self.len,
                }
            } else {
                Error::io(&self.name, e)
            }
        })
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// An in-memory disk (tests, and fuzzing mutated images without touching the filesystem).
pub struct MemDisk {
    pub data: Vec<u8>,
    pub name: String,
}

impl Disk for MemDisk {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len(), self.len())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// A window of another disk (a partition).
pub struct Slice {
    disk: Rc<dyn Disk>,
    start: u64,
    len: u64,
    name: String,
}

impl Slice {
    /// The caller has checked that `start + len` is inside `disk`.
    pub fn new(disk: Rc<dyn Disk>, start: u64, len: u64, name: String) -> Self {
        Slice {
            disk,
            start,
            len,
            name,
        }
    }
}

impl Disk for Slice {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len(), self.len)?;
        self.disk.read_at(self.start + offset, buf)
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Little-endian field readers over a byte slice; out-of-range reads give 0 so that parsers
/// working on fixed-size, already length-checked buffers stay free of index panics.
fn field<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}
pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(field(b, off))
}
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(field(b, off))
}
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(field(b, off))
}
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(field(b, off))
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(field(b, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(n: usize) -> Rc<dyn Disk> {
        Rc::new(MemDisk {
            data: (0..n).map(|i| i as u8).collect(),
            name: "mem".into(),
        })
    }

    #[test]
    fn slice_reads_inside_and_refuses_outside() {
        let s = Slice::new(mem(100), 10, 20, "p1".into());
        let mut b = [0u8; 4];
        s.read_at(0, &mut b).unwrap();
        assert_eq!(b, [10, 11, 12, 13]);
        s.read_at(16, &mut b).unwrap();
        assert!(matches!(
            s.read_at(17, &mut b),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            s.read_at(u64::MAX, &mut b),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn raw_disk_reads_a_file_and_reports_truncation() {
        let dir = std::env::temp_dir().join(format!("bootdisk-block-{}", std::process::id()));
        std::fs::write(&dir, [1u8, 2, 3, 4, 5]).unwrap();
        let d = RawDisk::open(&dir).unwrap();
        assert_eq!(d.len(), 5);
        let mut b = [0u8; 2];
        d.read_at(3, &mut b).unwrap();
        assert_eq!(b, [4, 5]);
        assert!(matches!(d.read_at(4, &mut b), Err(Error::Truncated { .. })));
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(
            RawDisk::open(Path::new("/nonexistent/disk.img")),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn field_readers_do_not_panic_out_of_range() {
        let b = [1u8, 2, 3];
        assert_eq!(le16(&b, 0), 0x0201);
        assert_eq!(le32(&b, 0), 0);
        assert_eq!(le64(&b, 2), 0);
        assert_eq!(be32(&b, 5), 0);
        assert_eq!(be64(&b, usize::MAX - 2), 0);
    }
}
