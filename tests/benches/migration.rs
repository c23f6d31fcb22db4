//! Migration figures (printed, not asserted), each beside a reference
//! measured in the same run:
//! - round-0 throughput on incompressible memory vs a plain TCP sender of
//!   the same bytes on loopback (target ≥ 80%), and vs the bare link;
//! - an idle guest with 1 GiB configured: total time, bytes on the wire vs
//!   touched memory (target ≤ +1%), downtime (target ≤ 5 ms) and the
//!   downtime the guest saw;
//! - downtime and total time against the dirty rate.
//!
//! Run: `cargo bench -p tests --bench migration [-- round0|idle|dirty_rate]`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use migration::auth::Secret;
use migration::codec::Compression;
use migration::secure::Protection;
use tests::{bench_migration, free_port};
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile, WriteVolatile};
use vmm::migrate::Incoming;
use vmm::vstate::memory::GuestRam;
use vmm::{Machine, MachineConfig, RunOptions, Workload};

/// Where a plain-TCP reference receiver puts the bytes.
#[derive(Clone, Copy)]
enum Sink {
    /// Read into one hot 1 MiB buffer, over and over: the link alone.
    Discard,
    /// Read straight into RAM that was allocated and touched beforehand, as
    /// a prefaulted destination receives.
    Prefaulted,
    /// `pwrite` into a fresh memfd, as a destination that allocates memory
    /// as pages arrive (first touch of memory is slow on a nested host).
    Fresh,
}

/// Plain TCP on loopback: one stream, 1 MiB writes, no framing, no checks.
///
/// With `from: Some(ram)` the sender writes the bytes the engine sends, up
/// to `bytes`, straight from the guest's memory (its populated ranges, in
/// order): what a plain TCP sender of those bytes can do. With `None` it
/// writes one hot 1 MiB buffer again and again: what the link can do.
fn plain_tcp(from: Option<&GuestRam>, bytes: u64, sink: Sink) -> f64 {
    const CHUNK: u64 = 1 << 20;
    let ranges = match from {
        Some(src) => src.populated_ranges().unwrap(),
        None => vec![(0, bytes)],
    };
    let mut chunks = Vec::new();
    let mut total = 0;
    for (off, len) in ranges {
        for o in (off..off + len).step_by(CHUNK as usize) {
            let k = (off + len - o).min(CHUNK).min(bytes - total);
            if k > 0 {
                chunks.push((o, k as usize));
                total += k;
            }
        }
    }
    let ram = GuestRam::new(total.div_ceil(CHUNK) * CHUNK).unwrap();
    if let Sink::Prefaulted = sink {
        ram.prefault(0, ram.size()).unwrap();
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let rx = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; CHUNK as usize];
        let mut n = 0u64;
        while n < total {
            let k = (total - n).min(CHUNK) as usize;
            if let Sink::Prefaulted = sink {
                let gpa = GuestAddress(ram.gpa_of(n).unwrap());
                let dst = ram.memory().get_slice(gpa, k).unwrap();
                let mut got = 0;
                while got < k {
                    got += s.read_volatile(&mut dst.offset(got).unwrap()).unwrap();
                }
            } else {
                s.read_exact(&mut buf[..k]).unwrap();
                if let Sink::Fresh = sink {
                    ram.memfd().write_all_at(&buf[..k], n).unwrap();
                }
            }
            n += k as u64;
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let hot: Vec<u8> = (0..CHUNK as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let t = Instant::now();
    for (off, k) in chunks {
        match from {
            Some(src) => {
                let gpa = GuestAddress(src.gpa_of(off).unwrap());
                let data = src.memory().get_slice(gpa, k).unwrap();
                let mut put = 0;
                while put < k {
                    put += s.write_volatile(&data.offset(put).unwrap()).unwrap();
                }
            }
            None => s.write_all(&hot[..k]).unwrap(),
        }
    }
    drop(s);
    rx.join().unwrap();
    total as f64 / t.elapsed().as_secs_f64()
}

/// Round-0 throughput of the engine, in-process, source guest paused so the
/// two host cores go to the sender and the receiver (as the plain-TCP
/// reference gets them).
///
/// Two destinations: one that prefaults (allocates and touches, before
/// `Ready`) the RAM the source announces, and one that allocates memory as
/// pages arrive. Each is measured against two plain-TCP references run
/// right after it:
/// - *the same bytes*: a plain sender writes the guest's populated memory
///   straight from the source's RAM, and a plain receiver reads it into
///   prefaulted (or `pwrite`s it into fresh) memory: the target (≥ 80%),
///   since it moves exactly what the engine moves, from and to where the
///   engine must, with no framing, checks or encoding;
/// - *the link*: one hot 1 MiB buffer sent again and again to a receiver
///   that discards. Both ends stay in the CPU caches, so this is an upper
///   bound no memory-to-memory transfer reaches on this host (its memory
///   and page-table walks, under nested paging, are the slow part).
///
/// On this nested host first touch of memory is the slowest step of all
/// (its host reclaims freed memory), so the prefault time is shown too.
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
    // The engine against plain TCP: no cipher (see the `protection` bench).
    let secret = Protection::InsecurePlaintext(Secret::from_bytes(b"benchmark secret 0123456789"));
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
    // Engine and references alternate, and each ratio is taken within one
    // round of runs: the host's speed drifts between runs.
    let src = m.vm().ram();
    for compression in [Compression::None, Compression::Auto] {
        for prefault in [true, false] {
            let sink = if prefault {
                Sink::Prefaulted
            } else {
                Sink::Fresh
            };
            let (mut eng, mut same, mut link, mut pre) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut r0 = None;
            for _ in 0..pairs {
                let (r, prefault_ms) = run(compression, prefault);
                let e = r.bytes as f64 / (r.duration_ms / 1e3);
                let p = plain_tcp(Some(src), r.bytes, sink);
                let l = plain_tcp(None, r.bytes, Sink::Discard);
                if std::env::var_os("BENCH_VERBOSE").is_some() {
                    println!(
                        "  engine {:.0} MB/s, same bytes {:.0} MB/s, link {:.0} MB/s",
                        e / 1e6,
                        p / 1e6,
                        l / 1e6
                    );
                }
                eng.push(e);
                same.push(e / p);
                link.push(e / l);
                pre.push(prefault_ms);
                r0 = Some(r);
            }
            let r0 = r0.unwrap();
            let range = |v: &[f64]| {
                let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = v.iter().cloned().fold(0.0, f64::max);
                format!("{lo:.2}-{hi:.2}")
            };
            let (same_range, link_range) = (range(&same), range(&link));
            let prefault_ms = med(pre);
            println!(
                "round0_{:?} {} (median of {pairs}): {:>5.0} MB/s on the wire ({} pages, {} lz4) | vs plain TCP of the same bytes, guest memory to {}: {:.2} ({same_range}) | vs the link (hot buffer, receiver discards): {:.2} ({link_range}){}",
                compression,
                if prefault { "prefaulted destination" } else { "fresh destination     " },
                med(eng) / 1e6,
                r0.pages,
                r0.lz4_pages,
                if prefault { "prefaulted memory" } else { "fresh memory     " },
                med(same),
                med(link),
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

fn idle_guest_1g() {
    let mut downtimes = Vec::new();
    for i in 0..3 {
        let tests::BenchRun {
            report: r, before, ..
        } = bench_migration(&format!("idle-{i}"), "1G", "wset=16M", &[]);
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
        let r = bench_migration(
            &format!("rate-{rate}"),
            "1G",
            &format!("wset=256M,rate={rate},fill=100"),
            &[],
        )
        .report;
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
    tests::run_bench_parts(&[
        ("round0", round0_throughput),
        ("idle", idle_guest_1g),
        ("dirty_rate", against_dirty_rate),
        ("policy_ask", policy_ask_cost),
    ]);
}

/// What asking an external policy costs per round: `after_round` asked of
/// the shipped Python example (`tools/policies/precopy_then_postcopy.py`)
/// over its stdin/stdout, against the same ask of the built-in policy, on
/// a 10-round history. A round asks twice (`round`, `after_round`).
fn policy_ask_cost() {
    use migration::policy::{Builtin, ExecPolicy, History, Policy, Start};
    use migration::report::Round;
    let options = migration::Options::default();
    let history = History {
        elapsed_ms: 10_000.0,
        limits: options.limits(),
        measured: None,
        start: Start::PreCopy,
        rounds: (0..10)
            .map(|i| Round {
                round: i,
                pages: 25_000,
                bytes: 100 << 20,
                duration_ms: 1000.0,
                dirtied_pages: 20_000 - u64::from(i) * 100,
                dirty_rate_pages_s: 20_000.0,
                estimated_downtime_ms: 800.0,
                ..Default::default()
            })
            .collect(),
        pending_pages: 20_000,
        bytes_sent: 1000 << 20,
    };
    let time = |p: &mut dyn Policy, n: u32| {
        p.after_round(&history).expect("an answer"); // start-up is not an ask
        let t = Instant::now();
        for _ in 0..n {
            p.after_round(&history).expect("an answer");
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    };
    let program = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tools/policies/precopy_then_postcopy.py");
    let mut external =
        ExecPolicy::spawn(&program, Duration::from_secs(10)).expect("the Python example starts");
    let ext_us = time(&mut external, 500);
    let builtin_us = time(&mut Builtin::new(&options), 50_000);
    println!(
        "policy ask (after_round, 10-round history): external Python {ext_us:.0} µs, built-in {builtin_us:.2} µs ({:.0}x); per round (2 asks) {:.0} µs external",
        ext_us / builtin_us,
        2.0 * ext_us
    );
}
