//! When pre-copy stops: the rules of Xen, QEMU and seed 001's hybrid.
//!
//! After each round, in this order:
//! 1. `converged` (Xen): nothing of pre-copy's set was dirtied;
//! 2. the primary rule of the mode:
//!    - pre-copy, `downtime` (QEMU, Cloud Hypervisor): the pages left over
//!      the bandwidth measured in the round fit the downtime limit;
//!    - hybrid, `threshold` (seed 001's l): the round dirtied at most l
//!      bytes of the share (the rest is post-copied, not sent paused);
//! 3. `max_rounds` (Xen): the round cap was reached;
//! 4. `max_bytes` (Xen): the bytes-sent cap was reached.
//!
//! A guest that dirties faster than the link carries never meets rule 2,
//! and only rules 3 and 4 end pre-copy (seed 002's "jump").

use super::{History, StopRule};
use crate::codec::PAGE;

/// The rule that decides when pre-copy has done enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primary {
    /// QEMU's: the predicted downtime fits `limits.max_downtime_ms`.
    Downtime,
    /// Seed 001's hybrid: at most this many bytes are left dirty.
    Threshold { bytes: u64 },
}

/// The stop rules of one migration.
#[derive(Debug, Clone, Copy)]
pub struct StopRules {
    pub primary: Primary,
}

impl StopRules {
    /// The first rule that fires after the last round of `h`, if any.
    pub fn check(&self, h: &History) -> Option<StopRule> {
        converged(h)
            .or_else(|| self.primary_rule(h))
            .or_else(|| max_rounds(h))
            .or_else(|| max_bytes(h))
    }

    fn primary_rule(&self, h: &History) -> Option<StopRule> {
        match self.primary {
            Primary::Downtime => downtime(h),
            Primary::Threshold { bytes } => {
                (h.pending_pages * PAGE as u64 <= bytes).then_some(StopRule::Threshold)
            }
        }
    }
}

/// Xen's first rule: nothing is left to send.
fn converged(h: &History) -> Option<StopRule> {
    (h.pending_pages == 0).then_some(StopRule::Converged)
}

/// QEMU's rule: the downtime the last round predicts fits the limit.
fn downtime(h: &History) -> Option<StopRule> {
    let estimate = h.last_round()?.estimated_downtime_ms;
    (estimate <= h.limits.max_downtime_ms).then_some(StopRule::Downtime)
}

/// Xen's round cap.
fn max_rounds(h: &History) -> Option<StopRule> {
    (h.rounds.len() as u64 >= u64::from(h.limits.max_rounds)).then_some(StopRule::MaxRounds)
}

/// Xen's cap on the bytes sent.
fn max_bytes(h: &History) -> Option<StopRule> {
    (h.bytes_sent >= h.limits.max_bytes).then_some(StopRule::MaxBytes)
}
