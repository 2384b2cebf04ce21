//! The configuration tree (bhyve_config(5)): dotted keys filled by `-o`, `-k` and every
//! other option, validated against the keys rhyve knows, then read into a typed [`VmConfig`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::emulations;

/// A configuration error, already phrased for the user (names the key or argument).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Keys that take a value from a fixed set of flags/options. `*` matches one path segment.
const KNOWN_KEYS: &[&str] = &[
    "name",
    "cpus",
    "sockets",
    "cores",
    "threads",
    "memory.size",
    "memory.wired",
    "memory.hugepages",
    "memory.guest_in_core",
    "acpi_tables",
    "destroy_on_poweroff",
    "uuid",
    "rtc.use_localtime",
    "power.grace",
    "virtio_msix",
    "x86.x2apic",
    "x86.strictio",
    "x86.strictmsr",
    "x86.vmexit_on_hlt",
    "x86.vmexit_on_pause",
    "x86.mptable",
    "lpc.com1.path",
    "lpc.com2.path",
    "lpc.com3.path",
    "lpc.com4.path",
    "lpc.pc-testdev",
    "lpc.bootrom",
    "lpc.bootvars",
    "lpc.fwcfg",
    "lpc.debugcon.path",
    "fwcfg.*",
    "boot.kernel",
    "boot.initrd",
    "restore.file",
    "restore.state",
    "boot.cmdline",
    "vcpu.*.cpuset",
    "pci.*.*.*.device",
    // Any function: an expansion ROM image, and its place in fw_cfg's bootorder.
    "pci.*.*.*.rom",
    "pci.*.*.*.bootindex",
    "sandbox.seccomp",
    "sandbox.user",
    "sandbox.chroot",
];

fn matches(pattern: &str, key: &str) -> bool {
    let (p, k): (Vec<_>, Vec<_>) = (pattern.split('.').collect(), key.split('.').collect());
    p.len() == k.len() && p.iter().zip(&k).all(|(p, k)| *p == "*" || p == k)
}

/// The raw key/value tree.
#[derive(Debug, Default, Clone)]
pub struct ConfigTree {
    values: BTreeMap<String, String>,
}

impl ConfigTree {
    /// Sets `key` (later settings override earlier ones, as in bhyve).
    pub fn set(&mut self, key: &str, value: &str) {
        self.values.insert(key.to_string(), value.to_string());
    }

    /// Looks a key up.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Parses `key=value` (from `-o` or a config file line).
    pub fn set_assignment(&mut self, what: &str, assignment: &str) -> Result<(), ConfigError> {
        match assignment.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                self.set(k.trim(), v.trim());
                Ok(())
            }
            _ => err(format!("{what} {assignment:?}: expected key=value")),
        }
    }

    /// Reads a bhyve_config(5)-style file: `key=value` lines, `#` comments.
    pub fn load_file(&mut self, path: &str) -> Result<(), ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError(format!("-k {path}: {e}")))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.set_assignment(&format!("-k {path}, line {}:", n + 1), line)?;
        }
        Ok(())
    }

    /// Refuses keys rhyve does not know, so typos are not silently ignored.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for key in self.values.keys() {
            if KNOWN_KEYS.iter().any(|p| matches(p, key)) {
                continue;
            }
            // Device keys: pci.B.S.F.<key> must be a key of the device in that slot.
            let parts: Vec<&str> = key.split('.').collect();
            if let ["pci", b, s, f, rest @ ..] = parts.as_slice() {
                let dev_key = format!("pci.{b}.{s}.{f}.device");
                if let Some(emu) = self.get(&dev_key).and_then(emulations::find) {
                    if emu.keys.contains(&rest.join(".").as_str()) {
                        continue;
                    }
                    return err(format!(
                        "unknown configuration key '{key}' ({} takes: {})",
                        emu.name,
                        describe(emu.keys)
                    ));
                }
            }
            return err(format!("unknown configuration key '{key}'"));
        }
        Ok(())
    }

    /// All keys below `prefix.`.
    pub fn children(&self, prefix: &str) -> impl Iterator<Item = (&str, &str)> {
        let p = format!("{prefix}.");
        self.values
            .iter()
            .filter(move |(k, _)| k.starts_with(&p))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

fn describe(keys: &[&str]) -> String {
    if keys.is_empty() {
        "no options".to_string()
    } else {
        keys.join(", ")
    }
}

/// Parses a boolean the way bhyve_config(5) does.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => err(format!("{key}={v}: expected true or false")),
    }
}

/// Parses `-m` sizes: a number with an optional K/M/G/T suffix; no suffix means MiB.
pub fn parse_size(v: &str) -> Result<u64, ConfigError> {
    crate::memsize::parse(v)
        .ok_or_else(|| ConfigError(format!("-m {v}: invalid memory size (use e.g. 512M, 2G)")))
}

/// Smallest and largest RAM rhyve accepts.
pub const MIN_MEMORY: u64 = crate::memsize::MIN;
pub const MAX_MEMORY: u64 = crate::memsize::MAX;

/// A console backend for a COM port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// The terminal rhyve runs in.
    Stdio,
    /// A host device or file opened read/write (bhyve: a tty path).
    Path(PathBuf),
    /// A new pty pair; its path is printed and written to the runtime dir (`pty`).
    Pty,
    /// A unix stream socket rhyve listens on, one client at a time (`unix=PATH`).
    Unix(PathBuf),
    /// A TCP socket rhyve listens on, loopback only (bhyve's `tcp=IP:PORT`).
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for ConsoleBackend {
    /// The backend as written after `-l comN,`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleBackend::Stdio => write!(f, "stdio"),
            ConsoleBackend::Path(p) => write!(f, "{}", p.display()),
            ConsoleBackend::Pty => write!(f, "pty"),
            ConsoleBackend::Unix(p) => write!(f, "unix={}", p.display()),
            ConsoleBackend::Tcp(a) => write!(f, "tcp={a}"),
        }
    }
}

impl ConsoleBackend {
    /// Parses the value of `lpc.comN.path` for port `n` (1..=4).
    pub fn parse(n: usize, v: &str) -> Result<Self, ConfigError> {
        let arg = format!("-l com{n},{v}");
        Ok(match v {
            "stdio" => ConsoleBackend::Stdio,
            "pty" => ConsoleBackend::Pty,
            "" => return err(format!("lpc.com{n}.path: empty backend")),
            p if p.starts_with('/') => ConsoleBackend::Path(PathBuf::from(p)),
            _ => {
                if let Some(p) = v.strip_prefix("unix=") {
                    if p.is_empty() {
                        return err(format!("{arg}: expected unix=PATH"));
                    }
                    ConsoleBackend::Unix(PathBuf::from(p))
                } else if let Some(a) = v.strip_prefix("tcp=") {
                    let addr: std::net::SocketAddr = a.parse().map_err(|_| {
                        ConfigError(format!(
                            "{arg}: expected tcp=IP:PORT (e.g. tcp=127.0.0.1:4321)"
                        ))
                    })?;
                    if !addr.ip().is_loopback() {
                        return err(format!(
                            "{arg}: only loopback addresses are allowed (127.0.0.0/8, ::1)"
                        ));
                    }
                    ConsoleBackend::Tcp(addr)
                } else {
                    return err(format!(
                        "{arg}: unsupported backend (use stdio, pty, unix=PATH, tcp=IP:PORT \
                         or a device path)"
                    ));
                }
            }
        })
    }
}

/// The typed machine description every later stage reads.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    pub cpus: u32,
    /// `-c` sockets/cores/threads (product = `cpus`): the CPUID leaves and APIC IDs.
    pub topology: vmmapi::Topology,
    pub memory: u64,
    /// `-S`: allocate and lock all guest RAM before the guest runs.
    pub wired: bool,
    /// `memory.hugepages=auto|on|off`: 2 MiB pages for guest RAM.
    pub huge_pages: vmmapi::HugePages,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// (port name, index 0..4, backend)
    pub com: Vec<(usize, ConsoleBackend)>,
    pub pc_testdev: bool,
    pub strict_io: bool,
    pub destroy_on_poweroff: bool,
    pub acpi: bool,
    /// Write an MP table (bhyve's default; -Y turns it off).
    pub mptable: bool,
    /// RTC in local time (bhyve's default); -u makes it UTC.
    pub rtc_localtime: bool,
    /// After the power-button press of a first SIGTERM, force the power-off this much
    /// later (`power.grace=SECONDS`; None: wait for the guest or a second SIGTERM).
    pub power_grace: Option<std::time::Duration>,
    /// vCPU → host CPUs.
    pub pins: Vec<(u32, Vec<usize>)>,
    /// The `-s` slots, in (bus, slot, function) order.
    pub pci: Vec<PciSlot>,
    /// `-l bootrom,ROM`: boot through firmware instead of a kernel.
    pub bootrom: Option<PathBuf>,
    /// `-r FILE`: restore the snapshot FILE (+ FILE.kern, or `restore.state`) instead of
    /// booting.
    pub restore: Option<crate::snapshot::SnapshotFiles>,
    /// A restore waits paused for a resume (Firecracker's `resume_vm: false`).
    pub restore_paused: bool,
    /// `-l bootrom,ROM,VARSFILE`: the firmware's variable store, a CFI flash right below
    /// the ROM, kept in this file.
    pub bootvars: Option<PathBuf>,
    /// QEMU's fw_cfg on ports 0x510–0x51b (`lpc.fwcfg=qemu`, the default with a boot ROM).
    pub fw_cfg: bool,
    /// `-f name,string=...|file=...`: extra fw_cfg files, in command-line order.
    pub fw_cfg_files: Vec<(String, FwCfgSource)>,
    /// `-U`: the system UUID (fw_cfg; zero when not given).
    pub uuid: [u8; 16],
    /// `-l debugcon,PATH`: QEMU's debug console at port 0x402 (firmware debug logs), appended
    /// to PATH.
    pub debugcon: Option<PathBuf>,
    /// `sandbox.seccomp=on|log|off`: seccomp filters per thread kind (see sandbox.rs).
    pub seccomp: crate::sandbox::SeccompMode,
    /// `sandbox.user=UID:GID`: the identity rhyve runs as once everything is open.
    pub user: Option<(u32, u32)>,
    /// `sandbox.chroot=DIR`: the root rhyve runs in once everything is open.
    pub chroot: Option<PathBuf>,
    /// vCPU N's thread is called this plus N (`vcpu `; Firecracker's API mode: `fc_vcpu `,
    /// which Kata Containers looks for).
    pub vcpu_thread_prefix: String,
}

fn path_json(p: &Option<PathBuf>) -> serde_json::Value {
    p.as_ref()
        .map_or(serde_json::Value::Null, |p| p.display().to_string().into())
}

impl VmConfig {
    /// The resources as JSON: what `rhyvectl` shows and a snapshot records (the restore
    /// names disks and taps again and is checked against it). Every device has its id.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let t = &self.topology;
        let pci: Vec<_> = self
            .pci
            .iter()
            .map(|p| {
                json!({
                    "id": p.id,
                    "address": format!("{}:{}:{}", p.bus, p.slot, p.func),
                    "emulation": p.emulation.name,
                    "options": p.opts,
                    "rom": path_json(&p.rom),
                    "bootindex": p.bootindex,
                })
            })
            .collect();
        let com: Vec<_> = self
            .com
            .iter()
            .map(|(i, b)| json!({ "id": format!("com{}", i + 1), "backend": b.to_string() }))
            .collect();
        let uuid: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        json!({
            "name": self.name,
            "cpus": { "count": self.cpus, "sockets": t.sockets, "cores": t.cores,
                      "threads": t.threads },
            "pins": self.pins,
            "memory": { "size": self.memory, "wired": self.wired,
                        "hugepages": format!("{:?}", self.huge_pages).to_lowercase() },
            "boot": {
                "kernel": path_json(&self.kernel),
                "initrd": path_json(&self.initrd),
                "cmdline": self.cmdline,
                "bootrom": path_json(&self.bootrom),
                "bootvars": path_json(&self.bootvars),
                "restore": self.restore.as_ref().map_or(serde_json::Value::Null, |r| {
                    json!({ "memory": r.memory.display().to_string(),
                            "state": r.state.display().to_string() })
                }),
            },
            "pci": pci,
            "com": com,
            "fw_cfg": { "enabled": self.fw_cfg,
                        "files": self.fw_cfg_files.iter().map(|(n, _)| n).collect::<Vec<_>>() },
            "pc_testdev": self.pc_testdev,
            "debugcon": path_json(&self.debugcon),
            "uuid": uuid,
            "acpi": self.acpi,
            "mptable": self.mptable,
            "rtc_localtime": self.rtc_localtime,
            "strict_io": self.strict_io,
            "destroy_on_poweroff": self.destroy_on_poweroff,
            "power_grace_ms": self.power_grace.map(|d| d.as_millis() as u64),
            "seccomp": self.seccomp.as_str(),
            "user": self.user.map(|(u, g)| format!("{u}:{g}")),
            "chroot": path_json(&self.chroot),
        })
    }
}

/// Where a `-f` file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FwCfgSource {
    String(String),
    File(PathBuf),
}

/// Largest boot ROM: 16 MiB under 4 GiB, as bhyve allows.
pub const MAX_BOOTROM: u64 = 16 << 20;

/// `-f name,string=data` or `-f name,file=path` (bhyve(8)).
pub fn parse_fw_cfg_file(v: &str) -> Result<(String, FwCfgSource), ConfigError> {
    let bad = || {
        ConfigError(format!(
            "-f {v}: expected name,string=data or name,file=path"
        ))
    };
    let (name, rest) = v.split_once(',').ok_or_else(bad)?;
    if name.is_empty() || name.len() > devices::fw_cfg::MAX_NAME_LEN {
        return err(format!(
            "-f {v}: the name must be 1 to {} bytes",
            devices::fw_cfg::MAX_NAME_LEN
        ));
    }
    let source = match rest.split_once('=') {
        Some(("string", data)) => FwCfgSource::String(data.to_string()),
        Some(("file", path)) if !path.is_empty() => FwCfgSource::File(PathBuf::from(path)),
        _ => return Err(bad()),
    };
    Ok((name.to_string(), source))
}

/// `-U`: 8-4-4-4-12 hexadecimal digits.
fn parse_uuid(v: &str) -> Result<[u8; 16], ConfigError> {
    let hex: String = v.chars().filter(|c| *c != '-').collect();
    let groups: Vec<usize> = v.split('-').map(str::len).collect();
    if groups != [8, 4, 4, 4, 12] || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return err(format!(
            "-U {v}: expected a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
        ));
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| ConfigError(format!("-U {v}: expected a UUID")))?;
    }
    Ok(out)
}

/// One `-s` slot: its address, emulation and the device's own keys.
#[derive(Debug, Clone)]
pub struct PciSlot {
    /// The device's id in the machine (the registry, stats, snapshots):
    /// `EMULATION-B.S.F`, e.g. `virtio-blk-0.2.0`.
    pub id: String,
    pub bus: u8,
    pub slot: u8,
    pub func: u8,
    pub emulation: &'static emulations::Emulation,
    /// Keys below `pci.B.S.F.` other than `device`, `rom` and `bootindex` (e.g. `path`,
    /// `ro`), prefix removed.
    pub opts: BTreeMap<String, String>,
    /// `rom=PATH`: the function's expansion ROM (e.g. iPXE's pxe-virtio.rom).
    pub rom: Option<PathBuf>,
    /// `bootindex=N`: the function's place in fw_cfg's `bootorder` (lowest first).
    pub bootindex: Option<u32>,
}

/// Two virtio-net functions on one inherited descriptor would both own it (split frames,
/// a double close): refused, naming the second slot.
fn refuse_shared_tap_fds(pci: &[PciSlot]) -> Result<(), ConfigError> {
    let mut seen: Vec<(i64, &PciSlot)> = Vec::new();
    for p in pci.iter().filter(|p| p.emulation.name == "virtio-net") {
        // A bad number is the device's to report.
        let Some(fd) = p.opts.get("fd").and_then(|v| v.trim().parse::<i64>().ok()) else {
            continue;
        };
        if let Some((_, first)) = seen.iter().find(|(f, _)| *f == fd) {
            return err(format!(
                "-s {}:{}:{},virtio-net: fd={fd} is already used by -s {}:{}:{}",
                p.bus, p.slot, p.func, first.bus, first.slot, first.func
            ));
        }
        seen.push((fd, p));
    }
    Ok(())
}

impl VmConfig {
    /// Validates the tree and extracts the typed config.
    pub fn from_tree(t: &ConfigTree) -> Result<Self, ConfigError> {
        t.validate()?;
        let name = t
            .get("name")
            .ok_or_else(|| ConfigError("missing VM name (the last argument)".into()))?;
        if !vmmapi::valid_vm_name(name) {
            return err(format!(
                "invalid VM name {name:?}: use letters, digits, '-', '_', '.'"
            ));
        }
        let num =
            |key: &str, default: u32| -> Result<u32, ConfigError> {
                match t.get(key) {
                    None => Ok(default),
                    Some(v) => v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        ConfigError(format!("{key}={v}: expected a positive number"))
                    }),
                }
            };
        let (sockets, cores, threads) = (num("sockets", 1)?, num("cores", 1)?, num("threads", 1)?);
        let topology_given = ["sockets", "cores", "threads"]
            .iter()
            .any(|k| t.get(k).is_some());
        // As bhyve: a topology without `cpus` implies cpus = sockets*cores*threads.
        let cpus = match (t.get("cpus"), topology_given) {
            (None, true) => sockets
                .checked_mul(cores)
                .and_then(|n| n.checked_mul(threads))
                .unwrap_or(u32::MAX),
            _ => num("cpus", 1)?,
        };
        if topology_given
            && sockets
                .checked_mul(cores)
                .and_then(|n| n.checked_mul(threads))
                != Some(cpus)
        {
            return err(format!(
                "-c: cpus={cpus} must equal sockets*cores*threads ({sockets}*{cores}*{threads})"
            ));
        }
        if cpus > 255 {
            return err(format!("-c {cpus}: at most 255 vCPUs"));
        }
        // bhyve's default for a bare `-c N`: N sockets of one single-threaded core.
        let topology = if topology_given {
            vmmapi::Topology {
                sockets,
                cores,
                threads,
            }
        } else {
            vmmapi::Topology::flat(cpus)
        };
        // The MADT and MP table carry 8-bit APIC IDs, and the I/O APIC takes the next one.
        let max_apic_id = topology.apic_id(cpus - 1);
        if max_apic_id >= loader::acpi::MAX_CPUS {
            return err(format!(
                "-c: sockets={sockets},cores={cores},threads={threads} needs APIC ID {max_apic_id} \
                 (at most {} with 8-bit APIC IDs)",
                loader::acpi::MAX_CPUS - 1
            ));
        }
        let memory = match t.get("memory.size") {
            None => 256 << 20,
            Some(v) => parse_size(v)?,
        };
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&memory) {
            return err(format!(
                "-m: memory size {memory} bytes is outside {}..{}",
                crate::memsize::show(MIN_MEMORY),
                crate::memsize::show(MAX_MEMORY)
            ));
        }
        let huge_pages = match t.get("memory.hugepages") {
            None => vmmapi::HugePages::default(),
            Some(v) => vmmapi::HugePages::parse(v).ok_or_else(|| {
                ConfigError(format!("memory.hugepages={v}: expected auto, on or off"))
            })?,
        };
        let flag = |key: &str, default: bool| {
            t.get(key)
                .map(|v| parse_bool(key, v))
                .unwrap_or(Ok(default))
        };
        let mut com = Vec::new();
        for i in 0..4 {
            let key = format!("lpc.com{}.path", i + 1);
            if let Some(v) = t.get(&key) {
                let backend = ConsoleBackend::parse(i + 1, v)?;
                com.push((i, backend));
            }
        }
        if com
            .iter()
            .filter(|(_, b)| *b == ConsoleBackend::Stdio)
            .count()
            > 1
        {
            return err("-l: only one COM port can use stdio");
        }
        let power_grace = match t.get("power.grace") {
            None => None,
            Some(v) => Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
                    .map(std::time::Duration::from_secs_f64)
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "power.grace={v}: expected a positive number of seconds"
                        ))
                    })?,
            ),
        };
        let mut pins = Vec::new();
        for (k, v) in t.children("vcpu") {
            let vcpu: u32 = k
                .split('.')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ConfigError(format!("{k}: bad vCPU number")))?;
            if vcpu >= cpus {
                return err(format!(
                    "-p {vcpu}:{v}: vCPU {vcpu} does not exist (-c {cpus})"
                ));
            }
            let host: Vec<usize> = v
                .split(',')
                .map(|c| c.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|_| ConfigError(format!("{k}={v}: bad host CPU list")))?;
            pins.push((vcpu, host));
        }
        let mut pci = Vec::new();
        for (k, v) in t.children("pci") {
            let parts: Vec<&str> = k.split('.').collect();
            if let ["pci", b, s, f, "device"] = parts.as_slice() {
                let emu = emulations::find(v).ok_or_else(|| {
                    ConfigError(format!(
                        "-s {s}: unknown emulation '{v}' (rhyve -s help lists them)"
                    ))
                })?;
                let n = |x: &str| {
                    x.parse::<u8>()
                        .map_err(|_| ConfigError(format!("{k}: bad PCI address")))
                };
                let prefix = format!("pci.{b}.{s}.{f}");
                let opts = t
                    .children(&prefix)
                    .filter_map(|(k, v)| {
                        let rest = k.strip_prefix(&prefix)?.strip_prefix('.')?;
                        (!["device", "rom", "bootindex"].contains(&rest))
                            .then(|| (rest.to_string(), v.to_string()))
                    })
                    .collect();
                let bootindex = match t.get(&format!("{prefix}.bootindex")) {
                    None => None,
                    Some(v) => Some(v.parse::<u32>().map_err(|_| {
                        ConfigError(format!(
                            "-s {s},{emu}: bootindex={v}: expected a number",
                            emu = emu.name
                        ))
                    })?),
                };
                let (bus, slot, func) = (n(b)?, n(s)?, n(f)?);
                pci.push(PciSlot {
                    id: format!("{}-{bus}.{slot}.{func}", emu.name),
                    bus,
                    slot,
                    func,
                    emulation: emu,
                    opts,
                    rom: t.get(&format!("{prefix}.rom")).map(PathBuf::from),
                    bootindex,
                });
            }
        }
        pci.sort_by_key(|p| (p.bus, p.slot, p.func));
        refuse_shared_tap_fds(&pci)?;
        let bootrom = t.get("lpc.bootrom").map(PathBuf::from);
        let bootvars = t.get("lpc.bootvars").map(PathBuf::from);
        if bootvars.is_some() && bootrom.is_none() {
            return err("lpc.bootvars: a VARSFILE needs a boot ROM (-l bootrom,ROM,VARSFILE)");
        }
        let restore = t.get("restore.file").map(|f| {
            let mut files = crate::snapshot::SnapshotFiles::bhyve(std::path::Path::new(f));
            if let Some(state) = t.get("restore.state") {
                files.state = state.into();
            }
            files
        });
        if let Some(files) = &restore {
            let file = &files.memory;
            let refuse = |what: &str| {
                err(format!(
                    "-r {}: {what} cannot be given with a restore (the guest is in the snapshot)",
                    file.display()
                ))
            };
            if t.get("boot.kernel").is_some() {
                return refuse("--kernel");
            }
            if bootrom.is_some() {
                return refuse("-l bootrom");
            }
        }
        if bootrom.is_some() && t.get("boot.kernel").is_some() {
            return err(
                "-l bootrom and --kernel exclude each other: boot through firmware or a kernel",
            );
        }
        let fw_cfg = match t.get("lpc.fwcfg") {
            None => bootrom.is_some(),
            Some("qemu") => true,
            Some("none") => false,
            Some(v) => return err(format!("lpc.fwcfg={v}: expected qemu or none")),
        };
        let mut fw_cfg_files = Vec::new();
        for (_, v) in t.children("fwcfg") {
            let (name, source) = parse_fw_cfg_file(v)?;
            if fw_cfg_files.iter().any(|(n, _)| *n == name) {
                return err(format!("-f {v}: fw_cfg file {name} is given twice"));
            }
            fw_cfg_files.push((name, source));
        }
        if !fw_cfg_files.is_empty() && !fw_cfg {
            return err("-f: fw_cfg files need fw_cfg (-l bootrom,ROM or -o lpc.fwcfg=qemu)");
        }
        let seccomp = match t.get("sandbox.seccomp") {
            None => crate::sandbox::SeccompMode::default(),
            Some(v) => crate::sandbox::SeccompMode::parse(v).ok_or_else(|| {
                ConfigError(format!("sandbox.seccomp={v}: expected on, log or off"))
            })?,
        };
        let user = match t.get("sandbox.user") {
            None => None,
            Some(v) => Some(parse_user(v)?),
        };
        let chroot = match t.get("sandbox.chroot") {
            None => None,
            Some(v) => {
                let dir = PathBuf::from(v);
                if !dir.is_absolute() || !dir.is_dir() {
                    return err(format!(
                        "sandbox.chroot={v}: expected an absolute path to a directory"
                    ));
                }
                Some(dir)
            }
        };
        let uuid = match t.get("uuid") {
            None => [0; 16],
            Some(v) => parse_uuid(v)?,
        };
        Ok(Self {
            name: name.to_string(),
            cpus,
            topology,
            memory,
            kernel: t.get("boot.kernel").map(PathBuf::from),
            restore,
            restore_paused: false,
            initrd: t.get("boot.initrd").map(PathBuf::from),
            cmdline: t.get("boot.cmdline").unwrap_or("").to_string(),
            com,
            wired: flag("memory.wired", false)?,
            huge_pages,
            pc_testdev: flag("lpc.pc-testdev", false)?,
            strict_io: flag("x86.strictio", false)?,
            destroy_on_poweroff: flag("destroy_on_poweroff", false)?,
            acpi: flag("acpi_tables", false)?,
            mptable: flag("x86.mptable", true)?,
            rtc_localtime: flag("rtc.use_localtime", true)?,
            power_grace,
            pins,
            pci,
            bootrom,
            bootvars,
            fw_cfg,
            fw_cfg_files,
            uuid,
            debugcon: t.get("lpc.debugcon.path").map(PathBuf::from),
            seccomp,
            user,
            chroot,
            vcpu_thread_prefix: "vcpu ".into(),
        })
    }
}

/// `UID:GID`, numeric (as Firecracker's jailer takes them).
fn parse_user(v: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError(format!("sandbox.user={v}: expected UID:GID (numbers)"));
    let (u, g) = v.split_once(':').ok_or_else(bad)?;
    let (u, g): (u32, u32) = (u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?);
    // 0 would keep root's rights; -1 means "unchanged" to setresuid.
    if u == 0 || g == 0 || u == u32::MAX || g == u32::MAX {
        return err(format!(
            "sandbox.user={v}: the user and group must be neither root (0) nor -1"
        ));
    }
    Ok((u, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512 << 20);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1024k").unwrap(), 1 << 20);
        for bad in ["", "M", "12Q", "-1G", "0", "99999999999999T", "1.5G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let mut t = ConfigTree::default();
        t.set("name", "vm0");
        t.set("memory.size", "64M");
        assert!(t.validate().is_ok());
        t.set("memory.sise", "1");
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("memory.sise"), "{e}");
    }

    #[test]
    fn device_keys_follow_the_emulation() {
        let mut t = ConfigTree::default();
        t.set("name", "vm0");
        t.set("pci.0.0.0.device", "hostbridge");
        assert!(t.validate().is_ok());
        t.set("pci.0.0.0.path", "x");
        assert!(t.validate().unwrap_err().to_string().contains("hostbridge"));
    }

    #[test]
    fn resources_as_json_with_device_ids() {
        let mut t = ConfigTree::default();
        t.set("name", "vm0");
        t.set("memory.size", "512M");
        t.set("pci.0.0.0.device", "hostbridge");
        t.set("pci.0.2.0.device", "virtio-blk");
        t.set("pci.0.2.0.path", "/tmp/disk.img");
        t.set("pci.0.2.0.ro", "true");
        t.set("lpc.com1.path", "stdio");
        let c = VmConfig::from_tree(&t).unwrap();
        let j = c.to_json();
        assert_eq!(j["name"], "vm0");
        assert_eq!(j["memory"]["size"], 512u64 << 20);
        assert_eq!(j["pci"][0]["id"], "hostbridge-0.0.0");
        assert_eq!(j["pci"][1]["id"], "virtio-blk-0.2.0");
        assert_eq!(j["pci"][1]["address"], "0:2:0");
        assert_eq!(j["pci"][1]["options"]["path"], "/tmp/disk.img");
        assert_eq!(j["com"][0]["id"], "com1");
        assert_eq!(j["com"][0]["backend"], "stdio");
        assert_eq!(j["boot"]["kernel"], serde_json::Value::Null);
        // The same resources give the same JSON (what a restore compares).
        assert_eq!(VmConfig::from_tree(&t).unwrap().to_json(), j);
    }

    #[test]
    fn pci_slots_in_address_order() {
        let mut t = ConfigTree::default();
        t.set("name", "vm0");
        t.set("pci.0.31.0.device", "lpc");
        t.set("pci.0.4.0.device", "amd_hostbridge");
        t.set("pci.0.0.0.device", "hostbridge");
        let c = VmConfig::from_tree(&t).unwrap();
        let got: Vec<_> = c
            .pci
            .iter()
            .map(|p| (p.slot, p.emulation.name, p.opts.len()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "hostbridge", 0),
                (4, "amd_hostbridge", 0),
                (31, "lpc", 0)
            ]
        );
    }

    #[test]
    fn one_tap_descriptor_per_virtio_net() {
        let mut t = ConfigTree::default();
        t.set("name", "vm0");
        t.set("pci.0.3.0.device", "virtio-net");
        t.set("pci.0.3.0.fd", "3");
        t.set("pci.0.4.0.device", "virtio-net");
        t.set("pci.0.4.0.fd", "4");
        t.set("pci.0.5.0.device", "virtio-net");
        t.set("pci.0.5.0.path", "tap0");
        assert!(VmConfig::from_tree(&t).is_ok());
        t.set("pci.0.4.0.fd", "03");
        let e = VmConfig::from_tree(&t).unwrap_err().to_string();
        assert_eq!(e, "-s 0:4:0,virtio-net: fd=3 is already used by -s 0:3:0");
    }

    #[test]
    fn power_grace_in_seconds() {
        let mut t = ConfigTree::default();
        t.set("name", "vm0");
        assert_eq!(VmConfig::from_tree(&t).unwrap().power_grace, None);
        t.set("power.grace", "2.5");
        assert_eq!(
            VmConfig::from_tree(&t).unwrap().power_grace,
            Some(std::time::Duration::from_millis(2500))
        );
        for bad in ["0", "-1", "x", "inf", ""] {
            t.set("power.grace", bad);
            assert!(VmConfig::from_tree(&t).is_err(), "{bad}");
        }
    }

    #[test]
    fn topology_defaults_and_apic_ids() {
        let mut t = ConfigTree::default();
        t.set("name", "vm0");
        t.set("cpus", "4");
        let c = VmConfig::from_tree(&t).unwrap();
        assert_eq!(c.topology, vmmapi::Topology::flat(4));
        assert_eq!(c.topology.apic_ids(), vec![0, 1, 2, 3]);
        t.set("sockets", "2");
        t.set("cores", "2");
        let c = VmConfig::from_tree(&t).unwrap();
        assert_eq!(
            (c.topology.sockets, c.topology.cores, c.topology.threads),
            (2, 2, 1)
        );
        // Without cpus, the topology sets the count (bhyve).
        let mut t = ConfigTree::default();
        t.set("name", "vm0");
        t.set("sockets", "2");
        t.set("cores", "3");
        t.set("threads", "2");
        let c = VmConfig::from_tree(&t).unwrap();
        assert_eq!(c.cpus, 12);
        assert_eq!(c.topology.apic_id(11), 13);
        // APIC IDs must fit the 8-bit MADT/MP table entries.
        t.set("sockets", "64");
        t.set("cores", "3");
        t.set("threads", "1");
        assert!(VmConfig::from_tree(&t).is_err());
    }

    #[test]
    fn topology_must_multiply_out() {
        let mut t = ConfigTree::default();
        t.set("name", "vm0");
        t.set("cpus", "4");
        t.set("sockets", "2");
        t.set("cores", "2");
        assert_eq!(VmConfig::from_tree(&t).unwrap().cpus, 4);
        t.set("cores", "3");
        assert!(VmConfig::from_tree(&t).is_err());
    }

    #[test]
    fn console_backends() {
        use std::net::SocketAddr;
        let p = |v| ConsoleBackend::parse(2, v);
        assert_eq!(p("stdio").unwrap(), ConsoleBackend::Stdio);
        assert_eq!(p("pty").unwrap(), ConsoleBackend::Pty);
        assert_eq!(
            p("/dev/ttyS1").unwrap(),
            ConsoleBackend::Path("/dev/ttyS1".into())
        );
        assert_eq!(
            p("unix=/tmp/c.sock").unwrap(),
            ConsoleBackend::Unix("/tmp/c.sock".into())
        );
        let a: SocketAddr = "127.0.0.1:4321".parse().unwrap();
        assert_eq!(p("tcp=127.0.0.1:4321").unwrap(), ConsoleBackend::Tcp(a));
        assert!(p("tcp=[::1]:4321").is_ok());
        assert_eq!(
            p("tcp=127.0.0.1:4321").unwrap().to_string(),
            "tcp=127.0.0.1:4321"
        );
        assert_eq!(p("unix=/x").unwrap().to_string(), "unix=/x");
        for (bad, msg) in [
            ("tcp=8.8.8.8:1", "-l com2,tcp=8.8.8.8:1: only loopback"),
            ("tcp=0.0.0.0:1", "only loopback"),
            ("tcp=localhost:1", "expected tcp=IP:PORT"),
            ("tcp=127.0.0.1", "expected tcp=IP:PORT"),
            ("unix=", "expected unix=PATH"),
            ("nmdm0A", "unsupported backend"),
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
