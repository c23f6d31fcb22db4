//! Live migration between two real `vmm` processes over loopback TCP:
//! memory verified page by page, heartbeats continue, the timer fires, the
//! FPU is intact; every stop rule is exercised and reported.

use serde_json::{json, Value};
use tests::require_kvm;

struct Outcome {
    report: Value,
    before: Value,
}

/// Boots a source with `workload`, migrates it with `extra` options, and
/// checks the guest on the destination.
fn migrate_and_check(name: &str, vcpus: u8, mem: &str, workload: &str, extra: &[&str]) -> Outcome {
    let (report, before) = tests::verified_migration(name, vcpus, mem, workload, extra);
    for key in ["total_time_ms", "downtime_ms", "guest_downtime_ms"] {
        assert!(
            report[key].as_f64().is_some_and(|v| v > 0.0),
            "{key} missing: {report}"
        );
    }
    assert!(report["bytes_wire"].as_u64() > Some(0) && report["bytes_raw"].as_u64() > Some(0));
    Outcome { report, before }
}

#[test]
fn idle_guest_one_vcpu() {
    if !require_kvm() {
        return;
    }
    let o = migrate_and_check("idle-1", 1, "512M", "wset=16M", &["--predict"]);
    // --predict: the model's Tm and Td for the mode that ran, beside the measurement.
    let p = &o.report["prediction"];
    assert!(p["predictions"][0]["tm_s"].as_f64().is_some(), "{p}");
    assert!(p["params"]["mu"].as_f64().unwrap() > 0.0, "{p}");
    assert_eq!(o.report["stop_rule"], json!("downtime"), "{}", o.report);
    // Untouched memory is never sent.
    assert!(
        o.report["bytes_wire"].as_u64().unwrap() < 64 << 20,
        "{}",
        o.report
    );
    assert!(o.before["paused"] == json!(false));
    // Without --prefault the destination fills memory as pages arrive.
    assert_eq!(o.report["prefault_ms"], json!(0.0), "{}", o.report);
}

#[test]
fn dirtying_guest_one_vcpu_two_rates() {
    if !require_kvm() {
        return;
    }
    for rate in ["2000", "50000"] {
        let w = format!("wset=64M,rate={rate},read=5000,fill=50");
        let o = migrate_and_check(
            &format!("rate-{rate}"),
            1,
            "256M",
            &w,
            &["--max-downtime", "100ms"],
        );
        let rounds = o.report["rounds"].as_array().unwrap();
        assert!(rounds.len() >= 2, "{}", o.report);
        assert!(
            rounds[0]["dirtied_pages"].as_u64().unwrap() > 0,
            "the guest dirtied nothing: {}",
            o.report
        );
    }
}

/// `vmm receive --prefault`: the destination touches the RAM the source
/// announces before round 0 and then writes pages through its mapping;
/// memory still checks out page by page while the guest keeps dirtying it.
#[test]
fn prefaulting_destination() {
    if !require_kvm() {
        return;
    }
    let (report, _) = tests::verified_migration_with(
        "prefault",
        2,
        "256M",
        "wset=64M,rate=20000,read=5000,fill=100",
        &["--prefault"],
        &[],
    );
    assert!(report["prefault_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["rounds"].as_array().unwrap().len() >= 2, "{report}");
}

#[test]
fn dirtying_guest_four_vcpus() {
    if !require_kvm() {
        return;
    }
    migrate_and_check("dirty-4", 4, "512M", "wset=64M,rate=20000,read=20000", &[]);
}

#[test]
fn stop_rule_max_rounds() {
    if !require_kvm() {
        return;
    }
    let o = migrate_and_check(
        "max-rounds",
        1,
        "256M",
        "wset=16M,rate=20000",
        // A slow link keeps every round long enough to be dirtied again.
        &[
            "--max-downtime",
            "0ms",
            "--max-rounds",
            "3",
            "--bandwidth",
            "200Mbit",
            // The cap over the limit is the point here (see honest_defaults.rs).
            "--on-overrun",
            "accept",
        ],
    );
    assert_eq!(o.report["stop_rule"], json!("max_rounds"), "{}", o.report);
    let rounds = o.report["rounds"].as_array().unwrap();
    assert_eq!(
        rounds.len(),
        4,
        "3 live rounds + the paused one: {}",
        o.report
    );
    assert_eq!(rounds[3]["paused"], json!(true));
}

#[test]
fn stop_rule_max_bytes() {
    if !require_kvm() {
        return;
    }
    let o = migrate_and_check(
        "max-bytes",
        1,
        "256M",
        "wset=32M,rate=20000",
        &[
            "--max-downtime",
            "0ms",
            "--max-bytes",
            "20M",
            "--compression",
            "none",
            "--on-overrun",
            "accept",
        ],
    );
    // Round 0 alone sends the 32 MiB working set, past the 20 MiB cap.
    assert_eq!(o.report["stop_rule"], json!("max_bytes"), "{}", o.report);
    let rounds = o.report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "round 0 + the paused one: {}", o.report);
    assert!(
        rounds[0]["bytes"].as_u64().unwrap() >= 20 << 20,
        "{}",
        o.report
    );
}

/// With no downtime allowed, rounds go on until one finds nothing dirty: an
/// idle guest dirties only a few pages per millisecond (its status page and
/// stack), and a round over a handful of pages takes microseconds.
#[test]
fn stop_rule_converged() {
    if !require_kvm() {
        return;
    }
    let o = migrate_and_check(
        "converged",
        1,
        "256M",
        "wset=8M,hb_us=1000",
        &["--max-downtime", "0ms", "--max-rounds", "100000"],
    );
    assert_eq!(o.report["stop_rule"], json!("converged"), "{}", o.report);
    let rounds = o.report["rounds"].as_array().unwrap();
    let last_live = &rounds[rounds.len() - 2];
    assert_eq!(last_live["dirtied_pages"], json!(0), "{}", o.report);
}

#[test]
fn bandwidth_cap_is_honoured() {
    if !require_kvm() {
        return;
    }
    let o = migrate_and_check(
        "bandwidth",
        1,
        "256M",
        "wset=32M,fill=100",
        &["--bandwidth", "200Mbit", "--compression", "none"],
    );
    let r0 = &o.report["rounds"][0];
    let mbps = r0["bandwidth_mb_s"].as_f64().unwrap();
    assert!(
        mbps < 27.0,
        "round 0 ran at {mbps} MB/s over a 25 MB/s cap: {}",
        o.report
    );
}

/// A guest that rewrites its 8 MiB at 48 MB/s over a 25 MB/s link: every
/// round re-sends all of it, and without help only `max_rounds` would end
/// pre-copy, with the whole working set left for the downtime.
/// Auto-converge throttles the vCPUs until a round fits the limit.
#[test]
fn auto_converge_throttles_a_guest_that_outruns_the_link() {
    if !require_kvm() {
        return;
    }
    let (r, _) = tests::verified_migration(
        "auto-converge",
        1,
        "256M",
        "wset=8M,rate=12000,fill=100",
        &[
            "--bandwidth",
            "200Mbit",
            "--max-downtime",
            "100ms",
            "--compression",
            "none",
            "--auto-converge",
        ],
    );
    assert_eq!(r["limits"]["auto_converge"], json!(true));
    // Converged: a round fit the limit, or the throttled guest (asleep
    // most of the time) dirtied nothing at all during one.
    let rule = r["stop_rule"].as_str().unwrap();
    assert!(rule == "downtime" || rule == "converged", "{r}");
    let rounds = r["rounds"].as_array().unwrap();
    let throttle = |i: usize| rounds[i]["throttle_pct"].as_u64().unwrap();
    // Unthrottled, the guest dirtied more than half of what a round sent.
    let (sent, dirtied) = (
        rounds[0]["pages"].as_u64().unwrap(),
        rounds[0]["dirtied_pages"].as_u64().unwrap(),
    );
    assert!(dirtied * 2 > sent, "the guest did not outrun the link: {r}");
    assert_eq!(throttle(0), 0);
    // The throttle only ever rose, and the round that converged ran throttled.
    let last_live = rounds.len() - 2;
    assert!(throttle(last_live) >= 20, "{r}");
    assert!(
        (1..=last_live).all(|i| throttle(i) >= throttle(i - 1)),
        "{r}"
    );
}

/// Xen's "to skip": pages the guest dirtied again before a round reached
/// them wait for the next round. Some are skipped, and every page still
/// arrives (the helper checks them all and the guest checks itself).
#[test]
fn skipping_redirtied_pages_loses_none() {
    if !require_kvm() {
        return;
    }
    let (r, _) = tests::verified_migration(
        "skip-redirtied",
        2,
        "256M",
        "wset=32M,rate=20000,fill=100,pattern=random",
        &[
            "--bandwidth",
            "1Gbit",
            "--max-downtime",
            "20ms",
            "--compression",
            "none",
            "--skip-redirtied",
        ],
    );
    assert_eq!(r["limits"]["skip_redirtied"], json!(true));
    let rounds = r["rounds"].as_array().unwrap();
    let skipped: u64 = rounds
        .iter()
        .map(|x| x["skipped_pages"].as_u64().unwrap())
        .sum();
    assert!(skipped > 0, "nothing skipped: {r}");
    // Skipped pages went with a later round: each round after the first
    // sent at least what the one before it skipped.
    for w in rounds.windows(2) {
        assert!(
            w[1]["pages"].as_u64() >= w[0]["skipped_pages"].as_u64(),
            "{r}"
        );
    }
}
