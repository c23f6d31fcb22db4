//! TCP transport: address parsing, socket options, timeouts.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long a silent peer is tolerated before the migration fails.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("Bad address '{0}': expected tcp:HOST:PORT")]
    BadAddress(String),
    #[error("Cannot resolve {0}")]
    Resolve(String, #[source] std::io::Error),
    #[error("Cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    #[error("Accepting a connection failed")]
    Accept(#[source] std::io::Error),
}

/// Parses `tcp:HOST:PORT` into socket addresses.
pub fn parse(addr: &str) -> Result<Vec<SocketAddr>, TransportError> {
    let hostport = addr
        .strip_prefix("tcp:")
        .ok_or_else(|| TransportError::BadAddress(addr.into()))?;
    let addrs: Vec<_> = hostport
        .to_socket_addrs()
        .map_err(|e| TransportError::Resolve(addr.into(), e))?
        .collect();
    if addrs.is_empty() {
        return Err(TransportError::BadAddress(addr.into()));
    }
    Ok(addrs)
}

/// The host part of `tcp:HOST:PORT` (brackets of an IPv6 address removed),
/// the name TLS checks the destination's certificate against.
pub fn host_of(addr: &str) -> String {
    let hostport = addr.strip_prefix("tcp:").unwrap_or(addr);
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

fn tune(s: &TcpStream) {
    // Frames are written whole through a buffer; Nagle would only delay the
    // small control messages at the switch-over.
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(PEER_TIMEOUT));
    let _ = s.set_write_timeout(Some(PEER_TIMEOUT));
}

/// Connects to `tcp:HOST:PORT`.
pub fn connect(addr: &str) -> Result<TcpStream, TransportError> {
    let addrs = parse(addr)?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(s) => {
                tune(&s);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(TransportError::Connect(
        addr.into(),
        last.unwrap_or_else(|| std::io::Error::other("no address")),
    ))
}

/// Listens on `tcp:HOST:PORT`.
pub fn listen(addr: &str) -> Result<TcpListener, TransportError> {
    let addrs = parse(addr)?;
    TcpListener::bind(&addrs[..]).map_err(|e| TransportError::Listen(addr.into(), e))
}

/// Accepts one connection.
pub fn accept(l: &TcpListener) -> Result<(TcpStream, SocketAddr), TransportError> {
    let (s, peer) = l.accept().map_err(TransportError::Accept)?;
    tune(&s);
    Ok((s, peer))
}
