//! The registry of `-s` emulations (bhyve's pci_emul table): `-s slot,NAME` is a lookup here,
//! and `rhyve -s help` prints this list. Adding a device is one file plus one line below.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::hostbridge::{self, HostBridgeIds, FIRMWARE_IDENTITY};
use devices::pci::lpc::lpc_bridge;
use devices::pci::root::SharedPciDevice;
use devices::pci::InterruptSink;
use devices::virtio::block::{self, Block, BlockConfig};
use devices::virtio::net::{self, Net, NetConfig};
use devices::virtio::vsock::{self, Vsock, VsockConfig};
use devices::virtio::{IoEventRegistrar, Rng, VirtioDevice, VirtioPci};
use vmm_sys_util::eventfd::EventFd;
use vmmapi::Vm;

/// What a constructor gets: the VM (guest memory, ioeventfds, irqfds), the slot's address
/// and keys, and the function's interrupt sink (MSI-X vectors through irqfds on routed GSIs,
/// INTx on the slot's GSI).
/// (The bridges need none of it; the virtio emulations read `vm`, `opts` and `irq`.)
#[allow(dead_code)]
pub struct PciContext<'a> {
    pub vm: &'a Arc<Vm>,
    pub bus: u8,
    pub slot: u8,
    pub func: u8,
    /// Keys below `pci.B.S.F.` (e.g. `path`), without the prefix.
    pub opts: &'a BTreeMap<String, String>,
    pub irq: Arc<dyn InterruptSink>,
    /// The machine boots a ROM with fw_cfg: firmware-facing identities (the host bridge).
    pub firmware: bool,
}

/// Builds one function.
pub type Constructor = fn(&PciContext) -> anyhow::Result<SharedPciDevice>;

/// One PCI device emulation.
pub struct Emulation {
    /// The name used in `-s slot,NAME`.
    pub name: &'static str,
    /// One line for `-s help`.
    pub description: &'static str,
    /// Configuration keys the emulation reads below `pci.B.S.F.`.
    pub keys: &'static [&'static str],
    /// Creates the function.
    pub build: Constructor,
}

impl std::fmt::Debug for Emulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

const HOSTBRIDGE_KEYS: &[&str] = &["vendor", "devid", "subvendor", "subdevid"];

static HOSTBRIDGE: Emulation = Emulation {
    name: "hostbridge",
    description: "PCI host bridge (0x1275:0x1275; with a boot ROM, QEMU's i440FX 0x8086:0x1237 \
                  subsystem 0x1af4:0x1100), [vendor=N][,devid=N][,subvendor=N][,subdevid=N]",
    keys: HOSTBRIDGE_KEYS,
    build: |ctx| {
        let default = if ctx.firmware {
            FIRMWARE_IDENTITY
        } else {
            HostBridgeIds {
                vendor: 0x1275,
                device: 0x1275,
                subsystem_vendor: 0x1275,
                subsystem: 0x1275,
            }
        };
        host_bridge(ctx, default)
    },
};

static AMD_HOSTBRIDGE: Emulation = Emulation {
    name: "amd_hostbridge",
    description: "PCI host bridge with AMD's IDs (0x1022:0x7432), keys as hostbridge",
    keys: HOSTBRIDGE_KEYS,
    build: |ctx| {
        host_bridge(
            ctx,
            HostBridgeIds {
                vendor: 0x1022,
                device: 0x7432,
                subsystem_vendor: 0x1022,
                subsystem: 0x7432,
            },
        )
    },
};

/// A host bridge with `default` IDs, each replaced by its key when given (bhyve's
/// `vendor`/`devid`, plus the subsystem IDs firmware looks at).
fn host_bridge(ctx: &PciContext, default: HostBridgeIds) -> anyhow::Result<SharedPciDevice> {
    let id = |key: &str, default: u16| -> anyhow::Result<u16> {
        match ctx.opts.get(key) {
            None => Ok(default),
            Some(v) => parse_u16(v).ok_or_else(|| {
                anyhow::anyhow!("{key}={v}: expected a 16-bit number (e.g. 0x8086)")
            }),
        }
    };
    let ids = HostBridgeIds {
        vendor: id("vendor", default.vendor)?,
        device: id("devid", default.device)?,
        subsystem_vendor: id("subvendor", default.subsystem_vendor)?,
        subsystem: id("subdevid", default.subsystem)?,
    };
    Ok(Arc::new(Mutex::new(hostbridge::with_identity(ids))))
}

/// Decimal or 0x-prefixed hexadecimal.
fn parse_u16(v: &str) -> Option<u16> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

static LPC: Emulation = Emulation {
    name: "lpc",
    description: "LPC bridge carrying the legacy devices configured with -l",
    keys: &[],
    build: |_| Ok(Arc::new(Mutex::new(lpc_bridge()))),
};

/// Queue notify addresses as KVM MMIO ioeventfds.
struct VmIoEvents(Arc<Vm>);

impl IoEventRegistrar for VmIoEvents {
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .register_mmio_eventfd(fd, addr)
            .map_err(std::io::Error::other)
    }

    fn unregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .unregister_mmio_eventfd(fd, addr)
            .map_err(std::io::Error::other)
    }
}

/// `dev` behind the virtio-pci modern transport.
fn virtio_pci(ctx: &PciContext, dev: Box<dyn VirtioDevice>) -> anyhow::Result<SharedPciDevice> {
    let pci = VirtioPci::new(
        dev,
        ctx.vm.ram().memory().clone(),
        ctx.irq.clone(),
        Box::new(VmIoEvents(ctx.vm.clone())),
    )?;
    Ok(Arc::new(Mutex::new(pci)))
}

static VIRTIO_BLK: Emulation = Emulation {
    name: "virtio-blk",
    description:
        "virtio block device: PATH[,ro][,nocache][,direct][,sectorsize=L[/P]][,nodelete][,ser=ID][,bw=BYTES/s][,ops=N/s]",
    keys: block::KEYS,
    build: |ctx| {
        let cfg = BlockConfig::from_keys(ctx.opts.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        // The message already names the cause: keep the error one line, not "x: y: y".
        let dev = Block::new(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
        virtio_pci(ctx, Box::new(dev))
    },
};

static VIRTIO_RND: Emulation = Emulation {
    name: "virtio-rnd",
    description: "virtio entropy device fed from the host's getrandom(2)",
    keys: &[],
    build: |ctx| virtio_pci(ctx, Box::new(Rng::new())),
};

static VIRTIO_NET: Emulation = Emulation {
    name: "virtio-net",
    description: "virtio network device on a tap: TAP[,mac=xx:xx:xx:xx:xx:xx][,mtu=N][,tx_bw=BYTES/s][,tx_ops=N/s][,rx_bw=BYTES/s][,rx_ops=N/s] or fd=N",
    keys: net::KEYS,
    build: |ctx| {
        let cfg = NetConfig::from_keys(ctx.opts.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        let mac = net::default_mac(ctx.vm.name(), ctx.slot, ctx.func);
        let dev = Net::new(&cfg, mac).map_err(|e| anyhow::anyhow!("{e}"))?;
        log::info!(
            "virtio-net: tap {} mac {}",
            dev.tap_name(),
            dev.mac().map(|b| format!("{b:02x}")).join(":")
        );
        virtio_pci(ctx, Box::new(dev))
    },
};

static VIRTIO_VSOCK: Emulation = Emulation {
    name: "virtio-vsock",
    description: "virtio socket device, Firecracker's host side: cid=N,path=SOCKET (host programs \
                  connect to SOCKET and send CONNECT PORT; guest connections to port P go to SOCKET_P)",
    keys: vsock::KEYS,
    build: |ctx| {
        let cfg = VsockConfig::from_keys(ctx.opts.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        let dev = Vsock::new(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
        log::info!("virtio-vsock: guest cid {} on {}", cfg.cid, cfg.path.display());
        virtio_pci(ctx, Box::new(dev))
    },
};

static PASSTHRU: Emulation = Emulation {
    name: "passthru",
    description: "a host PCI function through VFIO: B/S/F or DDDD:BB:SS.F (bound to vfio-pci; \
                  guest RAM is mapped in the host IOMMU for its DMA)",
    keys: &["path"],
    build: |ctx| {
        let spec = ctx.opts.get("path").ok_or_else(|| {
            anyhow::anyhow!("passthru: give the host function (e.g. -s 4,passthru,0/5/0)")
        })?;
        let name = crate::passthru::host_function(spec)?;
        let dev = crate::passthru::Passthru::open(ctx.vm, &name, ctx.irq.clone())?;
        Ok(Arc::new(Mutex::new(dev)))
    },
};

/// Every emulation, in `-s help` order.
pub static EMULATIONS: &[&Emulation] = &[
    &HOSTBRIDGE,
    &AMD_HOSTBRIDGE,
    &LPC,
    &VIRTIO_BLK,
    &VIRTIO_NET,
    &VIRTIO_RND,
    &PASSTHRU,
    &VIRTIO_VSOCK,
];

/// Looks an emulation up by name.
pub fn find(name: &str) -> Option<&'static Emulation> {
    EMULATIONS.iter().copied().find(|e| e.name == name)
}

/// The text of `-s help`.
pub fn help() -> String {
    EMULATIONS
        .iter()
        .map(|e| format!("{:<16} {}\n", e.name, e.description))
        .collect()
}

/// LPC devices for `-l help`.
pub fn lpc_help() -> String {
    [
        (
            "com1..com4",
            "16550 UART; backend: stdio, pty, unix=PATH, tcp=IP:PORT (loopback) or a \
             device path (e.g. -l com1,stdio)",
        ),
        (
            "bootrom,ROM[,VARS]",
            "boot through firmware ROM (e.g. /usr/share/seabios/bios-256k.bin), with fw_cfg; \
             VARS: a file kept as CFI flash below the ROM (OVMF's UEFI variables)",
        ),
        (
            "fwcfg,qemu|none",
            "QEMU's fw_cfg interface (on by default with a bootrom)",
        ),
        (
            "debugcon,PATH",
            "QEMU's debug console at port 0x402 (firmware debug logs), appended to PATH",
        ),
        (
            "pc-testdev",
            "test device: a write of N to port 0xf4 exits rhyve with (N<<1)|1",
        ),
    ]
    .iter()
    .map(|(n, d)| format!("{n:<16} {d}\n"))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_lookup_and_help() {
        assert!(find("hostbridge").is_some());
        assert!(find("lpc").is_some());
        assert!(find("virtio-frob").is_none());
        assert!(help().contains("amd_hostbridge"));
        assert!(find("virtio-blk").is_some_and(|e| e.keys.contains(&"ser")));
        assert!(find("virtio-rnd").is_some());
        assert!(find("virtio-net").is_some_and(|e| e.keys.contains(&"mac")));
        let mut names: Vec<_> = EMULATIONS.iter().map(|e| e.name).collect();
        names.dedup();
        assert_eq!(names.len(), EMULATIONS.len());
    }
}
