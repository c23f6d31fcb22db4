//! A migration that fails before the switch-over leaves the source running
//! exactly as before, and says clearly why: destination killed during a
//! round, connection cut, wrong secret, a corrupted frame.

use std::time::Duration;

use tests::{
    assert_source_unharmed, free_port, migrate, migrate_in_background, require_kvm, scratch,
    secret_file, Fault, Proxy, Receiver, VmmProcess, PLAINTEXT,
};

const WORKLOAD: &str = "wset=64M,rate=5000,fill=100";

fn source(dir: &std::path::Path) -> VmmProcess {
    source_running(dir, WORKLOAD)
}

fn source_running(dir: &std::path::Path, workload: &str) -> VmmProcess {
    let src = VmmProcess::start(
        &dir.join("src.sock"),
        &["--memory", "256M", "--workload", workload],
    );
    src.wait_running(Duration::from_secs(60));
    src
}

#[test]
fn wrong_secret_is_refused_on_both_sides() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("wrong-secret");
    let src = source(&dir);
    let good = secret_file(&dir, "good", "the destination's secret 123");
    let bad = secret_file(&dir, "bad", "somebody else's secret 4567");
    let mut dst = Receiver::start_with(
        &dir,
        &format!("127.0.0.1:{}", free_port()),
        &good,
        None,
        &["--once"],
    );
    let (ok, _, err) = migrate(&dir.join("src.sock"), &dst.addr, &bad, &[]);
    assert!(!ok);
    assert!(err.contains("Authentication failed"), "source error: {err}");
    assert_ne!(
        dst.wait_exit(Duration::from_secs(10)),
        Some(0),
        "destination accepted a wrong secret"
    );
    assert!(
        dst.stderr_text().contains("Authentication failed"),
        "destination: {}",
        dst.stderr_text()
    );
    // A missing or short secret is refused before anything is sent.
    let short = secret_file(&dir, "short", "tiny");
    let (ok, _, err) = migrate(&dir.join("src.sock"), &dst.addr, &short, &[]);
    assert!(!ok && err.contains("at least 16"), "{err}");
    assert_source_unharmed(&src);
    src.quit();
}

#[test]
fn destination_killed_during_a_round() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("dst-killed");
    let src = source(&dir);
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let mut dst = Receiver::start(&dir, &format!("127.0.0.1:{}", free_port()), &secret, None);
    // 64 MiB at 100 Mbit/s: round 0 takes about 5 s.
    let t = migrate_in_background(
        &dir.join("src.sock"),
        &dst.addr,
        &secret,
        &["--bandwidth", "100Mbit", "--compression", "none"],
    );
    src.wait_for("round 0 under way", Duration::from_secs(10), |_| {
        dst.stderr_text().contains("incoming migration")
    });
    std::thread::sleep(Duration::from_millis(800));
    dst.kill();
    assert_failed_and_source_unharmed(t, &src);
    src.quit();
}

/// The migration running on `t` failed, said that the guest keeps running,
/// and it does.
fn assert_failed_and_source_unharmed(
    t: std::thread::JoinHandle<(bool, serde_json::Value, String)>,
    src: &VmmProcess,
) {
    let (ok, _, err) = t.join().unwrap();
    assert!(!ok, "migration to a dead destination succeeded");
    assert!(
        err.contains("migration failed") && err.contains("keeps running"),
        "{err}"
    );
    assert_source_unharmed(src);
}

/// Auto-converge has slowed the source's vCPUs when the destination dies:
/// the failed migration gives them their full time back.
#[test]
fn destination_killed_while_the_source_is_throttled() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("dst-killed-throttled");
    // 8 MiB rewritten at 48 MB/s over a 25 MB/s link: every round is high.
    let src = source_running(&dir, "wset=8M,rate=12000,fill=100");
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let mut dst = Receiver::start(&dir, &format!("127.0.0.1:{}", free_port()), &secret, None);
    let t = migrate_in_background(
        &dir.join("src.sock"),
        &dst.addr,
        &secret,
        &[
            "--bandwidth",
            "200Mbit",
            "--auto-converge",
            "--max-rounds",
            "1000",
        ],
    );
    src.wait_for("the vCPUs throttled", Duration::from_secs(30), |s| {
        s["throttle_pct"].as_u64() > Some(0)
    });
    dst.kill();
    assert_failed_and_source_unharmed(t, &src);
    src.quit();
}

#[test]
fn connection_cut_mid_stream() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("cut");
    let src = source(&dir);
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let listen = format!("127.0.0.1:{}", free_port());
    // Plaintext on both ends: the proxy parses the frames.
    let mut dst = Receiver::start_with(&dir, &listen, &secret, None, &["--once", PLAINTEXT]);
    let proxy = Proxy::start(&listen, Fault::CutAfter(8 << 20));
    let (ok, _, err) = migrate(
        &dir.join("src.sock"),
        &proxy.addr,
        &secret,
        &["--compression", "none", PLAINTEXT],
    );
    assert!(!ok, "migration over a cut connection succeeded");
    assert!(
        err.contains("Connection") || err.contains("closed"),
        "{err}"
    );
    assert_ne!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        dst.stderr_text().contains("incoming migration failed"),
        "{}",
        dst.stderr_text()
    );
    assert_source_unharmed(&src);
    src.quit();
}

/// Staged pages (read whole, checked, then written) and pages received in
/// place (a prefaulted destination checks them where they landed) alike.
/// In plaintext, where the CRC is the only check (encrypted, the record's
/// tag fails first: see `protection.rs`).
#[test]
fn corrupted_frame_is_detected() {
    if !require_kvm() {
        return;
    }
    corrupted_frame_is_detected_by("corrupt", &["--insecure-plaintext"]);
    corrupted_frame_is_detected_by("corrupt-in-place", &["--prefault", "--insecure-plaintext"]);
}

fn corrupted_frame_is_detected_by(name: &str, receiver_args: &[&str]) {
    let dir = scratch(name);
    let src = source(&dir);
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let listen = format!("127.0.0.1:{}", free_port());
    let args = [receiver_args, &["--once"]].concat();
    let mut dst = Receiver::start_with(&dir, &listen, &secret, None, &args);
    // One bit flipped 3 MB into the stream, inside some page's data.
    let proxy = Proxy::start(&listen, Fault::FlipAt(3 << 20));
    let (ok, _, err) = migrate(
        &dir.join("src.sock"),
        &proxy.addr,
        &secret,
        &["--compression", "none", "--insecure-plaintext"],
    );
    assert!(!ok, "a corrupted stream was accepted");
    assert!(
        err.contains("CRC mismatch"),
        "source should report the destination's reason: {err}"
    );
    assert_ne!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        dst.stderr_text().contains("CRC mismatch"),
        "{}",
        dst.stderr_text()
    );
    assert_source_unharmed(&src);
    src.quit();
}

/// A silent partition during post-copy (packets stop, sockets stay open,
/// the fault connection's too): `vmm migrate` ends with a clear error in
/// bounded time instead of hanging on the fault connection, and the
/// destination gives up on its own deadline.
#[test]
fn silent_partition_during_post_copy_ends_in_bounded_time() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("silent-partition");
    // Sockets give up after 2 s of silence instead of 30.
    let src = VmmProcess::start_with_env(
        &dir.join("src.sock"),
        &["--memory", "256M", "--workload", WORKLOAD],
        &[("VMM_PEER_TIMEOUT_MS", "2000")],
    );
    src.wait_running(Duration::from_secs(60));
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let listen = format!("127.0.0.1:{}", free_port());
    // Plaintext on both ends: the proxy parses the frames.
    let args = ["--once", "--frame-timeout", "2s", PLAINTEXT];
    let mut dst = Receiver::start_with(&dir, &listen, &secret, None, &args);
    // 64 MiB pushed at 100 Mbit/s: the stall comes at the 64th page frame
    // (about 16 MiB into the push).
    let stall = tests::At {
        dir: tests::Dir::ToDestination,
        kind: migration::protocol::Kind::Pages,
        nth: 64,
    };
    let proxy = Proxy::start(&listen, Fault::Stall(stall));
    let t = std::time::Instant::now();
    let (ok, _, err) = migrate(
        &dir.join("src.sock"),
        &proxy.addr,
        &secret,
        &[
            "--mode",
            "post",
            "--bandwidth",
            "100Mbit",
            "--compression",
            "none",
            PLAINTEXT,
        ],
    );
    assert!(!ok, "a migration over a partitioned link succeeded");
    assert!(err.contains("went silent"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    // The destination paused what it has and names the missing pages.
    assert_eq!(dst.wait_exit(Duration::from_secs(20)), Some(3));
    assert!(
        dst.stderr_text().contains("never arrived"),
        "{}",
        dst.stderr_text()
    );
}
