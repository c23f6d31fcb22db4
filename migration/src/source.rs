//! The source side, the orchestrator: connect, authenticate, ask the
//! policy, then run the phases it chooses — pre-copy rounds
//! ([`crate::precopy`]), the switch-over ([`crate::stop_and_copy`]),
//! post-copy ([`crate::postcopy`]) — following [`SourcePhase`]. On any
//! failure before `Commit`, the source guest is resumed exactly as it was:
//! it has lost nothing. After `Commit` the source is fenced: it asks the
//! destination what it did ([`crate::commit::query`]) and resumes only if
//! the destination discarded the guest; if it cannot tell, it keeps the
//! guest paused and says so ([`MigrationError::OutcomeUnknown`]).

use std::io::Write;
use std::time::{Duration, Instant};

use crate::codec::PAGE;
use crate::commit::{self, Outcome};
use crate::control::{Control, ControlHandle};
use crate::endpoint::SourceVm;
use crate::error::{vm_err, MigrationError};
use crate::events::EventKind;
use crate::options::Options;
use crate::policy::{
    Builtin, History, Measured, Plan, PlanView, Policy, PolicyError, Setup, SetupView, Start,
};
use crate::postcopy::SourceShared;
use crate::precopy::PrecopyOutcome;
use crate::protocol::{self, write_frame, Abort, AbortCode, ConfigFlags, Kind, ProtocolError};
use crate::report::{DowntimeOverrun, Report};
use crate::secure::{self, Protection, SecureStream};
use crate::sender::{set_progress, PageSender};
/// The progress handle a caller passes to [`migrate`].
pub use crate::sender::{Progress, ProgressHandle};
use crate::state::{SourceEvent, SourcePhase};
use crate::stop_and_copy::Fence;
use crate::{access_rate, precopy, stop_and_copy};

/// Most runs in `Config`'s populated-memory hint (1 MiB of payload): as
/// many as the destination accepts.
const MAX_HINT_RUNS: usize = protocol::MAX_CONFIG_RUNS;

/// How long the guest's read and write rates are sampled before planning.
const RATE_WINDOW: Duration = Duration::from_millis(1000);
/// Pages sampled for the read rate.
const RATE_SAMPLES: u64 = 4096;

/// Migrates `vm` live to `addr` under the built-in policy `opts` describe.
///
/// On success the source VM is left paused (the caller exits); on failure it
/// runs again as before.
pub fn migrate<V: SourceVm>(
    vm: &V,
    addr: &str,
    protection: &Protection,
    opts: &Options,
    progress: ProgressHandle,
) -> Result<Report, MigrationError> {
    migrate_with_policy(
        vm,
        addr,
        protection,
        opts,
        &mut Builtin::new(opts),
        progress,
    )
}

/// Migrates `vm` live to `addr`, asking `policy` at every decision point
/// (`opts` gives the link's settings and the limits the policy sees).
pub fn migrate_with_policy<V: SourceVm>(
    vm: &V,
    addr: &str,
    protection: &Protection,
    opts: &Options,
    policy: &mut dyn Policy,
    progress: ProgressHandle,
) -> Result<Report, MigrationError> {
    let control = std::sync::Arc::new(Control::default());
    migrate_controlled(vm, addr, protection, opts, policy, progress, control)
}

/// Like [`migrate_with_policy`], steered through `control`: a cancel
/// before the switch-over ends it with [`MigrationError::Cancelled`] (the
/// destination is told with a typed `Abort`), and new limits apply from
/// the next round.
pub fn migrate_controlled<V: SourceVm>(
    vm: &V,
    addr: &str,
    protection: &Protection,
    opts: &Options,
    policy: &mut dyn Policy,
    progress: ProgressHandle,
    control: ControlHandle,
) -> Result<Report, MigrationError> {
    let r = run_migration(
        vm,
        addr,
        protection,
        opts,
        policy,
        progress,
        control.clone(),
    );
    control.emit(match &r {
        Ok(_) => EventKind::Completed,
        Err(e) if e.is_cancelled() => EventKind::Cancelled,
        Err(e) => EventKind::Failed {
            error: error_chain(e),
        },
    });
    r
}

/// `e` and its sources, for the event stream.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s += &format!(": {c}");
        source = c.source();
    }
    s
}

/// The body of [`migrate_controlled`].
fn run_migration<V: SourceVm>(
    vm: &V,
    addr: &str,
    protection: &Protection,
    opts: &Options,
    policy: &mut dyn Policy,
    progress: ProgressHandle,
    control: ControlHandle,
) -> Result<Report, MigrationError> {
    let started = Instant::now();
    set_progress(&progress, |p| {
        p.phase = "connecting".into();
        p.ram_pages = vm.ram_size() / PAGE as u64;
    });
    let mut phase = SourcePhase::Handshake;
    let mut stream = secure::connect(addr, protection)?;
    phase = phase.next(SourceEvent::Authenticated)?;
    let setup_view = SetupView {
        ram_bytes: vm.ram_size(),
        populated_bytes: populated_bytes(vm)?,
        limits: opts.limits(),
    };
    let mut setup = policy.setup(&setup_view)?;
    // Asked up front, so that a running pre-copy may switch to post-copy.
    setup.may_postcopy |= opts.postcopy_ready;
    let flags = ConfigFlags {
        postcopy: setup.may_postcopy,
        verify: opts.verify,
    };
    let (fault_conn, declared) = send_config(vm, &mut stream, addr, protection, flags)?;
    control.set_postcopy_prepared(fault_conn.is_some());
    let mut sender = PageSender::new(vm, stream, opts, progress, control);
    sender.declared = declared;
    let plan = plan(&mut sender, policy, setup, setup_view)?;
    phase = phase.next(SourceEvent::Planned(plan.plan.start))?;
    let mut history = History {
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        limits: opts.limits(),
        measured: plan.measured,
        start: plan.plan.start,
        rounds: Vec::new(),
        pending_pages: 0,
        bytes_sent: 0,
    };
    let shared = SourceShared::default();
    let mut fence = Fence::default();
    let ram_pages = vm.ram_size() / PAGE as u64;
    let result = std::thread::scope(|scope| {
        let can_postcopy = fault_conn.is_some();
        // The fault server reads without a timeout (the guest may not fault
        // for a long while): it ends when this side closes the connection,
        // once the main flow ended whichever way, so that a silent
        // partition cannot hold the migration after the main connection
        // timed out.
        let mut fault_closer = None;
        if let Some(f) = fault_conn {
            fault_closer = f.try_clone().ok();
            let shared = &shared;
            scope.spawn(move || crate::postcopy::serve_faults(vm, f, shared, ram_pages));
        }
        let mut run = Run {
            sender: &mut sender,
            policy,
            history: &mut history,
            phase: &mut phase,
            fence: &mut fence,
            shared: &shared,
            verify: opts.verify,
            commit_timeout: opts.commit_timeout,
            can_postcopy,
            started,
        };
        let r = run.phases();
        if let Err(e @ MigrationError::Cancelled(_)) = &r {
            // Cancelled: the destination still listens; tell it why.
            let _ = sender.send(Kind::Abort, &e.to_abort(AbortCode::SourceFailed).encode());
            let _ = sender.flush();
        }
        // Closing our side ends the destination's reply thread and our server.
        let _ = sender.stream().shutdown(std::net::Shutdown::Both);
        if let Some(f) = fault_closer {
            let _ = f.shutdown(std::net::Shutdown::Both);
        }
        r
    });
    // Whatever happened, the guest's vCPUs get their full time back.
    vm.set_throttle(0);
    let _ = vm.stop_dirty_log();
    match result {
        Ok(mut report) => {
            report.total_time_ms = started.elapsed().as_secs_f64() * 1e3;
            // The destination's words: shown to the user, never raw.
            report.guest_detail =
                protocol::printable(&report.guest_detail, protocol::MAX_PEER_TEXT);
            report.prediction = plan.plan.prediction;
            // The limits in force at the end (set-parameters may change them).
            report.limits = history.limits.clone();
            report.downtime_overrun = DowntimeOverrun::of(&report);
            Ok(report)
        }
        Err(e) if e.is_cancelled() => {
            // The Abort went before the connection closed.
            if fence.may_resume() {
                vm.resume();
            }
            Err(e)
        }
        Err(e) if fence.committed => after_commit_failure(vm, addr, protection, fence, e),
        Err(e) => {
            // The pause bound shut the connection: that is why it failed.
            // Otherwise a destination that gives up says why in an Abort
            // frame before closing; our writes may have failed on the closed
            // socket first.
            let e = match sender.pause_overrun() {
                Some(overrun) => overrun,
                None => peer_reason(sender.stream()).unwrap_or(e),
            };
            // Tell the destination (if it still listens), then give the guest
            // back its vCPUs: its memory and state were never changed.
            let abort = e.to_abort(AbortCode::SourceFailed);
            let _ = sender.send(Kind::Abort, &abort.encode());
            let _ = sender.flush();
            if fence.may_resume() {
                vm.resume();
            }
            Err(e)
        }
    }
}

/// The source wrote `Commit` and then failed: it is fenced. It asks the
/// destination (a new connection) what it did with the guest and acts on
/// the answer, never on a guess:
/// - discarded: the destination never ran it; the source resumes;
/// - resumed (pre-copy): the guest lives there; the migration succeeded;
/// - resumed (post-copy), or no answer: the guest stays paused here, and
///   the error says so.
fn after_commit_failure<V: SourceVm>(
    vm: &V,
    addr: &str,
    protection: &Protection,
    fence: Fence,
    e: MigrationError,
) -> Result<Report, MigrationError> {
    tracing::warn!("failed after Commit ({e}): asking the destination what it did");
    if fence.resumed {
        // Post-copy: the destination runs the guest with pages missing.
        return Err(MigrationError::PostcopyFenced(error_chain(&e)));
    }
    match commit::query(addr, protection) {
        Ok(Outcome::Discarded) => {
            tracing::warn!("the destination discarded the guest: resuming it here");
            vm.resume();
            Err(e)
        }
        Ok(Outcome::Resumed) if fence.postcopy => {
            Err(MigrationError::PostcopyFenced(error_chain(&e)))
        }
        Ok(Outcome::Resumed) => {
            tracing::warn!("the destination resumed the guest: the migration succeeded");
            Ok(Report {
                mode: "pre".into(),
                guest_detail: format!(
                    "Resumed was lost ({}); the destination confirmed it resumed when asked",
                    error_chain(&e)
                ),
                ..Default::default()
            })
        }
        Ok(Outcome::Undecided) => Err(outcome_unknown(addr, &e, "the destination is undecided")),
        Err(q) => Err(outcome_unknown(
            addr,
            &e,
            &format!("asking it failed: {}", error_chain(&q)),
        )),
    }
}

fn outcome_unknown(addr: &str, e: &MigrationError, why: &str) -> MigrationError {
    MigrationError::OutcomeUnknown {
        to: addr.to_string(),
        why: format!("{}; {why}", error_chain(e)),
    }
}

/// Bytes of RAM the guest ever wrote.
fn populated_bytes<V: SourceVm>(vm: &V) -> Result<u64, MigrationError> {
    Ok(vm
        .populated_ranges()
        .map_err(vm_err("find populated memory"))?
        .iter()
        .map(|r| r.1)
        .sum())
}

/// The fault connection (post-copy) and the page runs `Config` declared.
type Configured = (Option<SecureStream>, Vec<(u64, u64)>);

/// Sends `Config`, opens the fault connection if post-copy may follow,
/// and waits until the destination is `Ready`.
fn send_config<V: SourceVm>(
    vm: &V,
    stream: &mut SecureStream,
    addr: &str,
    protection: &Protection,
    flags: ConfigFlags,
) -> Result<Configured, MigrationError> {
    // Config first: it tells the destination whether a fault connection follows.
    let config = vm.config_blob().map_err(vm_err("read config"))?;
    // What round 0 will send, so that the destination may allocate it ahead.
    // Sorted: the destination refuses runs out of order.
    let mut populated = precopy::populated_pages(vm)?;
    populated.sort_unstable();
    let populated = precopy::coarsen(&populated, MAX_HINT_RUNS);
    write_frame(
        stream,
        Kind::Config,
        &protocol::encode_config(vm.ram_size(), flags, &populated, &config),
    )?;
    stream.flush().map_err(ProtocolError::from)?;
    // Post-copy's demand requests get a connection of their own, so that a
    // faulting vCPU never waits behind bulk pages.
    let fault_conn = if flags.postcopy {
        let mut f = secure::connect(addr, protection)?;
        write_frame(&mut f, Kind::FaultChannel, &[])?;
        f.set_read_timeout(None).map_err(ProtocolError::from)?;
        Some(f)
    } else {
        None
    };
    // The destination built its VM: nothing of that lands in the downtime.
    protocol::read_frame(stream)?.expect(Kind::Ready)?;
    Ok((fault_conn, populated))
}

/// The policy's plan, and the rates measured for it.
struct Planned {
    plan: Plan,
    measured: Option<Measured>,
}

/// Measures what `setup` asked for, then asks the policy for its plan.
fn plan<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    policy: &mut dyn Policy,
    setup: Setup,
    view: SetupView,
) -> Result<Planned, MigrationError> {
    let planning = Instant::now();
    let measured = if setup.measure_rates {
        let link_bytes_s = calibrate(s)?;
        let access = access_rate::measure(s.vm, RATE_WINDOW, RATE_SAMPLES)
            .map_err(vm_err("measure the guest's access rates"))?;
        Some(Measured {
            link_bytes_s,
            access,
        })
    } else {
        None
    };
    let mut plan = policy.plan(&PlanView {
        ram_bytes: view.ram_bytes,
        populated_bytes: view.populated_bytes,
        limits: view.limits,
        measured: measured.clone(),
    })?;
    if let Some(why) = plan.prediction.as_mut().filter(|_| measured.is_some()) {
        // The burst is measurement, not migration: keep it out of bytes_wire.
        why["calibration_bytes"] = s.out.bytes.into();
        // Preparation (seed 001's stage 1) is part of total_time_ms.
        why["planning_ms"] = (planning.elapsed().as_secs_f64() * 1e3).into();
    }
    s.out.bytes = 0;
    Ok(Planned { plan, measured })
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
        &protocol::encode_round_end(protocol::CALIBRATION_ROUND),
    )?;
    s.flush()?;
    let mut r = s.stream();
    let ack = protocol::read_frame(&mut r)?.expect(Kind::RoundAck)?;
    if protocol::decode_round_end(&ack)? != protocol::CALIBRATION_ROUND {
        return Err(protocol::malformed("RoundAck", "not the calibration's").into());
    }
    Ok(sent as f64 / t.elapsed().as_secs_f64())
}

/// An `Abort` the destination sent, if one is waiting on the socket.
fn peer_reason(stream: &SecureStream) -> Option<MigrationError> {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut r = stream;
    // Skip anything else the destination may have queued.
    for _ in 0..4 {
        match protocol::read_frame(&mut r) {
            Ok(f) if f.kind == Kind::Abort => {
                return Abort::decode(&f.payload)
                    .ok()
                    .map(MigrationError::from_abort);
            }
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// One migration's phases after planning, and what they share.
struct Run<'r, 'a, V: SourceVm> {
    sender: &'r mut PageSender<'a, V>,
    policy: &'r mut dyn Policy,
    history: &'r mut History,
    phase: &'r mut SourcePhase,
    fence: &'r mut Fence,
    shared: &'r SourceShared,
    verify: bool,
    commit_timeout: Duration,
    can_postcopy: bool,
    started: Instant,
}

impl<V: SourceVm> Run<'_, '_, V> {
    /// Pre-copy rounds (unless the plan is post-copy), then the switch-over
    /// the policy chose.
    fn phases(&mut self) -> Result<Report, MigrationError> {
        let result = self.run_phases();
        match &result {
            Err(e) if e.is_cancelled() => *self.phase = self.phase.next(SourceEvent::Cancel)?,
            Err(_) => {
                // The phase moves only when a switch-over returns: catch up
                // with how far it got, so that a failure after `Commit` is
                // an unknown outcome, not a plain failure.
                if self.fence.committed && matches!(self.phase, SourcePhase::SwitchOver { .. }) {
                    *self.phase = self.phase.next(SourceEvent::Commit)?;
                }
                if self.fence.resumed && matches!(self.phase, SourcePhase::Committed { .. }) {
                    *self.phase = self.phase.next(SourceEvent::Resumed)?;
                }
                *self.phase = self.phase.next(SourceEvent::Fail)?;
            }
            Ok(_) => {}
        }
        set_progress(&self.sender.progress, |p| {
            p.phase = self.phase.name().into()
        });
        result
    }

    fn run_phases(&mut self) -> Result<Report, MigrationError> {
        // Setup (calibration, rate sampling) may have taken a while.
        self.sender.check_cancel()?;
        let pre = match self.history.start {
            Start::PostCopy => None,
            Start::PreCopy | Start::Hybrid { .. } => Some(precopy::run_rounds(
                self.sender,
                self.policy,
                self.history,
                self.phase,
                self.started,
            )?),
        };
        match pre {
            Some(pre) if !pre.postcopy => {
                self.sender.control.commit_switch_over()?;
                let report = stop_and_copy::switch_over(
                    self.sender,
                    self.verify,
                    self.commit_timeout,
                    pre,
                    self.fence,
                )?;
                *self.phase = self.phase.next(SourceEvent::Commit)?;
                *self.phase = self.phase.next(SourceEvent::Resumed)?;
                Ok(report)
            }
            pre => self.postcopy(pre),
        }
    }

    /// The switch-over to post-copy, and post-copy itself.
    fn postcopy(&mut self, pre: Option<PrecopyOutcome>) -> Result<Report, MigrationError> {
        if !self.can_postcopy {
            return Err(PolicyError::PostcopyNotPrepared.into());
        }
        self.sender.control.commit_switch_over()?;
        let order = self.policy.push_order(self.history)?;
        self.fence.postcopy = true;
        let report = stop_and_copy::switch_over_postcopy(
            self.sender,
            self.verify,
            self.commit_timeout,
            pre,
            self.fence,
            self.shared,
            order,
        )?;
        *self.phase = self.phase.next(SourceEvent::Commit)?;
        *self.phase = self.phase.next(SourceEvent::Resumed)?;
        *self.phase = self.phase.next(SourceEvent::PostcopyComplete)?;
        Ok(report)
    }
}
