//! Helpers shared by the end-to-end tests and benchmarks: finding the `vmm`
//! binary, running it as a real process with a control socket, and waiting
//! for what the guest reports.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Fails loudly (instead of skipping) when KVM is missing on CI.
pub fn require_kvm() -> bool {
    let present = Path::new("/dev/kvm").exists();
    if !present {
        assert!(
            std::env::var("CI").ok().as_deref() != Some("true"),
            "/dev/kvm is missing on CI: that is a failure, not a skip"
        );
        eprintln!("skipping: /dev/kvm is missing");
    }
    present
}

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Path to the `vmm` binary, built once (in the profile of this test build)
/// if needed. `VMM_BIN` overrides it.
pub fn vmm_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("VMM_BIN") {
            return PathBuf::from(p);
        }
        let release = !cfg!(debug_assertions);
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-q", "-p", "tools", "--bin", "vmm"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the vmm binary");
        assert!(status.success(), "building the vmm binary failed");
        target_dir()
            .join(if release { "release" } else { "debug" })
            .join("vmm")
    })
    .clone()
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs `vmm ARGS` to completion.
pub fn vmm(args: &[&str]) -> Output {
    Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running vmm")
}

/// A `vmm run` process with a control socket; killed on drop.
pub struct VmmProcess {
    child: Child,
    socket: PathBuf,
}

impl VmmProcess {
    /// Starts `vmm run ARGS --api-socket SOCKET` and waits for the socket.
    pub fn start(socket: &Path, args: &[&str]) -> Self {
        let child = Command::new(vmm_bin())
            .arg("run")
            .args(args)
            .args(["--status-ms", "0", "--api-socket"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmm run");
        let p = Self {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while vmm::api::call(socket, &json!({"cmd": "state"})).is_err() {
            assert!(
                Instant::now() < deadline,
                "vmm control socket never came up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    /// Sends a request; panics unless it succeeds.
    pub fn call(&self, req: Value) -> Value {
        let resp = vmm::api::call(&self.socket, &req).expect("control socket call");
        assert_eq!(resp["ok"], json!(true), "request {req} failed: {resp}");
        resp
    }

    /// The `state` answer.
    pub fn state(&self) -> Value {
        self.call(json!({"cmd": "state"}))
    }

    /// Polls `state` until `pred` holds.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.state();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every vCPU has filled its working set and is running.
    pub fn wait_running(&self, timeout: Duration) -> Value {
        self.wait_for("every vCPU running", timeout, |s| {
            s["vcpus"].as_array().is_some_and(|v| {
                v.iter()
                    .all(|c| c["phase"] == json!(guest_images::abi::phase::RUNNING))
            })
        })
    }

    /// Asks the process to quit and waits for it; returns its output.
    pub fn quit(mut self) -> (i32, String, String) {
        let _ = vmm::api::call(&self.socket, &json!({"cmd": "quit"}));
        let status = self.child.wait().expect("waiting for vmm");
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status.code().unwrap_or(-1), out, err)
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum over vCPUs of a numeric field of the `state` answer's `vcpus`.
pub fn per_vcpu(state: &Value, field: &str) -> Vec<u64> {
    state["vcpus"]
        .as_array()
        .map(|v| v.iter().map(|c| c[field].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default()
}

/// A numeric field of each vCPU's heartbeat record.
pub fn heartbeat_field(state: &Value, field: &str) -> Vec<u64> {
    state["heartbeats"]
        .as_array()
        .map(|v| v.iter().map(|c| c[field].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default()
}
