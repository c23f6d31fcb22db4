//! Mutual authentication with a shared secret: an HMAC-SHA256
//! challenge–response in both directions, before anything else is accepted.
//!
//! Each side sends a fresh 32-byte random nonce; each proves it knows the
//! secret by returning `HMAC(secret, role ‖ peer_nonce ‖ own_nonce)`. The role
//! label ("src"/"dst") keeps one side's proof from being replayed as the
//! other's, and the fresh nonces keep an old exchange from being replayed.
//! The secret itself never crosses the wire. (This authenticates the peers;
//! it does not encrypt the stream.)

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::protocol::{
    read_frame_limited, write_frame, Abort, AbortCode, Cursor, Frame, Kind, ProtocolError,
    PRE_AUTH_MAX_PAYLOAD, VERSION,
};

type HmacSha256 = Hmac<Sha256>;

/// Nonce length.
const NONCE_LEN: usize = 32;
/// MAC length.
const MAC_LEN: usize = 32;
/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;
/// Fewer distinct bytes than this in a secret earns a warning.
pub const MIN_DISTINCT_BYTES: usize = 8;

/// How many different byte values `s` holds.
fn distinct_bytes(s: &[u8]) -> usize {
    let mut seen = [false; 256];
    s.iter().for_each(|&b| seen[b as usize] = true);
    seen.iter().filter(|&&x| x).count()
}

/// Errors of authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("Cannot read the secret file {path}")]
    ReadSecret {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "The secret file {path} has mode {mode:03o}: group or others may read it \
         (chmod 600 it, as ssh requires of private keys)"
    )]
    SecretReadableByOthers { path: String, mode: u32 },
    #[error("The secret in {path} is {len} bytes; at least {MIN_SECRET_LEN} are required")]
    ShortSecret { path: String, len: usize },
    #[error("Authentication failed: the peer does not know the shared secret")]
    PeerNotAuthenticated,
    #[error(
        "Authentication failed: the peer refused our proof (wrong or missing secret on one side)"
    )]
    Refused,
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("No randomness available for a nonce")]
    Random(#[source] std::io::Error),
}

/// A shared secret, read from a file (surrounding whitespace ignored).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Reads the secret file. Like ssh with a private key, a file that
    /// group or others may read is refused: the secret is the only thing
    /// that keeps a stranger from feeding us a guest or taking ours. A
    /// secret of little variety (few distinct bytes) is accepted with a
    /// warning: it is probably a placeholder, not a random key.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let shown = || path.display().to_string();
        let read = |source| AuthError::ReadSecret {
            path: shown(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read)?;
        // The mode of the file we opened, not of whatever the path names now.
        let mode = file.metadata().map_err(read)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(AuthError::SecretReadableByOthers {
                path: shown(),
                mode: mode & 0o777,
            });
        }
        let mut raw = Vec::new();
        file.read_to_end(&mut raw).map_err(read)?;
        let s = raw.trim_ascii().to_vec();
        if s.len() < MIN_SECRET_LEN {
            return Err(AuthError::ShortSecret {
                path: shown(),
                len: s.len(),
            });
        }
        let distinct = distinct_bytes(&s);
        if distinct < MIN_DISTINCT_BYTES {
            tracing::warn!(
                "the secret in {} has only {distinct} distinct bytes: use a random one \
                 (e.g. head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE)",
                shown()
            );
        }
        Ok(Self(s))
    }

    /// A secret from bytes (tests, and TLS's exporter value).
    pub fn from_bytes(b: &[u8]) -> Self {
        Self(b.to_vec())
    }

    /// The secret's bytes (to derive keys from).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, role: &[u8], a: &[u8], b: &[u8]) -> [u8; MAC_LEN] {
        let mut m =
            <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(role);
        m.update(a);
        m.update(b);
        m.finalize().into_bytes().into()
    }

    fn verify(&self, role: &[u8], a: &[u8], b: &[u8], tag: &[u8]) -> bool {
        let mut m =
            <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(role);
        m.update(a);
        m.update(b);
        m.verify_slice(tag).is_ok() // constant-time comparison
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], AuthError> {
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(AuthError::Random)?;
    Ok(n)
}

/// Reads a handshake frame: nothing large is accepted before the peer is
/// authenticated.
fn read_frame(s: &mut impl Read) -> Result<Frame, ProtocolError> {
    read_frame_limited(s, PRE_AUTH_MAX_PAYLOAD)
}

fn check_version(c: &mut Cursor<'_>) -> Result<(), ProtocolError> {
    let v = c.u32()?;
    if v != VERSION {
        return Err(ProtocolError::Version(v));
    }
    Ok(())
}

/// The source's half of the handshake.
pub fn authenticate_as_source(
    s: &mut (impl Read + Write),
    secret: &Secret,
) -> Result<(), AuthError> {
    let nonce_s = nonce()?;
    let mut hello = VERSION.to_le_bytes().to_vec();
    hello.extend_from_slice(&nonce_s);
    write_frame(s, Kind::Hello, &hello)?;
    s.flush().map_err(ProtocolError::Io)?;
    let p = read_frame(s)?.expect(Kind::Challenge)?;
    let mut c = Cursor::new(&p, "Challenge");
    check_version(&mut c)?;
    let nonce_d = c.take(NONCE_LEN)?;
    let mac_d = c.take(MAC_LEN)?;
    c.finish()?;
    if !secret.verify(b"dst", &nonce_s, nonce_d, mac_d) {
        let abort = Abort::new(AbortCode::Authentication, 0, "destination proof invalid");
        let _ = write_frame(s, Kind::Abort, &abort.encode());
        return Err(AuthError::PeerNotAuthenticated);
    }
    write_frame(s, Kind::Proof, &secret.mac(b"src", nonce_d, &nonce_s))?;
    s.flush().map_err(ProtocolError::Io)?;
    match read_frame(s)?.expect(Kind::Accepted) {
        Ok(_) => Ok(()),
        Err(ProtocolError::PeerAborted(_)) => Err(AuthError::Refused),
        Err(e) => Err(e.into()),
    }
}

/// The destination's half of the handshake.
pub fn authenticate_as_destination(
    s: &mut (impl Read + Write),
    secret: &Secret,
) -> Result<(), AuthError> {
    let p = read_frame(s)?.expect(Kind::Hello)?;
    let mut c = Cursor::new(&p, "Hello");
    check_version(&mut c)?;
    let nonce_s = c.take(NONCE_LEN)?.to_vec();
    c.finish()?;
    let nonce_d = nonce()?;
    let mut ch = VERSION.to_le_bytes().to_vec();
    ch.extend_from_slice(&nonce_d);
    ch.extend_from_slice(&secret.mac(b"dst", &nonce_s, &nonce_d));
    write_frame(s, Kind::Challenge, &ch)?;
    s.flush().map_err(ProtocolError::Io)?;
    let proof = match read_frame(s)?.expect(Kind::Proof) {
        Ok(p) => p,
        Err(ProtocolError::PeerAborted(_)) => return Err(AuthError::Refused),
        Err(e) => return Err(e.into()),
    };
    if proof.len() != MAC_LEN || !secret.verify(b"src", &nonce_d, &nonce_s, &proof) {
        let abort = Abort::new(AbortCode::Authentication, 0, "source proof invalid");
        let _ = write_frame(s, Kind::Abort, &abort.encode());
        let _ = s.flush();
        return Err(AuthError::PeerNotAuthenticated);
    }
    write_frame(s, Kind::Accepted, &[])?;
    s.flush().map_err(ProtocolError::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn run(
        src: &'static [u8],
        dst: &'static [u8],
    ) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            authenticate_as_destination(&mut b, &Secret::from_bytes(dst))
        });
        let r = authenticate_as_source(&mut a, &Secret::from_bytes(src));
        drop(a);
        (r, t.join().unwrap())
    }

    #[test]
    fn same_secret_authenticates_both_ways() {
        let (s, d) = run(b"0123456789abcdef", b"0123456789abcdef");
        assert!(s.is_ok() && d.is_ok(), "{s:?} {d:?}");
    }

    #[test]
    fn a_secret_file_others_may_read_is_refused() {
        let dir = std::env::temp_dir().join(format!("lmig-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        std::fs::write(&p, "0123456789abcdefghij").unwrap();
        for (mode, ok) in [
            (0o644, false),
            (0o640, false),
            (0o604, false),
            (0o600, true),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = Secret::from_file(&p);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
        }
        assert_eq!(distinct_bytes(b"aaaaaaaaaaaaaaaa"), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (s, d) = run(b"0123456789abcdef", b"0123456789abcdeX");
        assert!(matches!(s, Err(AuthError::PeerNotAuthenticated)), "{s:?}");
        assert!(d.is_err(), "{d:?}");
    }
}
