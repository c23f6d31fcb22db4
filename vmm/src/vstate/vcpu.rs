//! One vCPU: its boot configuration and its complete KVM state.
//!
//! # What a vCPU's state is
//! Everything KVM holds for a vCPU that the guest can observe: general
//! registers, segment/control registers, the FPU/SSE/AVX state (XSAVE area)
//! and XCR0, the local APIC (registers, including its timer), the MSRs KVM
//! lists as saveable (TSC, syscall MSRs, PAT, ...), the MP state
//! (running/halted/waiting for SIPI), pending events (exceptions, NMIs,
//! interrupt shadow) and the debug registers. CPUID is part of it too: the
//! destination must show the guest the same CPU.
//!
//! # Ordering rules
//! Save (all vCPUs paused, i.e. out of KVM_RUN):
//! 1. **MP state first**: KVM_GET_MP_STATE makes KVM process pending INIT/SIPI
//!    APIC events, which would otherwise be lost or change later values.
//! 2. regs, sregs, XSAVE, XCRs, debug regs, LAPIC, MSRs.
//! 3. **vCPU events last**: reading registers can't change pending events, but
//!    the reverse is not true (KVM_GET_VCPU_EVENTS reflects the final state).
//!
//! Restore:
//! 1. CPUID first (it decides which features, and thus which MSRs and XSAVE
//!    components, are valid).
//! 2. MP state, regs, **sregs before LAPIC** (sregs carries the APIC base;
//!    setting it resets the LAPIC), XSAVE, XCRs, debug regs.
//! 3. **LAPIC before MSRs**: MSR_IA32_TSC_DEADLINE is written into the LAPIC
//!    timer, and must also come after MSR_IA32_TSC (see `arch::msr`).
//! 4. **vCPU events last**, so that nothing restored after them clears a
//!    pending exception or interrupt.
//!
//! A **halted** vCPU (it executed HLT and waits for an interrupt) needs
//! nothing more: MP state `HALTED` makes KVM_RUN block it again, and the
//! LAPIC page carries both the timer's current count and any tick that fired
//! during the pause (IRR). The timer restarts at KVM_SET_LAPIC, so the vCPU
//! wakes that long after the restore (see [`VcpuState::timer_wake_in_ns`]).
//!
//! FPU state is carried only in the XSAVE area: on this host KVM_GET_FPU
//! returns MXCSR = 0 and KVM_SET_FPU ignores it, while XSAVE is exact.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::arch::{boot, cpuid, first_touch, msr};

/// Errors of vCPU set-up and state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {index} failed")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: reading {what} failed")]
    Get {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: setting {what} failed")]
    Set {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: state has {found} CPUID entries, more than KVM accepts")]
    CpuidTooLarge { index: u8, found: usize },
}

/// The complete KVM state of one vCPU, as plain serializable data.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: u32,
}

/// What KVM holds for a vCPU, as [`Vcpu::kvm_view`] shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KvmView {
    /// `running` (runnable) or `halted` (executed HLT, waits for an
    /// interrupt), or another of KVM's MP states by name.
    pub mp_state: &'static str,
    /// The LAPIC timer's mode: `periodic`, `one-shot`, `tsc-deadline` or
    /// `masked`.
    pub timer: &'static str,
    /// Its period (initial count times the divider, at KVM's 1 GHz).
    pub timer_period_ns: u64,
}

/// The 32-bit LAPIC register at byte offset `off` of KVM's register page.
fn lapic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = &lapic.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

/// log2 of the LAPIC timer's divider, from its divide configuration
/// register (Intel SDM 11.5.4: bits 0, 1 and 3 encode 2^((value + 1) mod 8)).
fn timer_divide_shift(tdcr: u32) -> u32 {
    (((tdcr & 3) | ((tdcr & 8) >> 1)) + 1) & 7
}

impl VcpuState {
    /// For a vCPU saved while halted: how long after its LAPIC state is
    /// restored its timer will wake it, in ns; `None` if it was running, or
    /// no timer interrupt is due (timer masked, or in TSC-deadline mode).
    ///
    /// This is the halted-vCPU rule of a migration: KVM_GET_LAPIC stores the
    /// timer's *current count* (TMCCT, computed by KVM from its hrtimer at
    /// the time of the save) in the register page, and KVM_SET_LAPIC
    /// restarts the timer from that count, not from the initial one; a tick
    /// that fired while the vCPU was paused waits in the IRR and is
    /// delivered at once. The restarted timer counts from KVM_SET_LAPIC,
    /// not from the resume, just as the guest's TSC counts from KVM_SET_MSRS:
    /// time between restore and resume passes for the guest's clocks (the
    /// vCPU merely did not run), while time between save and restore does
    /// not. So a halted vCPU wakes `timer_wake_in_ns` after its restore, or
    /// at the resume if that comes later.
    pub fn timer_wake_in_ns(&self) -> Option<u64> {
        const IRR: usize = 0x200;
        const LVTT: usize = 0x320;
        const TMCCT: usize = 0x390;
        const TDCR: usize = 0x3E0;
        const LVT_MASKED: u32 = 1 << 16;
        const LVT_TSC_DEADLINE: u32 = 2 << 17;
        if self.mp_state.mp_state != KVM_MP_STATE_HALTED {
            return None;
        }
        let reg = |off: usize| lapic_reg(&self.lapic, off);
        let lvtt = reg(LVTT);
        let vector = (lvtt & 0xFF) as usize;
        if lvtt & LVT_MASKED != 0 || lvtt & (3 << 17) == LVT_TSC_DEADLINE {
            return None;
        }
        if reg(IRR + 0x10 * (vector / 32)) & (1 << (vector % 32)) != 0 {
            return Some(0); // fired during the pause: delivered at resume
        }
        // KVM's APIC bus runs at 1 GHz.
        Some(u64::from(reg(TMCCT)) << timer_divide_shift(reg(TDCR)))
    }
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` (its APIC ID is the same number).
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self { index, fd })
    }

    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The KVM vCPU fd, mutably (KVM_RUN needs it).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    fn get_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Get {
            index,
            what,
            source,
        }
    }

    fn set_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Set {
            index,
            what,
            source,
        }
    }

    /// Puts the vCPU in the PVH entry state (see `arch::boot`): CPUID, boot
    /// MSRs, FPU defaults, LAPIC LINT0/LINT1, registers, and RUNNABLE.
    pub fn configure_boot(
        &self,
        base_cpuid: &CpuId,
        count: u8,
        entry: u64,
    ) -> Result<(), VcpuError> {
        let cpuid = cpuid::for_vcpu(base_cpuid, self.index, count);
        self.fd.set_cpuid2(&cpuid).map_err(self.set_err("cpuid"))?;
        msr::set_all(&self.fd, &msr::boot_entries()).map_err(self.set_err("boot msrs"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(self.set_err("fpu"))?;
        self.configure_lapic()?;
        let sregs = self.fd.get_sregs().map_err(self.get_err("sregs"))?;
        self.fd
            .set_sregs(&boot::entry_sregs(sregs))
            .map_err(self.set_err("sregs"))?;
        self.fd
            .set_regs(&boot::entry_regs(entry))
            .map_err(self.set_err("regs"))?;
        // Every vCPU runs from the entry; none waits for a SIPI.
        let runnable = kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        };
        self.fd
            .set_mp_state(runnable)
            .map_err(self.set_err("mp_state"))
    }

    /// LINT0 as ExtINT (the PIC's output reaches the CPU through it) and
    /// LINT1 as NMI, as a PC's firmware leaves them.
    fn configure_lapic(&self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DM_EXTINT: u32 = 0x700;
        const DM_NMI: u32 = 0x400;
        let mut lapic = self.fd.get_lapic().map_err(self.get_err("lapic"))?;
        for (reg, mode) in [(APIC_LVT0, DM_EXTINT), (APIC_LVT1, DM_NMI)] {
            let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
            let v = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
            let v = (v & !0x700) | mode;
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as std::os::raw::c_char;
            }
        }
        self.fd.set_lapic(&lapic).map_err(self.set_err("lapic"))
    }

    /// What KVM says the vCPU is doing, for people and tests: its MP state
    /// and its LAPIC timer. The vCPU must be out of KVM_RUN.
    pub fn kvm_view(&self) -> Result<KvmView, VcpuError> {
        const LVTT: usize = 0x320;
        const TMICT: usize = 0x380;
        const TDCR: usize = 0x3E0;
        let mp = self.fd.get_mp_state().map_err(self.get_err("mp_state"))?;
        let lapic = self.fd.get_lapic().map_err(self.get_err("lapic"))?;
        let reg = |off: usize| lapic_reg(&lapic, off);
        let (lvtt, shift) = (reg(LVTT), timer_divide_shift(reg(TDCR)));
        Ok(KvmView {
            mp_state: match mp.mp_state {
                KVM_MP_STATE_RUNNABLE => "running",
                KVM_MP_STATE_HALTED => "halted",
                kvm_bindings::KVM_MP_STATE_UNINITIALIZED => "waiting for INIT/SIPI",
                kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => "INIT received",
                _ => "other",
            },
            timer: match (lvtt >> 17) & 3 {
                _ if lvtt & (1 << 16) != 0 => "masked",
                0 => "one-shot",
                1 => "periodic",
                _ => "tsc-deadline",
            },
            timer_period_ns: u64::from(reg(TMICT)) << shift,
        })
    }

    /// What the vCPU's registers say it will touch first when it runs
    /// again (see `arch::first_touch`). The vCPU must be out of KVM_RUN.
    pub fn first_touch_view(&self) -> Result<first_touch::VcpuView, VcpuError> {
        const LVTT: usize = 0x320;
        const LVT_MASKED: u32 = 1 << 16;
        let regs = self.fd.get_regs().map_err(self.get_err("regs"))?;
        let sregs = self.fd.get_sregs().map_err(self.get_err("sregs"))?;
        let lapic = self.fd.get_lapic().map_err(self.get_err("lapic"))?;
        let lvtt = lapic_reg(&lapic, LVTT);
        Ok(first_touch::VcpuView {
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            rip: regs.rip,
            rsp: regs.rsp,
            idt_base: sregs.idt.base,
            gdt_base: sregs.gdt.base,
            tr_base: sregs.tr.base,
            gs_base: sregs.gs.base,
            timer_vector: (lvtt & LVT_MASKED == 0).then_some((lvtt & 0xFF) as u8),
        })
    }

    /// Reads the complete state (see the module doc for the order). The
    /// vCPU must be out of KVM_RUN, and for vCPU events all vCPUs must be.
    pub fn save_state(&self, msr_list: &[u32]) -> Result<(VcpuState, Vec<u32>), VcpuError> {
        let mp_state = self.fd.get_mp_state().map_err(self.get_err("mp_state"))?;
        let regs = self.fd.get_regs().map_err(self.get_err("regs"))?;
        let sregs = self.fd.get_sregs().map_err(self.get_err("sregs"))?;
        let xsave = self.fd.get_xsave().map_err(self.get_err("xsave"))?;
        let xcrs = self.fd.get_xcrs().map_err(self.get_err("xcrs"))?;
        let debugregs = self
            .fd
            .get_debug_regs()
            .map_err(self.get_err("debugregs"))?;
        let lapic = self.fd.get_lapic().map_err(self.get_err("lapic"))?;
        let (msrs, skipped) = msr::get_all(&self.fd, msr_list).map_err(self.get_err("msrs"))?;
        let tsc_khz = self.fd.get_tsc_khz().map_err(self.get_err("tsc_khz"))?;
        let cpuid = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(self.get_err("cpuid"))?;
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(self.get_err("vcpu_events"))?;
        let state = VcpuState {
            index: self.index,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        };
        Ok((state, skipped))
    }

    /// Restores a state read by [`Vcpu::save_state`]; returns the MSRs KVM
    /// refused (reported, not fatal: see `arch::msr`).
    pub fn restore_state(&self, s: &VcpuState) -> Result<Vec<u32>, VcpuError> {
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuError::CpuidTooLarge {
            index: self.index,
            found: s.cpuid.len(),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(self.set_err("cpuid"))?;
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(self.set_err("mp_state"))?;
        self.fd.set_regs(&s.regs).map_err(self.set_err("regs"))?;
        self.fd.set_sregs(&s.sregs).map_err(self.set_err("sregs"))?;
        // SAFETY: `s.xsave` is a full `kvm_xsave` (4 KiB, the legacy size);
        // KVM_CAP_XSAVE2 is not enabled on this VM, so KVM reads exactly
        // `size_of::<kvm_xsave>()` bytes from it.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(self.set_err("xsave"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(self.set_err("xcrs"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(self.set_err("debugregs"))?;
        self.fd.set_lapic(&s.lapic).map_err(self.set_err("lapic"))?;
        let skipped = msr::set_all(&self.fd, &s.msrs).map_err(self.set_err("msrs"))?;
        self.fd
            .set_vcpu_events(&s.vcpu_events)
            .map_err(self.set_err("vcpu_events"))?;
        Ok(skipped)
    }
}

/// The MSR list is a property of the host's KVM, computed once.
pub fn msr_save_list(kvm: &Kvm) -> Result<Vec<u32>, VcpuError> {
    msr::save_list(kvm).map_err(|source| VcpuError::Get {
        index: 0,
        what: "msr index list",
        source,
    })
}
