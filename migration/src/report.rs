//! What a migration measured. Serialized as JSON with stable snake_case
//! names (`total_time_ms`, `downtime_ms`, `guest_downtime_ms`, `rounds`,
//! `bytes_raw`, `bytes_wire`, `pages_verified`, `mismatched_pages`, ...)
//! so that scripts can rely on them.

use serde::{Deserialize, Serialize};

use crate::endpoint::GuestView;

/// One pre-copy round (the last one runs with the vCPUs paused).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Round {
    pub round: u32,
    /// Pages sent in this round.
    pub pages: u64,
    pub zero_pages: u64,
    pub lz4_pages: u64,
    /// Bytes put on the wire in this round.
    pub bytes: u64,
    pub duration_ms: f64,
    /// Pages the guest dirtied while this round was sent.
    pub dirtied_pages: u64,
    /// `dirtied_pages` per second of this round.
    pub dirty_rate_pages_s: f64,
    /// Measured throughput of this round.
    pub bandwidth_mb_s: f64,
    /// Downtime predicted after this round: dirtied bytes / bandwidth.
    pub estimated_downtime_ms: f64,
    /// Whether the vCPUs were paused during this round.
    pub paused: bool,
    /// Percent of the time the vCPUs were kept out of the guest during
    /// this round (auto-converge; 0 when not throttled).
    pub throttle_pct: u8,
    /// Pages of this round's list left for the next one because the guest
    /// dirtied them again before they were sent (`skip_redirtied`).
    pub skipped_pages: u64,
    /// The limits this round ran with (`migrate_set_parameters` may change
    /// them between rounds); absent for the paused round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// Where the downtime went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Stopping the source's vCPUs (signal, exit from KVM_RUN).
    pub pause_ms: f64,
    /// Sending the last dirty pages with the vCPUs paused.
    pub last_round_ms: f64,
    /// Reading vCPU, VM and device state on the source.
    pub state_save_ms: f64,
    /// Moving the state to the destination.
    pub state_transfer_ms: f64,
    /// Checksumming memory on the source, then on the destination
    /// (`--verify` only).
    pub verify_ms: f64,
    /// Restoring the state into KVM on the destination.
    pub restore_ms: f64,
    /// Resuming the vCPUs on the destination.
    pub resume_ms: f64,
    /// Post-copy: dropping re-dirtied pages and registering userfaultfd.
    pub postcopy_setup_ms: f64,
}

/// Limits the migration ran with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Limits {
    pub max_downtime_ms: f64,
    pub max_rounds: u32,
    pub max_bytes: u64,
    pub bandwidth_bytes_s: Option<u64>,
    pub auto_converge: bool,
    pub skip_redirtied: bool,
}

/// The final report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub mode: String,
    pub total_time_ms: f64,
    /// Source pause to destination resume (wall clock of both ends), less
    /// the time `--verify`'s checksums kept the guest paused
    /// (`downtime_breakdown.verify_ms`): the downtime of the same migration
    /// without `--verify`, so that checking a migration does not inflate
    /// its figure.
    pub downtime_ms: f64,
    /// Source pause to destination resume, verification included: what the
    /// guest waited in this run.
    pub downtime_with_verify_ms: f64,
    pub downtime_breakdown: DowntimeBreakdown,
    /// Longest heartbeat gap the guest shows across the switch-over (it
    /// includes `--verify`'s pause: the guest cannot tell).
    pub guest_downtime_ms: f64,
    pub rounds: Vec<Round>,
    /// Which rule ended pre-copy: `converged` (nothing dirty), `downtime`
    /// (estimate within the limit), `threshold` (hybrid: a round dirtied at
    /// most l), `max_rounds`, `max_bytes`, or `none` (pure post-copy).
    pub stop_rule: String,
    pub bytes_raw: u64,
    pub bytes_wire: u64,
    /// Time the destination spent touching RAM ahead of round 0, before it
    /// answered `Ready` (0 unless it runs with `--prefault`); part of
    /// `total_time_ms`.
    pub prefault_ms: f64,
    pub pages_verified: u64,
    pub mismatched_pages: u64,
    /// The guest's own check of its memory and FPU (with `--verify`).
    pub guest_verified: Option<bool>,
    pub guest_detail: String,
    pub limits: Limits,
    /// Post-copy and hybrid: demand faults, their latency, pushed vs pulled,
    /// when the last page arrived, the guest's longest stall.
    pub postcopy: Option<PostcopyStats>,
    /// Model prediction beside the measurement (auto and experiments).
    pub prediction: Option<serde_json::Value>,
    /// Set when a cap (`max_rounds`, `max_bytes`) ended pre-copy while the
    /// downtime it predicted was over the limit, and what was done then.
    pub downtime_overrun: Option<DowntimeOverrun>,
}

/// A cap ended pre-copy over the downtime limit (see `Overrun`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DowntimeOverrun {
    pub predicted_ms: f64,
    pub limit_ms: f64,
    /// `post-copy` (the rest went after the switch-over) or `accepted`
    /// (stopped and copied over the limit).
    pub action: String,
}

impl DowntimeOverrun {
    /// The overrun a finished migration's `report` shows, if any.
    pub fn of(report: &Report) -> Option<Self> {
        if !matches!(report.stop_rule.as_str(), "max_rounds" | "max_bytes") {
            return None;
        }
        let last = report.rounds.iter().rev().find(|r| !r.paused)?;
        let limit_ms = report.limits.max_downtime_ms;
        (last.estimated_downtime_ms > limit_ms).then(|| Self {
            predicted_ms: last.estimated_downtime_ms,
            limit_ms,
            action: if report.postcopy.is_some() {
                "post-copy".into()
            } else {
                "accepted".into()
            },
        })
    }
}

/// What the destination measured during post-copy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PostcopyStats {
    pub demand_faults: u64,
    pub fault_latency_p50_us: f64,
    pub fault_latency_p99_us: f64,
    pub fault_latency_max_us: f64,
    pub pages_pushed: u64,
    pub pages_pulled: u64,
    pub bytes_pushed: u64,
    pub bytes_pulled: u64,
    /// From resume until the last needed page was present.
    pub last_page_after_resume_ms: f64,
    /// Longest heartbeat gap after resume (the guest's worst stall).
    pub longest_stall_ms: f64,
}

/// What the destination reports at the end of post-copy
/// (`PostcopyComplete`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PostcopyReport {
    pub postcopy: PostcopyStats,
    /// Pages checked against the source's CRC as they arrived.
    pub pages_verified: u64,
    pub mismatched_pages: u64,
    pub guest: GuestView,
}

/// What the destination tells the source in `Resumed`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResumedInfo {
    /// Touching RAM ahead of round 0 (`--prefault`), before `Ready`.
    #[serde(default)]
    pub prefault_ms: f64,
    pub restore_ms: f64,
    pub resume_ms: f64,
    pub verify_ms: f64,
    #[serde(default)]
    pub postcopy_setup_ms: f64,
    /// Wall-clock time of the resume, ns since the epoch.
    pub resumed_at_ns: u64,
    /// When the state frame had fully arrived, ns since the epoch.
    pub state_received_at_ns: u64,
    pub pages_verified: u64,
    pub mismatched_pages: u64,
    pub guest: GuestView,
}

/// Wall-clock now, ns since the epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl DowntimeBreakdown {
    /// `downtime_ms` and `downtime_with_verify_ms` of a switch-over whose
    /// wall-clock pause was `wall_ms`.
    pub fn split(&self, wall_ms: f64) -> (f64, f64) {
        ((wall_ms - self.verify_ms).max(0.0), wall_ms)
    }
}
