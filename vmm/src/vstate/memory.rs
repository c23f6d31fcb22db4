//! Guest RAM: one memfd, mapped shared, cut into KVM memory slots around the
//! 32-bit MMIO hole.
//!
//! Why a memfd and not anonymous memory:
//! - the pages are *files' pages*: `lseek(SEEK_DATA/SEEK_HOLE)` tells which
//!   ones the guest ever touched, so a save or a migration's first round never
//!   reads (and never faults in) memory the guest did not use;
//! - the fd can be handed to another process (local migration), and
//!   userfaultfd can be registered on the shared mapping (post-copy).
//!
//! Untouched memory costs nothing: the file starts as one big hole and the
//! mapping is `MAP_NORESERVE`.
//!
//! Every page has a **RAM offset** (its offset in the memfd). Dirty bitmaps,
//! snapshots and the migration stream all index pages by RAM offset, which is
//! contiguous even though guest-physical addresses have a hole.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

use guest_images::abi::{MMIO_GAP_SIZE, MMIO_GAP_START, PAGE_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// Guest memory with a vm-memory dirty bitmap: writes the VMM itself makes
/// through it (device emulation, the probe mailbox) are recorded there, because
/// KVM's dirty log only sees writes made by the guest.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Smallest RAM we run a guest with.
pub const MIN_RAM: u64 = 64 << 20;

/// Errors of guest RAM set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Guest RAM of {0} bytes is not a positive multiple of 1 MiB of at least 64 MiB")]
    BadSize(u64),
    #[error("Guest RAM of {requested} MiB is more than this host's {host} MiB")]
    LargerThanHost { requested: u64, host: u64 },
    #[error("Failed to create the guest RAM memfd")]
    Memfd(#[source] nix::Error),
    #[error("Failed to size the guest RAM memfd to {size} bytes")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("Failed to scan the guest RAM memfd for populated pages")]
    Seek(#[source] nix::Error),
    #[error("Guest memory access at {gpa:#x} failed")]
    Access {
        gpa: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("RAM offset {0:#x} is outside guest RAM")]
    OutOfRange(u64),
    #[error("Failed to punch a hole into guest RAM at offset {offset:#x}")]
    PunchHole {
        offset: u64,
        #[source]
        source: nix::Error,
    },
    #[error("Failed to prefault {len:#x} bytes of guest RAM at offset {offset:#x}")]
    Prefault {
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// One contiguous piece of RAM: a KVM memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// KVM slot number.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Offset of its first byte in the memfd.
    pub ram_offset: u64,
}

/// Splits `size` bytes of RAM around the MMIO hole: `[0, 3 GiB)` then
/// `[4 GiB, ...)`.
pub fn ram_layout(size: u64) -> Vec<RamRegion> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![RamRegion {
        slot: 0,
        gpa: 0,
        size: low,
        ram_offset: 0,
    }];
    if size > low {
        regions.push(RamRegion {
            slot: 1,
            gpa: MMIO_GAP_START + MMIO_GAP_SIZE,
            size: size - low,
            ram_offset: low,
        });
    }
    regions
}

/// Total memory of this host in bytes, from `sysinfo(2)`.
pub fn host_memory_bytes() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|s| s.ram_total())
        .unwrap_or(u64::MAX)
}

/// Checks a requested RAM size before anything is allocated.
pub fn validate_ram_size(size: u64) -> Result<(), MemoryError> {
    if size < MIN_RAM || !size.is_multiple_of(1 << 20) {
        return Err(MemoryError::BadSize(size));
    }
    let host = host_memory_bytes();
    if size > host {
        return Err(MemoryError::LargerThanHost {
            requested: size >> 20,
            host: host >> 20,
        });
    }
    Ok(())
}

/// Guest RAM: the memfd, its mapping, and the slot layout.
#[derive(Debug)]
pub struct GuestRam {
    memfd: File,
    size: u64,
    regions: Vec<RamRegion>,
    memory: GuestMemoryMmap,
}

impl GuestRam {
    /// Creates `size` bytes of fresh (all-hole) guest RAM.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        validate_ram_size(size)?;
        let fd = nix::sys::memfd::memfd_create(
            c"guest-ram",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(MemoryError::Memfd)?;
        let memfd = File::from(fd);
        memfd
            .set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        Self::from_memfd(memfd, size)
    }

    /// Maps an existing memfd of `size` bytes as guest RAM (its contents are
    /// kept: this is how a second process can take over the same memory).
    pub fn from_memfd(memfd: File, size: u64) -> Result<Self, MemoryError> {
        let regions = ram_layout(size);
        let ranges: Vec<_> = regions
            .iter()
            .map(|r| {
                let fo =
                    FileOffset::new(memfd.try_clone().expect("dup of the memfd"), r.ram_offset);
                (GuestAddress(r.gpa), r.size as usize, Some(fo))
            })
            .collect();
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        Ok(Self {
            memfd,
            size,
            regions,
            memory,
        })
    }

    /// Bytes of RAM (the hole not counted).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// The KVM slots.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The vm-memory view (with the VMM-side dirty bitmap).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The backing memfd.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Host virtual address where `region` is mapped.
    pub fn host_address(&self, region: &RamRegion) -> *mut u8 {
        self.memory
            .get_host_address(GuestAddress(region.gpa))
            .expect("every RAM region is mapped")
    }

    /// Guest-physical address of the byte at `ram_offset`.
    pub fn gpa_of(&self, ram_offset: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| (r.ram_offset..r.ram_offset + r.size).contains(&ram_offset))
            .map(|r| r.gpa + (ram_offset - r.ram_offset))
    }

    /// RAM offset of guest-physical address `gpa`.
    pub fn ram_offset_of(&self, gpa: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| (r.gpa..r.gpa + r.size).contains(&gpa))
            .map(|r| r.ram_offset + (gpa - r.gpa))
    }

    /// The populated (ever written) byte ranges of the memfd, as
    /// `(ram_offset, len)`, found with `SEEK_DATA`/`SEEK_HOLE`: the kernel
    /// knows which shmem pages exist, so holes are skipped without reading.
    pub fn populated_ranges(&self) -> Result<Vec<(u64, u64)>, MemoryError> {
        use nix::unistd::{lseek, Whence};
        let fd = self.memfd.as_fd();
        let end = self.size as i64;
        let mut ranges = Vec::new();
        let mut pos = 0i64;
        while pos < end {
            let data = match lseek(fd.as_raw_fd(), pos, Whence::SeekData) {
                Ok(d) => d,
                Err(nix::Error::ENXIO) => break, // no data after pos
                Err(e) => return Err(MemoryError::Seek(e)),
            };
            let hole = lseek(fd.as_raw_fd(), data, Whence::SeekHole)
                .map_err(MemoryError::Seek)?
                .min(end);
            ranges.push((data as u64, (hole - data) as u64));
            pos = hole;
        }
        Ok(ranges)
    }

    /// Drops `[offset, offset + len)` from the memfd: the pages become holes
    /// again (read as zero; missing for userfaultfd).
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        use nix::fcntl::{fallocate, FallocateFlags};
        fallocate(
            self.memfd.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
        .map(|_| ())
        .map_err(|source| MemoryError::PunchHole { offset, source })
    }

    /// Allocates and touches RAM `[offset, offset + len)` now, as the first
    /// write to each page would (`MADV_POPULATE_WRITE`: allocate, zero, map;
    /// pages already present keep their contents). Touching fresh memory is
    /// the slow part of receiving it on some hosts — here, a nested VM whose
    /// free memory its own host reclaims (free page reporting) — and this
    /// moves that cost ahead of the page stream.
    pub fn prefault(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        let end = offset.saturating_add(len);
        for (ram_offset, host, size) in self.host_mappings() {
            let from = offset.max(ram_offset);
            let to = end.min(ram_offset + size);
            if from >= to {
                continue;
            }
            let addr = host + (from - ram_offset);
            // SAFETY: [addr, addr + to - from) lies inside one of our own
            // RAM mappings (host_mappings), which live as long as `self`;
            // MADV_POPULATE_WRITE only faults pages in, never changes data.
            let rc = unsafe {
                libc::madvise(
                    addr as *mut libc::c_void,
                    (to - from) as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                return Err(MemoryError::Prefault {
                    offset: from,
                    len: to - from,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Copies RAM at `ram_offset` into `buf` through the mapping (no
    /// syscall, no dirty marking); a range that spans the MMIO hole is
    /// split at the region boundary. The guest may be writing the same
    /// memory: what is copied is some recent state of each byte, which is
    /// all a pre-copy round needs (the dirty log re-sends what changed).
    pub fn read_ram(&self, ram_offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.split_at_regions(ram_offset, buf.len(), |gpa, at| {
            self.memory.read_slice(&mut buf[at], gpa)
        })
    }

    /// Copies `data` into RAM at `ram_offset` through the mapping, split at
    /// region boundaries like [`Self::read_ram`]; the VMM bitmap records it
    /// dirty. Cheapest where the pages are mapped already (prefaulted);
    /// elsewhere each first touch is a page fault, and a `pwrite` on the
    /// memfd is the cheaper way to fill fresh memory.
    pub fn write_ram(&self, ram_offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.split_at_regions(ram_offset, data.len(), |gpa, at| {
            self.memory.write_slice(&data[at], gpa)
        })
    }

    /// Calls `access(gpa, range)` for each piece of `len` bytes of RAM from
    /// `ram_offset` that lies in one region; `range` indexes the caller's
    /// buffer.
    fn split_at_regions(
        &self,
        ram_offset: u64,
        len: usize,
        mut access: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
    ) -> Result<(), MemoryError> {
        let mut done = 0usize;
        while done < len {
            let off = ram_offset + done as u64;
            let region = self
                .regions
                .iter()
                .find(|r| (r.ram_offset..r.ram_offset + r.size).contains(&off))
                .ok_or(MemoryError::OutOfRange(off))?;
            let n = ((region.ram_offset + region.size - off) as usize).min(len - done);
            let gpa = region.gpa + (off - region.ram_offset);
            access(GuestAddress(gpa), done..done + n)
                .map_err(|source| MemoryError::Access { gpa, source })?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at guest-physical `gpa`; the VMM bitmap records it dirty.
    pub fn write_gpa(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.memory
            .write_slice(data, GuestAddress(gpa))
            .map_err(|source| MemoryError::Access { gpa, source })
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        self.memory
            .read_obj::<u64>(GuestAddress(gpa))
            .map_err(|source| MemoryError::Access { gpa, source })
    }

    /// Takes and clears the VMM-side dirty bitmap (pages written through
    /// vm-memory since the last call), as one bit per RAM page.
    pub fn take_vmm_dirty(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.pages().div_ceil(64) as usize];
        for (region, r) in self.regions.iter().zip(self.memory.iter()) {
            // The region derefs to its MmapRegion, whose bitmap is the whole AtomicBitmap.
            let bits = std::ops::Deref::deref(r).bitmap().get_and_reset();
            let first_page = region.ram_offset / PAGE_SIZE;
            or_bits_at(&mut out, first_page, &bits, region.size / PAGE_SIZE);
        }
        out
    }

    /// `(ram_offset, host_address, len)` of every region: what userfaultfd
    /// registers and what access sampling zaps.
    pub fn host_mappings(&self) -> Vec<(u64, u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.ram_offset, self.host_address(r) as u64, r.size))
            .collect()
    }
}

/// ORs `n` bits of `src` into `dst` starting at bit `at`.
pub fn or_bits_at(dst: &mut [u64], at: u64, src: &[u64], n: u64) {
    if at.is_multiple_of(64) {
        let base = (at / 64) as usize;
        for (i, w) in src.iter().enumerate().take(n.div_ceil(64) as usize) {
            dst[base + i] |= w;
        }
        return;
    }
    for bit in 0..n {
        if src[(bit / 64) as usize] & (1 << (bit % 64)) != 0 {
            let b = at + bit;
            dst[(b / 64) as usize] |= 1 << (b % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_hole() {
        let r = ram_layout(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, 3 << 30);
        assert_eq!(r[1].gpa, 4 << 30);
        assert_eq!(r[1].ram_offset, 3 << 30);
        assert_eq!(r[1].size, 1 << 30);
        assert_eq!(ram_layout(256 << 20).len(), 1);
    }

    #[test]
    fn untouched_ram_is_a_hole_and_writes_populate_it() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert!(ram.populated_ranges().unwrap().is_empty());
        ram.write_gpa(0x20_1000, &[1u8; 16]).unwrap();
        assert_eq!(ram.populated_ranges().unwrap(), vec![(0x20_1000, 0x1000)]);
        let dirty = ram.take_vmm_dirty();
        assert_eq!(dirty[0x201 / 64], 1 << (0x201 % 64));
        assert!(ram.take_vmm_dirty().iter().all(|w| *w == 0));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(validate_ram_size(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(
            validate_ram_size(1 << 50),
            Err(MemoryError::LargerThanHost { .. })
        ));
    }
}
