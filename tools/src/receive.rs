//! `vmm receive`: wait for an incoming migration, then run the guest.
//!
//! Connections are served one at a time until a migration succeeds; one
//! that fails (a stray client, a wrong secret, a peer too slow for the
//! deadlines, a hostile frame) is logged with its address and the next is
//! served. `--once` keeps the single-shot behaviour.
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

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use migration::protocol::printable;
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
    /// Serve one connection only and exit if that migration fails (by
    /// default stray, failed or hostile connections are logged and the
    /// next one is served until a migration succeeds).
    #[arg(long)]
    once: bool,
    /// A connection must complete the handshake within this (e.g. 10s).
    #[arg(long, value_parser = crate::migrate::parse_duration_ms)]
    handshake_timeout: Option<f64>,
    /// Each frame must arrive whole within this (e.g. 30s; plus 1 s per
    /// MiB of a large frame), however the peer paces its bytes.
    #[arg(long, value_parser = crate::migrate::parse_duration_ms)]
    frame_timeout: Option<f64>,
    /// After a post-copy `Config`, the fault connection must arrive
    /// within this (e.g. 10s).
    #[arg(long, value_parser = crate::migrate::parse_duration_ms)]
    fault_timeout: Option<f64>,
    #[command(flatten)]
    after: AfterStart,
}

impl ReceiveArgs {
    /// The engine's bounds, from the flags or its defaults.
    fn limits(&self) -> migration::receive::Limits {
        let d = migration::receive::Limits::default();
        let ms = |v: Option<f64>, default| {
            v.map_or(default, |ms: f64| {
                std::time::Duration::from_secs_f64(ms / 1e3)
            })
        };
        migration::receive::Limits {
            handshake: ms(self.handshake_timeout, d.handshake),
            frame: ms(self.frame_timeout, d.frame),
            fault_connection: ms(self.fault_timeout, d.fault_connection),
        }
    }
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

/// Waits for incoming migrations until one succeeds (or, with `--once`,
/// for one attempt), then runs the guest.
pub fn receive(args: ReceiveArgs) -> Result<(), String> {
    let protection = args.protection.protection()?;
    args.protection.warn();
    let limits = args.limits();
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
    let opts = RunOptions {
        echo_console: args.after.console,
    };
    eprintln!("listening on {}", args.listen);
    let Some((received, incoming)) = serve_until_received(
        &args,
        &listener,
        &protection,
        &limits,
        &stage,
        &termination,
        &opts,
    )?
    else {
        eprintln!("no migration arrived");
        return Ok(());
    };
    drop(listener);
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

/// Serves one connection at a time until a migration succeeds: a stray,
/// failed or hostile connection is logged with its peer's address (its
/// words made printable) and the next one is served; every wait it can
/// cause is bounded by `limits`. With `--once`, the first failure is the
/// end. `None`: a signal ended the wait.
fn serve_until_received(
    args: &ReceiveArgs,
    listener: &TcpListener,
    protection: &migration::secure::Protection,
    limits: &migration::receive::Limits,
    stage: &SharedStage,
    termination: &Termination,
    opts: &RunOptions,
) -> Result<Option<(migration::receive::Received, Incoming)>, String> {
    loop {
        *lock(stage) = Stage::Listening(listener.as_raw_fd());
        if termination.received().is_some() {
            return Ok(None);
        }
        let (stream, peer) = match migration::transport::accept(listener) {
            Ok(c) => c,
            Err(_) if termination.received().is_some() => return Ok(None),
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                eprintln!("warning: {}", error_chain(&e));
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let mut incoming = incoming(args, stage, termination, opts);
        let result = migration::receive::receive_on(
            stream,
            peer,
            listener,
            protection,
            &mut incoming,
            limits,
        );
        // Under the lock: the signal thread must not shut down a closed socket.
        *lock(stage) = Stage::Done;
        let e = match result {
            Ok(r) => return Ok(Some((r, incoming))),
            Err(_) if termination.received().is_some() => return Ok(None),
            Err(e @ migration::MigrationError::MissingPages { .. }) => {
                // The guest is paused with pages that will never come; its
                // vCPU threads may be asleep in userfaultfd waits: exit
                // without trying to join them.
                eprintln!("error: incoming migration failed: {}", error_chain(&e));
                std::process::exit(3);
            }
            Err(e) => printable(&error_chain(&e), MAX_ERROR_TEXT),
        };
        if args.once {
            return Err(format!("incoming migration failed (from {peer}): {e}"));
        }
        if migration::commit::answering_queries() {
            // The attempt got as far as `Prepared`: its source may still ask
            // what became of the guest, and the responder owns the listener.
            return Err(format!(
                "incoming migration failed (from {peer}) after the destination was prepared: {e}; not taking new migrations on this listener (start a new `vmm receive`)"
            ));
        }
        eprintln!("incoming migration failed (from {peer}): {e}; still listening");
    }
}

/// Longest error text printed for a failed attempt: it may quote the peer.
const MAX_ERROR_TEXT: usize = 4096;

/// A fresh destination machine for one attempt.
fn incoming(
    args: &ReceiveArgs,
    stage: &SharedStage,
    termination: &Termination,
    opts: &RunOptions,
) -> Incoming {
    let (peer_stage, signalled) = (stage.clone(), termination.clone());
    Incoming::new(opts.clone())
        .with_prefault(args.prefault)
        .on_peer(move |peer| {
            if signalled.received().is_some() {
                // The signal came while this peer was being accepted.
                eprintln!("refusing the migration from {peer}: shutting down");
                std::process::exit(1);
            }
            *lock(&peer_stage) = Stage::Receiving(peer);
            eprintln!("incoming migration from {peer}");
        })
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
