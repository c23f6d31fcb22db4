//! The destination: authenticate, build empty RAM, take pages round after
//! round, restore the machine state, (verify,) resume, and confirm; in
//! post-copy, then serve the guest's faults until every page is present.
//!
//! Every frame is checked before use (see `protocol`); page numbers are
//! bounded by the RAM size announced in `Config`, and the sequence is
//! enforced: nothing but the handshake before `Accepted`, `Config` first,
//! then every frame moves [`DestinationPhase`], which refuses anything out
//! of turn (pages only before `State`, `Complete` only after it, ...).
//!
//! Everything a peer can make us wait for or allocate is bounded
//! ([`Limits`]): the handshake as a whole, each frame as a whole (not each
//! read: a peer trickling one byte at a time is cut off), the wait for
//! post-copy's fault connection; before authentication, frames of a few
//! KiB at most and no buffer larger than that.
//!
//! The switch-over is a commit (drawn in [`crate::protocol`]): at
//! `Complete` the destination checks that every page `Config` declared
//! arrived (or, in post-copy, is still to come), that the checksums
//! `Config` announced arrived and match, and answers `Prepared`, paused. It
//! resumes only on `Commit`, and only if [`Switch`] did not decide to
//! discard first; without `Commit` within [`COMMIT_WAIT`] it discards.
//! After a discard that followed `Prepared` it stays reachable for
//! [`RECOVER_WINDOW`], answering the source's `OutcomeQuery`.

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth;
use crate::bitmap::DirtyBitmap;
use crate::codec::{decode_batch, PageData, PAGE};
use crate::commit::{self, Outcome, Switch};
use crate::deadline::{DeadlineReader, Duplex as ReadWrite, TimedRead};
use crate::endpoint::DestinationVm;
use crate::error::{vm_err, MigrationError};
use crate::placement::{self, Placed};
use crate::postcopy::PostcopyDestination;
use crate::protocol::{self, malformed, write_frame, Abort, AbortCode, Kind, ProtocolError};
use crate::report::{now_ns, PostcopyReport, PostcopyStats, ResumedInfo};
use crate::secure::{self, Protection, SecureStream};
use crate::state::DestinationPhase;
use crate::{transport, verify};

/// How long the destination waits for `Commit` after `Prepared`: the
/// source sends it at once; past this, the destination discards.
pub const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// How long a destination that discarded after `Prepared` stays to tell a
/// source that lost track (`OutcomeQuery`) that it did.
pub const RECOVER_WINDOW: Duration = Duration::from_secs(30);

/// What the destination saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Received {
    pub rounds: u32,
    pub pages: u64,
    pub bytes_wire: u64,
    pub resumed: ResumedInfo,
    pub postcopy: Option<PostcopyStats>,
}

/// How long a peer may make the destination wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The whole handshake, from the accept to `Accepted`.
    pub handshake: Duration,
    /// One frame, from the wait for its first byte to its last; a large
    /// frame gets `len / MIN_FRAME_RATE` more.
    pub frame: Duration,
    /// Post-copy's fault connection, after a `Config` that announced it.
    pub fault_connection: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            frame: transport::PEER_TIMEOUT,
            fault_connection: Duration::from_secs(10),
        }
    }
}

/// The slowest pace a large frame may arrive at (1 MiB/s, 8 Mbit/s) on top
/// of [`Limits::frame`].
const MIN_FRAME_RATE: u64 = 1 << 20;

impl Limits {
    /// The time a frame of `len` bytes may take.
    fn frame_time(&self, len: u32) -> Duration {
        self.frame + Duration::from_millis(u64::from(len) * 1000 / MIN_FRAME_RATE)
    }
}

/// Accepts a migration on `listener` (one main connection, plus a fault
/// connection when the source announces post-copy) and runs the destination
/// side with the default [`Limits`].
pub fn receive<D: DestinationVm>(
    listener: &TcpListener,
    protection: &Protection,
    dst: &mut D,
) -> Result<Received, MigrationError> {
    let (stream, peer) = transport::accept(listener)?;
    receive_on(stream, peer, listener, protection, dst, &Limits::default())
}

/// Runs the destination side on `stream`, a connection accepted from
/// `peer` on `listener` (where the fault connection will come). On error the
/// machine being built is discarded (or, if post-copy lost its source,
/// paused) and the source is told why.
pub fn receive_on<D: DestinationVm>(
    stream: TcpStream,
    peer: SocketAddr,
    listener: &TcpListener,
    protection: &Protection,
    dst: &mut D,
    limits: &Limits,
) -> Result<Received, MigrationError> {
    let started = Instant::now();
    // The protection's own handshake (TLS, Noise; nothing in plaintext),
    // each of its reads bounded by the handshake's limit...
    stream
        .set_read_timeout(Some(limits.handshake))
        .map_err(ProtocolError::from)?;
    let (stream, secret) = secure::protect_as_destination(stream, protection)?;
    // ...then the HMAC handshake inside it, within what is left of that
    // limit as a whole (counted in decrypted bytes).
    let raw = DeadlineReader::new(stream.clone(), transport::peer_timeout());
    raw.expect_within(limits.handshake, "the handshake");
    raw.extend(started, limits.handshake);
    // Nothing but the handshake's small frames before authentication: no
    // read buffer yet, a small write buffer.
    let mut writer = BufWriter::with_capacity(4 << 10, stream);
    let mut raw = raw;
    auth::authenticate_as_destination(&mut ReadWrite(&mut raw, &mut writer), &secret)?;
    raw.clear();
    tracing::info!("incoming migration from {peer}");
    dst.peer_authenticated(peer);
    // A small buffer: it saves syscalls on small frames, while most of a
    // page batch (larger than the buffer) is read straight into the frame
    // buffer instead of being copied through this one.
    let mut reader = BufReader::with_capacity(64 << 10, raw);
    let switch = Arc::new(Switch::default());
    switch.attach(
        writer
            .get_ref()
            .socket()
            .try_clone()
            .map_err(ProtocolError::from)?,
    );
    let mut session = Session {
        listener,
        protection,
        limits,
        reader: &mut reader,
        writer: &mut writer,
        out: Received::default(),
        switch: switch.clone(),
        prepared_sent: false,
    };
    let result = session.run(dst);
    let prepared_sent = session.prepared_sent;
    if let Err(e) = &result {
        let outcome = match e {
            // Post-copy lost its source: the guest is paused, never discarded.
            MigrationError::MissingPages { .. } => Outcome::Resumed,
            _ => give_up(dst, &switch),
        };
        let abort = e.to_abort(AbortCode::DestinationFailed);
        let _ = write_frame(&mut writer, Kind::Abort, &abort.encode());
        let _ = writer.flush();
        if !prepared_sent {
            commit::close_queries(&switch, listener);
        }
        if prepared_sent && outcome == Outcome::Discarded {
            linger_for_the_source(&switch);
        }
    }
    result
}

/// After a failure: discards the machine unless the source was told it
/// runs here. A guest that already resumed is stopped *before* the
/// decision is taken back, so that it never runs while the source might.
fn give_up<D: DestinationVm>(dst: &mut D, switch: &Switch) -> Outcome {
    if switch.discard() == Outcome::Discarded {
        dst.discard();
        return Outcome::Discarded;
    }
    dst.pause_guest();
    if switch.revoke() {
        dst.discard();
        return Outcome::Discarded;
    }
    tracing::error!("the source was told the guest runs here: it is kept, paused");
    Outcome::Resumed
}

/// The source may have sent `Commit` that never arrived: it is then
/// fenced, waiting to learn that this side discarded. Stay to tell it.
fn linger_for_the_source(switch: &Switch) {
    tracing::warn!(
        "the guest was discarded here after Prepared; answering the source's outcome query for up to {} s",
        RECOVER_WINDOW.as_secs()
    );
    if switch.wait_for_query(RECOVER_WINDOW) {
        // Let the answer leave before the process ends.
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Session<'a> {
    listener: &'a TcpListener,
    protection: &'a Protection,
    limits: &'a Limits,
    reader: &'a mut BufReader<DeadlineReader<SecureStream>>,
    writer: &'a mut BufWriter<SecureStream>,
    out: Received,
    /// The single resume-or-discard decision.
    switch: Arc<Switch>,
    /// `Prepared` went out: the source may commit from now on.
    prepared_sent: bool,
}

/// Accepts and authenticates the fault connection, within
/// `limits.fault_connection`. Anything else that connects meanwhile (a
/// stray client, a wrong secret) is logged and dropped: it neither takes
/// the fault connection's place nor ends the migration.
fn accept_fault_channel(
    listener: &TcpListener,
    protection: &Protection,
    limits: &Limits,
) -> Result<SecureStream, MigrationError> {
    let deadline = Instant::now() + limits.fault_connection;
    // Non-blocking, to give up at the deadline.
    listener
        .set_nonblocking(true)
        .map_err(ProtocolError::from)?;
    let result = loop {
        match listener.accept() {
            Ok((s, peer)) => match fault_handshake(s, protection, limits) {
                Ok(s) => break Ok(s),
                Err(e) => tracing::warn!(
                    "dropped a connection from {peer} while waiting for the fault connection: {}",
                    crate::protocol::printable(&e.to_string(), crate::protocol::MAX_PEER_TEXT)
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(ProtocolError::Deadline {
                        what: "post-copy's fault connection",
                        after: limits.fault_connection,
                    }
                    .into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => break Err(transport::TransportError::Accept(e).into()),
        }
    };
    listener
        .set_nonblocking(false)
        .map_err(ProtocolError::from)?;
    result
}

/// The fault connection's handshake and `FaultChannel`, within the
/// handshake deadline.
fn fault_handshake(
    s: TcpStream,
    protection: &Protection,
    limits: &Limits,
) -> Result<SecureStream, MigrationError> {
    let started = Instant::now();
    s.set_nonblocking(false).map_err(ProtocolError::from)?;
    transport::tune(&s);
    s.set_read_timeout(Some(limits.handshake))
        .map_err(ProtocolError::from)?;
    let (s, secret) = secure::protect_as_destination(s, protection)?;
    let mut reader = DeadlineReader::new(s.clone(), transport::peer_timeout());
    reader.expect_within(limits.handshake, "the fault connection's handshake");
    reader.extend(started, limits.handshake);
    auth::authenticate_as_destination(&mut ReadWrite(&mut reader, &mut &s), &secret)?;
    protocol::read_frame_limited(&mut reader, protocol::PRE_AUTH_MAX_PAYLOAD)?
        .expect(Kind::FaultChannel)?;
    // The deadline shortened the socket's timeout: back to the usual one.
    s.set_read_timeout(Some(transport::peer_timeout()))
        .map_err(ProtocolError::from)?;
    Ok(s)
}

/// What the destination learnt from `Config` and set up before `Ready`.
struct Prepared {
    ram_pages: u64,
    postcopy: bool,
    /// `Config` announced `Checksums`: they cannot be left out.
    verify: bool,
    /// The pages `Config` declared: each must arrive, or in post-copy be
    /// named by `PostcopyBegin`, before `Prepared`.
    declared: Vec<(u64, u64)>,
    /// Post-copy's userfaultfd and threads, ready to be armed.
    postcopy_ready: Option<PostcopyDestination>,
    info: ResumedInfo,
}

/// What the destination holds while the frames come.
struct Receiving {
    /// Pages received so far (zero pages included): a zero page for one of
    /// them must overwrite it; any other is already zero (fresh memfd).
    written: DirtyBitmap,
    run: PageRun,
    /// `--verify`: the source's CRC of every page.
    checksums: Option<Vec<Option<u32>>>,
    /// Post-copy, once `PostcopyBegin` armed it.
    armed: Option<PostcopyDestination>,
}

impl Session<'_> {
    fn run<D: DestinationVm>(&mut self, dst: &mut D) -> Result<Received, MigrationError> {
        let mut prepared = self.prepare(dst)?;
        // The fault connection (if any) is accepted: from now on a new
        // connection can only be a source asking what became of the guest.
        commit::serve_queries(self.listener, self.protection, self.switch.clone())?;
        let ram_pages = prepared.ram_pages;
        let mut rx = Receiving {
            written: DirtyBitmap::new(ram_pages),
            run: PageRun::default(),
            checksums: None,
            armed: None,
        };
        let mut phase = DestinationPhase::Rounds;
        let mut payload = Vec::new();
        loop {
            let header = self.read_header()?;
            self.out.bytes_wire += u64::from(header.len) + protocol::HEADER_LEN as u64;
            let kind = header.kind;
            phase = phase.on_frame(kind)?;
            // Pre-copy's pages may go straight into guest RAM.
            let placement = match (kind, prepared.postcopy) {
                (Kind::Pages, false) => dst.ram_for_placement(),
                _ => None,
            };
            match placement {
                Some(ram) => {
                    let placed = placement::receive_in_place(
                        self.reader,
                        &header,
                        ram,
                        ram_pages,
                        &mut rx.written,
                        &mut payload,
                    )?;
                    if let Placed::Pages(n) = placed {
                        self.out.pages += n;
                        continue;
                    }
                }
                None => protocol::read_payload(self.reader, &header, &mut payload)?,
            }
            match kind {
                Kind::Pages => self.write_pages(dst, &payload, ram_pages, &mut rx)?,
                Kind::Probe => {} // calibration: read, dropped
                Kind::RoundEnd => self.acknowledge_round(&payload)?,
                Kind::State => {
                    let info = &mut prepared.info;
                    info.state_received_at_ns = now_ns();
                    let t = Instant::now();
                    dst.restore(&payload)
                        .map_err(vm_err("restore machine state"))?;
                    info.restore_ms = t.elapsed().as_secs_f64() * 1e3;
                }
                Kind::Checksums => {
                    let c = rx
                        .checksums
                        .get_or_insert_with(|| vec![None; ram_pages as usize]);
                    verify::decode_into(&payload, c)?;
                }
                Kind::PostcopyBegin => {
                    let mut ready = prepared
                        .postcopy_ready
                        .take()
                        .ok_or_else(|| malformed("PostcopyBegin", "not a post-copy migration"))?;
                    let needed = protocol::decode_runs(&payload, ram_pages)?;
                    let t = Instant::now();
                    ready.arm(dst, &needed, &rx.written, rx.checksums.clone())?;
                    rx.armed = Some(ready);
                    prepared.info.postcopy_setup_ms = t.elapsed().as_secs_f64() * 1e3;
                }
                Kind::Complete => self.send_prepared(dst, &mut prepared, &rx)?,
                Kind::Commit => return self.complete(dst, phase, prepared, rx),
                Kind::Abort => {
                    return Err(ProtocolError::PeerAborted(Abort::decode(&payload)?).into())
                }
                k => {
                    return Err(crate::state::IllegalTransition {
                        phase: phase.name(),
                        got: k.name(),
                    }
                    .into())
                }
            }
        }
    }

    /// Reads the next frame's header and gives the frame its deadline:
    /// it must arrive whole within [`Limits::frame_time`] of the moment we
    /// began to wait for it.
    fn read_header(&mut self) -> Result<protocol::FrameHeader, ProtocolError> {
        let start = Instant::now();
        let deadline = self.reader.get_ref();
        deadline.expect_within(self.limits.frame, "a frame");
        let header = protocol::read_header(self.reader)?;
        self.reader
            .get_ref()
            .extend(start, self.limits.frame_time(header.len));
        Ok(header)
    }

    /// Reads one whole frame within its deadline.
    fn read_frame(&mut self, payload: &mut Vec<u8>) -> Result<Kind, ProtocolError> {
        let header = self.read_header()?;
        protocol::read_payload(self.reader, &header, payload)?;
        Ok(header.kind)
    }

    /// Reads `Config`, accepts the fault connection if post-copy may
    /// follow, builds empty RAM, prefaults it (pre-copy) or prepares
    /// userfaultfd (post-copy), and answers `Ready`.
    fn prepare<D: DestinationVm>(&mut self, dst: &mut D) -> Result<Prepared, MigrationError> {
        let mut config = Vec::new();
        let kind = self.read_frame(&mut config)?;
        let config = protocol::Frame {
            kind,
            payload: config,
        }
        .expect(Kind::Config)?;
        let protocol::ConfigMsg {
            ram_size,
            postcopy,
            verify,
            populated,
            machine: cfg,
        } = protocol::decode_config(&config)?;
        let fault_conn = if postcopy {
            Some(accept_fault_channel(
                self.listener,
                self.protection,
                self.limits,
            )?)
        } else {
            None
        };
        dst.prepare(cfg, ram_size).map_err(vm_err("prepare RAM"))?;
        // Only pre-copy may touch RAM ahead: post-copy needs every page it
        // has not received to be missing, so that the guest faults on it.
        let mut info = ResumedInfo::default();
        if !postcopy {
            let t = Instant::now();
            for &(first, n) in &populated {
                dst.prefault(first * PAGE as u64, n * PAGE as u64)
                    .map_err(vm_err("prefault RAM"))?;
            }
            info.prefault_ms = t.elapsed().as_secs_f64() * 1e3;
        }
        let ram_pages = ram_size / PAGE as u64;
        // Post-copy's userfaultfd and threads are set up now, not in the downtime.
        let postcopy_ready = match fault_conn {
            Some(conn) => Some(PostcopyDestination::start(dst, ram_pages, conn)?),
            None => None,
        };
        write_frame(self.writer, Kind::Ready, &[])?;
        self.writer.flush().map_err(ProtocolError::from)?;
        Ok(Prepared {
            ram_pages,
            postcopy,
            verify,
            declared: populated,
            postcopy_ready,
            info,
        })
    }

    /// Writes a `Pages` frame read whole into guest RAM.
    fn write_pages<D: DestinationVm>(
        &mut self,
        dst: &mut D,
        payload: &[u8],
        ram_pages: u64,
        rx: &mut Receiving,
    ) -> Result<(), MigrationError> {
        let zero = [0u8; PAGE];
        decode_batch::<MigrationError>(payload, ram_pages, |page, data| {
            let bytes = match data {
                PageData::Zero if !rx.written.contains(page) => {
                    // Already zero: nothing to write, but it arrived.
                    rx.written.insert(page);
                    return Ok(());
                }
                PageData::Zero => &zero[..],
                PageData::Bytes(b) => b,
            };
            rx.written.insert(page);
            self.out.pages += 1;
            rx.run.push(dst, page, bytes)
        })?;
        rx.run.flush(dst)
    }

    /// Answers a `RoundEnd`: everything before it is in guest RAM.
    fn acknowledge_round(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let round = protocol::decode_round_end(payload)?;
        if round != protocol::CALIBRATION_ROUND {
            self.out.rounds += 1;
        }
        write_frame(
            self.writer,
            Kind::RoundAck,
            &protocol::encode_round_end(round),
        )?;
        self.writer.flush().map_err(ProtocolError::from)?;
        Ok(())
    }

    /// `Complete`: pre-copy ends here; post-copy resumes and goes on.
    fn complete<D: DestinationVm>(
        &mut self,
        dst: &mut D,
        phase: DestinationPhase,
        prepared: Prepared,
        rx: Receiving,
    ) -> Result<Received, MigrationError> {
        if !self.switch.commit() {
            return Err(MigrationError::Discarded);
        }
        // Post-copy's push follows on this connection: back to the usual
        // tolerance for a silent peer.
        self.reader
            .get_ref()
            .set_read_timeout(Some(transport::PEER_TIMEOUT))
            .map_err(ProtocolError::Io)?;
        let ram_size = prepared.ram_pages * PAGE as u64;
        match (phase, rx.armed) {
            (DestinationPhase::Postcopy, Some(pc)) => {
                self.complete_postcopy(dst, ram_size, rx.checksums, prepared.info, pc)
            }
            (_, _) => {
                // A pre-copy chosen after post-copy was announced:
                // unregister before the guest runs.
                drop(prepared.postcopy_ready);
                self.complete_precopy(dst, rx.checksums.is_some(), prepared.info)
            }
        }
    }

    /// `Complete`: everything the source will send before the switch-over
    /// is here. Checks that nothing declared is missing and that every
    /// page matches the source's checksums, then answers `Prepared` and
    /// waits (bounded) for `Commit`.
    fn send_prepared<D: DestinationVm>(
        &mut self,
        dst: &mut D,
        prepared: &mut Prepared,
        rx: &Receiving,
    ) -> Result<(), MigrationError> {
        let needed = rx.armed.as_ref().map(|pc| pc.shared.needed_pages());
        check_accounted(prepared, &rx.written, needed.as_ref())?;
        let ram_size = prepared.ram_pages * PAGE as u64;
        match (&rx.checksums, prepared.verify) {
            (None, true) => return Err(MigrationError::ChecksumsMissing),
            (None, false) => {}
            (Some(expected), _) => {
                // In post-copy the pages still to come are checked on arrival.
                let to_come = |p| needed.as_ref().is_some_and(|n| n.contains(p));
                verify_pages(dst, ram_size, expected, &mut prepared.info, to_come)?;
            }
        }
        write_frame(self.writer, Kind::Prepared, &[])?;
        self.writer.flush().map_err(ProtocolError::Io)?;
        self.prepared_sent = true;
        // Never resume without `Commit`: a silent source means a discard.
        self.reader
            .get_ref()
            .set_read_timeout(Some(COMMIT_WAIT))
            .map_err(ProtocolError::Io)?;
        Ok(())
    }

    /// Pre-copy's end: every page is here and verified; resume, confirm.
    fn complete_precopy<D: DestinationVm>(
        &mut self,
        dst: &mut D,
        verify: bool,
        mut info: ResumedInfo,
    ) -> Result<Received, MigrationError> {
        resume(dst, &mut info, verify)?;
        // The guest runs here now; a lost `Resumed` must not stop it: the
        // fenced source asks (`OutcomeQuery`) and learns it.
        if let Err(e) = self.send_resumed(&info) {
            tracing::warn!("Resumed could not be sent ({e}); the guest runs here");
        }
        self.out.resumed = info;
        Ok(std::mem::take(&mut self.out))
    }

    /// Post-copy: resume with pages missing, take the push, wait for the last
    /// page, report.
    fn complete_postcopy<D: DestinationVm>(
        &mut self,
        dst: &mut D,
        ram_size: u64,
        checksums: Option<Vec<Option<u32>>>,
        mut info: ResumedInfo,
        mut pc: PostcopyDestination,
    ) -> Result<Received, MigrationError> {
        // The pages already here were verified before `Prepared`; those
        // still to come are checked as they arrive.
        let verify = checksums.is_some();
        resume(dst, &mut info, false)?;
        let resumed_at = Instant::now();
        self.send_resumed(&info)?;
        let ram_pages = ram_size / PAGE as u64;
        let mut payload = Vec::new();
        let mut phase = DestinationPhase::Postcopy;
        while phase == DestinationPhase::Postcopy {
            let kind = match self.read_frame(&mut payload) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!("post-copy lost its source: {e}");
                    return Err(self.source_lost(dst, pc));
                }
            };
            phase = phase.on_frame(kind)?;
            match phase {
                DestinationPhase::Failed => return Err(self.source_lost(dst, pc)),
                _ if kind == Kind::Pages => pc.pushed(&payload, ram_pages)?,
                _ => {} // PostcopyDone: every page was pushed
            }
        }
        let stats = match pc.finish(resumed_at, dst.longest_stall_ms()) {
            Ok(s) => s,
            Err(MigrationError::MissingPages { count, first, .. }) => {
                let paused = dst.pause_guest();
                return Err(MigrationError::MissingPages {
                    count,
                    first,
                    paused,
                });
            }
            Err(e) => return Err(e),
        };
        let (pages_verified, mismatched_pages) = stats.verified;
        let guest = if verify {
            dst.after_resume(true)
                .map_err(vm_err("observe the guest"))?
        } else {
            info.guest.clone()
        };
        let report = PostcopyReport {
            postcopy: stats.stats.clone(),
            pages_verified,
            mismatched_pages,
            guest,
        };
        let payload = serde_json::to_vec(&report).expect("report serializes");
        write_frame(self.writer, Kind::PostcopyComplete, &payload)?;
        self.writer.flush().map_err(ProtocolError::from)?;
        self.out.resumed = info;
        self.out.postcopy = Some(stats.stats);
        if mismatched_pages > 0 {
            return Err(MigrationError::Mismatch(mismatched_pages));
        }
        if report.guest.guest_verified == Some(false) {
            return Err(MigrationError::GuestVerification(report.guest.detail));
        }
        Ok(std::mem::take(&mut self.out))
    }

    /// The source vanished after the switch-over: pause the guest and name
    /// the pages that never arrived.
    fn source_lost<D: DestinationVm>(
        &mut self,
        dst: &mut D,
        pc: PostcopyDestination,
    ) -> MigrationError {
        let paused = dst.pause_guest();
        let (count, first) = pc.abandon();
        MigrationError::MissingPages {
            count,
            first,
            paused,
        }
    }

    fn send_resumed(&mut self, info: &ResumedInfo) -> Result<(), MigrationError> {
        let payload = serde_json::to_vec(info).expect("ResumedInfo serializes");
        write_frame(self.writer, Kind::Resumed, &payload)?;
        self.writer.flush().map_err(ProtocolError::from)?;
        Ok(())
    }
}

/// Fails unless every page `Config` declared arrived or, in post-copy, is
/// among the `needed` pages still to come.
fn check_accounted(
    prepared: &Prepared,
    received: &DirtyBitmap,
    needed: Option<&DirtyBitmap>,
) -> Result<(), MigrationError> {
    let mut missing = DirtyBitmap::from_runs(prepared.ram_pages, &prepared.declared);
    missing.subtract(received);
    if let Some(n) = needed {
        missing.subtract(n);
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(MigrationError::Undelivered {
        count: missing.count(),
        first: missing.runs().take(4).collect(),
    })
}

/// Consecutive received pages, written to RAM with one call: far fewer
/// system calls than a write per page.
#[derive(Default)]
struct PageRun {
    first: u64,
    bytes: Vec<u8>,
}

impl PageRun {
    fn push<D: DestinationVm>(
        &mut self,
        dst: &mut D,
        page: u64,
        data: &[u8],
    ) -> Result<(), MigrationError> {
        let next = self.first + (self.bytes.len() / PAGE) as u64;
        if self.bytes.is_empty() || page != next || self.bytes.len() >= 1 << 20 {
            self.flush(dst)?;
            self.first = page;
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    fn flush<D: DestinationVm>(&mut self, dst: &mut D) -> Result<(), MigrationError> {
        if !self.bytes.is_empty() {
            dst.write_ram(self.first * PAGE as u64, &self.bytes)
                .map_err(vm_err("write RAM"))?;
            self.bytes.clear();
        }
        Ok(())
    }
}

/// Compares every page's CRC with the source's, except the pages
/// `still_to_come` in post-copy (checked on arrival instead).
fn verify_pages<D: DestinationVm>(
    dst: &mut D,
    ram_size: u64,
    expected: &[Option<u32>],
    info: &mut ResumedInfo,
    still_to_come: impl Fn(u64) -> bool,
) -> Result<(), MigrationError> {
    let t = Instant::now();
    let populated = dst
        .populated_ranges()
        .map_err(vm_err("find populated memory"))?;
    let got = verify::page_crcs(ram_size, &populated, |off, buf| dst.read_ram(off, buf))
        .map_err(vm_err("checksum memory"))?;
    let mut mismatched = 0u64;
    let mut checked = 0u64;
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        if still_to_come(i as u64) {
            continue;
        }
        match e {
            Some(e) if e == g => {}
            _ => {
                if mismatched < 8 {
                    tracing::error!("page {i}: checksum {g:#x}, source had {e:x?}");
                }
                mismatched += 1;
            }
        }
        checked += 1;
    }
    info.verify_ms = t.elapsed().as_secs_f64() * 1e3;
    info.pages_verified = checked;
    info.mismatched_pages = mismatched;
    if mismatched > 0 {
        return Err(MigrationError::Mismatch(mismatched));
    }
    Ok(())
}

/// Resumes the guest and looks at it.
fn resume<D: DestinationVm>(
    dst: &mut D,
    info: &mut ResumedInfo,
    verify: bool,
) -> Result<(), MigrationError> {
    let t = Instant::now();
    dst.resume().map_err(vm_err("resume"))?;
    info.resume_ms = t.elapsed().as_secs_f64() * 1e3;
    info.resumed_at_ns = now_ns();
    info.guest = dst
        .after_resume(verify)
        .map_err(vm_err("observe the guest"))?;
    if info.guest.guest_verified == Some(false) {
        return Err(MigrationError::GuestVerification(info.guest.detail.clone()));
    }
    Ok(())
}
