//! Guest memory backed by a file the guest may change only through a device: a firmware's
//! variable store (QEMU's "ROM device" memory). The file is mapped shared, so what the
//! device programs reaches the file; the guest reads it through a read-only memory slot
//! while the device is in read-array mode, and every guest write exits to the device.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::AtomicBool;

use crate::{Error, Result};

/// A shared, writable host mapping of a whole file, placed at a fixed guest address.
pub struct FlashMemory {
    addr: *mut libc::c_void,
    len: usize,
    gpa: u64,
    slot: u32,
    /// Whether the read-only memory slot is present (guest reads bypass the device).
    mapped: AtomicBool,
    // Keeps the lock (one VM per variable store) and the mapping's file.
    _file: File,
}

// SAFETY: the mapping is owned by this value; the guest and the device share it as they
// share RAM (plain bytes, no invariants).
unsafe impl Send for FlashMemory {}
// SAFETY: as above; all host access goes through bounds-checked copies.
unsafe impl Sync for FlashMemory {}

impl FlashMemory {
    /// Maps `file` (its whole length, a non-zero multiple of 4 KiB) shared and writable,
    /// after taking an exclusive lock on it: two VMs on one variable store would corrupt it.
    pub(crate) fn new(file: File, gpa: u64, slot: u32) -> Result<Self> {
        let fail = |what: String| Error::Memory(format!("flash at {gpa:#x}: {what}"));
        let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
        if len == 0 || !len.is_multiple_of(4096) || !gpa.is_multiple_of(4096) {
            return Err(fail(format!(
                "{len} bytes: size and address must be non-zero multiples of 4 KiB"
            )));
        }
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(fail("the file is in use by another VM (locked)".into()));
        }
        let len = usize::try_from(len).map_err(|_| fail("too large".into()))?;
        // SAFETY: a new shared mapping of a file we own; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(fail(std::io::Error::last_os_error().to_string()));
        }
        Ok(FlashMemory {
            addr,
            len,
            gpa,
            slot,
            mapped: AtomicBool::new(false),
            _file: file,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Never true: a flash has at least one 4 KiB block.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest-physical base address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }

    pub(crate) fn host_addr(&self) -> u64 {
        self.addr as u64
    }

    pub(crate) fn mapped(&self) -> &AtomicBool {
        &self.mapped
    }

    /// The in-bounds part of `[offset, offset + n)` as a host pointer and length.
    fn span(&self, offset: u64, n: usize) -> Option<*mut u8> {
        let end = offset.checked_add(n as u64)?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: offset + n <= len, so the pointer stays inside the mapping.
        Some(unsafe { self.addr.cast::<u8>().add(offset as usize) })
    }

    /// Copies bytes at `offset` into `data`; false (and `data` untouched) if out of range.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let Some(p) = self.span(offset, data.len()) else {
            return false;
        };
        // SAFETY: `span` checked the range; `data` is a distinct host buffer.
        unsafe { std::ptr::copy_nonoverlapping(p, data.as_mut_ptr(), data.len()) };
        true
    }

    /// Stores `data` at `offset`; false (and nothing written) if out of range.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        let Some(p) = self.span(offset, data.len()) else {
            return false;
        };
        // SAFETY: `span` checked the range; `data` is a distinct host buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        true
    }

    /// Sets `len` bytes at `offset` to `byte` (a block erase); false if out of range.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> bool {
        let Ok(n) = usize::try_from(len) else {
            return false;
        };
        let Some(p) = self.span(offset, n) else {
            return false;
        };
        // SAFETY: `span` checked the range.
        unsafe { std::ptr::write_bytes(p, byte, n) };
        true
    }

    /// Writes what the guest changed back to the file now.
    pub fn sync(&self) -> std::io::Result<()> {
        // SAFETY: msync over our own whole mapping.
        if unsafe { libc::msync(self.addr, self.len, libc::MS_SYNC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for FlashMemory {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            log::warn!("flash at {:#x}: writing back to its file: {e}", self.gpa);
        }
        // SAFETY: unmapping our own mapping; the Vm drops its slots' users (the VM fd) first.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
