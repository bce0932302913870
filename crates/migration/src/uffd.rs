//! userfaultfd, through raw ioctls (the kernel ABI is small and stable).
//!
//! Shared by post-copy migration ([`crate::postcopy`]) and lazy restore from a
//! snapshot file ([`crate::lazy`]). The descriptor is opened WITHOUT
//! `UFFD_USER_MODE_ONLY`: on kvm-pvm a user-mode-only userfaultfd does not see
//! the faults KVM takes on guest memory. Ranges are registered in missing mode
//! on the shared memfd mapping and filled with `UFFDIO_COPY` (or
//! `UFFDIO_ZEROPAGE`); EEXIST means the page is already there. Memory on
//! huge pages is registered for minor faults too and written through a
//! second mapping, then mapped a whole huge page at a time
//! (`UFFDIO_CONTINUE`); so is prefaulted 4 KiB memory, mapped a run at a
//! time. A background save ([`crate::background_save`])
//! registers them in write-protect mode instead, to copy each page before
//! the guest changes it. Each of them serves its faults through
//! `Uffd::each_fault`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

const UFFD_API: u64 = 0xAA;
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const READ_WRITE: u64 = 3;
const READ: u64 = 2;
const UFFDIO_API: u64 = ioc(READ_WRITE, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(READ_WRITE, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(READ, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(READ, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(READ_WRITE, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(READ_WRITE, 0x04, 32);
const UFFDIO_WRITEPROTECT: u64 = ioc(READ_WRITE, 0x06, 24);
const UFFDIO_CONTINUE: u64 = ioc(READ_WRITE, 0x07, 32);
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 4;
/// Minor faults on hugetlbfs mappings: the page is in the file but not
/// mapped here (Linux 5.13).
const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// Minor faults on shmem mappings (Linux 5.14).
const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const IOCTL_CONTINUE_BIT: u64 = 1 << 0x07;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
/// Write-protection of shmem (our memfd) mappings.
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const IOCTL_WRITEPROTECT_BIT: u64 = 1 << 0x06;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const IOCTL_COPY_BIT: u64 = 1 << 0x03;
const IOCTL_ZEROPAGE_BIT: u64 = 1 << 0x04;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}
#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct Continue {
    range: Range,
    mode: u64,
    mapped: i64,
}
#[repr(C)]
struct WriteProtect {
    range: Range,
    mode: u64,
}
#[repr(C)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Msg {
    event: u8,
    _r1: u8,
    _r2: u16,
    _r3: u32,
    flags: u64,
    address: u64,
    _ptid: u32,
    _pad: u32,
}

/// A userfaultfd (kernel faults included: no user-mode-only flag, so KVM's
/// accesses to guest memory are reported too).
pub struct Uffd {
    fd: OwnedFd,
    /// UFFDIO_ZEROPAGE is available on the registered ranges.
    zeropage: std::sync::atomic::AtomicBool,
}

fn ioctl<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is the structure the request expects, alive for the call.
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    pub fn new() -> io::Result<Self> {
        Self::with_features(0)
    }

    /// A userfaultfd for write-protect faults on the memfd's mappings.
    pub fn for_write_protect() -> io::Result<Self> {
        Self::with_features(UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    }

    /// A userfaultfd that also sees minor faults (see
    /// [`Uffd::register_with_minor`]) on huge-page mappings (`huge`), or on
    /// shmem mappings (Linux 5.14).
    pub fn for_minor_faults(huge: bool) -> io::Result<Self> {
        Self::with_features(if huge {
            UFFD_FEATURE_MINOR_HUGETLBFS
        } else {
            UFFD_FEATURE_MINOR_SHMEM
        })
    }

    fn with_features(features: u64) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just got and nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = Api {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
        Ok(Uffd {
            fd,
            zeropage: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Registers `[start, start+len)` in `mode`; returns the ioctls the
    /// range supports.
    fn register_mode(&self, start: u64, len: u64, mode: u64) -> io::Result<u64> {
        let mut r = Register {
            range: Range { start, len },
            mode,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// Registers `[start, start+len)` for missing-page faults.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let ioctls = self.register_mode(start, len, UFFDIO_REGISTER_MODE_MISSING)?;
        if ioctls & IOCTL_COPY_BIT == 0 {
            return Err(io::Error::other(
                "userfaultfd cannot fill this mapping (no UFFDIO_COPY)",
            ));
        }
        self.zeropage.store(
            ioctls & IOCTL_ZEROPAGE_BIT != 0,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// Registers `[start, start+len)`, memory on huge pages or prefaulted
    /// shmem, for missing-page
    /// faults and for minor faults: a page that is in the file (written
    /// through another mapping) but not mapped here faults until
    /// [`Uffd::map_present`] maps it.
    pub fn register_with_minor(&self, start: u64, len: u64) -> io::Result<()> {
        let mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR;
        let ioctls = self.register_mode(start, len, mode)?;
        if ioctls & IOCTL_CONTINUE_BIT == 0 {
            return Err(io::Error::other(
                "userfaultfd cannot resolve minor faults on this mapping (no UFFDIO_CONTINUE)",
            ));
        }
        Ok(())
    }

    /// Maps the pages of `[dst, dst+len)` that are in the file but not
    /// mapped here (`UFFDIO_CONTINUE`) and wakes their waiters, whichever
    /// kind of fault they took. Ok(false): the first page was mapped
    /// already (the range is woken, and the rest of it not looked at: for
    /// ranges known to be mapped or unmapped whole; else
    /// [`Uffd::map_present_pages`]).
    pub fn map_present(&self, dst: u64, len: u64) -> io::Result<bool> {
        let mut c = Continue {
            range: Range { start: dst, len },
            mode: 0,
            mapped: 0,
        };
        match ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE, &mut c) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.wake(dst, len)?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Maps the pages of `[dst, dst+len)` that are in the file and not
    /// mapped here (`UFFDIO_CONTINUE`), going on around those mapped
    /// already or absent from the file.
    pub fn map_present_pages(&self, dst: u64, len: u64) -> io::Result<()> {
        const PAGE: u64 = 4096;
        let end = dst + len;
        let mut at = dst;
        while at < end {
            let mut c = Continue {
                range: Range {
                    start: at,
                    len: end - at,
                },
                mode: 0,
                mapped: 0,
            };
            match ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE, &mut c) {
                Ok(()) => return Ok(()),
                // Mapped up to a page that is mapped already (EEXIST) or
                // not in the file (EFAULT): that page is stepped over next.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && c.mapped > 0 => {
                    at += c.mapped as u64
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EEXIST | libc::EFAULT | libc::EAGAIN)
                    ) =>
                {
                    at += PAGE
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Registers `[start, start+len)` for write-protect faults.
    pub fn register_wp(&self, start: u64, len: u64) -> io::Result<()> {
        let ioctls = self.register_mode(start, len, UFFDIO_REGISTER_MODE_WP)?;
        if ioctls & IOCTL_WRITEPROTECT_BIT == 0 {
            return Err(io::Error::other(
                "userfaultfd cannot write-protect this mapping",
            ));
        }
        Ok(())
    }

    /// Write-protects `[start, start+len)` (`on`), or lifts the protection
    /// and wakes the threads waiting to write there.
    pub fn write_protect(&self, start: u64, len: u64, on: bool) -> io::Result<()> {
        let mut w = WriteProtect {
            range: Range { start, len },
            mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut w)
    }

    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start, len };
        ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r)
    }

    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start, len };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r)
    }

    /// Fills the missing page at `dst` with the 4 KiB at `src` and wakes its
    /// waiters. Ok(false): the page was already there (EEXIST), and nothing
    /// is woken: the caller wakes a waiter of its own.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<bool> {
        let mut filled = false;
        self.fill_run(dst, Some(src), src.len() as u64, |_, f| filled |= f)?;
        Ok(filled)
    }

    /// Fills the missing pages of `[dst, dst + len)` in as few `UFFDIO_COPY`
    /// calls as the pages already there allow (one when none is): `src` holds
    /// `len` bytes of data, or is `None` for zeros (`UFFDIO_ZEROPAGE` where
    /// the range supports it). Wakes the waiters of the pages it fills (not
    /// of those already there); calls `each(i, filled)` for every page `i`
    /// of the run, `filled` false when it was already there.
    /// One call per run instead of per page saves about a third of the cost
    /// of a fresh page.
    pub fn fill_run(
        &self,
        dst: u64,
        src: Option<&[u8]>,
        len: u64,
        mut each: impl FnMut(u64, bool),
    ) -> io::Result<()> {
        const PAGE: u64 = 4096;
        if src.is_some_and(|s| s.len() as u64 != len) || !len.is_multiple_of(PAGE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a run is whole pages, with as many bytes of data",
            ));
        }
        let zeropage = self.zeropage.load(std::sync::atomic::Ordering::Relaxed);
        let mut done = 0u64;
        // EAGAIN with nothing moved (the mapping changing under the call):
        // tried again a bounded number of times, never spun on.
        let mut stuck = 0u32;
        while done < len {
            let (r, moved) = if let Some(s) = src {
                let mut c = Copy {
                    dst: dst + done,
                    src: s[done as usize..].as_ptr() as u64,
                    len: len - done,
                    mode: 0,
                    copy: 0,
                };
                (ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c), c.copy)
            } else if zeropage {
                let mut z = Zeropage {
                    range: Range {
                        start: dst + done,
                        len: len - done,
                    },
                    mode: 0,
                    zeropage: 0,
                };
                (
                    ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z),
                    z.zeropage,
                )
            } else {
                // No UFFDIO_ZEROPAGE on this range: copy zeros a page at a time.
                static ZERO: [u8; 4096] = [0; 4096];
                each(done / PAGE, self.copy(dst + done, &ZERO)?);
                done += PAGE;
                continue;
            };
            match r {
                Ok(()) => {
                    (done / PAGE..len / PAGE).for_each(|i| each(i, true));
                    done = len;
                }
                // Part of the run was filled: the next page is there already,
                // or the mapping changed under the call.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if moved > 0 {
                        let upto = done + (moved as u64 / PAGE) * PAGE;
                        (done / PAGE..upto / PAGE).for_each(|i| each(i, true));
                        done = upto;
                        stuck = 0;
                    } else if stuck >= 1000 {
                        return Err(io::Error::new(
                            io::ErrorKind::WouldBlock,
                            format!("filling guest page {:#x}: EAGAIN 1000 times", dst + done),
                        ));
                    } else {
                        stuck += 1;
                        std::thread::yield_now();
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    each(done / PAGE, false);
                    done += PAGE;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Maps zeros at the missing page(s) `[dst, dst+len)` and wakes their
    /// waiters, with `UFFDIO_ZEROPAGE` where the range supports it, else by
    /// copying zeros. Ok(false): every page was already there (EEXIST).
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<bool> {
        let mut filled = false;
        self.fill_run(dst, None, len, |_, f| filled |= f)?;
        Ok(filled)
    }

    /// Calls `f` with the page address of each fault, polling every
    /// `poll_ms`, until `stop`; the first error, of the read or of `f`, ends it.
    pub(crate) fn each_fault(
        &self,
        stop: &AtomicBool,
        poll_ms: i32,
        mut f: impl FnMut(u64) -> crate::Result<()>,
    ) -> crate::Result<()> {
        let mut addrs = Vec::new();
        while !stop.load(Ordering::Acquire) {
            addrs.clear();
            self.read_faults(poll_ms, &mut addrs)
                .map_err(crate::io_err("reading userfaultfd"))?;
            for &a in &addrs {
                f(a & !(vmm::memory::PAGE_SIZE - 1))?;
            }
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for page faults; appends their addresses.
    pub fn read_faults(&self, timeout_ms: i32, out: &mut Vec<u64>) -> io::Result<()> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(());
        }
        let mut msgs = [Msg::default(); 32];
        // SAFETY: reading into a buffer of whole messages we own.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr() as *mut libc::c_void,
                std::mem::size_of_val(&msgs),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                _ => Err(e),
            };
        }
        let n = n as usize / std::mem::size_of::<Msg>();
        for m in &msgs[..n] {
            if m.event == UFFD_EVENT_PAGEFAULT {
                let _ = m.flags;
                out.push(m.address);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_spans_split_at_mappings() {
        // RAM in two mappings, as around the MMIO hole.
        let map = RamMap {
            ranges: vec![(0, 0x4000, 0x10_0000), (0x4000, 0x4000, 0x90_0000)],
        };
        assert_eq!(map.host_spans(0x1000, 0x2000), [(0x10_1000, 0x2000)]);
        assert_eq!(
            map.host_spans(0x3000, 0x2000),
            [(0x10_3000, 0x1000), (0x90_0000, 0x1000)]
        );
        assert_eq!(map.host_spans(0x7000, 0x4000), [(0x90_3000, 0x1000)]);
        assert!(map.host_spans(0x8000, 0x1000).is_empty());
        assert_eq!(
            map.host_ranges(),
            [(0x10_0000, 0x4000), (0x90_0000, 0x4000)]
        );
    }

    /// A missing page is filled once (then EEXIST), a page written before
    /// the registration is not missing, and a punched one is missing again.
    #[test]
    fn zeropage_and_copy_fill_missing_pages_once() {
        let ram = vmm::GuestRam::new(16 << 20).unwrap();
        let (r, host) = ram.host_ranges()[0];
        ram.write(r.guest_addr, &[3; 4096]).unwrap();
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) => {
                eprintln!("SKIP: userfaultfd unavailable: {e}");
                return;
            }
        };
        uffd.register(host as u64, r.len).unwrap();
        assert!(!uffd.copy(host as u64, &[9u8; 4096]).unwrap(), "present");
        let p = host as u64 + 4 * 4096;
        assert!(uffd.zeropage(p, 4096).unwrap());
        assert!(!uffd.zeropage(p, 4096).unwrap());
        assert!(!uffd.copy(p, &[7u8; 4096]).unwrap());
        let q = p + 4096;
        assert!(uffd.copy(q, &[7u8; 4096]).unwrap());
        assert!(!uffd.zeropage(q, 4096).unwrap());
        vmm::memory::punch_hole(ram.memfd(), 0, 4096).unwrap();
        assert!(uffd.copy(host as u64, &[9u8; 4096]).unwrap(), "punched");
        uffd.unregister(host as u64, r.len).unwrap();
        // SAFETY: the pages are mapped (filled above) inside guest RAM.
        let (a, b, c) = unsafe { (*(p as *const u8), *(q as *const u8), *(host as *const u8)) };
        assert_eq!((a, b, c), (0, 7, 9));
    }

    #[test]
    fn a_run_maps_to_one_host_range_or_none() {
        let m = RamMap {
            ranges: vec![(0, 0x2000, 0x10000), (0x2000, 0x2000, 0x90000)],
        };
        assert_eq!(m.host_run(0, 0x2000), Some(0x10000));
        assert_eq!(m.host_run(0x3000, 0x1000), Some(0x91000));
        assert_eq!(m.host_run(0x1000, 0x2000), None, "spans both mappings");
        assert_eq!(m.host_run(0x3000, 0x2000), None, "runs past RAM");
        assert_eq!(m.host_run(0x1000, u64::MAX), None);
    }

    #[test]
    fn a_run_fills_around_pages_already_there() {
        let ram = vmm::GuestRam::new(16 << 20).unwrap();
        let (r, host) = ram.host_ranges()[0];
        let Ok(uffd) = Uffd::new() else {
            eprintln!("SKIP: userfaultfd unavailable");
            return;
        };
        uffd.register(host as u64, r.len).unwrap();
        let base = host as u64;
        // Pages 2 and 5 of the 8-page run are there before it comes.
        assert!(uffd.copy(base + 2 * 4096, &[1u8; 4096]).unwrap());
        assert!(uffd.zeropage(base + 5 * 4096, 4096).unwrap());
        let data: Vec<u8> = (0..8u8).flat_map(|i| [i + 10; 4096]).collect();
        let mut seen = Vec::new();
        uffd.fill_run(base, Some(&data), 8 * 4096, |i, filled| {
            seen.push((i, filled))
        })
        .unwrap();
        let want: Vec<(u64, bool)> = (0..8).map(|i| (i, i != 2 && i != 5)).collect();
        assert_eq!(seen, want);
        // A zero run over pages 6..10: 6 and 7 are there now.
        seen.clear();
        uffd.fill_run(base + 6 * 4096, None, 4 * 4096, |i, f| seen.push((i, f)))
            .unwrap();
        assert_eq!(seen, vec![(0, false), (1, false), (2, true), (3, true)]);
        uffd.unregister(host as u64, r.len).unwrap();
        // SAFETY: pages 0..10 of guest RAM are all filled above.
        let first = |i: u64| unsafe { *((base + i * 4096) as *const u8) };
        let got: Vec<u8> = (0..10).map(first).collect();
        assert_eq!(got, vec![10, 11, 1, 13, 14, 0, 16, 17, 0, 0]);
        assert!(uffd
            .fill_run(base, Some(&data[..100]), 4096, |_, _| {})
            .is_err());
    }
}

/// Guest RAM as userfaultfd sees it: host address ranges by memfd offset.
#[derive(Clone, Debug)]
pub struct RamMap {
    /// (memfd offset, length, host address) of each RAM range.
    ranges: Vec<(u64, u64, u64)>,
}

impl RamMap {
    /// The mappings of `ram`.
    pub fn new(ram: &vmm::GuestRam) -> Self {
        RamMap {
            ranges: ram
                .host_ranges()
                .into_iter()
                .map(|(r, p)| (r.file_offset, r.len, p as u64))
                .collect(),
        }
    }

    /// Host address of memfd offset `off`.
    pub fn host(&self, off: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|(o, l, _)| off >= *o && off < o + l)
            .map(|(o, _, h)| h + (off - o))
    }

    /// Host address of memfd offsets `[off, off + len)` when they lie in one
    /// mapping (so that one call can fill them); `None` otherwise.
    pub fn host_run(&self, off: u64, len: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|(o, l, _)| off >= *o && off.checked_add(len).is_some_and(|e| e <= o + l))
            .map(|(o, _, h)| h + (off - o))
    }

    /// Pages of RAM (memfd offsets 0 to the end of the last range).
    pub fn pages(&self) -> u64 {
        self.ranges
            .iter()
            .map(|&(o, l, _)| o + l)
            .max()
            .unwrap_or(0)
            / 4096
    }

    /// (host address, length) of each RAM mapping.
    pub fn host_ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|&(_, l, h)| (h, l)).collect()
    }

    /// The host spans of memfd offsets `[off, off + len)`: one per mapping it
    /// touches, (host address, length); parts outside RAM are left out.
    pub fn host_spans(&self, off: u64, len: u64) -> Vec<(u64, u64)> {
        let end = off.saturating_add(len);
        self.ranges
            .iter()
            .filter_map(|&(o, l, h)| {
                let (from, to) = (off.max(o), end.min(o + l));
                (from < to).then(|| (h + (from - o), to - from))
            })
            .collect()
    }

    /// Memfd offset of host address `addr`.
    pub fn offset(&self, addr: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|(_, l, h)| addr >= *h && addr < h + l)
            .map(|(o, _, h)| o + (addr - h))
    }

    /// Registers all of RAM with `uffd` for missing-page faults and, with
    /// `minor` (RAM on huge pages), minor faults too (see
    /// [`Uffd::register_with_minor`]).
    pub fn register(&self, uffd: &Uffd, minor: bool) -> io::Result<()> {
        for &(_, len, host) in &self.ranges {
            if minor {
                uffd.register_with_minor(host, len)?;
            } else {
                uffd.register(host, len)?;
            }
        }
        Ok(())
    }

    /// Unregisters all of RAM; tries every range, returns the first error.
    pub fn unregister(&self, uffd: &Uffd) -> io::Result<()> {
        let mut first = Ok(());
        for &(_, len, host) in &self.ranges {
            if let Err(e) = uffd.unregister(host, len) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}
