//! Model-specific registers: the boot values we set, and the list we save.
//!
//! KVM_GET_MSR_INDEX_LIST names every MSR KVM can save. On this host (PVM)
//! KVM_SET_MSRS refuses some of them (e.g. 0x4b564d06, MSR_KVM_POLL_CONTROL)
//! and, like KVM everywhere, stops at the first refusal and returns how many
//! it set. [`set_all`] therefore skips the refused entry and carries on, and
//! reports what it skipped instead of failing the whole restore.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSRs that must be written after the others: the TSC deadline is
/// relative to the TSC, so restoring it before MSR_IA32_TSC would arm the
/// timer against the wrong clock (the same rule as Firecracker's
/// `DEFERRED_MSRS`).
const DEFERRED: &[u32] = &[MSR_IA32_TSC_DEADLINE];

/// Values every vCPU gets at boot: syscall MSRs cleared, fast strings on,
/// MTRRs default write-back.
pub fn boot_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// The MSRs to save: KVM's index list, deferred ones moved to the end.
pub fn save_list(kvm: &Kvm) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let list = kvm.get_msr_index_list()?;
    let (mut first, last): (Vec<u32>, Vec<u32>) = list
        .as_slice()
        .iter()
        .copied()
        .partition(|i| !DEFERRED.contains(i));
    first.extend(last);
    Ok(first)
}

/// Reads `indices`; MSRs KVM refuses to read are skipped and returned as the
/// second value.
pub fn get_all(
    vcpu: &VcpuFd,
    indices: &[u32],
) -> Result<(Vec<kvm_msr_entry>, Vec<u32>), kvm_ioctls::Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<_> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("chunk fits KVM_MAX_MSR_ENTRIES");
        let n = vcpu.get_msrs(&mut msrs)?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            skipped.push(chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok((out, skipped))
}

/// Writes `entries` in order; refused MSRs are skipped and returned.
pub fn set_all(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let mut skipped = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let msrs = Msrs::from_entries(chunk).expect("chunk fits KVM_MAX_MSR_ENTRIES");
        let n = vcpu.set_msrs(&msrs)?;
        if n < chunk.len() {
            skipped.push(chunk[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(skipped)
}
