//! Measuring how fast the guest reads and writes, from the host.
//!
//! **Writes** (w) are what KVM's dirty log shows: read and cleared every
//! round of 50 ms, the dirtied pages summed.
//!
//! **Reads** (r) are invisible to the dirty log, so they are sampled with
//! userfaultfd *minor* faults: every `stride`-th populated page is picked;
//! each round its page-table entry is dropped with `MADV_DONTNEED` (on a
//! shared memfd mapping that keeps the page itself; KVM's MMU notifier drops
//! KVM's own mapping of it too). The guest's next access to it, read or
//! write, makes KVM fault on our mapping; the kernel reports a minor fault
//! and we map the page back with `UFFDIO_CONTINUE`. A sampled page touched
//! in a round but not in that round's dirty log was read: such pages ×
//! stride / time estimates r. (The fault's write flag cannot tell reads from
//! writes here: on this host KVM faults for write access either way.)
//!
//! Errors of the method: a page read twice within one round counts once
//! (reads are under-counted when the read set is re-read faster than every
//! 10 ms per page); the sample sees pages the VMM itself reads (status page)
//! and the guest's stack and tables; the fault round trip (~10 µs) slows
//! the reads it measures a little. The test `read_rate_estimate` checks the
//! estimate against the guest's own counter.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bitmap::DirtyBitmap;
use crate::codec::PAGE;
use crate::endpoint::{BoxError, SourceVm};
use crate::uffd::Userfault;

/// One round: sampled pages re-armed (and the dirty log read) this often.
const ROUND: Duration = Duration::from_millis(50);

/// What a measurement found (rates for the whole VM).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccessRates {
    /// r = accesses − w.
    pub read_pages_s: f64,
    /// w, from the dirty log.
    pub write_pages_s: f64,
    /// Pages touched (read or written) per second, from the sample.
    pub access_pages_s: f64,
    pub window_ms: f64,
    pub sampled_pages: u64,
    pub stride: u64,
}

impl AccessRates {
    /// r in MB/s.
    pub fn read_mb_s(&self) -> f64 {
        self.read_pages_s * PAGE as f64 / 1e6
    }
    /// w in MB/s.
    pub fn write_mb_s(&self) -> f64 {
        self.write_pages_s * PAGE as f64 / 1e6
    }
}

fn zap(addr: u64) {
    // SAFETY: `addr` is a page of our own shared guest-RAM mapping; dropping
    // its page-table entry keeps the memfd page, so no data is lost.
    unsafe {
        libc::madvise(addr as *mut libc::c_void, PAGE, libc::MADV_DONTNEED);
    }
}

/// Measures r and w in one window of `window`, sampling about
/// `max_samples` pages: every round the sampled pages are re-armed and the
/// dirty log is read. The dirty log of the *unsampled* pages gives w (scaled
/// to all pages); the sampled pages give all accesses; r = accesses − w.
/// (The sampled pages' own dirty bits are useless: on this host KVM marks a
/// page dirty when it maps it back after a sampling fault, even for a read.)
pub fn measure<V: SourceVm>(
    vm: &V,
    window: Duration,
    max_samples: u64,
) -> Result<AccessRates, BoxError> {
    let mappings = vm.ram_mappings()?;
    let host = |off: u64| crate::endpoint::host_address(&mappings, off);
    let ranges = vm.populated_ranges()?;
    let populated: u64 = ranges.iter().map(|r| r.1 / PAGE as u64).sum();
    let stride = populated.div_ceil(max_samples.max(1)).max(2);
    let mut samples = Vec::new(); // (page, host address)
    let mut k = 0u64;
    for (off, len) in ranges {
        for p in (off / PAGE as u64)..(off + len) / PAGE as u64 {
            if k.is_multiple_of(stride) {
                if let Some(h) = host(p * PAGE as u64) {
                    samples.push((p, h));
                }
            }
            k += 1;
        }
    }
    let uffd = Userfault::new_minor()?;
    for &(_, h, l) in &mappings {
        uffd.register_minor(h, l)?;
    }
    vm.start_dirty_log()?;
    let sampled: std::collections::HashSet<u64> = samples.iter().map(|s| s.1).collect();
    let stop = AtomicBool::new(false);
    let touched = AtomicU64::new(0);
    let mut written_unsampled = 0u64;
    let started = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                let Ok(Some((addr, _))) = uffd.next_fault_flags(5) else {
                    continue;
                };
                let page = addr & !(PAGE as u64 - 1);
                let _ = uffd.continue_range(page, PAGE as u64);
                if sampled.contains(&page) {
                    touched.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        while started.elapsed() < window {
            let round = Instant::now();
            samples.iter().for_each(|&(_, a)| zap(a));
            std::thread::sleep(ROUND.saturating_sub(round.elapsed()));
            let dirty = DirtyBitmap::from_words(vm.take_dirty_bitmap().unwrap_or_default());
            let in_sample = samples.iter().filter(|&&(p, _)| dirty.contains(p)).count() as u64;
            written_unsampled += dirty.count() - in_sample;
        }
        stop.store(true, Ordering::Release);
    });
    let secs = started.elapsed().as_secs_f64();
    let _ = vm.stop_dirty_log();
    for &(_, h, l) in &mappings {
        let _ = uffd.unregister(h, l);
    }
    let n = samples.len() as u64;
    let a = (touched.load(Ordering::Acquire) * stride) as f64 / secs;
    let w = written_unsampled as f64 * populated as f64 / (populated - n).max(1) as f64 / secs;
    Ok(AccessRates {
        read_pages_s: (a - w).max(0.0),
        write_pages_s: w,
        access_pages_s: a,
        window_ms: secs * 1e3,
        sampled_pages: n,
        stride,
    })
}
