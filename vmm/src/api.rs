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

use crate::machine::{Machine, RunOptions};
use crate::snapshot;

/// A request on the control socket.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Pause,
    Resume,
    State,
    Save { path: PathBuf },
    Restore { path: PathBuf },
    Verify,
    Scan,
    Quit,
}

/// The machine a control socket acts on; shared with the main loop.
#[derive(Debug)]
pub struct Controller {
    machine: Mutex<Machine>,
    opts: RunOptions,
    quit: AtomicBool,
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
        Arc::new(Self {
            machine: Mutex::new(machine),
            opts,
            quit: AtomicBool::new(false),
        })
    }

    /// Runs `f` with the machine locked.
    pub fn with<T>(&self, f: impl FnOnce(&mut Machine) -> T) -> T {
        f(&mut self.machine.lock().unwrap_or_else(|e| e.into_inner()))
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

    fn execute(&self, req: Request) -> Result<Value, String> {
        let chain = |e: &dyn std::error::Error| error_chain(e);
        match req {
            Request::Pause => self.with(|m| m.pause()),
            Request::Resume => self.with(|m| m.resume()),
            Request::State => return self.with(|m| state_json(m)),
            Request::Save { path } => {
                return self.with(|m| {
                    m.pause();
                    let t = Instant::now();
                    let s = snapshot::save(m, &path).map_err(|e| chain(&e))?;
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
            Request::Quit => self.request_quit(),
        }
        Ok(json!({}))
    }

    fn restore(&self, path: &Path) -> Result<Value, String> {
        let t = Instant::now();
        let (state, ram) = snapshot::load(path).map_err(|e| error_chain(&e))?;
        let new = Machine::restore(&state, ram, &self.opts).map_err(|e| error_chain(&e))?;
        new.resume();
        let old = self.with(|m| std::mem::replace(m, new));
        old.shutdown();
        Ok(json!({"restore_ms": t.elapsed().as_secs_f64() * 1e3}))
    }

    /// Serves the socket at `path` on a background thread.
    pub fn serve(self: &Arc<Self>, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let me = me.clone();
                    let _ = std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || me.serve_connection(conn));
                }
            })?;
        Ok(())
    }

    fn serve_connection(&self, conn: UnixStream) {
        let Ok(mut out) = conn.try_clone() else {
            return;
        };
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { return };
            if line.trim().is_empty() {
                continue;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => self.handle(req),
                Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
            };
            if writeln!(out, "{resp}").is_err() {
                return;
            }
        }
    }
}

/// The `state` answer: run state, the guest's counters, heartbeats, events.
pub fn state_json(m: &Machine) -> Result<Value, String> {
    let status = m.guest_status().map_err(|e| error_chain(&e))?;
    let hb = m.devices().probe.heartbeats();
    Ok(json!({
        "paused": m.is_paused(),
        "uptime_ms": m.uptime().as_millis() as u64,
        "config": m.config(),
        "vcpus": status,
        "heartbeats": hb,
        "events": m.devices().probe.events(),
        "stop_reason": m.stop_reason().map(|r| format!("{r:?}")),
    }))
}

/// Sends one request to a control socket and returns the response.
pub fn call(path: &Path, request: &Value) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path)?;
    writeln!(s, "{request}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
