//! What happened in a migration, as a stream of events for scripts
//! (`vmm ctl events` prints them as JSON lines): rounds ended, a stop rule
//! fired, the source paused, the destination took over, post-copy
//! completed, and how the migration ended.
//!
//! The log is shared by the engine (which appends) and any number of
//! readers that long-poll it by sequence number, so a reader that comes
//! late or falls behind loses nothing that is still kept.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::report::now_ns;

/// At most this many events are kept (the oldest go first).
const KEPT: usize = 4096;

/// One event, numbered from 1.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    /// Wall clock, ms since the Unix epoch.
    pub unix_ms: f64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A pre-copy round ended.
    RoundEnded {
        round: u32,
        pages: u64,
        bytes: u64,
        duration_ms: f64,
        dirty_rate_pages_s: f64,
        pages_remaining: u64,
        estimated_downtime_ms: f64,
    },
    /// Pre-copy stops: `rule` fired; `postcopy` if post-copy follows.
    StopRuleFired { rule: String, postcopy: bool },
    /// The source's vCPUs are paused: the downtime begins.
    Paused,
    /// The destination resumed the guest.
    SwitchedOver { downtime_ms: f64 },
    /// Post-copy brought the last page.
    PostcopyComplete,
    /// The migration succeeded.
    Completed,
    /// The migration failed; before the switch-over the source runs on.
    Failed { error: String },
    /// The migration was cancelled; the source runs on.
    Cancelled,
}

impl EventKind {
    /// Whether the migration ends with this event.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed { .. } | Self::Cancelled
        )
    }
}

/// The shared log.
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<Vec<Event>>,
    added: Condvar,
}

impl EventLog {
    /// Appends `kind` and wakes the readers.
    pub fn emit(&self, kind: EventKind) {
        let mut events = self.lock();
        let seq = events.last().map_or(1, |e| e.seq + 1);
        if events.len() >= KEPT {
            events.remove(0);
        }
        events.push(Event {
            seq,
            unix_ms: now_ns() as f64 / 1e6,
            kind,
        });
        self.added.notify_all();
    }

    /// The events after `seq`, waiting up to `wait` for one to come.
    pub fn after(&self, seq: u64, wait: Duration) -> Vec<Event> {
        let deadline = Instant::now() + wait;
        let mut events = self.lock();
        loop {
            let newer: Vec<Event> = events.iter().filter(|e| e.seq > seq).cloned().collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if !newer.is_empty() || left.is_zero() {
                return newer;
            }
            events = self
                .added
                .wait_timeout(events, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The number of the last event (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.lock().last().map_or(0, |e| e.seq)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_get_what_came_after_their_last_event() {
        let log = EventLog::default();
        assert!(log.after(0, Duration::ZERO).is_empty());
        log.emit(EventKind::Paused);
        log.emit(EventKind::Cancelled);
        let all = log.after(0, Duration::ZERO);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        assert!(all[1].kind.is_final() && !all[0].kind.is_final());
        assert_eq!(log.after(1, Duration::ZERO).len(), 1);
        assert_eq!(log.last_seq(), 2);
        let json = serde_json::to_value(&all[0]).unwrap();
        assert_eq!(json["event"], "paused");
    }

    #[test]
    fn a_waiting_reader_wakes_on_the_next_event() {
        let log = std::sync::Arc::new(EventLog::default());
        let writer = log.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            writer.emit(EventKind::Completed);
        });
        let got = log.after(0, Duration::from_secs(10));
        assert_eq!(got.len(), 1);
        t.join().unwrap();
    }
}
