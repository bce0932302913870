//! Background save: a snapshot file written while the guest runs on.
//!
//! The guest is paused only to capture its state, list the memfd's data
//! extents (no page is read) and write-protect them through userfaultfd. It
//! then resumes, and the pages are written to the file in order. A page the
//! guest is about to change is saved first: its write faults, the fault
//! thread copies the page to its place in the file and lifts the protection.
//! The file holds memory as it was at the pause, as QEMU's background
//! snapshot does; the format is the one of [`vmm::snapshot`], except that
//! zero pages inside data extents are stored (finding them means reading
//! every page, which the pause is too short for).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use vmm::memory::{GuestRam, PAGE_SIZE};
use vmm::snapshot::{SnapshotStats, SnapshotWriter};
use vmm::state::VmState;

use crate::memview::MemView;
use crate::uffd::{RamMap, Uffd};
use crate::{io_err, Error, Result};

/// Pages the streaming pass copies and releases at a time.
const CHUNK_PAGES: usize = 64;
/// How long the end waits for the fault thread's last copies.
const SETTLE: Duration = Duration::from_secs(10);

/// A page's progress: untouched, claimed by one of the two writers, in the file.
const UNTOUCHED: u8 = 0;
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
}

/// Writes a snapshot of the paused VM (`state`, `ram`) to `path`, calls
/// `resume` as soon as guest memory is write-protected, and returns once the
/// file is complete. `paused_at` is when the VM was paused. On any error
/// the protection is lifted (the guest never waits on a save that failed) and
/// no file is left.
pub fn save(
    ram: &GuestRam,
    state: &VmState,
    path: &Path,
    working_set: Option<&[u64]>,
    paused_at: Instant,
    resume: impl FnOnce(),
) -> Result<BackgroundStats> {
    let runs = vmm::snapshot::data_runs(ram)?;
    let writer = SnapshotWriter::create(path, state, ram.size(), runs, working_set)?;
    let map = RamMap::new(ram);
    let uffd = Uffd::for_write_protect().map_err(io_err("userfaultfd (write-protect)"))?;
    let armed = Armed {
        uffd: &uffd,
        map: &map,
        writer: &writer,
    };
    armed.arm()?;
    resume();
    let paused = paused_at.elapsed();
    let save = Save {
        mem: MemView::new(ram),
        writer: &writer,
        map: &map,
        uffd: &uffd,
        state: (0..writer.data_pages())
            .map(|_| AtomicU8::new(UNTOUCHED))
            .collect(),
        crcs: (0..writer.data_pages())
            .map(|_| AtomicU32::new(0))
            .collect(),
        faults: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    };
    let streamed = std::thread::scope(|s| {
        let faults = std::thread::Builder::new()
            .name("save-faults".into())
            .spawn_scoped(s, || {
                crate::postcopy::prioritize_this_thread();
                save.serve_faults()
            })
            .map_err(io_err("starting the save's fault thread"))?;
        let streamed = save.stream().and_then(|()| save.settle());
        save.stop.store(true, Ordering::Release);
        let served = faults
            .join()
            .unwrap_or_else(|_| Err(Error::Protocol("the save's fault thread panicked".into())));
        streamed.and(served)
    });
    // Protection off and waiters woken whatever happened.
    drop(armed);
    streamed?;
    let mut crc = crc32fast::Hasher::new();
    for c in &save.crcs {
        crc.combine(&crc32fast::Hasher::new_with_initial_len(
            c.load(Ordering::Acquire),
            PAGE_SIZE,
        ));
    }
    let faults = save.faults.load(Ordering::Relaxed);
    drop(save);
    let snapshot = writer.finish(crc.finalize())?;
    tracing::info!(
        path = %path.display(),
        pages = snapshot.data_pages,
        paused_us = paused.as_micros() as u64,
        faults,
        ms = snapshot.elapsed.as_secs_f64() * 1e3,
        "background snapshot written"
    );
    Ok(BackgroundStats {
        snapshot,
        paused,
        faults,
    })
}

/// Guest RAM registered for write-protect faults while it lives; dropping it
/// lifts every protection and wakes whoever waits.
struct Armed<'a> {
    uffd: &'a Uffd,
    map: &'a RamMap,
    writer: &'a SnapshotWriter,
}

impl Armed<'_> {
    /// Registers RAM and write-protects the stored pages.
    fn arm(&self) -> Result<()> {
        for (start, len) in self.map.host_ranges() {
            self.uffd
                .register_wp(start, len)
                .map_err(io_err("registering guest memory for write-protection"))?;
        }
        for &(off, n) in self.writer.runs() {
            for (host, len) in self.map.host_spans(off, n * PAGE_SIZE) {
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
    map: &'a RamMap,
    uffd: &'a Uffd,
    /// Per stored page, in file order: UNTOUCHED, CLAIMED or SAVED.
    state: Vec<AtomicU8>,
    /// Per stored page: the CRC32 of what was saved.
    crcs: Vec<AtomicU32>,
    faults: AtomicU64,
    stop: AtomicBool,
}

impl Save<'_> {
    /// True if this caller now owns stored page `i`.
    fn claim(&self, i: u64) -> bool {
        self.state[i as usize]
            .compare_exchange(UNTOUCHED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Writes the claimed pages `[first, first + n)` (stored-page indices) of
    /// the run at memfd offset `off`, and lifts their protection.
    fn write(&self, first: u64, off: u64, n: u64) -> Result<()> {
        let mut buf = Vec::with_capacity((n * PAGE_SIZE) as usize);
        for k in 0..n {
            let page = self
                .mem
                .page(off + k * PAGE_SIZE)
                .ok_or_else(|| Error::Protocol(format!("page {off:#x} outside RAM")))?;
            self.crcs[(first + k) as usize].store(crc32fast::hash(page), Ordering::Release);
            buf.extend_from_slice(page);
        }
        self.writer
            .file()
            .write_all_at(&buf, self.writer.slot(first))
            .map_err(io_err("writing the snapshot"))?;
        for k in first..first + n {
            self.state[k as usize].store(SAVED, Ordering::Release);
        }
        for (host, len) in self.map.host_spans(off, n * PAGE_SIZE) {
            self.uffd
                .write_protect(host, len, false)
                .map_err(io_err("lifting write-protection"))?;
        }
        Ok(())
    }

    /// The streaming pass: every stored page in file order, those the fault
    /// thread has not taken, a chunk at a time.
    fn stream(&self) -> Result<()> {
        let mut i = 0u64;
        for &(off, n) in self.writer.runs() {
            let mut k = 0;
            while k < n {
                let end = (k + CHUNK_PAGES as u64).min(n);
                // Contiguous claimed stretches of this chunk.
                let mut from = None;
                for j in k..=end {
                    let mine = j < end && self.claim(i + j - k);
                    match (mine, from) {
                        (true, None) => from = Some(j),
                        (false, Some(f)) => {
                            self.write(i + f - k, off + f * PAGE_SIZE, j - f)?;
                            from = None;
                        }
                        _ => {}
                    }
                }
                i += end - k;
                k = end;
            }
        }
        Ok(())
    }

    /// Waits until the fault thread has written every page it claimed.
    fn settle(&self) -> Result<()> {
        let end = Instant::now() + SETTLE;
        while self
            .state
            .iter()
            .any(|s| s.load(Ordering::Acquire) != SAVED)
        {
            if Instant::now() > end {
                return Err(Error::Protocol(
                    "the save's fault thread did not finish its pages".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Saves the pages the guest faults on, until told to stop.
    fn serve_faults(&self) -> Result<()> {
        let mut addrs = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            addrs.clear();
            self.uffd
                .read_faults(20, &mut addrs)
                .map_err(io_err("reading write-protect faults"))?;
            for &a in &addrs {
                let host = a & !(PAGE_SIZE - 1);
                let stored = self
                    .map
                    .offset(host)
                    .and_then(|off| Some((off, self.writer.data_index(off)?)));
                match stored {
                    Some((off, i)) if self.claim(i) => {
                        self.faults.fetch_add(1, Ordering::Relaxed);
                        self.write(i, off, 1)?;
                    }
                    // The streaming pass has it and releases it when written.
                    Some(_) => {}
                    // Not a stored page: nothing to keep, let the write go on.
                    None => self
                        .uffd
                        .write_protect(host, PAGE_SIZE, false)
                        .map_err(io_err("lifting write-protection"))?,
                }
            }
        }
        Ok(())
    }
}
