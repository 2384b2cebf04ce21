//! Snapshots, as bhyve names them: `rhyvectl --vm=NAME --checkpoint=FILE` writes FILE, the
//! guest RAM laid out as the RAM file (zero pages are holes), and FILE.kern, the rest: vCPUs,
//! the VM's in-kernel devices, rhyve's devices and what the machine was built from. `rhyve -r
//! FILE [the same -c -m -s -l options] NAME` builds the same machine, checks it against
//! FILE.kern, maps FILE privately as RAM and puts the state back.
//!
//! FILE.kern: `RHYVSNAP`, the format version (u32), flags (u32, 0), the payload's length
//! (u64) and CRC-64/XZ (u64), then the payload ([`platform::codec`]): named sections, each a
//! length-prefixed byte string. A file of another version, with a bad checksum, truncated or
//! with bytes after the payload is refused before anything of it is used.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use devices::lifecycle::Lifecycle;
use platform::codec::{DecodeError, Reader, Writer};
use vmmapi::{Vm, VmState};

use crate::registry::DeviceRegistry;
use crate::vcpu_ctl::VcpuCtl;

/// The first bytes of FILE.kern.
pub const MAGIC: &[u8; 8] = b"RHYVSNAP";
/// The version this rhyve writes and reads; bump it on any change of a section's encoding.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
/// How long saving one vCPU (on its own thread) may take.
const VCPU_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the state of the snapshot FILE is kept: FILE.kern (bhyve's name).
pub fn state_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_os_string();
    s.push(".kern");
    PathBuf::from(s)
}

/// A snapshot's two files: guest RAM and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    pub memory: PathBuf,
    pub state: PathBuf,
}

impl SnapshotFiles {
    /// bhyve's naming: FILE and FILE.kern.
    pub fn bhyve(file: &Path) -> Self {
        Self {
            memory: file.to_path_buf(),
            state: state_path(file),
        }
    }
}

/// A snapshot's sections, by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    sections: Vec<(String, Vec<u8>)>,
}

impl Snapshot {
    pub fn add(&mut self, name: impl Into<String>, data: Vec<u8>) {
        self.sections.push((name.into(), data));
    }

    /// Section `name`; a snapshot without it is refused.
    pub fn section(&self, name: &str) -> Result<&[u8]> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_slice())
            .ok_or_else(|| anyhow!("the snapshot has no {name} section"))
    }

    /// Replaces section `name` (tools and tests that edit a snapshot).
    pub fn replace(&mut self, name: &str, data: Vec<u8>) -> Result<()> {
        let s = self
            .sections
            .iter_mut()
            .find(|(n, _)| n == name)
            .ok_or_else(|| anyhow!("the snapshot has no {name} section"))?;
        s.1 = data;
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sections.iter().map(|(n, _)| n.as_str())
    }

    /// The whole FILE.kern.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(self.sections.len() as u32);
        for (name, data) in &self.sections {
            w.str(name).bytes(data);
        }
        let payload = w.finish();
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&CRC64.checksum(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses FILE.kern; every refusal is one line.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!(
                "truncated: {} bytes, shorter than the header",
                bytes.len()
            ));
        }
        let (header, payload) = bytes.split_at(HEADER_LEN);
        let u32_at =
            |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
        let u64_at = |o: usize| (u64::from(u32_at(o + 4)) << 32) | u64::from(u32_at(o));
        if &header[..8] != MAGIC {
            return Err("not a rhyve snapshot".into());
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "snapshot format version {version}; this rhyve reads version {FORMAT_VERSION}"
            ));
        }
        if u32_at(12) != 0 {
            return Err(format!("unknown flags {:#x}", u32_at(12)));
        }
        let len = u64_at(16);
        if len != payload.len() as u64 {
            return Err(if len > payload.len() as u64 {
                format!("truncated: {} of {len} bytes", payload.len())
            } else {
                format!(
                    "{} bytes after the snapshot's end",
                    payload.len() as u64 - len
                )
            });
        }
        if CRC64.checksum(payload) != u64_at(24) {
            return Err("checksum mismatch: the file is corrupt".into());
        }
        let mut r = Reader::new(payload);
        let n = r.count(8, "sections").map_err(|e| e.to_string())?;
        let mut sections = Vec::with_capacity(n);
        for _ in 0..n {
            let name = r.str("section name").map_err(|e| e.to_string())?;
            let data = r.bytes("section").map_err(|e| e.to_string())?;
            sections.push((name.to_string(), data.to_vec()));
        }
        r.finish().map_err(|e| e.to_string())?;
        Ok(Self { sections })
    }

    /// Reads and checks a state file (FILE.kern).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
        Self::decode(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
    }
}

/// What the machine was built from, as far as a restore must match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineInfo {
    /// The rhyve that wrote it (information only).
    pub writer: String,
    pub cpus: u32,
    /// Guest RAM regions (guest physical address, length), in the image's order.
    pub regions: Vec<(u64, u64)>,
    /// The PCI functions: `B:D:F emulation`.
    pub pci: Vec<String>,
    /// The devices outside PCI that have state (`com1`, `rtc`, ...).
    pub legacy: Vec<String>,
    /// vCPU 0's CPUID: (function, index, eax, ebx, ecx, edx) per leaf.
    pub cpuid: Vec<[u32; 6]>,
}

impl MachineInfo {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.str(&self.writer).u32(self.cpus);
        w.u32(self.regions.len() as u32);
        for (gpa, len) in &self.regions {
            w.u64(*gpa).u64(*len);
        }
        for list in [&self.pci, &self.legacy] {
            w.u32(list.len() as u32);
            for s in list {
                w.str(s);
            }
        }
        w.u32(self.cpuid.len() as u32);
        for leaf in &self.cpuid {
            for v in leaf {
                w.u32(*v);
            }
        }
        w.finish()
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let writer = r.str("writer")?.to_string();
        let cpus = r.u32("cpus")?;
        let n = r.count(16, "regions")?;
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            regions.push((r.u64("region address")?, r.u64("region length")?));
        }
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = r.count(4, "devices")?;
            for _ in 0..n {
                list.push(r.str("device")?.to_string());
            }
        }
        let n = r.count(24, "CPUID leaves")?;
        let mut cpuid = Vec::with_capacity(n);
        for _ in 0..n {
            let mut leaf = [0u32; 6];
            for v in &mut leaf {
                *v = r.u32("CPUID")?;
            }
            cpuid.push(leaf);
        }
        r.finish()?;
        let [pci, legacy] = lists;
        Ok(Self {
            writer,
            cpus,
            regions,
            pci,
            legacy,
            cpuid,
        })
    }

    /// Why a snapshot of `saved` cannot be restored into this machine (None: it can).
    pub fn mismatch(&self, saved: &MachineInfo) -> Option<String> {
        if saved.cpus != self.cpus {
            return Some(format!(
                "-c {}: the snapshot has {} vCPUs",
                self.cpus, saved.cpus
            ));
        }
        if let Some(why) = memory_mismatch(&self.regions, &saved.regions) {
            return Some(why);
        }
        if saved.pci != self.pci {
            return Some(format!(
                "-s: the snapshot's PCI devices are [{}], these options give [{}]",
                saved.pci.join(", "),
                self.pci.join(", ")
            ));
        }
        if saved.legacy != self.legacy {
            return Some(format!(
                "-l: the snapshot's LPC devices are [{}], these options give [{}]",
                saved.legacy.join(", "),
                self.legacy.join(", ")
            ));
        }
        if saved.cpuid != self.cpuid {
            let names = ["eax", "ebx", "ecx", "edx"];
            let detail = saved
                .cpuid
                .iter()
                .find_map(|s| {
                    let here = self.cpuid.iter().find(|h| h[..2] == s[..2]);
                    let Some(here) = here else {
                        return Some(format!("leaf {:#x}.{:#x} is missing here", s[0], s[1]));
                    };
                    (2..6).find(|&i| s[i] != here[i]).map(|i| {
                        format!(
                            "leaf {:#x}.{:#x} {} is {:#x} here, {:#x} in the snapshot",
                            s[0],
                            s[1],
                            names[i - 2],
                            here[i],
                            s[i]
                        )
                    })
                })
                .unwrap_or_else(|| "this CPU has other leaves".into());
            return Some(format!(
                "the snapshot was taken on a CPU with other features: CPUID {detail}"
            ));
        }
        None
    }
}

/// Why RAM laid out as `here` cannot take a snapshot of `saved`'s (None: it can).
fn memory_mismatch(here: &[(u64, u64)], saved: &[(u64, u64)]) -> Option<String> {
    if here == saved {
        return None;
    }
    let size = |r: &[(u64, u64)]| crate::memsize::show(r.iter().map(|r| r.1).sum());
    Some(format!(
        "-m {}: the snapshot has {} of memory",
        size(here),
        size(saved)
    ))
}

/// A device outside PCI whose state a snapshot holds.
pub type SavedDevice = (String, Arc<Mutex<dyn Lifecycle + Send>>);

/// What a checkpoint reads beyond the vCPUs and the PCI registry (kept with the controller).
pub struct SnapshotParts {
    pub vm: Arc<Vm>,
    pub machine: MachineInfo,
    pub legacy: Vec<SavedDevice>,
}

/// What a checkpoint wrote, and how long it took.
#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub memory_bytes: u64,
    pub state_bytes: u64,
    pub duration: Duration,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes the snapshot `files` of a paused machine, with `extra` sections (what a caller
/// needs to rebuild the machine, e.g. Firecracker's resources). Both files are written to
/// temporary names and renamed at the end: a failure leaves no half snapshot, and a VM
/// restored from an earlier image (which maps it) never sees it change under it.
pub fn checkpoint(
    parts: &SnapshotParts,
    vcpus: &[Arc<VcpuCtl>],
    registry: &DeviceRegistry,
    files: &SnapshotFiles,
    extra: Vec<(String, Vec<u8>)>,
) -> Result<CheckpointReport> {
    let started = Instant::now();
    let mut snap = Snapshot::default();
    snap.add("machine", parts.machine.encode());
    for (name, data) in extra {
        snap.add(name, data);
    }
    // The vCPUs' and the VM's KVM state, read on the vCPU threads (they own the KVM calls).
    let indices: Arc<[u32]> = parts.vm.msr_indices().into();
    for ctl in vcpus {
        let indices = indices.clone();
        let state = ctl
            .run_on(move |v| v.save_state(&indices), VCPU_TIMEOUT)
            .map_err(|e| anyhow!("{e}"))??;
        snap.add(format!("vcpu.{}", ctl.id()), state.encode());
    }
    let vm = parts.vm.clone();
    let first = vcpus.first().ok_or_else(|| anyhow!("the VM has no vCPU"))?;
    let vm_state: VmState = first
        .run_on(move |_| vm.save_state(), VCPU_TIMEOUT)
        .map_err(|e| anyhow!("{e}"))??;
    snap.add("vm", vm_state.encode());
    for (name, dev) in &parts.legacy {
        let state = lock(dev).save_state().map_err(|e| anyhow!("{name}: {e}"))?;
        snap.add(format!("dev.{name}"), state);
    }
    for ((b, d, f), state) in registry.save_all().map_err(|e| anyhow!("{e}"))? {
        snap.add(format!("pci.{b}:{d}:{f}"), state);
    }
    let state = snap.encode();

    let (file, kern) = (&files.memory, &files.state);
    let tmp = |p: &Path| {
        let mut s = p.as_os_str().to_os_string();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let (mem_tmp, kern_tmp) = (tmp(file), tmp(kern));
    let write = || -> Result<u64> {
        let mem = create(&mem_tmp)?;
        let memory_bytes = parts
            .vm
            .ram()
            .write_image(&mem)
            .with_context(|| mem_tmp.display().to_string())?;
        mem.sync_all()
            .with_context(|| mem_tmp.display().to_string())?;
        let mut k = create(&kern_tmp)?;
        k.write_all(&state)
            .and_then(|_| k.sync_all())
            .with_context(|| kern_tmp.display().to_string())?;
        std::fs::rename(&mem_tmp, file).with_context(|| file.display().to_string())?;
        std::fs::rename(&kern_tmp, kern).with_context(|| kern.display().to_string())?;
        Ok(memory_bytes)
    };
    match write() {
        Ok(memory_bytes) => {
            let report = CheckpointReport {
                memory_bytes,
                state_bytes: state.len() as u64,
                duration: started.elapsed(),
            };
            log::info!(
                "snapshot {} + {}: {} MiB of memory data, {} KiB of state, in {:.1} ms",
                file.display(),
                kern.display(),
                report.memory_bytes >> 20,
                report.state_bytes >> 10,
                report.duration.as_secs_f64() * 1e3
            );
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&mem_tmp);
            let _ = std::fs::remove_file(&kern_tmp);
            Err(e)
        }
    }
}

fn create(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// A snapshot being restored: its state read and checked, its memory image open.
pub struct Restore {
    /// The memory image (what `-r` names).
    pub file: PathBuf,
    state: PathBuf,
    pub snapshot: Snapshot,
    pub machine: MachineInfo,
    pub image: File,
}

impl Restore {
    /// Reads the state file and opens the image; a refusal names the file and is one line.
    pub fn open(files: &SnapshotFiles) -> Result<Self> {
        let snapshot = Snapshot::read(&files.state)?;
        let machine = MachineInfo::decode(
            snapshot
                .section("machine")
                .map_err(|e| anyhow!("{}: {e}", files.state.display()))?,
        )
        .map_err(|e| anyhow!("{}: machine: {e}", files.state.display()))?;
        let image = File::open(&files.memory)
            .with_context(|| format!("cannot open {}", files.memory.display()))?;
        Ok(Self {
            file: files.memory.clone(),
            state: files.state.clone(),
            snapshot,
            machine,
            image,
        })
    }

    /// Section `name`, decoded by `decode`; errors name the file and the section.
    pub fn decode<T, E: std::fmt::Display>(
        &self,
        name: &str,
        decode: impl FnOnce(&[u8]) -> std::result::Result<T, E>,
    ) -> Result<T> {
        let kern = &self.state;
        let bytes = self
            .snapshot
            .section(name)
            .map_err(|e| anyhow!("{}: {e}", kern.display()))?;
        decode(bytes).map_err(|e| anyhow!("{}: {name}: {e}", kern.display()))
    }

    /// Refuses guest RAM laid out as `regions` when the snapshot's is another (checked before
    /// the image is mapped).
    pub fn check_memory(&self, regions: &[(u64, u64)]) -> Result<()> {
        match memory_mismatch(regions, &self.machine.regions) {
            Some(why) => bail!("-r {}: {why}", self.file.display()),
            None => Ok(()),
        }
    }

    /// Refuses a machine the snapshot does not fit.
    pub fn check(&self, here: &MachineInfo) -> Result<()> {
        match here.mismatch(&self.machine) {
            Some(why) => bail!("-r {}: {why}", self.file.display()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineInfo {
        MachineInfo {
            writer: "rhyve test".into(),
            cpus: 2,
            regions: vec![(0, 64 << 20)],
            pci: vec!["0:0:0 hostbridge".into(), "0:2:0 virtio-blk".into()],
            legacy: vec!["com1".into(), "rtc".into()],
            cpuid: vec![[0, 0, 0xd, 1, 2, 3], [7, 0, 0, 0x1234, 0, 0]],
        }
    }

    #[test]
    fn a_snapshot_round_trips_and_damage_is_refused() {
        let mut s = Snapshot::default();
        s.add("machine", machine().encode());
        s.add("vcpu.0", vec![1, 2, 3]);
        let bytes = s.encode();
        let back = Snapshot::decode(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            MachineInfo::decode(back.section("machine").unwrap()).unwrap(),
            machine()
        );
        assert!(back.section("vm").is_err());

        let mut corrupt = bytes.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        assert_eq!(
            Snapshot::decode(&corrupt).unwrap_err(),
            "checksum mismatch: the file is corrupt"
        );
        assert!(Snapshot::decode(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .starts_with("truncated"));
        assert!(Snapshot::decode(&bytes[..10])
            .unwrap_err()
            .starts_with("truncated"));
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            Snapshot::decode(&longer).unwrap_err(),
            "1 bytes after the snapshot's end"
        );
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert_eq!(
            Snapshot::decode(&v2).unwrap_err(),
            "snapshot format version 2; this rhyve reads version 1"
        );
        assert_eq!(
            Snapshot::decode(b"ELF\0 is not a snapshot, not at all").unwrap_err(),
            "not a rhyve snapshot"
        );
        // A consistent checksum over a payload whose count lies is still refused.
        let mut w = Writer::new();
        w.u32(u32::MAX);
        let payload = w.finish();
        let mut lying = bytes[..16].to_vec();
        lying.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        lying.extend_from_slice(&CRC64.checksum(&payload).to_le_bytes());
        lying.extend_from_slice(&payload);
        assert!(Snapshot::decode(&lying).is_err());
    }

    #[test]
    fn machines_that_differ_are_named() {
        let m = machine();
        assert_eq!(m.mismatch(&m), None);
        let mut other = m.clone();
        other.cpus = 1;
        assert_eq!(
            m.mismatch(&other).unwrap(),
            "-c 2: the snapshot has 1 vCPUs"
        );
        let mut other = m.clone();
        other.regions = vec![(0, 128 << 20)];
        assert_eq!(
            m.mismatch(&other).unwrap(),
            "-m 64M: the snapshot has 128M of memory"
        );
        let mut other = m.clone();
        other.pci.pop();
        assert_eq!(
            m.mismatch(&other).unwrap(),
            "-s: the snapshot's PCI devices are [0:0:0 hostbridge], these options give [0:0:0 hostbridge, 0:2:0 virtio-blk]"
        );
        let mut other = m.clone();
        other.cpuid[1][3] = 0x1000;
        assert_eq!(
            m.mismatch(&other).unwrap(),
            "the snapshot was taken on a CPU with other features: CPUID leaf 0x7.0x0 ebx is 0x1234 here, 0x1000 in the snapshot"
        );
    }
}
