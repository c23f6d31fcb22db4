//! Saving a paused machine to a file and loading it back.
//!
//! # File format (little-endian)
//! ```text
//! "TVMSNAP1"                      8 bytes magic
//! format version                  u32
//! state length                    u32   (≤ 16 MiB)
//! state                           JSON of MachineState
//! crc32(state)                    u32
//! RAM size                        u64
//! chunks, each:
//!   ram offset                    u64   (page aligned; u64::MAX ends the list)
//!   length                        u32   (page multiple, ≤ 1 MiB)
//!   crc32(data)                   u32
//!   data                          length bytes
//! ```
//! Only populated pages are stored (memfd holes are skipped with
//! `SEEK_DATA`), and all-zero pages are dropped, so an idle guest with a
//! large RAM makes a small file. Nothing read is trusted before it is checked:
//! lengths are bounded, offsets must fall inside RAM, CRCs must match.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use guest_images::abi::PAGE_SIZE;

use crate::machine::{Machine, MachineError, MachineState};
use crate::vstate::memory::{GuestRam, MemoryError};

const MAGIC: &[u8; 8] = b"TVMSNAP1";
const VERSION: u32 = 1;
const MAX_STATE: u32 = 16 << 20;
const MAX_CHUNK: u64 = 1 << 20;
const END: u64 = u64::MAX;

/// Errors of saving or loading a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("I/O on the snapshot file failed")]
    Io(#[from] std::io::Error),
    #[error("Not a snapshot file (bad magic)")]
    BadMagic,
    #[error("Snapshot format version {0} is not supported (this VMM reads {VERSION})")]
    Version(u32),
    #[error("Snapshot file is truncated")]
    Truncated,
    #[error("Snapshot {what} is corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("Snapshot state cannot be encoded or decoded")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

fn corrupt(what: &'static str, detail: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt {
        what,
        detail: detail.into(),
    }
}

/// Sizes of what was written.
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveSummary {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    pub zero_pages_skipped: u64,
}

/// Creates (or truncates) `path` readable and writable by its owner only:
/// a snapshot holds all of the guest's memory. The mode is given at
/// creation (never a moment world-readable), and set again for a file that
/// existed with a wider one.
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Saves a paused machine (state and RAM) to `path`.
pub fn save(machine: &Machine, path: &Path) -> Result<SaveSummary, SnapshotError> {
    let state = machine.save_state()?;
    let json = serde_json::to_vec(&state)?;
    let mut out = BufWriter::with_capacity(1 << 20, create_private(path)?);
    out.write_all(MAGIC)?;
    out.write_all(&VERSION.to_le_bytes())?;
    out.write_all(&(json.len() as u32).to_le_bytes())?;
    out.write_all(&json)?;
    out.write_all(&crc32fast::hash(&json).to_le_bytes())?;
    let ram = machine.vm().ram();
    out.write_all(&ram.size().to_le_bytes())?;
    let mut summary = SaveSummary {
        state_bytes: json.len() as u64,
        ..Default::default()
    };
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    for (start, len) in ram.populated_ranges()? {
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(MAX_CHUNK);
            let data = &mut buf[..n as usize];
            ram.memfd().read_exact_at(data, off)?;
            write_nonzero_pages(&mut out, off, data, &mut summary)?;
            off += n;
        }
    }
    out.write_all(&END.to_le_bytes())?;
    out.write_all(&0u32.to_le_bytes())?;
    out.write_all(&0u32.to_le_bytes())?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(summary)
}

/// Writes the runs of non-zero pages of `data` (which starts at `off`).
fn write_nonzero_pages(
    out: &mut impl Write,
    off: u64,
    data: &[u8],
    summary: &mut SaveSummary,
) -> std::io::Result<()> {
    let page = PAGE_SIZE as usize;
    let mut run_start: Option<usize> = None;
    let pages = data.len() / page;
    for p in 0..=pages {
        let nonzero = p < pages && data[p * page..(p + 1) * page].iter().any(|b| *b != 0);
        match (nonzero, run_start) {
            (true, None) => run_start = Some(p),
            (false, Some(s)) => {
                let bytes = &data[s * page..p * page];
                out.write_all(&(off + (s * page) as u64).to_le_bytes())?;
                out.write_all(&(bytes.len() as u32).to_le_bytes())?;
                out.write_all(&crc32fast::hash(bytes).to_le_bytes())?;
                out.write_all(bytes)?;
                summary.memory_bytes += bytes.len() as u64;
                run_start = None;
            }
            _ => {}
        }
        if !nonzero && p < pages {
            summary.zero_pages_skipped += 1;
        }
    }
    Ok(())
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotError::Truncated,
        _ => SnapshotError::Io(e),
    })
}

fn read_u32(r: &mut impl Read) -> Result<u32, SnapshotError> {
    let mut b = [0u8; 4];
    read_exact(r, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64, SnapshotError> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a snapshot file into fresh guest RAM; returns the state to restore.
pub fn load(path: &Path) -> Result<(MachineState, GuestRam), SnapshotError> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut magic = [0u8; 8];
    read_exact(&mut r, &mut magic)?;
    if &magic != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = read_u32(&mut r)?;
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    let len = read_u32(&mut r)?;
    if len > MAX_STATE {
        return Err(corrupt(
            "state",
            format!("length {len} exceeds {MAX_STATE}"),
        ));
    }
    let mut json = vec![0u8; len as usize];
    read_exact(&mut r, &mut json)?;
    if read_u32(&mut r)? != crc32fast::hash(&json) {
        return Err(corrupt("state", "CRC mismatch"));
    }
    let state: MachineState = serde_json::from_slice(&json)?;
    let ram_size = read_u64(&mut r)?;
    if ram_size != state.config.mem_bytes {
        return Err(corrupt(
            "memory",
            format!(
                "RAM size {ram_size} differs from the configured {}",
                state.config.mem_bytes
            ),
        ));
    }
    let ram = GuestRam::new(ram_size)?;
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    loop {
        let off = read_u64(&mut r)?;
        let len = u64::from(read_u32(&mut r)?);
        let crc = read_u32(&mut r)?;
        if off == END {
            break;
        }
        if off % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 || len > MAX_CHUNK {
            return Err(corrupt("memory", format!("bad chunk {off:#x}+{len:#x}")));
        }
        if off.checked_add(len).is_none_or(|end| end > ram_size) {
            return Err(corrupt(
                "memory",
                format!("chunk {off:#x}+{len:#x} outside RAM"),
            ));
        }
        let data = &mut buf[..len as usize];
        read_exact(&mut r, data)?;
        if crc32fast::hash(data) != crc {
            return Err(corrupt(
                "memory",
                format!("CRC mismatch in chunk at {off:#x}"),
            ));
        }
        ram.memfd().write_all_at(data, off)?;
    }
    Ok((state, ram))
}
