//! Port-I/O devices and the bus that routes a vCPU's `in`/`out` to them.
//!
//! | ports | device |
//! |---|---|
//! | 0x3f8–0x3ff | 16550 serial console (vm-superio), IRQ 4 through an irqfd |
//! | 0x60, 0x64 | i8042: writing 0xFE to 0x64 resets (stops) the machine |
//! | 0x700–0x7ff | the probe device (guest parameters, heartbeats, events) |
//!
//! A read from any other port returns all ones and a write is dropped, as on
//! a PC with nothing decoding that address.

pub mod probe;
pub mod serial;

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

pub use probe::{Probe, ProbeState};
pub use serial::{SerialConsole, SerialSnapshot, Snapshot};

const SERIAL_BASE: u16 = 0x3f8;
const SERIAL_LEN: u16 = 8;
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;

/// `vm_superio::Trigger` for an eventfd (the orphan rule keeps us from
/// implementing it on `EventFd` directly).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Saved state of every device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    pub probe: ProbeState,
}

/// Every device of the machine, each behind its own lock so vCPUs touching
/// different devices never wait for each other.
#[derive(Debug)]
pub struct Devices {
    pub serial: Mutex<SerialConsole>,
    pub i8042: Mutex<vm_superio::I8042Device<EventFdTrigger>>,
    pub probe: Probe,
}

impl Devices {
    /// Wires the devices: the serial interrupt eventfd and the reset eventfd.
    pub fn new(serial: SerialConsole, reset: EventFdTrigger, probe: Probe) -> Self {
        Self {
            serial: Mutex::new(serial),
            i8042: Mutex::new(vm_superio::I8042Device::new(reset)),
            probe,
        }
    }

    /// Handles an `in` from vCPU `vcpu`.
    pub fn pio_read(&self, vcpu: usize, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_BASE..SERIAL_BASE + SERIAL_LEN).contains(&p) => {
                let v = lock(&self.serial).read((p - SERIAL_BASE) as u8);
                data.fill(0);
                data[0] = v;
            }
            I8042_DATA | I8042_COMMAND => {
                let v = lock(&self.i8042).read((port - I8042_DATA) as u8);
                data.fill(0);
                data[0] = v;
            }
            p if probe::claims(p) => self.probe.read(vcpu, p, data),
            _ => data.fill(0xff),
        }
    }

    /// Handles an `out` from vCPU `vcpu`.
    pub fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) {
        match port {
            p if (SERIAL_BASE..SERIAL_BASE + SERIAL_LEN).contains(&p) => {
                if let Err(e) = lock(&self.serial).write((p - SERIAL_BASE) as u8, data[0]) {
                    tracing::warn!("serial write failed: {e:?}");
                }
            }
            I8042_DATA | I8042_COMMAND => {
                if let Err(e) = lock(&self.i8042).write((port - I8042_DATA) as u8, data[0]) {
                    tracing::warn!("i8042 reset trigger failed: {e}");
                }
            }
            p if probe::claims(p) => self.probe.write(vcpu, p, data),
            _ => {}
        }
    }

    /// Saves every device's state (the i8042 has none worth keeping).
    pub fn save_state(&self) -> DevicesState {
        DevicesState {
            serial: lock(&self.serial).snapshot(),
            probe: self.probe.save_state(),
        }
    }
}

/// Locks a device; a poisoned lock (a panic elsewhere) is not a reason to
/// stop emulating it.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
