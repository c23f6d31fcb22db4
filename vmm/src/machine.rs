//! A whole machine: RAM, the KVM VM, vCPU threads and devices, and the
//! operations a user (or a migration) performs on it: boot, pause, resume,
//! save the complete state, restore it, and ask the guest to verify itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_images::abi::{self, mbox, pattern, percpu, PAGE_SIZE, STATUS_GPA};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::{boot, cpuid};
use crate::config::{ConfigError, MachineConfig};
use crate::devices::probe::now_ns;
use crate::devices::serial::{self, ConsoleSink};
use crate::devices::{lock, Devices, DevicesState, EventFdTrigger, Probe};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{msr_save_list, KvmView, Vcpu, VcpuError, VcpuState};
use crate::vstate::vcpu_thread::{install_kick_handler, StopReason, VcpuSet};
use crate::vstate::vm::{open_kvm, Vm, VmError, VmState};

/// Serial IRQ line (COM1).
const SERIAL_IRQ: u32 = 4;

/// Errors of machine operations.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("Unknown guest '{0}': not an embedded guest and not a readable file")]
    UnknownGuest(String),
    #[error("Cannot read guest image {path}")]
    ReadGuest {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} failed")]
    Io(&'static str, #[source] std::io::Error),
    #[error("The state does not match the prepared machine ({saved} vCPUs configured, state holds {found})")]
    StateMismatch { saved: usize, found: usize },
    #[error("Serial state cannot be restored: {0}")]
    Serial(String),
    #[error("The machine must be paused for this")]
    NotPaused,
    #[error("The guest did not answer the verify request within {0:?}")]
    VerifyTimeout(Duration),
}

/// The complete state of a machine except its RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub config: MachineConfig,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// Counters of one guest vCPU, read from its status block in guest memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStatus {
    pub heartbeats: u64,
    pub ticks: u64,
    pub pages_written: u64,
    pub pages_read: u64,
    pub loops: u64,
    pub fpu_checks: u64,
    pub fpu_errors: u64,
    pub verify_seq: u64,
    pub verify_ok: u64,
    pub verify_bad: u64,
    pub phase: u64,
    pub exc_vector: u64,
    pub exc_rip: u64,
    pub read_errors: u64,
    pub slice_pages: u64,
    /// Times the vCPU halted because nothing was due (`idle=halt`).
    pub halts: u64,
}

/// The answer of the guest to a verify request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub pages_ok: u64,
    pub pages_bad: u64,
    pub fpu_errors: u64,
    pub ok: bool,
}

/// What a check of the working set from outside the guest found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageScan {
    pub good: u64,
    pub corrupt: u64,
    pub not_pattern: u64,
    /// Pages whose generation differs from the guest's generation table.
    pub stale: u64,
}

/// Options that are not part of the machine itself.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Echo the guest console to stderr.
    pub echo_console: bool,
}

/// A machine whose KVM objects exist but hold no state yet: what a
/// migration destination builds *before* the switch-over, so that creating
/// the VM, its irqchip and its vCPUs is not part of the downtime.
pub struct PreparedMachine {
    config: MachineConfig,
    parts: Parts,
    wiring: DeviceWiring,
}

impl std::fmt::Debug for PreparedMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedMachine")
            .field("config", &self.config)
            .finish()
    }
}

impl PreparedMachine {
    /// Creates the VM and vCPUs for `config` on `ram`.
    pub fn new(config: &MachineConfig, ram: GuestRam) -> Result<Self, MachineError> {
        config.validate()?;
        let (parts, wiring) = build_parts(ram, config.vcpus)?;
        Ok(Self {
            config: config.clone(),
            parts,
            wiring,
        })
    }

    /// Guest RAM (for filling it before the restore).
    pub fn ram(&self) -> &GuestRam {
        self.parts.vm.ram()
    }

    /// Loads `state` into KVM and the devices; the vCPUs stay paused.
    ///
    /// Order: the VM-level state (PIT, clock, PIC/IOAPIC) first, then each
    /// vCPU (see `vstate::vcpu` for the order inside a vCPU), then devices.
    pub fn restore(self, state: &MachineState, opts: &RunOptions) -> Result<Machine, MachineError> {
        if state.config != self.config || state.vcpus.len() != usize::from(self.config.vcpus) {
            return Err(MachineError::StateMismatch {
                saved: self.config.vcpus.into(),
                found: state.vcpus.len(),
            });
        }
        let Self {
            parts: p, wiring, ..
        } = self;
        p.vm.restore_state(&state.vm)?;
        let mut timers_fire_at = Vec::with_capacity(state.vcpus.len());
        for (v, s) in p.vcpus.iter().zip(&state.vcpus) {
            let skipped = v.restore_state(s)?;
            // KVM_SET_LAPIC has just restarted the timer: it counts from
            // now, paused vCPU or not (see `VcpuState::timer_wake_in_ns`).
            timers_fire_at.push(s.timer_wake_in_ns().map(|ns| now_ns() + ns));
            if !skipped.is_empty() {
                tracing::info!(
                    "vCPU {}: KVM refused MSRs {:x?} on restore",
                    v.index(),
                    skipped
                );
            }
        }
        let console = ConsoleSink::new(opts.echo_console);
        let serial = serial::restore(&state.devices.serial, wiring.serial_irq, console.clone())
            .map_err(|e| MachineError::Serial(format!("{e:?}")))?;
        let probe = Probe::from_state(state.devices.probe.clone());
        let devices = Arc::new(Devices::new(serial, wiring.reset, probe));
        let m = Machine::start(state.config.clone(), p, devices, console, true)?;
        *lock(&m.timers_after_restore) = Some(timers_fire_at);
        Ok(m)
    }
}

/// A running (or paused) machine.
#[derive(Debug)]
pub struct Machine {
    config: MachineConfig,
    vm: Arc<Vm>,
    devices: Arc<Devices>,
    vcpus: VcpuSet,
    msr_list: Vec<u32>,
    stop_evt: Arc<EventFd>,
    console: ConsoleSink,
    created: Instant,
    stopped: std::sync::Mutex<Option<StopReason>>,
    /// After a restore, until the first resume: when each halted vCPU's
    /// restored timer fires (ns since the epoch).
    timers_after_restore: std::sync::Mutex<Option<Vec<Option<u64>>>>,
}

/// The guest ELF for a `--guest` value.
pub fn guest_elf(guest: &str) -> Result<Vec<u8>, MachineError> {
    if let Some(g) = guest_images::find(guest) {
        return Ok(g.elf.to_vec());
    }
    if !std::path::Path::new(guest).exists() {
        return Err(MachineError::UnknownGuest(guest.into()));
    }
    std::fs::read(guest).map_err(|source| MachineError::ReadGuest {
        path: guest.into(),
        source,
    })
}

/// KVM objects common to boot and restore.
struct Parts {
    kvm: Kvm,
    vm: Arc<Vm>,
    vcpus: Vec<Vcpu>,
    stop_evt: Arc<EventFd>,
    msr_list: Vec<u32>,
}

/// The eventfds the devices signal: the serial IRQ and the i8042 reset.
struct DeviceWiring {
    serial_irq: EventFdTrigger,
    reset: EventFdTrigger,
}

/// Creates KVM objects common to boot and restore.
fn build_parts(ram: GuestRam, vcpus: u8) -> Result<(Parts, DeviceWiring), MachineError> {
    install_kick_handler()
        .map_err(|e| MachineError::Io("installing the vCPU kick handler", e.into()))?;
    let kvm = open_kvm()?;
    let vm = Arc::new(Vm::new(&kvm, ram)?);
    let vcpus = (0..vcpus)
        .map(|i| Vcpu::new(vm.fd(), i))
        .collect::<Result<Vec<_>, _>>()?;
    let io = |what| move |e| MachineError::Io(what, e);
    let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
    vm.fd()
        .register_irqfd(&serial_evt, SERIAL_IRQ)
        .map_err(|e| MachineError::Io("registering the serial irqfd", e.into()))?;
    let stop_evt = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?);
    let reset = EventFdTrigger(stop_evt.try_clone().map_err(io("eventfd dup"))?);
    let msr_list = msr_save_list(&kvm)?;
    let parts = Parts {
        kvm,
        vm,
        vcpus,
        stop_evt,
        msr_list,
    };
    let wiring = DeviceWiring {
        serial_irq: EventFdTrigger(serial_evt),
        reset,
    };
    Ok((parts, wiring))
}

impl Machine {
    /// Creates and boots a machine: the guest starts running at once.
    pub fn boot(config: MachineConfig, opts: &RunOptions) -> Result<Self, MachineError> {
        crate::vstate::memory::validate_ram_size(config.mem_bytes)?;
        config.validate()?;
        let elf = guest_elf(&config.guest)?;
        let ram = GuestRam::new(config.mem_bytes)?;
        let entry = boot::load_guest(&ram, &elf)?;
        let (p, wiring) = build_parts(ram, config.vcpus)?;
        let base_cpuid = cpuid::supported(&p.kvm).map_err(|source| VcpuError::Get {
            index: 0,
            what: "supported cpuid",
            source,
        })?;
        for v in &p.vcpus {
            v.configure_boot(&base_cpuid, config.vcpus, entry)?;
        }
        let tsc_khz = p.vcpus[0]
            .fd()
            .get_tsc_khz()
            .map_err(|source| VcpuError::Get {
                index: 0,
                what: "tsc_khz",
                source,
            })?;
        let probe = Probe::new(config.probe_params(tsc_khz), config.vcpus.into());
        let console = ConsoleSink::new(opts.echo_console);
        let serial = vm_superio::Serial::new(wiring.serial_irq, console.clone());
        let devices = Arc::new(Devices::new(serial, wiring.reset, probe));
        Self::start(config, p, devices, console, false)
    }

    fn start(
        config: MachineConfig,
        p: Parts,
        devices: Arc<Devices>,
        console: ConsoleSink,
        paused: bool,
    ) -> Result<Self, MachineError> {
        let stop = p.stop_evt.clone();
        let vcpus = VcpuSet::start(p.vcpus, devices.clone(), paused, move || {
            let _ = stop.write(1);
        })
        .map_err(|e| MachineError::Io("starting vCPU threads", e))?;
        Ok(Self {
            config,
            vm: p.vm,
            devices,
            vcpus,
            msr_list: p.msr_list,
            stop_evt: p.stop_evt,
            console,
            created: Instant::now(),
            stopped: std::sync::Mutex::new(None),
            timers_after_restore: std::sync::Mutex::new(None),
        })
    }

    /// Rebuilds a machine from `state` on RAM that already holds the guest's
    /// memory. The vCPUs stay paused until [`Machine::resume`].
    pub fn restore(
        state: &MachineState,
        ram: GuestRam,
        opts: &RunOptions,
    ) -> Result<Self, MachineError> {
        PreparedMachine::new(&state.config, ram)?.restore(state, opts)
    }

    /// The machine's configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// The VM (RAM, dirty logging).
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The devices (probe heartbeats and events).
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// The guest console's last lines.
    pub fn console(&self) -> &ConsoleSink {
        &self.console
    }

    /// Signalled when the machine stops on its own (reset, triple fault,
    /// KVM failure); see [`Machine::stop_reason`].
    pub fn stop_event(&self) -> &EventFd {
        &self.stop_evt
    }

    /// Why the machine stopped, if it did. An i8042 reset shows up only on
    /// the stop event, as [`StopReason::Reset`].
    pub fn stop_reason(&self) -> Option<StopReason> {
        let mut stopped = crate::devices::lock(&self.stopped);
        if stopped.is_none() {
            // vCPU threads record their reason before signalling the stop
            // eventfd; the i8042 only signals it. So: a signal with no
            // recorded reason (checked again after the read) is a reset.
            *stopped = self.vcpus.stop_reason().or_else(|| {
                self.stop_evt
                    .read()
                    .ok()
                    .map(|_| self.vcpus.stop_reason().unwrap_or(StopReason::Reset))
            });
        }
        stopped.clone()
    }

    /// Time since the machine object was created.
    pub fn uptime(&self) -> Duration {
        self.created.elapsed()
    }

    /// Pauses every vCPU (see `vstate::vcpu_thread`).
    pub fn pause(&self) {
        self.vcpus.pause();
    }

    /// Pauses, giving up after `timeout`; returns whether every vCPU stopped.
    pub fn pause_timeout(&self, timeout: Duration) -> bool {
        self.vcpus.pause_timeout(timeout)
    }

    /// Resumes every vCPU. The first resume after a restore also tells the
    /// probe when each halted vCPU should wake: when its timer fires, or as
    /// soon as its thread runs it if the timer fired before.
    pub fn resume(&self) {
        if let Some(fire_at) = lock(&self.timers_after_restore).take() {
            self.devices.probe.expect_wakes(&fire_at);
        }
        self.vcpus.resume();
    }

    /// Keeps the vCPUs out of the guest `pct` % of the time (auto-converge;
    /// 0 ends it).
    pub fn set_throttle(&self, pct: u8) {
        self.vcpus.set_throttle(pct);
    }

    /// The vCPU throttle, in percent.
    pub fn throttle(&self) -> u8 {
        self.vcpus.throttle()
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    /// Reads the complete machine state except RAM. Requires a paused
    /// machine; vCPUs are read in index order, the VM after them.
    pub fn save_state(&self) -> Result<MachineState, MachineError> {
        if !self.is_paused() {
            return Err(MachineError::NotPaused);
        }
        let vcpus = self.vcpus.with_each(|v| {
            let (state, skipped) = v.save_state(&self.msr_list)?;
            if !skipped.is_empty() {
                tracing::debug!(
                    "vCPU {}: KVM refused to read MSRs {:x?}",
                    v.index(),
                    skipped
                );
            }
            Ok::<_, VcpuError>(state)
        })?;
        Ok(MachineState {
            config: self.config.clone(),
            vm: self.vm.save_state()?,
            vcpus,
            devices: self.devices.save_state(),
        })
    }

    /// What KVM holds for each vCPU (MP state, LAPIC timer), only while
    /// paused: a running vCPU thread holds its vCPU for the whole KVM_RUN.
    pub fn kvm_views(&self) -> Option<Vec<KvmView>> {
        if !self.is_paused() {
            return None;
        }
        self.vcpus.with_each(|v| v.kvm_view()).ok()
    }

    /// RAM offsets of the pages the paused vCPUs will touch first when they
    /// run again (see `arch::first_touch`), for post-copy to send with the
    /// state.
    pub fn first_touched_ram(&self) -> Result<Vec<u64>, MachineError> {
        if !self.is_paused() {
            return Err(MachineError::NotPaused);
        }
        let ram = self.vm.ram();
        let read = |gpa: u64| ram.read_u64(gpa).ok();
        let views = self.vcpus.with_each(|v| v.first_touch_view())?;
        let mut offsets: Vec<u64> = views
            .iter()
            .flat_map(|v| crate::arch::first_touch::pages(v, &read))
            .filter_map(|gpa| ram.ram_offset_of(gpa))
            .collect();
        offsets.sort_unstable();
        offsets.dedup();
        Ok(offsets)
    }

    /// The guest's per-vCPU counters, from its status page.
    pub fn guest_status(&self) -> Result<Vec<VcpuStatus>, MachineError> {
        let ram = self.vm.ram();
        (0..u64::from(self.config.vcpus))
            .map(|cpu| {
                let f = |field| ram.read_u64(STATUS_GPA + abi::percpu_field(cpu, field));
                Ok(VcpuStatus {
                    heartbeats: f(percpu::HEARTBEATS)?,
                    ticks: f(percpu::TICKS)?,
                    pages_written: f(percpu::PAGES_WRITTEN)?,
                    pages_read: f(percpu::PAGES_READ)?,
                    loops: f(percpu::LOOPS)?,
                    fpu_checks: f(percpu::FPU_CHECKS)?,
                    fpu_errors: f(percpu::FPU_ERRORS)?,
                    verify_seq: f(percpu::VERIFY_SEQ)?,
                    verify_ok: f(percpu::VERIFY_OK)?,
                    verify_bad: f(percpu::VERIFY_BAD)?,
                    phase: f(percpu::PHASE)?,
                    exc_vector: f(percpu::EXC_VECTOR)?,
                    exc_rip: f(percpu::EXC_RIP)?,
                    read_errors: f(percpu::READ_ERRORS)?,
                    slice_pages: f(percpu::SLICE_PAGES)?,
                    halts: f(percpu::HALTS)?,
                })
            })
            .collect()
    }

    /// Asks every guest vCPU to verify its whole working-set slice and its
    /// FPU/SSE registers, and waits for all answers.
    pub fn request_verify(&self, timeout: Duration) -> Result<VerifyReport, MachineError> {
        let ram = self.vm.ram();
        let seq = ram.read_u64(STATUS_GPA + mbox::COMMAND_SEQ)? + 1;
        // Command before sequence number: the guest acts when the sequence
        // number changes and must then see the new command.
        ram.write_gpa(STATUS_GPA + mbox::COMMAND, &mbox::CMD_VERIFY.to_le_bytes())?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ram.write_gpa(STATUS_GPA + mbox::COMMAND_SEQ, &seq.to_le_bytes())?;
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.guest_status()?;
            if status.iter().all(|s| s.verify_seq >= seq) {
                let pages_ok = status.iter().map(|s| s.verify_ok).sum();
                let pages_bad = status.iter().map(|s| s.verify_bad).sum();
                let fpu_errors = status.iter().map(|s| s.fpu_errors).sum();
                return Ok(VerifyReport {
                    pages_ok,
                    pages_bad,
                    fpu_errors,
                    ok: pages_bad == 0 && fpu_errors == 0,
                });
            }
            if Instant::now() >= deadline {
                return Err(MachineError::VerifyTimeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Checks every working-set page from outside the guest against the page
    /// pattern and the guest's generation table. Meaningful only while
    /// paused; even then a vCPU stopped in the middle of rewriting a page
    /// leaves that one page with its magic cleared (`not_pattern`) or one
    /// generation ahead of the table (`stale`): at most one per vCPU.
    pub fn scan_working_set(&self) -> Result<PageScan, MachineError> {
        let ram = self.vm.ram();
        let pages = self.config.workload.wset_mib * 256;
        let fill = self.config.workload.fill_pct;
        let mut scan = PageScan::default();
        let mut buf = [0u8; 4096];
        for j in 0..pages {
            let gpa = abi::wset_page_gpa(j);
            let off = ram.ram_offset_of(gpa).ok_or(MemoryError::OutOfRange(gpa))?;
            ram.read_ram(off, &mut buf)?;
            let words = page_words(&buf);
            match pattern::check(gpa / PAGE_SIZE, &words, Some(fill)) {
                pattern::PageCheck::NotPattern => scan.not_pattern += 1,
                pattern::PageCheck::Corrupt => scan.corrupt += 1,
                pattern::PageCheck::Good { generation } => {
                    let mut g = [0u8; 4];
                    ram.memory()
                        .read_slice(&mut g, vm_memory::GuestAddress(abi::GEN_TABLE_GPA + 4 * j))
                        .map_err(|source| MemoryError::Access { gpa, source })?;
                    if u64::from(u32::from_le_bytes(g)) == generation & 0xffff_ffff {
                        scan.good += 1;
                    } else {
                        scan.stale += 1;
                    }
                }
            }
        }
        Ok(scan)
    }

    /// Stops the vCPU threads.
    pub fn shutdown(self) {
        self.vcpus.shutdown();
    }
}

/// A page as 512 little-endian words.
pub fn page_words(buf: &[u8; 4096]) -> [u64; 512] {
    let mut w = [0u64; 512];
    for (i, c) in buf.chunks_exact(8).enumerate() {
        w[i] = u64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
    w
}

use vm_memory::Bytes as _;
