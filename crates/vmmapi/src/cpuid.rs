//! Per-vCPU CPUID, derived from KVM_GET_SUPPORTED_CPUID.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const HYPERVISOR_BIT: u32 = 1 << 31; // leaf 1 ECX
const HTT_BIT: u32 = 1 << 28; // leaf 1 EDX
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";

/// Number of bits needed to give `n` logical processors distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts the supported CPUID for vCPU `id` of `nr_vcpus` (one socket, one thread per core;
/// the full `-c` topology arrives with the ACPI/SMP work).
pub(crate) fn for_vcpu(supported: &CpuId, id: u32, nr_vcpus: u32) -> CpuId {
    let mut cpuid = supported.clone();
    let mut has_signature = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((nr_vcpus.min(255)) << 16);
                e.ebx = (e.ebx & !0xff00) | (8 << 8); // CLFLUSH line: 8 quadwords
                e.ecx |= HYPERVISOR_BIT;
                if nr_vcpus > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            0xb | 0x1f => {
                e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // level type SMT
                    }
                    1 => {
                        e.eax = id_bits(nr_vcpus);
                        e.ebx = nr_vcpus;
                        e.ecx = (2 << 8) | 1; // level type core
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
                e.edx = id;
            }
            0x4000_0000 => has_signature = true,
            _ => {}
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

    #[test]
    fn topology_and_signature() {
        let supported = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        let c = for_vcpu(&supported, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_ne!(s[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(s[2].ebx, 4);
        assert_eq!(s[2].eax, 2);
        assert_eq!(s[1].edx, 3);
        let sig = s.iter().find(|e| e.function == 0x4000_0000).unwrap();
        assert_eq!(&sig.ebx.to_le_bytes(), b"KVMK");
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
