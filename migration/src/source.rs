//! The source side: connect, authenticate, pre-copy, stop-and-copy. On any
//! failure before the destination confirms it runs, the source guest is
//! resumed exactly as it was: it has lost nothing.

use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::auth::{self, AuthError, Secret};
use crate::codec::{BatchEncoder, Compression, PAGE};
use crate::endpoint::{BoxError, SourceVm};
use crate::protocol::{self, write_frame, Kind, ProtocolError};
use crate::rate_limit::TokenBucket;
use crate::report::{Limits, Report};
use crate::transport::{self, TransportError};
use crate::{precopy, stop_and_copy};

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("VMM operation '{what}' failed")]
    Vm {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("Verification failed: {0} pages differ between source and destination")]
    Mismatch(u64),
    #[error("The guest's own verification failed on the destination: {0}")]
    GuestVerification(String),
    #[error("Post-copy lost its source: {count} pages never arrived (first: {first:?}); {}", if *.paused { "the guest is paused" } else { "the guest could not be fully paused (vCPUs asleep on missing pages)" })]
    MissingPages {
        count: u64,
        first: Vec<u64>,
        paused: bool,
    },
}

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Dirty-log rounds, then stop-and-copy of what is left.
    #[default]
    Pre,
    /// Switch over at once; every page follows on demand or by push.
    Post,
    /// Pre-copy `precopy_bytes` of memory in rounds (until a round dirties
    /// at most the threshold), switch over, post-copy the rest.
    Hybrid { precopy_bytes: u64 },
}

/// Wraps a VMM error with what was being done.
pub fn vm_err(what: &'static str) -> impl FnOnce(BoxError) -> MigrationError {
    move |source| MigrationError::Vm { what, source }
}

/// Migration options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Switch over once the predicted downtime is at most this.
    pub max_downtime: Duration,
    /// Switch over after this many rounds at the latest.
    pub max_rounds: u32,
    /// Switch over once this many bytes were sent.
    pub max_bytes: u64,
    /// Cap the link to this many bytes/s (token bucket).
    pub bandwidth: Option<u64>,
    pub compression: Compression,
    /// Checksum every page on both sides and have the guest check itself.
    pub verify: bool,
    pub mode: Mode,
    /// Hybrid: pre-copy stops once a round dirtied at most this many bytes
    /// (the model's l).
    pub threshold: u64,
    /// Decides the mode after the link rate μ was measured (auto, and the
    /// hybrid split from measured rates).
    pub planner: Option<std::sync::Arc<dyn Planner>>,
    /// Pre-copy: throttle the vCPUs while the guest dirties memory faster
    /// than rounds send it (see `precopy::Throttle`).
    pub auto_converge: bool,
    /// Pre-copy: skip pages the guest dirtied again since the round began
    /// (Xen's "to skip"; see `precopy::send_round`).
    pub skip_redirtied: bool,
}

/// Chooses how to migrate once the link rate is known.
pub trait Planner: Send + Sync + std::fmt::Debug {
    /// `link_bytes_s`: μ as measured by the calibration burst. Returns the
    /// mode and what the decision rested on (put in the report).
    fn plan(&self, link_bytes_s: f64) -> Result<(Mode, serde_json::Value), String>;
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(300),
            max_rounds: 30,
            max_bytes: u64::MAX,
            bandwidth: None,
            compression: Compression::Auto,
            verify: false,
            mode: Mode::Pre,
            threshold: 8 << 20,
            planner: None,
            auto_converge: false,
            skip_redirtied: false,
        }
    }
}

/// Live progress, for a progress bar.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub phase: String,
    pub round: u32,
    pub round_pages_sent: u64,
    pub round_pages_total: u64,
    pub bytes_wire: u64,
    pub ram_pages: u64,
}

/// Shared progress handle.
pub type ProgressHandle = Arc<Mutex<Progress>>;

pub(crate) fn set_progress(p: &ProgressHandle, f: impl FnOnce(&mut Progress)) {
    f(&mut p.lock().unwrap_or_else(|e| e.into_inner()));
}

/// A writer that counts bytes.
#[derive(Debug)]
pub struct Counting<W> {
    pub inner: W,
    pub bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Sends pages: reads them from the source VM, encodes, rate-limits, writes.
pub struct PageSender<'a, V: SourceVm> {
    pub vm: &'a V,
    pub out: Counting<BufWriter<TcpStream>>,
    pub enc: BatchEncoder,
    limiter: Option<TokenBucket>,
    pub progress: ProgressHandle,
}

impl<'a, V: SourceVm> PageSender<'a, V> {
    fn new(vm: &'a V, stream: TcpStream, opts: &Options, progress: ProgressHandle) -> Self {
        Self {
            vm,
            out: Counting {
                inner: BufWriter::with_capacity(1 << 20, stream),
                bytes: 0,
            },
            enc: BatchEncoder::new(opts.compression),
            limiter: opts.bandwidth.map(TokenBucket::new),
            progress,
        }
    }

    /// Sends pages `[first, first + n)`, copied from guest memory straight
    /// into the batch, as many at a time as it has room for.
    pub fn send_run(&mut self, first: u64, n: u64) -> Result<(), MigrationError> {
        let vm = self.vm;
        let mut p = first;
        while p < first + n {
            let k = (first + n - p).min(self.enc.room() as u64);
            self.enc
                .push_run_from(p, k as usize, |slots| vm.read_ram(p * PAGE as u64, slots))
                .map_err(vm_err("read RAM"))?;
            if self.enc.is_full() {
                self.flush_batch()?;
            }
            p += k;
            set_progress(&self.progress, |pr| {
                pr.round_pages_sent += k;
                pr.bytes_wire = self.out.bytes;
            });
        }
        Ok(())
    }

    /// Writes the pending batch as one `Pages` frame.
    pub fn flush_batch(&mut self) -> Result<(), MigrationError> {
        if self.enc.is_empty() {
            return Ok(());
        }
        let frame = self.enc.frame();
        if let Some(l) = &mut self.limiter {
            l.consume(frame[0].len() + frame[1].len());
        }
        // One writev for the whole frame: a full batch is larger than the
        // BufWriter's buffer, so it goes to the socket without a copy.
        protocol::write_all_vectored(&mut self.out, &frame).map_err(ProtocolError::Io)?;
        self.enc.clear();
        Ok(())
    }

    /// Writes a control frame (rate-limited like data).
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
        if let Some(l) = &mut self.limiter {
            l.consume(payload.len() + protocol::HEADER_LEN);
        }
        write_frame(&mut self.out, kind, payload)?;
        Ok(())
    }

    /// Pushes everything buffered to the socket.
    pub fn flush(&mut self) -> Result<(), MigrationError> {
        self.out.flush().map_err(ProtocolError::Io)?;
        Ok(())
    }

    /// The underlying socket (for reading the destination's answers).
    pub fn stream(&self) -> &TcpStream {
        self.out.inner.get_ref()
    }
}

/// Most runs in `Config`'s populated-memory hint (1 MiB of payload).
const MAX_HINT_RUNS: usize = 1 << 16;

/// Migrates `vm` live to `addr` with pre-copy and stop-and-copy.
///
/// On success the source VM is left paused (the caller exits); on failure it
/// runs again as before.
pub fn migrate<V: SourceVm>(
    vm: &V,
    addr: &str,
    secret: &Secret,
    opts: &Options,
    progress: ProgressHandle,
) -> Result<Report, MigrationError> {
    let started = Instant::now();
    set_progress(&progress, |p| {
        p.phase = "connecting".into();
        p.ram_pages = vm.ram_size() / PAGE as u64;
    });
    let mut stream = transport::connect(addr)?;
    auth::authenticate_as_source(&mut stream, secret)?;
    // Config first: it tells the destination whether a fault connection follows.
    let config = vm.config_blob().map_err(vm_err("read config"))?;
    // A planner may choose post-copy, so the fault connection is opened.
    let postcopy = opts.mode != Mode::Pre || opts.planner.is_some();
    // What round 0 will send, so that the destination may allocate it ahead.
    let populated = precopy::coarsen(&precopy::populated_pages(vm)?, MAX_HINT_RUNS);
    write_frame(
        &mut stream,
        Kind::Config,
        &protocol::encode_config(vm.ram_size(), postcopy, &populated, &config),
    )?;
    stream.flush().map_err(ProtocolError::Io)?;
    // Post-copy's demand requests get a connection of their own, so that a
    // faulting vCPU never waits behind bulk pages.
    let fault_conn = if !postcopy {
        None
    } else {
        let mut f = transport::connect(addr)?;
        auth::authenticate_as_source(&mut f, secret)?;
        write_frame(&mut f, Kind::FaultChannel, &[])?;
        f.set_read_timeout(None).map_err(ProtocolError::Io)?;
        Some(f)
    };
    // The destination built its VM: nothing of that lands in the downtime.
    protocol::read_frame(&mut stream)?.expect(Kind::Ready)?;
    let shared = crate::postcopy::SourceShared::default();
    let ram_pages = vm.ram_size() / PAGE as u64;
    let mut sender = PageSender::new(vm, stream, opts, progress);
    let mut opts = opts.clone();
    let mut prediction = None;
    if let Some(planner) = opts.planner.take() {
        let planning = Instant::now();
        let mu = calibrate(&mut sender)?;
        let (mode, mut why) = planner
            .plan(mu)
            .map_err(|e| vm_err("plan the migration")(e.into()))?;
        // The burst is measurement, not migration: keep it out of bytes_wire.
        why["calibration_bytes"] = sender.out.bytes.into();
        // Preparation (seed 001's stage 1) is part of total_time_ms.
        why["planning_ms"] = (planning.elapsed().as_secs_f64() * 1e3).into();
        sender.out.bytes = 0;
        opts.mode = mode;
        prediction = Some(why);
    }
    let opts = &opts;
    let mut paused = false;
    let result = std::thread::scope(|scope| {
        if let Some(f) = fault_conn {
            let shared = &shared;
            scope.spawn(move || crate::postcopy::serve_faults(vm, f, shared, ram_pages));
        }
        let r = run(&mut sender, opts, &mut paused, &shared);
        // Closing our side ends the destination's reply thread and our server.
        let _ = sender.stream().shutdown(std::net::Shutdown::Both);
        r
    });
    // Whatever happened, the guest's vCPUs get their full time back.
    vm.set_throttle(0);
    match result {
        Ok(mut report) => {
            report.total_time_ms = started.elapsed().as_secs_f64() * 1e3;
            report.prediction = prediction;
            report.limits = Limits {
                max_downtime_ms: opts.max_downtime.as_secs_f64() * 1e3,
                max_rounds: opts.max_rounds,
                max_bytes: opts.max_bytes,
                bandwidth_bytes_s: opts.bandwidth,
                auto_converge: opts.auto_converge,
                skip_redirtied: opts.skip_redirtied,
            };
            let _ = vm.stop_dirty_log();
            Ok(report)
        }
        Err(e) => {
            // A destination that gives up says why in an Abort frame before
            // closing; our writes may have failed on the closed socket first.
            let e = peer_reason(sender.stream()).unwrap_or(e);
            // Tell the destination (if it still listens), then give the guest
            // back its vCPUs: its memory and state were never changed.
            let _ = sender.send(Kind::Abort, e.to_string().as_bytes());
            let _ = sender.flush();
            let _ = vm.stop_dirty_log();
            if paused {
                vm.resume();
            }
            Err(e)
        }
    }
}

/// Measures the link rate μ: about 250 ms (at most 64 MiB) of `Probe`
/// frames, rate-limited like real data, timed until the destination
/// acknowledges that it read them all.
fn calibrate<V: SourceVm>(s: &mut PageSender<'_, V>) -> Result<f64, MigrationError> {
    set_progress(&s.progress, |p| p.phase = "measuring the link".into());
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < Duration::from_millis(250) && sent < 64 << 20 {
        s.send(Kind::Probe, &chunk)?;
        sent += chunk.len() as u64;
    }
    s.send(
        Kind::RoundEnd,
        &protocol::encode_round_end(CALIBRATION_ROUND),
    )?;
    s.flush()?;
    let mut r = s.stream();
    let ack = protocol::read_frame(&mut r)?.expect(Kind::RoundAck)?;
    if protocol::decode_round_end(&ack)? != CALIBRATION_ROUND {
        return Err(protocol::malformed("RoundAck", "not the calibration's").into());
    }
    Ok(sent as f64 / t.elapsed().as_secs_f64())
}

/// `RoundEnd` number that closes the calibration burst.
pub const CALIBRATION_ROUND: u32 = u32::MAX;

/// An `Abort` the destination sent, if one is waiting on the socket.
fn peer_reason(stream: &TcpStream) -> Option<MigrationError> {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut r = stream;
    // Skip anything else the destination may have queued.
    for _ in 0..4 {
        match protocol::read_frame(&mut r) {
            Ok(f) if f.kind == Kind::Abort => {
                let reason = String::from_utf8_lossy(&f.payload).into_owned();
                return Some(ProtocolError::PeerAborted(reason).into());
            }
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

fn run<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    opts: &Options,
    paused: &mut bool,
    shared: &crate::postcopy::SourceShared,
) -> Result<Report, MigrationError> {
    match opts.mode {
        Mode::Pre => {
            let pre = precopy::run_rounds(s, opts, None)?;
            stop_and_copy::switch_over(s, opts, pre, paused)
        }
        Mode::Post => stop_and_copy::switch_over_postcopy(s, opts, None, paused, shared),
        Mode::Hybrid { precopy_bytes } => {
            let pre = precopy::run_rounds(s, opts, Some(precopy_bytes))?;
            stop_and_copy::switch_over_postcopy(s, opts, Some(pre), paused, shared)
        }
    }
}
