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
//! - over the limit: when a cap (`max_rounds`, `max_bytes`) ends pre-copy
//!   while the predicted downtime exceeds the limit, [`Overrun`] says what
//!   happens: fail (the default; the source runs on), post-copy, or accept;
//! - push: follow the destination's faults.

use super::auto_converge::AutoConverge;
use super::seed::{Choice, SeedModel};
use super::stop_rules::{Primary, StopRules};
use super::{
    AfterRound, History, Plan, PlanView, Policy, PolicyError, PushOrder, RoundPlan, Setup,
    SetupView, Skip, Start, StopRule, Throttle,
};
use crate::options::{Mode, Options, Overrun, Split};

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
    overrun: Overrun,
}

impl Builtin {
    /// The policy `opts` describe.
    pub fn new(opts: &Options) -> Self {
        Self {
            planning: planning(opts),
            threshold: opts.threshold,
            auto_converge: Some(AutoConverge::default()),
            skip_redirtied: opts.skip_redirtied,
            overrun: opts.overrun,
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
    fn setup(&mut self, _view: &SetupView) -> Result<Setup, PolicyError> {
        Ok(match self.planning {
            Planning::Fixed(start) => Setup {
                measure_rates: false,
                may_postcopy: start != Start::PreCopy || self.overrun == Overrun::PostCopy,
            },
            // The model may choose post-copy.
            Planning::Model(_) => Setup {
                measure_rates: true,
                may_postcopy: true,
            },
        })
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

    fn round(&mut self, _history: &History) -> Result<RoundPlan, PolicyError> {
        Ok(RoundPlan {
            skip: if self.skip_redirtied {
                Skip::Redirtied
            } else {
                Skip::Nothing
            },
        })
    }

    fn after_round(&mut self, h: &History) -> Result<AfterRound, PolicyError> {
        let hybrid = matches!(h.start, Start::Hybrid { .. });
        let primary = if hybrid {
            Primary::Threshold {
                bytes: self.threshold,
            }
        } else {
            Primary::Downtime
        };
        Ok(match (StopRules { primary }.check(h), hybrid) {
            (Some(rule), true) => AfterRound::PostCopy { rule },
            (Some(rule), false) => self.stop(rule, h)?,
            (None, true) => AfterRound::Continue {
                throttle: Throttle::Unchanged,
            },
            (None, false) => AfterRound::Continue {
                // The limits, not the options, say whether: set-parameters
                // may switch auto-converge on or off mid-flight.
                throttle: match &mut self.auto_converge {
                    Some(a) if h.limits.auto_converge => a.after_round(h),
                    _ => Throttle::Unchanged,
                },
            },
        })
    }

    fn push_order(&mut self, _history: &History) -> Result<PushOrder, PolicyError> {
        Ok(PushOrder::FollowFaults)
    }
}

impl Builtin {
    /// Pre-copy ends by `rule`: stop and copy, unless a cap fired with the
    /// predicted downtime over the limit; then as `overrun` says.
    fn stop(&self, rule: StopRule, h: &History) -> Result<AfterRound, PolicyError> {
        let predicted_ms = h.last_round().map_or(0.0, |r| r.estimated_downtime_ms);
        let limit_ms = h.limits.max_downtime_ms;
        let cap = matches!(rule, StopRule::MaxRounds | StopRule::MaxBytes);
        if !cap || predicted_ms <= limit_ms {
            return Ok(AfterRound::StopAndCopy { rule });
        }
        match self.overrun {
            Overrun::Accept => Ok(AfterRound::StopAndCopy { rule }),
            Overrun::PostCopy => Ok(AfterRound::PostCopy { rule }),
            Overrun::Fail => Err(PolicyError::DowntimeOverrun {
                rule,
                rounds: h.rounds.len(),
                predicted_ms,
                limit_ms,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_rate::AccessRates;
    use crate::codec::PAGE;
    use crate::policy::{Measured, StopRule};
    use crate::report::{Limits, Round};
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn options(mode: Mode) -> Options {
        Options {
            mode,
            ..Default::default()
        }
    }

    /// A history after `rounds` rounds of 100 MiB each in 1 s, with
    /// `pending` pages left and the last round predicting `estimate_ms`.
    fn history(start: Start, rounds: u32, pending: u64, estimate_ms: f64) -> History {
        let round = |i| Round {
            round: i,
            bytes: 100 * MIB,
            duration_ms: 1000.0,
            estimated_downtime_ms: estimate_ms,
            ..Default::default()
        };
        History {
            elapsed_ms: f64::from(rounds) * 1000.0,
            limits: Options::default().limits(),
            measured: None,
            start,
            rounds: (0..rounds).map(round).collect(),
            pending_pages: pending,
            bytes_sent: u64::from(rounds) * 100 * MIB,
        }
    }

    fn stop(rule: StopRule) -> AfterRound {
        AfterRound::StopAndCopy { rule }
    }

    const GO_ON: AfterRound = AfterRound::Continue {
        throttle: Throttle::Unchanged,
    };

    #[test]
    fn a_cap_over_the_downtime_limit_fails_falls_back_or_is_accepted() {
        let over = history(Start::PreCopy, 30, 10, 10_800.0);
        let within = history(Start::PreCopy, 30, 10, 200.0);
        let with = |overrun| {
            Builtin::new(&Options {
                overrun,
                ..Default::default()
            })
        };
        // The default fails, naming the rule, the prediction and the limit.
        let err = with(Overrun::Fail).after_round(&over).unwrap_err();
        let text = err.to_string();
        assert!(matches!(
            err,
            PolicyError::DowntimeOverrun {
                rule: StopRule::MaxRounds,
                rounds: 30,
                ..
            }
        ));
        assert!(
            text.contains("10800 ms") && text.contains("300 ms"),
            "{text}"
        );
        assert_eq!(
            with(Overrun::PostCopy).after_round(&over).unwrap(),
            AfterRound::PostCopy {
                rule: StopRule::MaxRounds
            }
        );
        assert_eq!(
            with(Overrun::Accept).after_round(&over).unwrap(),
            stop(StopRule::MaxRounds)
        );
        // Within the limit the downtime rule fires before any cap.
        assert_eq!(
            with(Overrun::Fail).after_round(&within).unwrap(),
            stop(StopRule::Downtime)
        );
        // Falling back to post-copy needs the fault connection from the start.
        let view = SetupView {
            ram_bytes: 0,
            populated_bytes: 0,
            limits: Options::default().limits(),
        };
        assert!(with(Overrun::PostCopy).setup(&view).unwrap().may_postcopy);
        assert!(!with(Overrun::Fail).setup(&view).unwrap().may_postcopy);
    }

    #[test]
    fn pre_copy_stops_by_qemus_downtime_rule_then_xens_caps() {
        let mut p = Builtin::new(&Options {
            overrun: Overrun::Accept,
            ..options(Mode::Pre)
        });
        let pre = Start::PreCopy;
        assert_eq!(
            p.after_round(&history(pre, 1, 0, 0.0)).unwrap(),
            stop(StopRule::Converged)
        );
        assert_eq!(
            p.after_round(&history(pre, 1, 10, 299.0)).unwrap(),
            stop(StopRule::Downtime)
        );
        assert_eq!(p.after_round(&history(pre, 1, 10, 301.0)).unwrap(), GO_ON);
        assert_eq!(
            p.after_round(&history(pre, 30, 10, 301.0)).unwrap(),
            stop(StopRule::MaxRounds)
        );
        let mut capped = Builtin::new(&Options {
            max_bytes: 250 * MIB,
            overrun: Overrun::Accept,
            ..Default::default()
        });
        let mut h = history(pre, 3, 10, 301.0);
        h.limits = Limits {
            max_bytes: 250 * MIB,
            ..h.limits
        };
        assert_eq!(capped.after_round(&h).unwrap(), stop(StopRule::MaxBytes));
    }

    #[test]
    fn auto_converge_throttles_only_rounds_that_dirty_more_than_half() {
        let mut p = Builtin::new(&Options {
            auto_converge: true,
            ..Default::default()
        });
        // 100 MiB sent per round; 60 MiB left dirty: a high round.
        let mut high = history(Start::PreCopy, 1, 60 * MIB / PAGE as u64, 1e4);
        high.limits.auto_converge = true;
        assert_eq!(p.after_round(&high).unwrap(), GO_ON);
        let throttled = AfterRound::Continue {
            throttle: Throttle::Percent(20),
        };
        assert_eq!(p.after_round(&high).unwrap(), throttled);
        // A downtime that fits stops, whatever the throttle.
        let fits = history(Start::PreCopy, 3, 60 * MIB / PAGE as u64, 1.0);
        assert_eq!(p.after_round(&fits).unwrap(), stop(StopRule::Downtime));
        // Without auto-converge (or once set-parameters switched it off),
        // the same rounds are never throttled.
        high.limits.auto_converge = false;
        let mut plain = Builtin::new(&Options::default());
        assert_eq!(plain.after_round(&high).unwrap(), GO_ON);
        assert_eq!(plain.after_round(&high).unwrap(), GO_ON);
        assert_eq!(p.after_round(&high).unwrap(), GO_ON);
    }

    #[test]
    fn skip_redirtied_is_a_round_plan() {
        let h = history(Start::PreCopy, 0, 0, 0.0);
        let mut skip = Builtin::new(&Options {
            skip_redirtied: true,
            ..Default::default()
        });
        assert_eq!(skip.round(&h).unwrap().skip, Skip::Redirtied);
        assert_eq!(
            Builtin::new(&Options::default()).round(&h).unwrap().skip,
            Skip::Nothing
        );
    }

    #[test]
    fn post_copy_and_a_fixed_hybrid_need_no_measurement() {
        let view = SetupView {
            ram_bytes: 1 << 30,
            populated_bytes: 1 << 28,
            limits: Options::default().limits(),
        };
        let mut post = Builtin::new(&options(Mode::Post));
        let setup = post.setup(&view).unwrap();
        assert!(setup.may_postcopy && !setup.measure_rates);
        let plan = post.plan(&plan_view(None)).unwrap();
        assert_eq!(plan.start, Start::PostCopy);
        assert_eq!(
            post.push_order(&history(Start::PostCopy, 0, 0, 0.0))
                .unwrap(),
            PushOrder::FollowFaults
        );
        let mut pre = Builtin::new(&options(Mode::Pre));
        assert_eq!(pre.setup(&view).unwrap(), Setup::default());
        let mut hybrid = Builtin::new(&options(Mode::Hybrid(Split::Bytes(64 * MIB))));
        assert!(hybrid.setup(&view).unwrap().may_postcopy);
        let start = hybrid.plan(&plan_view(None)).unwrap().start;
        assert_eq!(
            start,
            Start::Hybrid {
                precopy_bytes: 64 * MIB
            }
        );
    }

    #[test]
    fn hybrid_pre_copy_ends_in_post_copy_at_the_threshold() {
        let mut p = Builtin::new(&Options {
            mode: Mode::Hybrid(Split::Bytes(64 * MIB)),
            threshold: 8 * MIB,
            auto_converge: true,
            ..Default::default()
        });
        let start = Start::Hybrid {
            precopy_bytes: 64 * MIB,
        };
        let at = |pending_mib| history(start, 1, pending_mib * MIB / PAGE as u64, 0.0);
        // The downtime rule does not apply (estimate 0 ms, 9 MiB dirty).
        assert_eq!(p.after_round(&at(9)).unwrap(), GO_ON);
        assert_eq!(
            p.after_round(&at(9)).unwrap(),
            GO_ON,
            "never throttled in a hybrid"
        );
        let threshold = AfterRound::PostCopy {
            rule: StopRule::Threshold,
        };
        assert_eq!(p.after_round(&at(8)).unwrap(), threshold);
    }

    fn plan_view(measured: Option<Measured>) -> PlanView {
        PlanView {
            ram_bytes: 1 << 30,
            populated_bytes: 100_000_000,
            limits: Options::default().limits(),
            measured,
        }
    }

    /// μ = 100 MB/s; r and w in MB/s.
    fn measured(r: f64, w: f64) -> Measured {
        let pages = |mb_s: f64| mb_s * 1e6 / PAGE as f64;
        Measured {
            link_bytes_s: 100e6,
            access: AccessRates {
                read_pages_s: pages(r),
                write_pages_s: pages(w),
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_seed_split_pre_copies_v_w_over_r_plus_w() {
        let mut p = Builtin::new(&options(Mode::Hybrid(Split::FromMeasuredRates)));
        assert!(p.setup(&plan_view_setup()).unwrap().measure_rates);
        assert!(matches!(
            p.plan(&plan_view(None)),
            Err(PolicyError::NotMeasured)
        ));
        let plan = p.plan(&plan_view(Some(measured(3.0, 1.0)))).unwrap();
        // V = 100 MB, w/(r+w) = 1/4.
        assert_eq!(
            plan.start,
            Start::Hybrid {
                precopy_bytes: 25_000_000
            }
        );
        let why = &plan.prediction.unwrap()["why"];
        assert!(why.as_str().unwrap().contains("V1 = V·w/(r+w)"), "{why}");
    }

    fn plan_view_setup() -> SetupView {
        SetupView {
            ram_bytes: 1 << 30,
            populated_bytes: 100_000_000,
            limits: Options::default().limits(),
        }
    }

    #[test]
    fn auto_picks_the_fastest_mode_that_meets_the_limits() {
        let auto = |deadline| {
            Builtin::new(&Options {
                mode: Mode::Auto { deadline },
                max_downtime: Duration::from_millis(300),
                ..Default::default()
            })
        };
        let why = |plan: &Plan| plan.prediction.as_ref().unwrap()["why"].to_string();
        let idle = auto(None)
            .plan(&plan_view(Some(measured(0.0, 0.0))))
            .unwrap();
        assert!(
            why(&idle).contains("shortest predicted Tm"),
            "{}",
            why(&idle)
        );
        // 100 MB over 100 MB/s cannot end within 10 ms.
        let late = Some(Duration::from_millis(10));
        let late = auto(late)
            .plan(&plan_view(Some(measured(0.0, 0.0))))
            .unwrap();
        assert!(
            why(&late).contains("no mode meets the limits"),
            "{}",
            why(&late)
        );
        // A guest writing faster than the link: pre-copy never converges;
        // post-copy's downtime is only the state.
        let busy = auto(None)
            .plan(&plan_view(Some(measured(0.0, 200.0))))
            .unwrap();
        assert_eq!(busy.start, Start::PostCopy);
        assert_eq!(
            busy.prediction.unwrap()["predictions"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn predict_keeps_the_mode_asked_for() {
        let mut p = Builtin::new(&Options {
            predict: true,
            ..Default::default()
        });
        assert!(p.setup(&plan_view_setup()).unwrap().measure_rates);
        let plan = p.plan(&plan_view(Some(measured(1.0, 1.0)))).unwrap();
        assert_eq!(plan.start, Start::PreCopy);
        assert!(plan.prediction.is_some());
    }
}
