//! Post-copy into prefaulted 4 KiB memory (`migd run --prefault`).
//!
//! Every page of such memory is in the file already, so `UFFDIO_COPY`,
//! which fills absent pages only, cannot place one. Guest RAM is registered
//! for minor faults too; arriving pages are read from the socket straight
//! into the file through a second mapping whose page tables were made with
//! the memory ([`vmm::GuestRam::prefaulted_alias`]), then mapped into the
//! guest a run at a time (`UFFDIO_CONTINUE`). A page costs one copy and a
//! page table entry, where filling a fresh page costs a copy into a buffer,
//! another into the page, and the page's allocation.
//!
//! Two readers (the push and the fault channel) may bring the same page. A
//! reader claims the pages it writes first, a bit each, so that no reader
//! writes a page that is mapped already, which the guest may be changing.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm::memory::PAGE_SIZE;
use vmm::GuestRam;

use super::Dest;
use crate::bitmap::is_set;
use crate::{Error, Result};

/// Pages of a 2 MiB stretch: a fault on a page the source sends nothing of
/// maps those of its stretch.
const AROUND: u64 = 512;

/// Prefaulted 4 KiB memory as a post-copy destination fills it.
pub(super) struct Direct {
    /// Holds the second mapping.
    ram: Arc<GuestRam>,
    /// Pages a reader has taken to write (set before their `received` bit).
    claimed: Vec<AtomicU64>,
}

impl Direct {
    /// For `ram` if it is prefaulted 4 KiB memory.
    pub(super) fn for_ram(ram: &Arc<GuestRam>) -> Option<Direct> {
        ram.prefaulted_alias()?;
        let pages = ram.size() / PAGE_SIZE;
        Some(Direct {
            ram: ram.clone(),
            claimed: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// `len` bytes from memfd offset `off`, through the second mapping.
    fn at(&self, off: u64, len: u64) -> Result<*mut u8> {
        self.ram
            .prefaulted_alias()
            .and_then(|a| a.at(off, len))
            .ok_or_else(|| Error::Protocol(format!("pages {off:#x}+{len:#x} outside RAM")))
    }

    /// Takes page `p` for the calling reader: false if a reader has it.
    fn claim(&self, p: u64) -> bool {
        let b = 1u64 << (p % 64);
        self.claimed[(p / 64) as usize].fetch_or(b, Ordering::AcqRel) & b == 0
    }

    /// Gives back pages a reader took and did not write.
    fn release(&self, pages: Range<u64>) {
        for p in pages {
            self.claimed[(p / 64) as usize].fetch_and(!(1u64 << (p % 64)), Ordering::AcqRel);
        }
    }
}

impl Dest {
    /// Prefaulted 4 KiB pages: writes the `n` pages from page `first`, whose
    /// bytes `put` writes. It is called in page order for each stretch of
    /// the run (page indices within it), with where the pages go (through
    /// the second mapping) for pages this call took, or `None` for pages
    /// another reader has (to be skipped). Each stretch written is mapped
    /// into the guest at once, which wakes the threads waiting on it.
    pub(super) fn direct_with(
        &self,
        d: &Direct,
        first: u64,
        n: u64,
        urgent: bool,
        mut put: impl FnMut(Range<usize>, Option<&mut [u8]>) -> Result<()>,
    ) -> Result<()> {
        let mut i = 0;
        // Whether the page after the last stretch was taken by this call.
        let mut next: Option<bool> = None;
        while i < n {
            let mine = next.take().unwrap_or_else(|| d.claim(first + i));
            let mut j = i + 1;
            while j < n {
                let m = d.claim(first + j);
                if m != mine {
                    next = Some(m);
                    break;
                }
                j += 1;
            }
            let stretch = i as usize..j as usize;
            let written = if mine {
                let off = (first + i) * PAGE_SIZE;
                let len = (j - i) * PAGE_SIZE;
                // Mapped into the guest below; noted first all the same, in
                // case the mapping fails (the file has the bytes by then).
                if let Some(w) = d.ram.written_pages() {
                    w.mark(off, len);
                }
                d.at(off, len)
                    .and_then(|base| {
                        // SAFETY: pages `first+i..first+j` in the second
                        // mapping, which this call alone took; the guest maps
                        // them only once they are written, below.
                        let dst = unsafe { std::slice::from_raw_parts_mut(base, len as usize) };
                        put(stretch, Some(dst))
                    })
                    .and_then(|()| self.map_direct(off, len))
            } else {
                self.duplicate.fetch_add(j - i, Ordering::Relaxed);
                put(stretch, None)
            };
            if let Err(e) = written {
                if mine {
                    d.release(first + i..first + j);
                }
                if next == Some(true) {
                    d.release(first + j..first + j + 1);
                }
                return Err(e);
            }
            if mine {
                let newly = (first + i..first + j)
                    .filter(|&p| self.record_fill(p, urgent))
                    .count() as u64;
                self.count_filled(newly);
            }
            i = j;
        }
        Ok(())
    }

    /// Maps memfd offsets `[off, off + len)`, written through the second
    /// mapping, into the guest.
    fn map_direct(&self, off: u64, len: u64) -> Result<()> {
        for (host, len) in self.map.host_spans(off, len) {
            let mapped = match self.uffd.map_present(host, len) {
                // A page of the run was mapped already (nothing here maps a
                // page twice, but the rest must not stay unmapped): by page.
                Ok(false) => (0..len / PAGE_SIZE).try_for_each(|k| {
                    self.uffd
                        .map_present(host + k * PAGE_SIZE, PAGE_SIZE)
                        .map(drop)
                }),
                r => r.map(drop),
            };
            self.filled_or_failed(mapped, || format!("UFFDIO_CONTINUE at {off:#x}"))?;
        }
        Ok(())
    }

    /// A fault at `page_addr` (memfd offset `off`) on a page the source
    /// sends nothing of: the file holds it as it should be (zeros, or what
    /// pre-copy left), or has a hole there (a zero page pre-copy punched
    /// out), which a read through the second mapping fills with a zero
    /// page; then it is mapped. So are the other pages of its 2 MiB that
    /// the source sends nothing of and the file holds: the guest would
    /// otherwise take a fault on each (a page pre-copy wrote is in the
    /// file, not in the guest's mapping), where fresh memory takes none.
    pub(super) fn direct_as_is(&self, d: &Direct, page_addr: u64, off: u64) -> Result<()> {
        // SAFETY: a byte of the page in the second mapping, read only.
        unsafe { std::ptr::read_volatile(d.at(off, PAGE_SIZE)?) };
        let filled = self.uffd.map_present(page_addr, PAGE_SIZE);
        self.zero_filled(filled, "UFFDIO_CONTINUE (page the source sends nothing of)")?;
        let first = off / PAGE_SIZE / AROUND * AROUND;
        let end = (first + AROUND).min(self.pages);
        let mut p = first;
        while p < end {
            if is_set(&self.expected, p) {
                p += 1;
                continue;
            }
            let mut q = p + 1;
            while q < end && !is_set(&self.expected, q) {
                q += 1;
            }
            for (host, len) in self.map.host_spans(p * PAGE_SIZE, (q - p) * PAGE_SIZE) {
                // At worst the guest faults on them one by one.
                if let Err(e) = self.uffd.map_present_pages(host, len) {
                    tracing::debug!("mapping pages around a fault: {e}");
                }
            }
            p = q;
        }
        Ok(())
    }
}
