//! Foundation figures (printed, not asserted):
//! - process start to first heartbeat;
//! - pages/s one vCPU dirties with dirty logging off and on (ratio on/off);
//! - cost of KVM_GET_DIRTY_LOG per GiB of RAM;
//! - time to save and restore the machine state (without memory).
//!
//! Run: `cargo bench -p tests --bench foundation [-- first_heartbeat|dirty_rates|dirty_log_cost|state_save_restore]`.

use std::time::{Duration, Instant};

use guest_images::abi::phase;
use vmm::{Machine, MachineConfig, RunOptions, Workload};

fn boot(vcpus: u8, mem: u64, workload: &str) -> Machine {
    let config = MachineConfig {
        mem_bytes: mem,
        vcpus,
        guest: "workload".into(),
        workload: Workload::parse(workload).unwrap(),
    };
    let m = Machine::boot(config, &RunOptions::default()).expect("boot");
    let t = Instant::now();
    while !m
        .guest_status()
        .unwrap()
        .iter()
        .all(|c| c.phase == phase::RUNNING)
    {
        assert!(t.elapsed() < Duration::from_secs(120), "guest never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn start_to_first_heartbeat() {
    let bin = tests::vmm_bin();
    let runs: Vec<f64> = (0..5)
        .map(|_| {
            let out = std::process::Command::new(&bin)
                .args([
                    "run",
                    "--memory",
                    "256M",
                    "--duration",
                    "0",
                    "--status-ms",
                    "0",
                ])
                .output()
                .expect("vmm run");
            let err = String::from_utf8_lossy(&out.stderr);
            err.lines()
                .find_map(|l| l.strip_prefix("first heartbeat "))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        })
        .collect();
    println!(
        "start_to_first_heartbeat_ms      median {:8.1}  (runs: {runs:.1?})",
        median(runs.clone())
    );
}

/// Pages written per second by one vCPU over `window`.
fn dirty_rate(m: &Machine, window: Duration, rearm: Option<Duration>) -> f64 {
    let w0 = m.guest_status().unwrap()[0].pages_written;
    let t = Instant::now();
    while t.elapsed() < window {
        match rearm {
            Some(every) => {
                std::thread::sleep(every);
                m.vm().take_dirty_bitmap().unwrap();
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let w1 = m.guest_status().unwrap()[0].pages_written;
    (w1 - w0) as f64 / t.elapsed().as_secs_f64()
}

fn dirty_rates() {
    let m = boot(1, 512 << 20, "wset=256M,rate=4000000000,fill=100");
    let off = dirty_rate(&m, Duration::from_secs(2), None);
    m.vm().set_dirty_logging(true).unwrap();
    let on = dirty_rate(&m, Duration::from_secs(2), Some(Duration::from_millis(100)));
    m.vm().set_dirty_logging(false).unwrap();
    println!("guest_dirty_pages_per_s_log_off  {off:12.0}");
    println!(
        "guest_dirty_pages_per_s_log_on   {on:12.0}  (ratio on/off {:.2}; log read every 100 ms)",
        on / off
    );
    m.shutdown();
}

fn dirty_log_cost() {
    let gib = 4u64;
    let m = boot(1, gib << 30, "wset=64M,rate=20000");
    m.vm().set_dirty_logging(true).unwrap();
    let ram = m.vm().ram();
    let mut ioctl = Vec::new();
    let mut total = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        for r in ram.regions() {
            m.vm().fd().get_dirty_log(r.slot, r.size as usize).unwrap();
        }
        ioctl.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        m.vm().take_dirty_bitmap().unwrap();
        total.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let per = |v: Vec<f64>| median(v) / gib as f64;
    let (io, tot) = (per(ioctl), per(total));
    println!("kvm_get_dirty_log_us_per_gib      {io:8.1}");
    println!(
        "dirty_bitmap_with_vmm_or_us_per_gib {tot:6.1}  (KVM ioctl share {:.0}%)",
        100.0 * io / tot
    );
    m.shutdown();
}

fn state_save_restore() {
    for vcpus in [1u8, 4] {
        let m = boot(vcpus, 256 << 20, "wset=16M,rate=1000");
        m.pause();
        let mut saves = Vec::new();
        let mut state = None;
        for _ in 0..10 {
            let t = Instant::now();
            state = Some(m.save_state().unwrap());
            saves.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let state = state.unwrap();
        let json = serde_json::to_vec(&state).unwrap();
        let mut restores = Vec::new();
        for _ in 0..5 {
            let ram = vmm::vstate::memory::GuestRam::new(256 << 20).unwrap();
            let t = Instant::now();
            let r = Machine::restore(&state, ram, &RunOptions::default()).unwrap();
            restores.push(t.elapsed().as_secs_f64() * 1e3);
            r.shutdown();
        }
        println!(
            "state_save_ms_{vcpus}vcpu  {:6.2}   state_restore_ms_{vcpus}vcpu (new VM + vCPUs + set) {:6.2}   state_json_bytes {}",
            median(saves),
            median(restores),
            json.len()
        );
        m.shutdown();
    }
}

fn main() {
    if !tests::require_kvm() {
        return;
    }
    tests::run_bench_parts(&[
        ("first_heartbeat", start_to_first_heartbeat),
        ("dirty_rates", dirty_rates),
        ("dirty_log_cost", dirty_log_cost),
        ("state_save_restore", state_save_restore),
    ]);
}
