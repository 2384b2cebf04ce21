//! A small read-only FAT12/16/32 reader for EFI system partitions: boot sector, FAT chains
//! (bounded, so a looping chain is an error), directories with long file names, case-insensitive
//! lookup. Written here rather than taken from a crate because reading is all we need (~300
//! lines) and every field from the image must be checked before use.

use crate::block::{le16, le32, Disk};
use crate::error::{Error, Result};
use crate::fs::{Fs, Kind};
use std::cell::RefCell;
use std::rc::Rc;

/// Directories larger than this are refused (a FAT directory holds at most 65536 entries).
const MAX_DIR_BYTES: u64 = 65536 * 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    short: String,
    is_dir: bool,
    cluster: u32,
    size: u32,
}

pub struct FatFs {
    disk: Rc<dyn Disk>,
    ty: FatType,
    bps: u64,
    cluster_bytes: u64,
    fat_start: u64,
    /// FAT12/16: byte offset and size of the fixed root directory.
    root_start: u64,
    root_bytes: u64,
    root_cluster: u32,
    data_start: u64,
    clusters: u64,
    name: String,
    /// One cached FAT sector: chains are walked entry by entry.
    sector: RefCell<Option<(u64, Vec<u8>)>>,
}

fn corrupt(name: &str, msg: impl std::fmt::Display) -> Error {
    Error::CorruptFs(format!("{name} (FAT): {msg}"))
}

impl FatFs {
    /// `Ok(None)` when the first sector is not a FAT boot sector.
    pub fn probe(disk: Rc<dyn Disk>, name: String) -> Result<Option<Self>> {
        if disk.len() < 512 {
            return Ok(None);
        }
        let mut s = [0u8; 512];
        disk.read_at(0, &mut s)?;
        let bps = le16(&s, 11) as u64;
        let spc = s[13] as u64;
        let reserved = le16(&s, 14) as u64;
        let nfats = s[16] as u64;
        let looks_fat = (s[0] == 0xeb || s[0] == 0xe9)
            && s[510] == 0x55
            && s[511] == 0xaa
            && matches!(bps, 512 | 1024 | 2048 | 4096)
            && spc.is_power_of_two()
            && reserved >= 1
            && (1..=4).contains(&nfats);
        if !looks_fat {
            return Ok(None);
        }
        let root_entries = le16(&s, 17) as u64;
        let total = match le16(&s, 19) {
            0 => le32(&s, 32) as u64,
            n => n as u64,
        };
        let fat_size = match le16(&s, 22) {
            0 => le32(&s, 36) as u64,
            n => n as u64,
        };
        if fat_size == 0 || total == 0 {
            return Err(corrupt(&name, "zero FAT size or sector count"));
        }
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let data_sector = reserved + nfats * fat_size + root_sectors;
        if data_sector >= total {
            return Err(corrupt(&name, "no room for data clusters"));
        }
        if total * bps > disk.len() {
            return Err(Error::Truncated {
                offset: 0,
                len: total * bps,
                size: disk.len(),
            });
        }
        let clusters = (total - data_sector) / spc;
        // Like Linux: a zero 16-bit FAT size means FAT32 whatever the cluster count (mkfs.fat
        // makes small FAT32 volumes); otherwise the count decides between FAT12 and FAT16.
        let ty = if le16(&s, 22) == 0 {
            FatType::Fat32
        } else if clusters < 4085 {
            FatType::Fat12
        } else if clusters < 65525 {
            FatType::Fat16
        } else {
            FatType::Fat32
        };
        let root_cluster = le32(&s, 44);
        // The FAT must be large enough to describe every cluster.
        let fat_bits = match ty {
            FatType::Fat12 => 12,
            FatType::Fat16 => 16,
            FatType::Fat32 => 32,
        };
        if (clusters + 2) * fat_bits / 8 > fat_size * bps {
            return Err(corrupt(&name, "FAT too small for the cluster count"));
        }
        if ty == FatType::Fat32 && !(2..clusters + 2).contains(&(root_cluster as u64)) {
            return Err(corrupt(&name, format!("root cluster {root_cluster}")));
        }
        Ok(Some(FatFs {
            disk,
            ty,
            bps,
            cluster_bytes: spc * bps,
            fat_start: reserved * bps,
            root_start: (reserved + nfats * fat_size) * bps,
            root_bytes: root_entries * 32,
            root_cluster,
            data_start: data_sector * bps,
            clusters,
            name: format!("{name} (FAT)"),
            sector: RefCell::new(None),
        }))
    }

    fn fat_byte(&self, off: u64) -> Result<u8> {
        let sec = off / self.bps;
        let mut cache = self.sector.borrow_mut();
        if cache.as_ref().map(|(s, _)| *s) != Some(sec) {
            let mut b = vec![0u8; self.bps as usize];
            self.disk.read_at(self.fat_start + sec * self.bps, &mut b)?;
            *cache = Some((sec, b));
        }
        let (_, b) = cache
            .as_ref()
            .ok_or_else(|| corrupt(&self.name, "FAT cache"))?;
        Ok(b.get((off % self.bps) as usize).copied().unwrap_or(0))
    }

    /// The FAT entry for cluster `n`.
    fn next(&self, n: u32) -> Result<u32> {
        let n64 = n as u64;
        Ok(match self.ty {
            FatType::Fat12 => {
                let off = n64 + n64 / 2;
                let v = self.fat_byte(off)? as u32 | (self.fat_byte(off + 1)? as u32) << 8;
                if n & 1 == 1 {
                    v >> 4
                } else {
                    v & 0xfff
                }
            }
            FatType::Fat16 => {
                self.fat_byte(2 * n64)? as u32 | (self.fat_byte(2 * n64 + 1)? as u32) << 8
            }
            FatType::Fat32 => {
                let mut v = 0u32;
                for i in 0..4 {
                    v |= (self.fat_byte(4 * n64 + i)? as u32) << (8 * i);
                }
                v & 0x0fff_ffff
            }
        })
    }

    fn is_end(&self, v: u32) -> bool {
        match self.ty {
            FatType::Fat12 => v >= 0xff8,
            FatType::Fat16 => v >= 0xfff8,
            FatType::Fat32 => v >= 0x0fff_fff8,
        }
    }

    fn valid(&self, c: u32) -> bool {
        c >= 2 && (c as u64) < self.clusters + 2
    }

    /// Reads up to `len` bytes following the chain from `first`. A chain that ends early, loops
    /// or leaves the volume is an error when `exact`, else (directories) it just ends.
    fn read_chain(&self, first: u32, len: u64, exact: bool) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
        let mut c = first;
        let mut steps = 0u64;
        while (out.len() as u64) < len {
            if !self.valid(c) {
                return Err(corrupt(&self.name, format!("cluster {c} out of range")));
            }
            steps += 1;
            if steps > self.clusters {
                return Err(corrupt(&self.name, "cluster chain loops"));
            }
            let n = (len - out.len() as u64).min(self.cluster_bytes) as usize;
            let start = out.len();
            out.resize(start + n, 0);
            let off = self.data_start + (c as u64 - 2) * self.cluster_bytes;
            self.disk.read_at(off, &mut out[start..])?;
            if (out.len() as u64) >= len {
                break;
            }
            let next = self.next(c)?;
            if self.is_end(next) {
                if exact {
                    return Err(corrupt(&self.name, "cluster chain shorter than the file"));
                }
                break;
            }
            c = next;
        }
        Ok(out)
    }

    fn read_dir(&self, dir: Option<&Entry>) -> Result<Vec<Entry>> {
        let raw = match dir {
            None if self.ty != FatType::Fat32 => {
                let mut b = vec![0u8; self.root_bytes as usize];
                self.disk.read_at(self.root_start, &mut b)?;
                b
            }
            None => self.read_chain(self.root_cluster, MAX_DIR_BYTES, false)?,
            Some(e) => self.read_chain(e.cluster, MAX_DIR_BYTES, false)?,
        };
        Ok(parse_dir(&raw))
    }

    /// Finds the entry at `path`; `None` (root) for "/", an error when missing.
    fn lookup(&self, path: &str) -> Result<Option<Option<Entry>>> {
        let mut cur: Option<Entry> = None;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            if cur.as_ref().is_some_and(|e| !e.is_dir) {
                return Ok(None);
            }
            let entries = self.read_dir(cur.as_ref())?;
            match entries
                .into_iter()
                .find(|e| e.name.eq_ignore_ascii_case(comp) || e.short.eq_ignore_ascii_case(comp))
            {
                Some(e) => cur = Some(e),
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }
}

fn lfn_checksum(short: &[u8]) -> u8 {
    short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

fn parse_dir(raw: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    // Long-name pieces seen so far: (sequence number, checksum, 13 UCS-2 units).
    let mut lfn: Vec<(u8, u8, Vec<u16>)> = Vec::new();
    for e in raw.chunks_exact(32) {
        if e[0] == 0 {
            break;
        }
        if e[0] == 0xe5 {
            lfn.clear();
            continue;
        }
        let attr = e[11];
        if attr & 0x3f == 0x0f {
            let units: Vec<u16> = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                .iter()
                .map(|&o| le16(e, o))
                .collect();
            lfn.push((e[0] & 0x1f, e[13], units));
            continue;
        }
        if attr & 0x08 != 0 {
            lfn.clear();
            continue; // volume label
        }
        let base = String::from_utf8_lossy(&e[..8]).trim_end().to_string();
        let ext = String::from_utf8_lossy(&e[8..11]).trim_end().to_string();
        let base = if e[12] & 0x08 != 0 {
            base.to_lowercase()
        } else {
            base
        };
        let ext = if e[12] & 0x10 != 0 {
            ext.to_lowercase()
        } else {
            ext
        };
        let short = if ext.is_empty() {
            base
        } else {
            format!("{base}.{ext}")
        };
        let sum = lfn_checksum(&e[..11]);
        let mut name = short.clone();
        if !lfn.is_empty() && lfn.iter().all(|(_, c, _)| *c == sum) {
            lfn.sort_by_key(|(seq, _, _)| *seq);
            let units: Vec<u16> = lfn
                .iter()
                .flat_map(|(_, _, u)| u.iter().copied())
                .take_while(|&u| u != 0 && u != 0xffff)
                .collect();
            name = String::from_utf16_lossy(&units);
        }
        lfn.clear();
        if short == "." || short == ".." {
            continue;
        }
        out.push(Entry {
            name,
            short,
            is_dir: attr & 0x10 != 0,
            cluster: (le16(e, 20) as u32) << 16 | le16(e, 26) as u32,
            size: le32(e, 28),
        });
    }
    out
}

impl Fs for FatFs {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn lstat(&self, path: &str) -> Result<Option<Kind>> {
        Ok(match self.lookup(path)? {
            None => None,
            Some(None) => Some(Kind::Dir),
            Some(Some(e)) if e.is_dir => Some(Kind::Dir),
            Some(Some(e)) => Some(Kind::File(e.size as u64)),
        })
    }

    fn read_link(&self, path: &str) -> Result<String> {
        Err(Error::NotFound(format!(
            "{path} on {}: FAT has no symlinks",
            self.name
        )))
    }

    fn read_file_raw(&self, path: &str, size: u64) -> Result<Vec<u8>> {
        match self.lookup(path)? {
            Some(Some(e)) if !e.is_dir => {
                if size == 0 {
                    return Ok(Vec::new());
                }
                self.read_chain(e.cluster, size, true)
            }
            _ => Err(Error::NotAFile(format!("{path} on {}", self.name))),
        }
    }

    fn list_dir_raw(&self, path: &str) -> Result<Vec<String>> {
        match self.lookup(path)? {
            Some(None) => Ok(self.read_dir(None)?.into_iter().map(|e| e.name).collect()),
            Some(Some(e)) if e.is_dir => Ok(self
                .read_dir(Some(&e))?
                .into_iter()
                .map(|e| e.name)
                .collect()),
            _ => Err(Error::NotADirectory(format!("{path} on {}", self.name))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;

    /// A hand-made FAT12 volume: 512-byte sectors, 1 sector per cluster, 1 reserved sector,
    /// 1 FAT of 1 sector, 16 root entries (1 sector), 64 sectors in all.
    fn volume() -> Vec<u8> {
        let mut d = vec![0u8; 64 * 512];
        d[0] = 0xeb;
        d[11..13].copy_from_slice(&512u16.to_le_bytes());
        d[13] = 1;
        d[14..16].copy_from_slice(&1u16.to_le_bytes());
        d[16] = 1;
        d[17..19].copy_from_slice(&16u16.to_le_bytes());
        d[19..21].copy_from_slice(&64u16.to_le_bytes());
        d[22..24].copy_from_slice(&1u16.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xaa;
        // FAT at sector 1: cluster 2 → 3 → end.
        let fat = 512;
        let set12 = |d: &mut Vec<u8>, n: usize, v: u16| {
            let off = fat + n + n / 2;
            let cur = u16::from_le_bytes([d[off], d[off + 1]]);
            let new = if n & 1 == 1 {
                (cur & 0x000f) | (v << 4)
            } else {
                (cur & 0xf000) | (v & 0xfff)
            };
            d[off..off + 2].copy_from_slice(&new.to_le_bytes());
        };
        set12(&mut d, 2, 3);
        set12(&mut d, 3, 0xfff);
        // Root directory at sector 2: long name "vmlinuz-long" for short "VMLINU~1".
        let root = 1024;
        let short = *b"VMLINU~1   ";
        let sum = lfn_checksum(&short);
        let name: Vec<u16> = "vmlinuz-long".encode_utf16().collect();
        let mut l = [0xffu8; 32];
        l[0] = 0x41;
        l[11] = 0x0f;
        l[12] = 0;
        l[13] = sum;
        l[26] = 0;
        l[27] = 0;
        let offs = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
        for (i, &o) in offs.iter().enumerate() {
            let u = name
                .get(i)
                .copied()
                .unwrap_or(if i == name.len() { 0 } else { 0xffff });
            l[o..o + 2].copy_from_slice(&u.to_le_bytes());
        }
        d[root..root + 32].copy_from_slice(&l);
        let e = root + 32;
        d[e..e + 11].copy_from_slice(&short);
        d[e + 26..e + 28].copy_from_slice(&2u16.to_le_bytes());
        d[e + 28..e + 32].copy_from_slice(&600u32.to_le_bytes());
        // Data: clusters start at sector 3.
        for i in 0..600 {
            d[3 * 512 + i] = (i % 7) as u8;
        }
        d
    }

    fn open(d: Vec<u8>) -> Result<Option<FatFs>> {
        FatFs::probe(
            Rc::new(MemDisk {
                data: d,
                name: "esp".into(),
            }),
            "esp".into(),
        )
    }

    #[test]
    fn reads_long_named_file_across_clusters() {
        let fs = open(volume()).unwrap().unwrap();
        assert_eq!(fs.ty, FatType::Fat12);
        assert_eq!(fs.list_dir_raw("/").unwrap(), vec!["vmlinuz-long"]);
        assert_eq!(fs.lstat("/VMLINUZ-LONG").unwrap(), Some(Kind::File(600)));
        assert_eq!(fs.lstat("/vmlinu~1").unwrap(), Some(Kind::File(600)));
        let data = fs.read_file_raw("/vmlinuz-long", 600).unwrap();
        assert!(data.iter().enumerate().all(|(i, &b)| b == (i % 7) as u8));
        assert_eq!(fs.lstat("/missing").unwrap(), None);
        assert_eq!(fs.lstat("/vmlinuz-long/x").unwrap(), None);
    }

    #[test]
    fn looping_or_short_chains_are_errors() {
        let mut d = volume();
        // cluster 3 → 2: a loop.
        d[512 + 4] = (d[512 + 4] & 0x0f) | 0x20;
        d[512 + 5] = 0;
        let fs = open(d).unwrap().unwrap();
        let e = fs.read_file_raw("/vmlinuz-long", 600 * 100).unwrap_err();
        assert!(matches!(e, Error::CorruptFs(_)), "{e}");
        let fs = open(volume()).unwrap().unwrap();
        assert!(matches!(
            fs.read_file_raw("/vmlinuz-long", 2000),
            Err(Error::CorruptFs(_))
        ));
    }

    #[test]
    fn not_fat_and_bad_geometry() {
        assert!(open(vec![0u8; 4096]).unwrap().is_none());
        let mut d = volume();
        d[19..21].copy_from_slice(&6000u16.to_le_bytes());
        assert!(open(d).is_err(), "volume larger than the disk");
        let mut d = volume();
        d[22..24].copy_from_slice(&0u16.to_le_bytes());
        assert!(open(d).is_err());
    }
}
