//! The destination: authenticate, build empty RAM, take pages round after
//! round, restore the machine state, (verify,) resume, and confirm; in
//! post-copy, then serve the guest's faults until every page is present.
//!
//! Every frame is checked before use (see `protocol`); page numbers are
//! bounded by the RAM size announced in `Config`, and the sequence is
//! enforced: nothing but the handshake before `Accepted`, `Config` first,
//! pages only before `State`, `Complete` only after `State`.

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use crate::auth::{self, Secret};
use crate::codec::{decode_batch, PageData, PAGE};
use crate::endpoint::DestinationVm;
use crate::placement::{self, Placed};
use crate::postcopy::{PostcopyDestination, PostcopyStats};
use crate::protocol::{self, malformed, read_frame, write_frame, Kind, ProtocolError};
use crate::report::{now_ns, ResumedInfo};
use crate::source::{vm_err, MigrationError};
use crate::stop_and_copy::PostcopyReport;
use crate::{transport, verify};

/// What the destination saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Received {
    pub rounds: u32,
    pub pages: u64,
    pub bytes_wire: u64,
    pub resumed: ResumedInfo,
    pub postcopy: Option<PostcopyStats>,
}

/// Accepts a migration on `listener` (one main connection, plus a fault
/// connection when the source announces post-copy) and runs the destination
/// side. On error the machine being built is discarded (or, if post-copy lost
/// its source, paused) and the source is told why.
pub fn receive<D: DestinationVm>(
    listener: &TcpListener,
    secret: &Secret,
    dst: &mut D,
) -> Result<Received, MigrationError> {
    let (stream, peer) = transport::accept(listener)?;
    // A small buffer: it saves syscalls on small frames, while most of a
    // page batch (larger than the buffer) is read straight into the frame
    // buffer instead of being copied through this one.
    let mut reader =
        BufReader::with_capacity(64 << 10, stream.try_clone().map_err(ProtocolError::Io)?);
    let mut writer = BufWriter::new(stream);
    auth::authenticate_as_destination(&mut ReadWrite(&mut reader, &mut writer), secret)?;
    tracing::info!("incoming migration from {peer}");
    dst.peer_authenticated(peer);
    let mut session = Session {
        listener,
        secret,
        reader: &mut reader,
        writer: &mut writer,
        out: Received::default(),
    };
    let result = session.run(dst);
    if let Err(e) = &result {
        if !matches!(e, MigrationError::MissingPages { .. }) {
            dst.discard();
        }
        let reason = match e {
            MigrationError::Mismatch(n) => format!("verification failed: {n} pages differ"),
            MigrationError::GuestVerification(d) => format!("guest verification failed: {d}"),
            other => format!("destination failed: {other}"),
        };
        let _ = write_frame(&mut writer, Kind::Abort, reason.as_bytes());
        let _ = writer.flush();
    }
    result
}

/// Joins a buffered reader and writer of one socket for the handshake.
struct ReadWrite<'a, R, W>(&'a mut R, &'a mut W);

impl<R: std::io::Read, W> std::io::Read for ReadWrite<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R, W: Write> Write for ReadWrite<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.1.flush()
    }
}

struct Session<'a> {
    listener: &'a TcpListener,
    secret: &'a Secret,
    reader: &'a mut BufReader<TcpStream>,
    writer: &'a mut BufWriter<TcpStream>,
    out: Received,
}

/// Accepts and authenticates the fault connection.
fn accept_fault_channel(
    listener: &TcpListener,
    secret: &Secret,
) -> Result<TcpStream, MigrationError> {
    let (mut s, _) = transport::accept(listener)?;
    auth::authenticate_as_destination(&mut s, secret)?;
    read_frame(&mut s)?.expect(Kind::FaultChannel)?;
    Ok(s)
}

impl Session<'_> {
    fn run<D: DestinationVm>(&mut self, dst: &mut D) -> Result<Received, MigrationError> {
        let config = read_frame(self.reader)?.expect(Kind::Config)?;
        let protocol::ConfigMsg {
            ram_size,
            postcopy,
            populated,
            machine: cfg,
        } = protocol::decode_config(&config)?;
        let fault_conn = if postcopy {
            Some(accept_fault_channel(self.listener, self.secret)?)
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
        // Post-copy's userfaultfd and threads are set up now, not in the downtime.
        let mut pc_ready = match fault_conn {
            Some(conn) => Some(PostcopyDestination::start(
                dst,
                ram_size / PAGE as u64,
                conn,
            )?),
            None => None,
        };
        write_frame(self.writer, Kind::Ready, &[])?;
        self.writer.flush().map_err(ProtocolError::Io)?;
        let ram_pages = ram_size / PAGE as u64;
        // Pages written so far: a zero page for one of them must overwrite it;
        // for any other it is already zero (fresh memfd).
        let mut written = vec![0u64; ram_pages.div_ceil(64) as usize];
        let zero = vec![0u8; PAGE];
        let mut state_seen = false;
        let mut checksums: Option<Vec<Option<u32>>> = None;
        let mut payload = Vec::new();
        let mut run = PageRun::default();
        let mut pc: Option<PostcopyDestination> = None;
        loop {
            let header = protocol::read_header(self.reader)?;
            self.out.bytes_wire += u64::from(header.len) + protocol::HEADER_LEN as u64;
            let kind = header.kind;
            let placement = match (kind, state_seen, postcopy) {
                (Kind::Pages, false, false) => dst.ram_for_placement(),
                _ => None,
            };
            match placement {
                Some(ram) => {
                    let placed = placement::receive_in_place(
                        self.reader,
                        &header,
                        ram,
                        ram_pages,
                        &mut written,
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
                Kind::Pages if !state_seen => {
                    decode_batch::<MigrationError>(&payload, ram_pages, |page, data| {
                        let bit = (page / 64) as usize;
                        let mask = 1u64 << (page % 64);
                        let bytes = match data {
                            PageData::Zero if written[bit] & mask == 0 => return Ok(()),
                            PageData::Zero => &zero[..],
                            PageData::Bytes(b) => b,
                        };
                        written[bit] |= mask;
                        self.out.pages += 1;
                        run.push(dst, page, bytes)
                    })?;
                    run.flush(dst)?;
                }
                Kind::Probe if !state_seen => {} // calibration: read, dropped
                Kind::RoundEnd if !state_seen => {
                    let round = protocol::decode_round_end(&payload)?;
                    if round != crate::source::CALIBRATION_ROUND {
                        self.out.rounds += 1;
                    }
                    write_frame(
                        self.writer,
                        Kind::RoundAck,
                        &protocol::encode_round_end(round),
                    )?;
                    self.writer.flush().map_err(ProtocolError::Io)?;
                }
                Kind::State if !state_seen => {
                    info.state_received_at_ns = now_ns();
                    let t = Instant::now();
                    dst.restore(&payload)
                        .map_err(vm_err("restore machine state"))?;
                    info.restore_ms = t.elapsed().as_secs_f64() * 1e3;
                    state_seen = true;
                }
                Kind::Checksums if state_seen && pc.is_none() => {
                    let c = checksums.get_or_insert_with(|| vec![None; ram_pages as usize]);
                    verify::decode_into(&payload, c)?;
                }
                Kind::PostcopyBegin if state_seen && pc.is_none() => {
                    let mut ready = pc_ready
                        .take()
                        .ok_or_else(|| malformed("PostcopyBegin", "not a post-copy migration"))?;
                    let needed = protocol::decode_runs(&payload, ram_pages)?;
                    let expected = checksums.take();
                    let t = Instant::now();
                    ready.arm(dst, &needed, &written, expected.clone())?;
                    pc = Some(ready);
                    info.postcopy_setup_ms = t.elapsed().as_secs_f64() * 1e3;
                    checksums = expected.map(|e| {
                        // Pages still to come are checked as they arrive.
                        let sh = &pc.as_ref().expect("just set").shared;
                        e.into_iter()
                            .enumerate()
                            .map(|(p, c)| {
                                if sh.is_needed(p as u64) {
                                    Some(u32::MAX)
                                } else {
                                    c
                                }
                            })
                            .collect()
                    });
                }
                Kind::Complete if state_seen => {
                    return match pc.take() {
                        None => {
                            // A pre-copy chosen after post-copy was announced:
                            // unregister before the guest runs.
                            drop(pc_ready.take());
                            self.complete_precopy(dst, ram_size, checksums.take(), info)
                        }
                        Some(pc) => {
                            self.complete_postcopy(dst, ram_size, checksums.take(), info, pc)
                        }
                    };
                }
                Kind::Abort => {
                    return Err(ProtocolError::PeerAborted(
                        String::from_utf8_lossy(&payload).into_owned(),
                    )
                    .into())
                }
                k => {
                    return Err(ProtocolError::Unexpected {
                        got: k.name(),
                        expected: if state_seen {
                            "Checksums, PostcopyBegin or Complete"
                        } else {
                            "Pages, RoundEnd or State"
                        },
                    }
                    .into())
                }
            }
        }
    }

    /// Pre-copy's end: every page is here; verify, resume, confirm.
    fn complete_precopy<D: DestinationVm>(
        &mut self,
        dst: &mut D,
        ram_size: u64,
        checksums: Option<Vec<Option<u32>>>,
        mut info: ResumedInfo,
    ) -> Result<Received, MigrationError> {
        let verify = checksums.is_some();
        if let Some(expected) = checksums {
            verify_pages(dst, ram_size, &expected, &mut info)?;
        }
        resume(dst, &mut info, verify)?;
        self.send_resumed(&info)?;
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
        let verify = checksums.is_some();
        if let Some(expected) = &checksums {
            // The pages already here; `u32::MAX` marks those still to come.
            verify_pages(dst, ram_size, expected, &mut info)?;
        }
        resume(dst, &mut info, false)?;
        let resumed_at = Instant::now();
        self.send_resumed(&info)?;
        let ram_pages = ram_size / PAGE as u64;
        let mut payload = Vec::new();
        loop {
            let kind = match protocol::read_frame_into(self.reader, &mut payload) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!("post-copy lost its source: {e}");
                    return Err(self.source_lost(dst, pc));
                }
            };
            match kind {
                Kind::Pages => pc.pushed(&payload, ram_pages)?,
                Kind::PostcopyDone => break,
                Kind::Abort => return Err(self.source_lost(dst, pc)),
                k => {
                    return Err(ProtocolError::Unexpected {
                        got: k.name(),
                        expected: "Pages or PostcopyDone",
                    }
                    .into())
                }
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
        self.writer.flush().map_err(ProtocolError::Io)?;
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
        self.writer.flush().map_err(ProtocolError::Io)?;
        Ok(())
    }
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

/// Compares every page's CRC with the source's; `Some(u32::MAX)` entries
/// are pages still to come in post-copy (checked on arrival instead).
fn verify_pages<D: DestinationVm>(
    dst: &mut D,
    ram_size: u64,
    expected: &[Option<u32>],
    info: &mut ResumedInfo,
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
        match e {
            Some(u32::MAX) => continue,
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
