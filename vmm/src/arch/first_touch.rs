//! The pages a paused vCPU touches first when it runs again.
//!
//! After a post-copy switch-over the destination resumes a guest whose
//! memory is still on the source: every page the vCPUs touch costs a
//! userfaultfd round trip to the source before the instruction can go on.
//! The first of those are predictable from the vCPU state alone, so the
//! source sends them with the state and the vCPUs resume without a fault:
//!
//! - the page under the instruction pointer and under the stack pointer;
//! - to take an interrupt (a halted vCPU wakes by one): the IDT, the gate's
//!   handler, the GDT (the gate names a code segment), the TSS and the
//!   ring-0 stack it points at (an interrupt from ring 3 switches to it);
//! - the per-CPU block that GS points at;
//! - and for each of these linear addresses, the page tables the MMU walks
//!   to translate it (with shadow paging, as on this host, KVM reads them
//!   too when it builds its own tables).

/// CR0.PG: paging on.
const CR0_PG: u64 = 1 << 31;
/// Page-table entry bits.
const PTE_PRESENT: u64 = 1;
const PTE_LARGE: u64 = 1 << 7;
/// Physical address bits of an entry (bits 12..51).
const PTE_ADDR: u64 = 0x000F_FFFF_FFFF_F000;

/// What the vCPU state says about where it will go (all linear addresses
/// but `cr3`).
#[derive(Debug, Clone, Copy, Default)]
pub struct VcpuView {
    pub cr0: u64,
    pub cr3: u64,
    pub rip: u64,
    pub rsp: u64,
    pub idt_base: u64,
    pub gdt_base: u64,
    pub tr_base: u64,
    pub gs_base: u64,
    /// The vector the LAPIC timer raises (its handler is fetched first when
    /// a halted vCPU wakes), if the timer is armed.
    pub timer_vector: Option<u8>,
}

/// Guest-physical addresses (page-aligned, deduplicated, sorted) of the
/// pages `v` touches first; `read_u64` reads guest-physical memory.
pub fn pages(v: &VcpuView, read_u64: &impl Fn(u64) -> Option<u64>) -> Vec<u64> {
    let mut out = Vec::new();
    let mut touch = |la: u64| {
        if let Some(gpa) = translate(v, la, read_u64, &mut out) {
            out.push(gpa & !0xFFF);
        }
        gpa_of_read(v, la, read_u64)
    };
    for la in [v.rip, v.rsp, v.idt_base, v.gdt_base, v.tr_base, v.gs_base] {
        touch(la);
    }
    // TSS.RSP0 (offset 4): the stack an interrupt from ring 3 lands on.
    if let Some(rsp0) = touch(v.tr_base + 4) {
        touch(rsp0.wrapping_sub(8));
    }
    if let Some(vector) = v.timer_vector {
        // A 64-bit gate: offset 15:0 at +0, 31:16 at +6, 63:32 at +8.
        let gate = v.idt_base + 16 * u64::from(vector);
        if let (Some(lo), Some(hi)) = (touch(gate), touch(gate + 8)) {
            let handler = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000) | ((hi & 0xFFFF_FFFF) << 32);
            touch(handler);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The u64 at linear address `la`, read through the guest's page tables.
fn gpa_of_read(v: &VcpuView, la: u64, read_u64: &impl Fn(u64) -> Option<u64>) -> Option<u64> {
    let gpa = translate(v, la, read_u64, &mut Vec::new())?;
    read_u64(gpa)
}

/// Translates linear address `la` with the guest's 4-level page tables
/// (long mode; 1 GiB and 2 MiB pages included), pushing the page of every
/// table read onto `tables`. Without paging, linear is physical.
fn translate(
    v: &VcpuView,
    la: u64,
    read_u64: &impl Fn(u64) -> Option<u64>,
    tables: &mut Vec<u64>,
) -> Option<u64> {
    if v.cr0 & CR0_PG == 0 {
        return Some(la);
    }
    let mut table = v.cr3 & PTE_ADDR;
    // Levels: PML4 (bits 47..39), PDPT (38..30), PD (29..21), PT (20..12).
    for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
        tables.push(table);
        let entry = read_u64(table + ((la >> shift) & 0x1FF) * 8)?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        let large = (level == 3 || level == 2) && entry & PTE_LARGE != 0;
        if level == 1 || large {
            let offset_mask = (1u64 << shift) - 1;
            return Some((entry & PTE_ADDR & !offset_mask) | (la & offset_mask));
        }
        table = entry & PTE_ADDR;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A tiny guest memory: identity map of the first GiB with 2 MiB pages
    /// (PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000), an IDT at 0x5000
    /// whose vector 0x20 points at 0x7123.
    fn memory() -> HashMap<u64, u64> {
        let mut m = HashMap::new();
        m.insert(0x1000, 0x2000 | 0x27);
        m.insert(0x2000, 0x3000 | 0x27);
        for i in 0..512 {
            m.insert(0x3000 + 8 * i, (i << 21) | 0xE7);
        }
        let gate = 0x5000 + 16 * 0x20;
        m.insert(gate, 0x7123 | (0x08 << 16) | (0x8E00 << 32));
        m.insert(gate + 8, 0);
        m.insert(0x6004, 0x9000); // TSS.RSP0 (unaligned read: see below)
        m
    }

    #[test]
    fn a_halted_vcpu_needs_its_code_stack_tables_and_interrupt_path() {
        let mem = memory();
        let read = |gpa: u64| mem.get(&gpa).copied().or(Some(0));
        let v = VcpuView {
            cr0: CR0_PG,
            cr3: 0x1000,
            rip: 0x10_0abc,
            rsp: 0x10_8ff0,
            idt_base: 0x5000,
            gdt_base: 0x4000,
            tr_base: 0x6000,
            gs_base: 0x8_0000,
            timer_vector: Some(0x20),
        };
        let p = pages(&v, &read);
        for page in [
            0x1000, 0x2000, 0x3000, // the walk
            0x10_0000, 0x10_8000, // code, stack
            0x5000, 0x4000, 0x6000, 0x8_0000, // IDT, GDT, TSS, per-CPU
            0x7000,   // the timer's handler
            0x8000,   // the ring-0 stack below RSP0
        ] {
            assert!(p.contains(&page), "{page:#x} missing from {p:x?}");
        }
        assert!(p.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    }

    #[test]
    fn without_paging_linear_is_physical_and_no_table_is_read() {
        let v = VcpuView {
            rip: 0x7c00,
            ..Default::default()
        };
        let p = pages(&v, &|_| Some(0));
        assert!(p.contains(&0x7000));
        assert!(!p.contains(&0x1000));
    }

    #[test]
    fn an_unmapped_address_adds_only_the_tables_walked() {
        let v = VcpuView {
            cr0: CR0_PG,
            cr3: 0x1000,
            rip: 0xdead_0000_0000,
            ..Default::default()
        };
        let p = pages(&v, &|gpa| Some(if gpa == 0x1000 { 0x2027 } else { 0 }));
        assert!(!p.contains(&0xdead_0000_0000));
    }
}
