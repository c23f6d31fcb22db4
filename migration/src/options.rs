//! What a migration is asked to do: the mode, the limits, and the switches
//! of the built-in policies. The engine reads these only to build the
//! default policy ([`crate::policy::Builtin`]) and to set up the link
//! (compression, bandwidth cap, verification).

use std::time::Duration;

use crate::codec::Compression;
use crate::report::Limits;

/// How memory moves (what the user asked for; the policy decides within it).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Mode {
    /// Dirty-log rounds, then stop-and-copy of what is left.
    #[default]
    Pre,
    /// Switch over at once; every page follows on demand or by push.
    Post,
    /// Pre-copy a share of memory in rounds (until a round dirties at most
    /// the threshold), switch over, post-copy the rest.
    Hybrid(Split),
    /// Measure r, w and μ, and let seed 001's model choose among the three.
    Auto {
        /// The migration should end within this time (Tm).
        deadline: Option<Duration>,
    },
}

/// How much memory a hybrid migration pre-copies (V1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// This many bytes.
    Bytes(u64),
    /// Seed 001's V·w/(r+w), from the read and write rates measured on the
    /// running guest.
    FromMeasuredRates,
}

/// What pre-copy does when a cap (`max_rounds`, `max_bytes`) ends it while
/// the downtime it predicts is over the limit: a guest that dirties memory
/// about as fast as the link carries it never meets the downtime rule, and
/// silently stopping and copying then pauses it for as long as its whole
/// working set takes to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overrun {
    /// Fail the migration, the source guest running on as before, and say
    /// what would help (the default: the limit is a promise).
    #[default]
    Fail,
    /// Switch to post-copy instead: the downtime stays that of a post-copy
    /// switch-over (the fault connection is opened up front for this).
    PostCopy,
    /// Stop and copy anyway, over the limit (the old behaviour; the report
    /// and the terminal say so).
    Accept,
}

/// Migration options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Switch over once the predicted downtime is at most this.
    pub max_downtime: Duration,
    /// Switch over after this many rounds at the latest.
    pub max_rounds: u32,
    /// Switch over once this many bytes were sent.
    pub max_bytes: u64,
    /// Cap the link to this many bytes/s (token bucket).
    pub bandwidth: Option<u64>,
    pub compression: Compression,
    /// Checksum every page on both sides and have the guest check itself.
    pub verify: bool,
    pub mode: Mode,
    /// Measure r, w and μ first and put the model's prediction in the
    /// report, whatever the mode (implied by `Auto` and by
    /// `Split::FromMeasuredRates`).
    pub predict: bool,
    /// Hybrid: pre-copy stops once a round dirtied at most this many bytes
    /// (the model's l).
    pub threshold: u64,
    /// Pre-copy: throttle the vCPUs while the guest dirties memory faster
    /// than rounds send it (see `policy::auto_converge`).
    pub auto_converge: bool,
    /// Pre-copy: skip pages the guest dirtied again since the round began
    /// (Xen's "to skip"; see `policy::skip_redirtied`).
    pub skip_redirtied: bool,
    /// Open post-copy's fault connection up front whatever the policy
    /// plans, so that `migrate_start_postcopy` can switch a running
    /// pre-copy to post-copy.
    pub postcopy_ready: bool,
    /// What to do when a cap ends pre-copy over the downtime limit.
    pub overrun: Overrun,
    /// The hard bound on the pause: before the destination confirms, a
    /// pause longer than the downtime limit plus this aborts the migration
    /// and resumes the source (see [`crate::pause_bound`]).
    pub pause_margin: Duration,
    /// How long the source waits for `Prepared`, and then for `Resumed`
    /// after `Commit`. Past it, before `Commit` the source resumes; after,
    /// it stays fenced and asks the destination what it did.
    pub commit_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(300),
            max_rounds: 30,
            max_bytes: u64::MAX,
            bandwidth: None,
            compression: Compression::Auto,
            verify: false,
            mode: Mode::Pre,
            predict: false,
            threshold: 8 << 20,
            auto_converge: false,
            skip_redirtied: false,
            postcopy_ready: false,
            overrun: Overrun::Fail,
            pause_margin: crate::pause_bound::DEFAULT_MARGIN,
            commit_timeout: crate::transport::PEER_TIMEOUT,
        }
    }
}

impl Options {
    /// The limits as the report and the policies see them.
    pub fn limits(&self) -> Limits {
        Limits {
            max_downtime_ms: self.max_downtime.as_secs_f64() * 1e3,
            max_rounds: self.max_rounds,
            max_bytes: self.max_bytes,
            bandwidth_bytes_s: self.bandwidth,
            auto_converge: self.auto_converge,
            skip_redirtied: self.skip_redirtied,
        }
    }
}
