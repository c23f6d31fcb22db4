//! `vmm receive`: wait for one incoming migration, then run the guest.
//!
//! The control socket exists from the start. Until the guest runs here, a
//! stand-in answers it: `migration_status` with the stage (listening, or
//! receiving from a peer), anything else with a refusal that names the
//! stage. Once the guest runs, the machine's [`Controller`] answers.
//!
//! SIGTERM or SIGINT while listening ends the process cleanly; during a
//! migration it abandons it (the source, seeing the connection drop before
//! the switch-over, keeps running its guest); once the guest runs here, it
//! stops like `vmm run`.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use migration::DestinationVm;
use serde_json::{json, Value};
use vmm::api::{error_chain, Controller, Responder};
use vmm::control_socket::SocketFile;
use vmm::migrate::Incoming;
use vmm::RunOptions;

use crate::run::{bind_api_socket, main_loop, AfterStart};
use crate::signals::Termination;

/// Arguments of `vmm receive`.
#[derive(clap::Args, Debug)]
pub struct ReceiveArgs {
    /// Where to wait for the source: tcp:HOST:PORT.
    #[arg(long)]
    listen: String,
    #[command(flatten)]
    protection: crate::protection::ProtectionArgs,
    /// Pre-copy: allocate and touch the RAM the source announces before the
    /// first round, so that first-touch costs stay out of the page stream.
    #[arg(long)]
    prefault: bool,
    #[command(flatten)]
    after: AfterStart,
}

/// Where the destination is.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Setting up: a signal is only recorded.
    Starting,
    /// Waiting in `accept` on this listening socket.
    Listening(RawFd),
    /// A source authenticated from this address; the migration runs.
    Receiving(SocketAddr),
    /// The migration ended: the guest runs here, or the process ends.
    Done,
}

type SharedStage = Arc<Mutex<Stage>>;

fn lock(stage: &SharedStage) -> std::sync::MutexGuard<'_, Stage> {
    stage.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits for one incoming migration, then runs the guest.
pub fn receive(args: ReceiveArgs) -> Result<(), String> {
    let protection = args.protection.protection()?;
    args.protection.warn();
    let listener = migration::transport::listen(&args.listen).map_err(|e| error_chain(&e))?;
    let socket = bind_api_socket(&args.after)?;
    let stage: SharedStage = Arc::new(Mutex::new(Stage::Starting));
    let termination = Termination::install(react(
        stage.clone(),
        socket.as_ref().map(|(_, f)| f.clone()),
    ))
    .map_err(|e| error_chain(&e))?;
    let stand_in = Arc::new(StandIn {
        stage: stage.clone(),
        controller: OnceLock::new(),
    });
    // Dropped when this returns: the socket file goes with the process.
    let _file = match socket {
        Some((l, file)) => {
            vmm::api::serve(l, stand_in.clone())
                .map_err(|e| format!("control socket {}: {e}", file.path().display()))?;
            Some(file)
        }
        None => None,
    };
    *lock(&stage) = Stage::Listening(listener.as_raw_fd());
    if termination.received().is_some() {
        return Ok(());
    }
    eprintln!("listening on {}", args.listen);
    let opts = RunOptions {
        echo_console: args.after.console,
    };
    let (peer_stage, signalled) = (stage.clone(), termination.clone());
    let mut incoming = Incoming::new(opts.clone())
        .with_prefault(args.prefault)
        .on_peer(move |peer| {
            if signalled.received().is_some() {
                // The signal came while this peer was being accepted.
                eprintln!("refusing the migration from {peer}: shutting down");
                std::process::exit(1);
            }
            *lock(&peer_stage) = Stage::Receiving(peer);
            eprintln!("incoming migration from {peer}");
        });
    let result = migration::receive::receive(&listener, &protection, &mut incoming);
    // Under the lock: the signal thread must not shut down a closed socket.
    *lock(&stage) = Stage::Done;
    drop(listener);
    let received = match result {
        Ok(r) => r,
        Err(_) if termination.received().is_some() => {
            eprintln!("no migration arrived");
            return Ok(());
        }
        Err(e @ migration::MigrationError::MissingPages { .. }) => {
            // The guest is paused with pages that will never come; its vCPU
            // threads may be asleep in userfaultfd waits: exit without
            // trying to join them.
            eprintln!("error: incoming migration failed: {}", error_chain(&e));
            std::process::exit(3);
        }
        Err(e) => return Err(format!("incoming migration failed: {}", error_chain(&e))),
    };
    let machine = incoming
        .into_running()
        .ok_or("migration finished without a machine")?;
    eprintln!(
        "guest resumed here after {} rounds, {} pages; guest-seen downtime {:.2} ms",
        received.rounds, received.pages, received.resumed.guest.guest_downtime_ms
    );
    if args.after.json {
        println!("{}", json!({"received": received}));
    }
    let ctl = Controller::new(machine, opts);
    let _ = stand_in.controller.set(ctl.clone());
    main_loop(&ctl, &args.after, &termination)
}

/// What a signal does at each stage (runs on the signal thread).
fn react(stage: SharedStage, socket: Option<SocketFile>) -> impl Fn(nix::sys::signal::Signal) {
    move |_| match *lock(&stage) {
        // `accept` fails at once, and `receive` sees the signal recorded.
        Stage::Listening(fd) => {
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
        // The stream cannot be interrupted from here: leave, and let the
        // source see the connection drop.
        Stage::Receiving(peer) => {
            eprintln!("abandoning the incoming migration from {peer}; the source keeps its guest");
            if let Some(f) = &socket {
                f.remove();
            }
            std::process::exit(1);
        }
        // Recorded; whoever runs next looks at it.
        Stage::Starting | Stage::Done => {}
    }
}

/// Answers the control socket until the guest runs here, then hands every
/// request to its controller.
struct StandIn {
    stage: SharedStage,
    controller: OnceLock<Arc<Controller>>,
}

impl StandIn {
    fn stage_json(&self) -> Value {
        match *lock(&self.stage) {
            Stage::Starting | Stage::Listening(_) => json!({"stage": "listening"}),
            Stage::Receiving(peer) => json!({"stage": "receiving", "peer": peer.to_string()}),
            Stage::Done => json!({"stage": "starting the guest"}),
        }
    }
}

impl Responder for StandIn {
    fn respond(&self, line: &str) -> Value {
        if let Some(ctl) = self.controller.get() {
            return ctl.respond(line);
        }
        let cmd = serde_json::from_str::<Value>(line).map(|v| v["cmd"].clone());
        match cmd {
            Ok(c) if c == "migration_status" => {
                json!({"ok": true, "running": true, "receiving": self.stage_json()})
            }
            _ => json!({
                "ok": false,
                "error": "no guest here yet: this vmm is receiving a migration",
                "receiving": self.stage_json(),
            }),
        }
    }
}
