//! Steering a running migration from the source's control socket:
//! `migrate_cancel` before the switch-over leaves the source exactly as it
//! was (and a second migration then succeeds), after it is refused;
//! SIGINT on `vmm migrate` cancels; `migrate_set_parameters` changes the
//! next round, as the report shows; `migrate_start_postcopy` switches a
//! running pre-copy to post-copy.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{
    assert_guest_lives_on, free_port, heartbeat_field, migrate, migrate_in_background, per_vcpu,
    require_kvm, scratch, secret_file, vmm, vmm_bin, Receiver, VmmProcess,
};

const WORKLOAD: &str = "wset=64M,rate=5000,fill=100";

/// 64 MiB at 100 Mbit/s: round 0 takes about 5 s.
const SLOW: &[&str] = &["--bandwidth", "100Mbit", "--compression", "none"];

/// A source, a secret and a receiver in a fresh scratch directory.
fn ends(name: &str) -> (std::path::PathBuf, VmmProcess, std::path::PathBuf, Receiver) {
    let dir = scratch(name);
    let src = VmmProcess::start(
        &dir.join("src.sock"),
        &["--memory", "256M", "--workload", WORKLOAD],
    );
    src.wait_running(Duration::from_secs(60));
    let secret = secret_file(&dir, "secret", "a secret for the control tests");
    let dst = receiver(&dir, &secret);
    (dir, src, secret, dst)
}

fn receiver(dir: &Path, secret: &Path) -> Receiver {
    // --once: a failed migration ends it (it would otherwise serve on).
    Receiver::start_with(
        dir,
        &format!("127.0.0.1:{}", free_port()),
        secret,
        None,
        &["--once"],
    )
}

/// `vmm ctl events --all` on the source, until a migration ends.
fn watch_events(dir: &Path) -> std::process::Child {
    Command::new(vmm_bin())
        .args(["ctl", "--api-socket"])
        .arg(dir.join("src.sock"))
        .args(["events", "--all"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning vmm ctl events")
}

/// The names of the events a [`watch_events`] printed, in order.
fn event_names(watcher: std::process::Child) -> (Vec<String>, Vec<Value>) {
    let out = watcher.wait_with_output().expect("vmm ctl events");
    assert!(out.status.success());
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let names = events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_string())
        .collect();
    (names, events)
}

/// Sends `req` to the source; returns the answer, successful or not.
fn ask(src: &Path, req: Value) -> Value {
    vmm::api::call(&src.join("src.sock"), &req).expect("control socket")
}

/// Polls the source's `migration_status` until `pred` holds.
fn wait_status(dir: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = ask(dir, json!({"cmd": "migration_status"}));
        if pred(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Cancels; checks that the answer came quickly and says `cancelled`.
fn cancel(dir: &Path) {
    let t = Instant::now();
    let r = ask(dir, json!({"cmd": "migrate_cancel"}));
    let took = t.elapsed();
    assert_eq!(r["ok"], json!(true), "{r}");
    assert_eq!(r["state"], json!("cancelled"), "{r}");
    assert!(
        took < Duration::from_millis(1500),
        "the cancel took {took:?}: {r}"
    );
    let st = ask(dir, json!({"cmd": "migration_status"}));
    assert_eq!(
        (&st["running"], &st["state"]),
        (&json!(false), &json!("cancelled")),
        "{st}"
    );
}

/// The destination was told, discarded everything and exited.
fn assert_destination_discarded(dst: &mut Receiver) {
    let code = dst.wait_exit(Duration::from_secs(10));
    assert!(
        code.is_some_and(|c| c != 0),
        "destination: {code:?} {}",
        dst.stderr_text()
    );
    assert!(
        dst.stderr_text().contains("cancelled the migration"),
        "destination: {}",
        dst.stderr_text()
    );
}

/// The source guest runs on, unpaused and unthrottled, with all its memory
/// and FPU intact.
fn assert_source_unharmed(src: &VmmProcess) {
    let s0 = src.state();
    assert_eq!(s0["paused"], json!(false), "source left paused");
    assert_eq!(s0["throttle_pct"], json!(0), "source left throttled");
    std::thread::sleep(Duration::from_millis(300));
    let s1 = src.state();
    assert!(
        heartbeat_field(&s1, "count")[0] > heartbeat_field(&s0, "count")[0] + 50,
        "source guest stopped"
    );
    assert!(
        per_vcpu(&s1, "pages_written")[0] > per_vcpu(&s0, "pages_written")[0],
        "workload stopped"
    );
    assert_eq!(heartbeat_field(&s1, "discontinuities")[0], 0);
    let v = src.call(json!({"cmd": "verify"}));
    assert_eq!(
        (v["pages_bad"].as_u64(), v["fpu_errors"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
}

/// After a cancel, a verified migration to a fresh receiver succeeds and
/// the guest lives on there.
fn migrate_again(dir: &Path, src: VmmProcess, secret: &Path) {
    let before = src.state();
    let dst = receiver(dir, secret);
    let (ok, report, err) = migrate(&dir.join("src.sock"), &dst.addr, secret, &["--verify"]);
    assert!(ok, "second migration: {err}\n{}", dst.stderr_text());
    assert_eq!(report["guest_verified"], json!(true), "{report}");
    assert_eq!(report["mismatched_pages"], json!(0), "{report}");
    let (code, _, err) = src.quit();
    assert_eq!(code, 0, "source: {err}");
    assert_guest_lives_on(&dst, 1, &before);
}

/// The migration on `t` failed, saying that it was cancelled.
fn assert_cancelled(t: std::thread::JoinHandle<(bool, Value, String)>) {
    let (ok, _, err) = t.join().unwrap();
    assert!(!ok, "a cancelled migration succeeded");
    assert!(
        err.contains("cancelled") && err.contains("keeps running on the source"),
        "{err}"
    );
}

#[test]
fn cancel_during_round_0() {
    if !require_kvm() {
        return;
    }
    let (dir, src, secret, mut dst) = ends("cancel-round0");
    let t = migrate_in_background(&dir.join("src.sock"), &dst.addr, &secret, SLOW);
    let st = wait_status(&dir, "round 0 under way", |st| {
        st["progress"]["round_pages_sent"].as_u64() > Some(1000)
    });
    assert_eq!(st["progress"]["round"], json!(0), "{st}");
    assert_eq!(st["cancellable"], json!(true), "{st}");
    cancel(&dir);
    assert_cancelled(t);
    assert_destination_discarded(&mut dst);
    assert_source_unharmed(&src);
    migrate_again(&dir, src, &secret);
}

#[test]
fn cancel_during_a_later_round() {
    if !require_kvm() {
        return;
    }
    let (dir, src, secret, mut dst) = ends("cancel-later");
    let watcher = watch_events(&dir);
    // A zero downtime limit never fits: rounds go on until the cancel;
    // auto-converge throttles the vCPUs meanwhile, which the cancel lifts.
    let t = migrate_in_background(
        &dir.join("src.sock"),
        &dst.addr,
        &secret,
        &[
            "--bandwidth",
            "400Mbit",
            "--max-downtime",
            "0",
            "--auto-converge",
        ],
    );
    let st = wait_status(&dir, "round 2", |st| {
        st["progress"]["round"].as_u64() >= Some(2)
    });
    let p = &st["progress"];
    assert!(p["throughput_mb_s"].as_f64() > Some(0.0), "{st}");
    assert!(p["dirty_rate_pages_s"].as_f64() > Some(0.0), "{st}");
    assert!(p["expected_downtime_ms"].as_f64() > Some(0.0), "{st}");
    assert!(p["eta_s"].is_number(), "{st}");
    assert_eq!(p["limits"]["max_downtime_ms"], json!(0.0), "{st}");
    cancel(&dir);
    assert_cancelled(t);
    let (names, _) = event_names(watcher);
    assert!(names.len() >= 3, "{names:?}");
    assert!(
        names[..names.len() - 1].iter().all(|n| n == "round_ended"),
        "{names:?}"
    );
    assert_eq!(names.last().map(String::as_str), Some("cancelled"));
    assert_destination_discarded(&mut dst);
    assert_source_unharmed(&src);
    migrate_again(&dir, src, &secret);
}

#[test]
fn cancel_during_post_copy_is_refused() {
    if !require_kvm() {
        return;
    }
    let (dir, src, secret, dst) = ends("cancel-postcopy");
    let before = src.state();
    let t = migrate_in_background(
        &dir.join("src.sock"),
        &dst.addr,
        &secret,
        &["--mode", "post", "--bandwidth", "100Mbit"],
    );
    wait_status(&dir, "post-copy", |st| {
        st["progress"]["phase"] == json!("post-copy push")
    });
    let sock = dir.join("src.sock");
    let out = vmm(&[
        "ctl",
        "--api-socket",
        sock.to_str().unwrap(),
        "migrate-cancel",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("past the switch-over"), "{err}");
    // The migration goes on and completes.
    let (ok, report, err) = t.join().unwrap();
    assert!(ok, "{err}");
    assert_eq!(report["mode"], json!("post"), "{report}");
    src.quit();
    assert_guest_lives_on(&dst, 1, &before);
}

#[test]
fn sigint_on_vmm_migrate_cancels() {
    if !require_kvm() {
        return;
    }
    let (dir, src, secret, mut dst) = ends("cancel-sigint");
    let child = Command::new(vmm_bin())
        .args(["migrate", "--api-socket"])
        .arg(dir.join("src.sock"))
        .args(["--to", &dst.addr, "--secret"])
        .arg(&secret)
        .args(SLOW)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmm migrate");
    wait_status(&dir, "round 0 under way", |st| {
        st["progress"]["round_pages_sent"].as_u64() > Some(1000)
    });
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("waiting for vmm migrate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cancelling the migration"), "{err}");
    assert!(err.contains("migration cancelled"), "{err}");
    let st = ask(&dir, json!({"cmd": "migration_status"}));
    assert_eq!(st["state"], json!("cancelled"), "{st}");
    assert_destination_discarded(&mut dst);
    assert_source_unharmed(&src);
    migrate_again(&dir, src, &secret);
}

#[test]
fn set_parameters_mid_flight_changes_the_next_round() {
    if !require_kvm() {
        return;
    }
    let (dir, src, secret, dst) = ends("set-parameters");
    let before = src.state();
    // With no migration running, there is nothing to change or cancel.
    for req in [
        json!({"cmd": "migrate_set_parameters", "max_rounds": 3}),
        json!({"cmd": "migrate_cancel"}),
    ] {
        let r = ask(&dir, req);
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("no migration is running")),
            "{r}"
        );
    }
    // A zero downtime limit never fits; the new limit does.
    let t = migrate_in_background(
        &dir.join("src.sock"),
        &dst.addr,
        &secret,
        &["--bandwidth", "400Mbit", "--max-downtime", "0"],
    );
    wait_status(&dir, "round 1", |st| {
        st["progress"]["round"].as_u64() >= Some(1)
    });
    // Without --postcopy-ready there is no fault connection to switch to.
    let r = ask(&dir, json!({"cmd": "migrate_start_postcopy"}));
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("--postcopy-ready")),
        "{r}"
    );
    let sock = dir.join("src.sock");
    let out = vmm(&[
        "ctl",
        "--api-socket",
        sock.to_str().unwrap(),
        "migrate-set-parameters",
        "--max-downtime",
        "5s",
        "--bandwidth",
        "1Gbit",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, report, err) = t.join().unwrap();
    assert!(ok, "{err}");
    assert_eq!(report["stop_rule"], json!("downtime"), "{report}");
    let rounds: Vec<&Value> = report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["paused"] == json!(false))
        .collect();
    let limit = |r: &Value| r["limits"]["max_downtime_ms"].as_f64();
    assert_eq!(limit(rounds[0]), Some(0.0), "{report}");
    // The first round under the new limit is the last: the rule fired.
    let first_new = rounds
        .iter()
        .position(|r| limit(r) == Some(5000.0))
        .expect("no round ran with the new limit");
    assert!(first_new >= 1, "{report}");
    assert_eq!(first_new, rounds.len() - 1, "{report}");
    assert_eq!(
        rounds[first_new]["limits"]["bandwidth_bytes_s"],
        json!(125_000_000),
        "{report}"
    );
    assert_eq!(report["limits"]["max_downtime_ms"], json!(5000.0));
    src.quit();
    assert_guest_lives_on(&dst, 1, &before);
}

#[test]
fn start_postcopy_mid_pre_copy() {
    if !require_kvm() {
        return;
    }
    let (dir, src, secret, dst) = ends("start-postcopy");
    let before = src.state();
    let watcher = watch_events(&dir);
    // Pre-copy that never converges on its own (a zero downtime limit).
    let t = migrate_in_background(
        &dir.join("src.sock"),
        &dst.addr,
        &secret,
        &[
            "--postcopy-ready",
            "--verify",
            "--bandwidth",
            "400Mbit",
            "--max-downtime",
            "0",
        ],
    );
    wait_status(&dir, "round 1", |st| {
        st["progress"]["round"].as_u64() >= Some(1)
    });
    let r = ask(&dir, json!({"cmd": "migrate_start_postcopy"}));
    assert_eq!(r["ok"], json!(true), "{r}");
    let (ok, report, err) = t.join().unwrap();
    assert!(ok, "{err}\n{}", dst.stderr_text());
    assert_eq!(report["stop_rule"], json!("requested"), "{report}");
    assert!(report["postcopy"].is_object(), "{report}");
    assert!(report["rounds"].as_array().unwrap().len() >= 2, "{report}");
    assert_eq!(report["mismatched_pages"], json!(0), "{report}");
    assert_eq!(report["guest_verified"], json!(true), "{report}");
    let (names, events) = event_names(watcher);
    let tail: Vec<&str> = names
        .iter()
        .rev()
        .take(5)
        .rev()
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            "stop_rule_fired",
            "paused",
            "switched_over",
            "postcopy_complete",
            "completed"
        ],
        "{names:?}"
    );
    let fired = &events[names.len() - 5];
    assert_eq!(
        (&fired["rule"], &fired["postcopy"]),
        (&json!("requested"), &json!(true))
    );
    assert!(names[..names.len() - 5].iter().all(|n| n == "round_ended"));
    src.quit();
    assert_guest_lives_on(&dst, 1, &before);
}
