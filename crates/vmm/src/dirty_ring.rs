//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): each vCPU pushes the pages it
//! dirties into a ring shared with this process, in place of the per-slot
//! bitmap that `KVM_GET_DIRTY_LOG` copies out whole. Reading it costs what
//! was dirtied, not what the guest has, plus a scan of the rings (16 bytes
//! an entry; about 50 µs for a ring of 65536).
//!
//! How the ring is shared (`virt/kvm/dirty_ring.c`): KVM publishes a page in
//! the entry at its dirty index by setting its flags to DIRTY; this process
//! harvests an entry by setting RESET; `KVM_RESET_DIRTY_RINGS` walks from
//! KVM's reset index over consecutive entries that have RESET,
//! write-protects their pages again, clears their flags and moves the reset
//! index past them, stopping at the first without RESET. When the two
//! indexes are a soft limit apart (64 entries short of full, more with PML)
//! the vCPU stops with `KVM_EXIT_DIRTY_RING_FULL` until entries are reset.
//! Neither index is visible here.
//!
//! Off unless asked for ([`set_entries`]): on this project's nested test host
//! (kvm-pvm) KVM does not stop a vCPU in time, and writes on past a full
//! ring over entries not yet reset, which are lost; so an operator turns the
//! ring on only where `tests/dirty_ring.rs` passes on the host. Should an
//! overflow come all the same:
//! - every harvest scans each ring whole ([`harvest`]), rather than reading
//!   on from a position of this process's own, which an overflow puts out
//!   of step with KVM's for good;
//! - a harvest that finds a ring full, an entry written over while it was
//!   read, or before or as the reset took it (the reset then write-protects
//!   another page than the one harvested, or none: [`follow`]), an entry
//!   naming no page of the VM, a reset that went round a whole ring, or
//!   KVM's reset out of step (below) counts an overflow. The
//!   next read of the log then write-protects all of RAM again (the caller
//!   turns dirty logging off and on) and reports every page dirty: a full
//!   resend, and a page whose entry was lost, left writable with nothing to
//!   write-protect it again, is logged again on its next write;
//! - the reset after an overflow leaves KVM counting entries whose places it
//!   cleared: its next reset would stop there for ever, and the vCPU stop on
//!   a full ring at every KVM_RUN. [`settle`] and [`unstick`] put it back in
//!   step.

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
    #[cfg(test)]
    if let Some(n) = TEST_ENTRIES.with(|e| e.get()) {
        return n;
    }
    ENTRIES.load(Ordering::Relaxed)
}

#[cfg(test)]
thread_local! {
    /// [`entries`] on this thread alone, so that a test's VM gets rings
    /// without giving them to the VMs of tests running beside it.
    static TEST_ENTRIES: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with VMs made on this thread getting rings of `entries`.
#[cfg(test)]
pub(crate) fn with_test_entries<T>(entries: u32, f: impl FnOnce() -> T) -> T {
    TEST_ENTRIES.with(|e| e.set(Some(entries)));
    let out = f();
    TEST_ENTRIES.with(|e| e.set(None));
    out
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
    /// Harvests that found a ring overflowed (KVM wrote more entries than it
    /// holds, so some may be lost; the next read reported every page dirty
    /// and write-protected all of RAM again).
    pub overflows: u64,
}

/// One vCPU's ring as mapped here: `entries` entries (a power of two) at
/// `base`. Every index is taken modulo `entries`.
#[derive(Clone, Copy)]
struct View {
    base: *mut kvm_dirty_gfn,
    entries: u32,
}

impl View {
    /// # Safety
    /// `base` must point at `entries` entries that stay mapped for as long
    /// as the view (or a copy) is used.
    unsafe fn new(base: *mut kvm_dirty_gfn, entries: u32) -> Self {
        debug_assert!(entries.is_power_of_two());
        View { base, entries }
    }

    /// Index `i` as a place in the ring.
    fn at(&self, i: u32) -> u32 {
        i & (self.entries - 1)
    }

    fn entry(&self, i: u32) -> *mut kvm_dirty_gfn {
        // SAFETY: the index is below `entries`, inside the mapping (`new`).
        unsafe { self.base.add(self.at(i) as usize) }
    }

    /// The flags of entry `i`, which KVM writes concurrently: read and
    /// written atomically only.
    fn flags(&self, i: u32) -> &AtomicU32 {
        // SAFETY: `flags` is the entry's first field, an aligned u32 in the
        // mapping, which outlives the view (`new`).
        unsafe { &*(std::ptr::addr_of_mut!((*self.entry(i)).flags) as *const AtomicU32) }
    }

    /// The page entry `i` names: (memory slot, page offset in it).
    fn page(&self, i: u32) -> (u32, u64) {
        let e = self.entry(i);
        // SAFETY: fields of an entry in the mapping; KVM writes them before
        // it sets DIRTY, which the caller read with acquire ordering.
        unsafe {
            (
                std::ptr::read_volatile(std::ptr::addr_of!((*e).slot)),
                std::ptr::read_volatile(std::ptr::addr_of!((*e).offset)),
            )
        }
    }
}

/// What this process knows of one ring between harvests.
struct Track {
    /// Where KVM's `reset_index` is (modulo the size), as far as the resets
    /// seen here tell: scans start there, and a vCPU stuck on a full ring is
    /// looked for there first.
    reset_at: u32,
    /// The entries this process has marked RESET that KVM has not reset
    /// yet, one bit per entry.
    marked: Vec<u64>,
    /// The page (slot, offset) each marked entry named when it was last
    /// read (recorded, or marked clean), by place: what KVM's reset should
    /// write-protect again when it takes the entry ([`follow`]). 16 bytes an
    /// entry, as the ring itself.
    seen: Vec<(u32, u64)>,
    /// Resets that moved this ring (reset entries of it, or found one of its
    /// marked entries written over).
    moves: u64,
    /// `moves` when this ring's vCPU last went back to KVM_RUN after a full
    /// exit.
    moves_at_full: u64,
    /// Said that this ring's vCPU is stuck on a full ring.
    warned: bool,
    /// The entry KVM's reset was last found stuck before ([`settle`]),
    /// counted as an overflow once.
    stuck: Option<u32>,
}

impl Track {
    fn new(entries: u32) -> Self {
        Track {
            reset_at: 0,
            marked: vec![0; (entries as usize).div_ceil(64)],
            seen: vec![(0, 0); entries as usize],
            moves: 0,
            moves_at_full: 0,
            warned: false,
            stuck: None,
        }
    }

    fn is_marked(&self, i: u32) -> bool {
        self.marked[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set_marked(&mut self, i: u32, on: bool) {
        let w = &mut self.marked[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

/// Where each memory slot's pages lie in the bitmap of memfd pages: slot
/// `i` starts at page `first[i]` and has `pages[i]`.
struct Layout<'a> {
    first: &'a [u64],
    pages: &'a [u64],
}

impl Layout<'_> {
    /// Sets the bit of the page an entry names; false if it names no page
    /// of this VM.
    fn record(&self, bits: &mut [u64], (slot, offset): (u32, u64)) -> bool {
        // The slot id's low 16 bits are the slot (the high ones, the address
        // space: always 0 here).
        let slot = (slot & 0xffff) as usize;
        let pfn = match (self.first.get(slot), self.pages.get(slot)) {
            (Some(&first), Some(&pages)) if offset < pages => first + offset,
            _ => return false,
        };
        match bits.get_mut((pfn / 64) as usize) {
            Some(w) => {
                *w |= 1 << (pfn % 64);
                true
            }
            None => false,
        }
    }
}

/// What the harvests have gathered since the log was last read.
struct Gathered {
    /// One bit per page, indexed by memfd page.
    bits: Vec<u64>,
    /// A ring overflowed since the last read (what showed it first):
    /// entries may have been lost.
    overflowed: Option<&'static str>,
    /// One per ring.
    tracks: Vec<Track>,
}

impl Gathered {
    fn new(pages: u64, rings: &[u32]) -> Self {
        Gathered {
            bits: vec![0; pages.div_ceil(64) as usize],
            overflowed: None,
            tracks: rings.iter().map(|&n| Track::new(n)).collect(),
        }
    }

    /// The pages dirtied since the last read; with `clear`, starts over.
    /// After an overflow every page of the first `pages` counts as dirty,
    /// until read with `clear` or cleared page by page ([`Rings::clear`]) as
    /// it is sent: one full resend, not one per later read. (The caller has
    /// write-protected all of RAM again first.)
    fn read(&mut self, pages: u64, clear: bool) -> Vec<u64> {
        if self.overflowed.take().is_some() {
            for pfn in 0..pages {
                if let Some(w) = self.bits.get_mut((pfn / 64) as usize) {
                    *w |= 1 << (pfn % 64);
                }
            }
        }
        let out = self.bits.clone();
        if clear {
            self.bits.iter_mut().for_each(|w| *w = 0);
        }
        out
    }
}

/// What one harvest found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Harvest {
    /// Entries harvested for the first time.
    fresh: u64,
    /// A ring overflowed (what showed it): entries may have been lost.
    overflow: Option<&'static str>,
}

/// Records every entry of the rings in `g.bits` and hands them back to KVM
/// (`reset`: `KVM_RESET_DIRTY_RINGS`), which write-protects their pages
/// again; then puts KVM's reset back in step with the rings where an
/// overflow took it out (see [`settle`]).
///
/// Each ring is scanned whole, from where KVM's reset is believed to be,
/// not read on from a position of this process's own: KVM's indexes are not
/// visible here, and after an overflow they no longer match any count kept
/// here. Every entry with DIRTY is recorded, whether or not it has RESET
/// already: an entry that a reset did not reach (one published after the
/// scan passed its place stops the reset before it) is recorded again at
/// each harvest until it is reset, so its page is read again after the
/// reset that write-protects it. After each reset, a marked entry KVM wrote
/// over before the reset took it, or as it took it, counts an overflow
/// ([`follow`]).
fn harvest(
    views: &[View],
    layout: &Layout,
    g: &mut Gathered,
    reset: &mut dyn FnMut() -> Result<()>,
) -> Result<Harvest> {
    let mut out = Harvest::default();
    for (v, t) in views.iter().zip(&mut g.tracks) {
        let mut flagged = 0u32;
        for j in 0..v.entries {
            let i = v.at(t.reset_at.wrapping_add(j));
            let flags = v.flags(i);
            let f = flags.load(Ordering::Acquire);
            if f & F_DIRTY == 0 {
                continue;
            }
            flagged += 1;
            let page = v.page(i);
            if !layout.record(&mut g.bits, page) {
                out.overflow
                    .get_or_insert("an entry named no page of the VM");
            }
            let mut named = page;
            if f & F_RESET == 0 {
                flags.fetch_or(F_RESET, Ordering::AcqRel);
                // KVM writes an entry again only when it has gone round the
                // ring past entries not reset: if it did between the read
                // and the mark, the new page is the one marked.
                let again = v.page(i);
                if again != page {
                    out.overflow
                        .get_or_insert("KVM wrote an entry again as it was read");
                    layout.record(&mut g.bits, again);
                    named = again;
                }
                out.fresh += 1;
            }
            t.set_marked(i, true);
            t.seen[i as usize] = named;
        }
        // KVM stops a vCPU well before its ring is full (64 entries short,
        // more with PML): a full one may have had entries written over.
        if flagged == v.entries {
            out.overflow.get_or_insert("a ring was full");
        }
    }
    if g.tracks.iter().any(|t| t.marked.iter().any(|&w| w != 0)) {
        reset()?;
        if let Some(why) = settle(views, g, reset)? {
            out.overflow.get_or_insert(why);
        }
    }
    Ok(out)
}

/// After a reset: follows where KVM's reset went in each ring, and puts it
/// back in step where it is stuck. What shows that a ring overflowed, if
/// anything does.
///
/// An overflow takes KVM's reset out of step with the ring: KVM wrote its
/// newest entries over its oldest, a reset walked all of them (the newest
/// counted as the oldest), and KVM still counts the newest as not reset
/// while their places are clean. The next reset stops at the first of those
/// places for ever: what KVM writes after them is marked here and never
/// reset, and once KVM's count reaches its limit the vCPU stops on a full
/// ring at every KVM_RUN. What shows it, after a reset that went as far as
/// it could: an entry still marked RESET right after a clean place (in step,
/// a reset stops only at an entry without RESET, and every entry from there
/// on is set). Its clean places before it, from the second one after the
/// last set entry, are marked RESET for KVM's reset to pass, and a second
/// reset goes through them and the stuck entries; it stops at the first
/// clean place (where KVM writes next), which is left unmarked, so it never
/// passes KVM's own position. The marks it did not reach are taken back.
fn settle(
    views: &[View],
    g: &mut Gathered,
    reset: &mut dyn FnMut() -> Result<()>,
) -> Result<Option<&'static str>> {
    let followed = follow(views, g);
    let mut overflow = followed
        .whole
        .then_some("a reset went round a whole ring")
        .or(followed.lost);
    let mut ours: Vec<(usize, u32)> = Vec::new();
    for (k, (v, t)) in views.iter().zip(&mut g.tracks).enumerate() {
        let found = stuck_entry(v, t);
        // Counted once: marked, its entries are recorded at every harvest
        // until they are reset.
        if found.is_some() && found != std::mem::replace(&mut t.stuck, found) {
            overflow.get_or_insert("KVM's reset was stuck before entries it counted");
        }
        let Some(stuck) = found else {
            continue;
        };
        // The clean places before it, back to the last set entry.
        let mut first = stuck;
        for _ in 1..v.entries {
            let before = v.at(first.wrapping_sub(1));
            if v.flags(before).load(Ordering::Acquire) != 0 {
                break;
            }
            first = before;
        }
        let mut i = v.at(first.wrapping_add(1));
        while i != stuck {
            let flags = v.flags(i);
            if flags
                .compare_exchange(0, F_RESET, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                t.set_marked(i, true);
                t.seen[i as usize] = v.page(i);
                ours.push((k, i));
            }
            i = v.at(i + 1);
        }
    }
    if !ours.is_empty() {
        reset()?;
        if let Some(why) = follow(views, g).lost {
            overflow.get_or_insert(why);
        }
        unmark(views, g, &ours);
    }
    Ok(overflow)
}

/// Takes back marks this process set on clean places that no reset reached.
fn unmark(views: &[View], g: &mut Gathered, ours: &[(usize, u32)]) {
    for &(k, i) in ours {
        if views[k]
            .flags(i)
            .compare_exchange(F_RESET, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            g.tracks[k].set_marked(i, false);
        }
    }
}

/// An entry still marked RESET right after a clean place, in a ring whose
/// reset went as far as it could: KVM's reset is stuck before it.
fn stuck_entry(v: &View, t: &Track) -> Option<u32> {
    ones(&t.marked).find(|&i| {
        v.flags(v.at(i.wrapping_sub(1))).load(Ordering::Acquire) == 0
            && v.flags(i).load(Ordering::Acquire) & F_RESET != 0
    })
}

/// The set bits of a bitset, in order.
fn ones(bits: &[u64]) -> impl Iterator<Item = u32> + '_ {
    bits.iter().enumerate().flat_map(|(k, &w)| {
        let mut w = w;
        std::iter::from_fn(move || {
            if w == 0 {
                return None;
            }
            let b = w.trailing_zeros();
            w &= w - 1;
            Some(k as u32 * 64 + b)
        })
    })
}

/// What [`follow`] found after a reset.
#[derive(Debug, Default)]
struct Followed {
    /// The reset went through a whole ring (KVM held more entries than the
    /// ring has).
    whole: bool,
    /// The reset may have write-protected another page than the one an
    /// entry was harvested with, or none (what showed it): that page's
    /// later writes would go unlogged.
    lost: Option<&'static str>,
}

/// After a reset: drops the marks KVM took (the entries it reset, or wrote
/// over) and moves each ring's `reset_at` past the entries the reset went
/// through; finds what the reset may have write-protected in place of the
/// pages harvested ([`Followed`]).
///
/// KVM's reset write-protects the page an entry names as it takes it (and
/// clears the entry), and stops at an entry without RESET. A marked entry
/// that lost RESET was taken, and is clean or written again by KVM since; or
/// KVM wrote over it before the reset came to it (its DIRTY replaces our
/// RESET), the reset stopped there, and the page harvested from it is not
/// write-protected again: its later writes would go unlogged. Told apart:
/// - KVM writes over entries not reset from its reset index on, where the
///   reset starts too, which then takes nothing of that ring: marks lost
///   none of which is clean. (In step KVM writes again into places the
///   reset freed only by going round the ring, and into every one of them
///   only with a whole ring not reset: an overflow as well. A few of them
///   written again, beside clean ones, are no loss.)
/// - KVM writing an entry just as the reset reads it (the reset found RESET,
///   then read KVM's new page and write-protected that): a clean entry
///   naming another page than the one recorded. Where KVM's DIRTY lands after
///   the reset's clear, that looks like an entry written again after the
///   reset and is not told apart here (KVM writes into a full ring then,
///   found only if a scan sees it full).
fn follow(views: &[View], g: &mut Gathered) -> Followed {
    let mut out = Followed::default();
    for (v, t) in views.iter().zip(&mut g.tracks) {
        // The marked entries that lost RESET: the reset took them (or KVM
        // wrote over them).
        let mut gone = Vec::new();
        let mut taken = false;
        for i in ones(&t.marked) {
            let f = v.flags(i).load(Ordering::Acquire);
            if f & F_RESET != 0 {
                continue;
            }
            gone.push(i);
            if f == 0 {
                taken = true;
                if v.page(i) != t.seen[i as usize] {
                    out.lost
                        .get_or_insert("KVM wrote an entry again as the reset took it");
                }
            }
        }
        if gone.is_empty() {
            continue;
        }
        t.moves += 1;
        if !taken {
            // Written over: KVM's reset did not move in this ring.
            out.lost
                .get_or_insert("KVM wrote over an entry before the reset took it");
            for i in gone {
                t.set_marked(i, false);
            }
            continue;
        }
        // The reset went on from `reset_at` over entries marked then.
        let mut walked = 0;
        while walked < v.entries && t.is_marked(v.at(t.reset_at.wrapping_add(walked))) {
            let i = v.at(t.reset_at.wrapping_add(walked));
            if v.flags(i).load(Ordering::Acquire) & F_RESET != 0 {
                break;
            }
            walked += 1;
        }
        out.whole |= walked == v.entries;
        // Where `reset_at` was wrong (after an overflow), the reset stopped
        // after the last entry it took.
        let advance = if walked > 0 {
            walked
        } else {
            gone.iter()
                .map(|&i| v.at(i.wrapping_sub(t.reset_at)) + 1)
                .max()
                .unwrap_or(0)
        };
        t.reset_at = v.at(t.reset_at.wrapping_add(advance));
        for i in gone {
            t.set_marked(i, false);
        }
    }
    out
}

/// Ring `c`'s vCPU stopped on a full ring and nothing in that ring has moved
/// since it last ran, nor moves now that every entry in it is marked: KVM
/// counts at least its soft limit of entries not reset while the ring holds
/// none it can reset (an overflow's reset took its places). Moves KVM's
/// reset one place on, by marking the one clean place it is stuck at:
/// tried where `reset_at` says first, then at every other clean place, each
/// mark taken back if the reset did not take it. One place is always safe
/// here (KVM counts at least one entry more than it can reset), and the
/// vCPU, back in KVM_RUN, either runs or stops again for one more. The ring
/// does not change meanwhile: its vCPU is the caller. Whether it moved, and
/// what its resets may have lost elsewhere ([`Followed::lost`]).
fn unstick(
    views: &[View],
    g: &mut Gathered,
    c: usize,
    reset: &mut dyn FnMut() -> Result<()>,
) -> Result<(bool, Option<&'static str>)> {
    let v = views[c];
    let start = g.tracks[c].reset_at;
    let mut lost = None;
    for j in 0..v.entries {
        let i = v.at(start.wrapping_add(j));
        let flags = v.flags(i);
        if flags
            .compare_exchange(0, F_RESET, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue;
        }
        g.tracks[c].set_marked(i, true);
        g.tracks[c].seen[i as usize] = v.page(i);
        reset()?;
        let taken = flags.load(Ordering::Acquire) & F_RESET == 0;
        if taken {
            g.tracks[c].reset_at = i;
        }
        if let Some(why) = follow(views, g).lost {
            lost.get_or_insert(why);
        }
        if taken {
            return Ok((true, lost));
        }
        unmark(views, g, &[(c, i)]);
    }
    Ok((false, lost))
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    view: View,
}

// SAFETY: the mapping is shared memory that lives as long as the Ring; every
// access goes through `Rings`, under its mutex.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `Rings::map` mapped.
        unsafe {
            libc::munmap(
                self.view.base.cast(),
                self.view.entries as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            )
        };
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
                // SAFETY: the mapping holds `entries` entries and lives as
                // long as the Ring.
                view: unsafe { View::new(base.cast(), entries) },
            });
        }
        let pages = ram.size() / PAGE_SIZE;
        Ok(Rings {
            gathered: Mutex::new(Gathered::new(pages, &vec![entries; rings.len()])),
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

    /// vCPU `c` (the index of its ring: the vCPUs' order in [`Rings::map`])
    /// stopped with its ring full: harvests, so that it may go on. Called on
    /// that vCPU's own thread.
    pub(crate) fn on_full_exit(&self, c: usize) -> Result<()> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let mut g = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
        self.harvest(&mut g)?;
        if c >= self.rings.len() {
            return Ok(());
        }
        if g.tracks[c].moves == g.tracks[c].moves_at_full {
            let views = self.views();
            let (moved, lost) = unstick(&views, &mut g, c, &mut || self.reset())?;
            let why = if moved {
                Some("a vCPU stopped on a full ring that held no entry")
            } else {
                lost
            };
            if let Some(why) = why {
                g.overflowed.get_or_insert(why);
                self.overflows.fetch_add(1, Ordering::Relaxed);
            }
            if !moved && !std::mem::replace(&mut g.tracks[c].warned, true) {
                tracing::warn!(
                    vcpu = c,
                    "dirty ring full, and no entry of it could be reset"
                );
            }
        }
        g.tracks[c].moves_at_full = g.tracks[c].moves;
        Ok(())
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

    /// The pages dirtied since the last call, one bit per memfd page; with
    /// `clear`, starts over. After an overflow, every page: `rearm` (which
    /// turns dirty logging off and on again, write-protecting all of RAM)
    /// runs first, so that a page whose entry was lost, left writable with
    /// no entry to write-protect it again, is logged on its next write.
    pub(crate) fn read(&self, clear: bool, rearm: impl FnOnce() -> Result<()>) -> Result<Vec<u64>> {
        let mut g = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
        self.harvest(&mut g)?;
        if let Some(why) = g.overflowed {
            rearm()?;
            tracing::warn!(
                "a dirty ring overflowed ({why}): every page counts as dirty, and all of RAM \
                 is write-protected again"
            );
        }
        let pages = self
            .slot_first
            .iter()
            .zip(&self.slot_pages)
            .map(|(f, n)| f + n)
            .max()
            .unwrap_or(0);
        Ok(g.read(pages, clear))
    }

    fn views(&self) -> Vec<View> {
        self.rings.iter().map(|r| r.view).collect()
    }

    /// [`harvest`] of every ring, counted.
    fn harvest(&self, g: &mut Gathered) -> Result<()> {
        let views = self.views();
        let layout = Layout {
            first: &self.slot_first,
            pages: &self.slot_pages,
        };
        let h = harvest(&views, &layout, g, &mut || self.reset())?;
        self.harvested.fetch_add(h.fresh, Ordering::Relaxed);
        if let Some(why) = h.overflow {
            g.overflowed.get_or_insert(why);
            self.overflows.fetch_add(1, Ordering::Relaxed);
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
            entries: self.rings.first().map_or(0, |r| r.view.entries),
            harvested: self.harvested.load(Ordering::Relaxed),
            full_exits: self.full_exits.load(Ordering::Relaxed),
            overflows: self.overflows.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// One vCPU's ring and KVM's side of it, as `virt/kvm/dirty_ring.c`
    /// has it: `push` writes at the dirty index whatever is there (as the
    /// host that overflows does), `reset` walks from the reset index over
    /// entries with RESET.
    struct Model {
        view: View,
        reset_index: Cell<u32>,
        dirty_index: Cell<u32>,
        /// KVM's soft limit: the vCPU runs while fewer are not reset.
        soft: u32,
        /// The pages (offsets) `reset` write-protected again, in order.
        protected: RefCell<Vec<u64>>,
        /// A page KVM pushes as the next `reset` reads its first entry:
        /// after the reset found RESET there, before it reads the page.
        race: Cell<Option<u64>>,
    }

    impl Model {
        fn new(entries: u32) -> Self {
            let mem = vec![
                kvm_dirty_gfn {
                    flags: 0,
                    slot: 0,
                    offset: 0
                };
                entries as usize
            ];
            let base = Box::into_raw(mem.into_boxed_slice()).cast::<kvm_dirty_gfn>();
            Model {
                // SAFETY: `base` holds `entries` entries until the drop.
                view: unsafe { View::new(base, entries) },
                reset_index: Cell::new(0),
                dirty_index: Cell::new(0),
                soft: entries - entries / 4,
                protected: RefCell::new(Vec::new()),
                race: Cell::new(None),
            }
        }

        fn push(&self, offset: u64) {
            let d = self.dirty_index.get();
            let e = self.view.entry(d);
            // SAFETY: an entry of the model's ring.
            unsafe {
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*e).slot), 0);
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*e).offset), offset);
            }
            self.view.flags(d).store(F_DIRTY, Ordering::Release);
            self.dirty_index.set(d + 1);
        }

        fn reset(&self) {
            loop {
                let r = self.reset_index.get();
                let flags = self.view.flags(r);
                if flags.load(Ordering::Acquire) & F_RESET == 0 {
                    return;
                }
                if let Some(p) = self.race.take() {
                    self.push(p);
                }
                self.protected.borrow_mut().push(self.view.page(r).1);
                flags.store(0, Ordering::Release);
                self.reset_index.set(r + 1);
            }
        }

        fn used(&self) -> u32 {
            self.dirty_index.get() - self.reset_index.get()
        }

        /// The guest writes pages `from..` until KVM would stop it (or
        /// `to`); the next page to write.
        fn run(&self, from: u64, to: u64) -> u64 {
            let mut p = from;
            while p < to && self.used() < self.soft {
                self.push(p);
                p += 1;
            }
            p
        }
    }

    impl Drop for Model {
        fn drop(&mut self) {
            // SAFETY: what `new` leaked.
            drop(unsafe {
                Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.view.base,
                    self.view.entries as usize,
                ))
            });
        }
    }

    /// One slot of 4096 pages.
    const FIRST: [u64; 1] = [0];
    const PAGES: [u64; 1] = [4096];

    fn layout() -> Layout<'static> {
        Layout {
            first: &FIRST,
            pages: &PAGES,
        }
    }

    fn gathered(models: &[Model]) -> Gathered {
        let sizes: Vec<u32> = models.iter().map(|m| m.view.entries).collect();
        Gathered::new(4096, &sizes)
    }

    fn run_harvest(models: &[Model], g: &mut Gathered) -> Harvest {
        let views: Vec<View> = models.iter().map(|m| m.view).collect();
        harvest(&views, &layout(), g, &mut || {
            models.iter().for_each(Model::reset);
            Ok(())
        })
        .unwrap()
    }

    /// What `Rings::on_full_exit` does for a vCPU (ring `c`) that stopped
    /// on a full ring.
    fn full_exit(models: &[Model], g: &mut Gathered, c: usize) -> Harvest {
        let mut h = run_harvest(models, g);
        if g.tracks[c].moves == g.tracks[c].moves_at_full {
            let views: Vec<View> = models.iter().map(|m| m.view).collect();
            let (moved, lost) = unstick(&views, g, c, &mut || {
                models.iter().for_each(Model::reset);
                Ok(())
            })
            .unwrap();
            if moved {
                h.overflow.get_or_insert("unstuck");
            }
            if let Some(why) = lost {
                h.overflow.get_or_insert(why);
            }
        }
        g.tracks[c].moves_at_full = g.tracks[c].moves;
        h
    }

    fn pages(g: &Gathered) -> Vec<u64> {
        (0..4096)
            .filter(|&p| g.bits[p as usize / 64] & (1 << (p % 64)) != 0)
            .collect()
    }

    #[test]
    fn a_harvest_records_every_entry_and_hands_it_back() {
        let m = [Model::new(16)];
        let mut g = gathered(&m);
        for p in [5, 70, 6] {
            m[0].push(p);
        }
        let h = run_harvest(&m, &mut g);
        assert_eq!(
            h,
            Harvest {
                fresh: 3,
                overflow: None
            }
        );
        assert_eq!(pages(&g), [5, 6, 70]);
        assert_eq!(m[0].used(), 0, "every entry handed back");
        assert_eq!(g.tracks[0].reset_at, 3);
        // Nothing new: nothing read; the ring wraps round as KVM goes on.
        assert_eq!(run_harvest(&m, &mut g), Harvest::default());
        for round in 0..5 {
            let from = 100 + round * 10;
            for p in from..from + 10 {
                m[0].push(p);
            }
            let h = run_harvest(&m, &mut g);
            assert_eq!(
                h,
                Harvest {
                    fresh: 10,
                    overflow: None
                }
            );
            assert_eq!(m[0].used(), 0);
        }
        assert_eq!(pages(&g).len(), 53);
    }

    #[test]
    fn an_entry_the_reset_does_not_reach_is_recorded_until_it_is() {
        let m = [Model::new(16)];
        let mut g = gathered(&m);
        for p in [1, 2, 3] {
            m[0].push(p);
        }
        // A scan that passed entry 0 before KVM published it, and 1 and 2
        // after: 1 and 2 recorded and marked, not 0. The reset stops at 0,
        // and that is no overflow.
        for i in [1, 2] {
            m[0].view.flags(i).fetch_or(F_RESET, Ordering::AcqRel);
            g.tracks[0].set_marked(i, true);
            g.bits[0] |= 1 << (i + 1);
        }
        m[0].reset();
        let settled = settle(&[m[0].view], &mut g, &mut || {
            m[0].reset();
            Ok(())
        });
        assert_eq!(settled.unwrap(), None);
        assert_eq!(m[0].used(), 3, "the reset stops at entry 0");
        // Read and sent: the next harvest must record 2 and 3 again, since
        // their pages were written (and may be again) before the reset that
        // write-protects them.
        g.bits.iter_mut().for_each(|w| *w = 0);
        let h = run_harvest(&m, &mut g);
        assert_eq!(
            h,
            Harvest {
                fresh: 1,
                overflow: None
            }
        );
        assert_eq!(pages(&g), [1, 2, 3]);
        assert_eq!(m[0].used(), 0);
        // A reset that does not come (KVM busy): recorded at every harvest.
        m[0].push(9);
        let views = [m[0].view];
        for _ in 0..3 {
            g.bits.iter_mut().for_each(|w| *w = 0);
            harvest(&views, &layout(), &mut g, &mut || Ok(())).unwrap();
            assert_eq!(pages(&g), [9]);
        }
        run_harvest(&m, &mut g);
        assert_eq!(m[0].used(), 0);
    }

    #[test]
    fn a_full_ring_counts_as_an_overflow_and_stays_in_step() {
        let m = [Model::new(16)];
        let mut g = gathered(&m);
        for p in 0..16 {
            m[0].push(p);
        }
        let h = run_harvest(&m, &mut g);
        assert_eq!(
            h,
            Harvest {
                fresh: 16,
                overflow: Some("a ring was full")
            }
        );
        assert_eq!(m[0].used(), 0);
        let next = m[0].run(16, 40);
        run_harvest(&m, &mut g);
        assert_eq!(pages(&g), (0..next).collect::<Vec<_>>());
        assert_eq!(m[0].used(), 0);
    }

    #[test]
    fn an_overflow_is_found_and_kvm_put_back_in_step() {
        // Two vCPUs, the first of which overflows its ring by 5 entries
        // (the host that does not stop it in time).
        let m = [Model::new(16), Model::new(16)];
        let mut g = gathered(&m);
        for p in 0..21 {
            m[0].push(p);
        }
        m[1].push(1000);
        let h = run_harvest(&m, &mut g);
        assert!(h.overflow.is_some(), "{h:?}");
        // The reset took the 16 places: KVM counts 5 more it will never
        // find set. The guest writes on, behind them.
        assert_eq!(m[0].used(), 5);
        let mut next = 21;
        for round in 0..40 {
            g.bits.iter_mut().for_each(|w| *w = 0);
            let from = next;
            next = m[0].run(next, 400);
            m[1].push(2000 + round);
            let h = run_harvest(&m, &mut g);
            // Every page written since is in the log.
            let got = pages(&g);
            assert!(
                (from..next).all(|p| got.contains(&p)),
                "round {round}: {from}..{next} not all in {got:?}"
            );
            assert!(got.contains(&(2000 + round)));
            assert_eq!(h.overflow.is_some(), round == 0, "round {round}: {h:?}");
            assert_eq!((m[0].used(), m[1].used()), (0, 0), "round {round}");
        }
        assert_eq!(next, 400, "the guest went on");
    }

    #[test]
    fn a_vcpu_stopped_by_entries_kvm_lost_count_of_goes_on() {
        for over in [12, 13, 16, 40] {
            let m = [Model::new(16)];
            let mut g = gathered(&m);
            for p in 0..16 + over {
                m[0].push(p);
            }
            assert!(run_harvest(&m, &mut g).overflow.is_some());
            // KVM counts entries the ring does not hold, at least its soft
            // limit (12): the vCPU stops at once, again and again.
            let mut next = 16 + over;
            let mut exits = 0;
            let mut overflow = false;
            while next < 300 {
                exits += 1;
                assert!(exits < 100, "over {over}: stuck, {} entries", m[0].used());
                overflow |= full_exit(&m, &mut g, 0).overflow.is_some();
                next = m[0].run(next, 300);
            }
            assert!(overflow, "over {over}");
            g.bits.iter_mut().for_each(|w| *w = 0);
            let from = next - 10;
            for p in from..next {
                m[0].push(p);
            }
            run_harvest(&m, &mut g);
            assert_eq!(pages(&g), (from..next).collect::<Vec<_>>(), "over {over}");
        }
    }

    #[test]
    fn a_ring_whose_only_clean_place_kvm_counts_goes_on() {
        // Overflowed by 3, then 13 entries behind: KVM counts 16, the ring
        // holds 13, and the one clean place before them is where KVM would
        // write next as well as where its reset is: the settle cannot tell
        // and leaves it; the vCPU's full exit moves it.
        let m = [Model::new(16)];
        let mut g = gathered(&m);
        for p in 0..19 {
            m[0].push(p);
        }
        assert!(run_harvest(&m, &mut g).overflow.is_some());
        for p in 19..32 {
            m[0].push(p);
        }
        assert_eq!(m[0].used(), 16);
        let mut next = 32;
        let mut exits = 0;
        while next < 200 {
            exits += 1;
            assert!(exits < 50, "stuck, {} entries", m[0].used());
            full_exit(&m, &mut g, 0);
            next = m[0].run(next, 200);
        }
        run_harvest(&m, &mut g);
        assert_eq!(pages(&g), (0..200).skip(3).collect::<Vec<_>>());
        assert_eq!(m[0].used(), 0);
    }

    /// A harvest whose reset lets KVM (`kvm`) write first, once.
    fn harvest_racing(m: &Model, g: &mut Gathered, kvm: impl FnOnce(&Model)) -> Harvest {
        let mut kvm = Some(kvm);
        harvest(&[m.view], &layout(), g, &mut || {
            if let Some(kvm) = kvm.take() {
                kvm(m);
            }
            m.reset();
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn an_entry_kvm_writes_over_before_the_reset_takes_it_counts_as_an_overflow() {
        // The host that does not stop a vCPU in time: the scan finds 15
        // entries and one clean place (no full ring) and marks the 15; then,
        // before KVM_RESET_DIRTY_RINGS, KVM writes that place and goes on over
        // the entry at its reset index (page 0, recorded, becomes page 100).
        // The reset stops there: page 0 is not write-protected again, and its
        // later writes would go unlogged unless this counts an overflow.
        let m = Model::new(16);
        let mut g = Gathered::new(4096, &[16]);
        for p in 0..15 {
            m.push(p);
        }
        let h = harvest_racing(&m, &mut g, |m| {
            m.push(15);
            m.push(100);
        });
        assert!(m.protected.borrow().is_empty(), "the reset took nothing");
        assert_eq!(
            h,
            Harvest {
                fresh: 15,
                overflow: Some("KVM wrote over an entry before the reset took it")
            }
        );
        // KVM's reset did not move: the ring is read on from there, and the
        // guest goes on with every page it writes in the log.
        assert_eq!(g.tracks[0].reset_at, 0);
        g.bits.iter_mut().for_each(|w| *w = 0);
        let mut next = 200;
        let mut exits = 0;
        while next < 400 {
            exits += 1;
            assert!(exits < 100, "stuck, {} entries", m.used());
            full_exit(std::slice::from_ref(&m), &mut g, 0);
            next = m.run(next, 400);
        }
        run_harvest(std::slice::from_ref(&m), &mut g);
        let got = pages(&g);
        assert!((200..400).all(|p| got.contains(&p)), "{got:?}");
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn an_entry_kvm_writes_as_the_reset_takes_it_counts_as_an_overflow() {
        // As above, but KVM writes the entry at its reset index just as the
        // reset reads it: the reset found RESET there, then read KVM's new
        // page 100, and write-protected that one in place of page 0.
        let m = Model::new(16);
        let mut g = Gathered::new(4096, &[16]);
        for p in 0..15 {
            m.push(p);
        }
        let h = harvest_racing(&m, &mut g, |m| {
            m.push(15);
            m.race.set(Some(100));
        });
        assert_eq!(m.protected.borrow()[0], 100);
        assert!(!m.protected.borrow().contains(&0));
        assert_eq!(
            h,
            Harvest {
                fresh: 15,
                overflow: Some("KVM wrote an entry again as the reset took it")
            }
        );
    }

    #[test]
    fn an_entry_kvm_writes_again_after_the_reset_took_it_is_no_overflow() {
        // In step: the reset takes 10 entries, and KVM, running on, goes
        // round the ring into the first two places it freed (8 entries not
        // reset, under its soft limit of 12) before the harvest reads them
        // after the reset. They name new pages, and nothing was lost: no
        // overflow (and no full resend) for that.
        let m = Model::new(16);
        let mut g = Gathered::new(4096, &[16]);
        for p in 0..10 {
            m.push(p);
        }
        let h = harvest(&[m.view], &layout(), &mut g, &mut || {
            m.reset();
            if m.dirty_index.get() == 10 {
                for p in 100..108 {
                    m.push(p);
                }
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(
            h,
            Harvest {
                fresh: 10,
                overflow: None
            }
        );
        assert_eq!(*m.protected.borrow(), (0..10).collect::<Vec<_>>());
        g.bits.iter_mut().for_each(|w| *w = 0);
        let h = run_harvest(std::slice::from_ref(&m), &mut g);
        assert_eq!(
            h,
            Harvest {
                fresh: 8,
                overflow: None
            }
        );
        assert_eq!(pages(&g), (100..108).collect::<Vec<_>>());
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn an_entry_naming_no_page_counts_as_loss() {
        let m = [Model::new(16)];
        let mut g = gathered(&m);
        m[0].push(4096); // past the slot's pages
        let h = run_harvest(&m, &mut g);
        assert_eq!(h.overflow, Some("an entry named no page of the VM"));
        assert!(pages(&g).is_empty());
        assert_eq!(m[0].used(), 0);
    }

    #[test]
    fn an_overflow_makes_every_page_dirty_once() {
        let mut g = Gathered::new(128, &[]);
        g.bits[0] = 0b100;
        assert_eq!(g.read(100, false), vec![0b100, 0]);
        g.overflowed = Some("test");
        let all = vec![u64::MAX, (1 << 36) - 1];
        assert_eq!(g.read(100, false), all, "every page after an overflow");
        // Sent page by page (the rounds' clear-before-send): each cleared
        // page stays clean, and later reads report only what is left.
        g.bits[0] = 0;
        assert_eq!(g.read(100, false), vec![0, (1 << 36) - 1]);
        assert_eq!(g.read(100, true), vec![0, (1 << 36) - 1]);
        assert_eq!(g.read(100, false), vec![0, 0]);
        g.overflowed = Some("test");
        assert_eq!(g.read(100, true), all);
        assert_eq!(g.read(100, true), vec![0, 0]);
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
