//! `vmm model`: seed 001's analytical prediction of Tm and Td.

use migration::model::{predict, Mode, Params};

/// Arguments of `vmm model` (sizes in MB, rates in MB/s).
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// pre, post or hybrid.
    #[arg(long)]
    mode: Mode,
    /// V: MB to move.
    #[arg(long)]
    size_mb: f64,
    /// r: MB/s the guest reads.
    #[arg(long)]
    read_rate: f64,
    /// w: MB/s the guest writes.
    #[arg(long)]
    write_rate: f64,
    /// μ: MB/s of the link.
    #[arg(long)]
    bandwidth: f64,
    /// l: MB; pre-copy stops once a round dirtied at most this.
    #[arg(long)]
    threshold: f64,
    /// φ: share of the link for the background push after the switch.
    #[arg(long, default_value_t = 0.3)]
    phi: f64,
    /// ws: MB of vCPU and device state (post-copy's stop-and-copy).
    #[arg(long, default_value_t = 0.0)]
    ws_mb: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
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
