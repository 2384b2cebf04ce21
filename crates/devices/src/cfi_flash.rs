//! A byte-wide parallel NOR flash with the Intel/Sharp command set (CFI command set 0001),
//! as much of it as a firmware's variable driver uses: OVMF's QemuFlashFvbServicesRuntimeDxe
//! probes it (clear status, read status, program a byte back), programs bytes (0x10/0x40 +
//! data), erases blocks (0x20 + 0xD0) and returns to read-array mode (0xFF).
//!
//! In read-array mode the guest reads the backing store directly (a read-only memory slot);
//! in any other mode the store is unmapped and reads come here, answering the status byte.

use crate::bus::BusDevice;

/// Erase block: OVMF's PcdOvmfFirmwareBlockSize (QEMU's pflash sector length for it).
pub const BLOCK_SIZE: u64 = 4096;

/// Status register bits.
const STATUS_READY: u8 = 0x80;
const STATUS_ERASE_ERROR: u8 = 0x20;
const STATUS_PROGRAM_ERROR: u8 = 0x10;

/// Commands.
const CMD_PROGRAM: u8 = 0x10;
const CMD_PROGRAM_ALT: u8 = 0x40;
const CMD_BLOCK_ERASE: u8 = 0x20;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_ERASE_CONFIRM: u8 = 0xd0;
const CMD_READ_ARRAY: u8 = 0xff;
const CMD_READ_ARRAY_ALT: u8 = 0x00;

/// The flash's array: where its bytes live and whether guest reads reach it directly.
pub trait FlashBacking: Send {
    /// False if the range is outside the array.
    fn read(&self, offset: u64, data: &mut [u8]) -> bool;
    fn write(&mut self, offset: u64, data: &[u8]) -> bool;
    fn fill(&mut self, offset: u64, len: u64, byte: u8) -> bool;
    /// True: guest reads hit the array without exiting (read-array mode).
    fn set_direct_reads(&mut self, on: bool);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    ReadArray,
    ReadStatus,
    /// After 0x10/0x40: the next write is the data.
    Program,
    /// After 0x20: the next write must be 0xD0 at the block.
    EraseSetup,
}

pub struct CfiFlash {
    backing: Box<dyn FlashBacking>,
    mode: Mode,
    status: u8,
}

impl CfiFlash {
    /// Starts in read-array mode, ready, with direct reads on.
    pub fn new(mut backing: Box<dyn FlashBacking>) -> Self {
        backing.set_direct_reads(true);
        CfiFlash {
            backing,
            mode: Mode::ReadArray,
            status: STATUS_READY,
        }
    }

    fn enter(&mut self, mode: Mode) {
        if (mode == Mode::ReadArray) != (self.mode == Mode::ReadArray) {
            self.backing.set_direct_reads(mode == Mode::ReadArray);
        }
        self.mode = mode;
    }

    fn program(&mut self, offset: u64, data: &[u8]) {
        // As QEMU's pflash (which OVMF is written against): the byte is stored as given, not
        // ANDed into the erased cells.
        if !self.backing.write(offset, data) {
            self.status |= STATUS_PROGRAM_ERROR;
        }
        self.status |= STATUS_READY;
        self.enter(Mode::ReadStatus);
    }

    fn erase(&mut self, offset: u64, confirm: u8) {
        let block = offset - offset % BLOCK_SIZE;
        if confirm != CMD_ERASE_CONFIRM {
            // A broken sequence: both error bits, as the command set specifies.
            self.status |= STATUS_ERASE_ERROR | STATUS_PROGRAM_ERROR;
        } else if !self.backing.fill(block, BLOCK_SIZE, 0xff) {
            self.status |= STATUS_ERASE_ERROR;
        } else {
            log::debug!("flash: erased block at +{block:#x}");
        }
        self.status |= STATUS_READY;
        self.enter(Mode::ReadStatus);
    }

    fn command(&mut self, offset: u64, cmd: u8) {
        match cmd {
            CMD_READ_ARRAY | CMD_READ_ARRAY_ALT => self.enter(Mode::ReadArray),
            CMD_PROGRAM | CMD_PROGRAM_ALT => self.enter(Mode::Program),
            CMD_BLOCK_ERASE => self.enter(Mode::EraseSetup),
            // QEMU's model (what OVMF's probe expects): status reads 0 afterwards, and the
            // array is back.
            CMD_CLEAR_STATUS => {
                self.status = 0;
                self.enter(Mode::ReadArray);
            }
            CMD_READ_STATUS => self.enter(Mode::ReadStatus),
            _ => {
                log::debug!("flash: unsupported command {cmd:#04x} at +{offset:#x}");
                self.enter(Mode::ReadArray);
            }
        }
    }
}

impl BusDevice for CfiFlash {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.mode {
            Mode::ReadArray => {
                if !self.backing.read(offset, data) {
                    data.fill(0xff);
                }
            }
            Mode::ReadStatus | Mode::Program | Mode::EraseSetup => data.fill(self.status),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&low) = data.first() else {
            return;
        };
        match self.mode {
            Mode::Program => self.program(offset, data),
            Mode::EraseSetup => self.erase(offset, low),
            Mode::ReadArray | Mode::ReadStatus => self.command(offset, low),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Shared {
        bytes: Vec<u8>,
        direct: bool,
        toggles: u32,
    }

    struct MemBacking(Arc<Mutex<Shared>>);

    impl FlashBacking for MemBacking {
        fn read(&self, offset: u64, data: &mut [u8]) -> bool {
            let s = self.0.lock().unwrap();
            let Some(src) = s.bytes.get(offset as usize..offset as usize + data.len()) else {
                return false;
            };
            data.copy_from_slice(src);
            true
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> bool {
            let mut s = self.0.lock().unwrap();
            let Some(dst) = s
                .bytes
                .get_mut(offset as usize..offset as usize + data.len())
            else {
                return false;
            };
            dst.copy_from_slice(data);
            true
        }
        fn fill(&mut self, offset: u64, len: u64, byte: u8) -> bool {
            let mut s = self.0.lock().unwrap();
            let Some(end) = offset.checked_add(len) else {
                return false;
            };
            let Some(dst) = s.bytes.get_mut(offset as usize..end as usize) else {
                return false;
            };
            dst.fill(byte);
            true
        }
        fn set_direct_reads(&mut self, on: bool) {
            let mut s = self.0.lock().unwrap();
            s.direct = on;
            s.toggles += 1;
        }
    }

    fn flash(len: usize) -> (CfiFlash, Arc<Mutex<Shared>>) {
        let shared = Arc::new(Mutex::new(Shared {
            bytes: (0..len).map(|i| (i * 7 + 3) as u8).collect(),
            ..Default::default()
        }));
        (CfiFlash::new(Box::new(MemBacking(shared.clone()))), shared)
    }

    /// A guest read: from the array while it is mapped (the device never sees those), from
    /// the device otherwise.
    fn guest_read(f: &mut CfiFlash, s: &Arc<Mutex<Shared>>, at: u64) -> u8 {
        if s.lock().unwrap().direct {
            return s.lock().unwrap().bytes[at as usize];
        }
        let mut b = [0u8];
        f.read(at, &mut b);
        b[0]
    }

    /// OVMF's QemuFlashDetected, step by step: it must conclude "FLASH, writable" and leave
    /// the array readable and unchanged.
    #[test]
    fn ovmf_probe_finds_writable_flash() {
        let (mut f, s) = flash(2 * BLOCK_SIZE as usize);
        let at = 0x10;
        let original = guest_read(&mut f, &s, at);
        assert!(![0x50, 0x70, 0x00].contains(&original));
        f.write(at, &[CMD_CLEAR_STATUS]);
        assert_eq!(guest_read(&mut f, &s, at), original, "not RAM");
        f.write(at, &[CMD_READ_STATUS]);
        assert_eq!(guest_read(&mut f, &s, at), 0x00, "cleared status");
        f.write(at, &[CMD_PROGRAM]);
        f.write(at, &[original]);
        f.write(at, &[CMD_READ_STATUS]);
        let status = guest_read(&mut f, &s, at);
        f.write(at, &[CMD_READ_ARRAY]);
        assert_eq!(status & STATUS_PROGRAM_ERROR, 0, "not write-protected");
        assert!(s.lock().unwrap().direct);
        assert_eq!(guest_read(&mut f, &s, at), original);
    }

    /// QemuFlashEraseBlock then QemuFlashWrite: the block reads 0xFF but for what was
    /// programmed; the neighbouring block is untouched; reads while programming are status.
    #[test]
    fn erase_then_program() {
        let (mut f, s) = flash(2 * BLOCK_SIZE as usize);
        let before = s.lock().unwrap().bytes.clone();
        f.write(BLOCK_SIZE + 5, &[CMD_BLOCK_ERASE]);
        f.write(BLOCK_SIZE + 5, &[CMD_ERASE_CONFIRM]);
        assert_eq!(guest_read(&mut f, &s, BLOCK_SIZE), STATUS_READY);
        for (i, b) in b"rhyve".iter().enumerate() {
            let at = BLOCK_SIZE + 100 + i as u64;
            f.write(at, &[CMD_PROGRAM]);
            f.write(at, &[*b]);
        }
        f.write(BLOCK_SIZE + 104, &[CMD_READ_ARRAY]);
        let bytes = s.lock().unwrap().bytes.clone();
        assert_eq!(bytes[..BLOCK_SIZE as usize], before[..BLOCK_SIZE as usize]);
        assert_eq!(&bytes[BLOCK_SIZE as usize + 100..][..5], b"rhyve");
        assert!(bytes[BLOCK_SIZE as usize..BLOCK_SIZE as usize + 100]
            .iter()
            .all(|&b| b == 0xff));
        assert!(s.lock().unwrap().direct);
    }

    /// Hostile sequences: a broken erase sets the error bits and erases nothing; writes past
    /// the end fail with the program-error bit; nothing panics.
    #[test]
    fn bad_sequences_report_errors() {
        let (mut f, s) = flash(BLOCK_SIZE as usize);
        let before = s.lock().unwrap().bytes.clone();
        f.write(0, &[CMD_BLOCK_ERASE]);
        f.write(0, &[0x42]);
        let st = guest_read(&mut f, &s, 0);
        assert_eq!(st & (STATUS_ERASE_ERROR | STATUS_PROGRAM_ERROR), 0x30);
        assert_eq!(s.lock().unwrap().bytes, before);
        f.write(0, &[CMD_CLEAR_STATUS]);
        f.write(BLOCK_SIZE * 9, &[CMD_PROGRAM]);
        f.write(BLOCK_SIZE * 9, &[1, 2, 3, 4]);
        assert_ne!(guest_read(&mut f, &s, 0) & STATUS_PROGRAM_ERROR, 0);
        f.write(u64::MAX - 1, &[CMD_BLOCK_ERASE]);
        f.write(u64::MAX - 1, &[CMD_ERASE_CONFIRM]);
        assert_ne!(guest_read(&mut f, &s, 0) & STATUS_ERASE_ERROR, 0);
        f.write(0, &[]);
        f.write(0, &[0x98]);
        assert!(s.lock().unwrap().direct);
    }
}
