/*
 * The contract between the `vmm` and the tiny test guests.
 *
 * Every constant here has a twin in `guest-images/src/abi.rs`; the unit test
 * `abi_header_matches_rust` parses this file and fails if the two drift.
 * Only `#define NAME VALUE` lines are parsed, so keep values plain integers.
 *
 * ENTRY (PVH-compatible, see README "Entry contract"):
 *   32-bit protected mode, paging off, CS = flat 32-bit code, DS/ES/SS = flat
 *   data, EFLAGS = 0x2 (IF clear), EBX = guest-physical address of a PVH
 *   `hvm_start_info`. Our VMM starts *every* vCPU at this entry at once; a
 *   vCPU learns its index from CPUID.1:EBX[31:24] (initial APIC ID). Under
 *   QEMU only the BSP arrives (APs wait for a SIPI that never comes) and the
 *   probe device is absent: the guest then runs one vCPU with defaults.
 */
#ifndef GUEST_ABI_H
#define GUEST_ABI_H

/* ---- Guest-physical layout ------------------------------------------- */
#define ABI_START_INFO_GPA     0x1000      /* hvm_start_info written by the VMM */
#define ABI_STATUS_GPA         0x80000     /* one page: mailbox + per-vCPU status */
#define ABI_IMAGE_GPA          0x100000    /* ELF is linked here (1 MiB) */
#define ABI_GEN_TABLE_GPA      0x400000    /* u32 generation per working-set page */
#define ABI_WSET_GPA           0x1000000   /* first working-set page (16 MiB) */
#define ABI_MMIO_GAP_START     0xC0000000  /* RAM hole [3 GiB, 4 GiB) for LAPIC/IOAPIC */
#define ABI_MMIO_GAP_SIZE      0x40000000
#define ABI_LAPIC_GPA          0xFEE00000
#define ABI_PAGE_SIZE          4096
#define ABI_MAX_VCPUS          16

/* ---- Probe device: port I/O, 32-bit accesses ------------------------- */
#define ABI_PROBE_BASE         0x700
/* IN  dword from ABI_PROBE_BASE + 4*k: parameter k (ABI_PARAM_*). */
#define ABI_PARAM_MAGIC        0   /* reads ABI_PROBE_MAGIC when the probe exists */
#define ABI_PARAM_VERSION      1   /* ABI_VERSION */
#define ABI_PARAM_VCPUS        2   /* number of vCPUs started */
#define ABI_PARAM_MEM_MIB      3   /* RAM in MiB (the hole is extra) */
#define ABI_PARAM_TSC_KHZ      4   /* guest TSC frequency */
#define ABI_PARAM_WSET_MIB     5   /* working set, whole VM, MiB */
#define ABI_PARAM_WRITE_RATE   6   /* pages dirtied per second, whole VM */
#define ABI_PARAM_FILL_PCT     7   /* share of each page rewritten, 1..100 */
#define ABI_PARAM_READ_RATE    8   /* pages read (and checked) per second, whole VM */
#define ABI_PARAM_READ_SET_MIB 9   /* pages read are the first READ_SET of each vCPU's slice */
#define ABI_PARAM_CPU_LOAD_PCT 10  /* share of each ms spent in an ALU loop */
#define ABI_PARAM_PATTERN      11  /* ABI_PATTERN_* : order in which pages are dirtied */
#define ABI_PARAM_HB_US        12  /* heartbeat interval in microseconds (<= 1000) */
#define ABI_PARAM_TIMER_HZ     13  /* LAPIC periodic timer frequency */
#define ABI_PARAM_BPC          14  /* if non-zero: blocks dirtied per cycle ... */
#define ABI_PARAM_PERIOD_MS    15  /* ... every PERIOD ms (seed 002); overrides WRITE_RATE */
#define ABI_PARAM_IDLE         16  /* ABI_IDLE_* : what a vCPU does with nothing due */
#define ABI_PARAM_COUNT        17

#define ABI_PROBE_MAGIC        0x50524F42  /* "PROB" */
#define ABI_VERSION            2
#define ABI_PATTERN_SEQUENTIAL 0           /* cyclic over the slice, as seed 002 */
#define ABI_PATTERN_RANDOM     1
#define ABI_IDLE_HALT          0           /* halt until the next timer tick */
#define ABI_IDLE_SPIN          1           /* spin on `pause` (a busy guest) */

/* OUT dword to these ports: */
#define ABI_PORT_HEARTBEAT     0x780       /* value = low 32 bits of this vCPU's heartbeat count */
#define ABI_PORT_EVENT         0x784       /* value = (code << 24) | (arg & 0xFFFFFF) */
/* A heartbeat sent by a halted vCPU at a timer tick slower than its
 * heartbeat interval: the next one may come a whole tick later. Same value. */
#define ABI_PORT_HEARTBEAT_IDLE 0x788

#define ABI_EVENT_BOOTED       1   /* arg = vCPU index, now in ring 3 */
#define ABI_EVENT_FILLED       2   /* arg = vCPU index, its slice carries generation 1 */
#define ABI_EVENT_VERIFY_OK    3   /* arg = vCPU index */
#define ABI_EVENT_VERIFY_FAIL  4   /* arg = number of bad pages (saturating) */
#define ABI_EVENT_FPU_FAIL     5   /* arg = vCPU index */
#define ABI_EVENT_EXCEPTION    6   /* arg = vector; RIP in the status block */
#define ABI_EVENT_BAD_CONFIG   7   /* arg = parameter index that was rejected */

/* ---- Status page at ABI_STATUS_GPA ----------------------------------- */
/* Mailbox (offset 0), written by the VMM, polled by every vCPU in ring 3. */
#define ABI_MBOX_COMMAND_SEQ   0   /* u64: bumped by the VMM for each new command */
#define ABI_MBOX_COMMAND       8   /* u64: ABI_CMD_* */
#define ABI_CMD_NONE           0
#define ABI_CMD_VERIFY         1   /* verify own slice + FPU, then report */

/* Per-vCPU block i at ABI_STATUS_GPA + ABI_PERCPU_OFFSET + i*ABI_PERCPU_SIZE,
 * each field a u64 written only by that vCPU (ticks: by its timer ISR). */
#define ABI_PERCPU_OFFSET      128
#define ABI_PERCPU_SIZE        128
#define ABI_PC_HEARTBEATS      0
#define ABI_PC_TICKS           8
#define ABI_PC_PAGES_WRITTEN   16
#define ABI_PC_PAGES_READ      24
#define ABI_PC_LOOPS           32
#define ABI_PC_FPU_CHECKS      40
#define ABI_PC_FPU_ERRORS      48
#define ABI_PC_VERIFY_SEQ      56  /* command_seq of the last verify handled */
#define ABI_PC_VERIFY_OK       64  /* pages found good by that verify */
#define ABI_PC_VERIFY_BAD      72  /* pages found bad by that verify */
#define ABI_PC_PHASE           80  /* ABI_PHASE_* */
#define ABI_PC_EXC_VECTOR      88
#define ABI_PC_EXC_RIP         96
#define ABI_PC_READ_ERRORS     104 /* pages whose checksum failed on a read */
#define ABI_PC_SLICE_PAGES     112 /* working-set pages owned by this vCPU */
#define ABI_PC_HALTS           120 /* times this vCPU halted (ring-3 requests) */

#define ABI_PHASE_BOOTING      0
#define ABI_PHASE_FILLING      1
#define ABI_PHASE_RUNNING      2
#define ABI_PHASE_HALTED       3

/* ---- Pattern page (every working-set page) --------------------------- */
/* u64 words: [0] magic, [1] guest page frame number, [2] generation,
 * [3] checksum of every other word, [4 .. 4+fill_words) pattern_word(gpfn,
 * gen, i), the rest 0. fill_words = (ABI_PAGE_BODY_WORDS * FILL_PCT) / 100.
 * The checksum and pattern_word functions are defined in guest-images/src/abi.rs
 * (pattern module) and mirrored in the guest's C code; the VMM uses the Rust
 * versions to check any page from outside. */
#define ABI_PAGE_MAGIC_LO      0x54534547  /* "GEST" ... */
#define ABI_PAGE_MAGIC_HI      0x45474150  /* ... "PAGE": magic = HI << 32 | LO */
#define ABI_PAGE_BODY_WORDS    508
#define ABI_PAGE_HDR_WORDS     4

#endif
