//! `vmm run`: boot or restore a machine, print what the guest does, serve
//! the control socket, and stop on request, on a guest stop or after
//! `--duration`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::api::{error_chain, Controller};
use vmm::config::{parse_size, MachineConfig, Workload};
use vmm::{Machine, RunOptions};

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
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Workload: wset=SIZE,rate=PAGES/S,fill=PCT,read=PAGES/S,readset=SIZE,
    /// cpu=PCT,pattern=seq|random,bpc=N,period=MS,hb_us=US,timer_hz=HZ.
    #[arg(long, default_value = "", value_parser = parse_workload_arg)]
    workload: Workload,
    /// Restore this snapshot file instead of booting.
    #[arg(long)]
    restore: Option<PathBuf>,
    #[command(flatten)]
    after: AfterStart,
}

/// What to do once a machine runs (shared by `run` and `receive`).
#[derive(clap::Args, Debug)]
pub struct AfterStart {
    /// Serve the JSON control socket here.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
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
    serve_and_loop(&ctl, &args.after)
}

/// Serves the control socket (if asked) and runs the main loop.
pub fn serve_and_loop(ctl: &Arc<Controller>, after: &AfterStart) -> Result<(), String> {
    if let Some(path) = &after.api_socket {
        ctl.serve(path)
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    }
    main_loop(ctl, after)
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

fn main_loop(ctl: &Arc<Controller>, args: &AfterStart) -> Result<(), String> {
    let started = Instant::now();
    let mut next_status = Instant::now();
    loop {
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
                " | cpu{i} hb={} ticks={} wr={} rd={} fpu={}/{} gap={:.1}ms",
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
