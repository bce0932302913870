//! Snapshot files: the VM state and the guest's non-zero pages.
//!
//! Layout (all integers little-endian):
//!
//! | part    | contents |
//! |---------|----------|
//! | header  | 64 bytes: magic `MIGDSNAP`, format version, header length, RAM size, state length, run count, data page count, page size, flags, CRC32 of the preceding 56 bytes, reserved |
//! | state   | `state_len` bytes of [`VmState`] (bincode), then its CRC32 |
//! | runs    | `run_count` × (memfd offset u64, page count u64), then their CRC32 |
//! | data    | the pages of the runs, in order, 4 KiB each |
//! | trailer | CRC32 of the data, then `SNAPEND\0` |
//!
//! Pages that are zero (never written, or zeroed) are not stored. The file is
//! written under a temporary name and renamed into place. Restore checks the
//! magic, version, every size against the file length and the host, and every
//! checksum before the memory is given to a VM.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::memory::{check_memory_size, is_zero_page, GuestRam, PAGE_SIZE};
use crate::state::{VmState, MAX_STATE_BYTES};

/// File magic.
pub const MAGIC: &[u8; 8] = b"MIGDSNAP";
/// Trailer magic.
pub const END_MAGIC: &[u8; 8] = b"SNAPEND\0";
/// Snapshot format version written and accepted.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;

/// What a snapshot write or read did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Guest RAM size.
    pub memory: u64,
    /// Pages stored in the file.
    pub data_pages: u64,
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
        if version != FORMAT_VERSION {
            return Err(format!(
                "snapshot format version {version} is not supported (this build reads version {FORMAT_VERSION})"
            ));
        }
        if u32_at(56) != crc32fast::hash(&h[..56]) {
            return Err("header checksum mismatch (corrupted header)".into());
        }
        if u32_at(12) as usize != HEADER_LEN {
            return Err(format!("header length {} is not {HEADER_LEN}", u32_at(12)));
        }
        Ok(Header {
            version,
            memory: u64_at(16),
            state_len: u64_at(24),
            run_count: u64_at(32),
            data_pages: u64_at(40),
            page_size: u32_at(48),
        })
    }

    /// Exact file length this header implies, or None on overflow.
    fn file_len(&self) -> Option<u64> {
        (HEADER_LEN as u64)
            .checked_add(self.state_len)?
            .checked_add(4)?
            .checked_add(self.run_count.checked_mul(16)?)?
            .checked_add(4)?
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

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes a snapshot of `state` and `ram` to `path` (atomically).
pub fn write(path: &Path, state: &VmState, ram: &GuestRam) -> Result<SnapshotStats> {
    let start = Instant::now();
    let tmp = temp_path(path);
    let result = write_to(&tmp, state, ram).and_then(|stats| {
        std::fs::rename(&tmp, path)
            .map_err(|e| snap_err(path, format!("rename into place: {e}")))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(stats)
    });
    match result {
        Ok(mut stats) => {
            stats.elapsed = start.elapsed();
            Ok(stats)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn snap_err(path: &Path, reason: String) -> Error {
    Error::Snapshot {
        path: path.to_path_buf(),
        reason,
    }
}

fn write_to(path: &Path, state: &VmState, ram: &GuestRam) -> Result<SnapshotStats> {
    let io = |e: std::io::Error| snap_err(path, format!("write: {e}"));
    let blob = state.encode()?;
    let runs = nonzero_runs(ram)?;
    let data_pages: u64 = runs.iter().map(|r| r.1).sum();
    let header = Header {
        version: FORMAT_VERSION,
        memory: ram.size(),
        state_len: blob.len() as u64,
        run_count: runs.len() as u64,
        data_pages,
        page_size: PAGE_SIZE as u32,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| snap_err(path, format!("create: {e}")))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&header.encode()).map_err(io)?;
    w.write_all(&blob).map_err(io)?;
    w.write_all(&crc32fast::hash(&blob).to_le_bytes())
        .map_err(io)?;
    let mut run_bytes = Vec::with_capacity(runs.len() * 16);
    for (off, n) in &runs {
        run_bytes.extend_from_slice(&off.to_le_bytes());
        run_bytes.extend_from_slice(&n.to_le_bytes());
    }
    w.write_all(&run_bytes).map_err(io)?;
    w.write_all(&crc32fast::hash(&run_bytes).to_le_bytes())
        .map_err(io)?;
    let map = MemfdMap::new(ram, false)?;
    let mut crc = crc32fast::Hasher::new();
    for (off, n) in &runs {
        let data = map.slice(*off, n * PAGE_SIZE);
        crc.update(data);
        w.write_all(data).map_err(io)?;
    }
    w.write_all(&crc.finalize().to_le_bytes()).map_err(io)?;
    w.write_all(END_MAGIC).map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(SnapshotStats {
        memory: ram.size(),
        data_pages,
        file_bytes: header.file_len().unwrap_or(0),
        elapsed: Duration::ZERO,
    })
}

/// Reads and fully verifies a snapshot; returns the state and new RAM holding the pages.
pub fn read(path: &Path) -> Result<(VmState, GuestRam, SnapshotStats)> {
    let start = Instant::now();
    let bad = |reason: String| snap_err(path, reason);
    let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let file_len = file
        .metadata()
        .map_err(|e| bad(format!("stat: {e}")))?
        .len();
    let mut r = BufReader::with_capacity(1 << 20, file);
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
    match h.file_len() {
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

    let ram = GuestRam::new(h.memory)?;
    {
        let map = MemfdMap::new(&ram, true)?;
        let mut crc = crc32fast::Hasher::new();
        for (off, n) in &runs {
            let dst = map.slice_mut(*off, n * PAGE_SIZE);
            r.read_exact(dst).map_err(|e| truncated("page data", e))?;
            crc.update(dst);
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
        file_bytes: file_len,
        elapsed: start.elapsed(),
    };
    Ok((state, ram, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::SerialSnapshot;
    use crate::state::{Raw, VcpuState, VmKernelState, STATE_VERSION};

    fn state(memory: u64) -> VmState {
        VmState {
            version: STATE_VERSION,
            memory,
            kernel: VmKernelState {
                irqchips: vec![Default::default(); 3],
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![VcpuState {
                id: 0,
                cpuid: vec![Default::default()],
                mp_state: Default::default(),
                regs: kvm_bindings::kvm_regs {
                    rip: 0x1234,
                    ..Default::default()
                },
                sregs: Default::default(),
                fpu: Raw(Default::default()),
                xcrs: Default::default(),
                xsave: Default::default(),
                debugregs: Default::default(),
                lapic: Default::default(),
                msrs: vec![Default::default(); 2],
                events: Default::default(),
                tsc_khz: 1000,
            }],
            serial: SerialSnapshot::default(),
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-snap-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
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
        expect_err(&bad, "version 2 is not supported");
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
    fn failed_write_leaves_nothing() {
        let d = dir("fail");
        let ram = GuestRam::new(64 << 20).unwrap();
        let p = d.join("missing-dir").join("vm.snap");
        assert!(write(&p, &state(64 << 20), &ram).is_err());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir_all(d).unwrap();
    }
}
