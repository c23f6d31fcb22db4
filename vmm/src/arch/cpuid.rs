//! CPUID for our vCPUs: what KVM supports on this host, with the per-vCPU
//! topology fields filled in.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// CPUID.1:ECX bit 31: "running under a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;

/// The host's supported CPUID (KVM_GET_SUPPORTED_CPUID), unfiltered.
pub fn supported(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// Filters `base` for vCPU `index` of `count`:
/// - leaf 1: initial APIC ID = index (the guest reads its index from here),
///   logical-processor count, HTT, hypervisor bit;
/// - leaves 0xB and 0x1F: x2APIC ID = index.
///
/// PVM overrides parts of CPUID itself; the guest must not assume more than
/// this function sets.
pub fn for_vcpu(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}
