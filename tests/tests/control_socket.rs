//! Control socket manners: one owner per path, mode 0600, bounded requests,
//! removal at exit (also on SIGTERM), and a failed `save` that changes
//! nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tests::{
    free_port, heartbeat_field, require_kvm, scratch, secret_file, vmm, Receiver, VmmProcess,
};

const GUEST: [&str; 4] = ["--memory", "128M", "--workload", "wset=8M"];

/// `vmm run --api-socket PATH` fails (before booting) with `needle`.
fn run_refused(path: &Path, extra: &[&str], needle: &str) {
    let mut args = vec![
        "run",
        "--duration",
        "1",
        "--api-socket",
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = vmm(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
}

#[test]
fn a_live_socket_is_refused_even_with_force() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("live-socket");
    let sock = dir.join("a.sock");
    let a = VmmProcess::start(&sock, &GUEST);
    run_refused(&sock, &[], "already serving");
    run_refused(&sock, &["--force"], "already serving");
    a.state(); // the first owner still answers
    let (code, _, err) = a.quit();
    assert_eq!(code, 0, "{err}");
    assert!(!sock.exists(), "quit leaves the socket file behind");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_file_in_the_way_is_refused_and_kept() {
    let dir = scratch("file-in-the-way");
    let path = dir.join("a.sock");
    std::fs::write(&path, "precious").unwrap();
    run_refused(&path, &["--force"], "not a socket");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn force_replaces_a_stale_socket() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("stale-socket");
    let sock = dir.join("a.sock");
    drop(UnixListener::bind(&sock).unwrap()); // the file stays, nobody listens
    run_refused(&sock, &[], "--force");
    let mut args = GUEST.to_vec();
    args.push("--force");
    let a = VmmProcess::start(&sock, &args);
    a.state();
    a.quit();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn socket_is_owner_only() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("socket-mode");
    let sock = dir.join("a.sock");
    let a = VmmProcess::start(&sock, &GUEST);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    a.quit();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_oversize_request_is_refused_and_the_connection_closed() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("oversize");
    let sock = dir.join("a.sock");
    let a = VmmProcess::start(&sock, &GUEST);
    let mut conn = UnixStream::connect(&sock).unwrap();
    // 100 KiB without a newline; the server stops reading after 64 KiB.
    let _ = conn.write_all(&vec![b' '; 100 << 10]);
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let resp: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(resp["ok"], json!(false), "{resp}");
    assert!(
        resp["error"]
            .as_str()
            .unwrap()
            .contains("longer than 65536 bytes"),
        "{resp}"
    );
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(rest.is_empty(), "connection still open");
    a.state(); // others are served as before
    a.quit();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_stops_run_cleanly_and_removes_its_socket() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("sigterm-run");
    let sock = dir.join("a.sock");
    let a = VmmProcess::start(&sock, &GUEST);
    a.wait_running(Duration::from_secs(60));
    let (code, _, err) = a.terminate();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert!(!sock.exists(), "socket left behind");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_stops_a_listening_receiver_and_removes_its_socket() {
    let dir = scratch("sigterm-receive");
    let secret = secret_file(&dir, "secret", "a secret for this test only");
    let mut dst = Receiver::start(&dir, &format!("127.0.0.1:{}", free_port()), &secret, None);
    // While it waits, its socket tells so.
    let st = vmm::api::call(&dst.socket, &json!({"cmd": "migration_status"})).unwrap();
    assert_eq!(st["receiving"]["stage"], json!("listening"), "{st}");
    let st = vmm::api::call(&dst.socket, &json!({"cmd": "state"})).unwrap();
    assert_eq!(st["ok"], json!(false), "{st}");
    dst.terminate();
    assert_eq!(
        dst.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        dst.stderr_text()
    );
    assert!(!dst.socket.exists(), "socket left behind");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failed_save_leaves_the_guest_running() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("failed-save");
    let a = VmmProcess::start(&dir.join("a.sock"), &GUEST);
    a.wait_running(Duration::from_secs(60));
    let bad = dir.join("no-such-dir").join("vm.snap");
    let resp = vmm::api::call(&dir.join("a.sock"), &json!({"cmd": "save", "path": bad})).unwrap();
    assert_eq!(resp["ok"], json!(false), "{resp}");
    let s0 = a.state();
    assert_eq!(s0["paused"], json!(false), "{s0}");
    std::thread::sleep(Duration::from_millis(300));
    let s1 = a.state();
    let (h0, h1) = (heartbeat_field(&s0, "count"), heartbeat_field(&s1, "count"));
    assert!(h1[0] > h0[0], "heartbeats stopped: {h0:?} then {h1:?}");
    a.quit();
    let _ = std::fs::remove_dir_all(dir);
}
