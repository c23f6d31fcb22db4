//! Auto-converge, QEMU's policy: a round that dirtied more than half of
//! what it sent is "high"; after two high rounds the vCPUs are throttled
//! to 20 %, and after every two more by 10 points more, up to 99 %. The
//! guest runs less, so it dirties less, until a round fits the downtime
//! limit.

use super::{History, Throttle};
use crate::codec::PAGE;

/// The throttle steps, and how far they have gone.
#[derive(Debug, Default)]
pub struct AutoConverge {
    high_rounds: u32,
    pct: u8,
}

impl AutoConverge {
    const INITIAL: u8 = 20;
    const STEP: u8 = 10;
    const MAX: u8 = 99;
    /// Dirtied bytes above this share of the bytes sent make a round high.
    const HIGH_SHARE: f64 = 0.5;

    /// Takes the history after a round; says whether the throttle changes.
    pub fn after_round(&mut self, h: &History) -> Throttle {
        let sent = h.last_round().map_or(0, |r| r.bytes);
        self.step(sent, h.pending_pages * PAGE as u64)
    }

    fn step(&mut self, sent_bytes: u64, dirtied_bytes: u64) -> Throttle {
        if dirtied_bytes as f64 <= sent_bytes as f64 * Self::HIGH_SHARE {
            return Throttle::Unchanged;
        }
        self.high_rounds += 1;
        if self.high_rounds < 2 {
            return Throttle::Unchanged;
        }
        self.high_rounds = 0;
        let next = match self.pct {
            0 => Self::INITIAL,
            p => p.saturating_add(Self::STEP).min(Self::MAX),
        };
        if next == self.pct {
            return Throttle::Unchanged;
        }
        self.pct = next;
        Throttle::Percent(next)
    }

    /// The current level, in percent.
    pub fn pct(&self) -> u8 {
        self.pct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_steps_up_after_every_two_high_rounds() {
        let mut t = AutoConverge::default();
        // Dirtied ≤ half of what was sent: never throttled.
        for _ in 0..5 {
            assert_eq!(t.step(100, 50), Throttle::Unchanged);
        }
        assert_eq!(t.step(100, 60), Throttle::Unchanged);
        assert_eq!(t.step(100, 60), Throttle::Percent(20));
        assert_eq!(t.step(100, 60), Throttle::Unchanged);
        assert_eq!(t.step(100, 60), Throttle::Percent(30));
        for _ in 0..40 {
            t.step(100, 100);
        }
        assert_eq!(t.pct(), 99, "capped");
        assert_eq!(t.step(100, 100), Throttle::Unchanged);
        assert_eq!(
            t.step(100, 100),
            Throttle::Unchanged,
            "no change past the cap"
        );
    }
}
