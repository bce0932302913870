//! The working set: each CPU owns a contiguous slice of pages, writes them
//! with a known pattern and verifies them exactly, forever.
//!
//! Page `i` (global index) with generation `g` holds, as 8-byte words:
//! word 0 = `i << 32 | g`; word `w` (1..512) = `seed(i, b) + w * STEP` where
//! `b = g` for dirty pages and `b = 0` for sparse pages (whose rewrites only
//! change word 0). The generation of every page is kept in a table in guest
//! memory (one u32 per page); a page is only checked against the table by the
//! CPU that writes it, so the check is exact. The writer verifies each page
//! before rewriting it, so a rewrite never hides a corrupted page.
//!
//! With `pattern=compressible`, word `w` (1..512) is instead one of four
//! values `seed(i, b) + k * STEP` (k in 1..=4), k chosen by an LCG seeded
//! from the same seed: still exact, but zstd shrinks a page several times.
//! With `hot=<pct>`, every other rewrite goes to the first `pct` % of each
//! CPU's slice (a hot region rewritten over and over) and the others sweep
//! the rest slowly.

use crate::boot::{KCPU, MAX_CPUS};
use crate::bootinfo::{Mode, SelfTest};
use crate::checks::{self, Checker};
use crate::clock;
use crate::cpu;
use crate::integrity::{self, Integrity};
use crate::kvmclock;
use crate::platform;
use crate::{corrupt, println};
use core::cell::UnsafeCell;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes per page.
pub const PAGE: u64 = 4096;
const WORDS: usize = (PAGE / 8) as usize;
const STEP: u64 = 0x9e37_79b9_7f4a_7c15;
/// LCG choosing the words of compressible pages (Knuth's MMIX constants).
const LCG_MUL: u64 = 6_364_136_223_846_793_005;
const LCG_ADD: u64 = 1_442_695_040_888_963_407;
/// Pages per CPU for `workload=idle`.
pub const IDLE_PAGES: u64 = 16;
/// Pages written per loop iteration while filling.
const FILL_CHUNK: u64 = 64;
/// Pages rewritten per loop iteration at full speed (and the most at any rate).
const WRITE_CHUNK: u64 = 16;
/// Pages verified per loop iteration.
const VERIFY_CHUNK: u64 = 32;
/// Pages of the `zeros=` memory verified per loop iteration of the boot CPU.
const ZEROS_CHUNK: u64 = 8;
/// Pages of the `keep=` memory verified per loop iteration of the boot CPU.
const KEEP_CHUNK: u64 = 4;
/// Mixed into the `keep=` words: bit 63 set, so no word's input is 0, the
/// one input [`mix`] maps to 0.
const KEEP_SALT: u64 = 0xb00c_6b65_6570_0000;
/// Seconds after READY at which `selftest=` fires.
const SELFTEST_DELAY_S: u64 = 3;
/// An AP whose loop makes no progress for this long is reported.
const STALL_MS: u64 = 2000;

/// What every CPU needs to know, written by the boot CPU before any AP starts.
#[derive(Clone, Copy)]
pub struct Plan {
    /// Number of CPUs running the workload.
    pub ncpus: usize,
    /// LAPIC IDs by cpu index.
    pub apic_ids: [u32; MAX_CPUS],
    /// Workload kind.
    pub mode: Mode,
    /// Rewrite rate per CPU in pages per second (0 = as fast as possible).
    pub rate_pages: u64,
    /// `fill=`: first-write rate per CPU in pages per second (0 = as fast as
    /// possible).
    pub fill_pages: u64,
    /// Physical address of page 0 of the working set.
    pub ws_base: u64,
    /// Pages in the working set.
    pub ws_pages: u64,
    /// Physical address of the generation table (u32 per page).
    pub gens_base: u64,
    /// LAPIC timer input clock.
    pub bus_khz: u64,
    /// Fault to inject (kind, cpu).
    pub selftest: Option<(SelfTest, usize)>,
    /// Power off after this many seconds.
    pub runtime_s: Option<u64>,
    /// `pattern=compressible`: page bodies from a four-word alphabet.
    pub compressible: bool,
    /// `hot=<pct>`: share of each slice that gets half of the rewrites (0: none).
    pub hot_pct: u64,
    /// `zeros=`: physical address and pages of the memory that must read as
    /// zeros (written with zeros by the boot CPU before READY, then verified
    /// by it forever).
    pub zeros_base: u64,
    pub zeros_pages: u64,
    /// `keep=`: physical address and pages of the memory written once with
    /// [`keep_word`] by the boot CPU before READY, then verified by it
    /// forever.
    pub keep_base: u64,
    pub keep_pages: u64,
    /// `chatty=1`: the boot CPU prints [`CHATTY_TEXT`] lines without pause.
    pub chatty: bool,
}

/// The text of a `chatty=1` line, after `CHATTY n=<k> `: a test finds a
/// byte written twice or lost across a migration by comparing with it.
pub const CHATTY_TEXT: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

struct PlanCell(UnsafeCell<Option<Plan>>);
// SAFETY: written once by the boot CPU before PLAN_SET is released, read-only after.
unsafe impl Sync for PlanCell {}
static PLAN: PlanCell = PlanCell(UnsafeCell::new(None));
static PLAN_SET: AtomicBool = AtomicBool::new(false);

/// Publish the plan (boot CPU, once, before starting APs).
pub fn set_plan(p: Plan) {
    // SAFETY: no other CPU runs before PLAN_SET is set.
    unsafe { *PLAN.0.get() = Some(p) };
    PLAN_SET.store(true, Ordering::Release);
}

/// The plan (spins until the boot CPU has published it).
pub fn plan() -> &'static Plan {
    while !PLAN_SET.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: published and never written again.
    unsafe { (*PLAN.0.get()).as_ref().unwrap_unchecked() }
}

/// Progress of each CPU, read by the boot CPU.
pub struct Status {
    /// Reached ring 3.
    pub started: AtomicBool,
    /// Its slice is filled and its workload is running.
    pub ready: AtomicBool,
    /// Loop iterations.
    pub progress: AtomicU64,
    /// Completed write passes over the slice (generation of its last page).
    pub pass: AtomicU64,
    /// Completed verification sweeps over the slice.
    pub sweeps: AtomicU64,
}

/// Per-CPU status.
pub static STATUS: [Status; MAX_CPUS] = [const {
    Status {
        started: AtomicBool::new(false),
        ready: AtomicBool::new(false),
        progress: AtomicU64::new(0),
        pass: AtomicU64::new(0),
        sweeps: AtomicU64::new(0),
    }
}; MAX_CPUS];

static SELFTEST_AT: AtomicU64 = AtomicU64::new(u64::MAX);

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn header(index: u64, generation: u32) -> u64 {
    index << 32 | generation as u64
}

fn seed(index: u64, body_gen: u32) -> u64 {
    mix(index ^ (body_gen as u64) << 40 ^ 0x7465_7374_6775_6573)
}

/// The body words of a page (words 1..512), in order.
struct Body {
    seed: u64,
    v: u64,
    lcg: u64,
    compressible: bool,
}

impl Body {
    fn new(index: u64, body_gen: u32, compressible: bool) -> Body {
        let seed = seed(index, body_gen);
        Body {
            seed,
            v: seed,
            lcg: seed,
            compressible,
        }
    }

    /// The next body word.
    #[inline(always)]
    fn next_word(&mut self) -> u64 {
        if self.compressible {
            self.lcg = self.lcg.wrapping_mul(LCG_MUL).wrapping_add(LCG_ADD);
            self.seed
                .wrapping_add(STEP.wrapping_mul(1 + (self.lcg >> 62)))
        } else {
            self.v = self.v.wrapping_add(STEP);
            self.v
        }
    }
}

/// The slice of the working set one CPU owns.
struct Slice {
    /// Global index of its first page.
    first: u64,
    /// Number of pages.
    n: u64,
    base: *mut u64,
    gens: *mut u32,
    sparse: bool,
    compressible: bool,
}

impl Slice {
    fn new(p: &Plan, cpu: usize) -> Slice {
        let first = p.ws_pages * cpu as u64 / p.ncpus as u64;
        let end = p.ws_pages * (cpu as u64 + 1) / p.ncpus as u64;
        Slice {
            first,
            n: end - first,
            base: (p.ws_base + first * PAGE) as *mut u64,
            gens: (p.gens_base + first * 4) as *mut u32,
            sparse: p.mode == Mode::Sparse,
            compressible: p.compressible,
        }
    }

    fn page(&self, i: u64) -> *mut u64 {
        // SAFETY: i < n, inside this CPU's slice of identity-mapped RAM.
        unsafe { self.base.add(i as usize * WORDS) }
    }

    fn generation(&self, i: u64) -> u32 {
        // SAFETY: i < n, inside this CPU's part of the generation table.
        unsafe { read_volatile(self.gens.add(i as usize)) }
    }

    fn set_gen(&self, i: u64, g: u32) {
        // SAFETY: as for generation().
        unsafe { write_volatile(self.gens.add(i as usize), g) }
    }

    fn body_gen(&self, generation: u32) -> u32 {
        if self.sparse { 0 } else { generation }
    }

    /// Write the whole page at generation `generation`, then record `generation`.
    fn write_full(&self, i: u64, generation: u32) {
        let p = self.page(i);
        let index = self.first + i;
        let mut body = Body::new(index, self.body_gen(generation), self.compressible);
        for w in 1..WORDS {
            // SAFETY: w < 512 words of page i.
            unsafe { write_volatile(p.add(w), body.next_word()) };
        }
        // SAFETY: word 0 of page i.
        unsafe { write_volatile(p, header(index, generation)) };
        self.set_gen(i, generation);
    }

    /// Verify page `i`, then rewrite it at its next generation (sparse: word
    /// 0 only). Verifying first means a rewrite can never hide a corruption.
    fn rewrite(&self, cpu: usize, i: u64) {
        self.verify(cpu, i);
        let generation = self.generation(i).wrapping_add(1);
        if self.sparse {
            // SAFETY: word 0 of page i.
            unsafe { write_volatile(self.page(i), header(self.first + i, generation)) };
            self.set_gen(i, generation);
        } else {
            self.write_full(i, generation);
        }
    }

    /// Compare every word of page `i` with its pattern; on a mismatch report
    /// it and write the page again so one corruption gives one report.
    fn verify(&self, cpu: usize, i: u64) {
        let p = self.page(i);
        let index = self.first + i;
        let generation = self.generation(i);
        let body = self.body_gen(generation);
        // SAFETY: word 0 of page i.
        let mut diff = unsafe { read_volatile(p) } ^ header(index, generation);
        let mut words = Body::new(index, body, self.compressible);
        for w in 1..WORDS {
            // SAFETY: w < 512 words of page i.
            diff |= unsafe { read_volatile(p.add(w)) } ^ words.next_word();
        }
        if diff == 0 {
            return;
        }
        let mut first_bad = None;
        let mut bad = 0;
        let mut words = Body::new(index, body, self.compressible);
        for w in 0..WORDS {
            // SAFETY: w < 512 words of page i.
            let got = unsafe { read_volatile(p.add(w)) };
            let want = if w == 0 {
                header(index, generation)
            } else {
                words.next_word()
            };
            if got != want {
                bad += 1;
                first_bad.get_or_insert((w, got, want));
            }
        }
        // SAFETY: word 0 of page i.
        let hdr = unsafe { read_volatile(p) };
        if let Some((w, got, want)) = first_bad {
            corrupt!(
                "page={index} cpu={cpu} addr={:#x} gen={generation} word={w} found={got:#018x} want={want:#018x} bad_words={bad} hdr_page={} hdr_gen={}",
                p as u64,
                hdr >> 32,
                hdr as u32
            );
        }
        self.write_full(i, generation);
    }
}

/// Per-CPU writer/verifier state.
struct Worker {
    cpu: usize,
    slice: Slice,
    mode: Mode,
    rate: u64,
    fill_rate: u64,
    filled: u64,
    wcur: u64,
    vcur: u64,
    /// `hot=`: pages at the start of the slice that get every other rewrite
    /// (0: none), the cursor in them, and whose turn is next.
    hot: u64,
    hcur: u64,
    hot_turn: bool,
    credit: u64,
    last_credit: u64,
    swept_since_halt: bool,
    /// Boot CPU with `zeros=`: the next of those pages to verify.
    zcur: u64,
    /// Boot CPU with `keep=`: the next of those pages to verify.
    kcur: u64,
}

/// Page `i` of the `zeros=` memory.
fn zeros_page(p: &Plan, i: u64) -> *mut u64 {
    (p.zeros_base + i * PAGE) as *mut u64
}

/// Writes zeros over the `zeros=` memory (boot CPU, before READY): fresh
/// memory reads as zeros already, but only written memory is allocated.
fn write_zeros(p: &Plan) {
    for i in 0..p.zeros_pages {
        let page = zeros_page(p, i);
        for w in 0..WORDS {
            // SAFETY: w < 512 words of a page of the zeros region, identity-mapped RAM.
            unsafe { write_volatile(page.add(w), 0) };
        }
    }
}

/// Verifies that page `i` of the `zeros=` memory still reads as zeros; a
/// word that does not is reported (and the page zeroed again, so that one
/// corruption gives one report).
fn verify_zeros(p: &Plan, i: u64) {
    let page = zeros_page(p, i);
    let mut any = 0;
    for w in 0..WORDS {
        // SAFETY: w < 512 words of a page of the zeros region.
        any |= unsafe { read_volatile(page.add(w)) };
    }
    if any == 0 {
        return;
    }
    for w in 0..WORDS {
        // SAFETY: as above.
        let got = unsafe { read_volatile(page.add(w)) };
        if got != 0 {
            corrupt!(
                "zeros page={i} addr={:#x} word={w} found={got:#018x} want=0",
                page as u64
            );
            break;
        }
    }
    for w in 0..WORDS {
        // SAFETY: as above.
        unsafe { write_volatile(page.add(w), 0) };
    }
}

/// Page `i` of the `keep=` memory.
fn keep_page(p: &Plan, i: u64) -> *mut u64 {
    (p.keep_base + i * PAGE) as *mut u64
}

/// Word `w` of page `i` of the `keep=` memory: never 0 ([`mix`] is a
/// bijection that maps only 0 to 0), and different for every word of the
/// region, so a zeroed, misplaced or shifted page differs.
#[inline(always)]
fn keep_word(i: u64, w: usize) -> u64 {
    mix(KEEP_SALT ^ (i << 9 | w as u64))
}

fn write_keep_page(page: *mut u64, i: u64) {
    for w in 0..WORDS {
        // SAFETY: w < 512 words of a page of the keep region, identity-mapped RAM.
        unsafe { write_volatile(page.add(w), keep_word(i, w)) };
    }
}

/// Writes the `keep=` memory (boot CPU, once, before READY).
fn write_keep(p: &Plan) {
    for i in 0..p.keep_pages {
        write_keep_page(keep_page(p, i), i);
    }
}

/// Verifies page `i` of the `keep=` memory; a wrong word is reported (and
/// the page written again, so that one corruption gives one report).
fn verify_keep(p: &Plan, i: u64) {
    let page = keep_page(p, i);
    let mut diff = 0;
    for w in 0..WORDS {
        // SAFETY: w < 512 words of a page of the keep region.
        diff |= unsafe { read_volatile(page.add(w)) } ^ keep_word(i, w);
    }
    if diff == 0 {
        return;
    }
    let mut first_bad = None;
    let mut bad = 0;
    for w in 0..WORDS {
        // SAFETY: as above.
        let got = unsafe { read_volatile(page.add(w)) };
        let want = keep_word(i, w);
        if got != want {
            bad += 1;
            first_bad.get_or_insert((w, got, want));
        }
    }
    if let Some((w, got, want)) = first_bad {
        corrupt!(
            "keep page={i} addr={:#x} word={w} found={got:#018x} want={want:#018x} bad_words={bad}",
            page as u64
        );
    }
    write_keep_page(page, i);
}

impl Worker {
    /// One loop iteration of work; returns whether any page was due for writing.
    fn step(&mut self, now: u64) -> bool {
        let st = &STATUS[self.cpu];
        if self.filled < self.slice.n {
            let due = if self.fill_rate == 0 {
                FILL_CHUNK
            } else {
                self.paced(now, self.fill_rate, FILL_CHUNK)
            };
            let s = &self.slice;
            let end = (self.filled + due).min(s.n);
            for i in self.filled..end {
                s.write_full(i, 1);
            }
            self.filled = end;
            if end == s.n {
                st.pass.store(1, Ordering::Relaxed);
                st.ready.store(true, Ordering::Release);
                self.last_credit = now;
                self.credit = 0;
            }
            self.verify_chunk();
            return true;
        }

        let mut due = 0;
        if self.mode != Mode::Idle {
            due = if self.rate == 0 {
                WRITE_CHUNK
            } else {
                self.paced(now, self.rate, WRITE_CHUNK)
            };
            let s = &self.slice;
            for _ in 0..due {
                self.hot_turn = !self.hot_turn;
                if self.hot > 0 && self.hot_turn {
                    s.rewrite(self.cpu, self.hcur);
                    self.hcur = (self.hcur + 1) % self.hot;
                    continue;
                }
                s.rewrite(self.cpu, self.wcur);
                self.wcur += 1;
                if self.wcur == s.n {
                    self.wcur = self.hot;
                    st.pass.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.verify_chunk();
        due != 0
    }

    /// Pages due now at `rate` pages per second (at most `most`), from the
    /// credit the TSC has accrued since the last call.
    fn paced(&mut self, now: u64, rate: u64, most: u64) -> u64 {
        let hz = clock::tsc_hz();
        let dt = now.saturating_sub(self.last_credit).min(hz);
        self.last_credit = self.last_credit.max(now);
        let cap = (rate / 10).max(1) * hz;
        self.credit = (self.credit + dt * rate).min(cap);
        let due = (self.credit / hz).min(most);
        self.credit -= due * hz;
        due
    }

    fn verify_chunk(&mut self) {
        let p = plan();
        if self.cpu == 0 && p.zeros_pages > 0 {
            for _ in 0..ZEROS_CHUNK.min(p.zeros_pages) {
                verify_zeros(p, self.zcur);
                self.zcur = (self.zcur + 1) % p.zeros_pages;
            }
        }
        if self.cpu == 0 && p.keep_pages > 0 {
            for _ in 0..KEEP_CHUNK.min(p.keep_pages) {
                verify_keep(p, self.kcur);
                self.kcur = (self.kcur + 1) % p.keep_pages;
            }
        }
        let limit = self.filled;
        for _ in 0..VERIFY_CHUNK.min(limit) {
            self.slice.verify(self.cpu, self.vcur);
            self.vcur += 1;
            if self.vcur >= limit {
                self.vcur = 0;
                if limit == self.slice.n {
                    STATUS[self.cpu].sweeps.fetch_add(1, Ordering::Relaxed);
                    self.swept_since_halt = true;
                }
            }
        }
    }
}

/// Boot-CPU bookkeeping: READY, heartbeats, stalled APs, power-off.
struct Monitor {
    ready_printed: bool,
    chatty_n: u64,
    hb_n: u64,
    next_hb: u64,
    steps_seen: u64,
    last_progress: [(u64, u64, u64); MAX_CPUS],
    stall_reported: [bool; MAX_CPUS],
    /// Image, page tables, IDT/GDT/TSS: snapshot at READY, then one unit
    /// checked per loop iteration.
    integrity: Option<Integrity>,
}

impl Monitor {
    fn new(now: u64) -> Monitor {
        Monitor {
            ready_printed: false,
            chatty_n: 0,
            hb_n: 0,
            next_hb: now + clock::tsc_hz(),
            steps_seen: 0,
            last_progress: [(0, 0, now); MAX_CPUS],
            stall_reported: [false; MAX_CPUS],
            integrity: None,
        }
    }

    fn run(&mut self, p: &Plan, now: u64, steps: u64) {
        let n = p.ncpus;
        if !self.ready_printed && STATUS[..n].iter().all(|s| s.ready.load(Ordering::Acquire)) {
            self.ready_printed = true;
            // Every CPU has loaded its TR and runs in ring 3: the boot
            // code's last writes to its tables are done.
            self.integrity = Some(Integrity::snapshot());
            println!("WORKLOAD READY");
            println!(
                "WORKSET base={:#x} bytes={} cpus={}",
                p.ws_base,
                p.ws_pages * PAGE,
                n
            );
            SELFTEST_AT.store(now + SELFTEST_DELAY_S * clock::tsc_hz(), Ordering::Release);
        }
        if let Some(i) = self.integrity.as_mut() {
            i.step(now);
        }
        if p.chatty && self.ready_printed {
            self.chatty_n += 1;
            println!("CHATTY n={} {CHATTY_TEXT}", self.chatty_n);
        }
        if let Some(secs) = p.runtime_s
            && clock::since_boot_ms(now) >= secs * 1000
        {
            println!("TESTGUEST poweroff t={}", clock::since_boot_ms(now));
            cpu::exit(0);
        }
        if steps != self.steps_seen {
            // The boot CPU saw the clock jump (a VMM pause): restart stall timing.
            self.steps_seen = steps;
            for lp in self.last_progress.iter_mut() {
                lp.2 = now;
            }
        }
        if now.wrapping_sub(self.next_hb) > u64::MAX / 2 {
            return;
        }
        self.next_hb = now + clock::tsc_hz();
        self.hb_n += 1;
        let st = &STATUS[..n];
        let generation = st
            .iter()
            .map(|s| s.pass.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        let swept = st
            .iter()
            .map(|s| s.sweeps.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        println!(
            "HEARTBEAT n={} t={} ticks={} gen={generation} swept={swept}",
            self.hb_n,
            clock::since_boot_ms(now),
            KCPU[0].ticks.load(Ordering::Relaxed)
        );
        for cpu in 1..n {
            let prog = st[cpu].progress.load(Ordering::Relaxed);
            let ticks = KCPU[cpu].ticks.load(Ordering::Relaxed);
            let (last, last_ticks, since) = self.last_progress[cpu];
            if prog != last {
                self.last_progress[cpu] = (prog, ticks, now);
                self.stall_reported[cpu] = false;
            } else if now.saturating_sub(since) >= clock::ms(STALL_MS) && !self.stall_reported[cpu]
            {
                self.stall_reported[cpu] = true;
                let ms = clock::to_ms(now - since);
                if ticks == last_ticks {
                    // No interrupts either: an AP asleep in hlt whose timer died.
                    corrupt!("timer cpu={cpu} stopped ms={ms} ticks={ticks} progress={prog}");
                } else {
                    corrupt!("stall cpu={cpu} ms={ms} ticks={ticks} progress={prog}");
                }
            }
        }
    }
}

fn run_selftest(kind: SelfTest, cpu: usize, slice: &Slice, p: &Plan, chk: &mut Checker) {
    println!("TESTGUEST selftest {kind:?} cpu={cpu}");
    let second = clock::tsc_hz();
    match kind {
        SelfTest::Page => {
            let i = slice.n / 2;
            // SAFETY: word 5 of a page in this CPU's slice.
            unsafe { write_volatile(slice.page(i).add(5), 0xdead_beef_dead_beef) };
        }
        SelfTest::Simd => checks::sabotage::simd(),
        SelfTest::X87 => checks::sabotage::x87(),
        SelfTest::Mxcsr => checks::sabotage::mxcsr(),
        SelfTest::FsBase => checks::sabotage::fs_base(),
        SelfTest::Msr => checks::sabotage::msr(),
        SelfTest::Lapic => checks::sabotage::lapic(),
        SelfTest::Timer => checks::sabotage::timer(),
        SelfTest::ClockFwd => clock::offset_all(2 * second),
        SelfTest::ClockBack => clock::offset_all((2 * second).wrapping_neg()),
        SelfTest::Skew => clock::offset_cpu(cpu, second),
        SelfTest::Stall => loop {
            core::hint::spin_loop();
        },
        // SAFETY: deliberately faults (reported as GUEST FATAL).
        SelfTest::Fault => unsafe { core::arch::asm!("ud2", options(nostack, nomem)) },
        SelfTest::KernelFault => cpu::bad_service(),
        SelfTest::Progress => checks::sabotage::progress(cpu),
        SelfTest::Keep => {
            if p.keep_pages > 0 {
                let page = keep_page(p, p.keep_pages / 2);
                // SAFETY: word 5 of a page of the keep region.
                unsafe { write_volatile(page.add(5), 0xdead_beef_dead_beef) };
            }
        }
        SelfTest::Image => integrity::sabotage::image(),
        SelfTest::PageTables => integrity::sabotage::page_tables(),
        SelfTest::Idt => integrity::sabotage::idt(),
        SelfTest::Gdt => integrity::sabotage::gdt(cpu),
        SelfTest::Regs => chk.halt_clobbered(),
        SelfTest::Sysreg => checks::sabotage::sysreg(),
        SelfTest::Kvmclock => kvmclock::sabotage(),
        SelfTest::Debugreg => checks::sabotage::debugreg(),
        SelfTest::Platform => platform::sabotage(),
    }
}

/// Set up this CPU's checks and run its workload forever.
pub fn run(cpu: usize) -> ! {
    let p = plan();
    let mut chk = Checker::setup(cpu, p.apic_ids[cpu], p.bus_khz);
    let now = clock::now(cpu);
    let slice = Slice::new(p, cpu);
    // The hot region: at least a page, and never the whole slice.
    let hot = if p.hot_pct > 0 && slice.n > 1 {
        (slice.n * p.hot_pct / 100).clamp(1, slice.n - 1)
    } else {
        0
    };
    let mut w = Worker {
        cpu,
        slice,
        mode: p.mode,
        rate: p.rate_pages,
        fill_rate: p.fill_pages,
        filled: 0,
        wcur: hot,
        vcur: 0,
        hot,
        hcur: 0,
        hot_turn: false,
        credit: 0,
        last_credit: now,
        swept_since_halt: false,
        zcur: 0,
        kcur: 0,
    };
    if cpu == 0 {
        write_zeros(p);
        write_keep(p);
    }
    let mut mon = (cpu == 0).then(|| Monitor::new(now));
    let mut selftest = p.selftest.filter(|&(_, c)| c == cpu);
    let may_halt = cpu != 0 && !(p.mode != Mode::Idle && p.rate_pages == 0);
    loop {
        // First: a vCPU that slept in hlt compares its counter's two copies
        // as soon as it wakes.
        chk.progress();
        let now = chk.clock();
        chk.fast();
        chk.slow(now);
        if let Some(m) = mon.as_mut() {
            m.run(p, now, chk.steps);
        }
        if let Some((kind, _)) = selftest
            && now >= SELFTEST_AT.load(Ordering::Acquire)
        {
            selftest = None;
            run_selftest(kind, cpu, &w.slice, p, &mut chk);
        }
        let wrote = w.step(now);
        STATUS[cpu].progress.fetch_add(1, Ordering::Relaxed);
        if may_halt && !wrote && w.swept_since_halt {
            w.swept_since_halt = false;
            chk.halt();
        }
    }
}
