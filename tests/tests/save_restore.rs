//! Save in one `vmm` process, restore in a second: the guest verifies all its
//! memory and its FPU/SSE registers, its heartbeat counter continues where it
//! stopped, and its timer keeps firing.

use std::time::Duration;

use serde_json::json;
use tests::{heartbeat_field, per_vcpu, require_kvm, scratch, VmmProcess};

fn save_and_restore_across_processes(vcpus: u8) {
    if !require_kvm() {
        return;
    }
    let dir = scratch(&format!("save-restore-{vcpus}"));
    let snap = dir.join("vm.snap");
    let vcpus_s = vcpus.to_string();
    let a = VmmProcess::start(
        &dir.join("a.sock"),
        &[
            "--memory",
            "512M",
            "--vcpus",
            &vcpus_s,
            "--workload",
            "wset=64M,rate=5000,read=5000,fill=50",
        ],
    );
    a.wait_running(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    let saved = a.call(json!({"cmd": "save", "path": snap}));
    let before = a.state();
    assert_eq!(before["paused"], json!(true));
    let (code, _, err) = a.quit();
    assert_eq!(code, 0, "source vmm failed: {err}");
    assert!(saved["memory_bytes"].as_u64().unwrap() >= 64 << 20);

    let b = VmmProcess::start(&dir.join("b.sock"), &["--restore", snap.to_str().unwrap()]);
    // The timer keeps firing and heartbeats continue.
    let after = b.wait_for(
        "ticks and heartbeats after restore",
        Duration::from_secs(20),
        |s| {
            per_vcpu(s, "ticks")
                .iter()
                .zip(per_vcpu(&before, "ticks"))
                .all(|(a, b)| *a >= b + 20)
                && heartbeat_field(s, "count")
                    .iter()
                    .zip(heartbeat_field(&before, "count"))
                    .all(|(a, b)| *a > b + 100)
        },
    );
    for (i, d) in heartbeat_field(&after, "discontinuities")
        .iter()
        .enumerate()
    {
        assert_eq!(
            *d, 0,
            "vCPU {i}: heartbeat counter did not continue from where it was"
        );
    }
    for (i, g) in heartbeat_field(&after, "restore_gap_ns").iter().enumerate() {
        assert!(*g > 0, "vCPU {i}: no gap measured across the restore");
    }
    let v = b.call(json!({"cmd": "verify"}));
    assert_eq!(v["pages_bad"], json!(0), "{v}");
    assert_eq!(v["fpu_errors"], json!(0), "{v}");
    assert_eq!(v["pages_ok"], json!(64 * 256), "{v}");
    b.call(json!({"cmd": "pause"}));
    let scan = b.call(json!({"cmd": "scan"}));
    assert_eq!(
        (scan["corrupt"].as_u64(), scan["stale"].as_u64()),
        (Some(0), Some(0)),
        "{scan}"
    );
    let (code, _, err) = b.quit();
    assert_eq!(code, 0, "restored vmm failed: {err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn save_restore_one_vcpu() {
    save_and_restore_across_processes(1);
}

#[test]
fn save_restore_four_vcpus() {
    save_and_restore_across_processes(4);
}

/// `restore` on the control socket replaces a running machine with the one
/// in the file, in the same process.
#[test]
fn restore_through_the_control_socket() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("api-restore");
    let snap = dir.join("vm.snap");
    let a = VmmProcess::start(
        &dir.join("a.sock"),
        &["--memory", "256M", "--workload", "wset=32M,rate=2000"],
    );
    a.wait_running(Duration::from_secs(60));
    a.call(json!({"cmd": "save", "path": snap}));
    let saved = a.state();
    a.call(json!({"cmd": "resume"}));
    std::thread::sleep(Duration::from_millis(300));
    a.call(json!({"cmd": "restore", "path": snap}));
    let after = a.wait_for("the restored guest runs", Duration::from_secs(20), |s| {
        s["paused"] == json!(false) && per_vcpu(s, "ticks")[0] > per_vcpu(&saved, "ticks")[0] + 10
    });
    // The heartbeat history is the file's, continued: no jump.
    assert_eq!(heartbeat_field(&after, "discontinuities")[0], 0, "{after}");
    let v = a.call(json!({"cmd": "verify"}));
    assert_eq!(
        (v["pages_bad"].as_u64(), v["fpu_errors"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    // A bad file is refused and the running machine is kept.
    let bad = dir.join("bad.snap");
    std::fs::write(&bad, b"not a snapshot").unwrap();
    let r = vmm::api::call(&dir.join("a.sock"), &json!({"cmd": "restore", "path": bad})).unwrap();
    assert_eq!(r["ok"], json!(false), "{r}");
    assert!(r["error"].as_str().unwrap().contains("bad magic"), "{r}");
    assert_eq!(a.state()["paused"], json!(false));
    a.quit();
    let _ = std::fs::remove_dir_all(dir);
}
