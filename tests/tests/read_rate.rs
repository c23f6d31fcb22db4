//! The host-side read-rate estimate (userfaultfd minor-fault sampling, see
//! `migration::access_rate`) is within ±25% of the guest's own counter over
//! a range of r, with and without concurrent writes.

use std::time::Duration;

use serde_json::json;
use tests::{require_kvm, scratch, VmmProcess};

#[test]
fn read_rate_estimate_matches_the_guest_counter() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("read-rate");
    // Writes are random so that they do not walk the same pages as the
    // sequential reads (a page read and written in one sampling round counts
    // once, as a write).
    for (i, spec) in [
        "read=2000",
        "read=20000",
        "read=60000",
        "read=20000,rate=10000,pattern=random",
    ]
    .iter()
    .enumerate()
    {
        let sock = dir.join(format!("m{i}.sock"));
        let m = VmmProcess::start(
            &sock,
            &[
                "--memory",
                "256M",
                "--workload",
                &format!("wset=64M,{spec}"),
            ],
        );
        m.wait_running(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(300));
        let r = m.call(json!({"cmd": "measure", "window_ms": 2000}));
        let host = r["host"]["read_pages_s"].as_f64().unwrap();
        let guest = r["guest_read_pages_s"].as_f64().unwrap();
        let err = host / guest - 1.0;
        eprintln!(
            "{spec}: host r = {host:.0} pages/s, guest counter {guest:.0} pages/s, error {:+.1}%",
            err * 100.0
        );
        assert!(guest > 500.0, "the guest did not read: {r}");
        assert!(
            err.abs() <= 0.25,
            "{spec}: estimate off by {:.0}%: {r}",
            err * 100.0
        );
        if spec.contains("rate=") {
            let wh = r["host"]["write_pages_s"].as_f64().unwrap();
            let wg = r["guest_write_pages_s"].as_f64().unwrap();
            assert!((wh / wg - 1.0).abs() <= 0.25, "write rate off: {r}");
        }
        // The machine runs on unharmed.
        let v = m.call(json!({"cmd": "verify"}));
        assert_eq!(v["pages_bad"], json!(0), "{v}");
        m.quit();
    }
}
