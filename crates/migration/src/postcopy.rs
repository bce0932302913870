//! Post-copy and hybrid live migration.
//!
//! Source: (hybrid only) pre-copy rounds as in [`crate::precopy`]; then pause,
//! `Zero` for dirty pages that are zero now (hybrid), `PageMap` (the pages the
//! destination must still receive), `UrgentListen` (a port on the source the
//! destination connects back to), `State`; the commit exchange (Ready, Go,
//! Confirm) is the pre-copy one, so the source never runs the VM again after Go.
//! After Confirm the destination runs the VM while pages arrive three ways,
//! each page exactly once from the source's point of view:
//!
//! - active push: the source streams every page not yet sent on the main
//!   connection, from a cursor that is re-centred on the latest fault;
//! - demand paging: the destination's fault thread reads userfaultfd events
//!   and sends `PageRequest` on the urgent channel (a second TCP connection, so
//!   requests and answers never wait behind bulk pushes);
//! - pre-paging: the source answers a request with the page plus up to
//!   `prepaging_window` following pages not yet sent.
//!
//! A demanded page is always sent, even if the push already sent it (it may be
//! in flight behind megabytes of bulk data); the destination counts the second
//! arrival (`UFFDIO_COPY` says EEXIST) as a duplicate. When every expected page
//! has arrived the destination unregisters userfaultfd and sends
//! `PostcopyDone` with its statistics; only then does the source report the
//! migration completed (and its process may drop the VM's memory).
//!
//! Destination: guest RAM is registered with userfaultfd (missing mode; the
//! memfd is shared memory, filled with `UFFDIO_COPY`) before the state is
//! loaded. Faults on pages that are not expected (zero pages, never sent) are
//! filled with zeros locally. In hybrid mode the expected pages already hold
//! stale pre-copy data: their holes are punched first so that they fault.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::memory::{is_zero_page, PAGE_SIZE};
use vmm::{PreparedVm, Vm, VmExit, VmState};
use wire::{Message, PostcopyReport, KIND_CONTROL, MAX_BATCH_PAGES};

use crate::incoming::IncomingStats;
use crate::memview::MemView;
use crate::precopy::{self, for_each_set, popcount, Job, Outcome, Params, Sender};
use crate::stats::{DowntimePhases, FaultStats};
use crate::{io_err, Error, Result};

/// Pages per push batch: small enough that a re-centred cursor takes effect soon.
const PUSH_BATCH: usize = 64;

use crate::uffd::{RamMap, Uffd};

/// A page-aligned buffer of up to [`MAX_BATCH_PAGES`] pages.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; PAGE_SIZE as usize]);

fn pages_as_bytes(p: &mut [Page]) -> &mut [u8] {
    // SAFETY: Page is plain bytes; the slice covers exactly the pages.
    unsafe { std::slice::from_raw_parts_mut(p.as_mut_ptr() as *mut u8, std::mem::size_of_val(p)) }
}

fn bit(bits: &[u64], pfn: u64) -> bool {
    bits[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
}

fn to_runs(bits: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let _ = for_each_set(bits, |pfn| {
        let off = pfn * PAGE_SIZE;
        match runs.last_mut() {
            Some((o, n)) if *o + *n * PAGE_SIZE == off => *n += 1,
            _ => runs.push((off, 1)),
        }
        Ok(())
    });
    runs
}

// ---------------------------------------------------------------------------
// Source.
// ---------------------------------------------------------------------------

/// Migrates `vm` to `params.to` in post-copy mode (`hybrid`: pre-copy rounds
/// first). Returns `Completed` only once the destination has every page; until
/// then the source keeps its (paused) copy of memory and serves it.
pub fn migrate(vm: &Vm, params: &Params, job: &Job, hybrid: bool) -> Outcome {
    let mode = if hybrid { "hybrid" } else { "postcopy" };
    precopy::drive(vm, params, job, mode, |start, paused_at| {
        run(vm, params, job, start, paused_at, hybrid)
    })
}

/// What the source shares between its push and urgent threads.
struct Supply<'a> {
    mem: &'a MemView,
    job: &'a Job,
    expected: Vec<u64>,
    claimed: Vec<AtomicU64>,
    remaining: AtomicU64,
    /// Where the push goes on (a pfn), or u64::MAX.
    recentre: AtomicU64,
    stop: AtomicBool,
    window: u64,
    /// Bandwidth cap of the background push, bytes/s (demand answers are never held back).
    push_cap: Option<u64>,
}

impl Supply<'_> {
    /// Marks `pfn` as sent; true if nobody had sent it yet.
    fn claim(&self, pfn: u64) -> bool {
        let b = 1u64 << (pfn % 64);
        let prev = self.claimed[(pfn / 64) as usize].fetch_or(b, Ordering::AcqRel);
        if prev & b == 0 {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    fn send(&self, w: &mut TcpStream, offsets: &[u64]) -> Result<()> {
        let pages: Vec<&[u8]> = offsets.iter().filter_map(|&o| self.mem.page(o)).collect();
        wire::write_pages(w, offsets, &pages)?;
        let n = offsets.len() as u64;
        self.job.update(|s| {
            s.pages.sent += n;
            s.bytes += 9 + n * (8 + PAGE_SIZE);
            s.remaining_bytes = self.remaining.load(Ordering::Relaxed) * PAGE_SIZE;
        });
        Ok(())
    }

    /// Background push on the main connection until every page is claimed.
    fn push(&self, mut w: TcpStream) -> Result<()> {
        let pages = self.mem.pages();
        let words = self.expected.len();
        let mut pos: u64 = 0;
        let mut batch = Vec::with_capacity(PUSH_BATCH);
        let started = Instant::now();
        let mut pushed: u64 = 0;
        while !self.stop.load(Ordering::Relaxed) && self.remaining.load(Ordering::Acquire) > 0 {
            let r = self.recentre.swap(u64::MAX, Ordering::AcqRel);
            if r != u64::MAX && r < pages {
                pos = r;
            }
            batch.clear();
            let mut scanned = 0usize;
            let mut wi = (pos / 64) as usize;
            let mut first = true;
            while batch.len() < PUSH_BATCH && scanned <= words {
                let mut avail = self.expected[wi] & !self.claimed[wi].load(Ordering::Acquire);
                if first {
                    // Start at `pos` within its word.
                    avail &= !0u64 << (pos % 64);
                    first = false;
                }
                while avail != 0 && batch.len() < PUSH_BATCH {
                    let b = avail.trailing_zeros() as u64;
                    avail &= avail - 1;
                    let pfn = wi as u64 * 64 + b;
                    if self.claim(pfn) {
                        batch.push(pfn * PAGE_SIZE);
                        pos = pfn + 1;
                    }
                }
                if batch.len() < PUSH_BATCH {
                    wi = (wi + 1) % words;
                    scanned += 1;
                    pos = wi as u64 * 64;
                }
            }
            if batch.is_empty() {
                // Everything is claimed (maybe by the urgent thread): done.
                break;
            }
            self.send(&mut w, &batch)?;
            pushed += batch.len() as u64 * PAGE_SIZE;
            if let Some(cap) = self.push_cap {
                let due = Duration::from_secs_f64(pushed as f64 / cap as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    std::thread::sleep(due - elapsed);
                }
            }
        }
        Ok(())
    }

    /// Answers fault requests on the urgent channel.
    fn serve(&self, urgent: TcpStream) -> Result<()> {
        let mut w = urgent.try_clone().map_err(io_err("socket"))?;
        let mut r = BufReader::new(urgent);
        let pages = self.mem.pages();
        let mut batch = Vec::with_capacity(MAX_BATCH_PAGES);
        loop {
            let msg = match wire::expect_control(&mut r, "PageRequest") {
                Ok(m) => m,
                Err(_) if self.stop.load(Ordering::Relaxed) => return Ok(()),
                Err(wire::WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Err(e) => return Err(e.into()),
            };
            let Message::PageRequest { offset } = msg else {
                return Err(Error::Protocol(format!(
                    "expected PageRequest on the urgent channel, got {}",
                    msg.name()
                )));
            };
            let pfn = offset / PAGE_SIZE;
            if !offset.is_multiple_of(PAGE_SIZE) || pfn >= pages || !bit(&self.expected, pfn) {
                return Err(Error::Protocol(format!(
                    "request for page {offset:#x}, which is not to be sent"
                )));
            }
            // The demanded page goes even if the push sent it already: it may be
            // queued behind bulk data on the main connection.
            self.claim(pfn);
            batch.clear();
            batch.push(offset);
            let mut p = pfn + 1;
            while (batch.len() as u64) <= self.window && p < pages && batch.len() < MAX_BATCH_PAGES
            {
                if bit(&self.expected, p) && self.claim(p) {
                    batch.push(p * PAGE_SIZE);
                }
                p += 1;
            }
            self.send(&mut w, &batch)?;
            self.recentre.store(p.min(pages - 1), Ordering::Release);
        }
    }
}

fn run(
    vm: &Vm,
    params: &Params,
    job: &Job,
    start: Instant,
    paused_at: &mut Option<Instant>,
    hybrid: bool,
) -> Result<Outcome> {
    let mode = if hybrid { "hybrid" } else { "postcopy" };
    let stream = precopy::open(vm, params, job, start, mode)?;
    let ram = vm.ram().clone();
    let mem = MemView::new(&ram);
    let pages = mem.pages();
    let mut tx = Sender::new(
        stream.try_clone().map_err(io_err("socket"))?,
        &mem,
        job,
        params.max_bandwidth,
    );
    job.update(|s| s.prepaging_window = params.prepaging_window);
    let todo = if hybrid {
        let limit = params
            .postcopy_after_rounds
            .clamp(1, params.max_rounds.max(1));
        Some(precopy::rounds(vm, params, job, &mut tx, limit, true)?.0)
    } else {
        None
    };
    // The urgent channel: the destination connects back to us, so that it works
    // the same whoever accepted the main connection (`--incoming` or a daemon).
    let local = stream.local_addr().map_err(io_err("socket address"))?;
    let listener = TcpListener::bind((local.ip(), 0)).map_err(io_err("urgent channel listener"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("urgent channel listener"))?
        .port();
    let token = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ ((std::process::id() as u64) << 32);

    // Switch: pause, tell the destination what it still needs, send the state.
    let pause_start = Instant::now();
    vm.pause();
    *paused_at = Some(pause_start);
    let mut phases = DowntimePhases {
        pause_us: pause_start.elapsed().as_micros() as u64,
        ..Default::default()
    };
    let mut lap = Instant::now();
    let mut stamp = |slot: &mut u64| {
        *slot = lap.elapsed().as_micros() as u64;
        lap = Instant::now();
    };
    let candidates = match todo {
        Some(mut todo) => {
            let last = vm.take_dirty_bitmap()?;
            for (t, l) in todo.iter_mut().zip(&last) {
                *t |= *l;
            }
            todo
        }
        None => precopy::data_pages(&ram, pages)?,
    };
    let mut expected = vec![0u64; candidates.len()];
    let mut zero = 0u64;
    for_each_set(&candidates, |pfn| {
        let off = pfn * PAGE_SIZE;
        let page = mem
            .page(off)
            .ok_or_else(|| Error::Protocol(format!("page {pfn} outside RAM")))?;
        if is_zero_page(page) {
            zero += 1;
            if hybrid {
                // The destination may hold older data there.
                match tx.zero_ranges.last_mut() {
                    Some((o, n)) if *o + *n * PAGE_SIZE == off => *n += 1,
                    _ => tx.zero_ranges.push((off, 1)),
                }
            }
        } else {
            expected[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
        Ok(())
    })?;
    tx.flush()?;
    let total = popcount(&expected);
    tx.write_control(&Message::PageMap {
        runs: to_runs(&expected),
    })?;
    tx.write_control(&Message::UrgentListen { port, job: token })?;
    stamp(&mut phases.final_pages_us);
    let blob = vm.capture()?.encode()?;
    tx.write_control(&Message::State { blob })?;
    stamp(&mut phases.state_us);
    let bytes = tx.bytes;
    job.update(|s| {
        s.pages.zero += zero;
        s.pages.expected = total;
        s.remaining_bytes = total * PAGE_SIZE;
        s.bytes = bytes;
    });
    let urgent = accept_urgent(&listener, token)?;
    drop(listener);
    let mut rx = stream;
    crate::precopy::expect_ready(&mut rx)?;
    stamp(&mut phases.destination_ready_us);
    job.check_cancel()?;
    // Commit point: from here on the source never resumes on its own.
    tx.write_control(&Message::Go)?;
    let confirm = crate::precopy::expect_confirm(&mut rx);
    let downtime = pause_start.elapsed().as_secs_f64() * 1e3;
    stamp(&mut phases.go_confirm_us);
    job.update(|s| {
        s.downtime_phases = Some(phases);
        s.downtime_ms = downtime;
        s.status = "postcopy-active".into();
    });
    if let Err(why) = confirm {
        return Ok(Outcome::Unconfirmed(why));
    }
    tracing::info!(
        downtime_ms = downtime,
        pages = total,
        "post-copy: destination runs the VM"
    );
    match postcopy_phase(&mem, job, params, expected, total, rx, urgent) {
        Ok(report) => {
            tracing::info!(?report, "post-copy completed");
            Ok(Outcome::Completed)
        }
        Err(e) => Ok(Outcome::Unconfirmed(format!(
            "post-copy failed after the switch ({e}); the source copy is kept paused"
        ))),
    }
}

fn accept_urgent(listener: &TcpListener, token: u64) -> Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .map_err(io_err("urgent channel listener"))?;
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false).map_err(io_err("urgent channel"))?;
                s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(io_err("socket timeout"))?;
                match wire::expect_control(&mut s, "UrgentHello") {
                    Ok(Message::UrgentHello { job }) if job == token => {
                        s.set_read_timeout(None).map_err(io_err("socket timeout"))?;
                        return Ok(s);
                    }
                    other => tracing::warn!(%peer, ?other, "not our urgent channel: dropped"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > end {
                    return Err(Error::Protocol(
                        "the destination never opened the urgent channel".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(io_err("urgent channel")(e)),
        }
    }
}

/// After Confirm: push, serve faults, wait for PostcopyDone.
fn postcopy_phase(
    mem: &MemView,
    job: &Job,
    params: &Params,
    expected: Vec<u64>,
    total: u64,
    mut rx: TcpStream,
    urgent: TcpStream,
) -> Result<PostcopyReport> {
    let supply = Supply {
        mem,
        job,
        claimed: expected.iter().map(|_| AtomicU64::new(0)).collect(),
        expected,
        remaining: AtomicU64::new(total),
        recentre: AtomicU64::new(u64::MAX),
        stop: AtomicBool::new(false),
        window: params.prepaging_window as u64,
        push_cap: params.max_bandwidth,
    };
    let push_stream = rx.try_clone().map_err(io_err("socket"))?;
    let urgent_ctl = urgent.try_clone().map_err(io_err("socket"))?;
    // The destination may run for long before all pages are there: no timeout;
    // a vanished destination shows as EOF or a reset.
    rx.set_read_timeout(None)
        .map_err(io_err("socket timeout"))?;
    let started = Instant::now();
    let result = std::thread::scope(|sc| {
        let s = &supply;
        let pusher = sc.spawn(move || s.push(push_stream));
        let server = sc.spawn(move || s.serve(urgent));
        let done = wire::expect_control(&mut rx, "PostcopyDone");
        supply.stop.store(true, Ordering::Relaxed);
        let _ = urgent_ctl.shutdown(Shutdown::Both);
        let pushed = pusher.join();
        let served = server.join();
        let report = match done? {
            Message::PostcopyDone { report } => report,
            Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
            other => {
                return Err(Error::Protocol(format!(
                    "expected PostcopyDone, got {}",
                    other.name()
                )))
            }
        };
        for r in [pushed, served] {
            match r {
                Ok(Err(e)) => tracing::debug!("post-copy thread ended with {e} after completion"),
                Err(_) => return Err(Error::Protocol("a post-copy thread panicked".into())),
                Ok(Ok(())) => {}
            }
        }
        Ok(report)
    })?;
    let report = result;
    job.update(|s| {
        s.pages.demand = report.demand;
        s.pages.pushed = report.pushed;
        s.pages.prepaged = report.prepaged;
        s.pages.duplicate = report.duplicate;
        s.remaining_bytes = 0;
        s.resume_ms = report.resume_to_last_us as f64 / 1e3;
        s.faults = FaultStats {
            count: report.faults,
            p50_us: report.p50_us,
            p99_us: report.p99_us,
            max_us: report.max_us,
            zero: report.zero_faults,
        };
    });
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        "post-copy phase over"
    );
    Ok(report)
}

// ---------------------------------------------------------------------------
// Destination.
// ---------------------------------------------------------------------------

/// How a page reached the destination.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Push,
    Demand,
    Prepage,
}

/// Destination state shared by the fault, urgent, push and completion threads.
struct Dest {
    uffd: Uffd,
    /// (memfd offset, len, host address).
    map: RamMap,
    pages: u64,
    expected: Vec<u64>,
    received: Vec<AtomicU64>,
    total: u64,
    filled: AtomicU64,
    pending: Mutex<HashMap<u64, Instant>>,
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
    stop: AtomicBool,
    done: Mutex<Option<mpsc::Sender<Result<()>>>>,
}

impl Dest {
    fn received(&self, pfn: u64) -> bool {
        self.received[(pfn / 64) as usize].load(Ordering::Acquire) & (1 << (pfn % 64)) != 0
    }

    fn finish(&self, r: Result<()>) {
        if let Some(tx) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(r);
        }
    }

    /// Fills the page at `off` with `data`.
    fn fill(&self, off: u64, data: &[u8], via: Via) -> Result<()> {
        let pfn = off / PAGE_SIZE;
        if !off.is_multiple_of(PAGE_SIZE) || pfn >= self.pages || !bit(&self.expected, pfn) {
            return Err(Error::Protocol(format!(
                "page {off:#x} was not announced in the PageMap"
            )));
        }
        let host = self
            .map
            .host(off)
            .ok_or_else(|| Error::Protocol(format!("page {off:#x} outside RAM")))?;
        if !self
            .uffd
            .copy(host, data)
            .map_err(io_err(format!("UFFDIO_COPY at {off:#x}")))?
        {
            self.duplicate.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.received[(pfn / 64) as usize].fetch_or(1 << (pfn % 64), Ordering::AcqRel);
        match via {
            Via::Push => &self.pushed,
            Via::Demand => &self.demand,
            Via::Prepage => &self.prepaged,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.last_fill_ns
            .fetch_max(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let asked = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pfn);
        if let Some(at) = asked {
            self.latencies_us
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(at.elapsed().as_micros() as u64);
        }
        if self.filled.fetch_add(1, Ordering::AcqRel) + 1 == self.total {
            self.finish(Ok(()));
        }
        Ok(())
    }

    /// Reads page batches from `r` and fills them; the first page of a batch on
    /// the urgent channel is the demanded one.
    fn receive_pages(&self, r: &mut impl Read, urgent: bool) -> Result<()> {
        let mut buf = vec![Page([0; PAGE_SIZE as usize]); MAX_BATCH_PAGES];
        loop {
            let h = wire::read_header(r)?;
            if h.kind == KIND_CONTROL {
                return match wire::read_control_body(r, h.body_len)? {
                    Message::Cancel { reason } => Err(Error::PeerCancelled(reason)),
                    other => Err(Error::Protocol(format!(
                        "unexpected {} during post-copy",
                        other.name()
                    ))),
                };
            }
            let offsets = wire::read_batch_offsets(r, h.body_len)?;
            let data = pages_as_bytes(&mut buf[..offsets.len()]);
            r.read_exact(data).map_err(wire::WireError::from)?;
            for (i, &off) in offsets.iter().enumerate() {
                let via = match (urgent, i) {
                    (false, _) => Via::Push,
                    (true, 0) => Via::Demand,
                    (true, _) => Via::Prepage,
                };
                let p = &data[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
                self.fill(off, p, via)?;
            }
        }
    }

    /// The fault thread: zero pages are filled here, others asked for.
    fn handle_faults(&self, mut urgent: TcpStream) -> Result<()> {
        let zero = Page([0; PAGE_SIZE as usize]);
        let mut addrs = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            addrs.clear();
            self.uffd
                .read_faults(50, &mut addrs)
                .map_err(io_err("reading userfaultfd"))?;
            for &addr in &addrs {
                let page_addr = addr & !(PAGE_SIZE - 1);
                let Some(off) = self.map.offset(page_addr) else {
                    tracing::warn!(addr, "fault outside guest RAM");
                    continue;
                };
                let pfn = off / PAGE_SIZE;
                if !bit(&self.expected, pfn) {
                    // Zero on the source: never sent.
                    match self.uffd.copy(page_addr, &zero.0) {
                        Ok(true) => {
                            self.zero_faults.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) if self.stop.load(Ordering::Relaxed) => {
                            tracing::debug!("zero fill after completion: {e}")
                        }
                        Err(e) => return Err(io_err("UFFDIO_COPY (zero page)")(e)),
                    }
                    continue;
                }
                if self.received(pfn) {
                    let _ = self.uffd.wake(page_addr, PAGE_SIZE);
                    continue;
                }
                {
                    let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                    if p.contains_key(&pfn) {
                        continue; // already asked for
                    }
                    p.insert(pfn, Instant::now());
                }
                if self.received(pfn) {
                    // Arrived in between.
                    self.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&pfn);
                    let _ = self.uffd.wake(page_addr, PAGE_SIZE);
                    continue;
                }
                self.faults.fetch_add(1, Ordering::Relaxed);
                wire::write_control(&mut urgent, &Message::PageRequest { offset: off })?;
            }
        }
        Ok(())
    }

    fn report(&self) -> PostcopyReport {
        let mut l = self
            .latencies_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
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
        }
    }
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(io_err(format!("starting the {name} thread")))
}

/// Destination side, from the `PageMap` on: registers guest RAM with
/// userfaultfd, opens the urgent channel, loads the state, does the commit
/// exchange and returns the running VM; pages keep arriving in the background.
pub(crate) fn receive(
    prepared: PreparedVm,
    r: BufReader<TcpStream>,
    mut out: TcpStream,
    runs: Vec<(u64, u64)>,
    mut stats: IncomingStats,
    on_running: &dyn Fn(),
) -> Result<(Vm, IncomingStats)> {
    let mut r = r;
    let ram = prepared.ram().clone();
    let pages = ram.size() / PAGE_SIZE;
    let mut expected = vec![0u64; pages.div_ceil(64) as usize];
    let memfd = ram.memfd().as_raw_fd();
    for &(off, n) in &runs {
        let end = (off / PAGE_SIZE).checked_add(n);
        if !off.is_multiple_of(PAGE_SIZE) || n == 0 || end.is_none_or(|e| e > pages) {
            return Err(Error::Protocol(format!(
                "PageMap run {off:#x}+{n} outside the guest's RAM"
            )));
        }
        for pfn in off / PAGE_SIZE..off / PAGE_SIZE + n {
            expected[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
        // Hybrid: what pre-copy left there is stale; make it fault.
        // SAFETY: fallocate on the memfd we own; no mapping is invalidated.
        let rc = unsafe {
            libc::fallocate(
                memfd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                (n * PAGE_SIZE) as i64,
            )
        };
        if rc < 0 {
            return Err(io_err("punching stale pages")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    let total = popcount(&expected);
    let uffd = Uffd::new().map_err(io_err("userfaultfd"))?;
    let map = RamMap::new(&ram);
    map.register(&uffd)
        .map_err(io_err("registering guest RAM with userfaultfd"))?;
    let (done_tx, done_rx) = mpsc::channel();
    let dest = Arc::new(Dest {
        uffd,
        map,
        pages,
        received: expected.iter().map(|_| AtomicU64::new(0)).collect(),
        expected,
        total,
        filled: AtomicU64::new(0),
        pending: Mutex::new(HashMap::new()),
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
        done: Mutex::new(Some(done_tx)),
    });
    tracing::debug!(
        pages = total,
        "post-copy: guest RAM registered with userfaultfd"
    );

    // UrgentListen, then State.
    let mut urgent: Option<TcpStream> = None;
    let state = loop {
        match wire::expect_control(&mut r, "UrgentListen or State")? {
            Message::UrgentListen { port, job } => {
                let ip = r
                    .get_ref()
                    .peer_addr()
                    .map_err(io_err("peer address"))?
                    .ip();
                let mut s = TcpStream::connect_timeout(
                    &std::net::SocketAddr::new(ip, port),
                    Duration::from_secs(10),
                )
                .map_err(io_err(format!("opening the urgent channel to {ip}:{port}")))?;
                s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
                wire::write_control(&mut s, &Message::UrgentHello { job })?;
                urgent = Some(s);
            }
            Message::State { blob } => break VmState::decode(&blob)?,
            Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {} after the PageMap",
                    other.name()
                )))
            }
        }
    };
    let urgent =
        urgent.ok_or_else(|| Error::Protocol("State arrived before UrgentListen".into()))?;
    let faults = {
        let d = dest.clone();
        let w = urgent.try_clone().map_err(io_err("socket"))?;
        spawn("uffd-faults", move || {
            let r = d.handle_faults(w);
            if let Err(e) = &r {
                tracing::error!("post-copy fault thread: {e}");
                d.finish(Err(Error::Protocol(format!("fault thread: {e}"))));
            }
        })?
    };
    let urgent_rx = {
        let d = dest.clone();
        let mut rd = BufReader::new(urgent.try_clone().map_err(io_err("socket"))?);
        spawn("urgent-pages", move || {
            if let Err(e) = d.receive_pages(&mut rd, true) {
                if !d.stop.load(Ordering::Relaxed) {
                    d.finish(Err(e));
                }
            }
        })?
    };

    let fail = |e: Error| {
        dest.stop.store(true, Ordering::Relaxed);
        let _ = urgent.shutdown(Shutdown::Both);
        e
    };
    let vm = prepared.load(&state).map_err(|e| fail(e.into()))?;
    wire::write_control(&mut out, &Message::Ready).map_err(|e| fail(e.into()))?;
    match wire::expect_control(&mut r, "Go").map_err(|e| fail(e.into()))? {
        Message::Go => {}
        Message::Cancel { reason } => return Err(fail(Error::PeerCancelled(reason))),
        other => {
            return Err(fail(Error::Protocol(format!(
                "expected Go, got {}",
                other.name()
            ))))
        }
    }
    dest.resumed_ns
        .store(dest.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    stats.resume_us = crate::incoming::resume_and_confirm(&vm, &mut out, on_running)?;
    if total == 0 {
        dest.finish(Ok(()));
    }

    let push_rx = {
        let d = dest.clone();
        spawn("push-pages", move || {
            if let Err(e) = d.receive_pages(&mut r, false) {
                if !d.stop.load(Ordering::Relaxed) {
                    d.finish(Err(e));
                }
            }
        })?
    };
    let control = vm.exit_watch();
    let main_sock = out.try_clone().map_err(io_err("socket"))?;
    spawn("postcopy-done", move || {
        let result = done_rx
            .recv()
            .unwrap_or_else(|_| Err(Error::Protocol("post-copy threads vanished".into())));
        dest.stop.store(true, Ordering::Relaxed);
        match result {
            Ok(()) => {
                if let Err(e) = dest.map.unregister(&dest.uffd) {
                    tracing::warn!("unregistering userfaultfd: {e}");
                }
                let report = dest.report();
                tracing::info!(
                    pages = dest.total,
                    demand = report.demand,
                    pushed = report.pushed,
                    prepaged = report.prepaged,
                    duplicate = report.duplicate,
                    faults = report.faults,
                    p50_us = report.p50_us,
                    p99_us = report.p99_us,
                    resume_to_last_ms = report.resume_to_last_us as f64 / 1e3,
                    "post-copy complete: every page is here"
                );
                if let Err(e) = wire::write_control(&mut out, &Message::PostcopyDone { report }) {
                    tracing::warn!("sending PostcopyDone: {e}");
                }
                let _ = out.flush();
            }
            Err(e) => {
                // The guest cannot go on without its memory.
                tracing::error!("post-copy failed: {e}");
                control.stop(VmExit::Failed(format!("post-copy failed: {e}")));
            }
        }
        let _ = urgent.shutdown(Shutdown::Both);
        let _ = main_sock.shutdown(Shutdown::Both);
        let _ = faults.join();
        let _ = urgent_rx.join();
        let _ = push_rx.join();
    })?;
    Ok((vm, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_from_bitmap() {
        let mut b = vec![0u64; 2];
        for pfn in [0u64, 1, 2, 5, 63, 64, 65, 127] {
            b[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
        assert_eq!(
            to_runs(&b),
            vec![(0, 3), (5 * 4096, 1), (63 * 4096, 3), (127 * 4096, 1)]
        );
    }

    #[test]
    fn uffd_fills_missing_pages_once() {
        let ram = vmm::GuestRam::new(16 << 20).unwrap();
        let mem = MemView::new(&ram);
        mem.page_mut(0).unwrap().fill(7);
        let (r, host) = ram.host_ranges()[0];
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) => {
                eprintln!("SKIP: userfaultfd unavailable: {e}");
                return;
            }
        };
        uffd.register(host as u64, r.len).unwrap();
        let page = Page([9; PAGE_SIZE as usize]);
        // Present page (written before registration): EEXIST.
        assert!(!uffd.copy(host as u64, &page.0).unwrap());
        // Missing page: filled, then EEXIST.
        let p1 = host as u64 + PAGE_SIZE;
        assert!(uffd.copy(p1, &page.0).unwrap());
        assert!(!uffd.copy(p1, &page.0).unwrap());
        assert_eq!(mem.page(PAGE_SIZE).unwrap()[0], 9);
        // A punched page is missing again.
        let rc = unsafe {
            libc::fallocate(
                ram.memfd().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                PAGE_SIZE as i64,
            )
        };
        assert_eq!(rc, 0);
        assert!(uffd.copy(host as u64, &page.0).unwrap());
        uffd.unregister(host as u64, r.len).unwrap();
        assert_eq!(mem.page(0).unwrap()[0], 9);
    }
}
