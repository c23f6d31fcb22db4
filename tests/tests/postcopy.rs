//! Post-copy and hybrid between two real processes: every page verified
//! (CRC against the source's final memory, on arrival), the guest's own
//! check passes, several vCPUs fault at once; a guest that touches all of its
//! memory right after resume; a guest that keeps dirtying throughout; and a
//! source that dies after the switch-over.

use std::time::Duration;

use serde_json::{json, Value};
use tests::{
    free_port, migrate_in_background, require_kvm, scratch, secret_file, Receiver, VmmProcess,
};

fn run(name: &str, vcpus: u8, workload: &str, extra: &[&str]) -> Value {
    let (report, _) = tests::verified_migration(name, vcpus, "256M", workload, extra);
    if report["mode"] != json!("pre") {
        assert!(
            report["postcopy"].is_object(),
            "no post-copy statistics: {report}"
        );
    }
    report
}

#[test]
fn postcopy_one_vcpu() {
    if !require_kvm() {
        return;
    }
    let r = run(
        "post-1",
        1,
        "wset=64M,rate=2000,read=2000",
        &["--mode", "post"],
    );
    assert_eq!(r["mode"], json!("post"));
    assert_eq!(
        r["rounds"],
        json!([]),
        "post-copy sends nothing before the switch: {r}"
    );
    let pc = &r["postcopy"];
    assert!(
        pc["pages_pushed"].as_u64().unwrap() + pc["pages_pulled"].as_u64().unwrap() >= 16384,
        "{r}"
    );
}

/// Four vCPUs read their slices hard right after resume: they fault at
/// once, and every page of the working set is touched early.
#[test]
fn postcopy_four_vcpus_faulting_at_once_touching_all_memory() {
    if !require_kvm() {
        return;
    }
    let r = run(
        "post-4",
        4,
        "wset=64M,read=400000",
        &["--mode", "post", "--bandwidth", "200Mbit"],
    );
    let pc = &r["postcopy"];
    assert!(
        pc["demand_faults"].as_u64().unwrap() > 100,
        "the guest should have faulted a lot: {r}"
    );
    assert!(pc["fault_latency_p50_us"].as_f64().unwrap() > 0.0);
}

/// A destination started with `--prefault` does not prefault for post-copy:
/// the pages it has not received must stay missing so that the guest
/// faults on them (a prefaulted page would read as zeros).
#[test]
fn postcopy_to_a_prefaulting_destination_still_faults() {
    if !require_kvm() {
        return;
    }
    let (r, _) = tests::verified_migration_with(
        "post-prefault",
        1,
        "256M",
        "wset=64M,read=400000",
        &["--prefault"],
        &["--mode", "post", "--bandwidth", "200Mbit"],
    );
    assert_eq!(r["prefault_ms"], json!(0.0), "{r}");
    assert!(
        r["postcopy"]["demand_faults"].as_u64().unwrap() > 100,
        "{r}"
    );
}

#[test]
fn hybrid_with_a_guest_dirtying_throughout() {
    if !require_kvm() {
        return;
    }
    let r = run(
        "hybrid",
        2,
        "wset=64M,rate=30000,read=5000,fill=50",
        &["--mode", "hybrid", "--precopy", "32M", "--threshold", "4M"],
    );
    assert_eq!(r["mode"], json!("hybrid"));
    let rounds = r["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty(), "{r}");
    assert!(
        rounds[0]["pages"].as_u64().unwrap() <= 32 * 256,
        "pre-copied more than V1: {r}"
    );
    assert!(
        ["threshold", "converged", "max_rounds"].contains(&r["stop_rule"].as_str().unwrap()),
        "{r}"
    );
}

/// The source dies after the switch-over: the destination pauses the guest
/// and says which pages never arrived.
#[test]
fn source_death_after_switch_over_is_reported() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("post-src-dies");
    let secret = secret_file(&dir, "secret", "post-copy test secret 123");
    let src = VmmProcess::start(
        &dir.join("src.sock"),
        &["--memory", "256M", "--workload", "wset=128M,read=1000"],
    );
    src.wait_running(Duration::from_secs(60));
    // --once: a failed migration ends it (it would otherwise serve on).
    let mut dst = Receiver::start_with(
        &dir,
        &format!("127.0.0.1:{}", free_port()),
        &secret,
        None,
        &["--once"],
    );
    // A slow push (100 Mbit/s for 128 MiB: ~10 s) leaves time to kill it.
    let t = migrate_in_background(
        &dir.join("src.sock"),
        &dst.addr,
        &secret,
        &["--mode", "post", "--bandwidth", "100Mbit"],
    );
    src.wait_for("post-copy push under way", Duration::from_secs(20), |_| {
        let st =
            vmm::api::call(&dir.join("src.sock"), &json!({"cmd": "migration_status"})).unwrap();
        st["progress"]["phase"] == json!("post-copy push")
            && st["progress"]["round_pages_sent"].as_u64() > Some(100)
    });
    drop(src); // SIGKILL
    let _ = t.join();
    let code = dst.wait_exit(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(3),
        "destination should stop with the missing-pages code: {}",
        dst.stderr_text()
    );
    let err = dst.stderr_text();
    assert!(
        err.contains("pages never arrived") && err.contains("the guest is paused"),
        "{err}"
    );
}

/// Hybrid without an explicit V1 measures r and w and pre-copies V·w/(r+w).
#[test]
fn hybrid_splits_by_measured_rates() {
    if !require_kvm() {
        return;
    }
    let r = run(
        "hybrid-split",
        1,
        "wset=64M,rate=10000,read=20000,pattern=random",
        &["--mode", "hybrid"],
    );
    let p = &r["prediction"];
    let (rr, w) = (
        p["params"]["r"].as_f64().unwrap(),
        p["params"]["w"].as_f64().unwrap(),
    );
    let v = p["params"]["v"].as_f64().unwrap();
    assert!(rr > 0.0 && w > 0.0, "{p}");
    let v1 = p["v1_bytes"].as_f64().unwrap() / 1e6;
    assert!(
        (v1 - v * w / (rr + w)).abs() < 0.01,
        "V1 is not V·w/(r+w): {p}"
    );
    let pre_copied: u64 = r["rounds"][0]["pages"].as_u64().unwrap() * 4096;
    assert!(
        (pre_copied as f64 / 1e6 - v1).abs() < 0.01 + 4096.0 / 1e6,
        "round 0 sent {pre_copied} B, V1 = {v1} MB"
    );
}

/// Auto asks the model and says why it chose its mode.
#[test]
fn auto_mode_explains_its_choice() {
    if !require_kvm() {
        return;
    }
    let r = run(
        "auto",
        1,
        "wset=64M,rate=5000,read=20000",
        &["--mode", "auto", "--max-downtime", "20ms"],
    );
    let mode = r["mode"].as_str().unwrap();
    assert!(["pre", "post", "hybrid"].contains(&mode), "{r}");
    let why = r["prediction"]["why"].as_str().unwrap();
    assert!(
        why.to_lowercase().contains(mode),
        "the reason should name the mode: {why}"
    );
    assert_eq!(r["prediction"]["predictions"].as_array().unwrap().len(), 3);
}
