//! Checks of what the guest writes during the boot and never again: its
//! code and read-only data, the AP trampoline's copy, the page tables, the
//! IDT, the GDT and the TSSs (all in ring 3: every one of them is mapped
//! user-readable, so no CPL-0 service is needed).
//!
//! The boot CPU takes a snapshot when it prints READY (every CPU has then
//! loaded its TR, so the GDT's last boot-time write, the TSS busy bit, is
//! done). Then it checks one unit per loop iteration, round robin:
//!
//! - `image`: each page of `.note.xen`/`.text`/`.rodata`, and the
//!   trampoline at 0x8000, against a 64-bit hash;
//! - `pagetables`: each page of the PML4, the PDPT and the 64 page
//!   directories against a hash taken with the accessed and dirty bits
//!   (which the CPU sets) masked;
//! - `idt`, `gdt`, `tss`: compared with copies, gate by gate, descriptor
//!   by descriptor and word by word (the GDT's accessed bits and the TSS
//!   descriptors' busy bit masked), and restored after a report.
//!
//! A hash step `h = (rotl(h, 23) ^ w) * K` (K odd) is a bijection of `w`
//! for a given `h` and of `h` for a given `w`; a page is hashed in four
//! such lanes (words `i`, `i + 4`, ...) XORed together at the end, so one
//! changed word always changes the page's hash. Unchanged memory always
//! hashes the same, so a report is never false. After a hash report the new hash is expected (one
//! loss, one line).

use crate::boot::{self, GDT_TSS_SEL, MAX_CPUS, MAX_RAM_GIB, TRAMPOLINE_ADDR};
use crate::{clock, corrupt};
use core::fmt;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

const PAGE: u64 = 4096;
const PAGE_WORDS: usize = 512;
/// Bits the CPU sets in page-table entries: accessed (5) and dirty (6).
const PTE_AD: u64 = 0x60;
/// GDT accessed bit (code and data descriptors; set on a segment load).
const DESC_ACCESSED: u64 = 1 << 40;
/// TSS descriptor busy bit (set by `ltr`).
const DESC_BUSY: u64 = 1 << 41;
/// Page-table pages: PML4, PDPT, one page directory per GiB.
const PT_PAGES: usize = 2 + MAX_RAM_GIB;
/// Words of the GDT: 6 descriptors, then a 16-byte TSS descriptor per CPU.
const GDT_WORDS: usize = GDT_TSS_SEL / 8 + 2 * MAX_CPUS;
/// Words of the TSSs (256-byte slots).
const TSS_WORDS: usize = MAX_CPUS * 256 / 8;
/// Words of the IDT.
const IDT_WORDS: usize = boot::IDT_BYTES / 8;
/// Most hashed units: the read-only pages, the trampoline, the page tables.
const MAX_HASHED: usize = 256;
/// At most one unit is checked per this many microseconds (a whole sweep,
/// about 85 units, takes a few milliseconds).
const STEP_US: u64 = 50;

static HASHES: [AtomicU64; MAX_HASHED] = [const { AtomicU64::new(0) }; MAX_HASHED];
static IDT_COPY: [AtomicU64; IDT_WORDS] = [const { AtomicU64::new(0) }; IDT_WORDS];
static GDT_COPY: [AtomicU64; GDT_WORDS] = [const { AtomicU64::new(0) }; GDT_WORDS];
static TSS_COPY: [AtomicU64; TSS_WORDS] = [const { AtomicU64::new(0) }; TSS_WORDS];

fn hash(addr: u64, words: usize, mask: u64) -> u64 {
    let p = addr as *const u64;
    // SAFETY: `addr..addr + 8 * words` is guest memory this module checks
    // (image, trampoline, page tables), identity-mapped.
    let w = |i: usize| unsafe { read_volatile(p.add(i)) } & mask;
    let step = |h: u64, w: u64| (h.rotate_left(23) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // Four independent lanes (words i, i+4, ...), so the multiplications
    // overlap; a lane is still a bijection of each of its words.
    let seed = addr ^ 0x696d_6167_6521_0000;
    let mut h = [seed, seed ^ 1, seed ^ 2, seed ^ 3];
    let mut i = 0;
    while i + 4 <= words {
        h[0] = step(h[0], w(i));
        h[1] = step(h[1], w(i + 1));
        h[2] = step(h[2], w(i + 2));
        h[3] = step(h[3], w(i + 3));
        i += 4;
    }
    while i < words {
        h[0] = step(h[0], w(i));
        i += 1;
    }
    h[0] ^ h[1].rotate_left(16) ^ h[2].rotate_left(32) ^ h[3].rotate_left(48)
}

fn word(addr: u64, i: usize) -> u64 {
    // SAFETY: callers pass the IDT, GDT or TSS base and an index inside it.
    unsafe { read_volatile((addr as *const u64).add(i)) }
}

fn set_word(addr: u64, i: usize, v: u64) {
    // SAFETY: as for `word`; these tables are mapped writable from ring 3,
    // and only a word that differs from its snapshot is written back.
    unsafe { write_volatile((addr as *mut u64).add(i), v) }
}

/// Bits of GDT word `k` that nothing may change after the boot.
fn gdt_mask(k: usize) -> u64 {
    let first_tss = GDT_TSS_SEL / 8;
    if k < first_tss {
        !DESC_ACCESSED
    } else if (k - first_tss).is_multiple_of(2) {
        !DESC_BUSY
    } else {
        !0
    }
}

/// Page `k` of the page tables, by name.
struct Table(usize);

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            0 => f.write_str("pml4"),
            1 => f.write_str("pdpt"),
            k => write!(f, "pd{}", k - 2),
        }
    }
}

/// One thing checked per step.
enum Unit {
    /// A hashed range: (index in HASHES, address, words, mask, page-table page).
    Hashed(usize, u64, usize, u64, Option<usize>),
    Idt,
    Gdt,
}

/// The boot CPU's integrity checker.
pub struct Integrity {
    readonly_pages: usize,
    tramp_words: usize,
    next: usize,
    /// TSC of the next step.
    due: u64,
}

impl Integrity {
    /// Takes the snapshot (boot CPU, once every CPU runs its workload).
    pub fn snapshot() -> Integrity {
        let (_, ro_bytes) = boot::readonly_range();
        let readonly_pages = (ro_bytes / PAGE) as usize;
        assert!(
            readonly_pages + 1 + PT_PAGES <= MAX_HASHED,
            "image too large for the integrity check"
        );
        let tramp_words = boot::trampoline().len().div_ceil(8);
        let chk = Integrity {
            readonly_pages,
            tramp_words,
            next: 0,
            due: 0,
        };
        for k in 0..chk.units() {
            if let Unit::Hashed(i, addr, words, mask, _) = chk.unit(k) {
                HASHES[i].store(hash(addr, words, mask), Ordering::Relaxed);
            }
        }
        let copy = |to: &[AtomicU64], base: u64| {
            for (i, c) in to.iter().enumerate() {
                c.store(word(base, i), Ordering::Relaxed);
            }
        };
        copy(&IDT_COPY, boot::idt_addr());
        copy(&GDT_COPY, boot::gdt_range().0);
        copy(&TSS_COPY, boot::tss_range().0);
        chk
    }

    fn units(&self) -> usize {
        self.readonly_pages + 1 + PT_PAGES + 2
    }

    fn unit(&self, k: usize) -> Unit {
        let ro = self.readonly_pages;
        if k < ro {
            let addr = boot::readonly_range().0 + k as u64 * PAGE;
            Unit::Hashed(k, addr, PAGE_WORDS, !0, None)
        } else if k == ro {
            Unit::Hashed(k, TRAMPOLINE_ADDR as u64, self.tramp_words, !0, None)
        } else if k <= ro + PT_PAGES {
            let t = k - ro - 1;
            let addr = boot::page_tables_range().0 + t as u64 * PAGE;
            Unit::Hashed(k, addr, PAGE_WORDS, !PTE_AD, Some(t))
        } else if k == ro + PT_PAGES + 1 {
            Unit::Idt
        } else {
            Unit::Gdt
        }
    }

    /// Checks the next unit (one page's worth of memory at most), unless
    /// the last one was less than [`STEP_US`] ago (`now`: the TSC).
    pub fn step(&mut self, now: u64) {
        // Waits only while the next step is at most one period ahead (a
        // clock that went back never stops the check).
        let period = clock::ms(STEP_US) / 1000;
        if (1..=period).contains(&self.due.wrapping_sub(now)) {
            return;
        }
        self.due = now + period;
        let k = self.next;
        self.next = (k + 1) % self.units();
        match self.unit(k) {
            Unit::Hashed(i, addr, words, mask, table) => {
                let want = HASHES[i].load(Ordering::Relaxed);
                let found = hash(addr, words, mask);
                if found == want {
                    return;
                }
                match table {
                    Some(t) => corrupt!(
                        "pagetables table={} addr={addr:#x} found={found:#018x} want={want:#018x}",
                        Table(t)
                    ),
                    None => corrupt!(
                        "image addr={addr:#x} bytes={} found={found:#018x} want={want:#018x}",
                        words * 8
                    ),
                }
                HASHES[i].store(found, Ordering::Relaxed);
            }
            Unit::Idt => check_idt(),
            Unit::Gdt => {
                check_gdt();
                check_tss();
            }
        }
    }
}

/// The first of `n` entries that `differs`, and how many do, in one pass.
fn differing(n: usize, differs: impl Fn(usize) -> bool) -> Option<(usize, usize)> {
    let (mut first, mut count) = (None, 0);
    for i in (0..n).filter(|&i| differs(i)) {
        first.get_or_insert(i);
        count += 1;
    }
    first.map(|f| (f, count))
}

/// Writes back from `copy` the words of the table at `base` that `differs`.
fn restore(base: u64, copy: &[AtomicU64], differs: impl Fn(usize) -> bool) {
    for (i, c) in copy.iter().enumerate() {
        if differs(i) {
            set_word(base, i, c.load(Ordering::Relaxed));
        }
    }
}

fn check_idt() {
    let base = boot::idt_addr();
    let gate = |v: usize| (word(base, 2 * v), word(base, 2 * v + 1));
    let copy = |v: usize| {
        (
            IDT_COPY[2 * v].load(Ordering::Relaxed),
            IDT_COPY[2 * v + 1].load(Ordering::Relaxed),
        )
    };
    let Some((v, bad)) = differing(IDT_WORDS / 2, |v| gate(v) != copy(v)) else {
        return;
    };
    let ((lo, hi), (wlo, whi)) = (gate(v), copy(v));
    corrupt!(
        "idt vector={v} found=0x{hi:016x}{lo:016x} want=0x{whi:016x}{wlo:016x} bad_gates={bad}"
    );
    restore(base, &IDT_COPY, |i| {
        word(base, i) != IDT_COPY[i].load(Ordering::Relaxed)
    });
}

fn check_gdt() {
    let base = boot::gdt_range().0;
    let differs =
        |k: usize| (word(base, k) ^ GDT_COPY[k].load(Ordering::Relaxed)) & gdt_mask(k) != 0;
    let Some((k, bad)) = differing(GDT_WORDS, differs) else {
        return;
    };
    corrupt!(
        "gdt entry={k} found={:#018x} want={:#018x} mask={:#018x} bad_entries={bad}",
        word(base, k),
        GDT_COPY[k].load(Ordering::Relaxed),
        gdt_mask(k)
    );
    restore(base, &GDT_COPY, differs);
}

fn check_tss() {
    let base = boot::tss_range().0;
    let differs = |i: usize| word(base, i) != TSS_COPY[i].load(Ordering::Relaxed);
    let Some((i, bad)) = differing(TSS_WORDS, differs) else {
        return;
    };
    corrupt!(
        "tss cpu={} offset={:#x} found={:#018x} want={:#018x} bad_words={bad}",
        i / 32,
        (i % 32) * 8,
        word(base, i),
        TSS_COPY[i].load(Ordering::Relaxed)
    );
    restore(base, &TSS_COPY, differs);
}

/// Self-test helpers that break what this module checks.
pub mod sabotage {
    use super::*;

    fn flip(addr: u64, bits: u64) {
        // SAFETY: a word of the image or of a CPU table that nothing reads
        // again after the boot (see the callers), identity-mapped writable.
        unsafe { write_volatile(addr as *mut u64, read_volatile(addr as *const u64) ^ bits) };
    }

    /// Flips byte 0 of `.note.xen` (the first byte of the image: its
    /// namesz, which only the VMM's loader reads, from the ELF file).
    pub fn image() {
        flip(boot::readonly_range().0, 0xff);
    }

    /// Sets bit 9 (ignored by the CPU) of the page-directory entry that
    /// maps the first 2 MiB.
    pub fn page_tables() {
        flip(boot::page_tables_range().0 + 2 * PAGE, 1 << 9);
    }

    /// Flips bit 0 of vector 254's handler address (a vector nothing raises).
    pub fn idt() {
        flip(boot::idt_addr() + 254 * 16, 1);
    }

    /// Flips bit 0 of the limit of GDT entry 1 (selector 0x08, the 32-bit
    /// code segment only the boot path uses), and bits 32..40 of `cpu`'s
    /// TSS IST7 (no gate uses an IST), its word at offset 0x58.
    pub fn gdt(cpu: usize) {
        flip(boot::gdt_range().0 + 8, 1);
        flip(boot::tss_range().0 + cpu as u64 * 256 + 0x58, 0xff);
    }
}
