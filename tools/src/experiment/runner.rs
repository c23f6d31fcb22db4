//! Runs one cell with real processes, as the end-to-end tests do: a `vmm
//! run` source, a `vmm receive` destination (inside a network namespace for
//! a tbf link), and `vmm migrate --json`, whose last line is the report.
//!
//! Every child is started with `PR_SET_PDEATHSIG`, so that killing `vmm
//! experiment` (to stop it, to resume later) takes its guests with it;
//! the namespace and veth pair have names derived from the output
//! directory, so that a resumed run removes what a killed one left.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::setup::{Link, Setup};

/// Where a run works, and how long it may take.
pub struct Runner {
    /// The `vmm` binary (this one).
    pub vmm: PathBuf,
    /// Scratch directory of the run (sockets, secret, logs).
    pub work: PathBuf,
    /// Namespace and interface names stem from this.
    pub net_id: u32,
    pub settle: Duration,
    pub timeout: Duration,
    /// Asked to stop (SIGINT, SIGTERM): every wait gives up, the guards
    /// end the processes and the link goes.
    pub interrupted: Box<dyn Fn() -> bool>,
}

/// A child process killed (and reaped) on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Runner {
    /// Runs one migration of `setup`; the report, or why there is none.
    pub fn run(&self, setup: &Setup) -> Result<Value, String> {
        let _ = std::fs::remove_dir_all(&self.work);
        std::fs::create_dir_all(&self.work)
            .map_err(|e| format!("creating {}: {e}", self.work.display()))?;
        let secret = crate::migrate::private_secret(&self.work.join("private"))?;
        let net = match &setup.link {
            Link::Loopback => None,
            Link::Tbf { rate, .. } => Some(Netns::create(self.net_id, rate)?),
        };
        let src_sock = self.work.join("src.sock");
        let mut run = vec!["run".to_string()];
        run.extend(setup.run_args.iter().cloned());
        run.extend(["--status-ms".into(), "0".into(), "--api-socket".into()]);
        run.push(src_sock.display().to_string());
        let _src = Guard(self.spawn(None, &run, "src")?);
        self.wait_running(&src_sock, Duration::from_secs(60))?;
        let settled = Instant::now() + self.settle;
        while Instant::now() < settled {
            self.check_interrupted()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        let listen = match &net {
            Some(n) => format!("tcp:{}:7431", n.peer_ip),
            None => format!("tcp:127.0.0.1:{}", free_port()?),
        };
        let mut receive = vec!["receive", "--listen", &listen, "--status-ms", "0"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        receive.extend(["--secret".into(), secret.display().to_string()]);
        receive.extend([
            "--api-socket".into(),
            self.work.join("dst.sock").display().to_string(),
        ]);
        receive.extend(setup.receive_args.iter().cloned());
        let _dst = Guard(self.spawn(net.as_ref().map(|n| n.ns.as_str()), &receive, "dst")?);
        self.wait_log("dst", "listening on", Duration::from_secs(10))?;
        let mut migrate = vec![
            "migrate".to_string(),
            "--json".into(),
            "--api-socket".into(),
        ];
        migrate.push(src_sock.display().to_string());
        migrate.extend(["--to".into(), listen.clone(), "--secret".into()]);
        migrate.push(secret.display().to_string());
        migrate.extend(setup.migrate_args.iter().cloned());
        self.migrate(&migrate)
    }

    /// `vmm ARGS` (inside `netns` if given), stdout and stderr to files.
    fn spawn(&self, netns: Option<&str>, args: &[String], name: &str) -> Result<Child, String> {
        let log = |ext: &str| {
            let p = self.work.join(format!("{name}.{ext}"));
            File::create(&p).map_err(|e| format!("creating {}: {e}", p.display()))
        };
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.vmm);
                c
            }
            None => Command::new(&self.vmm),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log("out")?)
            .stderr(log("err")?);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // only the child's own process attributes between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
            .map_err(|e| format!("starting vmm {}: {e}", args.join(" ")))
    }

    fn log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.work.join(name)).unwrap_or_default()
    }

    /// Waits until the `name` process's stderr shows `what`.
    fn wait_log(&self, name: &str, what: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.log_text(&format!("{name}.err")).contains(what) {
            self.check_interrupted()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} never said '{what}': {}",
                    last_lines(&self.log_text(&format!("{name}.err")))
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Runs `vmm migrate`; its report, or its error.
    fn migrate(&self, args: &[String]) -> Result<Value, String> {
        let mut child = Guard(self.spawn(None, args, "migrate")?);
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.0.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() > deadline => {
                    return Err(format!("timed out after {} s", self.timeout.as_secs()));
                }
                Ok(None) => {
                    self.check_interrupted()?;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("waiting for vmm migrate: {e}")),
            }
        };
        if !status.success() {
            return Err(last_lines(&self.log_text("migrate.err")));
        }
        let out = self.log_text("migrate.out");
        out.lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| "vmm migrate printed no JSON report".to_string())
    }
}

/// What a log says went wrong: its last `error:` line, or else its last
/// lines that say something.
fn last_lines(text: &str) -> String {
    if let Some(e) = text.lines().rev().find(|l| l.starts_with("error:")) {
        return e.trim_start_matches("error:").trim().to_string();
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

impl Runner {
    fn check_interrupted(&self) -> Result<(), String> {
        if (self.interrupted)() {
            return Err("interrupted".into());
        }
        Ok(())
    }

    /// Waits until the source's control socket answers and every vCPU runs.
    fn wait_running(&self, sock: &Path, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let running = json!(guest_images::abi::phase::RUNNING);
        loop {
            if let Ok(s) = vmm::api::call(sock, &json!({"cmd": "state"})) {
                let vcpus = s["vcpus"].as_array();
                if vcpus.is_some_and(|v| !v.is_empty() && v.iter().all(|c| c["phase"] == running)) {
                    return Ok(());
                }
            }
            self.check_interrupted()?;
            if Instant::now() > deadline {
                return Err("the source guest never ran".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A namespace joined to the host by a veth pair whose host end (the
/// direction the pages travel) is shaped by tbf; removed on drop.
pub struct Netns {
    ns: String,
    host_if: String,
    peer_ip: String,
}

fn run_tool(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{tool} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

impl Netns {
    /// Builds it (removing a leftover of the same name first).
    /// The namespace's name for experiment id `id`.
    pub fn name(id: u32) -> String {
        format!("vmmexp{}", id % 10_000)
    }

    pub fn create(id: u32, rate: &str) -> Result<Self, String> {
        let id = id % 10_000;
        let (ns, host_if, ns_if) = (Self::name(id), format!("vxh{id}"), format!("vxn{id}"));
        let subnet = id % 250;
        let (host_ip, peer_ip) = (format!("10.232.{subnet}.1"), format!("10.232.{subnet}.2"));
        let _ = run_tool("ip", &["link", "del", &host_if]);
        let _ = run_tool("ip", &["netns", "del", &ns]);
        let net = Self {
            ns: ns.clone(),
            host_if: host_if.clone(),
            peer_ip: peer_ip.clone(),
        };
        run_tool("ip", &["netns", "add", &ns])?;
        run_tool(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ],
        )?;
        run_tool("ip", &["link", "set", &ns_if, "netns", &ns])?;
        run_tool(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &host_if],
        )?;
        run_tool("ip", &["link", "set", &host_if, "up"])?;
        let peer = format!("{peer_ip}/30");
        run_tool("ip", &["-n", &ns, "addr", "add", &peer, "dev", &ns_if])?;
        run_tool("ip", &["-n", &ns, "link", "set", &ns_if, "up"])?;
        run_tool("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run_tool(
            "tc",
            &[
                "qdisc", "add", "dev", &host_if, "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "50ms",
            ],
        )?;
        Ok(net)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_tool("ip", &["link", "del", &self.host_if]);
        let _ = run_tool("ip", &["netns", "del", &self.ns]);
    }
}
