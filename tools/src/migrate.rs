//! `vmm migrate` and `vmm demo`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::api::call;
use vmm::config::parse_size;

/// Arguments of `vmm migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Control socket of the source vmm.
    #[arg(long)]
    api_socket: PathBuf,
    /// Destination: tcp:HOST:PORT.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    protection: crate::protection::ProtectionArgs,
    /// Migration mode: pre, post, hybrid (pre-copy a share, post-copy the
    /// rest), or auto (measure r, w and μ; the model chooses).
    #[arg(long, default_value = "pre", value_parser = ["pre", "post", "hybrid", "auto"])]
    mode: String,
    /// Measure r, w and μ first and report the model's prediction beside
    /// the measurement (implied by auto and by hybrid without --precopy).
    #[arg(long)]
    predict: bool,
    /// Auto: the migration must end within this time (e.g. 5s).
    #[arg(long, value_parser = parse_duration_ms)]
    deadline: Option<f64>,
    /// Hybrid: how much memory to pre-copy (V1), e.g. 256M. Default: the
    /// seed-001 split V·w/(r+w) from the rates measured on the guest.
    #[arg(long, value_parser = parse_size_arg)]
    precopy: Option<u64>,
    /// Hybrid: pre-copy stops once a round dirtied at most this (l), e.g. 8M.
    #[arg(long, value_parser = parse_size_arg)]
    threshold: Option<u64>,
    /// Switch over once the predicted downtime is below this (e.g. 50ms, 1s).
    #[arg(long, value_parser = parse_duration_ms)]
    max_downtime: Option<f64>,
    /// Switch over after this many rounds at the latest.
    #[arg(long)]
    max_rounds: Option<u32>,
    /// The hard bound on the pause: until the destination confirms, a
    /// pause longer than the downtime limit plus this (e.g. 3s) aborts the
    /// migration and resumes the source guest.
    #[arg(long, value_parser = parse_duration_ms)]
    pause_margin: Option<f64>,
    /// Switch over once this much was sent (e.g. 4G).
    #[arg(long, value_parser = parse_size_arg)]
    max_bytes: Option<u64>,
    /// Cap the link (e.g. 1Gbit, 100Mbit, 50M bytes/s).
    #[arg(long)]
    bandwidth: Option<String>,
    /// Page compression: none, lz4 or auto.
    #[arg(long, default_value = "auto")]
    compression: String,
    /// Checksum every page on both sides and have the guest verify itself.
    #[arg(long)]
    verify: bool,
    /// Pre-copy: throttle the vCPUs (20 %, then 10 points more every two
    /// rounds, as QEMU) while the guest dirties more than half of what a
    /// round sends.
    #[arg(long)]
    auto_converge: bool,
    /// Pre-copy: skip pages the guest dirtied again since the round began
    /// (they go with the next round), as Xen does; the dirty log is read
    /// every 4 MiB sent to find them.
    #[arg(long)]
    skip_redirtied: bool,
    /// Let an external program decide instead of the built-in policy:
    /// exec:PROGRAM (e.g. exec:tools/policies/precopy_then_postcopy.py).
    /// It runs in the source vmm and answers each decision as a JSON line
    /// (see the README); --mode and the policy flags are then refused.
    #[arg(long, value_parser = parse_policy)]
    policy: Option<String>,
    /// How long the external policy may take to answer (e.g. 2s).
    #[arg(long, value_parser = parse_duration_ms, requires = "policy")]
    policy_deadline: Option<f64>,
    /// Open post-copy's fault connection up front, so that `vmm ctl
    /// migrate-start-postcopy` can switch a running pre-copy to post-copy.
    #[arg(long)]
    postcopy_ready: bool,
    /// When max-rounds or max-bytes ends pre-copy with a predicted downtime
    /// over --max-downtime: fail (the source runs on; the default),
    /// postcopy (finish in post-copy) or accept (take the long pause).
    #[arg(long, default_value = "fail", value_parser = ["fail", "postcopy", "accept"])]
    on_overrun: String,
    /// How long to wait for the destination's answers at the switch-over
    /// (Prepared, then Resumed after Commit), e.g. 30s. Past it, before
    /// Commit the guest resumes here; after it, this side asks the
    /// destination what it did, and never guesses.
    #[arg(long, value_parser = parse_duration_ms)]
    commit_timeout: Option<f64>,
    /// Do not migrate: ask the destination what became of a guest a
    /// previous migration left fenced here ("outcome unknown"), and act on
    /// the answer (shut this copy down, or resume it).
    #[arg(long)]
    recover: bool,
    /// Print the report as JSON on the last line.
    #[arg(long)]
    json: bool,
}

/// Exit code of `vmm migrate` when the outcome of the switch-over is
/// unknown: the guest is paused on the source, and may run on the
/// destination.
pub const OUTCOME_UNKNOWN_EXIT: i32 = 4;

/// `exec:PROGRAM` with PROGRAM made absolute: the source vmm, which runs
/// it, has a working directory of its own.
fn parse_policy(s: &str) -> Result<String, String> {
    let program = s
        .strip_prefix("exec:")
        .ok_or_else(|| format!("unknown policy '{s}' (exec:PROGRAM)"))?;
    let path = std::fs::canonicalize(program).map_err(|e| format!("{program}: {e}"))?;
    Ok(format!("exec:{}", path.display()))
}

/// Refuses the flags whose decisions an external policy takes.
fn check_policy_flags(args: &MigrateArgs) -> Result<(), String> {
    if args.policy.is_none() {
        return Ok(());
    }
    let taken = [
        ("--mode", args.mode != "pre"),
        ("--predict", args.predict),
        ("--deadline", args.deadline.is_some()),
        ("--precopy", args.precopy.is_some()),
        ("--threshold", args.threshold.is_some()),
        ("--auto-converge", args.auto_converge),
        ("--skip-redirtied", args.skip_redirtied),
        ("--on-overrun", args.on_overrun != "fail"),
    ];
    match taken.iter().find(|(_, given)| *given) {
        Some((flag, _)) => Err(format!(
            "{flag} is a decision of the built-in policy; with --policy the program decides"
        )),
        None => Ok(()),
    }
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Parses `50ms`, `1.5s` or a plain number of milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (v, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1e3)
    } else {
        (t, 1.0)
    };
    match v.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x * mult),
        _ => Err(format!("bad duration '{s}' (e.g. 50ms, 1s)")),
    }
}

/// What a round did besides sending pages: throttling, skipped pages.
fn round_extras(round: &Value) -> String {
    let mut out = String::new();
    if let Some(p) = round["throttle_pct"].as_u64().filter(|p| *p > 0) {
        out += &format!(", vCPUs throttled {p} %");
    }
    if let Some(n) = round["skipped_pages"].as_u64().filter(|n| *n > 0) {
        out += &format!(", {n} re-dirtied skipped");
    }
    out
}

/// `vmm migrate` from the command line: SIGINT or SIGTERM cancels the
/// migration it started (the source guest runs on) instead of leaving it
/// to go on without anyone watching; a second signal exits at once.
pub fn migrate_cancelling_on_signal(args: MigrateArgs) -> Result<(), String> {
    let sock = args.api_socket.clone();
    let signalled =
        crate::signals::Termination::install_saying("cancelling the migration…", move |_| {
            cancel_on_signal(&sock)
        })
        .map_err(|e| vmm::api::error_chain(&e))?;
    migrate_unless(args, || signalled.received().is_some())
}

/// Asks the source to cancel; the progress loop prints the outcome.
fn cancel_on_signal(sock: &std::path::Path) {
    match call(sock, &json!({"cmd": "migrate_cancel"})) {
        Ok(r) if r["ok"] == json!(true) => {}
        Ok(r) => eprintln!(
            "cannot cancel: {}",
            r["error"].as_str().unwrap_or("refused")
        ),
        Err(e) => eprintln!("cannot cancel: control socket {}: {e}", sock.display()),
    }
}

/// Asks a running vmm to migrate, shows progress, prints the report.
pub fn migrate(args: MigrateArgs) -> Result<(), String> {
    migrate_unless(args, || false)
}

/// [`migrate`], unless `interrupted` before the request is sent (a cancel
/// sent before the migration began would find nothing to cancel).
fn migrate_unless(args: MigrateArgs, interrupted: impl Fn() -> bool) -> Result<(), String> {
    if args.recover {
        return recover(&args);
    }
    check_policy_flags(&args)?;
    args.protection.warn();
    let mut req = json!({
        "cmd": "migrate",
        "to": args.to,
        "max_downtime_ms": args.max_downtime,
        "max_rounds": args.max_rounds,
        "pause_margin_ms": args.pause_margin,
        "max_bytes": args.max_bytes,
        "bandwidth": args.bandwidth,
        "compression": args.compression,
        "verify": args.verify,
        "mode": args.mode,
        "precopy_bytes": args.precopy,
        "threshold": args.threshold,
        "deadline_ms": args.deadline,
        "predict": args.predict,
        "auto_converge": args.auto_converge,
        "skip_redirtied": args.skip_redirtied,
        "on_overrun": args.on_overrun,
        "policy": args.policy,
        "policy_deadline_ms": args.policy_deadline.map(|ms| ms.ceil() as u64),
        "postcopy_ready": args.postcopy_ready,
        "commit_timeout_ms": args.commit_timeout.map(|ms| ms.ceil() as u64),
    });
    for (k, v) in args.protection.to_json().as_object().into_iter().flatten() {
        req[k] = v.clone();
    }
    let sock = &args.api_socket;
    if interrupted() {
        return Err("interrupted before the migration started".into());
    }
    let resp = call(sock, &req).map_err(|e| format!("control socket {}: {e}", sock.display()))?;
    if resp["ok"] != json!(true) {
        return Err(resp["error"]
            .as_str()
            .unwrap_or("migrate refused")
            .to_string());
    }
    let mut shown = ProgressView::new(std::io::stderr().is_terminal());
    let status = loop {
        let st = call(sock, &json!({"cmd": "migration_status"}))
            .map_err(|e| format!("control socket {}: {e}", sock.display()))?;
        shown.show(&st["progress"]);
        if st["running"] == json!(false) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    shown.finish();
    if status["state"] == json!("outcome-unknown") {
        let err = status["failure"].as_str().unwrap_or("outcome unknown");
        eprintln!("error: migration committed, {err}");
        std::process::exit(OUTCOME_UNKNOWN_EXIT);
    }
    if status["state"] == json!("cancelled") {
        return Err("migration cancelled before the switch-over: the guest keeps running on the source as before".into());
    }
    if let Some(err) = status["failure"].as_str() {
        return Err(format!(
            "migration failed, the guest keeps running on the source: {err}"
        ));
    }
    let report = &status["report"];
    print_report(report);
    if args.json {
        println!("{report}");
    }
    Ok(())
}

/// `vmm migrate --recover`: asks the destination, through the source,
/// what became of a fenced guest; exits with [`OUTCOME_UNKNOWN_EXIT`] if
/// it still cannot tell.
fn recover(args: &MigrateArgs) -> Result<(), String> {
    let sock = &args.api_socket;
    let mut req = json!({"cmd": "migrate_recover", "to": args.to});
    for (k, v) in args.protection.to_json().as_object().into_iter().flatten() {
        req[k] = v.clone();
    }
    let resp = call(sock, &req).map_err(|e| format!("control socket {}: {e}", sock.display()))?;
    if resp["ok"] != json!(true) {
        let err = resp["error"].as_str().unwrap_or("recover refused");
        if !err.contains("outcome still unknown") {
            return Err(err.to_string());
        }
        eprintln!("error: {err}");
        std::process::exit(OUTCOME_UNKNOWN_EXIT);
    }
    eprintln!(
        "destination: {}; {}",
        resp["outcome"].as_str().unwrap_or("?"),
        resp["action"].as_str().unwrap_or("")
    );
    if args.json {
        println!("{resp}");
    }
    Ok(())
}

/// How `vmm migrate` shows progress: a bar on a terminal; elsewhere (a log,
/// a pipe) a line every [`ProgressView::LINE_EVERY`], so that a long
/// migration never looks hung.
enum ProgressView {
    Bar(indicatif::ProgressBar),
    Lines { started: Instant, next: Instant },
}

impl ProgressView {
    const LINE_EVERY: Duration = Duration::from_secs(2);

    fn new(terminal: bool) -> Self {
        if !terminal {
            let now = Instant::now();
            return Self::Lines {
                started: now,
                next: now + Self::LINE_EVERY,
            };
        }
        let b = indicatif::ProgressBar::new(0);
        b.set_style(Self::style(false));
        Self::Bar(b)
    }

    /// The bar's look: with pages to count, a bar; before (no page count
    /// yet), the phase alone, since an empty bar is drawn full as 0/0.
    fn style(counting: bool) -> indicatif::ProgressStyle {
        let template = if counting {
            "{msg:>28} [{bar:40}] {pos}/{len} pages"
        } else {
            "{msg:>28}"
        };
        indicatif::ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> ")
    }

    /// Shows one `progress` snapshot of `migration_status`.
    fn show(&mut self, p: &Value) {
        let (sent, total) = (
            p["round_pages_sent"].as_u64().unwrap_or(0),
            p["round_pages_total"].as_u64().unwrap_or(0),
        );
        let phase = p["phase"].as_str().unwrap_or("starting");
        let what = if total == 0 {
            phase.to_string()
        } else {
            format!("{phase} round {}", p["round"])
        };
        match self {
            Self::Bar(b) => {
                if (total > 0) != (b.length() > Some(0)) {
                    b.set_style(Self::style(total > 0));
                }
                // Length and position of the same snapshot, set in one
                // update: set one by one, a redraw between them showed the
                // new round's position against the old round's length.
                b.update(|s| {
                    s.set_len(total);
                    s.set_pos(sent);
                });
                b.set_message(what);
            }
            Self::Lines { started, next } => {
                if Instant::now() < *next {
                    return;
                }
                *next += Self::LINE_EVERY;
                let pages = if total == 0 {
                    String::new()
                } else {
                    format!(": {sent}/{total} pages")
                };
                eprintln!(
                    "{:>6.1} s  {what}{pages}, {:.1} MB sent",
                    started.elapsed().as_secs_f64(),
                    p["bytes_wire"].as_f64().unwrap_or(0.0) / 1e6
                );
            }
        }
    }

    fn finish(self) {
        if let Self::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

/// A human summary of a report.
pub fn print_report(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let b = &r["downtime_breakdown"];
    let g = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "migrated ({}): total {:.1} ms, downtime {:.2} ms (pause {:.2}, last round {:.2}, state save {:.2}, transfer {:.2}, restore {:.2}, post-copy setup {:.2}, resume {:.2}), guest saw {:.2} ms",
        r["mode"].as_str().unwrap_or("?"),
        f("total_time_ms"),
        f("downtime_ms"),
        g("pause_ms"),
        g("last_round_ms"),
        g("state_save_ms"),
        g("state_transfer_ms"),
        g("restore_ms"),
        g("postcopy_setup_ms"),
        g("resume_ms"),
        f("guest_downtime_ms"),
    );
    if g("verify_ms") > 0.0 {
        println!(
            "  --verify kept the guest paused {:.2} ms more for its checksums (downtime with them {:.2} ms; the guest's figure includes them)",
            g("verify_ms"),
            f("downtime_with_verify_ms")
        );
    }
    for round in r["rounds"].as_array().into_iter().flatten() {
        println!(
            "  round {:>2}{}: {:>8} pages {:>11} bytes {:>8.1} ms, dirtied {:>7} ({:.0} pages/s){}",
            round["round"],
            if round["paused"] == json!(true) {
                " (paused)"
            } else {
                ""
            },
            round["pages"],
            round["bytes"],
            round["duration_ms"].as_f64().unwrap_or(0.0),
            round["dirtied_pages"],
            round["dirty_rate_pages_s"].as_f64().unwrap_or(0.0),
            round_extras(round)
        );
    }
    let o = &r["downtime_overrun"];
    if o.is_object() {
        println!(
            "  WARNING: {} ended pre-copy with a predicted downtime of {:.0} ms, over the {:.0} ms limit: {}",
            r["stop_rule"].as_str().unwrap_or("?"),
            o["predicted_ms"].as_f64().unwrap_or(f64::NAN),
            o["limit_ms"].as_f64().unwrap_or(f64::NAN),
            if o["action"] == "post-copy" {
                "switched to post-copy instead (--on-overrun postcopy)"
            } else {
                "stopped and copied anyway (--on-overrun accept)"
            }
        );
    }
    if let Some(line) = round0_throughput(r) {
        println!("  {line}");
    }
    let pc = &r["postcopy"];
    if pc.is_object() {
        let f = |k: &str| pc[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  post-copy: {} demand faults (latency p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs), pushed {} pages / pulled {}, last page {:.1} ms after resume, longest guest stall {:.2} ms",
            pc["demand_faults"], f("fault_latency_p50_us"), f("fault_latency_p99_us"), f("fault_latency_max_us"),
            pc["pages_pushed"], pc["pages_pulled"], f("last_page_after_resume_ms"), f("longest_stall_ms")
        );
    }
    let pr = &r["prediction"];
    if pr.is_object() {
        let m = &pr["measured"];
        println!(
            "  measured r = {:.0} pages/s, w = {:.0} pages/s; {}",
            m["read_pages_s"].as_f64().unwrap_or(0.0),
            m["write_pages_s"].as_f64().unwrap_or(0.0),
            pr["why"].as_str().unwrap_or("")
        );
        for p in pr["predictions"].as_array().into_iter().flatten() {
            println!(
                "  model {:>6}: Tm {:>8.3} s, Td {:>8.4} s",
                p["mode"].as_str().unwrap_or("?"),
                p["tm_s"].as_f64().unwrap_or(f64::NAN),
                p["td_s"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    println!(
        "  stop rule: {}; bytes raw {} wire {}; {}",
        r["stop_rule"].as_str().unwrap_or("?"),
        r["bytes_raw"],
        r["bytes_wire"],
        verification(r)
    );
}

/// Round 0's throughput (what the link and both ends sustain while the
/// guest runs), if the migration had a round 0.
fn round0_throughput(r: &Value) -> Option<String> {
    let round = r["rounds"].as_array()?.first()?;
    let (bytes, ms) = (round["bytes"].as_f64()?, round["duration_ms"].as_f64()?);
    (ms > 0.0).then(|| {
        format!(
            "round 0 throughput: {:.0} MB/s ({:.1} MB on the wire in {ms:.1} ms)",
            bytes / ms / 1e3,
            bytes / 1e6
        )
    })
}

/// Arguments of `vmm demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    memory: String,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// The guest's workload.
    #[arg(long, default_value = "wset=256M,rate=20000,read=20000,fill=50")]
    workload: String,
    /// Let an external program decide instead of the built-in policy:
    /// exec:PROGRAM (e.g. exec:tools/policies/precopy_then_postcopy.py).
    /// It runs in the source vmm and answers each decision as a JSON line
    /// (see the README); --mode and the policy flags are then refused.
    #[arg(long, value_parser = parse_policy)]
    policy: Option<String>,
    /// How long the external policy may take to answer (e.g. 2s).
    #[arg(long, value_parser = parse_duration_ms, requires = "policy")]
    policy_deadline: Option<f64>,
    /// Print the report as JSON on the last line.
    #[arg(long)]
    json: bool,
}

/// Boots a guest in one process, migrates it live to a second over
/// loopback TCP, and prints the report.
pub fn demo(args: DemoArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("vmm-demo-{}", std::process::id()));
    let secret = private_secret(&dir)?;
    let src_sock = dir.join("src.sock");
    let port = free_port()?;
    let addr = format!("tcp:127.0.0.1:{port}");
    let vcpus = args.vcpus.to_string();
    eprintln!(
        "booting the source: {} RAM, {} vCPUs, workload {}",
        args.memory, args.vcpus, args.workload
    );
    let mut src = Command::new(&exe)
        .args([
            "run",
            "--memory",
            &args.memory,
            "--vcpus",
            &vcpus,
            "--workload",
            &args.workload,
        ])
        .args(["--status-ms", "0", "--api-socket"])
        .arg(&src_sock)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut dst = Command::new(&exe)
        .args(["receive", "--once", "--listen", &addr, "--secret"])
        .arg(&secret)
        .args(["--status-ms", "0", "--duration", "2"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = (|| {
        wait_running(&src_sock)?;
        std::thread::sleep(Duration::from_millis(500));
        migrate(MigrateArgs {
            api_socket: src_sock.clone(),
            to: addr.clone(),
            protection: crate::protection::ProtectionArgs::with_secret(secret.clone()),
            mode: "pre".into(),
            precopy: None,
            threshold: None,
            deadline: None,
            predict: false,
            max_downtime: None,
            max_rounds: None,
            pause_margin: None,
            max_bytes: None,
            bandwidth: None,
            compression: "auto".into(),
            verify: true,
            auto_converge: false,
            skip_redirtied: false,
            on_overrun: "fail".into(),
            policy: None,
            policy_deadline: None,
            postcopy_ready: false,
            commit_timeout: None,
            recover: false,
            json: args.json,
        })
    })();
    let dst_status = dst.wait().map_err(|e| e.to_string())?;
    let _ = src.kill();
    let _ = src.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    if !dst_status.success() {
        return Err("the destination vmm failed after the migration".into());
    }
    Ok(())
}

/// A fresh random secret (32 bytes from the kernel's generator, hex) in
/// `dir/secret`: the directory is made 0700 and the file 0600 as they are
/// created, whatever the umask, so no other user can read it at any time.
pub fn private_secret(dir: &std::path::Path) -> Result<PathBuf, String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |what: &str| {
        let (what, dir) = (what.to_string(), dir.display().to_string());
        move |e: std::io::Error| format!("{what} {dir}: {e}")
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(fail("creating the private directory"))?;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(fail("reading /dev/urandom for the secret in"))?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("secret");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(hex.as_bytes()))
        .map_err(fail("writing the secret in"))?;
    Ok(path)
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Waits until the guest behind `sock` runs its workload on every vCPU.
pub fn wait_running(sock: &std::path::Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(st) = call(sock, &json!({"cmd": "state"})) {
            let running = st["vcpus"].as_array().is_some_and(|v| {
                v.iter()
                    .all(|c| c["phase"] == json!(guest_images::abi::phase::RUNNING))
            });
            if running {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("the source guest did not start its workload".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `--verify` found, or that it was not asked for (the guest's own
/// check runs exactly when it was).
fn verification(r: &Value) -> String {
    let guest = match r["guest_verified"].as_bool() {
        Some(true) => "passed",
        Some(false) => "FAILED",
        None => return "verification not asked (--verify)".into(),
    };
    format!(
        "pages verified {} mismatched {}; guest self-check {guest}",
        r["pages_verified"], r["mismatched_pages"]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_says_verification_was_not_asked() {
        let r = json!({"pages_verified": 0, "mismatched_pages": 0, "guest_verified": null});
        assert_eq!(verification(&r), "verification not asked (--verify)");
        let r = json!({"pages_verified": 5, "mismatched_pages": 0, "guest_verified": true});
        assert!(verification(&r).starts_with("pages verified 5 mismatched 0"));
    }
}
