//! Post-copy losing its source, with no KVM: the real source engine on an
//! in-memory `SourceVm` migrates to the real destination engine on an
//! in-memory `DestinationVm` whose RAM is a memfd mapped shared, as the
//! VMM's (userfaultfd works on it with no guest at all). The source dies in the
//! middle of the background push; the destination must then pause its
//! guest and name exactly the pages that never arrived.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};

use migration::auth::Secret;
use migration::endpoint::GuestView;
use migration::secure::Protection;
use migration::{BoxError, DestinationVm, MigrationError, Mode, Options, SourceVm};

const SECRET: &[u8] = b"0123456789abcdef";
const PAGE: u64 = 4096;
const RAM: u64 = 512 * PAGE;
/// Two populated runs with a hole between them: the push sends the first
/// (whole frames of it, at least), and the source dies reading the second.
const POPULATED: [(u64, u64); 2] = [(0, 300 * PAGE), (320 * PAGE, 32 * PAGE)];
const DIES_AT: u64 = 320 * PAGE;

/// A source whose process "dies" (every read fails) once the push reaches
/// `DIES_AT`.
#[derive(Default)]
struct DyingSource {
    dead: AtomicBool,
}

impl SourceVm for DyingSource {
    fn ram_size(&self) -> u64 {
        RAM
    }
    fn populated_ranges(&self) -> Result<Vec<(u64, u64)>, BoxError> {
        Ok(POPULATED.to_vec())
    }
    fn read_ram(&self, offset: u64, buf: &mut [u8]) -> Result<(), BoxError> {
        if offset >= DIES_AT || self.dead.load(Ordering::SeqCst) {
            self.dead.store(true, Ordering::SeqCst);
            return Err("the source process died".into());
        }
        buf.fill((offset / PAGE) as u8 | 1);
        Ok(())
    }
    fn start_dirty_log(&self) -> Result<(), BoxError> {
        Ok(())
    }
    fn stop_dirty_log(&self) -> Result<(), BoxError> {
        Ok(())
    }
    fn take_dirty_bitmap(&self) -> Result<Vec<u64>, BoxError> {
        Ok(vec![0; 2])
    }
    fn pause(&self) {}
    fn resume(&self) {}
    fn set_throttle(&self, _pct: u8) {}
    fn config_blob(&self) -> Result<Vec<u8>, BoxError> {
        Ok(b"{}".to_vec())
    }
    fn state_blob(&self) -> Result<Vec<u8>, BoxError> {
        Ok(b"state".to_vec())
    }
    fn ram_mappings(&self) -> Result<Vec<(u64, u64, u64)>, BoxError> {
        Ok(Vec::new())
    }
    /// Eight pages the "vCPUs" touch first: they go ahead of the state, so
    /// they arrive whatever happens to the push.
    fn first_touched_ram(&self) -> Result<Vec<u64>, BoxError> {
        Ok((8..16).map(|p| p * PAGE).collect())
    }
}

/// Guest RAM as the VMM has it: a memfd mapped shared. Writes before the
/// switch-over go through the file (`pwrite`), never through the mapping,
/// which userfaultfd watches from `Config` on: a write through it to a
/// missing page would wait for the page to come.
struct MemfdRam {
    file: std::fs::File,
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and unmapped only in Drop; the
// engine's threads reach it only through the addresses `ram_mappings`
// gives them, for userfaultfd ioctls that the kernel serialises.
unsafe impl Send for MemfdRam {}

impl MemfdRam {
    fn new(len: usize) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: a NUL-terminated name and no flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len as u64).unwrap();
        // SAFETY: a new shared mapping of our own memfd, checked below; no
        // existing memory is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        Self {
            file,
            addr: addr.cast(),
            len,
        }
    }

    /// Which pages exist (`mincore` on the shared mapping reports the
    /// memfd's pages): those written before the switch-over or installed
    /// with UFFDIO_COPY after it.
    fn resident(&self) -> Vec<bool> {
        let mut v = vec![0u8; self.len / PAGE as usize];
        // SAFETY: `addr`/`len` describe a live mapping of ours and `v` holds
        // one byte per page of it, as mincore requires.
        let r = unsafe { libc::mincore(self.addr.cast(), self.len, v.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore");
        v.iter().map(|b| b & 1 == 1).collect()
    }
}

impl Drop for MemfdRam {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly what mmap returned; nothing uses
        // the mapping after this value is gone.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// A destination with no guest: RAM only, every other step a no-op.
#[derive(Default)]
struct RamOnlyDestination {
    ram: Option<MemfdRam>,
    paused: bool,
}

impl DestinationVm for RamOnlyDestination {
    type Running = ();
    fn prepare(&mut self, _config: &[u8], ram_size: u64) -> Result<(), BoxError> {
        self.ram = Some(MemfdRam::new(ram_size as usize));
        Ok(())
    }
    fn write_ram(&mut self, offset: u64, data: &[u8]) -> Result<(), BoxError> {
        use std::os::unix::fs::FileExt;
        let ram = self.ram.as_ref().ok_or("no RAM")?;
        Ok(ram.file.write_all_at(data, offset)?)
    }
    fn read_ram(&self, _offset: u64, _buf: &mut [u8]) -> Result<(), BoxError> {
        Err("not used: no --verify here".into())
    }
    fn populated_ranges(&self) -> Result<Vec<(u64, u64)>, BoxError> {
        Ok(Vec::new())
    }
    fn restore(&mut self, _state: &[u8]) -> Result<(), BoxError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
    fn after_resume(&mut self, _verify: bool) -> Result<GuestView, BoxError> {
        Ok(GuestView::default())
    }
    fn discard(&mut self) {}
    fn ram_mappings(&self) -> Result<Vec<(u64, u64, u64)>, BoxError> {
        let ram = self.ram.as_ref().ok_or("no RAM")?;
        Ok(vec![(0, ram.addr as u64, ram.len as u64)])
    }
    fn punch_hole(&mut self, _offset: u64, _len: u64) -> Result<(), BoxError> {
        Ok(())
    }
    fn pause_guest(&mut self) -> bool {
        self.paused = true;
        true
    }
    fn longest_stall_ms(&self) -> f64 {
        0.0
    }
    fn into_running(self) -> Option<()> {
        Some(())
    }
}

#[test]
fn post_copy_source_loss_pauses_the_guest_and_names_the_missing_pages() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let destination = std::thread::spawn(move || {
        let mut dst = RamOnlyDestination::default();
        let r = migration::receive::receive(
            &listener,
            &Protection::Psk(Secret::from_bytes(SECRET)),
            &mut dst,
        );
        let resident = dst.ram.as_ref().map(MemfdRam::resident).unwrap_or_default();
        (r.map(|_| ()), dst.paused, resident)
    });
    let opts = Options {
        mode: Mode::Post,
        ..Default::default()
    };
    let src = DyingSource::default();
    let sent = migration::migrate(
        &src,
        &addr,
        &Protection::Psk(Secret::from_bytes(SECRET)),
        &opts,
        Default::default(),
    );
    assert!(sent.is_err(), "the source died mid-push: {sent:?}");
    let (received, paused, resident) = destination.join().unwrap();
    // The populated pages that are not in the destination's RAM.
    let absent: Vec<u64> = POPULATED
        .iter()
        .flat_map(|&(o, l)| o / PAGE..(o + l) / PAGE)
        .filter(|&p| !resident[p as usize])
        .collect();
    assert!(
        absent.contains(&(DIES_AT / PAGE)) && (8..16).all(|p| resident[p]),
        "the first-touched pages arrived, the second run did not: {} absent",
        absent.len()
    );
    match received {
        Err(MigrationError::MissingPages { count, first, .. }) => {
            assert_eq!(count, absent.len() as u64, "every absent page is named");
            assert_eq!(first, absent[..first.len()], "by number, in order");
            assert!(!first.is_empty());
        }
        other => panic!("expected the missing pages to be named: {other:?}"),
    }
    assert!(paused, "the destination paused its guest");
}
