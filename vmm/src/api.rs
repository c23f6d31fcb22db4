//! The JSON control socket: one request per line, one response per line.
//!
//! ```text
//! → {"cmd":"pause"}                     ← {"ok":true}
//! → {"cmd":"resume"}                    ← {"ok":true}
//! → {"cmd":"state"}                     ← {"ok":true,"paused":false,"vcpus":[...],...}
//! → {"cmd":"save","path":"/tmp/vm.snap"} ← {"ok":true,"state_bytes":..,"memory_bytes":..}
//! → {"cmd":"restore","path":"/tmp/vm.snap"} ← {"ok":true}
//! → {"cmd":"verify"}                    ← {"ok":true,"pages_ok":..,"pages_bad":0,...}
//! → {"cmd":"scan"}                      ← {"ok":true,"good":..,"corrupt":0,...}
//! → {"cmd":"quit"}                      ← {"ok":true}
//! ```
//! `save` pauses the machine if it runs and leaves it paused (a saved
//! machine must not go on diverging from its file); `resume` continues it.
//! A `save` that fails resumes a machine that ran: there is no file for it
//! to diverge from.
//!
//! A request line longer than [`crate::control_socket::MAX_REQUEST_BYTES`] gets
//! `{"ok":false,"error":"request longer than ..."}` and the connection is
//! closed (the rest of the line is never read). At most
//! [`MAX_CONNECTIONS`] connections are served at once (one more is refused
//! with a reason); one idle for a minute is closed. `quit`, `restore` and
//! `save` are refused while a migration runs. The socket file itself is
//! made by [`crate::control_socket::bind`].
//! `restore` replaces this process's machine with the one in the file and
//! runs it. Errors come back as `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::control_socket::{read_request_line, RequestLineError};
use crate::machine::{Machine, RunOptions};
use crate::snapshot;

/// Parameters of a `migrate` request.
#[derive(Debug, Deserialize)]
pub struct MigrateRequest {
    /// `tcp:HOST:PORT` of the destination.
    pub to: String,
    /// File holding the shared secret (PSK mode, or plaintext).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// TLS mode: this end's certificate, key and the CA (all three).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Plaintext with the shared-secret handshake (trusted links only).
    #[serde(default)]
    pub insecure_plaintext: bool,
    #[serde(default)]
    pub max_downtime_ms: Option<f64>,
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// The hard bound on the pause over the downtime limit (ms).
    #[serde(default)]
    pub pause_margin_ms: Option<f64>,
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// e.g. "1Gbit".
    #[serde(default)]
    pub bandwidth: Option<String>,
    /// none | lz4 | auto
    #[serde(default)]
    pub compression: Option<String>,
    #[serde(default)]
    pub verify: bool,
    /// pre | post | hybrid
    #[serde(default)]
    pub mode: Option<String>,
    /// Hybrid: bytes to pre-copy (V1).
    #[serde(default)]
    pub precopy_bytes: Option<u64>,
    /// Hybrid: pre-copy stops once a round dirtied at most this (l).
    #[serde(default)]
    pub threshold: Option<u64>,
    /// Auto: the migration must end within this many ms (Tm).
    #[serde(default)]
    pub deadline_ms: Option<f64>,
    /// Measure r, w and μ and put the model's prediction in the report,
    /// whatever the mode.
    #[serde(default)]
    pub predict: bool,
    /// Pre-copy: throttle the vCPUs while the guest outruns the link.
    #[serde(default)]
    pub auto_converge: bool,
    /// Pre-copy: skip pages dirtied again since the round began.
    #[serde(default)]
    pub skip_redirtied: bool,
    /// `exec:/ABSOLUTE/PATH`: an external program decides instead of the
    /// built-in policy (see [`migration::policy::exec`]). It runs as a
    /// child of this process: only the control socket's owner (mode 0600)
    /// can name one.
    #[serde(default)]
    pub policy: Option<String>,
    /// How long the external policy may take per answer (default 2 s).
    #[serde(default)]
    pub policy_deadline_ms: Option<u64>,
    /// Open post-copy's fault connection up front, so that
    /// `migrate_start_postcopy` may switch to post-copy mid-pre-copy.
    #[serde(default)]
    pub postcopy_ready: bool,
    /// When a cap ends pre-copy over the downtime limit: `fail` (default),
    /// `postcopy` or `accept`.
    #[serde(default)]
    pub on_overrun: Option<String>,
    /// How long to wait for the destination's `Prepared`, then `Resumed`
    /// (default 30 s); see [`migration::Options::commit_timeout`].
    #[serde(default)]
    pub commit_timeout_ms: Option<u64>,
}

/// A `migrate_recover` request: ask the destination what became of a
/// guest this source fenced (it committed and heard nothing back).
#[derive(Debug, Deserialize)]
pub struct RecoverRequest {
    /// `tcp:HOST:PORT` of the destination.
    pub to: String,
    /// The migration's protection, as in [`MigrateRequest`]: the query
    /// goes through it too.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// A migration in progress or finished.
#[derive(Debug, Default)]
struct MigrationSlot {
    running: bool,
    finished_at: Option<Instant>,
    fetched_at: Option<Instant>,
    progress: migration::source::ProgressHandle,
    control: migration::ControlHandle,
    result: Option<Result<migration::Report, String>>,
    /// The migration ended because it was cancelled.
    cancelled: bool,
    /// The source committed and cannot tell what the destination did: the
    /// guest stays paused here until `migrate_recover` finds out.
    fenced: Option<Fenced>,
}

/// Why a source is fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fenced {
    /// `Commit` went out, `Resumed` never came back.
    OutcomeUnknown,
    /// Post-copy lost the destination after it resumed: this copy keeps
    /// every page the destination may still need.
    Postcopy,
}

impl MigrationSlot {
    /// `running`, `completed`, `cancelled`, `failed`, or `none`.
    fn state(&self) -> &'static str {
        match (&self.result, self.running) {
            (_, true) => "running",
            (_, false) if self.fenced.is_some() => "outcome-unknown",
            (Some(Ok(_)), _) => "completed",
            (Some(Err(_)), _) if self.cancelled => "cancelled",
            (Some(Err(_)), _) => "failed",
            (None, false) => "none",
        }
    }
}

/// Parameters of a `migrate_set_parameters` request; absent ones stay.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetParametersRequest {
    #[serde(default)]
    pub max_downtime_ms: Option<f64>,
    /// e.g. "1Gbit", or "none" to lift the cap.
    #[serde(default)]
    pub bandwidth: Option<String>,
    #[serde(default)]
    pub max_rounds: Option<u32>,
    #[serde(default)]
    pub auto_converge: Option<bool>,
}

impl SetParametersRequest {
    /// The change it asks for, validated.
    fn change(&self) -> Result<migration::ParameterChange, String> {
        let max_downtime = self.max_downtime_ms.map(downtime).transpose()?;
        let bandwidth = match self.bandwidth.as_deref() {
            None => None,
            Some("none" | "unlimited") => Some(None),
            Some(b) => Some(Some(migration::rate_limit::parse_bandwidth(b)?)),
        };
        if self.max_rounds == Some(0) {
            return Err("max_rounds must be at least 1".into());
        }
        Ok(migration::ParameterChange {
            max_downtime,
            bandwidth,
            max_rounds: self.max_rounds,
            auto_converge: self.auto_converge,
        })
    }
}

/// A downtime limit in ms, validated.
fn downtime(ms: f64) -> Result<Duration, String> {
    if !(ms.is_finite() && ms >= 0.0) {
        return Err(format!("bad max_downtime_ms {ms}"));
    }
    Ok(Duration::from_secs_f64(ms / 1e3))
}

/// The longest an `events` request waits for an event.
const MAX_EVENTS_WAIT_MS: u64 = 10_000;

/// How long `migrate_cancel` waits for the source guest to run as before.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// A request on the control socket.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Pause,
    Resume,
    State,
    Save {
        path: PathBuf,
    },
    Restore {
        path: PathBuf,
    },
    Verify,
    Scan,
    /// Measure r and w on the host side over `window_ms`.
    Measure {
        #[serde(default)]
        window_ms: Option<u64>,
    },
    Migrate(Box<MigrateRequest>),
    MigrationStatus,
    MigrateCancel,
    MigrateSetParameters(SetParametersRequest),
    MigrateStartPostcopy,
    /// Ask the destination what became of a fenced guest, and act on it.
    MigrateRecover(RecoverRequest),
    /// The migration events after `after` (all kept ones without it),
    /// waiting up to `wait_ms` for one to come.
    Events {
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    Quit,
}

/// The machine a control socket acts on; shared with the main loop.
#[derive(Debug)]
pub struct Controller {
    machine: Mutex<Arc<Machine>>,
    opts: RunOptions,
    quit: AtomicBool,
    migration: Mutex<MigrationSlot>,
    /// Every migration's events, numbered across migrations.
    events: Arc<migration::events::EventLog>,
    me: std::sync::Weak<Controller>,
}

/// Full error chain of `e`, for messages sent to a user.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl Controller {
    /// Wraps a machine.
    pub fn new(machine: Machine, opts: RunOptions) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            machine: Mutex::new(Arc::new(machine)),
            opts,
            quit: AtomicBool::new(false),
            migration: Mutex::new(MigrationSlot::default()),
            events: Arc::default(),
            me: me.clone(),
        })
    }

    /// The current machine (a `restore` may replace it).
    pub fn machine(&self) -> Arc<Machine> {
        self.machine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs `f` on the current machine.
    pub fn with<T>(&self, f: impl FnOnce(&Machine) -> T) -> T {
        f(&self.machine())
    }

    /// The result of a finished migration, if any.
    pub fn migration_result(&self) -> Option<Result<migration::Report, String>> {
        self.migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .result
            .clone()
    }

    /// Whether a `quit` was requested.
    pub fn quit_requested(&self) -> bool {
        self.quit.load(Ordering::SeqCst)
    }

    /// Requests the main loop to end.
    pub fn request_quit(&self) {
        self.quit.store(true, Ordering::SeqCst);
    }

    /// Executes one request.
    pub fn handle(&self, req: Request) -> Value {
        match self.execute(req) {
            Ok(mut v) => {
                if let Value::Object(m) = &mut v {
                    m.insert("ok".into(), true.into());
                }
                v
            }
            Err(e) => json!({"ok": false, "error": e}),
        }
    }

    /// Why `req` may not run now, if it may not: `quit` and `restore` would
    /// destroy the machine a migration is reading, and `save` would pause
    /// it and write a second copy of a guest that is moving.
    fn refusal(&self, req: &Request) -> Option<String> {
        let what = match req {
            Request::Quit => "quit",
            Request::Restore { .. } => "restore",
            Request::Save { .. } => "save",
            _ => return None,
        };
        let running = self
            .migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running;
        running.then(|| {
            format!(
                "{what} refused: a migration is running (cancel it with migrate-cancel, \
                 or wait until it ends)"
            )
        })
    }

    fn execute(&self, req: Request) -> Result<Value, String> {
        let chain = |e: &dyn std::error::Error| error_chain(e);
        if let Some(why) = self.refusal(&req) {
            return Err(why);
        }
        match req {
            Request::Pause => self.with(|m| m.pause()),
            Request::Resume => {
                self.refuse_if_fenced("resume")?;
                self.with(|m| m.resume())
            }
            Request::State => return self.with(state_json),
            Request::Save { path } => {
                return self.with(|m| {
                    let was_running = !m.is_paused();
                    m.pause();
                    let t = Instant::now();
                    let s = snapshot::save(m, &path).map_err(|e| {
                        if was_running {
                            m.resume();
                        }
                        chain(&e)
                    })?;
                    Ok(json!({
                        "state_bytes": s.state_bytes,
                        "memory_bytes": s.memory_bytes,
                        "zero_pages_skipped": s.zero_pages_skipped,
                        "save_ms": t.elapsed().as_secs_f64() * 1e3,
                    }))
                })
            }
            Request::Restore { path } => return self.restore(&path),
            Request::Verify => {
                let r = self
                    .with(|m| m.request_verify(Duration::from_secs(60)))
                    .map_err(|e| chain(&e))?;
                return serde_json::to_value(r).map_err(|e| e.to_string());
            }
            Request::Scan => {
                let r = self.with(|m| m.scan_working_set()).map_err(|e| chain(&e))?;
                return serde_json::to_value(r).map_err(|e| e.to_string());
            }
            Request::Measure { window_ms } => {
                let window = Duration::from_millis(window_ms.unwrap_or(1000).clamp(50, 60_000));
                return self.with(|m| measure_rates(m, window));
            }
            Request::Migrate(req) => return self.start_migration(*req),
            Request::MigrationStatus => return Ok(self.migration_status()),
            Request::MigrateCancel => return self.cancel_migration(),
            Request::MigrateSetParameters(req) => return self.set_parameters(&req),
            Request::MigrateStartPostcopy => return self.start_postcopy(),
            Request::MigrateRecover(req) => return self.recover(&req),
            Request::Events { after, wait_ms } => {
                let wait = Duration::from_millis(wait_ms.unwrap_or(0).min(MAX_EVENTS_WAIT_MS));
                let events = self.events.after(after.unwrap_or(0), wait);
                return Ok(json!({"events": events, "last": self.events.last_seq()}));
            }
            Request::Quit => self.request_quit(),
        }
        Ok(json!({}))
    }

    fn start_migration(&self, req: MigrateRequest) -> Result<Value, String> {
        let opts = migration_options(&req)?;
        let protection = protection(&req)?;
        let program = external_policy(&req)?;
        let mut slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if slot.running {
            return Err("a migration is already running".into());
        }
        if self.machine().is_paused() {
            return Err("the machine is paused; resume it before migrating".into());
        }
        // Started only now that no other migration runs; refused at once if
        // it cannot start.
        let mut policy = program
            .map(|(path, deadline)| migration::policy::ExecPolicy::spawn(&path, deadline))
            .transpose()
            .map_err(|e| error_chain(&e))?;
        *slot = MigrationSlot {
            running: true,
            control: Arc::new(migration::Control::with_events(self.events.clone())),
            ..Default::default()
        };
        let progress = slot.progress.clone();
        let control = slot.control.clone();
        drop(slot);
        let machine = self.machine();
        let me = self.self_ref();
        std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                let mut builtin = migration::policy::Builtin::new(&opts);
                let chosen: &mut dyn migration::policy::Policy = match policy.as_mut() {
                    Some(p) => p,
                    None => &mut builtin,
                };
                let r = migration::migrate_controlled(
                    &*machine,
                    &req.to,
                    &protection,
                    &opts,
                    chosen,
                    progress,
                    control,
                );
                // The external program is killed and reaped before the
                // result is published.
                drop(policy);
                let mut slot = me.migration.lock().unwrap_or_else(|e| e.into_inner());
                slot.running = false;
                slot.finished_at = Some(Instant::now());
                slot.cancelled = r.as_ref().is_err_and(|e| e.is_cancelled());
                slot.fenced = match &r {
                    Err(migration::MigrationError::PostcopyFenced(_)) => Some(Fenced::Postcopy),
                    Err(e) if e.is_fenced() => Some(Fenced::OutcomeUnknown),
                    _ => None,
                };
                slot.result = Some(r.map_err(|e| error_chain(&e)));
            })
            .map_err(|e| e.to_string())?;
        Ok(json!({"started": true}))
    }

    /// Refuses `what` while the source is fenced: the guest may run on the
    /// destination.
    fn refuse_if_fenced(&self, what: &str) -> Result<(), String> {
        let slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        match slot.fenced {
            Some(_) => Err(format!(
                "refusing to {what}: the migration committed and the destination may run the guest; run `vmm migrate --recover` to ask it"
            )),
            None => Ok(()),
        }
    }

    /// `migrate_recover`: asks the destination (same authentication) what
    /// it did with the guest this source fenced. Resumed there: this copy
    /// shuts down (migrated away), or in post-copy stays paused with every
    /// page. Discarded there: the guest resumes here. No answer: nothing
    /// changes, and the answer says so.
    fn recover(&self, req: &RecoverRequest) -> Result<Value, String> {
        let protection = protection_of(
            req.secret_file.as_deref(),
            [&req.tls_cert, &req.tls_key, &req.tls_ca],
            req.insecure_plaintext,
        )?;
        let fenced = {
            let slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
            if slot.running {
                return Err("a migration is running: nothing to recover yet".into());
            }
            slot.fenced
                .ok_or("this source is not fenced: nothing to recover")?
        };
        let outcome = migration::commit::query(&req.to, &protection).map_err(|e| {
            format!(
                "outcome still unknown, the guest stays paused here: cannot ask the destination: {}",
                error_chain(&e)
            )
        })?;
        let mut slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        let action = match (outcome, fenced) {
            (migration::commit::Outcome::Discarded, _) => {
                slot.fenced = None;
                self.machine().resume();
                "the destination discarded the guest: it runs here again"
            }
            (migration::commit::Outcome::Resumed, Fenced::OutcomeUnknown) => {
                slot.fenced = None;
                slot.result = Some(Ok(migration::Report {
                    mode: "pre".into(),
                    guest_detail: "confirmed by migrate_recover".into(),
                    ..Default::default()
                }));
                slot.finished_at = Some(Instant::now());
                slot.fetched_at = Some(Instant::now());
                "the guest runs on the destination: this copy shuts down"
            }
            (migration::commit::Outcome::Resumed, Fenced::Postcopy) => {
                "the guest runs on the destination (post-copy): this copy stays paused with every page"
            }
            (migration::commit::Outcome::Undecided, _) => {
                return Err("the destination answered undecided: the guest stays paused".into())
            }
        };
        Ok(json!({"outcome": outcome, "action": action}))
    }

    /// After a successful migration the guest lives on the destination: this
    /// process ends shortly after the report was fetched, or 10 s after the
    /// migration at the latest.
    pub fn migrated_away(&self) -> bool {
        let slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        let after = |t: Option<Instant>, d| t.is_some_and(|t| t.elapsed() > d);
        matches!(slot.result, Some(Ok(_)))
            && (after(slot.fetched_at, Duration::from_millis(200))
                || after(slot.finished_at, Duration::from_secs(10)))
    }

    fn migration_status(&self) -> Value {
        let mut slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(slot.result, Some(Ok(_))) && slot.fetched_at.is_none() {
            slot.fetched_at = Some(Instant::now());
        }
        let progress = slot
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (report, error) = match &slot.result {
            Some(Ok(r)) => (Some(r.clone()), None),
            Some(Err(e)) => (None, Some(e.clone())),
            None => (None, None),
        };
        json!({
            "running": slot.running,
            "state": slot.state(),
            "cancellable": slot.running && slot.control.cancellable(),
            "progress": progress,
            "report": report,
            "failure": error,
        })
    }

    /// Cancels the running migration and waits (up to [`CANCEL_WAIT`])
    /// until it ended and the source guest runs as before.
    fn cancel_migration(&self) -> Result<Value, String> {
        let control = {
            let slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
            if !slot.running {
                return Err(format!("no migration is running (last: {})", slot.state()));
            }
            slot.control.clone()
        };
        control.cancel().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + CANCEL_WAIT;
        loop {
            let slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
            if !slot.running {
                let error = slot.result.as_ref().and_then(|r| r.as_ref().err()).cloned();
                return Ok(json!({"state": slot.state(), "failure": error}));
            }
            drop(slot);
            if Instant::now() > deadline {
                return Ok(json!({"state": "cancelling"}));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Switches the running pre-copy to post-copy at its next round end.
    fn start_postcopy(&self) -> Result<Value, String> {
        let slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.running {
            return Err(format!("no migration is running (last: {})", slot.state()));
        }
        slot.control.start_postcopy().map_err(|e| e.to_string())?;
        Ok(json!({"applies_from": "the end of the current round"}))
    }

    /// Changes the limits of the running migration from its next round.
    fn set_parameters(&self, req: &SetParametersRequest) -> Result<Value, String> {
        let change = req.change()?;
        let slot = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.running {
            return Err(format!("no migration is running (last: {})", slot.state()));
        }
        slot.control.set_parameters(change);
        let c = slot.control.changes();
        Ok(json!({
            "applies_from": "the next round",
            "max_downtime_ms": c.max_downtime.map(|d| d.as_secs_f64() * 1e3),
            "bandwidth_bytes_s": c.bandwidth,
            "max_rounds": c.max_rounds,
            "auto_converge": c.auto_converge,
        }))
    }

    fn self_ref(&self) -> Arc<Controller> {
        self.me
            .upgrade()
            .expect("controller is alive while it handles requests")
    }

    fn restore(&self, path: &Path) -> Result<Value, String> {
        let t = Instant::now();
        let (state, ram) = snapshot::load(path).map_err(|e| error_chain(&e))?;
        let new = Machine::restore(&state, ram, &self.opts).map_err(|e| error_chain(&e))?;
        new.resume();
        // The old machine's vCPU threads stop when its last reference goes.
        *self.machine.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        Ok(json!({"restore_ms": t.elapsed().as_secs_f64() * 1e3}))
    }
}

/// What answers a control socket's request lines: a [`Controller`], or a
/// stand-in while there is no machine yet (a migration being received).
pub trait Responder: Send + Sync + 'static {
    /// The response to one request line.
    fn respond(&self, line: &str) -> Value;
}

impl Responder for Controller {
    fn respond(&self, line: &str) -> Value {
        match serde_json::from_str::<Request>(line) {
            Ok(req) => self.handle(req),
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        }
    }
}

/// Most control connections served at once: a client that opens many
/// cannot make the VMM start a thread for each.
pub const MAX_CONNECTIONS: usize = 16;

/// A connection that sends nothing this long is closed, freeing its slot
/// (the longest request, an `events` wait, answers within 10 s).
const IDLE_CONNECTION: Duration = Duration::from_secs(60);

/// Serves `listener` (see [`crate::control_socket::bind`]) on a background
/// thread, one thread per connection, at most [`MAX_CONNECTIONS`] at once:
/// one more is answered with a refusal and closed.
pub fn serve(listener: UnixListener, responder: Arc<dyn Responder>) -> std::io::Result<()> {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let Some(slot) = Slot::take(&active) else {
                    let why = format!("too many control connections (at most {MAX_CONNECTIONS})");
                    let _ = writeln!(conn, "{}", json!({"ok": false, "error": why}));
                    continue;
                };
                let _ = conn.set_read_timeout(Some(IDLE_CONNECTION));
                let responder = responder.clone();
                // A thread that cannot start drops its closure, and the slot.
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        serve_connection(&*responder, conn);
                        drop(slot);
                    });
            }
        })?;
    Ok(())
}

/// One of the [`MAX_CONNECTIONS`] places, given back when dropped.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Slot {
    fn take(active: &Arc<std::sync::atomic::AtomicUsize>) -> Option<Self> {
        let slot = Self(active.clone());
        // Counted first, checked after: a refused one is given back on drop.
        (active.fetch_add(1, Ordering::AcqRel) < MAX_CONNECTIONS).then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_connection(responder: &dyn Responder, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        let resp = match read_request_line(&mut reader, &mut line) {
            Ok(false) | Err(RequestLineError::Io(_)) => return,
            Err(e @ RequestLineError::TooLong) => {
                // The rest of the line stays unread: the connection ends.
                let _ = writeln!(out, "{}", json!({"ok": false, "error": e.to_string()}));
                return;
            }
            Err(e @ RequestLineError::NotUtf8) => json!({"ok": false, "error": e.to_string()}),
            Ok(true) if line.trim().is_empty() => continue,
            Ok(true) => responder.respond(&line),
        };
        if writeln!(out, "{resp}").is_err() {
            return;
        }
    }
}

/// The `state` answer: run state, the guest's counters, heartbeats, events.
pub fn state_json(m: &Machine) -> Result<Value, String> {
    let status = m.guest_status().map_err(|e| error_chain(&e))?;
    let hb = m.devices().probe.heartbeats();
    let populated: u64 = m
        .vm()
        .ram()
        .populated_ranges()
        .map_err(|e| error_chain(&e))?
        .iter()
        .map(|r| r.1)
        .sum();
    Ok(json!({
        "paused": m.is_paused(),
        "throttle_pct": m.throttle(),
        "ram_populated_bytes": populated,
        "uptime_ms": m.uptime().as_millis() as u64,
        "config": m.config(),
        "vcpus": status,
        "kvm_vcpus": m.kvm_views(),
        "heartbeats": hb,
        "events": m.devices().probe.events(),
        "stop_reason": m.stop_reason().map(|r| format!("{r:?}")),
    }))
}

/// Host-side r and w, beside the guest's own counters over the same window.
pub fn measure_rates(m: &Machine, window: Duration) -> Result<Value, String> {
    if m.is_paused() {
        return Err("the machine is paused".into());
    }
    let guest = || -> Result<(u64, u64), String> {
        let s = m.guest_status().map_err(|e| error_chain(&e))?;
        Ok((
            s.iter().map(|c| c.pages_read).sum(),
            s.iter().map(|c| c.pages_written).sum(),
        ))
    };
    let (r0, w0) = guest()?;
    let t = Instant::now();
    let rates = migration::access_rate::measure(m, window, 4096).map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    let (r1, w1) = guest()?;
    Ok(json!({
        "host": rates,
        "guest_read_pages_s": (r1 - r0) as f64 / secs,
        "guest_write_pages_s": (w1 - w0) as f64 / secs,
    }))
}

fn overrun(s: Option<&str>) -> Result<migration::Overrun, String> {
    Ok(match s {
        None | Some("fail") => migration::Overrun::Fail,
        Some("postcopy") => migration::Overrun::PostCopy,
        Some("accept") => migration::Overrun::Accept,
        Some(other) => {
            return Err(format!(
                "on_overrun '{}': expected fail, postcopy or accept",
                other.escape_debug()
            ))
        }
    })
}

fn migration_options(req: &MigrateRequest) -> Result<migration::Options, String> {
    let mut o = migration::Options {
        verify: req.verify,
        predict: req.predict,
        auto_converge: req.auto_converge,
        skip_redirtied: req.skip_redirtied,
        postcopy_ready: req.postcopy_ready,
        overrun: overrun(req.on_overrun.as_deref())?,
        ..Default::default()
    };
    if let Some(ms) = req.commit_timeout_ms {
        o.commit_timeout = Duration::from_millis(ms.max(1));
    }
    if let Some(ms) = req.max_downtime_ms {
        o.max_downtime = downtime(ms)?;
    }
    if let Some(ms) = req.pause_margin_ms {
        o.pause_margin = downtime(ms).map_err(|_| format!("bad pause_margin_ms {ms}"))?;
    }
    if let Some(r) = req.max_rounds {
        if r == 0 {
            return Err("max_rounds must be at least 1".into());
        }
        o.max_rounds = r;
    }
    if let Some(b) = req.max_bytes {
        o.max_bytes = b;
    }
    if let Some(b) = &req.bandwidth {
        o.bandwidth = Some(migration::rate_limit::parse_bandwidth(b)?);
    }
    if let Some(c) = &req.compression {
        o.compression = c.parse()?;
    }
    if let Some(t) = req.threshold {
        o.threshold = t;
    }
    o.mode = match req.mode.as_deref().unwrap_or("pre") {
        "pre" => migration::Mode::Pre,
        "post" => migration::Mode::Post,
        "hybrid" => migration::Mode::Hybrid(match req.precopy_bytes {
            Some(bytes) => migration::Split::Bytes(bytes),
            None => migration::Split::FromMeasuredRates,
        }),
        "auto" => migration::Mode::Auto {
            deadline: req.deadline_ms.map(|ms| Duration::from_secs_f64(ms / 1e3)),
        },
        m => return Err(format!("unknown mode '{m}' (pre, post, hybrid, auto)")),
    };
    Ok(o)
}

/// The external policy a `migrate` request names, and its deadline.
fn external_policy(req: &MigrateRequest) -> Result<Option<(PathBuf, Duration)>, String> {
    let Some(policy) = &req.policy else {
        return Ok(None);
    };
    let Some(program) = policy.strip_prefix("exec:") else {
        return Err(format!("unknown policy '{policy}' (exec:PROGRAM)"));
    };
    let program = PathBuf::from(program);
    if !program.is_absolute() {
        return Err(format!(
            "the policy program must be an absolute path, not '{}'",
            program.display()
        ));
    }
    let deadline = req.policy_deadline_ms.map_or(
        migration::policy::exec::DEFAULT_DEADLINE,
        Duration::from_millis,
    );
    if deadline.is_zero() {
        return Err("policy_deadline_ms must be at least 1".into());
    }
    Ok(Some((program, deadline)))
}

/// Sends one request to a control socket and returns the response.
pub fn call(path: &Path, request: &Value) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path)?;
    writeln!(s, "{request}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The stream protection a `migrate` request asks for.
fn protection(req: &MigrateRequest) -> Result<migration::secure::Protection, String> {
    protection_of(
        req.secret_file.as_deref(),
        [&req.tls_cert, &req.tls_key, &req.tls_ca],
        req.insecure_plaintext,
    )
}

/// The stream protection from a request's fields.
fn protection_of(
    secret_file: Option<&std::path::Path>,
    [tls_cert, tls_key, tls_ca]: [&Option<PathBuf>; 3],
    insecure_plaintext: bool,
) -> Result<migration::secure::Protection, String> {
    let tls = match (tls_cert, tls_key, tls_ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), Some(ca)) => Some(migration::secure::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        }),
        _ => return Err("TLS needs all three of tls_cert, tls_key and tls_ca".into()),
    };
    migration::secure::Protection::from_cli(secret_file, tls, insecure_plaintext)
}
