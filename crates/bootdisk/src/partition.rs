//! Partition tables: GPT (primary header, backup header if the primary is damaged, CRCs
//! checked) and MBR (primary partitions plus the logical partitions of an extended one). A
//! partition that reaches past the end of the disk is an error, not something to clamp.

use crate::block::{le16, le32, le64, Disk};
use crate::error::{Error, Result};
use std::collections::HashSet;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
/// Bounds on what a hostile table can make us read.
const MAX_GPT_ENTRY_BYTES: u64 = 1 << 20;
const MAX_LOGICAL: usize = 128;

const ESP_GUID: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
const XBOOTLDR_GUID: &str = "bc13c2ff-59e6-4262-a352-b275fd6f7172";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartKind {
    /// EFI system partition (GPT type or MBR type 0xEF).
    Esp,
    /// Boot Loader Specification extended boot partition (a separate /boot).
    Xbootldr,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as Linux numbers them (MBR logical partitions start at 5).
    pub index: u32,
    pub start: u64,
    pub len: u64,
    pub kind: PartKind,
    /// GPT unique partition GUID, for `root=PARTUUID=`.
    pub uuid: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Gpt,
    Mbr,
}

/// Reads the partition table; `None` when the disk has none (then it may be a bare filesystem).
pub fn read_table(disk: &dyn Disk) -> Result<Option<(TableKind, Vec<Partition>)>> {
    if disk.len() < 512 {
        return Ok(None);
    }
    let mut mbr = [0u8; 512];
    disk.read_at(0, &mut mbr)?;
    let has_sig = mbr[510] == 0x55 && mbr[511] == 0xaa;
    let protective = has_sig && (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xee);
    for sector in [512u64, 4096] {
        if let Some(parts) = read_gpt(disk, sector, protective)? {
            return Ok(Some((TableKind::Gpt, parts)));
        }
    }
    if protective {
        return Err(Error::CorruptPartitionTable(
            "protective MBR but no valid GPT header (primary or backup)".into(),
        ));
    }
    if !has_sig || looks_like_boot_sector(&mbr) {
        return Ok(None);
    }
    read_mbr(disk, &mbr)
}

/// A FAT/NTFS volume boot record also ends in 55 AA; do not mistake it for an MBR.
fn looks_like_boot_sector(s: &[u8; 512]) -> bool {
    let jump = s[0] == 0xeb || s[0] == 0xe9;
    let bps = le16(s, 11);
    jump && matches!(bps, 512 | 1024 | 2048 | 4096)
        && (&s[54..57] == b"FAT" || &s[82..85] == b"FAT" || &s[3..7] == b"NTFS")
}

fn check_end(disk: &dyn Disk, index: u32, start: u64, len: u64) -> Result<()> {
    let end = start.saturating_add(len);
    if end > disk.len() {
        return Err(Error::PartitionBeyondEnd {
            index,
            start,
            end,
            size: disk.len(),
        });
    }
    Ok(())
}

fn read_mbr(disk: &dyn Disk, mbr: &[u8; 512]) -> Result<Option<(TableKind, Vec<Partition>)>> {
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + i * 16..462 + i * 16]).collect();
    // Boot code in a partitionless disk rarely has valid status bytes in all four slots.
    if entries.iter().any(|e| e[0] != 0 && e[0] != 0x80) {
        return Ok(None);
    }
    let mut parts = Vec::new();
    let mut any = false;
    for (i, e) in entries.iter().enumerate() {
        let ty = e[4];
        let lba = le32(e, 8) as u64;
        let count = le32(e, 12) as u64;
        if ty == 0 || count == 0 {
            continue;
        }
        any = true;
        if lba == 0 {
            return Err(Error::CorruptPartitionTable(format!(
                "MBR partition {} starts at sector 0",
                i + 1
            )));
        }
        let (start, len) = (lba * 512, count * 512);
        check_end(disk, i as u32 + 1, start, len)?;
        if matches!(ty, 0x05 | 0x0f | 0x85) {
            read_logical(disk, start, len, &mut parts)?;
            continue;
        }
        parts.push(Partition {
            index: i as u32 + 1,
            start,
            len,
            kind: if ty == 0xef {
                PartKind::Esp
            } else {
                PartKind::Other(format!("mbr type {ty:#04x}"))
            },
            uuid: None,
        });
    }
    if !any {
        return Ok(None);
    }
    Ok(Some((TableKind::Mbr, parts)))
}

/// Follows the chain of extended boot records; each holds one logical partition (relative to
/// itself) and a link to the next record (relative to the extended partition).
fn read_logical(
    disk: &dyn Disk,
    ext_start: u64,
    ext_len: u64,
    out: &mut Vec<Partition>,
) -> Result<()> {
    let mut seen = HashSet::new();
    let mut ebr = ext_start;
    let mut index = 5;
    loop {
        if !seen.insert(ebr) || seen.len() > MAX_LOGICAL {
            return Err(Error::CorruptPartitionTable(
                "extended partition chain loops".into(),
            ));
        }
        let mut s = [0u8; 512];
        disk.read_at(ebr, &mut s)?;
        if s[510] != 0x55 || s[511] != 0xaa {
            return Err(Error::CorruptPartitionTable(format!(
                "extended boot record at byte {ebr} has no signature"
            )));
        }
        let (ty, lba, count) = (
            s[446 + 4],
            le32(&s, 446 + 8) as u64,
            le32(&s, 446 + 12) as u64,
        );
        if ty != 0 && count != 0 {
            let start = ebr + lba * 512;
            let len = count * 512;
            check_end(disk, index, start, len)?;
            if start + len > ext_start + ext_len {
                return Err(Error::CorruptPartitionTable(format!(
                    "logical partition {index} extends past its extended partition"
                )));
            }
            out.push(Partition {
                index,
                start,
                len,
                kind: PartKind::Other(format!("mbr type {ty:#04x}")),
                uuid: None,
            });
            index += 1;
        }
        let next = le32(&s, 462 + 8) as u64;
        if s[462 + 4] == 0 || next == 0 {
            return Ok(());
        }
        ebr = ext_start + next * 512;
        if ebr >= ext_start + ext_len {
            return Err(Error::CorruptPartitionTable(
                "extended boot record link points outside the extended partition".into(),
            ));
        }
    }
}

pub(crate) fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b.get(8).copied().unwrap_or(0),
        b.get(9).copied().unwrap_or(0),
        b.get(10..16)
            .unwrap_or(&[])
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

/// Reads the primary GPT header at LBA 1, falling back to the backup at the last LBA.
fn read_gpt(disk: &dyn Disk, sector: u64, protective: bool) -> Result<Option<Vec<Partition>>> {
    let mut last_err = None;
    let last_lba = disk.len() / sector;
    for lba in [1, last_lba.saturating_sub(1)] {
        if lba == 0 || (lba + 1) * sector > disk.len() {
            continue;
        }
        match read_gpt_at(disk, sector, lba) {
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        // Without a protective MBR, only an intact primary header counts as GPT.
        if !protective && last_err.is_none() {
            return Ok(None);
        }
    }
    match last_err {
        Some(e) if protective => Err(e),
        _ => Ok(None),
    }
}

fn read_gpt_at(disk: &dyn Disk, sector: u64, lba: u64) -> Result<Option<Vec<Partition>>> {
    let mut h = vec![0u8; sector as usize];
    disk.read_at(lba * sector, &mut h)?;
    if &h[..8] != b"EFI PART" {
        return Ok(None);
    }
    let bad = |m: String| Error::CorruptPartitionTable(format!("GPT header at LBA {lba}: {m}"));
    let hsize = le32(&h, 12) as usize;
    if hsize < 92 || hsize > h.len() {
        return Err(bad(format!("header size {hsize}")));
    }
    let want = le32(&h, 16);
    let mut copy = h[..hsize].to_vec();
    copy[16..20].fill(0);
    if CRC32.checksum(&copy) != want {
        return Err(bad("header CRC mismatch".into()));
    }
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80) as u64;
    let esize = le32(&h, 84) as u64;
    if esize < 128 || !esize.is_multiple_of(8) || esize > 4096 {
        return Err(bad(format!("entry size {esize}")));
    }
    let total = count * esize;
    if total > MAX_GPT_ENTRY_BYTES {
        return Err(bad(format!("{count} entries of {esize} bytes is too many")));
    }
    let off = entries_lba
        .checked_mul(sector)
        .ok_or_else(|| bad("entry array offset".into()))?;
    let mut arr = vec![0u8; total as usize];
    disk.read_at(off, &mut arr)?;
    if CRC32.checksum(&arr) != le32(&h, 88) {
        return Err(bad("partition entry array CRC mismatch".into()));
    }
    let mut parts = Vec::new();
    for (i, e) in arr.chunks_exact(esize as usize).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let index = i as u32 + 1;
        if last < first {
            return Err(bad(format!("partition {index} ends before it starts")));
        }
        let start = first.saturating_mul(sector);
        let len = (last - first).saturating_add(1).saturating_mul(sector);
        check_end(disk, index, start, len)?;
        let ty = guid(&e[..16]);
        parts.push(Partition {
            index,
            start,
            len,
            kind: match ty.as_str() {
                ESP_GUID => PartKind::Esp,
                XBOOTLDR_GUID => PartKind::Xbootldr,
                _ => PartKind::Other(ty),
            },
            uuid: Some(guid(&e[16..32])),
        });
    }
    Ok(Some(parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;

    fn mbr_disk(entries: &[(u8, u32, u32)], size: usize) -> MemDisk {
        let mut d = vec![0u8; size];
        for (i, &(ty, lba, n)) in entries.iter().enumerate() {
            let e = 446 + i * 16;
            d[e + 4] = ty;
            d[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
            d[e + 12..e + 16].copy_from_slice(&n.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        MemDisk {
            data: d,
            name: "mbr".into(),
        }
    }

    #[test]
    fn mbr_primaries() {
        let d = mbr_disk(&[(0x83, 1, 10), (0xef, 11, 5)], 64 * 512);
        let (k, p) = read_table(&d).unwrap().unwrap();
        assert_eq!(k, TableKind::Mbr);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].index, p[0].start, p[0].len), (1, 512, 5120));
        assert_eq!(p[1].kind, PartKind::Esp);
    }

    #[test]
    fn mbr_partition_beyond_end_is_an_error() {
        let d = mbr_disk(&[(0x83, 1, 100)], 64 * 512);
        assert!(matches!(
            read_table(&d),
            Err(Error::PartitionBeyondEnd { index: 1, .. })
        ));
    }

    #[test]
    fn mbr_logical_chain_and_loop() {
        let mut d = mbr_disk(&[(0x05, 10, 40)], 64 * 512);
        // EBR at sector 10: logical at +1 (len 4), next EBR at ext+20.
        let e = 10 * 512 + 446;
        d.data[e + 4] = 0x83;
        d.data[e + 8..e + 12].copy_from_slice(&1u32.to_le_bytes());
        d.data[e + 12..e + 16].copy_from_slice(&4u32.to_le_bytes());
        d.data[e + 16 + 4] = 0x05;
        d.data[e + 16 + 8..e + 16 + 12].copy_from_slice(&20u32.to_le_bytes());
        d.data[10 * 512 + 510] = 0x55;
        d.data[10 * 512 + 511] = 0xaa;
        let e2 = 30 * 512 + 446;
        d.data[e2 + 4] = 0x83;
        d.data[e2 + 8..e2 + 12].copy_from_slice(&2u32.to_le_bytes());
        d.data[e2 + 12..e2 + 16].copy_from_slice(&3u32.to_le_bytes());
        d.data[30 * 512 + 510] = 0x55;
        d.data[30 * 512 + 511] = 0xaa;
        let (_, p) = read_table(&d).unwrap().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].index, p[0].start), (5, 11 * 512));
        assert_eq!((p[1].index, p[1].start), (6, 32 * 512));
        let mut looped = mbr_disk(&[(0x05, 10, 40)], 64 * 512);
        let e = 10 * 512 + 446;
        looped.data[e + 16 + 4] = 0x05;
        looped.data[e + 16 + 8..e + 16 + 12].copy_from_slice(&20u32.to_le_bytes());
        looped.data[10 * 512 + 510..10 * 512 + 512].copy_from_slice(&[0x55, 0xaa]);
        let e2 = 30 * 512 + 446;
        // Link back to ext+0 is "end"; link to ext+20 (itself) is a loop.
        looped.data[e2 + 16 + 4] = 0x05;
        looped.data[e2 + 16 + 8..e2 + 16 + 12].copy_from_slice(&20u32.to_le_bytes());
        looped.data[30 * 512 + 510..30 * 512 + 512].copy_from_slice(&[0x55, 0xaa]);
        assert!(matches!(
            read_table(&looped),
            Err(Error::CorruptPartitionTable(_))
        ));
    }

    #[test]
    fn no_signature_or_fat_boot_sector_is_no_table() {
        let d = MemDisk {
            data: vec![0u8; 4096],
            name: "z".into(),
        };
        assert!(read_table(&d).unwrap().is_none());
        let mut f = mbr_disk(&[], 4096);
        f.data[0] = 0xeb;
        f.data[11..13].copy_from_slice(&512u16.to_le_bytes());
        f.data[82..85].copy_from_slice(b"FAT");
        assert!(read_table(&f).unwrap().is_none());
    }

    fn gpt_disk() -> MemDisk {
        let size = 128 * 512;
        let mut d = mbr_disk(&[(0xee, 1, 127)], size);
        // 4 entries of 128 bytes at LBA 2.
        let mut arr = vec![0u8; 4 * 128];
        let esp = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        arr[..16].copy_from_slice(&esp);
        arr[16] = 7;
        arr[32..40].copy_from_slice(&34u64.to_le_bytes());
        arr[40..48].copy_from_slice(&63u64.to_le_bytes());
        d.data[1024..1024 + arr.len()].copy_from_slice(&arr);
        let h = &mut d.data[512..1024];
        h[..8].copy_from_slice(b"EFI PART");
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&4u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&CRC32.checksum(&arr).to_le_bytes());
        let c = CRC32.checksum(&h[..92]);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        d
    }

    #[test]
    fn gpt_entries_and_crc() {
        let d = gpt_disk();
        let (k, p) = read_table(&d).unwrap().unwrap();
        assert_eq!(k, TableKind::Gpt);
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].start, p[0].len, &p[0].kind),
            (34 * 512, 30 * 512, &PartKind::Esp)
        );
        let mut bad = gpt_disk();
        bad.data[1024 + 40] = 0x70; // entry changed: array CRC no longer matches
        assert!(matches!(
            read_table(&bad),
            Err(Error::CorruptPartitionTable(_))
        ));
        let mut bad = gpt_disk();
        bad.data[512 + 30] ^= 1;
        assert!(matches!(
            read_table(&bad),
            Err(Error::CorruptPartitionTable(_))
        ));
    }

    #[test]
    fn guid_formatting() {
        let b = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid(&b), ESP_GUID);
    }
}
