//! Bad input gets a clear error and a non-zero exit, never a panic.

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use serde_json::json;
use tests::{require_kvm, scratch, vmm, VmmProcess};

fn assert_fails_with(args: &[&str], needle: &str) {
    let out = vmm(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: expected '{needle}' in: {err}"
    );
}

#[test]
fn unknown_flag() {
    assert_fails_with(&["run", "--frobnicate"], "unexpected argument");
}

#[test]
fn zero_memory() {
    assert_fails_with(
        &["run", "--memory", "0", "--duration", "1"],
        "at least 64 MiB",
    );
}

#[test]
fn memory_larger_than_host() {
    assert_fails_with(
        &["run", "--memory", "64T", "--duration", "1"],
        "more than this host",
    );
}

#[test]
fn bad_workload() {
    assert_fails_with(&["run", "--workload", "fill=0"], "fill");
}

#[test]
fn garbage_elf() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("garbage-elf");
    let path = dir.join("garbage.elf");
    std::fs::write(
        &path,
        b"\x7fELF this is not really an ELF file at all............",
    )
    .unwrap();
    assert_fails_with(
        &["run", "--guest", path.to_str().unwrap(), "--duration", "1"],
        "ELF",
    );
    assert_fails_with(
        &["run", "--guest", "no-such-guest", "--duration", "1"],
        "Unknown guest",
    );
}

/// A real snapshot, then damaged copies of it.
#[test]
fn truncated_or_corrupt_state_file() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("bad-snapshot");
    let snap = dir.join("vm.snap");
    let a = VmmProcess::start(
        &dir.join("a.sock"),
        &["--memory", "128M", "--workload", "wset=8M"],
    );
    a.wait_running(Duration::from_secs(60));
    a.call(json!({"cmd": "save", "path": snap}));
    a.quit();
    let good = std::fs::read(&snap).unwrap();
    let run = |bytes: &[u8], needle: &str| {
        let p = dir.join("damaged.snap");
        std::fs::write(&p, bytes).unwrap();
        assert_fails_with(
            &["run", "--restore", p.to_str().unwrap(), "--duration", "1"],
            needle,
        );
    };
    run(&good[..good.len() / 2], "truncated");
    run(&good[..20], "truncated");
    run(b"NOTASNAPSHOTFILE", "bad magic");
    let mut flipped = good.clone();
    flipped[100] ^= 0x40; // inside the state JSON
    run(&flipped, "corrupt");
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n - 4096] ^= 1; // inside the last memory chunk
    run(&flipped, "corrupt");
    // An absurd state length must be refused before anything is allocated.
    let p = dir.join("huge.snap");
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&good[..12]).unwrap();
    f.write_all(&u32::MAX.to_le_bytes()).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    drop(f);
    assert_fails_with(&["run", "--restore", p.to_str().unwrap()], "exceeds");
    let _ = std::fs::remove_dir_all(dir);
}
