//! Page encoding on the wire.
//!
//! A `Pages` frame carries a batch:
//! ```text
//! count (u32), then per page:
//!   RAM page number (u64) | encoding (u8) | body
//!   encoding 0 = zero page   body: nothing
//!   encoding 1 = raw         body: 4096 bytes
//!   encoding 2 = lz4         body: length (u16) + lz4 block (decompresses to exactly 4096 bytes)
//! ```
//! A zero page is a flag, never 4 KiB of zeros. lz4 is used where it pays:
//! in `Auto` mode a page is sent compressed only if that saves at least an
//! eighth, and after failures the encoder backs off (tries 1 page in up to
//! 64), so incompressible memory costs almost no compression time.

use crate::protocol::{frame_header, malformed, Cursor, Kind, ProtocolError, HEADER_LEN};

/// Page size on the wire.
pub const PAGE: usize = 4096;
const ZERO: u8 = 0;
const RAW: u8 = 1;
const LZ4: u8 = 2;
/// Per-page header: page number and encoding.
const ENTRY_HEADER: usize = 9;
/// Pages per batch: 256 pages = 1 MiB of raw data, well under the frame limit.
pub const BATCH_PAGES: usize = 256;

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
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the byte slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0)
        && tail.iter().all(|b| *b == 0)
        && words.iter().fold(0, |a, w| a | w) == 0
}

/// Builds one `Pages` frame in place: the buffer starts with room for the
/// frame header, so a finished batch goes to the socket in one write; pages
/// are copied from guest memory straight into their slot (one copy from the
/// guest to the wire), and the buffer is reused batch after batch.
#[derive(Debug)]
pub struct BatchEncoder {
    /// Sized once for a full batch; `used` bytes of it are the frame.
    buf: Vec<u8>,
    used: usize,
    count: u32,
    mode: Compression,
    skip: u32,
    failures: u32,
    scratch: Vec<u8>,
    pub stats: EncodeStats,
}

/// Where a batch's payload starts: after the frame header and the count.
const FIRST_ENTRY: usize = HEADER_LEN + 4;

impl BatchEncoder {
    /// An empty batch.
    pub fn new(mode: Compression) -> Self {
        Self {
            buf: vec![0u8; FIRST_ENTRY + BATCH_PAGES * (ENTRY_HEADER + PAGE)],
            used: FIRST_ENTRY,
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
    /// batch; then encodes it in place (zero flag, lz4 or raw). The batch
    /// must not be full.
    pub fn push_from<E>(
        &mut self,
        page_no: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        assert!(!self.is_full(), "push into a full batch");
        let at = self.used;
        let body = at + ENTRY_HEADER;
        fill(&mut self.buf[body..body + PAGE])?;
        self.buf[at..at + 8].copy_from_slice(&page_no.to_le_bytes());
        self.count += 1;
        self.stats.pages += 1;
        self.stats.bytes_raw += PAGE as u64;
        if is_zero(&self.buf[body..body + PAGE]) {
            self.buf[at + 8] = ZERO;
            self.used = body;
            self.stats.zero_pages += 1;
            return Ok(());
        }
        if self.try_compress() {
            self.stats.lz4_attempts += 1;
            let page = &self.buf[body..body + PAGE];
            let n = lz4_flex::block::compress_into(page, &mut self.scratch).unwrap_or(PAGE);
            if n <= PAGE - PAGE / 8 {
                self.buf[at + 8] = LZ4;
                self.buf[body..body + 2].copy_from_slice(&(n as u16).to_le_bytes());
                self.buf[body + 2..body + 2 + n].copy_from_slice(&self.scratch[..n]);
                self.used = body + 2 + n;
                self.stats.lz4_pages += 1;
                self.failures = 0;
                return Ok(());
            }
            self.failures = (self.failures + 1).min(6);
            self.skip = 1 << self.failures; // back off: 2, 4, ... 64 pages
        }
        self.buf[at + 8] = RAW;
        self.used = body + PAGE;
        Ok(())
    }

    /// The finished `Pages` frame, header included; [`Self::clear`] starts
    /// the next batch.
    pub fn frame(&mut self) -> &[u8] {
        let count = self.count.to_le_bytes();
        self.buf[HEADER_LEN..FIRST_ENTRY].copy_from_slice(&count);
        let header = frame_header(Kind::Pages, &[&self.buf[HEADER_LEN..self.used]])
            .expect("a batch is far below the frame limit");
        self.buf[..HEADER_LEN].copy_from_slice(&header);
        &self.buf[..self.used]
    }

    /// Empties the batch, keeping its buffer.
    pub fn clear(&mut self) {
        self.used = FIRST_ENTRY;
        self.count = 0;
    }
}

/// One decoded page.
#[derive(Debug, PartialEq, Eq)]
pub enum PageData<'a> {
    Zero,
    Bytes(&'a [u8]),
}

/// Decodes a `Pages` payload, calling `f(page_no, data)` for each page.
/// Every field is checked: page numbers below `ram_pages`, lz4 blocks that
/// decompress to exactly one page, no trailing bytes.
pub fn decode_batch<E: From<ProtocolError>>(
    payload: &[u8],
    ram_pages: u64,
    mut f: impl FnMut(u64, PageData<'_>) -> Result<(), E>,
) -> Result<u32, E> {
    let mut c = Cursor::new(payload, "Pages");
    let count = c.u32()?;
    let mut page = vec![0u8; PAGE];
    for _ in 0..count {
        let page_no = c.u64()?;
        if page_no >= ram_pages {
            return Err(malformed(
                "Pages",
                format!("page {page_no} beyond RAM ({ram_pages} pages)"),
            )
            .into());
        }
        match c.u8()? {
            ZERO => f(page_no, PageData::Zero)?,
            RAW => f(page_no, PageData::Bytes(c.take(PAGE)?))?,
            LZ4 => {
                let n = usize::from(c.u16()?);
                let block = c.take(n)?;
                match lz4_flex::block::decompress_into(block, &mut page) {
                    Ok(PAGE) => f(page_no, PageData::Bytes(&page))?,
                    Ok(m) => {
                        return Err(
                            malformed("Pages", format!("lz4 page {page_no} is {m} bytes")).into(),
                        )
                    }
                    Err(e) => {
                        return Err(malformed("Pages", format!("lz4 page {page_no}: {e}")).into())
                    }
                }
            }
            e => return Err(malformed("Pages", format!("unknown encoding {e}")).into()),
        }
    }
    c.finish()?;
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
        let p = e.frame()[HEADER_LEN..].to_vec();
        assert_eq!((s.pages, s.zero_pages, s.lz4_pages), (3, 1, 1));
        assert!(
            p.len() < 4 + 3 * ENTRY_HEADER + PAGE + PAGE / 2,
            "zero page or lz4 not used"
        );
        assert_eq!(decode(&p).unwrap(), vec![(1, zero), (2, text), (3, noise)]);
    }

    #[test]
    fn hostile_batches_are_rejected() {
        let mut e = BatchEncoder::new(Compression::None);
        e.push(5, &[1u8; PAGE]);
        let good = e.frame()[HEADER_LEN..].to_vec();
        // page beyond RAM
        let mut bad = good.clone();
        bad[4..12].copy_from_slice(&5000u64.to_le_bytes());
        assert!(decode(&bad).is_err());
        // count larger than the content
        let mut bad = good.clone();
        bad[0] = 2;
        assert!(decode(&bad).is_err());
        // unknown encoding
        let mut bad = good.clone();
        bad[12] = 9;
        assert!(decode(&bad).is_err());
        // lz4 garbage
        let mut bad = good[..13].to_vec();
        bad[12] = LZ4;
        bad.extend_from_slice(&16u16.to_le_bytes());
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
