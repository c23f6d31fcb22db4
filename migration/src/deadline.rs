//! Deadlines that bound a whole frame or a whole phase, not each read.
//!
//! A socket read timeout alone (`SO_RCVTIMEO`) only bounds the wait for the
//! *next* byte: a peer that sends one byte every 25 s never trips a 30 s
//! timeout and holds the receiver forever (a slowloris). [`DeadlineReader`]
//! carries an absolute deadline instead; before each read it shortens the
//! socket timeout to the time left, so the frame (or the handshake) as a
//! whole ends by the deadline whatever the peer's pace.

use std::cell::Cell;
use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A reader whose blocking reads can be bounded by a timeout.
pub trait TimedRead: Read {
    /// Bounds the next blocking read (`None`: no bound).
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
}

/// The socket timeout is only changed in steps of this much: a far
/// deadline costs no system call per read on the bulk path.
const STEP: Duration = Duration::from_millis(50);

/// Wraps a socket; reads fail with [`io::ErrorKind::TimedOut`] once the
/// current deadline has passed, and never wait longer than `idle` for one
/// read.
#[derive(Debug)]
pub struct DeadlineReader<R> {
    inner: R,
    idle: Duration,
    deadline: Cell<Option<(Instant, &'static str)>>,
    /// The socket timeout last set, to skip redundant system calls.
    set: Cell<Option<Duration>>,
}

impl<R: TimedRead> DeadlineReader<R> {
    /// Reads from `inner`, each read bounded by `idle`.
    pub fn new(inner: R, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            deadline: Cell::new(None),
            set: Cell::new(None),
        }
    }

    /// From now on, everything must have arrived within `within`; `what`
    /// names it in the error.
    pub fn expect_within(&self, within: Duration, what: &'static str) {
        self.deadline.set(Some((Instant::now() + within, what)));
    }

    /// Moves the current deadline to `within` after `since`.
    pub fn extend(&self, since: Instant, within: Duration) {
        if let Some((_, what)) = self.deadline.get() {
            self.deadline.set(Some((since + within, what)));
        }
    }

    /// No deadline: only the idle bound applies.
    pub fn clear(&self) {
        self.deadline.set(None);
    }

    /// The wrapped reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The timeout the next read may wait, or an error if none is left.
    fn next_timeout(&self) -> io::Result<Duration> {
        let Some((at, what)) = self.deadline.get() else {
            return Ok(self.idle);
        };
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} did not complete within its deadline"),
            ));
        }
        // Round down to a step while far (the same value again and again
        // costs no system call); near the deadline, exactly what is left
        // (but never zero, which means "no timeout").
        let t = if left < STEP {
            left.max(Duration::from_millis(1))
        } else {
            STEP * (left.as_millis() / STEP.as_millis()) as u32
        };
        Ok(t.min(self.idle))
    }
}

impl<R: TimedRead> Read for DeadlineReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let t = self.next_timeout()?;
            if self.set.get() != Some(t) {
                self.inner.set_read_timeout(Some(t))?;
                self.set.set(Some(t));
            }
            match self.inner.read(buf) {
                Err(e) if is_timeout(&e) => {
                    // The deadline passed: say so.
                    self.next_timeout()?;
                    // Only the rounding of the time left ran out: go on.
                    if t < self.idle {
                        continue;
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the peer sent nothing for {t:?}"),
                    ));
                }
                r => return r,
            }
        }
    }
}

/// Whether `e` is a socket timeout (`EAGAIN` from `SO_RCVTIMEO`).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl<R: TimedRead> TimedRead for DeadlineReader<R> {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set.set(t);
        self.inner.set_read_timeout(t)
    }
}

/// The reading and writing halves of one socket joined, for a handshake
/// that reads through a [`DeadlineReader`] and writes to the socket.
pub struct Duplex<'a, R, W>(pub &'a mut R, pub &'a mut W);

impl<R: Read, W> Read for Duplex<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R, W: io::Write> io::Write for Duplex<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.1.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.1.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// One byte every 30 ms never trips a 100 ms idle bound, but the
    /// 300 ms deadline still ends the read.
    #[test]
    fn a_slow_trickle_is_cut_at_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let writer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            for _ in 0..40 {
                if s.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        let (s, _) = l.accept().unwrap();
        let mut r = DeadlineReader::new(s, Duration::from_millis(100));
        r.expect_within(Duration::from_millis(300), "the test frame");
        let t = Instant::now();
        let mut buf = [0u8; 1000];
        let err = r.read_exact(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("the test frame"), "{err}");
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        drop(r);
        writer.join().unwrap();
    }

    #[test]
    fn silence_trips_the_idle_bound() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut r = DeadlineReader::new(s, Duration::from_millis(100));
        let err = r.read(&mut [0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }
}
