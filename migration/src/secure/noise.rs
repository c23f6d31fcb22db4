//! Shared-secret mode: Noise `NNpsk0` through `snow`, and its records.
//!
//! The handshake is two messages (`-> psk, e` / `<- e, ee`): each side
//! sends a fresh ephemeral key, and the PSK is mixed in before the first
//! message, so its payload (and everything after) is encrypted and
//! authenticated under keys only a holder of the PSK can derive. A wrong
//! secret fails the first message's tag on the destination
//! ([`SecureError::WrongPsk`]). The prologue binds the handshake to this
//! protocol. The PSK is `HKDF-SHA256(salt = PSK_SALT, ikm = secret,
//! info = PSK_INFO)`, so the same secret file never keys two different
//! things the same way (the HMAC handshake uses the secret itself).
//!
//! After the handshake, [`Transport`] (snow's stateless transport) seals
//! record *n* with nonce *n*; both ends count records themselves, so the
//! nonce never crosses the wire and any record out of place fails.

use std::io::{self, BufRead, IoSliceMut, Read, Write};
use std::net::TcpStream;

use hkdf::Hkdf;
use sha2::Sha256;

use super::{Channel, Rx, SecureError, SecureStream, Tx};
use crate::auth::Secret;

/// The Noise protocol name (pattern, DH, cipher, hash). AES-GCM rather
/// than ChaCha20-Poly1305: with AES-NI (ring) it seals and opens 1450 MB/s
/// per core here against 566 (see the `protection` bench).
pub const PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_BLAKE2s";
/// Bound into the handshake hash: a peer speaking anything else fails.
const PROLOGUE: &[u8] = b"lmig noise v1";
const PSK_SALT: &[u8] = b"lmig psk salt v1";
const PSK_INFO: &[u8] = b"noise psk0";
/// Largest Noise message.
pub const MAX_MESSAGE: usize = 65535;
/// Authentication tag per message.
pub const TAG: usize = 16;
/// Most plaintext per record.
pub const MAX_PLAIN: usize = MAX_MESSAGE - TAG;

/// The session's keys after the handshake.
pub type Transport = snow::StatelessTransportState;

/// The 32-byte Noise PSK derived from the shared secret.
pub fn derive_psk(secret: &Secret) -> [u8; 32] {
    let mut psk = [0u8; 32];
    Hkdf::<Sha256>::new(Some(PSK_SALT), secret.bytes())
        .expand(PSK_INFO, &mut psk)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    psk
}

fn builder<'a>(psk: &'a [u8; 32]) -> Result<snow::Builder<'a>, SecureError> {
    let params = PARAMS.parse().map_err(SecureError::Noise)?;
    snow::Builder::new(params)
        .prologue(PROLOGUE)
        .and_then(|b| b.psk(0, psk))
        .map_err(SecureError::Noise)
}

/// The source's side: sends `psk, e`, reads `e, ee`.
pub fn initiate(mut tcp: TcpStream, secret: &Secret) -> Result<SecureStream, SecureError> {
    let psk = derive_psk(secret);
    let mut hs = builder(&psk)?
        .build_initiator()
        .map_err(SecureError::Noise)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = hs
        .write_message(&[], &mut buf)
        .map_err(SecureError::Noise)?;
    send_message(&mut tcp, &buf[..n])?;
    let msg = recv_message(&mut tcp)?;
    hs.read_message(&msg, &mut buf).map_err(|e| match e {
        snow::Error::Decrypt => SecureError::WrongPsk,
        e => SecureError::Noise(e),
    })?;
    finish(tcp, hs)
}

/// The destination's side: reads `psk, e`, sends `e, ee`.
pub fn respond(mut tcp: TcpStream, secret: &Secret) -> Result<SecureStream, SecureError> {
    let psk = derive_psk(secret);
    let mut hs = builder(&psk)?
        .build_responder()
        .map_err(SecureError::Noise)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let msg = recv_message(&mut tcp)?;
    hs.read_message(&msg, &mut buf).map_err(|e| match e {
        snow::Error::Decrypt => SecureError::WrongPsk,
        e => SecureError::Noise(e),
    })?;
    let n = hs
        .write_message(&[], &mut buf)
        .map_err(SecureError::Noise)?;
    send_message(&mut tcp, &buf[..n])?;
    finish(tcp, hs)
}

fn finish(tcp: TcpStream, hs: snow::HandshakeState) -> Result<SecureStream, SecureError> {
    let t = hs
        .into_stateless_transport_mode()
        .map_err(SecureError::Noise)?;
    SecureStream::new(tcp, Channel::Noise(t)).map_err(SecureError::Io)
}

fn send_message(tcp: &mut TcpStream, msg: &[u8]) -> Result<(), SecureError> {
    let len = u16::try_from(msg.len()).expect("a Noise message fits in u16");
    tcp.write_all(&len.to_be_bytes())
        .and_then(|()| tcp.write_all(msg))
        .map_err(SecureError::Io)
}

fn recv_message(tcp: &mut TcpStream) -> Result<Vec<u8>, SecureError> {
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).map_err(closed_or_io)?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut msg).map_err(closed_or_io)?;
    Ok(msg)
}

fn closed_or_io(e: io::Error) -> SecureError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            SecureError::HandshakeClosed("Noise")
        }
        _ => SecureError::Io(e),
    }
}

/// Seals `tx.plain` into records in `tx.wire`.
pub(super) fn seal(tx: &mut Tx, t: &Transport) -> io::Result<()> {
    for chunk in tx.plain.chunks(MAX_PLAIN) {
        let at = tx.wire.len();
        let len = chunk.len() + TAG;
        tx.wire.resize(at + 2 + len, 0);
        tx.wire[at..at + 2].copy_from_slice(&(len as u16).to_be_bytes());
        t.write_message(tx.records, chunk, &mut tx.wire[at + 2..])
            .map_err(|e| io::Error::other(SecureError::Noise(e)))?;
        tx.records += 1;
    }
    Ok(())
}

/// Reads plaintext into `bufs`, opening records as needed; 0 at the end
/// of the stream (only between records).
pub(super) fn read(rx: &mut Rx, t: &Transport, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
    while !rx.has_plain() {
        if !open_record(rx, t)? {
            return Ok(0);
        }
    }
    Ok(rx.drain(bufs))
}

/// Reads and opens the next record into `rx.plain`; `false` at the end
/// of the stream. The record's bytes gather in `rx.cipher` (length first):
/// a read that times out midway (a deadline's step) loses nothing, and the
/// next call goes on where it stopped.
fn open_record(rx: &mut Rx, t: &Transport) -> io::Result<bool> {
    let record = rx.records;
    if rx.cipher.is_empty() && rx.fill()?.is_empty() {
        return Ok(false);
    }
    gather(rx, 2, record)?;
    let len = u16::from_be_bytes([rx.cipher[0], rx.cipher[1]]) as usize;
    if len < TAG {
        return Err(SecureError::ShortRecord { record, len }.into_io());
    }
    gather(rx, 2 + len, record)?;
    rx.plain.resize(len - TAG, 0);
    let r = t.read_message(record, &rx.cipher[2..], &mut rx.plain);
    rx.cipher.clear();
    let n = r.map_err(|_| SecureError::Integrity { record }.into_io())?;
    rx.plain.truncate(n);
    rx.pos = 0;
    rx.records += 1;
    Ok(true)
}

/// Reads until `rx.cipher` holds `want` bytes of the current record.
fn gather(rx: &mut Rx, want: usize, record: u64) -> io::Result<()> {
    while rx.cipher.len() < want {
        let raw = rx.raw.fill_buf()?;
        if raw.is_empty() {
            return Err(SecureError::Truncated { record }.into_io());
        }
        let k = raw.len().min(want - rx.cipher.len());
        rx.cipher.extend_from_slice(&raw[..k]);
        rx.raw.consume(k);
    }
    Ok(())
}

/// What the cipher costs on one core: MB/s of plaintext sealed and opened
/// again (both on this thread) in `total` bytes of records, in memory.
pub fn seal_open_rate(total: usize) -> Result<f64, SecureError> {
    let psk = derive_psk(&Secret::from_bytes(b"a secret for measuring only"));
    let (mut i, mut r) = (
        builder(&psk)?
            .build_initiator()
            .map_err(SecureError::Noise)?,
        builder(&psk)?
            .build_responder()
            .map_err(SecureError::Noise)?,
    );
    let (mut m, mut p) = (vec![0u8; MAX_MESSAGE], vec![0u8; MAX_MESSAGE]);
    let n = i.write_message(&[], &mut m).map_err(SecureError::Noise)?;
    r.read_message(&m[..n], &mut p)
        .map_err(SecureError::Noise)?;
    let n = r.write_message(&[], &mut m).map_err(SecureError::Noise)?;
    i.read_message(&m[..n], &mut p)
        .map_err(SecureError::Noise)?;
    let (i, r) = (
        i.into_stateless_transport_mode()
            .map_err(SecureError::Noise)?,
        r.into_stateless_transport_mode()
            .map_err(SecureError::Noise)?,
    );
    let plain: Vec<u8> = (0..1 << 20).map(|k: u32| (k * 31 + k / 7) as u8).collect();
    let t = std::time::Instant::now();
    let mut nonce = 0;
    for _ in 0..total.div_ceil(plain.len()) {
        for chunk in plain.chunks(MAX_PLAIN) {
            let n = i
                .write_message(nonce, chunk, &mut m)
                .map_err(SecureError::Noise)?;
            r.read_message(nonce, &m[..n], &mut p)
                .map_err(SecureError::Noise)?;
            nonce += 1;
        }
    }
    Ok((total.div_ceil(plain.len()) * plain.len()) as f64 / t.elapsed().as_secs_f64() / 1e6)
}
