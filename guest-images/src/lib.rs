//! The tiny test guests, built from source (`guest/`) by `build.rs` with the
//! system C compiler and assembler, and embedded here as ELF images.
//!
//! See `guest/README.md` for how a guest is put together and what it does,
//! and [`abi`] for the contract it shares with the VMM.

pub mod abi;

/// A guest image embedded in this crate.
#[derive(Debug, Clone, Copy)]
pub struct GuestImage {
    /// Name used on the command line (`--guest NAME`).
    pub name: &'static str,
    /// What the guest does.
    pub description: &'static str,
    /// The ELF file.
    pub elf: &'static [u8],
}

/// Every embedded guest.
pub const GUESTS: &[GuestImage] = &[GuestImage {
    name: "workload",
    description: "long mode, LAPIC timer, ring-3 workload generators (WSET, RATE/BPC, FILL, reads, CPU load), FPU/SSE checks, heartbeats",
    elf: include_bytes!(concat!(env!("OUT_DIR"), "/workload.elf")),
}];

/// Looks an embedded guest up by name.
pub fn find(name: &str) -> Option<&'static GuestImage> {
    GUESTS.iter().find(|g| g.name == name)
}
