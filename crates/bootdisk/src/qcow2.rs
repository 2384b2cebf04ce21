//! qcow2 (versions 2 and 3), read-only: header, L1 table, L2 tables read on demand. Unallocated
//! and zero clusters read as zeros. Backing files, encryption, compressed clusters, external data
//! files and extended L2 entries are refused with an error. Every offset and size in the image
//! is checked before use: the image is untrusted.

use crate::block::{be32, be64, Disk};
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::rc::Rc;

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
const HEADER_V2_LEN: usize = 72;
/// QEMU's own limit on the L1 table (32 MiB); bounds what a hostile header makes us allocate.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Bits 9..=55 of an L1/L2 entry hold a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const L2_CACHE_TABLES: usize = 8;

pub struct Qcow2 {
    file: Rc<dyn Disk>,
    cluster_bits: u32,
    size: u64,
    version: u32,
    l1: Vec<u64>,
    /// A few recently used L2 tables, keyed by their host offset.
    l2_cache: RefCell<Vec<(u64, Rc<Vec<u64>>)>>,
    name: String,
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::CorruptQcow2(msg.into())
}

/// Does this disk start with the qcow2 magic?
pub fn is_qcow2(file: &dyn Disk) -> Result<bool> {
    if file.len() < 4 {
        return Ok(false);
    }
    let mut m = [0u8; 4];
    file.read_at(0, &mut m)?;
    Ok(m == MAGIC)
}

impl Qcow2 {
    pub fn open(file: Rc<dyn Disk>) -> Result<Self> {
        let flen = file.len();
        if flen < HEADER_V2_LEN as u64 {
            return Err(corrupt(format!(
                "file is {flen} bytes, shorter than a header"
            )));
        }
        let mut h = [0u8; 112];
        let hlen = (flen.min(h.len() as u64)) as usize;
        file.read_at(0, &mut h[..hlen])?;
        if h[..4] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedQcow2(format!("version {version}")));
        }
        let backing_off = be64(&h, 8);
        if backing_off != 0 {
            let blen = be32(&h, 16).min(1023) as usize;
            let mut b = vec![0u8; blen];
            let name = match file.read_at(backing_off, &mut b) {
                Ok(()) => String::from_utf8_lossy(&b).into_owned(),
                Err(_) => "?".to_string(),
            };
            return Err(Error::UnsupportedQcow2(format!(
                "it has a backing file ({name}); flatten it with `qemu-img convert -O qcow2`"
            )));
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} not in 9..=21"
            )));
        }
        let size = be64(&h, 24);
        if be32(&h, 32) != 0 {
            return Err(Error::UnsupportedQcow2("it is encrypted".into()));
        }
        let l1_size = be32(&h, 36) as u64;
        let l1_off = be64(&h, 40);
        if version == 3 {
            if hlen < 104 {
                return Err(corrupt("version 3 header truncated"));
            }
            let incompat = be64(&h, 72);
            if incompat & 2 != 0 {
                return Err(corrupt(
                    "the image is marked corrupt (incompatible feature bit 1)",
                ));
            }
            if incompat & 4 != 0 {
                return Err(Error::UnsupportedQcow2("external data file".into()));
            }
            if incompat & 16 != 0 {
                return Err(Error::UnsupportedQcow2("extended L2 entries".into()));
            }
            // Bit 0 (dirty refcounts) does not matter for reading; bit 3 (compression type)
            // only matters for compressed clusters, which are refused when met.
            let unknown = incompat & !0x1f;
            if unknown != 0 {
                return Err(Error::UnsupportedQcow2(format!(
                    "unknown incompatible features {unknown:#x}"
                )));
            }
            let header_length = be32(&h, 100) as u64;
            if header_length < 104 || header_length > flen {
                return Err(corrupt(format!("header_length {header_length}")));
            }
        }
        let cluster = 1u64 << cluster_bits;
        let l2_entries = cluster / 8;
        // Guest bytes covered by one L1 entry.
        let per_l1 = cluster * l2_entries;
        let needed = size.div_ceil(per_l1);
        if l1_size < needed {
            return Err(corrupt(format!(
                "L1 table has {l1_size} entries, {needed} needed for {size} bytes"
            )));
        }
        if needed * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {needed} entries is too large"
            )));
        }
        if needed > 0 {
            if !l1_off.is_multiple_of(cluster) || l1_off == 0 {
                return Err(corrupt(format!(
                    "L1 table offset {l1_off:#x} is not cluster-aligned"
                )));
            }
            if l1_off.checked_add(needed * 8).is_none_or(|e| e > flen) {
                return Err(corrupt(format!(
                    "L1 table at {l1_off:#x} ({needed} entries) is past the end of the file ({flen} bytes)"
                )));
            }
        }
        let mut raw = vec![0u8; (needed * 8) as usize];
        file.read_at(l1_off, &mut raw)?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Qcow2 {
            name: format!("{} (qcow2)", file.name()),
            file,
            cluster_bits,
            size,
            version,
            l1,
            l2_cache: RefCell::new(Vec::new()),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_table(&self, off: u64) -> Result<Rc<Vec<u64>>> {
        if let Some((_, t)) = self.l2_cache.borrow().iter().find(|(o, _)| *o == off) {
            return Ok(t.clone());
        }
        let cs = self.cluster_size();
        if !off.is_multiple_of(cs) {
            return Err(corrupt(format!(
                "L2 table offset {off:#x} is not cluster-aligned"
            )));
        }
        if off.checked_add(cs).is_none_or(|e| e > self.file.len()) {
            return Err(corrupt(format!(
                "L2 table at {off:#x} is past the end of the file"
            )));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file.read_at(off, &mut raw)?;
        let t = Rc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect::<Vec<_>>());
        let mut cache = self.l2_cache.borrow_mut();
        if cache.len() >= L2_CACHE_TABLES {
            cache.remove(0);
        }
        cache.push((off, t.clone()));
        Ok(t)
    }

    /// Host offset of the guest cluster holding `guest`, or None when it reads as zeros.
    fn map(&self, guest: u64) -> Result<Option<u64>> {
        let cs = self.cluster_size();
        let l2_bits = self.cluster_bits - 3;
        let l1_idx = guest >> (self.cluster_bits + l2_bits);
        let l1e = *self
            .l1
            .get(l1_idx as usize)
            .ok_or_else(|| corrupt("read past the L1 table"))?;
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(None);
        }
        let table = self.l2_table(l2_off)?;
        let l2_idx = ((guest >> self.cluster_bits) & ((1 << l2_bits) - 1)) as usize;
        let e = *table.get(l2_idx).ok_or_else(|| corrupt("L2 index"))?;
        if e & L2_COMPRESSED != 0 {
            return Err(Error::UnsupportedQcow2(format!(
                "compressed cluster at guest offset {:#x}; convert without -c",
                guest & !(cs - 1)
            )));
        }
        if self.version == 3 && e & L2_ZERO != 0 {
            return Ok(None);
        }
        let host = e & OFFSET_MASK;
        if host == 0 {
            return Ok(None);
        }
        if !host.is_multiple_of(cs) {
            return Err(corrupt(format!(
                "data cluster offset {host:#x} is not cluster-aligned"
            )));
        }
        if host.checked_add(cs).is_none_or(|end| end > self.file.len()) {
            // The last cluster of a file may be short only if nothing follows it; refuse
            // clusters that start past the end outright.
            if host >= self.file.len() {
                return Err(corrupt(format!(
                    "data cluster at {host:#x} is past the end of the file ({} bytes)",
                    self.file.len()
                )));
            }
        }
        Ok(Some(host))
    }
}

impl Disk for Qcow2 {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::block::check_range(offset, buf.len(), self.size)?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos & (cs - 1);
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.map(pos)? {
                None => dst.fill(0),
                Some(host) => self
                    .file
                    .read_at(host + in_cluster, dst)
                    .map_err(|e| match e {
                        Error::Truncated { .. } => corrupt(format!(
                            "data cluster at {host:#x} is past the end of the file"
                        )),
                        e => e,
                    })?,
            }
            done += n;
        }
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;

    /// Builds a tiny v3 image by hand: 512-byte clusters, 1 MiB virtual size.
    /// Layout: header @0, L1 @512, L2 @1024, data @1536.
    fn image(version: u32) -> Vec<u8> {
        let mut f = vec![0u8; 2048];
        f[..4].copy_from_slice(&MAGIC);
        f[4..8].copy_from_slice(&version.to_be_bytes());
        f[20..24].copy_from_slice(&9u32.to_be_bytes());
        f[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        // 512-byte clusters: 64 L2 entries → 32 KiB per L1 entry → 32 entries for 1 MiB.
        f[36..40].copy_from_slice(&32u32.to_be_bytes());
        f[40..48].copy_from_slice(&512u64.to_be_bytes());
        if version == 3 {
            f[100..104].copy_from_slice(&104u32.to_be_bytes());
        }
        f[512..520].copy_from_slice(&(1024u64 | 1 << 63).to_be_bytes());
        // Guest cluster 1 → host 1536; guest cluster 2 → zero flag (v3).
        f[1024 + 8..1024 + 16].copy_from_slice(&(1536u64 | 1 << 63).to_be_bytes());
        f[1024 + 16..1024 + 24].copy_from_slice(&(1536u64 | 1).to_be_bytes());
        for (i, b) in f[1536..2048].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        f
    }

    fn open(data: Vec<u8>) -> Result<Qcow2> {
        Qcow2::open(Rc::new(MemDisk {
            data,
            name: "t.qcow2".into(),
        }))
    }

    #[test]
    fn reads_allocated_unallocated_and_zero_clusters() {
        let q = open(image(3)).unwrap();
        assert_eq!(q.len(), 1 << 20);
        let mut b = vec![0xaau8; 1536];
        q.read_at(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0));
        assert_eq!(b[512], 1);
        assert_eq!(b[1023], (511 % 251) as u8 + 1);
        assert!(
            b[1024..].iter().all(|&x| x == 0),
            "zero flag reads as zeros"
        );
        let mut tail = [1u8; 16];
        q.read_at((1 << 20) - 16, &mut tail).unwrap();
        assert_eq!(tail, [0; 16]);
        assert!(matches!(
            q.read_at(1 << 20, &mut tail),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn version2_ignores_bit0_as_zero_flag() {
        let q = open(image(2)).unwrap();
        let mut b = [0u8; 1];
        q.read_at(1024, &mut b).unwrap();
        assert_eq!(b[0], 1, "v2 has no zero flag: bit 0 is reserved");
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut f = image(3);
        f[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(
            matches!(open(f), Err(Error::CorruptQcow2(_))),
            "L1 past end"
        );
        let mut f = image(3);
        f[40..48].copy_from_slice(&513u64.to_be_bytes());
        assert!(
            matches!(open(f), Err(Error::CorruptQcow2(_))),
            "unaligned L1"
        );
        let mut f = image(3);
        f[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(matches!(open(f), Err(Error::CorruptQcow2(_))));
        let mut f = image(3);
        f[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(open(f), Err(Error::CorruptQcow2(_))), "huge size");
        let mut f = image(3);
        f[8..16].copy_from_slice(&600u64.to_be_bytes());
        f[16..20].copy_from_slice(&4u32.to_be_bytes());
        f[600..604].copy_from_slice(b"base");
        let e = open(f).err().unwrap().to_string();
        assert!(e.contains("backing file (base)"), "{e}");
        let mut f = image(3);
        f[72..80].copy_from_slice(&2u64.to_be_bytes());
        assert!(matches!(open(f), Err(Error::CorruptQcow2(_))));
        assert!(open(image(3)[..50].to_vec()).is_err());
    }

    #[test]
    fn bad_l2_and_data_entries_and_compression_are_errors() {
        let mut f = image(3);
        f[1024 + 8..1024 + 16].copy_from_slice(&(1u64 << 62 | 1536).to_be_bytes());
        let q = open(f).unwrap();
        let mut b = [0u8; 1];
        let e = q.read_at(512, &mut b).unwrap_err().to_string();
        assert!(e.contains("compressed"), "{e}");
        let mut f = image(3);
        f[1024 + 8..1024 + 16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        let q = open(f).unwrap();
        assert!(matches!(
            q.read_at(512, &mut b),
            Err(Error::CorruptQcow2(_))
        ));
        let mut f = image(3);
        f[512..520].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let q = open(f).unwrap();
        assert!(matches!(
            q.read_at(512, &mut b),
            Err(Error::CorruptQcow2(_))
        ));
    }
}
