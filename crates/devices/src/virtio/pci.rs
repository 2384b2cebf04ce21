//! The virtio-pci modern transport (virtio 1.2 §4.1): a [`VirtioDevice`] as a PCI function.
//!
//! Layout (QEMU's, so drivers see a familiar device):
//!
//! | BAR | kind | offset | what |
//! |---|---|---|---|
//! | 1 | 32-bit memory, 4 KiB | 0x000 | MSI-X table (queues + 1 vectors) |
//! | 1 | | 0x800 | MSI-X PBA |
//! | 4 | 64-bit memory, 16 KiB | 0x0000 | common configuration (56 bytes) |
//! | 4 | | 0x1000 | ISR status (read clears it and lowers INTx) |
//! | 4 | | 0x2000 | device-specific configuration |
//! | 4 | | 0x3000 | notifications: queue N at 0x3000 + 4 × N |
//!
//! Each region has its vendor capability (cfg_type 1–4), plus cfg_type 5, the PCI
//! configuration access window, an MSI-X capability and an MSI capability (one vector, 64-bit,
//! maskable; [`crate::pci::msi`]). Queue notifications are KVM ioeventfds on the notify addresses
//! (registered through an [`IoEventRegistrar`] whenever BAR 4 moves), so a kick never leaves
//! the kernel on the vCPU side; the device's worker thread waits on them.
//!
//! Used-buffer and configuration interrupts follow the PCI rules for a function with both
//! capabilities: MSI-X enabled → the queue's / config's MSI-X vector (ISR untouched); else MSI
//! enabled → the one MSI vector for every queue and for configuration changes, with the ISR
//! bits set so a driver can tell them apart (reading the ISR clears it, no INTx involved);
//! else the ISR bits and INTx (unless the command register disables it). Enabling MSI or
//! MSI-X lowers an asserted INTx. The MSI pending bit raised on the worker thread reaches
//! config space at the driver's next access to the function.
//!
//! Every access of any width at any offset is safe: unknown offsets read 0, writes to them are
//! dropped. Status rules: FEATURES_OK is refused (reads back clear) unless the driver accepted
//! VERSION_1; DRIVER_OK hands the device its queues, and a refusal sets DEVICE_NEEDS_RESET;
//! status 0 resets the device and the transport (the MSI-X table itself is the PCI function's,
//! programmed by the OS once, and is left alone, as QEMU does).
//!
//! The type-5 window has no configuration-read hook to run in: the BAR is read into
//! `pci_cfg_data` whenever the driver writes the window's bar/offset/length (or its data), so a
//! driver that sets the window and then reads the data gets the value of that moment.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{guest_error, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, TYPE_BLOCK};
use crate::lifecycle::{DeviceState, Lifecycle, LifecycleError, Stat};
use crate::limited_log::LimitedWarning;
use crate::pci::config::{CAP_ID_VENDOR, CMD_INTX_DISABLE};
use crate::pci::{BarKind, BarSpec, InterruptSink, Msi, MsixTable, PciConfig, PciDevice};
use platform::codec::{Reader, Writer};
use vm_memory::Bytes;

/// Red Hat's virtio vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID of modern-only devices (≥ 0x40).
pub const SUBSYSTEM_ID: u16 = 0x40;

/// The BAR holding the virtio structures.
pub const VIRTIO_BAR: usize = 4;
const VIRTIO_BAR_SIZE: u64 = 0x4000;
/// The BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: usize = 1;
const MSIX_BAR_SIZE: u64 = 0x1000;
const MSIX_TABLE: u64 = 0;
const MSIX_PBA: u64 = 0x800;

/// Region offsets in [`VIRTIO_BAR`].
pub const COMMON_CFG: u64 = 0x0000;
const COMMON_LEN: usize = 0x38;
pub const ISR_CFG: u64 = 0x1000;
const ISR_LEN: u64 = 4;
pub const DEVICE_CFG: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
pub const NOTIFY_CFG: u64 = 0x3000;
/// Queue N's notify address is NOTIFY_CFG + N × this.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MAX_QUEUES: usize = 0x1000 / NOTIFY_OFF_MULTIPLIER as usize;

/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Vendor capability cfg_types (§4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

const VIRTIO_F_VERSION_1: u64 = 1 << super::VIRTIO_F_VERSION_1;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Registers the queue notify addresses as KVM ioeventfds (implemented by the VMM).
pub trait IoEventRegistrar: Send + Sync {
    /// A guest write of any width to guest-physical `addr` signals `fd`.
    fn register(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Undoes [`IoEventRegistrar::register`] for the same `fd` and `addr`.
    fn unregister(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
}

/// What the driver programmed for one queue.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    size: u16,
    enable: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// Interrupt state shared with the device's worker thread.
struct IrqState {
    msix: MsixTable,
    /// None only if the capability did not fit (it always does).
    msi: Option<Msi>,
    isr: u8,
    intx: bool,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

/// The transport's [`VirtioInterrupt`]: MSI-X when enabled, else MSI when enabled (+ ISR),
/// else INTx + ISR.
struct Interrupts {
    state: Mutex<IrqState>,
    sink: Arc<dyn InterruptSink>,
    intx_disabled: AtomicBool,
    /// The device's worker failed: DEVICE_NEEDS_RESET until the driver resets the device.
    device_failed: AtomicBool,
}

impl Interrupts {
    fn lock(&self) -> MutexGuard<'_, IrqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `vector` (MSI-X on), or sets `isr_bit` and sends the MSI message (MSI on) or
    /// raises INTx (both off).
    fn signal(&self, isr_bit: u8, vector: impl FnOnce(&IrqState) -> u16) {
        let mut s = self.lock();
        if s.msix.enabled() {
            let v = vector(&s);
            if v != NO_VECTOR {
                s.msix.notify(v, &*self.sink);
            }
        } else if s.msi.as_ref().is_some_and(Msi::enabled) {
            // ISR first: the driver's handler may read it as soon as the message lands.
            s.isr |= isr_bit;
            if let Some(msi) = s.msi.as_mut() {
                msi.notify_latched(&*self.sink);
            }
        } else {
            s.isr |= isr_bit;
            if !self.intx_disabled.load(Ordering::Relaxed) {
                s.intx = true;
                self.sink.intx(true);
            }
        }
    }

    /// Reads and clears the ISR, lowering INTx.
    fn take_isr(&self) -> u8 {
        let mut s = self.lock();
        let v = std::mem::take(&mut s.isr);
        if std::mem::take(&mut s.intx) {
            self.sink.intx(false);
        }
        v
    }
}

impl VirtioInterrupt for Interrupts {
    fn queue_used(&self, queue: u16) {
        self.signal(1, |s| {
            s.queue_vectors
                .get(usize::from(queue))
                .copied()
                .unwrap_or(NO_VECTOR)
        });
    }

    fn config_changed(&self) {
        self.signal(2, |s| s.config_vector);
    }

    fn device_failed(&self) {
        self.device_failed.store(true, Ordering::Release);
        self.config_changed();
    }
}

/// A virtio device on the PCI bus through the modern transport.
pub struct VirtioPci {
    config: PciConfig,
    dev: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<Interrupts>,
    ioevents: Box<dyn IoEventRegistrar>,
    /// One notify eventfd per queue; the device gets clones.
    kicks: Vec<EventFd>,
    /// Where each kick is registered as an ioeventfd.
    registered: Vec<Option<u64>>,
    /// KVM refused an ioeventfd where the guest put the BAR (it can move it at will).
    ioevent_failed: LimitedWarning,
    max_sizes: Vec<u16>,
    queues: Vec<QueueRegs>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    /// Offset of the cfg_type 5 capability.
    pci_cfg_cap: u16,
    guest_errors: AtomicU64,
    /// Paused by the VMM.
    paused: bool,
    /// Restored from a snapshot with DRIVER_OK: the device starts at the next resume, once
    /// the vCPUs' and the irqchip's state are back.
    start_on_resume: bool,
}

fn vendor_cap(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
    // Bytes after cap_vndr and cap_next: cap_len, cfg_type, bar, id, padding[2], offset, length.
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, bar, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    b.extend_from_slice(extra);
    b
}

fn overlaps(start: u64, len: u64, field: u64, field_len: u64) -> bool {
    start < field + field_len && field < start.saturating_add(len)
}

impl VirtioPci {
    /// Wraps `dev`: `mem` is the guest RAM, `sink` the function's MSI/INTx, `ioevents`
    /// registers the notify ioeventfds. Fails only when eventfds cannot be created.
    pub fn new(
        dev: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        sink: Arc<dyn InterruptSink>,
        ioevents: Box<dyn IoEventRegistrar>,
    ) -> io::Result<Self> {
        let max_sizes: Vec<u16> = dev
            .queue_max_sizes()
            .iter()
            .copied()
            .take(MAX_QUEUES)
            .collect();
        let n = max_sizes.len();
        let vectors = (n + 1) as u16;
        let ty = dev.device_type();
        let class = if ty == TYPE_BLOCK {
            (0x01, 0x00, 0x00)
        } else if ty == super::TYPE_NET {
            (0x02, 0x00, 0x00) // Ethernet controller
        } else {
            (0xff, 0x00, 0x00)
        };
        let mut config = PciConfig::new(VENDOR_ID, DEVICE_ID_BASE + ty as u16, class, 1);
        config.set_subsystem(VENDOR_ID, SUBSYSTEM_ID);
        config.set_interrupt_pin(1);
        let msix_ok = config.add_bar(
            MSIX_BAR,
            BarSpec {
                kind: BarKind::Mem32,
                size: MSIX_BAR_SIZE,
                prefetchable: false,
            },
        );
        let virtio_ok = config.add_bar(
            VIRTIO_BAR,
            BarSpec {
                kind: BarKind::Mem64,
                size: VIRTIO_BAR_SIZE,
                prefetchable: false,
            },
        );
        debug_assert!(msix_ok && virtio_ok);
        let bar = VIRTIO_BAR as u8;
        let caps = [
            vendor_cap(CAP_COMMON, bar, COMMON_CFG as u32, COMMON_LEN as u32, &[]),
            vendor_cap(
                CAP_NOTIFY,
                bar,
                NOTIFY_CFG as u32,
                (n.max(1) as u32) * NOTIFY_OFF_MULTIPLIER,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            vendor_cap(CAP_ISR, bar, ISR_CFG as u32, ISR_LEN as u32, &[]),
            vendor_cap(CAP_DEVICE, bar, DEVICE_CFG as u32, DEVICE_LEN as u32, &[]),
        ];
        for c in &caps {
            config.add_capability(CAP_ID_VENDOR, c);
        }
        let pci_cfg_cap = config
            .add_capability(CAP_ID_VENDOR, &vendor_cap(CAP_PCI_CFG, 0, 0, 0, &[0; 4]))
            .unwrap_or(0);
        if pci_cfg_cap != 0 {
            // bar, offset, length and pci_cfg_data are the driver's.
            config.set_wmask(pci_cfg_cap + 4, &[0xff]);
            config.set_wmask(pci_cfg_cap + 8, &[0xff; 12]);
        }
        config.add_msix_capability(
            vectors,
            MSIX_BAR as u8,
            MSIX_TABLE as u32,
            MSIX_BAR as u8,
            MSIX_PBA as u32,
        );
        config.add_msi_capability();
        let msi = Msi::from_config(&config);
        debug_assert!(msi.is_some());
        let kicks = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let irq = Arc::new(Interrupts {
            state: Mutex::new(IrqState {
                msix: MsixTable::new(vectors),
                msi,
                isr: 0,
                intx: false,
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; n],
            }),
            sink,
            intx_disabled: AtomicBool::new(false),
            device_failed: AtomicBool::new(false),
        });
        let queues = max_sizes
            .iter()
            .map(|&m| QueueRegs {
                size: m,
                enable: false,
                desc: 0,
                driver: 0,
                device: 0,
            })
            .collect();
        Ok(VirtioPci {
            config,
            dev,
            mem,
            irq,
            ioevents,
            kicks,
            registered: vec![None; n],
            ioevent_failed: LimitedWarning::new(),
            max_sizes,
            queues,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            pci_cfg_cap,
            guest_errors: AtomicU64::new(0),
            paused: false,
            start_on_resume: false,
        })
    }

    /// Guest mistakes seen by the transport.
    pub fn guest_errors(&self) -> u64 {
        self.guest_errors.load(Ordering::Relaxed)
    }

    fn name(&self) -> String {
        format!("virtio-pci (type {})", self.dev.device_type())
    }

    /// The common configuration structure as the driver currently sees it.
    fn common_image(&self) -> [u8; COMMON_LEN] {
        let mut b = [0u8; COMMON_LEN];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        let half = |v: u64, sel: u32| match sel {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(
            0x04,
            &half(self.dev.features(), self.device_feature_select).to_le_bytes(),
        );
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(
            0x0c,
            &half(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        let (config_vector, queue_vector) = {
            let s = self.irq.lock();
            let q = s
                .queue_vectors
                .get(usize::from(self.queue_select))
                .copied()
                .unwrap_or(NO_VECTOR);
            (s.config_vector, q)
        };
        put(0x10, &config_vector.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.device_status(), self.config_generation]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &queue_vector.to_le_bytes());
            put(0x1c, &u16::from(q.enable).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes()); // queue_notify_off
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.driver.to_le_bytes());
            put(0x30, &q.device.to_le_bytes());
        }
        b
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.common_image(), offset, data);
    }

    /// Merges the written bytes into the current image and applies each field they touch,
    /// so any width at any offset works (e.g. a 64-bit address written as two halves).
    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut img = self.common_image();
        for (i, b) in data.iter().enumerate() {
            if let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|&o| o < COMMON_LEN)
            {
                img[o] = *b;
            }
        }
        let len = data.len() as u64;
        let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
        let touched = |field: u64, flen: u64| overlaps(offset, len, field, flen);
        if touched(0x00, 4) {
            self.device_feature_select = u32_at(0x00);
        }
        if touched(0x08, 4) {
            self.driver_feature_select = u32_at(0x08);
        }
        if touched(0x0c, 4) && self.status & STATUS_FEATURES_OK == 0 {
            let v = u64::from(u32_at(0x0c));
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                _ => {}
            }
        }
        if touched(0x10, 2) {
            let v = self.valid_vector(u16_at(0x10));
            self.irq.lock().config_vector = v;
        }
        if touched(0x14, 1) {
            self.write_status(img[0x14]);
        }
        if touched(0x16, 2) {
            self.queue_select = u16_at(0x16);
        }
        let sel = usize::from(self.queue_select);
        if sel >= self.queues.len() {
            return;
        }
        if touched(0x1a, 2) {
            let v = self.valid_vector(u16_at(0x1a));
            if let Some(slot) = self.irq.lock().queue_vectors.get_mut(sel) {
                *slot = v;
            }
        }
        if self.status & STATUS_DRIVER_OK != 0 {
            return; // the queue's layout is fixed while the device runs
        }
        let q = &mut self.queues[sel];
        if touched(0x18, 2) {
            q.size = u16_at(0x18);
        }
        if touched(0x1c, 2) && u16_at(0x1c) == 1 {
            q.enable = true;
        }
        if touched(0x20, 8) {
            q.desc = u64_at(0x20);
        }
        if touched(0x28, 8) {
            q.driver = u64_at(0x28);
        }
        if touched(0x30, 8) {
            q.device = u64_at(0x30);
        }
    }

    /// A vector the table has, else NO_VECTOR (what the driver reads back on failure).
    fn valid_vector(&self, v: u16) -> u16 {
        let n = self.irq.lock().msix.vectors();
        if usize::from(v) < n {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // Bits stay set until reset.
        let mut new = v | old;
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = self.dev.features();
            if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                guest_error(
                    &self.guest_errors,
                    format_args!("{}: FEATURES_OK without VERSION_1 refused", self.name()),
                );
                new &= !STATUS_FEATURES_OK;
            } else {
                self.dev.ack_features(self.driver_features & offered);
            }
        }
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            let result = if new & STATUS_FEATURES_OK == 0 {
                Err("DRIVER_OK before FEATURES_OK".to_string())
            } else {
                self.activate()
            };
            if let Err(e) = result {
                guest_error(
                    &self.guest_errors,
                    format_args!("{}: cannot start the device: {e}", self.name()),
                );
                new |= STATUS_NEEDS_RESET;
                self.status = new;
                self.irq.config_changed();
                return;
            }
        }
        self.status = new;
    }

    /// The whole device-specific config window as the driver reads it.
    fn device_config_image(&self) -> Vec<u8> {
        let mut b = vec![0u8; DEVICE_LEN as usize];
        self.dev.read_config(0, &mut b);
        b
    }

    fn activate(&mut self) -> Result<(), String> {
        self.start_device(false)
    }

    /// Hands the device its queues. `restored`: they were running when the snapshot was
    /// taken; a paused device has used every chain it took (its workers finish the batch in
    /// hand before parking), so the next chain to take and the next used slot are both where
    /// the used ring's index (in the restored guest RAM) says.
    fn start_device(&mut self, restored: bool) -> Result<(), String> {
        let event_idx = self.driver_features & self.dev.features() & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut kicks = Vec::with_capacity(self.queues.len());
        for (i, r) in self.queues.iter().enumerate() {
            let mut q = Queue::new(self.max_sizes[i]).map_err(|e| format!("queue {i}: {e}"))?;
            if r.enable {
                q.try_set_size(r.size)
                    .map_err(|e| format!("queue {i} size {}: {e}", r.size))?;
                q.try_set_desc_table_address(GuestAddress(r.desc))
                    .map_err(|e| format!("queue {i} descriptor table {:#x}: {e}", r.desc))?;
                q.try_set_avail_ring_address(GuestAddress(r.driver))
                    .map_err(|e| format!("queue {i} driver area {:#x}: {e}", r.driver))?;
                q.try_set_used_ring_address(GuestAddress(r.device))
                    .map_err(|e| format!("queue {i} device area {:#x}: {e}", r.device))?;
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if restored {
                    let at = GuestAddress(r.device.wrapping_add(2));
                    let used: u16 = self
                        .mem
                        .read_obj(at)
                        .map_err(|e| format!("queue {i} used index at {at:#x?}: {e}"))?;
                    q.set_next_avail(used);
                    q.set_next_used(used);
                }
            }
            queues.push(q);
            kicks.push(
                self.kicks[i]
                    .try_clone()
                    .map_err(|e| format!("eventfd: {e}"))?,
            );
        }
        let irq: Arc<dyn VirtioInterrupt> = self.irq.clone();
        self.dev
            .activate(self.mem.clone(), irq, queues, kicks)
            .map_err(|e| e.to_string())
    }

    /// The status the driver reads: its own bits, plus NEEDS_RESET once the device failed.
    fn device_status(&self) -> u8 {
        if self.irq.device_failed.load(Ordering::Acquire) {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Device reset: the device stops, the transport forgets the driver's settings.
    fn reset(&mut self) {
        self.dev.reset();
        self.irq.device_failed.store(false, Ordering::Release);
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for (q, &m) in self.queues.iter_mut().zip(&self.max_sizes) {
            *q = QueueRegs {
                size: m,
                enable: false,
                desc: 0,
                driver: 0,
                device: 0,
            };
        }
        let _ = self.irq.take_isr();
        let mut s = self.irq.lock();
        s.config_vector = NO_VECTOR;
        s.queue_vectors.fill(NO_VECTOR);
    }

    fn virtio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < ISR_CFG => self.common_read(o - COMMON_CFG, data),
            // Only a read of the ISR byte itself clears it.
            ISR_CFG if !data.is_empty() => data[0] = self.irq.take_isr(),
            o if o < DEVICE_CFG => {}
            o if o < NOTIFY_CFG => self.dev.read_config(o - DEVICE_CFG, data),
            _ => {}
        }
    }

    fn virtio_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < ISR_CFG => self.common_write(o - COMMON_CFG, data),
            o if o < DEVICE_CFG => {}
            o if o < NOTIFY_CFG => self.dev.write_config(o - DEVICE_CFG, data),
            o => {
                let q = (o - NOTIFY_CFG) / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Some(k) = usize::try_from(q).ok().and_then(|q| self.kicks.get(q)) {
                    // Normally the ioeventfd catches this write in the kernel.
                    log::debug!("virtio-pci: queue {q} kicked through an MMIO exit");
                    if let Err(e) = k.write(1) {
                        log::warn!("{}: kick queue {q}: {e}", self.name());
                    }
                }
            }
        }
    }

    /// The type-5 window: (bar, offset, length) when usable.
    fn pci_cfg_window(&self) -> Option<(usize, u64, usize)> {
        let c = self.pci_cfg_cap;
        if c == 0 {
            return None;
        }
        let bar = usize::from(self.config.read_u8(c + 4));
        let offset = u64::from(self.config.read_u32(c + 8));
        let len = self.config.read_u32(c + 12) as usize;
        matches!(len, 1 | 2 | 4).then_some((bar, offset, len))
    }

    /// Reads the window's target into pci_cfg_data.
    fn refresh_pci_cfg_data(&mut self) {
        let Some((bar, offset, len)) = self.pci_cfg_window() else {
            return;
        };
        let mut buf = [0u8; 4];
        self.bar_read(bar, offset, &mut buf[..len]);
        let c = self.pci_cfg_cap;
        self.config.set_u32(c + 16, u32::from_le_bytes(buf));
    }

    /// Copies the MSI pending bit (set on the worker thread) into config space.
    fn publish_msi_pending(&mut self) {
        if let Some(msi) = &self.irq.lock().msi {
            msi.publish(&mut self.config);
        }
    }

    fn ioevent_addr(base: u64, q: usize) -> u64 {
        base + NOTIFY_CFG + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
    }

    fn unregister_all(&mut self) {
        for (k, r) in self.kicks.iter().zip(self.registered.iter_mut()) {
            if let Some(a) = r.take() {
                if let Err(e) = self.ioevents.unregister(k, a) {
                    self.ioevent_failed.warn(format_args!(
                        "virtio-pci: cannot unregister the ioeventfd at {a:#x}: {e}"
                    ));
                }
            }
        }
    }
}

impl Lifecycle for VirtioPci {
    fn pause(&mut self) -> Result<(), LifecycleError> {
        self.dev.pause()?;
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) {
        if std::mem::take(&mut self.start_on_resume) {
            match self.start_device(true) {
                Ok(()) => self.dev.restored(),
                Err(e) => {
                    log::warn!("{}: cannot restart the restored device: {e}", self.name());
                    self.status |= STATUS_NEEDS_RESET;
                    self.irq.config_changed();
                }
            }
        }
        self.dev.resume();
        self.paused = false;
    }

    /// Config space, transport registers, interrupt state and what the device offers (its
    /// features and configuration, checked on restore: the backend given again must look the
    /// same to the driver), then the device's own state.
    fn save_state(&self) -> Result<Vec<u8>, LifecycleError> {
        let mut w = Writer::new();
        self.config.save_state(&mut w);
        w.u64(self.dev.features());
        w.bytes(&self.device_config_image());
        w.u32(self.device_feature_select)
            .u32(self.driver_feature_select)
            .u64(self.driver_features)
            .u8(self.device_status())
            .u8(self.config_generation)
            .u16(self.queue_select);
        w.u32(self.queues.len() as u32);
        for q in &self.queues {
            w.u16(q.size)
                .bool(q.enable)
                .u64(q.desc)
                .u64(q.driver)
                .u64(q.device);
        }
        {
            let s = self.irq.lock();
            s.msix.save_state(&mut w);
            w.u8(s.isr).bool(s.intx).u16(s.config_vector);
            w.u32(s.queue_vectors.len() as u32);
            for v in &s.queue_vectors {
                w.u16(*v);
            }
        }
        w.bytes(&self.dev.save_state()?);
        Ok(w.finish())
    }

    /// Puts [`save_state`](Self::save_state)'s bytes into this freshly built, never started
    /// transport. A device that was running comes back paused and starts at [`resume`].
    fn restore_state(&mut self, state: &[u8]) -> Result<(), LifecycleError> {
        let bad = |m: String| LifecycleError::BadState(format!("{}: {m}", self.name()));
        if self.status != 0 {
            return Err(bad("restore into a device that already runs".into()));
        }
        let mut r = Reader::new(state);
        let mut config = self.config.clone();
        config.restore_state(&mut r)?;
        let features = r.u64("virtio features")?;
        if features != self.dev.features() {
            return Err(bad(format!(
                "it offers features {:#x}, the saved device offered {features:#x} (were its options changed?)",
                self.dev.features()
            )));
        }
        let devcfg = r.bytes("virtio device config")?;
        if devcfg != self.device_config_image().as_slice() {
            return Err(bad(
                "its configuration differs from the saved device's (disk size, MAC address or CID changed?)"
                    .into(),
            ));
        }
        let device_feature_select = r.u32("feature select")?;
        let driver_feature_select = r.u32("feature select")?;
        let driver_features = r.u64("driver features")?;
        let status = r.u8("status")?;
        let config_generation = r.u8("config generation")?;
        let queue_select = r.u16("queue select")?;
        let n = r.count(27, "queues")?;
        if n != self.queues.len() {
            return Err(bad(format!(
                "{n} queues saved, the device has {}",
                self.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(n);
        for _ in 0..n {
            queues.push(QueueRegs {
                size: r.u16("queue size")?,
                enable: r.bool("queue enable")?,
                desc: r.u64("queue desc")?,
                driver: r.u64("queue driver")?,
                device: r.u64("queue device")?,
            });
        }
        let mut msix = MsixTable::new(self.irq.lock().msix.vectors() as u16);
        msix.restore_state(&mut r)?;
        let (isr, intx, config_vector) = (r.u8("isr")?, r.bool("intx")?, r.u16("vector")?);
        let nv = r.count(2, "queue vectors")?;
        if nv != n {
            return Err(bad(format!("{nv} queue vectors for {n} queues")));
        }
        let mut queue_vectors = Vec::with_capacity(nv);
        for _ in 0..nv {
            queue_vectors.push(r.u16("queue vector")?);
        }
        let dev_state = r.bytes("device state")?;
        r.finish()?;
        let vectors = msix.vectors();
        if std::iter::once(config_vector)
            .chain(queue_vectors.iter().copied())
            .any(|v| v != NO_VECTOR && usize::from(v) >= vectors)
        {
            return Err(bad("an MSI-X vector beyond the table".into()));
        }
        self.dev.restore_state(dev_state)?;
        // Everything checked: apply.
        self.config = config;
        self.device_feature_select = device_feature_select;
        self.driver_feature_select = driver_feature_select;
        self.driver_features = driver_features;
        self.config_generation = config_generation;
        self.queue_select = queue_select;
        self.queues = queues;
        if status & STATUS_FEATURES_OK != 0 {
            self.dev.ack_features(driver_features & features);
        }
        self.status = status;
        let intx_off = self.config.command() & CMD_INTX_DISABLE != 0;
        self.irq.intx_disabled.store(intx_off, Ordering::Relaxed);
        {
            let sink = self.irq.sink.clone();
            let mut s = self.irq.lock();
            s.msix = msix;
            // Announces every live vector's route to this process's sink.
            s.msix.control_written(&self.config, &*sink);
            if let Some(msi) = s.msi.as_mut() {
                msi.restore_from(&self.config);
            }
            s.isr = isr;
            s.config_vector = config_vector;
            s.queue_vectors = queue_vectors;
            s.intx = intx && !intx_off;
            if s.intx {
                sink.intx(true);
            }
        }
        if status & STATUS_DRIVER_OK != 0 && status & STATUS_NEEDS_RESET == 0 {
            self.start_on_resume = true;
            self.paused = true;
        }
        Ok(())
    }

    fn state(&self) -> DeviceState {
        if self.device_status() & STATUS_NEEDS_RESET != 0 {
            DeviceState::NeedsReset
        } else if self.paused {
            DeviceState::Paused
        } else if self.status & STATUS_DRIVER_OK != 0 {
            DeviceState::Active
        } else {
            DeviceState::Inactive
        }
    }

    /// The device's counters, then the transport's guest errors.
    fn stats(&self) -> Vec<Stat> {
        let mut s = self.dev.counters();
        s.push(("transport_guest_errors", self.guest_errors()));
        s
    }

    /// The device changes; a new configuration gets a new generation and, once the driver
    /// runs the device, a configuration-change interrupt.
    fn update(&mut self, update: &crate::lifecycle::DeviceUpdate) -> Result<(), String> {
        if self.dev.update(update)? {
            self.config_generation = self.config_generation.wrapping_add(1);
            if self.status & STATUS_DRIVER_OK != 0 {
                self.irq.config_changed();
            }
        }
        Ok(())
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        self.publish_msi_pending();
        match bar {
            VIRTIO_BAR if offset < VIRTIO_BAR_SIZE => self.virtio_read(offset, data),
            MSIX_BAR if offset < MSIX_PBA => self.irq.lock().msix.table_read(offset, data),
            MSIX_BAR if offset < MSIX_BAR_SIZE => {
                self.irq.lock().msix.pba_read(offset - MSIX_PBA, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.publish_msi_pending();
        match bar {
            VIRTIO_BAR if offset < VIRTIO_BAR_SIZE => self.virtio_write(offset, data),
            MSIX_BAR if offset < MSIX_PBA => {
                let sink = self.irq.sink.clone();
                self.irq.lock().msix.table_write(offset, data, &*sink);
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        if bar != VIRTIO_BAR {
            return;
        }
        self.unregister_all();
        let Some(base) = addr else { return };
        for (q, (k, r)) in self
            .kicks
            .iter()
            .zip(self.registered.iter_mut())
            .enumerate()
        {
            let a = Self::ioevent_addr(base, q);
            match self.ioevents.register(k, a) {
                Ok(()) => {
                    log::debug!("virtio-pci: queue {q} notify ioeventfd at {a:#x}");
                    *r = Some(a);
                }
                // Kicks still work, through the exit path and bar_write.
                Err(e) => self.ioevent_failed.warn(format_args!(
                    "virtio-pci: cannot register an ioeventfd at {a:#x}: {e}"
                )),
            }
        }
    }

    fn config_written(&mut self, offset: u16, len: usize) {
        let intx_off = self.config.command() & CMD_INTX_DISABLE != 0;
        self.irq.intx_disabled.store(intx_off, Ordering::Relaxed);
        {
            let sink = self.irq.sink.clone();
            let mut s = self.irq.lock();
            s.msix.control_written(&self.config, &*sink);
            if let Some(msi) = s.msi.as_mut() {
                msi.config_written(&mut self.config, &*sink);
            }
            // A function using MSI or MSI-X must not assert INTx (PCI LB 3.0 §6.8).
            let msg = s.msix.enabled() || s.msi.as_ref().is_some_and(Msi::enabled);
            if (intx_off || msg) && std::mem::take(&mut s.intx) {
                sink.intx(false);
            }
        }
        let c = self.pci_cfg_cap;
        if c == 0 {
            return;
        }
        let (offset, len) = (u64::from(offset), len as u64);
        let c = u64::from(c);
        if overlaps(offset, len, c + 16, 4) {
            if let Some((bar, off, n)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.config.read(c + 16, &mut buf);
                self.bar_write(bar, off, &buf[..n]);
            }
        }
        if overlaps(offset, len, c + 4, 16) {
            self.refresh_pci_cfg_data();
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.dev.reset();
        self.unregister_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{
        CAPABILITIES_PTR, CMD_MEM, COMMAND, MSIX_ENABLE, MSI_ADDR_HI, MSI_ADDR_LO, MSI_CONTROL,
        MSI_DATA, MSI_ENABLE, MSI_MASK, MSI_PENDING,
    };
    use crate::pci::msix::tests::Recorder;
    use crate::virtio::testutil::*;
    use crate::virtio::Rng;
    use std::os::fd::AsRawFd;

    /// Records (register?, fd, addr).
    #[derive(Default, Clone)]
    struct FakeIoEvents(Arc<Mutex<Vec<(bool, i32, u64)>>>);

    impl IoEventRegistrar for FakeIoEvents {
        fn register(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
            self.0.lock().unwrap().push((true, fd.as_raw_fd(), addr));
            Ok(())
        }
        fn unregister(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
            self.0.lock().unwrap().push((false, fd.as_raw_fd(), addr));
            Ok(())
        }
    }

    struct Rig {
        pci: VirtioPci,
        sink: Arc<Recorder>,
        io: FakeIoEvents,
        drv: Driver,
    }

    const BASE: u64 = 0xc000_4000;

    fn rig() -> Rig {
        rig_with(Box::new(Rng::new()))
    }

    fn rig_with(dev: Box<dyn VirtioDevice>) -> Rig {
        rig_sized(dev, 16)
    }

    fn rig_sized(dev: Box<dyn VirtioDevice>, queue_size: u16) -> Rig {
        let drv = Driver::new(queue_size);
        let sink = Arc::new(Recorder::default());
        let io = FakeIoEvents::default();
        let pci = VirtioPci::new(dev, drv.mem.clone(), sink.clone(), Box::new(io.clone())).unwrap();
        Rig { pci, sink, io, drv }
    }

    impl Rig {
        fn r(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.pci.bar_read(VIRTIO_BAR, off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn w(&mut self, off: u64, len: usize, v: u64) {
            self.pci.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
        }
        fn status(&mut self) -> u8 {
            self.r(0x14, 1) as u8
        }
        fn cfg_write(&mut self, off: u16, data: &[u8]) {
            self.pci.config_mut().write(u64::from(off), data);
            self.pci.config_written(off, data.len());
        }
        /// Negotiates `features`, sets up queue 0 on the test driver's rings, DRIVER_OK.
        fn start(&mut self, features: u64) -> u8 {
            self.w(0x14, 1, 0);
            self.w(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
            self.w(0x08, 4, 0);
            self.w(0x0c, 4, features & 0xffff_ffff);
            self.w(0x08, 4, 1);
            self.w(0x0c, 4, features >> 32);
            self.w(0x14, 1, 0x0b);
            if self.status() & STATUS_FEATURES_OK == 0 {
                return self.status();
            }
            self.w(0x16, 2, 0);
            assert_eq!(self.r(0x18, 2), 256);
            self.w(0x18, 2, u64::from(self.drv.size));
            for (off, a) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
                self.w(off, 4, a & 0xffff_ffff);
                self.w(off + 4, 4, a >> 32);
            }
            self.w(0x1c, 2, 1);
            self.w(0x14, 1, 0x0f);
            self.status()
        }
    }

    #[test]
    fn identity_capabilities_and_layout() {
        let mut t = rig();
        let c = t.pci.config();
        assert_eq!(c.read_u16(0), VENDOR_ID);
        assert_eq!(c.read_u16(2), 0x1044);
        assert_eq!(c.read_u8(8), 1);
        assert_eq!(c.read_u16(0x2e), SUBSYSTEM_ID);
        let mut types = Vec::new();
        let mut p = c.read_u8(CAPABILITIES_PTR) as u16;
        while p != 0 {
            if c.read_u8(p) == CAP_ID_VENDOR {
                types.push((c.read_u8(p + 3), c.read_u8(p + 4), c.read_u32(p + 8)));
            }
            p = c.read_u8(p + 1) as u16;
        }
        assert_eq!(
            types,
            vec![
                (1, 4, 0),
                (2, 4, 0x3000),
                (3, 4, 0x1000),
                (4, 4, 0x2000),
                (5, 0, 0)
            ]
        );
        assert_eq!(c.msix().unwrap().vectors, 2);
        let msi = c.msi().unwrap().offset;
        assert_eq!(c.read_u8(msi), crate::pci::config::CAP_ID_MSI);
        assert_eq!(c.read_u16(msi + MSI_CONTROL), 0x180); // 64-bit, maskable, 1 vector, off
        assert_eq!(t.r(0x12, 2), 1); // num_queues
        assert_eq!(t.r(0x10, 2), u64::from(NO_VECTOR));
        // Device features: VERSION_1 in the high word.
        t.w(0, 4, 1);
        assert_eq!(t.r(4, 4) & 1, 1);
        t.w(0, 4, 7);
        assert_eq!(t.r(4, 4), 0);
    }

    #[test]
    fn features_ok_needs_version_1() {
        let mut t = rig();
        let st = t.start(0);
        assert_eq!(st & STATUS_FEATURES_OK, 0);
        assert_eq!(st, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert!(t.pci.guest_errors() >= 1);
        let st = t.start(VIRTIO_F_VERSION_1);
        assert_eq!(st, 0x0f);
        // Driver features are frozen after FEATURES_OK.
        t.w(0x08, 4, 1);
        t.w(0x0c, 4, 0);
        assert_eq!(t.r(0x0c, 4), 1);
    }

    #[test]
    fn ioeventfds_follow_the_bar() {
        let mut t = rig();
        t.pci.config_mut().set_bar_address(VIRTIO_BAR, BASE);
        t.pci.bar_moved(VIRTIO_BAR, Some(BASE));
        let fd = t.pci.kicks[0].as_raw_fd();
        assert_eq!(*t.io.0.lock().unwrap(), vec![(true, fd, BASE + 0x3000)]);
        t.pci.bar_moved(VIRTIO_BAR, Some(0xd000_0000));
        t.pci.bar_moved(MSIX_BAR, None);
        t.pci.bar_moved(VIRTIO_BAR, None);
        assert_eq!(
            *t.io.0.lock().unwrap(),
            vec![
                (true, fd, BASE + 0x3000),
                (false, fd, BASE + 0x3000),
                (true, fd, 0xd000_3000),
                (false, fd, 0xd000_3000),
            ]
        );
    }

    #[test]
    fn rng_kick_msix_reset_and_restart() {
        let mut t = rig();
        // MSI-X on: vector 1 programmed and unmasked, queue 0 → vector 1, config → 0.
        let cap = t.pci.config().msix().unwrap().offset;
        t.cfg_write(COMMAND, &CMD_MEM.to_le_bytes());
        t.cfg_write(cap + 2, &MSIX_ENABLE.to_le_bytes());
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&0xfee0_0000u64.to_le_bytes());
        e[8..12].copy_from_slice(&0x31u32.to_le_bytes());
        t.pci.bar_write(MSIX_BAR, 16, &e);
        assert_eq!(t.start(VIRTIO_F_VERSION_1), 0x0f);
        t.w(0x10, 2, 0);
        assert_eq!(t.r(0x10, 2), 0);
        t.w(0x1a, 2, 1);
        assert_eq!(t.r(0x1a, 2), 1);
        t.w(0x1a, 2, 9); // no such vector
        assert_eq!(t.r(0x1a, 2), u64::from(NO_VECTOR));
        t.w(0x1a, 2, 1);
        for round in 1..=2u16 {
            let buf = t.drv.alloc(64);
            t.drv.push_chain(&[(buf, 64, true)]);
            t.w(NOTIFY_CFG, 2, 0); // the kick, as if no ioeventfd were registered
            assert!(wait_for(|| t.drv.used_idx() == round), "round {round}");
            assert_eq!(t.drv.used(round - 1).1, 64);
            assert_ne!(t.drv.read(buf, 64), vec![0u8; 64]);
            let sink = t.sink.clone();
            assert!(wait_for(
                || sink.msis.lock().unwrap().len() >= usize::from(round)
            ));
            assert_eq!(sink.msis.lock().unwrap()[0], (0xfee0_0000, 0x31));
        }
        assert!(t.sink.intx.lock().unwrap().is_empty());
        // Reset: everything back to defaults; the device can start again.
        t.w(0x14, 1, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.r(0x18, 2), 256);
        assert_eq!(t.r(0x1c, 2), 0);
        assert_eq!(t.r(0x1a, 2), u64::from(NO_VECTOR));
        assert_eq!(t.r(0x10, 2), u64::from(NO_VECTOR));
        assert_eq!(t.r(0x20, 8), 0);
        t.drv = Driver::new(16); // fresh rings
        t.pci.mem = t.drv.mem.clone();
        assert_eq!(t.start(VIRTIO_F_VERSION_1), 0x0f);
        let buf = t.drv.alloc(16);
        t.drv.push_chain(&[(buf, 16, true)]);
        t.w(NOTIFY_CFG, 4, 0);
        assert!(wait_for(|| t.drv.used_idx() == 1));
    }

    #[test]
    fn pause_stops_device_dma_until_resume() {
        let mut t = rig();
        assert_eq!(t.pci.state(), DeviceState::Inactive);
        assert_eq!(t.start(VIRTIO_F_VERSION_1), 0x0f);
        assert_eq!(t.pci.state(), DeviceState::Active);
        t.pci.pause().unwrap();
        assert_eq!(t.pci.state(), DeviceState::Paused);
        let buf = t.drv.alloc(64);
        t.drv.push_chain(&[(buf, 64, true)]);
        t.w(NOTIFY_CFG, 2, 0);
        // Guest memory as the driver left it: the device must not write a byte of it.
        let before = t.drv.read(0, MEM_SIZE);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            t.drv.read(0, MEM_SIZE) == before,
            "guest RAM written while paused"
        );
        assert_eq!(t.drv.used_idx(), 0);
        t.pci.resume();
        assert_eq!(t.pci.state(), DeviceState::Active);
        assert!(wait_for(|| t.drv.used_idx() == 1));
        assert_ne!(t.drv.read(buf, 64), vec![0u8; 64]);
        let stats: std::collections::HashMap<_, _> = t.pci.stats().into_iter().collect();
        assert_eq!(stats["requests"], 1);
        assert_eq!(stats["bytes"], 64);
        assert_eq!(stats["transport_guest_errors"], 0);
    }

    /// KVM refuses every ioeventfd (as for an address it already has one at).
    struct RefusingIoEvents;

    impl IoEventRegistrar for RefusingIoEvents {
        fn register(&self, _: &EventFd, _: u64) -> io::Result<()> {
            Err(io::Error::other("ioeventfd refused for this test"))
        }
        fn unregister(&self, _: &EventFd, _: u64) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_guest_moving_its_bar_again_and_again_logs_one_warning() {
        crate::limited_log::capture::install();
        let drv = Driver::new(16);
        let sink = Arc::new(Recorder::default());
        let mut pci = VirtioPci::new(
            Box::new(Rng::new()),
            drv.mem.clone(),
            sink,
            Box::new(RefusingIoEvents),
        )
        .unwrap();
        for i in 0..1000u64 {
            pci.bar_moved(VIRTIO_BAR, Some(0xd000_0000 + (i << 16)));
        }
        assert_eq!(
            crate::limited_log::capture::warnings_with("ioeventfd refused for this test"),
            1
        );
        assert_eq!(pci.ioevent_failed.count(), 1000);
    }

    #[test]
    fn a_driver_that_keeps_the_ring_full_cannot_hold_off_a_pause() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use vm_memory::{Bytes, GuestAddress};
        // A full-size ring: each pass over it lasts long enough for the driver to refill.
        let mut t = rig_sized(Box::new(Rng::new()), 256);
        t.start(VIRTIO_F_VERSION_1);
        let size = t.drv.size;
        // Large requests: each pass over the ring takes the worker a while.
        let len = crate::virtio::rng::MAX_PER_REQUEST as u32;
        let buf = t.drv.alloc(u64::from(len));
        for i in 0..size {
            t.drv.write_desc(DESC, i, buf, len, F_WRITE, 0);
        }
        // Another vCPU: makes each descriptor available again as soon as it is used, and
        // kicks (a write to the queue's ioeventfd).
        let kick = t.pci.kicks[0].as_raw_fd();
        let mem = t.drv.mem.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flooder = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Avail slot k always names descriptor k, so keeping the ring full is
                // only moving avail.idx to a whole ring ahead of used.idx.
                for k in 0..size {
                    let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(k));
                    mem.write_obj(k, slot).unwrap();
                }
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
                    let avail = used.wrapping_add(size);
                    mem.write_obj(avail, GuestAddress(AVAIL + 2)).unwrap();
                    n = n.wrapping_add(1);
                    if n.is_multiple_of(1024) {
                        let one = 1u64;
                        // SAFETY: an 8-byte write to the device's kick eventfd, open while
                        // the device lives (this thread ends first).
                        unsafe { libc::write(kick, (&one as *const u64).cast(), 8) };
                    }
                }
            })
        };
        t.w(NOTIFY_CFG, 2, 0);
        let seen = t.drv.used_idx();
        assert!(wait_for(|| t.drv.used_idx().wrapping_sub(seen) > 300));
        let paused = t.pci.pause();
        let (a, b) = (t.drv.used_idx(), {
            std::thread::sleep(std::time::Duration::from_millis(100));
            t.drv.used_idx()
        });
        stop.store(true, Ordering::Relaxed);
        flooder.join().unwrap();
        paused.expect("the worker never looked at its control events");
        assert_eq!(a, b, "used ring moved while paused");
        t.pci.resume();
    }

    /// A device whose worker panics on its first look at the queue.
    #[derive(Default)]
    struct Panicky {
        worker: Option<crate::virtio::Worker>,
    }

    impl VirtioDevice for Panicky {
        fn device_type(&self) -> u32 {
            crate::virtio::TYPE_RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn ack_features(&mut self, _features: u64) {}
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            mem: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<Queue>,
            kicks: Vec<EventFd>,
        ) -> Result<(), crate::virtio::ActivateError> {
            crate::virtio::activate_single_queue(
                &mut self.worker,
                crate::threads::WorkerClass::Rng,
                mem,
                interrupt,
                queues,
                kicks,
                |_, _| panic!("injected device bug"),
            )
        }
        fn reset(&mut self) {
            if let Some(w) = self.worker.take() {
                w.stop();
            }
        }
        fn pause(&mut self) -> Result<(), LifecycleError> {
            self.worker
                .as_ref()
                .map_or(Ok(()), crate::virtio::Worker::pause)
        }
        fn resume(&mut self) {}
        fn counters(&self) -> Vec<Stat> {
            Vec::new()
        }
    }

    #[test]
    fn a_worker_panic_ends_in_needs_reset() {
        let mut t = rig_with(Box::<Panicky>::default());
        // (The worker may fail before start's last status read.)
        assert_eq!(t.start(VIRTIO_F_VERSION_1) & !STATUS_NEEDS_RESET, 0x0f);
        assert!(wait_for(|| t.pci.state() == DeviceState::NeedsReset));
        assert_eq!(t.status(), 0x0f | STATUS_NEEDS_RESET);
        // The driver hears of it: a configuration change (INTx + ISR bit 1 here).
        assert_eq!(t.r(ISR_CFG, 1) & 2, 2);
        // Pause and the device's other paths still answer.
        t.pci.pause().unwrap();
        t.pci.resume();
        assert_eq!(t.r(0x18, 2), 16);
        // A reset clears it; the device can start (and fail) again.
        t.w(0x14, 1, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.pci.state(), DeviceState::Inactive);
        assert_eq!(t.start(VIRTIO_F_VERSION_1) & !STATUS_NEEDS_RESET, 0x0f);
        assert!(wait_for(|| t.pci.state() == DeviceState::NeedsReset));
    }

    #[test]
    fn intx_and_isr_without_msix() {
        let mut t = rig();
        assert_eq!(t.start(VIRTIO_F_VERSION_1), 0x0f);
        let buf = t.drv.alloc(32);
        t.drv.push_chain(&[(buf, 32, true)]);
        t.w(NOTIFY_CFG, 1, 0);
        let sink = t.sink.clone();
        assert!(wait_for(|| sink.intx.lock().unwrap().contains(&true)));
        assert!(wait_for(|| t.drv.used_idx() == 1));
        assert_eq!(t.r(ISR_CFG, 1) & 1, 1);
        assert_eq!(sink.intx.lock().unwrap().last(), Some(&false));
        assert_eq!(t.r(ISR_CFG, 1), 0);
        assert!(sink.msis.lock().unwrap().is_empty());
    }

    /// Programs and enables MSI with (`addr`, `data`), the vector masked or not.
    fn msi_on(t: &mut Rig, addr: u64, data: u16, masked: bool) -> u16 {
        let cap = t.pci.config().msi().unwrap().offset;
        t.cfg_write(COMMAND, &CMD_MEM.to_le_bytes());
        t.cfg_write(cap + MSI_ADDR_LO, &(addr as u32).to_le_bytes());
        t.cfg_write(cap + MSI_ADDR_HI, &((addr >> 32) as u32).to_le_bytes());
        t.cfg_write(cap + MSI_DATA, &data.to_le_bytes());
        t.cfg_write(cap + MSI_MASK, &u32::from(masked).to_le_bytes());
        t.cfg_write(cap + MSI_CONTROL, &MSI_ENABLE.to_le_bytes());
        cap
    }

    /// Posts one 16-byte buffer, kicks, waits for used index `n`.
    fn rng_round(t: &mut Rig, n: u16) {
        let buf = t.drv.alloc(16);
        t.drv.push_chain(&[(buf, 16, true)]);
        t.w(NOTIFY_CFG, 2, 0);
        assert!(wait_for(|| t.drv.used_idx() == n), "round {n}");
    }

    #[test]
    fn msi_carries_queues_and_config_when_msix_is_off() {
        let mut t = rig();
        let cap = msi_on(&mut t, 0x1_fee0_0000, 0x42, false);
        assert_eq!(t.start(VIRTIO_F_VERSION_1), 0x0f);
        // No MSI-X vector assigned: MSI does not need one.
        assert_eq!(t.r(0x1a, 2), u64::from(NO_VECTOR));
        rng_round(&mut t, 1);
        let sink = t.sink.clone();
        assert!(wait_for(|| sink.msis.lock().unwrap().len() == 1));
        assert_eq!(sink.msis.lock().unwrap()[0], (0x1_fee0_0000, 0x42));
        // The ISR tells the driver what the shared vector was for.
        assert_eq!(t.r(ISR_CFG, 1), 1);
        assert_eq!(t.r(ISR_CFG, 1), 0);
        t.pci.irq.config_changed();
        assert_eq!(
            *sink.msis.lock().unwrap().last().unwrap(),
            (0x1_fee0_0000, 0x42)
        );
        assert_eq!(t.r(ISR_CFG, 1), 2);
        assert!(sink.intx.lock().unwrap().is_empty());
        assert!(sink.take_events().is_empty()); // no MSI-X activity
                                                // Masked: the message waits, its pending bit shows at the next access, unmask sends it.
        t.cfg_write(cap + MSI_MASK, &1u32.to_le_bytes());
        rng_round(&mut t, 2);
        assert!(wait_for(|| {
            t.r(0x14, 1); // any access publishes the pending bit
            t.pci.config().read_u32(cap + MSI_PENDING) == 1
        }));
        assert_eq!(sink.msis.lock().unwrap().len(), 2);
        t.cfg_write(cap + MSI_MASK, &0u32.to_le_bytes());
        assert_eq!(sink.msis.lock().unwrap().len(), 3);
        assert_eq!(t.pci.config().read_u32(cap + MSI_PENDING), 0);
        assert!(sink.intx.lock().unwrap().is_empty());
    }

    #[test]
    fn msix_wins_over_msi_and_intx_is_the_last_resort() {
        let mut t = rig();
        let msi = msi_on(&mut t, 0xfee0_0000, 0x42, false);
        let msix = t.pci.config().msix().unwrap().offset;
        t.cfg_write(msix + 2, &MSIX_ENABLE.to_le_bytes());
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&0xfee0_0000u64.to_le_bytes());
        e[8..12].copy_from_slice(&0x41u32.to_le_bytes());
        t.pci.bar_write(MSIX_BAR, 0, &e);
        assert_eq!(t.start(VIRTIO_F_VERSION_1), 0x0f);
        t.w(0x1a, 2, 0);
        let sink = t.sink.clone();
        rng_round(&mut t, 1);
        assert!(wait_for(|| sink.msis.lock().unwrap().len() == 1));
        assert_eq!(sink.msis.lock().unwrap()[0], (0xfee0_0000, 0x41));
        assert_eq!(t.r(ISR_CFG, 1), 0); // MSI-X leaves the ISR alone
                                        // MSI-X off: MSI.
        t.cfg_write(msix + 2, &0u16.to_le_bytes());
        rng_round(&mut t, 2);
        assert!(wait_for(|| sink.msis.lock().unwrap().len() == 2));
        assert_eq!(sink.msis.lock().unwrap()[1], (0xfee0_0000, 0x42));
        assert_eq!(t.r(ISR_CFG, 1), 1);
        // Both off: INTx + ISR; enabling MSI lowers the asserted line.
        t.cfg_write(msi + MSI_CONTROL, &0u16.to_le_bytes());
        rng_round(&mut t, 3);
        assert!(wait_for(|| sink.intx.lock().unwrap().contains(&true)));
        assert_eq!(sink.msis.lock().unwrap().len(), 2);
        t.cfg_write(msi + MSI_CONTROL, &MSI_ENABLE.to_le_bytes());
        assert_eq!(*sink.intx.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn bad_rings_set_needs_reset() {
        let mut t = rig();
        t.w(0x14, 1, 3);
        t.w(0x08, 4, 1);
        t.w(0x0c, 4, 1);
        t.w(0x14, 1, 0x0b);
        t.w(0x18, 2, 3); // not a power of two
        t.w(0x1c, 2, 1);
        t.w(0x14, 1, 0x0f);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        // Queue 0 not enabled at all: also refused.
        t.w(0x14, 1, 0);
        t.w(0x14, 1, 3);
        t.w(0x08, 4, 1);
        t.w(0x0c, 4, 1);
        t.w(0x14, 1, 0x0b);
        t.w(0x14, 1, 0x0f);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        // DRIVER_OK without FEATURES_OK.
        t.w(0x14, 1, 0);
        t.w(0x14, 1, 0x07);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn pci_cfg_window() {
        let mut t = rig();
        let c = t.pci.pci_cfg_cap;
        assert_ne!(c, 0);
        t.cfg_write(c + 4, &[VIRTIO_BAR as u8]);
        t.cfg_write(c + 12, &2u32.to_le_bytes());
        t.cfg_write(c + 8, &0x12u32.to_le_bytes());
        assert_eq!(t.pci.config().read_u16(c + 16), 1); // num_queues
                                                        // A write through the window: queue_select = 5, read back directly.
        t.cfg_write(c + 8, &0x16u32.to_le_bytes());
        t.cfg_write(c + 16, &5u32.to_le_bytes());
        assert_eq!(t.r(0x16, 2), 5);
        assert_eq!(t.r(0x18, 2), 0); // no queue 5
                                     // Bad lengths do nothing.
        t.cfg_write(c + 12, &3u32.to_le_bytes());
        t.cfg_write(c + 16, &0u32.to_le_bytes());
        assert_eq!(t.r(0x16, 2), 5);
    }

    #[test]
    fn hostile_offsets_and_widths() {
        let mut t = rig();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut buf = [0u8; 16];
        for _ in 0..20_000 {
            let bar = rng.below(7) as usize;
            let off = match rng.below(4) {
                0 => rng.next(),
                1 => rng.below(VIRTIO_BAR_SIZE + 16),
                2 => rng.below(0x40),
                _ => NOTIFY_CFG + rng.below(64),
            };
            let len = rng.below(17) as usize;
            if rng.below(2) == 0 {
                t.pci.bar_read(bar, off, &mut buf[..len]);
            } else {
                let v = rng.next().to_le_bytes();
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&v);
                t.pci.bar_write(bar, off, &d[..len]);
            }
            if rng.below(50) == 0 {
                let off = rng.below(0x110) as u16;
                let v = rng.next().to_le_bytes();
                let n = rng.below(5) as usize;
                t.cfg_write(off, &v[..n]);
            }
        }
        // Still a working device after a reset.
        t.cfg_write(COMMAND, &0u16.to_le_bytes());
        let cap = t.pci.config().msix().unwrap().offset;
        t.cfg_write(cap + 2, &0u16.to_le_bytes());
        t.drv = Driver::new(16);
        t.pci.mem = t.drv.mem.clone();
        assert_eq!(t.start(VIRTIO_F_VERSION_1), 0x0f);
        let b = t.drv.alloc(8);
        t.drv.push_chain(&[(b, 8, true)]);
        t.w(NOTIFY_CFG, 2, 0);
        assert!(wait_for(|| t.drv.used_idx() == 1));
    }
}
