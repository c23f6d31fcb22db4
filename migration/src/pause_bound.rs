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
//! source must never resume it on a timer.

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
    disarmed: Arc<(Mutex<bool>, Condvar)>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PauseWatchdog {
    /// Starts counting `budget` from now; on expiry `stream` is shut down
    /// and `fired` set (shared with whoever explains the failure).
    pub fn arm(stream: &TcpStream, budget: Duration, fired: Arc<AtomicBool>) -> Self {
        let disarmed = Arc::new((Mutex::new(false), Condvar::new()));
        let stream = stream.try_clone();
        let (d, f) = (disarmed.clone(), fired.clone());
        let deadline = Instant::now() + budget;
        let thread = std::thread::Builder::new()
            .name("pause-bound".into())
            .spawn(move || {
                let (lock, cv) = &*d;
                let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !*done {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        f.store(true, Ordering::Release);
                        if let Ok(s) = &stream {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        return;
                    }
                    done = cv
                        .wait_timeout(done, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })
            .ok();
        Self {
            disarmed,
            fired,
            thread,
        }
    }

    /// The destination confirmed in time: stop counting. Returns whether
    /// the bound had already fired.
    pub fn disarm(mut self) -> bool {
        self.stop();
        self.fired.load(Ordering::Acquire)
    }

    fn stop(&mut self) {
        let (lock, cv) = &*self.disarmed;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
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
        let _w = PauseWatchdog::arm(&c, Duration::from_millis(100), fired.clone());
        let t = Instant::now();
        // Blocked in a read the peer never answers: the watchdog ends it.
        let n = (&c).read(&mut [0u8; 8]).unwrap_or(0);
        assert_eq!(n, 0);
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(fired.load(Ordering::Acquire));
    }
}
