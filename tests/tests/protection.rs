//! The protected stream end to end: migrations under TLS and under the
//! shared-secret (Noise) mode succeed and verify, in pre-copy and
//! post-copy; an on-path proxy that flips one byte after the handshake
//! fails the migration and leaves the source unharmed; a destination
//! refuses a source whose certificate another CA signed; plaintext is an
//! opt-in that both ends warn about.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tests::{
    assert_guest_lives_on, assert_source_unharmed, free_port, migrate_protected, require_kvm,
    scratch, secret_file, vmm, Fault, Proxy, Receiver, VmmProcess,
};

const WORKLOAD: &str = "wset=64M,rate=5000,fill=100";

fn source(dir: &Path) -> VmmProcess {
    let src = VmmProcess::start(
        &dir.join("src.sock"),
        &["--memory", "256M", "--workload", WORKLOAD],
    );
    src.wait_running(Duration::from_secs(60));
    src
}

/// `vmm gen-certs DIR`: the one-command set-up.
fn gen_certs(dir: &Path) {
    let out = vmm(&["gen-certs", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The TLS flags of one end (`source` or `destination`) from `dir`,
/// trusting the CA in `ca_dir`.
fn tls_args(dir: &Path, end: &str, ca_dir: &Path) -> Vec<String> {
    let p = |f: &str| dir.join(f).display().to_string();
    vec![
        "--tls-cert".into(),
        p(&format!("{end}.pem")),
        "--tls-key".into(),
        p(&format!("{end}.key")),
        "--tls-ca".into(),
        ca_dir.join("ca.pem").display().to_string(),
    ]
}

fn secret_args(secret: &Path) -> Vec<String> {
    vec!["--secret".into(), secret.display().to_string()]
}

/// Migrates a fresh source to a fresh receiver with `--verify` and
/// `extra`, each end protected as given; checks the verified outcome.
fn verified(
    name: &str,
    src_p: &dyn Fn(&Path) -> Vec<String>,
    dst_p: &dyn Fn(&Path) -> Vec<String>,
    extra: &[&str],
) -> String {
    let dir = scratch(name);
    let src = source(&dir);
    let before = src.state();
    let listen = format!("127.0.0.1:{}", free_port());
    let dst = Receiver::start_protected(&dir, &listen, &dst_p(&dir), None, &[]);
    let mut args = vec!["--verify"];
    args.extend_from_slice(extra);
    let (ok, report, err) =
        migrate_protected(&dir.join("src.sock"), &dst.addr, &src_p(&dir), &args);
    assert!(
        ok,
        "migration failed: {err}\ndestination: {}",
        dst.stderr_text()
    );
    assert_eq!(report["mismatched_pages"], json!(0), "{report}");
    assert_eq!(report["guest_verified"], json!(true), "{report}");
    let (code, _, qerr) = src.quit();
    assert_eq!(code, 0, "source: {qerr}");
    assert_guest_lives_on(&dst, 1, &before);
    let text = format!("{err}\n{}", dst.stderr_text());
    drop(dst);
    let _ = std::fs::remove_dir_all(dir);
    text
}

fn tls_both(dir: &Path) -> (Vec<String>, Vec<String>) {
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        gen_certs(&certs);
    }
    (
        tls_args(&certs, "source", &certs),
        tls_args(&certs, "destination", &certs),
    )
}

#[test]
fn tls_migrations_verify_in_precopy_and_postcopy() {
    if !require_kvm() {
        return;
    }
    for (name, mode) in [("tls-pre", "pre"), ("tls-post", "post")] {
        let text = verified(
            name,
            &|d| tls_both(d).0,
            &|d| tls_both(d).1,
            &["--mode", mode],
        );
        assert!(!text.contains("WARNING"), "{text}");
    }
}

#[test]
fn psk_migrations_verify_in_precopy_and_postcopy() {
    if !require_kvm() {
        return;
    }
    let secret = |d: &Path| secret_args(&secret_file(d, "secret", "correct horse battery staple"));
    for (name, mode) in [("psk-pre", "pre"), ("psk-post", "post")] {
        let text = verified(name, &secret, &secret, &["--mode", mode]);
        assert!(!text.contains("WARNING"), "{text}");
    }
}

#[test]
fn plaintext_is_an_opt_in_both_ends_warn_about() {
    if !require_kvm() {
        return;
    }
    let plain = |d: &Path| {
        let mut a = secret_args(&secret_file(d, "secret", "correct horse battery staple"));
        a.push("--insecure-plaintext".into());
        a
    };
    let text = verified("plaintext", &plain, &plain, &[]);
    assert_eq!(
        text.matches("WARNING: --insecure-plaintext").count(),
        2,
        "{text}"
    );
}

/// One byte flipped 3 MB into the stream (long after the handshake).
fn flipped_byte_fails(
    name: &str,
    src_p: Vec<String>,
    dst_p: Vec<String>,
    dir: &Path,
    expect: &str,
) {
    let src = source(dir);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut dst = Receiver::start_protected(dir, &listen, &dst_p, None, &[]);
    let proxy = Proxy::start(&listen, Fault::FlipAt(3 << 20));
    let (ok, _, err) = migrate_protected(
        &dir.join("src.sock"),
        &proxy.addr,
        &src_p,
        &["--compression", "none", "--verify"],
    );
    assert!(!ok, "{name}: a modified stream was accepted");
    assert_ne!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    let text = format!("{err}\n{}", dst.stderr_text());
    assert!(text.contains(expect), "{name}: {text}");
    assert_source_unharmed(&src);
    src.quit();
}

#[test]
fn a_flipped_byte_after_the_handshake_fails_and_the_source_runs_on() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("flip-psk");
    let secret = secret_args(&secret_file(&dir, "secret", "correct horse battery staple"));
    flipped_byte_fails(
        "psk",
        secret.clone(),
        secret,
        &dir,
        "Integrity check failed",
    );
    let dir = scratch("flip-tls");
    let (s, d) = tls_both(&dir);
    flipped_byte_fails("tls", s, d, &dir, "TLS record refused");
}

#[test]
fn a_certificate_of_another_ca_is_refused() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("other-ca");
    let (ours, theirs) = (dir.join("ours"), dir.join("theirs"));
    gen_certs(&ours);
    gen_certs(&theirs);
    let src = source(&dir);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut dst = Receiver::start_protected(
        &dir,
        &listen,
        &tls_args(&ours, "destination", &ours),
        None,
        &[],
    );
    // It trusts our CA, but its own certificate comes from another.
    let (ok, _, err) = migrate_protected(
        &dir.join("src.sock"),
        &dst.addr,
        &tls_args(&theirs, "source", &ours),
        &[],
    );
    assert!(!ok, "a source with a foreign certificate migrated");
    assert!(
        err.contains("Authentication failed") || err.contains("TLS"),
        "{err}"
    );
    assert_ne!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(dst.stderr_text().contains("TLS"), "{}", dst.stderr_text());
    assert_source_unharmed(&src);
    src.quit();
}
