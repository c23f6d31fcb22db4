//! Pre-copy: copy memory while the guest runs, in rounds.
//!
//! Dirty logging is switched on *before* round 0 reads anything, so every
//! write the guest makes after a page was read is caught. Round 0 sends all
//! populated memory (memfd holes are never read); each later round sends the
//! pages KVM's dirty log (OR'd with the VMM's own writes) reports for the
//! previous round. This module measures and sends; the [`Policy`] decides:
//! before each round whether to skip re-dirtied pages, after it whether to
//! go on (and how hard to throttle the vCPUs), stop and copy, or switch to
//! post-copy (see `policy::stop_rules` for the rules and why).
//!
//! The pages dirtied in the last running round are sent by stop-and-copy.
//!
//! Skipping re-dirtied pages (Xen's "to skip") leaves out of a round the
//! pages the guest dirtied again before the round reached them, since the
//! next round sends them anyway: fewer bytes, the same dirty set at the end.

use std::time::Instant;

use crate::bitmap::DirtyBitmap;
use crate::codec::PAGE;
use crate::endpoint::SourceVm;
use crate::error::{vm_err, MigrationError};
use crate::events::EventKind;
use crate::policy::{AfterRound, History, Policy, Skip, Start, StopRule, Throttle};
use crate::protocol::{encode_round_end, Kind};
use crate::report::Round;
use crate::sender::{set_progress, PageSender};
use crate::state::{SourceEvent, SourcePhase};

/// What pre-copy hands to the switch-over.
#[derive(Debug)]
pub struct PrecopyOutcome {
    pub rounds: Vec<Round>,
    /// Pages of pre-copy's set dirtied during the last round, still to be
    /// sent.
    pub dirty: DirtyBitmap,
    pub stop_rule: StopRule,
    /// Whether the policy chose post-copy for what is left.
    pub postcopy: bool,
    /// The pages pre-copy was responsible for (all populated memory, or the
    /// hybrid's share V1).
    pub covered: DirtyBitmap,
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

/// What the source must deliver: the RAM the guest wrote, and every page
/// `Config` declared (a coarsened hint may cover a few never-written pages:
/// they go as zero pages, so that the destination's check holds).
pub fn pages_to_deliver<V: SourceVm>(
    vm: &V,
    declared: &[(u64, u64)],
) -> Result<Vec<(u64, u64)>, MigrationError> {
    let populated = populated_pages(vm)?;
    if declared.is_empty() {
        return Ok(populated);
    }
    let mut all = DirtyBitmap::from_runs(vm.ram_size() / PAGE as u64, &populated);
    all.union_with(&DirtyBitmap::from_runs(all.capacity(), declared));
    Ok(all.runs().collect())
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

/// How many pages a round sends between two looks at the dirty log when
/// it skips re-dirtied pages (4 MiB, as Xen).
const PEEK_PAGES: u64 = 1024;

/// Xen's "to skip" list: a page the guest dirtied again since this round
/// began will be sent by the next round anyway, so sending it now is
/// wasted. Every [`PEEK_PAGES`] pages the dirty log is read and added to
/// `seen` (so that nothing read is lost: the caller adds `seen` to the
/// round's dirty set), and pages in `seen` are skipped.
struct Redirtied<'a> {
    seen: &'a mut DirtyBitmap,
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
            self.seen.union_with(&DirtyBitmap::from_words(fresh));
            self.since_peek = 0;
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in (first..first + n).filter(|&p| !self.seen.contains(p)) {
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
/// (empty at the start of the round), pages the guest dirties again
/// meanwhile are skipped and left there.
pub fn send_round<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    round: u32,
    page_runs: &[(u64, u64)],
    paused: bool,
    redirtied: Option<&mut DirtyBitmap>,
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

/// Takes the limits changed since the migration began (`asked` are the
/// ones it began with) into `history`, where the policy reads them; a
/// throttle is lifted when auto-converge was switched off.
fn apply_parameters<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    history: &mut History,
    asked: &crate::report::Limits,
    throttle_pct: &mut u8,
) {
    history.limits = s.control.changes().apply(asked);
    if !history.limits.auto_converge && *throttle_pct > 0 {
        s.vm.set_throttle(0);
        *throttle_pct = 0;
    }
    set_progress(&s.progress, |p| p.limits = Some(history.limits.clone()));
}

/// The policy's `decision`, unless the user asked for post-copy
/// (`migrate_start_postcopy`), which overrides it.
fn requested_postcopy<V: SourceVm>(s: &PageSender<'_, V>, decision: AfterRound) -> AfterRound {
    match decision {
        AfterRound::PostCopy { .. } => decision,
        _ if s.control.postcopy_requested() => AfterRound::PostCopy {
            rule: StopRule::Requested,
        },
        _ => decision,
    }
}

/// Puts the last round's figures in the live progress and the events.
fn show_round_end<V: SourceVm>(s: &PageSender<'_, V>, history: &History) {
    let Some(r) = history.rounds.last() else {
        return;
    };
    s.control.emit(EventKind::RoundEnded {
        round: r.round,
        pages: r.pages,
        bytes: r.bytes,
        duration_ms: r.duration_ms,
        dirty_rate_pages_s: r.dirty_rate_pages_s,
        pages_remaining: history.pending_pages,
        estimated_downtime_ms: r.estimated_downtime_ms,
    });
    set_progress(&s.progress, |p| {
        p.pages_remaining = history.pending_pages;
        p.throughput_mb_s = r.bandwidth_mb_s;
        p.dirty_rate_pages_s = r.dirty_rate_pages_s;
        p.expected_downtime_ms = r.estimated_downtime_ms;
        p.eta_s = eta_s(history.pending_pages, r.bandwidth_mb_s);
    });
}

/// Seconds to send `pages` at `mb_s`, if the rate is known.
pub(crate) fn eta_s(pages: u64, mb_s: f64) -> Option<f64> {
    (mb_s > 0.0).then(|| pages as f64 * PAGE as f64 / (mb_s * 1e6))
}

/// The first `budget` bytes of `ranges` (page runs).
fn take_share(ranges: &[(u64, u64)], budget: u64) -> Vec<(u64, u64)> {
    let mut left = budget.div_ceil(PAGE as u64);
    let mut out = Vec::new();
    for &(f, n) in ranges {
        if left == 0 {
            break;
        }
        let k = n.min(left);
        out.push((f, k));
        left -= k;
    }
    out
}

/// Runs pre-copy rounds until the policy stops them. `history` (with no
/// rounds yet) gains one entry per round; `phase` follows the rounds. For
/// a hybrid, only the share's pages are pre-copied, and later rounds
/// re-send only pages of that share (the dirty rest is post-copied).
pub fn run_rounds<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    policy: &mut dyn Policy,
    history: &mut History,
    phase: &mut SourcePhase,
    started: Instant,
) -> Result<PrecopyOutcome, MigrationError> {
    s.vm.start_dirty_log()
        .map_err(vm_err("start dirty logging"))?;
    let ram_pages = s.vm.ram_size() / PAGE as u64;
    let populated = pages_to_deliver(s.vm, &s.declared)?;
    let (mut page_runs, hybrid) = match history.start {
        Start::Hybrid { precopy_bytes } => (take_share(&populated, precopy_bytes), true),
        _ => (populated, false),
    };
    let covered = DirtyBitmap::from_runs(ram_pages, &page_runs);
    let mut bandwidth = f64::INFINITY;
    let mut throttle_pct = 0u8;
    let asked = history.limits.clone();
    for round in 0.. {
        s.check_cancel()?;
        apply_parameters(s, history, &asked, &mut throttle_pct);
        let mut seen = match policy.round(history)?.skip {
            Skip::Redirtied => Some(DirtyBitmap::new(ram_pages)),
            Skip::Nothing => None,
        };
        let mut r = send_round(s, round, &page_runs, false, seen.as_mut())?;
        r.throttle_pct = throttle_pct;
        r.limits = Some(history.limits.clone());
        let mut dirty = DirtyBitmap::from_words(
            s.vm.take_dirty_bitmap()
                .map_err(vm_err("read the dirty log"))?,
        );
        if let Some(seen) = &seen {
            // Skipped pages are still dirty: they go with the next round.
            dirty.union_with(seen);
        }
        // Only the share's pages are pre-copy's business.
        let mut pending = dirty.clone();
        if hybrid {
            pending.intersect_with(&covered);
        }
        let secs = r.duration_ms / 1e3;
        if r.bytes > 0 && secs > 0.0 {
            bandwidth = r.bytes as f64 / secs;
        }
        r.dirtied_pages = dirty.count();
        r.dirty_rate_pages_s = r.dirtied_pages as f64 / secs.max(1e-9);
        r.estimated_downtime_ms = pending.count() as f64 * PAGE as f64 / bandwidth * 1e3;
        history.rounds.push(r);
        history.pending_pages = pending.count();
        history.bytes_sent = s.out.bytes;
        history.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        show_round_end(s, history);
        s.check_cancel()?;
        let decision = requested_postcopy(s, policy.after_round(history)?);
        *phase = phase.next(SourceEvent::RoundEnded(decision))?;
        let (stop_rule, postcopy) = match decision {
            AfterRound::Continue { throttle } => {
                if let Throttle::Percent(pct) = throttle {
                    tracing::info!("auto-converge: vCPUs throttled to {pct} %");
                    s.vm.set_throttle(pct);
                    throttle_pct = pct;
                }
                page_runs = pending.runs().collect();
                continue;
            }
            AfterRound::StopAndCopy { rule } => (rule, false),
            AfterRound::PostCopy { rule } => (rule, true),
        };
        tracing::info!("pre-copy stops after round {round}: {}", stop_rule.name());
        s.control.emit(EventKind::StopRuleFired {
            rule: stop_rule.name().into(),
            postcopy,
        });
        return Ok(PrecopyOutcome {
            rounds: history.rounds.clone(),
            dirty: if hybrid { pending } else { dirty },
            stop_rule,
            postcopy,
            covered,
        });
    }
    unreachable!("the round loop only ends by returning")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarsened_runs_cover_the_originals() {
        let r = [(0, 2), (3, 1), (10, 5), (40, 1)];
        assert_eq!(coarsen(&r, 4), r.to_vec());
        assert_eq!(coarsen(&r, 3), vec![(0, 4), (10, 5), (40, 1)]);
        assert_eq!(coarsen(&r, 1), vec![(0, 41)]);
        assert!(coarsen(&[], 1).is_empty());
    }

    #[test]
    fn a_share_is_the_first_bytes_of_populated_memory() {
        let populated = [(0, 4), (10, 10)];
        assert_eq!(
            take_share(&populated, 6 * PAGE as u64),
            vec![(0, 4), (10, 2)]
        );
        assert_eq!(take_share(&populated, 1), vec![(0, 1)]);
        assert!(take_share(&populated, 0).is_empty());
    }
}
