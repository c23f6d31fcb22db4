//! Post-copy: the guest runs on the destination before all its memory has
//! arrived.
//!
//! After the switch-over the source knows which pages the destination still
//! needs (`PostcopyBegin`: all populated pages for pure post-copy; for the
//! hybrid, those not pre-copied and those dirtied since they were sent). Two
//! flows then fill them in:
//!
//! - **demand** (fault connection, TCP_NODELAY, nothing else on it): a vCPU
//!   touches a missing page → userfaultfd wakes the destination's fault
//!   thread → `PageRequest` → the source's server thread answers with the
//!   page → the destination's reply thread installs it with `UFFDIO_COPY`,
//!   which wakes the vCPU. Several vCPUs may fault at once: requests are
//!   pipelined, each page asked for once.
//! - **push** (main connection): the source sends every needed page in the
//!   background; whenever a page was requested it moves its scan there, so
//!   the neighbours of a faulting page arrive before the guest asks.
//!
//! The destination ends post-copy when every needed page is present, then
//! unregisters the userfaultfd and reports (`PostcopyComplete`).

use crate::secure::SecureStream;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bitmap::{AtomicBitmap, DirtyBitmap};
use crate::codec::{decode_batch, BatchEncoder, Compression, PageData, PAGE};
use crate::endpoint::{DestinationVm, SourceVm};
use crate::error::{vm_err, MigrationError};
use crate::policy::PushOrder;
use crate::protocol::{read_frame, write_frame, Cursor, Kind, ProtocolError};
use crate::report::PostcopyStats;
use crate::sender::{set_progress, PageSender};
use crate::uffd::Userfault;

/// Runs the calling thread at real-time priority if allowed (root): the
/// demand path is a few microseconds of work per fault, but on a busy host
/// it would otherwise wait for a time slice behind the bulk push and the
/// guest's own vCPUs, which is what a faulting vCPU's stall is made of.
fn prefer_latency() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sets the scheduling policy of the calling thread only; `param`
    // is a valid sched_param for the call. Failure (no privilege) is fine.
    let _ = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
}

// ---------------------------------------------------------------- source --

/// State shared by the source's push and its fault server.
#[derive(Debug, Default)]
pub struct SourceShared {
    /// Last page the destination asked for (+1; 0 = none yet).
    last_request: AtomicU64,
    pulled_pages: AtomicU64,
    pulled_bytes: AtomicU64,
}

/// Serves demand requests on the fault connection until it closes.
pub fn serve_faults<V: SourceVm>(
    vm: &V,
    stream: SecureStream,
    shared: &SourceShared,
    ram_pages: u64,
) {
    prefer_latency();
    let mut r = &stream;
    let mut w = &stream;
    let mut enc = BatchEncoder::new(Compression::None);
    loop {
        let frame = match read_frame(&mut r) {
            Ok(f) => f,
            Err(_) => return, // closed: post-copy is over (or the destination died)
        };
        if frame.kind != Kind::PageRequest {
            return;
        }
        let mut c = Cursor::new(&frame.payload, "PageRequest");
        let Ok(p) = c.u64() else { return };
        if p >= ram_pages
            || enc
                .push_from(p, |slot| vm.read_ram(p * PAGE as u64, slot))
                .is_err()
        {
            return;
        }
        shared.last_request.store(p + 1, Ordering::Release);
        // One write, one segment: the faulting vCPU waits for it.
        let frame = enc.frame();
        if crate::protocol::write_all_vectored(&mut w, &frame).is_err() {
            return;
        }
        shared.pulled_pages.fetch_add(1, Ordering::Relaxed);
        shared.pulled_bytes.fetch_add(
            (frame[0].len() + frame[1].len() - crate::protocol::HEADER_LEN) as u64,
            Ordering::Relaxed,
        );
        enc.clear();
    }
}

/// Pushes every page of `needed` on the main connection, in `order`;
/// returns pages pushed.
pub fn push<V: SourceVm>(
    s: &mut PageSender<'_, V>,
    needed: &DirtyBitmap,
    shared: &SourceShared,
    order: PushOrder,
) -> Result<u64, MigrationError> {
    const CHUNK: u64 = 64;
    let total_pages = needed.capacity();
    let mut sent = DirtyBitmap::new(total_pages);
    let todo = needed.count();
    set_progress(&s.progress, |p| {
        p.phase = "post-copy push".into();
        p.round_pages_sent = 0;
        p.round_pages_total = todo;
    });
    let unsent = |sent: &DirtyBitmap, p: u64| needed.contains(p) && !sent.contains(p);
    let mut done = 0u64;
    let mut cursor = 0u64;
    let mut seen_request = 0u64;
    while done < todo {
        let req = shared.last_request.load(Ordering::Acquire);
        if order == PushOrder::FollowFaults && req != seen_request {
            seen_request = req;
            cursor = req; // the page after the requested one
        }
        // Next needed, unsent page from the cursor on (wrapping).
        let mut p = cursor % total_pages;
        let mut scanned = 0;
        while scanned < total_pages && !unsent(&sent, p) {
            p = (p + 1) % total_pages;
            scanned += 1;
        }
        if scanned == total_pages {
            break;
        }
        let mut n = 0;
        while n < CHUNK && p + n < total_pages && unsent(&sent, p + n) {
            sent.insert(p + n);
            n += 1;
        }
        s.send_run(p, n)?;
        s.flush_batch()?;
        done += n;
        cursor = p + n;
    }
    s.flush()?;
    Ok(done)
}

// ----------------------------------------------------------- destination --

/// Shared by the destination's fault thread, reply thread and main thread.
pub struct DestShared {
    uffd: Userfault,
    mappings: Vec<(u64, u64, u64)>,
    needed: AtomicBitmap,
    present: AtomicBitmap,
    requested: AtomicBitmap,
    needed_count: AtomicU64,
    armed: AtomicBool,
    present_count: AtomicU64,
    request_times: Mutex<HashMap<u64, Instant>>,
    latencies_us: Mutex<Vec<f64>>,
    pulled_bytes: AtomicU64,
    pulled_pages: AtomicU64,
    stop: AtomicBool,
    source_lost: AtomicBool,
    /// `--verify`: the source's CRC of each page; arriving pages are checked.
    expected: std::sync::OnceLock<Vec<Option<u32>>>,
    verified: AtomicU64,
    mismatched: AtomicU64,
}

impl DestShared {
    /// Whether `page` is one post-copy must bring.
    pub fn is_needed(&self, page: u64) -> bool {
        self.needed.contains(page)
    }

    /// Every page post-copy must bring (present or not).
    pub fn needed_pages(&self) -> DirtyBitmap {
        self.needed.snapshot()
    }

    /// Whether the source went away before every page arrived.
    pub fn source_lost(&self) -> bool {
        self.source_lost.load(Ordering::Acquire)
    }

    /// With `--verify`: whether `data` matches the source's CRC of `page`.
    fn check(&self, page: u64, data: &PageData<'_>) -> Option<bool> {
        let expected = self.expected.get()?.get(page as usize).copied()?;
        let crc = match data {
            PageData::Zero => crc32fast::hash(&[0u8; PAGE]),
            PageData::Bytes(b) => crc32fast::hash(b),
        };
        if expected != Some(crc) {
            tracing::error!("post-copy page {page}: checksum {crc:#x}, source had {expected:x?}");
        }
        Some(expected == Some(crc))
    }

    fn host_addr(&self, page: u64) -> Option<u64> {
        crate::endpoint::host_address(&self.mappings, page * PAGE as u64)
    }

    fn page_of(&self, addr: u64) -> Option<u64> {
        self.mappings
            .iter()
            .find(|(_, h, l)| (*h..h + l).contains(&addr))
            .map(|(o, h, _)| (o + (addr - h)) / PAGE as u64)
    }

    /// Installs a received page if it is still missing.
    fn install(&self, page: u64, data: PageData<'_>) -> std::io::Result<()> {
        if !self.needed.contains(page) || self.present.contains(page) {
            return Ok(());
        }
        let Some(addr) = self.host_addr(page) else {
            return Ok(());
        };
        let good = self.check(page, &data);
        match data {
            PageData::Zero => self.uffd.zeropage(addr, PAGE as u64)?,
            PageData::Bytes(b) => self.uffd.copy(addr, b)?,
        };
        // Push and demand may both deliver a page; count it once.
        if self.present.insert(page) {
            self.present_count.fetch_add(1, Ordering::AcqRel);
            if let Some(good) = good {
                self.verified.fetch_add(1, Ordering::Relaxed);
                if !good {
                    self.mismatched.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Whether every needed page is present.
    pub fn complete(&self) -> bool {
        self.armed.load(Ordering::Acquire)
            && self.present_count.load(Ordering::Acquire)
                >= self.needed_count.load(Ordering::Acquire)
    }

    /// Needed pages still missing (first `limit`) and their count.
    pub fn missing(&self, limit: usize) -> (u64, Vec<u64>) {
        let mut first = Vec::new();
        let mut count = 0;
        for p in 0..self.needed.capacity() {
            if self.needed.contains(p) && !self.present.contains(p) {
                count += 1;
                if first.len() < limit {
                    first.push(p);
                }
            }
        }
        (count, first)
    }
}

/// The end of post-copy on the destination.
#[derive(Debug)]
pub struct Finished {
    pub stats: PostcopyStats,
    /// Pages checked against the source's CRC on arrival, and mismatches.
    pub verified: (u64, u64),
}

/// The destination's post-copy machinery.
pub struct PostcopyDestination {
    pub shared: Arc<DestShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    fault_conn: SecureStream,
    pushed_pages: u64,
    pushed_bytes: u64,
    abandoned: bool,
}

impl Drop for PostcopyDestination {
    /// A setup that never reached the switch-over (the migration failed
    /// earlier) is taken down; an abandoned one keeps its registration (see
    /// [`PostcopyDestination::abandon`]).
    fn drop(&mut self) {
        if !self.abandoned && !self.threads.is_empty() {
            self.stop_threads(0.0, 0.0);
        }
    }
}

impl PostcopyDestination {
    /// Prepares post-copy as soon as the destination knows it is coming
    /// (at `Config`, long before the switch-over): registers guest RAM with
    /// userfaultfd and starts the fault and reply threads on the fault
    /// connection. Nothing can fault yet: the guest is not running.
    pub fn start<D: DestinationVm>(
        dst: &D,
        ram_pages: u64,
        fault_conn: SecureStream,
    ) -> Result<Self, MigrationError> {
        let uffd = Userfault::new().map_err(|e| vm_err("open userfaultfd")(e.into()))?;
        let mappings = dst.ram_mappings().map_err(vm_err("find RAM mappings"))?;
        for &(_, host, len) in &mappings {
            uffd.register(host, len)
                .map_err(|e| vm_err("register RAM with userfaultfd")(e.into()))?;
        }
        let shared = Arc::new(DestShared {
            uffd,
            mappings,
            needed: AtomicBitmap::new(ram_pages),
            present: AtomicBitmap::new(ram_pages),
            requested: AtomicBitmap::new(ram_pages),
            needed_count: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            present_count: AtomicU64::new(0),
            request_times: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            pulled_bytes: AtomicU64::new(0),
            pulled_pages: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            source_lost: AtomicBool::new(false),
            expected: std::sync::OnceLock::new(),
            verified: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
        });
        let _ = fault_conn.set_nodelay(true);
        let _ = fault_conn.set_read_timeout(None);
        let writer = fault_conn.try_clone().map_err(ProtocolError::Io)?;
        let closer = fault_conn.try_clone().map_err(ProtocolError::Io)?;
        let sh = shared.clone();
        let faults = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || fault_loop(&sh, writer))
            .map_err(ProtocolError::Io)?;
        let sh = shared.clone();
        let replies = std::thread::Builder::new()
            .name("uffd-replies".into())
            .spawn(move || reply_loop(&sh, fault_conn, ram_pages))
            .map_err(ProtocolError::Io)?;
        Ok(Self {
            shared,
            threads: vec![faults, replies],
            fault_conn: closer,
            pushed_pages: 0,
            pushed_bytes: 0,
            abandoned: false,
        })
    }

    /// At the switch-over: marks the pages still to come, and drops those
    /// received in pre-copy but dirtied since (they fault and are fetched
    /// again). `expected` are the source's CRCs (`--verify`).
    pub fn arm<D: DestinationVm>(
        &mut self,
        dst: &mut D,
        needed_runs: &[(u64, u64)],
        written: &DirtyBitmap,
        expected: Option<Vec<Option<u32>>>,
    ) -> Result<(), MigrationError> {
        let sh = &self.shared;
        let mut count = 0;
        for &(f, n) in needed_runs {
            (f..f + n).for_each(|p| {
                sh.needed.insert(p);
            });
            count += n;
        }
        let mut stale = sh.needed.snapshot();
        stale.intersect_with(written);
        for (f, n) in stale.runs() {
            dst.punch_hole(f * PAGE as u64, n * PAGE as u64)
                .map_err(vm_err("drop re-dirtied pages"))?;
        }
        if let Some(e) = expected {
            let _ = sh.expected.set(e);
        }
        sh.needed_count.store(count, Ordering::Release);
        sh.armed.store(true, Ordering::Release);
        Ok(())
    }

    /// Installs a `Pages` frame of the background push.
    pub fn pushed(&mut self, payload: &[u8], ram_pages: u64) -> Result<(), MigrationError> {
        let sh = &self.shared;
        let mut n = 0;
        decode_batch::<MigrationError>(payload, ram_pages, |p, d| {
            n += 1;
            sh.install(p, d)
                .map_err(|e| vm_err("install a pushed page")(e.into()))
        })?;
        self.pushed_pages += n;
        self.pushed_bytes += payload.len() as u64;
        Ok(())
    }

    /// Waits (bounded) until every needed page is present, then stops the
    /// threads and unregisters the userfaultfd.
    pub fn finish(
        mut self,
        resumed_at: Instant,
        stall_ms: f64,
    ) -> Result<Finished, MigrationError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.shared.complete() {
            if Instant::now() > deadline || self.shared.source_lost.load(Ordering::Acquire) {
                let (count, first) = self.shared.missing(8);
                return Err(MigrationError::MissingPages {
                    count,
                    first,
                    paused: false,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let last_page_ms = resumed_at.elapsed().as_secs_f64() * 1e3;
        let stats = self.stop_threads(last_page_ms, stall_ms);
        let sh = &self.shared;
        Ok(Finished {
            stats,
            verified: (
                sh.verified.load(Ordering::Acquire),
                sh.mismatched.load(Ordering::Acquire),
            ),
        })
    }

    fn stop_threads(&mut self, last_page_ms: f64, stall_ms: f64) -> PostcopyStats {
        let sh = &self.shared;
        sh.stop.store(true, Ordering::Release);
        for &(_, host, len) in &sh.mappings {
            let _ = sh.uffd.unregister(host, len);
        }
        // The reply thread sleeps in read(): closing the fault connection
        // wakes it (and tells the source's server that demand is over).
        let _ = self.fault_conn.shutdown(std::net::Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut lat = sh
            .latencies_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        lat.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            if lat.is_empty() {
                0.0
            } else {
                lat[((lat.len() - 1) as f64 * q) as usize]
            }
        };
        PostcopyStats {
            demand_faults: lat.len() as u64,
            fault_latency_p50_us: pct(0.5),
            fault_latency_p99_us: pct(0.99),
            fault_latency_max_us: lat.last().copied().unwrap_or(0.0),
            pages_pushed: self.pushed_pages,
            pages_pulled: sh.pulled_pages.load(Ordering::Acquire),
            bytes_pushed: self.pushed_bytes,
            bytes_pulled: sh.pulled_bytes.load(Ordering::Acquire),
            last_page_after_resume_ms: last_page_ms,
            longest_stall_ms: stall_ms,
        }
    }

    /// The source is gone: which pages never arrived.
    pub fn abandon(mut self) -> (u64, Vec<u64>) {
        self.abandoned = true;
        self.shared.source_lost.store(true, Ordering::Release);
        let missing = self.shared.missing(16);
        // Leave the userfaultfd registered: an unregistered hole would read
        // as zeros and silently corrupt the guest. Only stop our threads'
        // reading; faulting vCPUs stay asleep.
        self.shared.stop.store(true, Ordering::Release);
        // And close the fault connection: our reply thread is blocked
        // reading it, and a source that is merely unable to push (not dead)
        // would otherwise keep serving it forever.
        let _ = self.fault_conn.shutdown(std::net::Shutdown::Both);
        missing
    }
}

/// Reads userfaultfd events and asks the source for each missing page once.
fn fault_loop(sh: &DestShared, mut conn: SecureStream) {
    prefer_latency();
    // Faults before the switch-over told us which pages are still to come
    // wait here (nothing of ours should fault then, but be safe).
    let mut early = Vec::new();
    while !sh.stop.load(Ordering::Acquire) {
        let armed = sh.armed.load(Ordering::Acquire);
        let held = if armed { early.pop() } else { None };
        let addr = match held {
            Some(a) => a,
            None => match sh.uffd.next_fault(20) {
                Ok(Some(a)) if !armed => {
                    early.push(a);
                    continue;
                }
                Ok(Some(a)) => a,
                Ok(None) => continue,
                Err(_) => return,
            },
        };
        let Some(page) = sh.page_of(addr) else {
            continue;
        };
        let page_addr = addr & !(PAGE as u64 - 1);
        if !sh.needed.contains(page) {
            // Never populated on the source: a zero page, served locally.
            let _ = sh.uffd.zeropage(page_addr, PAGE as u64);
            continue;
        }
        if sh.present.contains(page) {
            let _ = sh.uffd.wake(page_addr, PAGE as u64);
            continue;
        }
        if !sh.requested.insert(page) {
            continue; // already asked: its reply wakes every waiter
        }
        sh.request_times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(page, Instant::now());
        if write_frame(&mut conn, Kind::PageRequest, &page.to_le_bytes()).is_err() {
            sh.source_lost.store(true, Ordering::Release);
            return;
        }
    }
}

/// Installs the source's answers and records how long each fault waited.
fn reply_loop(sh: &DestShared, conn: SecureStream, ram_pages: u64) {
    prefer_latency();
    let mut r = &conn;
    let mut payload = Vec::new();
    while !sh.stop.load(Ordering::Acquire) {
        match crate::protocol::read_frame_into(&mut r, &mut payload) {
            Ok(Kind::Pages) => {}
            _ => {
                if !sh.complete() && !sh.stop.load(Ordering::Acquire) {
                    sh.source_lost.store(true, Ordering::Release);
                }
                return;
            }
        }
        sh.pulled_bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        let res = decode_batch::<ProtocolError>(&payload, ram_pages, |p, d| {
            let _ = sh.install(p, d);
            sh.pulled_pages.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = sh
                .request_times
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p)
            {
                sh.latencies_us
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(())
        });
        if res.is_err() {
            sh.source_lost.store(true, Ordering::Release);
            return;
        }
    }
}
