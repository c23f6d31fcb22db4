//! Stop-and-copy: the switch-over.
//!
//! 1. pause every vCPU (the source guest stops here: downtime starts);
//! 2. read the dirty log once more (writes since the last round) and send
//!    every page dirtied since it was last sent — the last round;
//! 3. read the complete machine state (vCPUs, VM, devices) and send it;
//! 4. with `--verify`, send a CRC of every page of the final memory;
//! 5. send `Complete`; the destination checks that every page arrived
//!    and matches, and answers `Prepared` (restored, still paused);
//! 6. send `Commit`: from the moment it is written the source is *fenced*
//!    and never runs the guest again ([`Fence::committed`]); the
//!    destination resumes and answers `Resumed` (downtime ends there);
//! 7. if anything fails before `Commit`, the source resumes and the guest
//!    has lost nothing; after it, the source asks the destination what it
//!    did instead of guessing (see `source`).
//! 8. a pause that outlasts the downtime limit by the margin before
//!    `Commit` fails the switch-over too ([`crate::pause_bound`]).

use std::time::{Duration, Instant};

use crate::bitmap::DirtyBitmap;
use crate::codec::PAGE;
use crate::endpoint::SourceVm;
use crate::error::{vm_err, MigrationError};
use crate::events::EventKind;
use crate::policy::PushOrder;
use crate::postcopy::{push, SourceShared};
use crate::precopy::{send_round, PrecopyOutcome};
use crate::protocol::{read_frame, Kind, ProtocolError};
use crate::report::{now_ns, DowntimeBreakdown, PostcopyReport, Report, ResumedInfo};
use crate::sender::{set_progress, PageSender};
use crate::{transport, verify};

/// How far the switch-over got: what the source may do after a failure.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The vCPUs were paused.
    pub paused: bool,
    /// `Commit` was (being) written: the source must never resume the guest
    /// unless the destination says it discarded it.
    pub committed: bool,
    /// The destination confirmed it resumed the guest.
    pub resumed: bool,
    /// The switch-over is to post-copy: the destination needs the source's
    /// pages after it resumed.
    pub postcopy: bool,
}

impl Fence {
    /// Whether the source may (and should) resume its guest after a failure.
    pub fn may_resume(&self) -> bool {
        self.paused && !self.committed
    }
}

/// Pauses the source and moves the rest; returns the report (total time
/// and limits are filled in by the caller).
pub fn switch_over<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    verify: bool,
    commit_timeout: Duration,
    pre: PrecopyOutcome,
    fence: &mut Fence,
) -> Result<Report, MigrationError> {
    let paused_at_ns = now_ns();
    let t = Instant::now();
    s.vm.pause();
    let pause_ms = t.elapsed().as_secs_f64() * 1e3;
    fence.paused = true;
    let watchdog = s.watch_pause();
    s.control.emit(EventKind::Paused);
    let mut dirty = pre.dirty;
    dirty.union_with(&take_dirty(s.vm)?);
    let last_runs: Vec<_> = dirty.runs().collect();
    let mut rounds = pre.rounds;
    let last = send_round(s, rounds.len() as u32, &last_runs, true, None)?;
    let last_round_ms = last.duration_ms;
    rounds.push(last);

    let (state_save_ms, state_sent_at) = send_state(s)?;
    let verify_src_ms = if verify { send_checksums(s)? } else { 0.0 };
    watchdog.extend(Duration::from_secs_f64(2.0 * verify_src_ms / 1e3));
    let info = commit(s, commit_timeout, fence, watchdog)?;
    let breakdown = DowntimeBreakdown {
        pause_ms,
        postcopy_setup_ms: 0.0,
        last_round_ms,
        state_save_ms,
        state_transfer_ms: info.state_received_at_ns.saturating_sub(state_sent_at) as f64 / 1e6,
        // The source checksums, then the destination: one after the other.
        verify_ms: verify_src_ms + info.verify_ms,
        restore_ms: info.restore_ms,
        resume_ms: info.resume_ms,
    };
    let (downtime_ms, downtime_with_verify_ms) =
        breakdown.split(info.resumed_at_ns.saturating_sub(paused_at_ns) as f64 / 1e6);
    s.control.emit(EventKind::SwitchedOver { downtime_ms });
    let mut report = Report {
        downtime_ms,
        downtime_with_verify_ms,
        downtime_breakdown: breakdown,
        guest_downtime_ms: info.guest.guest_downtime_ms,
        rounds,
        stop_rule: pre.stop_rule.name().into(),
        bytes_raw: s.enc.stats.bytes_raw,
        bytes_wire: s.out.bytes,
        prefault_ms: info.prefault_ms,
        pages_verified: info.pages_verified,
        mismatched_pages: info.mismatched_pages,
        guest_verified: info.guest.guest_verified,
        guest_detail: info.guest.detail.clone(),
        ..Default::default()
    };
    report.mode = "pre".into();
    Ok(report)
}

/// Switch-over to post-copy (pure, or after hybrid pre-copy rounds):
/// pause, send the state and the list of pages the destination still needs
/// (for the hybrid: the share's pages dirtied since they were sent — they
/// are *not* re-sent while the guest is stopped), resume the destination,
/// then push the needed pages while the destination pulls what it faults on.
pub fn switch_over_postcopy<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    verify: bool,
    commit_timeout: Duration,
    pre: Option<PrecopyOutcome>,
    fence: &mut Fence,
    shared: &SourceShared,
    order: PushOrder,
) -> Result<Report, MigrationError> {
    let paused_at_ns = now_ns();
    let t = Instant::now();
    s.vm.pause();
    let pause_ms = t.elapsed().as_secs_f64() * 1e3;
    fence.paused = true;
    let watchdog = s.watch_pause();
    s.control.emit(EventKind::Paused);
    let mut needed = still_needed(s.vm, &s.declared, pre.as_ref())?;
    let first_touched = send_first_touched(s, &mut needed)?;
    let (state_save_ms, state_sent_at) = send_state(s)?;
    let verify_src_ms = if verify { send_checksums(s)? } else { 0.0 };
    watchdog.extend(Duration::from_secs_f64(2.0 * verify_src_ms / 1e3));
    let needed_runs: Vec<_> = needed.runs().collect();
    s.send(
        Kind::PostcopyBegin,
        &crate::protocol::encode_runs(&needed_runs),
    )?;
    let info = commit(s, commit_timeout, fence, watchdog)?;
    s.control.emit(EventKind::SwitchedOver {
        downtime_ms: info.resumed_at_ns.saturating_sub(paused_at_ns) as f64 / 1e6,
    });

    let push_started = Instant::now();
    let pushed = push(s, &needed, shared, order)?;
    s.send(Kind::PostcopyDone, &[])?;
    s.flush()?;
    set_progress(&s.progress, |p| {
        p.phase = "waiting for the last pages".into()
    });
    let mut r = s.stream();
    let done = read_frame(&mut r)?.expect(Kind::PostcopyComplete)?;
    s.control.emit(EventKind::PostcopyComplete);
    let stats: PostcopyReport =
        serde_json::from_slice(&done).map_err(|e| ProtocolError::Malformed {
            what: "PostcopyComplete",
            detail: e.to_string(),
        })?;
    tracing::info!(
        "post-copy: {first_touched} pages sent with the state, {pushed} pushed in {:.1} ms",
        push_started.elapsed().as_secs_f64() * 1e3
    );
    let (mode, rounds, stop_rule) = match pre {
        Some(p) => ("hybrid", p.rounds, p.stop_rule.name()),
        None => ("post", Vec::new(), "none"),
    };
    let breakdown = DowntimeBreakdown {
        pause_ms,
        postcopy_setup_ms: info.postcopy_setup_ms,
        last_round_ms: 0.0,
        state_save_ms,
        state_transfer_ms: info.state_received_at_ns.saturating_sub(state_sent_at) as f64 / 1e6,
        verify_ms: verify_src_ms + info.verify_ms,
        restore_ms: info.restore_ms,
        resume_ms: info.resume_ms,
    };
    let (downtime_ms, downtime_with_verify_ms) =
        breakdown.split(info.resumed_at_ns.saturating_sub(paused_at_ns) as f64 / 1e6);
    Ok(Report {
        mode: mode.into(),
        downtime_ms,
        downtime_with_verify_ms,
        downtime_breakdown: breakdown,
        guest_downtime_ms: info.guest.guest_downtime_ms,
        rounds,
        stop_rule: stop_rule.into(),
        bytes_raw: s.enc.stats.bytes_raw + stats.postcopy.pages_pulled * PAGE as u64,
        bytes_wire: s.out.bytes + stats.postcopy.bytes_pulled,
        pages_verified: info.pages_verified + stats.pages_verified,
        mismatched_pages: info.mismatched_pages + stats.mismatched_pages,
        guest_verified: stats.guest.guest_verified,
        guest_detail: stats.guest.detail.clone(),
        postcopy: Some(stats.postcopy),
        ..Default::default()
    })
}

/// Post-copy: sends the still-needed pages the vCPUs will touch first
/// (their code, stacks, descriptor tables, page tables: see
/// `SourceVm::first_touched_ram`) ahead of the state, so that the guest
/// resumes without waiting for a fault's round trip, and takes them out of
/// `needed`. Returns how many were sent.
fn send_first_touched<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    needed: &mut DirtyBitmap,
) -> Result<u64, MigrationError> {
    let offsets =
        s.vm.first_touched_ram()
            .map_err(vm_err("find the pages the vCPUs touch first"))?;
    let mut sent = DirtyBitmap::new(needed.capacity());
    for page in offsets.iter().map(|o| o / PAGE as u64) {
        if needed.contains(page) {
            sent.insert(page);
        }
    }
    for (first, n) in sent.runs() {
        s.send_run(first, n)?;
    }
    s.flush_batch()?;
    needed.subtract(&sent);
    Ok(sent.count())
}

/// Pages written since the dirty log was last read.
fn take_dirty<V: SourceVm>(vm: &V) -> Result<DirtyBitmap, MigrationError> {
    vm.take_dirty_bitmap()
        .map(DirtyBitmap::from_words)
        .map_err(vm_err("read the dirty log"))
}

/// The pages post-copy must bring: every populated (or declared) page, except those
/// pre-copy sent (if it ran) and the guest has not dirtied since.
fn still_needed<V: SourceVm>(
    vm: &V,
    declared: &[(u64, u64)],
    pre: Option<&PrecopyOutcome>,
) -> Result<DirtyBitmap, MigrationError> {
    let ram_pages = vm.ram_size() / PAGE as u64;
    let populated = crate::precopy::pages_to_deliver(vm, declared)?;
    let mut needed = DirtyBitmap::from_runs(ram_pages, &populated);
    if let Some(p) = pre {
        let mut clean = p.covered.clone();
        clean.subtract(&p.dirty);
        clean.subtract(&take_dirty(vm)?);
        needed.subtract(&clean);
    }
    Ok(needed)
}

/// Reads the machine state (vCPUs paused) and sends it at once; returns
/// how long the read took and when the send began.
fn send_state<V: SourceVm>(s: &mut PageSender<'_, V>) -> Result<(f64, u64), MigrationError> {
    set_progress(&s.progress, |p| p.phase = "state".into());
    let t = Instant::now();
    let state = s.vm.state_blob().map_err(vm_err("save machine state"))?;
    let save_ms = t.elapsed().as_secs_f64() * 1e3;
    let sent_at = now_ns();
    s.send(Kind::State, &state)?;
    s.flush()?;
    Ok((save_ms, sent_at))
}

/// CRC of every page of the final memory (`--verify`).
fn send_checksums<V: SourceVm>(s: &mut PageSender<'_, V>) -> Result<f64, MigrationError> {
    let t = Instant::now();
    let populated =
        s.vm.populated_ranges()
            .map_err(vm_err("find populated memory"))?;
    let crcs = verify::page_crcs(s.vm.ram_size(), &populated, |off, buf| {
        s.vm.read_ram(off, buf)
    })
    .map_err(vm_err("checksum memory"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    for (i, chunk) in crcs.chunks(verify::CHUNK).enumerate() {
        s.send(
            Kind::Checksums,
            &verify::encode((i * verify::CHUNK) as u64, chunk),
        )?;
    }
    Ok(ms)
}

/// The commit: `Complete` ◀ `Prepared`, then `Commit` ◀ `Resumed`, each
/// answer awaited at most `timeout`. `fence.committed` is set *before*
/// `Commit` is written: a write that fails halfway may still have reached
/// the destination, so from then on the source must not resume on its own.
fn commit<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    timeout: Duration,
    fence: &mut Fence,
    watchdog: crate::pause_bound::PauseWatchdog,
) -> Result<ResumedInfo, MigrationError> {
    s.send(Kind::Complete, &[])?;
    s.flush()?;
    set_progress(&s.progress, |p| {
        p.phase = "waiting for the destination".into()
    });
    let stream = s.stream();
    stream
        .set_read_timeout(Some(timeout))
        .map_err(ProtocolError::Io)?;
    let mut r = stream;
    expect_or_abort(read_frame(&mut r)?, Kind::Prepared)?;
    // The pause bound may resume the source only before `Commit`: stop it
    // now, and if it already fired (and shut the connection), do not commit.
    if watchdog.disarm() {
        return Err(s.pause_overrun().unwrap_or(ProtocolError::Closed.into()));
    }
    fence.committed = true;
    s.send(Kind::Commit, &[])?;
    s.flush()?;
    set_progress(&s.progress, |p| {
        p.phase = "committed: waiting for the destination to resume".into()
    });
    let info = read_resumed(s.stream())?;
    fence.resumed = true;
    s.stream()
        .set_read_timeout(Some(transport::PEER_TIMEOUT))
        .map_err(ProtocolError::Io)?;
    Ok(info)
}

/// The payload of `frame` if it is of kind `expected`; an `Abort` carries
/// the destination's reason.
fn expect_or_abort(
    frame: crate::protocol::Frame,
    expected: Kind,
) -> Result<Vec<u8>, MigrationError> {
    match frame.expect(expected) {
        Ok(p) => Ok(p),
        Err(ProtocolError::PeerAborted(abort)) => Err(MigrationError::from_abort(abort)),
        Err(e) => Err(e.into()),
    }
}

/// Waits for `Resumed`; an `Abort` carries the destination's reason.
fn read_resumed(stream: &crate::secure::SecureStream) -> Result<ResumedInfo, MigrationError> {
    let mut r = stream;
    let frame = read_frame(&mut r)?;
    let payload = match frame.expect(Kind::Resumed) {
        Ok(p) => p,
        Err(ProtocolError::PeerAborted(abort)) => return Err(MigrationError::from_abort(abort)),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&payload)
        .map_err(|e| ProtocolError::Malformed {
            what: "Resumed",
            detail: e.to_string(),
        })
        .map_err(Into::into)
}
