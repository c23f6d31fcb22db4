/*
 * Ring 0 of the workload guest: PVH entry, page tables, GDT/IDT/TSS, LAPIC
 * timer, exception handlers, and the #GP handler that performs ring 3's
 * port I/O where the host forces IOPL=0. Everything else runs in ring 3
 * (workload.c, user.S). README.md describes the whole boot path.
 *
 * On the target host (nested PVM) every instruction executed at CPL 0 is
 * emulated, one at a time (~2.4 us each), so this file is deliberately
 * short: the only loops are the page-table fill for RAM above 4 GiB (2 MiB
 * pages only) and the APs' wait for the BSP's tables. It must never
 * contain cmpxchg16b, xsave/xrstor (any variant), int3, clac, popcnt,
 * fwait or ldmxcsr: build.rs disassembles the linked ring-0 sections
 * (.ring0.32 as 32-bit code, .ring0 as 64-bit code) and fails if it does.
 *
 * The descriptor tables are static data: handler and TSS addresses are
 * emitted as 16-bit offsets from the image base (0x100000), which link.ld
 * asserts is enough (everything they point at lies in the image's first
 * 64 KiB), so the boot path does not have to build them.
 */
#include "abi.h"

#define KERNEL_CS      0x08
#define KERNEL_DS      0x10
#define USER_DS        (0x18 | 3)
#define USER_CS        (0x20 | 3)
#define TSS_SEL0       0x28            /* + 16 * vCPU index */

#ifndef USER_RFLAGS
#define USER_RFLAGS    0x3202          /* IF=1, IOPL=3 (-D for tests) */
#endif

#define KSTACK_SIZE    4096            /* per-vCPU ring-0 stack, 4 KiB aligned */
#define USTACK_SIZE    16384           /* per-vCPU ring-3 stack */

#ifndef DEFAULT_MEM_MIB
#define DEFAULT_MEM_MIB  64            /* when the probe is absent (-D for tests) */
#endif
#define DEFAULT_TIMER_HZ 100
#define MAX_GIB          64            /* page tables map at most 64 GiB */

#define PTE_P    0x001
#define PTE_RW   0x002
#define PTE_US   0x004
#define PTE_PCD  0x010
#define PTE_A    0x020
#define PTE_D    0x040
#define PTE_PS   0x080
#define PTE_TABLE (PTE_P | PTE_RW | PTE_US | PTE_A)               /* 0x27 */
#define PTE_LEAF  (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS) /* 0xE7 */

#define CR0_PE   0x00000001
#define CR0_MP   0x00000002
#define CR0_ET   0x00000010
#define CR0_NE   0x00000020
#define CR0_PG   0x80000000
#define CR4_PAE  0x020
#define CR4_PGE  0x080
#define CR4_OSFXSR     0x200
#define CR4_OSXMMEXCPT 0x400
#define MSR_EFER 0xC0000080
#define MSR_GS_BASE 0xC0000101
#define EFER_LME 0x100

#define LAPIC_EOI   0xB0
#define LAPIC_SVR   0xF0
#define LAPIC_LVTT  0x320
#define LAPIC_LVT0  0x350
#define LAPIC_LVT1  0x360
#define LVT_MASKED  0x10000
#define LAPIC_TICR  0x380
#define LAPIC_TDCR  0x3E0

/* ===================================================================== */
/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", 32-bit entry.  */
/* ===================================================================== */
        .section .note.pvh, "a", @note
        .balign 4
        .long 4                         /* namesz: "Xen\0" */
        .long 8                         /* descsz: an 8-byte number, which */
        .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .quad pvh_entry32               /* QEMU reads whole; others use 4 */

/* ===================================================================== */
/* Ring-0 code                                                            */
/* ===================================================================== */
        .section .ring0.text32, "ax", @progbits   /* 32-bit code: link.ld */

/*
 * PVH entry: 32-bit protected mode, paging off, flat segments, IF=0,
 * EBX = start_info (unused: parameters come from the probe device).
 * Every vCPU of our VMM starts here at once.
 */
        .code32
        .globl pvh_entry32
pvh_entry32:
        mov     $1, %eax
        cpuid
        shr     $24, %ebx               /* initial APIC ID = vCPU index */
        mov     %ebx, %esi              /* esi = index until ring 3 */
        cmp     $ABI_MAX_VCPUS, %esi
        jae     park
        test    %esi, %esi
        jnz     ap_wait

        /* ---- BSP: read what ring 0 needs from the probe ---- */
        mov     $DEFAULT_MEM_MIB, %ecx
        mov     $DEFAULT_TIMER_HZ, %ebx
        mov     $(ABI_PROBE_BASE + 4 * ABI_PARAM_MAGIC), %dx
        in      %dx, %eax
        cmp     $ABI_PROBE_MAGIC, %eax
        jne     1f
        mov     $(ABI_PROBE_BASE + 4 * ABI_PARAM_MEM_MIB), %dx
        in      %dx, %eax
        mov     %eax, %ecx
        mov     $(ABI_PROBE_BASE + 4 * ABI_PARAM_TIMER_HZ), %dx
        in      %dx, %eax
        test    %eax, %eax              /* 0 would divide by zero below; */
        jz      1f                      /* ring 3 rejects it anyway */
        mov     %eax, %ebx
1:
        /* LAPIC timer initial count = 1e9 / timer_hz (1 GHz APIC clock);
         * a halting vCPU sets its own tick from ring 3 (workload.c) */
        mov     $1000000000, %eax
        xor     %edx, %edx
        div     %ebx
        mov     %eax, timer_count

        /* ngib = 4 + ceil(mem_mib / 1024), at most MAX_GIB */
        add     $1023, %ecx
        jc      2f
        shr     $10, %ecx
        add     $4, %ecx
        cmp     $MAX_GIB, %ecx
        jbe     3f
2:      mov     $MAX_GIB, %ecx
3:      mov     %ecx, %ebp

        mov     $0x80000001, %eax
        cpuid
        bt      $26, %edx               /* pdpe1gb */
        jnc     pt_2m

        /* ---- 1 GiB pages: pdpt[i] = i GiB | leaf flags ---- */
        mov     $pdpt, %edi
        mov     $PTE_LEAF, %eax
        xor     %edx, %edx
        mov     %ebp, %ecx
4:      mov     %eax, (%edi)
        mov     %edx, 4(%edi)
        add     $8, %edi
        add     $0x40000000, %eax
        adc     $0, %edx
        dec     %ecx
        jnz     4b
        orl     $PTE_PCD, pdpt + 3 * 8  /* the GiB holding the LAPIC */
        movl    $1, pt_1g_pages         /* for the banner */
        jmp     pt_done

        /* ---- 2 MiB pages: pdpt[0..4] and pd_low are static (below), so
         *      only RAM above 4 GiB costs instructions here ---- */
pt_2m:  sub     $4, %ebp
        jz      pt_done
        mov     $(pdpt + 4 * 8), %edi
        mov     $(pd_high + PTE_TABLE), %eax
        mov     %ebp, %ecx
5:      mov     %eax, (%edi)
        add     $8, %edi
        add     $4096, %eax
        dec     %ecx
        jnz     5b
        mov     $pd_high, %edi
        mov     $PTE_LEAF, %eax
        mov     $1, %edx                /* physical 4 GiB */
        mov     %ebp, %ecx
        shl     $9, %ecx                /* 512 entries per GiB */
6:      mov     %eax, (%edi)
        mov     %edx, 4(%edi)
        add     $8, %edi
        add     $0x200000, %eax
        adc     $0, %edx
        dec     %ecx
        jnz     6b

pt_done:
        movl    $1, tables_ready
#ifdef QEMU_SMP_TEST
        call    smp_test_start_aps
#endif
        jmp     cpu_setup

        /* ---- APs: wait for the BSP's tables (2 instructions a turn) ---- */
ap_wait:
        cmpl    $0, tables_ready
        je      ap_wait

        /* ---- every vCPU: enter long mode ---- */
cpu_setup:
        mov     $(CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        mov     $EFER_LME, %eax
        xor     %edx, %edx
        wrmsr
        mov     $(CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE), %eax
        mov     %eax, %cr0
        lgdt    gdt_ptr
        ljmp    $KERNEL_CS, $long_mode

park:   cli
        hlt
        jmp     park

        .section .ring0.text, "ax", @progbits     /* 64-bit code */
        .code64
long_mode:
        mov     $KERNEL_DS, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        xor     %eax, %eax
        mov     %eax, %fs
        mov     %eax, %gs

        /* ring-0 stack: top of kstacks[index]; its last qword holds the
         * address of this vCPU's status block, TSS.RSP0 = top - 16 */
        lea     1(%rsi), %eax
        shl     $12, %eax
        add     $kstacks, %eax
        mov     %rax, %rsp
        mov     %esi, %ecx
        shl     $7, %ecx
        add     $(ABI_STATUS_GPA + ABI_PERCPU_OFFSET), %ecx
        mov     %rcx, -8(%rsp)
        sub     $16, %rsp
        /* GS base = the status block too, so that the timer ISR and the
         * halt door reach TICKS and HEARTBEATS in one instruction (ring 3
         * never uses GS) */
        mov     %ecx, %eax
        xor     %edx, %edx
        mov     $MSR_GS_BASE, %ecx
        wrmsr

        lidt    idt_ptr
        mov     %esi, %eax
        shl     $4, %eax
        add     $TSS_SEL0, %eax
        ltr     %ax

        /* LAPIC (xAPIC MMIO): enable, mask LINT0/LINT1 (a BIOS leaves the
         * 8259 wired to LINT0 as ExtINT: PIT ticks would arrive on vector 8
         * under QEMU), periodic timer on vector 0x20 */
        mov     $ABI_LAPIC_GPA, %edi
        movl    $0x1FF, LAPIC_SVR(%rdi)
        movl    $LVT_MASKED, LAPIC_LVT0(%rdi)
        movl    $LVT_MASKED, LAPIC_LVT1(%rdi)
        movl    $0xB, LAPIC_TDCR(%rdi)          /* divide by 1 */
        movl    $0x20020, LAPIC_LVTT(%rdi)      /* periodic | vector 0x20 */
        mov     timer_count, %eax
        mov     %eax, LAPIC_TICR(%rdi)

        /* iretq to ring 3: SS, RSP, RFLAGS (IF, IOPL=3), CS, RIP; RDI = index */
        lea     1(%rsi), %eax
        shl     $14, %eax
        add     $ustacks, %eax
        pushq   $USER_DS
        push    %rax
        pushq   $USER_RFLAGS
        pushq   $USER_CS
        pushq   $user_entry
        mov     %esi, %edi
        iretq

/*
 * LAPIC timer, vector 0x20. Taken from ring 3, or in ring 0 inside the halt
 * door (the only place ring 0 enables interrupts). Three instructions,
 * touching no register: an idle vCPU runs this at every tick, and each
 * ring-0 instruction is emulated.
 */
timer_isr:
        incq    %gs:ABI_PC_TICKS
        movabs  %eax, ABI_LAPIC_GPA + LAPIC_EOI /* EOI (any value) */
        iretq

/* LAPIC spurious vector 0xFF: no EOI. */
spurious_isr:
        iretq

/*
 * Exceptions 0..31: record vector and RIP in the status block, phase =
 * HALTED, report on the event port, halt for good. Works from ring 0 too:
 * the kernel stacks are 4 KiB aligned, so the status pointer is found at
 * (rsp | 0xFFF) - 7 from anywhere on the stack.
 */
        .macro EXC vec, has_err
exc\vec:
        .if \has_err == 0
        pushq   $0
        .endif
        pushq   $\vec
        jmp     exc_common
        .endm

        EXC 0, 0
        EXC 1, 0
        EXC 2, 0
        EXC 3, 0
        EXC 4, 0
        EXC 5, 0
        EXC 6, 0
        EXC 7, 0
        EXC 8, 1
        EXC 9, 0
        EXC 10, 1
        EXC 11, 1
        EXC 12, 1
        /* 13 (#GP): see exc13 below */
        EXC 14, 1
        EXC 15, 0
        EXC 16, 0
        EXC 17, 1
        EXC 18, 0
        EXC 19, 0
        EXC 20, 0
        EXC 21, 1
        EXC 22, 0
        EXC 23, 0
        EXC 24, 0
        EXC 25, 0
        EXC 26, 0
        EXC 27, 0
        EXC 28, 0
        EXC 29, 1
        EXC 30, 1
        EXC 31, 0

/*
 * #GP. Ring 3 runs with IOPL=3, so its IN/OUT are legal natively, but the
 * nested-PVM host drops IOPL (ring 3 always sees IOPL=0) and every ring-3
 * IN/OUT raises #GP instead. So this handler emulates the four one-byte
 * forms the ring-3 code uses (IN/OUT with the port in DX: EC, ED, EE, EF):
 * do the access here at CPL 0 with the faulting context's own EAX/DX, step
 * RIP over the instruction and return. HLT (0xF4) goes to the halt door
 * below, tested first because an idle vCPU takes it at every wake-up; OUT
 * dword (heartbeats, events) next: 12 instructions. Any other #GP is a
 * real exception.
 * Entry stack: error code, RIP, CS, RFLAGS, RSP, SS.
 */
exc13:
        push    %rcx
        mov     16(%rsp), %rcx          /* faulting RIP */
        movzbl  (%rcx), %ecx            /* its first byte */
        cmp     $0xF4, %ecx
        je      halt_door
        cmp     $0xEF, %ecx
        jne     1f
        out     %eax, %dx               /* out %eax, (%dx) */
io_done:
        incq    16(%rsp)                /* RIP past the 1-byte instruction */
        pop     %rcx
        add     $8, %rsp                /* error code */
        iretq
1:      cmp     $0xED, %ecx
        jne     2f
        in      %dx, %eax               /* in (%dx), %eax */
        jmp     io_done
2:      cmp     $0xEE, %ecx
        jne     3f
        out     %al, %dx                /* out %al, (%dx) */
        jmp     io_done
3:      cmp     $0xEC, %ecx
        jne     4f
        in      %dx, %al                /* in (%dx), %al */
        jmp     io_done
4:      pop     %rcx
        pushq   $13
        jmp     exc_common

/*
 * The halt door. HLT is privileged, so ring 3's HLT traps here as #GP, and
 * this is where a vCPU with nothing to do sleeps. Ring 3 passes:
 *   RSI = the TICKS value to sleep until (its snapshot of TICKS + n);
 *   RDX = the port for the heartbeat sent at each tick while halted
 *         (ABI_PORT_HEARTBEAT or ABI_PORT_HEARTBEAT_IDLE).
 * Interrupts are off from the #GP to STI;HLT, and STI's one-instruction
 * shadow makes that pair atomic: a tick that arrived after ring 3 took its
 * snapshot is seen by the TICKS check, one that arrives later wakes the
 * HLT. So no tick is ever slept through. KVM sees a real HLT: the vCPU
 * thread blocks in the host kernel and KVM_GET_MP_STATE says HALTED.
 * Per tick: the timer ISR (3) + 9 instructions here + the OUT's exit.
 */
halt_door:
        incq    16(%rsp)                /* RIP past the HLT */
        push    %rax
        jmp     6f
5:      sti
        hlt
        cli
        incq    %gs:ABI_PC_HEARTBEATS
        mov     %gs:ABI_PC_HEARTBEATS, %rax
        out     %eax, %dx
6:      mov     %gs:ABI_PC_TICKS, %rax
        sub     %rsi, %rax
        js      5b                      /* TICKS < target: sleep on */
        pop     %rax
        pop     %rcx
        add     $8, %rsp                /* error code */
        iretq

exc_common:
        /* stack: vector, error code, RIP, CS, RFLAGS, RSP, SS */
        mov     %rsp, %rax
        or      $0xFFF, %rax
        mov     -7(%rax), %rax
        mov     (%rsp), %rcx
        mov     %rcx, ABI_PC_EXC_VECTOR(%rax)
        mov     16(%rsp), %rdx
        mov     %rdx, ABI_PC_EXC_RIP(%rax)
        movq    $ABI_PHASE_HALTED, ABI_PC_PHASE(%rax)
        mov     $(ABI_EVENT_EXCEPTION << 24), %eax
        or      %ecx, %eax
        mov     $ABI_PORT_EVENT, %dx
        out     %eax, %dx
7:      cli
        hlt
        jmp     7b

        .globl __ring0_text_end
__ring0_text_end:

#ifdef QEMU_SMP_TEST
        .section .ring0.text32, "ax", @progbits
/*
 * TEST ONLY (never in the shipped image): QEMU starts APs only by INIT/SIPI,
 * while our VMM starts every vCPU at pvh_entry32. To exercise the multi-vCPU
 * paths under QEMU (-smp N), the BSP copies a real-mode trampoline to 0x8000
 * and sends INIT-SIPI-SIPI to all other CPUs; the trampoline enters 32-bit
 * protected mode with flat segments and jumps to pvh_entry32, as PVH would.
 */
        .code32
smp_test_start_aps:
        mov     $smp_tramp, %esi
        mov     $0x8000, %edi
        mov     $(smp_tramp_end - smp_tramp), %ecx
        rep movsb
        xor     %esi, %esi
        movl    $0x1FF, ABI_LAPIC_GPA + LAPIC_SVR
        movl    $0x000C4500, ABI_LAPIC_GPA + 0x300      /* INIT, all but self */
        mov     $100000, %ecx
1:      dec     %ecx
        jnz     1b
        movl    $0x000C4608, ABI_LAPIC_GPA + 0x300      /* SIPI, vector 0x08 */
        ret

        .section .rodata
        .code16
smp_tramp:
        cli
        mov     %cs, %ax
        mov     %ax, %ds
        lgdtl   (smp_gdtp - smp_tramp)
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $(0x8000 + smp_tramp32 - smp_tramp)
        .code32
smp_tramp32:
        mov     $0x10, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     $pvh_entry32, %eax
        jmp     *%eax
        .balign 8
smp_gdt:
        .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF
smp_gdtp:
        .word 23
        .long 0x8000 + smp_gdt - smp_tramp
smp_tramp_end:
        .code64
#endif

/* ===================================================================== */
/* Ring-0 data: descriptor tables, TSSes, flags, page tables               */
/* ===================================================================== */
        .section .ring0.data, "aw", @progbits

        .balign 8
tables_ready:   .long 0                 /* set by the BSP, APs spin on it */
        .globl timer_count
timer_count:    .long 0                 /* LAPIC initial count, by the BSP */
        .globl pt_1g_pages
pt_1g_pages:    .long 0                 /* 1 if mapped with 1 GiB pages */

        .balign 16
        .word 0, 0, 0                   /* so that the base below is aligned */
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt
        .balign 16
idt_ptr_pad:
        .word 0, 0, 0
idt_ptr:
        .word idt_end - idt - 1
        .quad idt

        .balign 16
gdt:
        .quad 0                         /* null */
        .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
        .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
        .quad 0x00CFF2000000FFFF        /* 0x18 user data (DPL 3) */
        .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit (DPL 3) */
        /* 0x28 + 16*i: 64-bit TSS of vCPU i (base = tss + 128*i) */
        .set i, 0
        .rept ABI_MAX_VCPUS
        .word 0x67                      /* limit */
        .word tss + 128 * i - ABI_IMAGE_GPA     /* base 15:0 */
        .byte (ABI_IMAGE_GPA >> 16) & 0xFF      /* base 23:16 */
        .byte 0x89                      /* present, DPL 0, available TSS */
        .byte 0                         /* limit 19:16, flags */
        .byte (ABI_IMAGE_GPA >> 24) & 0xFF      /* base 31:24 */
        .long 0                         /* base 63:32 */
        .long 0
        .set i, i + 1
        .endr
gdt_end:

        /* one TSS per vCPU, 128-byte stride; only RSP0 matters (offset 4).
         * No I/O bitmap: ring 3 runs with IOPL=3. */
        .balign 128
        .globl tss
tss:
        .set i, 0
        .rept ABI_MAX_VCPUS
        .long 0
        .quad kstacks + KSTACK_SIZE * (i + 1) - 16      /* RSP0 */
        .fill 128 - 12, 1, 0
        .set i, i + 1
        .endr

        /* IDT, shared: 0..31 exceptions, 0x20 timer, 0xFF spurious,
         * anything else not present (arrives as #NP = exception 11). */
        .macro GATE handler
        .word \handler - ABI_IMAGE_GPA  /* offset 15:0 */
        .word KERNEL_CS
        .byte 0                         /* IST */
        .byte 0x8E                      /* present, DPL 0, interrupt gate */
        .word (ABI_IMAGE_GPA >> 16) & 0xFFFF    /* offset 31:16 */
        .long 0                         /* offset 63:32 */
        .long 0
        .endm

        .balign 16
idt:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        GATE exc\v
        .endr
        GATE timer_isr                  /* 0x20 */
        .fill (0xFF - 0x21) * 16, 1, 0  /* 0x21 .. 0xFE */
        GATE spurious_isr               /* 0xFF */
idt_end:

        .globl __ring0_tables_end
__ring0_tables_end:

        /* Page tables. PML4[0] -> pdpt. pdpt[0..4] -> pd_low (2 MiB pages
         * for the first 4 GiB, static) unless the BSP rewrites them as 1 GiB
         * pages; entries beyond 4 GiB are written at boot. */
        .balign 4096
pml4:
        .quad pdpt + PTE_TABLE
        .fill 511, 8, 0
pdpt:
        .quad pd_low + 0 * 4096 + PTE_TABLE
        .quad pd_low + 1 * 4096 + PTE_TABLE
        .quad pd_low + 2 * 4096 + PTE_TABLE
        .quad pd_low + 3 * 4096 + PTE_TABLE
        .fill 508, 8, 0
pd_low:
        .set a, 0
        .rept 3 * 512                   /* [0, 3 GiB): RAM */
        .quad a + PTE_LEAF
        .set a, a + 0x200000
        .endr
        .rept 512                       /* [3, 4 GiB): MMIO hole, LAPIC */
        .quad a + PTE_LEAF + PTE_PCD
        .set a, a + 0x200000
        .endr

/* ===================================================================== */
/* Uninitialised: stacks and the page directories above 4 GiB              */
/* (fresh guest RAM is zero; nothing here is read before it is written)   */
/* ===================================================================== */
        .section .bss.ring0, "aw", @nobits
        .balign 4096
pd_high:
        .skip 4096 * (MAX_GIB - 4)
kstacks:
        .skip KSTACK_SIZE * ABI_MAX_VCPUS
        .balign 16
ustacks:
        .skip USTACK_SIZE * ABI_MAX_VCPUS

        .section .note.GNU-stack, "", @progbits
