//! Per-vCPU CPUID, derived from KVM_GET_SUPPORTED_CPUID, with the `-c` topology
//! (sockets × cores × threads) encoded consistently in every topology leaf.
//!
//! APIC IDs are packed x2APIC-style: `socket << (core_bits + thread_bits) | core << thread_bits
//! | thread`, where `thread_bits = ceil(log2 threads)` and `core_bits = ceil(log2 cores)`. vCPU
//! index `i` (0-based, the order of `-p` and the `vcpu N` threads) is thread `i % T` of core
//! `(i / T) % C` of socket `i / (C·T)`. The same IDs go to the MADT and are the KVM vCPU ids
//! (the in-kernel LAPIC takes its ID from the vCPU id).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const HYPERVISOR_BIT: u32 = 1 << 31; // leaf 1 ECX
const HTT_BIT: u32 = 1 << 28; // leaf 1 EDX
const CMP_LEGACY_BIT: u32 = 1 << 1; // leaf 0x8000_0001 ECX
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";

/// Number of bits needed to give `n` logical processors distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The `-c` topology: `sockets × cores × threads` vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Packages.
    pub sockets: u32,
    /// Cores per package.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

impl Topology {
    /// bhyve's default for `-c N`: N sockets of one single-threaded core each.
    pub fn flat(nr_vcpus: u32) -> Self {
        Topology {
            sockets: nr_vcpus.max(1),
            cores: 1,
            threads: 1,
        }
    }

    /// Total vCPUs.
    pub fn nr_vcpus(&self) -> u32 {
        self.sockets * self.cores * self.threads
    }

    /// Logical processors per package.
    pub fn per_package(&self) -> u32 {
        self.cores * self.threads
    }

    /// Width of the SMT (thread) field of an APIC ID.
    pub fn thread_bits(&self) -> u32 {
        id_bits(self.threads)
    }

    /// Width of the core field of an APIC ID.
    pub fn core_bits(&self) -> u32 {
        id_bits(self.cores)
    }

    /// (socket, core, thread) of vCPU `index`.
    pub fn position(&self, index: u32) -> (u32, u32, u32) {
        let t = self.threads.max(1);
        let c = self.cores.max(1);
        (index / (c * t), (index / t) % c, index % t)
    }

    /// The (x2)APIC ID of vCPU `index`.
    pub fn apic_id(&self, index: u32) -> u32 {
        let (s, c, t) = self.position(index);
        (s << (self.core_bits() + self.thread_bits())) | (c << self.thread_bits()) | t
    }

    /// APIC IDs of all vCPUs, in vCPU order.
    pub fn apic_ids(&self) -> Vec<u32> {
        (0..self.nr_vcpus()).map(|i| self.apic_id(i)).collect()
    }
}

/// Leaf 0xB/0x1F subleaf `index`: (EAX shift to the next level, EBX logical processors at
/// this level, ECX level number | type << 8, EDX x2APIC ID). Level 0 is SMT, 1 is core.
fn extended_topology(topo: &Topology, apic_id: u32, index: u32) -> (u32, u32, u32, u32) {
    let (tbits, cbits) = (topo.thread_bits(), topo.core_bits());
    match index {
        0 => (tbits, topo.threads, 1 << 8, apic_id),
        1 => (tbits + cbits, topo.per_package(), (2 << 8) | 1, apic_id),
        n => (0, 0, n & 0xff, apic_id),
    }
}

/// Adjusts the supported CPUID for vCPU `index` of the topology `topo`.
pub(crate) fn for_vcpu(supported: &CpuId, index: u32, topo: &Topology) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = topo.apic_id(index);
    let (socket, core, _) = topo.position(index);
    let per_pkg = topo.per_package();
    let (tbits, cbits) = (topo.thread_bits(), topo.core_bits());
    let mut has_signature = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_00ff) | (8 << 8) // CLFLUSH line: 8 quadwords
                    | ((per_pkg.min(255)) << 16)
                    | ((apic_id & 0xff) << 24);
                e.ecx |= HYPERVISOR_BIT;
                if per_pkg > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: level 3 is shared by the package, the
                // others by the threads of one core.
                e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
                if e.eax & 0x1f != 0 {
                    let level = (e.eax >> 5) & 0x7;
                    let sharing = if level >= 3 { per_pkg } else { topo.threads };
                    e.eax = (e.eax & 0x3fff)
                        | ((sharing.clamp(1, 4096) - 1) << 14)
                        | ((topo.cores.clamp(1, 64) - 1) << 26);
                } else {
                    e.eax = 0;
                }
            }
            0xb | 0x1f => {
                e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
                (e.eax, e.ebx, e.ecx, e.edx) = extended_topology(topo, apic_id, e.index);
            }
            0x8000_0001 => {
                if per_pkg > 1 {
                    e.ecx |= CMP_LEGACY_BIT;
                } else {
                    e.ecx &= !CMP_LEGACY_BIT;
                }
            }
            0x8000_0008 => {
                // NC = logical processors per package − 1; ApicIdCoreIdSize = core+thread bits.
                e.ecx = (e.ecx & !0xf0ff)
                    | ((per_pkg.clamp(1, 256) - 1) & 0xff)
                    | ((tbits + cbits) << 12);
            }
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | ((topo.threads.clamp(1, 256) - 1) << 8) | (core & 0xff);
                e.ecx = (e.ecx & !0x7ff) | (socket & 0xff); // one node per package
            }
            0x4000_0000 => has_signature = true,
            _ => {}
        }
    }
    // KVM may list fewer subleaves of 0xB/0x1F than the SMT and core levels plus the
    // terminating one: add the missing ones (0x1F only where the host has it).
    let max_basic = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    for function in [0xb, 0x1f] {
        let present = |c: &CpuId, i: u32| {
            c.as_slice()
                .iter()
                .any(|e| e.function == function && e.index == i)
        };
        if max_basic < function || (function == 0x1f && !present(&cpuid, 0)) {
            continue;
        }
        for index in 0..3 {
            if !present(&cpuid, index) {
                let (eax, ebx, ecx, edx) = extended_topology(topo, apic_id, index);
                let _ = cpuid.push(kvm_cpuid_entry2 {
                    function,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    eax,
                    ebx,
                    ecx,
                    edx,
                    ..Default::default()
                });
            }
        }
    }
    if !has_signature {
        let sig = KVM_SIGNATURE;
        let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
        let _ = cpuid.push(kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ebx: word(0),
            ecx: word(4),
            edx: word(8),
            ..Default::default()
        });
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn leaf(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn supported() -> CpuId {
        let mut l4_1 = entry(4, 0);
        l4_1.eax = 0x21; // L1 data
        let mut l4_3 = entry(4, 1);
        l4_3.eax = 0x63; // L3 unified
        CpuId::from_entries(&[
            entry(1, 0),
            l4_1,
            l4_3,
            entry(4, 2),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x1f, 0),
            entry(0x1f, 1),
            entry(0x1f, 2),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap()
    }

    #[test]
    fn flat_topology_is_one_cpu_per_socket() {
        let t = Topology::flat(4);
        assert_eq!(t.apic_ids(), vec![0, 1, 2, 3]);
        let c = for_vcpu(&supported(), 3, &t);
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
        assert_eq!(l1.edx & HTT_BIT, 0);
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        let (smt, core) = (leaf(&c, 0xb, 0), leaf(&c, 0xb, 1));
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (0, 1, 0x201, 3));
        assert_eq!(leaf(&c, 0x8000_0001, 0).ecx & CMP_LEGACY_BIT, 0);
        assert_eq!(leaf(&c, 0x8000_0008, 0).ecx & 0xff, 0);
        let sig = c
            .as_slice()
            .iter()
            .find(|e| e.function == 0x4000_0000)
            .unwrap();
        assert_eq!(&sig.ebx.to_le_bytes(), b"KVMK");
    }

    #[test]
    fn packing_uses_rounded_up_widths() {
        let t = Topology {
            sockets: 2,
            cores: 2,
            threads: 1,
        };
        assert_eq!(t.apic_ids(), vec![0, 1, 2, 3]);
        let t = Topology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        assert_eq!((t.thread_bits(), t.core_bits()), (1, 2));
        // socket 0: cores 0..3 × threads 0..2, then socket 1 at bit 3.
        assert_eq!(t.apic_ids(), vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!(t.position(7), (1, 0, 1));
        let t = Topology {
            sockets: 1,
            cores: 1,
            threads: 4,
        };
        assert_eq!(t.apic_ids(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn leaves_describe_sockets_cores_threads() {
        let t = Topology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        let c = for_vcpu(&supported(), 7, &t); // socket 1, core 0, thread 1: APIC id 9
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 9);
        assert_eq!((l1.ebx >> 16) & 0xff, 6);
        assert_eq!((l1.ebx >> 8) & 0xff, 8);
        assert_ne!(l1.edx & HTT_BIT, 0);
        for f in [0xb, 0x1f] {
            let (smt, core, end) = (leaf(&c, f, 0), leaf(&c, f, 1), leaf(&c, f, 2));
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (1, 2, 0x100, 9));
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 9));
            assert_eq!((end.eax, end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 0, 9));
        }
        let (l1d, l3) = (leaf(&c, 4, 0), leaf(&c, 4, 1));
        assert_eq!(l1d.eax >> 26, 2);
        assert_eq!((l1d.eax >> 14) & 0xfff, 1);
        assert_eq!(l3.eax >> 26, 2);
        assert_eq!((l3.eax >> 14) & 0xfff, 5);
        assert_eq!(l3.eax & 0x3fff, 0x63);
        assert_eq!(leaf(&c, 4, 2).eax, 0);
        assert_ne!(leaf(&c, 0x8000_0001, 0).ecx & CMP_LEGACY_BIT, 0);
        let nc = leaf(&c, 0x8000_0008, 0).ecx;
        assert_eq!((nc & 0xff, (nc >> 12) & 0xf), (5, 3));
        let ext = leaf(&c, 0x8000_001e, 0);
        assert_eq!(ext.eax, 9);
        assert_eq!((ext.ebx & 0xff, (ext.ebx >> 8) & 0xff), (0, 1));
        assert_eq!(ext.ecx & 0x7ff, 1);
    }

    #[test]
    fn missing_subleaves_are_added() {
        let mut l0 = entry(0, 0);
        l0.eax = 0xd;
        let c = for_vcpu(
            &CpuId::from_entries(&[l0, entry(1, 0), entry(0xb, 0)]).unwrap(),
            1,
            &Topology {
                sockets: 1,
                cores: 2,
                threads: 1,
            },
        );
        let core = leaf(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
        assert_eq!(leaf(&c, 0xb, 2).ecx & 0xff00, 0);
        assert!(c.as_slice().iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(8), 3);
        assert_eq!(id_bits(9), 4);
    }
}
