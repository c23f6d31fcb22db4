//! What protecting the stream costs, in one run:
//! - round-0 throughput of one migration with TLS and with the PSK
//!   (Noise) mode, as ratios to plaintext (target ≥ 0.7×), the three
//!   alternated and the median of each taken;
//! - what each cipher costs per core: MB/s of 1 MiB buffers sealed and
//!   opened again on one thread, in memory.
//!
//! Run: `cargo bench -p tests --bench protection` (`BENCH_PAIRS=N`, default 3).

use std::sync::Arc;
use std::time::Duration;

use migration::auth::Secret;
use migration::codec::Compression;
use migration::secure::{certs, noise, tls, Protection, TlsFiles};
use tests::free_port;
use vmm::migrate::Incoming;
use vmm::{Machine, MachineConfig, RunOptions, Workload};

fn tls_pair(dir: &std::path::Path) -> (tls::TlsConfig, tls::TlsConfig) {
    certs::generate(dir, &[]).unwrap();
    let files = |end: &str| TlsFiles {
        cert: dir.join(format!("{end}.pem")),
        key: dir.join(format!("{end}.key")),
        ca: dir.join("ca.pem"),
    };
    (
        tls::TlsConfig::load(&files("source")).unwrap(),
        tls::TlsConfig::load(&files("destination")).unwrap(),
    )
}

/// One migration of `m` to a receiver on this process; round 0's MB/s.
fn round0(m: &Machine, src: &Protection, dst: &Protection) -> f64 {
    let port = free_port();
    let listener = migration::transport::listen(&format!("tcp:127.0.0.1:{port}")).unwrap();
    let dst = dst.clone();
    let rx = std::thread::spawn(move || {
        let mut inc = Incoming::new(RunOptions::default()).with_prefault(true);
        migration::receive::receive(&listener, &dst, &mut inc).unwrap();
        use migration::DestinationVm;
        inc.discard();
    });
    let opts = migration::Options {
        compression: Compression::None,
        ..Default::default()
    };
    let addr = format!("tcp:127.0.0.1:{port}");
    let r = migration::migrate(m, &addr, src, &opts, Default::default()).unwrap();
    rx.join().unwrap();
    m.resume();
    m.pause();
    r.rounds[0].bytes as f64 / r.rounds[0].duration_ms / 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !tests::require_kvm() {
        return;
    }
    let pairs: usize = std::env::var("BENCH_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("bench-protection-{}", std::process::id()));
    let (src_tls, dst_tls) = tls_pair(&dir);
    let noise_mb_s = noise::seal_open_rate(256 << 20).unwrap();
    let tls_mb_s = tls::seal_open_rate(&src_tls, &dst_tls, 256 << 20).unwrap();
    println!(
        "cipher per core (seal + open of 1 MiB buffers, one thread): \
         Noise {} {noise_mb_s:.0} MB/s, TLS 1.3 (rustls/ring, AES-256-GCM) {tls_mb_s:.0} MB/s",
        noise::PARAMS
    );
    let secret = Secret::from_bytes(b"benchmark secret 0123456789");
    let modes = [
        (
            "plaintext",
            Protection::InsecurePlaintext(secret.clone()),
            None,
        ),
        ("psk", Protection::Psk(secret), None),
        (
            "tls",
            Protection::Tls(Arc::new(src_tls)),
            Some(Protection::Tls(Arc::new(dst_tls))),
        ),
    ];
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
    // Warm-up: the first touch of host memory is slow on a nested host.
    round0(&m, &modes[0].1, &modes[0].1);
    let mut rates = vec![Vec::new(); modes.len()];
    for _ in 0..pairs {
        for (i, (_, src, dst)) in modes.iter().enumerate() {
            rates[i].push(round0(&m, src, dst.as_ref().unwrap_or(src)));
        }
    }
    let plain = median(rates[0].clone());
    for ((name, _, _), r) in modes.iter().zip(rates) {
        let r = median(r);
        println!(
            "round0 {name:>9}: {r:6.0} MB/s  ({:.2}x plaintext, median of {pairs})",
            r / plain
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
