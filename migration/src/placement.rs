//! Receiving a `Pages` frame straight into guest RAM.
//!
//! A batch's table comes before its bodies (see `codec`), so once the table
//! is read and checked the destination knows where every raw body belongs.
//! The bodies are then read with `readv` into the guest pages themselves:
//! no staging buffer, no second copy. Only after that is the frame's CRC
//! computed, over the bytes where they landed; a mismatch fails the
//! migration, and the destination guest, which has not run, never will.
//! Zero pages and lz4 pages are applied once the CRC has passed.
//!
//! The pages of a batch must come in ascending order (as the source sends
//! them), so that each page's slice can be split off guest RAM in one pass,
//! every slice distinct. Any other batch is read whole and handed back to
//! be decoded the usual way.

use std::io::{IoSliceMut, Read};

use crate::bitmap::DirtyBitmap;
use crate::codec::{self, Encoding, Entry, PAGE};
use crate::protocol::{malformed, FrameHeader, ProtocolError};

/// How a frame was taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Placed {
    /// In place: this many pages written (zero pages over untouched memory
    /// are not counted: they are already zero).
    Pages(u64),
    /// Not in order: the whole payload (CRC checked) is in the buffer, to
    /// be decoded.
    Payload,
}

/// Reads the payload of the `Pages` frame `header` announced, placing its
/// raw pages straight into `ram` (`(ram_offset, bytes)` slices in ascending
/// order, covering `ram_pages` pages). `written` has one bit per page
/// received so far (a zero page over untouched memory is received without
/// being written); `payload` is a scratch buffer (and receives the whole
/// payload for [`Placed::Payload`]).
pub fn receive_in_place(
    r: &mut impl Read,
    header: &FrameHeader,
    ram: Vec<(u64, &mut [u8])>,
    ram_pages: u64,
    written: &mut DirtyBitmap,
    payload: &mut Vec<u8>,
) -> Result<Placed, ProtocolError> {
    let len = header.len as usize;
    let mut count = [0u8; 4];
    read_exact(r, &mut count, len)?;
    let table_len = codec::table_len(u32::from_le_bytes(count))
        .filter(|t| *t <= len - 4)
        .ok_or_else(|| malformed("Pages", "the table is longer than the frame"))?;
    let mut table = vec![0u8; table_len];
    read_exact(r, &mut table, len - 4)?;
    let entries = codec::parse_table(&table, ram_pages, len - 4 - table_len)?;
    if !entries.windows(2).all(|w| w[0].page < w[1].page) {
        payload.clear();
        payload.extend_from_slice(&count);
        payload.extend_from_slice(&table);
        payload.resize(len, 0);
        read_exact(r, &mut payload[4 + table_len..], len)?;
        header.check_crc(&[payload])?;
        return Ok(Placed::Payload);
    }
    let mut targets = split_targets(ram, &entries)
        .ok_or_else(|| malformed("Pages", "a page outside the RAM offered for placement"))?;
    // lz4 bodies go to the scratch buffer, raw ones into guest RAM.
    let lz4_lens = entries
        .iter()
        .filter(|e| e.encoding == Encoding::Lz4)
        .map(|e| e.body.len());
    payload.resize(lz4_lens.clone().sum(), 0);
    let mut lz4_bodies = Vec::new();
    let mut lz4_rest = &mut payload[..];
    for n in lz4_lens {
        let (body, rest) = std::mem::take(&mut lz4_rest).split_at_mut(n);
        lz4_bodies.push(body);
        lz4_rest = rest;
    }
    {
        let mut lz4 = lz4_bodies.iter_mut();
        let mut iov: Vec<IoSliceMut<'_>> = Vec::with_capacity(entries.len());
        for (e, target) in entries.iter().zip(targets.iter_mut()) {
            match e.encoding {
                Encoding::Raw => iov.push(IoSliceMut::new(target)),
                Encoding::Lz4 => iov.push(IoSliceMut::new(lz4.next().expect("one per lz4 entry"))),
                Encoding::Zero => {}
            }
        }
        read_vectored_exact(r, &mut iov, len - 4 - table_len)?;
    }
    {
        // The CRC covers the payload in wire order: count, table, bodies.
        let mut parts: Vec<&[u8]> = vec![&count, &table];
        let mut lz4 = lz4_bodies.iter();
        for (e, target) in entries.iter().zip(targets.iter()) {
            match e.encoding {
                Encoding::Raw => parts.push(target),
                Encoding::Lz4 => parts.push(lz4.next().expect("one per lz4 entry")),
                Encoding::Zero => {}
            }
        }
        header.check_crc(&parts)?;
    }
    apply_after_check(&entries, targets, &lz4_bodies, written)
}

/// Splits one distinct, page-sized slice of `ram` off for each entry (in
/// ascending page order); `None` if a page lies outside `ram`. Raw
/// entries' slices receive their bodies; the others are written after the
/// CRC check.
fn split_targets<'a>(
    ram: Vec<(u64, &'a mut [u8])>,
    entries: &[Entry],
) -> Option<Vec<&'a mut [u8]>> {
    let mut regions = ram.into_iter();
    let (mut base, mut rest): (u64, &'a mut [u8]) = (0, &mut []);
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let at = e.page * PAGE as u64;
        while at < base || at + PAGE as u64 > base + rest.len() as u64 {
            (base, rest) = regions.next()?;
        }
        let tail = std::mem::take(&mut rest)
            .split_at_mut((at - base) as usize)
            .1;
        let (page, after) = tail.split_at_mut(PAGE);
        (base, rest) = (at + PAGE as u64, after);
        out.push(page);
    }
    Some(out)
}

/// After the CRC passed: lz4 pages are decompressed into place, zero pages
/// clear what an earlier round wrote; `written` records every page.
fn apply_after_check(
    entries: &[Entry],
    targets: Vec<&mut [u8]>,
    lz4_bodies: &[&mut [u8]],
    written: &mut DirtyBitmap,
) -> Result<Placed, ProtocolError> {
    let mut pages = 0;
    let mut lz4 = lz4_bodies.iter();
    for (e, target) in entries.iter().zip(targets) {
        match e.encoding {
            Encoding::Zero if !written.contains(e.page) => {
                // Already zero: nothing to write, but it arrived (the
                // destination checks every declared page did).
                written.insert(e.page);
                continue;
            }
            Encoding::Zero => target.fill(0),
            Encoding::Raw => {}
            Encoding::Lz4 => {
                let body = lz4.next().expect("one per lz4 entry");
                codec::decompress(e.page, body, target)?;
            }
        }
        written.insert(e.page);
        pages += 1;
    }
    Ok(Placed::Pages(pages))
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], frame_len: usize) -> Result<(), ProtocolError> {
    if buf.len() > frame_len {
        return Err(malformed("Pages", "shorter than its table"));
    }
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
        _ => e.into(),
    })
}

/// Fills every buffer of `bufs`, at most `IOV_MAX` at a time.
fn read_vectored_exact(
    r: &mut impl Read,
    mut bufs: &mut [IoSliceMut<'_>],
    frame_len: usize,
) -> Result<(), ProtocolError> {
    const IOV_MAX: usize = 1024;
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if total > frame_len {
        return Err(malformed("Pages", "bodies longer than the frame"));
    }
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX);
        match r.read_vectored(&mut bufs[..n]) {
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(k) => IoSliceMut::advance_slices(&mut bufs, k),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{BatchEncoder, Compression};
    use crate::protocol::{read_header, HEADER_LEN};

    const RAM_PAGES: u64 = 64;

    fn page(seed: u8, compressible: bool) -> Vec<u8> {
        let mut x = u64::from(seed) * 0x9e37_79b9_7f4a_7c15 + 1;
        (0..PAGE)
            .map(|i| {
                if compressible {
                    (i % 13) as u8 ^ seed
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    /// The frame for `pages` (page number, contents), as sent, with every
    /// compressible page as lz4.
    fn frame(pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut e = BatchEncoder::new(Compression::Lz4);
        for (n, data) in pages {
            e.push(*n, data);
        }
        e.frame().concat()
    }

    /// Receives `wire` into RAM split in two regions (pages 0..40 and
    /// 40..64), as a destination with a hole would offer it.
    fn receive(
        wire: &[u8],
        ram: &mut [u8],
        written: &mut DirtyBitmap,
    ) -> Result<(Placed, Vec<u8>), ProtocolError> {
        let mut r = wire;
        let header = read_header(&mut r)?;
        let (low, high) = ram.split_at_mut(40 * PAGE);
        let slices = vec![(0, low), (40 * PAGE as u64, high)];
        let mut payload = Vec::new();
        let placed = receive_in_place(&mut r, &header, slices, RAM_PAGES, written, &mut payload)?;
        Ok((placed, payload))
    }

    #[test]
    fn raw_lz4_and_zero_pages_land_in_place_across_regions() {
        let mut ram = vec![0xaau8; RAM_PAGES as usize * PAGE];
        let mut written = DirtyBitmap::new(64);
        written.insert(39); // page 39 was written before: its zero page must clear it
        let pages = vec![
            (2, page(1, false)),
            (3, page(2, true)),
            (39, vec![0; PAGE]),
            (40, page(3, false)),
            (63, page(4, true)),
        ];
        let wire = frame(&pages);
        let lz4_entries = (0..pages.len())
            .filter(|i| wire[HEADER_LEN + 4 + i * codec::ENTRY_LEN + 8] == 2)
            .count();
        assert_eq!(lz4_entries, 2, "pages 3 and 63 travel as lz4");
        let (placed, _) = receive(&wire, &mut ram, &mut written).unwrap();
        assert_eq!(placed, Placed::Pages(5));
        for (n, data) in &pages {
            let at = *n as usize * PAGE;
            assert_eq!(&ram[at..at + PAGE], &data[..], "page {n}");
            assert!(written.contains(*n));
        }
        assert!(ram[..2 * PAGE].iter().all(|b| *b == 0xaa), "untouched");
    }

    #[test]
    fn a_corrupt_body_fails_the_crc() {
        let mut wire = frame(&[(5, page(7, false)), (6, page(8, false))]);
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let mut ram = vec![0u8; RAM_PAGES as usize * PAGE];
        let err = receive(&wire, &mut ram, &mut DirtyBitmap::new(64)).unwrap_err();
        assert!(matches!(err, ProtocolError::BadCrc { .. }), "{err}");
    }

    #[test]
    fn pages_out_of_order_are_handed_back_whole() {
        let wire = frame(&[(9, page(1, false)), (4, page(2, false))]);
        let mut ram = vec![0u8; RAM_PAGES as usize * PAGE];
        let (placed, payload) = receive(&wire, &mut ram, &mut DirtyBitmap::new(64)).unwrap();
        assert_eq!(placed, Placed::Payload);
        assert_eq!(payload, wire[HEADER_LEN..]);
        assert!(ram.iter().all(|b| *b == 0), "nothing placed");
    }

    #[test]
    fn hostile_tables_are_refused_without_panic() {
        let good = frame(&[(1, page(1, false))]);
        let mut ram = vec![0u8; RAM_PAGES as usize * PAGE];
        let reseal = |mut w: Vec<u8>| {
            // A valid CRC over a hostile payload: only the checks can refuse it.
            let header =
                crate::protocol::frame_header(crate::protocol::Kind::Pages, &[&w[HEADER_LEN..]])
                    .unwrap();
            w[..HEADER_LEN].copy_from_slice(&header);
            w
        };
        let at = HEADER_LEN + 4;
        let cases: Vec<Vec<u8>> = vec![
            // page beyond RAM
            reseal([&good[..at], &100u64.to_le_bytes(), &good[at + 8..]].concat()),
            // count larger than the frame
            reseal([&good[..HEADER_LEN], &1000u32.to_le_bytes(), &good[at..]].concat()),
            // a body shorter than the table says
            reseal(good[..good.len() - 1].to_vec()),
        ];
        for wire in cases {
            assert!(receive(&wire, &mut ram, &mut DirtyBitmap::new(64)).is_err());
        }
    }
}
