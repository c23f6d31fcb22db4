//! A hard bound on the source's pause.
//!
//! The policy switches over when the *predicted* downtime fits the limit,
//! but the prediction can be wrong (a link slower than measured) and the
//! destination can stall after `Complete`. Until the destination confirms,
//! the source must not stay paused for much longer than it promised: once
//! the pause exceeds the downtime limit by the margin, [`PauseWatchdog`]
//! shuts the main connection down. Every blocked send or read of the
//! switch-over then fails at once, and the source takes its failure path:
//! it tells the destination (if it still can) and resumes its guest.
//!
//! The watchdog is disarmed when the destination confirms (today:
//! `Resumed`); from then on the guest belongs to the destination and the
//! source must never resume it on a timer. Firing after `Complete` is safe
//! as far as the destination fails to deliver `Resumed` (it then discards
//! its copy); a `Resumed` already in flight when the bound fires is the
//! switch-over's unknown-outcome case, which the commit protocol resolves
//! (it must disarm the watchdog at its commit point).
//!
//! `--verify`'s checksums are not downtime the limit covers: the budget
//! grows by twice the source's checksum time (the destination checks as
//! much after `Complete`).

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default margin over the downtime limit before the source gives up.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(3);

/// Shuts the connection down if not disarmed within its budget.
#[derive(Debug)]
pub struct PauseWatchdog {
    state: Arc<(Mutex<Watch>, Condvar)>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the watchdog's thread waits on.
#[derive(Debug)]
struct Watch {
    disarmed: bool,
    deadline: Instant,
}

impl PauseWatchdog {
    /// Starts counting `budget` from now; on expiry `stream` is shut down
    /// and `fired` set (shared with whoever explains the failure).
    pub fn arm(stream: &TcpStream, budget: Duration, fired: Arc<AtomicBool>) -> Self {
        let state = Arc::new((
            Mutex::new(Watch {
                disarmed: false,
                deadline: Instant::now() + budget,
            }),
            Condvar::new(),
        ));
        let stream = stream.try_clone();
        let (st, f) = (state.clone(), fired.clone());
        let thread = std::thread::Builder::new()
            .name("pause-bound".into())
            .spawn(move || {
                let (lock, cv) = &*st;
                let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !w.disarmed {
                    let left = w.deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        f.store(true, Ordering::Release);
                        if let Ok(s) = &stream {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        return;
                    }
                    w = cv
                        .wait_timeout(w, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })
            .ok();
        Self {
            state,
            fired,
            thread,
        }
    }

    /// Grants `more` time: for work the downtime limit does not cover
    /// (`--verify`'s checksums, which the report also counts apart).
    pub fn extend(&self, more: Duration) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).deadline += more;
        cv.notify_all();
    }

    /// The destination confirmed in time: stop counting. Returns whether
    /// the bound had already fired.
    pub fn disarm(mut self) -> bool {
        self.stop();
        self.fired.load(Ordering::Acquire)
    }

    fn stop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).disarmed = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PauseWatchdog {
    /// A switch-over that failed for another reason: stop counting.
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    #[test]
    fn an_overrun_shuts_the_connection_and_a_disarm_does_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _peer = l.accept().unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let w = PauseWatchdog::arm(&c, Duration::from_secs(5), fired.clone());
        assert!(!w.disarm());
        let w = PauseWatchdog::arm(&c, Duration::from_millis(100), fired.clone());
        w.extend(Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            !fired.load(Ordering::Acquire),
            "fired before its extended deadline"
        );
        let t = Instant::now();
        // Blocked in a read the peer never answers: the watchdog ends it.
        let n = (&c).read(&mut [0u8; 8]).unwrap_or(0);
        assert_eq!(n, 0);
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(fired.load(Ordering::Acquire));
    }
}
