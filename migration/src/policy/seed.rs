//! Seed 001's model as a policy: with the link rate μ and the guest's read
//! and write rates r and w measured before the migration starts,
//! - the hybrid split: pre-copy V1 = V·w/(r+w) of the populated memory V
//!   (pages that are only read are better pulled after the switch-over;
//!   pages that are written are better sent before it);
//! - `auto`: predict Tm and Td of pre-copy, post-copy and hybrid, and pick
//!   the fastest mode whose Td meets the downtime limit (and whose Tm meets
//!   the deadline); if none does, the one with the smallest Td;
//! - or only predict, keeping the mode asked for, to put the model's
//!   figures beside the measured ones.
//!
//! φ = 1 (the push has a connection of its own beside the demand
//! requests); ws = 0.1 MB of state.

use serde_json::json;

use super::{Measured, Plan, PlanView, PolicyError, Start};
use crate::model::{predict, Mode as ModelMode, Params, Prediction};

/// What the model decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Choice {
    /// Keep this start; predict only.
    Keep(Start),
    /// Hybrid with V1 = V·w/(r+w).
    Split,
    /// The mode with the best prediction.
    Auto { deadline_s: Option<f64> },
}

/// Seed 001's planning.
#[derive(Debug, Clone, Copy)]
pub struct SeedModel {
    pub choice: Choice,
    /// The hybrid's threshold l, in bytes.
    pub threshold: u64,
}

impl SeedModel {
    /// Plans from the measured rates; the prediction goes in the report.
    pub fn plan(&self, view: &PlanView) -> Result<Plan, PolicyError> {
        let measured = view.measured.as_ref().ok_or(PolicyError::NotMeasured)?;
        let p = self.params(view.populated_bytes, measured);
        let v1 = (p.v1() * 1e6) as u64;
        let preds = [ModelMode::Pre, ModelMode::Post, ModelMode::Hybrid]
            .into_iter()
            .map(|mode| predict(mode, &p))
            .collect::<Result<Vec<_>, _>>()?;
        let (start, why) = match self.choice {
            Choice::Keep(start) => (
                start,
                format!("{start:?} as requested; the model's prediction is for comparison"),
            ),
            Choice::Split => (
                Start::Hybrid { precopy_bytes: v1 },
                format!("V1 = V·w/(r+w) = {:.1} MB of {:.1} MB", p.v1(), p.v),
            ),
            Choice::Auto { deadline_s } => {
                let max_td_s = view.limits.max_downtime_ms / 1e3;
                let (chosen, why) = choose(&preds, max_td_s, deadline_s);
                (start_of(chosen.mode, v1), why)
            }
        };
        let prediction = json!({
            "measured": measured.access,
            "params": p,
            "v1_bytes": v1,
            "predictions": preds,
            "why": why,
        });
        Ok(Plan {
            start,
            prediction: Some(prediction),
        })
    }

    fn params(&self, populated_bytes: u64, m: &Measured) -> Params {
        Params {
            v: populated_bytes as f64 / 1e6,
            r: m.access.read_mb_s(),
            w: m.access.write_mb_s(),
            mu: m.link_bytes_s / 1e6,
            l: self.threshold as f64 / 1e6,
            phi: 1.0,
            ws: 0.1,
        }
    }
}

/// `auto`: the fastest prediction that meets the limits, else the one with
/// the smallest downtime; and why.
fn choose(preds: &[Prediction], max_td_s: f64, deadline_s: Option<f64>) -> (&Prediction, String) {
    let fits = |x: &&Prediction| {
        x.tm_s.is_some_and(|t| deadline_s.is_none_or(|d| t <= d)) && x.td_s <= max_td_s
    };
    let tm = |x: &Prediction| x.tm_s.unwrap_or(f64::MAX);
    if let Some(b) = preds
        .iter()
        .filter(fits)
        .min_by(|a, b| tm(a).total_cmp(&tm(b)))
    {
        let why = format!(
            "{:?} has the shortest predicted Tm ({:.3} s) among modes whose Td meets the limits",
            b.mode,
            b.tm_s.unwrap_or(0.0)
        );
        return (b, why);
    }
    let b = preds
        .iter()
        .min_by(|a, b| a.td_s.total_cmp(&b.td_s))
        .expect("three predictions");
    let why = format!(
        "no mode meets the limits; {:?} has the smallest predicted Td ({:.3} s)",
        b.mode, b.td_s
    );
    (b, why)
}

fn start_of(mode: ModelMode, v1: u64) -> Start {
    match mode {
        ModelMode::Pre => Start::PreCopy,
        ModelMode::Post => Start::PostCopy,
        ModelMode::Hybrid => Start::Hybrid { precopy_bytes: v1 },
    }
}
