//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): each vCPU pushes the pages it
//! dirties into a ring shared with this process, in place of the per-slot
//! bitmap that `KVM_GET_DIRTY_LOG` copies out whole. Reading it costs what
//! was dirtied, not what the guest has.
//!
//! Off unless asked for ([`set_entries`]): on this project's nested test host
//! (kvm-pvm) the ring is known to lose entries when it overflows, so an
//! operator turns it on only where `tests/dirty_ring.rs` passes on the host.
//! As a guard, a harvest that finds a ring completely full (KVM ought to have
//! stopped the vCPU well before) counts as an overflow, and the next read of
//! the log then reports every page dirty: a full resend, never a lost page.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_dirty_gfn;
use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::{io, kvm, Error, Result};
use crate::memory::{GuestRam, PAGE_SIZE};

/// Ring size in entries this process's VMs get (0: off, the bitmap log).
static ENTRIES: AtomicU32 = AtomicU32::new(0);

/// Entry flags (`KVM_DIRTY_GFN_F_DIRTY`, `KVM_DIRTY_GFN_F_RESET`).
const F_DIRTY: u32 = 1;
const F_RESET: u32 = 2;
/// `KVM_RESET_DIRTY_RINGS`: `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = (0xae << 8) | 0xc7;
/// `KVM_EXIT_DIRTY_RING_FULL`.
pub const EXIT_DIRTY_RING_FULL: u32 = 31;
/// Smallest and largest ring this accepts, in entries (KVM's own bounds
/// depend on the host; a ring smaller than its reserve is refused by it).
pub const MIN_ENTRIES: u32 = 256;
pub const MAX_ENTRIES: u32 = 65536;

/// Makes every VM this process creates from now on track dirty pages with
/// rings of `entries` entries per vCPU (0: the bitmap log). `entries` must be
/// a power of two in [`MIN_ENTRIES`]..=[`MAX_ENTRIES`].
pub fn set_entries(entries: u32) -> Result<()> {
    if entries != 0 {
        check_entries(entries).map_err(Error::DirtyRing)?;
    }
    ENTRIES.store(entries, Ordering::Relaxed);
    Ok(())
}

/// Checks a ring size: a power of two in [`MIN_ENTRIES`]..=[`MAX_ENTRIES`].
pub fn check_entries(entries: u32) -> std::result::Result<(), String> {
    if entries.is_power_of_two() && (MIN_ENTRIES..=MAX_ENTRIES).contains(&entries) {
        Ok(())
    } else {
        Err(format!(
            "{entries} entries: want a power of two from {MIN_ENTRIES} to \
             {MAX_ENTRIES}, or 0 for the bitmap log"
        ))
    }
}

/// The ring size set by [`set_entries`] (0: off).
pub fn entries() -> u32 {
    ENTRIES.load(Ordering::Relaxed)
}

/// Turns the ring on for a new VM, before its first vCPU exists.
pub(crate) fn enable(vm_fd: &VmFd, entries: u32) -> Result<()> {
    let bytes = entries as u64 * std::mem::size_of::<kvm_dirty_gfn>() as u64;
    // The acquire/release flavour where the host has it: the same ring, with
    // ordering on weakly ordered hosts spelt out. Either answers the largest
    // ring it takes, in bytes (0: none).
    let (cap, max) = [
        kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
        kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
    ]
    .into_iter()
    .map(|c| (c, vm_fd.check_extension_raw(c.into()).max(0) as u64))
    .find(|&(_, max)| max > 0)
    .ok_or_else(|| {
        Error::DirtyRing("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)".into())
    })?;
    if bytes > max {
        return Err(Error::DirtyRing(format!(
            "{entries} entries: this host's KVM takes at most {}",
            max / std::mem::size_of::<kvm_dirty_gfn>() as u64
        )));
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap,
        ..Default::default()
    };
    cap.args[0] = bytes;
    vm_fd
        .enable_cap(&cap)
        .map_err(kvm("KVM_ENABLE_CAP (dirty ring)"))
}

/// What the rings have done, for the migration statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Entries per vCPU ring.
    pub entries: u32,
    /// Entries harvested.
    pub harvested: u64,
    /// Times a vCPU stopped because its ring was full.
    pub full_exits: u64,
    /// Harvests that found a ring completely full (entries may have been
    /// lost; the next read reported every page dirty).
    pub overflows: u64,
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
}

// SAFETY: the mapping is shared memory that lives as long as the Ring; every
// access goes through `Rings::harvest`, under its mutex.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `Rings::map` mapped.
        unsafe {
            libc::munmap(
                self.base.cast(),
                self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            )
        };
    }
}

/// What the harvests have gathered since the log was last read.
struct Gathered {
    /// Next entry to read, per ring (counts up; the slot is `% entries`).
    next: Vec<u32>,
    /// One bit per page, indexed by memfd page.
    bits: Vec<u64>,
    /// A ring was found full since the last read.
    overflowed: bool,
}

impl Gathered {
    /// The pages dirtied since the last read; with `clear`, starts over.
    /// After an overflow every page of the first `pages` counts as dirty,
    /// until read with `clear` or cleared page by page ([`Rings::clear`]) as
    /// it is sent: one full resend, not one per later read.
    fn read(&mut self, pages: u64, clear: bool) -> Vec<u64> {
        if self.overflowed {
            tracing::warn!("a dirty ring overflowed: every page counts as dirty");
            for pfn in 0..pages {
                if let Some(w) = self.bits.get_mut((pfn / 64) as usize) {
                    *w |= 1 << (pfn % 64);
                }
            }
            self.overflowed = false;
        }
        let out = self.bits.clone();
        if clear {
            self.bits.iter_mut().for_each(|w| *w = 0);
        }
        out
    }
}

/// The rings of one VM's vCPUs.
pub(crate) struct Rings {
    rings: Vec<Ring>,
    gathered: Mutex<Gathered>,
    vm_fd: Arc<VmFd>,
    /// First memfd page of each memory slot.
    slot_first: Vec<u64>,
    slot_pages: Vec<u64>,
    harvested: AtomicU64,
    full_exits: AtomicU64,
    overflows: AtomicU64,
}

impl Rings {
    /// Maps the ring of each of `vcpus` (created after [`enable`]).
    pub(crate) fn map(
        vm_fd: Arc<VmFd>,
        vcpus: &[Arc<Mutex<VcpuFd>>],
        ram: &GuestRam,
        entries: u32,
    ) -> Result<Self> {
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as i64 * PAGE_SIZE as i64;
        let mut rings = Vec::with_capacity(vcpus.len());
        for fd in vcpus {
            let raw =
                std::os::fd::AsRawFd::as_raw_fd(&*fd.lock().unwrap_or_else(|p| p.into_inner()));
            // SAFETY: maps the vCPU fd's ring area, whose size KVM was given
            // in `enable`; checked for failure below.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    raw,
                    offset,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(io("mmap of a vCPU's dirty ring")(
                    std::io::Error::last_os_error(),
                ));
            }
            rings.push(Ring {
                base: base.cast(),
                entries,
            });
        }
        let pages = ram.size() / PAGE_SIZE;
        Ok(Rings {
            gathered: Mutex::new(Gathered {
                next: vec![0; rings.len()],
                bits: vec![0; pages.div_ceil(64) as usize],
                overflowed: false,
            }),
            rings,
            vm_fd,
            slot_first: ram
                .ranges()
                .iter()
                .map(|r| r.file_offset / PAGE_SIZE)
                .collect(),
            slot_pages: ram.ranges().iter().map(|r| r.len / PAGE_SIZE).collect(),
            harvested: AtomicU64::new(0),
            full_exits: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        })
    }

    /// A vCPU stopped with its ring full: harvests, so that it may go on.
    pub(crate) fn on_full_exit(&self) -> Result<()> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let mut g = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
        self.harvest(&mut g)
    }

    /// Forgets the pages of `set` (one bit per memfd page, from word
    /// `first_word` on) dirtied so far, after a harvest has handed every
    /// entry back: what the guest writes to them from now on is logged
    /// again. The bitmap log's `KVM_CLEAR_DIRTY_LOG` for a ring.
    pub(crate) fn clear(&self, first_word: usize, set: &[u64]) -> Result<()> {
        let mut g = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
        self.harvest(&mut g)?;
        for (w, m) in g.bits.iter_mut().skip(first_word).zip(set) {
            *w &= !m;
        }
        Ok(())
    }

    /// The pages dirtied since the last call (every page after an overflow),
    /// one bit per memfd page; with `clear`, starts over.
    pub(crate) fn read(&self, clear: bool) -> Result<Vec<u64>> {
        let mut g = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
        self.harvest(&mut g)?;
        let pages = self
            .slot_first
            .iter()
            .zip(&self.slot_pages)
            .map(|(f, n)| f + n)
            .max()
            .unwrap_or(0);
        Ok(g.read(pages, clear))
    }

    /// Moves every entry the rings hold into `g` and hands their slots back
    /// to KVM, which write-protects those pages again.
    fn harvest(&self, g: &mut Gathered) -> Result<()> {
        let mut any = 0u64;
        for (i, ring) in self.rings.iter().enumerate() {
            // SAFETY: `base` maps `entries` entries for as long as `ring` lives.
            let (n, full) = unsafe {
                drain(
                    ring.base,
                    ring.entries,
                    &mut g.next[i],
                    &self.slot_first,
                    &self.slot_pages,
                    &mut g.bits,
                )
            };
            if full {
                g.overflowed = true;
                self.overflows.fetch_add(1, Ordering::Relaxed);
            }
            any += n as u64;
        }
        if any > 0 {
            self.harvested.fetch_add(any, Ordering::Relaxed);
            self.reset()?;
        }
        Ok(())
    }

    /// `KVM_RESET_DIRTY_RINGS`, until it has gone as far as it can: newer
    /// kernels (2025 on; this host's 6.18) stop it with EINTR when a signal
    /// is pending, such as the pause's kick to a vCPU thread harvesting on a
    /// full ring, having reset only some of the entries.
    fn reset(&self) -> Result<()> {
        loop {
            // SAFETY: a VM ioctl without arguments.
            let rc = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&*self.vm_fd),
                    KVM_RESET_DIRTY_RINGS,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let e = kvm_ioctls::Error::last();
            if e.errno() != libc::EINTR {
                return Err(kvm("KVM_RESET_DIRTY_RINGS")(e));
            }
        }
    }

    /// What the rings have done so far.
    pub(crate) fn stats(&self) -> RingStats {
        RingStats {
            entries: self.rings.first().map_or(0, |r| r.entries),
            harvested: self.harvested.load(Ordering::Relaxed),
            full_exits: self.full_exits.load(Ordering::Relaxed),
            overflows: self.overflows.load(Ordering::Relaxed),
        }
    }
}

/// Reads the dirty entries of one ring of `entries` entries at `base`, from
/// entry `*next` on: sets each one's page in `bits` (one bit per memfd page;
/// slot `i` starts at page `slot_first[i]` and has `slot_pages[i]`) and
/// marks the entry for KVM to reset. Returns how many it read, and whether
/// the ring was full or held an entry that names no page of ours: either
/// way, pages may be missing from `bits`.
///
/// # Safety
/// `base` must point at `entries` entries that stay mapped during the call.
unsafe fn drain(
    base: *mut kvm_dirty_gfn,
    entries: u32,
    next: &mut u32,
    slot_first: &[u64],
    slot_pages: &[u64],
    bits: &mut [u64],
) -> (u32, bool) {
    let mut n = 0u32;
    let mut unknown = false;
    while n < entries {
        // SAFETY: the index is below `entries`, inside the mapping.
        let e = unsafe { base.add((*next % entries) as usize) };
        // SAFETY: `flags` is the entry's first field, a u32 that KVM writes
        // concurrently: read and written atomically.
        let flags = unsafe { &*(std::ptr::addr_of_mut!((*e).flags) as *const AtomicU32) };
        if flags.load(Ordering::Acquire) & F_DIRTY == 0 {
            break;
        }
        // SAFETY: KVM wrote these before it set the flag, which was read
        // above with acquire ordering.
        let (slot, offset) = unsafe {
            (
                std::ptr::read_volatile(std::ptr::addr_of!((*e).slot)),
                std::ptr::read_volatile(std::ptr::addr_of!((*e).offset)),
            )
        };
        // The slot id's low 16 bits are the slot (the high ones, the address
        // space: always 0 here).
        let slot = (slot & 0xffff) as usize;
        let pfn = match (slot_first.get(slot), slot_pages.get(slot)) {
            (Some(&first), Some(&pages)) if offset < pages => Some(first + offset),
            _ => None,
        };
        match pfn.and_then(|p| bits.get_mut((p / 64) as usize).map(|w| (w, p))) {
            Some((w, p)) => *w |= 1 << (p % 64),
            None => unknown = true,
        }
        flags.store(F_RESET, Ordering::Release);
        *next = next.wrapping_add(1);
        n += 1;
    }
    // KVM stops a vCPU well before its ring is full: a full one may have had
    // entries written over.
    (n, unknown || n == entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(flags: u32, slot: u32, offset: u64) -> kvm_dirty_gfn {
        kvm_dirty_gfn {
            flags,
            slot,
            offset,
        }
    }

    /// Drains `ring` from `next` over two slots: pages 0..128 and 192..256.
    fn drain_vec(ring: &mut [kvm_dirty_gfn], next: &mut u32) -> (u32, bool, Vec<u64>) {
        let mut bits = vec![0u64; 4];
        let n = ring.len() as u32;
        // SAFETY: the vector holds `n` entries for the whole call.
        let (got, lost) =
            unsafe { drain(ring.as_mut_ptr(), n, next, &[0, 192], &[128, 64], &mut bits) };
        (got, lost, bits)
    }

    #[test]
    fn an_overflow_makes_every_page_dirty_once() {
        let mut g = Gathered {
            next: vec![0],
            bits: vec![0u64; 2],
            overflowed: false,
        };
        g.bits[0] = 0b100;
        assert_eq!(g.read(100, false), vec![0b100, 0]);
        g.overflowed = true;
        let all = vec![u64::MAX, (1 << 36) - 1];
        assert_eq!(g.read(100, false), all, "every page after an overflow");
        // Sent page by page (the rounds' clear-before-send): each cleared
        // page stays clean, and later reads report only what is left.
        g.bits[0] = 0;
        assert_eq!(g.read(100, false), vec![0, (1 << 36) - 1]);
        assert_eq!(g.read(100, true), vec![0, (1 << 36) - 1]);
        assert_eq!(g.read(100, false), vec![0, 0]);
        g.overflowed = true;
        assert_eq!(g.read(100, true), all);
        assert_eq!(g.read(100, true), vec![0, 0]);
    }

    #[test]
    fn drain_reads_dirty_entries_in_order_and_hands_them_back() {
        let mut ring = vec![entry(0, 0, 0); 8];
        ring[2] = entry(F_DIRTY, 0, 5);
        ring[3] = entry(F_DIRTY, 1, 3); // slot 1: page 195
        ring[4] = entry(F_DIRTY, 0, 70);
        let mut next = 2;
        let (n, lost, bits) = drain_vec(&mut ring, &mut next);
        assert_eq!((n, lost, next), (3, false, 5));
        assert_eq!(bits, vec![1 << 5, 1 << 6, 0, 1 << 3]);
        assert!(ring[2..5].iter().all(|e| e.flags == F_RESET));
        // Nothing new: nothing read, and the reset entries are not read again.
        let (n, lost, _) = drain_vec(&mut ring, &mut next);
        assert_eq!((n, lost, next), (0, false, 5));
    }

    #[test]
    fn drain_wraps_round_the_ring() {
        let mut ring = vec![entry(0, 0, 0); 4];
        ring[3] = entry(F_DIRTY, 0, 1);
        ring[0] = entry(F_DIRTY, 0, 2);
        let mut next = 7; // slot 3
        let (n, lost, bits) = drain_vec(&mut ring, &mut next);
        assert_eq!((n, lost, next), (2, false, 9));
        assert_eq!(bits[0], 0b110);
    }

    #[test]
    fn a_full_ring_or_a_foreign_entry_counts_as_loss() {
        let mut ring: Vec<_> = (0..4).map(|i| entry(F_DIRTY, 0, i)).collect();
        let mut next = 0;
        let (n, lost, bits) = drain_vec(&mut ring, &mut next);
        assert_eq!((n, lost), (4, true), "a full ring may have lost entries");
        assert_eq!(bits[0], 0b1111);
        let mut ring = vec![entry(0, 0, 0); 4];
        ring[0] = entry(F_DIRTY, 0, 128); // past slot 0's pages
        ring[1] = entry(F_DIRTY, 7, 0); // no such slot
        let mut next = 0;
        let (n, lost, bits) = drain_vec(&mut ring, &mut next);
        assert_eq!((n, lost), (2, true));
        assert!(bits.iter().all(|&w| w == 0));
    }

    #[test]
    fn sizes_outside_the_bounds_are_refused() {
        for bad in [1, 100, 128, 300, 1 << 17] {
            let e = set_entries(bad).unwrap_err().to_string();
            assert!(
                e.contains(&bad.to_string()) && e.contains("power of two"),
                "{e}"
            );
        }
        assert_eq!(entries(), 0);
    }
}
