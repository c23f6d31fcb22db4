//! x86_64 specifics: CPUID, MSRs, the entry state of a vCPU, and the PVH
//! start-info block. The *guest* sets up long mode itself; the VMM only
//! recreates the PVH entry state (32-bit protected mode, paging off).

pub mod boot;
pub mod cpuid;
pub mod first_touch;
pub mod msr;
