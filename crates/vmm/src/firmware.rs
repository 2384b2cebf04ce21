//! Booting through firmware (bhyve's `-l bootrom,ROM`): the ROM mapped read-only below
//! 4 GiB with its last 128 KiB copied to 0xE0000–0xFFFFF as RAM, the boot vCPU left in its
//! power-on state (real mode at the reset vector), and what firmware reads from QEMU's
//! fw_cfg: RAM map, CPU count, ACPI tables through the table loader, serial console port
//! and the `-f` files.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use devices::cfi_flash::{FlashBacking, BLOCK_SIZE};
use devices::fw_cfg::{FwCfg, FwCfgBuilder, FwCfgMachine};
use devices::BusDevice;
use loader::layout::E820Kind;
use vm_memory::{Bytes, GuestAddress};
use vmmapi::{FlashMemory, Vm};

use crate::config::{FwCfgSource, VmConfig, MAX_BOOTROM};

/// End of the region legacy BIOSes run from (their shadow copy): 1 MiB.
const LEGACY_BIOS_END: u64 = 0x10_0000;
/// How much of the ROM's end is copied below 1 MiB: 0xE0000–0xFFFFF.
const LEGACY_BIOS_LEN: u64 = 128 << 10;

/// A mapped boot ROM.
pub struct BootRom {
    /// Guest-physical range `[base, 4 GiB)`.
    pub base: u64,
    pub size: u64,
    /// The VARSFILE's flash, right below `base`.
    pub vars: Option<Arc<FlashMemory>>,
}

/// Reads and checks `-l bootrom,PATH[,VARS]`, maps it read-only under 4 GiB and copies its
/// last 128 KiB (less for a smaller ROM) to the top of the first megabyte; VARS is mapped
/// right below it, as QEMU places OVMF's variable flash (pflash1) below its code (pflash0).
pub fn load_bootrom(vm: &mut Vm, path: &Path, vars: Option<&Path>) -> Result<BootRom> {
    let arg = || format!("-l bootrom,{}", path.display());
    let meta = std::fs::metadata(path).with_context(arg)?;
    if !meta.is_file() {
        bail!("{}: not a regular file", arg());
    }
    let size = meta.len();
    if size == 0 || !size.is_multiple_of(4096) || size > MAX_BOOTROM {
        bail!(
            "{}: the ROM is {size} bytes; it must be a non-zero multiple of 4 KiB, at most {} MiB",
            arg(),
            MAX_BOOTROM >> 20
        );
    }
    let bytes = std::fs::read(path).with_context(arg)?;
    if bytes.len() as u64 != size {
        bail!("{}: the file changed while it was read", arg());
    }
    let base = (1u64 << 32) - size;
    vm.map_rom(base, &bytes).with_context(arg)?;
    let low = size.min(LEGACY_BIOS_LEN);
    let tail = &bytes[(size - low) as usize..];
    vm.ram()
        .memory()
        .write_slice(tail, GuestAddress(LEGACY_BIOS_END - low))
        .with_context(|| format!("{}: copying its end below 1 MiB", arg()))?;
    log::info!(
        "boot ROM {} ({} KiB) at {base:#x}, last {} KiB also at {:#x}",
        path.display(),
        size >> 10,
        low >> 10,
        LEGACY_BIOS_END - low
    );
    let vars = match vars {
        Some(p) => Some(map_vars(vm, p, base, size)?),
        None => None,
    };
    Ok(BootRom { base, size, vars })
}

/// Maps the VARSFILE as flash ending at `rom_base`; ROM and flash together stay within
/// the top [`MAX_BOOTROM`] below 4 GiB (clear of KVM's pages under it).
fn map_vars(vm: &mut Vm, path: &Path, rom_base: u64, rom_size: u64) -> Result<Arc<FlashMemory>> {
    let arg = || format!("-l bootrom,ROM,{}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(arg)?;
    let meta = file.metadata().with_context(arg)?;
    if !meta.is_file() {
        bail!("{}: not a regular file", arg());
    }
    let size = meta.len();
    let room = MAX_BOOTROM - rom_size;
    if size < BLOCK_SIZE || !size.is_multiple_of(BLOCK_SIZE) || size > room {
        bail!(
            "{}: the variable store is {size} bytes; it must be a non-zero multiple of 4 KiB, \
             at most {} KiB next to this ROM (copy the firmware's own, e.g. OVMF_VARS_4M.fd)",
            arg(),
            room >> 10
        );
    }
    let flash = vm.map_flash(rom_base - size, file).with_context(arg)?;
    log::info!(
        "boot variables {} ({} KiB) at {:#x}",
        path.display(),
        size >> 10,
        flash.gpa()
    );
    Ok(flash)
}

/// [`CfiFlash`]'s array in KVM: the shared file mapping, read directly by the guest while
/// its read-only slot is in place.
pub struct KvmFlash {
    pub vm: Arc<Vm>,
    pub mem: Arc<FlashMemory>,
}

impl FlashBacking for KvmFlash {
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        self.mem.read(offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        self.mem.write(offset, data)
    }

    fn fill(&mut self, offset: u64, len: u64, byte: u8) -> bool {
        self.mem.fill(offset, len, byte)
    }

    fn set_direct_reads(&mut self, on: bool) {
        // Failing leaves the slot (and its recorded state) as it was: reads then come from the
        // device (status) or the array (stale mode), both harmless to the host; say so, the
        // variables may suffer.
        if let Err(e) = self.vm.set_flash_mapped(&self.mem, on) {
            log::error!("boot variables: switching read-array mode to {on}: {e}");
        }
    }
}

/// The bus device over the ROM's range: reads come from the read-only memory slot and
/// never reach it; writes (flash probing, stray pointers) are dropped, as ROM does.
pub struct RomWrites;

impl BusDevice for RomWrites {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        log::trace!(
            "boot ROM: dropped {}-byte write at +{offset:#x}",
            data.len()
        );
    }
}

/// QEMU's `etc/e820`: the RAM ranges and the pages KVM keeps for itself (20-byte entries:
/// address, length, type).
fn e820(cfg: &VmConfig) -> Vec<u8> {
    let mut v = Vec::new();
    let mut entry = |addr: u64, len: u64, kind: E820Kind| {
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&(kind as u32).to_le_bytes());
    };
    for (addr, len) in loader::layout::ram_regions(cfg.memory) {
        entry(addr, len, E820Kind::Ram);
    }
    entry(
        vmmapi::IDENTITY_MAP_ADDRESS,
        vmmapi::KVM_PRIVATE_LEN,
        E820Kind::Reserved,
    );
    v
}

/// The fw_cfg device: fixed items, `etc/e820`, the ACPI tables and their loader script,
/// `etc/sercon-port` when COM1 exists, and the `-f` files.
pub fn fw_cfg(vm: &Vm, cfg: &VmConfig, acpi: &loader::acpi::AcpiConfig) -> Result<FwCfg> {
    let cpus = u16::try_from(cfg.cpus).context("-c: too many vCPUs for fw_cfg")?;
    let mut b = FwCfgBuilder::new(&FwCfgMachine {
        uuid: cfg.uuid,
        ram_bytes: cfg.memory,
        cpus,
        max_cpus: cpus,
    });
    b.file("etc/e820", e820(cfg))?;
    let tables = loader::acpi::firmware_acpi(acpi)?;
    b.file(loader::acpi::FW_CFG_RSDP, tables.rsdp)?;
    b.file(loader::acpi::FW_CFG_TABLES, tables.tables)?;
    b.file(loader::acpi::FW_CFG_LOADER, tables.loader)?;
    if cfg.com.iter().any(|(i, _)| *i == 0) {
        let (_, port, _) = devices::uart::COM_PORTS[0];
        b.file("etc/sercon-port", port.to_le_bytes().to_vec())?;
    }
    if let Some(order) = bootorder(cfg) {
        b.file("bootorder", order)?;
    }
    for (name, source) in &cfg.fw_cfg_files {
        let data = match source {
            FwCfgSource::String(s) => s.as_bytes().to_vec(),
            FwCfgSource::File(p) => {
                std::fs::read(p).with_context(|| format!("-f {name},file={}", p.display()))?
            }
        };
        if b.has_file(name) {
            bail!("-f {name}: rhyve already provides fw_cfg file {name}");
        }
        b.file(name, data).with_context(|| format!("-f {name}"))?;
    }
    Ok(b.build(vm.ram().memory().clone())?)
}

/// QEMU's `bootorder`: the Open Firmware paths of the functions given `bootindex=`, lowest
/// index first, one per line, NUL-terminated; None when no function has one. SeaBIOS and
/// OVMF match these against the devices they find.
fn bootorder(cfg: &VmConfig) -> Option<Vec<u8>> {
    let mut slots: Vec<_> = cfg
        .pci
        .iter()
        .filter_map(|s| Some((s.bootindex?, s)))
        .collect();
    if slots.is_empty() {
        return None;
    }
    slots.sort_by_key(|(i, s)| (*i, s.bus, s.slot, s.func));
    let lines: Vec<String> = slots
        .iter()
        .map(|(_, s)| {
            let mut at = format!("{:x}", s.slot);
            if s.func != 0 {
                at.push_str(&format!(",{:x}", s.func));
            }
            match s.emulation.name {
                "virtio-blk" => format!("/pci@i0cf8/scsi@{at}/disk@0,0"),
                "virtio-net" => format!("/pci@i0cf8/ethernet@{at}/ethernet-phy@0"),
                _ => format!("/pci@i0cf8/*@{at}"),
            }
        })
        .collect();
    let mut v = lines.join("\n").into_bytes();
    v.push(0);
    Some(v)
}
