//! CPUID for our vCPUs: KVM's supported list, per-vCPU topology, and the
//! timing leaf 0x40000010 (TSC and LAPIC bus frequency in kHz).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::error::{kvm, Error, Result};

/// Leaf with TSC kHz in EAX and LAPIC bus kHz in EBX (the VMware convention).
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's LAPIC timer runs on a 1 GHz bus.
pub const APIC_BUS_KHZ: u32 = 1_000_000;

/// KVM's supported CPUID entries for this host.
pub fn supported(kvm_fd: &Kvm) -> Result<Vec<kvm_cpuid_entry2>> {
    Ok(kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?
        .as_slice()
        .to_vec())
}

/// KVM's supported CPUID entries, opening /dev/kvm for the purpose.
pub fn host_supported() -> Result<Vec<kvm_cpuid_entry2>> {
    supported(&Kvm::new().map_err(Error::KvmUnavailable)?)
}

/// The CPUID of vCPU `id` of `count`, with `tsc_khz` in the timing leaf.
pub fn for_vcpu(
    base: &[kvm_cpuid_entry2],
    id: usize,
    count: usize,
    tsc_khz: u32,
) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<kvm_cpuid_entry2> = base.to_vec();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                                  // No VMX: the nested state it needs is not migrated (a
                                  // guest kernel turns VMX on as it loads kvm_intel, and would
                                  // fault on its next VMX instruction after a migration).
                e.ecx &= !(1 << 5);
            }
            // No SVM, for the same reason.
            0x8000_0001 => e.ecx &= !(1 << 2),
            0xb | 0x1f => e.edx = id as u32,
            0x4000_0000 => e.eax = e.eax.max(TIMING_LEAF),
            _ => {}
        }
    }
    entries.retain(|e| e.function != TIMING_LEAF);
    if tsc_khz != 0 {
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: tsc_khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        });
    }
    entries
}

/// Wraps entries for KVM_SET_CPUID2.
pub fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId> {
    CpuId::from_entries(entries)
        .map_err(|e| Error::State(format!("{} CPUID entries: {e:?}", entries.len())))
}

/// The TSC frequency (kHz) a CPUID list announces, if any.
pub fn tsc_khz_of(entries: &[kvm_cpuid_entry2]) -> Option<u32> {
    entries
        .iter()
        .find(|e| e.function == TIMING_LEAF)
        .map(|e| e.eax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_and_timing_leaf() {
        let base = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ];
        let c = for_vcpu(&base, 3, 4, 2_000_000);
        assert_eq!(c[0].ebx >> 24, 3);
        // VMX and SVM hidden: their nested state is not migrated.
        let mut virt = base.clone();
        virt[0].ecx = 1 << 5;
        virt.push(kvm_cpuid_entry2 {
            function: 0x8000_0001,
            ecx: (1 << 2) | 1,
            ..Default::default()
        });
        let c2 = for_vcpu(&virt, 0, 1, 0);
        assert_eq!(c2[0].ecx, 1 << 31);
        assert_eq!(c2[2].ecx, 1);
        assert_eq!((c[0].ebx >> 16) & 0xff, 4);
        assert_eq!(c[0].ebx & 0xffff, 0x0800);
        assert_eq!(c[1].eax, TIMING_LEAF);
        assert_eq!(tsc_khz_of(&c), Some(2_000_000));
    }
}
