//! Steering a running migration from another thread (the VMM's control
//! socket): cancel it before the switch-over, or change its limits.
//!
//! The engine owns no timer for this: it looks at the shared [`Control`]
//! at safe points — between page batches (so a cancel is noticed within
//! one batch, milliseconds even on a slow link), at round ends, and at
//! each round start (where new limits take effect). The switch-over is the
//! point of no return: [`Control::commit_switch_over`] and
//! [`Control::cancel`] take the same lock, so exactly one of them wins.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::events::{EventKind, EventLog};
use crate::report::Limits;

/// Where the migration stands with respect to a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Stage {
    /// Before the switch-over: a cancel is honoured.
    #[default]
    Cancellable,
    /// A cancel was asked for; the engine stops at its next safe point.
    Cancelling,
    /// The switch-over began: the guest is (about to be) the destination's.
    SwitchedOver,
}

/// Why a cancel was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    #[error("the migration is past the switch-over (the guest is moving to or runs on the destination): it can no longer be cancelled")]
    SwitchedOver,
}

/// Why a switch to post-copy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartPostcopyRefused {
    #[error("the migration is already past the switch-over")]
    SwitchedOver,
    #[error("the migration is being cancelled")]
    Cancelling,
    #[error("this migration has no post-copy fault connection: start it with --postcopy-ready (or in a post-copy mode)")]
    NotPrepared,
}

/// New limits for a running migration; `None` leaves one as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ParameterChange {
    pub max_downtime: Option<Duration>,
    /// Bytes/s; `Some(None)` lifts the cap.
    pub bandwidth: Option<Option<u64>>,
    pub max_rounds: Option<u32>,
    pub auto_converge: Option<bool>,
}

impl ParameterChange {
    /// `limits` with this change applied.
    pub fn apply(&self, limits: &Limits) -> Limits {
        let mut l = limits.clone();
        if let Some(d) = self.max_downtime {
            l.max_downtime_ms = d.as_secs_f64() * 1e3;
        }
        if let Some(b) = self.bandwidth {
            l.bandwidth_bytes_s = b;
        }
        if let Some(r) = self.max_rounds {
            l.max_rounds = r;
        }
        if let Some(a) = self.auto_converge {
            l.auto_converge = a;
        }
        l
    }
}

/// The handle shared by the engine and whoever steers it.
#[derive(Debug, Default)]
pub struct Control {
    stage: Mutex<Stage>,
    /// Mirrors `stage == Cancelling`, for the per-batch check without a lock.
    cancelling: AtomicBool,
    /// Changes accumulated since the engine last took them.
    pending: Mutex<ParameterChange>,
    /// Bumped at every change, so the sender notices cheaply.
    generation: AtomicU64,
    /// The fault connection is open: post-copy may start at a round end.
    postcopy_prepared: AtomicBool,
    /// Switch to post-copy at the next round end.
    postcopy_requested: AtomicBool,
    /// Where the engine tells what happens.
    events: Arc<EventLog>,
}

/// A shared [`Control`].
pub type ControlHandle = Arc<Control>;

impl Control {
    /// A control whose engine reports its events to `events`.
    pub fn with_events(events: Arc<EventLog>) -> Self {
        Self {
            events,
            ..Default::default()
        }
    }

    /// Records an event.
    pub fn emit(&self, kind: EventKind) {
        self.events.emit(kind);
    }

    /// Asks the migration to stop at its next safe point.
    pub fn cancel(&self) -> Result<(), CancelRefused> {
        let mut stage = self.lock_stage();
        match *stage {
            Stage::SwitchedOver => Err(CancelRefused::SwitchedOver),
            Stage::Cancellable | Stage::Cancelling => {
                *stage = Stage::Cancelling;
                self.cancelling.store(true, Ordering::SeqCst);
                Ok(())
            }
        }
    }

    /// Whether a cancel is pending (cheap: for every page batch).
    pub fn cancel_requested(&self) -> bool {
        self.cancelling.load(Ordering::Relaxed)
    }

    /// Passes the point of no return, unless a cancel got there first.
    pub fn commit_switch_over(&self) -> Result<(), Cancelled> {
        let mut stage = self.lock_stage();
        match *stage {
            Stage::Cancelling => Err(Cancelled),
            Stage::Cancellable | Stage::SwitchedOver => {
                *stage = Stage::SwitchedOver;
                Ok(())
            }
        }
    }

    /// Whether a cancel would still be honoured.
    pub fn cancellable(&self) -> bool {
        *self.lock_stage() != Stage::SwitchedOver
    }

    /// Tells whether post-copy's fault connection is open (the engine,
    /// after setup).
    pub fn set_postcopy_prepared(&self, prepared: bool) {
        self.postcopy_prepared.store(prepared, Ordering::SeqCst);
    }

    /// Asks pre-copy to switch to post-copy at its next round end.
    pub fn start_postcopy(&self) -> Result<(), StartPostcopyRefused> {
        let stage = self.lock_stage();
        match *stage {
            Stage::SwitchedOver => Err(StartPostcopyRefused::SwitchedOver),
            Stage::Cancelling => Err(StartPostcopyRefused::Cancelling),
            Stage::Cancellable if !self.postcopy_prepared.load(Ordering::SeqCst) => {
                Err(StartPostcopyRefused::NotPrepared)
            }
            Stage::Cancellable => {
                self.postcopy_requested.store(true, Ordering::SeqCst);
                Ok(())
            }
        }
    }

    /// Whether a switch to post-copy was asked for.
    pub fn postcopy_requested(&self) -> bool {
        self.postcopy_requested.load(Ordering::SeqCst)
    }

    /// Records new limits; the engine applies them at its next round start
    /// (the bandwidth at its next page batch).
    pub fn set_parameters(&self, change: ParameterChange) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let merged = ParameterChange {
            max_downtime: change.max_downtime.or(p.max_downtime),
            bandwidth: change.bandwidth.or(p.bandwidth),
            max_rounds: change.max_rounds.or(p.max_rounds),
            auto_converge: change.auto_converge.or(p.auto_converge),
        };
        *p = merged;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The generation of the parameters (changes when they do).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Every change made so far, accumulated.
    pub fn changes(&self) -> ParameterChange {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_stage(&self) -> std::sync::MutexGuard<'_, Stage> {
        self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The engine stopped because a cancel was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the migration was cancelled before the switch-over; the guest keeps running on the source"
)]
pub struct Cancelled;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_before_the_switch_over_wins() {
        let c = Control::default();
        assert!(!c.cancel_requested());
        assert_eq!(c.cancel(), Ok(()));
        assert!(c.cancel_requested());
        assert_eq!(c.commit_switch_over(), Err(Cancelled));
        assert!(c.cancellable());
    }

    #[test]
    fn cancel_after_the_switch_over_is_refused() {
        let c = Control::default();
        assert_eq!(c.commit_switch_over(), Ok(()));
        assert_eq!(c.cancel(), Err(CancelRefused::SwitchedOver));
        assert!(!c.cancel_requested());
        assert!(!c.cancellable());
    }

    #[test]
    fn post_copy_starts_only_when_prepared_and_before_the_switch_over() {
        let c = Control::default();
        assert_eq!(c.start_postcopy(), Err(StartPostcopyRefused::NotPrepared));
        c.set_postcopy_prepared(true);
        assert_eq!(c.start_postcopy(), Ok(()));
        assert!(c.postcopy_requested());
        assert_eq!(c.commit_switch_over(), Ok(()));
        assert_eq!(c.start_postcopy(), Err(StartPostcopyRefused::SwitchedOver));
    }

    #[test]
    fn parameter_changes_accumulate() {
        let c = Control::default();
        let g0 = c.generation();
        c.set_parameters(ParameterChange {
            max_rounds: Some(3),
            ..Default::default()
        });
        c.set_parameters(ParameterChange {
            max_downtime: Some(Duration::from_millis(50)),
            bandwidth: Some(None),
            ..Default::default()
        });
        assert!(c.generation() > g0);
        let l = c.changes().apply(&Limits {
            bandwidth_bytes_s: Some(1),
            ..Default::default()
        });
        assert_eq!(
            (l.max_rounds, l.max_downtime_ms, l.bandwidth_bytes_s),
            (3, 50.0, None)
        );
    }
}
