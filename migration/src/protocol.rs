//! The migration wire protocol: framing and messages.
//!
//! Every connection first runs the handshake of its protection (TLS 1.3,
//! Noise or none, see [`crate::secure`]); everything below travels inside it.
//!
//! # Message sequence (pre-copy)
//! ```text
//!  source                                         destination
//!    │── Hello {version, nonce_s} ─────────────────────▶│
//!    │◀──────────── Challenge {version, nonce_d, mac_d} ─│  mac_d = HMAC(secret, "dst"‖nonce_s‖nonce_d)
//!    │── Proof {mac_s} ─────────────────────────────────▶│  mac_s = HMAC(secret, "src"‖nonce_d‖nonce_s)
//!    │◀────────────────────────────────────── Accepted ──│  (nothing else is accepted before this)
//!    │── Config {RAM size, post-copy?, populated runs,   │  destination creates RAM, VM, vCPUs
//!    │           machine config} ───────────────────────▶│  (with --prefault: touches the populated RAM)
//!    │   (post-copy/hybrid: second connection, same handshake, FaultChannel)
//!    │◀───────────────────────────────────────── Ready ──│
//!    │── Pages … Pages ─ RoundEnd {0} ──────────────────▶│  round 0: all populated memory
//!    │◀──────────────────────────────── RoundAck {0} ────│  (all of it is in guest RAM)
//!    │── Pages … Pages ─ RoundEnd {1} ──────────────────▶│  round i: pages dirtied during round i-1
//!    │◀──────────────────────────────── RoundAck {1} ────│
//!    │        …  until a stop rule fires                 │
//!    │  [pause vCPUs]                                    │
//!    │── Pages … Pages ─ RoundEnd {n} ──────────────────▶│  last dirty pages (vCPUs stopped)
//!    │── State {machine state} ─────────────────────────▶│  destination restores, stays paused
//!    │── Checksums … (only with --verify) ──────────────▶│  destination compares every page
//!    │── Complete ──────────────────────────────────────▶│  "that is everything": the destination
//!    │                                                   │  checks every declared page and checksum
//!    │◀─────────────────────────────────────── Prepared ─│  restored, verified, still paused
//!    │── Commit ────────────────────────────────────────▶│  THE commit point (see below)
//!    │◀────────────────── Resumed {timings, verification} │  destination resumed the guest
//!    │  [source exits]                                   │
//! ```
//!
//! Post-copy and hybrid replace the last round: after `State` (and
//! `Checksums`) comes `PostcopyBegin {pages still needed}`, then `Complete`
//! ◀ `Prepared`, `Commit`; the destination resumes with those pages missing
//! and answers `Resumed`.
//! Then, on the main connection the source pushes `Pages … PostcopyDone`,
//! while on the fault connection the destination sends `PageRequest {page}`
//! and the source answers each with a one-page `Pages`. When every needed
//! page is present the destination sends `PostcopyComplete {statistics}`.
//! When the policy asks for measured rates (`--mode auto`, the hybrid split
//! from measured rates, `--predict`)
//! `Ready` is followed by `Probe … RoundEnd {CALIBRATION_ROUND}` ◀ `RoundAck`: a
//! calibration burst that measures the link rate μ; its content is
//! discarded.
//!
//! # The two ends as state machines (`crate::state`)
//! ```text
//!  source (SourcePhase)                     destination (DestinationPhase, after Ready)
//!
//!  Handshake ──authenticated──▶ Setup            ┌─ Pages, Probe, RoundEnd ─┐
//!                                │               ▼                          │
//!          plan: pre / hybrid ───┤           Rounds ────────────────────────┘
//!          ┌─────────────────────┘               │ State
//!          ▼                                     ▼
//!   Rounds{round, start} ◀─ continue ─┐      Restored ◀── Checksums
//!          │  └───────────────────────┘          │ │
//!          │ stop-and-copy / post-copy           │ └── PostcopyBegin ──▶ PostcopyArmed
//!          ▼                  plan: post         │ Complete                 │ Complete
//!   SwitchOver{rule, postcopy} ◀──────────       ▼                          ▼
//!          │ Commit (after Prepared)     Prepared{pre}            Prepared{post}
//!          ▼                                     │ Commit                   │ Commit
//!   Committed{postcopy}  (fenced)                ▼                          ▼
//!          │ Resumed (pre)   │ Resumed (post)  Completed ◀── PostcopyDone ── Postcopy
//!          ▼                 ▼                                              (Pages)
//!      Completed ◀──── Postcopy
//!               PostcopyComplete
//!
//!  before Commit ─ error ─▶ Failed (source resumes)   any phase ─ Abort ─▶ Failed
//!  Committed, Postcopy ─ error ─▶ OutcomeUnknown (source stays paused, asks)
//!  before the switch-over completes ─ cancel ─▶ Cancelled (source resumes)
//! ```
//! Any other frame is refused where it arrives (`IllegalTransition`).
//!
//! `RoundAck` makes a round's time end-to-end: the bandwidth that predicts
//! the downtime is what the destination absorbed, not how fast the source
//! filled its socket buffer.
//!
//! Either side may send `Abort {code, count, detail}` at any point (see
//! [`Abort`]); a source that has not sent `Commit` then resumes its guest,
//! which has lost nothing.
//!
//! # The switch-over is a commit: never two running copies
//! The source sends `Commit` only after the destination answered
//! `Prepared`, and from the moment it *starts* writing `Commit` it is
//! **fenced**: it never runs the guest again, whatever happens next. The
//! destination resumes only after it read `Commit`, and only if it did not
//! decide to discard first (a `Commit` and a discard are one decision,
//! taken once under a lock: [`crate::commit::Switch`]). So at most one copy
//! runs; when the source cannot know which way it went, it says so and
//! asks (`OutcomeQuery` ◀ `Outcome`) instead of guessing.
//! ```text
//!   SOURCE                                   DESTINATION
//!   state        runs?  link dies →          state            runs?  link dies / deadline →
//!   ───────────  ─────  ───────────────────  ───────────────  ─────  ─────────────────────────
//!   Rounds       yes    resume (nothing      Rounds           no     discard, exit
//!                       was paused)
//!   SwitchOver   paused resume: abort        Restored         no     discard, exit
//!   (State …                                 (State, Checksums)
//!    Complete)
//!   WaitPrepared paused resume: abort        Prepared         no     never resume: discard;
//!                                            (sent Prepared,         answer `Outcome
//!                                             awaits Commit)          {discarded}` to a query
//!   ═════════════ Commit written: the single point of no return for the source ══════════════
//!   Fenced       no     stay paused; ask     Committed        YES    keep running; answer
//!   (awaits             the destination      (resumed, sends         `Outcome {resumed}`
//!    Resumed)           (`OutcomeQuery`);     Resumed)                to a query
//!                       no answer: exit
//!                       "outcome unknown",
//!                       guest paused here
//!   Completed    no     (exits: migrated     Completed        YES    —
//!                       away)
//!   Postcopy     no     stay fenced with     Postcopy         YES    pause the guest, name the
//!   (pushing,           every page (never    (pages missing)  until  missing pages; never
//!    serving)           rolls back)                           lost   discard
//!
//!   `vmm migrate --recover`: a fenced source asks the destination
//!   (new connection, same authentication, `OutcomeQuery`):
//!     Outcome {resumed}    → the source shuts its copy down (migrated away);
//!     Outcome {discarded}  → the source resumes (the destination never ran it);
//!     unreachable          → still unknown: the guest stays paused, said so.
//!   A query reaching a destination that is still undecided (Prepared, no
//!   Commit yet) makes it discard: the answer is final either way.
//! ```
//! The destination refuses to send `Prepared` unless every page `Config`
//! declared has arrived (pre-copy) or is named by `PostcopyBegin`
//! (post-copy), and, if `Config` announced `--verify`, every page's
//! checksum arrived and matched.
//!
//! # Framing
//! Every frame is a 16-byte header and a payload:
//! ```text
//! magic "LMIG" (u32) | kind (u8) | 0 (u8) | 0 (u16) | length (u32) | crc32 (u32)
//! ```
//! all little-endian; the CRC covers kind, length and payload. A receiver
//! checks the magic, the kind, the bound on the length (before allocating)
//! and the CRC before it looks at the payload; each payload decoder then
//! checks its own fields. Nothing from the network is trusted before that.

use std::io::{self, Read, Write};

/// Protocol version; bumped on any incompatible change.
pub const VERSION: u32 = 5;
/// Frame magic, "LMIG".
pub const MAGIC: u32 = u32::from_le_bytes(*b"LMIG");
/// Largest payload accepted: a page batch or a state blob fits well inside.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Header size.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted before the peer is authenticated: the
/// handshake's frames (and an `Abort` with its capped detail) fit, and an
/// unauthenticated peer cannot make us allocate more than this.
pub const PRE_AUTH_MAX_PAYLOAD: u32 = 4 << 10;
/// Most page runs a `Config` may announce (the source coarsens its hint
/// to this many): each run is prefaulted, so their number bounds the
/// destination's work before `Ready`.
pub const MAX_CONFIG_RUNS: usize = 1 << 16;
/// Longest text from a peer shown in an error or a log line.
pub const MAX_PEER_TEXT: usize = 1024;

/// Errors of the wire protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("Connection failed")]
    Io(#[source] io::Error),
    #[error("The peer went silent: {0}")]
    TimedOut(#[source] io::Error),
    #[error("Peer closed the connection")]
    Closed,
    #[error("Bad frame magic {0:#x}: the peer is not a migration endpoint")]
    BadMagic(u32),
    #[error("Frame length {0} exceeds the limit of {1}")]
    TooLong(u32, u32),
    #[error("Frame CRC mismatch (kind {kind}): the stream is corrupt")]
    BadCrc { kind: u8 },
    #[error("Unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("Malformed {what} message: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("Unexpected {got} message while waiting for {expected}")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("Peer aborted the migration: {0}")]
    PeerAborted(Abort),
    #[error("Peer speaks protocol version {0}, this side {VERSION}")]
    Version(u32),
    #[error("{what} did not arrive within {after:?}")]
    Deadline {
        what: &'static str,
        after: std::time::Duration,
    },
}

impl From<io::Error> for ProtocolError {
    /// A socket timeout is the peer's silence, not a broken connection:
    /// named so that the user sees why a migration ended.
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::TimedOut(e),
            _ => Self::Io(e),
        }
    }
}

/// `text` from a peer made safe to print: control characters (escape
/// sequences, newlines that would fake log lines) become `?`, and the text
/// is cut to `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push_str("[...]");
    }
    out
}

/// Builds a `Malformed` error.
pub fn malformed(what: &'static str, detail: impl Into<String>) -> ProtocolError {
    // Details may quote the peer (a JSON error quotes its input).
    ProtocolError::Malformed {
        what,
        detail: printable(&detail.into(), MAX_PEER_TEXT),
    }
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Challenge = 2,
    Proof = 3,
    Accepted = 4,
    Config = 5,
    Pages = 6,
    RoundEnd = 7,
    State = 8,
    Checksums = 9,
    Complete = 10,
    Resumed = 11,
    Abort = 12,
    FaultChannel = 13,
    PageRequest = 14,
    PostcopyBegin = 15,
    PostcopyDone = 16,
    PostcopyComplete = 17,
    Ready = 18,
    RoundAck = 19,
    Probe = 20,
    Prepared = 21,
    Commit = 22,
    OutcomeQuery = 23,
    Outcome = 24,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Challenge,
            3 => Proof,
            4 => Accepted,
            5 => Config,
            6 => Pages,
            7 => RoundEnd,
            8 => State,
            9 => Checksums,
            10 => Complete,
            11 => Resumed,
            12 => Abort,
            13 => FaultChannel,
            14 => PageRequest,
            15 => PostcopyBegin,
            16 => PostcopyDone,
            17 => PostcopyComplete,
            18 => Ready,
            19 => RoundAck,
            20 => Probe,
            21 => Prepared,
            22 => Commit,
            23 => OutcomeQuery,
            24 => Outcome,
            _ => return None,
        })
    }

    /// The kind's name, for errors.
    pub fn name(self) -> &'static str {
        use Kind::*;
        match self {
            Hello => "Hello",
            Challenge => "Challenge",
            Proof => "Proof",
            Accepted => "Accepted",
            Config => "Config",
            Pages => "Pages",
            RoundEnd => "RoundEnd",
            State => "State",
            Checksums => "Checksums",
            Complete => "Complete",
            Resumed => "Resumed",
            Abort => "Abort",
            FaultChannel => "FaultChannel",
            PageRequest => "PageRequest",
            PostcopyBegin => "PostcopyBegin",
            PostcopyDone => "PostcopyDone",
            PostcopyComplete => "PostcopyComplete",
            Ready => "Ready",
            RoundAck => "RoundAck",
            Probe => "Probe",
            Prepared => "Prepared",
            Commit => "Commit",
            OutcomeQuery => "OutcomeQuery",
            Outcome => "Outcome",
        }
    }
}

/// A checked frame.
#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Fails unless this frame is of kind `expected`; an `Abort` becomes
    /// `PeerAborted`.
    pub fn expect(self, expected: Kind) -> Result<Vec<u8>, ProtocolError> {
        if self.kind == expected {
            return Ok(self.payload);
        }
        if self.kind == Kind::Abort {
            return Err(ProtocolError::PeerAborted(Abort::decode(&self.payload)?));
        }
        Err(ProtocolError::Unexpected {
            got: self.kind.name(),
            expected: expected.name(),
        })
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    write_frame_parts(w, kind, &[payload])
}

/// Writes one frame whose payload is the concatenation of `parts` (saves a
/// copy when a payload is assembled from pieces).
pub fn write_frame_parts(
    w: &mut impl Write,
    kind: Kind,
    parts: &[&[u8]],
) -> Result<(), ProtocolError> {
    w.write_all(&frame_header(kind, parts)?)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Writes `parts` one after the other with as few `writev` calls as the
/// writer allows (one, for a socket that takes it all): a frame in pieces
/// still leaves as one write, not one segment per piece.
pub fn write_all_vectored(w: &mut impl Write, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut left = &mut slices[..];
    io::IoSlice::advance_slices(&mut left, 0); // skip leading empty parts
    while !left.is_empty() {
        match w.write_vectored(left) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The header of a frame whose payload is the concatenation of `parts`.
pub fn frame_header(kind: Kind, parts: &[&[u8]]) -> Result<[u8; HEADER_LEN], ProtocolError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_PAYLOAD as usize {
        return Err(ProtocolError::TooLong(len as u32, MAX_PAYLOAD));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind as u8]);
    h.update(&(len as u32).to_le_bytes());
    for p in parts {
        h.update(p);
    }
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4] = kind as u8;
    header[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    header[12..16].copy_from_slice(&h.finalize().to_le_bytes());
    Ok(header)
}

/// Reads and checks one frame (magic, kind, length bound, CRC).
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    read_frame_limited(r, MAX_PAYLOAD)
}

/// Like [`read_frame`], with a payload of at most `max` bytes (checked
/// before anything is allocated): see [`PRE_AUTH_MAX_PAYLOAD`].
pub fn read_frame_limited(r: &mut impl Read, max: u32) -> Result<Frame, ProtocolError> {
    let mut payload = Vec::new();
    let header = read_header_max(r, max)?;
    read_payload(r, &header, &mut payload)?;
    Ok(Frame {
        kind: header.kind,
        payload,
    })
}

/// Like [`read_frame`], but reads the payload into `payload`, reusing its
/// allocation (the bulk path: one buffer for every page batch).
pub fn read_frame_into(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, ProtocolError> {
    let header = read_header(r)?;
    read_payload(r, &header, payload)?;
    Ok(header.kind)
}

/// A checked frame header: magic, kind and length bound are verified; the
/// CRC is verified with the payload.
#[derive(Debug, Clone, Copy)]
pub struct FrameHeader {
    pub kind: Kind,
    pub len: u32,
    pub crc: u32,
}

fn closed_or_io(e: io::Error) -> ProtocolError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ProtocolError::Closed
    } else {
        e.into()
    }
}

/// Reads a frame header and checks its magic, kind and length bound.
pub fn read_header(r: &mut impl Read) -> Result<FrameHeader, ProtocolError> {
    read_header_max(r, MAX_PAYLOAD)
}

/// Like [`read_header`], with a length bound of `max`.
pub fn read_header_max(r: &mut impl Read, max: u32) -> Result<FrameHeader, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header).map_err(closed_or_io)?;
    let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    if header[5..8] != [0, 0, 0] {
        return Err(malformed("frame header", "reserved bytes are not zero"));
    }
    let kind_raw = header[4];
    let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    if len > max.min(MAX_PAYLOAD) {
        return Err(ProtocolError::TooLong(len, max.min(MAX_PAYLOAD)));
    }
    let kind = Kind::from_u8(kind_raw).ok_or(ProtocolError::UnknownKind(kind_raw))?;
    Ok(FrameHeader { kind, len, crc })
}

/// Reads the payload `header` announces into `payload` and checks its CRC.
pub fn read_payload(
    r: &mut impl Read,
    header: &FrameHeader,
    payload: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    payload.resize(header.len as usize, 0);
    r.read_exact(payload).map_err(closed_or_io)?;
    header.check_crc(&[payload])
}

impl FrameHeader {
    /// Checks the CRC against the payload, given as consecutive pieces.
    pub fn check_crc(&self, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        let mut h = crc32fast::Hasher::new();
        h.update(&[self.kind as u8]);
        h.update(&self.len.to_le_bytes());
        for p in parts {
            h.update(p);
        }
        if h.finalize() != self.crc {
            return Err(ProtocolError::BadCrc {
                kind: self.kind as u8,
            });
        }
        Ok(())
    }
}

/// A little cursor for decoding payloads without panicking on short input.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// Decodes `buf`, naming `what` in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(malformed(
                self.what,
                format!("needs {n} more bytes, has {}", self.buf.len()),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    pub fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails if bytes are left over.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(
                self.what,
                format!("{} trailing bytes", self.buf.len()),
            ))
        }
    }
}

/// Why a peer gave up, as both ends name it: a code, an optional count,
/// and a short human-readable detail. Nothing is parsed back out of the
/// text; the receiver of an `Abort` matches on [`AbortCode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    pub code: AbortCode,
    /// `PagesDiffer`: how many pages; otherwise 0.
    pub count: u64,
    /// Printable ASCII, at most [`Abort::MAX_DETAIL`] bytes.
    pub detail: String,
}

/// What an [`Abort`] is about; the discriminant is the wire code (u16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum AbortCode {
    /// The handshake failed (a wrong secret on either side).
    Authentication = 1,
    /// The destination failed to take the machine (I/O, a bad frame, a VMM
    /// error).
    DestinationFailed = 2,
    /// The source failed before the switch-over completed.
    SourceFailed = 3,
    /// `--verify`: `count` pages differ between source and destination.
    PagesDiffer = 4,
    /// `--verify`: the guest's own check failed on the destination.
    GuestVerification = 5,
    /// The source's user cancelled the migration before the switch-over:
    /// the destination discards everything.
    Cancelled = 6,
}

impl AbortCode {
    fn from_u16(v: u16) -> Option<Self> {
        use AbortCode::*;
        [
            Authentication,
            DestinationFailed,
            SourceFailed,
            PagesDiffer,
            GuestVerification,
            Cancelled,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
    }
}

impl Abort {
    /// Longest detail text sent or accepted.
    pub const MAX_DETAIL: usize = 1024;

    /// An abort with `detail` made printable ASCII and cut to
    /// [`Self::MAX_DETAIL`].
    pub fn new(code: AbortCode, count: u64, detail: &str) -> Self {
        let detail = detail
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .take(Self::MAX_DETAIL)
            .collect();
        Self {
            code,
            count,
            detail,
        }
    }

    /// `Abort` payload: code (u16), count (u64), detail (the rest).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = (self.code as u16).to_le_bytes().to_vec();
        v.extend_from_slice(&self.count.to_le_bytes());
        v.extend_from_slice(self.detail.as_bytes());
        v
    }

    /// Decodes an `Abort` payload; an unknown code or an oversized detail
    /// is malformed, unprintable bytes are replaced.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new(p, "Abort");
        let raw = c.u16()?;
        let code = AbortCode::from_u16(raw)
            .ok_or_else(|| malformed("Abort", format!("unknown code {raw}")))?;
        let count = c.u64()?;
        let detail = c.take(c.remaining())?;
        if detail.len() > Self::MAX_DETAIL {
            return Err(malformed(
                "Abort",
                format!("{} bytes of detail", detail.len()),
            ));
        }
        Ok(Self::new(code, count, &String::from_utf8_lossy(detail)))
    }
}

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            AbortCode::Authentication => write!(f, "authentication failed: {}", self.detail),
            AbortCode::DestinationFailed => write!(f, "destination failed: {}", self.detail),
            AbortCode::SourceFailed => write!(f, "source failed: {}", self.detail),
            AbortCode::PagesDiffer => {
                write!(f, "verification failed: {} pages differ", self.count)
            }
            AbortCode::GuestVerification => {
                write!(f, "guest verification failed: {}", self.detail)
            }
            AbortCode::Cancelled => {
                write!(f, "the source cancelled the migration: {}", self.detail)
            }
        }
    }
}

/// `RoundEnd` number that closes the calibration burst (`Probe` frames),
/// never a real round's.
pub const CALIBRATION_ROUND: u32 = u32::MAX;

/// `RoundEnd` payload: the round number.
pub fn encode_round_end(round: u32) -> [u8; 4] {
    round.to_le_bytes()
}

/// Decodes a `RoundEnd` payload.
pub fn decode_round_end(p: &[u8]) -> Result<u32, ProtocolError> {
    let mut c = Cursor::new(p, "RoundEnd");
    let r = c.u32()?;
    c.finish()?;
    Ok(r)
}

/// `Config` payload: RAM size, whether a post-copy phase follows (then a
/// second, fault connection comes), and the machine configuration (JSON,
/// A decoded `Config` message.
#[derive(Debug)]
pub struct ConfigMsg<'a> {
    /// Bytes of guest RAM (a non-zero multiple of the page size).
    pub ram_size: u64,
    /// Whether a fault connection follows (post-copy or hybrid).
    pub postcopy: bool,
    /// Whether `Checksums` will follow the state (`--verify`): announced
    /// here so that stripping them cannot silently turn verification off.
    pub verify: bool,
    /// The source's populated RAM as page runs: what round 0 will send (or,
    /// in post-copy, what `PostcopyBegin` will account for). The
    /// destination refuses to resume unless every page of them arrived or
    /// is accounted for.
    pub populated: Vec<(u64, u64)>,
    /// The machine configuration, opaque to the engine.
    pub machine: &'a [u8],
}

/// What the source announces in `Config`'s flag byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigFlags {
    /// Bit 0: a fault connection follows.
    pub postcopy: bool,
    /// Bit 1: `Checksums` follow the state.
    pub verify: bool,
}

impl ConfigFlags {
    const POSTCOPY: u8 = 1;
    const VERIFY: u8 = 2;

    fn encode(self) -> u8 {
        (u8::from(self.postcopy) * Self::POSTCOPY) | (u8::from(self.verify) * Self::VERIFY)
    }

    fn decode(b: u8) -> Result<Self, ProtocolError> {
        if b & !(Self::POSTCOPY | Self::VERIFY) != 0 {
            return Err(malformed("Config", format!("unknown flags {b:#x}")));
        }
        Ok(Self {
            postcopy: b & Self::POSTCOPY != 0,
            verify: b & Self::VERIFY != 0,
        })
    }
}

/// Encodes a `Config` payload: RAM size (u64), flags (u8: bit 0 post-copy,
/// bit 1 verify), populated page runs (as [`encode_runs`]), machine
/// configuration.
pub fn encode_config(
    ram_size: u64,
    flags: ConfigFlags,
    populated: &[(u64, u64)],
    machine: &[u8],
) -> Vec<u8> {
    let mut v = ram_size.to_le_bytes().to_vec();
    v.push(flags.encode());
    v.extend_from_slice(&encode_runs(populated));
    v.extend_from_slice(machine);
    v
}

/// Decodes a `Config` payload; the RAM size and every run are checked.
pub fn decode_config(p: &[u8]) -> Result<ConfigMsg<'_>, ProtocolError> {
    let mut c = Cursor::new(p, "Config");
    let ram_size = c.u64()?;
    if ram_size == 0 || ram_size % crate::codec::PAGE as u64 != 0 {
        return Err(malformed("Config", format!("RAM size {ram_size}")));
    }
    let flags = ConfigFlags::decode(c.u8()?)?;
    let populated = read_runs(&mut c, ram_size / crate::codec::PAGE as u64)?;
    if populated.len() > MAX_CONFIG_RUNS {
        return Err(malformed(
            "Config",
            format!("{} runs (at most {MAX_CONFIG_RUNS})", populated.len()),
        ));
    }
    let machine = c.take(c.remaining())?;
    Ok(ConfigMsg {
        ram_size,
        postcopy: flags.postcopy,
        verify: flags.verify,
        populated,
        machine,
    })
}

/// A list of page runs `(first, count)`: count (u32), then pairs of u64.
pub fn encode_runs(runs: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 16 * runs.len());
    v.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for (f, n) in runs {
        v.extend_from_slice(&f.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
    }
    v
}

/// Decodes page runs, each checked to lie below `ram_pages`.
pub fn decode_runs(p: &[u8], ram_pages: u64) -> Result<Vec<(u64, u64)>, ProtocolError> {
    let mut c = Cursor::new(p, "page runs");
    let runs = read_runs(&mut c, ram_pages)?;
    c.finish()?;
    Ok(runs)
}

/// Reads page runs from `c` (count bounded by the bytes left before
/// anything is allocated), each checked to lie below `ram_pages`, after the
/// previous one (sorted and disjoint: no page is named twice, so the work
/// they cause is bounded by the RAM size).
fn read_runs(c: &mut Cursor<'_>, ram_pages: u64) -> Result<Vec<(u64, u64)>, ProtocolError> {
    let n = c.u32()? as usize;
    if n > c.remaining() / 16 {
        return Err(malformed(
            "page runs",
            format!("{n} runs in {} bytes", c.remaining()),
        ));
    }
    let mut runs = Vec::with_capacity(n);
    let mut next_free = 0;
    for _ in 0..n {
        let (f, k) = (c.u64()?, c.u64()?);
        if f.checked_add(k).is_none_or(|end| end > ram_pages) {
            return Err(malformed("page runs", format!("{f}+{k} beyond RAM")));
        }
        if f < next_free {
            return Err(malformed(
                "page runs",
                format!("{f}+{k} overlaps or precedes the run before (not sorted and disjoint)"),
            ));
        }
        next_free = f + k;
        runs.push((f, k));
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::State, b"hello").unwrap();
        write_frame_parts(&mut buf, Kind::Pages, &[b"ab", b"cd"]).unwrap();
        let mut r = &buf[..];
        let f = read_frame(&mut r).unwrap();
        assert_eq!((f.kind, f.payload.as_slice()), (Kind::State, &b"hello"[..]));
        let f = read_frame(&mut r).unwrap();
        assert_eq!((f.kind, f.payload.as_slice()), (Kind::Pages, &b"abcd"[..]));
        assert!(matches!(read_frame(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn every_corruption_is_caught() {
        let mut good = Vec::new();
        write_frame(&mut good, Kind::Config, &[7u8; 64]).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(
                read_frame(&mut &bad[..]).is_err(),
                "flip at byte {i} not detected"
            );
        }
        for n in 0..good.len() {
            assert!(
                read_frame(&mut &good[..n]).is_err(),
                "truncation at {n} not detected"
            );
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4] = Kind::Pages as u8;
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &h[..]),
            Err(ProtocolError::TooLong(..))
        ));
    }

    #[test]
    fn cursor_never_panics_on_short_input() {
        let mut c = Cursor::new(&[1, 2, 3], "test");
        assert!(c.u64().is_err());
        assert!(decode_round_end(&[1, 2]).is_err());
        assert!(decode_config(&[0; 4]).is_err());
    }

    #[test]
    fn config_round_trips_and_checks_its_runs() {
        let runs = [(0, 16), (100, 4)];
        let flags = ConfigFlags {
            postcopy: true,
            verify: true,
        };
        let p = encode_config(1 << 20, flags, &runs, b"{}");
        let c = decode_config(&p).unwrap();
        assert_eq!(
            (
                c.ram_size,
                c.postcopy,
                c.verify,
                &c.populated[..],
                c.machine
            ),
            (1 << 20, true, true, &runs[..], &b"{}"[..])
        );
        let mut unknown = p.clone();
        unknown[8] |= 0x80;
        assert!(decode_config(&unknown).is_err(), "unknown flag accepted");
        // A run beyond the announced RAM (256 pages), or a RAM size that is
        // not a whole number of pages, is refused.
        assert!(decode_config(&encode_config(
            1 << 20,
            ConfigFlags::default(),
            &[(250, 7)],
            b""
        ))
        .is_err());
        assert!(decode_config(&encode_config(4097, ConfigFlags::default(), &[], b"")).is_err());
        // A run count larger than the bytes that follow is refused before
        // anything is allocated.
        let mut p = encode_config(1 << 20, ConfigFlags::default(), &[], b"");
        p[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_config(&p).is_err());
    }

    #[test]
    fn runs_must_be_sorted_disjoint_and_few() {
        let ok = |runs: &[(u64, u64)]| {
            decode_config(&encode_config(1 << 20, ConfigFlags::default(), runs, b""))
                .map(|c| c.populated)
        };
        assert!(
            ok(&[(0, 4), (4, 4), (10, 1)]).is_ok(),
            "touching runs are fine"
        );
        assert!(ok(&[(0, 8), (4, 8)]).is_err(), "overlap");
        assert!(ok(&[(10, 1), (0, 4)]).is_err(), "unsorted");
        assert!(ok(&[(0, 256), (0, 256)]).is_err(), "the same run twice");
        let many: Vec<_> = (0..MAX_CONFIG_RUNS as u64 + 1).map(|i| (i, 1)).collect();
        let p = encode_config(1 << 30, ConfigFlags::default(), &many, b"");
        let err = decode_config(&p).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn pre_auth_frames_are_small() {
        let mut big = Vec::new();
        write_frame(&mut big, Kind::Abort, &vec![0x1b; 8 << 10]).unwrap();
        let err = read_frame_limited(&mut &big[..], PRE_AUTH_MAX_PAYLOAD).unwrap_err();
        assert!(
            matches!(err, ProtocolError::TooLong(_, PRE_AUTH_MAX_PAYLOAD)),
            "{err}"
        );
    }

    #[test]
    fn peer_text_is_made_printable_and_capped() {
        assert_eq!(printable("a\x1b[2Jb\nc", 100), "a?[2Jb?c");
        let long = printable(&"x".repeat(5000), 10);
        assert_eq!(long, "xxxxxxxxxx[...]");
        let m = malformed("Resumed", "\x1b[31mfake\nERROR line");
        assert!(!m.to_string().contains('\x1b') && !m.to_string().contains('\n'));
    }

    #[test]
    fn abort_reasons_round_trip_as_codes() {
        let a = Abort::new(AbortCode::PagesDiffer, 12, "");
        assert_eq!(Abort::decode(&a.encode()).unwrap(), a);
        assert_eq!(a.to_string(), "verification failed: 12 pages differ");
        let b = Abort::new(AbortCode::DestinationFailed, 0, "bad\n\x1b[31mline");
        assert_eq!(b.detail, "bad??[31mline", "control characters are replaced");
        let long = Abort::new(AbortCode::SourceFailed, 0, &"x".repeat(5000));
        assert_eq!(long.detail.len(), Abort::MAX_DETAIL);
        let mut unknown = a.encode();
        unknown[0] = 99;
        assert!(Abort::decode(&unknown).is_err());
        assert!(Abort::decode(&[1]).is_err());
    }
}
