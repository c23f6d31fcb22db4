//! `vmm`: run a tiny guest, control it, save and restore it.
//!
//! ```text
//! vmm run --guest workload --memory 1G --vcpus 2 \
//!         --workload wset=256M,rate=20000,read=50000,fill=100 [--api-socket PATH]
//! vmm run --restore FILE [--api-socket PATH]
//! vmm ctl --api-socket PATH pause|resume|state|verify|scan|quit|save FILE|restore FILE
//! vmm ctl --api-socket PATH migrate-cancel|migration-status|migrate-start-postcopy|events|
//!     migrate-set-parameters --max-downtime 50ms --bandwidth 1Gbit --max-rounds 5 --auto-converge true
//! vmm receive --listen tcp:ADDR --secret FILE | --tls-cert F --tls-key F --tls-ca F
//! vmm migrate --api-socket PATH --to tcp:ADDR --secret FILE --mode pre [--max-downtime 50ms ...]
//! vmm gen-certs DIR [--host NAME ...]
//! vmm demo
//! vmm experiment FILE [--out DIR] [--retry-failed] [--dry-run]
//! vmm plot FILE [--out DIR] [--x KEY --y FIGURE [--series KEY]]
//! vmm guests
//! ```

mod experiment;
mod migrate;
mod model;
mod protection;
mod receive;
mod run;
mod signals;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vmm",
    version,
    about = "A minimal KVM VMM for tiny test guests, and their live migration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest (or restore one from a snapshot file) and run it.
    Run(run::RunArgs),
    /// Send one command to a running vmm's control socket.
    Ctl {
        /// The control socket of the running vmm.
        #[arg(long)]
        api_socket: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Wait for an incoming live migration, then run the guest.
    Receive(receive::ReceiveArgs),
    /// Tell a running vmm to migrate its guest live to a receiving vmm.
    Migrate(migrate::MigrateArgs),
    /// Boot a guest and migrate it live to a second process on loopback.
    Demo(migrate::DemoArgs),
    /// Write a CA and certificates for both ends (TLS mode) into DIR.
    GenCerts(protection::GenCertsArgs),
    /// Predict Tm and Td with seed 001's analytical model.
    Model(model::ModelArgs),
    /// Run a declared experiment (TOML or JSON): every cell with real
    /// migrations, reports as JSON lines, a summary and pictures; resumable.
    Experiment(experiment::ExperimentArgs),
    /// Redraw an experiment's summary and pictures from its runs.
    Plot(experiment::PlotArgs),
    /// List the embedded guests.
    Guests,
}

#[derive(Subcommand, Debug)]
enum CtlAction {
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// Print the machine and guest state as JSON.
    State,
    /// Ask the guest to verify its memory and FPU registers.
    Verify,
    /// Check every working-set page from outside the guest.
    Scan,
    /// Measure the guest's read and write rates from the host.
    Measure {
        /// Window in ms.
        #[arg(long, default_value_t = 1000)]
        window_ms: u64,
    },
    /// Pause and save state and memory to a file.
    Save { path: PathBuf },
    /// Replace the running machine with one restored from a file.
    Restore { path: PathBuf },
    /// Stop the vmm.
    Quit,
    /// Cancel the running migration (before the switch-over only): the
    /// source guest runs on as before, the destination discards everything.
    MigrateCancel,
    /// The running migration's phase, round, pages remaining, throughput,
    /// dirty rate, expected downtime and ETA (or how the last one ended).
    MigrationStatus,
    /// Switch the running pre-copy to post-copy at the end of its current
    /// round (the migration must have been started with --postcopy-ready).
    MigrateStartPostcopy,
    /// Print migration events as JSON lines (round_ended, stop_rule_fired,
    /// paused, switched_over, postcopy_complete, completed, failed,
    /// cancelled) until a migration ends.
    Events {
        /// Print the events kept from before too.
        #[arg(long)]
        all: bool,
    },
    /// Change the running migration's limits from its next round.
    MigrateSetParameters {
        /// Switch over once the predicted downtime is below this (50ms, 1s).
        #[arg(long, value_parser = migrate::parse_duration_ms)]
        max_downtime: Option<f64>,
        /// Cap the link (e.g. 1Gbit, 100Mbit), or `none`.
        #[arg(long)]
        bandwidth: Option<String>,
        /// Switch over after this many rounds at the latest.
        #[arg(long)]
        max_rounds: Option<u32>,
        /// Throttle the vCPUs while the guest outruns the link: on or off.
        #[arg(long)]
        auto_converge: Option<bool>,
    },
}

/// `vmm ctl events`: long-polls the socket, prints each event as a JSON
/// line, and returns once a migration ended.
fn events(api_socket: &std::path::Path, all: bool) -> Result<(), String> {
    let call = |req| {
        vmm::api::call(api_socket, &req)
            .map_err(|e| format!("control socket {}: {e}", api_socket.display()))
    };
    // Only a migration that ends after this started ends the stream.
    let started_at = call(serde_json::json!({"cmd": "events", "after": u64::MAX}))?["last"]
        .as_u64()
        .unwrap_or(0);
    let mut after = if all { 0 } else { started_at };
    loop {
        let resp = call(serde_json::json!({"cmd": "events", "after": after, "wait_ms": 1000}))?;
        for e in resp["events"].as_array().into_iter().flatten() {
            println!("{e}");
            after = e["seq"].as_u64().unwrap_or(after);
            let last = matches!(
                e["event"].as_str(),
                Some("completed" | "failed" | "cancelled")
            );
            if last && after > started_at {
                return Ok(());
            }
        }
    }
}

fn ctl(api_socket: &std::path::Path, action: CtlAction) -> Result<(), String> {
    let req = match action {
        CtlAction::Events { all } => return events(api_socket, all),
        CtlAction::Pause => serde_json::json!({"cmd": "pause"}),
        CtlAction::Resume => serde_json::json!({"cmd": "resume"}),
        CtlAction::State => serde_json::json!({"cmd": "state"}),
        CtlAction::Verify => serde_json::json!({"cmd": "verify"}),
        CtlAction::Scan => serde_json::json!({"cmd": "scan"}),
        CtlAction::Measure { window_ms } => {
            serde_json::json!({"cmd": "measure", "window_ms": window_ms})
        }
        CtlAction::Save { path } => serde_json::json!({"cmd": "save", "path": path}),
        CtlAction::Restore { path } => serde_json::json!({"cmd": "restore", "path": path}),
        CtlAction::Quit => serde_json::json!({"cmd": "quit"}),
        CtlAction::MigrateCancel => serde_json::json!({"cmd": "migrate_cancel"}),
        CtlAction::MigrationStatus => serde_json::json!({"cmd": "migration_status"}),
        CtlAction::MigrateStartPostcopy => serde_json::json!({"cmd": "migrate_start_postcopy"}),
        CtlAction::MigrateSetParameters {
            max_downtime,
            bandwidth,
            max_rounds,
            auto_converge,
        } => serde_json::json!({
            "cmd": "migrate_set_parameters",
            "max_downtime_ms": max_downtime,
            "bandwidth": bandwidth,
            "max_rounds": max_rounds,
            "auto_converge": auto_converge,
        }),
    };
    let resp = vmm::api::call(api_socket, &req)
        .map_err(|e| format!("control socket {}: {e}", api_socket.display()))?;
    println!("{resp}");
    if resp["ok"] == serde_json::Value::Bool(true) {
        Ok(())
    } else {
        Err(resp["error"]
            .as_str()
            .unwrap_or("request failed")
            .to_string())
    }
}

/// Longest error message printed.
const MAX_ERROR_TEXT: usize = 8192;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Receive(args) => receive::receive(args),
        Command::Migrate(args) => migrate::migrate_cancelling_on_signal(args),
        Command::Demo(args) => migrate::demo(args),
        Command::Model(args) => model::model(args),
        Command::GenCerts(args) => protection::gen_certs(args),
        Command::Experiment(args) => experiment::experiment(args),
        Command::Plot(args) => experiment::plot(args),
        Command::Ctl { api_socket, action } => ctl(&api_socket, action),
        Command::Guests => {
            for g in guest_images::GUESTS {
                println!("{:10} {}", g.name, g.description);
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors may quote a peer (an Abort's detail, a malformed
            // frame's): never let its bytes reach the terminal raw.
            eprintln!(
                "error: {}",
                migration::protocol::printable(&e, MAX_ERROR_TEXT)
            );
            ExitCode::FAILURE
        }
    }
}
