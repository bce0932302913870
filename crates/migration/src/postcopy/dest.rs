//! The destination of a post-copy phase: userfaultfd, the page readers, the fault thread.
//!
//! Guest memory on huge pages (hugetlbfs) is mapped into the guest whole:
//! the 4 KiB pages that arrive are read from the socket straight into the
//! file through a second mapping, and a huge page is mapped
//! (`UFFDIO_CONTINUE`) once every page it expects is in ([`Staging`]); a
//! fault asks for the missing pages of its huge page. Hybrid's huge pages
//! that hold pre-copy's pages keep them in the file: only the guest's
//! mapping of them is dropped at the switch. Prefaulted 4 KiB memory is
//! written through a second mapping too, and mapped a run at a time
//! ([`direct`]).

mod direct;

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use link::{Link, TlsSetup};
use vmm::memory::{HUGE_PAGE_SIZE as HUGE, PAGE_SIZE};
use vmm::{PreparedVm, Vm, VmExit, VmState};
use wire::{Message, PostcopyReport, KIND_CONTROL, MAX_BATCH_PAGES};

use crate::bitmap::{is_set, popcount};
use crate::doorman::{Arrival, Doorman};
use crate::incoming::IncomingStats;
use crate::precopy;
use crate::uffd::{RamMap, Uffd};
use crate::{io_err, Error, Result};

use super::{lock, prioritize_this_thread, watch_link, LINK_TIMEOUT};
use direct::Direct;

/// A page-aligned buffer of up to [`MAX_BATCH_PAGES`] pages.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; PAGE_SIZE as usize]);

fn pages_as_bytes(p: &mut [Page]) -> &mut [u8] {
    // SAFETY: Page is plain bytes; the slice covers exactly the pages.
    unsafe { std::slice::from_raw_parts_mut(p.as_mut_ptr() as *mut u8, std::mem::size_of_val(p)) }
}

/// 4 KiB pages in a huge page.
const PAGES_PER_HUGE: u64 = HUGE / PAGE_SIZE;

/// Bits of one huge page's 4 KiB pages.
type HugeBits = [u64; (PAGES_PER_HUGE / 64) as usize];

/// A huge page being assembled in the file, not yet mapped into the guest.
/// A reader takes the pages it brings (under the staging lock), writes them
/// through the second mapping with no lock held, then books them received;
/// the last of them to finish maps the huge page into the guest.
struct Stage {
    /// Expected pages no reader has taken yet.
    missing: u64,
    /// Pages taken by a reader and not yet booked received.
    taken: HugeBits,
    /// Readers writing into the huge page now.
    writers: u32,
}

/// Post-copy into memory on huge pages. userfaultfd maps a hugetlbfs page
/// only whole, so arriving pages are written into the file through a second
/// mapping, where the guest cannot see them, and a huge page is mapped into
/// the guest (`UFFDIO_CONTINUE`) once every page it expects is in. Until
/// then the guest's accesses fault: missing-page faults where the file has
/// no page yet, minor faults where it has one (hybrid's pre-copy pages).
struct Staging {
    /// Guest RAM by file offset, outside the guest's mappings.
    alias: vmm::memory::RamAlias,
    /// Huge pages being assembled.
    stages: Mutex<HashMap<u64, Stage>>,
    /// Huge pages mapped into the guest (one bit each).
    placed: Vec<AtomicU64>,
}

impl Staging {
    fn for_ram(ram: &vmm::GuestRam) -> Result<Staging> {
        let pages = ram.size() / PAGE_SIZE;
        Ok(Staging {
            alias: vmm::memory::RamAlias::new(ram)?,
            stages: Mutex::new(HashMap::new()),
            placed: (0..pages.div_ceil(PAGES_PER_HUGE).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    /// A stage waiting for `missing` pages.
    fn new_stage(missing: u64) -> Stage {
        Stage {
            missing,
            taken: [0; (PAGES_PER_HUGE / 64) as usize],
            writers: 0,
        }
    }

    /// Huge page `h` through the second mapping.
    fn huge_page(&self, h: u64) -> Result<*mut u8> {
        self.alias
            .at(h * HUGE, HUGE)
            .ok_or_else(|| Error::Protocol(format!("huge page {h} outside RAM")))
    }

    fn placed(&self, h: u64) -> bool {
        self.placed[(h / 64) as usize].load(Ordering::Acquire) & (1 << (h % 64)) != 0
    }

    fn set_placed(&self, h: u64) {
        self.placed[(h / 64) as usize].fetch_or(1 << (h % 64), Ordering::AcqRel);
    }
}

/// Destination state shared by the fault, receiving, recovery and completion threads.
struct Dest {
    uffd: Uffd,
    /// Guest memory on huge pages: the stages (None: 4 KiB pages, placed one by one).
    huge: Option<Staging>,
    /// Prefaulted 4 KiB memory: written through a second mapping (None:
    /// fresh 4 KiB pages, filled by `UFFDIO_COPY`).
    direct: Option<Direct>,
    map: RamMap,
    pages: u64,
    expected: Vec<u64>,
    received: Vec<AtomicU64>,
    /// Received pages that were zeros on the source and are left holes of
    /// guest RAM (set before their `received` bit): a fault on one is filled
    /// with zeros here; untouched, they take no memory.
    zeros: Vec<AtomicU64>,
    /// Pages in `zeros`.
    zeros_held: AtomicU64,
    total: u64,
    filled: AtomicU64,
    /// Pages asked for and not yet here, with the time of the fault whose
    /// wait ends with the page (None for a huge page's: see `huge_waits`).
    pending: Mutex<HashMap<u64, Option<Instant>>>,
    /// Huge pages: the time of the first fault of each not yet placed (its
    /// wait ends when it is placed, whichever of its pages came last).
    huge_waits: Mutex<HashMap<u64, Instant>>,
    latencies_us: Mutex<Vec<u64>>,
    demand: AtomicU64,
    pushed: AtomicU64,
    prepaged: AtomicU64,
    duplicate: AtomicU64,
    zero_faults: AtomicU64,
    faults: AtomicU64,
    t0: Instant,
    resumed_ns: AtomicU64,
    last_fill_ns: AtomicU64,
    /// Completed or failed: everything winds down.
    stop: AtomicBool,
    done: Mutex<Option<mpsc::Sender<Result<()>>>>,
    /// The source's address: only it may reconnect.
    source: IpAddr,
    /// The name the source's certificate proved on the main link (over
    /// TLS): a reconnection must prove the same.
    source_identity: Option<String>,
    /// Identifies the migration on a reconnection.
    token: u64,
    /// Fault requests and answers have a connection of their own.
    channel: bool,
    /// Bumped whenever a session ends; threads of older sessions exit quietly.
    generation: AtomicU64,
    /// Page readers running, of any session.
    readers: AtomicU64,
    /// Where fault requests go (the fault channel, or the main connection); None while the link is down.
    /// With the generation of the session it belongs to.
    requests: Mutex<Option<(u64, Link)>>,
    /// The main connection of the current session (PostcopyDone goes there).
    main: Mutex<Option<Link>>,
    /// Every socket of the current session, to cut them.
    links: Mutex<Vec<Link>>,
    link_up: AtomicBool,
    recoveries: AtomicU64,
    recover_port: u16,
    /// TLS for the source's reconnections.
    tls: Option<TlsSetup>,
    /// Set once every page is here: a reconnecting source gets it again.
    report: Mutex<Option<PostcopyReport>>,
    failure: Mutex<Option<String>>,
}

/// What a destination's post-copy phase looks like from outside.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PostcopyIncoming {
    /// postcopy-active, postcopy-paused (link lost, waiting for the source),
    /// completed, failed.
    pub status: String,
    /// Pages the destination needs from the source.
    pub pages_total: u64,
    /// Pages it holds.
    pub pages_received: u64,
    /// Guest threads' faults still waiting for their page.
    pub faults_waiting: u64,
    /// Links lost and re-established.
    pub recoveries: u64,
    /// Where the source reconnects.
    pub recover_port: u16,
    /// The source host.
    pub source: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// A handle on a destination's post-copy phase, for status queries.
#[derive(Clone)]
pub struct PostcopyWatch(Arc<Dest>);

impl PostcopyWatch {
    /// Before the VM is torn down with pages still missing (the operator gave
    /// up on this half): ends the phase and unregisters guest RAM from
    /// userfaultfd, which wakes every fault still waiting (KVM's async page
    /// fault workers included; closing the VM would wait for them forever).
    /// Nothing happens once every page is here.
    pub fn abandon(&self) {
        let d = &self.0;
        if lock(&d.report).is_some() {
            return;
        }
        d.stop.store(true, Ordering::Relaxed);
        let missing = d.total - d.filled.load(Ordering::Relaxed);
        lock(&d.failure).get_or_insert_with(|| {
            format!("abandoned with {missing} of {} pages missing", d.total)
        });
        tracing::warn!(
            missing,
            pages = d.total,
            "stopping a VM whose post-copy never completed: its missing pages are lost here"
        );
        d.end_session();
        if let Err(e) = d.map.unregister(&d.uffd) {
            tracing::warn!("unregistering userfaultfd: {e}");
        }
    }

    /// The phase as it is now.
    pub fn status(&self) -> PostcopyIncoming {
        let d = &self.0;
        let error = lock(&d.failure).clone();
        let status = if error.is_some() {
            "failed"
        } else if lock(&d.report).is_some() {
            "completed"
        } else if d.link_up.load(Ordering::Relaxed) {
            "postcopy-active"
        } else {
            "postcopy-paused"
        };
        PostcopyIncoming {
            status: status.into(),
            pages_total: d.total,
            pages_received: d.filled.load(Ordering::Relaxed),
            faults_waiting: lock(&d.pending).len() as u64,
            recoveries: d.recoveries.load(Ordering::Relaxed),
            recover_port: d.recover_port,
            source: d.source.to_string(),
            error,
        }
    }
}

impl Dest {
    /// A destination expecting the pages set in `expected` (a bitmap of
    /// `pages` bits) in `map`, already registered with `uffd`; `done` gets
    /// the outcome. The session's peer fields are the caller's to set.
    fn new(
        uffd: Uffd,
        map: RamMap,
        pages: u64,
        expected: Vec<u64>,
        done: mpsc::Sender<Result<()>>,
    ) -> Dest {
        Dest {
            uffd,
            huge: None,
            direct: None,
            map,
            pages,
            received: expected.iter().map(|_| AtomicU64::new(0)).collect(),
            zeros: expected.iter().map(|_| AtomicU64::new(0)).collect(),
            zeros_held: AtomicU64::new(0),
            total: popcount(&expected),
            expected,
            filled: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            huge_waits: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            demand: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            prepaged: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            t0: Instant::now(),
            resumed_ns: AtomicU64::new(0),
            last_fill_ns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            done: Mutex::new(Some(done)),
            source: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            source_identity: None,
            token: 0,
            channel: false,
            generation: AtomicU64::new(0),
            readers: AtomicU64::new(0),
            requests: Mutex::new(None),
            main: Mutex::new(None),
            links: Mutex::new(Vec::new()),
            link_up: AtomicBool::new(false),
            recoveries: AtomicU64::new(0),
            recover_port: 0,
            tls: None,
            report: Mutex::new(None),
            failure: Mutex::new(None),
        }
    }

    fn received(&self, pfn: u64) -> bool {
        self.received[(pfn / 64) as usize].load(Ordering::Acquire) & (1 << (pfn % 64)) != 0
    }

    /// Page `pfn` came as zeros and is left a hole (see [`Dest::hold_zeros`]).
    fn held_zero(&self, pfn: u64) -> bool {
        self.zeros[(pfn / 64) as usize].load(Ordering::Acquire) & (1 << (pfn % 64)) != 0
    }

    fn finish(&self, r: Result<()>) {
        if let Some(tx) = lock(&self.done).take() {
            let _ = tx.send(r);
        }
    }

    /// Fills the `n` pages from `off` with `data` (`n` pages of bytes, or
    /// zeros when `None`): one `UFFDIO_COPY` for the run where none of its
    /// pages is there yet; zeros are only booked (see [`Dest::hold_zeros`]).
    /// Errors of the peer's making are protocol errors (the session ends,
    /// the source recovers); a failing `UFFDIO_COPY` is ours and fails the
    /// migration.
    fn fill(&self, off: u64, n: u64, data: Option<&[u8]>, urgent: bool) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let first = self.announced(off, n)?;
        if self.huge.is_some() || self.direct.is_some() {
            return self.write_with(first, n, urgent, |pages, dst| {
                if let Some(dst) = dst {
                    match data {
                        Some(d) => dst.copy_from_slice(
                            &d[pages.start * PAGE_SIZE as usize..pages.end * PAGE_SIZE as usize],
                        ),
                        None => dst.fill(0),
                    }
                }
                Ok(())
            });
        }
        let Some(data) = data else {
            return self.hold_zeros(first, n, urgent);
        };
        let Some(host) = self.map.host_run(off, n * PAGE_SIZE) else {
            if n == 1 {
                return Err(Error::Protocol(format!("page {off:#x} outside RAM")));
            }
            // The run spans two RAM mappings: page by page.
            for i in 0..n {
                let page = (i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize;
                self.fill(off + i * PAGE_SIZE, 1, Some(&data[page]), urgent)?;
            }
            return Ok(());
        };
        let mut newly = 0;
        let filled = self
            .uffd
            .fill_run(host, Some(data), n * PAGE_SIZE, |i, filled| {
                // A copy into a page held as zeros fills its hole, but the page
                // was received already: a duplicate too.
                if filled && self.record_fill(first + i, urgent) {
                    newly += 1;
                } else {
                    self.duplicate.fetch_add(1, Ordering::Relaxed);
                }
            });
        self.filled_or_failed(filled, || format!("UFFDIO_COPY at {off:#x}"))?;
        self.count_filled(newly);
        Ok(())
    }

    /// The outcome of a call that fills or maps guest pages (`what` names
    /// it): a failure fails the migration (the guest cannot go on without
    /// the pages), unless every page is here already and guest RAM was
    /// unregistered while a duplicate's call was under way (the kernel says
    /// ENOENT).
    fn filled_or_failed(
        &self,
        r: std::io::Result<()>,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(_) if self.filled.load(Ordering::Acquire) >= self.total => Ok(()),
            Err(e) => {
                let e = io_err(what())(e);
                self.finish(Err(Error::Protocol(e.to_string())));
                Err(e)
            }
        }
    }

    /// The first page of the `n` from offset `off`, if the source announced
    /// them all in its PageMap; a protocol error otherwise.
    fn announced(&self, off: u64, n: u64) -> Result<u64> {
        let first = off / PAGE_SIZE;
        let end = first.checked_add(n).filter(|&e| e <= self.pages);
        if off.is_multiple_of(PAGE_SIZE)
            && end.is_some_and(|e| (first..e).all(|p| is_set(&self.expected, p)))
        {
            Ok(first)
        } else {
            Err(Error::Protocol(format!(
                "pages {off:#x} + {n} were not announced in the PageMap"
            )))
        }
    }

    /// The pages of huge page `h` that come from the source.
    fn expected_in(&self, h: u64) -> impl Iterator<Item = u64> + '_ {
        (h * PAGES_PER_HUGE..((h + 1) * PAGES_PER_HUGE).min(self.pages))
            .filter(|&p| is_set(&self.expected, p))
    }

    /// Memory written through a second mapping (huge pages, or prefaulted
    /// 4 KiB pages): writes the `n` pages from page `first`, whose bytes
    /// `put` writes (see [`Dest::stage_with`] and [`Dest::direct_with`]).
    fn write_with(
        &self,
        first: u64,
        n: u64,
        urgent: bool,
        put: impl FnMut(std::ops::Range<usize>, Option<&mut [u8]>) -> Result<()>,
    ) -> Result<()> {
        match (&self.huge, &self.direct) {
            (Some(s), _) => self.stage_with(s, first, n, urgent, put),
            (None, Some(d)) => self.direct_with(d, first, n, urgent, put),
            (None, None) => Err(Error::Protocol(
                "pages written through a second mapping of 4 KiB memory that has none".into(),
            )),
        }
    }

    /// Huge pages: stages the `n` pages from page `first`, whose bytes `put`
    /// writes: it is called in page order for each stretch of the run (page
    /// indices within it), with where the pages go (in the file, through the
    /// second mapping) for pages not here yet, or `None` for pages already
    /// here or on their way (to be skipped). It runs with no lock held, so
    /// that readers fill huge pages side by side.
    /// Places each huge page the run completes.
    fn stage_with(
        &self,
        s: &Staging,
        first: u64,
        n: u64,
        urgent: bool,
        mut put: impl FnMut(std::ops::Range<usize>, Option<&mut [u8]>) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0;
        while done < n {
            let from = first + done;
            let k = (PAGES_PER_HUGE - from % PAGES_PER_HUGE).min(n - done);
            self.stage_in_huge_page(s, from, k, urgent, |pages, dst| {
                put(pages.start + done as usize..pages.end + done as usize, dst)
            })?;
            done += k;
        }
        Ok(())
    }

    /// [`Dest::stage_with`] for a run of `k` pages from `first` within one huge page.
    fn stage_in_huge_page(
        &self,
        s: &Staging,
        first: u64,
        k: u64,
        urgent: bool,
        mut put: impl FnMut(std::ops::Range<usize>, Option<&mut [u8]>) -> Result<()>,
    ) -> Result<()> {
        let h = first / PAGES_PER_HUGE;
        let huge_page = s.huge_page(h)?;
        let slot = |p: u64| ((p % PAGES_PER_HUGE / 64) as usize, 1u64 << (p % 64));
        // Take the pages of the run that nobody has yet.
        let mut mine: HugeBits = [0; (PAGES_PER_HUGE / 64) as usize];
        let mut base = std::ptr::null_mut();
        {
            let mut stages = lock(&s.stages);
            if (first..first + k).any(|p| !self.received(p)) {
                let stage = stages.entry(h).or_insert_with(|| {
                    let missing = self.expected_in(h).filter(|&p| !self.received(p)).count();
                    Staging::new_stage(missing as u64)
                });
                for p in first..first + k {
                    let (w, b) = slot(p);
                    if !self.received(p) && stage.taken[w] & b == 0 {
                        stage.taken[w] |= b;
                        mine[w] |= b;
                        stage.missing -= 1;
                    }
                }
                if mine.iter().any(|&w| w != 0) {
                    stage.writers += 1;
                    base = huge_page;
                }
            }
        }
        // Write them, and skip the others, in the order of the run.
        let is_mine = |p: u64| {
            let (w, b) = slot(p);
            mine[w] & b != 0
        };
        let mut written = Ok(());
        let mut i = 0;
        while i < k && written.is_ok() {
            let m = is_mine(first + i);
            let mut j = i + 1;
            while j < k && is_mine(first + j) == m {
                j += 1;
            }
            let dst = m.then(|| {
                let at = ((first + i) % PAGES_PER_HUGE * PAGE_SIZE) as usize;
                // SAFETY: pages `first+i..first+j` of huge page `h` in the second
                // mapping, which this reader alone took; the guest does not map
                // them until the stage is complete, after this write.
                unsafe {
                    std::slice::from_raw_parts_mut(base.add(at), ((j - i) * PAGE_SIZE) as usize)
                }
            });
            written = put(i as usize..j as usize, dst);
            i = j;
        }
        // Pages here already, or being written by another reader, came twice.
        let taken: u64 = mine.iter().map(|w| w.count_ones() as u64).sum();
        self.duplicate.fetch_add(k - taken, Ordering::Relaxed);
        if base.is_null() {
            return written;
        }
        // Book them (or give them back), and place the huge page if it is whole.
        let mut newly = 0;
        let complete = {
            let mut stages = lock(&s.stages);
            let Some(stage) = stages.get_mut(&h) else {
                return Err(Error::Protocol(format!("stage of huge page {h} vanished")));
            };
            stage.writers -= 1;
            for p in (first..first + k).filter(|&p| is_mine(p)) {
                let (w, b) = slot(p);
                stage.taken[w] &= !b;
                if written.is_ok() {
                    self.record_fill(p, urgent);
                    newly += 1;
                } else {
                    stage.missing += 1;
                }
            }
            if stage.missing == 0 && stage.writers == 0 {
                stages.remove(&h)
            } else {
                None
            }
        };
        written?;
        if complete.is_some() {
            self.place(s, h)?;
        }
        self.count_filled(newly);
        Ok(())
    }

    /// Maps huge page `h` into the guest, whole, which wakes the threads
    /// waiting on it.
    fn place(&self, s: &Staging, h: u64) -> Result<()> {
        let Some(host) = self.map.host(h * HUGE) else {
            return Err(Error::Protocol(format!("huge page {h} outside RAM")));
        };
        let mapped = self.uffd.map_present(host, HUGE).map(drop);
        if mapped.is_ok() {
            s.set_placed(h);
            if let Some(at) = lock(&self.huge_waits).remove(&h) {
                lock(&self.latencies_us).push(at.elapsed().as_micros() as u64);
            }
        }
        self.filled_or_failed(mapped, || format!("UFFDIO_CONTINUE of huge page {h}"))
    }

    /// Huge pages: a fault in huge page `h` at `page_addr`. One the source
    /// sends nothing of is placed as zeros; otherwise its missing pages are
    /// asked for, every 17th (a page asked for comes with the 16 pages of
    /// the source's pre-paging window; what the push already took is on its
    /// way), and the thread waits until the huge page is placed.
    fn huge_fault(&self, s: &Staging, page_addr: u64, off: u64) -> Result<()> {
        let h = off / HUGE;
        let huge_addr = page_addr - off % HUGE;
        if s.placed(h) {
            let _ = self.uffd.wake(huge_addr, HUGE);
            return Ok(());
        }
        if self.expected_in(h).next().is_none() {
            // Into the file as it is (zeros, or what pre-copy left), then mapped.
            // SAFETY: a byte of huge page `h` in the second mapping, read only.
            unsafe { std::ptr::read_volatile(s.huge_page(h)?) };
            let filled = self.uffd.map_present(huge_addr, HUGE);
            self.zero_filled(
                filled,
                "UFFDIO_CONTINUE (huge page the source sends nothing of)",
            )?;
            s.set_placed(h);
            return Ok(());
        }
        let mut asked = Vec::new();
        {
            let mut pending = lock(&self.pending);
            let mut next = 0;
            for p in self.expected_in(h) {
                if p < next || self.received(p) {
                    continue;
                }
                next = p + 17;
                if let std::collections::hash_map::Entry::Vacant(e) = pending.entry(p) {
                    e.insert(None);
                    asked.push(p);
                }
            }
            // Under `pending`'s lock: the last of these pages cannot arrive,
            // and the huge page be placed, before its wait is noted.
            if !asked.is_empty() {
                lock(&self.huge_waits).entry(h).or_insert_with(Instant::now);
            }
        }
        if asked.is_empty() {
            // All here or asked for already: placed soon (a copy wakes).
            return Ok(());
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        for p in asked {
            self.request(p);
        }
        Ok(())
    }

    /// Adds `newly` pages to those received; the last one completes the phase.
    fn count_filled(&self, newly: u64) {
        if newly == 0 {
            return;
        }
        self.last_fill_ns
            .fetch_max(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if self.filled.fetch_add(newly, Ordering::AcqRel) + newly == self.total {
            self.finish(Ok(()));
        }
    }

    /// Books the `n` pages from page `first`, zeros on the source, as
    /// received without filling them: they stay holes of guest RAM, which
    /// read as zeros once userfaultfd is gone, and take no memory until the
    /// guest writes them (as pre-copy punches its zero pages out). A guest
    /// thread already waiting for one gets it filled with zeros now; one that
    /// faults later, by the fault thread ([`Dest::settle`]).
    fn hold_zeros(&self, first: u64, n: u64, urgent: bool) -> Result<()> {
        let mut newly = 0;
        for pfn in first..first + n {
            let (w, b) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
            // Marked before `received`: whoever sees the page received also
            // sees that it is a hole.
            if self.received[w].load(Ordering::Acquire) & b == 0 {
                self.zeros[w].fetch_or(b, Ordering::AcqRel);
            }
            if self.record_fill(pfn, urgent) {
                newly += 1;
                self.zeros_held.fetch_add(1, Ordering::Relaxed);
            } else {
                self.duplicate.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count_filled(newly);
        Ok(())
    }

    /// A fault on received page `pfn` at `page_addr`: a page held as zeros
    /// is filled with them (which wakes the thread), any other is there and
    /// the thread is woken.
    fn settle(&self, page_addr: u64, pfn: u64) -> Result<()> {
        // Prefaulted memory (minor faults): the page is in the file, and
        // this mapping lost it (reclaim, swap): it is mapped again; a wake
        // alone would have the vCPU fault on it for ever.
        if self.direct.is_some() {
            if self.uffd.map_present(page_addr, PAGE_SIZE).is_err() {
                let _ = self.uffd.wake(page_addr, PAGE_SIZE);
            }
            return Ok(());
        }
        if self.held_zero(pfn) {
            match self.uffd.zeropage(page_addr, PAGE_SIZE) {
                Ok(true) => {
                    self.zero_faults.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) if self.stop.load(Ordering::Relaxed) => {
                    tracing::debug!("zero fill after completion: {e}")
                }
                Err(e) => return Err(io_err("UFFDIO_ZEROPAGE (page held as zeros)")(e)),
            }
        }
        let _ = self.uffd.wake(page_addr, PAGE_SIZE);
        Ok(())
    }

    /// Books page `pfn` as received, unless it was already (false): how it
    /// came, and how long its fault waited if one did. A guest thread that
    /// waits for a page held as zeros gets them here.
    fn record_fill(&self, pfn: u64, urgent: bool) -> bool {
        let b = 1u64 << (pfn % 64);
        if self.received[(pfn / 64) as usize].fetch_or(b, Ordering::AcqRel) & b != 0 {
            return false;
        }
        let asked = lock(&self.pending).remove(&pfn);
        if asked.is_some() && self.held_zero(pfn) {
            if let Some(host) = self.map.host(pfn * PAGE_SIZE) {
                if let Err(e) = self.settle(host, pfn) {
                    // Its thread cannot go on: as a failing UFFDIO_COPY.
                    tracing::error!("filling a waited-for zero page: {e}");
                    self.finish(Err(e));
                }
            }
        }
        // A page that was asked for came on demand, whichever way it came;
        // others on the fault channel are its pre-paged neighbours.
        match (asked.is_some(), urgent) {
            (true, _) => &self.demand,
            (false, true) => &self.prepaged,
            (false, false) => &self.pushed,
        }
        .fetch_add(1, Ordering::Relaxed);
        if let Some(Some(at)) = asked {
            lock(&self.latencies_us).push(at.elapsed().as_micros() as u64);
        }
        true
    }

    /// Fills the pages of a batch (`data` holds them in the order of
    /// `offsets`), one call per run of consecutive pages.
    fn fill_batch(&self, offsets: &[u64], data: &[u8], urgent: bool) -> Result<()> {
        let mut i = 0;
        while i < offsets.len() {
            let n = run_length(&offsets[i..]);
            let bytes = &data[i * PAGE_SIZE as usize..(i + n) * PAGE_SIZE as usize];
            self.fill(offsets[i], n as u64, Some(bytes), urgent)?;
            i += n;
        }
        Ok(())
    }

    /// Memory written through a second mapping: reads the pages of a batch
    /// at `offsets` from `r` straight into the file, one read per stretch of
    /// consecutive pages; pages already here are read into `scratch` and
    /// dropped. On prefaulted 4 KiB pages a fault's answer has its demanded
    /// page mapped before the pre-paged window is read.
    fn receive_straight(
        &self,
        r: &mut impl Read,
        offsets: &[u64],
        urgent: bool,
        scratch: &mut [u8],
    ) -> Result<()> {
        let mut i = 0;
        while i < offsets.len() {
            let n = match urgent && i == 0 && self.direct.is_some() {
                true => 1,
                false => run_length(&offsets[i..]),
            };
            let first = self.announced(offsets[i], n as u64)?;
            self.write_with(first, n as u64, urgent, |pages, dst| {
                let dst = match dst {
                    Some(d) => d,
                    None => &mut scratch[..pages.len() * PAGE_SIZE as usize],
                };
                r.read_exact(dst).map_err(wire::WireError::from)?;
                Ok(())
            })?;
            i += n;
        }
        Ok(())
    }

    /// Reads page batches from `r` and fills them.
    fn receive_pages(&self, r: &mut impl Read, urgent: bool) -> Result<()> {
        let mut buf = vec![Page([0; PAGE_SIZE as usize]); MAX_BATCH_PAGES];
        loop {
            let h = wire::read_header(r)?;
            if h.kind == KIND_CONTROL {
                match wire::read_control_body(r, h.body_len)? {
                    Message::Zero { ranges } => {
                        crate::incoming::check_zero_total(self.pages, &ranges)?;
                        for (off, n) in ranges {
                            self.fill(off, n, None, urgent)?;
                        }
                        continue;
                    }
                    Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
                    other => {
                        return Err(Error::Protocol(format!(
                            "unexpected {} during post-copy",
                            other.name()
                        )))
                    }
                }
            }
            if h.kind == wire::KIND_ZPAGES {
                return Err(Error::Protocol(
                    "compressed page batch during post-copy (post-copy pages travel raw)".into(),
                ));
            }
            let offsets = wire::read_batch_offsets(r, h.body_len)?;
            if self.huge.is_some() || self.direct.is_some() {
                self.receive_straight(r, &offsets, urgent, pages_as_bytes(&mut buf))?;
                continue;
            }
            let mut rest = &offsets[..];
            if urgent {
                // A fault answer: the demanded page first, filled (and its
                // vCPU woken) before the pre-paged window is even read.
                if let Some((&off, window)) = offsets.split_first() {
                    let p = pages_as_bytes(&mut buf[..1]);
                    r.read_exact(p).map_err(wire::WireError::from)?;
                    self.fill(off, 1, Some(p), urgent)?;
                    rest = window;
                }
            }
            let data = pages_as_bytes(&mut buf[..rest.len()]);
            r.read_exact(data).map_err(wire::WireError::from)?;
            self.fill_batch(rest, data, urgent)?;
        }
    }

    /// Asks the source for `pfn`, if the link is up; otherwise the request
    /// waits in `pending` and goes out when the source reconnects.
    fn request(&self, pfn: u64) {
        let mut w = lock(&self.requests);
        if let Some((gen, s)) = w.as_mut() {
            // The session this link is of (not the generation now: a
            // recovery may have started the next one meanwhile).
            let gen = *gen;
            if let Err(e) = wire::write_control(
                s,
                &Message::PageRequest {
                    offset: pfn * PAGE_SIZE,
                },
            ) {
                *w = None;
                drop(w);
                self.link_lost(gen, &e.to_string());
            }
        }
    }

    /// The outcome of filling a fault with zeros where the source sends
    /// nothing (`what` names the call): counted if it filled the page; a
    /// failure once the phase is over (guest RAM unregistered meanwhile) is
    /// none.
    fn zero_filled(&self, filled: std::io::Result<bool>, what: &str) -> Result<()> {
        match filled {
            Ok(true) => {
                self.zero_faults.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) if self.stop.load(Ordering::Relaxed) => {
                tracing::debug!("zero fill after completion: {e}")
            }
            Err(e) => return Err(io_err(what)(e)),
        }
        Ok(())
    }

    /// The fault thread: zero pages are filled here, others asked for.
    fn handle_faults(&self) -> Result<()> {
        let zero = Page([0; PAGE_SIZE as usize]);
        self.uffd.each_fault(&self.stop, 50, |page_addr| {
            let Some(off) = self.map.offset(page_addr) else {
                tracing::warn!(page_addr, "fault outside guest RAM");
                return Ok(());
            };
            if let Some(s) = &self.huge {
                return self.huge_fault(s, page_addr, off);
            }
            let pfn = off / PAGE_SIZE;
            if let (Some(d), false) = (&self.direct, is_set(&self.expected, pfn)) {
                return self.direct_as_is(d, page_addr, off);
            }
            if !is_set(&self.expected, pfn) {
                // Zero on the source: never sent.
                let filled = self.uffd.copy(page_addr, &zero.0);
                return self.zero_filled(filled, "UFFDIO_COPY (zero page)");
            }
            if self.received(pfn) {
                return self.settle(page_addr, pfn);
            }
            {
                let mut p = lock(&self.pending);
                if p.contains_key(&pfn) {
                    return Ok(()); // already asked for
                }
                p.insert(pfn, Some(Instant::now()));
            }
            // Counted as soon as it waits: if the push fills it in the
            // meantime, it still counts as demanded (see `fill`).
            self.faults.fetch_add(1, Ordering::Relaxed);
            if self.received(pfn) {
                // Arrived in between.
                lock(&self.pending).remove(&pfn);
                return self.settle(page_addr, pfn);
            }
            self.request(pfn);
            Ok(())
        })
    }

    /// Ends the current session: its sockets are shut, its threads exit.
    fn end_session(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.link_up.store(false, Ordering::Release);
        // Shut the sockets first: that unblocks a writer holding `requests`.
        for s in std::mem::take(&mut *lock(&self.links)) {
            let _ = s.shutdown(Shutdown::Both);
        }
        *lock(&self.requests) = None;
        *lock(&self.main) = None;
    }

    /// Waits (up to 10 s) until the readers of ended sessions have exited,
    /// their sockets shut: a reader cut in the middle of pages it took
    /// gives them back as it exits, and until then a reader of the new
    /// session would drop those pages as on their way, and they would not
    /// come again unless the guest asked for them.
    /// False when some still run after 10 s: the recovery is put off then
    /// (the source tries again), rather than trust a received-bitmap those
    /// readers may still change.
    fn wait_for_old_readers(&self) -> bool {
        let since = Instant::now();
        while self.readers.load(Ordering::Acquire) > 0 {
            if since.elapsed() > Duration::from_secs(10) {
                tracing::warn!("post-copy page readers of the lost session still running");
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// A thread of session `gen` saw its connection fail: the guest's faults
    /// wait until the source reconnects (it keeps every page we lack).
    fn link_lost(&self, gen: u64, why: &str) {
        if self.stop.load(Ordering::Relaxed) || self.generation.load(Ordering::Acquire) != gen {
            return;
        }
        tracing::warn!(
            error = why,
            waiting = lock(&self.pending).len(),
            "post-copy link lost: the VM's missing pages wait until the source reconnects"
        );
        self.end_session();
    }

    /// Starts a session on `main` (read through `main_r`) and, with a fault
    /// channel, `urgent`: faults that waited for the link are asked again.
    fn start_session(
        self: &Arc<Self>,
        main_r: BufReader<Link>,
        main: Link,
        urgent: Option<Link>,
    ) -> Result<()> {
        let gen = self.generation.load(Ordering::Acquire);
        let clone = |s: &Link| s.try_clone().map_err(io_err("socket"));
        *lock(&self.links) = std::iter::once(&main)
            .chain(urgent.as_ref())
            .map(clone)
            .collect::<Result<_>>()?;
        {
            // Every page may have come while the link was down (the last
            // ones from the old session's buffers, after the recovery had
            // looked for the report): then this session says so at once.
            let mut m = lock(&self.main);
            let mut link = clone(&main)?;
            if let Some(report) = lock(&self.report).clone() {
                if let Err(e) = wire::write_control(&mut link, &Message::PostcopyDone { report }) {
                    tracing::warn!("sending PostcopyDone: {e} (repeated on reconnection)");
                }
            }
            *m = Some(link);
        }
        let mut req = clone(urgent.as_ref().unwrap_or(&main))?;
        {
            let mut w = lock(&self.requests);
            let waiting: Vec<u64> = lock(&self.pending).keys().copied().collect();
            for pfn in waiting {
                wire::write_control(
                    &mut req,
                    &Message::PageRequest {
                        offset: pfn * PAGE_SIZE,
                    },
                )?;
            }
            *w = Some((gen, req));
        }
        self.link_up.store(true, Ordering::Release);
        let mut readers = vec![(main_r, false)];
        if let Some(u) = urgent {
            readers.push((BufReader::new(u), true));
        }
        for (mut r, urgent) in readers {
            let d = self.clone();
            self.readers.fetch_add(1, Ordering::AcqRel);
            let started = spawn(
                if urgent { "fault-pages" } else { "push-pages" },
                move || {
                    prioritize_this_thread(urgent);
                    match d.receive_pages(&mut r, urgent) {
                        Err(Error::PeerCancelled(why)) => d.finish(Err(Error::PeerCancelled(why))),
                        Err(e) => d.link_lost(gen, &e.to_string()),
                        Ok(()) => {}
                    }
                    d.readers.fetch_sub(1, Ordering::AcqRel);
                },
            );
            if started.is_err() {
                self.readers.fetch_sub(1, Ordering::AcqRel);
            }
            started?;
        }
        Ok(())
    }

    /// Accepts the source's reconnections until the phase ends; once it
    /// completed, for as long as this process runs the VM, to repeat the
    /// `PostcopyDone` to a source that lost the first one (however long the
    /// link was down): a refused reconnection tells the source that this
    /// process is gone.
    fn serve_recovery(self: Arc<Self>, listener: TcpListener) {
        // Each connection's handshake and RecoverHello are read in a thread of
        // its own: a silent connection, even from the source's address,
        // delays no recovery. What follows the hello is served in order.
        let doorman = Doorman::new(
            listener,
            self.source,
            self.tls.clone(),
            "RecoverHello",
            2 * LINK_TIMEOUT,
        );
        let mut doorman = match doorman {
            Ok(d) => d
                .telling_strangers("source")
                .requiring_identity(self.source_identity.as_deref()),
            Err(e) => {
                tracing::error!("recovery listener: {e}");
                return;
            }
        };
        let mut pending_main: Option<Link> = None;
        let mut done = false;
        loop {
            if !done && self.stop.load(Ordering::Relaxed) {
                if lock(&self.report).is_none() {
                    return; // failed: nothing to recover
                }
                done = true;
            }
            // Until the phase ends, a look at `stop` every 20 ms; then
            // connections only.
            let wait = if done {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(20)
            };
            match doorman.next(Instant::now() + wait, None) {
                Ok(Arrival::Greeted(g)) => {
                    let peer = g.peer;
                    if let Err(e) = self.recovery_connection(g.link, g.hello, &mut pending_main) {
                        tracing::warn!(%peer, "post-copy recovery connection refused: {e}");
                    }
                }
                Ok(Arrival::TimedOut | Arrival::Interrupted) => {}
                Err(e) => {
                    tracing::warn!("recovery listener: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Serves one reconnection whose hello has arrived.
    fn recovery_connection(
        self: &Arc<Self>,
        mut s: Link,
        hello: Message,
        pending_main: &mut Option<Link>,
    ) -> Result<()> {
        let refuse = |s: &mut Link, reason: String| {
            let _ = wire::write_control(
                s,
                &Message::Refuse {
                    reason: reason.clone(),
                },
            );
            Err(Error::Refused(reason))
        };
        let (job, urgent) = match hello {
            Message::RecoverHello { job, urgent } => (job, urgent),
            other => {
                return refuse(
                    &mut s,
                    format!("expected RecoverHello, got {}", other.name()),
                )
            }
        };
        if job != self.token {
            return refuse(
                &mut s,
                format!("no post-copy migration {job:#x} awaits recovery here"),
            );
        }
        if let Some(report) = lock(&self.report).clone() {
            // On the main connection, where the source reads it: a fault
            // channel's hello finds the main connection waiting for it.
            let mut on = match (urgent, pending_main.take()) {
                (true, Some(main)) => main,
                _ => s,
            };
            wire::write_control(&mut on, &Message::PostcopyDone { report })?;
            return Ok(());
        }
        if self.stop.load(Ordering::Relaxed) {
            let why = lock(&self.failure).clone().unwrap_or_default();
            return refuse(&mut s, format!("post-copy failed on this host: {why}"));
        }
        watch_link(&s)?;
        if !urgent {
            // The source's word is final: whatever the old session looked like
            // from here, it is over.
            self.end_session();
            if !self.wait_for_old_readers() {
                // Closed without a word: the source takes it for a lost link
                // and tries again (a Refuse would tell it this host gave up).
                return Err(Error::Protocol(
                    "page readers of the lost session still run here: recovery deferred".into(),
                ));
            }
            let bitmap: Vec<u64> = self
                .received
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect();
            for m in super::received_messages(bitmap) {
                wire::write_control(&mut s, &m)?;
            }
            if self.channel {
                *pending_main = Some(s);
                return Ok(());
            }
            let r = BufReader::new(s.try_clone().map_err(io_err("socket"))?);
            self.start_session(r, s, None)?;
        } else {
            let Some(main) = pending_main.take() else {
                return refuse(&mut s, "fault channel before the main connection".into());
            };
            let r = BufReader::new(main.try_clone().map_err(io_err("socket"))?);
            self.start_session(r, main, Some(s))?;
        }
        let n = self.recoveries.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(
            recoveries = n,
            "post-copy link re-established by the source"
        );
        Ok(())
    }

    fn report(&self) -> PostcopyReport {
        let mut l = lock(&self.latencies_us).clone();
        l.sort_unstable();
        let pct = |p: usize| {
            if l.is_empty() {
                0
            } else {
                l[(l.len() * p / 100).min(l.len() - 1)]
            }
        };
        let resumed = self.resumed_ns.load(Ordering::Relaxed);
        let last = self.last_fill_ns.load(Ordering::Relaxed);
        PostcopyReport {
            demand: self.demand.load(Ordering::Relaxed),
            pushed: self.pushed.load(Ordering::Relaxed),
            prepaged: self.prepaged.load(Ordering::Relaxed),
            duplicate: self.duplicate.load(Ordering::Relaxed),
            zero_faults: self.zero_faults.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            p50_us: pct(50),
            p99_us: pct(99),
            max_us: l.last().copied().unwrap_or(0),
            resume_to_last_us: last.saturating_sub(resumed) / 1000,
            blocked_us: l.iter().sum(),
            histogram_us: log2_histogram(&l),
        }
    }
}

/// Entry i counts the values in [2^i, 2^(i+1)) (entry 0 also 0); no trailing
/// empty entries.
pub(crate) fn log2_histogram(values: &[u64]) -> Vec<u64> {
    let mut h = Vec::new();
    for &v in values {
        let i = (u64::BITS - v.max(1).leading_zeros() - 1) as usize;
        if h.len() <= i {
            h.resize(i + 1, 0);
        }
        h[i] += 1;
    }
    h
}

/// Starts a named thread.
fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(io_err(format!("starting the {name} thread")))
}

/// The destination's end of the fault channel: `UrgentListen{port, job}` says
/// where the source listens (port 0: no fault channel). Opened when the
/// message arrives, before the source pauses.
pub(crate) fn open_fault_channel(
    main: &Link,
    port: u16,
    job: u64,
    tls: Option<&TlsSetup>,
) -> Result<(Option<Link>, u64)> {
    if port == 0 {
        return Ok((None, job));
    }
    let source = main.peer_addr().map_err(io_err("peer address"))?.ip();
    let to = SocketAddr::new(source, port);
    let mut s = precopy::connect_addr(to, main.peer_identity(), tls, Duration::from_secs(10))
        .map_err(|e| Error::Protocol(format!("opening the fault channel: {e}")))?;
    s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    wire::write_control(&mut s, &Message::UrgentHello { job })?;
    Ok((Some(s), job))
}

/// Destination side, from the `PageMap` on: registers guest RAM with
/// userfaultfd, opens the fault channel, loads the state, does the commit
/// exchange and returns the running VM; pages keep arriving in the background.
/// `held`: memory on huge pages, the huge pages pre-copy wrote (a bit each;
/// asking the mappings, `mincore`, would cost ~4 ms per GiB in the pause).
#[allow(clippy::too_many_arguments)]
pub(crate) fn receive(
    prepared: PreparedVm,
    r: BufReader<Link>,
    mut out: Link,
    runs: Vec<(u64, u64)>,
    held: Option<Vec<u64>>,
    channel: Option<(Option<Link>, u64)>,
    tls: Option<&TlsSetup>,
    mut stats: IncomingStats,
    on_running: &dyn Fn(),
    abandon: &crate::incoming::Abandon,
) -> Result<(Vm, IncomingStats)> {
    let mut r = r;
    let ram = prepared.ram().clone();
    let pages = ram.size() / PAGE_SIZE;
    let mut expected = vec![0u64; pages.div_ceil(64) as usize];
    // Runs that overlap would make this loop as long as the peer likes:
    // together they may not cover more pages than RAM has.
    let mut announced = 0u64;
    for &(off, n) in &runs {
        let end = (off / PAGE_SIZE).checked_add(n);
        if !off.is_multiple_of(PAGE_SIZE) || n == 0 || end.is_none_or(|e| e > pages) {
            return Err(Error::Protocol(format!(
                "PageMap run {off:#x}+{n} outside the guest's RAM"
            )));
        }
        announced += n;
        if announced > pages {
            return Err(Error::Protocol(format!(
                "PageMap runs overlap: more than the guest's {pages} pages announced"
            )));
        }
        for pfn in off / PAGE_SIZE..off / PAGE_SIZE + n {
            expected[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
    }
    let map = RamMap::new(&ram);
    let staging = ram.is_huge().then(|| Staging::for_ram(&ram)).transpose()?;
    let huge = staging.is_some();
    let mut direct = if huge { None } else { Direct::for_ram(&ram) };
    let uffd = if huge {
        Uffd::for_minor_faults(true).map_err(io_err(
            "userfaultfd with minor faults on huge pages (Linux 5.13 or later)",
        ))?
    } else if direct.is_some() {
        Uffd::for_minor_faults(false)
            .inspect_err(|e| {
                direct = None;
                tracing::warn!("no minor faults on shmem (Linux 5.14): prefaulted pages are punched out and filled afresh ({e})");
            })
            .or_else(|_| Uffd::new())
            .map_err(io_err("userfaultfd"))?
    } else {
        Uffd::new().map_err(io_err("userfaultfd"))?
    };
    // Hybrid: what pre-copy left in the expected pages is stale. Fresh
    // 4 KiB pages are punched out of the file so that they fault. On huge
    // pages the guest's mappings of those huge pages are dropped instead
    // (the file keeps pre-copy's pages, which arriving pages complete), and
    // on prefaulted 4 KiB pages the guest's mappings of the expected pages
    // (the file keeps a page for each, which the arriving page overwrites),
    // so that they take minor faults.
    if huge {
        let stale = hybrid_huge_pages(&expected, held.as_deref().unwrap_or(&[]));
        unmap_from_guest(&map, &stale)?;
    } else if direct.is_some() {
        let stale: Vec<_> = runs.iter().map(|&(off, n)| (off, n * PAGE_SIZE)).collect();
        unmap_from_guest(&map, &stale)?;
    } else {
        for &(off, n) in &runs {
            vmm::memory::punch_hole(ram.memfd(), off, n * PAGE_SIZE)
                .map_err(io_err("punching stale pages"))?;
        }
    }
    let total = popcount(&expected);
    let minor = huge || direct.is_some();
    map.register(&uffd, minor)
        .map_err(io_err(match (huge, minor) {
            (true, _) => "registering guest RAM on huge pages with userfaultfd",
            (false, true) => "registering prefaulted guest RAM with userfaultfd for minor faults",
            _ => "registering guest RAM with userfaultfd",
        }))?;
    tracing::debug!(
        pages = total,
        "post-copy: guest RAM registered with userfaultfd"
    );
    let source = r
        .get_ref()
        .peer_addr()
        .map_err(io_err("peer address"))?
        .ip();

    let state = match wire::expect_control_up_to(&mut r, "State", wire::MAX_FRAME)? {
        Message::State { blob } => VmState::decode(&blob)?,
        Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
        other => {
            return Err(Error::Protocol(format!(
                "unexpected {} after the PageMap",
                other.name()
            )))
        }
    };
    let (urgent, token) =
        channel.ok_or_else(|| Error::Protocol("PageMap arrived before UrgentListen".into()))?;
    // Where the source reconnects if the link drops after the switch.
    let local = out.local_addr().map_err(io_err("socket address"))?;
    let recovery = TcpListener::bind((local.ip(), 0)).map_err(io_err("recovery listener"))?;
    let recover_port = recovery
        .local_addr()
        .map_err(io_err("recovery listener"))?
        .port();
    let (done_tx, done_rx) = mpsc::channel();
    let mut dest = Dest::new(uffd, map, pages, expected, done_tx);
    dest.huge = staging;
    dest.direct = direct;
    dest.source = source;
    dest.source_identity = r.get_ref().peer_identity().map(str::to_string);
    dest.token = token;
    dest.channel = urgent.is_some();
    dest.recover_port = recover_port;
    dest.tls = tls.cloned();
    let dest = Arc::new(dest);
    let faults = {
        let d = dest.clone();
        spawn("uffd-faults", move || {
            prioritize_this_thread(true);
            if let Err(e) = d.handle_faults() {
                tracing::error!("post-copy fault thread: {e}");
                d.finish(Err(e));
            }
        })?
    };
    let fail = |e: Error| {
        dest.stop.store(true, Ordering::Relaxed);
        if let Some(u) = &urgent {
            let _ = u.shutdown(Shutdown::Both);
        }
        e
    };
    wire::write_control(&mut out, &Message::RecoverListen { port: recover_port })
        .map_err(|e| fail(e.into()))?;
    let vm = prepared.load(&state).map_err(|e| {
        let reason = format!("loading the VM state on the destination: {e}");
        let _ = wire::write_control(&mut out, &Message::Cancel { reason });
        fail(e.into())
    })?;
    abandon.send_ready(&mut out).map_err(fail)?;
    // The VM is ours to run from here (see `incoming::receive`).
    let resume = match wire::expect_control(&mut r, "Go").map_err(|e| fail(e.into()))? {
        Message::Go => true,
        Message::GoPaused => false,
        Message::Cancel { reason } => return Err(fail(Error::PeerCancelled(reason))),
        other => {
            return Err(fail(Error::Protocol(format!(
                "expected Go, got {}",
                other.name()
            ))))
        }
    };
    on_running();
    // From `Go` on the VM is ours to run, and a link that fails is
    // recovered (the source reconnects): nothing here may end the arrival.
    for s in std::iter::once(&out).chain(urgent.as_ref()) {
        let set = watch_link(s).and_then(|()| {
            s.set_read_timeout(None)
                .and_then(|()| s.tcp().set_write_timeout(None))
                .map_err(io_err("socket timeout"))
        });
        if let Err(e) = set {
            tracing::warn!("post-copy link options: {e}");
        }
    }
    // (Out of descriptors: the VM runs all the same, unconfirmed, and the
    // source reconnects, as after a lost Confirm.)
    let mut confirm_to = out
        .try_clone()
        .inspect_err(|e| tracing::warn!("post-copy: no socket for the Confirm: {e}"))
        .ok();
    // With a fault channel the session starts before the guest runs, so that
    // its first fault's request goes out at once (the source reads it once
    // it has the `Confirm`); without one, requests share the main connection
    // and must follow the `Confirm`.
    let early = urgent.is_some();
    let mut session = Some((r, out, urgent));
    // A session that cannot start (out of descriptors or threads) is a lost
    // link: the source reconnects, and the guest's faults wait for it.
    let start = |(r, out, urgent)| {
        if let Err(e) = dest.start_session(r, out, urgent) {
            tracing::warn!("post-copy: session not started ({e}); waiting for the source");
            dest.end_session();
        }
    };
    if early {
        if let Some(s) = session.take() {
            start(s);
        }
    }
    dest.resumed_ns
        .store(dest.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    let (resume_us, confirmed) = match confirm_to.as_mut() {
        Some(c) => crate::incoming::resume_and_confirm(&vm, c, resume),
        None => {
            let t = Instant::now();
            if resume {
                vm.resume();
            }
            let no_socket = Error::Protocol("no socket for the Confirm".into());
            (t.elapsed().as_micros() as u64, Err(no_socket))
        }
    };
    stats.resume_us = resume_us;
    if let Err(e) = confirmed {
        // The VM runs; the session finds the link broken and waits for
        // the source to reconnect.
        tracing::warn!("post-copy: confirmation not sent ({e}); waiting for the source");
        if let Some(c) = &confirm_to {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
    stats.postcopy = Some(PostcopyWatch(dest.clone()));
    if total == 0 {
        dest.finish(Ok(()));
    }
    if let Some(s) = session.take() {
        start(s);
    }
    {
        let d = dest.clone();
        spawn("postcopy-recovery", move || d.serve_recovery(recovery))?;
    }
    let control = vm.exit_watch();
    spawn("postcopy-done", move || {
        let result = done_rx
            .recv()
            .unwrap_or_else(|_| Err(Error::Protocol("post-copy threads vanished".into())));
        match result {
            Ok(()) => {
                if let Err(e) = dest.map.unregister(&dest.uffd) {
                    tracing::warn!("unregistering userfaultfd: {e}");
                }
                let report = dest.report();
                // Set under the main connection's lock, which a session
                // started by a recovery installs its connection under: the
                // report goes on the connection there is now, or that
                // session sends it when it starts (`start_session`).
                let mut main = lock(&dest.main);
                *lock(&dest.report) = Some(report.clone());
                dest.stop.store(true, Ordering::Relaxed);
                tracing::info!(
                    pages = dest.total,
                    demand = report.demand,
                    pushed = report.pushed,
                    prepaged = report.prepaged,
                    duplicate = report.duplicate,
                    zeros_held = dest.zeros_held.load(Ordering::Relaxed),
                    zero_faults = report.zero_faults,
                    faults = report.faults,
                    p50_us = report.p50_us,
                    p99_us = report.p99_us,
                    recoveries = dest.recoveries.load(Ordering::Relaxed),
                    resume_to_last_ms = report.resume_to_last_us as f64 / 1e3,
                    "post-copy complete: every page is here"
                );
                // If the link is down, the source gets it when it reconnects.
                if let Some(main) = main.as_mut() {
                    if crate::faults::postcopy_done_lost() {
                        // The session is cut below, as a network cut would.
                        tracing::warn!("fault injection: PostcopyDone not sent, links cut");
                    } else if let Err(e) =
                        wire::write_control(main, &Message::PostcopyDone { report })
                    {
                        tracing::warn!("sending PostcopyDone: {e} (repeated on reconnection)");
                    }
                    let _ = main.flush();
                }
                drop(main);
            }
            Err(e) => {
                // The guest cannot go on without its memory.
                tracing::error!("post-copy failed: {e}");
                *lock(&dest.failure) = Some(e.to_string());
                dest.stop.store(true, Ordering::Relaxed);
                control.stop(VmExit::Failed(format!("post-copy failed: {e}")));
            }
        }
        dest.end_session();
        let _ = faults.join();
    })?;
    Ok((vm, stats))
}

/// How many of `offsets` from the first are consecutive pages.
fn run_length(offsets: &[u64]) -> usize {
    let mut n = 1;
    while n < offsets.len() && offsets[n] == offsets[0].wrapping_add(n as u64 * PAGE_SIZE) {
        n += 1;
    }
    n.min(offsets.len())
}

/// Hybrid onto huge pages: the runs of huge pages (memfd offset, length)
/// that expect pages and hold some of pre-copy's (set in `held`, a bit per
/// huge page). The others have nothing stale: the guest faults on them as
/// they are.
fn hybrid_huge_pages(expected: &[u64], held: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let words = (PAGES_PER_HUGE / 64) as usize;
    for (h, bits) in expected.chunks(words).enumerate() {
        let h = h as u64;
        let wanted = bits.iter().any(|&w| w != 0);
        let written = held
            .get((h / 64) as usize)
            .is_some_and(|w| w & (1 << (h % 64)) != 0);
        if !(wanted && written) {
            continue;
        }
        match runs.last_mut() {
            Some((off, len)) if *off + *len == h * HUGE => *len += HUGE,
            _ => runs.push((h * HUGE, HUGE)),
        }
    }
    runs
}

/// Drops the guest's mappings of the memfd runs `runs` (the file keeps the
/// pages): the guest's next access to them faults.
fn unmap_from_guest(map: &RamMap, runs: &[(u64, u64)]) -> Result<()> {
    for &(off, len) in runs {
        for (host, len) in map.host_spans(off, len) {
            // SAFETY: a span of the guest's own shared mapping of the memfd;
            // no vCPU runs yet, and the pages stay in the file.
            unsafe { vmm::memory::drop_from_mapping(host as *mut u8, len as usize) }
                .map_err(io_err("dropping the guest's mapping of stale pages"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A userfaultfd, or None (and a note) where this host has none.
    fn uffd_or_skip() -> Option<Uffd> {
        Uffd::new()
            .inspect_err(|e| eprintln!("SKIP: userfaultfd unavailable: {e}"))
            .ok()
    }

    /// 16 MiB of RAM on huge pages and a userfaultfd for it (with minor
    /// faults), or None (and a note) where this host has either not.
    fn huge_ram_or_skip() -> Option<(vmm::GuestRam, Uffd)> {
        let ram = match vmm::GuestRam::with_huge_pages(16 << 20, true) {
            Ok(r) => r,
            Err(e) if e.to_string().contains("cannot reserve") => {
                eprintln!("SKIP: no huge pages here ({e})");
                return None;
            }
            Err(e) => panic!("{e}"),
        };
        let uffd = Uffd::for_minor_faults(true)
            .inspect_err(|e| eprintln!("SKIP: userfaultfd minor faults unavailable: {e}"))
            .ok()?;
        Some((ram, uffd))
    }

    /// A guest thread on `scope` running `read` (which may fault): its
    /// result comes on the receiver.
    fn guest_read<'s, T: Send + 's>(
        scope: &'s std::thread::Scope<'s, '_>,
        read: impl FnOnce() -> T + Send + 's,
    ) -> mpsc::Receiver<T> {
        let (tx, rx) = mpsc::channel();
        scope.spawn(move || tx.send(read()));
        rx
    }

    /// What a guest read of `pfn` got; if its fault is never answered, guest
    /// RAM is released from userfaultfd (so that the thread ends) and the
    /// test fails.
    fn answered<T>(d: &Dest, rx: mpsc::Receiver<T>, pfn: u64) -> T {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                d.stop.store(true, Ordering::Release);
                let _ = d.map.unregister(&d.uffd);
                panic!("the fault on page {pfn} was never answered")
            })
    }

    #[test]
    fn latency_histogram_has_log2_buckets() {
        assert_eq!(log2_histogram(&[]), Vec::<u64>::new());
        // 0 and 1 → [1, 2); 2, 3 → [2, 4); 90 → [64, 128); 1000 → [512, 1024).
        assert_eq!(
            log2_histogram(&[0, 1, 2, 3, 90, 1000]),
            vec![2, 2, 0, 0, 0, 0, 1, 0, 0, 1]
        );
    }

    /// Zeros from the source are booked without filling: a page read later
    /// is filled with zeros by the fault thread, one a thread already waits
    /// for is filled at once, data for one is a duplicate, and untouched ones
    /// take no memory.
    #[test]
    fn zeros_are_held_as_holes_and_filled_when_touched() {
        let ram = vmm::GuestRam::new(16 << 20).unwrap();
        let Some(uffd) = uffd_or_skip() else {
            return;
        };
        let map = RamMap::new(&ram);
        map.register(&uffd, false).unwrap();
        let pages = ram.size() / PAGE_SIZE;
        let mut expected = vec![0u64; pages.div_ceil(64) as usize];
        expected[0] = 0xffff; // pages 0..16
        let (tx, rx) = mpsc::channel();
        let d = Dest::new(uffd, map, pages, expected, tx);
        let read = |pfn: u64| {
            let mut b = vec![1u8; PAGE_SIZE as usize];
            ram.read(ram.offset_to_gpa(pfn * PAGE_SIZE).unwrap(), &mut b)
                .unwrap();
            b.iter().all(|&x| x == 0)
        };
        let data = Page([0x5a; PAGE_SIZE as usize]);
        std::thread::scope(|s| {
            let faults = s.spawn(|| d.handle_faults());
            let reader = |pfn: u64| guest_read(s, move || read(pfn));
            let answer = |rx, pfn| answered(&d, rx, pfn);
            // Pages 0..8 held; the guest reads page 3 later.
            d.fill(0, 8, None, false).unwrap();
            assert!(answer(reader(3), 3), "page 3 reads as zeros");
            // A thread waits for page 10 when its zeros come.
            let waiter = reader(10);
            while !lock(&d.pending).contains_key(&10) {
                std::thread::yield_now();
            }
            d.fill(10 * PAGE_SIZE, 1, None, true).unwrap();
            assert!(answer(waiter, 10), "page 10 reads as zeros");
            // The source answering for page 5 too: a duplicate.
            d.fill(5 * PAGE_SIZE, 1, Some(&[0; PAGE_SIZE as usize]), true)
                .unwrap();
            // The rest with data: the phase is complete.
            for pfn in [8, 9, 11, 12, 13, 14, 15] {
                d.fill(pfn * PAGE_SIZE, 1, Some(&data.0), false).unwrap();
            }
            rx.recv().unwrap().unwrap();
            d.stop.store(true, Ordering::Release);
            faults.join().unwrap().unwrap();
        });
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(count(&d.filled), 16);
        assert_eq!(count(&d.zeros_held), 9);
        assert_eq!(count(&d.zero_faults), 2, "pages 3 and 10 filled with zeros");
        assert_eq!(count(&d.duplicate), 1);
        assert_eq!(count(&d.demand), 1, "page 10 was asked for");
        // Memory: pages 3, 5 and 10, and the seven with data; no more.
        d.map.unregister(&d.uffd).unwrap();
        let held: u64 = ram.data_extents().unwrap().iter().map(|e| e.1).sum();
        assert_eq!(held, 10 * PAGE_SIZE);
        assert!((0..8).chain([10]).all(read), "held zeros read as zeros");
    }

    /// On huge pages a huge page is placed whole once every page it expects
    /// is in, zeros included; a guest thread faulting in it waits until then
    /// (its pages are asked for), and one faulting where nothing is expected
    /// gets zeros at once. Hybrid's pre-copy pages in a huge page that
    /// expects others are kept in its stage.
    #[test]
    fn huge_pages_are_placed_whole_when_complete() {
        let Some((ram, uffd)) = huge_ram_or_skip() else {
            return;
        };
        let map = RamMap::new(&ram);
        let pages = ram.size() / PAGE_SIZE;
        // Huge page 0 expects pages 0..4; huge page 1 expects page 512 and
        // holds pre-copy's page 513; the others expect nothing.
        let mut expected = vec![0u64; pages.div_ceil(64) as usize];
        expected[0] = 0b1111;
        expected[8] = 1;
        ram.write(ram.offset_to_gpa(513 * PAGE_SIZE).unwrap(), &[7u8; 4096])
            .unwrap();
        let staging = Staging::for_ram(&ram).unwrap();
        let held = vec![0b10u64];
        let stale = hybrid_huge_pages(&expected, &held);
        assert_eq!(stale, vec![(HUGE, HUGE)]);
        unmap_from_guest(&map, &stale).unwrap();
        map.register(&uffd, true).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut d = Dest::new(uffd, map, pages, expected, tx);
        d.huge = Some(staging);
        let s = d.huge.as_ref().unwrap();
        let byte = |pfn: u64| {
            let mut b = [0u8; 1];
            ram.read(ram.offset_to_gpa(pfn * PAGE_SIZE).unwrap(), &mut b)
                .unwrap();
            b[0]
        };
        std::thread::scope(|sc| {
            let faults = sc.spawn(|| d.handle_faults());
            let reader = |pfn: u64| guest_read(sc, move || byte(pfn));
            let answer = |rx, pfn| answered(&d, rx, pfn);
            // Nothing expected in huge page 2: zeros at once.
            assert_eq!(answer(reader(1024 + 5), 1024 + 5), 0);
            // A thread faulting in huge page 0 waits; page 0 is asked for.
            let waiter = reader(3);
            while !lock(&d.pending).contains_key(&0) {
                std::thread::yield_now();
            }
            d.fill(0, 2, Some(&[1u8; 2 * PAGE_SIZE as usize]), false)
                .unwrap();
            d.fill(2 * PAGE_SIZE, 1, None, false).unwrap();
            assert!(!s.placed(0), "page 3 is still to come");
            assert!(
                waiter.try_recv().is_err(),
                "woken before its huge page was whole"
            );
            d.fill(3 * PAGE_SIZE, 1, Some(&[3u8; PAGE_SIZE as usize]), true)
                .unwrap();
            assert!(s.placed(0));
            assert_eq!(answer(waiter, 3), 3);
            // A duplicate changes nothing.
            d.fill(0, 1, Some(&[9u8; PAGE_SIZE as usize]), true)
                .unwrap();
            d.fill(512 * PAGE_SIZE, 1, Some(&[5u8; PAGE_SIZE as usize]), false)
                .unwrap();
            rx.recv().unwrap().unwrap();
            d.stop.store(true, Ordering::Release);
            faults.join().unwrap().unwrap();
        });
        d.map.unregister(&d.uffd).unwrap();
        let got: Vec<u8> = [0, 1, 2, 3, 4, 512, 513, 514].map(byte).to_vec();
        assert_eq!(
            got,
            vec![1, 1, 0, 3, 0, 5, 7, 0],
            "pre-copy's page 513 kept"
        );
        assert_eq!(d.duplicate.load(Ordering::Relaxed), 1);
        assert_eq!(d.filled.load(Ordering::Relaxed), 5);
    }

    /// A fault in a huge page asks for several of its pages (every 17th),
    /// but it is one fault, with one wait, which ends when the huge page is
    /// placed: one latency sample, not one per page asked for.
    #[test]
    fn a_huge_page_fault_is_one_latency_sample() {
        let Some((ram, uffd)) = huge_ram_or_skip() else {
            return;
        };
        let map = RamMap::new(&ram);
        let pages = ram.size() / PAGE_SIZE;
        let mut expected = vec![0u64; pages.div_ceil(64) as usize];
        expected[0] = u64::MAX;
        let staging = Staging::for_ram(&ram).unwrap();
        map.register(&uffd, true).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut d = Dest::new(uffd, map, pages, expected, tx);
        d.huge = Some(staging);
        let byte = |pfn: u64| {
            let mut b = [0u8; 1];
            ram.read(ram.offset_to_gpa(pfn * PAGE_SIZE).unwrap(), &mut b)
                .unwrap();
            b[0]
        };
        std::thread::scope(|sc| {
            let faults = sc.spawn(|| d.handle_faults());
            let waiter = guest_read(sc, move || byte(3));
            while lock(&d.pending).len() < 4 {
                std::thread::yield_now();
            }
            d.fill(0, 64, Some(&[6u8; 64 * PAGE_SIZE as usize]), false)
                .unwrap();
            assert_eq!(answered(&d, waiter, 3), 6);
            rx.recv().unwrap().unwrap();
            d.stop.store(true, Ordering::Release);
            faults.join().unwrap().unwrap();
        });
        d.map.unregister(&d.uffd).unwrap();
        assert_eq!(d.faults.load(Ordering::Relaxed), 1);
        assert_eq!(d.demand.load(Ordering::Relaxed), 4, "pages 0, 17, 34, 51");
        assert_eq!(lock(&d.latencies_us).len(), 1, "one fault, one wait");
    }

    /// Readers fill stages straight from a stream: a page already here is
    /// read and dropped (the stream stays in step), and a reader whose read
    /// fails gives its pages back, so that they come again instead of being
    /// booked with nothing in them.
    #[test]
    fn staged_reads_skip_duplicates_and_give_back_on_failure() {
        let Some((ram, uffd)) = huge_ram_or_skip() else {
            return;
        };
        let map = RamMap::new(&ram);
        map.register(&uffd, true).unwrap();
        let pages = ram.size() / PAGE_SIZE;
        // Huge page 0 expects pages 0..4.
        let mut expected = vec![0u64; pages.div_ceil(64) as usize];
        expected[0] = 0b1111;
        let (tx, rx) = mpsc::channel();
        let mut d = Dest::new(uffd, map, pages, expected, tx);
        d.huge = Some(Staging::for_ram(&ram).unwrap());
        let s = d.huge.as_ref().unwrap();
        let page = |b: u8| vec![b; PAGE_SIZE as usize];
        let mut scratch = vec![0u8; 4 * PAGE_SIZE as usize];
        // Page 1 first; then a batch of pages 0..3 whose stream ends early.
        d.receive_straight(&mut page(1).as_slice(), &[PAGE_SIZE], false, &mut scratch)
            .unwrap();
        let short = [page(10), page(11)].concat();
        let offsets = [0, PAGE_SIZE, 2 * PAGE_SIZE];
        assert!(d
            .receive_straight(&mut short.as_slice(), &offsets, false, &mut scratch)
            .is_err());
        assert!(d.received(1) && !d.received(0) && !d.received(2));
        assert_eq!(
            lock(&s.stages)[&0].missing,
            3,
            "pages 0, 2 and 3 are to come"
        );
        // Again in full, with page 1 a second time, then page 3.
        let full = [page(20), page(21), page(22), page(23)].concat();
        let offsets = [0, PAGE_SIZE, 2 * PAGE_SIZE, 3 * PAGE_SIZE];
        let mut stream = full.as_slice();
        d.receive_straight(&mut stream, &offsets, false, &mut scratch)
            .unwrap();
        assert!(stream.is_empty(), "the duplicate page was read too");
        assert!(s.placed(0));
        rx.recv().unwrap().unwrap();
        d.map.unregister(&d.uffd).unwrap();
        let byte = |pfn: u64| {
            let mut b = [0u8; 1];
            ram.read(ram.offset_to_gpa(pfn * PAGE_SIZE).unwrap(), &mut b)
                .unwrap();
            b[0]
        };
        assert_eq!([0, 1, 2, 3, 4].map(byte), [20, 1, 22, 23, 0]);
        assert_eq!(d.duplicate.load(Ordering::Relaxed), 2);
        assert_eq!(d.filled.load(Ordering::Relaxed), 4);
    }

    /// Prefaulted 4 KiB memory: arriving pages are written through the
    /// second mapping over what the file holds (pre-copy's stale copies
    /// included, zeros too), and mapped into the guest; a guest thread
    /// faulting on an expected page waits for it; one faulting where nothing
    /// is expected gets what the file holds, a hole as zeros; a reader whose
    /// stream fails gives its pages back; a page already here is read and
    /// dropped.
    #[test]
    fn prefaulted_pages_are_written_through_the_second_mapping() {
        let ram = vmm::GuestRam::with_huge_pages(16 << 20, false).unwrap();
        ram.prefault().unwrap();
        let ram = Arc::new(ram);
        let Ok(uffd) = Uffd::for_minor_faults(false)
            .inspect_err(|e| eprintln!("SKIP: no minor faults on shmem here: {e}"))
        else {
            return;
        };
        let map = RamMap::new(&ram);
        let pages = ram.size() / PAGE_SIZE;
        let at = |pfn: u64| ram.offset_to_gpa(pfn * PAGE_SIZE).unwrap();
        // Pre-copy's pages, written into the file as pre-copy writes them:
        // 20 and 23 (expected, so stale), 40 and 42 (kept); page 41 it found
        // zero and punched out.
        for (pfn, b) in [(20, 9u8), (23, 9), (40, 7), (41, 8), (42, 6)] {
            use std::os::unix::fs::FileExt;
            let page = [b; PAGE_SIZE as usize];
            ram.memfd().write_all_at(&page, pfn * PAGE_SIZE).unwrap();
        }
        vmm::memory::punch_hole(ram.memfd(), 41 * PAGE_SIZE, PAGE_SIZE).unwrap();
        // Pages 16..24 are expected.
        let mut expected = vec![0u64; pages.div_ceil(64) as usize];
        expected[0] = 0xff << 16;
        unmap_from_guest(&map, &[(16 * PAGE_SIZE, 8 * PAGE_SIZE)]).unwrap();
        map.register(&uffd, true).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut d = Dest::new(uffd, map, pages, expected, tx);
        d.direct = Direct::for_ram(&ram);
        assert!(d.direct.is_some());
        let byte = |pfn: u64| {
            let mut b = [0u8; 1];
            ram.read(at(pfn), &mut b).unwrap();
            b[0]
        };
        let page = |b: u8| vec![b; PAGE_SIZE as usize];
        let mut scratch = vec![0u8; 8 * PAGE_SIZE as usize];
        std::thread::scope(|sc| {
            let faults = sc.spawn(|| d.handle_faults());
            let reader = |pfn: u64| guest_read(sc, move || byte(pfn));
            // A failing check ends the fault thread and wakes the readers,
            // so that the test fails instead of hanging.
            let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let answer = |rx, pfn| answered(&d, rx, pfn);
                // Nothing expected: the file's page, or zeros for the hole.
                // A fault maps the pages around it that the file holds:
                // page 42 takes none.
                assert_eq!(answer(reader(40), 40), 7);
                assert_eq!(answer(reader(42), 42), 6);
                assert_eq!(d.zero_faults.load(Ordering::Relaxed), 1);
                assert_eq!(answer(reader(41), 41), 0);
                // Counted just after the map woke the reader.
                let since = Instant::now();
                while d.zero_faults.load(Ordering::Relaxed) < 2 {
                    assert!(since.elapsed() < Duration::from_secs(10), "41 not counted");
                    std::thread::yield_now();
                }
                assert_eq!(d.zero_faults.load(Ordering::Relaxed), 2);
                // A thread faulting on stale page 20 waits until it comes.
                let waiter = reader(20);
                let asked = Instant::now();
                while !lock(&d.pending).contains_key(&20) {
                    assert!(
                        asked.elapsed() < Duration::from_secs(10),
                        "page 20 read stale"
                    );
                    std::thread::yield_now();
                }
                // A batch of 16..19 whose stream ends early books nothing.
                let short = [page(1), page(2)].concat();
                let offsets = [16 * PAGE_SIZE, 17 * PAGE_SIZE, 18 * PAGE_SIZE];
                assert!(d
                    .receive_straight(&mut short.as_slice(), &offsets, false, &mut scratch)
                    .is_err());
                assert!(!(16..19).any(|p| d.received(p)));
                // A fault's answer: page 20 first, then its window 21, 22.
                let answer_20 = [page(30), page(31), page(32)].concat();
                let offsets = [20 * PAGE_SIZE, 21 * PAGE_SIZE, 22 * PAGE_SIZE];
                let mut stream = answer_20.as_slice();
                d.receive_straight(&mut stream, &offsets, true, &mut scratch)
                    .unwrap();
                assert!(stream.is_empty());
                assert_eq!(answer(waiter, 20), 30);
                // 16..22 in full: 20..22 again, read and dropped.
                let full: Vec<u8> = (16..23).flat_map(|p| page(p as u8)).collect();
                let offsets: Vec<u64> = (16..23).map(|p| p * PAGE_SIZE).collect();
                let mut stream = full.as_slice();
                d.receive_straight(&mut stream, &offsets, false, &mut scratch)
                    .unwrap();
                assert!(stream.is_empty(), "the duplicates were read too");
                // Page 23 is zero on the source now: its stale copy goes.
                d.fill(23 * PAGE_SIZE, 1, None, false).unwrap();
                let done = rx.recv_timeout(Duration::from_secs(10));
                assert!(matches!(done, Ok(Ok(()))), "every page came: {done:?}");
            }));
            d.stop.store(true, Ordering::Release);
            if let Err(panic) = checks {
                let _ = d.map.unregister(&d.uffd);
                std::panic::resume_unwind(panic);
            }
            faults.join().unwrap().unwrap();
        });
        d.map.unregister(&d.uffd).unwrap();
        // Every page that came counts as data (read before `byte` maps any).
        let data = ram.data_extents().unwrap();
        for p in 16..23 {
            let off = p * PAGE_SIZE;
            assert!(
                data.iter().any(|&(o, l)| (o..o + l).contains(&off)),
                "page {p} not in {data:x?}"
            );
        }
        let got: Vec<u8> = (16..24).chain([40, 41, 42]).map(byte).collect();
        assert_eq!(got, vec![16, 17, 18, 19, 30, 31, 32, 0, 7, 0, 6]);
        assert_eq!(d.duplicate.load(Ordering::Relaxed), 3);
        assert_eq!(d.filled.load(Ordering::Relaxed), 8);
        assert_eq!(d.demand.load(Ordering::Relaxed), 1, "page 20 was asked for");
    }

    /// A received page of prefaulted memory whose guest mapping was dropped
    /// (reclaim, swap) faults again, a minor fault: it is mapped again.
    /// Before, it was only woken, and its reader faulted on it for ever.
    #[test]
    fn a_received_page_unmapped_again_is_mapped_again() {
        let ram = vmm::GuestRam::with_huge_pages(16 << 20, false).unwrap();
        ram.prefault().unwrap();
        let ram = Arc::new(ram);
        let Ok(uffd) = Uffd::for_minor_faults(false) else {
            eprintln!("SKIP: no minor-fault userfaultfd here");
            return;
        };
        let map = RamMap::new(&ram);
        let pages = ram.size() / PAGE_SIZE;
        let at = |pfn: u64| ram.offset_to_gpa(pfn * PAGE_SIZE).unwrap();
        let mut expected = vec![0u64; pages.div_ceil(64) as usize];
        expected[0] = 0b11 << 20; // pages 20, 21
        unmap_from_guest(&map, &[(20 * PAGE_SIZE, 2 * PAGE_SIZE)]).unwrap();
        map.register(&uffd, true).unwrap();
        let (tx, _rx) = mpsc::channel();
        let mut d = Dest::new(uffd, map, pages, expected, tx);
        d.direct = Direct::for_ram(&ram);
        let byte = |pfn: u64| {
            let mut b = [0u8; 1];
            ram.read(at(pfn), &mut b).unwrap();
            b[0]
        };
        let mut scratch = vec![0u8; 8 * PAGE_SIZE as usize];
        std::thread::scope(|sc| {
            let faults = sc.spawn(|| d.handle_faults());
            let reader = |pfn: u64| guest_read(sc, move || byte(pfn));
            let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut stream = &vec![30u8; PAGE_SIZE as usize][..];
                d.receive_straight(&mut stream, &[20 * PAGE_SIZE], false, &mut scratch)
                    .unwrap();
                assert_eq!(answered(&d, reader(20), 20), 30);
                // The entry goes, as reclaim takes it; the page stays in the file.
                let host = d.map.host(20 * PAGE_SIZE).unwrap();
                // SAFETY: drops one page of the guest's mapping of RAM; its
                // data stay in the memfd.
                unsafe { vmm::memory::drop_from_mapping(host as *mut u8, PAGE_SIZE as usize) }
                    .unwrap();
                assert_eq!(answered(&d, reader(20), 20), 30);
            }));
            d.stop.store(true, Ordering::Release);
            let _ = d.map.unregister(&d.uffd);
            let _ = faults.join();
            if let Err(p) = checks {
                std::panic::resume_unwind(p);
            }
        });
    }
}
