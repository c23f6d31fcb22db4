/*
 * The ring-3 workload, one instance per vCPU (user_main, entered from
 * boot.S by iretq with RDI = vCPU index, IF=1, IOPL=3).
 *
 * See README.md for the whole picture and abi.h for the contract. In short:
 * read the probe parameters, fill this vCPU's slice of the working set with
 * generation-1 pattern pages, then loop forever: heartbeats, paced page
 * writes (rate or bursts) and reads, an ALU/pause mix for the CPU load,
 * FPU/SSE register invariant checks, and mailbox commands (verify).
 *
 * Everything here runs natively at CPL 3. The compiler is told
 * -mgeneral-regs-only, so xmm/x87 registers belong to user.S alone.
 */
#include "abi.h"
#include "pattern.h"
#include "rt.h"

/* ---- defaults when the probe device is absent (QEMU); -D can override them
 * for tests (boot.S has its own DEFAULT_MEM_MIB / DEFAULT_TIMER_HZ) ------- */
#ifndef DEF_VCPUS
#define DEF_VCPUS       1
#endif
#ifndef DEF_MEM_MIB
#define DEF_MEM_MIB     64
#endif
#define DEF_TSC_KHZ     2000000 /* a guess; calibrated against the LAPIC timer */
#ifndef DEF_WSET_MIB
#define DEF_WSET_MIB    8
#endif
#ifndef DEF_WRITE_RATE
#define DEF_WRITE_RATE  1000
#endif
#ifndef DEF_FILL_PCT
#define DEF_FILL_PCT    100
#endif
#ifndef DEF_READ_RATE
#define DEF_READ_RATE   1000
#endif
#ifndef DEF_CPU_LOAD
#define DEF_CPU_LOAD    10
#endif
#ifndef DEF_PATTERN
#define DEF_PATTERN     ABI_PATTERN_SEQUENTIAL
#endif
#ifndef DEF_BPC
#define DEF_BPC         0
#define DEF_PERIOD_MS   0
#endif
#ifndef DEF_HB_US
#define DEF_HB_US       1000
#endif
#define DEF_TIMER_HZ    100
#ifndef DEF_IDLE
#define DEF_IDLE        ABI_IDLE_HALT
#endif

#define MAX_GIB         64      /* boot.S maps at most 64 GiB */
#define MAX_TIMER_HZ    10000
#define CATCHUP_MS      10      /* most work done at once after a pause */
#define WORK_PER_LOOP   64      /* pages written (or read) per loop iteration */
#define IDLE_POLL_MS    100     /* an idle vCPU looks at its mailbox this often */

#define STATUS      ((volatile u64 *)ABI_STATUS_GPA)
#define GEN_TABLE   ((volatile u32 *)ABI_GEN_TABLE_GPA)
#define ST(v, f)    ((v)->st[(f) / 8])

struct vcpu {
	u64 consts[12] __attribute__((aligned(16))); /* xmm8..xmm13 */
	volatile u64 *st;       /* this vCPU's status block */
	u64 cpu, ncpu, probe;
	u64 p[ABI_PARAM_COUNT]; /* parameters as read (or defaulted) */

	u64 tsc_hz, ms_tsc, cap_tsc;
	u64 nfill, tail_mul;    /* body words per generation; CSUM_MUL^(508-nfill) */
	u64 slice_start, slice_pages, read_pages;

	u64 hb_tsc, last_hb;
	u64 last_now;
	u64 wrate, rrate, bpc, period_tsc, next_burst;
	u64 wacc, racc, wpend, rpend, wcap, rcap;
	u64 wcursor, rcursor, rng;
	u64 busy_tsc, slot_tsc, slot_start, alu;
	u64 tick_tsc, idle_ticks, halt_port; /* halting: tick length, ticks per idle halt */

	u64 fpu_n, fpu_reported;
	u64 last_seq;
	u64 read_errors_reported;

	/* no-probe (QEMU) reporting */
	u64 next_report, reports;
};

static void event(u64 code, u64 arg)
{
	outl(ABI_PORT_EVENT, (u32)((code << 24) | (arg & 0xFFFFFF)));
}

static void halt_forever(struct vcpu *v)
{
	ST(v, ABI_PC_PHASE) = ABI_PHASE_HALTED;
	for (;;)
		cpu_relax();
}

/* ---- heartbeat ----------------------------------------------------------- */

static void heartbeat_poll(struct vcpu *v, u64 now)
{
	if (now - v->last_hb < v->hb_tsc)
		return;
	/* keep the average interval; resync after a pause or a TSC jump */
	v->last_hb += v->hb_tsc;
	if (now - v->last_hb >= v->hb_tsc)
		v->last_hb = now;
	u64 hb = ST(v, ABI_PC_HEARTBEATS) + 1;
	ST(v, ABI_PC_HEARTBEATS) = hb;
	outl(ABI_PORT_HEARTBEAT, (u32)hb);
}

/* ---- FPU/SSE invariants (user.S) ------------------------------------------ */

void fpu_load(const u64 *consts, u64 n);
void fpu_step(void);
u64 fpu_check(const u64 *consts, u64 n);

static void fpu_init(struct vcpu *v)
{
	for (u64 k = 0; k < 12; k++)
		v->consts[k] = pat_mix(0xF00D0000UL + v->cpu * 64 + k);
	v->fpu_n = 0;
	fpu_load(v->consts, 0);
}

/* Check the invariants; returns the failure mask (0 = good). A failure is
 * counted once, reported by event once per vCPU life, and the registers are
 * then re-established so that FPU_ERRORS counts incidents. */
static u64 fpu_verify(struct vcpu *v)
{
	u64 m = fpu_check(v->consts, v->fpu_n);
	ST(v, ABI_PC_FPU_CHECKS) = ST(v, ABI_PC_FPU_CHECKS) + 1;
	if (m) {
		ST(v, ABI_PC_FPU_ERRORS) = ST(v, ABI_PC_FPU_ERRORS) + 1;
		if (!v->fpu_reported) {
			v->fpu_reported = 1;
			event(ABI_EVENT_FPU_FAIL, v->cpu);
		}
		kprintf("cpu%u: FPU/SSE state check FAILED, mask 0x%x at step %u\n",
			v->cpu, m, v->fpu_n);
		fpu_load(v->consts, v->fpu_n);
	}
	return m;
}

static void fpu_tick(struct vcpu *v)
{
	fpu_step();
	v->fpu_n++;
	fpu_verify(v);
}

/* ---- pages ---------------------------------------------------------------- */

/* Rewrite working-set page j at generation gen. While it is being written
 * word 0 is 0, so a check from outside sees "not a pattern page" rather
 * than a torn one; the gen table follows once the page is complete. With
 * `full` the words past FILL are zeroed too (generation 1), otherwise they
 * are known to be zero and only enter the checksum. */
static void write_page(struct vcpu *v, u64 j, u64 gen, int full)
{
	u64 gpa = wset_page_gpa(j);
	u64 gpfn = gpa / ABI_PAGE_SIZE;
	u64 *p = (u64 *)gpa;
	u64 *body = p + ABI_PAGE_HDR_WORDS;

	*(volatile u64 *)&p[0] = 0;
	barrier();
	u64 c = PAT_CSUM_INIT;
	c = pat_csum_step(c, PAT_MAGIC);
	c = pat_csum_step(c, gpfn);
	c = pat_csum_step(c, gen);
	for (u64 i = 0; i < v->nfill; i++) {
		u64 w = pat_word(gpfn, gen, i);
		body[i] = w;
		c = pat_csum_step(c, w);
	}
	if (full)
		for (u64 i = v->nfill; i < ABI_PAGE_BODY_WORDS; i++)
			body[i] = 0;
	c *= v->tail_mul; /* (c ^ 0) * MUL, once per zero word */
	p[1] = gpfn;
	p[2] = gen;
	p[PAT_CHECKSUM_WORD] = pat_mix(c);
	barrier();
	*(volatile u64 *)&p[0] = PAT_MAGIC;
	barrier();
	GEN_TABLE[j] = (u32)gen;
}

/* The read check: header, generation == gen table, checksum of all words. */
static int read_page_ok(u64 j)
{
	u64 gpa = wset_page_gpa(j);
	const volatile u64 *p = (const volatile u64 *)gpa;
	if (p[0] != PAT_MAGIC || p[1] != gpa / ABI_PAGE_SIZE || (u32)p[2] != GEN_TABLE[j])
		return 0;
	return pat_checksum(p) == p[PAT_CHECKSUM_WORD];
}

/* The verify check: the read check plus every body word. */
static int verify_page_ok(struct vcpu *v, u64 j)
{
	if (!read_page_ok(j))
		return 0;
	u64 gpa = wset_page_gpa(j);
	u64 gpfn = gpa / ABI_PAGE_SIZE;
	const volatile u64 *body = (const volatile u64 *)gpa + ABI_PAGE_HDR_WORDS;
	u64 gen = ((const volatile u64 *)gpa)[2];
	for (u64 i = 0; i < ABI_PAGE_BODY_WORDS; i++)
		if (body[i] != (i < v->nfill ? pat_word(gpfn, gen, i) : 0))
			return 0;
	return 1;
}

static u64 next_write_page(struct vcpu *v)
{
	u64 k;
	if (v->p[ABI_PARAM_PATTERN] == ABI_PATTERN_RANDOM) {
		/* xorshift64, then a multiply-shift to map onto the slice */
		v->rng ^= v->rng << 13;
		v->rng ^= v->rng >> 7;
		v->rng ^= v->rng << 17;
		k = (u64)(((v->rng >> 32) * v->slice_pages) >> 32);
	} else {
		k = v->wcursor;
		if (++v->wcursor >= v->slice_pages)
			v->wcursor = 0;
	}
	return v->slice_start + k;
}

static void do_write(struct vcpu *v)
{
	u64 j = next_write_page(v);
	write_page(v, j, (u64)GEN_TABLE[j] + 1, 0);
	ST(v, ABI_PC_PAGES_WRITTEN) = ST(v, ABI_PC_PAGES_WRITTEN) + 1;
}

static void do_read(struct vcpu *v)
{
	u64 j = v->slice_start + v->rcursor;
	if (++v->rcursor >= v->read_pages)
		v->rcursor = 0;
	if (!read_page_ok(j)) {
		ST(v, ABI_PC_READ_ERRORS) = ST(v, ABI_PC_READ_ERRORS) + 1;
		if (v->read_errors_reported < 8) {
			v->read_errors_reported++;
			kprintf("cpu%u: read check FAILED on wset page %u (gpa 0x%x)\n",
				v->cpu, j, wset_page_gpa(j));
		}
	}
	ST(v, ABI_PC_PAGES_READ) = ST(v, ABI_PC_PAGES_READ) + 1;
}

/* Full check of the slice (mailbox CMD_VERIFY, and periodically without a
 * probe). Heart-beats throughout. Returns the number of bad pages. */
static u64 verify_slice(struct vcpu *v, u64 *ok_out, u64 *fpu_bad)
{
	u64 ok = 0, bad = 0;
	for (u64 k = 0; k < v->slice_pages; k++) {
		if (verify_page_ok(v, v->slice_start + k))
			ok++;
		else
			bad++;
		heartbeat_poll(v, rdtsc());
	}
	*fpu_bad = fpu_verify(v) != 0;
	*ok_out = ok;
	return bad;
}

static void handle_verify(struct vcpu *v, u64 seq)
{
	u64 ok, fpu_bad;
	u64 bad = verify_slice(v, &ok, &fpu_bad);
	ST(v, ABI_PC_VERIFY_OK) = ok;
	ST(v, ABI_PC_VERIFY_BAD) = bad;
	barrier(); /* x86 keeps store order; the compiler must too */
	ST(v, ABI_PC_VERIFY_SEQ) = seq;
	if (bad == 0 && !fpu_bad)
		event(ABI_EVENT_VERIFY_OK, v->cpu);
	else
		event(ABI_EVENT_VERIFY_FAIL, bad > 0xFFFFFF ? 0xFFFFFF : bad);
}

static void mailbox_poll(struct vcpu *v)
{
	u64 seq = STATUS[ABI_MBOX_COMMAND_SEQ / 8];
	if (seq == v->last_seq)
		return;
	barrier();
	u64 cmd = STATUS[ABI_MBOX_COMMAND / 8];
	v->last_seq = seq;
	if (cmd == ABI_CMD_VERIFY)
		handle_verify(v, seq);
}

/* ---- parameters ------------------------------------------------------------ */

static void read_params(struct vcpu *v)
{
	if (inl(ABI_PROBE_BASE + 4 * ABI_PARAM_MAGIC) == ABI_PROBE_MAGIC) {
		v->probe = 1;
		for (u64 k = 0; k < ABI_PARAM_COUNT; k++)
			v->p[k] = inl((u16)(ABI_PROBE_BASE + 4 * k));
		return;
	}
	v->probe = 0;
	for (u64 k = 0; k < ABI_PARAM_COUNT; k++)
		v->p[k] = 0;
	v->p[ABI_PARAM_MAGIC] = ABI_PROBE_MAGIC;
	v->p[ABI_PARAM_VERSION] = ABI_VERSION;
	v->p[ABI_PARAM_VCPUS] = DEF_VCPUS;
	v->p[ABI_PARAM_MEM_MIB] = DEF_MEM_MIB;
	v->p[ABI_PARAM_TSC_KHZ] = DEF_TSC_KHZ;
	v->p[ABI_PARAM_WSET_MIB] = DEF_WSET_MIB;
	v->p[ABI_PARAM_WRITE_RATE] = DEF_WRITE_RATE;
	v->p[ABI_PARAM_FILL_PCT] = DEF_FILL_PCT;
	v->p[ABI_PARAM_READ_RATE] = DEF_READ_RATE;
	v->p[ABI_PARAM_CPU_LOAD_PCT] = DEF_CPU_LOAD;
	v->p[ABI_PARAM_PATTERN] = DEF_PATTERN;
	v->p[ABI_PARAM_BPC] = DEF_BPC;
	v->p[ABI_PARAM_PERIOD_MS] = DEF_PERIOD_MS;
	v->p[ABI_PARAM_HB_US] = DEF_HB_US;
	v->p[ABI_PARAM_TIMER_HZ] = DEF_TIMER_HZ;
	v->p[ABI_PARAM_IDLE] = DEF_IDLE;
}

/* Returns the index of the first rejected parameter, or -1. */
static long validate(const struct vcpu *v)
{
	const u64 *p = v->p;
	u64 wset_pages = p[ABI_PARAM_WSET_MIB] * 256;
	if (p[ABI_PARAM_VERSION] != ABI_VERSION)
		return ABI_PARAM_VERSION;
	if (p[ABI_PARAM_VCPUS] < 1 || p[ABI_PARAM_VCPUS] > ABI_MAX_VCPUS || v->cpu >= p[ABI_PARAM_VCPUS])
		return ABI_PARAM_VCPUS;
	/* RAM must hold everything below the working set; the page tables
	 * cover [0, 4 GiB + RAM) up to MAX_GIB */
	if (p[ABI_PARAM_MEM_MIB] < ABI_WSET_GPA / 0x100000 || p[ABI_PARAM_MEM_MIB] > (MAX_GIB - 4) * 1024)
		return ABI_PARAM_MEM_MIB;
	if (p[ABI_PARAM_TSC_KHZ] < 1000 || p[ABI_PARAM_TSC_KHZ] > 100000000)
		return ABI_PARAM_TSC_KHZ;
	/* the working set must fit in RAM above ABI_WSET_GPA (RAM offsets map
	 * to GPAs exactly as wset_page_gpa skips the hole), and its gen table
	 * below ABI_WSET_GPA */
	if (ABI_WSET_GPA / 0x100000 + p[ABI_PARAM_WSET_MIB] > p[ABI_PARAM_MEM_MIB] ||
	    wset_pages * 4 > ABI_WSET_GPA - ABI_GEN_TABLE_GPA)
		return ABI_PARAM_WSET_MIB;
	if (p[ABI_PARAM_FILL_PCT] < 1 || p[ABI_PARAM_FILL_PCT] > 100)
		return ABI_PARAM_FILL_PCT;
	if (p[ABI_PARAM_READ_SET_MIB] > p[ABI_PARAM_WSET_MIB])
		return ABI_PARAM_READ_SET_MIB;
	if (p[ABI_PARAM_CPU_LOAD_PCT] > 100)
		return ABI_PARAM_CPU_LOAD_PCT;
	if (p[ABI_PARAM_PATTERN] != ABI_PATTERN_SEQUENTIAL && p[ABI_PARAM_PATTERN] != ABI_PATTERN_RANDOM)
		return ABI_PARAM_PATTERN;
	if (p[ABI_PARAM_HB_US] < 1 || p[ABI_PARAM_HB_US] > 1000)
		return ABI_PARAM_HB_US;
	if (p[ABI_PARAM_TIMER_HZ] < 1 || p[ABI_PARAM_TIMER_HZ] > MAX_TIMER_HZ)
		return ABI_PARAM_TIMER_HZ;
	if (p[ABI_PARAM_BPC] != 0 && p[ABI_PARAM_PERIOD_MS] < 1)
		return ABI_PARAM_PERIOD_MS;
	if (p[ABI_PARAM_IDLE] != ABI_IDLE_HALT && p[ABI_PARAM_IDLE] != ABI_IDLE_SPIN)
		return ABI_PARAM_IDLE;
	return -1;
}

/* share of `total` that vCPU i of n gets: [i*total/n, (i+1)*total/n) */
static u64 share_start(u64 total, u64 i, u64 n) { return i * total / n; }
static u64 share_count(u64 total, u64 i, u64 n) { return (i + 1) * total / n - i * total / n; }

/* Without a probe the TSC frequency is a guess: measure it against 10 ticks
 * of the LAPIC timer (whose rate is known). Gives up after ~4e9 TSC cycles. */
static void calibrate_tsc(struct vcpu *v)
{
	u64 hz = v->p[ABI_PARAM_TIMER_HZ];
	u64 limit = rdtsc() + 4000000000UL;
	u64 t = ST(v, ABI_PC_TICKS);
	while (ST(v, ABI_PC_TICKS) == t)
		if ((i64)(rdtsc() - limit) > 0)
			goto fail;
	u64 t0 = rdtsc();
	t = ST(v, ABI_PC_TICKS);
	while (ST(v, ABI_PC_TICKS) < t + 10)
		if ((i64)(rdtsc() - limit) > 0)
			goto fail;
	u64 khz = (rdtsc() - t0) * hz / 10 / 1000;
	if (khz >= 1000) {
		v->p[ABI_PARAM_TSC_KHZ] = khz;
		return;
	}
fail:
	kprintf("workload: LAPIC timer not ticking? keeping tsc_khz guess %u\n",
		v->p[ABI_PARAM_TSC_KHZ]);
}

/* Set by boot.S when it mapped memory with 1 GiB pages. (Ring 3 does not ask
 * CPUID itself: on the PVM host, CPUID at CPL 3 is not trapped and returns
 * the host's values, not the ones the VMM configured.) */
extern const volatile u32 pt_1g_pages;

/* no-probe mode only: the BSP's TSC calibration, for the other vCPUs */
static volatile u64 calibrated_tsc_khz __attribute__((section(".data")));

static void banner(const struct vcpu *v)
{
	const u64 *p = v->p;
	kprintf("\nworkload guest (abi v%u): %s\n", (u64)ABI_VERSION,
		v->probe ? "probe present" : "no probe, defaults");
	kprintf("  vcpus=%u mem=%u MiB wset=%u MiB fill=%u%% pattern=%s\n",
		p[ABI_PARAM_VCPUS], p[ABI_PARAM_MEM_MIB], p[ABI_PARAM_WSET_MIB],
		p[ABI_PARAM_FILL_PCT], p[ABI_PARAM_PATTERN] ? "random" : "sequential");
	kprintf("  write_rate=%u/s read_rate=%u/s read_set=%u MiB bpc=%u period=%u ms load=%u%%\n",
		p[ABI_PARAM_WRITE_RATE], p[ABI_PARAM_READ_RATE], p[ABI_PARAM_READ_SET_MIB],
		p[ABI_PARAM_BPC], p[ABI_PARAM_PERIOD_MS], p[ABI_PARAM_CPU_LOAD_PCT]);
	kprintf("  hb=%u us timer=%u Hz tsc=%u kHz%s paging=%s\n",
		p[ABI_PARAM_HB_US], p[ABI_PARAM_TIMER_HZ], p[ABI_PARAM_TSC_KHZ],
		v->probe ? "" : " (calibrated)", pt_1g_pages ? "1GiB" : "2MiB");
}

/* ---- idling ------------------------------------------------------------------------ */

static void pause_burst(void)
{
	for (int i = 0; i < 8; i++)
		cpu_relax();
}

/* The LAPIC timer's initial count, which boot.S set to 1e9 / TIMER_HZ (KVM's
 * APIC clock runs at 1 GHz, divided by 1): the tick length in ns. */
extern const volatile u32 timer_count;
#define LAPIC_TICR ((volatile u32 *)(ABI_LAPIC_GPA + 0x380))

/* A halting vCPU sleeps from one timer tick to the next, so its tick is how
 * finely it can pace its work and how often it beats while halted:
 *   - vCPU 0 (the guest's clock, whose heartbeats measure downtime) and any
 *     vCPU with paced work or CPU load tick at least at the heartbeat rate;
 *   - a vCPU with nothing at all to do needs to wake only for its mailbox,
 *     every IDLE_POLL_MS, like a tickless (NOHZ) kernel's idle CPU.
 * Writing the initial count restarts the periodic timer with the new one
 * (one trapped MMIO store, once). */
static void choose_tick(struct vcpu *v)
{
	const u64 *p = v->p;
	u64 ns = timer_count, hb_ns = p[ABI_PARAM_HB_US] * 1000;
	if (p[ABI_PARAM_IDLE] == ABI_IDLE_HALT) {
		int busy = v->wrate || v->rrate || v->bpc || p[ABI_PARAM_CPU_LOAD_PCT];
		if (v->cpu == 0 || busy) {
			if (ns > hb_ns)
				ns = hb_ns;
		} else if (ns < IDLE_POLL_MS * 1000000UL) {
			ns = IDLE_POLL_MS * 1000000UL;
		}
		if (ns != timer_count)
			*LAPIC_TICR = (u32)ns;
	}
	v->tick_tsc = ns * p[ABI_PARAM_TSC_KHZ] / 1000000;
	if (v->tick_tsc == 0)
		v->tick_tsc = 1;
	v->idle_ticks = IDLE_POLL_MS * 1000000UL / ns;
	if (v->idle_ticks == 0)
		v->idle_ticks = 1;
	/* beats while halted: on the heartbeat port if they come at least every
	 * hb_us, else on the idle port, which tells the VMM that the gap after
	 * it is one tick of a vCPU with nothing to do, not a stall */
	v->halt_port = ns <= hb_ns ? ABI_PORT_HEARTBEAT : ABI_PORT_HEARTBEAT_IDLE;
}

/* Sleep until the TICKS count reaches `ticks` more than now, through the
 * halt door (boot.S): ring 3's HLT traps as #GP, ring 0 halts for real and
 * heart-beats on `halt_port` at each tick. Nothing of the workload is due
 * before then: the caller checked. */
static void halt_ticks(struct vcpu *v, u64 ticks)
{
	u64 target = ST(v, ABI_PC_TICKS) + ticks;
	ST(v, ABI_PC_HALTS) = ST(v, ABI_PC_HALTS) + 1;
	__asm__ volatile("hlt" : : "S"(target), "d"(v->halt_port) : "memory");
	/* ring 0 beat at every tick it woke for: the interval restarts now */
	v->last_hb = rdtsc();
}

/* Nothing due now. A vCPU with paced work or CPU load wakes at the next
 * tick (its pacing credit then covers the time it slept); an idle one
 * sleeps IDLE_POLL_MS worth of ticks, then polls its mailbox. */
static void idle(struct vcpu *v)
{
	if (v->p[ABI_PARAM_IDLE] == ABI_IDLE_SPIN) {
		pause_burst();
		return;
	}
	int paced = v->wrate || v->rrate || v->bpc || v->busy_tsc;
	halt_ticks(v, paced ? 1 : v->idle_ticks);
}

/* ---- the CPU-load filler ------------------------------------------------------ */

static void alu_burst(struct vcpu *v)
{
	u64 x = v->alu | 1;
	for (int i = 0; i < 256; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		x *= 0x2545F4914F6CDD1DUL;
	}
	v->alu = x;
}


/* ---- no-probe reporting (QEMU) -------------------------------------------------- */

static void report(struct vcpu *v)
{
	v->reports++;
	for (u64 c = 0; c < v->ncpu; c++) {
		const volatile u64 *st = STATUS + (ABI_PERCPU_OFFSET + c * ABI_PERCPU_SIZE) / 8;
		kprintf("[%4u s] cpu%u phase=%u ticks=%u hb=%u written=%u read=%u rd_err=%u loops=%u fpu=%u/%u err\n",
			v->reports, c, st[ABI_PC_PHASE / 8], st[ABI_PC_TICKS / 8], st[ABI_PC_HEARTBEATS / 8],
			st[ABI_PC_PAGES_WRITTEN / 8], st[ABI_PC_PAGES_READ / 8],
			st[ABI_PC_READ_ERRORS / 8], st[ABI_PC_LOOPS / 8],
			st[ABI_PC_FPU_CHECKS / 8], st[ABI_PC_FPU_ERRORS / 8]);
	}
#ifdef GUEST_SELFTEST
	/* TEST ONLY (-DGUEST_SELFTEST, never in the shipped image): inject
	 * faults the checks must catch, and drive the mailbox from inside. */
	if (v->reports == 2) {
		kprintf("selftest: clobbering xmm9\n");
		__asm__ volatile("pxor %%xmm9, %%xmm9" ::: "memory");
	} else if (v->reports == 3) {
		kprintf("selftest: clobbering x87 st(0)\n");
		__asm__ volatile("fld1; faddp %%st, %%st(1)" ::: "memory");
	} else if (v->reports == 4) {
		u64 j = v->slice_start + 7;
		((volatile u64 *)wset_page_gpa(j))[100] ^= 1;
		kprintf("selftest: flipped a bit in wset page %u: read check says %s\n",
			j, read_page_ok(j) ? "ok (WRONG)" : "bad (right)");
		STATUS[ABI_MBOX_COMMAND / 8] = ABI_CMD_VERIFY;
		barrier();
		STATUS[ABI_MBOX_COMMAND_SEQ / 8] = STATUS[ABI_MBOX_COMMAND_SEQ / 8] + 1;
	} else if (v->reports == 6) {
		u64 j = v->slice_start + 7;
		write_page(v, j, (u64)GEN_TABLE[j] + 1, 0);
		STATUS[ABI_MBOX_COMMAND_SEQ / 8] = STATUS[ABI_MBOX_COMMAND_SEQ / 8] + 1;
	}
	kprintf("  mailbox seq=%u; cpu0 verify_seq=%u ok=%u bad=%u\n",
		STATUS[ABI_MBOX_COMMAND_SEQ / 8], ST(v, ABI_PC_VERIFY_SEQ),
		ST(v, ABI_PC_VERIFY_OK), ST(v, ABI_PC_VERIFY_BAD));
#endif
	if (v->reports % 5 == 0) {
		u64 ok, fpu_bad;
		u64 t0 = rdtsc();
		u64 bad = verify_slice(v, &ok, &fpu_bad);
		kprintf("[%4u s] cpu0 self-verify: %u pages ok, %u bad, fpu %s (%u us)\n",
			v->reports, ok, bad, fpu_bad ? "BAD" : "ok",
			(rdtsc() - t0) / (v->tsc_hz / 1000000));
	}
}

/* ---- main --------------------------------------------------------------------- */

void user_main(u64 cpu);

void user_main(u64 cpu)
{
	struct vcpu vv;
	struct vcpu *v = &vv;
	memset(v, 0, sizeof(*v));
	v->cpu = cpu;
	v->st = STATUS + (ABI_PERCPU_OFFSET + cpu * ABI_PERCPU_SIZE) / 8;

	fpu_init(v);
	read_params(v);
	v->ncpu = v->p[ABI_PARAM_VCPUS];
	if (!v->probe) {
		/* the BSP measures, the others (QEMU SMP test builds) wait for it */
		if (cpu == 0) {
			calibrate_tsc(v);
			calibrated_tsc_khz = v->p[ABI_PARAM_TSC_KHZ];
		} else {
			while (!calibrated_tsc_khz)
				cpu_relax();
			v->p[ABI_PARAM_TSC_KHZ] = calibrated_tsc_khz;
		}
	}
	if (cpu == 0)
		banner(v);
	event(ABI_EVENT_BOOTED, cpu);

	long bad = validate(v);
	if (bad >= 0) {
		if (cpu == 0 || bad == ABI_PARAM_VCPUS) {
			kprintf("cpu%u: bad parameter %u (value %u): halting\n",
				cpu, (u64)bad, v->p[bad]);
			event(ABI_EVENT_BAD_CONFIG, (u64)bad);
		}
		halt_forever(v);
	}

	/* ---- derived settings ---- */
	const u64 *p = v->p;
	u64 n = v->ncpu;
	v->tsc_hz = p[ABI_PARAM_TSC_KHZ] * 1000;
	v->ms_tsc = p[ABI_PARAM_TSC_KHZ];
	v->cap_tsc = CATCHUP_MS * v->ms_tsc;
	v->hb_tsc = p[ABI_PARAM_HB_US] * p[ABI_PARAM_TSC_KHZ] / 1000;
	if (v->hb_tsc == 0)
		v->hb_tsc = 1;
	v->nfill = pat_fill_words(p[ABI_PARAM_FILL_PCT]);
	v->tail_mul = 1;
	for (u64 i = v->nfill; i < ABI_PAGE_BODY_WORDS; i++)
		v->tail_mul *= PAT_CSUM_MUL;

	u64 wset_pages = p[ABI_PARAM_WSET_MIB] * 256;
	v->slice_start = share_start(wset_pages, cpu, n);
	v->slice_pages = share_count(wset_pages, cpu, n);
	if (p[ABI_PARAM_READ_SET_MIB] == 0)
		v->read_pages = v->slice_pages;
	else
		v->read_pages = share_count(p[ABI_PARAM_READ_SET_MIB] * 256, cpu, n);
	if (v->read_pages > v->slice_pages)
		v->read_pages = v->slice_pages;

	/* per-vCPU rates: the whole-VM figures split like the slices */
	v->wrate = share_count(p[ABI_PARAM_WRITE_RATE], cpu, n);
	v->rrate = share_count(p[ABI_PARAM_READ_RATE], cpu, n);
	v->bpc = share_count(p[ABI_PARAM_BPC], cpu, n);
	v->period_tsc = p[ABI_PARAM_PERIOD_MS] * v->ms_tsc;
	v->wcap = v->wrate * CATCHUP_MS / 1000 + 1;
	v->rcap = v->rrate * CATCHUP_MS / 1000 + 1;
	if (v->slice_pages == 0)
		v->wrate = v->rrate = v->bpc = 0;
	if (v->read_pages == 0)
		v->rrate = 0;
	/* CPU load: busy for LOAD% of each slot; a slot is 1 ms when spinning
	 * and one timer tick when halting, so that the rest is one halt */
	choose_tick(v);
	v->slot_tsc = p[ABI_PARAM_IDLE] == ABI_IDLE_HALT ? v->tick_tsc : v->ms_tsc;
	v->busy_tsc = v->slot_tsc * p[ABI_PARAM_CPU_LOAD_PCT] / 100;
	v->rng = pat_mix(0x5EED0000UL + cpu) | 1;
	ST(v, ABI_PC_SLICE_PAGES) = v->slice_pages;

	/* ---- fill ---- */
	ST(v, ABI_PC_PHASE) = ABI_PHASE_FILLING;
	u64 now = rdtsc();
	v->last_hb = now;
	for (u64 k = 0; k < v->slice_pages; k++) {
		write_page(v, v->slice_start + k, 1, 1);
		heartbeat_poll(v, rdtsc());
	}
	event(ABI_EVENT_FILLED, cpu);
	ST(v, ABI_PC_PHASE) = ABI_PHASE_RUNNING;
	if (cpu == 0)
		kprintf("workload: cpu0 filled %u pages in %u ms (heartbeats %u, ticks %u), running\n",
			v->slice_pages, (rdtsc() - now) / v->ms_tsc,
			ST(v, ABI_PC_HEARTBEATS), ST(v, ABI_PC_TICKS));

	now = rdtsc();
	v->last_now = now;
	v->slot_start = now;
	v->next_burst = now + v->period_tsc;
	v->next_report = now + v->tsc_hz;

	for (;;) {
		now = rdtsc();
		u64 dt = now - v->last_now;
		if ((i64)dt < 0)
			dt = 0; /* TSC went backwards (other host): no credit */
		if (dt > v->cap_tsc)
			dt = v->cap_tsc; /* long pause: at most CATCHUP_MS of work */
		v->last_now = now;

		heartbeat_poll(v, now);
		mailbox_poll(v);

		/* ---- what is due ---- */
		if (v->bpc) {
			if ((i64)(now - v->next_burst) >= 0) {
				v->wpend = v->bpc; /* an unfinished burst is not carried over */
				v->next_burst += v->period_tsc;
				if ((i64)(now - v->next_burst) >= (i64)v->cap_tsc)
					v->next_burst = now + v->period_tsc;
			}
		} else if (v->wrate) {
			v->wacc += dt * v->wrate;
			u64 k = v->wacc / v->tsc_hz;
			v->wacc -= k * v->tsc_hz;
			v->wpend += k;
			if (v->wpend > v->wcap)
				v->wpend = v->wcap;
		}
		if (v->rrate) {
			v->racc += dt * v->rrate;
			u64 k = v->racc / v->tsc_hz;
			v->racc -= k * v->tsc_hz;
			v->rpend += k;
			if (v->rpend > v->rcap)
				v->rpend = v->rcap;
		}

		/* ---- page work, bounded per iteration ---- */
		for (u64 k = 0; v->wpend && k < WORK_PER_LOOP; k++) {
			do_write(v);
			v->wpend--;
			heartbeat_poll(v, rdtsc());
		}
		for (u64 k = 0; v->rpend && k < WORK_PER_LOOP; k++) {
			do_read(v);
			v->rpend--;
			heartbeat_poll(v, rdtsc());
		}

		fpu_tick(v);

		/* ---- CPU load: ALU for load% of each slot, idle for the rest ---- */
		if (!v->wpend && !v->rpend) {
			u64 pos = now - v->slot_start;
			if ((i64)pos < 0 || pos >= 2 * v->slot_tsc) {
				v->slot_start = now;
				pos = 0;
			} else if (pos >= v->slot_tsc) {
				v->slot_start += v->slot_tsc;
				pos -= v->slot_tsc;
			}
			if (pos < v->busy_tsc)
				alu_burst(v);
			else
				idle(v);
		}

		ST(v, ABI_PC_LOOPS) = ST(v, ABI_PC_LOOPS) + 1;

		if (!v->probe && cpu == 0 && (i64)(now - v->next_report) >= 0) {
			v->next_report += v->tsc_hz;
			if ((i64)(now - v->next_report) >= 0)
				v->next_report = now + v->tsc_hz;
			report(v);
		}
	}
}
