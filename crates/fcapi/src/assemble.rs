//! Firecracker's resources as rhyve's configuration keys (bhyve_config(5)): the machine an
//! InstanceStart builds is the one `rhyve -s ... -l com1,stdio` would build, so both modes
//! share every check and device.
//!
//! The layout: the hostbridge at slot 0, the drives from slot 1 in the order they were
//! configured with the root device first (so it is /dev/vda, as Firecracker's), then the
//! network interfaces, the entropy device, the vsock device, and the LPC bridge at 31 with
//! COM1 on stdio (Firecracker's serial console).

use vmm::config::{ConfigTree, VmConfig};

use crate::model::{Drive, HugePages, RateLimiter, VmResources};

/// Firecracker's kernel command line when `boot_args` is not given (it adds `pci=off`
/// without `--enable-pci`; rhyve's devices are PCI).
pub const DEFAULT_BOOT_ARGS: &str =
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";

/// PCI slots the devices may take: 0 is the hostbridge's, 31 the LPC bridge's.
const FIRST_SLOT: u8 = 1;
const LAST_SLOT: u8 = 30;
/// The most devices (drives, interfaces, entropy, vsock) a machine can have.
pub const MAX_DEVICES: usize = (LAST_SLOT - FIRST_SLOT + 1) as usize;

/// The registry id of the drive `index` places (in [`drives_in_slot_order`]).
pub fn drive_device_id(index: usize) -> String {
    device_slot_id("virtio-blk", index)
}

/// The registry id of the `position`th device placed (drives, then interfaces).
pub fn device_slot_id(emulation: &str, position: usize) -> String {
    format!("{emulation}-0.{}.0", usize::from(FIRST_SLOT) + position)
}

/// A Firecracker rate limiter as rhyve's limits: each bucket's long-run rate.
pub fn limits(rl: &RateLimiter) -> devices::rate_limiter::RateLimits {
    devices::rate_limiter::RateLimits {
        bytes_per_sec: rl.bandwidth.as_ref().and_then(|b| b.per_second()),
        ops_per_sec: rl.ops.as_ref().and_then(|b| b.per_second()),
    }
}

/// The drives in the order they get their slots: the root device first.
pub fn drives_in_slot_order(drives: &[Drive]) -> Vec<&Drive> {
    let mut v: Vec<&Drive> = drives.iter().filter(|d| d.is_root_device).collect();
    v.extend(drives.iter().filter(|d| !d.is_root_device));
    v
}

/// The command line the kernel gets: `boot_args` (or the default) without `pci=off`, which
/// would hide rhyve's virtio devices (they are PCI functions, not MMIO), plus the root
/// device as Firecracker adds it.
pub fn kernel_cmdline(res: &VmResources) -> String {
    let given = res
        .boot_source
        .as_ref()
        .and_then(|b| b.boot_args.as_deref())
        .unwrap_or(DEFAULT_BOOT_ARGS);
    let mut words: Vec<String> = given
        .split_ascii_whitespace()
        .filter(|w| *w != "pci=off")
        .map(String::from)
        .collect();
    if let Some(root) = res.drives.iter().find(|d| d.is_root_device) {
        match &root.partuuid {
            Some(uuid) => words.push(format!("root=PARTUUID={uuid}")),
            None => words.push("root=/dev/vda".into()),
        }
        words.push(
            if root.is_read_only == Some(true) {
                "ro"
            } else {
                "rw"
            }
            .into(),
        );
    }
    words.join(" ")
}

/// A Firecracker rate limiter as rhyve's per-second limits (`bw`, `ops` keys): the
/// long-run rate of each bucket (size per refill_time).
fn rate_keys(t: &mut ConfigTree, prefix: &str, bw: &str, ops: &str, rl: &Option<RateLimiter>) {
    let Some(rl) = rl else { return };
    if let Some(rate) = rl.bandwidth.as_ref().and_then(|b| b.per_second()) {
        t.set(&format!("{prefix}.{bw}"), &rate.to_string());
    }
    if let Some(rate) = rl.ops.as_ref().and_then(|b| b.per_second()) {
        t.set(&format!("{prefix}.{ops}"), &rate.to_string());
    }
}

/// The configuration keys of the machine `res` describes, for VM `id`.
pub fn config_tree(id: &str, res: &VmResources) -> Result<ConfigTree, String> {
    let boot = res
        .boot_source
        .as_ref()
        .ok_or_else(|| "Cannot start microvm without kernel configuration.".to_string())?;
    let mc = &res.machine_config;
    let mut t = ConfigTree::default();
    t.set("name", id);
    let cpus = u32::from(mc.vcpu_count);
    t.set("cpus", &cpus.to_string());
    // One socket, as Firecracker's CPUID shows; with SMT two threads per core.
    let threads = if mc.smt && cpus.is_multiple_of(2) {
        2
    } else {
        1
    };
    t.set("sockets", "1");
    t.set("cores", &(cpus / threads).to_string());
    t.set("threads", &threads.to_string());
    t.set("memory.size", &format!("{}M", mc.mem_size_mib));
    t.set(
        "memory.hugepages",
        match mc.huge_pages {
            HugePages::None => "off",
            // Huge pages where the RAM file's filesystem offers them.
            HugePages::Transparent => "auto",
            HugePages::Hugetlbfs2M => "on",
        },
    );
    t.set("boot.kernel", &boot.kernel_image_path);
    if let Some(initrd) = &boot.initrd_path {
        t.set("boot.initrd", initrd);
    }
    t.set("boot.cmdline", &kernel_cmdline(res));
    t.set("lpc.com1.path", "stdio");
    t.set("pci.0.0.0.device", "hostbridge");
    t.set("pci.0.31.0.device", "lpc");

    let mut slots = FIRST_SLOT..=LAST_SLOT;
    let mut next_slot = || {
        slots
            .next()
            .map(|s| format!("pci.0.{s}.0"))
            .ok_or_else(|| format!("at most {MAX_DEVICES} devices fit on the PCI bus"))
    };
    for d in drives_in_slot_order(&res.drives) {
        let p = next_slot()?;
        let path = d
            .path_on_host
            .as_deref()
            .ok_or_else(|| format!("drive {}: path_on_host is missing", d.drive_id))?;
        t.set(&format!("{p}.device"), "virtio-blk");
        t.set(&format!("{p}.path"), path);
        if d.is_read_only == Some(true) {
            t.set(&format!("{p}.ro"), "true");
        }
        // The drive's id as its serial (/sys/block/vdX/serial), at most 20 bytes.
        if !d.drive_id.is_empty() && d.drive_id.len() <= 20 {
            t.set(&format!("{p}.ser"), &d.drive_id);
        }
        rate_keys(&mut t, &p, "bw", "ops", &d.rate_limiter);
    }
    for n in &res.network_interfaces {
        let p = next_slot()?;
        t.set(&format!("{p}.device"), "virtio-net");
        t.set(&format!("{p}.path"), &n.host_dev_name);
        if let Some(mac) = &n.guest_mac {
            t.set(&format!("{p}.mac"), mac);
        }
        if let Some(mtu) = n.mtu {
            t.set(&format!("{p}.mtu"), &mtu.to_string());
        }
        rate_keys(&mut t, &p, "rx_bw", "rx_ops", &n.rx_rate_limiter);
        rate_keys(&mut t, &p, "tx_bw", "tx_ops", &n.tx_rate_limiter);
    }
    if res.entropy.is_some() {
        let p = next_slot()?;
        t.set(&format!("{p}.device"), "virtio-rnd");
    }
    if let Some(v) = &res.vsock {
        let p = next_slot()?;
        t.set(&format!("{p}.device"), "virtio-vsock");
        t.set(&format!("{p}.cid"), &v.guest_cid.to_string());
        t.set(&format!("{p}.path"), &v.uds_path);
    }
    Ok(t)
}

/// The typed machine description, with Firecracker's thread names.
pub fn vm_config(id: &str, res: &VmResources) -> Result<VmConfig, String> {
    let tree = config_tree(id, res)?;
    let mut cfg = VmConfig::from_tree(&tree).map_err(|e| e.to_string())?;
    cfg.vcpu_thread_prefix = "fc_vcpu ".into();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BootSource;

    fn drive(id: &str, root: bool, ro: Option<bool>) -> Drive {
        serde_json::from_value(serde_json::json!({
            "drive_id": id, "path_on_host": format!("/{id}.img"),
            "is_root_device": root, "is_read_only": ro
        }))
        .unwrap()
    }

    fn resources() -> VmResources {
        VmResources {
            boot_source: Some(BootSource {
                kernel_image_path: "/k".into(),
                initrd_path: None,
                boot_args: Some("console=ttyS0 reboot=k panic=1 pci=off".into()),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_root_drive_is_vda_and_pci_off_goes() {
        let mut r = resources();
        r.drives = vec![
            drive("data", false, None),
            drive("rootfs", true, Some(true)),
        ];
        assert_eq!(
            kernel_cmdline(&r),
            "console=ttyS0 reboot=k panic=1 root=/dev/vda ro"
        );
        let t = config_tree("vm1", &r).unwrap();
        assert_eq!(t.get("pci.0.1.0.path"), Some("/rootfs.img"));
        assert_eq!(t.get("pci.0.1.0.ro"), Some("true"));
        assert_eq!(t.get("pci.0.2.0.path"), Some("/data.img"));
        assert_eq!(t.get("pci.0.2.0.ro"), None);
        assert_eq!(t.get("lpc.com1.path"), Some("stdio"));
    }

    #[test]
    fn a_partuuid_root_and_a_writable_one() {
        let mut r = resources();
        let mut d = drive("rootfs", true, Some(false));
        d.partuuid = Some("0eaa91a0-01".into());
        r.drives = vec![d];
        assert!(kernel_cmdline(&r).ends_with("root=PARTUUID=0eaa91a0-01 rw"));
    }

    #[test]
    fn without_boot_args_the_default_and_without_kernel_an_error() {
        let mut r = resources();
        r.boot_source.as_mut().unwrap().boot_args = None;
        assert_eq!(kernel_cmdline(&r), DEFAULT_BOOT_ARGS);
        r.boot_source = None;
        assert!(config_tree("vm", &r).is_err());
    }

    #[test]
    fn machine_config_becomes_cpus_topology_and_memory() {
        let mut r = resources();
        r.machine_config.vcpu_count = 4;
        r.machine_config.smt = true;
        r.machine_config.mem_size_mib = 1024;
        let t = config_tree("vm", &r).unwrap();
        assert_eq!(
            (t.get("cpus"), t.get("cores"), t.get("threads")),
            (Some("4"), Some("2"), Some("2"))
        );
        assert_eq!(t.get("memory.size"), Some("1024M"));
        let cfg = vm_config("vm", &r).unwrap();
        assert_eq!(cfg.cpus, 4);
        assert_eq!(cfg.memory, 1 << 30);
        assert_eq!(cfg.vcpu_thread_prefix, "fc_vcpu ");
    }

    #[test]
    fn rate_limiters_become_per_second_limits() {
        let mut r = resources();
        let mut d = drive("rootfs", true, None);
        d.rate_limiter = serde_json::from_value(serde_json::json!({
            "bandwidth": {"size": 1048576, "refill_time": 100},
            "ops": {"size": 100, "refill_time": 1000}
        }))
        .unwrap();
        r.drives = vec![d];
        let t = config_tree("vm", &r).unwrap();
        assert_eq!(t.get("pci.0.1.0.bw"), Some("10485760"));
        assert_eq!(t.get("pci.0.1.0.ops"), Some("100"));
    }

    #[test]
    fn too_many_devices_are_refused() {
        let mut r = resources();
        r.drives = (0..=MAX_DEVICES)
            .map(|i| drive(&format!("d{i}"), false, None))
            .collect();
        assert!(config_tree("vm", &r).unwrap_err().contains("at most"));
    }
}
