//! The protected stream: every byte after the handshake is confidential and
//! integrity-protected, by well-kept libraries rather than our own crypto.
//!
//! # Modes ([`Protection`], chosen on the command line)
//! 1. **TLS 1.3 with mutual certificates** (`--tls-cert/--tls-key/--tls-ca`,
//!    [`tls`], rustls with the `ring` provider): the source is the TLS
//!    client, the destination the server; each side accepts only a
//!    certificate chain that ends at the CA it was given, and the source
//!    also checks the destination's name against the host it dialled.
//! 2. **Shared secret** (`--secret FILE`, the default, [`noise`]): Noise
//!    `NNpsk0_25519_AESGCM_BLAKE2s` through `snow`, its 32-byte PSK
//!    derived from the secret with HKDF-SHA256. Only a peer holding the
//!    same secret completes the handshake; fresh ephemeral keys on both
//!    sides give every connection its own transport keys.
//! 3. **Plaintext** (`--insecure-plaintext`, for trusted links only): the
//!    bytes go as they are; both ends print a warning.
//!
//! In every mode the protocol's HMAC challenge–response ([`crate::auth`])
//! still runs first, *inside* the protected channel, so the message
//! sequence and its version check are the same in all three. With a
//! shared secret it proves knowledge of the secret once more (defence in
//! depth); with TLS its key is the session's exporter value (RFC 8446
//! §7.5), which both ends hold only if they share the very same session.
//!
//! # Records and why they resist dropping, reordering and replay
//! Noise transport messages carry at most 65 535 bytes, so the stream is
//! cut into records `len (u16, big-endian) ‖ ciphertext ‖ tag`, each at
//! most [`noise::MAX_PLAIN`] bytes of plaintext. The AEAD nonce of record
//! *n* is *n* itself, counted separately by each direction and never sent:
//! a record that was modified, dropped, reordered or replayed is opened
//! with the wrong nonce (or has the wrong tag) and fails with
//! [`SecureError::Integrity`], naming the record. TLS 1.3 does the same
//! with its own sequence numbers; rustls reports a bad record as an error
//! that we wrap in [`SecureError::Tls`]. After either, the stream is dead:
//! every later read fails too.
//!
//! # One type for the engine
//! [`SecureStream`] implements `Read` and `Write` (also on `&SecureStream`,
//! as `TcpStream` does) and `try_clone`/`shutdown`/`set_read_timeout`, so
//! the engine's code above it reads as before. A clone shares one session:
//! the post-copy fault connection reads on one thread and writes on
//! another. Each direction has its own lock, and the socket is never
//! touched while a lock shared by both directions is held, so a reader
//! asleep in `read()` never stalls a writer. In plaintext, reads and
//! writes go straight to the socket (the destination's `readv` into guest
//! RAM keeps its single copy); encrypted, pages are decrypted into a
//! buffer and copied from there.

pub mod certs;
pub mod noise;
pub mod tls;

use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::auth::{self, AuthError, Secret};
use crate::deadline::{DeadlineReader, Duplex, TimedRead};
use crate::transport::{self, TransportError};

/// Bytes of ciphertext read from the socket at a time.
const RAW_BUFFER: usize = 256 << 10;
/// Most plaintext one `write` call encrypts before it goes to the socket.
const MAX_WRITE: usize = 1 << 20;

/// Errors of the protected stream.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error(
        "Integrity check failed on record {record}: the stream was modified, \
         or a record dropped, reordered or replayed"
    )]
    Integrity { record: u64 },
    #[error("Record {record} is {len} bytes, shorter than its authentication tag")]
    ShortRecord { record: u64, len: usize },
    #[error("The stream ended inside record {record}")]
    Truncated { record: u64 },
    #[error("The stream already failed its integrity check; it cannot be read further")]
    Broken,
    #[error("TLS record refused (modified, dropped, reordered or replayed data, or a TLS alert)")]
    Tls(#[source] rustls::Error),
    #[error(
        "Authentication failed: the peer does not hold the same shared secret (Noise handshake)"
    )]
    WrongPsk,
    #[error("Authentication failed: the peer closed the connection during the {0} handshake (wrong secret or certificate, or another protection mode?)")]
    HandshakeClosed(&'static str),
    #[error("TLS handshake failed")]
    TlsHandshake(#[source] io::Error),
    #[error("Noise protocol error")]
    Noise(#[source] snow::Error),
    #[error("Connection failed during the handshake")]
    Io(#[source] io::Error),
    #[error("Cannot read {what} from {path}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    PemEmpty { what: &'static str, path: PathBuf },
    #[error("Invalid TLS configuration")]
    TlsConfig(#[source] rustls::Error),
    #[error("Invalid TLS client verifier configuration")]
    TlsVerifier(#[source] rustls::server::VerifierBuilderError),
    #[error("'{0}' is not a host name or IP address TLS can check a certificate against")]
    ServerName(String),
    #[error("Cannot generate certificates")]
    Rcgen(#[source] rcgen::Error),
    #[error("Cannot write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl SecureError {
    /// The protection error inside an I/O error from [`SecureStream`], if any.
    pub fn of(e: &io::Error) -> Option<&SecureError> {
        e.get_ref()?.downcast_ref::<SecureError>()
    }

    /// As an I/O error (what `Read`/`Write` must return).
    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }
}

/// How the connections of a migration are protected.
#[derive(Clone)]
pub enum Protection {
    /// TLS 1.3, both sides authenticated by certificates.
    Tls(Arc<tls::TlsConfig>),
    /// Noise with a PSK derived from the shared secret; HMAC handshake inside.
    Psk(Secret),
    /// No encryption: only the HMAC handshake (`--insecure-plaintext`).
    InsecurePlaintext(Secret),
}

impl std::fmt::Debug for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The certificate files of TLS mode.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The warning both ends print in plaintext mode.
pub const PLAINTEXT_WARNING: &str = "WARNING: --insecure-plaintext: guest memory and machine state \
     cross the network unencrypted and unprotected against modification; use only on a trusted link";

impl Protection {
    /// The mode the command line asks for: TLS if certificate files are
    /// given, else the shared secret, encrypted unless `insecure_plaintext`.
    pub fn from_cli(
        secret: Option<&std::path::Path>,
        tls: Option<TlsFiles>,
        insecure_plaintext: bool,
    ) -> Result<Self, String> {
        match (secret, tls) {
            (Some(_), Some(_)) => Err("--secret and --tls-* exclude each other".into()),
            (None, None) => Err("give --secret FILE or --tls-cert/--tls-key/--tls-ca".into()),
            (None, Some(_)) if insecure_plaintext => {
                Err("--insecure-plaintext goes with --secret, not with TLS".into())
            }
            (None, Some(files)) => Ok(Self::Tls(Arc::new(
                tls::TlsConfig::load(&files).map_err(|e| error_chain(&e))?,
            ))),
            (Some(path), None) => {
                let s = Secret::from_file(path).map_err(|e| error_chain(&e))?;
                Ok(if insecure_plaintext {
                    Self::InsecurePlaintext(s)
                } else {
                    Self::Psk(s)
                })
            }
        }
    }

    /// The mode's name, for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tls(_) => "tls",
            Self::Psk(_) => "psk",
            Self::InsecurePlaintext(_) => "insecure-plaintext",
        }
    }
}

/// `e` and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s += &format!(": {c}");
        source = c.source();
    }
    s
}

/// Connects to `addr` (`tcp:HOST:PORT`), runs the protection's handshake
/// as the source, then the HMAC handshake inside it.
///
/// The HMAC handshake must end within [`HANDSHAKE_DEADLINE`] as a whole
/// (counted in decrypted bytes): a destination trickling its answers
/// cannot hold the source.
pub fn connect(addr: &str, p: &Protection) -> Result<SecureStream, SecureError> {
    let tcp = transport::connect(addr)?;
    let (stream, secret) = protect_as_source(tcp, addr, p)?;
    let mut reader = DeadlineReader::new(stream.clone(), transport::peer_timeout());
    reader.expect_within(HANDSHAKE_DEADLINE, "the handshake");
    auth::authenticate_as_source(&mut Duplex(&mut reader, &mut &stream), &secret)
        .map_err(|e| refused(e, p))?;
    // The deadline shortened the socket's timeout: back to the usual one.
    stream
        .set_read_timeout(Some(transport::peer_timeout()))
        .map_err(SecureError::Io)?;
    Ok(stream)
}

/// How long a destination may take over the source's whole HMAC handshake.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// The protection's own handshake as the source (the TLS client, the Noise
/// initiator) on a connection to `addr`: the protected stream and the key
/// of the HMAC handshake that must follow inside it.
pub fn protect_as_source(
    tcp: TcpStream,
    addr: &str,
    p: &Protection,
) -> Result<(SecureStream, Secret), SecureError> {
    Ok(match p {
        Protection::Tls(cfg) => tls::client(tcp, cfg, &transport::host_of(addr))?,
        Protection::Psk(s) => (noise::initiate(tcp, s)?, s.clone()),
        Protection::InsecurePlaintext(s) => (SecureStream::plain(tcp)?, s.clone()),
    })
}

/// The protection's own handshake as the destination (the TLS server, the
/// Noise responder) on an accepted connection: the protected stream and
/// the key of the HMAC handshake that must follow inside it.
pub fn protect_as_destination(
    tcp: TcpStream,
    p: &Protection,
) -> Result<(SecureStream, Secret), SecureError> {
    Ok(match p {
        Protection::Tls(cfg) => tls::server(tcp, cfg)?,
        Protection::Psk(s) => (noise::respond(tcp, s)?, s.clone()),
        Protection::InsecurePlaintext(s) => (SecureStream::plain(tcp)?, s.clone()),
    })
}

/// A TLS client learns that the server refused its certificate only when
/// its first write or read fails: say so rather than "broken pipe".
fn refused(e: AuthError, p: &Protection) -> SecureError {
    use crate::protocol::ProtocolError;
    match (&e, p) {
        (AuthError::Protocol(ProtocolError::Closed), Protection::Tls(_)) => {
            SecureError::HandshakeClosed("TLS")
        }
        (AuthError::Protocol(ProtocolError::Io(io)), Protection::Tls(_))
            if SecureError::of(io).is_none() =>
        {
            SecureError::HandshakeClosed("TLS")
        }
        _ => e.into(),
    }
}

/// Accepts one connection on `l` and authenticates it as the destination.
pub fn accept(l: &TcpListener, p: &Protection) -> Result<(SecureStream, SocketAddr), SecureError> {
    let (tcp, peer) = transport::accept(l)?;
    let (stream, secret) = protect_as_destination(tcp, p)?;
    auth::authenticate_as_destination(&mut &stream, &secret)?;
    Ok((stream, peer))
}

/// What protects one connection after its handshake.
enum Channel {
    Plain,
    Noise(noise::Transport),
    Tls(Box<Mutex<rustls::Connection>>),
}

/// The reading half's state (encrypted modes).
struct Rx {
    raw: BufReader<TcpStream>,
    /// Decrypted bytes not yet handed out, from `pos`.
    plain: Vec<u8>,
    pos: usize,
    /// Scratch for one record's ciphertext.
    cipher: Vec<u8>,
    /// Records opened so far (Noise: the next nonce).
    records: u64,
    broken: bool,
}

/// The writing half's state (encrypted modes).
struct Tx {
    /// Plaintext gathered from the caller's slices.
    plain: Vec<u8>,
    /// Records ready for the socket.
    wire: Vec<u8>,
    /// Records sealed so far (Noise: the next nonce).
    records: u64,
}

struct Inner {
    tcp: TcpStream,
    channel: Channel,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
}

/// A TCP connection after its handshake: `Read + Write`, encrypted and
/// authenticated unless the mode is plaintext. Clones share the session.
#[derive(Clone)]
pub struct SecureStream {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SecureStream {
    /// Wraps `tcp` after a handshake established `channel`.
    fn new(tcp: TcpStream, channel: Channel) -> io::Result<Self> {
        // Plaintext reads bypass the buffer: no capacity for it.
        let capacity = match channel {
            Channel::Plain => 0,
            _ => RAW_BUFFER,
        };
        let rx = Rx {
            raw: BufReader::with_capacity(capacity, tcp.try_clone()?),
            plain: Vec::new(),
            pos: 0,
            cipher: Vec::new(),
            records: 0,
            broken: false,
        };
        let tx = Tx {
            plain: Vec::new(),
            wire: Vec::new(),
            records: 0,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                tcp,
                channel,
                rx: Mutex::new(rx),
                tx: Mutex::new(tx),
            }),
        })
    }

    /// A plaintext stream (no handshake of its own).
    pub fn plain(tcp: TcpStream) -> Result<Self, SecureError> {
        Self::new(tcp, Channel::Plain).map_err(SecureError::Io)
    }

    /// The socket under the protection (to shut it down, or to set its
    /// options); reading or writing it directly would break the stream.
    pub fn socket(&self) -> &TcpStream {
        &self.inner.tcp
    }

    /// Whether bytes are encrypted on this stream.
    pub fn is_encrypted(&self) -> bool {
        !matches!(self.inner.channel, Channel::Plain)
    }

    /// Another handle on the same session (never fails; `Result` for
    /// `TcpStream`'s signature).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(self.clone())
    }

    /// Shuts the socket down (wakes a reader asleep in `read`).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.tcp.shutdown(how)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.tcp.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.tcp.set_write_timeout(t)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.inner.tcp.set_nodelay(on)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.tcp.peer_addr()
    }

    /// Reads decrypted bytes into `bufs`.
    fn read_secure(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let mut rx = lock(&self.inner.rx);
        if rx.broken {
            return Err(SecureError::Broken.into_io());
        }
        let r = match &self.inner.channel {
            Channel::Plain => unreachable!("plaintext reads go to the socket"),
            Channel::Noise(t) => noise::read(&mut rx, t, bufs),
            Channel::Tls(conn) => tls::read(&mut rx, conn, bufs),
        };
        if r.as_ref().is_err_and(|e| SecureError::of(e).is_some()) {
            rx.broken = true;
        }
        r
    }

    /// Encrypts what `bufs` hold (up to [`MAX_WRITE`]) and sends it whole.
    fn write_secure(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tx = lock(&self.inner.tx);
        let tx = &mut *tx;
        tx.plain.clear();
        for b in bufs {
            let room = MAX_WRITE - tx.plain.len();
            tx.plain.extend_from_slice(&b[..b.len().min(room)]);
            if room <= b.len() {
                break;
            }
        }
        if tx.plain.is_empty() {
            return Ok(0);
        }
        tx.wire.clear();
        match &self.inner.channel {
            Channel::Plain => unreachable!("plaintext writes go to the socket"),
            Channel::Noise(t) => noise::seal(tx, t)?,
            Channel::Tls(conn) => tls::seal(tx, conn)?,
        }
        (&self.inner.tcp).write_all(&tx.wire)?;
        Ok(tx.plain.len())
    }
}

/// Copies `src` into `bufs`; returns bytes copied.
fn copy_out(src: &[u8], bufs: &mut [IoSliceMut<'_>]) -> usize {
    let mut n = 0;
    for b in bufs.iter_mut() {
        let k = b.len().min(src.len() - n);
        b[..k].copy_from_slice(&src[n..n + k]);
        n += k;
        if n == src.len() {
            break;
        }
    }
    n
}

impl Rx {
    /// Hands out buffered plaintext, if any.
    fn drain(&mut self, bufs: &mut [IoSliceMut<'_>]) -> usize {
        let n = copy_out(&self.plain[self.pos..], bufs);
        self.pos += n;
        n
    }

    fn has_plain(&self) -> bool {
        self.pos < self.plain.len()
    }

    /// Ciphertext from the socket (empty at the end of the stream).
    fn fill(&mut self) -> io::Result<&[u8]> {
        self.raw.fill_buf()
    }
}

impl Read for &SecureStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_vectored(&mut [IoSliceMut::new(buf)])
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self.inner.channel {
            Channel::Plain => (&self.inner.tcp).read_vectored(bufs),
            _ => self.read_secure(bufs),
        }
    }
}

impl Write for &SecureStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.inner.channel {
            Channel::Plain => (&self.inner.tcp).write_vectored(bufs),
            _ => self.write_secure(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(()) // every write went to the socket whole
    }
}

/// Deadlines over decrypted bytes: a read's bound is the socket's. A read
/// that times out keeps what it gathered of a record, so that the next read
/// goes on where it stopped.
impl TimedRead for SecureStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.tcp.set_read_timeout(t)
    }
}

impl Read for SecureStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Write for SecureStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
