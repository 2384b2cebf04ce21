//! QEMU's "BIOS linker/loader" script (fw_cfg file `etc/table-loader`): 128-byte commands
//! telling firmware to allocate fw_cfg files in guest memory, patch pointers between them
//! and recompute checksums. SeaBIOS and OVMF run it to install ACPI tables they did not
//! build themselves.

/// Command numbers.
const ALLOCATE: u32 = 1;
const ADD_POINTER: u32 = 2;
const ADD_CHECKSUM: u32 = 3;
/// Every command is this long, zero-padded.
const COMMAND_LEN: usize = 128;
/// File names are NUL-padded to this many bytes.
const NAME_LEN: usize = 56;

/// Where ALLOCATE puts a file.
#[derive(Debug, Clone, Copy)]
pub enum Zone {
    /// Anywhere in RAM (below 4 GiB).
    High = 1,
    /// The F segment (0xF0000–0xFFFFF), where an OS's legacy scan finds an RSDP.
    FSeg = 2,
}

/// A script under construction.
#[derive(Default)]
pub struct TableLoader {
    bytes: Vec<u8>,
}

impl TableLoader {
    pub fn new() -> Self {
        Self::default()
    }

    fn command(&mut self, cmd: u32) -> Command<'_> {
        let start = self.bytes.len();
        self.bytes.resize(start + COMMAND_LEN, 0);
        self.bytes[start..start + 4].copy_from_slice(&cmd.to_le_bytes());
        Command {
            buf: &mut self.bytes[start..start + COMMAND_LEN],
            at: 4,
        }
    }

    /// Load `file` into guest memory, aligned to `align` bytes, in `zone`.
    pub fn allocate(&mut self, file: &str, align: u32, zone: Zone) {
        self.command(ALLOCATE)
            .name(file)
            .put(&align.to_le_bytes())
            .put(&[zone as u8]);
    }

    /// Add `src`'s guest address to the `size`-byte little-endian value at `offset` in `dest`.
    pub fn add_pointer(&mut self, dest: &str, src: &str, offset: u32, size: u8) {
        self.command(ADD_POINTER)
            .name(dest)
            .name(src)
            .put(&offset.to_le_bytes())
            .put(&[size]);
    }

    /// Make bytes `start..start + len` of `file` sum to zero through the byte at `result`.
    pub fn add_checksum(&mut self, file: &str, result: u32, start: u32, len: u32) {
        self.command(ADD_CHECKSUM)
            .name(file)
            .put(&result.to_le_bytes())
            .put(&start.to_le_bytes())
            .put(&len.to_le_bytes());
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

struct Command<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Command<'_> {
    fn put(mut self, b: &[u8]) -> Self {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
        self
    }

    fn name(self, name: &str) -> Self {
        let mut field = [0u8; NAME_LEN];
        let n = name.len().min(NAME_LEN - 1);
        field[..n].copy_from_slice(&name.as_bytes()[..n]);
        self.put(&field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_encoding() {
        let mut t = TableLoader::new();
        t.allocate("etc/acpi/rsdp", 16, Zone::FSeg);
        t.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 24, 8);
        t.add_checksum("etc/acpi/rsdp", 8, 0, 20);
        let b = t.into_bytes();
        assert_eq!(b.len(), 3 * 128);
        assert_eq!(&b[0..4], &1u32.to_le_bytes());
        assert_eq!(&b[4..17], b"etc/acpi/rsdp");
        assert_eq!(&b[60..64], &16u32.to_le_bytes());
        assert_eq!(b[64], 2);
        let p = &b[128..256];
        assert_eq!(&p[0..4], &2u32.to_le_bytes());
        assert_eq!(&p[60..75], b"etc/acpi/tables");
        assert_eq!(&p[116..120], &24u32.to_le_bytes());
        assert_eq!(p[120], 8);
        let c = &b[256..384];
        assert_eq!(&c[0..4], &3u32.to_le_bytes());
        assert_eq!(&c[60..72], &[8, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0]);
    }
}
