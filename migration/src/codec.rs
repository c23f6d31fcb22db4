//! Page encoding on the wire.
//!
//! A `Pages` frame carries a batch: a table, then the bodies in table order.
//! ```text
//! count (u32)
//! count × entry:  RAM page number (u64) | encoding (u8) | body length (u16)
//! bodies, concatenated
//!   encoding 0 = zero page   body: nothing
//!   encoding 1 = raw         body: the 4096 bytes of the page
//!   encoding 2 = lz4         body: an lz4 block that decompresses to exactly 4096 bytes
//! ```
//! A zero page is a flag, never 4 KiB of zeros. lz4 is used where it pays:
//! in `Auto` mode a page is sent compressed only if that saves at least an
//! eighth, and after failures the encoder backs off (tries 1 page in up to
//! 64), so incompressible memory costs almost no compression time.
//!
//! The table comes first so that a destination knows where every body goes
//! before it reads it: raw pages can be received straight into guest RAM
//! (see `receive`), and checked against the frame's CRC there.

use crate::protocol::{frame_header, malformed, Cursor, Kind, ProtocolError, HEADER_LEN};

/// Page size on the wire.
pub const PAGE: usize = 4096;
const ZERO: u8 = 0;
const RAW: u8 = 1;
const LZ4: u8 = 2;
/// Bytes of one table entry: page number, encoding, body length.
pub const ENTRY_LEN: usize = 11;
/// Pages per batch: 256 pages = 1 MiB of raw data, well under the frame limit.
pub const BATCH_PAGES: usize = 256;
/// Largest lz4 body kept: a page is sent compressed only if that saves at
/// least an eighth.
const MAX_LZ4: usize = PAGE - PAGE / 8;

/// Whether to compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Never.
    None,
    /// Every non-zero page (kept only when it saves ≥ 1/8).
    Lz4,
    /// Adaptively: back off while pages do not compress.
    #[default]
    Auto,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "lz4" => Ok(Self::Lz4),
            "auto" => Ok(Self::Auto),
            _ => Err(format!("unknown compression '{s}' (none, lz4, auto)")),
        }
    }
}

/// Counts of what was encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    pub pages: u64,
    pub zero_pages: u64,
    pub lz4_pages: u64,
    /// Pages lz4 was tried on.
    pub lz4_attempts: u64,
    /// 4096 bytes per page.
    pub bytes_raw: u64,
}

/// True if every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    // A page that is not zero nearly always says so in its first bytes:
    // look there before scanning all of it.
    page[..page.len().min(64)].iter().all(|b| *b == 0) && all_zero(page)
}

fn all_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the byte slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0)
        && tail.iter().all(|b| *b == 0)
        && words.iter().fold(0, |a, w| a | w) == 0
}

/// Builds one `Pages` frame in place. The buffer holds room for the frame
/// header, the count and a full table, then the bodies; pages are copied
/// from guest memory straight into their body slot (one copy from the guest
/// to the wire), and the buffer is reused batch after batch.
#[derive(Debug)]
pub struct BatchEncoder {
    buf: Vec<u8>,
    /// Bytes of bodies so far, from `BODIES`.
    body_used: usize,
    count: u32,
    mode: Compression,
    skip: u32,
    failures: u32,
    scratch: Vec<u8>,
    pub stats: EncodeStats,
}

/// Where the table starts: after the frame header and the count.
const TABLE: usize = HEADER_LEN + 4;
/// Where the bodies start: after a table of `BATCH_PAGES` entries.
const BODIES: usize = TABLE + BATCH_PAGES * ENTRY_LEN;

impl BatchEncoder {
    /// An empty batch.
    pub fn new(mode: Compression) -> Self {
        Self {
            buf: vec![0u8; BODIES + BATCH_PAGES * PAGE],
            body_used: 0,
            count: 0,
            mode,
            skip: 0,
            failures: 0,
            scratch: vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE)],
            stats: EncodeStats::default(),
        }
    }

    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the batch is full.
    pub fn is_full(&self) -> bool {
        self.len() >= BATCH_PAGES
    }

    fn try_compress(&mut self) -> bool {
        match self.mode {
            Compression::None => false,
            Compression::Lz4 => true,
            Compression::Auto if self.skip > 0 => {
                self.skip -= 1;
                false
            }
            Compression::Auto => true,
        }
    }

    /// Adds page number `page_no` with contents `data` (4096 bytes).
    pub fn push(&mut self, page_no: u64, data: &[u8]) {
        let copied: Result<(), std::convert::Infallible> = self.push_from(page_no, |slot| {
            slot.copy_from_slice(data);
            Ok(())
        });
        let Ok(()) = copied;
    }

    /// Adds page number `page_no`, whose 4096 bytes `fill` copies into the
    /// batch; then encodes it in place. The batch must not be full.
    pub fn push_from<E>(
        &mut self,
        page_no: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.push_run_from(page_no, 1, fill)
    }

    /// Pages the batch still has room for.
    pub fn room(&self) -> usize {
        BATCH_PAGES - self.len()
    }

    /// Adds pages `first..first + n` (at most [`Self::room`]), whose bytes
    /// `fill` copies into the batch in one go; then encodes each in place
    /// (zero flag, lz4 or raw), closing up the room zero and lz4 pages
    /// leave: every byte is copied at most once more, and not at all while
    /// pages stay raw.
    pub fn push_run_from<E>(
        &mut self,
        first: u64,
        n: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        assert!(n <= self.room(), "push beyond the batch");
        let start = BODIES + self.body_used;
        fill(&mut self.buf[start..start + n * PAGE])?;
        for (j, page_no) in (first..first + n as u64).enumerate() {
            let (encoding, len) = self.encode_at(start + j * PAGE, BODIES + self.body_used);
            let entry = TABLE + self.count as usize * ENTRY_LEN;
            self.buf[entry..entry + 8].copy_from_slice(&page_no.to_le_bytes());
            self.buf[entry + 8] = encoding;
            self.buf[entry + 9..entry + 11].copy_from_slice(&(len as u16).to_le_bytes());
            self.body_used += len;
            self.count += 1;
            self.stats.pages += 1;
            self.stats.bytes_raw += PAGE as u64;
        }
        Ok(())
    }

    /// Encodes the page at `buf[src..]` into its body at `buf[dst..]`
    /// (`dst <= src`); returns its encoding and body length.
    fn encode_at(&mut self, src: usize, dst: usize) -> (u8, usize) {
        if is_zero(&self.buf[src..src + PAGE]) {
            self.stats.zero_pages += 1;
            return (ZERO, 0);
        }
        if self.try_compress() {
            self.stats.lz4_attempts += 1;
            let page = &self.buf[src..src + PAGE];
            let n = lz4_flex::block::compress_into(page, &mut self.scratch).unwrap_or(PAGE);
            if n <= MAX_LZ4 {
                self.buf[dst..dst + n].copy_from_slice(&self.scratch[..n]);
                self.stats.lz4_pages += 1;
                self.failures = 0;
                return (LZ4, n);
            }
            self.failures = (self.failures + 1).min(6);
            self.skip = 1 << self.failures; // back off: 2, 4, ... 64 pages
        }
        if src != dst {
            self.buf.copy_within(src..src + PAGE, dst);
        }
        (RAW, PAGE)
    }

    /// The finished `Pages` frame in two pieces to write one after the
    /// other: frame header, count and table; then the bodies.
    /// [`Self::clear`] starts the next batch.
    pub fn frame(&mut self) -> [&[u8]; 2] {
        let table_end = TABLE + self.count as usize * ENTRY_LEN;
        let bodies_end = BODIES + self.body_used;
        let count = self.count.to_le_bytes();
        self.buf[HEADER_LEN..TABLE].copy_from_slice(&count);
        let header = frame_header(
            Kind::Pages,
            &[
                &self.buf[HEADER_LEN..table_end],
                &self.buf[BODIES..bodies_end],
            ],
        )
        .expect("a batch is far below the frame limit");
        self.buf[..HEADER_LEN].copy_from_slice(&header);
        [&self.buf[..table_end], &self.buf[BODIES..bodies_end]]
    }

    /// Empties the batch, keeping its buffer.
    pub fn clear(&mut self) {
        self.body_used = 0;
        self.count = 0;
    }
}

/// How one page is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Zero,
    Raw,
    Lz4,
}

/// One checked entry of a batch's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// RAM page number, below the RAM size.
    pub page: u64,
    pub encoding: Encoding,
    /// Where its body lies among the batch's bodies.
    pub body: std::ops::Range<usize>,
}

/// Bytes of the table of a batch of `count` pages (`None` if absurd).
pub fn table_len(count: u32) -> Option<usize> {
    (count as usize).checked_mul(ENTRY_LEN)
}

/// Checks a batch's table (the bytes after the count): every page below
/// `ram_pages`, known encodings, body lengths that fit them (4096 for raw,
/// 1 to 3584 for lz4, none for zero), and bodies that add up to exactly
/// `bodies_len`.
pub fn parse_table(
    table: &[u8],
    ram_pages: u64,
    bodies_len: usize,
) -> Result<Vec<Entry>, ProtocolError> {
    let mut c = Cursor::new(table, "Pages");
    let mut entries = Vec::with_capacity(table.len() / ENTRY_LEN);
    let mut at = 0usize;
    while c.remaining() > 0 {
        let page = c.u64()?;
        if page >= ram_pages {
            return Err(malformed(
                "Pages",
                format!("page {page} beyond RAM ({ram_pages} pages)"),
            ));
        }
        let (encoding, len) = match (c.u8()?, usize::from(c.u16()?)) {
            (ZERO, 0) => (Encoding::Zero, 0),
            (RAW, PAGE) => (Encoding::Raw, PAGE),
            (LZ4, n @ 1..=MAX_LZ4) => (Encoding::Lz4, n),
            (e, n) => {
                return Err(malformed(
                    "Pages",
                    format!("page {page}: encoding {e} with a {n}-byte body"),
                ))
            }
        };
        entries.push(Entry {
            page,
            encoding,
            body: at..at + len,
        });
        at += len;
    }
    if at != bodies_len {
        return Err(malformed(
            "Pages",
            format!("the table announces {at} bytes of bodies, the frame has {bodies_len}"),
        ));
    }
    Ok(entries)
}

/// Decompresses an lz4 body into `page`, which it must fill exactly.
pub fn decompress(page_no: u64, block: &[u8], page: &mut [u8]) -> Result<(), ProtocolError> {
    match lz4_flex::block::decompress_into(block, page) {
        Ok(PAGE) => Ok(()),
        Ok(m) => Err(malformed(
            "Pages",
            format!("lz4 page {page_no} is {m} bytes"),
        )),
        Err(e) => Err(malformed("Pages", format!("lz4 page {page_no}: {e}"))),
    }
}

/// One decoded page.
#[derive(Debug, PartialEq, Eq)]
pub enum PageData<'a> {
    Zero,
    Bytes(&'a [u8]),
}

/// Decodes a `Pages` payload, calling `f(page_no, data)` for each page.
/// Every field is checked (see [`parse_table`]) before the first call.
pub fn decode_batch<E: From<ProtocolError>>(
    payload: &[u8],
    ram_pages: u64,
    mut f: impl FnMut(u64, PageData<'_>) -> Result<(), E>,
) -> Result<u32, E> {
    let mut c = Cursor::new(payload, "Pages");
    let count = c.u32()?;
    let len = table_len(count).ok_or_else(|| malformed("Pages", "absurd count"))?;
    let table = c.take(len)?;
    let bodies = c.take(c.remaining())?;
    let entries = parse_table(table, ram_pages, bodies.len())?;
    let mut page = vec![0u8; PAGE];
    for e in entries {
        let body = &bodies[e.body];
        match e.encoding {
            Encoding::Zero => f(e.page, PageData::Zero)?,
            Encoding::Raw => f(e.page, PageData::Bytes(body))?,
            Encoding::Lz4 => {
                decompress(e.page, body, &mut page)?;
                f(e.page, PageData::Bytes(&page))?
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(p: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, ProtocolError> {
        let mut out = Vec::new();
        decode_batch::<ProtocolError>(p, 1000, |n, d| {
            out.push((
                n,
                match d {
                    PageData::Zero => vec![0; PAGE],
                    PageData::Bytes(b) => b.to_vec(),
                },
            ));
            Ok(())
        })?;
        Ok(out)
    }

    /// The payload of the encoder's frame (what a receiver's CRC covers).
    fn payload(e: &mut BatchEncoder) -> Vec<u8> {
        let [head, bodies] = e.frame();
        [&head[HEADER_LEN..], bodies].concat()
    }

    #[test]
    fn zero_raw_and_lz4_pages_round_trip() {
        let zero = vec![0u8; PAGE];
        let text: Vec<u8> = (0..PAGE).map(|i| (i % 7) as u8).collect();
        let mut x = 0x1234_5678_9abc_def0u64;
        let noise: Vec<u8> = (0..PAGE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut e = BatchEncoder::new(Compression::Lz4);
        e.push(1, &zero);
        e.push(2, &text);
        e.push(3, &noise);
        let s = e.stats;
        let p = payload(&mut e);
        assert_eq!((s.pages, s.zero_pages, s.lz4_pages), (3, 1, 1));
        assert!(
            p.len() < 4 + 3 * ENTRY_LEN + PAGE + PAGE / 2,
            "zero page or lz4 not used"
        );
        assert_eq!(decode(&p).unwrap(), vec![(1, zero), (2, text), (3, noise)]);
        // The frame's header checks out against the payload.
        let [head, _] = e.frame();
        let header = frame_header(Kind::Pages, &[&p]).unwrap();
        assert_eq!(&head[..HEADER_LEN], &header[..]);
    }

    /// A run read in one go and encoded in place: zero and lz4 pages close
    /// up, raw pages after them move down, and every page decodes intact.
    #[test]
    fn a_run_encodes_in_place() {
        let mut x = 7u64;
        let mut noise = || -> Vec<u8> {
            (0..PAGE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let pages: Vec<Vec<u8>> = vec![
            noise(),
            vec![0; PAGE],
            (0..PAGE).map(|i| (i % 5) as u8).collect(),
            noise(),
            noise(),
        ];
        let mut e = BatchEncoder::new(Compression::Lz4);
        e.push_run_from(10, pages.len(), |slots| {
            slots.copy_from_slice(&pages.concat());
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!((e.stats.zero_pages, e.stats.lz4_pages), (1, 1));
        assert_eq!(e.room(), BATCH_PAGES - pages.len());
        let decoded = decode(&payload(&mut e)).unwrap();
        let expected: Vec<(u64, Vec<u8>)> = (10..).zip(pages).collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn hostile_batches_are_rejected() {
        let mut e = BatchEncoder::new(Compression::None);
        e.push(5, &[1u8; PAGE]);
        let good = payload(&mut e);
        assert!(decode(&good).is_ok());
        // page beyond RAM
        let mut bad = good.clone();
        bad[4..12].copy_from_slice(&5000u64.to_le_bytes());
        assert!(decode(&bad).is_err());
        // count larger than the content
        let mut bad = good.clone();
        bad[0] = 2;
        assert!(decode(&bad).is_err());
        // an absurd count
        let mut bad = good.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&bad).is_err());
        // unknown encoding
        let mut bad = good.clone();
        bad[12] = 9;
        assert!(decode(&bad).is_err());
        // a raw page whose body length is not a page
        let mut bad = good.clone();
        bad[13..15].copy_from_slice(&4095u16.to_le_bytes());
        assert!(decode(&bad).is_err());
        // lz4 garbage
        let mut bad = good[..15].to_vec();
        bad[12] = LZ4;
        bad[13..15].copy_from_slice(&16u16.to_le_bytes());
        bad.extend_from_slice(&[0xff; 16]);
        assert!(decode(&bad).is_err());
        // trailing bytes
        let mut bad = good.clone();
        bad.push(0);
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn auto_mode_backs_off_on_incompressible_pages() {
        let mut x = 99u64;
        let mut e = BatchEncoder::new(Compression::Auto);
        for n in 0..200 {
            let page: Vec<u8> = (0..PAGE)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect();
            e.push(n, &page);
        }
        assert!(e.stats.lz4_attempts < 10, "{:?}", e.stats);
        assert_eq!(e.stats.lz4_pages, 0);
    }
}
