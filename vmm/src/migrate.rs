//! The VMM side of live migration: [`migration::SourceVm`] for a running
//! [`Machine`], and [`migration::DestinationVm`] that builds one from the
//! stream.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use migration::endpoint::GuestView;
use migration::{BoxError, DestinationVm, SourceVm};

use crate::machine::{Machine, MachineState, PreparedMachine, RunOptions};
use crate::vstate::memory::GuestRam;
use crate::MachineConfig;

impl SourceVm for Machine {
    fn ram_size(&self) -> u64 {
        self.vm().ram().size()
    }

    fn populated_ranges(&self) -> Result<Vec<(u64, u64)>, BoxError> {
        Ok(self.vm().ram().populated_ranges()?)
    }

    fn read_ram(&self, offset: u64, buf: &mut [u8]) -> Result<(), BoxError> {
        // A plain copy from the mapping the guest runs on: cheaper than
        // pread, which looks each page up in the page cache.
        Ok(self.vm().ram().read_ram(offset, buf)?)
    }

    fn start_dirty_log(&self) -> Result<(), BoxError> {
        self.vm().set_dirty_logging(true)?;
        self.vm().take_dirty_bitmap()?;
        Ok(())
    }

    fn stop_dirty_log(&self) -> Result<(), BoxError> {
        Ok(self.vm().set_dirty_logging(false)?)
    }

    fn take_dirty_bitmap(&self) -> Result<Vec<u64>, BoxError> {
        Ok(self.vm().take_dirty_bitmap()?)
    }

    fn pause(&self) {
        Machine::pause(self);
    }

    fn resume(&self) {
        Machine::resume(self);
    }

    fn set_throttle(&self, pct: u8) {
        Machine::set_throttle(self, pct);
    }

    fn config_blob(&self) -> Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(self.config())?)
    }

    fn state_blob(&self) -> Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(&self.save_state()?)?)
    }

    fn first_touched_ram(&self) -> Result<Vec<u64>, BoxError> {
        Ok(Machine::first_touched_ram(self)?)
    }

    fn ram_mappings(&self) -> Result<Vec<(u64, u64, u64)>, BoxError> {
        Ok(self.vm().ram().host_mappings())
    }
}

/// Told the source's address once it authenticated.
pub struct OnPeer(Box<dyn FnMut(SocketAddr) + Send>);

impl std::fmt::Debug for OnPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnPeer")
    }
}

/// Builds the destination machine from the migration stream.
#[derive(Debug)]
pub struct Incoming {
    opts: RunOptions,
    on_peer: Option<OnPeer>,
    prefault: bool,
    /// RAM was prefaulted (pre-copy only): every page is mapped, and no
    /// userfaultfd watches the mapping.
    prefaulted: bool,
    prepared: Option<PreparedMachine>,
    machine: Option<Machine>,
}

impl Incoming {
    /// A destination that will run its machine with `opts`.
    pub fn new(opts: RunOptions) -> Self {
        Self {
            opts,
            on_peer: None,
            prefault: false,
            prefaulted: false,
            prepared: None,
            machine: None,
        }
    }

    /// With `prefault`, RAM the source announces as populated is allocated
    /// and touched before round 0 (like QEMU's `-mem-prealloc` or Cloud
    /// Hypervisor's `prefault=on`, but only what will be filled).
    pub fn with_prefault(mut self, prefault: bool) -> Self {
        self.prefault = prefault;
        self
    }

    /// Calls `f` with the source's address once it authenticated.
    pub fn on_peer(mut self, f: impl FnMut(SocketAddr) + Send + 'static) -> Self {
        self.on_peer = Some(OnPeer(Box::new(f)));
        self
    }

    fn ram(&self) -> Result<&GuestRam, BoxError> {
        self.prepared
            .as_ref()
            .map(PreparedMachine::ram)
            .or_else(|| self.machine.as_ref().map(|m| m.vm().ram()))
            .ok_or_else(|| "no RAM yet: Config was not received".into())
    }
}

impl DestinationVm for Incoming {
    type Running = Machine;

    fn peer_authenticated(&mut self, peer: SocketAddr) {
        if let Some(OnPeer(f)) = &mut self.on_peer {
            f(peer);
        }
    }

    fn prepare(&mut self, config: &[u8], ram_size: u64) -> Result<(), BoxError> {
        let config: MachineConfig = serde_json::from_slice(config)?;
        config.validate()?;
        if config.mem_bytes != ram_size {
            return Err(format!(
                "RAM size {ram_size} differs from the config's {}",
                config.mem_bytes
            )
            .into());
        }
        // The VM and vCPUs are created now, while the source still runs,
        // not at the switch-over.
        self.prepared = Some(PreparedMachine::new(&config, GuestRam::new(ram_size)?)?);
        Ok(())
    }

    fn prefault(&mut self, offset: u64, len: u64) -> Result<(), BoxError> {
        if self.prefault {
            self.ram()?.prefault(offset, len)?;
            self.prefaulted = true;
        }
        Ok(())
    }

    fn ram_for_placement(&mut self) -> Option<Vec<(u64, &mut [u8])>> {
        if !self.prefaulted {
            return None;
        }
        let ram = self.prepared.as_mut()?.ram();
        let slices = ram
            .host_mappings()
            .into_iter()
            .map(|(ram_offset, host, len)| {
                // SAFETY: `host..host + len` is one of the RAM mappings,
                // which live as long as the prepared machine this borrow of
                // `self` keeps alive. Nothing else touches them meanwhile:
                // the machine is not restored yet, so no vCPU runs; RAM was
                // prefaulted, so no userfaultfd is registered; and every
                // other access from this process goes through `self`,
                // which the returned slices borrow mutably. The slices are
                // disjoint (one per region).
                let bytes =
                    unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len as usize) };
                (ram_offset, bytes)
            })
            .collect();
        Some(slices)
    }

    fn write_ram(&mut self, offset: u64, data: &[u8]) -> Result<(), BoxError> {
        let ram = self.ram()?;
        if self.prefaulted {
            // Prefaulted pages are mapped: a plain copy.
            Ok(ram.write_ram(offset, data)?)
        } else {
            // Fresh memory: pwrite allocates each page without a page fault.
            Ok(ram.memfd().write_all_at(data, offset)?)
        }
    }

    fn read_ram(&self, offset: u64, buf: &mut [u8]) -> Result<(), BoxError> {
        Ok(self.ram()?.memfd().read_exact_at(buf, offset)?)
    }

    fn populated_ranges(&self) -> Result<Vec<(u64, u64)>, BoxError> {
        Ok(self.ram()?.populated_ranges()?)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), BoxError> {
        let state: MachineState = serde_json::from_slice(state)?;
        let prepared = self
            .prepared
            .take()
            .ok_or("nothing prepared to restore into")?;
        self.machine = Some(prepared.restore(&state, &self.opts)?);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BoxError> {
        self.machine.as_ref().ok_or("nothing restored")?.resume();
        Ok(())
    }

    fn after_resume(&mut self, verify: bool) -> Result<GuestView, BoxError> {
        let m = self.machine.as_ref().ok_or("nothing restored")?;
        let probe = &m.devices().probe;
        // Every vCPU that heart-beat before must beat again.
        probe.wait_until(Duration::from_secs(5), |_, hb| {
            hb.iter()
                .all(|h| h.last_ns.is_none() || !h.awaiting_first_after_restore)
        });
        let gap_ns = guest_seen_gap_ns(&probe.heartbeats());
        // From here on the longest gap is a stall after the resume.
        probe.reset_max_gaps();
        let mut view = GuestView {
            guest_downtime_ms: gap_ns as f64 / 1e6,
            ..Default::default()
        };
        if verify {
            let r = m.request_verify(Duration::from_secs(120))?;
            view.guest_verified = Some(r.ok);
            view.detail = format!(
                "guest checked {} pages: {} bad, {} FPU errors",
                r.pages_ok + r.pages_bad,
                r.pages_bad,
                r.fpu_errors
            );
        }
        Ok(view)
    }

    fn ram_mappings(&self) -> Result<Vec<(u64, u64, u64)>, BoxError> {
        Ok(self.ram()?.host_mappings())
    }

    fn punch_hole(&mut self, offset: u64, len: u64) -> Result<(), BoxError> {
        Ok(self.ram()?.punch_hole(offset, len)?)
    }

    fn pause_guest(&mut self) -> bool {
        match &self.machine {
            Some(m) => m.pause_timeout(Duration::from_secs(2)),
            None => true,
        }
    }

    fn longest_stall_ms(&self) -> f64 {
        self.machine
            .as_ref()
            .map(|m| {
                m.devices()
                    .probe
                    .heartbeats()
                    .iter()
                    .map(|h| h.max_gap_ns)
                    .max()
                    .unwrap_or(0) as f64
                    / 1e6
            })
            .unwrap_or(0.0)
    }

    fn discard(&mut self) {
        if let Some(m) = self.machine.take() {
            m.pause();
            m.shutdown();
        }
        self.prepared = None;
    }

    fn into_running(mut self) -> Option<Machine> {
        self.machine.take()
    }
}

/// The downtime the guest saw across a restore: the longest gap between the
/// last heartbeat before it and the first after it. A vCPU that was halted at
/// a slow tick (its last beat an idle one) may add up to one tick of its
/// own, so it counts only when no vCPU beat at the heartbeat rate; vCPU 0,
/// the guest's clock, always does.
fn guest_seen_gap_ns(heartbeats: &[crate::devices::probe::Heartbeats]) -> u64 {
    let gaps = |idle: bool| {
        heartbeats
            .iter()
            .filter(|h| h.restore_after_idle == idle)
            .filter_map(|h| h.restore_gap_ns)
            .max()
    };
    gaps(false).or_else(|| gaps(true)).unwrap_or(0)
}
