//! Migration policies: what the engine asks, and what a policy answers.
//!
//! The engine moves pages; a [`Policy`] decides. At each decision point the
//! engine hands the policy a read-only view of what has happened so far and
//! executes the decision it gets back:
//!
//! ```text
//!  engine                                  policy
//!  connected, Config not yet sent ──────▶ setup(SetupView)      → Setup
//!  (measured μ, r, w if asked)    ──────▶ plan(PlanView)        → Plan {Start}
//!  before each pre-copy round     ──────▶ round(History)        → RoundPlan
//!  after each pre-copy round      ──────▶ after_round(History)  → AfterRound
//!  switching over to post-copy    ──────▶ push_order(History)   → PushOrder
//! ```
//!
//! Decisions are plain enums and structs that derive serde's traits, so
//! that a policy outside the process speaks them as JSON lines
//! ([`exec`]: `vmm migrate --policy exec:PROGRAM`); the trait is
//! object-safe for the same reason (`Box<dyn Policy>`).
//!
//! Every behaviour the engine had built in is a policy here, combined by
//! [`Builtin`] from the user's [`Options`](crate::Options):
//! - [`stop_rules`]: Xen's three rules (converged, max_rounds, max_bytes),
//!   QEMU's downtime rule, and the hybrid's threshold;
//! - [`auto_converge`]: QEMU's throttle steps;
//! - [`seed`]: seed 001's model — the hybrid split V·w/(r+w) from measured
//!   rates, and `auto`, which picks the mode with the best prediction;
//! - skip-redirtied (Xen's "to skip") and post-copy's push order, two
//!   one-line decisions of [`Builtin`] itself.

pub mod auto_converge;
pub mod builtin;
pub mod exec;
pub mod seed;
pub mod stop_rules;

use serde::{Deserialize, Serialize};

use crate::access_rate::AccessRates;
use crate::report::{Limits, Round};

pub use builtin::Builtin;
pub use exec::{ExecError, ExecPolicy};

/// A policy's failure (the migration fails cleanly: the source runs on).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("The model cannot predict this migration")]
    Model(#[from] crate::model::ModelError),
    #[error("The policy needs measured rates, but none were measured")]
    NotMeasured,
    #[error("The policy chose post-copy, but did not ask for it at setup")]
    PostcopyNotPrepared,
    #[error("Pre-copy did not converge: {rule} ended it after {rounds} rounds with a predicted downtime of {predicted_ms:.0} ms, over the {limit_ms:.0} ms limit; the source runs on as before. What helps: --auto-converge (slow the guest down), --on-overrun postcopy (finish in post-copy), a higher --max-downtime or --bandwidth, or --on-overrun accept (take the long pause)", rule = .rule.name())]
    DowntimeOverrun {
        rule: StopRule,
        rounds: usize,
        predicted_ms: f64,
        limit_ms: f64,
    },
    #[error(transparent)]
    External(#[from] ExecError),
}

/// Decides how a migration proceeds. See the module documentation for when
/// each method is called.
///
/// Every method may fail (a built-in only when its model cannot plan; an
/// [`ExecPolicy`] whenever its program crashes, hangs or answers nonsense):
/// the migration then fails cleanly and the source runs on.
pub trait Policy: Send + std::fmt::Debug {
    /// Before `Config` is sent: what to measure, and whether post-copy may
    /// follow (then the fault connection is opened).
    fn setup(&mut self, view: &SetupView) -> Result<Setup, PolicyError>;
    /// After the measurements `setup` asked for: how the migration starts.
    fn plan(&mut self, view: &PlanView) -> Result<Plan, PolicyError>;
    /// Before each pre-copy round.
    fn round(&mut self, history: &History) -> Result<RoundPlan, PolicyError>;
    /// After each pre-copy round: go on, stop and copy, or post-copy.
    fn after_round(&mut self, history: &History) -> Result<AfterRound, PolicyError>;
    /// At the switch-over to post-copy: the order of the background push.
    fn push_order(&mut self, history: &History) -> Result<PushOrder, PolicyError>;
}

/// What the engine knows before anything is sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetupView {
    pub ram_bytes: u64,
    /// Memory the guest ever wrote (what round 0 would send).
    pub populated_bytes: u64,
    pub limits: Limits,
}

/// The answer to [`Policy::setup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Setup {
    /// Measure the link rate μ (a calibration burst) and the guest's read
    /// and write rates r and w before planning.
    pub measure_rates: bool,
    /// Post-copy may follow: open the fault connection.
    pub may_postcopy: bool,
}

/// Rates measured before the migration started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// μ: what the destination absorbed during the calibration burst.
    pub link_bytes_s: f64,
    /// r and w, sampled on the host.
    pub access: AccessRates,
}

/// What [`Policy::plan`] sees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanView {
    pub ram_bytes: u64,
    pub populated_bytes: u64,
    pub limits: Limits,
    /// Present when `setup` asked for it.
    pub measured: Option<Measured>,
}

/// How the migration starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Pre-copy rounds over all populated memory.
    PreCopy,
    /// Switch over at once.
    PostCopy,
    /// Pre-copy rounds over the first `precopy_bytes` of populated memory
    /// only; the rest is post-copied.
    Hybrid { precopy_bytes: u64 },
}

impl Start {
    /// The report's name of the mode.
    pub fn mode_name(self) -> &'static str {
        match self {
            Start::PreCopy => "pre",
            Start::PostCopy => "post",
            Start::Hybrid { .. } => "hybrid",
        }
    }
}

/// The answer to [`Policy::plan`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub start: Start,
    /// What the decision rested on, for the report.
    pub prediction: Option<serde_json::Value>,
}

/// What has happened so far, as a policy sees it after a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    /// Since the source connected.
    pub elapsed_ms: f64,
    pub limits: Limits,
    pub measured: Option<Measured>,
    pub start: Start,
    /// Every finished round, with its pages, bytes, duration, dirty rate,
    /// bandwidth and the downtime it predicts.
    pub rounds: Vec<Round>,
    /// Pages the next round (or the stop-and-copy) would send: those of
    /// pre-copy's set dirtied since they were sent.
    pub pending_pages: u64,
    /// Bytes put on the wire so far.
    pub bytes_sent: u64,
}

impl History {
    /// The last finished round.
    pub fn last_round(&self) -> Option<&Round> {
        self.rounds.last()
    }
}

/// The answer to [`Policy::round`]: the round sends the pages of
/// pre-copy's set not yet sent in their latest version (round 0: all of
/// them), in ascending order, except those this plan skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RoundPlan {
    pub skip: Skip,
}

/// Which pages of a round's list are left for the next round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    /// Send every page of the list.
    #[default]
    Nothing,
    /// Xen's "to skip": read the dirty log every 4 MiB sent and skip the
    /// pages the guest dirtied again meanwhile.
    Redirtied,
}

/// The answer to [`Policy::after_round`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterRound {
    /// Run another round, with the vCPUs throttled as given.
    Continue { throttle: Throttle },
    /// Pause and send what is left.
    StopAndCopy { rule: StopRule },
    /// Pause, send the state, and post-copy what is left.
    PostCopy { rule: StopRule },
}

/// Throttling of the vCPUs for the next round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Throttle {
    /// Leave it as it is.
    Unchanged,
    /// Keep the vCPUs out of the guest this share of the time (0 ends it).
    Percent(u8),
}

/// Why pre-copy ended (the report's `stop_rule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopRule {
    /// Nothing was dirtied.
    Converged,
    /// The predicted downtime is within the limit.
    Downtime,
    /// Hybrid: a round dirtied at most the threshold l.
    Threshold,
    /// The round cap was reached.
    MaxRounds,
    /// The bytes-sent cap was reached.
    MaxBytes,
    /// A rule of the policy's own (an external policy's, say "the dirty
    /// rate stopped falling"), none of the above.
    Policy,
    /// The user asked for post-copy (`migrate_start_postcopy`).
    Requested,
}

impl StopRule {
    /// The rule's name in the report.
    pub fn name(self) -> &'static str {
        match self {
            StopRule::Converged => "converged",
            StopRule::Downtime => "downtime",
            StopRule::Threshold => "threshold",
            StopRule::MaxRounds => "max_rounds",
            StopRule::MaxBytes => "max_bytes",
            StopRule::Policy => "policy",
            StopRule::Requested => "requested",
        }
    }
}

/// The order of post-copy's background push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushOrder {
    /// Ascending page order, wrapping, never moving.
    Ascending,
    /// Ascending, but jump to the page after the one the destination last
    /// faulted on, so that its neighbours arrive before they are asked for.
    FollowFaults,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_json_lines() {
        let d = AfterRound::Continue {
            throttle: Throttle::Percent(20),
        };
        let line = serde_json::to_string(&d).unwrap();
        assert_eq!(line, r#"{"continue":{"throttle":{"percent":20}}}"#);
        assert_eq!(serde_json::from_str::<AfterRound>(&line).unwrap(), d);
        let s = Start::Hybrid {
            precopy_bytes: 4096,
        };
        let line = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Start>(&line).unwrap(), s);
        assert_eq!(
            serde_json::to_string(&StopRule::MaxRounds).unwrap(),
            format!("\"{}\"", StopRule::MaxRounds.name())
        );
    }
}
