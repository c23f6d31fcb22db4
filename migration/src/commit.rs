//! The switch-over's commit point, and how either end learns its outcome
//! afterwards (the state diagram is in [`crate::protocol`]).
//!
//! On the destination, resuming the guest (on `Commit`) and discarding it
//! (link lost, deadline, or a query from a source that lost track) are one
//! decision, taken once under a lock in [`Switch`]: whichever comes first
//! wins and the other is refused. So a source that asks — on a new
//! connection, with the same authentication — always gets a final answer:
//! either the destination resumed (the source must shut its copy down) or
//! it never will (the source may resume).

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::auth;
#[cfg(test)]
use crate::auth::Secret;
use crate::error::MigrationError;
use crate::protocol::{malformed, read_frame, write_frame, Kind, ProtocolError};
use crate::secure::{self, Protection};
use crate::transport;

/// How long a query may take on either end: a query is two small frames.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the destination did with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// No `Commit` yet and nothing failed.
    Undecided,
    /// `Commit` arrived and the guest was resumed here: the source must
    /// never run it again.
    Resumed,
    /// The guest was (or will be) thrown away here without ever running.
    Discarded,
}

impl Outcome {
    fn encode(self) -> [u8; 1] {
        [match self {
            Self::Undecided => 0,
            Self::Resumed => 1,
            Self::Discarded => 2,
        }]
    }

    fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        match p {
            [0] => Ok(Self::Undecided),
            [1] => Ok(Self::Resumed),
            [2] => Ok(Self::Discarded),
            _ => Err(malformed("Outcome", format!("{p:?}"))),
        }
    }
}

/// The destination's single decision: resume or discard, once.
#[derive(Debug)]
pub struct Switch {
    outcome: Mutex<Outcome>,
    /// The migration's main connection: shut down when a query decides for
    /// a discard, so that a session waiting for `Commit` wakes at once.
    session: Mutex<Option<TcpStream>>,
    /// Queries answered so far (a lingering destination stops at the first).
    answered: Mutex<u64>,
    /// A query was answered `Resumed`: the source may have shut its copy
    /// down, so this side must never take the decision back.
    told_resumed: std::sync::atomic::AtomicBool,
    /// The attempt ended before `Prepared`: its responder stops.
    queries_closed: std::sync::atomic::AtomicBool,
    /// A responder was started for this attempt.
    responder: std::sync::atomic::AtomicBool,
    changed: Condvar,
}

impl Default for Switch {
    fn default() -> Self {
        Self {
            outcome: Mutex::new(Outcome::Undecided),
            session: Mutex::new(None),
            answered: Mutex::new(0),
            told_resumed: Default::default(),
            queries_closed: Default::default(),
            responder: Default::default(),
            changed: Condvar::new(),
        }
    }
}

impl Switch {
    /// Remembers the main connection, to wake its reader on a discard.
    pub fn attach(&self, stream: TcpStream) {
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
    }

    /// `Commit` arrived: decides to resume unless a discard came first.
    /// Returns whether the guest may be resumed.
    pub fn commit(&self) -> bool {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if *o == Outcome::Undecided {
            *o = Outcome::Resumed;
        }
        *o == Outcome::Resumed
    }

    /// Decides to discard unless the guest was resumed already (the session
    /// itself gave up); returns the final outcome.
    pub fn discard(&self) -> Outcome {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if *o == Outcome::Undecided {
            *o = Outcome::Discarded;
        }
        *o
    }

    /// The guest was resumed here but failed afterwards and is stopped
    /// (vCPUs paused): turns `Resumed` into `Discarded`, so that the source
    /// may resume its copy — unless a query already told the source it
    /// runs here. Returns whether the decision was taken back.
    pub fn revoke(&self) -> bool {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let told = self.told_resumed.load(std::sync::atomic::Ordering::Acquire);
        if *o == Outcome::Resumed && !told {
            *o = Outcome::Discarded;
        }
        *o == Outcome::Discarded
    }

    /// Decides for a query: discards an undecided guest; remembers that the
    /// source was told `Resumed`. Returns the final outcome.
    fn decide_for_query(&self) -> Outcome {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        match *o {
            Outcome::Undecided => {
                *o = Outcome::Discarded;
                self.wake_session();
            }
            // Under the lock: a `revoke` cannot slip in between.
            Outcome::Resumed => self
                .told_resumed
                .store(true, std::sync::atomic::Ordering::Release),
            Outcome::Discarded => {}
        }
        *o
    }

    fn wake_session(&self) {
        if let Some(s) = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The decision so far.
    pub fn outcome(&self) -> Outcome {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a query was answered, or `timeout`; returns whether one was.
    pub fn wait_for_query(&self, timeout: Duration) -> bool {
        let answered = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        let (answered, _) = self
            .changed
            .wait_timeout_while(answered, timeout, |n| *n == 0)
            .unwrap_or_else(|e| e.into_inner());
        *answered > 0
    }

    fn count_answer(&self) {
        *self.answered.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.changed.notify_all();
    }
}

/// Whether an outcome responder ([`serve_queries`]) took over accepting on
/// the migration's listener in this process. A receiver that would go on
/// serving new migrations after a failed one must not then accept on that
/// listener too: a new migration could land on the responder (and be
/// dropped), or a source's query on the receiver (and go unanswered).
pub fn answering_queries() -> bool {
    RESPONDERS.load(std::sync::atomic::Ordering::Acquire) > 0
}

/// Outcome responders running in this process.
static RESPONDERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Answers `OutcomeQuery` on `listener` for as long as the process lives
/// (on a thread of its own). Connections are served one at a time, each
/// within [`QUERY_TIMEOUT`]; anything but an authenticated query is dropped.
pub fn serve_queries(
    listener: &TcpListener,
    protection: &Protection,
    switch: Arc<Switch>,
) -> Result<(), MigrationError> {
    let listener = listener.try_clone().map_err(ProtocolError::Io)?;
    let protection = protection.clone();
    RESPONDERS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    switch
        .responder
        .store(true, std::sync::atomic::Ordering::Release);
    std::thread::Builder::new()
        .name("outcome-queries".into())
        .spawn(move || {
            while let Ok((conn, _)) = transport::accept(&listener) {
                if switch
                    .queries_closed
                    .load(std::sync::atomic::Ordering::Acquire)
                {
                    break;
                }
                if let Err(e) = answer(conn, &protection, &switch) {
                    tracing::warn!("outcome query refused: {e}");
                }
            }
            RESPONDERS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        })
        .map_err(ProtocolError::Io)?;
    Ok(())
}

/// Stops the responder of an attempt that failed before `Prepared` (no
/// source can have committed, so there is no outcome to ask for), so that
/// the receiver alone accepts on `listener` again: marks it closed, then
/// wakes its blocked `accept` with a connection of our own (the receiver is
/// not accepting while this runs).
pub fn close_queries(switch: &Switch, listener: &TcpListener) {
    if !switch.responder.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    switch
        .queries_closed
        .store(true, std::sync::atomic::Ordering::Release);
    if let Ok(addr) = listener.local_addr() {
        let _ = TcpStream::connect_timeout(&addr, QUERY_TIMEOUT);
    }
    let deadline = std::time::Instant::now() + QUERY_TIMEOUT;
    while answering_queries() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Answers one query: an undecided destination decides to discard first.
fn answer(conn: TcpStream, protection: &Protection, switch: &Switch) -> Result<(), MigrationError> {
    conn.set_read_timeout(Some(QUERY_TIMEOUT))
        .map_err(ProtocolError::Io)?;
    conn.set_write_timeout(Some(QUERY_TIMEOUT))
        .map_err(ProtocolError::Io)?;
    // The same protection as the migration's connections.
    let (mut conn, secret) = secure::protect_as_destination(conn, protection)?;
    auth::authenticate_as_destination(&mut conn, &secret)?;
    read_frame(&mut conn)?.expect(Kind::OutcomeQuery)?;
    let outcome = switch.decide_for_query();
    tracing::warn!("the source asked for the outcome of the switch-over: {outcome:?}");
    write_frame(&mut conn, Kind::Outcome, &outcome.encode())?;
    switch.count_answer();
    Ok(())
}

/// Asks the destination at `addr` what it did with the guest (a new
/// connection, the same authentication). The answer is final: a
/// destination that had not decided yet discards before answering.
pub fn query(addr: &str, protection: &Protection) -> Result<Outcome, MigrationError> {
    let conn = transport::connect(addr)?;
    conn.set_read_timeout(Some(QUERY_TIMEOUT))
        .map_err(ProtocolError::Io)?;
    conn.set_write_timeout(Some(QUERY_TIMEOUT))
        .map_err(ProtocolError::Io)?;
    // The same protection as the migration's connections.
    let (mut conn, secret) = secure::protect_as_source(conn, addr, protection)?;
    auth::authenticate_as_source(&mut conn, &secret)?;
    write_frame(&mut conn, Kind::OutcomeQuery, &[])?;
    let payload = read_frame(&mut conn)?.expect(Kind::Outcome)?;
    Ok(Outcome::decode(&payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_and_discard_are_one_decision() {
        let s = Switch::default();
        assert!(s.commit());
        assert_eq!(s.discard(), Outcome::Resumed, "a discard after commit");
        assert!(s.revoke(), "stopped after resuming: taken back");
        let s = Switch::default();
        assert!(s.commit());
        assert_eq!(s.decide_for_query(), Outcome::Resumed);
        assert!(!s.revoke(), "the source was told it runs here");
        let s = Switch::default();
        assert_eq!(s.discard(), Outcome::Discarded);
        assert!(!s.commit(), "a commit after a discard");
        assert_eq!(s.outcome(), Outcome::Discarded);
    }

    #[test]
    fn a_query_gets_the_final_outcome_and_decides_an_undecided_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp:{}", listener.local_addr().unwrap());
        // Encrypted, as the migration's connections are by default.
        let secret = Protection::Psk(Secret::from_bytes(b"a test secret of enough bytes"));
        let switch = Arc::new(Switch::default());
        serve_queries(&listener, &secret, switch.clone()).unwrap();
        assert_eq!(query(&addr, &secret).unwrap(), Outcome::Discarded);
        assert!(switch.wait_for_query(Duration::from_secs(1)));
        assert!(!switch.commit(), "a late Commit must not resume");
        let wrong = Protection::Psk(Secret::from_bytes(b"another secret, also long"));
        assert!(query(&addr, &wrong).is_err());
    }

    #[test]
    fn outcome_payload_is_checked() {
        for o in [Outcome::Undecided, Outcome::Resumed, Outcome::Discarded] {
            assert_eq!(Outcome::decode(&o.encode()).unwrap(), o);
        }
        assert!(Outcome::decode(&[3]).is_err());
        assert!(Outcome::decode(&[]).is_err());
        assert!(Outcome::decode(&[1, 1]).is_err());
    }
}
