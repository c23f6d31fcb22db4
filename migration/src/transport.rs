//! TCP transport: address parsing, socket options, timeouts.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long a silent peer is tolerated before the migration fails.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// [`PEER_TIMEOUT`], or `VMM_PEER_TIMEOUT_MS` from the environment (read
/// once): tests of a silent peer need not wait half a minute.
pub fn peer_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("VMM_PEER_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&ms| ms > 0)
            .map_or(PEER_TIMEOUT, Duration::from_millis)
    })
}
/// Keepalive: first probe after this much idleness, then one every
/// `KEEPALIVE_INTERVAL`, `KEEPALIVE_PROBES` unanswered ones end the
/// connection (about 30 s after the peer vanished), idle or not.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 4;
/// Data unacknowledged this long ends the connection (a silent partition
/// while we send).
const USER_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Socket options of every migration connection.
pub(crate) fn tune(s: &TcpStream) {
    // Frames are written whole through a buffer; Nagle would only delay the
    // small control messages at the switch-over.
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(peer_timeout()));
    let _ = s.set_write_timeout(Some(peer_timeout()));
    keepalive(s);
}

/// Turns on TCP keepalive and the user timeout: a connection that is idle
/// on purpose (post-copy's fault connection between faults, which reads
/// without a timeout) still ends when the peer vanishes silently. Best
/// effort: a socket without them still has the read and write timeouts.
pub fn keepalive(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::KeepAlive, &true);
    let _ = setsockopt(s, sockopt::TcpKeepIdle, &(KEEPALIVE_IDLE.as_secs() as u32));
    let _ = setsockopt(
        s,
        sockopt::TcpKeepInterval,
        &(KEEPALIVE_INTERVAL.as_secs() as u32),
    );
    let _ = setsockopt(s, sockopt::TcpKeepCount, &KEEPALIVE_PROBES);
    let _ = setsockopt(
        s,
        sockopt::TcpUserTimeout,
        &(USER_TIMEOUT.as_millis() as u32),
    );
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
