//! What the engine needs from a VMM, on each side.

/// Errors a VMM reports to the engine.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The machine being migrated away. RAM is addressed by **RAM offset** (a
/// contiguous index over all of guest RAM, independent of the guest-physical
/// layout), in 4 KiB pages.
pub trait SourceVm: Sync {
    /// Bytes of RAM.
    fn ram_size(&self) -> u64;
    /// `(offset, len)` ranges of RAM the guest ever wrote; the rest is
    /// known to be zero and is never read.
    fn populated_ranges(&self) -> Result<Vec<(u64, u64)>, BoxError>;
    /// Copies RAM at `offset` into `buf`.
    fn read_ram(&self, offset: u64, buf: &mut [u8]) -> Result<(), BoxError>;
    /// Turns dirty logging on (and clears it).
    fn start_dirty_log(&self) -> Result<(), BoxError>;
    /// Turns dirty logging off.
    fn stop_dirty_log(&self) -> Result<(), BoxError>;
    /// Pages written since the last call, one bit per page, and clears it.
    fn take_dirty_bitmap(&self) -> Result<Vec<u64>, BoxError>;
    /// Stops every vCPU at a consistent point.
    fn pause(&self);
    /// Lets the vCPUs run again.
    fn resume(&self);
    /// Keeps the vCPUs out of the guest `pct` % of the time, so that a
    /// guest that dirties memory faster than the link carries it lets
    /// pre-copy converge (auto-converge); 0 ends it.
    fn set_throttle(&self, pct: u8);
    /// The machine's configuration, opaque to the engine.
    fn config_blob(&self) -> Result<Vec<u8>, BoxError>;
    /// The complete machine state (vCPUs, VM, devices), opaque to the
    /// engine. Called only while paused.
    fn state_blob(&self) -> Result<Vec<u8>, BoxError>;
    /// `(ram_offset, host_address, len)` of every guest RAM mapping (for
    /// access sampling with userfaultfd).
    fn ram_mappings(&self) -> Result<Vec<(u64, u64, u64)>, BoxError>;
    /// RAM offsets of the pages the paused vCPUs will touch first when they
    /// run again (their code, stacks, descriptor tables, page tables).
    /// Post-copy sends them before the state, so that the guest resumes
    /// without a fault. Called only while paused; by default none.
    fn first_touched_ram(&self) -> Result<Vec<u64>, BoxError> {
        Ok(Vec::new())
    }
}

/// The machine being built on the destination.
pub trait DestinationVm {
    /// What the destination ends up with: a running machine.
    type Running;
    /// A source connected from `peer` and proved that it knows the secret:
    /// a migration begins. By default nothing happens.
    fn peer_authenticated(&mut self, peer: std::net::SocketAddr) {
        let _ = peer;
    }
    /// Creates empty RAM for a machine described by `config`.
    fn prepare(&mut self, config: &[u8], ram_size: u64) -> Result<(), BoxError>;
    /// Pre-copy, before `Ready`: RAM `[offset, offset + len)` is populated on
    /// the source and round 0 is about to fill it. A destination may
    /// allocate and touch it now (`vmm receive --prefault`), so that the
    /// first write of each page does not pay for it in the stream; by
    /// default nothing happens.
    fn prefault(&mut self, offset: u64, len: u64) -> Result<(), BoxError> {
        let _ = (offset, len);
        Ok(())
    }
    /// Pre-copy, before `State`: guest RAM as `(ram_offset, bytes)` slices
    /// in ascending order, to receive pages straight into (see
    /// `placement`), or `None` to have them written with `write_ram`. Worth
    /// offering only where writing through the mapping is cheap (prefaulted
    /// RAM), and safe only while no vCPU runs and no userfaultfd watches it:
    /// the engine asks only in a pre-copy migration, before `State`.
    fn ram_for_placement(&mut self) -> Option<Vec<(u64, &mut [u8])>> {
        None
    }
    /// Writes received bytes at RAM `offset`.
    fn write_ram(&mut self, offset: u64, data: &[u8]) -> Result<(), BoxError>;
    /// Copies RAM at `offset` into `buf` (for verification).
    fn read_ram(&self, offset: u64, buf: &mut [u8]) -> Result<(), BoxError>;
    /// Populated ranges of the destination's RAM (for verification).
    fn populated_ranges(&self) -> Result<Vec<(u64, u64)>, BoxError>;
    /// Restores the machine from `state`, paused.
    fn restore(&mut self, state: &[u8]) -> Result<(), BoxError>;
    /// Resumes the restored machine.
    fn resume(&mut self) -> Result<(), BoxError>;
    /// After resume: waits briefly for the guest's first heartbeats and
    /// returns the longest gap it saw across the switch-over (ms), and
    /// whether its self-check (memory and FPU) passed when `verify` is set.
    fn after_resume(&mut self, verify: bool) -> Result<GuestView, BoxError>;
    /// Stops a machine that must not run (a failed verification).
    fn discard(&mut self);
    /// Post-copy: `(ram_offset, host_address, len)` of every guest RAM
    /// mapping, to register with userfaultfd.
    fn ram_mappings(&self) -> Result<Vec<(u64, u64, u64)>, BoxError>;
    /// Post-copy: drops received pages `[offset, offset + len)` that the
    /// source re-dirtied, so that they fault and are fetched again.
    fn punch_hole(&mut self, offset: u64, len: u64) -> Result<(), BoxError>;
    /// Post-copy lost its source: stops the vCPUs (as far as they can be
    /// stopped while waiting for missing pages); returns whether all stopped.
    fn pause_guest(&mut self) -> bool;
    /// Longest heartbeat gap since `after_resume` returned (ms): the guest's
    /// worst stall on missing pages.
    fn longest_stall_ms(&self) -> f64;
    /// Hands over the running machine.
    fn into_running(self) -> Option<Self::Running>;
}

/// Host address of RAM offset `ram_offset` in `mappings` (as returned by
/// `ram_mappings`: `(ram_offset, host_address, len)` each).
pub fn host_address(mappings: &[(u64, u64, u64)], ram_offset: u64) -> Option<u64> {
    mappings
        .iter()
        .find(|(o, _, l)| (*o..o + l).contains(&ram_offset))
        .map(|(o, h, _)| h + (ram_offset - o))
}

/// What the guest itself saw across the switch-over.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GuestView {
    /// Longest heartbeat gap across the switch-over (ms).
    pub guest_downtime_ms: f64,
    /// Result of the guest's own verification, when requested.
    pub guest_verified: Option<bool>,
    /// Guest-reported details (pages checked, FPU errors).
    pub detail: String,
}
