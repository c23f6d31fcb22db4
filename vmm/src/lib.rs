//! A minimal KVM virtual machine monitor built on the rust-vmm crates, made to
//! run the tiny test guests of `guest-images` and to be migrated.
//!
//! Where things are:
//! - [`vstate`]: guest memory (memfd), the KVM VM (slots, dirty log, irqchip,
//!   PIT, clock), vCPUs (boot set-up, complete state) and their threads
//!   (pause/resume);
//! - [`arch`]: CPUID, MSRs, the PVH entry state;
//! - [`devices`]: serial console, i8042, the probe device;
//! - [`machine`]: the whole machine and its operations;
//! - [`snapshot`]: the save/restore file;
//! - [`api`]: the JSON control socket, and [`control_socket`] its file and
//!   request lines;
//! - [`config`]: machine and workload descriptions.

pub mod api;
pub mod arch;
pub mod config;
pub mod control_socket;
pub mod devices;
pub mod machine;
pub mod migrate;
pub mod snapshot;
pub mod vstate;

pub use config::{MachineConfig, Workload};
pub use machine::{Machine, MachineError, MachineState, RunOptions};
