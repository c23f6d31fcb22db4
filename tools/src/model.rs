//! `vmm model`: seed 001's analytical prediction of Tm and Td.

use migration::model::{predict, Mode, Params};
use migration::rate_limit::parse_bandwidth;
use vmm::config::parse_size;

/// Arguments of `vmm model`. Sizes and rates take the units of every other
/// command (`1G`, `256M`; `1Gbit`, `50M` per second); a plain number is
/// MB or MB/s (10^6 bytes), the model's own units.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// pre, post or hybrid.
    #[arg(long)]
    mode: Mode,
    /// V: memory to move (MB, or e.g. 11G).
    #[arg(long, value_parser = mb)]
    size_mb: f64,
    /// r: what the guest reads per second (MB/s, or e.g. 3M).
    #[arg(long, value_parser = mb_s)]
    read_rate: f64,
    /// w: what the guest writes per second (MB/s, or e.g. 3M).
    #[arg(long, value_parser = mb_s)]
    write_rate: f64,
    /// μ: the link (MB/s, or e.g. 100Mbit).
    #[arg(long, value_parser = mb_s)]
    bandwidth: f64,
    /// l: pre-copy stops once a round dirtied at most this (MB, or e.g. 1G).
    #[arg(long, value_parser = mb)]
    threshold: f64,
    /// φ: share of the link for the background push after the switch.
    #[arg(long, default_value_t = 0.3)]
    phi: f64,
    /// ws: vCPU and device state, post-copy's stop-and-copy (MB, or e.g. 100K).
    #[arg(long, default_value = "0", value_parser = mb)]
    ws_mb: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A plain number, as is; `None` if it carries a unit.
fn plain(s: &str) -> Option<f64> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// MB (10^6 bytes): a plain number, or a size as `vmm run --memory` takes it.
fn mb(s: &str) -> Result<f64, String> {
    match plain(s) {
        Some(v) => Ok(v),
        None => Ok(parse_size(s).map_err(|e| e.to_string())? as f64 / 1e6),
    }
}

/// MB/s: a plain number, or a rate as `vmm migrate --bandwidth` takes it.
fn mb_s(s: &str) -> Result<f64, String> {
    match plain(s) {
        Some(v) => Ok(v),
        None => Ok(parse_bandwidth(s)? as f64 / 1e6),
    }
}

/// Prints the prediction.
pub fn model(a: ModelArgs) -> Result<(), String> {
    let p = Params {
        v: a.size_mb,
        r: a.read_rate,
        w: a.write_rate,
        mu: a.bandwidth,
        l: a.threshold,
        phi: a.phi,
        ws: a.ws_mb,
    };
    let pred = predict(a.mode, &p).map_err(|e| e.to_string())?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&pred).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    match (pred.tm_s, pred.n) {
        (Some(tm), Some(n)) => println!(
            "{:?}: Tm = {tm:.2} s, Td = {:.2} s; n = {n}, V1 = {:.1} MB, V3 = {:.1} MB, Va = {:.1} MB (T1 {:.2}, T2 {:.2}, T3 {:.2}, Ta {:.2})",
            pred.mode, pred.td_s, pred.v1_mb, pred.v3_mb, pred.va_mb, pred.t1_s.unwrap_or(0.0), pred.t2_s, pred.t3_s, pred.ta_s
        ),
        _ => println!("{:?}: pre-copy does not converge (w ≥ μ); V1 = {:.1} MB", pred.mode, pred.v1_mb),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates_take_the_shared_units() {
        assert_eq!(mb("11264"), Ok(11264.0));
        assert_eq!(mb("1G"), Ok(1073.741824));
        assert_eq!(mb("256M"), Ok(268.435456));
        assert_eq!(mb_s("12.5"), Ok(12.5));
        assert_eq!(mb_s("1Gbit"), Ok(125.0));
        assert_eq!(mb_s("50M"), Ok(50.0));
        assert!(mb("1Q").is_err());
        assert!(mb_s("fast").is_err());
        assert!(mb("-3").is_err());
    }
}
