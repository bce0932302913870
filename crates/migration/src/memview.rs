//! Direct access to guest RAM by memfd offset, for the page hot path.

use vmm::memory::{GuestRam, PAGE_SIZE};

/// Host mappings of guest RAM, addressed by memfd offset.
pub struct MemView {
    ranges: Vec<(u64, u64, usize)>, // (file_offset, len, host address)
    size: u64,
    /// The memfd itself, for system calls that take a file (`sendfile`).
    file: Option<std::fs::File>,
}

// SAFETY: the mappings stay valid while the GuestRam lives (callers keep it alive);
// pages are read or written as plain bytes.
unsafe impl Send for MemView {}

impl MemView {
    /// A view of `ram`'s current mappings.
    pub fn new(ram: &GuestRam) -> Self {
        MemView {
            ranges: ram
                .host_ranges()
                .into_iter()
                .map(|(r, p)| (r.file_offset, r.len, p as usize))
                .collect(),
            size: ram.size(),
            file: ram.memfd().try_clone().ok(),
        }
    }

    /// The memfd behind the view (None if it could not be duplicated).
    pub fn file(&self) -> Option<&std::fs::File> {
        self.file.as_ref()
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    fn addr(&self, offset: u64) -> Option<usize> {
        if !offset.is_multiple_of(PAGE_SIZE) || offset >= self.size {
            return None;
        }
        self.ranges
            .iter()
            .find(|(o, l, _)| offset >= *o && offset < o + l)
            .map(|(o, _, p)| p + (offset - o) as usize)
    }

    /// The page at memfd `offset` (page-aligned, in range).
    pub fn page(&self, offset: u64) -> Option<&[u8]> {
        // SAFETY: address inside a live mapping, PAGE_SIZE bytes within its range.
        self.addr(offset)
            .map(|a| unsafe { std::slice::from_raw_parts(a as *const u8, PAGE_SIZE as usize) })
    }

    /// CRC32 of all of guest memory in memfd offset order (verify mode).
    pub fn digest(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        let mut ranges = self.ranges.clone();
        ranges.sort_by_key(|r| r.0);
        for (_, len, addr) in ranges {
            // SAFETY: a live mapping of `len` bytes.
            h.update(unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) });
        }
        h.finalize()
    }

    /// The page at memfd `offset`, writable (destination side, before the VM runs).
    #[allow(clippy::mut_from_ref)]
    pub fn page_mut(&self, offset: u64) -> Option<&mut [u8]> {
        // SAFETY: as in `page`; callers write only while no vCPU runs on these pages.
        self.addr(offset)
            .map(|a| unsafe { std::slice::from_raw_parts_mut(a as *mut u8, PAGE_SIZE as usize) })
    }
}
