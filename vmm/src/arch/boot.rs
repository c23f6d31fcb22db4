//! Loading a guest and the state its vCPUs start in.
//!
//! # Entry contract (PVH-compatible)
//!
//! The guest ELF must carry a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`); that
//! 32-bit entry point is where every vCPU starts, in the state the PVH boot
//! protocol defines:
//!
//! | register | value |
//! |---|---|
//! | CR0 | PE \| ET: protected mode, paging off |
//! | CR4, EFER | 0 |
//! | CS | flat 32-bit code, base 0, limit 4 GiB |
//! | DS, ES, FS, GS, SS | flat 32-bit data |
//! | EFLAGS | 0x2 (interrupts off) |
//! | EBX | guest-physical address of `hvm_start_info` ([`START_INFO_GPA`]) |
//! | EIP | the PVH entry |
//!
//! Unlike PVH, where only the boot CPU arrives and the others wait for a
//! SIPI, this VMM starts **every** vCPU at the entry (their MP state is set to
//! RUNNABLE). A vCPU learns its index from CPUID.1:EBX[31:24]. This keeps
//! real-mode AP trampolines out of the guest: on this host ring-0 code is
//! emulated instruction by instruction, so the less of it the better.
//!
//! The same ELF boots under `qemu-system-x86_64 -kernel` through the same
//! note; there only the boot CPU runs.

use std::io::Cursor;

use guest_images::abi::{START_INFO_GPA, STATUS_GPA};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestRam;

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;

/// Errors of loading a guest image.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Guest image is not a loadable ELF: {0}")]
    Elf(#[source] linux_loader::loader::Error),
    #[error("Guest ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry,
    #[error("Guest ELF does not fit below the status page or overlaps it ({start:#x}..{end:#x})")]
    BadPlacement { start: u64, end: u64 },
    #[error("Writing the PVH start info failed")]
    StartInfo(#[source] vm_memory::GuestMemoryError),
}

/// Loads `elf` into `ram` and writes the PVH start info; returns the entry.
///
/// linux-loader copies the PT_LOAD segments but does not zero `.bss`; that
/// is fine here because fresh guest RAM is a memfd hole, which reads as zero.
pub fn load_guest(ram: &GuestRam, elf: &[u8]) -> Result<u64, BootError> {
    let mut image = Cursor::new(elf);
    let loaded = Elf::load(ram.memory(), None, &mut image, None).map_err(BootError::Elf)?;
    let start = loaded.kernel_load.0;
    if start < STATUS_GPA + 0x1000 || loaded.kernel_end > ram.size().min(0xC000_0000) {
        return Err(BootError::BadPlacement {
            start,
            end: loaded.kernel_end,
        });
    }
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => return Err(BootError::NoPvhEntry),
    };
    write_start_info(ram).map_err(BootError::StartInfo)?;
    Ok(entry)
}

/// Writes `hvm_start_info` and an E820 map describing our RAM layout.
fn write_start_info(ram: &GuestRam) -> Result<(), vm_memory::GuestMemoryError> {
    let memmap_gpa = START_INFO_GPA + 0x40;
    let regions = ram.regions();
    let mut info = Vec::with_capacity(0x40);
    info.extend_from_slice(&PVH_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    info.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    info.extend_from_slice(&0u64.to_le_bytes()); // cmdline_paddr
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr
    info.extend_from_slice(&memmap_gpa.to_le_bytes());
    info.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // reserved
    let mem = ram.memory();
    mem.write_slice(&info, GuestAddress(START_INFO_GPA))?;
    for (i, r) in regions.iter().enumerate() {
        let mut e = Vec::with_capacity(24);
        e.extend_from_slice(&r.gpa.to_le_bytes());
        e.extend_from_slice(&r.size.to_le_bytes());
        e.extend_from_slice(&E820_RAM.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        mem.write_slice(&e, GuestAddress(memmap_gpa + 24 * i as u64))?;
    }
    Ok(())
}

/// General registers at the PVH entry.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: START_INFO_GPA,
        rflags: 0x2,
        ..Default::default()
    }
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Segment and control registers at the PVH entry, starting from the
/// vCPU's reset state `sregs` (which carries the APIC base and the
/// descriptor-table defaults KVM chose).
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    sregs.cs = flat_segment(0x08, 0xb); // execute/read, accessed
    let data = flat_segment(0x10, 0x3); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0xffff,
        type_: 0xb, // busy 32-bit TSS, as VMX requires for TR
        present: 1,
        ..Default::default()
    };
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}
