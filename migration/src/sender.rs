//! The page sender: the one path by which the source puts bytes on the
//! main connection (pages read from guest memory and encoded, control
//! frames), rate-limited and counted, with the live progress it updates.
//! Every phase of the source sends through it.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::codec::{BatchEncoder, PAGE};
use crate::control::{Cancelled, ControlHandle};
use crate::endpoint::SourceVm;
use crate::error::{vm_err, MigrationError};
use crate::options::Options;
use crate::pause_bound::PauseWatchdog;
use crate::protocol::{self, write_frame, Kind, ProtocolError};
use crate::rate_limit::TokenBucket;
use crate::secure::SecureStream;

/// Live progress, for a progress bar.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub phase: String,
    pub round: u32,
    pub round_pages_sent: u64,
    pub round_pages_total: u64,
    pub bytes_wire: u64,
    pub ram_pages: u64,
    /// Pages still to send: the rest of this round, or what the last
    /// round left dirty.
    pub pages_remaining: u64,
    /// Throughput of the last round, MB/s.
    pub throughput_mb_s: f64,
    /// Pages/s the guest dirtied during the last round.
    pub dirty_rate_pages_s: f64,
    /// The downtime if the switch-over came after the last round.
    pub expected_downtime_ms: f64,
    /// Seconds until the current round ends at the last round's throughput
    /// (pre-copy's end depends on the guest: this is a lower bound).
    pub eta_s: Option<f64>,
    /// The limits the current round runs with (changed by set-parameters).
    pub limits: Option<crate::report::Limits>,
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
    pub out: Counting<BufWriter<SecureStream>>,
    pub enc: BatchEncoder,
    limiter: Option<TokenBucket>,
    pub progress: ProgressHandle,
    /// Cancel and parameter changes from whoever steers the migration.
    pub control: ControlHandle,
    /// The control's parameter generation the limiter was built for.
    seen_generation: u64,
    /// The downtime limit the migration started with, and the margin of
    /// the hard bound on the pause over it.
    max_downtime: Duration,
    pause_margin: Duration,
    /// Set when the pause bound fired.
    pause_overrun: Arc<AtomicBool>,
    /// The page runs `Config` declared: each must reach the destination
    /// (round 0, or post-copy), which checks that they did.
    pub declared: Vec<(u64, u64)>,
}

impl<'a, V: SourceVm> PageSender<'a, V> {
    pub fn new(
        vm: &'a V,
        stream: SecureStream,
        opts: &Options,
        progress: ProgressHandle,
        control: ControlHandle,
    ) -> Self {
        let seen_generation = control.generation();
        Self {
            vm,
            out: Counting {
                inner: BufWriter::with_capacity(1 << 20, stream),
                bytes: 0,
            },
            enc: BatchEncoder::new(opts.compression),
            limiter: opts.bandwidth.map(TokenBucket::new),
            progress,
            control,
            seen_generation,
            max_downtime: opts.max_downtime,
            pause_margin: opts.pause_margin,
            pause_overrun: Arc::default(),
            declared: Vec::new(),
        }
    }

    /// The downtime limit in force (set-parameters may have changed it).
    pub fn max_downtime(&self) -> Duration {
        self.control
            .changes()
            .max_downtime
            .unwrap_or(self.max_downtime)
    }

    /// Call as the source pauses: until the returned watchdog is disarmed
    /// (the destination confirmed), a pause longer than the downtime limit
    /// plus the margin shuts the connection down (see
    /// [`crate::pause_bound`]).
    pub fn watch_pause(&self) -> PauseWatchdog {
        let budget = self.max_downtime() + self.pause_margin;
        PauseWatchdog::arm(self.stream().socket(), budget, self.pause_overrun.clone())
    }

    /// Whether the pause bound fired: the error the switch-over ended
    /// with was caused by it.
    pub fn pause_overrun(&self) -> Option<MigrationError> {
        self.pause_overrun
            .load(Ordering::Acquire)
            .then(|| MigrationError::PauseExceeded {
                limit: self.max_downtime(),
                margin: self.pause_margin,
            })
    }

    /// A safe point: fails with [`Cancelled`] if a cancel is pending
    /// (never after the switch-over, where a cancel is refused).
    pub fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.control.cancel_requested() {
            return Err(Cancelled.into());
        }
        Ok(())
    }

    /// Rebuilds the token bucket if the bandwidth was changed.
    fn follow_bandwidth(&mut self) {
        let generation = self.control.generation();
        if generation == self.seen_generation {
            return;
        }
        self.seen_generation = generation;
        if let Some(cap) = self.control.changes().bandwidth {
            self.limiter = cap.map(TokenBucket::new);
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
                // Between batches: a cancel waits at most one batch.
                self.check_cancel()?;
            }
            p += k;
            set_progress(&self.progress, |pr| {
                pr.round_pages_sent += k;
                pr.bytes_wire = self.out.bytes;
                pr.pages_remaining = pr.round_pages_total.saturating_sub(pr.round_pages_sent);
                pr.eta_s = crate::precopy::eta_s(pr.pages_remaining, pr.throughput_mb_s);
            });
        }
        Ok(())
    }

    /// Writes the pending batch as one `Pages` frame.
    pub fn flush_batch(&mut self) -> Result<(), MigrationError> {
        if self.enc.is_empty() {
            return Ok(());
        }
        self.follow_bandwidth();
        let frame = self.enc.frame();
        if let Some(l) = &mut self.limiter {
            l.consume(frame[0].len() + frame[1].len());
        }
        // One writev for the whole frame: a full batch is larger than the
        // BufWriter's buffer, so it goes to the socket without a copy.
        protocol::write_all_vectored(&mut self.out, &frame).map_err(ProtocolError::from)?;
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
        self.out.flush().map_err(ProtocolError::from)?;
        Ok(())
    }

    /// The underlying stream (for reading the destination's answers).
    pub fn stream(&self) -> &SecureStream {
        self.out.inner.get_ref()
    }
}
