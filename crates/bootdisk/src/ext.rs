//! ext2/3/4 through the `ext4-view` crate (read-only, no unsafe, written to reject corrupt
//! metadata with errors). This file only adapts it to the `Fs` trait and maps its errors.

use crate::block::{le16, le32, Disk};
use crate::error::{Error, Result};
use crate::fs::{Fs, Kind};
use ext4_view::{Ext4, Ext4Error, Ext4Read};
use std::rc::Rc;

const MAGIC: u16 = 0xef53;

struct Reader(Rc<dyn Disk>);

impl Ext4Read for Reader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0
            .read_at(start_byte, dst)
            .map_err(|e| Box::new(e) as _)
    }
}

pub struct ExtFs {
    fs: Ext4,
    name: String,
    uuid: String,
}

/// Our own error when a read by ext4-view failed in the block layer; else a filesystem error.
fn map_err(e: Ext4Error, what: &str) -> Error {
    if let Ext4Error::Io(inner) = e {
        return match inner.downcast::<Error>() {
            Ok(ours) => *ours,
            Err(other) => Error::CorruptFs(format!("{what}: {other}")),
        };
    }
    match e {
        Ext4Error::NotFound => Error::NotFound(what.to_string()),
        Ext4Error::NotADirectory => Error::NotADirectory(what.to_string()),
        e => Error::CorruptFs(format!("{what}: {e}")),
    }
}

/// ext4-view sizes its block group table from the superblock before reading it; a hostile
/// superblock could ask for billions of groups. Refuse what mke2fs would never make and
/// filesystems larger than their device, which bounds the table by the image size.
fn check_geometry(sb: &[u8], dev_len: u64, name: &str) -> Result<()> {
    let bad = |m: String| Error::CorruptFs(format!("{name} (ext): {m}"));
    let log = le32(sb, 0x18);
    if log > 6 {
        return Err(bad(format!("block size 2^{} bytes", log + 10)));
    }
    let block = 1024u64 << log;
    let incompat = le32(sb, 0x60);
    let mut blocks = le32(sb, 0x04) as u64;
    if incompat & 0x80 != 0 {
        blocks |= (le32(sb, 0x150) as u64) << 32;
    }
    let per_group = le32(sb, 0x20) as u64;
    // mke2fs: 256 <= blocks per group <= 8 * block size (one bitmap block).
    if per_group < 256 || per_group > 8 * block {
        return Err(bad(format!("{per_group} blocks per group")));
    }
    let size = blocks.saturating_mul(block);
    if size > dev_len {
        return Err(Error::Truncated {
            offset: 0,
            len: size,
            size: dev_len,
        });
    }
    Ok(())
}

impl ExtFs {
    /// `Ok(None)` when the disk holds no ext superblock; an error when it holds a broken one.
    pub fn probe(disk: Rc<dyn Disk>, name: String) -> Result<Option<Self>> {
        if disk.len() < 2048 {
            return Ok(None);
        }
        let mut sb = [0u8; 1024];
        disk.read_at(1024, &mut sb)?;
        if le16(&sb, 56) != MAGIC {
            return Ok(None);
        }
        check_geometry(&sb, disk.len(), &name)?;
        let fs = Ext4::load(Box::new(Reader(disk))).map_err(|e| map_err(e, &name))?;
        let uuid = fs.uuid().to_string();
        Ok(Some(ExtFs {
            fs,
            name: format!("{name} (ext)"),
            uuid,
        }))
    }

    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    fn ctx(&self, path: &str) -> String {
        format!("{path} on {}", self.name)
    }
}

impl Fs for ExtFs {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn lstat(&self, path: &str) -> Result<Option<Kind>> {
        match self.fs.symlink_metadata(path) {
            Ok(m) => {
                let t = m.file_type();
                Ok(Some(if t.is_symlink() {
                    Kind::Symlink
                } else if t.is_dir() {
                    Kind::Dir
                } else if t.is_regular_file() {
                    Kind::File(m.len())
                } else {
                    Kind::Other
                }))
            }
            Err(Ext4Error::NotFound) | Err(Ext4Error::NotADirectory) => Ok(None),
            Err(e) => Err(map_err(e, &self.ctx(path))),
        }
    }

    fn read_link(&self, path: &str) -> Result<String> {
        let t = self
            .fs
            .read_link(path)
            .map_err(|e| map_err(e, &self.ctx(path)))?;
        t.to_str()
            .map(str::to_string)
            .map_err(|_| Error::BadPath(self.ctx(path)))
    }

    fn read_file_raw(&self, path: &str, size: u64) -> Result<Vec<u8>> {
        let mut f = self
            .fs
            .open(path)
            .map_err(|e| map_err(e, &self.ctx(path)))?;
        let mut out = vec![0u8; size as usize];
        let mut done = 0;
        while done < out.len() {
            let n = f
                .read_bytes(&mut out[done..])
                .map_err(|e| map_err(e, &self.ctx(path)))?;
            if n == 0 {
                return Err(Error::CorruptFs(format!("{}: short read", self.ctx(path))));
            }
            done += n;
        }
        Ok(out)
    }

    fn list_dir_raw(&self, path: &str) -> Result<Vec<String>> {
        let rd = self
            .fs
            .read_dir(path)
            .map_err(|e| map_err(e, &self.ctx(path)))?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| map_err(e, &self.ctx(path)))?;
            if let Ok(n) = e.file_name().as_str() {
                if n != "." && n != ".." {
                    out.push(n.to_string());
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;

    #[test]
    fn no_magic_is_not_ext_and_bad_superblock_is_an_error() {
        let d: Rc<dyn Disk> = Rc::new(MemDisk {
            data: vec![0u8; 8192],
            name: "z".into(),
        });
        assert!(ExtFs::probe(d, "z".into()).unwrap().is_none());
        let mut data = vec![0u8; 8192];
        data[1024 + 56..1024 + 58].copy_from_slice(&MAGIC.to_le_bytes());
        let d: Rc<dyn Disk> = Rc::new(MemDisk {
            data,
            name: "bad".into(),
        });
        assert!(matches!(
            ExtFs::probe(d, "bad".into()),
            Err(Error::CorruptFs(_)) | Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn hostile_geometry_is_refused_before_ext4_view_sizes_its_tables() {
        let sb = |blocks: u32, hi: u32, per_group: u32, log: u32| {
            let mut d = vec![0u8; 1 << 20];
            let s = &mut d[1024..2048];
            s[0x04..0x08].copy_from_slice(&blocks.to_le_bytes());
            s[0x18..0x1c].copy_from_slice(&log.to_le_bytes());
            s[0x20..0x24].copy_from_slice(&per_group.to_le_bytes());
            s[0x38..0x3a].copy_from_slice(&MAGIC.to_le_bytes());
            s[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
            s[0x150..0x154].copy_from_slice(&hi.to_le_bytes());
            let disk: Rc<dyn Disk> = Rc::new(MemDisk {
                data: d,
                name: "h".into(),
            });
            ExtFs::probe(disk, "h".into())
        };
        // 2^40 blocks of 1 KiB on a 1 MiB device, with 1 block per group: billions of groups.
        assert!(matches!(sb(0, 256, 256, 0), Err(Error::Truncated { .. })));
        assert!(matches!(sb(1024, 0, 1, 0), Err(Error::CorruptFs(_))));
        assert!(matches!(sb(1024, 0, 65536, 0), Err(Error::CorruptFs(_))));
        assert!(matches!(sb(16, 0, 8192, 30), Err(Error::CorruptFs(_))));
    }
}
