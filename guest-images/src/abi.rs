//! The contract between the VMM and the tiny guests, mirrored from
//! `guest/abi.h` (the C side). The test at the bottom parses the header and
//! fails if a constant differs, so the two cannot drift apart.

/// Guest-physical address of the PVH `hvm_start_info` the VMM writes.
pub const START_INFO_GPA: u64 = 0x1000;
/// One page: the command mailbox followed by one status block per vCPU.
pub const STATUS_GPA: u64 = 0x8_0000;
/// Where the guest ELF is linked.
pub const IMAGE_GPA: u64 = 0x10_0000;
/// One `u32` generation per working-set page, kept by the guest.
pub const GEN_TABLE_GPA: u64 = 0x40_0000;
/// First working-set page.
pub const WSET_GPA: u64 = 0x100_0000;
/// The RAM hole below 4 GiB where the LAPIC and IOAPIC live.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// Size of the RAM hole.
pub const MMIO_GAP_SIZE: u64 = 0x4000_0000;
/// xAPIC MMIO base.
pub const LAPIC_GPA: u64 = 0xFEE0_0000;
/// Guest page size: dirty logging and page patterns work at this grain.
pub const PAGE_SIZE: u64 = 4096;
/// Most vCPUs the guest supports (one status block each).
pub const MAX_VCPUS: u64 = 16;

/// Base port of the probe device.
pub const PROBE_BASE: u16 = 0x700;
/// Parameter indices: `IN` dword from `PROBE_BASE + 4 * k`.
pub mod param {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 1;
    pub const VCPUS: u64 = 2;
    pub const MEM_MIB: u64 = 3;
    pub const TSC_KHZ: u64 = 4;
    pub const WSET_MIB: u64 = 5;
    pub const WRITE_RATE: u64 = 6;
    pub const FILL_PCT: u64 = 7;
    pub const READ_RATE: u64 = 8;
    pub const READ_SET_MIB: u64 = 9;
    pub const CPU_LOAD_PCT: u64 = 10;
    pub const PATTERN: u64 = 11;
    pub const HB_US: u64 = 12;
    pub const TIMER_HZ: u64 = 13;
    pub const BPC: u64 = 14;
    pub const PERIOD_MS: u64 = 15;
    pub const IDLE: u64 = 16;
    pub const COUNT: u64 = 17;
}
/// What `IN` from parameter 0 returns when the probe exists.
pub const PROBE_MAGIC: u64 = 0x5052_4F42;
/// Version of this contract.
pub const VERSION: u64 = 2;
/// Pages are dirtied cyclically through the vCPU's slice (seed 002).
pub const PATTERN_SEQUENTIAL: u64 = 0;
/// Pages are dirtied in a pseudo-random order.
pub const PATTERN_RANDOM: u64 = 1;
/// With nothing due, a vCPU halts until its next timer tick.
pub const IDLE_HALT: u64 = 0;
/// With nothing due, a vCPU spins on `pause` (a guest that looks busy).
pub const IDLE_SPIN: u64 = 1;

/// `OUT` dword: low 32 bits of this vCPU's heartbeat count.
pub const PORT_HEARTBEAT: u16 = 0x780;
/// `OUT` dword: `(code << 24) | (arg & 0xFF_FFFF)`.
pub const PORT_EVENT: u16 = 0x784;
/// `OUT` dword, same value as [`PORT_HEARTBEAT`], sent by a halted vCPU at a
/// timer tick slower than its heartbeat interval: the next heartbeat may come
/// a whole tick later, and that is not a stall.
pub const PORT_HEARTBEAT_IDLE: u16 = 0x788;

/// Event codes sent to [`PORT_EVENT`].
pub mod event {
    pub const BOOTED: u64 = 1;
    pub const FILLED: u64 = 2;
    pub const VERIFY_OK: u64 = 3;
    pub const VERIFY_FAIL: u64 = 4;
    pub const FPU_FAIL: u64 = 5;
    pub const EXCEPTION: u64 = 6;
    pub const BAD_CONFIG: u64 = 7;
}

/// Mailbox offsets in the status page and the commands it carries.
pub mod mbox {
    pub const COMMAND_SEQ: u64 = 0;
    pub const COMMAND: u64 = 8;
    pub const CMD_NONE: u64 = 0;
    pub const CMD_VERIFY: u64 = 1;
}

/// Per-vCPU status block: offset of block `i` is `PERCPU_OFFSET + i * PERCPU_SIZE`.
pub const PERCPU_OFFSET: u64 = 128;
/// Size of one per-vCPU status block.
pub const PERCPU_SIZE: u64 = 128;
/// Field offsets (each a little-endian `u64`) in a per-vCPU status block.
pub mod percpu {
    pub const HEARTBEATS: u64 = 0;
    pub const TICKS: u64 = 8;
    pub const PAGES_WRITTEN: u64 = 16;
    pub const PAGES_READ: u64 = 24;
    pub const LOOPS: u64 = 32;
    pub const FPU_CHECKS: u64 = 40;
    pub const FPU_ERRORS: u64 = 48;
    pub const VERIFY_SEQ: u64 = 56;
    pub const VERIFY_OK: u64 = 64;
    pub const VERIFY_BAD: u64 = 72;
    pub const PHASE: u64 = 80;
    pub const EXC_VECTOR: u64 = 88;
    pub const EXC_RIP: u64 = 96;
    pub const READ_ERRORS: u64 = 104;
    pub const SLICE_PAGES: u64 = 112;
    pub const HALTS: u64 = 120;
}
/// Values of [`percpu::PHASE`].
pub mod phase {
    pub const BOOTING: u64 = 0;
    pub const FILLING: u64 = 1;
    pub const RUNNING: u64 = 2;
    pub const HALTED: u64 = 3;
}

/// Low half of the pattern-page magic.
pub const PAGE_MAGIC_LO: u64 = 0x5453_4547;
/// High half of the pattern-page magic.
pub const PAGE_MAGIC_HI: u64 = 0x4547_4150;
/// Words of a page after the header.
pub const PAGE_BODY_WORDS: u64 = 508;
/// Header words: magic, gpfn, generation, checksum.
pub const PAGE_HDR_WORDS: u64 = 4;

/// The deterministic page pattern. The guest's C code implements the same
/// functions (`guest/pattern.h`); the VMM uses these to check a page from
/// outside without asking the guest.
pub mod pattern {
    use super::{PAGE_BODY_WORDS, PAGE_HDR_WORDS, PAGE_MAGIC_HI, PAGE_MAGIC_LO};

    /// The full 64-bit magic in word 0 of every pattern page.
    pub const MAGIC: u64 = (PAGE_MAGIC_HI << 32) | PAGE_MAGIC_LO;
    /// Index of the checksum word.
    pub const CHECKSUM_WORD: usize = 3;

    /// splitmix64's finaliser: a cheap bijective mixer.
    pub fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Body word `i` of page `gpfn` at generation `gen`.
    pub fn word(gpfn: u64, gen: u64, i: u64) -> u64 {
        mix(gpfn
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(gen.wrapping_mul(0xD1B5_4A32_D192_ED03))
            .wrapping_add(i))
    }

    /// Checksum over all 512 words except the checksum word itself.
    pub fn checksum(words: &[u64; 512]) -> u64 {
        let mut c: u64 = 0x243F_6A88_85A3_08D3;
        for (j, w) in words.iter().enumerate() {
            if j != CHECKSUM_WORD {
                c = (c ^ w).wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
        mix(c)
    }

    /// Number of body words rewritten at each generation for `fill_pct`.
    pub fn fill_words(fill_pct: u64) -> u64 {
        PAGE_BODY_WORDS * fill_pct.clamp(1, 100) / 100
    }

    /// Builds the page the guest writes for (`gpfn`, `gen`, `fill_pct`).
    pub fn build(gpfn: u64, gen: u64, fill_pct: u64) -> [u64; 512] {
        let mut w = [0u64; 512];
        w[0] = MAGIC;
        w[1] = gpfn;
        w[2] = gen;
        for i in 0..fill_words(fill_pct) {
            w[(PAGE_HDR_WORDS + i) as usize] = word(gpfn, gen, i);
        }
        w[CHECKSUM_WORD] = checksum(&w);
        w
    }

    /// What a check of one page from outside found.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum PageCheck {
        /// Not a pattern page (code, tables, never written).
        NotPattern,
        /// A consistent pattern page at this generation.
        Good { generation: u64 },
        /// Carries the magic but its frame number, checksum or body is wrong.
        Corrupt,
    }

    /// Checks a page read from guest memory at frame `gpfn`. Only the header
    /// and checksum can be checked without knowing FILL; with `fill_pct`
    /// the body words are recomputed too.
    pub fn check(gpfn: u64, words: &[u64; 512], fill_pct: Option<u64>) -> PageCheck {
        if words[0] != MAGIC {
            return PageCheck::NotPattern;
        }
        if words[1] != gpfn || checksum(words) != words[CHECKSUM_WORD] {
            return PageCheck::Corrupt;
        }
        let generation = words[2];
        if let Some(fill) = fill_pct {
            let n = fill_words(fill);
            let body_ok = (0..PAGE_BODY_WORDS).all(|i| {
                let w = words[(PAGE_HDR_WORDS + i) as usize];
                if i < n {
                    w == word(gpfn, generation, i)
                } else {
                    w == 0
                }
            });
            if !body_ok {
                return PageCheck::Corrupt;
            }
        }
        PageCheck::Good { generation }
    }
}

/// Guest-physical address of working-set page `j` (the RAM hole is skipped).
pub fn wset_page_gpa(j: u64) -> u64 {
    let gpa = WSET_GPA + j * PAGE_SIZE;
    if gpa >= MMIO_GAP_START {
        gpa + MMIO_GAP_SIZE
    } else {
        gpa
    }
}

/// Offset of field `field` of vCPU `cpu`'s status block from [`STATUS_GPA`].
pub fn percpu_field(cpu: u64, field: u64) -> u64 {
    PERCPU_OFFSET + cpu * PERCPU_SIZE + field
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every `#define ABI_X value` in abi.h must equal the Rust constant.
    #[test]
    fn abi_header_matches_rust() {
        let header = include_str!("../guest/abi.h");
        let defines: HashMap<&str, u64> = header
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                (it.next()? == "#define").then_some(())?;
                let name = it.next()?.strip_prefix("ABI_")?;
                let v = it.next()?;
                let v = match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16).ok()?,
                    None => v.parse().ok()?,
                };
                Some((name, v))
            })
            .collect();
        let rust: &[(&str, u64)] = &[
            ("START_INFO_GPA", START_INFO_GPA),
            ("STATUS_GPA", STATUS_GPA),
            ("IMAGE_GPA", IMAGE_GPA),
            ("GEN_TABLE_GPA", GEN_TABLE_GPA),
            ("WSET_GPA", WSET_GPA),
            ("MMIO_GAP_START", MMIO_GAP_START),
            ("MMIO_GAP_SIZE", MMIO_GAP_SIZE),
            ("LAPIC_GPA", LAPIC_GPA),
            ("PAGE_SIZE", PAGE_SIZE),
            ("MAX_VCPUS", MAX_VCPUS),
            ("PROBE_BASE", PROBE_BASE.into()),
            ("PARAM_MAGIC", param::MAGIC),
            ("PARAM_VERSION", param::VERSION),
            ("PARAM_VCPUS", param::VCPUS),
            ("PARAM_MEM_MIB", param::MEM_MIB),
            ("PARAM_TSC_KHZ", param::TSC_KHZ),
            ("PARAM_WSET_MIB", param::WSET_MIB),
            ("PARAM_WRITE_RATE", param::WRITE_RATE),
            ("PARAM_FILL_PCT", param::FILL_PCT),
            ("PARAM_READ_RATE", param::READ_RATE),
            ("PARAM_READ_SET_MIB", param::READ_SET_MIB),
            ("PARAM_CPU_LOAD_PCT", param::CPU_LOAD_PCT),
            ("PARAM_PATTERN", param::PATTERN),
            ("PARAM_HB_US", param::HB_US),
            ("PARAM_TIMER_HZ", param::TIMER_HZ),
            ("PARAM_BPC", param::BPC),
            ("PARAM_PERIOD_MS", param::PERIOD_MS),
            ("PARAM_IDLE", param::IDLE),
            ("PARAM_COUNT", param::COUNT),
            ("PROBE_MAGIC", PROBE_MAGIC),
            ("VERSION", VERSION),
            ("PATTERN_SEQUENTIAL", PATTERN_SEQUENTIAL),
            ("PATTERN_RANDOM", PATTERN_RANDOM),
            ("IDLE_HALT", IDLE_HALT),
            ("IDLE_SPIN", IDLE_SPIN),
            ("PORT_HEARTBEAT", PORT_HEARTBEAT.into()),
            ("PORT_EVENT", PORT_EVENT.into()),
            ("PORT_HEARTBEAT_IDLE", PORT_HEARTBEAT_IDLE.into()),
            ("EVENT_BOOTED", event::BOOTED),
            ("EVENT_FILLED", event::FILLED),
            ("EVENT_VERIFY_OK", event::VERIFY_OK),
            ("EVENT_VERIFY_FAIL", event::VERIFY_FAIL),
            ("EVENT_FPU_FAIL", event::FPU_FAIL),
            ("EVENT_EXCEPTION", event::EXCEPTION),
            ("EVENT_BAD_CONFIG", event::BAD_CONFIG),
            ("MBOX_COMMAND_SEQ", mbox::COMMAND_SEQ),
            ("MBOX_COMMAND", mbox::COMMAND),
            ("CMD_NONE", mbox::CMD_NONE),
            ("CMD_VERIFY", mbox::CMD_VERIFY),
            ("PERCPU_OFFSET", PERCPU_OFFSET),
            ("PERCPU_SIZE", PERCPU_SIZE),
            ("PC_HEARTBEATS", percpu::HEARTBEATS),
            ("PC_TICKS", percpu::TICKS),
            ("PC_PAGES_WRITTEN", percpu::PAGES_WRITTEN),
            ("PC_PAGES_READ", percpu::PAGES_READ),
            ("PC_LOOPS", percpu::LOOPS),
            ("PC_FPU_CHECKS", percpu::FPU_CHECKS),
            ("PC_FPU_ERRORS", percpu::FPU_ERRORS),
            ("PC_VERIFY_SEQ", percpu::VERIFY_SEQ),
            ("PC_VERIFY_OK", percpu::VERIFY_OK),
            ("PC_VERIFY_BAD", percpu::VERIFY_BAD),
            ("PC_PHASE", percpu::PHASE),
            ("PC_EXC_VECTOR", percpu::EXC_VECTOR),
            ("PC_EXC_RIP", percpu::EXC_RIP),
            ("PC_READ_ERRORS", percpu::READ_ERRORS),
            ("PC_SLICE_PAGES", percpu::SLICE_PAGES),
            ("PC_HALTS", percpu::HALTS),
            ("PHASE_BOOTING", phase::BOOTING),
            ("PHASE_FILLING", phase::FILLING),
            ("PHASE_RUNNING", phase::RUNNING),
            ("PHASE_HALTED", phase::HALTED),
            ("PAGE_MAGIC_LO", PAGE_MAGIC_LO),
            ("PAGE_MAGIC_HI", PAGE_MAGIC_HI),
            ("PAGE_BODY_WORDS", PAGE_BODY_WORDS),
            ("PAGE_HDR_WORDS", PAGE_HDR_WORDS),
        ];
        for (name, value) in rust {
            assert_eq!(defines.get(name), Some(value), "ABI_{name} differs");
        }
        assert_eq!(defines.len(), rust.len(), "abi.h has a define abi.rs lacks");
    }

    #[test]
    fn built_page_checks_good_and_detects_flips() {
        let mut page = pattern::build(4242, 7, 60);
        assert_eq!(
            pattern::check(4242, &page, Some(60)),
            pattern::PageCheck::Good { generation: 7 }
        );
        assert_eq!(
            pattern::check(4243, &page, None),
            pattern::PageCheck::Corrupt
        );
        page[100] ^= 1;
        assert_eq!(
            pattern::check(4242, &page, None),
            pattern::PageCheck::Corrupt
        );
    }

    #[test]
    fn wset_pages_skip_the_mmio_hole() {
        let below = (MMIO_GAP_START - WSET_GPA) / PAGE_SIZE;
        assert_eq!(wset_page_gpa(below - 1), MMIO_GAP_START - PAGE_SIZE);
        assert_eq!(wset_page_gpa(below), MMIO_GAP_START + MMIO_GAP_SIZE);
    }
}
