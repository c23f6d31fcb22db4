//! How long pausing every vCPU takes (signal + immediate_exit + park), over
//! 100 pause/resume cycles of a running guest. `cargo run --release -p tests
//! --example pause_latency [VCPUS]`.

use std::time::{Duration, Instant};

use vmm::{Machine, MachineConfig, RunOptions, Workload};

fn main() {
    let vcpus: u8 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let config = MachineConfig {
        mem_bytes: 256 << 20,
        vcpus,
        guest: "workload".into(),
        workload: Workload::parse("wset=16M,rate=1000").unwrap(),
    };
    let m = Machine::boot(config, &RunOptions::default()).expect("boot");
    std::thread::sleep(Duration::from_millis(500));
    let mut us = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        m.pause();
        us.push(t.elapsed().as_secs_f64() * 1e6);
        m.resume();
        std::thread::sleep(Duration::from_millis(50));
    }
    us.sort_by(f64::total_cmp);
    println!(
        "pause of {vcpus} vCPU(s): p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        us[50], us[90], us[99], us[99]
    );
    m.shutdown();
}
