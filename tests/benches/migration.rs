//! Migration figures (printed, not asserted), each beside a reference
//! measured in the same run:
//! - round-0 throughput on incompressible memory vs a plain TCP sender of
//!   the same bytes on loopback (target ≥ 80%);
//! - an idle guest with 1 GiB configured: total time, bytes on the wire vs
//!   touched memory (target ≤ +1%), downtime (target ≤ 5 ms) and the
//!   downtime the guest saw;
//! - downtime and total time against the dirty rate.
//!
//! Run: `cargo bench -p tests --bench migration`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use migration::auth::Secret;
use migration::codec::Compression;
use serde_json::Value;
use tests::{free_port, migrate, scratch, secret_file, Receiver, VmmProcess};
use vmm::migrate::Incoming;
use vmm::{Machine, MachineConfig, RunOptions, Workload};

/// Plain TCP on loopback: one stream, 1 MiB writes; the receiver discards
/// the bytes, or with `into_fresh_memory` writes them into a fresh memfd as a
/// migration destination must (first touch of memory is slow on a nested
/// host, so this is the fair reference for a destination).
fn plain_tcp(bytes: u64, into_fresh_memory: bool) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let rx = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let (mut s, _) = l.accept().unwrap();
        let ram = vmm::vstate::memory::GuestRam::new(bytes.div_ceil(1 << 20) << 20).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while n < bytes {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    if into_fresh_memory {
                        ram.memfd().write_all_at(&buf[..k], n).unwrap();
                    }
                    n += k as u64
                }
            }
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let buf: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let k = (bytes - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).unwrap();
        sent += k as u64;
    }
    drop(s);
    rx.join().unwrap();
    sent as f64 / t.elapsed().as_secs_f64()
}

/// Round-0 throughput of the engine, in-process, source guest paused so the
/// two host cores go to the sender and the receiver (as the plain-TCP
/// reference gets them).
///
/// Two destinations: one that prefaults (allocates and touches, before
/// `Ready`) the RAM the source announces, so round 0 measures the engine's
/// pipeline against the plain sender whose receiver discards; and one that
/// allocates memory as pages arrive, measured against a plain receiver that
/// writes into fresh memory. On this nested host first touch of memory is
/// the slowest step of all (its host reclaims freed memory), so both are
/// shown, and the prefault time beside them.
fn round0_throughput() {
    let pairs: usize = std::env::var("BENCH_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let config = MachineConfig {
        mem_bytes: 1 << 30,
        vcpus: 1,
        guest: "workload".into(),
        workload: Workload::parse("wset=512M,fill=100").unwrap(),
    };
    let m = Machine::boot(config, &RunOptions::default()).unwrap();
    while m.guest_status().unwrap()[0].phase != guest_images::abi::phase::RUNNING {
        std::thread::sleep(Duration::from_millis(20));
    }
    m.pause();
    let secret = Secret::from_bytes(b"benchmark secret 0123456789");
    let run = |compression, prefault| {
        let port = free_port();
        let listener = migration::transport::listen(&format!("tcp:127.0.0.1:{port}")).unwrap();
        let s2 = secret.clone();
        let rx = std::thread::spawn(move || {
            let mut inc = Incoming::new(RunOptions::default()).with_prefault(prefault);
            migration::receive::receive(&listener, &s2, &mut inc).unwrap();
            use migration::DestinationVm;
            inc.discard();
        });
        let opts = migration::Options {
            compression,
            ..Default::default()
        };
        let r = migration::migrate(
            &m,
            &format!("tcp:127.0.0.1:{port}"),
            &secret,
            &opts,
            Default::default(),
        )
        .unwrap();
        rx.join().unwrap();
        m.resume();
        m.pause();
        (r.rounds[0].clone(), r.prefault_ms)
    };
    // On a nested host the first touch of host memory is slow: warm up once.
    let (warm, _) = run(Compression::None, false);
    println!(
        "round0 warm-up (first touch of memory): {:.0} MB/s",
        warm.bytes as f64 / warm.duration_ms / 1e3
    );
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Engine and reference alternate, and each ratio is taken within one
    // pair of runs: the host's speed drifts between runs.
    for compression in [Compression::None, Compression::Auto] {
        for prefault in [true, false] {
            let (mut eng, mut reference, mut ratio, mut pre) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut r0 = None;
            for _ in 0..pairs {
                let (r, prefault_ms) = run(compression, prefault);
                let e = r.bytes as f64 / (r.duration_ms / 1e3);
                let p = plain_tcp(r.bytes, !prefault);
                eng.push(e);
                reference.push(p);
                ratio.push(e / p);
                if std::env::var_os("BENCH_VERBOSE").is_some() {
                    println!(
                        "  pair: engine {:.0} MB/s, reference {:.0} MB/s",
                        e / 1e6,
                        p / 1e6
                    );
                }
                pre.push(prefault_ms);
                r0 = Some(r);
            }
            let r0 = r0.unwrap();
            let (lo, hi) = (
                ratio.iter().cloned().fold(f64::INFINITY, f64::min),
                ratio.iter().cloned().fold(0.0, f64::max),
            );
            let (engine, reference, ratio, prefault_ms) =
                (med(eng), med(reference), med(ratio), med(pre));
            println!(
                "round0_{:?} {} (median of {pairs}): {:>5.0} MB/s on the wire ({} pages, {} lz4) | plain TCP, receiver {} {:>5.0} MB/s | ratio {:.2} (range {:.2}-{:.2}){}",
                compression,
                if prefault { "prefaulted destination" } else { "fresh destination     " },
                engine / 1e6,
                r0.pages,
                r0.lz4_pages,
                if prefault { "discards          " } else { "into fresh memory " },
                reference / 1e6,
                ratio,
                lo,
                hi,
                if prefault {
                    format!(" | prefault {prefault_ms:.0} ms before Ready ({:.0} MB/s)", r0.bytes as f64 / prefault_ms / 1e3)
                } else {
                    String::new()
                }
            );
        }
    }
    m.shutdown();
}

/// One migration between processes; returns (report, source state before).
fn migrate_processes(name: &str, mem: &str, workload: &str) -> (Value, Value) {
    let dir = scratch(name);
    let secret = secret_file(&dir, "secret", "benchmark secret 0123456789");
    let src = VmmProcess::start(
        &dir.join("src.sock"),
        &["--memory", mem, "--workload", workload],
    );
    src.wait_running(Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    let dst = Receiver::start(&dir, &format!("127.0.0.1:{}", free_port()), &secret, None);
    let before = src.state();
    let (ok, report, err) = migrate(&dir.join("src.sock"), &dst.addr, &secret, &[]);
    assert!(ok, "{err}");
    src.quit();
    drop(dst);
    let _ = std::fs::remove_dir_all(dir);
    (report, before)
}

fn idle_guest_1g() {
    let mut downtimes = Vec::new();
    for i in 0..3 {
        let (r, before) = migrate_processes(&format!("idle-{i}"), "1G", "wset=16M");
        let touched = before["ram_populated_bytes"].as_f64().unwrap();
        let wire = r["bytes_wire"].as_f64().unwrap();
        let b = &r["downtime_breakdown"];
        println!(
            "idle_1g run {i}: total {:6.1} ms  wire {:>9} B = {:.3} x touched ({:.0} B)  downtime {:5.2} ms (last round {:.2}, state {:.2}, transfer {:.2}, restore {:.2}, resume {:.2})  guest saw {:5.2} ms",
            r["total_time_ms"].as_f64().unwrap(),
            wire,
            wire / touched,
            touched,
            r["downtime_ms"].as_f64().unwrap(),
            b["last_round_ms"].as_f64().unwrap(),
            b["state_save_ms"].as_f64().unwrap(),
            b["state_transfer_ms"].as_f64().unwrap(),
            b["restore_ms"].as_f64().unwrap(),
            b["resume_ms"].as_f64().unwrap(),
            r["guest_downtime_ms"].as_f64().unwrap(),
        );
        downtimes.push(r["downtime_ms"].as_f64().unwrap());
    }
    downtimes.sort_by(f64::total_cmp);
    println!("idle_1g downtime median {:.2} ms", downtimes[1]);
}

fn against_dirty_rate() {
    println!(
        "dirty rate sweep (1 vCPU, 1 GiB, wset 256 MiB, fill 100%, loopback, max downtime 300 ms):"
    );
    println!(
        "  rate pages/s | rounds | stop rule  | total ms | downtime ms | guest saw ms | wire MB"
    );
    for rate in [0u64, 5_000, 20_000, 50_000, 100_000] {
        let (r, _) = migrate_processes(
            &format!("rate-{rate}"),
            "1G",
            &format!("wset=256M,rate={rate},fill=100"),
        );
        println!(
            "  {:>12} | {:>6} | {:<10} | {:>8.1} | {:>11.2} | {:>12.2} | {:>7.1}",
            rate,
            r["rounds"].as_array().map_or(0, |v| v.len()),
            r["stop_rule"].as_str().unwrap_or("?"),
            r["total_time_ms"].as_f64().unwrap(),
            r["downtime_ms"].as_f64().unwrap(),
            r["guest_downtime_ms"].as_f64().unwrap(),
            r["bytes_wire"].as_f64().unwrap() / 1e6
        );
    }
}

fn main() {
    if !tests::require_kvm() {
        return;
    }
    // `cargo bench -p tests --bench migration -- round0` runs one part.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    if wanted("round0") {
        round0_throughput();
    }
    if wanted("idle") {
        idle_guest_1g();
    }
    if wanted("dirty_rate") {
        against_dirty_rate();
    }
}
