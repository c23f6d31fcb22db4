//! userfaultfd: how post-copy makes a page the guest touches before it
//! arrived wait for it.
//!
//! The destination registers its guest RAM mapping for *missing* faults. A
//! shared memfd page is "missing" while it is not in the page cache (a hole).
//! When a vCPU touches such a page, KVM resolves the guest-physical address
//! to our mapping and faults on it from kernel mode; the kernel puts the
//! faulting thread to sleep and queues a message on the uffd. A handler reads
//! the address, obtains the page, and installs it atomically with
//! `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`), which also wakes the sleeper. A page
//! that got installed by somebody else in the meantime makes `UFFDIO_COPY`
//! fail with `EEXIST`: the sleeper is then woken with `UFFDIO_WAKE`.
//!
//! Pages must never be written any other way while registered: a plain write
//! would create the page first and fill it second, and a vCPU could read it
//! half-filled without faulting.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
/// `UFFD_FEATURE_MINOR_SHMEM`: minor faults on shmem (memfd).
const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `uffd_msg.arg.pagefault.flags`: the access was a write.
pub const FAULT_FLAG_WRITE: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_FEATURE_MISSING_SHMEM`: missing faults work on shmem (memfd).
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

const _: () = assert!(std::mem::size_of::<UffdioContinue>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, UffdioContinue);

/// What installing a page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// We installed it (and woke whoever waited).
    Now,
    /// It was already there; waiters were woken.
    AlreadyThere,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Userfault {
    /// Opens a userfaultfd that reports faults from kernel mode too (KVM's
    /// accesses to guest memory are kernel-mode faults), and checks that the
    /// kernel supports missing faults on shmem.
    pub fn new() -> io::Result<Self> {
        Self::open(0, UFFD_FEATURE_MISSING_SHMEM)
    }

    /// A userfaultfd for *minor* faults on shmem: the page exists in the
    /// memfd, only this process's page-table entry is missing. Used to see
    /// which pages the guest touches (reads included), see `access_rate`.
    pub fn new_minor() -> io::Result<Self> {
        Self::open(UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MINOR_SHMEM)
    }

    fn open(request: u64, require: u64) -> io::Result<Self> {
        // SAFETY: a plain syscall with integer flags; it returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: request,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `UffdioApi`, which
        // lives for the call; the fd is a userfaultfd.
        check(unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API(), &mut api) })?;
        if api.features & require != require {
            return Err(io::Error::other(format!(
                "userfaultfd lacks features {require:#x} (has {:#x})",
                api.features
            )));
        }
        Ok(Self { fd })
    }

    /// Registers `[addr, addr + len)` for missing faults.
    pub fn register(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads/writes one `UffdioRegister`; the
        // kernel validates that the range is a mapping of ours.
        check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut reg) })
    }

    /// Registers `[addr, addr + len)` for minor faults.
    pub fn register_minor(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MINOR,
            ioctls: 0,
        };
        // SAFETY: as in `register`.
        check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut reg) })
    }

    /// Maps the existing page(s) at `[addr, addr + len)` after a minor fault
    /// and wakes the faulting thread.
    pub fn continue_range(&self, addr: u64, len: u64) -> io::Result<()> {
        loop {
            let mut c = UffdioContinue {
                range: UffdioRange { start: addr, len },
                ..Default::default()
            };
            // SAFETY: UFFDIO_CONTINUE reads/writes one `UffdioContinue`.
            let r = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_CONTINUE(), &mut c) };
            match self.outcome(r, addr, len)? {
                Some(_) => return Ok(()),
                None => continue,
            }
        }
    }

    /// Unregisters a range; threads still waiting in it are woken and fault
    /// again normally.
    pub fn unregister(&self, addr: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `UffdioRange`.
        check(unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER(), &range) })
    }

    /// Wakes threads waiting on `[addr, addr + len)`.
    pub fn wake(&self, addr: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads one `UffdioRange`.
        check(unsafe { ioctl_with_ref(&self.fd, UFFDIO_WAKE(), &range) })
    }

    /// Installs `data` (whole pages) at `addr` atomically, waking waiters.
    pub fn copy(&self, addr: u64, data: &[u8]) -> io::Result<Installed> {
        loop {
            let mut c = UffdioCopy {
                dst: addr,
                src: data.as_ptr() as u64,
                len: data.len() as u64,
                ..Default::default()
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes from `src`, which is the
            // live slice `data`, and writes only into the registered range.
            let r = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut c) };
            match self.outcome(r, addr, data.len() as u64)? {
                Some(i) => return Ok(i),
                None => continue,
            }
        }
    }

    /// Installs zero pages at `[addr, addr + len)`, waking waiters.
    pub fn zeropage(&self, addr: u64, len: u64) -> io::Result<Installed> {
        loop {
            let mut z = UffdioZeropage {
                range: UffdioRange { start: addr, len },
                ..Default::default()
            };
            // SAFETY: UFFDIO_ZEROPAGE reads/writes one `UffdioZeropage`.
            let r = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE(), &mut z) };
            match self.outcome(r, addr, len)? {
                Some(i) => return Ok(i),
                None => continue,
            }
        }
    }

    /// `EEXIST`: somebody installed it first, wake the waiters. `EAGAIN`:
    /// the mapping is changing, retry (`None`).
    fn outcome(&self, r: i32, addr: u64, len: u64) -> io::Result<Option<Installed>> {
        if r >= 0 {
            return Ok(Some(Installed::Now));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => {
                self.wake(addr, len)?;
                Ok(Some(Installed::AlreadyThere))
            }
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        }
    }

    /// Waits up to `timeout_ms` for a page fault; returns its address.
    pub fn next_fault(&self, timeout_ms: i32) -> io::Result<Option<u64>> {
        Ok(self.next_fault_flags(timeout_ms)?.map(|(a, _)| a))
    }

    /// Like `next_fault`, with the fault's flags (e.g. [`FAULT_FLAG_WRITE`]).
    pub fn next_fault_flags(&self, timeout_ms: i32) -> io::Result<Option<(u64, u64)>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes (one `struct uffd_msg`) into `msg`.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if r as usize != msg.len() || msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        // uffd_msg: event (8 bytes), then arg.pagefault.flags and .address.
        let flags = u64::from_le_bytes(msg[8..16].try_into().expect("8 bytes"));
        let addr = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
        Ok(Some((addr, flags)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread touching a registered memfd page sleeps until a handler
    /// installs it; a second install of the same page reports `EEXIST`.
    #[test]
    fn missing_fault_is_served_by_copy() {
        let size = 16 * 4096;
        // SAFETY: plain syscalls on a fresh memfd; the mapping is unmapped at the end.
        let (fd, base) = unsafe {
            let fd = libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, size as i64), 0);
            let p = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            (fd, p as u64)
        };
        let uffd = Userfault::new().expect("userfaultfd");
        uffd.register(base, size as u64).unwrap();
        let page = base + 5 * 4096;
        let reader = std::thread::spawn(move || {
            // SAFETY: `page` lies inside the live shared mapping.
            unsafe { std::ptr::read_volatile((page + 8) as *const u64) }
        });
        let fault = loop {
            if let Some(a) = uffd.next_fault(1000).unwrap() {
                break a;
            }
        };
        assert_eq!(fault & !4095, page);
        let data = [0x5au8; 4096];
        assert_eq!(uffd.copy(page, &data).unwrap(), Installed::Now);
        assert_eq!(reader.join().unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
        assert_eq!(uffd.copy(page, &data).unwrap(), Installed::AlreadyThere);
        assert_eq!(uffd.zeropage(base, 4096).unwrap(), Installed::Now);
        uffd.unregister(base, size as u64).unwrap();
        // SAFETY: unmapping what we mapped above; closing our fd.
        unsafe {
            libc::munmap(base as *mut libc::c_void, size);
            libc::close(fd);
        }
    }
}
