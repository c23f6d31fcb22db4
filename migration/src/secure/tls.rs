//! Certificate mode: TLS 1.3 with mutual authentication, through rustls
//! (the `ring` provider; TLS 1.2 is not compiled in).
//!
//! The destination is the server: it demands a client certificate and
//! accepts only a chain that ends at the configured CA
//! (`WebPkiClientVerifier`). The source is the client: it accepts only a
//! server chain that ends at the same CA *and* names the host it dialled.
//! Session resumption is off, so every connection (the main one and the
//! fault connection) authenticates with certificates afresh.
//!
//! The stream is then rustls's records; [`read`] and [`seal`] move bytes
//! between the socket and the session under a lock that is held only for
//! the crypto, never across a blocking socket call.

use std::io::{self, BufRead, IoSliceMut, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

use super::{lock, Channel, Rx, SecureError, SecureStream, TlsFiles, Tx};
use crate::auth::Secret;

/// The label of the exporter value that keys the HMAC handshake.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-lmig-hmac-handshake";

/// Both ends' rustls configurations from one identity (certificate chain
/// and key) and one CA.
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl TlsConfig {
    /// Reads the PEM files.
    pub fn load(files: &TlsFiles) -> Result<Self, SecureError> {
        let chain = certificates(&files.cert, "certificate")?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| SecureError::Pem {
            what: "private key",
            path: files.key.clone(),
            source,
        })?;
        let ca = certificates(&files.ca, "CA certificate")?;
        Self::new(chain, key, ca)
    }

    /// Builds both configurations: TLS 1.3 only, mutual authentication.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: Vec<CertificateDer<'static>>,
    ) -> Result<Self, SecureError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(SecureError::TlsConfig)?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(SecureError::TlsVerifier)?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(SecureError::TlsConfig)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(SecureError::TlsConfig)?;
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(SecureError::TlsConfig)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(SecureError::TlsConfig)?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

fn certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, SecureError> {
    let pem = |source| SecureError::Pem {
        what,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(SecureError::PemEmpty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The source's handshake with the destination `host`; returns the
/// stream and the key of the HMAC handshake.
pub fn client(
    tcp: TcpStream,
    cfg: &TlsConfig,
    host: &str,
) -> Result<(SecureStream, Secret), SecureError> {
    let name =
        ServerName::try_from(host.to_string()).map_err(|_| SecureError::ServerName(host.into()))?;
    let conn = ClientConnection::new(cfg.client.clone(), name).map_err(SecureError::TlsConfig)?;
    handshake(tcp, conn.into())
}

/// The destination's handshake.
pub fn server(tcp: TcpStream, cfg: &TlsConfig) -> Result<(SecureStream, Secret), SecureError> {
    let conn = rustls::ServerConnection::new(cfg.server.clone()).map_err(SecureError::TlsConfig)?;
    handshake(tcp, conn.into())
}

fn handshake(
    mut tcp: TcpStream,
    mut conn: Connection,
) -> Result<(SecureStream, Secret), SecureError> {
    while conn.is_handshaking() {
        match conn.complete_io(&mut tcp) {
            Ok((0, 0)) => return Err(SecureError::HandshakeClosed("TLS")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(SecureError::HandshakeClosed("TLS"))
            }
            Err(e) => return Err(SecureError::TlsHandshake(e)),
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut tcp).map_err(SecureError::Io)?;
    }
    let key = conn
        .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(SecureError::TlsConfig)?;
    // Whole writes are sealed at once (the stream bounds them).
    conn.set_buffer_limit(None);
    let stream = SecureStream::new(tcp, Channel::Tls(Box::new(Mutex::new(conn))))
        .map_err(SecureError::Io)?;
    Ok((stream, Secret::from_bytes(&key)))
}

/// Seals `tx.plain` into TLS records in `tx.wire`.
pub(super) fn seal(tx: &mut Tx, conn: &Mutex<Connection>) -> io::Result<()> {
    let mut c = lock(conn);
    c.writer().write_all(&tx.plain)?;
    while c.wants_write() {
        c.write_tls(&mut tx.wire)?;
    }
    Ok(())
}

/// Reads plaintext into `bufs`, feeding the session ciphertext from the
/// socket until it has some; 0 at the end of the stream.
pub(super) fn read(
    rx: &mut Rx,
    conn: &Mutex<Connection>,
    bufs: &mut [IoSliceMut<'_>],
) -> io::Result<usize> {
    loop {
        {
            let mut c = lock(conn);
            c.process_new_packets()
                .map_err(|e| SecureError::Tls(e).into_io())?;
            match c.reader().read_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
        }
        // Outside the lock: this may sleep until the peer sends.
        let raw = rx.fill()?;
        if raw.is_empty() {
            return Ok(0);
        }
        let n = lock(conn).read_tls(&mut &*raw)?;
        rx.raw.consume(n);
    }
}

/// What the cipher costs on one core: MB/s of plaintext sealed by a
/// client and opened by a server (both on this thread, in memory), in 1 MiB
/// writes, `total` bytes in all. `src` and `dst` are the two ends' configs.
pub fn seal_open_rate(src: &TlsConfig, dst: &TlsConfig, total: usize) -> Result<f64, SecureError> {
    let name = ServerName::try_from("localhost").expect("a valid name");
    let mut c: Connection = ClientConnection::new(src.client.clone(), name)
        .map_err(SecureError::TlsConfig)?
        .into();
    let mut s: Connection = rustls::ServerConnection::new(dst.server.clone())
        .map_err(SecureError::TlsConfig)?
        .into();
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        pass(&mut c, &mut s, &mut wire)?;
        pass(&mut s, &mut c, &mut wire)?;
    }
    c.set_buffer_limit(None);
    let plain: Vec<u8> = (0..1 << 20).map(|k: u32| (k * 31 + k / 7) as u8).collect();
    let mut back = vec![0u8; plain.len()];
    let t = std::time::Instant::now();
    for _ in 0..total.div_ceil(plain.len()) {
        c.writer().write_all(&plain).map_err(SecureError::Io)?;
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).map_err(SecureError::Io)?;
        }
        deliver(&mut s, &wire, &mut back)?;
    }
    Ok((total.div_ceil(plain.len()) * plain.len()) as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// Moves every pending record from `a` to `b`, in memory.
fn pass(a: &mut Connection, b: &mut Connection, wire: &mut Vec<u8>) -> Result<(), SecureError> {
    wire.clear();
    while a.wants_write() {
        a.write_tls(wire).map_err(SecureError::Io)?;
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        b.read_tls(&mut rest).map_err(SecureError::Io)?;
        b.process_new_packets().map_err(SecureError::Tls)?;
    }
    Ok(())
}

/// Feeds `wire` to `s` and reads the plaintext out as it comes (the
/// session holds only a bounded amount of it).
fn deliver(s: &mut Connection, wire: &[u8], back: &mut [u8]) -> Result<(), SecureError> {
    let (mut rest, mut got) = (wire, 0);
    while got < back.len() {
        match s.reader().read(&mut back[got..]) {
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !rest.is_empty() => {
                s.read_tls(&mut rest).map_err(SecureError::Io)?;
                s.process_new_packets().map_err(SecureError::Tls)?;
            }
            Err(e) => return Err(SecureError::Io(e)),
        }
    }
    Ok(())
}
