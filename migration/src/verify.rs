//! `--verify`: a CRC32 of every RAM page, computed on the source's final
//! memory (vCPUs paused) and on the destination's memory before it resumes.
//!
//! `Checksums` payload: first page (u64) | count (u32) | count × crc32 (u32).

use crate::codec::PAGE;
use crate::endpoint::BoxError;
use crate::protocol::{malformed, Cursor, ProtocolError};

/// Pages per `Checksums` frame (4 MiB of CRCs).
pub const CHUNK: usize = 1 << 20;

/// CRC32 of every page of RAM. Only populated ranges are read; every other
/// page is known to be zero.
pub fn page_crcs(
    ram_size: u64,
    populated: &[(u64, u64)],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), BoxError>,
) -> Result<Vec<u32>, BoxError> {
    let pages = (ram_size / PAGE as u64) as usize;
    let zero_crc = crc32fast::hash(&[0u8; PAGE]);
    let mut crcs = vec![zero_crc; pages];
    let mut buf = vec![0u8; 256 * PAGE];
    for &(off, len) in populated {
        let first = off / PAGE as u64;
        let n = len.div_ceil(PAGE as u64);
        let mut p = first;
        while p < first + n {
            let k = (first + n - p).min(256);
            let b = &mut buf[..k as usize * PAGE];
            read(p * PAGE as u64, b)?;
            for i in 0..k as usize {
                crcs[p as usize + i] = crc32fast::hash(&b[i * PAGE..(i + 1) * PAGE]);
            }
            p += k;
        }
    }
    Ok(crcs)
}

/// Encodes one chunk.
pub fn encode(first: u64, crcs: &[u32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + 4 * crcs.len());
    v.extend_from_slice(&first.to_le_bytes());
    v.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
    for c in crcs {
        v.extend_from_slice(&c.to_le_bytes());
    }
    v
}

/// Decodes one chunk into `into` (indexed by page), checking bounds.
pub fn decode_into(p: &[u8], into: &mut [Option<u32>]) -> Result<(), ProtocolError> {
    let mut c = Cursor::new(p, "Checksums");
    let first = c.u64()?;
    let n = c.u32()? as u64;
    if first
        .checked_add(n)
        .is_none_or(|end| end > into.len() as u64)
    {
        return Err(malformed(
            "Checksums",
            format!("pages {first}+{n} beyond RAM"),
        ));
    }
    for i in 0..n {
        into[(first + i) as usize] = Some(c.u32()?);
    }
    c.finish()
}
