/*
 * Ring-3 assembly: the entry trampoline and the FPU/SSE invariant checks.
 * Runs natively at CPL 3, so any instruction is fine here.
 *
 * Register invariants kept across the whole life of a vCPU (the C code is
 * built with -mgeneral-regs-only, so the compiler never touches them):
 *   xmm8..xmm13  constants derived from the vCPU index (fpu_consts table)
 *   xmm14        (1, 1) as two qwords
 *   xmm15        (n, n): n = the FPU step counter kept in memory by the C code
 *   x87 st(0)    n as well; one value on the x87 stack (TOP = 7)
 *   x87 FCW      0x0F7F (round toward zero: not the fninit default)
 *   MXCSR        0xFF80 (FZ, round toward zero: not the reset default)
 */
        .text

/* Entered by iretq from ring 0: RDI = vCPU index, RSP 16-byte aligned. */
        .globl user_entry
user_entry:
        xor     %ebp, %ebp
        call    user_main
1:      jmp     1b

#define FCW_VALUE   0x0F7F
#define MXCSR_VALUE 0xFF80

/* void fpu_load(const u64 consts[12], u64 n): (re)establish the invariants. */
        .globl fpu_load
fpu_load:
        movdqa  0(%rdi), %xmm8
        movdqa  16(%rdi), %xmm9
        movdqa  32(%rdi), %xmm10
        movdqa  48(%rdi), %xmm11
        movdqa  64(%rdi), %xmm12
        movdqa  80(%rdi), %xmm13
        mov     $1, %eax
        movq    %rax, %xmm14
        punpcklqdq %xmm14, %xmm14
        movq    %rsi, %xmm15
        punpcklqdq %xmm15, %xmm15
        sub     $16, %rsp
        movl    $MXCSR_VALUE, (%rsp)
        ldmxcsr (%rsp)
        fninit
        movw    $FCW_VALUE, (%rsp)
        fldcw   (%rsp)
        mov     %rsi, (%rsp)
        fildq   (%rsp)                  /* exact: 64-bit significand */
        add     $16, %rsp
        ret

/* void fpu_step(void): xmm15 += (1, 1); st(0) += 1. */
        .globl fpu_step
fpu_step:
        paddq   %xmm14, %xmm15
        fld1
        faddp   %st, %st(1)
        ret

/*
 * u64 fpu_check(const u64 consts[12], u64 n): 0 if every invariant holds,
 * else a bit mask of what failed:
 *   bits 0..5  xmm8..xmm13 differ from consts
 *   bit 6      xmm14 != (1, 1)
 *   bit 7      xmm15 low qword != n      bit 8  xmm15 high qword != n
 *   bit 9      st(0) != n
 *   bit 10     x87 status: TOP != 7 or an exception flag set
 *   bit 11     x87 control word changed  bit 12 MXCSR changed
 * Uses xmm0 and the x87 stack temporarily (fld st(0); fistp).
 */
        .macro CHECKX reg, off, bit
        movdqa  \reg, %xmm0
        pcmpeqd \off(%rdi), %xmm0
        pmovmskb %xmm0, %ecx
        cmp     $0xFFFF, %ecx
        je      1f
        or      $(1 << \bit), %eax
1:
        .endm

        .globl fpu_check
fpu_check:
        xor     %eax, %eax
        CHECKX  %xmm8, 0, 0
        CHECKX  %xmm9, 16, 1
        CHECKX  %xmm10, 32, 2
        CHECKX  %xmm11, 48, 3
        CHECKX  %xmm12, 64, 4
        CHECKX  %xmm13, 80, 5
        /* xmm14 == (1, 1) */
        movq    %xmm14, %rcx
        cmp     $1, %rcx
        jne     2f
        pshufd  $0xEE, %xmm14, %xmm0
        movq    %xmm0, %rcx
        cmp     $1, %rcx
        je      3f
2:      or      $(1 << 6), %eax
3:      /* xmm15 == (n, n) */
        movq    %xmm15, %rcx
        cmp     %rsi, %rcx
        je      4f
        or      $(1 << 7), %eax
4:      pshufd  $0xEE, %xmm15, %xmm0
        movq    %xmm0, %rcx
        cmp     %rsi, %rcx
        je      5f
        or      $(1 << 8), %eax
5:      sub     $16, %rsp
        /* control word and MXCSR first: fistp below must not set flags */
        fnstcw  (%rsp)
        movzwl  (%rsp), %ecx
        cmp     $FCW_VALUE, %ecx
        je      6f
        or      $(1 << 11), %eax
6:      stmxcsr (%rsp)
        mov     (%rsp), %ecx
        cmp     $MXCSR_VALUE, %ecx
        je      7f
        or      $(1 << 12), %eax
7:      /* st(0) == n: copy it and store the copy as a 64-bit integer */
        fld     %st(0)
        fistpq  (%rsp)
        mov     (%rsp), %rcx
        cmp     %rsi, %rcx
        je      8f
        or      $(1 << 9), %eax
8:      /* status word: TOP (bits 13:11) == 7, no exception bits (7:0) */
        fnstsw  (%rsp)
        movzwl  (%rsp), %ecx
        and     $0x38FF, %ecx
        cmp     $0x3800, %ecx
        je      9f
        or      $(1 << 10), %eax
9:      add     $16, %rsp
        ret

        .section .note.GNU-stack, "", @progbits
