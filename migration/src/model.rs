//! The analytical migration model of seed 001 (Aleksankov, 2017; restated
//! in English in `shared/guide/model.md`): migration time Tm and downtime
//! Td of pre-copy, post-copy and the hybrid of both.
//!
//! Parameters: V (MB to move), r and w (MB/s the guest reads and writes),
//! μ (MB/s of the link), l (MB: pre-copy stops once a round dirtied ≤ l),
//! φ (share of the link the background push gets after the switch), ws (MB
//! of vCPU/device state, post-copy's only stop-and-copy payload).
//!
//! Hybrid:
//! ```text
//! V1 = V·w/(r+w)                  pre-copied        V3 = V − V1    post-copied
//! v_i = V1·(w/μ)^i, t_i = v_i/μ   round i           n = first i with v_i ≤ l
//! T1 = Σ_{i=0..n} t_i             iterative part    T2 = l/μ       stop-and-copy
//! T3 = V3 / (φμ + r(1−φ))         post-copy part    Ta = r·T3/μ    demand stalls
//! Tm = T1 + T2 + T3               Td = T2 + Ta
//! ```
//! Pre-copy is V1 = V; post-copy is V1 = 0 with T2 = ws/μ.

use serde::Serialize;

/// Which approach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Pre,
    Post,
    Hybrid,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pre" => Ok(Self::Pre),
            "post" => Ok(Self::Post),
            "hybrid" => Ok(Self::Hybrid),
            _ => Err(format!("unknown mode '{s}' (pre, post, hybrid)")),
        }
    }
}

/// Model inputs (sizes in MB, rates in MB/s).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Params {
    pub v: f64,
    pub r: f64,
    pub w: f64,
    pub mu: f64,
    pub l: f64,
    pub phi: f64,
    pub ws: f64,
}

/// Errors in the parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error("{0} must be a finite number ≥ 0")]
    Negative(&'static str),
    #[error("the link rate μ must be > 0")]
    NoLink,
    #[error("φ must be in (0, 1]")]
    Phi,
}

/// Model outputs (times in s, sizes in MB). `tm_s`/`n` are `None` when
/// pre-copy does not converge (w ≥ μ with V1 > l).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub mode: Mode,
    pub converges: bool,
    pub n: Option<u32>,
    pub v1_mb: f64,
    pub v3_mb: f64,
    pub va_mb: f64,
    pub t1_s: Option<f64>,
    pub t2_s: f64,
    pub t3_s: f64,
    pub ta_s: f64,
    pub tm_s: Option<f64>,
    pub td_s: f64,
}

impl Params {
    fn check(&self) -> Result<(), ModelError> {
        for (name, v) in [
            ("V", self.v),
            ("r", self.r),
            ("w", self.w),
            ("l", self.l),
            ("ws", self.ws),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ModelError::Negative(name));
            }
        }
        if !(self.mu.is_finite() && self.mu > 0.0) {
            return Err(ModelError::NoLink);
        }
        if !(self.phi.is_finite() && self.phi > 0.0 && self.phi <= 1.0) {
            return Err(ModelError::Phi);
        }
        Ok(())
    }

    /// The hybrid split V1 = V·w/(r+w). A guest that neither reads nor
    /// writes has nothing to fault on: all of it is pre-copied.
    pub fn v1(&self) -> f64 {
        if self.r + self.w == 0.0 {
            self.v
        } else {
            self.v * self.w / (self.r + self.w)
        }
    }
}

/// Rounds and time of the iterative part for `v1` MB: (n, T1).
fn iterate(v1: f64, p: &Params) -> Option<(u32, f64)> {
    if v1 <= p.l {
        return Some((0, v1 / p.mu));
    }
    let q = p.w / p.mu;
    if q >= 1.0 {
        return None;
    }
    if q == 0.0 {
        return Some((1, v1 / p.mu)); // round 1 re-sends nothing
    }
    let n = ((p.l / v1).ln() / q.ln()).ceil().max(0.0) as u32;
    let t1 = (0..=n).map(|i| v1 * q.powi(i as i32) / p.mu).sum();
    Some((n, t1))
}

/// Predicts Tm and Td for `mode`.
pub fn predict(mode: Mode, p: &Params) -> Result<Prediction, ModelError> {
    p.check()?;
    let v1 = match mode {
        Mode::Pre => p.v,
        Mode::Post => 0.0,
        Mode::Hybrid => p.v1(),
    };
    let v3 = p.v - v1;
    let t2 = match mode {
        Mode::Post => p.ws / p.mu,
        _ => p.l / p.mu,
    };
    let it = if mode == Mode::Post {
        Some((0, 0.0))
    } else {
        iterate(v1, p)
    };
    let t3 = v3 / (p.phi * p.mu + p.r * (1.0 - p.phi));
    let ta = p.r * t3 / p.mu;
    Ok(Prediction {
        mode,
        converges: it.is_some(),
        n: it.map(|(n, _)| n),
        v1_mb: v1,
        v3_mb: v3,
        va_mb: p.r * t3,
        t1_s: it.map(|(_, t)| t),
        t2_s: t2,
        t3_s: t3,
        ta_s: ta,
        tm_s: it.map(|(_, t1)| t1 + t2 + t3),
        td_s: t2 + ta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's example: V = 11264 MB (1 GB RAM + 10 GB disk), μ = 12.5
    /// MB/s, l = 1000 MB, φ = 0.3, r = w = 3 MB/s. Values computed by hand:
    /// hybrid V1 = 5632, n = ⌈log_0.24(1000/5632)⌉ = ⌈1.211⌉ = 2,
    /// T1 = 450.56·(1 + 0.24 + 0.0576) = 584.65, T2 = 80,
    /// T3 = 5632/(3.75 + 2.1) = 962.74, Ta = 3·962.74/12.5 = 231.06.
    fn paper() -> Params {
        Params {
            v: 11264.0,
            r: 3.0,
            w: 3.0,
            mu: 12.5,
            l: 1000.0,
            phi: 0.3,
            ws: 0.0,
        }
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn hybrid_matches_the_worked_example() {
        let h = predict(Mode::Hybrid, &paper()).unwrap();
        assert_eq!(h.n, Some(2));
        close(h.v1_mb, 5632.0, 1e-9);
        close(h.v3_mb, 5632.0, 1e-9);
        close(h.t1_s.unwrap(), 584.65, 0.01);
        close(h.t2_s, 80.0, 1e-9);
        close(h.t3_s, 962.74, 0.01);
        close(h.ta_s, 231.06, 0.01);
        close(h.tm_s.unwrap(), 1627.39, 0.02);
        close(h.td_s, 311.06, 0.01);
    }

    /// Pre-copy: n = ⌈log_0.24(1000/11264)⌉ = ⌈1.697⌉ = 2,
    /// T1 = 901.12·1.2976 = 1169.29, Tm = 1249.29, Td = 80.
    #[test]
    fn precopy_matches_the_worked_example() {
        let p = predict(Mode::Pre, &paper()).unwrap();
        assert_eq!(p.n, Some(2));
        close(p.tm_s.unwrap(), 1249.29, 0.01);
        close(p.td_s, 80.0, 1e-9);
        close(p.v3_mb, 0.0, 1e-9);
    }

    /// Post-copy with ws = 0: T3 = 11264/5.85 = 1925.47, Td = 3·T3/12.5 = 462.11.
    #[test]
    fn postcopy_matches_the_worked_example() {
        let p = predict(Mode::Post, &paper()).unwrap();
        close(p.tm_s.unwrap(), 1925.47, 0.01);
        close(p.td_s, 462.11, 0.01);
        close(p.v1_mb, 0.0, 1e-9);
    }

    #[test]
    fn precopy_does_not_converge_when_writes_outrun_the_link() {
        let mut p = paper();
        p.w = 13.0;
        let pre = predict(Mode::Pre, &p).unwrap();
        assert!(!pre.converges && pre.tm_s.is_none());
        // Post-copy does not depend on w at all.
        let post = predict(Mode::Post, &p).unwrap();
        assert_eq!(post.tm_s, predict(Mode::Post, &paper()).unwrap().tm_s);
    }

    #[test]
    fn small_first_part_needs_no_iteration() {
        let mut p = paper();
        p.w = 0.1; // V1 = 11264·0.1/3.1 = 363 MB ≤ l
        let h = predict(Mode::Hybrid, &p).unwrap();
        assert_eq!(h.n, Some(0));
        close(h.t1_s.unwrap(), h.v1_mb / 12.5, 1e-9);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut p = paper();
        p.mu = 0.0;
        assert_eq!(predict(Mode::Pre, &p), Err(ModelError::NoLink));
        let mut p = paper();
        p.phi = 1.5;
        assert_eq!(predict(Mode::Hybrid, &p), Err(ModelError::Phi));
        let mut p = paper();
        p.r = -1.0;
        assert_eq!(predict(Mode::Hybrid, &p), Err(ModelError::Negative("r")));
    }
}
