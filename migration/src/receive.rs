//! The destination: authenticate, build empty RAM, take pages round after
//! round, restore the machine state, (verify,) resume, and confirm.
//!
//! Every frame is checked before use (see `protocol`); page numbers are
//! bounded by the RAM size announced in `Config`, and the sequence is
//! enforced: nothing but the handshake before `Accepted`, `Config` first,
//! pages only before `State`, `Complete` only after `State`.

use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::time::Instant;

use crate::auth::{self, Secret};
use crate::codec::{decode_batch, PageData, PAGE};
use crate::endpoint::DestinationVm;
use crate::protocol::{self, malformed, read_frame, write_frame, Kind, ProtocolError};
use crate::report::{now_ns, ResumedInfo};
use crate::source::{vm_err, MigrationError};
use crate::verify;

/// What the destination saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Received {
    pub rounds: u32,
    pub pages: u64,
    pub bytes_wire: u64,
    pub resumed: ResumedInfo,
}

/// Runs the destination side on an accepted connection. On error the
/// machine being built is discarded and the source is told why.
pub fn receive<D: DestinationVm>(
    stream: TcpStream,
    secret: &Secret,
    dst: &mut D,
) -> Result<Received, MigrationError> {
    let mut reader =
        BufReader::with_capacity(1 << 20, stream.try_clone().map_err(ProtocolError::Io)?);
    let mut writer = BufWriter::new(stream);
    auth::authenticate_as_destination(&mut ReadWrite(&mut reader, &mut writer), secret)?;
    let result = run(&mut reader, &mut writer, dst);
    if let Err(e) = &result {
        dst.discard();
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

fn run<D: DestinationVm>(
    reader: &mut BufReader<TcpStream>,
    writer: &mut BufWriter<TcpStream>,
    dst: &mut D,
) -> Result<Received, MigrationError> {
    let config = read_frame(reader)?.expect(Kind::Config)?;
    let (ram_size, cfg) = protocol::decode_config(&config)?;
    if ram_size == 0 || ram_size % PAGE as u64 != 0 {
        return Err(malformed("Config", format!("RAM size {ram_size}")).into());
    }
    dst.prepare(cfg, ram_size).map_err(vm_err("prepare RAM"))?;
    let ram_pages = ram_size / PAGE as u64;
    // Pages written so far: a zero page for one of them must overwrite it;
    // for any other it is already zero (fresh memfd).
    let mut written = vec![0u64; ram_pages.div_ceil(64) as usize];
    let mut out = Received::default();
    let zero = vec![0u8; PAGE];
    let mut state_seen = false;
    let mut checksums: Option<Vec<Option<u32>>> = None;
    let mut info = ResumedInfo::default();
    let mut payload = Vec::new();
    let mut run = PageRun::default();
    loop {
        let kind = protocol::read_frame_into(reader, &mut payload)?;
        out.bytes_wire += (payload.len() + protocol::HEADER_LEN) as u64;
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
                    out.pages += 1;
                    run.push(dst, page, bytes)
                })?;
                run.flush(dst)?;
            }
            Kind::RoundEnd if !state_seen => {
                protocol::decode_round_end(&payload)?;
                out.rounds += 1;
            }
            Kind::State if !state_seen => {
                info.state_received_at_ns = now_ns();
                let t = Instant::now();
                dst.restore(&payload)
                    .map_err(vm_err("restore machine state"))?;
                info.restore_ms = t.elapsed().as_secs_f64() * 1e3;
                state_seen = true;
            }
            Kind::Checksums if state_seen => {
                let c = checksums.get_or_insert_with(|| vec![None; ram_pages as usize]);
                verify::decode_into(&payload, c)?;
            }
            Kind::Complete if state_seen => {
                // The source asks for verification by sending checksums.
                let verify = checksums.is_some();
                if let Some(expected) = checksums.take() {
                    verify_pages(dst, ram_size, &expected, &mut info)?;
                }
                finish(writer, dst, &mut info, verify)?;
                out.resumed = info;
                return Ok(out);
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
                        "Checksums or Complete"
                    } else {
                        "Pages, RoundEnd or State"
                    },
                }
                .into())
            }
        }
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

/// Compares every page's CRC with the source's.
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
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        match e {
            Some(e) if e == g => {}
            _ => {
                if mismatched < 8 {
                    tracing::error!("page {i}: checksum {g:#x}, source had {e:x?}");
                }
                mismatched += 1;
            }
        }
    }
    info.verify_ms = t.elapsed().as_secs_f64() * 1e3;
    info.pages_verified = got.len() as u64;
    info.mismatched_pages = mismatched;
    if mismatched > 0 {
        return Err(MigrationError::Mismatch(mismatched));
    }
    Ok(())
}

/// Resumes the guest and confirms to the source.
fn finish<D: DestinationVm>(
    writer: &mut BufWriter<TcpStream>,
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
    let payload = serde_json::to_vec(&info).expect("ResumedInfo serializes");
    write_frame(writer, Kind::Resumed, &payload)?;
    writer.flush().map_err(ProtocolError::Io)?;
    Ok(())
}
