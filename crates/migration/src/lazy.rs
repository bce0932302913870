//! Lazy restore from a snapshot file: the VM runs before its memory is read.
//!
//! [`restore`] validates the file exactly as the eager reader does, except for
//! the page-data checksum (see below), creates EMPTY guest RAM, builds the VM
//! ([`Vm::prepare`]), registers the RAM with userfaultfd (missing mode) and
//! only then loads the state and resumes. Two threads fill the memory:
//!
//! - the fault thread: a fault on a stored page is served by reading that page
//!   from the file (`pread` at its data offset) and `UFFDIO_COPY`; a fault on a
//!   page that is not stored, or stored as zeros, gets `UFFDIO_ZEROPAGE`. So
//!   does, without reading the file, a fault on a page the stream has passed:
//!   the stream placed every non-zero page there, so a missing one is zero
//!   (and its slot, already checksummed, is never read again);
//! - the filler: first the working set recorded when the snapshot was taken
//!   (pages the guest wrote just before the pause), then every stored page in
//!   file order. A page that is already there (faulted in, or prefetched) is
//!   skipped (EEXIST) and counted. A stored page of zeros is left out: it
//!   stays a hole of the memfd and takes no memory until the guest writes it,
//!   as the eager restore punches such pages out again.
//!
//! **The file while it is read.** Renaming or unlinking it changes nothing
//! (the descriptor keeps the inode). Every read of page data checks that the
//! file's size and modification time are still those seen at open
//! ([`LazySnapshot::changed`]): once it was truncated or written to, the read
//! fails naming that, and the VM is stopped as below before a page read
//! after the change is used. A read that fails otherwise (EIO) is tried 5
//! times with a doubling wait from 10 ms before it fails.
//!
//! When the filler has streamed every stored page, userfaultfd is unregistered
//! (pages not filled fault in as zeros from then on, as any memfd page) and
//! the totals are logged.
//!
//! **Checksum trade-off.** The CRC of the page data covers the whole data
//! section, so it can only be checked once everything has been read: the
//! filler computes it as it streams the data in order. Pages served before
//! that (faults, working set) are therefore used by the guest unverified. On a
//! mismatch the filler logs an error and stops the VM with
//! `VmExit::Failed("... page data checksum mismatch ...")` (`migd run` exits
//! non-zero). Use the eager restore where a corrupted file must never reach
//! the guest.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vmm::memory::PAGE_SIZE;
use vmm::snapshot::LazySnapshot;
use vmm::vcpu::RunControl;
use vmm::{GuestRam, Vm, VmExit};

use crate::uffd::{RamMap, Uffd};
use crate::{io_err, Error, Result};

/// Pages per read of the background stream.
const STREAM_CHUNK_PAGES: u64 = 256;

/// Progress and totals of a lazy restore (shared with its threads).
#[derive(Debug, Default)]
pub struct LazyProgress {
    /// Pages stored in the file.
    pub pages: u64,
    /// Pages in the file's working set.
    pub working_set: u64,
    /// Stored pages filled on a fault.
    pub faults: AtomicU64,
    /// Faults on pages that are not stored, filled with zeros.
    pub zero_faults: AtomicU64,
    /// Working-set pages filled by the prefetch.
    pub prefetched: AtomicU64,
    /// Pages filled by the background stream.
    pub background: AtomicU64,
    /// Pages the background stream found already there.
    pub already_present: AtomicU64,
    /// Stored pages of zeros the background stream left as holes (a fault on
    /// one counts in `zero_faults`, never in `faults`).
    pub zero_stored: AtomicU64,
    /// Microseconds from the start of the restore to the resume (0: not resumed).
    pub resume_us: AtomicU64,
    /// Microseconds from the start of the restore to the last page filled.
    pub filled_us: AtomicU64,
    /// Every stored page is in memory and userfaultfd is gone.
    pub complete: AtomicBool,
    /// The restore failed (the VM was stopped).
    pub failed: AtomicBool,
}

impl LazyProgress {
    /// True once every stored page is in guest memory.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Pages filled so far, by any path.
    pub fn filled(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
            + self.prefetched.load(Ordering::Relaxed)
            + self.background.load(Ordering::Relaxed)
    }

    /// Stored pages dealt with so far: filled, or found to be zeros.
    pub fn done(&self) -> u64 {
        self.filled() + self.zero_stored.load(Ordering::Relaxed)
    }
}

struct Lazy {
    snap: LazySnapshot,
    uffd: Uffd,
    /// (memfd offset, len, host address).
    map: RamMap,
    progress: Arc<LazyProgress>,
    t0: Instant,
    stop: AtomicBool,
    control: OnceLock<Arc<RunControl>>,
    /// Why the restore failed before the VM was loaded (no VM to stop yet):
    /// [`Lazy::start_control`] refuses to go on then. The lock orders a
    /// failure against the VM's arrival.
    early: std::sync::Mutex<Option<String>>,
    /// Memfd offset the stream has placed every non-zero page below: a
    /// missing page there is zero, and a fault on it reads nothing.
    streamed: AtomicU64,
    /// A pause after each chunk of the stream (test knob
    /// `MIGD_LAZY_PACE_MS`, with fault injection on), to watch a slow fill.
    pace: Option<Duration>,
}

impl Lazy {
    /// Registers the empty `ram` with a new userfaultfd, to be filled from `snap`.
    fn new(snap: LazySnapshot, ram: &GuestRam, t0: Instant) -> Result<Arc<Lazy>> {
        let map = RamMap::new(ram);
        let uffd = Uffd::new().map_err(io_err("userfaultfd"))?;
        map.register(&uffd, false)
            .map_err(io_err("registering guest RAM with userfaultfd"))?;
        let progress = Arc::new(LazyProgress {
            pages: snap.data_pages,
            working_set: snap.working_set.len() as u64,
            ..Default::default()
        });
        Ok(Arc::new(Lazy {
            snap,
            uffd,
            map,
            progress,
            t0,
            stop: AtomicBool::new(false),
            control: OnceLock::new(),
            early: std::sync::Mutex::new(None),
            streamed: AtomicU64::new(0),
            pace: crate::faults::knob_ms("MIGD_LAZY_PACE_MS"),
        }))
    }

    /// Copies the non-zero pages of `data` (whole pages) to memfd offset
    /// `off`, one call per run of them where it lies in one mapping; returns
    /// (filled, already there, zero pages left out).
    fn fill(&self, off: u64, data: &[u8]) -> Result<(u64, u64, u64)> {
        let (mut filled, mut present, mut zero) = (0, 0, 0);
        let page = PAGE_SIZE as usize;
        let pages = data.len() / page;
        let is_zero = |i: usize| vmm::memory::is_zero_page(&data[i * page..(i + 1) * page]);
        // Runs of zero pages and of others, each page looked at once.
        let mut i = 0;
        while i < pages {
            let (start, zeros) = (i, is_zero(i));
            i += 1;
            while i < pages && is_zero(i) == zeros {
                i += 1;
            }
            if zeros {
                zero += (i - start) as u64;
                continue;
            }
            let (f, p) =
                self.fill_run(off + (start * page) as u64, &data[start * page..i * page])?;
            filled += f;
            present += p;
        }
        if filled > 0 {
            self.progress
                .filled_us
                .fetch_max(self.t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        Ok((filled, present, zero))
    }

    /// Copies `data` (whole pages) to memfd offset `off`, in one call where
    /// the pages lie in one mapping; returns (filled, already there).
    fn fill_run(&self, off: u64, data: &[u8]) -> Result<(u64, u64)> {
        let (mut filled, mut present) = (0, 0);
        let len = data.len() as u64;
        let mut count = |_, f: bool| if f { filled += 1 } else { present += 1 };
        match self.map.host_run(off, len) {
            Some(host) => self
                .uffd
                .fill_run(host, Some(data), len, &mut count)
                .map_err(io_err(format!("UFFDIO_COPY at {off:#x}")))?,
            None => {
                for (i, page) in data.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    let o = off + i as u64 * PAGE_SIZE;
                    let host = self
                        .map
                        .host(o)
                        .ok_or_else(|| Error::Protocol(format!("page {o:#x} outside RAM")))?;
                    let f = self
                        .uffd
                        .copy(host, page)
                        .map_err(io_err(format!("UFFDIO_COPY at {o:#x}")))?;
                    count(i as u64, f);
                }
            }
        }
        Ok((filled, present))
    }

    /// The fault thread.
    fn serve_faults(&self) {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut broken = false;
        let served = self.uffd.each_fault(&self.stop, 50, |page_addr| {
            let Some(off) = self.map.offset(page_addr) else {
                tracing::warn!(page_addr, "fault outside guest RAM");
                return Ok(());
            };
            // Below the stream's mark a missing page is zero (see `streamed`).
            let passed = off < self.streamed.load(Ordering::Acquire);
            let stored = if broken || passed {
                false
            } else {
                match self.snap.read_page(off, &mut page) {
                    // Zeros, stored or not, are filled without a copy.
                    Ok(s) => s && !vmm::memory::is_zero_page(&page),
                    Err(e) => {
                        // Keep serving (zeros) so that vCPUs can leave; the VM is stopped.
                        tracing::error!("lazy restore: {e}");
                        self.fail(e.to_string());
                        broken = true;
                        false
                    }
                }
            };
            let r = if stored {
                self.uffd.copy(page_addr, &page)
            } else {
                self.uffd.zeropage(page_addr, PAGE_SIZE)
            };
            match r {
                Ok(true) if stored => {
                    self.progress.faults.fetch_add(1, Ordering::Relaxed);
                    self.progress
                        .filled_us
                        .fetch_max(self.t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                Ok(true) => {
                    self.progress.zero_faults.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {
                    let _ = self.uffd.wake(page_addr, PAGE_SIZE);
                }
                // Stopping: the memory is going away; the loop ends below.
                Err(e) if self.stop.load(Ordering::Acquire) => {
                    return Err(io_err("filling a page while stopping")(e))
                }
                Err(e) => {
                    tracing::error!("lazy restore: filling {off:#x} on a fault: {e}");
                    self.fail(format!("filling {off:#x} on a fault: {e}"));
                    let _ = self.uffd.wake(page_addr, PAGE_SIZE);
                }
            }
            Ok(())
        });
        // After a stop the descriptor may fail as the memory goes: not an error.
        if let Err(e) = served {
            if !self.stop.load(Ordering::Acquire) {
                tracing::error!("lazy restore: {e}");
                self.fail(e.to_string());
            }
        }
    }

    /// Stops the VM (once) with a clear reason; before the VM is loaded,
    /// keeps the reason for [`Lazy::start_control`].
    fn fail(&self, why: String) {
        if !self.progress.failed.swap(true, Ordering::AcqRel) {
            let mut early = self.early.lock().unwrap_or_else(|p| p.into_inner());
            match self.control.get() {
                Some(c) => c.stop(VmExit::Failed(format!("lazy restore failed: {why}"))),
                None => {
                    tracing::error!("lazy restore failed before the VM was loaded: {why}");
                    *early = Some(why);
                }
            }
        }
    }

    /// The VM is loaded: later failures stop it through `control`. A failure
    /// before (a page the load faulted on could not be read, so the guest
    /// would run on zeros there) is returned instead.
    fn start_control(&self, control: Arc<RunControl>) -> Result<()> {
        let early = self.early.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.control.set(control);
        match &*early {
            Some(why) => Err(Error::Vm(vmm::Error::GuestMemory(format!(
                "lazy restore failed while the VM state was loaded: {why}"
            )))),
            None => Ok(()),
        }
    }

    /// The filler: working set first, then every stored page in file order
    /// (which also checks the page-data checksum).
    fn fill_all(&self) -> Result<()> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for &pfn in &self.snap.working_set {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let off = pfn * PAGE_SIZE;
            if self.snap.read_page(off, &mut page)? {
                let (filled, _, _) = self.fill(off, &page)?;
                self.progress
                    .prefetched
                    .fetch_add(filled, Ordering::Relaxed);
            }
        }
        self.snap.stream(STREAM_CHUNK_PAGES, |off, data| {
            if self.stop.load(Ordering::Acquire) {
                return Err(vmm::Error::GuestMemory("lazy restore stopped".into()));
            }
            let (filled, present, zero) = self.fill(off, data).map_err(|e| {
                vmm::Error::GuestMemory(format!("filling guest RAM from the snapshot: {e}"))
            })?;
            self.progress.zero_stored.fetch_add(zero, Ordering::Relaxed);
            self.progress
                .background
                .fetch_add(filled, Ordering::Relaxed);
            self.progress
                .already_present
                .fetch_add(present, Ordering::Relaxed);
            self.streamed
                .store(off + data.len() as u64, Ordering::Release);
            if let Some(pace) = self.pace {
                let end = Instant::now() + pace;
                while Instant::now() < end && !self.stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(10).min(pace));
                }
            }
            Ok(())
        })?;
        Ok(())
    }
}

/// Lazily restores the snapshot at `path`: returns the VM, resumed unless
/// `paused`, while its memory is still being filled in the background, and
/// how the VM boots if the file says.
pub fn restore(
    path: &Path,
    console: Option<&Path>,
    paused: bool,
) -> Result<(Vm, Arc<LazyProgress>, Option<vmm::BootSpec>)> {
    let t0 = Instant::now();
    let snap = LazySnapshot::open(path)?;
    crate::handshake::check_runs_here(&snap.state)?;
    let boot = snap.boot.clone();
    let ram = GuestRam::new(snap.memory)?;
    if ram.is_huge() {
        return Err(Error::Invalid(
            "a lazy restore fills memory through userfaultfd 4 KiB at a time, which huge pages do not take".into(),
        ));
    }
    let prepared = Vm::prepare(ram, snap.state.vcpus.len(), console)?;
    let lazy = Lazy::new(snap, prepared.ram(), t0)?;
    let progress = lazy.progress.clone();
    // The state is loaded after this, so the fault thread must be up first.
    let faults = {
        let l = lazy.clone();
        std::thread::Builder::new()
            .name("lazy-faults".into())
            .spawn(move || {
                crate::postcopy::prioritize_this_thread(true);
                l.serve_faults()
            })
            .map_err(io_err("starting the lazy-faults thread"))?
    };
    let loaded = prepared
        .load(&lazy.snap.state)
        .map_err(Error::from)
        .and_then(|vm| lazy.start_control(vm.exit_watch()).map(|()| vm));
    let vm = match loaded {
        Ok(vm) => vm,
        Err(e) => {
            lazy.stop.store(true, Ordering::Release);
            let _ = lazy.map.unregister(&lazy.uffd);
            let _ = faults.join();
            return Err(e);
        }
    };
    if !paused {
        vm.resume();
        progress
            .resume_us
            .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
    tracing::info!(
        snapshot = %path.display(),
        pages = progress.pages,
        working_set = progress.working_set,
        bytes = lazy.snap.file_bytes,
        resume_ms = t0.elapsed().as_secs_f64() * 1e3,
        "lazy restore: VM resumed, memory filling in the background"
    );
    let l = lazy.clone();
    std::thread::Builder::new()
        .name("lazy-filler".into())
        .spawn(move || {
            crate::postcopy::prioritize_this_thread(false);
            let r = l.fill_all();
            let p = &l.progress;
            match r {
                Ok(()) if !l.stop.load(Ordering::Acquire) => {
                    l.stop.store(true, Ordering::Release);
                    if let Err(e) = l.map.unregister(&l.uffd) {
                        tracing::warn!("unregistering userfaultfd: {e}");
                    }
                    let _ = faults.join();
                    p.complete.store(true, Ordering::Release);
                    let resume_us = p.resume_us.load(Ordering::Relaxed);
                    let filled_us = p.filled_us.load(Ordering::Relaxed).max(resume_us);
                    tracing::info!(
                        pages = p.pages,
                        filled = p.filled(),
                        faults = p.faults.load(Ordering::Relaxed),
                        zero_faults = p.zero_faults.load(Ordering::Relaxed),
                        prefetched = p.prefetched.load(Ordering::Relaxed),
                        background = p.background.load(Ordering::Relaxed),
                        already_present = p.already_present.load(Ordering::Relaxed),
                        zero_stored = p.zero_stored.load(Ordering::Relaxed),
                        resume_ms = resume_us as f64 / 1e3,
                        filled_ms = filled_us as f64 / 1e3,
                        after_resume_ms = filled_us.saturating_sub(resume_us) as f64 / 1e3,
                        "lazy restore complete: all pages filled"
                    );
                }
                Ok(()) => {}
                Err(e) => {
                    // The reason reads as the fault thread's would ("snapshot
                    // FILE: ...", not "VM: snapshot FILE: ...").
                    let why = match e {
                        Error::Vm(e) => e.to_string(),
                        e => e.to_string(),
                    };
                    // The fault thread keeps serving (so vCPUs can leave); the VM stops.
                    tracing::error!(
                        "lazy restore failed: {why}; the guest may have seen bad pages: stopping the VM"
                    );
                    l.fail(why);
                }
            }
        })
        .map_err(io_err("starting the lazy-filler thread"))?;
    Ok((vm, progress, boot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::background_save::tests::{assert_same_ram, gpa, half_zeros_saved};

    const PAGES: u64 = 4096;

    /// A file whose stored pages are half zeros (a background save keeps
    /// their slots): filled lazily while a reader faults pages in, the RAM
    /// must read as the original and hold no memory for the zeros it was
    /// never asked for.
    #[test]
    fn stored_zero_pages_stay_holes_and_every_page_reads_back() {
        let (ram, dir, path, _) = half_zeros_saved(PAGES, "lazy");
        let data = PAGES / 2;
        let snap = LazySnapshot::open(&path).unwrap();
        assert_eq!(snap.data_pages, data, "zero pages keep their slots");

        let restored = GuestRam::new(PAGES * PAGE_SIZE).unwrap();
        let lazy = Lazy::new(snap, &restored, Instant::now()).unwrap();
        // The reader faults on a data page, a stored zero page and a hole
        // (every 64th page from 1, 2 and data + 2) while the filler runs.
        let touched: Vec<u64> = (0..data / 64)
            .flat_map(|i| [1 + 64 * i, 2 + 64 * i, data + 2 + 64 * i])
            .collect();
        std::thread::scope(|s| {
            let faults = s.spawn(|| lazy.serve_faults());
            let reader = s.spawn(|| {
                let mut page = vec![0u8; PAGE_SIZE as usize];
                for &p in &touched {
                    restored.read(gpa(&restored, p), &mut page).unwrap();
                }
            });
            lazy.fill_all().unwrap();
            reader.join().unwrap();
            lazy.stop.store(true, Ordering::Release);
            lazy.map.unregister(&lazy.uffd).unwrap();
            faults.join().unwrap();
        });
        let p = &lazy.progress;
        let zero_faults = p.zero_faults.load(Ordering::Relaxed);
        assert_eq!(p.filled(), data / 2, "{p:?}");
        assert_eq!(p.zero_stored.load(Ordering::Relaxed), data / 2, "{p:?}");
        assert_eq!(p.done(), p.pages, "{p:?}");
        assert!(zero_faults > 0, "the reader met no zero page: {p:?}");
        assert!(zero_faults <= 2 * data / 64, "{p:?}");
        // Memory held: the non-zero pages and the zeros faulted in, no more
        // (checked before the comparison below reads, and so allocates, pages).
        let held: u64 = restored.data_extents().unwrap().iter().map(|e| e.1).sum();
        assert_eq!(held, (data / 2 + zero_faults) * PAGE_SIZE, "{p:?}");
        assert_same_ram(&ram, &restored);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A page that could not be read while the VM state was loaded (no VM
    /// to stop yet) fails the restore when the VM arrives, instead of
    /// leaving the guest to run on zeros; a failure after it stops the VM.
    #[test]
    fn a_failure_before_the_vm_is_loaded_fails_the_restore() {
        let (_ram, dir, path, _) = half_zeros_saved(PAGES, "lazy-early");
        let restored = GuestRam::new(PAGES * PAGE_SIZE).unwrap();
        let lazy = Lazy::new(
            LazySnapshot::open(&path).unwrap(),
            &restored,
            Instant::now(),
        )
        .unwrap();
        lazy.fail("reading page 0x3000: EIO".into());
        let e = lazy.start_control(RunControl::new(1)).unwrap_err();
        assert!(
            e.to_string()
                .contains("while the VM state was loaded: reading page 0x3000"),
            "{e}"
        );
        lazy.map.unregister(&lazy.uffd).unwrap();

        let lazy = Lazy::new(
            LazySnapshot::open(&path).unwrap(),
            &restored,
            Instant::now(),
        )
        .unwrap();
        let control = RunControl::new(1);
        lazy.start_control(control.clone()).unwrap();
        lazy.fail("later".into());
        assert!(lazy.early.lock().unwrap().is_none());
        assert!(lazy.progress.failed.load(Ordering::Acquire));
        lazy.map.unregister(&lazy.uffd).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fault on a stored zero page the stream has passed is served as
    /// zeros without reading the file (before, it read the slot again, past
    /// the checksum, so that an in-place change of it reached the guest).
    #[test]
    fn a_fault_on_a_zero_page_the_stream_passed_reads_nothing() {
        use std::os::unix::fs::FileExt;
        let (_ram, dir, path, _) = half_zeros_saved(PAGES, "lazy-passed");
        let snap = LazySnapshot::open(&path).unwrap();
        // Page 2 is stored, as zeros (its slot is a hole of the file).
        let slot = snap.page_file_offset(2 * PAGE_SIZE).unwrap();
        let restored = GuestRam::new(PAGES * PAGE_SIZE).unwrap();
        let lazy = Lazy::new(snap, &restored, Instant::now()).unwrap();
        let mut page = vec![1u8; PAGE_SIZE as usize];
        std::thread::scope(|s| {
            let faults = s.spawn(|| lazy.serve_faults());
            lazy.fill_all().unwrap();
            // The slot written in place once the stream checksummed it
            // (past the coarse clock's tick, so that the file's time moves).
            std::thread::sleep(std::time::Duration::from_millis(50));
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .write_all_at(&[0xee; PAGE_SIZE as usize], slot)
                .unwrap();
            restored.read(gpa(&restored, 2), &mut page).unwrap();
            lazy.stop.store(true, Ordering::Release);
            lazy.map.unregister(&lazy.uffd).unwrap();
            faults.join().unwrap();
        });
        let p = &lazy.progress;
        assert!(page.iter().all(|&b| b == 0), "the guest read the new slot");
        assert!(
            !p.failed.load(Ordering::Acquire),
            "the file was read: {p:?}"
        );
        assert_eq!(p.zero_faults.load(Ordering::Relaxed), 1, "{p:?}");
        assert_eq!(p.faults.load(Ordering::Relaxed), 0, "{p:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
