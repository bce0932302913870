//! Which pages of prefaulted 4 KiB RAM hold data.
//!
//! Every page of such RAM is in the file, so the file cannot tell which
//! were ever written (`SEEK_DATA` finds data everywhere). The pages that
//! the guest, KVM or the VMM touched are those RAM's own mappings map
//! (`/proc/self/pagemap`); the others were written through another mapping
//! (an incoming migration's second mapping, a restore's), and their writers
//! note them here. For the page tables to keep saying so, RAM's mappings are
//! locked on fault (`mlock2(MLOCK_ONFAULT)`): no reclaim, swap or
//! `MADV_PAGEOUT` unmaps a page of them while it lives.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use super::PAGE_SIZE;

/// One bit per 4 KiB page of RAM, set for a page written other than
/// through RAM's own mappings. Bits are only ever set.
pub struct WrittenPages {
    bits: Box<[AtomicU64]>,
    pages: u64,
}

impl WrittenPages {
    /// A record for `size` bytes of RAM, nothing written.
    pub(super) fn new(size: u64) -> Self {
        let pages = size / PAGE_SIZE;
        WrittenPages {
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Notes that `[off, off + len)` (memfd offsets) was written; bytes
    /// past RAM are ignored.
    pub fn mark(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off / PAGE_SIZE;
        let end = off.saturating_add(len).div_ceil(PAGE_SIZE).min(self.pages);
        let mut p = first;
        while p < end {
            // The pages of this word, set with one operation.
            let word = p / 64;
            let upto = end.min((word + 1) * 64);
            let n = upto - p;
            let mask = if n == 64 {
                !0
            } else {
                ((1u64 << n) - 1) << (p % 64)
            };
            self.bits[word as usize].fetch_or(mask, Ordering::Release);
            p = upto;
        }
    }

    /// The bitmap now, a word per 64 pages.
    fn load(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }
}

/// Entries of `/proc/self/pagemap` read at a time (16 MiB of RAM).
const ENTRIES_PER_READ: u64 = 4096;

/// The runs (memfd offset, length) of the pages that the mappings `maps`
/// (file offset, length, host address) of RAM map, or that `written`
/// names: a page table entry that is present (bit 63) or a swap or
/// migration entry (bit 62), in `/proc/self/pagemap`.
pub(super) fn written_or_mapped(
    maps: &[(u64, u64, usize)],
    written: &WrittenPages,
) -> std::io::Result<Vec<(u64, u64)>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut bits = vec![0u64; written.bits.len()];
    let mut buf = vec![0u8; (ENTRIES_PER_READ * 8) as usize];
    for &(file_offset, len, host) in maps {
        let (first, pages) = (file_offset / PAGE_SIZE, len / PAGE_SIZE);
        let mut i = 0;
        while i < pages {
            let n = (pages - i).min(ENTRIES_PER_READ);
            let entries = &mut buf[..(n * 8) as usize];
            pagemap.read_exact_at(entries, (host as u64 / PAGE_SIZE + i) * 8)?;
            for (k, e) in entries.chunks_exact(8).enumerate() {
                let e = u64::from_ne_bytes(e.try_into().unwrap_or_default());
                if e >> 62 != 0 {
                    let p = first + i + k as u64;
                    if let Some(w) = bits.get_mut((p / 64) as usize) {
                        *w |= 1 << (p % 64);
                    }
                }
            }
            i += n;
        }
    }
    // Read after the page tables: a writer notes a page before writing it.
    for (b, w) in bits.iter_mut().zip(written.load()) {
        *b |= w;
    }
    Ok(runs_of(&bits, written.pages))
}

/// The runs of set bits of `bits` (`pages` of them), as (offset, length) in bytes.
fn runs_of(bits: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in 0..pages {
        if bits[(p / 64) as usize] & (1 << (p % 64)) == 0 {
            continue;
        }
        match runs.last_mut() {
            Some((off, len)) if *off + *len == p * PAGE_SIZE => *len += PAGE_SIZE,
            _ => runs.push((p * PAGE_SIZE, PAGE_SIZE)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_cover_the_pages_a_range_touches_and_nothing_past_ram() {
        let w = WrittenPages::new(200 * PAGE_SIZE);
        w.mark(PAGE_SIZE + 7, 1);
        w.mark(60 * PAGE_SIZE, 70 * PAGE_SIZE); // across two words
        w.mark(199 * PAGE_SIZE, 10 * PAGE_SIZE); // past the end
        w.mark(5 * PAGE_SIZE, 0);
        assert_eq!(
            runs_of(&w.load(), w.pages),
            vec![
                (PAGE_SIZE, PAGE_SIZE),
                (60 * PAGE_SIZE, 70 * PAGE_SIZE),
                (199 * PAGE_SIZE, PAGE_SIZE)
            ]
        );
    }
}
