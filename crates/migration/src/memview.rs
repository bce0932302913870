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
            // hugetlbfs has no `sendfile` and no holes to seek: such RAM
            // is read through the mapping only.
            file: (!ram.is_huge())
                .then(|| ram.memfd().try_clone().ok())
                .flatten(),
        }
    }

    /// Prefaulted 4 KiB RAM: a view of its second mapping, whose page
    /// tables are made ([`GuestRam::prefaulted_alias`]), so that pages are
    /// written with no page fault each. None for other RAM.
    pub fn of_prefaulted(ram: &GuestRam) -> Option<Self> {
        let base = ram.prefaulted_alias()?.at(0, ram.size())?;
        Some(MemView {
            ranges: vec![(0, ram.size(), base as usize)],
            size: ram.size(),
            file: ram.memfd().try_clone().ok(),
        })
    }

    /// Another view of the same mappings (for another thread).
    pub fn duplicate(&self) -> Self {
        MemView {
            ranges: self.ranges.clone(),
            size: self.size,
            file: self.file.as_ref().and_then(|f| f.try_clone().ok()),
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

    /// CRC32 of all of `ram` (whose mappings this views) in memfd offset
    /// order (verify mode). Only the pages with data
    /// ([`GuestRam::data_extents`]) are read; the rest count as the zeros
    /// they read as: touching them would map each one, which on a nested
    /// host took seconds for 256 MiB, and reading prefaulted memory whole
    /// takes ~150 ms a GiB, both inside the pause.
    pub fn digest(&self, ram: &GuestRam) -> u32 {
        let extents = ram.data_extents().unwrap_or_else(|e| {
            tracing::warn!("which pages of guest RAM hold data: {e}; reading all of it");
            vec![(0, self.size)]
        });
        let mut h = crc32fast::Hasher::new();
        let mut at = 0;
        for (off, len) in extents {
            h.combine(&zeros(off - at));
            for (o, l, addr) in &self.ranges {
                // The part of this extent inside this mapping.
                let (from, to) = (off.max(*o), (off + len).min(o + l));
                if from < to {
                    // SAFETY: inside a live mapping of `l` bytes at `addr`.
                    h.update(unsafe {
                        std::slice::from_raw_parts(
                            (addr + (from - o) as usize) as *const u8,
                            (to - from) as usize,
                        )
                    });
                }
            }
            at = off + len;
        }
        h.combine(&zeros(self.size - at));
        h.finalize()
    }

    /// `len` bytes at memfd `offset` (page-aligned), writable, where they lie
    /// in one mapping (destination side, before the VM runs).
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self, offset: u64, len: usize) -> Option<&mut [u8]> {
        if !offset.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let end = offset.checked_add(len as u64)?;
        let (o, _, p) = self
            .ranges
            .iter()
            .find(|(o, l, _)| offset >= *o && end <= o + l)?;
        // SAFETY: `len` bytes inside a live mapping; callers write only while
        // no vCPU runs on these pages.
        Some(unsafe { std::slice::from_raw_parts_mut((p + (offset - o) as usize) as *mut u8, len) })
    }

    /// The page at memfd `offset`, writable (destination side, before the VM runs).
    #[allow(clippy::mut_from_ref)]
    pub fn page_mut(&self, offset: u64) -> Option<&mut [u8]> {
        // SAFETY: as in `page`; callers write only while no vCPU runs on these pages.
        self.addr(offset)
            .map(|a| unsafe { std::slice::from_raw_parts_mut(a as *mut u8, PAGE_SIZE as usize) })
    }
}

/// The CRC32 state of `n` zero bytes, in O(log n) (doubling a page of zeros).
fn zeros(n: u64) -> crc32fast::Hasher {
    let mut out = crc32fast::Hasher::new();
    let mut block = crc32fast::Hasher::new();
    block.update(&[0u8; PAGE_SIZE as usize]);
    let mut pages = n / PAGE_SIZE;
    while pages > 0 {
        if pages & 1 == 1 {
            out.combine(&block);
        }
        let twice = block.clone();
        block.combine(&twice);
        pages >>= 1;
    }
    out.update(&[0u8; PAGE_SIZE as usize][..(n % PAGE_SIZE) as usize]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vmm::memory::GuestRam;

    #[test]
    fn zero_runs_hash_like_the_bytes() {
        for n in [0u64, 1, 4095, 4096, 4097, 3 * 4096 + 17, 1 << 20] {
            let mut direct = crc32fast::Hasher::new();
            direct.update(&vec![0u8; n as usize]);
            assert_eq!(zeros(n).finalize(), direct.finalize(), "{n} bytes");
        }
    }

    #[test]
    fn digest_skips_holes_and_matches_reading_everything() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let view = MemView::new(&ram);
        let everything = |v: &MemView| {
            let mut h = crc32fast::Hasher::new();
            for p in 0..v.pages() {
                h.update(v.page(p * PAGE_SIZE).unwrap());
            }
            h.finalize()
        };
        let empty = view.digest(&ram);
        for (off, byte) in [(0u64, 1u8), (5 * PAGE_SIZE + 9, 7), ((16 << 20) - 1, 0xff)] {
            let page = view.page_mut(off & !(PAGE_SIZE - 1)).unwrap();
            page[(off % PAGE_SIZE) as usize] = byte;
        }
        assert_ne!(view.digest(&ram), empty);
        assert_eq!(view.digest(&ram), everything(&view));
    }

    /// Prefaulted 4 KiB RAM has every page allocated: the digest reads the
    /// pages with data only, so it maps nothing more into RAM's mappings
    /// (which would make every page count as data from then on).
    #[test]
    fn digest_of_prefaulted_memory_reads_only_the_pages_with_data() {
        let ram = GuestRam::with_huge_pages(16 << 20, false).unwrap();
        ram.prefault().unwrap();
        if ram.written_pages().is_none() {
            eprintln!("RAM's mappings could not be locked (needs root): skipped");
            return;
        }
        let view = MemView::new(&ram);
        ram.write(0x9000 + 8, &[7]).unwrap();
        ram.write(0x20_0000, &[1, 2, 3]).unwrap();
        let before = ram.data_extents().unwrap();
        assert_eq!(before, vec![(0x9000, 0x1000), (0x20_0000, 0x1000)]);
        let digest = view.digest(&ram);
        assert_eq!(
            ram.data_extents().unwrap(),
            before,
            "the digest mapped more pages"
        );
        let mut everything = crc32fast::Hasher::new();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in 0..view.pages() {
            ram.memfd().read_exact_at(&mut page, p * PAGE_SIZE).unwrap();
            everything.update(&page);
        }
        assert_eq!(digest, everything.finalize());
    }
}
