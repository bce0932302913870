//! Background save: a snapshot file written while the guest runs on.
//!
//! Guest memory is write-protected through userfaultfd while the guest still
//! runs (a page it writes meanwhile is noted and let go). The guest is then
//! paused only to capture its state, protect again the few pages it wrote
//! since, and fix the file's layout in memory (the file is made before the
//! pause, and its front written after it: the pause does no file system
//! work). It resumes, and the pages are written to the file in order. A page the guest is about to change is saved first:
//! its write faults, the fault thread copies the page aside (the streaming
//! pass writes it to its place; the guest does not wait on the disk) and
//! lifts the protection. The pages held aside are bounded ([`HELD_MAX`]):
//! beyond it, the fault thread writes the page to the file itself before
//! the write goes on, so a guest that writes faster than the disk takes is
//! slowed to the disk's pace instead of growing the process without end.
//! The file holds memory as it was at the pause, as QEMU's background
//! snapshot does; the format is the one of [`vmm::snapshot`], except that
//! zero pages inside data extents have slots (finding them means reading
//! every page, which the pause is too short for). Their slots are never
//! written, so they stay holes of the sparse file and take no disk.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm::memory::{GuestRam, PAGE_SIZE};
use vmm::snapshot::{SnapshotStats, SnapshotWriter, WriteProgress};
use vmm::state::VmState;
use vmm::BootSpec;

use crate::memview::MemView;
use crate::uffd::{RamMap, Uffd};
use crate::{io_err, Error, Result};

/// Pages the streaming pass copies and releases at a time.
const CHUNK_PAGES: usize = 64;
/// Pages the fault thread holds aside at most (16 MiB; with the batch the
/// streaming pass is writing meanwhile, twice that); past it, it writes
/// them to the file itself.
pub const HELD_MAX: usize = 4096;
/// How long the end waits for the fault thread's last copies while it saves
/// none.
const SETTLE: Duration = Duration::from_secs(10);

/// A page's progress: untouched, claimed by one of the two writers, in the file.
const UNTOUCHED: u8 = 0;
// Page states start from zeroed memory (`zeroed_u8s`).
const _: () = assert!(UNTOUCHED == 0);
const CLAIMED: u8 = 1;
const SAVED: u8 = 2;

/// What a background save did.
#[derive(Clone, Debug, Default)]
pub struct BackgroundStats {
    /// The file written.
    pub snapshot: SnapshotStats,
    /// From the start of the save (the VM paused) to its resume.
    pub paused: Duration,
    /// Pages the guest wanted to write before the streaming pass got there.
    pub faults: u64,
    /// Of those, the pages the fault thread wrote to the file itself (with
    /// [`HELD_MAX`] pages held aside already) while the guest's write waited.
    pub written_by_faults: u64,
}

/// What the caller's `pause` gives: the VM's state, captured in the pause,
/// and its working set (memfd page numbers) if one was recorded.
pub type Paused = (VmState, Option<Vec<u64>>);

/// Writes a snapshot of the running VM whose RAM is `ram` to `path` (with
/// its `boot` spec, if it has one): arms the write-protection, calls `pause`
/// (which pauses the VM and captures its state), fixes the layout, calls
/// `resume`, and returns once the file is complete. On any error the
/// protection is lifted (the guest never waits on a save that failed) and
/// no file is left.
pub fn save(
    ram: &GuestRam,
    path: &Path,
    boot: Option<&BootSpec>,
    pause: impl FnOnce() -> Result<Paused>,
    resume: impl FnOnce(),
    progress: &WriteProgress,
) -> std::result::Result<BackgroundStats, BackgroundError> {
    save_holding(ram, path, boot, pause, resume, progress, HELD_MAX)
}

/// [`save`], with the fault thread holding at most `held_max` pages aside.
fn save_holding(
    ram: &GuestRam,
    path: &Path,
    boot: Option<&BootSpec>,
    pause: impl FnOnce() -> Result<Paused>,
    resume: impl FnOnce(),
    progress: &WriteProgress,
    held_max: usize,
) -> std::result::Result<BackgroundStats, BackgroundError> {
    if ram.is_huge() {
        // 4 KiB write-protect releases fail there: a vCPU would wait for ever.
        return Err(BackgroundError::unsupported(Error::Invalid(
            "a background save write-protects memory 4 KiB at a time, which huge pages do not take"
                .into(),
        )));
    }
    // The file (and the clean-up of stale ones beside it) before the pause,
    // the front written after it: the pause holds no file system work, which
    // a slow or hung file system would stretch.
    let prepared = SnapshotWriter::prepare(path)
        .map_err(Error::from)
        .map_err(BackgroundError::before_resume)?;
    let map = RamMap::new(ram);
    let uffd = Uffd::for_write_protect()
        .map_err(io_err("userfaultfd (write-protect)"))
        .map_err(BackgroundError::unsupported)?;
    let armed = Armed {
        uffd: &uffd,
        map: &map,
    };
    armed.arm().map_err(BackgroundError::unsupported)?;
    // Every page is protected: what becomes data from here on is seen. The
    // walk over the extents runs while guest writes go through, noted.
    let walk = || vmm::snapshot::data_runs(ram).map_err(Error::from);
    let (paused_at, runs, (state, working_set), touched) =
        armed
            .pause_noting_writes(walk, pause)
            .map_err(BackgroundError::before_resume)?;
    let sealed = (|| {
        let runs = with_pages(runs, &touched, map.pages());
        armed.protect_again(&touched)?;
        SnapshotWriter::create_in(
            prepared,
            &state,
            ram.size(),
            runs,
            working_set.as_deref(),
            boot,
        )
        .map_err(Error::from)
    })();
    let writer = sealed.map_err(BackgroundError::before_resume)?;
    progress.start(writer.data_pages());
    let pages = writer.data_pages() as usize;
    let save = Save {
        mem: MemView::new(ram),
        writer: &writer,
        path,
        progress,
        map: &map,
        uffd: &uffd,
        state: zeroed_u8s(pages),
        crcs: zeroed_u32s(pages),
        held: Mutex::new(Vec::new()),
        held_max,
        written_by_faults: AtomicU64::new(0),
        claimed: AtomicU64::new(0),
        recentre: AtomicU64::new(u64::MAX),
        faults: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        faults_down: AtomicBool::new(false),
    };
    // The fault thread is up before the guest runs: no write waits on a
    // protection nobody serves.
    let streamed = std::thread::scope(|s| {
        let faults = std::thread::Builder::new()
            .name("save-faults".into())
            .spawn_scoped(s, || {
                crate::postcopy::prioritize_this_thread(true);
                let served = save.serve_faults();
                if served.is_err() {
                    save.faults_down.store(true, Ordering::Release);
                }
                served
            })
            .map_err(io_err("starting the save's fault thread"))
            .map_err(BackgroundError::before_resume)?;
        resume();
        let paused = paused_at.elapsed();
        // The front after the pause (the fault thread writes page data at
        // its own offsets meanwhile).
        if let Err(e) = writer.write_front() {
            save.stop.store(true, Ordering::Release);
            let _ = faults.join();
            return Err(BackgroundError::after_resume(e.into()));
        }
        // Pages that are not in the file need no protection: a guest filling
        // fresh memory during the save should not fault on every page (the
        // fault thread lets those through meanwhile).
        let streamed = armed
            .release_holes(writer.runs())
            .and_then(|()| save.stream())
            .and_then(|()| save.settle());
        save.stop.store(true, Ordering::Release);
        let served = faults
            .join()
            .unwrap_or_else(|_| Err(Error::Protocol("the save's fault thread panicked".into())));
        // The fault thread's error is the cause where both failed.
        served
            .and(streamed)
            .map(|()| paused)
            .map_err(BackgroundError::after_resume)
    });
    // Protection off and waiters woken whatever happened.
    drop(armed);
    let paused = streamed?;
    let mut crc = crc32fast::Hasher::new();
    for c in &save.crcs {
        crc.combine(&crc32fast::Hasher::new_with_initial_len(
            c.load(Ordering::Acquire),
            PAGE_SIZE,
        ));
    }
    let faults = save.faults.load(Ordering::Relaxed);
    let written_by_faults = save.written_by_faults.load(Ordering::Relaxed);
    drop(save);
    let snapshot = writer
        .finish(crc.finalize(), progress)
        .map_err(|e| BackgroundError::after_resume(e.into()))?;
    tracing::info!(
        path = %path.display(),
        pages = snapshot.data_pages,
        paused_us = paused.as_micros() as u64,
        faults,
        written_by_faults,
        ms = snapshot.elapsed.as_secs_f64() * 1e3,
        "background snapshot written"
    );
    Ok(BackgroundStats {
        snapshot,
        paused,
        faults,
        written_by_faults,
    })
}

/// `n` atomics at zero, from zeroed memory: made in the pause, they cost
/// no page until used.
fn zeroed_u8s(n: usize) -> Vec<AtomicU8> {
    let mut v = std::mem::ManuallyDrop::new(vec![0u8; n]);
    // SAFETY: AtomicU8 has the same size, alignment and bit validity as u8;
    // the allocation is handed over whole.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// [`zeroed_u8s`] for `AtomicU32`.
fn zeroed_u32s(n: usize) -> Vec<AtomicU32> {
    let mut v = std::mem::ManuallyDrop::new(vec![0u32; n]);
    // SAFETY: AtomicU32 has the same size, alignment and bit validity as u32.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// A failed background save.
#[derive(Debug)]
pub struct BackgroundError {
    /// Why it failed.
    pub error: Error,
    /// `resume` was called (the VM runs); otherwise the VM is running or
    /// paused as `pause` left it.
    pub resumed: bool,
    /// Write-protection is not to be had for this memory (no userfaultfd
    /// write-protect, huge pages): a snapshot written in a pause would do.
    /// Other failures (the file cannot be made, the disk is full) would
    /// fail that too, after a long pause.
    pub unsupported: bool,
}

impl BackgroundError {
    fn unsupported(error: Error) -> Self {
        BackgroundError {
            error,
            resumed: false,
            unsupported: true,
        }
    }

    fn before_resume(error: Error) -> Self {
        BackgroundError {
            error,
            resumed: false,
            unsupported: false,
        }
    }

    fn after_resume(error: Error) -> Self {
        BackgroundError {
            error,
            resumed: true,
            unsupported: false,
        }
    }
}

/// `runs` (memfd offset, page count; ascending) with the pages of `bits`
/// (a bitmap of memfd page numbers) added, for `pages` pages of RAM.
fn with_pages(runs: Vec<(u64, u64)>, bits: &[u64], pages: u64) -> Vec<(u64, u64)> {
    if bits.iter().all(|w| *w == 0) {
        return runs;
    }
    let mut all = vec![0u64; pages.div_ceil(64) as usize];
    for (off, n) in runs {
        for p in off / PAGE_SIZE..off / PAGE_SIZE + n {
            all[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    for (a, b) in all.iter_mut().zip(bits) {
        *a |= b;
    }
    crate::bitmap::to_runs(&all)
}

/// Guest RAM registered for write-protect faults while it lives; dropping it
/// lifts every protection and wakes whoever waits.
struct Armed<'a> {
    uffd: &'a Uffd,
    map: &'a RamMap,
}

impl Armed<'_> {
    /// Registers RAM and write-protects all of it.
    fn arm(&self) -> Result<()> {
        for (start, len) in self.map.host_ranges() {
            self.uffd
                .register_wp(start, len)
                .map_err(io_err("registering guest memory for write-protection"))?;
            self.uffd
                .write_protect(start, len, true)
                .map_err(io_err("write-protecting guest memory"))?;
        }
        Ok(())
    }

    /// Calls `walk`, then `pause`, while a thread lets the running guest's
    /// writes through, noting their pages; returns when it paused, what
    /// `walk` and `pause` gave, and the bitmap of the pages written
    /// (unprotected since).
    fn pause_noting_writes<W>(
        &self,
        walk: impl FnOnce() -> Result<W>,
        pause: impl FnOnce() -> Result<Paused>,
    ) -> Result<(Instant, W, Paused, Vec<u64>)> {
        let touched: Vec<AtomicU64> = (0..self.map.pages().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let noter = std::thread::Builder::new()
                .name("save-notes".into())
                .spawn_scoped(s, || -> Result<()> {
                    crate::postcopy::prioritize_this_thread(false);
                    // Until the VM is paused: a vCPU stopped on a fault
                    // would keep the pause waiting.
                    self.uffd.each_fault(&stop, 5, |host| {
                        if let Some(p) = self.map.offset(host).map(|o| o / PAGE_SIZE) {
                            touched[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::AcqRel);
                        }
                        release(self.uffd, host)
                    })
                })
                .map_err(io_err("starting the save's note thread"))?;
            let done = walk().and_then(|walked| {
                let paused_at = Instant::now();
                pause().map(|paused| (paused_at, walked, paused))
            });
            stop.store(true, Ordering::Release);
            let noted = noter
                .join()
                .unwrap_or_else(|_| Err(Error::Protocol("the save's note thread panicked".into())));
            let (paused_at, walked, paused) = done?;
            noted?;
            let touched = touched.iter().map(|w| w.load(Ordering::Acquire)).collect();
            Ok((paused_at, walked, paused, touched))
        })
    }

    /// Lifts the protection of the RAM outside `runs` (ascending).
    fn release_holes(&self, runs: &[(u64, u64)]) -> Result<()> {
        let mut at = 0;
        let ends = runs
            .iter()
            .map(|&(off, n)| (off, off + n * PAGE_SIZE))
            .chain(std::iter::once((self.map.pages() * PAGE_SIZE, u64::MAX)));
        for (start, end) in ends {
            if start > at {
                for (host, len) in self.map.host_spans(at, start - at) {
                    self.uffd
                        .write_protect(host, len, false)
                        .map_err(io_err("lifting write-protection"))?;
                }
            }
            at = end;
        }
        Ok(())
    }

    /// Write-protects again the pages of `bits` (written before the pause).
    fn protect_again(&self, bits: &[u64]) -> Result<()> {
        for pfn in crate::bitmap::set_pages(bits) {
            for (host, len) in self.map.host_spans(pfn * PAGE_SIZE, PAGE_SIZE) {
                self.uffd
                    .write_protect(host, len, true)
                    .map_err(io_err("write-protecting guest memory"))?;
            }
        }
        Ok(())
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        for (start, len) in self.map.host_ranges() {
            if let Err(e) = self.uffd.write_protect(start, len, false) {
                tracing::error!("lifting the save's write-protection: {e}");
            }
        }
        if let Err(e) = self.map.unregister(self.uffd) {
            tracing::error!("unregistering the save's userfaultfd: {e}");
        }
    }
}

/// The shared state of a save's two writers.
struct Save<'a> {
    mem: MemView,
    writer: &'a SnapshotWriter,
    path: &'a Path,
    /// Pages saved so far; cancels the streaming pass.
    progress: &'a WriteProgress,
    map: &'a RamMap,
    uffd: &'a Uffd,
    /// Per stored page, in file order: UNTOUCHED, CLAIMED or SAVED.
    state: Vec<AtomicU8>,
    /// Per stored page: the CRC32 of what was saved.
    crcs: Vec<AtomicU32>,
    /// Pages the fault thread copied (stored-page index, content), for the
    /// streaming pass to write: a guest write never waits on the disk.
    held: Mutex<Vec<(u64, Vec<u8>)>>,
    /// The most pages `held` takes; the fault thread writes the rest itself.
    held_max: usize,
    /// Faulted pages the fault thread wrote itself, `held` being full.
    written_by_faults: AtomicU64,
    /// Pages claimed so far, by either.
    claimed: AtomicU64,
    /// Where the guest last wrote (a stored-page index; u64::MAX: nowhere
    /// new): the streaming pass goes on from there, ahead of the guest.
    recentre: AtomicU64,
    faults: AtomicU64,
    stop: AtomicBool,
    /// The fault thread ended on an error: nobody lets the guest's writes
    /// through any more but the streaming pass, which must stop at once.
    faults_down: AtomicBool,
}

impl Save<'_> {
    /// True if this caller now owns stored page `i`.
    fn claim(&self, i: u64) -> bool {
        let mine = self.state[i as usize]
            .compare_exchange(UNTOUCHED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if mine {
            self.claimed.fetch_add(1, Ordering::AcqRel);
        }
        mine
    }

    /// Writes stored page `i` to its slot, unless it is zero (its slot stays
    /// a hole, which reads as zeros), and marks it saved.
    fn save_page(&self, i: u64, page: &[u8]) -> Result<()> {
        if !vmm::memory::is_zero_page(page) {
            self.writer
                .file()
                .write_all_at(page, self.writer.slot(i))
                .map_err(io_err("writing the snapshot"))?;
        }
        self.state[i as usize].store(SAVED, Ordering::Release);
        self.progress.count(1);
        Ok(())
    }

    /// Writes the pages the fault thread holds to their slots.
    fn write_held(&self) -> Result<()> {
        let held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        for (i, page) in held {
            self.save_page(i, &page)?;
        }
        Ok(())
    }

    /// Writes the claimed pages `[first, first + n)` (stored-page indices) of
    /// the run at memfd offset `off` (the non-zero ones, a stretch at a time),
    /// and lifts their protection.
    fn write(&self, first: u64, off: u64, n: u64) -> Result<()> {
        let mut buf = Vec::with_capacity((n * PAGE_SIZE) as usize);
        let mut buf_first = first;
        let flush = |buf: &mut Vec<u8>, at: u64| -> Result<()> {
            if !buf.is_empty() {
                self.writer
                    .file()
                    .write_all_at(buf, self.writer.slot(at))
                    .map_err(io_err("writing the snapshot"))?;
                buf.clear();
            }
            Ok(())
        };
        for k in 0..n {
            let page = self
                .mem
                .page(off + k * PAGE_SIZE)
                .ok_or_else(|| Error::Protocol(format!("page {off:#x} outside RAM")))?;
            self.crcs[(first + k) as usize].store(crc32fast::hash(page), Ordering::Release);
            if vmm::memory::is_zero_page(page) {
                flush(&mut buf, buf_first)?;
                buf_first = first + k + 1;
            } else {
                buf.extend_from_slice(page);
            }
        }
        flush(&mut buf, buf_first)?;
        for k in first..first + n {
            self.state[k as usize].store(SAVED, Ordering::Release);
        }
        for (host, len) in self.map.host_spans(off, n * PAGE_SIZE) {
            self.uffd
                .write_protect(host, len, false)
                .map_err(io_err("lifting write-protection"))?;
        }
        Ok(self.progress.step(n, self.path)?)
    }

    /// The streaming pass: the stored pages the fault thread has not taken,
    /// a chunk at a time, in file order from where the guest last wrote
    /// (so that a guest sweeping its memory meets saved pages), round until
    /// every page is claimed.
    fn stream(&self) -> Result<()> {
        let total = self.writer.data_pages();
        let mut pos = 0;
        while self.claimed.load(Ordering::Acquire) < total {
            self.check_faults_up()?;
            let r = self.recentre.swap(u64::MAX, Ordering::AcqRel);
            if r < total {
                pos = r;
            }
            let end = (pos + CHUNK_PAGES as u64).min(total);
            // Stretches of claimed pages adjacent in the file and in memory.
            let mut run: Option<(u64, u64, u64)> = None; // (index, offset, pages)
            for i in pos..end {
                let off = self.writer.page_offset(i).ok_or_else(|| {
                    Error::Protocol(format!("stored page {i} has no place in guest memory"))
                })?;
                let mine = self.claim(i);
                match run {
                    Some((_, o, n)) if mine && o + n * PAGE_SIZE == off => {
                        run = run.map(|(f, o, n)| (f, o, n + 1))
                    }
                    _ => {
                        if let Some((f, o, n)) = run.take() {
                            self.write(f, o, n)?;
                        }
                        if mine {
                            run = Some((i, off, 1));
                        }
                    }
                }
            }
            if let Some((f, o, n)) = run {
                self.write(f, o, n)?;
            }
            self.write_held()?;
            pos = if end >= total { 0 } else { end };
        }
        Ok(())
    }

    /// Writes what the fault thread still holds, until every page is saved.
    /// Fails once the fault thread is down (see `faults_down`).
    fn check_faults_up(&self) -> Result<()> {
        match self.faults_down.load(Ordering::Acquire) {
            true => Err(Error::Protocol("the save's fault thread stopped".into())),
            false => Ok(()),
        }
    }

    /// Writes what the fault thread still holds, until every page is saved;
    /// fails if the fault thread goes down or saves nothing for [`SETTLE`].
    fn settle(&self) -> Result<()> {
        let total = self.writer.data_pages();
        let mut last = (self.progress.written(), Instant::now());
        loop {
            self.write_held()?;
            let written = self.progress.written();
            if written >= total {
                break;
            }
            self.check_faults_up()?;
            if written != last.0 {
                last = (written, Instant::now());
            } else if last.1.elapsed() > SETTLE {
                return Err(Error::Protocol(format!(
                    "the save's fault thread saved nothing for {} s with {} pages left",
                    SETTLE.as_secs(),
                    total - written
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Saves the pages the guest faults on, until told to stop.
    fn serve_faults(&self) -> Result<()> {
        self.uffd.each_fault(&self.stop, 20, |host| {
            let stored = self
                .map
                .offset(host)
                .and_then(|off| Some((off, self.writer.data_index(off)?)));
            match stored {
                Some((off, i)) if self.claim(i) => {
                    self.faults.fetch_add(1, Ordering::Relaxed);
                    self.recentre.store(i + 1, Ordering::Release);
                    let page = self
                        .mem
                        .page(off)
                        .ok_or_else(|| Error::Protocol(format!("page {off:#x} outside RAM")))?;
                    self.crcs[i as usize].store(crc32fast::hash(page), Ordering::Release);
                    {
                        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                        if held.len() < self.held_max {
                            held.push((i, page.to_vec()));
                        } else {
                            drop(held);
                            // The page stays protected while it is written.
                            self.save_page(i, page)?;
                            self.written_by_faults.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    release(self.uffd, host)
                }
                // The streaming pass has it and releases it when written.
                Some(_) => Ok(()),
                // Not a stored page: nothing to keep, let the write go on.
                None => release(self.uffd, host),
            }
        })
    }
}

/// Lifts the protection of the page at `host`, which lets its write go on.
fn release(uffd: &Uffd, host: u64) -> Result<()> {
    uffd.write_protect(host, PAGE_SIZE, false)
        .map_err(io_err("lifting write-protection"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;

    /// RAM of the fake guest: data in the first half, holes in the second.
    const PAGES: u64 = 8192;
    const DATA_PAGES: u64 = PAGES / 2;

    const RUNNING: u8 = 0;
    const PAUSE_ASKED: u8 = 1;
    const PAUSED: u8 = 2;
    const STOP: u8 = 3;

    /// A background save of `ram` with no guest running: pause and resume
    /// do nothing, and the state is a made-up one.
    fn save_idle(
        ram: &GuestRam,
        path: &std::path::Path,
        progress: &WriteProgress,
    ) -> std::result::Result<BackgroundStats, BackgroundError> {
        save(
            ram,
            path,
            None,
            || Ok((vmm::testing::state(ram.size()), None)),
            || {},
            progress,
        )
    }

    pub(crate) fn gpa(ram: &GuestRam, page: u64) -> u64 {
        ram.offset_to_gpa(page * PAGE_SIZE)
            .expect("page inside RAM")
    }

    /// RAM of `pages` pages whose first half is allocated, every other page
    /// of it zeros, saved in the background to `vm.snap` in a new scratch
    /// directory named after `tag`: (RAM, directory, file, statistics).
    pub(crate) fn half_zeros_saved(
        pages: u64,
        tag: &str,
    ) -> (
        GuestRam,
        std::path::PathBuf,
        std::path::PathBuf,
        BackgroundStats,
    ) {
        let ram = GuestRam::new(pages * PAGE_SIZE).unwrap();
        for p in 0..pages / 2 {
            let fill = if p % 2 == 0 { 0 } else { p as u8 | 1 };
            ram.write(gpa(&ram, p), &[fill; PAGE_SIZE as usize])
                .unwrap();
        }
        let dir = std::env::temp_dir().join(format!("migration-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.snap");
        let progress = WriteProgress::default();
        let stats =
            save_idle(&ram, &path, &progress).unwrap_or_else(|e| panic!("background save: {e:?}"));
        let stored = stats.snapshot.data_pages;
        assert_eq!((progress.pages(), progress.written()), (stored, stored));
        (ram, dir, path, stats)
    }

    /// Asserts that every page of `got` reads as in `want`.
    pub(crate) fn assert_same_ram(want: &GuestRam, got: &GuestRam) {
        let (mut a, mut b) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
        for p in 0..want.size() / PAGE_SIZE {
            want.read(gpa(want, p), &mut a).unwrap();
            got.read(gpa(got, p), &mut b).unwrap();
            assert!(a == b, "page {p} differs");
        }
    }

    /// A background save of RAM that a thread keeps writing, before the
    /// pause (data pages and holes alike) and after it (from the last data
    /// page down, so that it meets pages not saved yet), holding at most
    /// `held_max` pages aside: the file must hold RAM as it was at the pause.
    fn save_while_written(held_max: usize) -> BackgroundStats {
        let ram = GuestRam::new(PAGES * PAGE_SIZE).unwrap();
        for p in 0..DATA_PAGES {
            ram.write(gpa(&ram, p), &[p as u8 ^ 0x5a; 64]).unwrap();
        }
        let dir = std::env::temp_dir().join(format!(
            "migration-bgsave-{held_max}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.snap");
        let phase = AtomicU8::new(RUNNING);
        let mut at_pause = vec![0u8; (PAGES * PAGE_SIZE) as usize];
        let progress = WriteProgress::default();
        let stats = std::thread::scope(|s| {
            s.spawn(|| {
                // Before the pause: every page in turn (7 is prime to PAGES).
                let mut p = 0;
                let mut generation = 1u8;
                loop {
                    match phase.load(Ordering::Acquire) {
                        PAUSE_ASKED => break,
                        STOP => return,
                        _ => {}
                    }
                    ram.write(gpa(&ram, p), &[generation; 8]).unwrap();
                    p = (p + 7) % PAGES;
                    generation = generation.wrapping_add((p == 0) as u8);
                }
                phase.store(PAUSED, Ordering::Release);
                while phase.load(Ordering::Acquire) == PAUSED {
                    std::thread::yield_now();
                }
                // After the resume: the data pages from the last down.
                let mut p = DATA_PAGES;
                while phase.load(Ordering::Acquire) != STOP {
                    p = if p == 0 { DATA_PAGES - 1 } else { p - 1 };
                    ram.write(gpa(&ram, p), &[0xee; 8]).unwrap();
                }
            });
            let stats = save_holding(
                &ram,
                &path,
                None,
                || {
                    // A pause waits for the vCPUs to stop, as this waits for the writer.
                    phase.store(PAUSE_ASKED, Ordering::Release);
                    while phase.load(Ordering::Acquire) != PAUSED {
                        std::thread::yield_now();
                    }
                    ram.read(0, &mut at_pause).unwrap();
                    Ok((vmm::testing::state(ram.size()), None))
                },
                || phase.store(RUNNING, Ordering::Release),
                &progress,
                held_max,
            );
            phase.store(STOP, Ordering::Release);
            stats
        })
        .unwrap_or_else(|e| panic!("background save: {e:?}"));
        let (_, saved, file) = vmm::snapshot::read(&path).unwrap();
        let mut content = vec![0u8; at_pause.len()];
        saved.read(0, &mut content).unwrap();
        for (p, (want, got)) in at_pause
            .chunks(PAGE_SIZE as usize)
            .zip(content.chunks(PAGE_SIZE as usize))
            .enumerate()
        {
            assert!(want == got, "page {p} differs from RAM at the pause");
        }
        assert_eq!(file.data_pages, stats.snapshot.data_pages);
        assert!(stats.snapshot.data_pages >= DATA_PAGES);
        // Each stored page counted once, by whichever writer saved it.
        let stored = stats.snapshot.data_pages;
        assert_eq!((progress.pages(), progress.written()), (stored, stored));
        std::fs::remove_dir_all(&dir).unwrap();
        stats
    }

    #[test]
    fn pages_the_guest_changes_are_held_aside_and_saved_as_at_the_pause() {
        let stats = save_while_written(HELD_MAX);
        assert!(
            stats.faults > 0,
            "the writer met no unsaved page: {stats:?}"
        );
        assert_eq!(stats.written_by_faults, 0, "{stats:?}");
    }

    #[test]
    fn zero_pages_inside_data_extents_stay_holes_of_the_file_and_of_restored_ram() {
        use std::os::unix::fs::MetadataExt;
        let (ram, dir, path, stats) = half_zeros_saved(PAGES, "bgsave-zero");
        assert_eq!(
            stats.snapshot.data_pages, DATA_PAGES,
            "zero pages keep their slots"
        );
        let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
        let data = DATA_PAGES * PAGE_SIZE;
        assert!(
            on_disk < data * 3 / 4,
            "{on_disk} bytes on disk for {data} bytes of slots, half of them zero pages"
        );
        let (_, restored, _) = vmm::snapshot::read(&path).unwrap();
        // Restored, the zero pages are holes again: no memory for them
        // (checked before the comparison below reads, and so allocates, them).
        let resident: u64 = restored.data_extents().unwrap().iter().map(|e| e.1).sum();
        assert_eq!(
            resident,
            DATA_PAGES / 2 * PAGE_SIZE,
            "memory the restored RAM holds"
        );
        assert_same_ram(&ram, &restored);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Memory on huge pages is refused before the pause (the caller then
    /// saves in the pause), never write-protected 4 KiB at a time.
    #[test]
    fn memory_on_huge_pages_is_refused_before_the_pause() {
        let Some(ram) = vmm::testing::huge_ram_or_skip() else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("migration-huge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.snap");
        let paused = std::cell::Cell::new(false);
        let e = save(
            &ram,
            &path,
            None,
            || {
                paused.set(true);
                Ok((vmm::testing::state(ram.size()), None))
            },
            || {},
            &WriteProgress::default(),
        )
        .unwrap_err();
        assert!(!e.resumed && e.unsupported && !paused.get(), "{e:?}");
        assert!(e.error.to_string().contains("huge pages"), "{e:?}");
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn past_the_held_bound_the_fault_thread_writes_pages_itself() {
        let stats = save_while_written(0);
        assert!(
            stats.faults > 0,
            "the writer met no unsaved page: {stats:?}"
        );
        assert_eq!(stats.written_by_faults, stats.faults, "{stats:?}");
    }

    /// Prefaulted 4 KiB RAM, whose data are what its own (locked) mappings
    /// map: arming write protection leaves a marker in every empty entry,
    /// which pagemap shows as a swap entry. The save stores the pages
    /// written, not all of RAM, and leaves them the only data after it (all
    /// of RAM counted from then on, for every migration and save, before).
    #[test]
    fn a_prefaulted_ram_saves_only_its_data_and_keeps_them() {
        let ram = GuestRam::with_huge_pages(PAGES * PAGE_SIZE, false).unwrap();
        ram.prefault().unwrap();
        let written = [1u64, 2, 100, PAGES - 3];
        for p in written {
            ram.write(gpa(&ram, p), &[0x5a; PAGE_SIZE as usize])
                .unwrap();
        }
        let data = |ram: &GuestRam| -> u64 {
            vmm::snapshot::data_runs(ram)
                .unwrap()
                .iter()
                .map(|r| r.1)
                .sum()
        };
        assert_eq!(data(&ram), written.len() as u64);
        let dir = std::env::temp_dir().join(format!("migration-prefault-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.snap");
        let stats = save_idle(&ram, &path, &WriteProgress::default())
            .unwrap_or_else(|e| panic!("background save: {e:?}"));
        assert_eq!(stats.snapshot.data_pages, written.len() as u64);
        assert_eq!(data(&ram), written.len() as u64, "after the save");
        let (_, restored, _) = vmm::snapshot::read(&path).unwrap();
        assert_same_ram(&ram, &restored);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The guest's writes go through while the extents are walked, before
    /// the pause (they waited for the walk's end before: on large prefaulted
    /// RAM, a pagemap read of 8 bytes per page, uncounted in the pause).
    #[test]
    fn writes_during_the_extent_walk_go_through() {
        let ram = std::sync::Arc::new(GuestRam::new(PAGES * PAGE_SIZE).unwrap());
        ram.write(gpa(&ram, 5), &[1; 8]).unwrap();
        let map = RamMap::new(&ram);
        let uffd = Uffd::for_write_protect().unwrap();
        let armed = Armed {
            uffd: &uffd,
            map: &map,
        };
        armed.arm().unwrap();
        let walk = || {
            let (tx, rx) = std::sync::mpsc::channel();
            let writer = ram.clone();
            std::thread::spawn(move || {
                writer.write(gpa(&writer, 5), &[2; 8]).unwrap();
                let _ = tx.send(());
            });
            rx.recv_timeout(Duration::from_secs(5))
                .map_err(|_| Error::Protocol("a write waited for the walk".into()))
        };
        let pause = || Ok((vmm::testing::state(ram.size()), None));
        let (_, (), _, touched) = armed.pause_noting_writes(walk, pause).unwrap();
        assert_eq!(touched[0] & (1 << 5), 1 << 5, "the write was noted");
    }

    /// The pause does no file system work: the temporary file is there
    /// before it, still empty in it, and the front is written after it.
    #[test]
    fn the_file_is_made_before_the_pause_and_written_after_it() {
        let ram = GuestRam::new(PAGES * PAGE_SIZE).unwrap();
        for p in 0..DATA_PAGES {
            ram.write(gpa(&ram, p), &[p as u8 | 1; 64]).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("migration-prepared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.snap");
        let sizes = || -> Vec<u64> {
            std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.metadata().unwrap().len())
                .collect()
        };
        let in_pause = std::cell::RefCell::new(Vec::new());
        let stats = save(
            &ram,
            &path,
            None,
            || {
                *in_pause.borrow_mut() = sizes();
                Ok((vmm::testing::state(ram.size()), None))
            },
            || {},
            &WriteProgress::default(),
        )
        .unwrap();
        assert_eq!(
            *in_pause.borrow(),
            vec![0],
            "one empty temporary file in the pause"
        );
        assert_eq!(stats.snapshot.data_pages, DATA_PAGES);
        let (_, back, _) = vmm::snapshot::read(&path).unwrap();
        let mut b = [0u8; 64];
        back.read(gpa(&back, 3), &mut b).unwrap();
        assert_eq!(b, [3 | 1; 64]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A save cancelled while it streams fails after the resume, leaves no
    /// file and no temporary, and lifts the protection: the guest writes on.
    #[test]
    fn a_cancelled_save_leaves_nothing_and_unprotects_memory() {
        let ram = std::sync::Arc::new(GuestRam::new(PAGES * PAGE_SIZE).unwrap());
        for p in 0..DATA_PAGES {
            ram.write(gpa(&ram, p), &[p as u8 | 1; 64]).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("migration-cancel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.snap");
        let progress = WriteProgress::paced(Duration::from_millis(20));
        let r = vmm::testing::cancelled_after_first_step(&progress, || {
            save_idle(&ram, &path, &progress)
        });
        let e = r.expect_err("a cancelled save fails");
        assert!(e.resumed, "cancelled after the resume: {e:?}");
        assert!(e.error.to_string().contains("cancelled"), "{e:?}");
        assert!(progress.written() < DATA_PAGES, "{}", progress.written());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "files left");
        // Not write-protected any more: the writes go through (a protected
        // page would keep its writer waiting for an answer that never comes).
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = ram.clone();
        std::thread::spawn(move || {
            for p in 0..DATA_PAGES {
                writer.write(gpa(&writer, p), &[0xee; 8]).unwrap();
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("guest memory still write-protected after the cancel");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
