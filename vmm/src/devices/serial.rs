//! The 16550 serial console: vm-superio's emulation, an irqfd for IRQ 4,
//! and a line-buffered sink for the guest's output.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::EventFdTrigger;

/// Where the guest's console output goes. Also keeps the last lines so the
/// control socket and tests can read them.
#[derive(Clone, Default)]
pub struct ConsoleSink {
    inner: Arc<Mutex<SinkInner>>,
}

#[derive(Default)]
struct SinkInner {
    echo: bool,
    line: Vec<u8>,
    lines: Vec<String>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleSink")
    }
}

/// How many console lines are kept.
const KEPT_LINES: usize = 256;

impl ConsoleSink {
    /// A sink that also echoes each line to stderr when `echo` is set.
    pub fn new(echo: bool) -> Self {
        let sink = Self::default();
        sink.inner.lock().unwrap_or_else(|e| e.into_inner()).echo = echo;
        sink
    }

    /// The last lines the guest printed.
    pub fn lines(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .clone()
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&s.line).trim_end().to_string();
                s.line.clear();
                if s.echo {
                    eprintln!("[guest] {line}");
                }
                if s.lines.len() == KEPT_LINES {
                    s.lines.remove(0);
                }
                s.lines.push(line);
            } else {
                s.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The serial device.
pub type SerialConsole = Serial<EventFdTrigger, NoEvents, ConsoleSink>;

/// vm-superio's `SerialState` as a serializable struct.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Reads a serial device's registers.
pub trait Snapshot {
    fn snapshot(&self) -> SerialSnapshot;
}

impl Snapshot for SerialConsole {
    fn snapshot(&self) -> SerialSnapshot {
        let s = self.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// Builds a serial device from a snapshot.
pub fn restore(
    snap: &SerialSnapshot,
    irq: EventFdTrigger,
    sink: ConsoleSink,
) -> Result<SerialConsole, vm_superio::serial::Error<std::io::Error>> {
    let state = SerialState {
        baud_divisor_low: snap.baud_divisor_low,
        baud_divisor_high: snap.baud_divisor_high,
        interrupt_enable: snap.interrupt_enable,
        interrupt_identification: snap.interrupt_identification,
        line_control: snap.line_control,
        line_status: snap.line_status,
        modem_control: snap.modem_control,
        modem_status: snap.modem_status,
        scratch: snap.scratch,
        in_buffer: snap.in_buffer.clone(),
    };
    Serial::from_state(&state, irq, NoEvents, sink)
}
