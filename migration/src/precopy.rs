//! Pre-copy: copy memory while the guest runs, in rounds.
//!
//! Dirty logging is switched on *before* round 0 reads anything, so every
//! write the guest makes after a page was read is caught. Round 0 sends all
//! populated memory (memfd holes are never read); each later round sends the
//! pages KVM's dirty log (OR'd with the VMM's own writes) reports for the
//! previous round. After each round the engine decides whether to stop:
//!
//! 1. `converged`: nothing was dirtied;
//! 2. `downtime`: dirtied bytes / bandwidth measured in this round ≤ the
//!    downtime limit (QEMU's and Cloud Hypervisor's rule, 300 ms default);
//! 3. `max_rounds`: the round cap was reached (Xen's rule, seeds 002–003);
//! 4. `max_bytes`: the bytes-sent cap was reached (Xen's other rule).
//!
//! The pages dirtied in the last running round are sent by stop-and-copy.
//!
//! A guest that dirties memory faster than the link carries it never meets
//! rule 2: every round re-sends about as much as the one before, and only
//! rules 3 and 4 end pre-copy, with a downtime of a whole working set over
//! the link (seed 002's "jump"). With `auto_converge` the engine then
//! throttles the vCPUs as QEMU does ([`Throttle`]): the guest runs less, so
//! it dirties less, until a round fits the downtime limit. With
//! `skip_redirtied` a round also leaves out the pages the guest dirtied
//! again before the round reached them (Xen's "to skip"), since the next
//! round sends them anyway: fewer bytes, the same dirty set at the end.

use std::time::Instant;

use crate::codec::PAGE;
use crate::endpoint::SourceVm;
use crate::protocol::{encode_round_end, Kind};
use crate::report::Round;
use crate::source::{set_progress, vm_err, MigrationError, Options, PageSender};

/// What pre-copy hands to stop-and-copy.
#[derive(Debug)]
pub struct PrecopyOutcome {
    pub rounds: Vec<Round>,
    /// Pages dirtied during the last round, still to be sent.
    pub dirty: Vec<u64>,
    pub stop_rule: &'static str,
    pub bytes_raw: u64,
    /// Hybrid: the pages pre-copy was responsible for (the V1 share).
    pub share: Option<Vec<u64>>,
}

/// Auto-converge, QEMU's policy: a round that dirtied more than half of
/// what it sent is "high"; after two high rounds the vCPUs are throttled
/// to 20 %, and after every two more by 10 points more, up to 99 %.
#[derive(Debug, Default)]
pub struct Throttle {
    high_rounds: u32,
    pct: u8,
}

impl Throttle {
    const INITIAL: u8 = 20;
    const STEP: u8 = 10;
    const MAX: u8 = 99;
    /// Dirtied bytes above this share of the bytes sent make a round high.
    const HIGH_SHARE: f64 = 0.5;

    /// Takes a finished round's figures; returns the new throttle level if
    /// it changes.
    pub fn after_round(&mut self, sent_bytes: u64, dirtied_bytes: u64) -> Option<u8> {
        if dirtied_bytes as f64 <= sent_bytes as f64 * Self::HIGH_SHARE {
            return None;
        }
        self.high_rounds += 1;
        if self.high_rounds < 2 {
            return None;
        }
        self.high_rounds = 0;
        let next = match self.pct {
            0 => Self::INITIAL,
            p => p.saturating_add(Self::STEP).min(Self::MAX),
        };
        (next != self.pct).then(|| {
            self.pct = next;
            next
        })
    }

    /// The current level, in percent.
    pub fn pct(&self) -> u8 {
        self.pct
    }
}

/// Runs of set bits in `bitmap`, as `(first_page, count)`.
pub fn runs(bitmap: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut i = 0u64;
    let total = bitmap.len() as u64 * 64;
    std::iter::from_fn(move || {
        while i < total {
            let w = bitmap[(i / 64) as usize] >> (i % 64);
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            i += u64::from(w.trailing_zeros());
            let start = i;
            while i < total && bitmap[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                i += 1;
            }
            return Some((start, i - start));
        }
        None
    })
}

/// The RAM the guest ever wrote, as page runs (memfd holes are left out).
pub fn populated_pages<V: SourceVm>(vm: &V) -> Result<Vec<(u64, u64)>, MigrationError> {
    Ok(vm
        .populated_ranges()
        .map_err(vm_err("find populated memory"))?
        .into_iter()
        .map(|(off, len)| (off / PAGE as u64, len.div_ceil(PAGE as u64)))
        .collect())
}

/// At most `max` runs covering `runs`: runs separated by gaps smaller than
/// a limit are merged, the limit doubling until they fit. Exact when `runs`
/// already fit; otherwise covers a few pages more (fine for a hint).
pub fn coarsen(runs: &[(u64, u64)], max: usize) -> Vec<(u64, u64)> {
    let mut gap = 0u64;
    loop {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(f, n) in runs {
            match out.last_mut() {
                Some((lf, ln)) if f <= *lf + *ln + gap => *ln = (f + n).max(*lf + *ln) - *lf,
                _ => out.push((f, n)),
            }
        }
        if out.len() <= max {
            return out;
        }
        gap = (gap * 2).max(1);
    }
}

/// Number of set bits.
pub fn count(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// How many pages a round sends between two looks at the dirty log when
/// it skips re-dirtied pages (4 MiB, as Xen).
const PEEK_PAGES: u64 = 1024;

/// Xen's "to skip" list: a page the guest dirtied again since this round
/// began will be sent by the next round anyway, so sending it now is
/// wasted. Every [`PEEK_PAGES`] pages the dirty log is read and OR'd into
/// `seen` (so that nothing read is lost: the caller adds `seen` to the
/// round's dirty set), and pages set there are skipped.
struct Redirtied<'a> {
    seen: &'a mut [u64],
    since_peek: u64,
    skipped: u64,
}

impl Redirtied<'_> {
    /// The parts of run `(first, n)` to send now.
    fn filter<V: SourceVm>(
        &mut self,
        vm: &V,
        first: u64,
        n: u64,
    ) -> Result<Vec<(u64, u64)>, MigrationError> {
        if self.since_peek >= PEEK_PAGES {
            let fresh = vm
                .take_dirty_bitmap()
                .map_err(vm_err("read the dirty log"))?;
            self.seen.iter_mut().zip(&fresh).for_each(|(s, f)| *s |= f);
            self.since_peek = 0;
        }
        let clean = |p: u64| self.seen[(p / 64) as usize] & (1 << (p % 64)) == 0;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in (first..first + n).filter(|&p| clean(p)) {
            match out.last_mut() {
                Some((f, k)) if *f + *k == p => *k += 1,
                _ => out.push((p, 1)),
            }
        }
        let kept: u64 = out.iter().map(|r| r.1).sum();
        self.skipped += n - kept;
        self.since_peek += n;
        Ok(out)
    }
}

/// Sends one round: the given page runs, then `RoundEnd`. With `redirtied`
/// (a bitmap, zero at the start of the round), pages the guest dirties
/// again meanwhile are skipped and left set there.
pub fn send_round<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    round: u32,
    page_runs: &[(u64, u64)],
    paused: bool,
    redirtied: Option<&mut [u64]>,
) -> Result<Round, MigrationError> {
    let t = Instant::now();
    let wire0 = s.out.bytes;
    let stats0 = s.enc.stats;
    let total: u64 = page_runs.iter().map(|r| r.1).sum();
    set_progress(&s.progress, |p| {
        p.phase = if paused {
            "stop-and-copy".into()
        } else {
            "pre-copy".into()
        };
        p.round = round;
        p.round_pages_sent = 0;
        p.round_pages_total = total;
    });
    let mut redirtied = redirtied.map(|seen| Redirtied {
        seen,
        since_peek: 0,
        skipped: 0,
    });
    for &(first, n) in page_runs {
        let Some(rd) = redirtied.as_mut() else {
            s.send_run(first, n)?;
            continue;
        };
        for chunk in (first..first + n).step_by(PEEK_PAGES as usize) {
            let len = (first + n - chunk).min(PEEK_PAGES);
            for (f, k) in rd.filter(s.vm, chunk, len)? {
                s.send_run(f, k)?;
            }
        }
    }
    s.flush_batch()?;
    s.send(Kind::RoundEnd, &encode_round_end(round))?;
    s.flush()?;
    let mut r = s.stream();
    let ack = crate::protocol::read_frame(&mut r)?.expect(Kind::RoundAck)?;
    if crate::protocol::decode_round_end(&ack)? != round {
        return Err(crate::protocol::malformed("RoundAck", "wrong round").into());
    }
    let st = s.enc.stats;
    let duration = t.elapsed().as_secs_f64();
    let bytes = s.out.bytes - wire0;
    Ok(Round {
        round,
        pages: st.pages - stats0.pages,
        zero_pages: st.zero_pages - stats0.zero_pages,
        lz4_pages: st.lz4_pages - stats0.lz4_pages,
        bytes,
        duration_ms: duration * 1e3,
        bandwidth_mb_s: bytes as f64 / duration.max(1e-9) / 1e6,
        paused,
        skipped_pages: redirtied.map_or(0, |rd| rd.skipped),
        ..Default::default()
    })
}

/// The first `budget` bytes of `ranges` (page runs), and their bitmap.
fn take_share(ranges: &[(u64, u64)], budget: u64, words: usize) -> (Vec<(u64, u64)>, Vec<u64>) {
    let mut left = budget.div_ceil(PAGE as u64);
    let mut out = Vec::new();
    let mut mask = vec![0u64; words];
    for &(f, n) in ranges {
        if left == 0 {
            break;
        }
        let k = n.min(left);
        out.push((f, k));
        for p in f..f + k {
            mask[(p / 64) as usize] |= 1 << (p % 64);
        }
        left -= k;
    }
    (out, mask)
}

/// Runs pre-copy rounds until a stop rule fires. With `share` (hybrid),
/// only that many bytes of memory are pre-copied, rounds re-send only pages
/// of that share, and the stop rule is the model's threshold l instead of
/// the downtime estimate (the dirty rest is post-copied, not sent while
/// the guest is stopped).
pub fn run_rounds<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    opts: &Options,
    share: Option<u64>,
) -> Result<PrecopyOutcome, MigrationError> {
    s.vm.start_dirty_log()
        .map_err(vm_err("start dirty logging"))?;
    let populated = populated_pages(s.vm)?;
    let words = (s.vm.ram_size() / PAGE as u64).div_ceil(64) as usize;
    let (mut page_runs, mask) = match share {
        Some(bytes) => {
            let (r, m) = take_share(&populated, bytes, words);
            (r, Some(m))
        }
        None => (populated, None),
    };
    let mut rounds = Vec::new();
    let mut bandwidth = f64::INFINITY;
    // Throttling serves the downtime rule; hybrid post-copies its dirty rest.
    let mut throttle = (opts.auto_converge && mask.is_none()).then(Throttle::default);
    let mut redirtied = opts.skip_redirtied.then(|| vec![0u64; words]);
    for round in 0.. {
        let mut r = send_round(s, round, &page_runs, false, redirtied.as_deref_mut())?;
        r.throttle_pct = throttle.as_ref().map_or(0, Throttle::pct);
        let mut dirty =
            s.vm.take_dirty_bitmap()
                .map_err(vm_err("read the dirty log"))?;
        if let Some(seen) = redirtied.as_mut() {
            // Skipped pages are still dirty: they go with the next round.
            dirty.iter_mut().zip(seen.iter()).for_each(|(d, s)| *d |= s);
            seen.fill(0);
        }
        // Only the share's pages are pre-copy's business.
        let relevant: Vec<u64> = match &mask {
            Some(m) => dirty.iter().zip(m).map(|(d, m)| d & m).collect(),
            None => dirty.clone(),
        };
        let dirtied = count(&relevant);
        let secs = r.duration_ms / 1e3;
        if r.bytes > 0 && secs > 0.0 {
            bandwidth = r.bytes as f64 / secs;
        }
        r.dirtied_pages = count(&dirty);
        r.dirty_rate_pages_s = r.dirtied_pages as f64 / secs.max(1e-9);
        r.estimated_downtime_ms = dirtied as f64 * PAGE as f64 / bandwidth * 1e3;
        let est_ms = r.estimated_downtime_ms;
        let r_bytes = r.bytes;
        rounds.push(r);
        let sent = s.out.bytes;
        let rule = if dirtied == 0 {
            Some("converged")
        } else if mask.is_some() && dirtied * PAGE as u64 <= opts.threshold {
            Some("threshold")
        } else if mask.is_none() && est_ms <= opts.max_downtime.as_secs_f64() * 1e3 {
            Some("downtime")
        } else if round + 1 >= opts.max_rounds {
            Some("max_rounds")
        } else if sent >= opts.max_bytes {
            Some("max_bytes")
        } else {
            None
        };
        if let Some(stop_rule) = rule {
            tracing::info!("pre-copy stops after round {round}: {stop_rule}");
            if mask.is_some() {
                dirty = relevant;
            }
            return Ok(PrecopyOutcome {
                rounds,
                dirty,
                stop_rule,
                bytes_raw: s.enc.stats.bytes_raw,
                share: mask,
            });
        }
        if let Some(pct) = throttle
            .as_mut()
            .and_then(|t| t.after_round(r_bytes, dirtied * PAGE as u64))
        {
            tracing::info!("auto-converge: vCPUs throttled to {pct} %");
            s.vm.set_throttle(pct);
        }
        page_runs = runs(&relevant).collect();
    }
    unreachable!("the round loop only ends by returning")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_bits() {
        let bm = [0b1110_0110u64, 1 << 63, 1];
        let r: Vec<_> = runs(&bm).collect();
        assert_eq!(r, vec![(1, 2), (5, 3), (127, 2)]);
        assert_eq!(count(&bm), 7);
        assert_eq!(runs(&[0, 0]).count(), 0);
    }

    #[test]
    fn throttle_steps_up_after_every_two_high_rounds() {
        let mut t = Throttle::default();
        // Dirtied ≤ half of what was sent: never throttled.
        for _ in 0..5 {
            assert_eq!(t.after_round(100, 50), None);
        }
        assert_eq!(t.after_round(100, 60), None);
        assert_eq!(t.after_round(100, 60), Some(20));
        assert_eq!(t.after_round(100, 60), None);
        assert_eq!(t.after_round(100, 60), Some(30));
        for _ in 0..40 {
            t.after_round(100, 100);
        }
        assert_eq!(t.pct(), 99, "capped");
        assert_eq!(t.after_round(100, 100), None);
        assert_eq!(t.after_round(100, 100), None, "no change past the cap");
    }

    #[test]
    fn coarsened_runs_cover_the_originals() {
        let r = [(0, 2), (3, 1), (10, 5), (40, 1)];
        assert_eq!(coarsen(&r, 4), r.to_vec());
        assert_eq!(coarsen(&r, 3), vec![(0, 4), (10, 5), (40, 1)]);
        assert_eq!(coarsen(&r, 1), vec![(0, 41)]);
        assert!(coarsen(&[], 1).is_empty());
    }
}
