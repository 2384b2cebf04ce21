//! A host PCI function for passthrough, through VFIO: libvmmapi's ppt calls (bhyve's
//! `vm_assign_pptdev`, `vm_map_pptdev_mmio`, `vm_setup_pptdev_msix`) on Linux. The function
//! must be bound to vfio-pci; its IOMMU group (`/dev/vfio/N`) goes into a type-1 container,
//! guest RAM is mapped there for the device's DMA, and the device's regions (config space,
//! BARs) and interrupts are reached through the device descriptor.
//!
//! Every refusal is one line that says what to do (bind the function, the group's other
//! devices, no IOMMU, in use).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::*;

use crate::{Error, GuestRam, Result};

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO's ioctls carry no size.
const fn vfio_io(n: u32) -> libc::c_ulong {
    ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE + n) as libc::c_ulong
}
const GET_API_VERSION: libc::c_ulong = vfio_io(0);
const CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const SET_IOMMU: libc::c_ulong = vfio_io(2);
const GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const DEVICE_GET_INFO: libc::c_ulong = vfio_io(7);
const DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const DEVICE_GET_IRQ_INFO: libc::c_ulong = vfio_io(9);
/// The one VFIO call a running VM makes (MSI-X vectors programmed or turned off), for seccomp.
pub const DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);
const DEVICE_RESET: libc::c_ulong = vfio_io(11);
const IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);

/// The sysfs tree of PCI functions (a test may point elsewhere).
const SYSFS_PCI: &str = "/sys/bus/pci/devices";

fn ioctl_err(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Vfio(format!("{what}: {e}"))
}

/// `ioctl(fd, req, arg)`, its result or errno.
///
/// # Safety
/// `arg` must be what `req` expects (a pointer to a struct of the right size, or a value).
unsafe fn ioctl(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<i32> {
    // SAFETY: the caller's promise.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A PCI address as sysfs names it: `DDDD:BB:SS.F`.
pub fn sysfs_name(domain: u16, bus: u8, slot: u8, func: u8) -> String {
    format!("{domain:04x}:{bus:02x}:{slot:02x}.{func:x}")
}

/// The name of the driver bound to `dev` (a sysfs device directory), if any.
fn driver_of(dev: &Path) -> Option<String> {
    let link = std::fs::read_link(dev.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// How to give `name` to vfio-pci, for the error that says it is not (`bound`: another
/// driver has it, to unbind first).
fn bind_hint(name: &str, bound: bool) -> String {
    let unbind = if bound {
        format!("echo {name} > {SYSFS_PCI}/{name}/driver/unbind; ")
    } else {
        String::new()
    };
    format!(
        "modprobe vfio-pci; echo vfio-pci > {SYSFS_PCI}/{name}/driver_override; {unbind}\
         echo {name} > /sys/bus/pci/drivers_probe"
    )
}

/// One region of the device (a BAR, the ROM, config space).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Region {
    pub size: u64,
    /// Where the region starts in the device descriptor's file offsets.
    pub offset: u64,
    pub readable: bool,
    pub writable: bool,
    /// The region can be mmap()ed (MMIO BARs), for a KVM memory slot.
    pub mmap: bool,
}

/// A host PCI function opened through VFIO, its group and container with it (they must live
/// as long as the device).
pub struct VfioDevice {
    name: String,
    device: File,
    group: File,
    container: File,
    resettable: bool,
    regions: Vec<Region>,
    /// Vectors per interrupt index (INTx, MSI, MSI-X, ...).
    irq_counts: Vec<u32>,
}

impl VfioDevice {
    /// Opens host function `name` (`DDDD:BB:SS.F`) for passthrough.
    pub fn open(name: &str) -> Result<Self> {
        Self::open_in(Path::new(SYSFS_PCI), Path::new("/dev/vfio"), name)
    }

    fn open_in(sysfs: &Path, dev_vfio: &Path, name: &str) -> Result<Self> {
        let fail = |what: String| Error::Vfio(format!("{name}: {what}"));
        let dir = sysfs.join(name);
        if !dir.exists() {
            return Err(fail(
                "no such PCI function on this host (lspci -D lists them)".into(),
            ));
        }
        let group_link = std::fs::read_link(dir.join("iommu_group")).map_err(|_| {
            fail(
                "has no IOMMU group: the host has no IOMMU, or it is off (boot with \
                 intel_iommu=on or amd_iommu=on)"
                    .into(),
            )
        })?;
        let group_id: u32 = group_link
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| fail(format!("unreadable IOMMU group {}", group_link.display())))?;
        match driver_of(&dir) {
            Some(d) if d == "vfio-pci" => {}
            Some(d) => {
                return Err(fail(format!(
                    "is bound to {d}, not vfio-pci: {}",
                    bind_hint(name, true)
                )))
            }
            None => {
                return Err(fail(format!(
                    "is bound to no driver, not vfio-pci: {}",
                    bind_hint(name, false)
                )))
            }
        }
        let group_path = dev_vfio.join(group_id.to_string());
        let group = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&group_path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => fail(format!(
                    "is in use: another process holds its group {}",
                    group_path.display()
                )),
                _ => fail(format!("{}: {e}", group_path.display())),
            })?;
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: GROUP_GET_STATUS fills a vfio_group_status we own.
        unsafe {
            ioctl(
                group.as_raw_fd(),
                GROUP_GET_STATUS,
                &mut status as *mut _ as libc::c_ulong,
            )
        }
        .map_err(ioctl_err("VFIO_GROUP_GET_STATUS"))?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(fail(format!(
                "its IOMMU group {group_id} is not viable: every function in it must be bound to \
                 vfio-pci (or to no driver); here: {}",
                group_members(sysfs, &group_link, name).join(", ")
            )));
        }
        let container = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev_vfio.join("vfio"))
            .map_err(|e| fail(format!("{}/vfio: {e}", dev_vfio.display())))?;
        let cfd = container.as_raw_fd();
        // SAFETY: GET_API_VERSION and CHECK_EXTENSION take values, no pointers.
        let version =
            unsafe { ioctl(cfd, GET_API_VERSION, 0) }.map_err(ioctl_err("VFIO_GET_API_VERSION"))?;
        if version != VFIO_API_VERSION as i32 {
            return Err(fail(format!(
                "VFIO API version {version}, rhyve speaks {VFIO_API_VERSION}"
            )));
        }
        // SAFETY: as above.
        let type1v2 =
            unsafe { ioctl(cfd, CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU.into()) }.is_ok_and(|r| r > 0);
        let iommu = if type1v2 {
            VFIO_TYPE1v2_IOMMU
        } else {
            VFIO_TYPE1_IOMMU
        };
        // SAFETY: GROUP_SET_CONTAINER reads an int (the container's descriptor) we own.
        unsafe {
            ioctl(
                group.as_raw_fd(),
                GROUP_SET_CONTAINER,
                &cfd as *const RawFd as libc::c_ulong,
            )
        }
        .map_err(ioctl_err("VFIO_GROUP_SET_CONTAINER"))?;
        // SAFETY: SET_IOMMU takes a value.
        unsafe { ioctl(cfd, SET_IOMMU, iommu.into()) }.map_err(|e| {
            fail(format!(
                "VFIO_SET_IOMMU: {e} (vfio_iommu_type1 loaded? without interrupt remapping it \
                 needs allow_unsafe_interrupts=1)"
            ))
        })?;
        let cname = std::ffi::CString::new(name).map_err(|_| fail("bad name".into()))?;
        // SAFETY: GROUP_GET_DEVICE_FD reads a NUL-terminated name and returns a new fd.
        let fd = unsafe {
            ioctl(
                group.as_raw_fd(),
                GROUP_GET_DEVICE_FD,
                cname.as_ptr() as libc::c_ulong,
            )
        }
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => fail("is in use by another process".into()),
            _ => fail(format!("VFIO_GROUP_GET_DEVICE_FD: {e}")),
        })?;
        // SAFETY: a descriptor the kernel just gave us, owned by nothing else.
        let device = unsafe { File::from_raw_fd(fd) };
        let mut info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: DEVICE_GET_INFO fills a vfio_device_info we own.
        unsafe {
            ioctl(
                device.as_raw_fd(),
                DEVICE_GET_INFO,
                &mut info as *mut _ as libc::c_ulong,
            )
        }
        .map_err(ioctl_err("VFIO_DEVICE_GET_INFO"))?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(fail("is not a PCI function to VFIO".into()));
        }
        let mut regions = Vec::new();
        for index in 0..info.num_regions.min(VFIO_PCI_NUM_REGIONS) {
            let mut r = vfio_region_info {
                argsz: std::mem::size_of::<vfio_region_info>() as u32,
                index,
                ..Default::default()
            };
            // SAFETY: DEVICE_GET_REGION_INFO fills a vfio_region_info we own (argsz is its
            // size: the kernel writes no capability chain past it).
            let ok = unsafe {
                ioctl(
                    device.as_raw_fd(),
                    DEVICE_GET_REGION_INFO,
                    &mut r as *mut _ as libc::c_ulong,
                )
            };
            regions.push(match ok {
                Ok(_) => Region {
                    size: r.size,
                    offset: r.offset,
                    readable: r.flags & VFIO_REGION_INFO_FLAG_READ != 0,
                    writable: r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
                    mmap: r.flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
                },
                // A region the device does not have (e.g. VGA).
                Err(_) => Region::default(),
            });
        }
        let mut irq_counts = Vec::new();
        for index in 0..info.num_irqs.min(8) {
            let mut irq = vfio_irq_info {
                argsz: std::mem::size_of::<vfio_irq_info>() as u32,
                index,
                ..Default::default()
            };
            // SAFETY: DEVICE_GET_IRQ_INFO fills a vfio_irq_info we own.
            let ok = unsafe {
                ioctl(
                    device.as_raw_fd(),
                    DEVICE_GET_IRQ_INFO,
                    &mut irq as *mut _ as libc::c_ulong,
                )
            };
            irq_counts.push(if ok.is_ok() && irq.flags & VFIO_IRQ_INFO_EVENTFD != 0 {
                irq.count
            } else {
                0
            });
        }
        Ok(Self {
            name: name.to_string(),
            device,
            group,
            container,
            resettable: info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
            regions,
            irq_counts,
        })
    }

    /// Its IOMMU group's descriptor (`/dev/vfio/N`), for [`crate::Vm::add_vfio_group`].
    pub fn group_fd(&self) -> RawFd {
        self.group.as_raw_fd()
    }

    /// The host function's name (`DDDD:BB:SS.F`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Region `index` (BARs 0–5, 6 the ROM, 7 config space); an absent one has size 0.
    pub fn region(&self, index: u32) -> Region {
        self.regions
            .get(index as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Vectors of interrupt index `index` (VFIO_PCI_INTX/MSI/MSIX_IRQ_INDEX).
    pub fn irq_count(&self, index: u32) -> u32 {
        self.irq_counts.get(index as usize).copied().unwrap_or(0)
    }

    /// Reads `data.len()` bytes at `offset` of region `index`; false if outside it or refused.
    pub fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> bool {
        let r = self.region(index);
        let end = offset.checked_add(data.len() as u64);
        if !r.readable || end.is_none_or(|e| e > r.size) {
            return false;
        }
        self.device.read_exact_at(data, r.offset + offset).is_ok()
    }

    /// Writes `data` at `offset` of region `index`; false if outside it or refused.
    pub fn write(&self, index: u32, offset: u64, data: &[u8]) -> bool {
        let r = self.region(index);
        let end = offset.checked_add(data.len() as u64);
        if !r.writable || end.is_none_or(|e| e > r.size) {
            return false;
        }
        self.device.write_all_at(data, r.offset + offset).is_ok()
    }

    /// Maps region `index` (it must be mmap-able and a multiple of 4 KiB), for a KVM slot.
    pub fn map_region(&self, index: u32) -> Result<RegionMapping> {
        let r = self.region(index);
        if !r.mmap || r.size == 0 || !r.size.is_multiple_of(4096) {
            return Err(Error::Vfio(format!(
                "{}: region {index} cannot be mapped ({} bytes, mmap {})",
                self.name, r.size, r.mmap
            )));
        }
        let len = usize::try_from(r.size).map_err(|_| Error::Vfio("region too large".into()))?;
        // SAFETY: a shared mapping of the device descriptor at the region's offset, as VFIO
        // documents; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                r.offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::Vfio(format!(
                "{}: mmap of region {index}: {}",
                self.name,
                std::io::Error::last_os_error()
            )));
        }
        Ok(RegionMapping {
            addr: addr as u64,
            len: r.size,
        })
    }

    /// Points interrupts `start..start + fds.len()` of `index` at these eventfds (-1: none).
    pub fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<()> {
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        self.set_irqs(flags, index, start, fds, "")
    }

    /// `fd` is signalled to unmask interrupt `index` (INTx: VFIO masks the line when it
    /// fires, the guest's EOI — KVM's resample eventfd — unmasks it).
    pub fn set_irq_unmask_eventfd(&self, index: u32, fd: RawFd) -> Result<()> {
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK;
        self.set_irqs(flags, index, 0, &[fd], " (unmask)")
    }

    /// Turns every interrupt of `index` off.
    pub fn disable_irqs(&self, index: u32) -> Result<()> {
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
        self.set_irqs(flags, index, 0, &[], " (off)")
    }

    /// VFIO_DEVICE_SET_IRQS: a vfio_irq_set header, then one descriptor per interrupt.
    fn set_irqs(
        &self,
        flags: u32,
        index: u32,
        start: u32,
        fds: &[RawFd],
        what: &str,
    ) -> Result<()> {
        let head = std::mem::size_of::<vfio_irq_set>();
        let mut buf = vec![0u8; head + 4 * fds.len()];
        let fields = [buf.len() as u32, flags, index, start, fds.len() as u32];
        for (i, v) in fields.iter().enumerate() {
            buf[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        for (i, fd) in fds.iter().enumerate() {
            buf[head + 4 * i..head + 4 * i + 4].copy_from_slice(&fd.to_ne_bytes());
        }
        // SAFETY: DEVICE_SET_IRQS reads argsz bytes: the header and `count` descriptors.
        unsafe {
            ioctl(
                self.device.as_raw_fd(),
                DEVICE_SET_IRQS,
                buf.as_ptr() as libc::c_ulong,
            )
        }
        .map(drop)
        .map_err(|e| Error::Vfio(format!("{}: VFIO_DEVICE_SET_IRQS{what}: {e}", self.name)))
    }

    /// Resets the function (FLR or what VFIO has for it); false if it cannot be reset.
    pub fn reset(&self) -> bool {
        // SAFETY: DEVICE_RESET takes no argument.
        self.resettable && unsafe { ioctl(self.device.as_raw_fd(), DEVICE_RESET, 0) }.is_ok()
    }

    /// Maps all of guest RAM for the device's DMA: guest-physical address = IOVA.
    pub fn map_guest_ram(&self, ram: &GuestRam) -> Result<()> {
        for (gpa, host, len) in ram.host_regions() {
            let map = vfio_iommu_type1_dma_map {
                argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
                flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                vaddr: host,
                iova: gpa,
                size: len,
            };
            // SAFETY: IOMMU_MAP_DMA reads the struct; the range is guest RAM, mapped for as
            // long as the VM (which outlives this device) lives.
            unsafe {
                ioctl(
                    self.container.as_raw_fd(),
                    IOMMU_MAP_DMA,
                    &map as *const _ as libc::c_ulong,
                )
            }
            .map_err(|e| {
                Error::Vfio(format!(
                    "{}: VFIO_IOMMU_MAP_DMA of guest RAM at {gpa:#x} ({} MiB): {e} \
                     (RLIMIT_MEMLOCK must cover guest RAM)",
                    self.name,
                    len >> 20
                ))
            })?;
        }
        Ok(())
    }
}

/// The other functions of `name`'s IOMMU group with their drivers, for the "not viable" error.
fn group_members(sysfs: &Path, group_link: &Path, name: &str) -> Vec<String> {
    let devices: PathBuf = sysfs.join(name).join(group_link).join("devices");
    let mut out: Vec<String> = std::fs::read_dir(&devices)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n != name).then(|| {
                let d = driver_of(&sysfs.join(&n)).unwrap_or_else(|| "no driver".into());
                format!("{n} ({d})")
            })
        })
        .collect();
    out.sort();
    out
}

/// A mapped region of a VFIO device (an MMIO BAR), unmapped when dropped.
pub struct RegionMapping {
    addr: u64,
    len: u64,
}

// SAFETY: the mapping is device memory shared with the kernel; accesses are the guest's
// (through KVM) or volatile copies.
unsafe impl Send for RegionMapping {}
// SAFETY: as above.
unsafe impl Sync for RegionMapping {}

// SAFETY: addr..addr+len is this value's own mapping, unmapped only in Drop.
unsafe impl crate::HostMemory for RegionMapping {
    fn host_addr(&self) -> u64 {
        self.addr
    }
    fn len(&self) -> u64 {
        self.len
    }
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, of exactly this length.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: function `name` with an optional group and driver.
    fn fake(tag: &str, name: &str, group: Option<&str>, driver: Option<&str>) -> PathBuf {
        let root = std::env::temp_dir().join(format!("rhyve-vfio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dev = root.join("devices").join(name);
        std::fs::create_dir_all(&dev).unwrap();
        if let Some(g) = group {
            let gdir = root.join("groups").join(g);
            std::fs::create_dir_all(gdir.join("devices")).unwrap();
            std::os::unix::fs::symlink(&gdir, dev.join("iommu_group")).unwrap();
        }
        if let Some(d) = driver {
            let ddir = root.join("drivers").join(d);
            std::fs::create_dir_all(&ddir).unwrap();
            std::os::unix::fs::symlink(&ddir, dev.join("driver")).unwrap();
        }
        root
    }

    fn err(root: &Path, name: &str) -> String {
        match VfioDevice::open_in(&root.join("devices"), &root.join("dev-vfio"), name) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened a fake device"),
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        let n = "0000:00:05.0";
        let r = fake("none", "0000:00:04.0", None, None);
        assert_eq!(
            err(&r, n),
            "0000:00:05.0: no such PCI function on this host (lspci -D lists them)"
        );
        let r = fake("nogroup", n, None, Some("virtio-pci"));
        assert!(err(&r, n).contains("has no IOMMU group: the host has no IOMMU"));
        let r = fake("bound", n, Some("7"), Some("virtio-pci"));
        let e = err(&r, n);
        assert!(
            e.contains("is bound to virtio-pci, not vfio-pci: modprobe vfio-pci; echo vfio-pci > ")
                && e.contains("driver_override"),
            "{e}"
        );
        let r = fake("unbound", n, Some("7"), None);
        assert!(err(&r, n).contains("is bound to no driver, not vfio-pci"));
        let r = fake("nodev", n, Some("7"), Some("vfio-pci"));
        assert!(err(&r, n).contains("dev-vfio/7"), "{}", err(&r, n));
        assert_eq!(sysfs_name(0, 0x3a, 0x1f, 7), "0000:3a:1f.7");
    }

    #[test]
    fn a_group_that_is_not_viable_names_its_other_functions() {
        let n = "0000:00:05.0";
        let r = fake("members", n, Some("9"), Some("vfio-pci"));
        let devices = r.join("devices");
        let group = r.join("groups").join("9");
        for (other, driver) in [("0000:00:05.1", Some("e1000e")), ("0000:00:05.2", None)] {
            std::fs::create_dir_all(devices.join(other)).unwrap();
            if let Some(d) = driver {
                let ddir = r.join("drivers").join(d);
                std::fs::create_dir_all(&ddir).unwrap();
                std::os::unix::fs::symlink(&ddir, devices.join(other).join("driver")).unwrap();
            }
        }
        for member in [n, "0000:00:05.1", "0000:00:05.2"] {
            std::os::unix::fs::symlink(devices.join(member), group.join("devices").join(member))
                .unwrap();
        }
        let link = std::fs::read_link(devices.join(n).join("iommu_group")).unwrap();
        assert_eq!(
            group_members(&devices, &link, n),
            ["0000:00:05.1 (e1000e)", "0000:00:05.2 (no driver)"]
        );
    }
}
