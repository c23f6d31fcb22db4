//! The switch-over under faults: a matrix of {connection cut, destination
//! killed, silent stall, dropped frame} × {round 0, a later round,
//! stop-and-copy before commit, right after commit, post-copy push}, each
//! cell run with real processes and a fault-injecting [`Proxy`]. While the
//! migration runs, the number of running copies (heartbeats advancing) is
//! sampled: never two. Each cell ends, within a bounded time, with one
//! running copy holding every page (verified), the source running
//! unchanged, or — only where nobody can know — a fenced source that says
//! "outcome unknown" and keeps the guest paused.

use std::path::Path;
use std::time::{Duration, Instant};

use migration::protocol::Kind;
use serde_json::{json, Value};
use tests::{
    assert_guest_lives_on, assert_source_unharmed, free_port, heartbeat_field,
    migrate_in_background, require_kvm, scratch, secret_file, vmm_bin, At, Dir, Fault, Proxy,
    Receiver, VmmProcess, PLAINTEXT,
};

/// How a cell must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The migration failed; the source guest runs on as before.
    SourceRuns,
    /// The guest runs on the destination, every page verified; the source
    /// process is gone.
    DestinationRuns,
    /// The source is fenced (paused, says "outcome unknown"); asking the
    /// destination directly then settles it as the inner end says.
    FencedThen(Settled),
    /// Post-copy lost its link after the switch-over: both ends paused,
    /// both say so; the source refuses to resume.
    BothPaused,
}

/// What `vmm migrate --recover` (straight to the destination) settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    SourceRuns,
    DestinationRuns,
    /// The destination is gone: still unknown, the guest stays paused.
    StillUnknown,
}

/// A peer the test kills when the fault's frame goes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Nobody,
    Destination,
}

const PRE: &[&str] = &[
    "--verify",
    "--commit-timeout",
    "3s",
    "--compression",
    "none",
];
/// At least three rounds: round 0, then later ones.
const ROUNDS: &[&str] = &[
    "--verify",
    "--commit-timeout",
    "3s",
    "--max-downtime",
    "0ms",
    "--max-rounds",
    "4",
];
/// A post-copy push slow enough to be cut in the middle.
const POST: &[&str] = &[
    "--verify",
    "--commit-timeout",
    "3s",
    "--mode",
    "post",
    "--bandwidth",
    "100Mbit",
];

fn pages(nth: u32) -> At {
    At {
        dir: Dir::ToDestination,
        kind: Kind::Pages,
        nth,
    }
}

fn to_dst(kind: Kind) -> At {
    At::first(Dir::ToDestination, kind)
}

fn to_src(kind: Kind) -> At {
    At::first(Dir::ToSource, kind)
}

/// A later round: the frames after the second `RoundEnd`.
fn later_round() -> At {
    At {
        dir: Dir::ToDestination,
        kind: Kind::RoundEnd,
        nth: 1,
    }
}

/// Whether a process's guest runs: its heartbeats advance.
fn running(socket: &Path) -> bool {
    let beats = || {
        vmm::api::call(socket, &json!({"cmd": "state"}))
            .ok()
            .filter(|v| v["ok"] == json!(true))
            .map(|s| heartbeat_field(&s, "count").first().copied().unwrap_or(0))
    };
    let Some(a) = beats() else { return false };
    std::thread::sleep(Duration::from_millis(150));
    beats().is_some_and(|b| b > a)
}

/// One look at a process's guest: whether it is paused, and vCPU 0's
/// heartbeat count; `None` while no guest answers there.
fn look(socket: &Path) -> Option<(bool, u64)> {
    let s = vmm::api::call(socket, &json!({"cmd": "state"})).ok()?;
    (s["ok"] == json!(true)).then(|| {
        let beats = heartbeat_field(&s, "count").first().copied().unwrap_or(0);
        (s["paused"] == json!(true), beats)
    })
}

/// How many copies ran during one and the same window: both ends are
/// looked at, then again 150 ms later; a copy counts if it was unpaused
/// at both looks and its heartbeats advanced. (Looking at one end, then
/// at the other, would count a source that paused and a destination that
/// resumed later as two.)
fn copies_running(src: &Path, dst: &Path) -> usize {
    let (s0, d0) = (look(src), look(dst));
    std::thread::sleep(Duration::from_millis(150));
    let (s1, d1) = (look(src), look(dst));
    let ran = |a: Option<(bool, u64)>, b: Option<(bool, u64)>| matches!((a, b), (Some((false, x)), Some((false, y))) if y > x);
    usize::from(ran(s0, s1)) + usize::from(ran(d0, d1))
}

/// Runs one cell of the matrix; returns what `vmm migrate` printed.
fn cell(name: &str, args: &'static [&'static str], fault: Fault, kill: Kill, end: End) -> String {
    if !require_kvm() {
        return String::new();
    }
    let started = Instant::now();
    let dir = scratch(name);
    let secret = secret_file(&dir, "secret", "switch-over fault matrix secret");
    let src_sock = dir.join("src.sock");
    let mut src = VmmProcess::start(
        &src_sock,
        &[
            "--memory",
            "128M",
            "--workload",
            "wset=16M,rate=3000,fill=100",
        ],
    );
    src.wait_running(Duration::from_secs(60));
    let before = src.state();
    let listen = format!("127.0.0.1:{}", free_port());
    // Plaintext on both ends: the proxy parses the frames.
    let mut dst = Receiver::start_with(&dir, &listen, &secret, None, &[PLAINTEXT]);
    let proxy = Proxy::start(&listen, fault);
    let args: &'static [&'static str] = Box::leak([args, &[PLAINTEXT]].concat().into_boxed_slice());
    let t = migrate_in_background(&src_sock, &proxy.addr, &secret, args);
    if kill == Kill::Destination {
        assert!(
            proxy.wait_triggered(Duration::from_secs(30)),
            "fault never hit"
        );
        dst.kill();
        proxy.cut();
    }
    // Never two running copies while it runs.
    while !t.is_finished() {
        let copies = copies_running(&src_sock, &dst.socket);
        assert!(copies <= 1, "{name}: two running copies");
        assert!(started.elapsed() < Duration::from_secs(90), "{name}: hung");
    }
    let (ok, _, err) = t.join().unwrap();
    let copies = copies_running(&src_sock, &dst.socket);
    assert!(copies <= 1, "{name}: two running copies at the end");
    match end {
        End::SourceRuns => {
            assert!(!ok, "{name}: succeeded: {err}");
            assert!(err.contains("keeps running"), "{name}: {err}");
            assert!(!running(&dst.socket), "{name}: destination runs too");
            assert_source_unharmed(&src);
        }
        End::DestinationRuns => {
            assert!(ok, "{name}: {err}\ndestination: {}", dst.stderr_text());
            destination_alone(name, &mut src, &dst, &before);
        }
        End::FencedThen(settled) => {
            assert_fenced(name, ok, &err, &src);
            let out = recover(&src_sock, &dst.addr, &secret);
            match settled {
                Settled::SourceRuns => {
                    assert!(out.status.success(), "{name}: {out:?}");
                    assert!(!running(&dst.socket), "{name}: destination runs too");
                    assert_source_unharmed(&src);
                }
                Settled::DestinationRuns => {
                    assert!(out.status.success(), "{name}: {out:?}");
                    destination_alone(name, &mut src, &dst, &before);
                }
                Settled::StillUnknown => {
                    assert_eq!(out.status.code(), Some(4), "{name}: {out:?}");
                    assert_eq!(src.state()["paused"], json!(true));
                }
            }
        }
        End::BothPaused => {
            assert_fenced(name, ok, &err, &src);
            assert_eq!(dst.wait_exit(Duration::from_secs(40)), Some(3), "{name}");
            assert!(dst.stderr_text().contains("pages never arrived"), "{name}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(100),
        "{name}: took {:?}",
        started.elapsed()
    );
    drop(src);
    drop(dst);
    let _ = std::fs::remove_dir_all(dir);
    err
}

/// The source said the outcome is unknown, keeps the guest paused, and
/// refuses to resume it.
fn assert_fenced(name: &str, ok: bool, err: &str, src: &VmmProcess) {
    assert!(!ok, "{name}: succeeded");
    assert!(
        err.contains("paused here") || err.contains("outcome unknown"),
        "{name}: {err}"
    );
    assert_eq!(src.state()["paused"], json!(true), "{name}: not fenced");
    let r = vmm::api::call(&src.socket_path(), &json!({"cmd": "resume"})).unwrap();
    assert_eq!(
        r["ok"],
        json!(false),
        "{name}: a fenced source resumed: {r}"
    );
}

/// The guest runs on the destination with every page, and the source
/// process ended by itself (migrated away).
fn destination_alone(name: &str, src: &mut VmmProcess, dst: &Receiver, before: &Value) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while src.is_alive() {
        assert!(Instant::now() < deadline, "{name}: source still there");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_guest_lives_on(dst, 1, before);
}

/// `vmm migrate --recover` straight to the destination.
fn recover(src_sock: &Path, to: &str, secret: &Path) -> std::process::Output {
    std::process::Command::new(vmm_bin())
        .args(["migrate", "--recover", "--api-socket"])
        .arg(src_sock)
        .args(["--to", to, "--secret"])
        .arg(secret)
        .arg(PLAINTEXT)
        .output()
        .expect("vmm migrate --recover")
}

// ------------------------------------------------------------ round 0 --

#[test]
fn round0_cut() {
    cell(
        "r0-cut",
        PRE,
        Fault::CutBefore(pages(3)),
        Kill::Nobody,
        End::SourceRuns,
    );
}

#[test]
fn round0_destination_killed() {
    cell(
        "r0-kill",
        PRE,
        Fault::Stall(pages(3)),
        Kill::Destination,
        End::SourceRuns,
    );
}

#[test]
fn round0_stall() {
    // The source's writes block until the peer timeout; its guest never
    // stopped, and runs on.
    cell(
        "r0-stall",
        PRE,
        Fault::Stall(pages(3)),
        Kill::Nobody,
        End::SourceRuns,
    );
}

#[test]
fn round0_dropped_pages_are_refused() {
    let at = Fault::Drop(pages(3));
    let err = cell("r0-drop", PRE, at, Kill::Nobody, End::SourceRuns);
    assert!(err.contains("never arrived"), "{err}");
}

/// `State` and `Complete` with no page at all (every `Pages` frame
/// dropped on the way), without `--verify`: refused, in pre- and post-copy.
#[test]
fn state_and_complete_without_pages_are_refused() {
    const NO_VERIFY: &[&str] = &["--commit-timeout", "3s"];
    const POST_NO_VERIFY: &[&str] = &["--commit-timeout", "3s", "--mode", "post"];
    let no_pages = Fault::DropAll(Dir::ToDestination, Kind::Pages);
    let err = cell(
        "no-pages",
        NO_VERIFY,
        no_pages,
        Kill::Nobody,
        End::SourceRuns,
    );
    assert!(err.contains("never arrived"), "{err}");
    // Post-copy names what it still owes in PostcopyBegin: strip that too.
    let no_begin = Fault::DropAll(Dir::ToDestination, Kind::PostcopyBegin);
    let err = cell(
        "no-begin",
        POST_NO_VERIFY,
        no_begin,
        Kill::Nobody,
        End::SourceRuns,
    );
    assert!(err.contains("never arrived"), "{err}");
}

// -------------------------------------------------------- later round --

#[test]
fn later_round_cut() {
    let at = Fault::CutAfterFrame(later_round());
    cell("rn-cut", ROUNDS, at, Kill::Nobody, End::SourceRuns);
}

#[test]
fn later_round_destination_killed() {
    let at = Fault::Stall(later_round());
    cell("rn-kill", ROUNDS, at, Kill::Destination, End::SourceRuns);
}

#[test]
fn later_round_dropped_round_end() {
    let at = Fault::Drop(later_round());
    cell("rn-drop", ROUNDS, at, Kill::Nobody, End::SourceRuns);
}

// ------------------------------------- stop-and-copy, before Commit --

#[test]
fn before_commit_cut() {
    let at = Fault::CutBefore(to_dst(Kind::Complete));
    cell("sc-cut", PRE, at, Kill::Nobody, End::SourceRuns);
}

#[test]
fn before_commit_destination_killed() {
    let at = Fault::Stall(to_dst(Kind::State));
    cell("sc-kill", PRE, at, Kill::Destination, End::SourceRuns);
}

#[test]
fn before_commit_stall() {
    // `Prepared` never reaches the source: it resumes, never having
    // committed; the destination never resumes without `Commit`.
    let at = Fault::Stall(to_src(Kind::Prepared));
    cell("sc-stall", PRE, at, Kill::Nobody, End::SourceRuns);
}

#[test]
fn before_commit_checksums_stripped() {
    let at = Fault::DropAll(Dir::ToDestination, Kind::Checksums);
    let err = cell("sc-strip", PRE, at, Kill::Nobody, End::SourceRuns);
    assert!(err.contains("checksums never arrived"), "{err}");
}

// ------------------------------------------------ right after Commit --

#[test]
fn after_commit_resumed_dropped_and_cut() {
    // The destination runs; the source, fenced, asks it and learns so.
    let at = Fault::CutBefore(to_src(Kind::Resumed));
    cell("ac-cut", PRE, at, Kill::Nobody, End::DestinationRuns);
}

#[test]
fn after_commit_resumed_dropped() {
    let at = Fault::Drop(to_src(Kind::Resumed));
    cell("ac-drop", PRE, at, Kill::Nobody, End::DestinationRuns);
}

#[test]
fn after_commit_commit_dropped() {
    // The source is fenced; asked, the undecided destination discards, so
    // the source resumes: the guest never ran there.
    let at = Fault::Drop(to_dst(Kind::Commit));
    cell("ac-commit-drop", PRE, at, Kill::Nobody, End::SourceRuns);
}

#[test]
fn after_commit_stall() {
    // A partition after Commit: the source cannot ask through it, stays
    // fenced, and `--recover` (the partition healed) settles it.
    let at = Fault::Stall(to_src(Kind::Resumed));
    let end = End::FencedThen(Settled::DestinationRuns);
    cell("ac-stall", PRE, at, Kill::Nobody, end);
}

#[test]
fn after_commit_stall_before_commit_arrives() {
    // Commit is held in the partition: the source is fenced; asked
    // directly, the undecided destination discards, and the source resumes.
    let at = Fault::Stall(to_dst(Kind::Commit));
    let end = End::FencedThen(Settled::SourceRuns);
    cell("ac-stall-commit", PRE, at, Kill::Nobody, end);
}

#[test]
fn after_commit_destination_killed() {
    // Nobody can know whether the guest ran there: the source says so and
    // keeps it paused, even when asked again.
    let at = Fault::Stall(to_src(Kind::Resumed));
    let end = End::FencedThen(Settled::StillUnknown);
    cell("ac-kill", PRE, at, Kill::Destination, end);
}

// ---------------------------------------------------- post-copy push --

#[test]
fn postcopy_push_cut() {
    let at = Fault::CutBefore(pages(40));
    cell("pc-cut", POST, at, Kill::Nobody, End::BothPaused);
}

#[test]
fn postcopy_push_destination_killed() {
    let at = Fault::Stall(pages(40));
    let end = End::FencedThen(Settled::StillUnknown);
    cell("pc-kill", POST, at, Kill::Destination, end);
}

#[test]
fn postcopy_commit_dropped() {
    let at = Fault::Drop(to_dst(Kind::Commit));
    cell("pc-commit-drop", POST, at, Kill::Nobody, End::SourceRuns);
}

#[test]
fn postcopy_push_stall() {
    // A silent partition mid-push: each side's peer timeout ends it; the
    // destination pauses the guest naming the missing pages, the source
    // stays fenced with every page.
    let at = Fault::Stall(pages(40));
    cell("pc-stall", POST, at, Kill::Nobody, End::BothPaused);
}
