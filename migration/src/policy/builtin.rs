//! The engine's default policy: the built-in behaviours, combined as the
//! user's [`Options`] ask.
//!
//! - start: the mode asked for, or what seed 001's model plans
//!   ([`SeedModel`]) for `auto`, the hybrid split from measured rates, and
//!   `predict`;
//! - stop: [`StopRules`], with the downtime rule for pre-copy and the
//!   threshold l for the hybrid; a hybrid's pre-copy ends in post-copy;
//! - throttle: [`AutoConverge`] with `auto_converge`, in pre-copy only
//!   (the hybrid post-copies its dirty rest instead of waiting for it);
//! - skip: re-dirtied pages with `skip_redirtied`;
//! - push: follow the destination's faults.

use super::auto_converge::AutoConverge;
use super::seed::{Choice, SeedModel};
use super::stop_rules::{Primary, StopRules};
use super::{
    AfterRound, History, Plan, PlanView, Policy, PolicyError, PushOrder, RoundPlan, Setup,
    SetupView, Skip, Start, Throttle,
};
use crate::options::{Mode, Options, Split};

/// How the built-in policy decides the start.
#[derive(Debug, Clone, Copy)]
enum Planning {
    /// As asked, no measurement.
    Fixed(Start),
    /// By seed 001's model, after measuring μ, r and w.
    Model(SeedModel),
}

/// The built-in behaviours, as [`Options`] select them.
#[derive(Debug)]
pub struct Builtin {
    planning: Planning,
    threshold: u64,
    auto_converge: Option<AutoConverge>,
    skip_redirtied: bool,
}

impl Builtin {
    /// The policy `opts` describe.
    pub fn new(opts: &Options) -> Self {
        Self {
            planning: planning(opts),
            threshold: opts.threshold,
            auto_converge: opts.auto_converge.then(AutoConverge::default),
            skip_redirtied: opts.skip_redirtied,
        }
    }
}

fn planning(opts: &Options) -> Planning {
    let model = |choice| {
        Planning::Model(SeedModel {
            choice,
            threshold: opts.threshold,
        })
    };
    let fixed = match opts.mode {
        Mode::Auto { deadline } => {
            return model(Choice::Auto {
                deadline_s: deadline.map(|d| d.as_secs_f64()),
            })
        }
        Mode::Hybrid(Split::FromMeasuredRates) => return model(Choice::Split),
        Mode::Hybrid(Split::Bytes(precopy_bytes)) => Start::Hybrid { precopy_bytes },
        Mode::Pre => Start::PreCopy,
        Mode::Post => Start::PostCopy,
    };
    if opts.predict {
        model(Choice::Keep(fixed))
    } else {
        Planning::Fixed(fixed)
    }
}

impl Policy for Builtin {
    fn setup(&mut self, _view: &SetupView) -> Setup {
        match self.planning {
            Planning::Fixed(start) => Setup {
                measure_rates: false,
                may_postcopy: start != Start::PreCopy,
            },
            // The model may choose post-copy.
            Planning::Model(_) => Setup {
                measure_rates: true,
                may_postcopy: true,
            },
        }
    }

    fn plan(&mut self, view: &PlanView) -> Result<Plan, PolicyError> {
        match self.planning {
            Planning::Fixed(start) => Ok(Plan {
                start,
                prediction: None,
            }),
            Planning::Model(model) => model.plan(view),
        }
    }

    fn round(&mut self, _history: &History) -> RoundPlan {
        RoundPlan {
            skip: if self.skip_redirtied {
                Skip::Redirtied
            } else {
                Skip::Nothing
            },
        }
    }

    fn after_round(&mut self, h: &History) -> AfterRound {
        let hybrid = matches!(h.start, Start::Hybrid { .. });
        let primary = if hybrid {
            Primary::Threshold {
                bytes: self.threshold,
            }
        } else {
            Primary::Downtime
        };
        match (StopRules { primary }.check(h), hybrid) {
            (Some(rule), true) => AfterRound::PostCopy { rule },
            (Some(rule), false) => AfterRound::StopAndCopy { rule },
            (None, true) => AfterRound::Continue {
                throttle: Throttle::Unchanged,
            },
            (None, false) => AfterRound::Continue {
                throttle: self
                    .auto_converge
                    .as_mut()
                    .map_or(Throttle::Unchanged, |a| a.after_round(h)),
            },
        }
    }

    fn push_order(&mut self, _history: &History) -> PushOrder {
        PushOrder::FollowFaults
    }
}
