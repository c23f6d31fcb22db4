//! One thread per vCPU, and pausing them all at a well-defined point.
//!
//! # How a pause works
//! A vCPU thread spends its life inside `KVM_RUN`. To get it out:
//! 1. the controller sets the request to `Pause` (under the control lock);
//! 2. it sends the thread a real-time signal (`pthread_kill`);
//! 3. the signal handler sets `kvm_run.immediate_exit = 1`.
//!
//! If the thread was inside `KVM_RUN`, the pending signal makes KVM return
//! `EINTR`. If it was anywhere else (handling an I/O exit, about to re-enter),
//! `immediate_exit` makes its next `KVM_RUN` return `EINTR` at once — so the
//! signal cannot be lost in the window between checking the request and
//! entering the kernel. On `EINTR` the thread clears `immediate_exit`, sees the
//! request and parks on a condition variable.
//!
//! # Why a thread parks only after `EINTR`
//! After an I/O exit the instruction is not finished yet: KVM completes it
//! (writes the `in` result to RAX, advances RIP) only on the *next*
//! `KVM_RUN`. The KVM API says userspace must re-enter once — with
//! `immediate_exit` set, so no further guest instruction runs — before the
//! vCPU state is consistent. So a thread never parks straight after an I/O
//! exit; it re-enters, and parks when that returns `EINTR`.
//!
//! # Throttling (auto-converge)
//! A guest that dirties memory faster than the link carries it never lets
//! pre-copy converge. The remedy of QEMU's auto-converge is to give its
//! vCPUs less time: with throttle `p` %, a ticker kicks every vCPU out of
//! `KVM_RUN` every time slice (10 ms of running), and each kicked vCPU
//! sleeps `10 ms · p / (100 − p)` before it re-enters, so it runs
//! `100 − p` % of the time. The sleep is a wait on the control condition
//! variable, so a pause or exit request ends it at once.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuExit;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vcpu::Vcpu;
use crate::devices::Devices;

/// What the controller wants the vCPU threads to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Exit,
}

/// Why the machine stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked for a reset through the i8042.
    Reset,
    /// A vCPU triple-faulted.
    Shutdown { vcpu: u8 },
    /// KVM could not run a vCPU.
    Failed { vcpu: u8, reason: String },
}

#[derive(Debug)]
struct Control {
    request: Request,
    parked: usize,
    exited: usize,
    stop: Option<StopReason>,
}

#[derive(Debug)]
struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    vcpus: Vec<Mutex<Vcpu>>,
    devices: Arc<Devices>,
    /// Percent of the time each vCPU is kept out of the guest (0–99).
    throttle_pct: AtomicU8,
}

/// How long a vCPU runs between two throttle kicks.
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How long a kicked vCPU sleeps at throttle `pct` %.
fn throttle_sleep_time(pct: u8) -> Duration {
    let pct = u32::from(pct.min(99));
    THROTTLE_SLICE * pct / (100 - pct)
}

/// The thread that kicks the vCPUs while they are throttled.
#[derive(Debug)]
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` points at this thread's own kvm_run mapping, set by the
        // thread before its first KVM_RUN and valid while its VcpuFd lives
        // (the thread holds an Arc to it). A volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno()))
        .map_err(vmm_sys_util::errno::Error::new)
}

/// The running vCPUs.
#[derive(Debug)]
pub struct VcpuSet {
    shared: Arc<Shared>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    ticker: Mutex<Option<Ticker>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VcpuSet {
    /// Starts one thread per vCPU. With `paused`, they park before their
    /// first `KVM_RUN` (used on restore, so nothing runs before `resume`).
    pub fn start(
        vcpus: Vec<Vcpu>,
        devices: Arc<Devices>,
        paused: bool,
        on_stop: impl Fn() + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                request: if paused { Request::Pause } else { Request::Run },
                parked: 0,
                exited: 0,
                stop: None,
            }),
            changed: Condvar::new(),
            vcpus: vcpus.into_iter().map(Mutex::new).collect(),
            devices,
            throttle_pct: AtomicU8::new(0),
        });
        let on_stop = Arc::new(on_stop);
        let mut threads = Vec::new();
        for i in 0..shared.vcpus.len() {
            let shared = shared.clone();
            let on_stop = on_stop.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    if let Some(reason) = vcpu_loop(&shared, i) {
                        request_all(&shared, Request::Exit, Some(reason));
                        on_stop();
                    }
                    let mut c = lock(&shared.control);
                    c.exited += 1;
                    shared.changed.notify_all();
                })?;
            threads.push(t);
        }
        let set = Self {
            shared,
            threads: Arc::new(Mutex::new(threads)),
            ticker: Mutex::new(None),
        };
        if paused {
            set.wait_parked(None);
        }
        Ok(set)
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.shared.vcpus.len()
    }

    /// Whether there are no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.shared.vcpus.is_empty()
    }

    /// Stops every vCPU out of `KVM_RUN` and waits until all are parked (or
    /// gone). Afterwards their state can be read consistently.
    pub fn pause(&self) {
        self.request_pause();
        self.wait_parked(None);
    }

    /// Like [`VcpuSet::pause`], but gives up after `timeout` (a vCPU asleep
    /// in a userfaultfd wait for a page that will never come may not stop);
    /// returns whether all stopped.
    pub fn pause_timeout(&self, timeout: std::time::Duration) -> bool {
        self.request_pause();
        self.wait_parked(Some(std::time::Instant::now() + timeout))
    }

    fn request_pause(&self) {
        request_all(&self.shared, Request::Pause, None);
        self.kick_all();
    }

    /// Waits until every vCPU is parked (or gone), until `deadline` if one
    /// is given; returns whether they all are.
    fn wait_parked(&self, deadline: Option<std::time::Instant>) -> bool {
        let mut c = lock(&self.shared.control);
        while c.parked + c.exited < self.len() {
            let wait = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return false,
                },
            };
            c = match wait {
                None => self
                    .shared
                    .changed
                    .wait(c)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(left) => {
                    self.shared
                        .changed
                        .wait_timeout(c, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        true
    }

    /// Lets every parked vCPU run again.
    pub fn resume(&self) {
        request_all(&self.shared, Request::Run, None);
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        lock(&self.shared.control).request == Request::Pause
    }

    /// Why the machine stopped, if it did.
    pub fn stop_reason(&self) -> Option<StopReason> {
        lock(&self.shared.control).stop.clone()
    }

    /// Runs `f` on each vCPU in index order. Call only while paused: a
    /// running vCPU thread holds its lock for the whole of `KVM_RUN`.
    pub fn with_each<T, E>(&self, mut f: impl FnMut(&Vcpu) -> Result<T, E>) -> Result<Vec<T>, E> {
        self.shared.vcpus.iter().map(|v| f(&lock(v))).collect()
    }

    fn kick_all(&self) {
        kick(&self.threads);
    }

    /// Keeps every vCPU out of the guest `pct` % of the time (0 = not at
    /// all, at most 99); see the module's notes on throttling.
    pub fn set_throttle(&self, pct: u8) {
        let pct = pct.min(99);
        self.shared.throttle_pct.store(pct, Ordering::Relaxed);
        let mut ticker = lock(&self.ticker);
        if pct == 0 {
            if let Some(t) = ticker.take() {
                t.stop.store(true, Ordering::Relaxed);
                t.thread.thread().unpark();
                let _ = t.thread.join();
            }
            // A vCPU asleep in its throttle wait checks the level again.
            self.shared.changed.notify_all();
        } else if ticker.is_none() {
            match self.start_ticker() {
                Ok(t) => *ticker = Some(t),
                Err(e) => {
                    tracing::warn!("cannot throttle the vCPUs: no ticker thread: {e}");
                    self.shared.throttle_pct.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// The throttle level, in percent.
    pub fn throttle(&self) -> u8 {
        self.shared.throttle_pct.load(Ordering::Relaxed)
    }

    fn start_ticker(&self) -> std::io::Result<Ticker> {
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, threads, stop2) = (self.shared.clone(), self.threads.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || loop {
                let pct = shared.throttle_pct.load(Ordering::Relaxed);
                let next = Instant::now() + THROTTLE_SLICE + throttle_sleep_time(pct);
                // Parked, not asleep: `set_throttle(0)` unparks it to stop.
                while let Some(left) = next.checked_duration_since(Instant::now()) {
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::park_timeout(left);
                }
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                kick(&threads);
            })?;
        Ok(Ticker { stop, thread })
    }

    /// Stops and joins every vCPU thread.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.set_throttle(0);
        request_all(&self.shared, Request::Exit, None);
        self.kick_all();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn kick(threads: &Mutex<Vec<JoinHandle<()>>>) {
    for t in lock(threads).iter() {
        // A thread that already exited cannot be kicked; that is fine.
        let _ = t.kill(kick_signal());
    }
}

/// After a kick, while throttled: stays out of the guest for the throttle's
/// sleep time, or until the controller asks for something else than `Run`.
fn throttle_wait(shared: &Shared) {
    let pct = shared.throttle_pct.load(Ordering::Relaxed);
    if pct == 0 {
        return;
    }
    let until = Instant::now() + throttle_sleep_time(pct);
    let mut c = lock(&shared.control);
    while c.request == Request::Run && shared.throttle_pct.load(Ordering::Relaxed) > 0 {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        c = shared
            .changed
            .wait_timeout(c, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn request_all(shared: &Shared, request: Request, stop: Option<StopReason>) {
    let mut c = lock(&shared.control);
    if c.request != Request::Exit {
        c.request = request;
    }
    if stop.is_some() && c.stop.is_none() {
        c.stop = stop;
    }
    shared.changed.notify_all();
}

/// Parks while paused; returns false when the thread must exit.
fn wait_for_run(shared: &Shared) -> bool {
    let mut c = lock(&shared.control);
    let mut parked = false;
    loop {
        match c.request {
            Request::Run => break,
            Request::Exit => {
                if parked {
                    c.parked -= 1;
                }
                return false;
            }
            Request::Pause => {
                if !parked {
                    parked = true;
                    c.parked += 1;
                    shared.changed.notify_all();
                }
                c = shared.changed.wait(c).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
    if parked {
        c.parked -= 1;
    }
    true
}

/// The life of a vCPU thread; returns why the machine must stop, if it must.
fn vcpu_loop(shared: &Shared, index: usize) -> Option<StopReason> {
    {
        let mut vcpu = lock(&shared.vcpus[index]);
        let run: *mut kvm_run = vcpu.fd_mut().get_kvm_run();
        KVM_RUN.with(|c| c.set(run));
    }
    let mut consistent = true; // no half-done I/O instruction
    let mut kicked = false;
    let mut first_run = true;
    loop {
        if consistent {
            if kicked {
                throttle_wait(shared);
                kicked = false;
            }
            if !wait_for_run(shared) {
                return None;
            }
        }
        if std::mem::take(&mut first_run) {
            // A restored vCPU cannot wake before its thread runs it.
            shared.devices.probe.vcpu_runs(index);
        }
        let mut vcpu = lock(&shared.vcpus[index]);
        let idx = vcpu.index();
        match vcpu.fd_mut().run() {
            Ok(exit) => {
                consistent = false;
                if let Some(stop) = handle_exit(&shared.devices, index, idx, exit) {
                    return Some(stop);
                }
            }
            Err(e) if e.errno() == libc::EINTR => {
                vcpu.fd_mut().set_kvm_immediate_exit(0);
                consistent = true;
                kicked = true;
            }
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => {
                return Some(StopReason::Failed {
                    vcpu: idx,
                    reason: format!("KVM_RUN: {e}"),
                })
            }
        }
    }
}

fn handle_exit(devices: &Devices, index: usize, idx: u8, exit: VcpuExit<'_>) -> Option<StopReason> {
    match exit {
        VcpuExit::IoIn(port, data) => devices.pio_read(index, port, data),
        VcpuExit::IoOut(port, data) => devices.pio_write(index, port, data),
        VcpuExit::MmioRead(addr, data) => {
            tracing::warn!("vCPU {idx}: MMIO read at {addr:#x} (nothing there)");
            data.fill(0xff);
        }
        VcpuExit::MmioWrite(addr, _) => {
            tracing::warn!("vCPU {idx}: MMIO write at {addr:#x} (nothing there)");
        }
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => return Some(StopReason::Shutdown { vcpu: idx }),
        VcpuExit::InternalError => {
            return Some(StopReason::Failed {
                vcpu: idx,
                reason: "KVM internal error (emulation failure?)".into(),
            })
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(StopReason::Failed {
                vcpu: idx,
                reason: format!("VM entry failed: reason {reason:#x} on host CPU {cpu}"),
            })
        }
        other => {
            return Some(StopReason::Failed {
                vcpu: idx,
                reason: format!("unexpected exit {other:?}"),
            })
        }
    }
    None
}
