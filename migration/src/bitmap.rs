//! Sets of guest pages as bitmaps, one bit per 4 KiB page of RAM offset.
//!
//! KVM's dirty log has this shape (`u64` words, bit `p % 64` of word
//! `p / 64` for page `p`), and so do the engine's own sets: pages dirtied
//! in a round, the hybrid's pre-copy share, pages post-copy still needs,
//! pages already written on the destination. The word arithmetic lives
//! here only; everything else asks a [`DirtyBitmap`] (or, where several
//! threads share one, an [`AtomicBitmap`]) by page number.

use std::sync::atomic::{AtomicU64, Ordering};

const BITS: u64 = u64::BITS as u64;

/// Word index and bit mask of page `p`.
fn locate(p: u64) -> (usize, u64) {
    ((p / BITS) as usize, 1 << (p % BITS))
}

/// A set of pages, one bit each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty set able to hold pages `0..pages`.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(BITS) as usize],
        }
    }

    /// Takes a bitmap in KVM's layout (as `SourceVm::take_dirty_bitmap`
    /// returns it).
    pub fn from_words(words: Vec<u64>) -> Self {
        Self { words }
    }

    /// The set of the pages in `runs` (`(first_page, count)` each).
    pub fn from_runs(pages: u64, runs: &[(u64, u64)]) -> Self {
        let mut set = Self::new(pages);
        for &(first, n) in runs {
            (first..first + n).for_each(|p| set.insert(p));
        }
        set
    }

    /// How many pages the bitmap can hold.
    pub fn capacity(&self) -> u64 {
        self.words.len() as u64 * BITS
    }

    /// Whether page `p` is in the set (pages beyond the capacity are not).
    pub fn contains(&self, p: u64) -> bool {
        let (word, mask) = locate(p);
        self.words.get(word).is_some_and(|w| w & mask != 0)
    }

    /// Adds page `p`; panics if it is beyond the capacity (a bug: page
    /// numbers from the network are bounded before they get here).
    pub fn insert(&mut self, p: u64) {
        let (word, mask) = locate(p);
        self.words[word] |= mask;
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Adds every page of `other`.
    pub fn union_with(&mut self, other: &Self) {
        self.zip_with(other, |a, b| a | b);
    }

    /// Keeps only the pages also in `other`.
    pub fn intersect_with(&mut self, other: &Self) {
        self.zip_with(other, |a, b| a & b);
    }

    /// Removes every page of `other`.
    pub fn subtract(&mut self, other: &Self) {
        self.zip_with(other, |a, b| a & !b);
    }

    fn zip_with(&mut self, other: &Self, f: impl Fn(u64, u64) -> u64) {
        for (i, a) in self.words.iter_mut().enumerate() {
            *a = f(*a, other.words.get(i).copied().unwrap_or(0));
        }
    }

    /// Runs of consecutive pages in the set, as `(first_page, count)`, in
    /// ascending order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let total = self.capacity();
        let mut p = 0u64;
        std::iter::from_fn(move || {
            p = self.next_set(p)?;
            let start = p;
            while p < total && self.contains(p) {
                p += 1;
            }
            Some((start, p - start))
        })
    }

    /// The first page in the set at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut p = from;
        while p < self.capacity() {
            let (word, _) = locate(p);
            let rest = self.words[word] >> (p % BITS);
            if rest != 0 {
                return Some(p + u64::from(rest.trailing_zeros()));
            }
            p = (word as u64 + 1) * BITS;
        }
        None
    }
}

/// A set of pages shared by threads (post-copy's needed, present and
/// requested pages on the destination).
#[derive(Debug, Default)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
}

impl AtomicBitmap {
    /// An empty set able to hold pages `0..pages`.
    pub fn new(pages: u64) -> Self {
        Self {
            words: (0..pages.div_ceil(BITS))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// How many pages the bitmap can hold.
    pub fn capacity(&self) -> u64 {
        self.words.len() as u64 * BITS
    }

    /// Whether page `p` is in the set (pages beyond the capacity are not).
    pub fn contains(&self, p: u64) -> bool {
        let (word, mask) = locate(p);
        self.words
            .get(word)
            .is_some_and(|w| w.load(Ordering::Acquire) & mask != 0)
    }

    /// Adds page `p`; returns whether it was new (exactly one of several
    /// racing threads sees `true`).
    pub fn insert(&self, p: u64) -> bool {
        let (word, mask) = locate(p);
        self.words[word].fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    /// A snapshot of the set.
    pub fn snapshot(&self) -> DirtyBitmap {
        DirtyBitmap::from_words(
            self.words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_bits() {
        let bm = DirtyBitmap::from_words(vec![0b1110_0110u64, 1 << 63, 1]);
        let r: Vec<_> = bm.runs().collect();
        assert_eq!(r, vec![(1, 2), (5, 3), (127, 2)]);
        assert_eq!(bm.count(), 7);
        assert_eq!(DirtyBitmap::new(128).runs().count(), 0);
        assert!(DirtyBitmap::new(128).is_empty());
    }

    #[test]
    fn set_operations() {
        let mut a = DirtyBitmap::from_runs(200, &[(0, 10), (100, 5)]);
        let b = DirtyBitmap::from_runs(200, &[(5, 10)]);
        let mut i = a.clone();
        i.intersect_with(&b);
        assert_eq!(i.runs().collect::<Vec<_>>(), vec![(5, 5)]);
        a.subtract(&b);
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(0, 5), (100, 5)]);
        a.union_with(&b);
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(0, 15), (100, 5)]);
        assert!(!a.contains(1 << 20), "beyond the capacity: not in the set");
        assert_eq!(a.next_set(15), Some(100));
        assert_eq!(a.next_set(105), None);
    }

    #[test]
    fn atomic_insert_reports_new_pages_once() {
        let s = AtomicBitmap::new(100);
        assert!(s.insert(70));
        assert!(!s.insert(70));
        assert!(s.contains(70) && !s.contains(71));
        assert_eq!(s.snapshot().runs().collect::<Vec<_>>(), vec![(70, 1)]);
    }
}
