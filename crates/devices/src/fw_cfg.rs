//! QEMU's firmware configuration interface (fw_cfg), as SeaBIOS, OVMF and Linux's
//! `qemu_fw_cfg` driver read it on x86: a 16-bit selector at port 0x510, a byte-wide data
//! port at 0x511, and the DMA interface at 0x514 (a big-endian 64-bit guest address of a
//! `FWCfgDmaAccess`, written high half first; writing the low half starts the transfer).
//!
//! Items are byte strings under a 16-bit key: the fixed ones firmware asks for (signature,
//! interface ID, UUID, RAM size, CPU counts, …) and named files, listed in the file
//! directory (key 0x19) and numbered from 0x20 in name order, as QEMU does. Every item is
//! read-only: a DMA write gets the error bit. Reads past an item's end, or of a key that
//! does not exist, give zeros, as in QEMU.
//!
//! The guest is not trusted: a DMA descriptor or buffer outside guest RAM gets the error
//! bit, lengths are bounded by the item, nothing here panics on guest input.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress};

use crate::virtio::GuestMemoryMmap;
use crate::BusDevice;

/// First port: selector (16-bit, little-endian); data is at +1; DMA address at +4..+12.
pub const FW_CFG_PORT: u16 = 0x510;
/// Ports decoded: 0x510–0x51b.
pub const FW_CFG_LEN: u64 = 12;

const DATA_OFFSET: u64 = 1;
const DMA_OFFSET: u64 = 4;

/// Fixed keys (QEMU's `FW_CFG_*`).
pub const KEY_SIGNATURE: u16 = 0x00;
pub const KEY_ID: u16 = 0x01;
pub const KEY_UUID: u16 = 0x02;
pub const KEY_RAM_SIZE: u16 = 0x03;
pub const KEY_NOGRAPHIC: u16 = 0x04;
pub const KEY_NB_CPUS: u16 = 0x05;
pub const KEY_BOOT_MENU: u16 = 0x0e;
pub const KEY_MAX_CPUS: u16 = 0x0f;
pub const KEY_FILE_DIR: u16 = 0x19;
/// First key handed to a file.
pub const KEY_FILE_FIRST: u16 = 0x20;
/// x86-specific keys.
pub const KEY_IRQ0_OVERRIDE: u16 = 0x8002;

/// ID bits: the traditional port interface and the DMA interface.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;

/// DMA control bits (`FW_CFG_DMA_CTL_*`).
const DMA_ERROR: u32 = 0x01;
const DMA_READ: u32 = 0x02;
const DMA_SKIP: u32 = 0x04;
const DMA_SELECT: u32 = 0x08;
const DMA_WRITE: u32 = 0x10;

/// What reading the DMA register gives: "QEMU CFG", how Linux's driver detects DMA.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

/// A file name takes at most 55 bytes plus its NUL (the directory entry's 56-byte field).
pub const MAX_NAME_LEN: usize = 55;
/// Bytes of the one `FWCfgDmaAccess` descriptor: control, length (be32), address (be64).
const DMA_ACCESS_LEN: usize = 16;
/// Most bytes one DMA read moves per guest-memory write (bounds the bounce buffer).
const DMA_CHUNK: usize = 64 << 10;

/// fw_cfg setup errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error("fw_cfg file name {0:?}: empty or longer than {MAX_NAME_LEN} bytes")]
    BadName(String),
    #[error("fw_cfg file {0:?} given twice")]
    Duplicate(String),
    #[error("fw_cfg: too many files")]
    TooMany,
    #[error("fw_cfg file {0:?} is larger than 4 GiB")]
    TooBig(String),
}

/// The fixed items firmware reads.
#[derive(Debug, Clone, Default)]
pub struct FwCfgMachine {
    pub uuid: [u8; 16],
    pub ram_bytes: u64,
    pub cpus: u16,
    pub max_cpus: u16,
}

/// Builder: fixed items and files, then [`FwCfgBuilder::build`].
#[derive(Default)]
pub struct FwCfgBuilder {
    items: BTreeMap<u16, Vec<u8>>,
    files: BTreeMap<String, Vec<u8>>,
}

impl FwCfgBuilder {
    /// The fixed items for `m`.
    pub fn new(m: &FwCfgMachine) -> Self {
        let mut b = Self::default();
        b.items.insert(KEY_SIGNATURE, b"QEMU".to_vec());
        b.items
            .insert(KEY_ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        b.items.insert(KEY_UUID, m.uuid.to_vec());
        b.items
            .insert(KEY_RAM_SIZE, m.ram_bytes.to_le_bytes().to_vec());
        // No graphics at all; the serial console is named by etc/sercon-port.
        b.items.insert(KEY_NOGRAPHIC, 0u16.to_le_bytes().to_vec());
        b.items.insert(KEY_NB_CPUS, m.cpus.to_le_bytes().to_vec());
        b.items
            .insert(KEY_MAX_CPUS, m.max_cpus.to_le_bytes().to_vec());
        b.items.insert(KEY_BOOT_MENU, 0u16.to_le_bytes().to_vec());
        // The PIT's IRQ 0 arrives on IOAPIC pin 2 (the MADT's override).
        b.items.insert(KEY_IRQ0_OVERRIDE, vec![1]);
        b
    }

    /// Adds file `name`.
    pub fn file(&mut self, name: &str, data: Vec<u8>) -> Result<&mut Self, FwCfgError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::BadName(name.to_string()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooBig(name.to_string()));
        }
        if self.files.insert(name.to_string(), data).is_some() {
            return Err(FwCfgError::Duplicate(name.to_string()));
        }
        Ok(self)
    }

    /// Whether file `name` was added.
    pub fn has_file(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    /// The device: files get keys from 0x20 in name order, and the directory is built.
    pub fn build(self, mem: GuestMemoryMmap) -> Result<FwCfg, FwCfgError> {
        let mut items = self.items;
        let count = u32::try_from(self.files.len()).map_err(|_| FwCfgError::TooMany)?;
        let mut dir = count.to_be_bytes().to_vec();
        for (i, (name, data)) in self.files.into_iter().enumerate() {
            let key = u16::try_from(i)
                .ok()
                .and_then(|i| KEY_FILE_FIRST.checked_add(i))
                .filter(|k| *k < 0x4000)
                .ok_or(FwCfgError::TooMany)?;
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut field = [0u8; MAX_NAME_LEN + 1];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
            items.insert(key, data);
        }
        items.insert(KEY_FILE_DIR, dir);
        Ok(FwCfg {
            items,
            selected: KEY_SIGNATURE,
            offset: 0,
            dma_high: 0,
            mem,
        })
    }
}

/// The device on the port bus at [`FW_CFG_PORT`].
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: usize,
    dma_high: u32,
    mem: GuestMemoryMmap,
}

impl FwCfg {
    fn current(&self) -> &[u8] {
        self.items
            .get(&self.selected)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn select(&mut self, key: u16) {
        self.selected = key;
        self.offset = 0;
    }

    /// Runs the DMA descriptor at `addr`; writes the completed control word back.
    fn dma(&mut self, addr: u64) {
        let mut desc = [0u8; DMA_ACCESS_LEN];
        if self.mem.read_slice(&mut desc, GuestAddress(addr)).is_err() {
            log::debug!("fw_cfg: DMA descriptor at {addr:#x} is not in guest RAM");
            return;
        }
        let word = |i: usize| u32::from_be_bytes([desc[i], desc[i + 1], desc[i + 2], desc[i + 3]]);
        let control = word(0);
        let length = word(4) as usize;
        let buffer = (u64::from(word(8)) << 32) | u64::from(word(12));
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let ok = if control & DMA_READ != 0 {
            self.dma_read(buffer, length)
        } else if control & DMA_WRITE != 0 {
            // Every item is read-only.
            false
        } else if control & DMA_SKIP != 0 {
            self.offset = self.offset.saturating_add(length);
            true
        } else {
            true
        };
        let done: u32 = if ok { 0 } else { DMA_ERROR };
        if self
            .mem
            .write_slice(&done.to_be_bytes(), GuestAddress(addr))
            .is_err()
        {
            log::debug!("fw_cfg: cannot complete the DMA descriptor at {addr:#x}");
        }
    }

    /// Copies `length` bytes of the selected item (zeros past its end) to guest `buffer`.
    fn dma_read(&mut self, buffer: u64, length: usize) -> bool {
        let mut done = 0usize;
        let mut chunk = Vec::new();
        while done < length {
            let n = (length - done).min(DMA_CHUNK);
            chunk.clear();
            chunk.resize(n, 0);
            let item = self.current();
            let from = self.offset.min(item.len());
            let avail = (item.len() - from).min(n);
            chunk[..avail].copy_from_slice(&item[from..from + avail]);
            let Some(at) = buffer.checked_add(done as u64) else {
                return false;
            };
            if self.mem.write_slice(&chunk, GuestAddress(at)).is_err() {
                log::debug!("fw_cfg: DMA read buffer at {at:#x}+{n:#x} is not in guest RAM");
                return false;
            }
            self.offset = self.offset.saturating_add(n);
            done += n;
        }
        true
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            DATA_OFFSET => {
                // Byte-wide data port; wider reads return consecutive bytes, as QEMU does.
                for b in data.iter_mut() {
                    let item = self.current();
                    *b = item.get(self.offset).copied().unwrap_or(0);
                    self.offset = self.offset.saturating_add(1);
                }
            }
            o if (DMA_OFFSET..FW_CFG_LEN).contains(&o) => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                let start = (o - DMA_OFFSET) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get(start + i).copied().unwrap_or(0xff);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            // Big-endian halves of the descriptor address: high at 0x514, low at 0x518.
            (4, 4) => self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            (8, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let addr = (u64::from(self.dma_high) << 32) | u64::from(low);
                self.dma_high = 0;
                self.dma(addr);
            }
            _ => log::debug!(
                "fw_cfg: ignored {}-byte write at port {:#x}",
                data.len(),
                u64::from(FW_CFG_PORT) + offset
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn device() -> FwCfg {
        let mut b = FwCfgBuilder::new(&FwCfgMachine {
            uuid: [7; 16],
            ram_bytes: 256 << 20,
            cpus: 2,
            max_cpus: 2,
        });
        b.file("etc/b", b"second".to_vec()).unwrap();
        b.file("etc/a", vec![1, 2, 3]).unwrap();
        b.build(mem()).unwrap()
    }

    fn read_bytes(d: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        d.write(0, &key.to_le_bytes());
        let mut v = vec![0u8; n];
        for b in v.iter_mut() {
            let mut x = [0u8];
            d.read(1, &mut x);
            *b = x[0];
        }
        v
    }

    #[test]
    fn signature_id_and_fixed_items() {
        let mut d = device();
        assert_eq!(read_bytes(&mut d, KEY_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_bytes(&mut d, KEY_ID, 4), 3u32.to_le_bytes());
        assert_eq!(read_bytes(&mut d, KEY_NB_CPUS, 2), 2u16.to_le_bytes());
        assert_eq!(
            read_bytes(&mut d, KEY_RAM_SIZE, 8),
            (256u64 << 20).to_le_bytes()
        );
        // Past the end and unknown keys read as zeros.
        assert_eq!(read_bytes(&mut d, KEY_SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read_bytes(&mut d, 0x1234, 3), [0, 0, 0]);
        let mut sig = [0u8; 8];
        d.read(4, &mut sig);
        assert_eq!(&sig, b"QEMU CFG");
    }

    #[test]
    fn directory_lists_files_in_name_order() {
        let mut d = device();
        let dir = read_bytes(&mut d, KEY_FILE_DIR, 4 + 2 * 64);
        assert_eq!(u32::from_be_bytes(dir[0..4].try_into().unwrap()), 2);
        let entry = |i: usize| &dir[4 + 64 * i..4 + 64 * (i + 1)];
        assert_eq!(u32::from_be_bytes(entry(0)[0..4].try_into().unwrap()), 3);
        assert_eq!(u16::from_be_bytes(entry(0)[4..6].try_into().unwrap()), 0x20);
        assert_eq!(&entry(0)[8..14], b"etc/a\0");
        assert_eq!(u16::from_be_bytes(entry(1)[4..6].try_into().unwrap()), 0x21);
        assert_eq!(read_bytes(&mut d, 0x21, 6), b"second");
    }

    fn dma(d: &mut FwCfg, control: u32, len: u32, buf: u64) -> u32 {
        let mut desc = Vec::new();
        desc.extend_from_slice(&control.to_be_bytes());
        desc.extend_from_slice(&len.to_be_bytes());
        desc.extend_from_slice(&buf.to_be_bytes());
        d.mem.write_slice(&desc, GuestAddress(0x1000)).unwrap();
        d.write(4, &0u32.to_be_bytes());
        d.write(8, &0x1000u32.to_be_bytes());
        let mut c = [0u8; 4];
        d.mem.read_slice(&mut c, GuestAddress(0x1000)).unwrap();
        u32::from_be_bytes(c)
    }

    #[test]
    fn dma_select_skip_read_and_errors() {
        let mut d = device();
        let control = (0x21u32 << 16) | DMA_SELECT | DMA_SKIP;
        assert_eq!(dma(&mut d, control, 2, 0), 0);
        assert_eq!(dma(&mut d, DMA_READ, 8, 0x2000), 0);
        let mut got = [0u8; 8];
        d.mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got, b"cond\0\0\0\0");
        // Writes are refused; a buffer outside RAM is an error, not a panic.
        assert_eq!(dma(&mut d, DMA_WRITE, 1, 0x2000), DMA_ERROR);
        assert_eq!(
            dma(&mut d, DMA_SELECT | DMA_READ, 16, u64::MAX - 4),
            DMA_ERROR
        );
        assert_eq!(dma(&mut d, DMA_READ, 0x10_0000, 0xff000), DMA_ERROR);
        // A descriptor outside RAM is ignored.
        d.write(4, &1u32.to_be_bytes());
        d.write(8, &0u32.to_be_bytes());
    }

    #[test]
    fn bad_names() {
        let mut b = FwCfgBuilder::new(&FwCfgMachine::default());
        assert!(b.file("", vec![]).is_err());
        assert!(b.file(&"x".repeat(56), vec![]).is_err());
        b.file(&"x".repeat(55), vec![]).unwrap();
        assert_eq!(
            b.file(&"x".repeat(55), vec![]).err(),
            Some(FwCfgError::Duplicate("x".repeat(55)))
        );
    }
}
