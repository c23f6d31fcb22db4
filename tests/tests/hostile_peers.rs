//! A receiver that cannot be knocked over, and local safety: hostile or
//! stray peers are cut off within bounded time, logged without their raw
//! bytes, and the next real migration to the same `vmm receive` succeeds;
//! the control socket refuses what would destroy a migrating machine; the
//! files holding a guest or a secret stay private.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use migration::auth::{authenticate_as_source, Secret};
use migration::protocol::{self, Kind};
use serde_json::json;
use tests::{
    free_port, migrate, migrate_in_background, require_kvm, scratch, secret_file, vmm, Ends,
    Receiver, VmmProcess,
};

const SOURCE: &[&str] = &["--memory", "128M", "--workload", "wset=8M,rate=2000"];
/// 128 MiB in pages.
const RAM_PAGES: u64 = 32768;
/// An escape sequence and a fake log line, as a hostile peer would send.
const NASTY: &str = "\x1b[31mFAKE\nERROR everything is fine";

/// `HOST:PORT` of a receiver.
fn host_port(dst: &Receiver) -> &str {
    dst.addr.strip_prefix("tcp:").unwrap()
}

/// Whether the peer closed `s` within `within` (reads until EOF or reset).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}

/// A real, verified migration to `ends.dst` succeeds.
fn real_migration_succeeds(ends: &Ends) {
    let (ok, report, err) = ends.migrate(&["--verify"]);
    assert!(
        ok,
        "the real migration failed: {err}\ndestination: {}",
        ends.dst.stderr_text()
    );
    assert_eq!(report["mismatched_pages"], json!(0), "{report}");
    assert_eq!(report["guest_verified"], json!(true), "{report}");
}

/// The receiver's log holds none of the peer's raw bytes.
fn assert_no_raw_peer_text(text: &str) {
    assert!(
        !text.contains("\x1b[31m"),
        "escape code printed raw: {text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("ERROR everything")),
        "fake log line printed: {text}"
    );
}

/// An `Abort` frame whose detail is `detail` (bypassing the sender's own
/// sanitising, as a hostile peer would).
fn raw_abort(detail: &[u8]) -> Vec<u8> {
    let mut payload = 2u16.to_le_bytes().to_vec();
    payload.extend_from_slice(&0u64.to_le_bytes());
    payload.extend_from_slice(detail);
    let mut frame = protocol::frame_header(Kind::Abort, &[&payload])
        .unwrap()
        .to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// Stray connections, a slowloris and an `Abort` of 8 MiB of escape codes
/// sent before authentication: each is cut off quickly, none ends the
/// receiver or reaches its log raw, and a real migration then succeeds.
#[test]
fn unauthenticated_hostiles_do_not_stop_a_real_migration() {
    if !require_kvm() {
        return;
    }
    // Plaintext: the hostiles speak the protocol's frames by hand.
    let limits = [
        "--handshake-timeout",
        "1s",
        "--frame-timeout",
        "1s",
        tests::PLAINTEXT,
    ];
    let ends = Ends::start("hostile-unauth", SOURCE, Duration::ZERO, &limits);
    let addr = host_port(&ends.dst).to_string();
    // Stray: connect and close, twice.
    for _ in 0..2 {
        drop(TcpStream::connect(&addr).unwrap());
    }
    // Slowloris: a valid Hello, one byte every 200 ms (each read is quick,
    // the handshake as a whole is not).
    let mut hello = Vec::new();
    protocol::write_frame(&mut hello, Kind::Hello, &[0u8; 36]).unwrap();
    let mut s = TcpStream::connect(&addr).unwrap();
    let t = Instant::now();
    let mut cut = false;
    for b in &hello {
        if s.write_all(&[*b]).is_err() || closed_within(&mut s, Duration::from_millis(200)) {
            cut = true;
            break;
        }
    }
    assert!(cut, "the slowloris was never cut off");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Aborts before authentication: a small one with an escape code and a
    // fake log line, and one of 8 MiB (refused on its length alone).
    for frame in [raw_abort(NASTY.as_bytes()), raw_abort(&[0x1b; 8 << 20])] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(&frame);
        assert!(closed_within(&mut s, Duration::from_secs(3)));
    }
    real_migration_succeeds(&ends);
    let log = ends.dst.stderr_text();
    assert_no_raw_peer_text(&log);
    assert!(log.len() < 64 << 10, "{} bytes of log", log.len());
    assert!(
        log.matches("still listening").count() >= 4 && log.contains("from 127.0.0.1:"),
        "each failure is logged with its peer: {log}"
    );
    assert!(log.contains("exceeds the limit of 4096"), "{log}");
}

/// Connects to `dst` and authenticates as a source with `secret`.
fn authenticated(dst: &Receiver, secret: &Path) -> TcpStream {
    let mut s = TcpStream::connect(host_port(dst)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let secret = Secret::from_file(secret).unwrap();
    authenticate_as_source(&mut s, &secret).unwrap();
    s
}

/// Sends `config` after authenticating; returns the receiver's answer (an
/// `Abort` detail) and how long it took.
fn send_config(ends: &Ends, config: &[u8]) -> (String, Duration) {
    let mut s = authenticated(&ends.dst, &ends.secret);
    let t = Instant::now();
    protocol::write_frame(&mut s, Kind::Config, config).unwrap();
    let frame = protocol::read_frame(&mut s).expect("an answer");
    assert_eq!(
        frame.kind,
        Kind::Abort,
        "the receiver accepted a bad Config"
    );
    let abort = protocol::Abort::decode(&frame.payload).unwrap();
    (abort.detail, t.elapsed())
}

/// A post-copy `Config` whose fault connection never comes times out;
/// `Config`s with overlapping, unsorted, out-of-RAM or too many runs are
/// refused at once; the receiver then takes a real migration.
#[test]
fn hostile_configs_are_refused_and_the_next_migration_succeeds() {
    if !require_kvm() {
        return;
    }
    // Plaintext: the hostile Configs are sent by hand.
    let args = ["--fault-timeout", "1s", "--prefault", tests::PLAINTEXT];
    let ends = Ends::start("hostile-config", SOURCE, Duration::ZERO, &args);
    let ram = RAM_PAGES * 4096;
    let (why, took) = send_config(
        &ends,
        &protocol::encode_config(
            ram,
            protocol::ConfigFlags {
                postcopy: true,
                verify: false,
            },
            &[],
            b"{}",
        ),
    );
    assert!(why.contains("fault connection"), "{why}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    // 2 000 whole-RAM runs (the 23 s prefault of the issue), and others.
    let whole = vec![(0, RAM_PAGES); 2000];
    let bad: [(&str, &[(u64, u64)]); 4] = [
        ("repeated whole-RAM runs", &whole),
        ("overlapping", &[(0, 16), (8, 16)]),
        ("unsorted", &[(100, 1), (0, 1)]),
        ("beyond RAM", &[(RAM_PAGES - 1, 2)]),
    ];
    for (what, runs) in bad {
        let (why, took) = send_config(
            &ends,
            &protocol::encode_config(ram, protocol::ConfigFlags::default(), runs, b"{}"),
        );
        assert!(why.contains("runs"), "{what}: {why}");
        assert!(took < Duration::from_secs(1), "{what}: {took:?}");
    }
    let many: Vec<_> = (0..70_000u64).map(|i| (2 * i, 1)).collect();
    let (why, _) = send_config(
        &ends,
        &protocol::encode_config(1 << 30, protocol::ConfigFlags::default(), &many, b"{}"),
    );
    assert!(why.contains("at most"), "{why}");
    real_migration_succeeds(&ends);
    assert_no_raw_peer_text(&ends.dst.stderr_text());
}

/// A destination that answers the source's `Hello` with an `Abort` of
/// 8 MiB of escape codes (or a short one with a fake log line): `vmm
/// migrate` fails with a short, printable error.
#[test]
fn a_hostile_destination_is_not_printed_raw() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("hostile-destination");
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let src = VmmProcess::start(&dir.join("src.sock"), SOURCE);
    src.wait_running(Duration::from_secs(60));
    for frame in [raw_abort(NASTY.as_bytes()), raw_abort(&[0x1b; 8 << 20])] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = format!("tcp:{}", listener.local_addr().unwrap());
        let fake = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(&frame);
            std::thread::sleep(Duration::from_millis(500));
        });
        // Plaintext: the fake destination answers with a raw frame.
        let (ok, _, err) = migrate(&dir.join("src.sock"), &to, &secret, &[tests::PLAINTEXT]);
        fake.join().unwrap();
        assert!(!ok);
        assert_no_raw_peer_text(&err);
        assert!(err.len() < 16 << 10, "{} bytes of error", err.len());
        assert!(err.contains("keeps running"), "{err}");
    }
    src.quit();
    let _ = std::fs::remove_dir_all(dir);
}

/// While a migration runs, `quit`, `restore` and `save` are refused with
/// the reason; once it ended they work again.
#[test]
fn quit_restore_and_save_are_refused_during_a_migration() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("refused-during-migration");
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let src = VmmProcess::start(&dir.join("src.sock"), SOURCE);
    src.wait_running(Duration::from_secs(60));
    // A destination that accepts and says nothing: the migration stays in
    // its handshake until the connection is dropped.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = format!("tcp:{}", listener.local_addr().unwrap());
    let t = migrate_in_background(&dir.join("src.sock"), &to, &secret, &[]);
    let (held, _) = listener.accept().unwrap();
    src.wait_for("the migration running", Duration::from_secs(10), |_| {
        let st = vmm::api::call(&dir.join("src.sock"), &json!({"cmd": "migration_status"}));
        st.is_ok_and(|st| st["running"] == json!(true))
    });
    let snap = dir.join("vm.snap");
    for req in [
        json!({"cmd": "quit"}),
        json!({"cmd": "save", "path": snap}),
        json!({"cmd": "restore", "path": snap}),
    ] {
        let resp = vmm::api::call(&dir.join("src.sock"), &req).unwrap();
        assert_eq!(resp["ok"], json!(false), "{req} accepted: {resp}");
        let why = resp["error"].as_str().unwrap();
        assert!(why.contains("a migration is running"), "{why}");
    }
    assert!(!snap.exists(), "save wrote a file during the migration");
    drop(held);
    let (ok, _, err) = t.join().unwrap();
    assert!(!ok && err.contains("keeps running"), "{err}");
    assert_eq!(src.state()["paused"], json!(false));
    src.call(json!({"cmd": "save", "path": snap}));
    let (code, _, err) = src.quit();
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Under umask 000 the control socket and the snapshots are still 0600,
/// even a snapshot written over a world-readable file.
#[test]
fn socket_and_snapshot_are_0600_under_umask_000() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("umask-000");
    let sock = dir.join("vm.sock");
    let vm = VmmProcess::start_with_umask(&sock, SOURCE, "000");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600, "control socket");
    let fresh = dir.join("fresh.snap");
    vm.call(json!({"cmd": "save", "path": fresh}));
    assert_eq!(mode(&fresh), 0o600, "new snapshot");
    let old = dir.join("old.snap");
    std::fs::write(&old, "old").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o666)).unwrap();
    vm.call(json!({"cmd": "save", "path": old}));
    assert_eq!(mode(&old), 0o600, "snapshot over a 0666 file");
    vm.quit();
    let _ = std::fs::remove_dir_all(dir);
}

/// A secret file group or others may read is refused (as ssh refuses such
/// a key); a secret of one repeated byte is accepted with a warning.
#[test]
fn a_readable_secret_is_refused_and_a_weak_one_warned_about() {
    let dir = scratch("secret-modes");
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let listen = format!("tcp:127.0.0.1:{}", free_port());
    for m in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(m)).unwrap();
        let out = vmm(&[
            "receive",
            "--listen",
            &listen,
            "--secret",
            secret.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mode {m:o} accepted");
        assert!(err.contains("chmod 600"), "mode {m:o}: {err}");
    }
    let weak = secret_file(&dir, "weak", &"a".repeat(32));
    let dst = Receiver::start(&dir, &format!("127.0.0.1:{}", free_port()), &weak, None);
    assert!(
        dst.stderr_text().contains("distinct bytes"),
        "{}",
        dst.stderr_text()
    );
    dst.terminate();
    let _ = std::fs::remove_dir_all(dir);
}

/// A switch-over that cannot meet the downtime limit (one round, then the
/// whole working set over a slow link): past the limit plus the margin the
/// source aborts and resumes its guest, unharmed, and the receiver serves
/// on.
#[test]
fn the_pause_is_bounded_before_the_destination_confirms() {
    if !require_kvm() {
        return;
    }
    let source = [
        "--memory",
        "128M",
        "--workload",
        "wset=16M,rate=5000,fill=100",
    ];
    let ends = Ends::start("pause-bound", &source, Duration::ZERO, &[]);
    let t = Instant::now();
    let (ok, _, err) = ends.migrate(&[
        "--max-rounds",
        "1",
        "--bandwidth",
        "40Mbit",
        "--compression",
        "none",
        "--max-downtime",
        "300ms",
        "--pause-margin",
        "700ms",
        // Switch over although the prediction is over the limit (the
        // default would refuse at once): the pause bound is the point.
        "--on-overrun",
        "accept",
    ]);
    assert!(!ok, "a switch-over over its pause bound succeeded");
    assert!(
        err.contains("stayed paused longer") && err.contains("keeps running"),
        "{err}"
    );
    // Round 0 (16 MiB at 5 MB/s) and the pause's one second, not the
    // three more the last round would take.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    tests::assert_source_unharmed(&ends.src);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = ends.dst.call(json!({"cmd": "migration_status"}));
        if st["receiving"]["stage"] == json!("listening") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the receiver stopped serving: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ends.dst.stderr_text().contains("still listening"));
}

/// A client holding many idle control connections cannot make the VMM
/// serve without bound: past the limit a connection is refused with the
/// reason, and the slots come back when the clients leave.
#[test]
fn control_connections_are_bounded() {
    use std::io::BufRead;
    use std::os::unix::net::UnixStream;
    let dir = scratch("control-connections");
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let dst = Receiver::start(&dir, &format!("127.0.0.1:{}", free_port()), &secret, None);
    let held: Vec<_> = (0..vmm::api::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&dst.socket).unwrap())
        .collect();
    // Served in order: the last one held has its thread once it answers.
    let mut last = &held[held.len() - 1];
    writeln!(last, "{}", json!({"cmd": "migration_status"})).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(last).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    // One more is told why before it could even ask.
    let extra = UnixStream::connect(&dst.socket).unwrap();
    let mut refused = String::new();
    std::io::BufReader::new(extra)
        .read_line(&mut refused)
        .unwrap();
    assert!(
        refused.contains("too many control connections"),
        "{refused}"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = || vmm::api::call(&dst.socket, &json!({"cmd": "migration_status"}));
    while !status().is_ok_and(|r| r["ok"] == json!(true)) {
        assert!(Instant::now() < deadline, "slots never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    dst.terminate();
    let _ = std::fs::remove_dir_all(dir);
}
