//! `vmm run`: boot or restore a machine, print what the guest does, serve
//! the control socket, and stop on request, on SIGTERM or SIGINT, on a
//! guest stop or after `--duration`.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_images::abi;
use vmm::api::{error_chain, Controller};
use vmm::config::{parse_size, MachineConfig, Workload};
use vmm::control_socket::SocketFile;
use vmm::{Machine, RunOptions};

use crate::signals::Termination;

/// Arguments of `vmm run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Embedded guest name (see `vmm guests`) or path to a guest ELF.
    #[arg(long, default_value = "workload")]
    guest: String,
    /// Guest RAM, e.g. 256M or 8G.
    #[arg(long, default_value = "256M", value_parser = parse_size_arg)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=abi::MAX_VCPUS as i64))]
    vcpus: u8,
    /// Workload: wset=SIZE,rate=PAGES/S,fill=PCT,read=PAGES/S,readset=SIZE,
    /// cpu=PCT,pattern=seq|random,bpc=N,period=MS,hb_us=US,timer_hz=HZ.
    #[arg(long, default_value = "", value_parser = parse_workload_arg)]
    workload: Workload,
    /// Restore this snapshot file instead of booting. The snapshot holds
    /// the machine's guest, RAM, vCPUs and workload, so none may be given.
    #[arg(long, conflicts_with_all = ["guest", "memory", "vcpus", "workload"])]
    restore: Option<PathBuf>,
    #[command(flatten)]
    after: AfterStart,
}

/// What to do once a machine runs (shared by `run` and `receive`).
#[derive(clap::Args, Debug)]
pub struct AfterStart {
    /// Serve the JSON control socket here (mode 0600; refused if a file or
    /// a live socket is there already).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Remove a stale control socket left at --api-socket by a vmm that is
    /// gone (a live one is never removed).
    #[arg(long, requires = "api_socket")]
    pub force: bool,
    /// Stop after this many seconds (default: run until `quit`).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Print a status line this often (ms; 0 = never).
    #[arg(long, default_value_t = 1000)]
    pub status_ms: u64,
    /// Echo the guest's serial console to stderr.
    #[arg(long)]
    pub console: bool,
    /// Print status lines (and reports) as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_workload_arg(s: &str) -> Result<Workload, String> {
    Workload::parse(s).map_err(|e| e.to_string())
}

/// Boots or restores, then runs the main loop.
pub fn run(args: RunArgs) -> Result<(), String> {
    let started = Instant::now();
    // The main loop notices the signal within one of its 20 ms turns.
    let termination = Termination::install(|_| {}).map_err(|e| error_chain(&e))?;
    // Before booting: a socket in the way should not cost a boot.
    let socket = bind_api_socket(&args.after)?;
    let opts = RunOptions {
        echo_console: args.after.console,
    };
    let machine = match &args.restore {
        Some(path) => {
            let (state, ram) = vmm::snapshot::load(path).map_err(|e| error_chain(&e))?;
            let m = Machine::restore(&state, ram, &opts).map_err(|e| error_chain(&e))?;
            m.resume();
            m
        }
        None => {
            let config = MachineConfig {
                mem_bytes: args.memory,
                vcpus: args.vcpus,
                guest: args.guest.clone(),
                workload: args.workload.clone(),
            };
            Machine::boot(config, &opts).map_err(|e| error_chain(&e))?
        }
    };
    let ctl = Controller::new(machine, opts);
    report_first_heartbeat(&ctl, started);
    // Dropped when this returns: the socket file goes with the process.
    let _file = match socket {
        Some((listener, file)) => {
            vmm::api::serve(listener, ctl.clone())
                .map_err(|e| format!("control socket {}: {e}", file.path().display()))?;
            Some(file)
        }
        None => None,
    };
    main_loop(&ctl, &args.after, &termination)
}

/// Creates the control socket `--api-socket` asks for, if any.
pub fn bind_api_socket(after: &AfterStart) -> Result<Option<(UnixListener, SocketFile)>, String> {
    after
        .api_socket
        .as_deref()
        .map(|path| vmm::control_socket::bind(path, after.force).map_err(|e| error_chain(&e)))
        .transpose()
}

/// Prints how long it took from process start to the first heartbeat.
fn report_first_heartbeat(ctl: &Arc<Controller>, started: Instant) {
    let got = ctl.with(|m| {
        m.devices()
            .probe
            .wait_until(Duration::from_secs(30), |_, hb| {
                hb.iter().any(|h| h.count > 0)
            })
    });
    if got {
        eprintln!(
            "first heartbeat {:.1} ms after process start",
            started.elapsed().as_secs_f64() * 1e3
        );
    } else {
        eprintln!("no heartbeat within 30 s of process start");
    }
}

/// Runs until `quit`, a signal, a migration away, a guest stop or
/// `--duration`, printing status lines.
pub fn main_loop(
    ctl: &Arc<Controller>,
    args: &AfterStart,
    termination: &Termination,
) -> Result<(), String> {
    let started = Instant::now();
    let mut next_status = Instant::now();
    loop {
        if termination.received().is_some() {
            return Ok(());
        }
        if ctl.quit_requested() || ctl.migrated_away() {
            if let Some(Ok(_)) = ctl.migration_result() {
                eprintln!("migrated away: the guest runs on the destination now");
            }
            return Ok(());
        }
        if let Some(reason) = ctl.with(|m| m.stop_reason()) {
            return Err(format!("machine stopped: {reason:?}"));
        }
        if args
            .duration
            .is_some_and(|d| started.elapsed().as_secs_f64() >= d)
        {
            return Ok(());
        }
        if args.status_ms > 0 && Instant::now() >= next_status {
            print_status(ctl, args.json);
            next_status += Duration::from_millis(args.status_ms);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn print_status(ctl: &Arc<Controller>, json: bool) {
    let line = ctl.with(|m| {
        if json {
            return vmm::api::state_json(m).map(|v| v.to_string());
        }
        let status = m.guest_status().map_err(|e| error_chain(&e))?;
        let hb = m.devices().probe.heartbeats();
        let mut s = format!("t={:>7.1}s", m.uptime().as_secs_f64());
        for (i, (st, h)) in status.iter().zip(&hb).enumerate() {
            s.push_str(&format!(
                " | cpu{i} {} hb={} ticks={} wr={} rd={} fpu={}/{} gap={:.1}ms",
                phase_name(st.phase),
                h.count,
                st.ticks,
                st.pages_written,
                st.pages_read,
                st.fpu_checks,
                st.fpu_errors,
                h.max_gap_ns as f64 / 1e6
            ));
        }
        if m.is_paused() {
            s.push_str(" [paused]");
        }
        Ok(s)
    });
    match line {
        Ok(l) => println!("{l}"),
        Err(e) => eprintln!("status: {e}"),
    }
}

/// The name of a guest vCPU phase (`abi::phase`), for people.
pub fn phase_name(phase: u64) -> &'static str {
    match phase {
        abi::phase::BOOTING => "booting",
        abi::phase::FILLING => "filling",
        abi::phase::RUNNING => "running",
        abi::phase::HALTED => "halted",
        _ => "unknown-phase",
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        run: super::RunArgs,
    }

    fn parse_error(args: &[&str]) -> String {
        let argv = std::iter::once("vmm-run").chain(args.iter().copied());
        Cli::try_parse_from(argv).expect_err("refused").to_string()
    }

    #[test]
    fn vcpus_range_is_the_guest_s() {
        let e = parse_error(&["--vcpus", "1000"]);
        assert!(e.contains("1..=16"), "{e}");
        assert!(parse_error(&["--vcpus", "0"]).contains("1..=16"));
        assert!(Cli::try_parse_from(["vmm-run", "--vcpus", "16"]).is_ok());
    }

    #[test]
    fn restore_refuses_machine_options() {
        for opt in [
            ["--memory", "1G"],
            ["--vcpus", "2"],
            ["--workload", "rate=1"],
        ] {
            let e = parse_error(&["--restore", "/tmp/x.snap", opt[0], opt[1]]);
            assert!(e.contains("cannot be used with"), "{opt:?}: {e}");
        }
        assert!(Cli::try_parse_from(["vmm-run", "--restore", "/tmp/x.snap"]).is_ok());
    }

    #[test]
    fn force_needs_a_socket() {
        assert!(parse_error(&["--force"]).contains("--api-socket"));
    }
}
