//! Post-copy and hybrid figures (printed, not asserted):
//! - post-copy switch-over downtime with 1 GiB and 8 GiB configured (target
//!   ≤ 2 ms, independent of size);
//! - demand-fault latency on loopback (target p50 ≤ 100 µs, p99 ≤ 1 ms);
//! - Tm and Td of pre, post and hybrid for r = w at two rates, on a link
//!   capped to a known μ, beside seed 001's prediction.
//!
//! Run: `cargo bench -p tests --bench postcopy [-- switch_over|fault_latency|model]`.

use migration::model::{predict, Mode, Params};
use serde_json::Value;
use tests::bench_migration;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn switch_over_downtime() {
    println!("post-copy switch-over, idle guest (wset 16 MiB), 3 runs each:");
    for mem in ["1G", "8G"] {
        let mut d = Vec::new();
        for i in 0..3 {
            let r = bench_migration(
                &format!("pc-{mem}-{i}"),
                mem,
                "wset=16M",
                &["--mode", "post"],
            )
            .report;
            let b = &r["downtime_breakdown"];
            println!(
                "  {mem}: downtime {:6.2} ms (source pause {:.2}, state save {:.2}, transfer {:.2}, restore {:.2}, uffd setup {:.2}, resume {:.2}), guest saw {:6.2} ms",
                f(&r["downtime_ms"]),
                f(&b["pause_ms"]),
                f(&b["state_save_ms"]),
                f(&b["state_transfer_ms"]),
                f(&b["restore_ms"]),
                f(&b["postcopy_setup_ms"]),
                f(&b["resume_ms"]),
                f(&r["guest_downtime_ms"])
            );
            d.push(f(&r["downtime_ms"]));
        }
        d.sort_by(f64::total_cmp);
        println!("  {mem}: median downtime {:.2} ms", d[1]);
    }
}

fn fault_latency() {
    println!("demand-fault latency (1 vCPU reading 60000 pages/s over 64 MiB, push capped at 200 Mbit/s):");
    for i in 0..3 {
        let r = bench_migration(
            &format!("lat-{i}"),
            "256M",
            "wset=64M,read=60000",
            &["--mode", "post", "--bandwidth", "200Mbit"],
        )
        .report;
        let p = &r["postcopy"];
        println!(
            "  run {i}: {} faults, p50 {:6.1} µs, p99 {:7.1} µs, max {:7.1} µs; longest guest stall {:.2} ms",
            p["demand_faults"],
            f(&p["fault_latency_p50_us"]),
            f(&p["fault_latency_p99_us"]),
            f(&p["fault_latency_max_us"]),
            f(&p["longest_stall_ms"])
        );
    }
}

fn modes_against_the_model() {
    let mu_mb = 50.0; // 400 Mbit/s
    let l_mb = 8.0;
    println!("Tm and Td, measured vs seed 001's model (μ = {mu_mb} MB/s via tbf-like token bucket, l = {l_mb} MB, φ = 1, r = w):");
    println!("  (hybrid measures r, w and μ first; that preparation is left out of Tm meas)");
    println!("  r=w pages/s | mode   | Tm meas s | Tm model s | Td meas ms | Td+stalls ms | Td model ms | faults");
    for rate in [2000u64, 6000] {
        let workload = format!("wset=128M,rate={rate},read={rate},pattern=random");
        for (mode, extra) in [
            ("pre", vec![]),
            ("post", vec![]),
            ("hybrid", vec!["--threshold", "8M"]),
        ] {
            let mut args = vec!["--mode", mode, "--bandwidth", "400Mbit"];
            args.extend(extra);
            let tests::BenchRun {
                report: r, before, ..
            } = bench_migration(&format!("model-{rate}-{mode}"), "512M", &workload, &args);
            let v_mb = f(&before["ram_populated_bytes"]) / 1e6;
            let rw = rate as f64 * 4096.0 / 1e6;
            let p = Params {
                v: v_mb,
                r: rw,
                w: rw,
                mu: mu_mb,
                l: l_mb,
                phi: 1.0,
                ws: 0.1,
            };
            let m = predict(mode.parse::<Mode>().unwrap(), &p).unwrap();
            let pc = &r["postcopy"];
            let faults = pc["demand_faults"].as_u64().unwrap_or(0);
            let stalls_ms = faults as f64 * f(&pc["fault_latency_p50_us"]).max(0.0) / 1e3;
            // The model's Tm has no preparation stage: leave ours out.
            let planning_ms = r["prediction"]["planning_ms"].as_f64().unwrap_or(0.0);
            println!(
                "  {rate:>11} | {mode:<6} | {:>9.3} | {:>10} | {:>10.2} | {:>12.2} | {:>11.2} | {faults}",
                (f(&r["total_time_ms"]) - planning_ms) / 1e3,
                m.tm_s.map_or("diverges".into(), |t| format!("{t:.3}")),
                f(&r["downtime_ms"]),
                f(&r["downtime_ms"]) + if faults > 0 { stalls_ms } else { 0.0 },
                m.td_s * 1e3,
            );
        }
    }
}

fn main() {
    if !tests::require_kvm() {
        return;
    }
    tests::run_bench_parts(&[
        ("switch_over", switch_over_downtime),
        ("fault_latency", fault_latency),
        ("model", modes_against_the_model),
    ]);
}
