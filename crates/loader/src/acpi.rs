//! ACPI tables, as bhyve always builds them on amd64: RSDP → XSDT → {FADT → {FACS, DSDT},
//! MADT}. A guest kernel without an MP-table parser (Debian's cloud kernels) finds its CPUs,
//! the I/O APIC and the ISA interrupt overrides in the MADT, and the PM1 blocks, the reset
//! register and the S5 sleep type in the FADT/DSDT.
//!
//! Layout, inside the e820 reserved BIOS area `[0xF0000, 0x100000)` after the MP table
//! (which starts at 0xF0000), each table 16-byte aligned so the RSDP is found by Linux's
//! legacy scan of 0xE0000–0xFFFFF as well as through `boot_params.acpi_rsdp_addr` / PVH
//! `rsdp_paddr`:
//!
//! | address      | contents                                                        |
//! |--------------|-----------------------------------------------------------------|
//! | 0xF2000      | RSDP "RSD PTR " revision 2 (36 bytes)                            |
//! | 0xF2030      | XSDT: FADT, MADT (52 bytes)                                      |
//! | 0xF2080      | FACS (64 bytes, 64-byte aligned)                                 |
//! | 0xF20C0      | FADT "FACP" revision 6.5 (276 bytes)                             |
//! | 0xF21E0      | DSDT: `\_S5_`, `\_SB`: COMn, RTC, KBD, PCI0 with MRES          |
//! | after DSDT   | MADT "APIC": one local APIC per vCPU, I/O APIC, overrides, NMI  |
//!
//! FADT/FACS/RSDP/XSDT come from the `acpi_tables` crate; the MADT (the crate has no
//! interrupt source override or local APIC NMI entries) is encoded byte by byte.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::{facs::FACS, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml, AmlSink};
use vm_memory::GuestMemoryBackend;

use crate::{layout, write_guest, Error};

/// Where the ACPI tables start (the RSDP), past the MP table at 0xF0000.
pub const ACPI_START: u64 = 0xF_2000;
/// End of the BIOS area the tables must fit in.
pub const ACPI_LIMIT: u64 = layout::HIGH_MEMORY_START;
/// Most vCPUs the MADT describes (APIC ids 0..=253; the I/O APIC takes the next id).
pub const MAX_CPUS: u32 = 254;

const OEM_ID: [u8; 6] = *b"RHYVE ";
const OEM_TABLE_ID: [u8; 8] = *b"RHYVE VM";
const OEM_REVISION: u32 = 1;

use platform::map::{
    PciLayout, ECAM_BASE as PCI_ECAM_BASE, ECAM_SIZE as PCI_ECAM_SIZE, IOAPIC_ADDR, LAPIC_ADDR,
    PCI_IO_WINDOW,
};
use platform::ports::{PM1A_CNT_OFFSET, PM_TIMER_OFFSET, RESET_PORT};

/// PM1a event block (status + enable), PM1a control block and the PM timer, as the
/// platform places them.
const PM1A_EVT_LEN: u8 = platform::ports::PM1A_EVT_LEN as u8;
const PM1A_CNT_LEN: u8 = platform::ports::PM1A_CNT_LEN as u8;
const PM_TIMER_LEN: u8 = platform::ports::PM_TIMER_LEN as u8;
/// CMOS register holding the century (`devices::rtc::CENTURY_REG`).
const RTC_CENTURY_REG: u8 = 0x32;
const RESET_VALUE: u8 = 0x06;
/// The SCI's ISA IRQ (= its GSI).
const SCI_IRQ: u8 = platform::irq::SCI_GSI as u8;
/// `\_S5_` sleep type, as `devices::acpi_pm` powers off on it.
const SLP_TYP_S5: u8 = 5;
/// IAPC_BOOT_ARCH: LEGACY_DEVICES (bit 0) | 8042 (bit 1).
const IAPC_BOOT_ARCH: u16 = 0x3;

/// MADT flags: PCAT_COMPAT (dual 8259s present).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_REVISION: u8 = 5;
const MADT_LAPIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_ISO: u8 = 2;
const MADT_LAPIC_NMI: u8 = 4;
const LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags: active high (01) | level triggered (11 << 2).
const ISO_LEVEL_HIGH: u16 = 0x000d;
const ALL_PROCESSORS: u8 = 0xFF;

const SDT_HEADER_LEN: usize = 36;
const MADT_HEADER_LEN: usize = SDT_HEADER_LEN + 8;

/// What the tables describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC ids 0..nr_cpus unless `apic_ids` says otherwise).
    pub nr_cpus: u32,
    /// The vCPUs' APIC IDs in vCPU order (the `-c` topology packs them, so they may have
    /// gaps); empty means 0..nr_cpus. Each must be below [`MAX_CPUS`].
    pub apic_ids: Vec<u32>,
    /// A PCI root (`-s` slots): `\_SB.PCI0` in the DSDT and an MCFG.
    pub pci: bool,
    /// The devices the machine placed, as they describe themselves: one `\_SB` device each
    /// in the DSDT (COM ports, RTC, keyboard controller).
    pub devices: Vec<platform::acpi::AcpiDevice>,
    /// How the PCI root is laid out.
    pub pci_layout: PciLayout,
}

/// Guest-physical addresses of each table, as [`write_acpi_tables`] places them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiLayout {
    /// Root System Description Pointer.
    pub rsdp: u64,
    /// Extended System Description Table.
    pub xsdt: u64,
    /// Firmware ACPI Control Structure.
    pub facs: u64,
    /// Fixed ACPI Description Table.
    pub fadt: u64,
    /// Differentiated System Description Table.
    pub dsdt: u64,
    /// Multiple APIC Description Table.
    pub madt: u64,
    /// PCI Express memory-mapped configuration space table (with PCI only).
    pub mcfg: Option<u64>,
    /// End (exclusive) of the last table.
    pub end: u64,
}

fn align_up(addr: u64, align: u64) -> u64 {
    (addr + align - 1) & !(align - 1)
}

/// Value that makes `data` sum to zero (mod 256) when stored in its checksum byte.
fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Pre-encoded AML bytes.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The last PCI bus number decoded (bus 0 only: no bridges yet).
const PCI_LAST_BUS: u8 = 0;

/// The MCFG: one ECAM area for segment 0, bus 0 only — the only bus rhyve has. Announcing
/// 0..=255 makes Linux probe 255 empty buses for peer bridges (8 000+ config reads, each a
/// VM exit: almost a second of boot in the test bed).
fn mcfg() -> Vec<u8> {
    let mut m = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(PCI_ECAM_BASE, 0, 0, PCI_LAST_BUS);
    to_bytes(&m)
}

/// `IRQNoFlags () {irq}`: the small IRQ descriptor without its information byte.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22);
        sink.word(1 << self.0);
    }
}

/// `\_SB.PCI0`: the root bridge, its windows and the INTx routing, plus a motherboard
/// resource device reserving the ECAM range (Linux wants MCFG areas claimed there).
fn pci_devices(layout: PciLayout) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let zero = 0u8;
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, u16::from(PCI_LAST_BUS));
    let cfg_io = aml::IO::new(0xCF8, 0xCF8, 1, 8);
    let io = aml::AddressSpace::<u16>::new_io(PCI_IO_WINDOW.0, PCI_IO_WINDOW.1, None);
    let (mem32_window, mem64_window) = (layout.mem32_window(), layout.mem64_window());
    let mem32 = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mem32_window.0,
        mem32_window.1,
        None,
    );
    let mem64 = aml::AddressSpace::<u64>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mem64_window.0,
        mem64_window.1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io, &mem32, &mem64]);
    // _PRT: Package { Address 0xSSSSFFFF, Pin, Source 0 (a GSI), Source Index = GSI }.
    let entries: Vec<(u32, u8, u32)> = (0..32u32)
        .flat_map(|slot| {
            (0..4u8).filter_map(move |pin| {
                let gsi = platform::irq::intx_gsi(slot as u8, pin + 1)?;
                Some((slot << 16 | 0xFFFF, pin, gsi))
            })
        })
        .collect();
    let pkgs: Vec<aml::Package> = entries
        .iter()
        .map(|(a, p, g)| aml::Package::new(vec![a, p, &zero, g]))
        .collect();
    let prt = aml::Package::new(pkgs.iter().map(|p| p as &dyn Aml).collect());
    let names = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_ADR".into(), &zero),
        aml::Name::new("_SEG".into(), &zero),
        aml::Name::new("_UID".into(), &zero),
        aml::Name::new("_BBN".into(), &zero),
        aml::Name::new("_CRS".into(), &crs),
        aml::Name::new("_PRT".into(), &prt),
    ];
    let pci0 = aml::Device::new("PCI0".into(), names.iter().map(|n| n as &dyn Aml).collect());
    let mut v = to_bytes(&pci0);
    if !layout.has_ecam() {
        return v;
    }

    let mres_hid = aml::EISAName::new("PNP0C02");
    let ecam = aml::Memory32Fixed::new(false, PCI_ECAM_BASE as u32, PCI_ECAM_SIZE as u32);
    let mres_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let mres_hid_name = aml::Name::new("_HID".into(), &mres_hid);
    let mres_uid = aml::Name::new("_UID".into(), &zero);
    let mres_crs_name = aml::Name::new("_CRS".into(), &mres_crs);
    let mres = aml::Device::new(
        "MRES".into(),
        vec![&mres_hid_name, &mres_uid, &mres_crs_name],
    );
    mres.to_aml_bytes(&mut v);
    v
}

/// `Device (NAME) { _HID EISAID(hid), [_UID uid,] _CRS (io ranges (base, len), irq) }`.
fn isa_device(
    name: &str,
    hid: &str,
    uid: Option<u8>,
    io: &[(u16, u8)],
    irq: Option<u8>,
) -> Vec<u8> {
    let hid = aml::EISAName::new(hid);
    let ios: Vec<aml::IO> = io
        .iter()
        .map(|&(base, len)| aml::IO::new(base, base, 1, len))
        .collect();
    let irq = irq.map(IrqNoFlags);
    let mut res: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
    if let Some(irq) = &irq {
        res.push(irq);
    }
    let crs = aml::ResourceTemplate::new(res);
    let uid = uid.unwrap_or(0);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_name = aml::Name::new("_UID".into(), &uid);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    to_bytes(&aml::Device::new(
        name.into(),
        vec![&hid_name, &uid_name, &crs_name],
    ))
}

/// The DSDT: `\_S5_`; in `\_SB`, the machine's devices as they describe themselves (a
/// 16550 (PNP0501) per COM port, the RTC (PNP0B00), the keyboard controller (PNP0303))
/// and, with `pci`, the PCI root bridge.
fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let (s5, zero) = (SLP_TYP_S5, 0u8);
    let s5_pkg = aml::Package::new(vec![&s5, &s5, &zero, &zero]);
    let s5_name = aml::Name::new("_S5_".into(), &s5_pkg);

    let mut devices = Vec::new();
    for d in &cfg.devices {
        devices.extend(isa_device(d.name, d.hid, d.uid, &d.io, d.irq));
    }
    if cfg.pci {
        devices.extend(pci_devices(cfg.pci_layout));
    }
    let devices = RawAml(devices);
    let sb = aml::Scope::new("\\_SB_".into(), vec![&devices]);

    let mut body = to_bytes(&s5_name);
    sb.to_aml_bytes(&mut body);

    // Revision 2: 64-bit AML integers.
    let mut sdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN as u32,
        2,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// Length of the MADT for `nr_cpus` processors.
fn madt_len(nr_cpus: u32) -> usize {
    MADT_HEADER_LEN + 8 * nr_cpus as usize + 12 + 2 * 10 + 6
}

/// The MADT, encoded by hand.
fn madt(nr_cpus: u32, apic_ids: &[u32]) -> Vec<u8> {
    let ids: Vec<u8> = if apic_ids.is_empty() {
        (0..nr_cpus).map(|i| i as u8).collect()
    } else {
        debug_assert_eq!(apic_ids.len(), nr_cpus as usize);
        apic_ids.iter().map(|&i| i as u8).collect()
    };
    let mut t = Vec::with_capacity(madt_len(nr_cpus));
    t.extend_from_slice(b"APIC");
    t.extend_from_slice(&(madt_len(nr_cpus) as u32).to_le_bytes());
    t.push(MADT_REVISION);
    t.push(0); // checksum
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(&acpi_tables::CREATOR_ID);
    t.extend_from_slice(&acpi_tables::CREATOR_REVISION);
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for (uid, &apic_id) in ids.iter().enumerate() {
        t.extend_from_slice(&[MADT_LAPIC, 8, uid as u8, apic_id]);
        t.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    // The I/O APIC takes the id after the last local APIC, as in the MP table.
    let ioapic_id = ids.iter().max().map_or(0, |&m| m + 1);
    t.extend_from_slice(&[MADT_IOAPIC, 12, ioapic_id, 0]);
    t.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    // ISA IRQ 0 (the PIT) → GSI 2; the SCI is level triggered, active high.
    for (irq, gsi, flags) in [
        (0u8, 2u32, 0u16),
        (SCI_IRQ, u32::from(SCI_IRQ), ISO_LEVEL_HIGH),
    ] {
        t.extend_from_slice(&[MADT_ISO, 10, 0, irq]);
        t.extend_from_slice(&gsi.to_le_bytes());
        t.extend_from_slice(&flags.to_le_bytes());
    }
    // NMI on LINT1 of every local APIC.
    t.extend_from_slice(&[MADT_LAPIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    debug_assert_eq!(t.len(), madt_len(nr_cpus));
    t[9] = checksum(&t);
    t
}

fn io_gas(bytes: u8, access: AccessSize, port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        bytes * 8,
        0,
        access,
        u64::from(port),
    )
}

/// The FADT (revision 6.5) pointing at the FACS and DSDT.
fn fadt(facs: u64, dsdt: u64, pm_base: u16) -> Vec<u8> {
    // FACS: only the 32-bit FIRMWARE_CTRL (the spec wants X_FIRMWARE_CTRL zero when it is
    // set; with both, Linux installs the FACS twice). DSDT: both, equal, as ACPICA accepts.
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_32(facs as u32)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // The power button is the fixed-feature one (PM1 PWRBTN_STS/EN, as bhyve's
        // SIGTERM handling raises it); there is no sleep button.
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .flag(Flags::TmrValExt);
    // All of this lives below 1 MiB.
    f.dsdt = (dsdt as u32).into();
    f.sci_int = u16::from(SCI_IRQ).into();
    // SMI_CMD 0: no SMM, the hardware is in ACPI mode from reset (SCI_EN reads 1).
    f.smi_cmd = 0.into();
    let (evt, cnt, tmr) = (
        pm_base,
        pm_base + PM1A_CNT_OFFSET,
        pm_base + PM_TIMER_OFFSET,
    );
    f.pm1a_evt_blk = u32::from(evt).into();
    f.pm1_evt_len = PM1A_EVT_LEN;
    f.pm1a_cnt_blk = u32::from(cnt).into();
    f.pm1_cnt_len = PM1A_CNT_LEN;
    f.x_pm1a_evt_blk = io_gas(PM1A_EVT_LEN, AccessSize::Undefined, evt);
    f.x_pm1a_cnt_blk = io_gas(PM1A_CNT_LEN, AccessSize::Undefined, cnt);
    f.pm_tmr_blk = u32::from(tmr).into();
    f.pm_tmr_len = PM_TIMER_LEN;
    f.x_pm_tmr_blk = io_gas(PM_TIMER_LEN, AccessSize::DwordAccess, tmr);
    f.century = RTC_CENTURY_REG;
    f.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    f.reset_reg = io_gas(1, AccessSize::ByteAccess, RESET_PORT);
    f.reset_value = RESET_VALUE;
    to_bytes(&f.finalize())
}

/// Length of the MCFG with one ECAM entry.
const MCFG_LEN: u64 = SDT_HEADER_LEN as u64 + 8 + 16;

/// Where each table goes for `cfg` (no writes, no range check).
pub fn acpi_layout(cfg: &AcpiConfig) -> AcpiLayout {
    let rsdp = ACPI_START;
    let xsdt = align_up(rsdp + Rsdp::len() as u64, 16);
    // Room for three XSDT entries: FADT, MADT and the MCFG.
    let facs = align_up(xsdt + SDT_HEADER_LEN as u64 + 3 * 8, 64);
    let fadt = align_up(facs + FACS::len() as u64, 16);
    let dsdt_at = align_up(fadt + acpi_tables::fadt::FADT::len() as u64, 16);
    let madt = align_up(dsdt_at + dsdt(cfg).len() as u64, 16);
    let mut end = madt + madt_len(cfg.nr_cpus) as u64;
    let mcfg = (cfg.pci && cfg.pci_layout.has_ecam()).then(|| {
        let at = align_up(end, 16);
        end = at + MCFG_LEN;
        at
    });
    AcpiLayout {
        rsdp,
        xsdt,
        facs,
        fadt,
        dsdt: dsdt_at,
        madt,
        mcfg,
        end,
    }
}

/// Writes RSDP + XSDT + FADT + FACS + DSDT + MADT into guest memory; returns the RSDP
/// address.
pub fn write_acpi_tables<M: GuestMemoryBackend>(mem: &M, cfg: &AcpiConfig) -> Result<u64, Error> {
    let (l, tables) = build_tables(cfg)?;
    for (addr, bytes) in &tables {
        write_guest(mem, *addr, bytes)?;
    }
    Ok(l.rsdp)
}

/// The tables as QEMU hands them to firmware through fw_cfg: `etc/acpi/rsdp`,
/// `etc/acpi/tables` (every other table, pointers turned into offsets in this blob) and
/// `etc/table-loader`, the script telling the firmware where to put both, which pointers
/// to relocate and which checksums to recompute.
pub struct FirmwareAcpi {
    pub rsdp: Vec<u8>,
    pub tables: Vec<u8>,
    pub loader: Vec<u8>,
}

/// fw_cfg file names (QEMU's).
pub const FW_CFG_RSDP: &str = "etc/acpi/rsdp";
pub const FW_CFG_TABLES: &str = "etc/acpi/tables";
pub const FW_CFG_LOADER: &str = "etc/table-loader";

/// FADT pointer fields: FIRMWARE_CTRL, DSDT (32-bit), X_FIRMWARE_CTRL, X_DSDT (64-bit).
const FADT_POINTERS: [(usize, u8); 4] = [(36, 4), (40, 4), (132, 8), (140, 8)];
/// RSDP: RsdtAddress (32-bit), XsdtAddress (64-bit); checksums over 20 and all 36 bytes.
const RSDP_POINTERS: [(usize, u8); 2] = [(16, 4), (24, 8)];
const SDT_CHECKSUM_OFFSET: u32 = 9;
/// RSDP: the ACPI 1.0 checksum (first 20 bytes) and the extended one (all of it).
const RSDP_CHECKSUM_OFFSET: usize = 8;
const RSDP_EXT_CHECKSUM_OFFSET: usize = 32;

/// [`FirmwareAcpi`] for `cfg`: the same tables [`write_acpi_tables`] writes.
pub fn firmware_acpi(cfg: &AcpiConfig) -> Result<FirmwareAcpi, Error> {
    use crate::table_loader::{TableLoader, Zone};
    let (l, tables) = build_tables(cfg)?;
    // 64-aligned like the allocation, so the FACS keeps its 64-byte alignment.
    let base = l.xsdt & !63;
    let mut rsdp = Vec::new();
    let mut blob = vec![0u8; (l.end - base) as usize];
    let mut script = TableLoader::new();
    // The RSDP must stay where an OS's legacy scan finds it (F segment), 16-aligned.
    script.allocate(FW_CFG_RSDP, 16, Zone::FSeg);
    script.allocate(FW_CFG_TABLES, 64, Zone::High);
    let mut checksums = Vec::new();
    for (addr, bytes) in &tables {
        if *addr == l.rsdp {
            rsdp = bytes.clone();
            continue;
        }
        let at = (addr - base) as usize;
        blob[at..at + bytes.len()].copy_from_slice(bytes);
        let pointers: Vec<(usize, u8)> = if *addr == l.xsdt {
            (SDT_HEADER_LEN..bytes.len())
                .step_by(8)
                .map(|o| (o, 8))
                .collect()
        } else if *addr == l.fadt {
            FADT_POINTERS.to_vec()
        } else {
            Vec::new()
        };
        for (off, size) in pointers {
            if relocate(&mut blob[at + off..at + off + size as usize], base) {
                script.add_pointer(FW_CFG_TABLES, FW_CFG_TABLES, (at + off) as u32, size);
            }
        }
        // The FACS has no checksum. OVMF stores the range's sum into the checksum byte
        // rather than subtracting it, so the byte goes out zeroed.
        if *addr != l.facs {
            blob[at + SDT_CHECKSUM_OFFSET as usize] = 0;
            checksums.push((
                at as u32 + SDT_CHECKSUM_OFFSET,
                at as u32,
                bytes.len() as u32,
            ));
        }
    }
    for (off, size) in RSDP_POINTERS {
        if relocate(&mut rsdp[off..off + size as usize], base) {
            script.add_pointer(FW_CFG_RSDP, FW_CFG_TABLES, off as u32, size);
        }
    }
    rsdp[RSDP_CHECKSUM_OFFSET] = 0;
    rsdp[RSDP_EXT_CHECKSUM_OFFSET] = 0;
    for (result, start, len) in checksums {
        script.add_checksum(FW_CFG_TABLES, result, start, len);
    }
    script.add_checksum(FW_CFG_RSDP, RSDP_CHECKSUM_OFFSET as u32, 0, 20);
    script.add_checksum(
        FW_CFG_RSDP,
        RSDP_EXT_CHECKSUM_OFFSET as u32,
        0,
        rsdp.len() as u32,
    );
    Ok(FirmwareAcpi {
        rsdp,
        tables: blob,
        loader: script.into_bytes(),
    })
}

/// Turns the little-endian address in `field` into an offset from `base`; false (and no
/// change) for a null pointer.
fn relocate(field: &mut [u8], base: u64) -> bool {
    let mut v = [0u8; 8];
    v[..field.len()].copy_from_slice(field);
    let addr = u64::from_le_bytes(v);
    if addr == 0 {
        return false;
    }
    let off = (addr - base).to_le_bytes();
    field.copy_from_slice(&off[..field.len()]);
    true
}

/// Tables with their guest-physical addresses.
type PlacedTables = Vec<(u64, Vec<u8>)>;

/// Every table (RSDP first) with the address [`acpi_layout`] gives it.
fn build_tables(cfg: &AcpiConfig) -> Result<(AcpiLayout, PlacedTables), Error> {
    if !(1..=MAX_CPUS).contains(&cfg.nr_cpus) {
        return Err(Error::AcpiBadCpuCount(cfg.nr_cpus));
    }
    let l = acpi_layout(cfg);
    if l.end > ACPI_LIMIT {
        return Err(Error::AcpiTooBig(l.end));
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(l.fadt);
    xsdt.add_entry(l.madt);
    if let Some(m) = l.mcfg {
        xsdt.add_entry(m);
    }

    let mut tables: Vec<(u64, Vec<u8>)> = vec![
        (l.rsdp, to_bytes(&Rsdp::new(OEM_ID, l.xsdt))),
        (l.xsdt, to_bytes(&xsdt)),
        (l.facs, to_bytes(&FACS::new())),
        (l.fadt, fadt(l.facs, l.dsdt, cfg.pci_layout.pm_base())),
        (l.dsdt, dsdt(cfg)),
        (l.madt, madt(cfg.nr_cpus, &cfg.apic_ids)),
    ];
    if let Some(m) = l.mcfg {
        tables.push((m, mcfg()));
    }
    Ok((l, tables))
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::mptable::{mptable_size, MPTABLE_START};
    use crate::testutil::guest;

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads a whole SDT at `addr`, checking the length stays in the BIOS area and the
    /// checksum.
    fn table(mem: &GuestMemoryMmap, addr: u64, used: &mut Vec<(u64, u64)>) -> Vec<u8> {
        let hdr = read(mem, addr, SDT_HEADER_LEN);
        let len = u32_at(&hdr, 4) as usize;
        assert!(len >= SDT_HEADER_LEN);
        assert!(
            addr + len as u64 <= ACPI_LIMIT,
            "table at {addr:#x} too long"
        );
        let t = read(mem, addr, len);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(&t[..4]));
        assert_eq!(&t[10..16], b"RHYVE ");
        used.push((addr, addr + len as u64));
        t
    }

    /// The PC's devices as the device models describe them (COM ports where `com` says).
    fn pc(com: [bool; 4]) -> Vec<platform::acpi::AcpiDevice> {
        use platform::acpi::AcpiDevice;
        let names = ["COM1", "COM2", "COM3", "COM4"];
        let mut v: Vec<AcpiDevice> = (0..4)
            .filter(|&i| com[i])
            .map(|i| AcpiDevice {
                name: names[i],
                hid: "PNP0501",
                uid: Some(i as u8 + 1),
                io: vec![(platform::ports::COM_PORTS[i], 8)],
                irq: Some(platform::irq::COM_IRQS[i] as u8),
            })
            .collect();
        v.push(AcpiDevice {
            name: "RTC_",
            hid: "PNP0B00",
            uid: None,
            io: vec![(0x70, 2)],
            irq: Some(8),
        });
        v.push(AcpiDevice {
            name: "KBD_",
            hid: "PNP0303",
            uid: None,
            io: vec![(0x60, 1), (0x64, 1)],
            irq: Some(1),
        });
        v
    }

    fn check(nr_cpus: u32, pci: bool) {
        let mem = guest(64 << 20);
        let cfg = AcpiConfig {
            nr_cpus,
            pci,
            devices: pc([true; 4]),
            ..Default::default()
        };
        let rsdp = write_acpi_tables(&mem, &cfg).unwrap();
        let mut used = Vec::new();

        assert_eq!(rsdp % 16, 0);
        assert!((0xE0000..0x10_0000).contains(&rsdp));
        let r = read(&mem, rsdp, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        assert_eq!(r[15], 2, "revision");
        assert_eq!(&r[9..15], b"RHYVE ");
        assert_eq!(u32_at(&r, 20), 36);
        used.push((rsdp, rsdp + 36));

        let xsdt = table(&mem, u64_at(&r, 24), &mut used);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(entries.len(), if pci { 3 } else { 2 });
        let fadt = table(&mem, entries[0], &mut used);
        let madt = table(&mem, entries[1], &mut used);
        if pci {
            let m = table(&mem, entries[2], &mut used);
            assert_eq!(&m[..4], b"MCFG");
            assert_eq!(m.len(), 60);
            assert_eq!(u64_at(&m, 44), 0xE000_0000);
            assert_eq!(&m[52..56], &[0, 0, 0, 0], "segment 0, bus 0");
        }
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(&madt[..4], b"APIC");

        // FADT.
        assert_eq!(fadt.len(), 276);
        let facs = u64::from(u32_at(&fadt, 36));
        assert_eq!(u64_at(&fadt, 132), 0, "X_FIRMWARE_CTRL");
        assert_eq!(facs % 64, 0);
        let f = read(&mem, facs, 64);
        assert_eq!(&f[..4], b"FACS");
        assert_eq!(u32_at(&f, 4), 64);
        used.push((facs, facs + 64));
        let dsdt_addr = u64_at(&fadt, 140);
        assert_eq!(u64::from(u32_at(&fadt, 40)), dsdt_addr);
        let dsdt = table(&mem, dsdt_addr, &mut used);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        assert_eq!(dsdt.windows(4).any(|w| w == b"PCI0"), pci);
        assert_eq!(dsdt.windows(4).any(|w| w == b"_PRT"), pci);
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
        assert_eq!(u32_at(&fadt, 48), 0, "SMI_CMD");
        assert_eq!(u32_at(&fadt, 56), 0x400, "PM1a_EVT_BLK");
        assert_eq!(u32_at(&fadt, 64), 0x404, "PM1a_CNT_BLK");
        assert_eq!(u32_at(&fadt, 76), 0x408, "PM_TMR_BLK");
        assert_eq!(
            (fadt[88], fadt[89], fadt[91]),
            (4, 2, 4),
            "PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN"
        );
        assert_eq!(fadt[108], 0x32, "CENTURY");
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            3,
            "IAPC_BOOT_ARCH"
        );
        let flags = u32_at(&fadt, 112);
        assert_eq!(
            flags,
            1 | 1 << 2 | 1 << 5 | 1 << 8 | 1 << 10,
            "WBINVD PROC_C1 SLP_BUTTON TMR_VAL_EXT RESET_REG_SUP (fixed power button)"
        );
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1], "RESET_REG: I/O, 8 bits");
        assert_eq!(u64_at(&fadt, 120), 0xCF9);
        assert_eq!(fadt[128], 6, "RESET_VALUE");
        assert_eq!(&fadt[148..152], &[1, 32, 0, 0], "X_PM1a_EVT_BLK");
        assert_eq!(u64_at(&fadt, 152), 0x400);
        assert_eq!(&fadt[172..176], &[1, 16, 0, 0], "X_PM1a_CNT_BLK");
        assert_eq!(u64_at(&fadt, 176), 0x404);

        // MADT.
        assert_eq!(u32_at(&madt, 36), 0xFEE0_0000);
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
        let (mut lapics, mut ioapics, mut isos, mut nmis) = (0, 0, Vec::new(), 0);
        let mut off = 44;
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            let e = &madt[off..off + len];
            match ty {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!((e[2], e[3]), (lapics as u8, lapics as u8));
                    assert_eq!(u32_at(e, 4), 1);
                    lapics += 1;
                }
                1 => {
                    assert_eq!(len, 12);
                    assert_eq!(u32::from(e[2]), nr_cpus);
                    assert_eq!(u32_at(e, 4), 0xFEC0_0000);
                    assert_eq!(u32_at(e, 8), 0);
                    ioapics += 1;
                }
                2 => {
                    assert_eq!(len, 10);
                    isos.push((e[3], u32_at(e, 4), u16::from_le_bytes([e[8], e[9]])));
                }
                4 => {
                    assert_eq!(e, &[4, 6, 0xFF, 0, 0, 1]);
                    nmis += 1;
                }
                _ => panic!("unexpected MADT entry type {ty}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, nr_cpus);
        assert_eq!(ioapics, 1);
        assert_eq!(nmis, 1);
        assert_eq!(isos, vec![(0, 2, 0), (9, 9, 0xd)]);

        // Nothing overlaps another table or the MP table, all below 1 MiB.
        used.push((MPTABLE_START, MPTABLE_START + mptable_size(MAX_CPUS)));
        used.sort();
        for w in used.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        assert!(used
            .iter()
            .all(|&(s, e)| s >= layout::BIOS_START && e <= ACPI_LIMIT));
        assert_eq!(acpi_layout(&cfg).end, used.last().unwrap().1);
    }

    #[test]
    fn tables_parse_back() {
        for n in [1, 2, 4, 64, MAX_CPUS] {
            check(n, false);
            check(n, true);
        }
    }

    #[test]
    fn pci_root_bridge_aml() {
        let d = dsdt(&AcpiConfig {
            pci: true,
            ..Default::default()
        });
        let has = |pat: &[u8]| d.windows(pat.len()).any(|w| w == pat);
        // _HID EISAID("PNP0A08"), _CID EISAID("PNP0A03").
        assert!(has(&[b'_', b'H', b'I', b'D', 0x0C, 0x41, 0xD0, 0x0A, 0x08]));
        assert!(has(&[b'_', b'C', b'I', b'D', 0x0C, 0x41, 0xD0, 0x0A, 0x03]));
        // WordBusNumber 0..0, IO 0xCF8 x8, WordIO 0x2000..0xFFFF,
        // DWordMemory 0xC0000000..0xDFFFFFFF.
        assert!(has(&[
            0x88, 0x0D, 0, 2, 0x0C, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0
        ]));
        assert!(has(&[0x47, 1, 0xF8, 0x0C, 0xF8, 0x0C, 1, 8]));
        assert!(has(&[0, 0, 0, 0x20, 0xFF, 0xFF, 0, 0, 0, 0xE0]));
        assert!(has(&[0, 0, 0, 0xC0, 0xFF, 0xFF, 0xFF, 0xDF]));
        // _PRT entries: slot 0 INTA# → 16, slot 3 INTA# → 19, slot 31 INTD# → 18.
        assert!(has(&[0x12, 0x09, 4, 0x0B, 0xFF, 0xFF, 0, 0, 0x0A, 16]));
        assert!(has(&[
            0x12, 0x0B, 4, 0x0C, 0xFF, 0xFF, 3, 0, 0, 0, 0x0A, 19
        ]));
        assert!(has(&[0x0C, 0xFF, 0xFF, 31, 0, 0x0A, 3, 0x00, 0x0A, 18]));
        assert!(has(b"MRES"));
        assert!(dsdt(&AcpiConfig::default()).len() < d.len());
    }

    #[test]
    fn bad_cpu_counts() {
        let mem = guest(64 << 20);
        for n in [0, MAX_CPUS + 1] {
            let e = write_acpi_tables(
                &mem,
                &AcpiConfig {
                    nr_cpus: n,
                    pci: false,
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert!(matches!(e, Error::AcpiBadCpuCount(m) if m == n), "{e}");
        }
    }

    #[test]
    fn dsdt_aml_bytes() {
        let d = dsdt(&AcpiConfig {
            devices: pc([true, false, false, false]),
            ..Default::default()
        });
        let body = &d[SDT_HEADER_LEN..];
        // Name (_S5_, Package (4) {5, 5, 0, 0})
        assert_eq!(
            &body[..14],
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 4, 0x0A, 5, 0x0A, 5, 0, 0]
        );
        // IO (Decode16, 0x3F8, 0x3F8, 1, 8) and IRQNoFlags () {4}
        let io = [0x47, 1, 0xF8, 3, 0xF8, 3, 1, 8, 0x22, 0x10, 0x00, 0x79, 0];
        assert!(d.windows(io.len()).any(|w| w == io));
    }

    #[test]
    fn madt_uses_the_given_apic_ids() {
        let t = madt(4, &[0, 1, 4, 5]);
        assert_eq!(sum(&t), 0);
        let mut ids = Vec::new();
        let mut ioapic = None;
        let mut off = MADT_HEADER_LEN;
        while off < t.len() {
            match t[off] {
                MADT_LAPIC => ids.push((t[off + 2], t[off + 3])),
                MADT_IOAPIC => ioapic = Some(t[off + 2]),
                _ => {}
            }
            off += t[off + 1] as usize;
        }
        assert_eq!(ids, vec![(0, 0), (1, 1), (2, 4), (3, 5)]);
        assert_eq!(ioapic, Some(6));
        assert_eq!(madt(2, &[]), madt(2, &[0, 1]));
    }

    /// `_HID` EISAID("PNPxxxx") as AML: Name (_HID, DWordConst).
    fn eisa_hid(id: &str) -> Vec<u8> {
        let mut v = b"_HID".to_vec();
        to_bytes(&aml::EISAName::new(id))
            .iter()
            .for_each(|b| v.push(*b));
        v
    }

    #[test]
    fn dsdt_isa_devices() {
        let has = |d: &[u8], pat: &[u8]| d.windows(pat.len()).any(|w| w == pat);
        let none = dsdt(&AcpiConfig {
            devices: pc([false; 4]),
            ..Default::default()
        });
        for name in [b"COM1", b"COM2", b"COM3", b"COM4"] {
            assert!(!has(&none, name));
        }
        assert!(!has(&none, &eisa_hid("PNP0501")));
        // RTC: IO (0x70, 0x70, 1, 2), IRQNoFlags () {8}.
        assert!(has(&none, b"RTC_"));
        assert!(has(&none, &eisa_hid("PNP0B00")));
        assert!(has(
            &none,
            &[0x47, 1, 0x70, 0, 0x70, 0, 1, 2, 0x22, 0x00, 0x01, 0x79]
        ));
        // Keyboard controller: IO 0x60 and 0x64, IRQNoFlags () {1}.
        assert!(has(&none, b"KBD_"));
        assert!(has(&none, &eisa_hid("PNP0303")));
        assert!(has(
            &none,
            &[0x47, 1, 0x60, 0, 0x60, 0, 1, 1, 0x47, 1, 0x64, 0, 0x64, 0, 1, 1, 0x22, 0x02, 0x00]
        ));

        let all = dsdt(&AcpiConfig {
            devices: pc([true; 4]),
            ..Default::default()
        });
        // (name, IO base, IRQ mask, _UID)
        for (name, base, mask, uid) in [
            (b"COM1", 0x3F8u16, 0x10u16, 1u8),
            (b"COM2", 0x2F8, 0x08, 2),
            (b"COM3", 0x3E8, 0x10, 3),
            (b"COM4", 0x2E8, 0x08, 4),
        ] {
            let at = all.windows(4).position(|w| w == name).expect("device");
            let dev = &all[at..];
            let [lo, hi] = base.to_le_bytes();
            let [m0, m1] = mask.to_le_bytes();
            let crs = [0x47, 1, lo, hi, lo, hi, 1, 8, 0x22, m0, m1, 0x79];
            // This device's own resources come before the next device's name.
            let end = dev[4..]
                .windows(4)
                .position(|w| w[..3] == *b"COM" || w == b"RTC_")
                .map_or(dev.len(), |p| p + 4);
            let dev = &dev[..end];
            assert!(has(dev, &eisa_hid("PNP0501")), "{name:?}");
            let uid_name = to_bytes(&aml::Name::new("_UID".into(), &uid));
            assert!(has(dev, &uid_name), "{name:?} _UID");
            assert!(has(dev, &crs), "{name:?} _CRS");
        }
        let two = dsdt(&AcpiConfig {
            devices: pc([false, true, false, false]),
            ..Default::default()
        });
        assert!(has(&two, b"COM2") && !has(&two, b"COM1"));
        assert!(none.len() < two.len() && two.len() < all.len());
    }

    /// Runs a table-loader script as firmware would: files at the given addresses.
    fn run_loader(files: &mut [(&str, u64, Vec<u8>)], script: &[u8]) {
        let name = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap();
            String::from_utf8(b[..end].to_vec()).unwrap()
        };
        let find =
            |files: &[(&str, u64, Vec<u8>)], n: &str| files.iter().position(|f| f.0 == n).unwrap();
        for c in script.chunks(128) {
            match u32_at(c, 0) {
                1 => {
                    let f = find(files, &name(&c[4..60]));
                    let align = u32_at(c, 60) as u64;
                    assert_eq!(files[f].1 % align, 0, "alignment of {}", files[f].0);
                }
                2 => {
                    let d = find(files, &name(&c[4..60]));
                    let src = files[find(files, &name(&c[60..116]))].1;
                    let (off, size) = (u32_at(c, 116) as usize, c[120] as usize);
                    let field = &mut files[d].2[off..off + size];
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(field);
                    let new = (u64::from_le_bytes(v) + src).to_le_bytes();
                    field.copy_from_slice(&new[..size]);
                }
                3 => {
                    let f = find(files, &name(&c[4..60]));
                    let (res, start, len) = (
                        u32_at(c, 60) as usize,
                        u32_at(c, 64) as usize,
                        u32_at(c, 68) as usize,
                    );
                    // OVMF's QemuFwCfgAcpi.c assigns the sum of the range, checksum byte
                    // included, so that byte must arrive zeroed (SeaBIOS subtracts instead,
                    // and forgives a stale one).
                    let data = &mut files[f].2;
                    data[res] = 0u8.wrapping_sub(sum(&data[start..start + len]));
                }
                other => panic!("unknown command {other}"),
            }
        }
    }

    #[test]
    fn firmware_tables_relocate_and_check() {
        let cfg = AcpiConfig {
            nr_cpus: 2,
            pci: true,
            devices: pc([true, false, false, false]),
            pci_layout: PciLayout::Firmware {
                mem32_base: 0x8000_0000,
                mem64_base: 0x1_0000_0000,
            },
            ..Default::default()
        };
        let fw = firmware_acpi(&cfg).unwrap();
        let tables_at = 0x7ff_0000u64;
        let mut files = vec![
            (FW_CFG_RSDP, 0xf5a00u64, fw.rsdp.clone()),
            (FW_CFG_TABLES, tables_at, fw.tables.clone()),
        ];
        run_loader(&mut files, &fw.loader);
        let rsdp = &files[0].2;
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let blob = &files[1].2;
        let table = |addr: u64| {
            let off = (addr - tables_at) as usize;
            let len = u32_at(&blob[off..], 4) as usize;
            let t = &blob[off..off + len];
            assert_eq!(
                sum(t),
                0,
                "checksum of {}",
                String::from_utf8_lossy(&t[..4])
            );
            t
        };
        let xsdt = table(u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let sigs: Vec<&[u8]> = (36..xsdt.len())
            .step_by(8)
            .map(|o| &table(u64_at(xsdt, o))[..4])
            .collect();
        // No ECAM behind a boot ROM: no MCFG.
        assert_eq!(sigs, [&b"FACP"[..], b"APIC"]);
        let fadt = table(u64_at(xsdt, 36));
        let dsdt = table(u64_at(fadt, 140));
        assert_eq!(u32_at(fadt, 40) as u64, u64_at(fadt, 140));
        // Behind a ROM the PM block is at 0x600 (PM1a event, control, timer).
        assert_eq!(
            (u32_at(fadt, 56), u32_at(fadt, 64), u32_at(fadt, 76)),
            (0x600, 0x604, 0x608)
        );
        assert_eq!(&dsdt[..4], b"DSDT");
        let facs = (u32_at(fadt, 36) as u64 - tables_at) as usize;
        assert_eq!(&blob[facs..facs + 4], b"FACS");
        assert_eq!((tables_at + facs as u64) % 64, 0);
        assert!(!dsdt.windows(4).any(|w| w == b"MRES"));
    }
}
