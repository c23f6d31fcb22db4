//! Halting versus spinning guests (`idle=halt`, the default, against
//! `idle=spin`), measured in one run so that the two stand side by side on
//! the same, noisy host.
//!
//! - `cpu`: the host CPU an idle guest costs (no writes, no reads, `cpu=0`),
//!   from the `vmm` process's own CPU time (utime + stime of every thread,
//!   `/proc/PID/stat`) over 10 s, with 1 and 4 vCPUs. Target: a halting
//!   4-vCPU idle guest uses at most 10 % of one host core.
//! - `demo`: the README demo (`vmm demo`: 1 GiB, 2 vCPUs, 256 MiB working
//!   set dirtied at 20 000 pages/s and read at 20 000 pages/s) migrated with
//!   halting and with spinning guests: round-0 throughput and total time.
//!   The spinning guest's two vCPUs take both host cores from the sender
//!   and the receiver.
//!
//! `cargo bench -p tests --bench idle [-- cpu|demo]`

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{per_vcpu, require_kvm, run_bench_parts, scratch, Ends, VmmProcess};

/// CPU time (utime + stime) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11) // state is field 3; utime is 14, stime 15
        .take(2)
        .map(|x| x.parse().expect("a number"))
        .collect();
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[0] + f[1]) * 1000 / hz)
}

/// What an idle guest costs the host over a window.
struct IdleCost {
    /// Percent of one host core the `vmm` process used.
    pct: f64,
    /// Timer ticks the guest's vCPUs took per second (each one a wake-up of
    /// a halted vCPU when halting).
    ticks_s: f64,
}

fn idle_cost(vcpus: u8, idle: &str, window: Duration) -> IdleCost {
    let dir = scratch(&format!("bench-idle-{vcpus}-{idle}"));
    let workload = format!("wset=16M,cpu=0,idle={idle}");
    let v = vcpus.to_string();
    let m = VmmProcess::start(
        &dir.join("m.sock"),
        &["--memory", "256M", "--vcpus", &v, "--workload", &workload],
    );
    m.wait_running(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let ticks = |s: &Value| per_vcpu(s, "ticks").iter().sum::<u64>() as f64;
    let (s0, c0, t0) = (m.state(), cpu_time(m.pid()), Instant::now());
    std::thread::sleep(window);
    let (s1, c1, wall) = (m.state(), cpu_time(m.pid()), t0.elapsed().as_secs_f64());
    m.quit();
    let _ = std::fs::remove_dir_all(dir);
    IdleCost {
        pct: (c1 - c0).as_secs_f64() / wall * 100.0,
        ticks_s: (ticks(&s1) - ticks(&s0)) / wall,
    }
}

fn cpu() {
    let window = Duration::from_secs(10);
    println!("idle guest (wset=16M, no writes, no reads, cpu=0): host CPU of the vmm process over {window:?}");
    println!(
        "{:>6} {:>15} {:>16} {:>8} {:>14} {:>20}",
        "vCPUs", "halting % core", "spinning % core", "ratio", "wake-ups/s", "host µs per wake-up"
    );
    for vcpus in [1u8, 4] {
        let halt = idle_cost(vcpus, "halt", window);
        let spin = idle_cost(vcpus, "spin", window);
        println!(
            "{vcpus:>6} {:>15.1} {:>16.1} {:>8.3} {:>14.0} {:>20.1}",
            halt.pct,
            spin.pct,
            halt.pct / spin.pct,
            halt.ticks_s,
            halt.pct / 100.0 * 1e6 / halt.ticks_s
        );
        if vcpus == 4 {
            println!(
                "target: a halting 4-vCPU idle guest uses <= 10 % of one core: {}",
                if halt.pct <= 10.0 { "met" } else { "NOT met" }
            );
        }
    }
}

fn demo_run(idle: &str) -> Value {
    let workload = format!("wset=256M,rate=20000,read=20000,fill=50,idle={idle}");
    let ends = Ends::start(
        &format!("bench-demo-{idle}"),
        &["--memory", "1G", "--vcpus", "2", "--workload", &workload],
        Duration::from_millis(500),
        &[],
    );
    let (ok, report, err) = ends.migrate(&["--verify", "--compression", "auto"]);
    assert!(ok, "{err}");
    let Ends { dir, src, dst, .. } = ends;
    src.quit();
    drop(dst);
    let _ = std::fs::remove_dir_all(dir);
    report
}

fn demo() {
    println!("README demo (1 GiB, 2 vCPUs, wset=256M,rate=20000,read=20000,fill=50), pre-copy, --verify:");
    println!(
        "{:>8} {:>14} {:>12} {:>14}",
        "guest", "round 0 MB/s", "total ms", "downtime ms"
    );
    let mut rows = Vec::new();
    for idle in ["halt", "spin"] {
        let r = demo_run(idle);
        let r0 = &r["rounds"][0];
        let mb_s = r0["bytes"].as_f64().unwrap() / r0["duration_ms"].as_f64().unwrap() / 1e3;
        let total = r["total_time_ms"].as_f64().unwrap();
        println!(
            "{idle:>8} {mb_s:>14.0} {total:>12.1} {:>14.2}",
            r["downtime_ms"].as_f64().unwrap()
        );
        rows.push((mb_s, total));
    }
    println!(
        "halting / spinning: round-0 throughput x{:.2}, total time x{:.2}",
        rows[0].0 / rows[1].0,
        rows[0].1 / rows[1].1
    );
}

fn main() {
    if !require_kvm() {
        return;
    }
    run_bench_parts(&[("cpu", cpu), ("demo", demo)]);
}
