//! Stop-and-copy: the switch-over.
//!
//! 1. pause every vCPU (the source guest stops here: downtime starts);
//! 2. read the dirty log once more (writes since the last round) and send
//!    every page dirtied since it was last sent — the last round;
//! 3. read the complete machine state (vCPUs, VM, devices) and send it;
//! 4. with `--verify`, send a CRC of every page of the final memory;
//! 5. send `Complete`; the destination restores, verifies, resumes, and
//!    answers `Resumed` (downtime ends at its resume);
//! 6. the source stays paused until that answer: if anything fails before
//!    it, the source resumes and the guest has lost nothing.

use std::time::Instant;

use crate::endpoint::SourceVm;
use crate::precopy::{runs, send_round, PrecopyOutcome};
use crate::protocol::{read_frame, Kind, ProtocolError};
use crate::report::{now_ns, DowntimeBreakdown, Report, ResumedInfo};
use crate::source::{set_progress, vm_err, MigrationError, Options, PageSender};
use crate::verify;

/// Pauses the source and moves the rest; returns the report (total time
/// and limits are filled in by the caller).
pub fn switch_over<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    opts: &Options,
    pre: PrecopyOutcome,
    paused: &mut bool,
) -> Result<Report, MigrationError> {
    let paused_at_ns = now_ns();
    s.vm.pause();
    *paused = true;
    let mut dirty = pre.dirty;
    let more =
        s.vm.take_dirty_bitmap()
            .map_err(vm_err("read the dirty log"))?;
    for (d, m) in dirty.iter_mut().zip(&more) {
        *d |= m;
    }
    let last_runs: Vec<_> = runs(&dirty).collect();
    let mut rounds = pre.rounds;
    let last = send_round(s, rounds.len() as u32, &last_runs, true)?;
    let last_round_ms = last.duration_ms;
    rounds.push(last);

    set_progress(&s.progress, |p| p.phase = "state".into());
    let t = Instant::now();
    let state = s.vm.state_blob().map_err(vm_err("save machine state"))?;
    let state_save_ms = t.elapsed().as_secs_f64() * 1e3;
    let state_sent_at = now_ns();
    s.send(Kind::State, &state)?;
    s.flush()?;

    let mut verify_src_ms = 0.0;
    if opts.verify {
        let t = Instant::now();
        let populated =
            s.vm.populated_ranges()
                .map_err(vm_err("find populated memory"))?;
        let crcs = verify::page_crcs(s.vm.ram_size(), &populated, |off, buf| {
            s.vm.read_ram(off, buf)
        })
        .map_err(vm_err("checksum memory"))?;
        verify_src_ms = t.elapsed().as_secs_f64() * 1e3;
        for (i, chunk) in crcs.chunks(verify::CHUNK).enumerate() {
            s.send(
                Kind::Checksums,
                &verify::encode((i * verify::CHUNK) as u64, chunk),
            )?;
        }
    }
    s.send(Kind::Complete, &[])?;
    s.flush()?;
    set_progress(&s.progress, |p| {
        p.phase = "waiting for the destination".into()
    });

    let info = read_resumed(s.stream())?;
    let mut report = Report {
        downtime_ms: info.resumed_at_ns.saturating_sub(paused_at_ns) as f64 / 1e6,
        downtime_breakdown: DowntimeBreakdown {
            last_round_ms,
            state_save_ms,
            state_transfer_ms: info.state_received_at_ns.saturating_sub(state_sent_at) as f64 / 1e6,
            verify_ms: verify_src_ms.max(info.verify_ms),
            restore_ms: info.restore_ms,
            resume_ms: info.resume_ms,
        },
        guest_downtime_ms: info.guest.guest_downtime_ms,
        rounds,
        stop_rule: pre.stop_rule.into(),
        bytes_raw: s.enc.stats.bytes_raw,
        bytes_wire: s.out.bytes,
        pages_verified: info.pages_verified,
        mismatched_pages: info.mismatched_pages,
        guest_verified: info.guest.guest_verified,
        guest_detail: info.guest.detail.clone(),
        ..Default::default()
    };
    report.mode = "pre".into();
    Ok(report)
}

/// Waits for `Resumed`; an `Abort` carries the destination's reason.
fn read_resumed(stream: &std::net::TcpStream) -> Result<ResumedInfo, MigrationError> {
    let mut r = stream;
    let frame = read_frame(&mut r)?;
    let payload = match frame.expect(Kind::Resumed) {
        Ok(p) => p,
        Err(ProtocolError::PeerAborted(reason)) if reason.starts_with("verification") => {
            let n = reason
                .split_whitespace()
                .find_map(|w| w.parse().ok())
                .unwrap_or(0);
            return Err(MigrationError::Mismatch(n));
        }
        Err(ProtocolError::PeerAborted(reason)) if reason.starts_with("guest verification") => {
            return Err(MigrationError::GuestVerification(reason));
        }
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&payload)
        .map_err(|e| ProtocolError::Malformed {
            what: "Resumed",
            detail: e.to_string(),
        })
        .map_err(Into::into)
}
