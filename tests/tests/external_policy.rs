//! `vmm migrate --policy exec:PROGRAM`: an external program decides.
//! The shipped Python example migrates a dirtying guest with every page
//! verified; a policy that crashes, hangs or answers nonsense fails the
//! migration cleanly, with its problem in the message, the source guest
//! unharmed and the program gone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tests::{
    assert_source_unharmed, free_port, migrate, require_kvm, scratch, secret_file, Receiver,
    VmmProcess,
};

/// The example policy shipped in tools/policies.
fn example_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/policies/precopy_then_postcopy.py")
}

/// A guest that dirties faster than pre-copy can catch up under a 1 ms
/// downtime limit: rounds stop shrinking, and the example switches to
/// post-copy.
#[test]
fn python_policy_migrates_a_dirtying_guest() {
    if !require_kvm() {
        return;
    }
    let policy = format!("exec:{}", example_policy().display());
    let (report, _) = tests::verified_migration(
        "exec-python",
        1,
        "256M",
        "wset=64M,rate=50000,fill=100",
        &["--policy", &policy, "--max-downtime", "1ms"],
    );
    eprintln!(
        "python policy: mode {}, stop_rule {}, {} rounds",
        report["mode"],
        report["stop_rule"],
        report["rounds"].as_array().map_or(0, Vec::len)
    );
    assert!(
        ["policy", "downtime", "converged", "max_rounds"]
            .contains(&report["stop_rule"].as_str().unwrap_or("")),
        "{report}"
    );
}

/// A policy that answers setup, plan and round sensibly, then runs `then`
/// (a shell snippet) when asked `after_round`. It writes its pid to
/// `DIR/policy.pid`.
fn misbehaving_policy(dir: &Path, then: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("policy.sh");
    let body = format!(
        r#"#!/bin/sh
echo $$ > {pid}
while read -r line; do
  case "$line" in
    *'"ask":"setup"'*) echo '{{"measure_rates":false,"may_postcopy":false}}' ;;
    *'"ask":"plan"'*) echo '{{"start":"pre_copy"}}' ;;
    *'"ask":"round"'*) echo '{{"skip":"nothing"}}' ;;
    *) {then} ;;
  esac
done
"#,
        pid = dir.join("policy.pid").display()
    );
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Migrates with the policy `then` describes; asserts that it failed with
/// `expect` in the message, the source unharmed and the program reaped.
fn fails_cleanly(name: &str, then: &str, expect: &str) {
    let dir = scratch(name);
    let src = VmmProcess::start(
        &dir.join("src.sock"),
        &[
            "--memory",
            "256M",
            "--workload",
            "wset=64M,rate=5000,fill=100",
        ],
    );
    src.wait_running(Duration::from_secs(60));
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    // --once: a failed migration ends it (it would otherwise serve on).
    let mut dst = Receiver::start_with(
        &dir,
        &format!("127.0.0.1:{}", free_port()),
        &secret,
        None,
        &["--once"],
    );
    let policy = format!("exec:{}", misbehaving_policy(&dir, then).display());
    let args = [
        "--policy",
        &policy,
        "--policy-deadline",
        "500ms",
        "--verify",
    ];
    let (ok, _, err) = migrate(&dir.join("src.sock"), &dst.addr, &secret, &args);
    assert!(!ok, "a misbehaving policy's migration succeeded");
    eprintln!("{name}: {}", err.trim());
    assert!(
        err.contains("keeps running") && err.contains("policy.sh") && err.contains(expect),
        "{err}"
    );
    assert_ne!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    let pid = std::fs::read_to_string(dir.join("policy.pid")).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "the policy program outlived the migration"
    );
    assert_source_unharmed(&src);
    assert_eq!(src.state()["paused"], json!(false));
    src.quit();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn crashing_policy_fails_cleanly() {
    if !require_kvm() {
        return;
    }
    fails_cleanly(
        "exec-crash",
        "echo 'Traceback: policy bug' >&2; exit 7",
        "exit status 7",
    );
}

#[test]
fn hanging_policy_fails_cleanly() {
    if !require_kvm() {
        return;
    }
    fails_cleanly("exec-hang", "sleep 60", "did not answer within 500ms");
}

#[test]
fn nonsense_answering_policy_fails_cleanly() {
    if !require_kvm() {
        return;
    }
    fails_cleanly(
        "exec-nonsense",
        "echo '{\"jump\":{\"to\":\"post-copy\"}}'",
        "not a valid 'after_round' decision",
    );
}
