//! Snapshot files: the VM state and the guest's non-zero pages.
//!
//! Layout (all integers little-endian):
//!
//! | part    | contents |
//! |---------|----------|
//! | header  | 64 bytes: magic `MIGDSNAP`, format version, header length, RAM size, state length, run count, data page count, page size, flags, CRC32 of the preceding 56 bytes, reserved |
//! | state   | `state_len` bytes of [`VmState`] (bincode), then its CRC32 |
//! | runs    | `run_count` × (memfd offset u64, page count u64), then their CRC32 |
//! | working set | only if flags bit 0 ([`FLAG_WORKING_SET`]): count u64, `count` × memfd page number u64 (ascending, each a stored page), then the CRC32 of count and page numbers |
//! | boot    | only if flags bit 2 ([`FLAG_BOOT`]): length u32, the VM's [`BootSpec`] (bincode), then the CRC32 of length and spec |
//! | padding | only if flags bit 1 ([`FLAG_ALIGNED_DATA`]): zeros up to the next multiple of 4 KiB |
//! | data    | the pages of the runs, in order, 4 KiB each |
//! | trailer | CRC32 of the data, then `SNAPEND\0` |
//!
//! Pages that are zero (never written, or zeroed) are not stored. Files of
//! this build have their page data aligned (flag bit 1): every page is a
//! file-system block of its own, so a page slot never written (a background
//! save leaves zero pages so) is a hole that takes no disk. Files without
//! the flag (earlier builds) are read as before. The file is
//! written under a temporary name and renamed into place. Restore checks the
//! magic, version, every size against the file length and the host, and every
//! checksum before the memory is given to a VM.
//!
//! The working set (pages the guest wrote in the moments before the snapshot)
//! is optional and changes nothing else: the eager [`read`] validates and
//! ignores it; lazy restore ([`LazySnapshot`]) fills those pages first.
//! Unknown flag bits are refused.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::boot::BootSpec;
use crate::error::{Error, Result};
use crate::memory::{check_memory_size, is_zero_page, punch_hole, GuestRam, PAGE_SIZE};
use crate::state::{VmState, MAX_STATE_BYTES};

/// File magic.
pub const MAGIC: &[u8; 8] = b"MIGDSNAP";
/// Trailer magic.
pub const END_MAGIC: &[u8; 8] = b"SNAPEND\0";
/// Snapshot format version written and accepted.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
/// Header flag bit 0: a working-set section follows the page index.
pub const FLAG_WORKING_SET: u32 = 1;
/// Header flag bit 1: the page data starts at a multiple of 4 KiB (zero
/// padding before it).
pub const FLAG_ALIGNED_DATA: u32 = 2;
/// Header flag bit 2: a boot section (how the VM boots from its kernel, as
/// `virsh save` keeps the domain's definition) follows the working set.
pub const FLAG_BOOT: u32 = 4;
const KNOWN_FLAGS: u32 = FLAG_WORKING_SET | FLAG_ALIGNED_DATA | FLAG_BOOT;
/// Largest boot section body accepted (three paths or lines of 4 KiB and more).
const MAX_BOOT_BYTES: u64 = 16 << 10;

/// The variable sizes of the sections after the page index.
#[derive(Clone, Copy, Debug, Default)]
struct Sections {
    /// Working-set pages.
    ws_count: u64,
    /// Bytes of the encoded boot spec.
    boot_len: u64,
}

/// What a snapshot write or read did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Guest RAM size.
    pub memory: u64,
    /// Pages stored in the file.
    pub data_pages: u64,
    /// Pages in the working-set section (0 when there is none).
    pub working_set_pages: u64,
    /// How the VM boots from its kernel, as the file carries it (none for a
    /// VM not booted from a kernel here, or a file of an earlier build).
    pub boot: Option<BootSpec>,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    version: u32,
    memory: u64,
    state_len: u64,
    run_count: u64,
    data_pages: u64,
    page_size: u32,
    flags: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.memory.to_le_bytes());
        h[24..32].copy_from_slice(&self.state_len.to_le_bytes());
        h[32..40].copy_from_slice(&self.run_count.to_le_bytes());
        h[40..48].copy_from_slice(&self.data_pages.to_le_bytes());
        h[48..52].copy_from_slice(&self.page_size.to_le_bytes());
        h[52..56].copy_from_slice(&self.flags.to_le_bytes());
        let crc = crc32fast::hash(&h[..56]);
        h[56..60].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> std::result::Result<Self, String> {
        if &h[0..8] != MAGIC {
            return Err("not a migd snapshot (bad magic)".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
        let version = u32_at(8);
        let intact = u32_at(56) == crc32fast::hash(&h[..56]);
        if version != FORMAT_VERSION {
            // A bit flipped in the version reads as another version: say so.
            let or_corrupted = if intact {
                ""
            } else {
                ", or the header is corrupted (its checksum does not match)"
            };
            return Err(format!(
                "snapshot format version {version} is not supported (this build reads version \
                 {FORMAT_VERSION}){or_corrupted}"
            ));
        }
        if !intact {
            return Err("header checksum mismatch (corrupted header)".into());
        }
        // Reserved, written as zeros (outside the checksum).
        if h[60..64] != [0; 4] {
            return Err("reserved header bytes 60..64 are not zero (corrupted header)".into());
        }
        if u32_at(12) as usize != HEADER_LEN {
            return Err(format!("header length {} is not {HEADER_LEN}", u32_at(12)));
        }
        if u32_at(52) & !KNOWN_FLAGS != 0 {
            return Err(format!(
                "unknown flags {:#x} in header (this build knows {KNOWN_FLAGS:#x})",
                u32_at(52)
            ));
        }
        Ok(Header {
            version,
            memory: u64_at(16),
            state_len: u64_at(24),
            run_count: u64_at(32),
            data_pages: u64_at(40),
            page_size: u32_at(48),
            flags: u32_at(52),
        })
    }

    /// Offset of the section after the page index (working set or data).
    fn after_index(&self) -> Option<u64> {
        (HEADER_LEN as u64)
            .checked_add(self.state_len)?
            .checked_add(4)?
            .checked_add(self.run_count.checked_mul(16)?)?
            .checked_add(4)
    }

    fn has_working_set(&self) -> bool {
        self.flags & FLAG_WORKING_SET != 0
    }

    /// Bytes of the working-set section holding `count` pages.
    fn working_set_len(&self, count: u64) -> Option<u64> {
        if self.has_working_set() {
            count.checked_mul(8)?.checked_add(12)
        } else {
            Some(0)
        }
    }

    /// Bytes of the boot section holding `len` bytes of spec.
    fn boot_section_len(&self, len: u64) -> Option<u64> {
        if self.flags & FLAG_BOOT != 0 {
            len.checked_add(8)
        } else {
            Some(0)
        }
    }

    /// Offset of the page data, given the sections' sizes.
    fn data_offset(&self, s: Sections) -> Option<u64> {
        let end = self.sections_end(s)?;
        if self.flags & FLAG_ALIGNED_DATA != 0 {
            end.checked_next_multiple_of(PAGE_SIZE)
        } else {
            Some(end)
        }
    }

    /// Offset of the boot section (if any), after the working set.
    fn boot_at(&self, ws_count: u64) -> Option<u64> {
        self.after_index()?
            .checked_add(self.working_set_len(ws_count)?)
    }

    /// Offset of the end of the sections before the page data (and padding).
    fn sections_end(&self, s: Sections) -> Option<u64> {
        self.boot_at(s.ws_count)?
            .checked_add(self.boot_section_len(s.boot_len)?)
    }

    /// Exact file length this header implies, or None on overflow.
    fn file_len(&self, s: Sections) -> Option<u64> {
        self.data_offset(s)?
            .checked_add(self.data_pages.checked_mul(PAGE_SIZE)?)?
            .checked_add(12)
    }
}

/// A read-only or read-write view of the whole memfd.
struct MemfdMap {
    ptr: *mut u8,
    len: usize,
}

impl MemfdMap {
    fn new(ram: &GuestRam, writable: bool) -> Result<Self> {
        let len = ram.size() as usize;
        let prot = if writable {
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE
        } else {
            nix::sys::mman::ProtFlags::PROT_READ
        };
        let nz = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| Error::GuestMemory("empty RAM".into()))?;
        // SAFETY: a new shared mapping of a memfd we hold; unmapped in Drop.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                nz,
                prot,
                nix::sys::mman::MapFlags::MAP_SHARED,
                ram.memfd().as_fd(),
                0,
            )
        }
        .map_err(|e| Error::GuestMemory(format!("mmap of memfd: {e}")))?;
        crate::memory::dont_dump(p.as_ptr() as *mut u8, len);
        Ok(MemfdMap {
            ptr: p.as_ptr() as *mut u8,
            len,
        })
    }

    fn slice(&self, offset: u64, len: u64) -> &[u8] {
        assert!(offset + len <= self.len as u64);
        // SAFETY: in bounds (checked above); the mapping lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset as usize), len as usize) }
    }

    #[allow(clippy::mut_from_ref)]
    fn slice_mut(&self, offset: u64, len: u64) -> &mut [u8] {
        assert!(offset + len <= self.len as u64);
        // SAFETY: in bounds; the only writer while restoring (no VM maps it yet).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset as usize), len as usize) }
    }
}

impl Drop for MemfdMap {
    fn drop(&mut self) {
        if let Some(p) = std::ptr::NonNull::new(self.ptr as *mut libc::c_void) {
            // SAFETY: unmapping exactly what `new` mapped.
            let _ = unsafe { nix::sys::mman::munmap(p, self.len) };
        }
    }
}

/// Runs (memfd offset, page count) of non-zero pages; holes are skipped unread.
pub fn nonzero_runs(ram: &GuestRam) -> Result<Vec<(u64, u64)>> {
    let map = MemfdMap::new(ram, false)?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (start, len) in ram.data_extents()? {
        let first = start / PAGE_SIZE;
        let last = (start + len)
            .div_ceil(PAGE_SIZE)
            .min(ram.size() / PAGE_SIZE);
        for pfn in first..last {
            if is_zero_page(map.slice(pfn * PAGE_SIZE, PAGE_SIZE)) {
                continue;
            }
            match runs.last_mut() {
                Some((off, n)) if *off + *n * PAGE_SIZE == pfn * PAGE_SIZE => *n += 1,
                _ => runs.push((pfn * PAGE_SIZE, 1)),
            }
        }
    }
    Ok(runs)
}

/// Runs (memfd offset, page count) of the memfd's data extents, zero pages
/// included: known without reading a page (for a save that must not pause
/// the guest while it scans).
pub fn data_runs(ram: &GuestRam) -> Result<Vec<(u64, u64)>> {
    let pages = ram.size() / PAGE_SIZE;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (start, len) in ram.data_extents()? {
        let first = start / PAGE_SIZE;
        let last = (start + len).div_ceil(PAGE_SIZE).min(pages);
        if first >= last {
            continue;
        }
        match runs.last_mut() {
            Some((off, n)) if *off + *n * PAGE_SIZE >= first * PAGE_SIZE => {
                *n = last - *off / PAGE_SIZE;
            }
            _ => runs.push((first * PAGE_SIZE, last - first)),
        }
    }
    Ok(runs)
}

/// Index in the page data of the stored page at memfd offset `off`, given
/// the runs and the data index of each run's first page.
fn data_index(runs: &[(u64, u64)], run_first: &[u64], off: u64) -> Option<u64> {
    let off = off & !(PAGE_SIZE - 1);
    let i = runs.partition_point(|(o, _)| *o <= off);
    if i == 0 {
        return None;
    }
    let (o, n) = runs[i - 1];
    if off >= o + n * PAGE_SIZE {
        return None;
    }
    Some(run_first[i - 1] + (off - o) / PAGE_SIZE)
}

/// Data index of each run's first page.
fn run_starts(runs: &[(u64, u64)]) -> Vec<u64> {
    let mut acc = 0;
    runs.iter()
        .map(|(_, n)| {
            let first = acc;
            acc += n;
            first
        })
        .collect()
}

/// The start of the names of `path`'s temporary files made on this host:
/// `<name>.tmp.<host>.` (the pid, a sequence number and the clock follow),
/// with at most [`TEMP_NAME_PART`] bytes of the name, so that the temporary
/// file of any name a file may have still has a name that may be made.
fn temp_prefix(path: &Path) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStrExt;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .replace(['/', '.'], "_");
    let name = path.file_name().unwrap_or_default().as_bytes();
    let mut prefix =
        std::ffi::OsStr::from_bytes(&name[..name.len().min(TEMP_NAME_PART)]).to_os_string();
    prefix.push(format!(".tmp.{host}."));
    prefix
}

/// Bytes of a snapshot's file name its temporary file's name keeps: with
/// the host name (at most 64), the pid, a sequence number and the clock, at
/// most 237 of the 255 a name may have.
const TEMP_NAME_PART: usize = 128;

/// Temporary files an earlier process on this host left beside `path`
/// (killed, or the host lost power, while it saved): those whose process is
/// gone and that nobody has written for `idle`. Only names of this host
/// count, so that a save in progress on another host sharing the directory
/// is never touched. Removes them; returns how many.
pub fn remove_stale_temps(path: &Path, idle: std::time::Duration) -> usize {
    let prefix = temp_prefix(path);
    let prefix = prefix.as_encoded_bytes();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.as_encoded_bytes().strip_prefix(prefix) else {
            continue;
        };
        let pid = std::str::from_utf8(rest)
            .ok()
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<i32>().ok());
        let Some(pid) = pid.filter(|&p| p > 0) else {
            continue;
        };
        // Signal 0: is the process there (EPERM: there, not ours)?
        let alive = !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        let idle_for = e
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok());
        if !alive && idle_for.is_some_and(|t| t >= idle) && std::fs::remove_file(e.path()).is_ok() {
            tracing::info!(file = %e.path().display(), "removed a snapshot's temporary file left by a process gone");
            removed += 1;
        }
    }
    removed
}

/// How long a dead process's temporary file must have been left unwritten
/// before a new save beside it removes it.
const STALE_TEMP_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Creates the file a snapshot for `path` is written into before it is
/// renamed there: beside it, under a name of its own (host, pid, sequence,
/// clock), created new (never an existing file, nor through a symlink), for
/// the owner only: all of guest memory goes in it. Temporary files of dead
/// processes beside it go first ([`remove_stale_temps`]).
fn create_temp(path: &Path) -> std::io::Result<(File, PathBuf)> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    remove_stale_temps(path, STALE_TEMP_IDLE);
    let mut tries = 0;
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut name = temp_prefix(path);
        name.push(format!("{}.{seq}.{nanos:08x}", std::process::id()));
        let tmp = path.with_file_name(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Writes a snapshot of `state` and `ram` to `path` (atomically).
pub fn write(path: &Path, state: &VmState, ram: &GuestRam) -> Result<SnapshotStats> {
    write_with_working_set(path, state, ram, None, None, &WriteProgress::default())
}

/// How far the page data of a snapshot being written has got, for another
/// thread to report (`migctl info` while `migctl save` runs), and a way to
/// cancel it: the writer then fails with "cancelled" and removes its
/// temporary file. Cancel and the writer's commit (the file synced, about to
/// be renamed into place) exclude each other: a cancel that comes later is
/// refused, so that a save said to be cancelled never completes.
#[derive(Debug, Default)]
pub struct WriteProgress {
    pages: AtomicU64,
    written: AtomicU64,
    /// [`WRITING`], [`CANCELLED`] or [`COMMITTED`].
    state: AtomicU8,
    /// Tests: a pause at each step of the writer's main pass, so that a save
    /// lasts long enough to be watched.
    pace: Option<Duration>,
    /// Tests: a pause right after the commit, as a slow rename would take.
    commit_hold: Option<Duration>,
}

const WRITING: u8 = 0;
const CANCELLED: u8 = 1;
const COMMITTED: u8 = 2;

/// Most bytes of page data between two steps (progress and cancel check).
pub const PROGRESS_STEP: u64 = 1 << 20;

impl WriteProgress {
    /// Progress that pauses `pace` at each step of the writer's main pass
    /// (at most [`PROGRESS_STEP`] of pages; for tests that watch a save).
    pub fn paced(pace: Duration) -> Self {
        WriteProgress {
            pace: Some(pace),
            ..Default::default()
        }
    }

    /// This progress also pauses `hold` right after the commit (tests: a
    /// save past its point of no return that takes a while to complete).
    pub fn holding_after_commit(self, hold: Duration) -> Self {
        WriteProgress {
            commit_hold: Some(hold),
            ..self
        }
    }

    /// Pages the file stores (0 until its layout is known).
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// Pages stored so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Asks the writer to stop at its next step, which it then surely does
    /// (true), unless it has committed already: false, and the file is (or
    /// is about to be) in place.
    pub fn cancel(&self) -> bool {
        match self
            .state
            .compare_exchange(WRITING, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(now) => now == CANCELLED,
        }
    }

    /// Whether the writer has passed its point of no return: the file is
    /// synced and is (about to be) renamed into place; it can no longer be
    /// cancelled.
    pub fn is_committed(&self) -> bool {
        self.state.load(Ordering::Acquire) == COMMITTED
    }

    /// Whether [`Self::cancel`] took effect.
    pub fn is_cancelled(&self) -> bool {
        self.state.load(Ordering::Acquire) == CANCELLED
    }

    /// The writer's point of no return, right before the rename: fails
    /// (naming `path`) if the save was cancelled; any later cancel is refused.
    pub fn commit(&self, path: &Path) -> Result<()> {
        match self
            .state
            .compare_exchange(WRITING, COMMITTED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                if let Some(hold) = self.commit_hold {
                    std::thread::sleep(hold);
                }
                Ok(())
            }
            Err(_) => Err(snap_err(path, "cancelled".into())),
        }
    }

    /// The file's layout is known: it stores `pages` pages.
    pub fn start(&self, pages: u64) {
        self.pages.store(pages, Ordering::Relaxed);
    }

    /// `pages` more pages are stored.
    pub fn count(&self, pages: u64) {
        self.written.fetch_add(pages, Ordering::Relaxed);
    }

    /// `pages` more pages are stored by the writer's main pass, which stops
    /// here (an error naming `path`) if the save was cancelled.
    pub fn step(&self, pages: u64, path: &Path) -> Result<()> {
        self.count(pages);
        if let Some(pace) = self.pace {
            std::thread::sleep(pace);
        }
        if self.is_cancelled() {
            return Err(snap_err(path, "cancelled".into()));
        }
        Ok(())
    }
}

/// Writes a snapshot like [`write()`], with a working-set section when
/// `working_set` is given: memfd page numbers the guest used last (e.g. the
/// dirty log of a short window before the pause). Pages that are not stored
/// (zero) are left out of it; order and duplicates do not matter. With
/// `boot`, the file also carries how the VM boots from its kernel. The
/// pages written are counted in `progress`, which can also cancel the write.
pub fn write_with_working_set(
    path: &Path,
    state: &VmState,
    ram: &GuestRam,
    working_set: Option<&[u64]>,
    boot: Option<&BootSpec>,
    progress: &WriteProgress,
) -> Result<SnapshotStats> {
    let runs = nonzero_runs(ram)?;
    let w = SnapshotWriter::create(path, state, ram.size(), runs, working_set, boot)?;
    progress.start(w.data_pages());
    let io = |e: std::io::Error| snap_err(path, format!("write: {e}"));
    let map = MemfdMap::new(ram, false)?;
    let mut crc = crc32fast::Hasher::new();
    {
        let mut out = BufWriter::with_capacity(PROGRESS_STEP as usize, w.file());
        for (off, n) in w.runs() {
            let data = map.slice(*off, n * PAGE_SIZE);
            for step in data.chunks(PROGRESS_STEP as usize) {
                crc.update(step);
                out.write_all(step).map_err(io)?;
                progress.step(step.len() as u64 / PAGE_SIZE, path)?;
            }
        }
        out.flush().map_err(io)?;
    }
    w.finish(crc.finalize(), progress)
}

/// A snapshot file being written under a temporary name. [`Self::create`]
/// writes everything before the page data; the pages then go to their
/// [`Self::slot`], in any order (a background save writes them as it can);
/// [`Self::finish`] adds the trailer, syncs and renames the file into place.
/// Dropped unfinished, it removes the temporary file.
pub struct SnapshotWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    /// Renamed into place: nothing to remove on drop.
    done: bool,
    /// The header, state and indexes, when not written at creation (see
    /// [`SnapshotWriter::create_in`]): written by [`SnapshotWriter::write_front`]
    /// or at the latest by `finish`.
    front: std::sync::Mutex<Option<Vec<u8>>>,
    runs: Vec<(u64, u64)>,
    run_first: Vec<u64>,
    data_offset: u64,
    stats: SnapshotStats,
    start: Instant,
}

/// The temporary file a snapshot for a path will be written into, made
/// ahead (see [`SnapshotWriter::prepare`]); removed when dropped unused.
pub struct PreparedFile {
    path: PathBuf,
    /// Taken by the writer.
    file: Option<(File, PathBuf)>,
}

impl Drop for PreparedFile {
    fn drop(&mut self) {
        if let Some((_, tmp)) = &self.file {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

impl SnapshotWriter {
    /// Makes the temporary file for a snapshot of `path` (and removes stale
    /// ones beside it), ahead of [`SnapshotWriter::create_in`]: a save that
    /// pauses its VM does this file system work before the pause.
    pub fn prepare(path: &Path) -> Result<PreparedFile> {
        let file = create_temp(path).map_err(|e| snap_err(path, format!("create: {e}")))?;
        Ok(PreparedFile {
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    /// Starts a snapshot of `state` for RAM of `memory` bytes whose stored
    /// pages are `runs` (memfd offset, page count; ascending, disjoint), with
    /// the working set as [`write_with_working_set`] takes it, and the VM's
    /// `boot` spec if it has one. The file position is left at the page data.
    pub fn create(
        path: &Path,
        state: &VmState,
        memory: u64,
        runs: Vec<(u64, u64)>,
        working_set: Option<&[u64]>,
        boot: Option<&BootSpec>,
    ) -> Result<Self> {
        let w = Self::create_in(Self::prepare(path)?, state, memory, runs, working_set, boot)?;
        w.write_front()?;
        Ok(w)
    }

    /// [`SnapshotWriter::create`] in a file made ahead, without writing
    /// anything: the front (header, state, indexes) is kept in memory until
    /// [`SnapshotWriter::write_front`] (or `finish`) writes it, so that a
    /// save can do it after its pause. Page data is written at its own
    /// offsets ([`SnapshotWriter::slot`]) meanwhile.
    pub fn create_in(
        mut prepared: PreparedFile,
        state: &VmState,
        memory: u64,
        runs: Vec<(u64, u64)>,
        working_set: Option<&[u64]>,
        boot: Option<&BootSpec>,
    ) -> Result<Self> {
        let path = prepared.path.clone();
        let path = path.as_path();
        let start = Instant::now();
        let blob = state.encode()?;
        let data_pages: u64 = runs.iter().map(|r| r.1).sum();
        let ws: Option<Vec<u64>> = working_set.map(|w| {
            let mut v: Vec<u64> = w.iter().copied().filter(|&p| in_runs(&runs, p)).collect();
            v.sort_unstable();
            v.dedup();
            v
        });
        let ws_pages = ws.as_ref().map_or(0, |w| w.len() as u64);
        // A spec that does not encode (a path that is not UTF-8) is left out.
        let boot_bytes = boot
            .and_then(|b| bincode::serde::encode_to_vec(b, bincode::config::standard()).ok())
            .filter(|b| b.len() as u64 <= MAX_BOOT_BYTES);
        let sections = Sections {
            ws_count: ws_pages,
            boot_len: boot_bytes.as_ref().map_or(0, |b| b.len() as u64),
        };
        let header = Header {
            version: FORMAT_VERSION,
            memory,
            state_len: blob.len() as u64,
            run_count: runs.len() as u64,
            data_pages,
            page_size: PAGE_SIZE as u32,
            flags: FLAG_ALIGNED_DATA
                | if ws.is_some() { FLAG_WORKING_SET } else { 0 }
                | if boot_bytes.is_some() { FLAG_BOOT } else { 0 },
        };
        let (Some(data_offset), Some(file_bytes)) =
            (header.data_offset(sections), header.file_len(sections))
        else {
            return Err(snap_err(path, "sizes overflow".into()));
        };
        let mut front = Vec::with_capacity(data_offset as usize);
        front.extend_from_slice(&header.encode());
        front.extend_from_slice(&blob);
        front.extend_from_slice(&crc32fast::hash(&blob).to_le_bytes());
        let index_at = front.len();
        for (off, n) in &runs {
            front.extend_from_slice(&off.to_le_bytes());
            front.extend_from_slice(&n.to_le_bytes());
        }
        let index_crc = crc32fast::hash(&front[index_at..]);
        front.extend_from_slice(&index_crc.to_le_bytes());
        if let Some(ws) = &ws {
            let ws_at = front.len();
            front.extend_from_slice(&(ws.len() as u64).to_le_bytes());
            for p in ws {
                front.extend_from_slice(&p.to_le_bytes());
            }
            let ws_crc = crc32fast::hash(&front[ws_at..]);
            front.extend_from_slice(&ws_crc.to_le_bytes());
        }
        if let Some(b) = &boot_bytes {
            let boot_at = front.len();
            front.extend_from_slice(&(b.len() as u32).to_le_bytes());
            front.extend_from_slice(b);
            let boot_crc = crc32fast::hash(&front[boot_at..]);
            front.extend_from_slice(&boot_crc.to_le_bytes());
        }
        front.resize(data_offset as usize, 0);
        let Some((file, tmp)) = prepared.file.take() else {
            return Err(snap_err(path, "the prepared file was taken already".into()));
        };
        let run_first = run_starts(&runs);
        // From here on, a failure removes the temporary file (Drop).
        let w = SnapshotWriter {
            path: path.to_path_buf(),
            tmp,
            file,
            done: false,
            front: std::sync::Mutex::new(Some(front)),
            runs,
            run_first,
            data_offset,
            stats: SnapshotStats {
                memory,
                data_pages,
                working_set_pages: ws_pages,
                boot: boot.filter(|_| boot_bytes.is_some()).cloned(),
                file_bytes,
                elapsed: Duration::ZERO,
            },
            start,
        };
        Ok(w)
    }

    /// Writes the front (header, state, indexes) if it is not written yet,
    /// and leaves the file position at the page data.
    pub fn write_front(&self) -> Result<()> {
        let mut front = self.front.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bytes) = front.as_ref() {
            let io = |e: std::io::Error| snap_err(&self.path, format!("write: {e}"));
            self.file.write_all_at(bytes, 0).map_err(io)?;
            std::io::Seek::seek(
                &mut &self.file,
                std::io::SeekFrom::Start(bytes.len() as u64),
            )
            .map_err(io)?;
            *front = None;
        }
        Ok(())
    }

    /// The stored pages: (memfd offset, page count), ascending.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Pages stored.
    pub fn data_pages(&self) -> u64 {
        self.stats.data_pages
    }

    /// Index in the page data of the stored page at memfd offset `off`
    /// (None: not stored).
    pub fn data_index(&self, off: u64) -> Option<u64> {
        data_index(&self.runs, &self.run_first, off)
    }

    /// Memfd offset of the data page with index `i` (None: past the end).
    pub fn page_offset(&self, i: u64) -> Option<u64> {
        let r = self.run_first.partition_point(|&f| f <= i).checked_sub(1)?;
        let (off, n) = self.runs[r];
        (i - self.run_first[r] < n).then(|| off + (i - self.run_first[r]) * PAGE_SIZE)
    }

    /// File offset of the data page with index `i`.
    pub fn slot(&self, i: u64) -> u64 {
        self.data_offset + i * PAGE_SIZE
    }

    /// The temporary file, for writing pages at their slots.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes the trailer (`data_crc`: the CRC32 of the page data in file
    /// order), syncs, commits `progress` (fails if it was cancelled, and
    /// removes the temporary file), renames the file into place and syncs
    /// its directory.
    pub fn finish(mut self, data_crc: u32, progress: &WriteProgress) -> Result<SnapshotStats> {
        let path = self.path.clone();
        let io = |e: std::io::Error| snap_err(&path, format!("write: {e}"));
        self.write_front()?;
        let end = self.slot(self.stats.data_pages);
        let mut trailer = data_crc.to_le_bytes().to_vec();
        trailer.extend_from_slice(END_MAGIC);
        self.file.write_all_at(&trailer, end).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        progress.commit(&path)?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| snap_err(&path, format!("rename into place: {e}")))?;
        self.done = true;
        // Until the directory is synced, a crash may lose the new name: a
        // save that then removes the VM would lose it with it.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            match File::open(dir).and_then(|d| d.sync_all()) {
                // Some file systems cannot sync a directory (EINVAL,
                // EOPNOTSUPP): nothing to wait for there.
                Err(e)
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
                    ) =>
                {
                    return Err(snap_err(
                        &path,
                        format!("in place, but syncing its directory failed: {e}"),
                    ));
                }
                _ => {}
            }
        }
        let mut stats = self.stats.clone();
        stats.elapsed = self.start.elapsed();
        Ok(stats)
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn snap_err(path: &Path, reason: String) -> Error {
    Error::Snapshot {
        path: path.to_path_buf(),
        reason,
    }
}

/// True when memfd page `pfn` is in one of `runs` (sorted, disjoint).
fn in_runs(runs: &[(u64, u64)], pfn: u64) -> bool {
    let off = pfn.saturating_mul(PAGE_SIZE);
    let i = runs.partition_point(|(o, _)| *o <= off);
    i > 0 && {
        let (o, n) = runs[i - 1];
        off < o + n * PAGE_SIZE
    }
}

/// Reads `buf` at `at` of the snapshot `file` (`file_len` bytes) without
/// moving its reader: a section's size, so that the file length can be
/// checked before the section is read.
fn peek(
    path: &Path,
    file: &File,
    buf: &mut [u8],
    at: u64,
    what: &str,
    file_len: u64,
) -> Result<()> {
    match file.read_exact_at(buf, at) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(snap_err(
            path,
            format!("truncated: {file_len} bytes, too short for the {what} the header announces"),
        )),
        Err(e) => Err(snap_err(path, format!("reading the {what}: {e}"))),
    }
}

/// Everything before the page data, validated.
struct Front {
    h: Header,
    state: VmState,
    runs: Vec<(u64, u64)>,
    working_set: Vec<u64>,
    boot: Option<BootSpec>,
    data_offset: u64,
    file_len: u64,
}

/// Reads and validates the header, state, page index, working set and boot spec of the
/// snapshot open in `r` (positioned at 0); leaves `r` at the page data.
fn read_front(path: &Path, r: &mut BufReader<File>) -> Result<Front> {
    let bad = |reason: String| snap_err(path, reason);
    let file_len = r
        .get_ref()
        .metadata()
        .map_err(|e| bad(format!("stat: {e}")))?
        .len();
    let truncated = |what: &str, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad(format!("truncated in the {what}"))
        } else {
            bad(format!("reading the {what}: {e}"))
        }
    };
    let mut hbuf = [0u8; HEADER_LEN];
    r.read_exact(&mut hbuf)
        .map_err(|e| truncated("header", e))?;
    let h = Header::decode(&hbuf).map_err(bad)?;
    if h.page_size as u64 != PAGE_SIZE {
        return Err(bad(format!("page size {} is not {PAGE_SIZE}", h.page_size)));
    }
    let pages = h.memory / PAGE_SIZE;
    if h.state_len > MAX_STATE_BYTES as u64 || h.run_count > pages || h.data_pages > pages {
        return Err(bad(format!(
            "absurd sizes in header (state {} bytes, {} runs, {} pages for {} bytes of RAM)",
            h.state_len, h.run_count, h.data_pages, h.memory
        )));
    }
    // The working-set count sits right after the page index: peek at it so
    // that the file length can be checked before anything else is read.
    let ws_count = if h.has_working_set() {
        let at = h
            .after_index()
            .ok_or_else(|| bad("sizes in header overflow".into()))?;
        let mut c = [0u8; 8];
        peek(path, r.get_ref(), &mut c, at, "working set", file_len)?;
        let n = u64::from_le_bytes(c);
        if n > h.data_pages {
            return Err(bad(format!(
                "absurd working set of {n} pages ({} pages stored)",
                h.data_pages
            )));
        }
        n
    } else {
        0
    };
    // So does the boot section's length, after the working set.
    let boot_len = if h.flags & FLAG_BOOT != 0 {
        let at = h
            .boot_at(ws_count)
            .ok_or_else(|| bad("sizes in header overflow".into()))?;
        let mut c = [0u8; 4];
        peek(path, r.get_ref(), &mut c, at, "boot section", file_len)?;
        let n = u32::from_le_bytes(c) as u64;
        if n > MAX_BOOT_BYTES {
            return Err(bad(format!(
                "absurd boot section of {n} bytes (at most {MAX_BOOT_BYTES})"
            )));
        }
        n
    } else {
        0
    };
    let sections = Sections { ws_count, boot_len };
    match h.file_len(sections) {
        Some(expected) if expected == file_len => {}
        Some(expected) if expected > file_len => {
            return Err(bad(format!(
                "truncated: {file_len} bytes, the header promises {expected}"
            )))
        }
        Some(expected) => {
            return Err(bad(format!(
                "{} unexpected bytes after the end ({file_len} bytes, expected {expected})",
                file_len - expected
            )))
        }
        None => return Err(bad("sizes in header overflow".into())),
    }
    check_memory_size(h.memory).map_err(|e| bad(format!("cannot hold its RAM: {e}")))?;

    let mut blob = vec![0u8; h.state_len as usize];
    r.read_exact(&mut blob).map_err(|e| truncated("state", e))?;
    let mut crc = [0u8; 4];
    r.read_exact(&mut crc).map_err(|e| truncated("state", e))?;
    if u32::from_le_bytes(crc) != crc32fast::hash(&blob) {
        return Err(bad("state checksum mismatch (corrupted state)".into()));
    }
    let state = VmState::decode(&blob).map_err(|e| bad(e.to_string()))?;
    if state.memory != h.memory {
        return Err(bad(format!(
            "state says {} bytes of RAM, header says {}",
            state.memory, h.memory
        )));
    }

    let mut run_bytes = vec![0u8; (h.run_count * 16) as usize];
    r.read_exact(&mut run_bytes)
        .map_err(|e| truncated("page index", e))?;
    r.read_exact(&mut crc)
        .map_err(|e| truncated("page index", e))?;
    if u32::from_le_bytes(crc) != crc32fast::hash(&run_bytes) {
        return Err(bad("page index checksum mismatch".into()));
    }
    let mut runs = Vec::with_capacity(h.run_count as usize);
    let mut next_free = 0u64;
    let mut total = 0u64;
    for c in run_bytes.chunks_exact(16) {
        let off = u64::from_le_bytes(c[0..8].try_into().unwrap_or_default());
        let n = u64::from_le_bytes(c[8..16].try_into().unwrap_or_default());
        let end = n
            .checked_mul(PAGE_SIZE)
            .and_then(|b| off.checked_add(b))
            .filter(|&e| e <= h.memory);
        match end {
            Some(end) if off.is_multiple_of(PAGE_SIZE) && off >= next_free && n > 0 => {
                next_free = end;
                total += n;
                runs.push((off, n));
            }
            _ => return Err(bad(format!("page run at {off:#x} × {n} is invalid"))),
        }
    }
    if total != h.data_pages {
        return Err(bad(format!(
            "page index covers {total} pages, header says {}",
            h.data_pages
        )));
    }

    let mut working_set = Vec::new();
    if h.has_working_set() {
        let mut b = vec![0u8; 8 + ws_count as usize * 8];
        r.read_exact(&mut b)
            .map_err(|e| truncated("working set", e))?;
        r.read_exact(&mut crc)
            .map_err(|e| truncated("working set", e))?;
        if u32::from_le_bytes(crc) != crc32fast::hash(&b) {
            return Err(bad("working set checksum mismatch".into()));
        }
        working_set.reserve(ws_count as usize);
        let mut prev: Option<u64> = None;
        for c in b[8..].chunks_exact(8) {
            let p = u64::from_le_bytes(c.try_into().unwrap_or_default());
            if prev.is_some_and(|q| p <= q) || !in_runs(&runs, p) {
                return Err(bad(format!(
                    "working-set page {p} is out of order or not stored"
                )));
            }
            prev = Some(p);
            working_set.push(p);
        }
    }
    let mut boot = None;
    if h.flags & FLAG_BOOT != 0 {
        let mut b = vec![0u8; 4 + boot_len as usize];
        r.read_exact(&mut b)
            .map_err(|e| truncated("boot section", e))?;
        r.read_exact(&mut crc)
            .map_err(|e| truncated("boot section", e))?;
        if u32::from_le_bytes(crc) != crc32fast::hash(&b) {
            return Err(bad("boot section checksum mismatch".into()));
        }
        let (spec, used): (BootSpec, usize) = bincode::serde::decode_from_slice(
            &b[4..],
            bincode::config::standard().with_limit::<{ MAX_BOOT_BYTES as usize }>(),
        )
        .map_err(|e| bad(format!("boot section: {e}")))?;
        if used != b.len() - 4 {
            return Err(bad("boot section: bytes after the spec".into()));
        }
        boot = Some(spec);
    }
    let (Some(data_offset), Some(sections_end)) =
        (h.data_offset(sections), h.sections_end(sections))
    else {
        return Err(bad("sizes in header overflow".into()));
    };
    let mut padding = vec![0u8; (data_offset - sections_end) as usize];
    r.read_exact(&mut padding)
        .map_err(|e| truncated("padding before the page data", e))?;
    if padding.iter().any(|&b| b != 0) {
        return Err(bad("the padding before the page data is not zero".into()));
    }
    Ok(Front {
        h,
        state,
        runs,
        working_set,
        boot,
        data_offset,
        file_len,
    })
}

/// Reads and fully verifies a snapshot; returns the state and new RAM holding the pages.
pub fn read(path: &Path) -> Result<(VmState, GuestRam, SnapshotStats)> {
    let start = Instant::now();
    let bad = |reason: String| snap_err(path, reason);
    let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let truncated = |what: &str, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad(format!("truncated in the {what}"))
        } else {
            bad(format!("reading the {what}: {e}"))
        }
    };
    let Front {
        h,
        state,
        runs,
        working_set,
        boot,
        file_len,
        ..
    } = read_front(path, &mut r)?;

    let ram = GuestRam::new(h.memory)?;
    {
        let map = MemfdMap::new(&ram, true)?;
        let mut crc = crc32fast::Hasher::new();
        for (off, n) in &runs {
            let dst = map.slice_mut(*off, n * PAGE_SIZE);
            r.read_exact(dst).map_err(|e| truncated("page data", e))?;
            crc.update(dst);
            // Zero pages (holes of a background save's file) go back to
            // being holes: the restored VM takes no memory for them. Not on
            // huge pages: a punch there frees nothing smaller than a huge
            // page, and one it frees gives its reservation back to the pool,
            // so that mapping it again below may find none (SIGBUS).
            if ram.is_huge() {
                continue;
            }
            let mut zeros: Option<u64> = None; // first page of a zero stretch
            for i in 0..=*n {
                let zero = i < *n
                    && is_zero_page(&dst[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize]);
                match (zeros, zero) {
                    (None, true) => zeros = Some(i),
                    (Some(first), false) => {
                        let at = off + first * PAGE_SIZE;
                        punch_hole(ram.memfd(), at, (i - first) * PAGE_SIZE).map_err(|e| {
                            bad(format!("releasing the zero pages at {at:#x}: {e}"))
                        })?;
                        zeros = None;
                    }
                    _ => {}
                }
            }
        }
        // On huge pages, RAM's own mappings must map what was written here.
        for (off, n) in &runs {
            ram.map_written(*off, n * PAGE_SIZE)?;
        }
        let mut trailer = [0u8; 12];
        r.read_exact(&mut trailer)
            .map_err(|e| truncated("trailer", e))?;
        if u32::from_le_bytes(trailer[0..4].try_into().unwrap_or_default()) != crc.finalize() {
            return Err(bad("page data checksum mismatch (corrupted pages)".into()));
        }
        if &trailer[4..12] != END_MAGIC {
            return Err(bad("bad end marker".into()));
        }
    }
    let stats = SnapshotStats {
        memory: h.memory,
        data_pages: h.data_pages,
        working_set_pages: working_set.len() as u64,
        boot,
        file_bytes: file_len,
        elapsed: start.elapsed(),
    };
    Ok((state, ram, stats))
}

/// Tries of a read of the page data that fails without the file having
/// changed (EIO...) before it is given up.
const READ_TRIES: u32 = 5;
/// Wait after the first failed try, doubled after each.
const READ_BACKOFF: Duration = Duration::from_millis(10);

/// What a lazy reader knows of its file at open: a later size or
/// modification time that differs means the file was truncated or written
/// to under it. The change time is not compared: renaming, unlinking or
/// linking the file (harmless: the descriptor keeps the inode) changes it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    /// Modification time (seconds, nanoseconds).
    mtime: (i64, i64),
}

impl FileIdentity {
    fn of(file: &File) -> std::io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }

    /// How `now` (the same descriptor, later) differs from `self`, if it
    /// does: "the file ... was truncated ... while {during}".
    fn change(&self, now: &FileIdentity, during: &str) -> Option<String> {
        let what = if now.size < self.size {
            format!("was truncated ({} bytes, was {})", now.size, self.size)
        } else if now.size != self.size || now.mtime != self.mtime {
            "was written to".into()
        } else {
            return None;
        };
        Some(format!(
            "the file (inode {} on device {:#x}) {what} while {during}",
            self.ino, self.dev
        ))
    }
}

/// Runs `read` (of page data) up to `tries` times, waiting `backoff`,
/// doubled each time, between tries: Ok once a read succeeds with the file
/// unchanged. `changed` (the file's change since it was opened, if any) is
/// asked after every read, successful or not: a change fails at once with
/// its reason (data read from a changed file is not to be used, and
/// retrying cannot help); a failure it does not explain is retried, then
/// reported with `what` and the last error.
fn read_unchanged(
    mut read: impl FnMut() -> std::io::Result<()>,
    changed: impl Fn() -> Option<String>,
    what: impl Fn() -> String,
    tries: u32,
    backoff: Duration,
) -> std::result::Result<(), String> {
    let mut wait = backoff;
    let mut tried = 0;
    loop {
        let r = read();
        tried += 1;
        if let Some(why) = changed() {
            return Err(why);
        }
        match r {
            Ok(()) => return Ok(()),
            Err(e) if tried >= tries => {
                return Err(format!("{}: {e} (tried {tried} times)", what()))
            }
            Err(_) => {
                std::thread::sleep(wait);
                wait *= 2;
            }
        }
    }
}

/// A snapshot opened for lazy restore: everything but the page data has been
/// read and verified (header, state, page index and working-set checksums,
/// sizes against the file and the host, the end marker). The page data is
/// read on demand ([`LazySnapshot::read_page`]) and streamed in order by
/// [`LazySnapshot::stream`], which is where its checksum is checked: a
/// corrupted page may reach the guest before the mismatch is known.
///
/// The file's size and modification time at open are checked after every
/// read of page data: once the file was truncated or written to, every read
/// fails, naming that, and no page read after the change is returned. A read
/// that fails otherwise (EIO) is tried [`READ_TRIES`] times in all.
pub struct LazySnapshot {
    /// The VM state.
    pub state: VmState,
    /// Guest RAM size.
    pub memory: u64,
    /// Stored pages: (memfd offset, page count), ascending.
    pub runs: Vec<(u64, u64)>,
    /// Working-set memfd page numbers, ascending (empty when none was recorded).
    pub working_set: Vec<u64>,
    /// How the VM boots from its kernel, if the file carries it.
    pub boot: Option<BootSpec>,
    /// Pages stored.
    pub data_pages: u64,
    /// File size in bytes.
    pub file_bytes: u64,
    path: PathBuf,
    file: File,
    data_offset: u64,
    /// Index in the data (in pages) of the first page of each run.
    run_first: Vec<u64>,
    data_crc: u32,
    /// The file as opened.
    identity: FileIdentity,
}

impl LazySnapshot {
    /// Opens and validates everything but the page data.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| snap_err(path, reason);
        let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let identity = FileIdentity::of(&file).map_err(|e| bad(format!("stat: {e}")))?;
        let mut r = BufReader::with_capacity(1 << 16, file);
        let f = read_front(path, &mut r)?;
        let file = r.into_inner();
        let mut trailer = [0u8; 12];
        file.read_exact_at(&mut trailer, f.file_len - 12)
            .map_err(|e| bad(format!("reading the trailer: {e}")))?;
        if &trailer[4..12] != END_MAGIC {
            return Err(bad("bad end marker".into()));
        }
        // What was validated is what the identity describes.
        if let Some(why) = FileIdentity::of(&file)
            .ok()
            .and_then(|now| identity.change(&now, "it was opened"))
        {
            return Err(bad(why));
        }
        let run_first = run_starts(&f.runs);
        Ok(LazySnapshot {
            state: f.state,
            memory: f.h.memory,
            runs: f.runs,
            working_set: f.working_set,
            boot: f.boot,
            data_pages: f.h.data_pages,
            file_bytes: f.file_len,
            path: path.to_path_buf(),
            file,
            data_offset: f.data_offset,
            run_first,
            data_crc: u32::from_le_bytes(trailer[0..4].try_into().unwrap_or_default()),
            identity,
        })
    }

    /// How the file changed since it was opened (truncated, written to),
    /// if it did; None also where the descriptor cannot be stat'ed.
    pub fn changed(&self) -> Option<String> {
        let now = FileIdentity::of(&self.file).ok()?;
        self.identity.change(&now, "the lazy restore still read it")
    }

    /// Reads `buf` at file offset `at` of the page data (see
    /// [`read_unchanged`]); `what` names the read in an error.
    fn read_data(&self, buf: &mut [u8], at: u64, what: impl Fn() -> String) -> Result<()> {
        read_unchanged(
            || self.file.read_exact_at(buf, at),
            || self.changed(),
            what,
            READ_TRIES,
            READ_BACKOFF,
        )
        .map_err(|reason| snap_err(&self.path, reason))
    }

    /// File offset of the stored page at memfd offset `off`; None: not stored (zero).
    pub fn page_file_offset(&self, off: u64) -> Option<u64> {
        data_index(&self.runs, &self.run_first, off).map(|i| self.data_offset + i * PAGE_SIZE)
    }

    /// Reads the page at memfd offset `off` into `buf` (4 KiB); Ok(false):
    /// the page is not stored (it is zero) and `buf` is untouched.
    pub fn read_page(&self, off: u64, buf: &mut [u8]) -> Result<bool> {
        let Some(at) = self.page_file_offset(off) else {
            return Ok(false);
        };
        self.read_data(&mut buf[..PAGE_SIZE as usize], at, || {
            format!("reading page {off:#x}")
        })?;
        Ok(true)
    }

    /// Streams the page data in file order, `chunk_pages` pages at most per
    /// call of `f(memfd offset, pages)`, and checks the data checksum at the
    /// end. An error from `f` stops the stream and is returned.
    pub fn stream(
        &self,
        chunk_pages: u64,
        mut f: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let chunk_pages = chunk_pages.max(1);
        let mut buf = vec![0u8; (chunk_pages * PAGE_SIZE) as usize];
        let mut crc = crc32fast::Hasher::new();
        let mut at = self.data_offset;
        for &(off, n) in &self.runs {
            let mut done = 0;
            while done < n {
                let k = (n - done).min(chunk_pages);
                let b = &mut buf[..(k * PAGE_SIZE) as usize];
                self.read_data(b, at, || format!("reading the page data at {at:#x}"))?;
                crc.update(b);
                f(off + done * PAGE_SIZE, b)?;
                at += k * PAGE_SIZE;
                done += k;
            }
        }
        if crc.finalize() != self.data_crc {
            return Err(snap_err(
                &self.path,
                "page data checksum mismatch (corrupted pages)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::state;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-snap-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_temporary_file_is_new_private_and_never_a_planted_one() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("temp");
        let p = d.join("vm.snap");
        let (_, a) = create_temp(&p).unwrap();
        let (_, b) = create_temp(&p).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(d.as_path()));
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A file planted where the snapshot goes is replaced, never written
        // through or reused: a symlink there keeps pointing at its target,
        // which stays as it was.
        let target = d.join("victim");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.write(0x1000, &[0xaa; 4096]).unwrap();
        write(&p, &state(16 << 20), &ram).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A save removes the temporary files of dead processes on this host
    /// left beside its file once idle, and nothing else: not a live
    /// process's, nor a fresh one, nor another host's, nor another file's.
    #[test]
    fn temporary_files_of_dead_processes_are_removed() {
        let d = dir("stale");
        let p = d.join("vm.snap");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = std::process::id();
        let ours = |pid: u32| {
            let mut n = temp_prefix(&p);
            n.push(format!("{pid}.0.0000abcd"));
            d.join(n)
        };
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let make = |f: &PathBuf, old: bool| {
            let file = File::create(f).unwrap();
            if old {
                file.set_modified(hour_ago).unwrap();
            }
        };
        let (stale, live) = (ours(dead), ours(mine));
        make(&stale, true);
        make(&live, true);
        let fresh_name = {
            let mut n = temp_prefix(&p);
            n.push(format!("{dead}.1.0000abcd"));
            d.join(n)
        };
        make(&fresh_name, false);
        let elsewhere = d.join(format!("vm.snap.tmp.otherhost.{dead}.0.0000abcd"));
        make(&elsewhere, true);
        let other = {
            let mut n = temp_prefix(&d.join("other.snap"));
            n.push(format!("{dead}.0.0000abcd"));
            d.join(n)
        };
        make(&other, true);
        assert_eq!(remove_stale_temps(&p, STALE_TEMP_IDLE), 1);
        assert!(!stale.exists());
        for kept in [&live, &fresh_name, &elsewhere, &other] {
            assert!(kept.exists(), "{}", kept.display());
        }
        // A save does it on its way.
        make(&stale, true);
        let ram = GuestRam::new(16 << 20).unwrap();
        write(&p, &state(16 << 20), &ram).unwrap();
        assert!(!stale.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    fn sample(name: &str) -> (PathBuf, PathBuf) {
        let d = dir(name);
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.write(0x1000, &[0xaa; 4096]).unwrap();
        ram.write(0x2000, &[0xbb; 10]).unwrap();
        ram.write(0x300_0000, &[0xcc; 1]).unwrap();
        ram.write(0x300_1000, &[0; 4096]).unwrap(); // written, but zero: not stored
        let p = d.join("vm.snap");
        let stats = write(&p, &state(64 << 20), &ram).unwrap();
        assert_eq!(stats.data_pages, 3);
        assert_eq!(stats.file_bytes, std::fs::metadata(&p).unwrap().len());
        (d, p)
    }

    #[test]
    fn round_trip_stores_only_nonzero_pages() {
        let (d, p) = sample("rt");
        let (st, ram, stats) = read(&p).unwrap();
        assert_eq!(st.vcpus[0].regs.rip, 0x1234);
        assert_eq!(stats.data_pages, 3);
        let mut b = [0u8; 4096];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [0xaa; 4096]);
        ram.read(0x300_0000, &mut b[..1]).unwrap();
        assert_eq!(b[0], 0xcc);
        assert!(stats.file_bytes < 3 * 4096 + 16384, "{}", stats.file_bytes);
        assert!(
            std::fs::read_dir(&d).unwrap().count() == 1,
            "no temp file left"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    /// Pages written at their slots in reverse order, as a background save
    /// may: the file reads back like one written in order, zero pages of
    /// the data extents included.
    #[test]
    fn pages_written_out_of_order_read_back() {
        let d = dir("ooo");
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.write(0x1000, &[0xaa; 4096]).unwrap();
        ram.write(0x2000, &[0xbb; 10]).unwrap();
        ram.write(0x300_0000, &[0xcc; 1]).unwrap();
        ram.write(0x300_1000, &[0; 4096]).unwrap();
        let runs = data_runs(&ram).unwrap();
        assert_eq!(runs, [(0x1000, 2), (0x300_0000, 2)]);
        let p = d.join("vm.snap");
        let w = SnapshotWriter::create(
            &p,
            &state(64 << 20),
            ram.size(),
            runs,
            Some(&[1, 0x3000]),
            None,
        )
        .unwrap();
        assert_eq!(
            (w.data_index(0x2000), w.data_index(0x300_1000)),
            (Some(1), Some(3))
        );
        assert_eq!(w.data_index(0x4000), None);
        assert_eq!(
            (w.page_offset(1), w.page_offset(2)),
            (Some(0x2000), Some(0x300_0000))
        );
        assert_eq!(w.page_offset(4), None);
        let mut pages = Vec::new();
        for &(off, n) in w.runs() {
            for k in 0..n {
                let mut b = vec![0u8; 4096];
                ram.read(off + k * PAGE_SIZE, &mut b).unwrap();
                pages.push(b);
            }
        }
        for (i, b) in pages.iter().enumerate().rev() {
            w.file().write_all_at(b, w.slot(i as u64)).unwrap();
        }
        let crc = crc32fast::hash(&pages.concat());
        let stats = w.finish(crc, &WriteProgress::default()).unwrap();
        assert_eq!((stats.data_pages, stats.working_set_pages), (4, 2));
        assert_eq!(stats.file_bytes, std::fs::metadata(&p).unwrap().len());
        let (_, back, _) = read(&p).unwrap();
        let mut b = [0u8; 4096];
        back.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [0xaa; 4096]);
        back.read(0x300_0000, &mut b[..1]).unwrap();
        assert_eq!(b[0], 0xcc);
        // A wrong data checksum is caught; an unfinished writer leaves nothing.
        let w = SnapshotWriter::create(
            &p,
            &state(64 << 20),
            ram.size(),
            vec![(0x1000, 1)],
            None,
            None,
        )
        .unwrap();
        w.file().write_all_at(&[0xaa; 4096], w.slot(0)).unwrap();
        w.finish(0, &WriteProgress::default()).unwrap();
        expect_err(&p, "page data checksum mismatch");
        let w = SnapshotWriter::create(
            &d.join("gone.snap"),
            &state(64 << 20),
            ram.size(),
            vec![],
            None,
            None,
        )
        .unwrap();
        drop(w);
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "a temporary file was left"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    fn expect_err(p: &Path, needle: &str) {
        match read(p) {
            Ok(_) => panic!("accepted a bad snapshot ({needle})"),
            Err(e) => assert!(e.to_string().contains(needle), "{e} lacks '{needle}'"),
        }
    }

    #[test]
    fn truncated_corrupted_foreign_and_versioned_files_are_refused() {
        let (d, p) = sample("bad");
        let good = std::fs::read(&p).unwrap();
        let bad = d.join("bad.snap");
        for cut in [0, 10, 64, 100, good.len() - 5000, good.len() - 1] {
            std::fs::write(&bad, &good[..cut]).unwrap();
            expect_err(&bad, "truncated");
        }
        let mut longer = good.clone();
        longer.extend_from_slice(b"junk");
        std::fs::write(&bad, &longer).unwrap();
        expect_err(&bad, "unexpected bytes");
        std::fs::write(
            &bad,
            b"\x7fELF this is something else entirely, long enough for a header....",
        )
        .unwrap();
        expect_err(&bad, "bad magic");
        let mut v2 = good.clone();
        v2[8] = 2;
        std::fs::write(&bad, &v2).unwrap();
        // A version changed without its checksum: may be a flipped bit.
        expect_err(&bad, "version 2 is not supported");
        expect_err(&bad, "or the header is corrupted");
        // A header of version 2, checksummed: another build's file.
        let crc = crc32fast::hash(&v2[..56]);
        v2[56..60].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&bad, &v2).unwrap();
        let e = read(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("version 2 is not supported"), "{e}");
        assert!(!e.contains("corrupted"), "{e}");
        let mut reserved = good.clone();
        reserved[62] = 1;
        std::fs::write(&bad, &reserved).unwrap();
        expect_err(&bad, "reserved header bytes");
        let mut hdr = good.clone();
        hdr[20] ^= 1;
        std::fs::write(&bad, &hdr).unwrap();
        expect_err(&bad, "header checksum");
        let mut st = good.clone();
        st[70] ^= 0x40;
        std::fs::write(&bad, &st).unwrap();
        expect_err(&bad, "state checksum");
        let mut data = good.clone();
        let n = data.len();
        data[n - 20] ^= 1;
        std::fs::write(&bad, &data).unwrap();
        expect_err(&bad, "page data checksum");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn page_data_is_aligned_and_files_of_earlier_builds_still_read() {
        let (d, p) = sample("aligned");
        let good = std::fs::read(&p).unwrap();
        let lazy = LazySnapshot::open(&p).unwrap();
        let first = lazy.page_file_offset(0x1000).unwrap();
        assert_eq!(first % PAGE_SIZE, 0, "page data at {first}");
        let state_len = u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
        let runs = u64::from_le_bytes(good[32..40].try_into().unwrap()) as usize;
        let sections_end = HEADER_LEN + state_len + 4 + runs * 16 + 4;
        assert!(sections_end < first as usize);
        let bad = d.join("bad.snap");
        // Something in the padding: refused.
        let mut f = good.clone();
        f[sections_end] = 1;
        std::fs::write(&bad, &f).unwrap();
        expect_err(&bad, "padding before the page data is not zero");
        // An earlier build's layout: no padding, no flag.
        let mut old = good[..sections_end].to_vec();
        old.extend_from_slice(&good[first as usize..]);
        old[52] &= !(FLAG_ALIGNED_DATA as u8);
        rehash_header(&mut old);
        std::fs::write(&bad, &old).unwrap();
        let (_, ram, stats) = read(&bad).unwrap();
        assert_eq!(stats.data_pages, 3);
        let mut b = [0u8; 4096];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [0xaa; 4096]);
        let lazy = LazySnapshot::open(&bad).unwrap();
        assert_eq!(lazy.page_file_offset(0x1000), Some(sections_end as u64));
        assert!(lazy.read_page(0x300_0000, &mut b).unwrap());
        assert_eq!(b[0], 0xcc);
        std::fs::remove_dir_all(d).unwrap();
    }

    fn boot_spec() -> BootSpec {
        BootSpec {
            kernel: "/images/vmlinux".into(),
            initramfs: Some("/images/initrd".into()),
            cmdline: "console=ttyS0 workload=idle".into(),
        }
    }

    fn sample_ws(name: &str) -> (PathBuf, PathBuf, GuestRam) {
        let d = dir(name);
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.write(0x1000, &[0xaa; 4096]).unwrap();
        ram.write(0x2000, &[0xbb; 10]).unwrap();
        ram.write(0x300_0000, &[0xcc; 1]).unwrap();
        let p = d.join("vm.snap");
        // 5 is not stored (zero): dropped; duplicates and order do not matter.
        let progress = WriteProgress::default();
        let stats = write_with_working_set(
            &p,
            &state(64 << 20),
            &ram,
            Some(&[0x3000, 5, 1, 0x3000]),
            Some(&boot_spec()),
            &progress,
        )
        .unwrap();
        assert_eq!((progress.pages(), progress.written()), (3, 3));
        assert_eq!(stats.boot, Some(boot_spec()));
        assert_eq!(stats.data_pages, 3);
        assert_eq!(stats.working_set_pages, 2);
        assert_eq!(stats.file_bytes, std::fs::metadata(&p).unwrap().len());
        (d, p, ram)
    }

    #[test]
    fn working_set_section_round_trips_and_eager_read_ignores_it() {
        let (d, p, _ram) = sample_ws("ws");
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            u32::from_le_bytes(bytes[52..56].try_into().unwrap()),
            FLAG_WORKING_SET | FLAG_ALIGNED_DATA | FLAG_BOOT
        );
        let (st, ram, stats) = read(&p).unwrap();
        assert_eq!(st.vcpus[0].regs.rip, 0x1234);
        assert_eq!(stats.working_set_pages, 2);
        assert_eq!(stats.boot, Some(boot_spec()), "the boot section read back");
        let mut b = [0u8; 4096];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [0xaa; 4096]);
        let lazy = LazySnapshot::open(&p).unwrap();
        assert_eq!(lazy.working_set, vec![1, 0x3000]);
        assert_eq!(lazy.boot, Some(boot_spec()));
        assert_eq!(lazy.data_pages, 3);
        assert!(lazy.read_page(0x1000, &mut b).unwrap());
        assert_eq!(b, [0xaa; 4096]);
        assert!(lazy.read_page(0x300_0000, &mut b).unwrap());
        assert_eq!(b[0], 0xcc);
        assert!(!lazy.read_page(0x5000, &mut b).unwrap());
        assert!(lazy.page_file_offset(0).is_none());
        let mut seen = Vec::new();
        lazy.stream(1, |off, data| {
            seen.push((off, data[0]));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![(0x1000, 0xaa), (0x2000, 0xbb), (0x300_0000, 0xcc)]
        );
        // Without a working set the lazy reader sees an empty one.
        let (d2, p2) = sample("ws-none");
        assert!(LazySnapshot::open(&p2).unwrap().working_set.is_empty());
        std::fs::remove_dir_all(d2).unwrap();
        std::fs::remove_dir_all(d).unwrap();
    }

    fn rehash_header(b: &mut [u8]) {
        let crc = crc32fast::hash(&b[..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn bad_working_sets_and_flags_are_refused_and_lazy_checks_data_late() {
        let (d, p, _ram) = sample_ws("ws-bad");
        let good = std::fs::read(&p).unwrap();
        let bad = d.join("bad.snap");
        let state_len = u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
        let ws_at = HEADER_LEN + state_len + 4 + 2 * 16 + 4; // two runs
        assert_eq!(
            u64::from_le_bytes(good[ws_at..ws_at + 8].try_into().unwrap()),
            2
        );
        // A flipped working-set page number.
        let mut w = good.clone();
        w[ws_at + 8] ^= 1;
        std::fs::write(&bad, &w).unwrap();
        expect_err(&bad, "working set checksum");
        assert!(LazySnapshot::open(&bad).is_err());
        // An absurd count.
        let mut w = good.clone();
        w[ws_at + 7] = 0x40;
        std::fs::write(&bad, &w).unwrap();
        expect_err(&bad, "absurd working set");
        // Cut inside the working set.
        std::fs::write(&bad, &good[..ws_at + 4]).unwrap();
        expect_err(&bad, "truncated");
        // The boot section, after the working set (two pages): a flipped
        // byte, an absurd length, a cut inside it.
        let boot_at = ws_at + 8 + 2 * 8 + 4;
        let boot_len = u32::from_le_bytes(good[boot_at..boot_at + 4].try_into().unwrap()) as usize;
        assert!(boot_len > 0 && boot_len < 200, "{boot_len}");
        let mut w = good.clone();
        w[boot_at + 6] ^= 1;
        std::fs::write(&bad, &w).unwrap();
        expect_err(&bad, "boot section checksum");
        assert!(LazySnapshot::open(&bad).is_err());
        let mut w = good.clone();
        w[boot_at + 3] = 0x40;
        std::fs::write(&bad, &w).unwrap();
        expect_err(&bad, "absurd boot section");
        std::fs::write(&bad, &good[..boot_at + 2]).unwrap();
        expect_err(&bad, "truncated");
        // An unknown flag bit.
        let mut f = good.clone();
        f[52] |= 8;
        rehash_header(&mut f);
        std::fs::write(&bad, &f).unwrap();
        expect_err(&bad, "unknown flags");
        // Flag cleared: the section is then unexpected bytes.
        let mut f = good.clone();
        f[52] = 0;
        rehash_header(&mut f);
        std::fs::write(&bad, &f).unwrap();
        expect_err(&bad, "unexpected bytes");
        // Corrupted page data: the lazy open succeeds, the stream says so.
        let mut data = good.clone();
        let n = data.len();
        data[n - 20] ^= 1;
        std::fs::write(&bad, &data).unwrap();
        expect_err(&bad, "page data checksum");
        let lazy = LazySnapshot::open(&bad).unwrap();
        let e = lazy.stream(64, |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("page data checksum"), "{e}");
        // Bad end marker: refused up front.
        let mut end = good.clone();
        end[n - 1] = b'X';
        std::fs::write(&bad, &end).unwrap();
        assert!(LazySnapshot::open(&bad)
            .err()
            .unwrap()
            .to_string()
            .contains("end marker"));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let d = dir("fail");
        let ram = GuestRam::new(64 << 20).unwrap();
        let p = d.join("missing-dir").join("vm.snap");
        assert!(write(&p, &state(64 << 20), &ram).is_err());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir_all(d).unwrap();
    }

    /// Progress counts every stored page, a step at a time; a cancelled
    /// write fails with "cancelled" and leaves neither file nor temporary.
    #[test]
    fn progress_counts_pages_and_cancel_leaves_nothing() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let pages = 3 * PROGRESS_STEP / PAGE_SIZE + 5;
        for p in 0..pages {
            ram.write(p * PAGE_SIZE, &[p as u8 | 1; 16]).unwrap();
        }
        let d = dir("progress");
        let p = d.join("vm.snap");
        let done = WriteProgress::default();
        write_with_working_set(&p, &state(64 << 20), &ram, None, None, &done).unwrap();
        assert_eq!((done.pages(), done.written()), (pages, pages));

        // Cancelled from another thread once the first step is written.
        let q = d.join("cancelled.snap");
        let paced = WriteProgress::paced(Duration::from_millis(50));
        let r = crate::testing::cancelled_after_first_step(&paced, || {
            write_with_working_set(&q, &state(64 << 20), &ram, None, None, &paced)
        });
        let e = r.expect_err("a cancelled write fails").to_string();
        assert!(e.contains("cancelled"), "{e}");
        assert!(
            paced.written() < pages,
            "stopped early: {}",
            paced.written()
        );
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["vm.snap"], "no cancelled file, no temporary");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A file name as long as names go (255 bytes) is saved to: its
    /// temporary file's name keeps only part of it.
    #[test]
    fn a_snapshot_with_the_longest_name_is_written() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.write(0, &[7; 64]).unwrap();
        let d = dir("long-name");
        let p = d.join("x".repeat(255));
        write(&p, &state(16 << 20), &ram).expect("a 255-byte name");
        read(&p).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Cancel and commit exclude each other: a write whose last step is done
    /// but that is not committed yet still fails when cancelled (a plain
    /// save's longest phase is its final sync, where no step looks), and a
    /// cancel after the commit is refused, the file being complete.
    #[test]
    fn a_cancel_before_the_commit_wins_and_one_after_it_is_refused() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.write(0, &[7; 64]).unwrap();
        let d = dir("commit");
        let p = d.join("vm.snap");
        let runs = nonzero_runs(&ram).unwrap();
        let w = SnapshotWriter::create(&p, &state(16 << 20), ram.size(), runs, None, None).unwrap();
        let progress = WriteProgress::default();
        // Every page written, then the cancel: in the final sync, say.
        assert!(progress.cancel(), "accepted before the commit");
        let e = w.finish(0, &progress).unwrap_err().to_string();
        assert!(e.contains("cancelled"), "{e}");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "nothing left");

        let done = WriteProgress::default();
        write_with_working_set(&p, &state(16 << 20), &ram, None, None, &done).unwrap();
        assert!(!done.cancel(), "refused after the commit");
        assert!(!done.is_cancelled() && done.is_committed());
        read(&p).expect("the file is complete");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The lazy reader's file truncated or written to in place after it was
    /// opened: every read of page data fails, naming the change (before, a
    /// truncation read "failed to fill whole buffer" and an overwrite was
    /// served as page data). Renamed and unlinked, it reads on as before.
    #[test]
    fn a_lazy_read_fails_naming_a_truncation_or_an_overwrite_but_not_a_rename() {
        let (d, p) = sample("lazy-changed");
        let good = std::fs::read(&p).unwrap();
        let mut b = [0u8; 4096];

        // Renamed, then unlinked: the descriptor keeps the old inode.
        let lazy = LazySnapshot::open(&p).unwrap();
        let moved = d.join("moved.snap");
        std::fs::rename(&p, &moved).unwrap();
        std::fs::remove_file(&moved).unwrap();
        assert!(lazy.read_page(0x1000, &mut b).unwrap());
        assert_eq!(b, [0xaa; 4096]);
        lazy.stream(1, |_, _| Ok(())).unwrap();

        // Truncated: page reads and the stream say so, with both sizes.
        std::fs::write(&p, &good).unwrap();
        let lazy = LazySnapshot::open(&p).unwrap();
        let short = good.len() as u64 - 3 * PAGE_SIZE;
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(short)
            .unwrap();
        let want = format!(
            "was truncated ({short} bytes, was {}) while the lazy restore still read it",
            good.len()
        );
        for off in [0x1000, 0x300_0000] {
            let e = lazy.read_page(off, &mut b).unwrap_err().to_string();
            assert!(e.contains(&want), "{e}");
            assert!(e.contains(&p.display().to_string()), "{e}");
        }
        let e = lazy.stream(64, |_, _| Ok(())).unwrap_err().to_string();
        assert!(e.contains(&want), "{e}");

        // Written to in place (same size, a later modification time): even
        // a page the write did not touch is refused, and the stream gives
        // no page.
        std::fs::write(&p, &good).unwrap();
        let lazy = LazySnapshot::open(&p).unwrap();
        // Past the coarse clock's tick, so that the write's time differs.
        std::thread::sleep(Duration::from_millis(50));
        let at = lazy.page_file_offset(0x300_0000).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&[0xdd], at)
            .unwrap();
        let want = "was written to while the lazy restore still read it";
        let e = lazy.read_page(0x1000, &mut b).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        let mut pages = 0;
        let e = lazy
            .stream(1, |_, _| {
                pages += 1;
                Ok(())
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
        assert_eq!(pages, 0, "a page read after the change was used");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A read that fails with the file unchanged is tried again, 5 times in
    /// all with a doubling wait, then fails naming the error; one that fails
    /// because the file changed is not retried.
    #[test]
    fn a_failed_read_is_retried_unless_the_file_changed() {
        let eio = || std::io::Error::from_raw_os_error(libc::EIO);
        let calls = std::cell::Cell::new(0);
        let flaky = || {
            calls.set(calls.get() + 1);
            if calls.get() < 4 {
                Err(eio())
            } else {
                Ok(())
            }
        };
        let what = || "reading page 0x3000".to_string();
        let t = Instant::now();
        read_unchanged(flaky, || None, what, READ_TRIES, READ_BACKOFF).unwrap();
        assert_eq!(calls.get(), 4);
        assert!(
            t.elapsed() >= Duration::from_millis(70),
            "{:?}",
            t.elapsed()
        );

        calls.set(0);
        let failing = || {
            calls.set(calls.get() + 1);
            Err(eio())
        };
        let e = read_unchanged(failing, || None, what, READ_TRIES, Duration::ZERO).unwrap_err();
        assert_eq!(calls.get(), 5);
        assert!(
            e.starts_with("reading page 0x3000: Input/output error"),
            "{e}"
        );
        assert!(e.contains("tried 5 times"), "{e}");

        calls.set(0);
        let changed = || Some("the file was truncated".to_string());
        let e = read_unchanged(failing, changed, what, READ_TRIES, READ_BACKOFF).unwrap_err();
        assert_eq!((calls.get(), e.as_str()), (1, "the file was truncated"));
        // A read that succeeds from a changed file is not used either.
        let e = read_unchanged(|| Ok(()), changed, what, READ_TRIES, READ_BACKOFF).unwrap_err();
        assert_eq!(e, "the file was truncated");
    }
}
