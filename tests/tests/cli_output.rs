//! What the command line prints for people: progress off a terminal, the
//! receiver's stages, units shared by every command.

use std::time::Duration;

use serde_json::json;
use tests::{require_kvm, vmm, Ends};

/// A migration of about 5 s with stderr on a pipe: progress lines come at
/// least every few seconds, and the receiver says whom it receives from
/// only after listening.
#[test]
fn migrate_off_a_terminal_prints_progress() {
    if !require_kvm() {
        return;
    }
    let ends = Ends::start(
        "progress-lines",
        &["--memory", "128M", "--workload", "wset=64M"],
        Duration::from_millis(200),
        &[],
    );
    // 64 MiB at 100 Mbit/s: round 0 takes about 5 s.
    let (ok, report, err) = ends.migrate(&["--bandwidth", "100Mbit", "--compression", "none"]);
    assert!(ok, "{err}");
    assert!(report.is_object(), "{report}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("MB sent")).collect();
    assert!(lines.len() >= 2, "too few progress lines: {err}");
    assert!(
        lines.iter().any(|l| l.contains("pre-copy round 0")),
        "{err}"
    );
    let dst = ends.dst.stderr_text();
    let listening = dst.find("listening on").expect("listening");
    let from = dst.find("incoming migration from 127.0.0.1").expect(&dst);
    assert!(listening < from, "{dst}");
}

#[test]
fn model_takes_the_units_of_the_other_commands() {
    let run = |args: &[&str]| {
        let mut all = vec!["model", "--mode", "pre", "--json"];
        all.extend_from_slice(args);
        let out = vmm(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let plain = ["--read-rate", "3", "--write-rate", "3", "--threshold", "8"];
    let mut a = vec!["--size-mb", "1073.741824", "--bandwidth", "125"];
    a.extend_from_slice(&plain);
    let mut b = vec!["--size-mb", "1G", "--bandwidth", "1Gbit"];
    b.extend_from_slice(&plain);
    assert_eq!(run(&a), run(&b));
    assert_ne!(run(&a)["tm_s"], json!(null));
}
