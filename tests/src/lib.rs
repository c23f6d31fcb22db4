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

/// Runs the parts of a benchmark named on its command line (`cargo bench
/// -p tests --bench NAME -- PART ...`; a part runs if its name contains one
/// of them), or all of them when none is named.
pub fn run_bench_parts(parts: &[(&str, fn())]) {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for (name, part) in parts {
        if only.is_empty() || only.iter().any(|o| name.contains(o.as_str())) {
            part();
        }
    }
}

/// What [`bench_migration`] returns.
pub struct BenchRun {
    /// The migration report.
    pub report: Value,
    /// The source's state just before the migration.
    pub before: Value,
    /// Pages per second the guest wrote just before the migration, by its
    /// own counters (the dirty log cannot count a page twice in a round).
    pub guest_write_pages_s: f64,
}

/// One migration between two `vmm` processes on loopback for a benchmark:
/// boots a source with `mem` and `workload`, lets it run half a second
/// (measuring its write rate meanwhile), migrates it with `args` to a fresh
/// `vmm receive`.
pub fn bench_migration(name: &str, mem: &str, workload: &str, args: &[&str]) -> BenchRun {
    let ends = Ends::start(
        name,
        &["--memory", mem, "--workload", workload],
        Duration::from_millis(500),
        &[],
    );
    let written = |s: &Value| per_vcpu(s, "pages_written").iter().sum::<u64>() as f64;
    let uptime_s = |s: &Value| s["uptime_ms"].as_f64().unwrap() / 1e3;
    let (s0, before) = (&ends.running, &ends.before);
    let guest_write_pages_s = (written(before) - written(s0)) / (uptime_s(before) - uptime_s(s0));
    let (ok, report, err) = ends.migrate(args);
    assert!(ok, "{err}");
    let Ends {
        dir,
        src,
        dst,
        before,
        ..
    } = ends;
    src.quit();
    drop(dst);
    let _ = std::fs::remove_dir_all(dir);
    BenchRun {
        report,
        before,
        guest_write_pages_s,
    }
}

/// The flag of plaintext mode, which tests need on both ends wherever they
/// read or write the protocol's frames themselves (the [`Proxy`], a peer
/// speaking the protocol by hand).
pub const PLAINTEXT: &str = "--insecure-plaintext";

/// The two ends of a migration on loopback: a source `vmm` running a guest,
/// and a fresh `vmm receive` started once the guest has run a while.
pub struct Ends {
    pub dir: PathBuf,
    pub secret: PathBuf,
    pub src: VmmProcess,
    pub dst: Receiver,
    /// The source's state as soon as its guest ran.
    pub running: Value,
    /// The source's state just before the receiver started.
    pub before: Value,
    /// The receiver was started with `--insecure-plaintext` (a test that
    /// speaks the protocol by hand or parses its frames): [`Ends::migrate`]
    /// passes it to the source too.
    pub plaintext: bool,
}

impl Ends {
    /// Boots the source with `source_args`, lets its guest run `settle`,
    /// then starts the receiver with `receiver_args`.
    pub fn start(
        name: &str,
        source_args: &[&str],
        settle: Duration,
        receiver_args: &[&str],
    ) -> Self {
        let dir = scratch(name);
        let secret = secret_file(&dir, "secret", "correct horse battery staple");
        let src = VmmProcess::start(&dir.join("src.sock"), source_args);
        src.wait_running(Duration::from_secs(60));
        let running = src.state();
        std::thread::sleep(settle);
        let before = src.state();
        let addr = format!("127.0.0.1:{}", free_port());
        let dst = Receiver::start_with(&dir, &addr, &secret, None, receiver_args);
        Self {
            dir,
            secret,
            src,
            dst,
            running,
            before,
            plaintext: receiver_args.contains(&PLAINTEXT),
        }
    }

    /// Runs `vmm migrate` from the source to the receiver (see [`migrate`]).
    pub fn migrate(&self, args: &[&str]) -> (bool, Value, String) {
        let mut args = args.to_vec();
        if self.plaintext && !args.contains(&PLAINTEXT) {
            args.push(PLAINTEXT);
        }
        migrate(
            &self.dir.join("src.sock"),
            &self.dst.addr,
            &self.secret,
            &args,
        )
    }
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
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
        Self::spawn(Command::new(vmm_bin()), socket, args)
    }

    /// Like [`VmmProcess::start`], with more environment variables.
    pub fn start_with_env(socket: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(vmm_bin());
        cmd.envs(env.iter().copied());
        Self::spawn(cmd, socket, args)
    }

    /// Like [`VmmProcess::start`], with the process's umask set to `umask`
    /// (through the shell: it is inherited by `exec`).
    pub fn start_with_umask(socket: &Path, args: &[&str], umask: &str) -> Self {
        let mut sh = Command::new("sh");
        sh.args(["-c", &format!("umask {umask} && exec \"$0\" \"$@\"")])
            .arg(vmm_bin());
        Self::spawn(sh, socket, args)
    }

    fn spawn(mut cmd: Command, socket: &Path, args: &[&str]) -> Self {
        let child = cmd
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

    /// The `vmm` process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its control socket.
    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone()
    }

    /// Whether the process still runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
    pub fn quit(self) -> (i32, String, String) {
        let _ = vmm::api::call(&self.socket, &json!({"cmd": "quit"}));
        self.wait_output()
    }

    /// Sends it SIGTERM and waits for it; returns its output.
    pub fn terminate(self) -> (i32, String, String) {
        send_sigterm(&self.child);
        self.wait_output()
    }

    fn wait_output(mut self) -> (i32, String, String) {
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

/// Sends SIGTERM to `child` (with kill(1): no unsafe `libc::kill` needed).
fn send_sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -TERM failed");
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

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Writes a secret file (mode 0600: `vmm` refuses a secret others may
/// read) and returns its path.
pub fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, secret).expect("secret file");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    p
}

/// Collects a child's stderr lines on a thread.
fn collect_lines(
    stream: impl Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

/// A `vmm receive` process.
pub struct Receiver {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// `tcp:HOST:PORT` it listens on.
    pub addr: String,
    /// Its control socket (a stand-in answers until the guest runs there).
    pub socket: PathBuf,
}

impl Receiver {
    /// Starts `vmm receive` on `listen` (`HOST:PORT`), optionally inside a
    /// network namespace, and waits until it listens.
    pub fn start(dir: &Path, listen: &str, secret: &Path, netns: Option<&str>) -> Self {
        Self::start_with(dir, listen, secret, netns, &[])
    }

    /// Like [`Receiver::start`], with more `vmm receive` arguments.
    pub fn start_with(
        dir: &Path,
        listen: &str,
        secret: &Path,
        netns: Option<&str>,
        args: &[&str],
    ) -> Self {
        let protection = ["--secret".to_string(), secret.display().to_string()];
        Self::start_protected(dir, listen, &protection, netns, args)
    }

    /// Like [`Receiver::start_with`], protected by `protection` (e.g.
    /// `--tls-cert F --tls-key F --tls-ca F`) instead of a secret file.
    pub fn start_protected(
        dir: &Path,
        listen: &str,
        protection: &[String],
        netns: Option<&str>,
        args: &[&str],
    ) -> Self {
        let socket = dir.join(format!("dst-{}.sock", listen.replace([':', '.'], "_")));
        let addr = format!("tcp:{listen}");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(vmm_bin());
                c
            }
            None => Command::new(vmm_bin()),
        };
        let mut child = cmd
            .args(["receive", "--listen", &addr, "--status-ms", "0"])
            .args(protection)
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmm receive");
        let stderr = collect_lines(child.stderr.take().expect("stderr"));
        let r = Self {
            child,
            stderr,
            addr,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !r.stderr_text().contains("listening on") {
            assert!(
                Instant::now() < deadline,
                "receiver never listened: {}",
                r.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        r
    }

    /// Everything it printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Sends it SIGTERM.
    pub fn terminate(&self) {
        send_sigterm(&self.child);
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for it to exit on its own (within `timeout`); returns its code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50)); // let stderr drain
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a request to its control socket (after a successful migration).
    pub fn call(&self, req: Value) -> Value {
        let resp = vmm::api::call(&self.socket, &req).expect("destination control socket");
        assert_eq!(resp["ok"], json!(true), "request {req} failed: {resp}");
        resp
    }

    /// Waits until its control socket answers for a running guest (until
    /// then it only tells how the migration goes).
    pub fn wait_socket(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let has_guest = |r: std::io::Result<Value>| r.is_ok_and(|v| v["ok"] == json!(true));
        while !has_guest(vmm::api::call(&self.socket, &json!({"cmd": "state"}))) {
            assert!(
                Instant::now() < deadline,
                "destination never came up: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = vmm::api::call(&self.socket, &json!({"cmd": "quit"}));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`migrate`] on a thread of its own, for tests that act on the source or
/// the destination while the migration runs.
pub fn migrate_in_background(
    src_socket: &Path,
    to: &str,
    secret: &Path,
    extra: &'static [&'static str],
) -> std::thread::JoinHandle<(bool, Value, String)> {
    let (src_socket, to, secret) = (src_socket.to_owned(), to.to_owned(), secret.to_owned());
    std::thread::spawn(move || migrate(&src_socket, &to, &secret, extra))
}

/// Runs `vmm migrate --json ARGS`; returns (success, report or null, stderr).
pub fn migrate(
    src_socket: &Path,
    to: &str,
    secret: &Path,
    extra: &[&str],
) -> (bool, Value, String) {
    let protection = ["--secret".to_string(), secret.display().to_string()];
    migrate_protected(src_socket, to, &protection, extra)
}

/// Like [`migrate`], protected by `protection` instead of a secret file.
pub fn migrate_protected(
    src_socket: &Path,
    to: &str,
    protection: &[String],
    extra: &[&str],
) -> (bool, Value, String) {
    let out = Command::new(vmm_bin())
        .args(["migrate", "--json", "--api-socket"])
        .arg(src_socket)
        .args(["--to", to])
        .args(protection)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("running vmm migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A direction of a migration connection, seen from the [`Proxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToDestination,
    ToSource,
}

/// The `nth` frame (from 0) of kind `kind` going `dir` on the main
/// connection (the first one the proxy carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub dir: Dir,
    pub kind: migration::protocol::Kind,
    pub nth: u32,
}

impl At {
    /// The first frame of `kind` going `dir`.
    pub fn first(dir: Dir, kind: migration::protocol::Kind) -> Self {
        Self { dir, kind, nth: 0 }
    }
}

/// What a [`Proxy`] does to the stream. The byte faults (`CutAfter`,
/// `FlipAt`) work on any stream; the others parse the protocol's frames,
/// so both ends must run with [`PLAINTEXT`].
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Closes both connections after forwarding this many bytes (source to
    /// destination).
    CutAfter(u64),
    /// Flips one bit of the byte at this offset (source to destination).
    FlipAt(u64),
    /// Drops that frame and forwards the rest.
    Drop(At),
    /// Drops every frame of this kind going this way.
    DropAll(Dir, migration::protocol::Kind),
    /// Cuts every connection instead of forwarding that frame (the frame
    /// is lost); later connections are carried again (the link came back).
    CutBefore(At),
    /// Forwards that frame, then cuts every connection.
    CutAfterFrame(At),
    /// Holds that frame and everything after it, on every connection,
    /// sockets left open: a silent partition; later connections stall too.
    Stall(At),
}

/// What a [`Proxy`] shares between its threads.
#[derive(Default)]
struct ProxyState {
    /// The fault's frame was seen.
    triggered: std::sync::atomic::AtomicBool,
    stalled: std::sync::atomic::AtomicBool,
    /// Every socket of the connections carried so far, to cut them.
    sockets: std::sync::Mutex<Vec<std::net::TcpStream>>,
}

impl ProxyState {
    fn cut(&self) {
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits while the link is stalled (forever, as a partition does).
    fn hold_if_stalled(&self) {
        while self.stalled.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A TCP proxy on loopback that injects one fault into the migration it
/// carries. Byte faults apply to the first connection's source-to-
/// destination stream; frame faults parse the frames of the first
/// (main) connection in both directions; cuts and stalls hit every
/// connection (post-copy's fault connection too).
pub struct Proxy {
    /// `tcp:127.0.0.1:PORT` to give the source.
    pub addr: String,
    state: std::sync::Arc<ProxyState>,
}

impl Proxy {
    /// Forwards to `target` (`HOST:PORT`) with `fault`.
    pub fn start(target: &str, fault: Fault) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let addr = format!("tcp:{}", listener.local_addr().unwrap());
        let state = std::sync::Arc::new(ProxyState::default());
        let (target, st) = (target.to_string(), state.clone());
        std::thread::spawn(move || {
            for (i, conn) in listener.incoming().enumerate() {
                let Ok(src) = conn else { return };
                let Ok(dst) = std::net::TcpStream::connect(&target) else {
                    continue; // the destination is gone: the source sees a close
                };
                let fault = (i == 0).then_some(fault);
                st.sockets
                    .lock()
                    .unwrap()
                    .extend([src.try_clone().unwrap(), dst.try_clone().unwrap()]);
                for dir in [Dir::ToDestination, Dir::ToSource] {
                    let (from, to) = match dir {
                        Dir::ToDestination => (src.try_clone().unwrap(), dst.try_clone().unwrap()),
                        Dir::ToSource => (dst.try_clone().unwrap(), src.try_clone().unwrap()),
                    };
                    let st = st.clone();
                    std::thread::spawn(move || pump(from, to, dir, fault, &st));
                }
            }
        });
        Self { addr, state }
    }

    /// Waits until the fault's frame went by (or `timeout`).
    pub fn wait_triggered(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self
            .state
            .triggered
            .load(std::sync::atomic::Ordering::Acquire)
        {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Cuts every connection now (what the kernel does when a peer dies).
    pub fn cut(&self) {
        self.state
            .stalled
            .store(false, std::sync::atomic::Ordering::Release);
        self.state.cut();
    }
}

/// Forwards `from` to `to`, applying `fault` (if this is the main
/// connection) to the frames going `dir`.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    dir: Dir,
    fault: Option<Fault>,
    st: &ProxyState,
) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if let Some(f @ (Fault::CutAfter(_) | Fault::FlipAt(_))) = fault {
        // Byte faults need no frames: they also work on encrypted streams.
        return pump_bytes(from, to, dir, f, st);
    }
    let mut pos = 0u64;
    let mut seen = std::collections::HashMap::<u8, u32>::new();
    loop {
        st.hold_if_stalled();
        let mut frame = vec![0u8; migration::protocol::HEADER_LEN];
        if from.read_exact(&mut frame).is_err() {
            break;
        }
        let len = u32::from_le_bytes(frame[8..12].try_into().unwrap()) as usize;
        frame.resize(migration::protocol::HEADER_LEN + len.min(64 << 20), 0);
        if from
            .read_exact(&mut frame[migration::protocol::HEADER_LEN..])
            .is_err()
        {
            break;
        }
        let kind = frame[4];
        let n = seen.entry(kind).or_default();
        let this = |at: &At| at.dir == dir && at.kind as u8 == kind && at.nth == *n;
        let mut forward = true;
        match fault {
            Some(Fault::CutAfter(at))
                if dir == Dir::ToDestination && pos + frame.len() as u64 >= at =>
            {
                let _ = to.write_all(&frame[..(at - pos) as usize]);
                st.cut();
                return;
            }
            Some(Fault::FlipAt(at))
                if dir == Dir::ToDestination && (pos..pos + frame.len() as u64).contains(&at) =>
            {
                frame[(at - pos) as usize] ^= 0x04;
            }
            Some(Fault::Drop(at)) if this(&at) => forward = false,
            Some(Fault::DropAll(d, k)) if d == dir && k as u8 == kind => forward = false,
            Some(Fault::CutBefore(at)) if this(&at) => {
                st.triggered.store(true, Ordering::Release);
                st.cut();
                return;
            }
            Some(Fault::Stall(at)) if this(&at) => {
                st.stalled.store(true, Ordering::Release);
                st.triggered.store(true, Ordering::Release);
                st.hold_if_stalled();
            }
            _ => {}
        }
        *n += 1;
        if forward && to.write_all(&frame).is_err() {
            break;
        }
        if !forward {
            st.triggered.store(true, Ordering::Release);
        }
        if let Some(Fault::CutAfterFrame(at)) = fault {
            if this_was(&at, dir, kind, *n) {
                st.triggered.store(true, Ordering::Release);
                st.cut();
                return;
            }
        }
        pos += frame.len() as u64;
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Forwards `from` to `to` as bytes, applying a byte fault
/// ([`Fault::CutAfter`], [`Fault::FlipAt`]) to what goes to the
/// destination: the proxy for protected streams, whose frames it cannot
/// read.
fn pump_bytes(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    dir: Dir,
    fault: Fault,
    st: &ProxyState,
) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        st.hold_if_stalled();
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        if dir == Dir::ToDestination {
            match fault {
                Fault::CutAfter(at) if pos + n as u64 >= at => {
                    let _ = to.write_all(&chunk[..(at - pos) as usize]);
                    st.triggered.store(true, Ordering::Release);
                    st.cut();
                    return;
                }
                Fault::FlipAt(at) if (pos..pos + n as u64).contains(&at) => {
                    chunk[(at - pos) as usize] ^= 0x04;
                    st.triggered.store(true, Ordering::Release);
                }
                _ => {}
            }
        }
        pos += n as u64;
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Whether the frame just counted (the `n`th of its kind, from 1) is `at`.
fn this_was(at: &At, dir: Dir, kind: u8, n: u32) -> bool {
    at.dir == dir && at.kind as u8 == kind && at.nth + 1 == n
}

/// Parses a `--memory` value.
pub fn parse_mem(s: &str) -> u64 {
    vmm::config::parse_size(s).expect("memory size")
}

/// After a migration: on the destination every vCPU's timer fires, its
/// heartbeats continue from where they were on the source (`before`) without
/// a jump, its FPU state and every page it reads are intact, and the guest
/// verifies all its memory.
pub fn assert_guest_lives_on(dst: &Receiver, vcpus: u8, before: &Value) {
    dst.wait_socket(Duration::from_secs(10));
    let s0 = dst.call(json!({"cmd": "state"}));
    // A halting vCPU with nothing to do ticks every 100 ms: wait for every
    // vCPU's timer to fire twice, then for one more FPU check of each.
    let ticking = |s: &Value| {
        let (t0, t1) = (per_vcpu(&s0, "ticks"), per_vcpu(s, "ticks"));
        let (f0, f1) = (per_vcpu(&s0, "fpu_checks"), per_vcpu(s, "fpu_checks"));
        (0..usize::from(vcpus)).all(|i| t1[i] >= t0[i] + 2 && f1[i] > f0[i])
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut s1 = dst.call(json!({"cmd": "state"}));
    while !ticking(&s1) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        s1 = dst.call(json!({"cmd": "state"}));
    }
    for i in 0..usize::from(vcpus) {
        assert!(
            per_vcpu(&s1, "ticks")[i] >= per_vcpu(&s0, "ticks")[i] + 2,
            "vCPU {i}: timer stopped"
        );
        assert!(
            heartbeat_field(&s1, "count")[i] > heartbeat_field(before, "count")[i],
            "vCPU {i}: heartbeats did not continue"
        );
        assert_eq!(
            heartbeat_field(&s1, "discontinuities")[i],
            0,
            "vCPU {i}: heartbeat counter jumped"
        );
        assert_eq!(
            per_vcpu(&s1, "fpu_errors")[i],
            0,
            "vCPU {i}: FPU state lost"
        );
        assert_eq!(
            per_vcpu(&s1, "read_errors")[i],
            0,
            "vCPU {i}: read a bad page"
        );
        assert!(
            per_vcpu(&s1, "fpu_checks")[i] > per_vcpu(&s0, "fpu_checks")[i],
            "vCPU {i}: not running"
        );
    }
    let v = dst.call(json!({"cmd": "verify"}));
    assert_eq!(
        (v["pages_bad"].as_u64(), v["fpu_errors"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
}

/// Boots a source (`vcpus`, `mem`, `workload`), migrates it with `--verify`
/// and `extra` to a fresh `vmm receive` on loopback, and checks what every
/// verified migration must show: success, no mismatched page, every page of
/// RAM checked, the guest's own check passed, the source gone cleanly, the
/// guest alive on the destination. Returns the report and the source's
/// state before the migration.
pub fn verified_migration(
    name: &str,
    vcpus: u8,
    mem: &str,
    workload: &str,
    extra: &[&str],
) -> (Value, Value) {
    verified_migration_with(name, vcpus, mem, workload, &[], extra)
}

/// Like [`verified_migration`], with `receiver_args` for `vmm receive`.
pub fn verified_migration_with(
    name: &str,
    vcpus: u8,
    mem: &str,
    workload: &str,
    receiver_args: &[&str],
    extra: &[&str],
) -> (Value, Value) {
    let vcpus_s = vcpus.to_string();
    let ends = Ends::start(
        name,
        &["--memory", mem, "--vcpus", &vcpus_s, "--workload", workload],
        Duration::from_millis(300),
        receiver_args,
    );
    let mut args = vec!["--verify"];
    args.extend_from_slice(extra);
    let (ok, report, err) = ends.migrate(&args);
    assert!(
        ok,
        "migration failed: {err}\ndestination: {}",
        ends.dst.stderr_text()
    );
    let ram_pages = parse_mem(mem) / 4096;
    assert_eq!(report["mismatched_pages"], json!(0), "{report}");
    assert_eq!(
        report["pages_verified"],
        json!(ram_pages),
        "every page of RAM is checked: {report}"
    );
    assert_eq!(report["guest_verified"], json!(true), "{report}");
    // The source process ends: its guest lives on the destination now.
    let Ends {
        dir,
        src,
        dst,
        before,
        ..
    } = ends;
    let (code, _, err) = src.quit();
    assert_eq!(code, 0, "source: {err}");
    assert_guest_lives_on(&dst, vcpus, &before);
    drop(dst);
    let _ = std::fs::remove_dir_all(dir);
    (report, before)
}

/// The source guest runs on, unpaused, with all its memory and FPU intact.
pub fn assert_source_unharmed(src: &VmmProcess) {
    let s0 = src.state();
    assert_eq!(s0["paused"], json!(false), "source left paused");
    assert_eq!(s0["throttle_pct"], json!(0), "source left throttled");
    std::thread::sleep(Duration::from_millis(300));
    let s1 = src.state();
    assert!(
        heartbeat_field(&s1, "count")[0] > heartbeat_field(&s0, "count")[0] + 50,
        "source guest stopped"
    );
    assert!(
        per_vcpu(&s1, "ticks")[0] > per_vcpu(&s0, "ticks")[0],
        "source timer stopped"
    );
    assert!(
        per_vcpu(&s1, "pages_written")[0] > per_vcpu(&s0, "pages_written")[0],
        "workload stopped"
    );
    assert_eq!(heartbeat_field(&s1, "discontinuities")[0], 0);
    let v = src.call(json!({"cmd": "verify"}));
    assert_eq!(
        (v["pages_bad"].as_u64(), v["fpu_errors"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    // And it can still migrate afterwards.
    let st = src.call(json!({"cmd": "migration_status"}));
    assert_eq!(st["running"], json!(false));
}
