//! The probe device: how a test guest learns its parameters and how the VMM
//! sees it live.
//!
//! - `IN` dword from `PROBE_BASE + 4k` returns parameter k (see
//!   `guest_images::abi::param`): the workload the guest must run.
//! - `OUT` dword to `PORT_HEARTBEAT`: one heartbeat; the value is the low 32
//!   bits of that vCPU's heartbeat count, so a gap or a repeat is visible.
//! - `OUT` dword to `PORT_HEARTBEAT_IDLE`: the same, from a halted vCPU
//!   whose timer ticks more slowly than its heartbeat interval. The gap after
//!   it is expected to last a whole tick: it is kept apart
//!   (`max_idle_gap_ns`), so that a vCPU with nothing to do is never taken
//!   for a stalled one.
//! - `OUT` dword to `PORT_EVENT`: an event (booted, filled, verify result,
//!   FPU failure, exception), `(code << 24) | arg`.
//!
//! Heartbeats are stamped with the host's wall clock: the longest gap between
//! two heartbeats of a vCPU is the downtime *as the guest sees it*, and since
//! the last stamp is part of the saved state, the gap across a save/restore or
//! a migration is measured too.
//!
//! The guest's detailed counters live in its status page (guest memory); the
//! VMM reads them there (`Machine::guest_status`).

use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guest_images::abi::{self, param, PORT_EVENT, PORT_HEARTBEAT, PORT_HEARTBEAT_IDLE, PROBE_BASE};
use serde::{Deserialize, Serialize};

use super::lock;

/// Whether `port` belongs to the probe.
pub fn claims(port: u16) -> bool {
    (PROBE_BASE..PROBE_BASE + 0x100).contains(&port)
}

/// Heartbeat bookkeeping of one vCPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Heartbeats {
    /// Heartbeats received (in this and any earlier process).
    pub count: u64,
    /// Value carried by the last heartbeat.
    pub last_value: Option<u32>,
    /// Wall-clock time of the last heartbeat, ns since the epoch.
    pub last_ns: Option<u64>,
    /// Longest gap between two heartbeats, ns (not counting the gaps after
    /// an idle heartbeat).
    pub max_gap_ns: u64,
    /// Whether the last heartbeat came from a halted vCPU on the idle port.
    #[serde(default)]
    pub last_idle: bool,
    /// Longest gap after an idle heartbeat, ns (about one timer tick).
    #[serde(default)]
    pub max_idle_gap_ns: u64,
    /// Heartbeats whose value was not the previous one plus one.
    pub discontinuities: u64,
    /// Gap between the last heartbeat before the last restore and the first
    /// one after it, ns (the downtime the guest saw across it).
    pub restore_gap_ns: Option<u64>,
    /// Whether the heartbeat before the restore was an idle one (then
    /// `restore_gap_ns` includes up to one of its timer ticks).
    #[serde(default)]
    pub restore_after_idle: bool,
    /// Set on restore: the next heartbeat measures `restore_gap_ns`.
    #[serde(default)]
    pub awaiting_first_after_restore: bool,
    /// When this vCPU, halted at the restore, should have woken: the resume
    /// time plus what was left of its LAPIC timer (ns since the epoch).
    #[serde(default)]
    pub expected_wake_ns: Option<u64>,
    /// First heartbeat after the restore minus `expected_wake_ns` (ns; < 0:
    /// early): how well the timer's state travelled, plus whatever kept the
    /// vCPU thread from running on a busy host (`wake_run_delay_ns`).
    #[serde(default)]
    pub wake_error_ns: Option<i64>,
    /// Of `wake_error_ns`, the time the vCPU thread waited on the host's
    /// run queue (runnable, no CPU free) since it first ran: the host
    /// scheduler's share of the lateness, not the timer's.
    #[serde(default)]
    pub wake_run_delay_ns: Option<u64>,
    /// The vCPU thread's run-queue wait when it first ran after the restore.
    #[serde(skip)]
    run_delay_at_first_run: Option<u64>,
}

/// Time the calling thread has spent runnable but waiting for a CPU, ns
/// (`/proc/thread-self/schedstat`, second field; None without schedstats).
fn thread_run_delay_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().nth(1)?.parse().ok()
}

/// An event a guest vCPU reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestEvent {
    pub vcpu: usize,
    pub code: u64,
    pub arg: u64,
    /// ns since the epoch.
    pub at_ns: u64,
}

/// Saved probe state: the parameters the guest runs with and the heartbeat
/// history that continuity and downtime checks need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeState {
    pub params: Vec<u32>,
    pub heartbeats: Vec<Heartbeats>,
}

#[derive(Debug)]
struct Inner {
    heartbeats: Vec<Heartbeats>,
    events: Vec<GuestEvent>,
}

/// The probe device.
#[derive(Debug)]
pub struct Probe {
    params: Vec<u32>,
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// Events kept for inspection.
const KEPT_EVENTS: usize = 1024;

/// Wall-clock now in ns since the epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Probe {
    /// A probe serving `params` to `vcpus` vCPUs.
    pub fn new(params: Vec<u32>, vcpus: usize) -> Self {
        Self::from_state(ProbeState {
            params,
            heartbeats: vec![Heartbeats::default(); vcpus],
        })
    }

    /// A probe continuing from a saved state: the next heartbeat of each
    /// vCPU measures the gap across the restore.
    pub fn from_state(mut s: ProbeState) -> Self {
        for hb in &mut s.heartbeats {
            hb.awaiting_first_after_restore = hb.last_ns.is_some();
        }
        Self {
            params: s.params,
            inner: Mutex::new(Inner {
                heartbeats: s.heartbeats,
                events: Vec::new(),
            }),
            changed: Condvar::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &[u32] {
        &self.params
    }

    pub(crate) fn read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        let k = usize::from((port - PROBE_BASE) / 4);
        let v = if (port - PROBE_BASE).is_multiple_of(4) && k < param::COUNT as usize {
            self.params.get(k).copied().unwrap_or(0)
        } else {
            u32::MAX
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    pub(crate) fn write(&self, vcpu: usize, port: u16, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(b);
        match port {
            PORT_HEARTBEAT => self.heartbeat(vcpu, value, false),
            PORT_HEARTBEAT_IDLE => self.heartbeat(vcpu, value, true),
            PORT_EVENT => self.event(vcpu, value),
            _ => {}
        }
    }

    pub(super) fn heartbeat(&self, vcpu: usize, value: u32, idle: bool) {
        let now = now_ns();
        let mut inner = lock(&self.inner);
        let Some(hb) = inner.heartbeats.get_mut(vcpu) else {
            return;
        };
        hb.count += 1;
        if let Some(last) = hb.last_value {
            if value != last.wrapping_add(1) {
                hb.discontinuities += 1;
            }
        }
        if let Some(last_ns) = hb.last_ns {
            let gap = now.saturating_sub(last_ns);
            if hb.last_idle {
                hb.max_idle_gap_ns = hb.max_idle_gap_ns.max(gap);
            } else {
                hb.max_gap_ns = hb.max_gap_ns.max(gap);
            }
            if hb.awaiting_first_after_restore {
                hb.restore_gap_ns = Some(gap);
                hb.restore_after_idle = hb.last_idle;
                hb.wake_error_ns = hb
                    .expected_wake_ns
                    .map(|expected| now as i64 - expected as i64);
                // Heartbeats arrive on the vCPU's own thread.
                hb.wake_run_delay_ns = hb
                    .run_delay_at_first_run
                    .zip(thread_run_delay_ns())
                    .map(|(first, now)| now.saturating_sub(first));
                hb.awaiting_first_after_restore = false;
            }
        }
        hb.last_value = Some(value);
        hb.last_ns = Some(now);
        hb.last_idle = idle;
        if hb.count == 1 {
            self.changed.notify_all();
        }
    }

    /// Called as the vCPUs resume after a restore: vCPU `i`, if it was
    /// halted, should wake at `wake_at_ns[i]` (ns since the epoch), and its
    /// first heartbeat will say how close it came.
    pub fn expect_wakes(&self, wake_at_ns: &[Option<u64>]) {
        for (hb, wake) in lock(&self.inner).heartbeats.iter_mut().zip(wake_at_ns) {
            hb.expected_wake_ns = *wake;
            hb.wake_error_ns = None;
        }
    }

    /// vCPU `vcpu`'s thread enters KVM_RUN for the first time: a wake
    /// expected earlier (its timer fired while it waited to be resumed, or
    /// to be scheduled on a busy host) is expected now instead.
    /// Called on the vCPU's own thread.
    pub fn vcpu_runs(&self, vcpu: usize) {
        let now = now_ns();
        let run_delay = thread_run_delay_ns();
        if let Some(hb) = lock(&self.inner).heartbeats.get_mut(vcpu) {
            hb.expected_wake_ns = hb.expected_wake_ns.map(|t| t.max(now));
            hb.run_delay_at_first_run = run_delay;
        }
    }

    /// Forgets the longest gaps so far (measurement starts anew).
    pub fn reset_max_gaps(&self) {
        for hb in &mut lock(&self.inner).heartbeats {
            hb.max_gap_ns = 0;
            hb.max_idle_gap_ns = 0;
        }
    }

    fn event(&self, vcpu: usize, value: u32) {
        let ev = GuestEvent {
            vcpu,
            code: u64::from(value >> 24),
            arg: u64::from(value & 0xff_ffff),
            at_ns: now_ns(),
        };
        if matches!(
            ev.code,
            abi::event::EXCEPTION | abi::event::FPU_FAIL | abi::event::BAD_CONFIG
        ) {
            tracing::error!("guest vCPU {vcpu}: {}", describe(&ev));
        } else {
            tracing::debug!("guest vCPU {vcpu}: {}", describe(&ev));
        }
        let mut inner = lock(&self.inner);
        if inner.events.len() == KEPT_EVENTS {
            inner.events.remove(0);
        }
        inner.events.push(ev);
        self.changed.notify_all();
    }

    /// Heartbeat bookkeeping of every vCPU.
    pub fn heartbeats(&self) -> Vec<Heartbeats> {
        lock(&self.inner).heartbeats.clone()
    }

    /// Events received so far (the last `KEPT_EVENTS`).
    pub fn events(&self) -> Vec<GuestEvent> {
        lock(&self.inner).events.clone()
    }

    /// Waits until `pred(events, heartbeats)` holds or `timeout` passes;
    /// returns whether it held.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[GuestEvent], &[Heartbeats]) -> bool,
    ) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut inner = lock(&self.inner);
        loop {
            if pred(&inner.events, &inner.heartbeats) {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            // Heartbeats after the first do not notify; poll them at 10 ms.
            let wait = (deadline - now).min(Duration::from_millis(10));
            inner = self
                .changed
                .wait_timeout(inner, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The state to save.
    pub fn save_state(&self) -> ProbeState {
        ProbeState {
            params: self.params.clone(),
            heartbeats: self.heartbeats(),
        }
    }
}

/// Human-readable form of a guest event.
pub fn describe(ev: &GuestEvent) -> String {
    use abi::event::*;
    match ev.code {
        BOOTED => format!("booted (vCPU {})", ev.arg),
        FILLED => format!("working set filled (vCPU {})", ev.arg),
        VERIFY_OK => format!("memory and FPU verified (vCPU {})", ev.arg),
        VERIFY_FAIL => format!("verification FAILED: {} bad pages", ev.arg),
        FPU_FAIL => format!("FPU/SSE registers lost their values (vCPU {})", ev.arg),
        EXCEPTION => format!("exception vector {}", ev.arg),
        BAD_CONFIG => format!("rejected parameter {}", ev.arg),
        c => format!("unknown event {c} arg {}", ev.arg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_served_and_heartbeat_gaps_counted() {
        let probe = Probe::new(vec![7, 8, 9], 2);
        let mut d = [0u8; 4];
        probe.read(0, PROBE_BASE + 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 8);
        probe.write(1, PORT_HEARTBEAT, &5u32.to_le_bytes());
        probe.write(1, PORT_HEARTBEAT, &6u32.to_le_bytes());
        probe.write(1, PORT_HEARTBEAT, &9u32.to_le_bytes());
        let hb = &probe.heartbeats()[1];
        assert_eq!(
            (hb.count, hb.discontinuities, hb.last_value),
            (3, 1, Some(9))
        );
        assert_eq!(hb.max_idle_gap_ns, 0);
        assert_eq!(probe.heartbeats()[0].count, 0);
    }

    #[test]
    fn restored_probe_measures_the_gap_across_restore() {
        let probe = Probe::new(vec![], 1);
        probe.heartbeat(0, 1, false);
        let restored = Probe::from_state(probe.save_state());
        std::thread::sleep(Duration::from_millis(5));
        restored.heartbeat(0, 2, false);
        let hb = &restored.heartbeats()[0];
        assert!(hb.restore_gap_ns.unwrap() >= 5_000_000);
        assert_eq!(hb.discontinuities, 0);
    }

    #[test]
    fn a_gap_after_an_idle_heartbeat_is_no_stall() {
        let probe = Probe::new(vec![], 1);
        probe.write(0, PORT_HEARTBEAT, &1u32.to_le_bytes());
        probe.write(0, PORT_HEARTBEAT_IDLE, &2u32.to_le_bytes());
        std::thread::sleep(Duration::from_millis(5));
        probe.write(0, PORT_HEARTBEAT, &3u32.to_le_bytes());
        let hb = &probe.heartbeats()[0];
        assert!(hb.max_idle_gap_ns >= 5_000_000, "{hb:?}");
        assert!(hb.max_gap_ns < 5_000_000, "{hb:?}");
        assert_eq!(hb.discontinuities, 0);
    }

    #[test]
    fn the_first_heartbeat_after_a_restore_is_held_against_the_expected_wake() {
        let probe = Probe::new(vec![], 2);
        probe.heartbeat(0, 1, true);
        probe.heartbeat(1, 1, false);
        let restored = Probe::from_state(probe.save_state());
        restored.expect_wakes(&[Some(now_ns() + 3_000_000), None]);
        std::thread::sleep(Duration::from_millis(3));
        restored.heartbeat(0, 2, false);
        restored.heartbeat(1, 2, false);
        let hb = restored.heartbeats();
        let err = hb[0].wake_error_ns.expect("predicted");
        assert!((0..50_000_000).contains(&err), "{err}");
        assert!(hb[0].restore_after_idle);
        assert_eq!(hb[1].wake_error_ns, None);
    }
}
