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

/// Swap type of a pte marker in `/proc/self/pagemap` (bits 0–4 of a swap
/// entry): `SWP_PTE_MARKER`, the last of the 32 types. A marker holds no
/// page: userfaultfd write protection leaves one in every empty entry it
/// protects (a background save arms all of RAM so), and it reads as a swap
/// entry (bit 62) with the uffd-wp bit.
const SWP_PTE_MARKER: u64 = 31;

/// Whether a pagemap entry maps a page: present (bit 63), or a swap or
/// migration entry (bit 62) other than a pte marker. The swap type shows
/// only to a reader with `CAP_SYS_ADMIN` (it reads 0 otherwise): there a
/// marker counts as a page, which costs reads, never data.
fn maps_a_page(e: u64) -> bool {
    let present = e >> 63 & 1 == 1;
    let swap = e >> 62 & 1 == 1;
    present || (swap && e & 0x1f != SWP_PTE_MARKER)
}

/// The runs (memfd offset, length) of the pages that the mappings `maps`
/// (file offset, length, host address) of RAM map, or that `written`
/// names: a page table entry that maps a page ([`maps_a_page`]), in
/// `/proc/self/pagemap`.
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
                if maps_a_page(e) {
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

/// Whether this host keeps shmem (and so 4 KiB guest RAM) on small pages.
/// Collapsing small pages into a transparent huge page, or splitting one,
/// unmaps them from every mapping, locked or not: RAM's page tables would
/// then forget pages the guest wrote, and [`written_or_mapped`] would miss
/// them. So the page tables are trusted only where `shmem_enabled` is
/// `never`, `deny` or `advise` (RAM asks for no huge pages) for every size
/// of large page the host offers (a size that says `inherit` follows the
/// top-level setting). A host without transparent huge pages qualifies.
pub(super) fn shmem_stays_small() -> bool {
    const THP: &str = "/sys/kernel/mm/transparent_hugepage";
    let top = std::fs::read_to_string(format!("{THP}/shmem_enabled")).ok();
    let sizes: Vec<String> = std::fs::read_dir(THP)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("shmem_enabled")).ok())
                .collect()
        })
        .unwrap_or_default();
    small_pages_only(top.as_deref(), &sizes)
}

/// [`shmem_stays_small`] from the files' contents: the top-level
/// `shmem_enabled` (None where absent) and each size's.
fn small_pages_only(top: Option<&str>, sizes: &[String]) -> bool {
    // The setting in force is the bracketed word: "always [never] deny".
    let chosen = |s: &str| {
        s.split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
            .map(str::to_owned)
    };
    let small = |v: Option<String>| matches!(v.as_deref(), Some("never" | "deny" | "advise"));
    let Some(top) = top else {
        return true;
    };
    let top_small = small(chosen(top));
    top_small
        && sizes.iter().all(|s| match chosen(s).as_deref() {
            Some("inherit") => top_small,
            other => small(other.map(str::to_owned)),
        })
}

/// Drops the pages of the `len` bytes at `host` from the mapping there (the
/// file keeps them): the next access through it faults. RAM's mappings are
/// locked on fault, which plain `MADV_DONTNEED` refuses (`EINVAL`):
/// `MADV_DONTNEED_LOCKED` drops them as they are (Linux 5.18); before it,
/// the span is unlocked, dropped and locked on fault again.
///
/// # Safety
///
/// The span must lie inside a shared mapping of a file (RAM's memfd), whose
/// pages the drop does not lose.
pub unsafe fn drop_from_mapping(host: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY (all three): a span of a shared file mapping, per the contract.
    let advise = |advice| unsafe { libc::madvise(host.cast(), len, advice) };
    if advise(libc::MADV_DONTNEED) == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    if advise(libc::MADV_DONTNEED_LOCKED) == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error().raw_os_error() {
        // SAFETY: as above.
        Some(libc::EINVAL) => unsafe { drop_relocking(host, len) },
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// [`drop_from_mapping`] where the kernel has no `MADV_DONTNEED_LOCKED`:
/// unlocks the span, drops it, and locks it on fault again. Where the drop
/// fails even so (the mapping was not refusing it for its lock), the span
/// is left unlocked and the error returned.
///
/// # Safety
///
/// As for [`drop_from_mapping`].
unsafe fn drop_relocking(host: *mut u8, len: usize) -> std::io::Result<()> {
    let check = |rc: libc::c_int| match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    // SAFETY: calls on a span of a shared file mapping (the contract);
    // unlocking and dropping lose no data, the file keeps the pages.
    unsafe {
        check(libc::munlock(host.cast(), len))?;
        check(libc::madvise(host.cast(), len, libc::MADV_DONTNEED))?;
        check(libc::mlock2(host.cast(), len, libc::MLOCK_ONFAULT))
    }
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
    fn page_tables_are_trusted_only_where_shmem_stays_on_small_pages() {
        let sizes = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let never = "always within_size advise [never] deny force\n";
        let each_never = "always inherit within_size advise [never]\n";
        let each_inherit = "always [inherit] within_size advise never\n";
        // This machine's settings.
        assert!(small_pages_only(
            Some(never),
            &sizes(&[each_never, each_inherit])
        ));
        assert!(small_pages_only(None, &[]), "no transparent huge pages");
        assert!(small_pages_only(
            Some("always within_size [advise] never deny force"),
            &[]
        ));
        assert!(!small_pages_only(
            Some("[always] within_size advise never deny force"),
            &[]
        ));
        assert!(!small_pages_only(
            Some("always [within_size] advise never deny force"),
            &[]
        ));
        assert!(!small_pages_only(
            Some("always within_size advise never deny [force]"),
            &[]
        ));
        // One size on its own, or inheriting a top-level that is on.
        let each_64k_on = "[always] inherit within_size advise never";
        assert!(!small_pages_only(
            Some(never),
            &sizes(&[each_never, each_64k_on])
        ));
        let top_on = "always [within_size] advise never deny force";
        assert!(!small_pages_only(Some(top_on), &sizes(&[each_inherit])));
        assert!(
            !small_pages_only(Some("garbage"), &[]),
            "unreadable: not trusted"
        );
    }

    /// RAM's mapping, locked on fault, drops its pages whichever way the
    /// kernel allows, and stays locked.
    #[test]
    fn pages_drop_from_a_locked_mapping_which_stays_locked() {
        let len = 16 * PAGE_SIZE as usize;
        let ram = crate::memory::GuestRam::with_huge_pages(16 << 20, false).unwrap();
        let (_, host) = ram.host_ranges()[0];
        // SAFETY: locks (on fault) RAM's own mapping.
        if unsafe { libc::mlock2(host.cast(), len, libc::MLOCK_ONFAULT) } != 0 {
            eprintln!("SKIP: cannot lock: {}", std::io::Error::last_os_error());
            return;
        }
        let mapped = || {
            let w = WrittenPages::new(len as u64);
            written_or_mapped(&[(0, len as u64, host as usize)], &w).unwrap()
        };
        let pageout = |at: usize| {
            // SAFETY: advice on RAM's own mapping; it loses no data.
            unsafe { libc::madvise(host.add(at).cast(), PAGE_SIZE as usize, libc::MADV_PAGEOUT) }
        };
        for (name, drop) in [
            // SAFETY (both): spans of RAM's shared mapping.
            (
                "as the kernel allows",
                (|h, l| unsafe { drop_from_mapping(h, l) })
                    as fn(*mut u8, usize) -> std::io::Result<()>,
            ),
            ("unlocked and locked again", |h, l| unsafe {
                drop_relocking(h, l)
            }),
        ] {
            ram.write(0, &[1; 3 * PAGE_SIZE as usize]).unwrap();
            assert_eq!(mapped(), vec![(0, 3 * PAGE_SIZE)], "{name}");
            // SAFETY: two pages of RAM's mapping.
            drop(
                unsafe { host.add(PAGE_SIZE as usize) },
                2 * PAGE_SIZE as usize,
            )
            .unwrap();
            assert_eq!(mapped(), vec![(0, PAGE_SIZE)], "{name}: dropped");
            let mut b = [0u8; 1];
            ram.read(2 * PAGE_SIZE, &mut b).unwrap();
            assert_eq!(b, [1], "{name}: the file kept the page");
            assert_eq!(pageout(2 * PAGE_SIZE as usize), -1, "{name}: still locked");
        }
    }

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
