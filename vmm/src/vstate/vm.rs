//! The KVM VM: memory slots (with switchable dirty logging), the in-kernel
//! irqchip (PIC, IOAPIC, LAPICs) and PIT, and their save/restore.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};

use super::memory::{or_bits_at, GuestRam};
use guest_images::abi::PAGE_SIZE;

/// Where KVM puts the three pages it needs for real-mode TSS emulation; inside
/// the MMIO hole, as Firecracker does.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors of VM set-up and VM-level state.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a capability this VMM needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed")]
    Tss(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed")]
    SetRegion {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Reading VM state ({what}) failed")]
    GetState {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Restoring VM state ({what}) failed")]
    SetState {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The capabilities we rely on, checked once at start-up so a missing one is
/// named instead of failing later with an obscure errno.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::GetTscKhz, "KVM_CAP_GET_TSC_KHZ"),
];

/// Opens `/dev/kvm` and checks every capability this VMM uses.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// VM-level state that lives in KVM rather than in guest memory.
///
/// Restore order matters: the PIT before the clock (its channels are timed
/// from the clock), and the irqchip last, so that no interrupt is injected
/// from a half-restored source (Firecracker restores in the same order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A KVM VM with its guest RAM registered.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    ram: GuestRam,
    dirty_logging: AtomicBool,
}

impl Vm {
    /// Creates the VM, its irqchip and PIT, and registers `ram`.
    ///
    /// The irqchip must exist before any vCPU is created: KVM gives each vCPU
    /// an in-kernel LAPIC only if the irqchip is already there.
    pub fn new(kvm: &Kvm, ram: GuestRam) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(VmError::Tss)?;
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        let vm = Self {
            fd,
            ram,
            dirty_logging: AtomicBool::new(false),
        };
        vm.register_slots(false)?;
        Ok(vm)
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn register_slots(&self, log_dirty: bool) -> Result<(), VmError> {
        for r in self.ram.regions() {
            let region = kvm_userspace_memory_region {
                slot: r.slot,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: self.ram.host_address(r) as u64,
            };
            // SAFETY: the host range [userspace_addr, +memory_size) is a live
            // mapping owned by `self.ram`, which lives as long as the VM fd
            // (both are fields of `self`), so KVM never sees a dangling range.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| {
                VmError::SetRegion {
                    slot: r.slot,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Switches KVM dirty logging on or off for every slot; allowed while
    /// vCPUs run (KVM write-protects the slot's pages when it turns on, so
    /// the first write to each page after that traps and is logged).
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        self.register_slots(on)?;
        self.dirty_logging.store(on, Ordering::SeqCst);
        // A fresh start: forget what the VMM wrote before logging began.
        if on {
            self.ram.take_vmm_dirty();
        }
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(Ordering::SeqCst)
    }

    /// Pages written since the last call, one bit per RAM page: KVM's log
    /// (writes by the guest; KVM_GET_DIRTY_LOG returns *and clears* it) OR'd
    /// with the VMM's own bitmap (writes by device emulation, which KVM never
    /// sees because they do not go through the guest's page tables).
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>, VmError> {
        let mut bits = self.ram.take_vmm_dirty();
        for r in self.ram.regions() {
            let log = self
                .fd
                .get_dirty_log(r.slot, r.size as usize)
                .map_err(|source| VmError::DirtyLog {
                    slot: r.slot,
                    source,
                })?;
            or_bits_at(
                &mut bits,
                r.ram_offset / PAGE_SIZE,
                &log,
                r.size / PAGE_SIZE,
            );
        }
        Ok(bits)
    }

    /// Reads the VM-level state. Call with all vCPUs paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(|source| VmError::GetState {
                    what: "irqchip",
                    source,
                })?;
            Ok(c)
        };
        let get = |what| move |source| VmError::GetState { what, source };
        let mut clock = self.fd.get_clock().map_err(get("clock"))?;
        // Only the counter value is restorable; the flags describe how it was read.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(get("pit2"))?,
            clock,
        })
    }

    /// Restores the VM-level state (see [`VmState`] for the order).
    pub fn restore_state(&self, s: &VmState) -> Result<(), VmError> {
        let set = |what| move |source| VmError::SetState { what, source };
        self.fd.set_pit2(&s.pit).map_err(set("pit2"))?;
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(set("clock"))?;
        self.fd
            .set_irqchip(&s.pic_master)
            .map_err(set("pic master"))?;
        self.fd
            .set_irqchip(&s.pic_slave)
            .map_err(set("pic slave"))?;
        self.fd.set_irqchip(&s.ioapic).map_err(set("ioapic"))?;
        Ok(())
    }
}
