//! Guest RAM: one memfd mapped as KVM memory slots, with the x86 memory map.
//!
//! RAM is a single memfd so that another process (a restored VM, a helper) can map
//! the same pages and userfaultfd can be registered on it. With huge pages on
//! ([`set_huge_pages`]) the memfd is on hugetlbfs: 2 MiB pages from the host's
//! reserved pool (`vm.nr_hugepages`), all reserved when the RAM is made, so
//! that a short pool fails then, with a message, instead of a fault later.
//! hugetlbfs has no `write` and no `sendfile`: such RAM is written and sent
//! through its mapping, and userfaultfd fills it 2 MiB at a time (post-copy
//! stages its pages per huge page; lazy restore refuses it). Guest physical
//! layout:
//! `[0, min(size, 3 GiB))` and, above 3 GiB of RAM, `[4 GiB, 4 GiB + rest)`,
//! leaving the 32-bit MMIO hole (LAPIC, IOAPIC) free.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::{Error, Result};

mod written;
pub use written::{drop_from_mapping, WrittenPages};

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a huge page (x86-64's 2 MiB, the hugetlbfs default).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the 32-bit MMIO hole: high RAM starts here.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// Smallest guest we accept.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest we accept at all (a sanity bound well above any host here).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Whether RAM made in this process goes on huge pages (`migd run --hugepages`).
static HUGE_PAGES: AtomicBool = AtomicBool::new(false);

/// Puts RAM made from now on in this process on huge pages, or not.
pub fn set_huge_pages(on: bool) {
    HUGE_PAGES.store(on, Ordering::Relaxed);
}

/// Whether RAM made now goes on huge pages.
pub fn huge_pages() -> bool {
    HUGE_PAGES.load(Ordering::Relaxed)
}

/// Whether RAM made in this process is allocated whole when made (`migd run
/// --prefault`).
static PREFAULT: AtomicBool = AtomicBool::new(false);

/// Allocates RAM made from now on in this process whole when it is made
/// ([`GuestRam::prefault`]), or not.
pub fn set_prefault(on: bool) {
    PREFAULT.store(on, Ordering::Relaxed);
}

/// One contiguous piece of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the first byte in the memfd.
    pub file_offset: u64,
}

/// The guest physical ranges of RAM for a guest of `size` bytes.
pub fn ram_layout(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        guest_addr: 0,
        len: low,
        file_offset: 0,
    }];
    if size > low {
        ranges.push(RamRange {
            guest_addr: MMIO_HOLE_END,
            len: size - low,
            file_offset: low,
        });
    }
    ranges
}

/// Checks a requested memory size against our bounds and what the host has.
pub fn check_memory_size(size: u64) -> Result<()> {
    check_memory_bounds(size)?;
    if let Some(avail) = host_available_memory() {
        if size > avail {
            return Err(Error::MemoryTooLarge {
                requested_mib: size >> 20,
                available_mib: avail >> 20,
            });
        }
    }
    Ok(())
}

/// Checks a requested memory size against our bounds alone (at least
/// [`MIN_MEMORY`], whole 2 MiB, at most [`MAX_MEMORY`]), as a daemon does
/// before it starts a VM process (which memory it comes from is its call).
pub fn check_memory_bounds(size: u64) -> Result<()> {
    if size < MIN_MEMORY {
        return Err(Error::MemorySize {
            size,
            reason: format!("at least {} MiB is needed", MIN_MEMORY >> 20),
        });
    }
    if !size.is_multiple_of(2 << 20) {
        return Err(Error::MemorySize {
            size,
            reason: "must be a multiple of 2 MiB".into(),
        });
    }
    if size > MAX_MEMORY {
        return Err(Error::MemorySize {
            size,
            reason: format!("more than {} GiB", MAX_MEMORY >> 30),
        });
    }
    Ok(())
}

/// Bytes of the host's huge page pool that new guest RAM can still reserve:
/// pages free and not reserved by RAM made before.
pub fn huge_pages_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let free = meminfo_field(&text, "HugePages_Free:")?;
    let reserved = meminfo_field(&text, "HugePages_Rsvd:")?;
    let kib = meminfo_field(&text, "Hugepagesize:")?;
    Some(free.saturating_sub(reserved) * kib * 1024)
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(meminfo_field(&text, "MemAvailable:")? * 1024)
}

/// MemAvailable + SwapFree from /proc/meminfo, in bytes.
fn host_available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |name| meminfo_field(&text, name);
    Some((kib("MemAvailable:")? + kib("SwapFree:").unwrap_or(0)) * 1024)
}

/// The number on the line of /proc/meminfo's `text` that starts with `name`
/// (KiB for sizes, a count for huge pages).
fn meminfo_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Guest RAM backed by a memfd.
pub struct GuestRam {
    memfd: File,
    size: u64,
    ranges: Vec<RamRange>,
    mem: GuestMemoryMmap,
    huge: bool,
    /// Every page in the file was faulted in through this process's
    /// mappings of it (the RAM was made here, not handed over): on huge
    /// pages, which cannot be asked for their holes, what those mappings
    /// map is what holds data (see [`GuestRam::data_extents`]). Set too
    /// for RAM handed over with the list of its pages with data
    /// ([`GuestRam::count_data_from_mappings`]).
    mapped_here: AtomicBool,
    /// 4 KiB pages, prefaulted: a second mapping of all of RAM with its
    /// page tables made (see [`GuestRam::prefaulted_alias`]).
    alias: std::sync::OnceLock<RamAlias>,
    /// 4 KiB pages, prefaulted here, RAM's mappings locked: the pages
    /// written through other mappings (see [`GuestRam::written_pages`]).
    written: std::sync::OnceLock<std::sync::Arc<WrittenPages>>,
    /// RAM's own mappings are locked on fault ([`GuestRam::lock_on_fault`]).
    locked: AtomicBool,
    /// The host was once seen letting shmem use huge pages: RAM's page
    /// tables may have forgotten pages since ([`GuestRam::tables_trusted`]).
    tables_untrusted: AtomicBool,
}

impl GuestRam {
    /// Creates zeroed RAM of `size` bytes in a new memfd (on huge pages where
    /// [`huge_pages`] says so).
    pub fn new(size: u64) -> Result<Self> {
        Self::with_huge_pages(size, huge_pages())
    }

    /// Creates zeroed RAM of `size` bytes in a new memfd, on huge pages or not.
    pub fn with_huge_pages(size: u64, huge: bool) -> Result<Self> {
        use nix::sys::memfd::MemFdCreateFlag as F;
        check_memory_size(size)?;
        let flags = if huge {
            F::MFD_CLOEXEC | F::MFD_HUGETLB
        } else {
            F::MFD_CLOEXEC
        };
        let fd = nix::sys::memfd::memfd_create(c"migd-guest-ram", flags).map_err(|e| {
            Error::GuestMemory(format!(
                "memfd_create{}: {e}",
                if huge { " on huge pages" } else { "" }
            ))
        })?;
        let file = File::from(fd);
        file.set_len(size)
            .map_err(|e| Error::GuestMemory(format!("sizing memfd to {size} bytes: {e}")))?;
        if huge {
            reserve_huge_pages(&file, size)?;
        }
        let ram = Self::map(file, size)?;
        ram.mapped_here.store(true, Ordering::Relaxed);
        if PREFAULT.load(Ordering::Relaxed) {
            ram.prefault()?;
        }
        Ok(ram)
    }

    /// Allocates every page of RAM now (`fallocate`), as QEMU's
    /// `-mem-prealloc` does, so that no write to a page later waits for the
    /// kernel to allocate and zero it, which an incoming migration otherwise
    /// pays while it receives (on huge pages ~18 ms per 230 MiB here; on
    /// 4 KiB pages ~70 ms per 256 MiB).
    ///
    /// On huge pages the pages stay unmapped, so [`GuestRam::data_extents`]
    /// still counts only those written. On 4 KiB pages a second mapping of
    /// RAM is made too, with its page tables
    /// ([`GuestRam::prefaulted_alias`]): a post-copy destination writes
    /// arriving pages through it, since userfaultfd cannot fill a page that
    /// exists. There every page is in the file; for RAM made here, RAM's
    /// own mappings are locked on fault, and the data are what they map
    /// and what was written through other mappings
    /// ([`GuestRam::written_pages`]); elsewhere, or where they cannot be
    /// locked, all of RAM counts as data.
    ///
    /// Several threads share the work, one slice of RAM each (as QEMU's
    /// `prealloc-threads`): one per core, at most 16, and none for less
    /// than 256 MiB.
    pub fn prefault(&self) -> Result<()> {
        let alias = match self.huge || self.alias.get().is_some() {
            true => None,
            false => Some(RamAlias::new(self)?),
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get() as u64)
            .clamp(1, 16)
            .min((self.size >> 28).max(1));
        let slice = self.size.div_ceil(threads).next_multiple_of(HUGE_PAGE_SIZE);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|i| i * slice)
                .filter(|&off| off < self.size)
                .map(|off| {
                    let len = slice.min(self.size - off);
                    let alias = alias.as_ref();
                    s.spawn(move || self.prefault_slice(off, len, alias))
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(Error::GuestMemory(
                        "a thread allocating memory panicked".into(),
                    ))
                })
            })
        })?;
        if let Some(alias) = alias {
            let _ = self.alias.set(alias);
            if self.mapped_here.load(Ordering::Relaxed) && self.lock_on_fault() {
                let _ = self
                    .written
                    .set(std::sync::Arc::new(WrittenPages::new(self.size)));
            }
        }
        Ok(())
    }

    /// Locks RAM's own mappings on fault (`mlock2(MLOCK_ONFAULT)`): each
    /// page stays mapped from its first touch, which no reclaim, swap or
    /// `MADV_PAGEOUT` undoes, so that their page tables name every page
    /// touched through them. False (nothing locked) where it fails, e.g.
    /// under a small `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`, or where shmem
    /// may use transparent huge pages (whose collapse unmaps pages anyway).
    fn lock_on_fault(&self) -> bool {
        if !written::shmem_stays_small() {
            tracing::info!(
                "shmem may use transparent huge pages here (shmem_enabled), whose collapse \
                 unmaps locked pages too: all of prefaulted RAM counts as data"
            );
            return false;
        }
        let maps = self.host_ranges();
        for (i, (r, p)) in maps.iter().enumerate() {
            // SAFETY: locks (on fault) a mapping this RAM owns; no memory is touched.
            let rc = unsafe {
                libc::mlock2(
                    *p as *const libc::c_void,
                    r.len as usize,
                    libc::MLOCK_ONFAULT,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                tracing::info!(
                    "cannot lock guest RAM's mappings ({e}): all of prefaulted RAM counts as data"
                );
                for (r, p) in &maps[..i] {
                    // SAFETY: unlocks what was locked just above.
                    unsafe { libc::munlock(*p as *const libc::c_void, r.len as usize) };
                }
                return false;
            }
        }
        self.locked.store(true, Ordering::Release);
        true
    }

    /// 4 KiB RAM handed over by a process that knows its pages with data
    /// (see [`GuestRam::adopt_data_extents`]): locks RAM's mappings on
    /// fault, before the VM runs here, so that their page tables name every
    /// page touched from now on. False where refused (or on huge pages,
    /// which need no lock).
    pub fn track_mappings(&self) -> bool {
        !self.huge && self.lock_on_fault()
    }

    /// RAM handed over from another process: from now on
    /// [`GuestRam::data_extents`] counts `extents` (memfd offset, length;
    /// the old process's list, taken once the VM could no longer write
    /// there) and what this process's mappings map. On huge pages by
    /// mapping them here ([`GuestRam::map_extents`]); on 4 KiB pages whose
    /// mappings were locked first ([`GuestRam::track_mappings`]) by noting
    /// them written; there an extent outside RAM is an error, and changes
    /// nothing. Elsewhere nothing changes: all of RAM counts.
    pub fn adopt_data_extents(&self, extents: &[(u64, u64)]) -> Result<()> {
        if self.huge {
            self.map_extents(extents)?;
            self.count_data_from_mappings();
        } else if self.locked.load(Ordering::Acquire) && self.written.get().is_none() {
            self.check_extents(extents)?;
            let written = WrittenPages::new(self.size);
            for &(off, len) in extents {
                written.mark(off, len);
            }
            // Set once marked: until then all of RAM counts.
            let _ = self.written.set(std::sync::Arc::new(written));
        }
        Ok(())
    }

    /// Prefaulted 4 KiB RAM made here (see [`GuestRam::prefault`]): the
    /// record where whoever writes RAM through a mapping other than RAM's
    /// own (the second mapping, a restore's) notes the pages first, for
    /// [`GuestRam::data_extents`]. None for other RAM, whose writers need
    /// note nothing.
    pub fn written_pages(&self) -> Option<&std::sync::Arc<WrittenPages>> {
        self.written.get()
    }

    /// [`GuestRam::prefault`] of the `len` bytes from memfd offset `off`:
    /// allocated, and mapped in `alias` (4 KiB pages).
    fn prefault_slice(&self, off: u64, len: u64, alias: Option<&RamAlias>) -> Result<()> {
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.memfd.as_raw_fd(), 0, off as i64, len as i64) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::GuestMemory(if self.huge {
                format!(
                    "allocating {} MiB of huge pages up front: {e} ({})",
                    self.size >> 20,
                    huge_pool_summary()
                )
            } else {
                format!("allocating {} MiB of memory up front: {e}", self.size >> 20)
            }));
        }
        alias.map_or(Ok(()), |a| a.populate(off, len))
    }

    /// 4 KiB pages made with [`GuestRam::prefault`]: the second mapping of
    /// all of RAM, page tables made, that writes into the file without a
    /// page fault per page. None otherwise.
    pub fn prefaulted_alias(&self) -> Option<&RamAlias> {
        self.alias.get()
    }

    /// Whether this RAM is on huge pages (hugetlbfs).
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    /// Maps existing RAM handed over by another process.
    pub fn from_fd(fd: OwnedFd, size: u64) -> Result<Self> {
        let file = File::from(fd);
        let len = file
            .metadata()
            .map_err(|e| Error::GuestMemory(format!("stat of handed-over memory: {e}")))?
            .len();
        if len != size {
            return Err(Error::GuestMemory(format!(
                "handed-over memory is {len} bytes, the VM needs {size}"
            )));
        }
        Self::map(file, size)
    }

    fn map(file: File, size: u64) -> Result<Self> {
        let ranges = ram_layout(size);
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let dup = file
                .try_clone()
                .map_err(|e| Error::GuestMemory(format!("dup memfd: {e}")))?;
            regions.push((
                GuestAddress(r.guest_addr),
                r.len as usize,
                Some(FileOffset::new(dup, r.file_offset)),
            ));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(regions)
            .map_err(|e| Error::GuestMemory(format!("mmap: {e}")))?;
        for region in mem.iter() {
            dont_dump(
                region.as_ptr(),
                vm_memory::GuestMemoryRegion::len(region) as usize,
            );
        }
        Ok(GuestRam {
            huge: is_hugetlbfs(&file),
            mapped_here: AtomicBool::new(false),
            alias: std::sync::OnceLock::new(),
            written: std::sync::OnceLock::new(),
            locked: AtomicBool::new(false),
            tables_untrusted: AtomicBool::new(false),
            memfd: file,
            size,
            ranges,
            mem,
        })
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM ranges in guest physical address order.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// The vm-memory view, for loaders.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd that holds all of RAM (memfd offset = position in `ranges` order).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// A new descriptor for the memfd, to hand to another process.
    pub fn dup_memfd(&self) -> Result<OwnedFd> {
        self.memfd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::GuestMemory(format!("dup memfd: {e}")))
    }

    /// Host address of each range, for KVM memory slots and fast scans.
    pub fn host_ranges(&self) -> Vec<(RamRange, *mut u8)> {
        self.mem
            .iter()
            .zip(&self.ranges)
            .map(|(region, r)| (*r, region.as_ptr()))
            .collect()
    }

    /// [`GuestRam::host_ranges`] as (file offset, length, host address).
    fn host_maps(&self) -> Vec<(u64, u64, usize)> {
        self.host_ranges()
            .into_iter()
            .map(|(r, p)| (r.file_offset, r.len, p as usize))
            .collect()
    }

    /// Converts an offset in the memfd to a guest physical address.
    pub fn offset_to_gpa(&self, offset: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|r| offset >= r.file_offset && offset < r.file_offset + r.len)
            .map(|r| r.guest_addr + (offset - r.file_offset))
    }

    /// Converts a guest physical address to an offset in the memfd.
    pub fn gpa_to_offset(&self, gpa: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|r| gpa >= r.guest_addr && gpa < r.guest_addr + r.len)
            .map(|r| r.file_offset + (gpa - r.guest_addr))
    }

    /// Reads guest memory at a guest physical address.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| Error::GuestMemory(format!("read {} bytes at {gpa:#x}: {e}", buf.len())))
    }

    /// Writes guest memory at a guest physical address.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| Error::GuestMemory(format!("write {} bytes at {gpa:#x}: {e}", data.len())))
    }

    /// Host memory the guest RAM takes now, bytes: the pages of the memfd
    /// that exist (written, or read through a mapping); holes take none.
    pub fn used_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .memfd
            .metadata()
            .map_err(|e| Error::GuestMemory(format!("fstat of guest RAM: {e}")))?;
        Ok(m.blocks() * 512)
    }

    /// Data extents of the memfd as (offset, len), skipping holes never written.
    ///
    /// Uses `SEEK_DATA`/`SEEK_HOLE`, so untouched memory costs nothing to skip.
    /// hugetlbfs has neither: there the extents are the huge pages that this
    /// process's mappings map (`/proc/self/pagemap`, one entry per huge
    /// page; see [`mapped_huge_extents`]), which are all
    /// that hold data when every page was faulted in through them, as in RAM
    /// made here. The guest, KVM and the VMM all touch RAM through them (a
    /// post-copy destination writes through a second mapping, but maps each
    /// huge page into these before the phase ends). RAM handed over from
    /// another process counts whole, unless it came with the old process's
    /// list ([`GuestRam::map_extents`]). Prefaulted 4 KiB RAM, whose pages
    /// all exist, counts likewise the pages its own mappings map, and those
    /// noted in [`GuestRam::written_pages`], while the host keeps shmem on
    /// small pages (see `GuestRam::tables_trusted`).
    pub fn data_extents(&self) -> Result<Vec<(u64, u64)>> {
        if self.extents_from_mappings() {
            return self.mapped_huge_pages();
        }
        let marks = self.written.get();
        if let Some(marks) = marks.filter(|_| self.tables_trusted(written::shmem_stays_small())) {
            match written::written_or_mapped(&self.host_maps(), marks) {
                Ok(extents) => return Ok(extents),
                Err(e) => tracing::warn!(
                    "which pages of prefaulted guest RAM are mapped: {e}; counting all of it"
                ),
            }
        }
        Ok(data_extents_of(self.memfd.as_raw_fd(), self.size))
    }

    /// Whether RAM's page tables may still be trusted to name every page
    /// touched through them, given whether the host keeps shmem on small
    /// pages now (`small_now`, see `written::shmem_stays_small`, checked
    /// when the mappings were locked too). Once the host is seen otherwise,
    /// never again for this RAM: a huge page's collapse may have unmapped
    /// pages meanwhile.
    fn tables_trusted(&self, small_now: bool) -> bool {
        if small_now && !self.tables_untrusted.load(Ordering::Relaxed) {
            return true;
        }
        if !self.tables_untrusted.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "shmem may use transparent huge pages now (shmem_enabled): all of \
                 prefaulted guest RAM counts as data from here on"
            );
        }
        false
    }

    /// Notes that `[off, off + len)` (memfd offsets) was written through a
    /// mapping other than RAM's own (a restore's), so that
    /// [`GuestRam::data_extents`] counts it: on huge pages by mapping those
    /// huge pages into RAM's mappings; on prefaulted 4 KiB pages in
    /// [`GuestRam::written_pages`]. Elsewhere nothing to do.
    pub fn map_written(&self, off: u64, len: u64) -> Result<()> {
        if let Some(written) = self.written.get() {
            written.mark(off, len);
        }
        if !self.huge || len == 0 {
            return Ok(());
        }
        let mut b = [0u8; 1];
        for h in off / HUGE_PAGE_SIZE..(off + len).div_ceil(HUGE_PAGE_SIZE) {
            // A read through the guest's mapping maps the page the file holds.
            if let Some(gpa) = self.offset_to_gpa(h * HUGE_PAGE_SIZE) {
                self.read(gpa, &mut b)?;
            }
        }
        Ok(())
    }

    /// Whether [`GuestRam::data_extents`] comes from this process's
    /// mappings (huge pages, RAM made here; see there).
    pub fn extents_from_mappings(&self) -> bool {
        self.huge && self.mapped_here.load(Ordering::Relaxed)
    }

    /// RAM handed over from another process (on huge pages): maps the
    /// huge pages of `extents` (memfd offset, length; the old process's
    /// [`GuestRam::data_extents`]) into this process's mappings, a read of
    /// each. Elsewhere nothing to do.
    pub fn map_extents(&self, extents: &[(u64, u64)]) -> Result<()> {
        if !self.huge {
            return Ok(());
        }
        self.check_extents(extents)?;
        for &(off, len) in extents {
            self.map_written(off, len)?;
        }
        Ok(())
    }

    /// Refuses a list of extents (memfd offset, length) that reaches
    /// outside RAM.
    fn check_extents(&self, extents: &[(u64, u64)]) -> Result<()> {
        match extents
            .iter()
            .find(|&&(off, len)| off.checked_add(len).is_none_or(|end| end > self.size))
        {
            Some(&(off, len)) => Err(Error::GuestMemory(format!(
                "data extent {off:#x}+{len:#x} outside {} bytes of RAM",
                self.size
            ))),
            None => Ok(()),
        }
    }

    /// From now on [`GuestRam::data_extents`] counts, on huge pages, what
    /// this process's mappings map: for handed-over RAM once every page
    /// with data is mapped here ([`GuestRam::map_extents`] with a list that
    /// [`GuestRam::extents_complete`] found complete).
    pub fn count_data_from_mappings(&self) {
        self.mapped_here.store(true, Ordering::Relaxed);
    }

    /// Whether `extents`, data extents taken earlier while the VM ran,
    /// still name every page of the memfd that exists: true when their
    /// length is all the memfd holds (every page with data was allocated,
    /// and what is allocated cannot be fewer pages than those mapped). Call
    /// it with the vCPUs paused, so that none is added afterwards.
    pub fn extents_complete(&self, extents: &[(u64, u64)]) -> Result<bool> {
        let listed: u64 = extents.iter().map(|&(_, len)| len).sum();
        Ok(self.used_bytes()? == listed)
    }

    /// The runs of huge pages (file offset, length) that this process's
    /// mappings of the memfd map.
    fn mapped_huge_pages(&self) -> Result<Vec<(u64, u64)>> {
        mapped_huge_extents(&self.host_maps()).map_err(|e| {
            Error::GuestMemory(format!("which huge pages of guest RAM are mapped: {e}"))
        })
    }
}

/// The runs of 2 MiB huge pages (file offset, length) that the mappings
/// `maps` (file offset, length, host address) of a hugetlbfs file map: the
/// present bit of one `/proc/self/pagemap` entry per huge page. (`mincore`,
/// the fallback where pagemap cannot be read, also counts a page that is
/// only in the file where no page table covers its address yet: pages
/// allocated up front by `--prefault`, or handed over, would count as data.)
pub fn mapped_huge_extents(maps: &[(u64, u64, usize)]) -> std::io::Result<Vec<(u64, u64)>> {
    let pagemap = match File::open("/proc/self/pagemap") {
        Ok(f) => f,
        Err(_) => return mincore_huge_extents(maps),
    };
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for &(file_offset, len, host) in maps {
        for i in 0..len.div_ceil(HUGE_PAGE_SIZE) {
            let mut entry = [0u8; 8];
            let at = (host as u64 + i * HUGE_PAGE_SIZE) / PAGE_SIZE * 8;
            std::os::unix::fs::FileExt::read_exact_at(&pagemap, &mut entry, at)?;
            if u64::from_ne_bytes(entry) >> 63 == 1 {
                add_huge_page(&mut extents, file_offset, len, i);
            }
        }
    }
    Ok(extents)
}

/// Huge page `i` of the mapping of `[file_offset, file_offset + len)`,
/// added to `extents` (merged with the run it continues).
fn add_huge_page(extents: &mut Vec<(u64, u64)>, file_offset: u64, len: u64, i: u64) {
    let off = file_offset + i * HUGE_PAGE_SIZE;
    let len = HUGE_PAGE_SIZE.min(file_offset + len - off);
    match extents.last_mut() {
        Some((o, l)) if *o + *l == off => *l += len,
        _ => extents.push((off, len)),
    }
}

/// [`mapped_huge_extents`] by `mincore`.
fn mincore_huge_extents(maps: &[(u64, u64, usize)]) -> std::io::Result<Vec<(u64, u64)>> {
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut present = Vec::new();
    for &(file_offset, len, host) in maps {
        present.clear();
        present.resize(len.div_ceil(PAGE_SIZE) as usize, 0u8);
        // SAFETY: `host` maps `len` bytes; `present` has a byte per 4 KiB of them.
        let rc = unsafe {
            libc::mincore(
                host as *mut libc::c_void,
                len as usize,
                present.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (i, chunk) in present
            .chunks((HUGE_PAGE_SIZE / PAGE_SIZE) as usize)
            .enumerate()
        {
            if chunk.iter().any(|b| b & 1 != 0) {
                add_huge_page(&mut extents, file_offset, len, i as u64);
            }
        }
    }
    Ok(extents)
}

/// Reserves every huge page of the hugetlbfs memfd `file` (`size` bytes) in
/// the host's pool. vm-memory maps with `MAP_NORESERVE`, under which a page
/// the pool cannot give is a SIGBUS when the guest first touches it; a
/// shared mapping without it reserves the file's pages for as long as the
/// file lives (unmapping keeps the reservation), or fails now.
fn reserve_huge_pages(file: &File, size: u64) -> Result<()> {
    // Unmapped at once: the reservation stays.
    let mapping = RamAlias::map(file, size, 0, |e| {
        Error::GuestMemory(format!(
            "cannot reserve {} MiB of huge pages: {e} ({}; raise vm.nr_hugepages)",
            size >> 20,
            huge_pool_summary()
        ))
    })?;
    drop(mapping);
    Ok(())
}

/// A second shared mapping of a VM's whole memfd, by file offset: pages
/// written through it are the guest's, while the guest's own mappings may
/// not map them yet (post-copy onto huge pages writes here, and maps a huge
/// page into the guest once it is whole). Unmapped when dropped.
pub struct RamAlias {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: a shared file mapping; who writes which bytes is the user's rule.
unsafe impl Send for RamAlias {}
// SAFETY: as above; the struct itself is never mutated.
unsafe impl Sync for RamAlias {}

impl RamAlias {
    /// Maps all of `ram`'s memfd once more.
    pub fn new(ram: &GuestRam) -> Result<Self> {
        Self::map(ram.memfd(), ram.size(), libc::MAP_NORESERVE, |e| {
            Error::GuestMemory(format!("second mapping of guest RAM: {e}"))
        })
    }

    /// Maps `size` bytes of `file`, shared and writable, with `flags` more;
    /// `failed` makes the error of a failing `mmap`.
    fn map(
        file: &File,
        size: u64,
        flags: libc::c_int,
        failed: impl FnOnce(std::io::Error) -> Error,
    ) -> Result<Self> {
        let len = usize::try_from(size).map_err(|_| Error::MemorySize {
            size,
            reason: "larger than this host's address space".into(),
        })?;
        // SAFETY: a new shared mapping of a file we hold, `len` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | flags,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(failed(std::io::Error::last_os_error()));
        }
        let ptr = std::ptr::NonNull::new(p as *mut u8)
            .ok_or_else(|| failed(std::io::Error::other("mapped at address 0")))?;
        dont_dump(ptr.as_ptr(), len);
        Ok(RamAlias { ptr, len })
    }

    /// Makes the page tables of `[off, off + len)` of the mapping now, for
    /// pages allocated already (`MADV_POPULATE_WRITE`, Linux 5.14; where the
    /// kernel lacks it, writes come a page fault per page, ~1.6 µs each here).
    fn populate(&self, off: u64, len: u64) -> Result<()> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let Some(at) = self.at(off, len) else {
            return Err(Error::GuestMemory(format!(
                "{off:#x}+{len:#x} outside the second mapping of guest RAM"
            )));
        };
        // SAFETY: advice on part of our own mapping; it only faults pages in.
        let rc =
            unsafe { libc::madvise(at as *mut libc::c_void, len as usize, MADV_POPULATE_WRITE) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                tracing::debug!("no MADV_POPULATE_WRITE: {e}");
                return Ok(());
            }
            return Err(Error::GuestMemory(format!(
                "making the page tables of the second mapping of guest RAM: {e}"
            )));
        }
        Ok(())
    }

    /// The address of memfd offset `off`, if `off + len` is inside.
    pub fn at(&self, off: u64, len: u64) -> Option<*mut u8> {
        let end = off.checked_add(len)?;
        // SAFETY: `off` < the mapping's length, checked just before.
        (end <= self.len as u64).then(|| unsafe { self.ptr.as_ptr().add(off as usize) })
    }
}

impl Drop for RamAlias {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// The host's huge page pool from /proc/meminfo, for messages.
fn huge_pool_summary() -> String {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name| meminfo_field(&text, name).map_or("?".into(), |n| n.to_string());
    format!(
        "pool: {} huge pages, {} free, {} reserved",
        field("HugePages_Total:"),
        field("HugePages_Free:"),
        field("HugePages_Rsvd:")
    )
}

/// Leaves a mapping of guest RAM out of core dumps (`MADV_DONTDUMP`, as
/// QEMU's `dump-guest-core=off`): a crashing VM process must not write all
/// of a guest's memory (its secrets, and gigabytes) to the host's crash
/// storage. Best effort: a kernel that refuses leaves it as it was.
pub(crate) fn dont_dump(ptr: *mut u8, len: usize) {
    // SAFETY: advice on a mapping the caller made; it changes no contents.
    let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTDUMP) };
    if rc != 0 {
        tracing::debug!(
            "MADV_DONTDUMP on guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether `file` lives on hugetlbfs.
fn is_hugetlbfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC)
}

/// Makes `len` bytes at `off` of the memfd `file` zero by punching them out
/// (the pages are freed; they read as zeros and take no memory).
pub fn punch_hole(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on a descriptor the caller holds; no memory is touched.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Data extents as (offset, len) of the first `size` bytes of the file `fd`,
/// found with `SEEK_DATA`/`SEEK_HOLE`; all of it where the file system
/// cannot tell. Moves the descriptor's file offset.
pub(crate) fn data_extents_of(fd: RawFd, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = size as i64;
    while pos < end {
        // SAFETY: lseek on a descriptor the caller keeps open; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            // No SEEK_DATA support: treat everything as data.
            return vec![(0, size)];
        }
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    out
}

/// Takes ownership of a raw descriptor received from another process.
///
/// # Safety
/// `fd` must be an open descriptor that nothing else owns.
pub unsafe fn owned_fd(fd: i32) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// True when the page is all zeros. Word-wise, so it runs near memory bandwidth.
pub fn is_zero_page(page: &[u8]) -> bool {
    let (head, words, tail) = unsafe {
        // SAFETY: u64 has no invalid bit patterns; alignment handled by align_to.
        page.align_to::<u64>()
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` of this process's mapping that starts at `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            let start = l
                .split('-')
                .next()
                .and_then(|a| usize::from_str_radix(a, 16).ok());
            if start == Some(addr) && l.contains(' ') {
                return lines
                    .find_map(|l| l.strip_prefix("VmFlags:"))
                    .unwrap_or_default()
                    .to_string();
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    /// Guest RAM, and its second mapping, stay out of core dumps.
    #[test]
    fn guest_ram_is_left_out_of_core_dumps() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let region = ram.mem.iter().next().unwrap();
        let flags = vm_flags(region.as_ptr() as usize);
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
        let alias = RamAlias::new(&ram).unwrap();
        let flags = vm_flags(alias.ptr.as_ptr() as usize);
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn ram_on_huge_pages_is_reserved_whole_or_refused_naming_the_pool() {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap();
        let free = meminfo_field(&text, "HugePages_Free:").unwrap_or(0);
        let total = meminfo_field(&text, "HugePages_Total:").unwrap_or(0);
        // One huge page more than the whole pool: refused when made, even
        // where tests beside this one give back the pages they held.
        let too_big = (total + 1).max(8) * (2 << 20);
        let e = GuestRam::with_huge_pages(too_big, true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cannot reserve") && e.contains("vm.nr_hugepages") && e.contains("free"),
            "{e}"
        );
        if free < 8 {
            eprintln!("skipped the rest: {free} free huge pages, 8 needed");
            return;
        }
        let ram = GuestRam::with_huge_pages(16 << 20, true).unwrap();
        assert!(ram.is_huge());
        ram.write(0x20_0000, b"huge").unwrap();
        let mut b = [0u8; 4];
        ram.read(0x20_0000, &mut b).unwrap();
        assert_eq!(&b, b"huge");
        assert!(!GuestRam::new(16 << 20).unwrap().is_huge());
    }

    #[test]
    fn used_bytes_counts_the_pages_that_exist() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert_eq!(ram.used_bytes().unwrap(), 0, "a new memfd takes nothing");
        let gpa = ram.offset_to_gpa(5 * PAGE_SIZE).unwrap();
        ram.write(gpa, &[1; 8]).unwrap();
        assert_eq!(ram.used_bytes().unwrap(), PAGE_SIZE);
        punch_hole(&ram.memfd, 5 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(ram.used_bytes().unwrap(), 0, "a punched page takes nothing");
    }

    #[test]
    fn layout_small_guest_is_one_range() {
        assert_eq!(
            ram_layout(1 << 30),
            vec![RamRange {
                guest_addr: 0,
                len: 1 << 30,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn layout_big_guest_skips_mmio_hole() {
        let l = ram_layout(6 << 30);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].len, 3 << 30);
        assert_eq!(l[1].guest_addr, 4 << 30);
        assert_eq!(l[1].len, 3 << 30);
        assert_eq!(l[1].file_offset, 3 << 30);
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(
            check_memory_size(1 << 20),
            Err(Error::MemorySize { .. })
        ));
        assert!(matches!(
            check_memory_size((64 << 20) + 4096),
            Err(Error::MemorySize { .. })
        ));
        assert!(check_memory_size(MAX_MEMORY * 2).is_err());
        assert!(matches!(
            check_memory_size(512 << 30),
            Err(Error::MemoryTooLarge { .. })
        ));
    }

    #[test]
    fn ram_round_trip_and_extents() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert!(ram.data_extents().unwrap().is_empty());
        ram.write(0x200000, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        ram.read(0x200000, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        let ext = ram.data_extents().unwrap();
        assert_eq!(ext.len(), 1);
        assert!(ext[0].0 <= 0x200000 && ext[0].0 + ext[0].1 > 0x200000);
        assert_eq!(ram.gpa_to_offset(0x200000), Some(0x200000));
    }

    /// On huge pages the extents are the huge pages the guest's mappings
    /// map; RAM handed over from another process counts whole.
    #[test]
    fn huge_page_extents_are_the_mapped_huge_pages() {
        let Some(ram) = crate::testing::huge_ram_or_skip() else {
            return;
        };
        assert!(ram.data_extents().unwrap().is_empty());
        // Huge pages 1 and 2 (one write each), and 5.
        ram.write(0x20_0000 + 7, &[1]).unwrap();
        ram.write(0x40_0000 + (1 << 20), &[2]).unwrap();
        ram.write(0xA0_0000 + 4096, &[3]).unwrap();
        assert_eq!(
            ram.data_extents().unwrap(),
            vec![(0x20_0000, 0x40_0000), (0xA0_0000, 0x20_0000)]
        );
        // Written through another mapping (a restore's): not seen until
        // mapped here.
        let alias = RamAlias::new(&ram).unwrap();
        // SAFETY: a byte of huge page 7 in the second mapping.
        unsafe { *alias.at(0xE0_0000 + 9, 1).unwrap() = 4 };
        assert_eq!(ram.data_extents().unwrap().len(), 2);
        ram.map_written(0xE0_0000 + 4096, 4096).unwrap();
        assert_eq!(
            ram.data_extents().unwrap(),
            vec![
                (0x20_0000, 0x40_0000),
                (0xA0_0000, 0x20_0000),
                (0xE0_0000, 0x20_0000)
            ]
        );
        let fd = ram.dup_memfd().unwrap();
        let handed = GuestRam::from_fd(fd, 16 << 20).unwrap();
        assert_eq!(handed.data_extents().unwrap(), vec![(0, 16 << 20)]);
    }

    /// Handed-over RAM counts from its mappings only once the old
    /// process's list is mapped here and found complete at the pause.
    #[test]
    fn handed_over_huge_pages_count_with_a_complete_list() {
        let Some(ram) = crate::testing::huge_ram_or_skip() else {
            return;
        };
        ram.write(0x20_0000 + 7, &[1]).unwrap();
        ram.write(0xA0_0000, &[2]).unwrap();
        let list = ram.data_extents().unwrap();
        assert!(ram.extents_complete(&list).unwrap());
        let handed = GuestRam::from_fd(ram.dup_memfd().unwrap(), 16 << 20).unwrap();
        handed.map_extents(&list).unwrap();
        assert_eq!(handed.data_extents().unwrap(), vec![(0, 16 << 20)]);
        handed.count_data_from_mappings();
        assert_eq!(handed.data_extents().unwrap(), list);
        // A huge page first written after the list was taken: incomplete.
        ram.write(0xE0_0000, &[3]).unwrap();
        assert!(!ram.extents_complete(&list).unwrap());
        // Prefaulted pages exist without being mapped: incomplete too.
        ram.prefault().unwrap();
        assert!(!ram.extents_complete(&ram.data_extents().unwrap()).unwrap());
        // A list that reaches past RAM is refused, naming the extent.
        let e = handed.map_extents(&[(14 << 20, 4 << 20)]).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        let e = handed.map_extents(&[(u64::MAX, 2)]).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }

    /// Pages only in the file count as data nowhere, also where no page
    /// table covers the mapping yet (there `mincore` reads the file's cache).
    #[test]
    fn huge_extents_are_mapped_pages_even_without_page_tables() {
        use nix::sys::memfd::MemFdCreateFlag as F;
        let Ok(fd) = nix::sys::memfd::memfd_create(c"t", F::MFD_HUGETLB) else {
            return eprintln!("SKIP: no hugetlbfs memfd here");
        };
        let file = File::from(fd);
        let len = 4u64 << 20;
        file.set_len(len).unwrap();
        // SAFETY: fallocate on a descriptor we own.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as i64) } != 0 {
            return eprintln!("SKIP: no huge pages free");
        }
        // A fresh 1 GiB-aligned region, far from other mappings: no page
        // table covers it until something is mapped there.
        let want = 0x5e00_0000_0000usize;
        // SAFETY: a new shared mapping of our file at an unused address
        // (MAP_FIXED_NOREPLACE fails rather than replace a mapping).
        let at = unsafe {
            libc::mmap(
                want as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return eprintln!("SKIP: {:#x} is taken", want);
        }
        let maps = [(0, len, at as usize)];
        assert_eq!(mapped_huge_extents(&maps).unwrap(), vec![]);
        eprintln!("mincore says {:?}", mincore_huge_extents(&maps).unwrap());
        // SAFETY: a byte of the second huge page of our mapping.
        unsafe { *(at as *mut u8).add(2 << 20) = 1 };
        assert_eq!(
            mapped_huge_extents(&maps).unwrap(),
            vec![(2 << 20, 2 << 20)]
        );
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(at, len as usize) };
    }

    /// Prefaulted huge pages all exist but count as data only once written.
    #[test]
    fn prefaulted_huge_pages_exist_but_are_not_data() {
        let Some(ram) = crate::testing::huge_ram_or_skip() else {
            return;
        };
        assert_eq!(ram.used_bytes().unwrap(), 0);
        ram.prefault().unwrap();
        assert_eq!(ram.used_bytes().unwrap(), 16 << 20);
        assert!(ram.data_extents().unwrap().is_empty());
        ram.write(0x60_0000 + 5, &[1]).unwrap();
        assert_eq!(ram.data_extents().unwrap(), vec![(0x60_0000, 0x20_0000)]);
        let mut b = [9u8; 8];
        ram.read(0x40_0000, &mut b).unwrap();
        assert_eq!(b, [0; 8], "prefaulted pages are zeros");
    }

    /// Prefaulted 4 KiB RAM is all allocated and has a second mapping
    /// whose writes the guest sees; its data are the pages RAM's own
    /// mappings map and those noted as written elsewhere.
    #[test]
    fn prefaulted_4k_pages_are_allocated_with_a_second_mapping() {
        let ram = GuestRam::with_huge_pages(16 << 20, false).unwrap();
        assert!(ram.prefaulted_alias().is_none());
        assert!(ram.written_pages().is_none());
        ram.prefault().unwrap();
        assert_eq!(ram.used_bytes().unwrap(), 16 << 20);
        let written = ram.written_pages().expect("RAM's mappings locked (root)");
        assert!(ram.data_extents().unwrap().is_empty(), "nothing written");
        let alias = ram.prefaulted_alias().expect("a second mapping");
        assert!(alias.at(16 << 20, 1).is_none(), "nothing past RAM");
        let p = alias.at(0x5000, 4).unwrap();
        written.mark(0x5000, 4);
        // SAFETY: 4 bytes inside the second mapping, which nothing else uses.
        unsafe { std::ptr::copy_nonoverlapping([1u8, 2, 3, 4].as_ptr(), p, 4) };
        assert_eq!(ram.data_extents().unwrap(), vec![(0x5000, 0x1000)]);
        // Touched through RAM's own mapping (as the guest and KVM touch it).
        ram.write(0x9000 + 8, &[7]).unwrap();
        ram.map_written(0x20_0000, 0x3000).unwrap();
        assert_eq!(
            ram.data_extents().unwrap(),
            vec![(0x5000, 0x1000), (0x9000, 0x1000), (0x20_0000, 0x3000)]
        );
        // (A read fault maps its neighbours in the file too, fault-around:
        // they count as data from then on, more than needed, never less.)
        let mut b = [0u8; 4];
        ram.read(0x5000, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
    }

    /// Once the host lets shmem use huge pages, prefaulted RAM's page tables
    /// are never trusted again, even after it stops.
    #[test]
    fn page_tables_lose_trust_for_good_once_shmem_may_use_huge_pages() {
        let ram = GuestRam::with_huge_pages(16 << 20, false).unwrap();
        assert!(ram.tables_trusted(true));
        assert!(!ram.tables_trusted(false));
        assert!(!ram.tables_trusted(true), "for good");
    }

    /// A page RAM's mapping maps stays counted: the mapping is locked, so
    /// `MADV_PAGEOUT` (or reclaim) cannot unmap it and hide its data.
    #[test]
    fn prefaulted_4k_pages_touched_stay_mapped() {
        let ram = GuestRam::with_huge_pages(16 << 20, false).unwrap();
        ram.prefault().unwrap();
        ram.write(0x30_0000, &[1]).unwrap();
        let (_, host) = ram.host_ranges()[0];
        // SAFETY: advice on RAM's own mapping; it cannot lose data.
        let rc = unsafe {
            libc::madvise(
                host.wrapping_add(0x30_0000) as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::MADV_PAGEOUT,
            )
        };
        assert_eq!(rc, -1, "a locked mapping refuses MADV_PAGEOUT");
        assert_eq!(ram.data_extents().unwrap(), vec![(0x30_0000, 0x1000)]);
    }

    /// Prefaulted 4 KiB RAM handed to another process: all of it counts
    /// there until the old process's final list comes; then that list and
    /// what the new process's (locked) mappings map.
    #[test]
    fn handed_over_prefaulted_4k_pages_count_from_the_final_list() {
        let old = GuestRam::with_huge_pages(16 << 20, false).unwrap();
        old.prefault().unwrap();
        old.write(0x3000, &[1]).unwrap();
        old.map_written(0x40_0000, 0x2000).unwrap();
        let list = old.data_extents().unwrap();
        assert_eq!(list, vec![(0x3000, 0x1000), (0x40_0000, 0x2000)]);
        let new = GuestRam::from_fd(old.dup_memfd().unwrap(), 16 << 20).unwrap();
        assert!(new.track_mappings());
        assert_eq!(
            new.data_extents().unwrap(),
            vec![(0, 16 << 20)],
            "until the list"
        );
        new.write(0x8000, &[2]).unwrap();
        let outside = [(0x3000, 0x1000), (16 << 20, 0x1000)];
        assert!(new.adopt_data_extents(&outside).is_err());
        assert_eq!(
            new.data_extents().unwrap(),
            vec![(0, 16 << 20)],
            "refused whole"
        );
        new.adopt_data_extents(&list).unwrap();
        assert_eq!(
            new.data_extents().unwrap(),
            vec![(0x3000, 0x1000), (0x8000, 0x1000), (0x40_0000, 0x2000)]
        );
        // Without the lock the list changes nothing.
        let unlocked = GuestRam::from_fd(old.dup_memfd().unwrap(), 16 << 20).unwrap();
        unlocked.adopt_data_extents(&list).unwrap();
        assert_eq!(unlocked.data_extents().unwrap(), vec![(0, 16 << 20)]);
    }

    #[test]
    fn zero_page_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
    }
}
