//! Destination side: receives pages into a fresh memfd, then the state,
//! rebuilds the VM paused, answers Ready, and resumes only on Go.

use link::{Link, TlsSetup};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use vmm::memory::PAGE_SIZE;
use vmm::{GuestRam, PreparedVm, Vm, VmState};
use wire::{Message, KIND_CONTROL, KIND_ZPAGES};

use crate::memview::MemView;
use crate::zerocopy::Splicer;
use crate::{io_err, Error, Result};

/// What the destination measured.
#[derive(Clone, Default)]
pub struct IncomingStats {
    /// Pages received.
    pub pages: u64,
    /// Bytes received (payload).
    pub bytes: u64,
    /// Rounds seen.
    pub rounds: u32,
    /// Go → vCPUs running, µs.
    pub resume_us: u64,
    /// Verify mode: the memory digest matched.
    pub verified: bool,
    /// Post-copy: the phase that goes on after the VM runs.
    pub postcopy: Option<crate::postcopy::PostcopyWatch>,
}

/// Receives a VM over `stream` (after the handshake) into `prepared`, and
/// runs it. `prepared` (memory, vCPUs) is built before, as early as the
/// caller can: building it takes ~10 ms here, nearly all of it waiting in
/// the kernel (`KVM_CREATE_IRQCHIP`), and the source waits for `Prepared`.
///
/// `on_running` is called once `Go` is read, before the vCPUs run and the
/// source is told: from then on the VM is this side's to run (a stop must
/// not end the arrival in between), and whoever reports this VM's state
/// never lags behind the source.
///
/// A stop through `abandon` before `Go` ends it with [`Error::Cancelled`],
/// the source told why.
pub fn receive(
    stream: Link,
    prepared: PreparedVm,
    tls: Option<&TlsSetup>,
    on_running: &dyn Fn(),
    abandon: &Abandon,
) -> Result<(Vm, IncomingStats)> {
    if !abandon.begin() {
        return Err(Error::Cancelled);
    }
    let out = stream.try_clone().ok();
    let result = receive_vm(stream, prepared, tls, on_running, abandon);
    match (result, abandon.reason()) {
        (Err(e), Some(why)) => {
            tracing::debug!("receiving ended by the stop: {e}");
            send_reason(&mut { out }, &why);
            Err(Error::Cancelled)
        }
        (r, _) => r,
    }
}

/// Gives up an incoming migration from another thread (a stop before the
/// VM arrived), so that the source learns why rather than only that the
/// connection broke. Before [`receive`] runs, the source is told at once;
/// while it runs, the reading side of the main connection is shut, which
/// ends its wait for the source, and `receive` tells the source.
#[derive(Clone)]
pub struct Abandon {
    inner: Arc<AbandonInner>,
}

struct AbandonInner {
    /// Whether `receive` has begun, and the reason given, if any.
    state: Mutex<(bool, Option<String>)>,
    /// A reason was given (read at every frame, without the lock).
    given_up: AtomicBool,
    link: Link,
}

impl Abandon {
    /// For the migration arriving on `link`.
    pub fn new(link: &Link) -> Result<Self> {
        let link = link.try_clone().map_err(io_err("socket"))?;
        Ok(Self {
            inner: Arc::new(AbandonInner {
                state: Mutex::new((false, None)),
                given_up: AtomicBool::new(false),
                link,
            }),
        })
    }

    /// Gives the migration up for `why` (the first reason given is kept).
    /// True when [`receive`] tells the source, as it ends (the caller may
    /// wait for that); false when the source was told here.
    pub fn abandon(&self, why: &str) -> bool {
        let mut state = self.state();
        if state.1.is_some() {
            return state.0;
        }
        state.1 = Some(why.to_string());
        self.inner.given_up.store(true, Ordering::Release);
        if state.0 {
            let _ = self.inner.link.shutdown(Shutdown::Read);
        } else {
            // Nothing else writes to the link before `receive` begins.
            send_reason(&mut self.inner.link.try_clone().ok(), why);
        }
        state.0
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (bool, Option<String>)> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `receive` as begun; false if the migration was given up already.
    fn begin(&self) -> bool {
        let mut state = self.state();
        state.0 = true;
        state.1.is_none()
    }

    fn reason(&self) -> Option<String> {
        self.state().1.clone()
    }

    /// Fails once the migration is given up: the receiver asks at every
    /// frame, not only when its socket reports the end (data queued before
    /// the shutdown is still read).
    pub(crate) fn check(&self) -> Result<()> {
        match self.inner.given_up.load(Ordering::Acquire) {
            true => Err(Error::Cancelled),
            false => Ok(()),
        }
    }

    /// Sends `Ready` unless the migration is given up: a stop that came
    /// while the state was decoded, loaded or checked must not let the
    /// source commit (it would then wait, paused, for a VM that never runs
    /// here). Under the lock, so a stop comes before it or after it.
    pub(crate) fn send_ready(&self, out: &mut Link) -> Result<()> {
        let state = self.state();
        if state.1.is_some() {
            return Err(Error::Cancelled);
        }
        wire::write_control(out, &Message::Ready)?;
        drop(state);
        Ok(())
    }
}

/// Tells the source why this side gives the migration up (best effort).
fn send_reason(out: &mut Option<Link>, why: &str) {
    if let Some(out) = out {
        let reason = format!("the destination gave up the incoming VM: {why}");
        let _ = wire::write_control(out, &Message::Cancel { reason });
        let _ = out.flush();
    }
}

fn receive_vm(
    stream: Link,
    prepared: PreparedVm,
    tls: Option<&TlsSetup>,
    on_running: &dyn Fn(),
    abandon: &Abandon,
) -> Result<(Vm, IncomingStats)> {
    // A source that stalls for a minute is gone: give up rather than hang.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .map_err(io_err("socket timeout"))?;
    // Nor may a source that stops reading hold a write of ours for ever
    // (a `Synced`, a `Cancel`).
    stream
        .tcp()
        .set_write_timeout(Some(std::time::Duration::from_secs(60)))
        .map_err(io_err("socket timeout"))?;
    // Ready and Confirm are small and on the downtime's critical path: no Nagle.
    stream.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    let mut out = stream.try_clone().map_err(io_err("socket"))?;
    // Smaller than a page batch: batch data is read straight from the socket
    // into the batch buffer, and only frame headers go through this buffer.
    let mut r = BufReader::with_capacity(READ_BUFFER, stream);
    let mem = MemView::new(prepared.ram());
    wire::write_control(&mut out, &Message::Prepared)?;
    let dst = GuestMem::new(prepared.ram())?;
    let mut writer = PageWriter::new(&dst)?;
    // Plaintext: raw page batches go from the socket into memory by splice,
    // in this thread (one copy, in the kernel); memory on huge pages: read
    // straight into the mapping, also in this thread; TLS: through the writer.
    let mut splicer = splicer_for(&r);
    // This round as the destination sees it: from its first frame to the
    // moment its last page is in memory (delivered, not merely sent).
    let mut round_start: Option<(Instant, u64)> = None;
    let mut stats = IncomingStats::default();
    let mut expected_digest = None;
    let mut channel = None;
    // Compressed batches (capability `zstd`): payload buffer and zstd context,
    // made at the first one.
    let mut zstd: Option<(wire::PageDecompressor, Vec<u8>)> = None;
    // Multifd: the extra page streams, once the source has opened them.
    let mut streams: Option<crate::multifd::Streams> = None;
    // Runs of `PageMapPart`s, before the `PageMap` that ends them.
    let mut page_map: Vec<(u64, u64)> = Vec::new();
    let state = loop {
        // The main connection may be silent for longer than its timeout
        // while the page streams carry the round (a tight cap over many
        // streams): that is no stall as long as their frames arrive. The
        // wait is for the first byte, so a timeout consumes nothing.
        abandon.check()?;
        let h = loop {
            let failed = match r.fill_buf() {
                Ok(_) => match wire::read_header(&mut r) {
                    Ok(h) => break h,
                    Err(e) => Error::from(e),
                },
                Err(e)
                    if crate::timed_out(&e) && streams.as_mut().is_some_and(|s| s.progressed()) =>
                {
                    continue
                }
                Err(e) => wire::WireError::from(e).into(),
            };
            // A page stream that failed shut this connection for reading:
            // its error is the cause, and the source is told.
            return Err(match streams.as_mut().and_then(|s| s.failure()) {
                Some(e) => cancel_with(&mut out, e),
                None => failed,
            });
        };
        tracing::trace!(kind = h.kind, len = h.body_len, "frame");
        round_start.get_or_insert((Instant::now(), stats.pages));
        if h.kind == KIND_ZPAGES {
            let z = wire::read_zbatch_head(&mut r, h.body_len)?;
            let (dctx, payload) = match &mut zstd {
                Some(z) => z,
                None => zstd.insert((wire::PageDecompressor::new()?, Vec::new())),
            };
            payload.resize(z.payload_len, 0);
            r.read_exact(payload).map_err(wire::WireError::from)?;
            let mut batch = writer.buffer()?;
            batch.data.resize(z.raw_len(), 0);
            dctx.decompress(payload, &mut batch.data)?;
            batch.offsets = z.offsets;
            stats.pages += batch.offsets.len() as u64;
            stats.bytes += payload.len() as u64;
            writer.submit(batch)?;
            continue;
        }
        if h.kind != KIND_CONTROL {
            let offsets = wire::read_batch_offsets(&mut r, h.body_len)?;
            if splicer.is_some() || dst.is_mapped() {
                // Stored here and now: batches before it go first.
                writer.drain()?;
                stats.bytes +=
                    receive_pages(&mut r, splicer.as_mut(), &dst, &offsets, &mut Vec::new())?;
                stats.pages += offsets.len() as u64;
                continue;
            }
            let mut batch = writer.buffer()?;
            batch.offsets = offsets;
            batch
                .data
                .resize(batch.offsets.len() * PAGE_SIZE as usize, 0);
            r.read_exact(&mut batch.data)
                .map_err(wire::WireError::from)?;
            stats.pages += batch.offsets.len() as u64;
            stats.bytes += batch.data.len() as u64;
            writer.submit(batch)?;
            continue;
        }
        // Control messages act on memory as it stands after every batch before them.
        writer.drain()?;
        match wire::read_control_body(&mut r, h.body_len)? {
            Message::Zero { ranges } => zero_ranges(&dst, &ranges)?,
            Message::Delta { pages } => {
                stats.pages += pages.len() as u64;
                for (off, delta) in pages {
                    apply_delta(&dst, off, &delta)?;
                }
            }
            Message::Sync { seq } => {
                // Everything before it is stored (control messages wait for the writer).
                wire::write_control(&mut out, &Message::Synced { seq })?;
            }
            Message::RoundEnd { round } => {
                stats.rounds = round.saturating_add(1);
                if let Some((t, p)) = round_start.take() {
                    // scripts/bench/bench.py reads round 0's figures from this line.
                    tracing::info!(
                        round,
                        pages = stats.pages - p,
                        ms = t.elapsed().as_secs_f64() * 1e3,
                        "round stored"
                    );
                }
            }
            Message::State { blob } => {
                let t = Instant::now();
                let state = VmState::decode(&blob)?;
                tracing::debug!(
                    us = t.elapsed().as_micros() as u64,
                    bytes = blob.len(),
                    "state decoded"
                );
                break state;
            }
            Message::Digest { crc32 } => expected_digest = Some(crc32),
            // Post-copy (or hybrid after its rounds): the rest runs under userfaultfd.
            Message::UrgentListen { port, job } => {
                channel = Some(crate::postcopy::open_fault_channel(&out, port, job, tls)?);
            }
            Message::StreamsListen { .. } if streams.is_some() => {
                return Err(Error::Protocol("a second StreamsListen".into()))
            }
            Message::StreamsListen { port, job, count } => {
                match crate::multifd::Streams::open(&out, port, job, count, tls, &dst) {
                    Ok(s) => {
                        streams = Some(s);
                        // Round 0 starts with its first page, not with the set-up.
                        round_start = None;
                    }
                    Err(e) => {
                        let reason = format!("page streams: {e}");
                        let _ = wire::write_control(&mut out, &Message::Cancel { reason });
                        return Err(e);
                    }
                }
            }
            Message::Barrier { seq } => {
                let s = streams
                    .as_mut()
                    .ok_or_else(|| Error::Protocol("Barrier without page streams".into()))?;
                // A stream that failed, or never reached it: the source is told.
                let (pages, bytes) = s.barrier(seq).map_err(|e| cancel_with(&mut out, e))?;
                stats.pages += pages;
                stats.bytes += bytes;
            }
            Message::PageMapPart { runs } => crate::postcopy::gather_page_map_part(
                &mut page_map,
                runs,
                prepared.ram().size() / PAGE_SIZE,
            )?,
            Message::PageMap { mut runs } => {
                if !page_map.is_empty() {
                    page_map.append(&mut runs);
                    runs = page_map;
                }
                drop(streams);
                drop(writer);
                let held = dst.touched_huge_pages();
                return crate::postcopy::receive(
                    prepared, r, out, runs, held, channel, tls, stats, on_running, abandon,
                );
            }
            Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {} during the transfer",
                    other.name()
                )))
            }
        }
    };
    drop(streams);
    drop(writer);
    // Memory as the source sent it, before loading the state (KVM writes
    // guest memory as some of it is restored).
    if let Some(crc32) = expected_digest {
        let ours = mem.digest(prepared.ram());
        if ours != crc32 {
            let reason =
                format!("memory digest mismatch: source {crc32:#010x}, destination {ours:#010x}");
            let _ = wire::write_control(
                &mut out,
                &Message::Cancel {
                    reason: reason.clone(),
                },
            );
            return Err(Error::Protocol(reason));
        }
        stats.verified = true;
        tracing::info!(crc32, "memory digest matches the source");
    }
    drop(mem);
    let t = Instant::now();
    // A state this host cannot load (an MSR its KVM refuses, say): the
    // source is told why, and resumes its VM.
    let vm = prepared.load(&state).map_err(|e| {
        let reason = format!("loading the VM state on the destination: {e}");
        let _ = wire::write_control(&mut out, &Message::Cancel { reason });
        Error::from(e)
    })?;
    tracing::debug!(us = t.elapsed().as_micros() as u64, "state loaded");
    abandon.send_ready(&mut out)?;
    let resume = match wire::expect_control(&mut r, "Go")? {
        Message::Go => true,
        Message::GoPaused => false,
        Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
        other => {
            return Err(Error::Protocol(format!(
                "expected Go, got {}",
                other.name()
            )))
        }
    };
    on_running();
    let (resume_us, confirmed) = resume_and_confirm(&vm, &mut out, resume);
    stats.resume_us = resume_us;
    if let Err(e) = confirmed {
        // The VM runs here from Go on, whatever becomes of the link: the
        // source, without our Confirm, stays paused (unconfirmed).
        tracing::warn!("the VM runs here, but the source did not get our confirmation: {e}");
    }
    if crate::faults::confirm_lost() {
        // As a Confirm lost on the way: the connection stays up, silent, and
        // the source waits for it (up to its answer timeout).
        std::mem::forget(out);
    }
    Ok((vm, stats))
}

/// After Go: runs the VM (unless `resume` is false: `GoPaused`, it stays
/// paused here as it was there) and tells the source; returns how long
/// resuming took, µs, and whether the source was told. The VM is this
/// host's either way: it must not be dropped for a failed send.
pub(crate) fn resume_and_confirm(vm: &Vm, out: &mut impl Write, resume: bool) -> (u64, Result<()>) {
    let t = Instant::now();
    if resume {
        vm.resume();
    }
    let resume_us = t.elapsed().as_micros() as u64;
    if crate::faults::confirm_lost() {
        let cause = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "injected fault");
        return (resume_us, Err(io_err("sending Confirm")(cause)));
    }
    let sent = wire::write_control(out, &Message::Confirm { resume_us }).map_err(Error::from);
    let _ = out.flush();
    (resume_us, sent)
}

/// Tells the source why this side gives up (`Cancel`, best effort); `e`.
fn cancel_with(out: &mut Link, e: Error) -> Error {
    let reason = e.to_string();
    let _ = wire::write_control(out, &Message::Cancel { reason });
    e
}

/// Bytes of the socket read buffer (frame headers, offsets, control messages).
const READ_BUFFER: usize = 64 << 10;
/// Page batches received but not yet stored: the reader fills one while the
/// writer stores the others.
const BATCHES_IN_FLIGHT: usize = 4;

/// A page batch on its way into guest memory.
#[derive(Default)]
struct Batch {
    offsets: Vec<u64>,
    data: Vec<u8>,
}

/// Stores page batches into the memfd on a thread of its own, so that reading
/// the next batch from the socket overlaps with storing the previous ones.
///
/// Batches are stored in the order they were submitted; [`PageWriter::drain`]
/// waits until every submitted batch is in memory.
struct PageWriter {
    to_writer: Option<mpsc::SyncSender<Batch>>,
    stored: mpsc::Receiver<Result<Batch>>,
    free: Vec<Batch>,
    in_flight: usize,
    thread: Option<JoinHandle<()>>,
}

impl PageWriter {
    fn new(dst: &GuestMem) -> Result<Self> {
        let dst = dst.try_clone()?;
        let (to_writer, batches) = mpsc::sync_channel::<Batch>(BATCHES_IN_FLIGHT);
        let (done, stored) = mpsc::sync_channel(BATCHES_IN_FLIGHT);
        let thread = std::thread::Builder::new()
            .name("page-writer".into())
            .spawn(move || {
                for b in batches {
                    let r = store_pages(&dst, &b.offsets, &b.data).map(|()| b);
                    if done.send(r).is_err() {
                        break;
                    }
                }
            })
            .map_err(io_err("starting the page writer"))?;
        Ok(PageWriter {
            to_writer: Some(to_writer),
            stored,
            free: (0..BATCHES_IN_FLIGHT).map(|_| Batch::default()).collect(),
            in_flight: 0,
            thread: Some(thread),
        })
    }

    /// Waits for the writer to store one batch; fails with its error.
    fn collect(&mut self) -> Result<()> {
        let b = self
            .stored
            .recv()
            .map_err(|_| Error::Protocol("page writer stopped".into()))??;
        self.in_flight -= 1;
        self.free.push(b);
        Ok(())
    }

    /// An empty batch buffer, once the writer has stored one if all are in flight.
    fn buffer(&mut self) -> Result<Batch> {
        if self.free.is_empty() {
            self.collect()?;
        }
        self.free
            .pop()
            .ok_or_else(|| Error::Protocol("page writer lost a buffer".into()))
    }

    /// Hands a filled batch to the writer.
    fn submit(&mut self, batch: Batch) -> Result<()> {
        self.to_writer
            .as_ref()
            .and_then(|t| t.send(batch).ok())
            .ok_or_else(|| Error::Protocol("page writer stopped".into()))?;
        self.in_flight += 1;
        Ok(())
    }

    /// Waits until every submitted batch is stored.
    fn drain(&mut self) -> Result<()> {
        while self.in_flight > 0 {
            self.collect()?;
        }
        Ok(())
    }
}

impl Drop for PageWriter {
    fn drop(&mut self) {
        drop(self.to_writer.take());
        while self.stored.recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Checks that `n` pages at memfd offset `off` lie inside guest RAM.
fn check_range(memory: u64, off: u64, n: u64) -> Result<()> {
    let end = n.checked_mul(PAGE_SIZE).and_then(|b| off.checked_add(b));
    match end {
        Some(end) if off.is_multiple_of(PAGE_SIZE) && end <= memory => Ok(()),
        _ => Err(Error::Protocol(format!(
            "pages {off:#x}+{n} outside the guest's {memory} bytes"
        ))),
    }
}

/// The runs of adjacent pages of a batch, as (memfd offset, bytes) in batch
/// order; fails, before anything is written, if a page lies outside guest RAM.
pub(crate) fn page_runs(memory: u64, offsets: &[u64]) -> Result<Vec<(u64, usize)>> {
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for &off in offsets {
        check_range(memory, off, 1)?;
        match runs.last_mut() {
            Some((o, len)) if o.wrapping_add(*len as u64) == off => *len += PAGE_SIZE as usize,
            _ => runs.push((off, PAGE_SIZE as usize)),
        }
    }
    Ok(runs)
}

/// Guest memory as the destination writes it, by memfd offset: `pwrite` into
/// the memfd, which avoids a user page fault per fresh page (they dominate on
/// nested hosts: about 5 µs each on kvm-pvm); or, for memory on huge pages,
/// through the mapping: hugetlbfs has no `write`, and a fault per 2 MiB
/// costs little; or, for prefaulted 4 KiB memory, through its second
/// mapping, whose page tables are made: one copy per page, with no page
/// cache lookup.
pub(crate) struct GuestMem {
    memfd: File,
    memory: u64,
    mapped: Option<MemView>,
    /// Memory on huge pages: one bit per huge page written (shared by the
    /// clones), for post-copy to tell which hold pre-copy's pages.
    touched: Option<std::sync::Arc<Vec<std::sync::atomic::AtomicU64>>>,
    /// Prefaulted 4 KiB memory: where pages written here are noted, for
    /// the guest RAM's data extents ([`GuestRam::written_pages`]).
    written: Option<std::sync::Arc<vmm::memory::WrittenPages>>,
}

use vmm::memory::HUGE_PAGE_SIZE as HUGE;

impl GuestMem {
    /// `ram`'s memory.
    pub(crate) fn new(ram: &GuestRam) -> Result<Self> {
        Ok(GuestMem {
            memfd: ram
                .memfd()
                .try_clone()
                .map_err(io_err("dup of the guest memfd"))?,
            memory: ram.size(),
            mapped: match ram.is_huge() {
                true => Some(MemView::new(ram)),
                false => MemView::of_prefaulted(ram),
            },
            touched: ram.is_huge().then(|| {
                std::sync::Arc::new(
                    (0..ram.size().div_ceil(HUGE).div_ceil(64))
                        .map(|_| Default::default())
                        .collect(),
                )
            }),
            written: ram.written_pages().cloned(),
        })
    }

    /// Notes that `[off, off + len)` is written, before it is: memory on
    /// huge pages, prefaulted 4 KiB memory.
    fn touch(&self, off: u64, len: u64) {
        if let Some(w) = &self.written {
            w.mark(off, len);
        }
        if let (Some(t), true) = (&self.touched, len > 0) {
            for h in off / HUGE..=(off + len - 1) / HUGE {
                if let Some(w) = t.get((h / 64) as usize) {
                    w.fetch_or(1 << (h % 64), std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// Memory on huge pages: the huge pages written so far, a bit each.
    pub(crate) fn touched_huge_pages(&self) -> Option<Vec<u64>> {
        self.touched.as_ref().map(|t| {
            t.iter()
                .map(|w| w.load(std::sync::atomic::Ordering::Acquire))
                .collect()
        })
    }

    /// Memory on huge pages: whether huge page `h` has been written (None:
    /// not on huge pages). One word read, where [`GuestMem::touched_huge_pages`]
    /// copies them all.
    pub(crate) fn huge_page_written(&self, h: u64) -> Option<bool> {
        self.touched.as_ref().map(|t| {
            t.get((h / 64) as usize).is_some_and(|w| {
                w.load(std::sync::atomic::Ordering::Acquire) & (1 << (h % 64)) != 0
            })
        })
    }

    /// `memory` bytes of a memfd that is not a VM's (a probe's scratch memory).
    pub(crate) fn file(memfd: File, memory: u64) -> Self {
        GuestMem {
            memfd,
            memory,
            mapped: None,
            touched: None,
            written: None,
        }
    }

    /// The same memory, for another thread.
    pub(crate) fn try_clone(&self) -> Result<Self> {
        Ok(GuestMem {
            memfd: self
                .memfd
                .try_clone()
                .map_err(io_err("dup of the guest memfd"))?,
            memory: self.memory,
            mapped: self.mapped.as_ref().map(MemView::duplicate),
            touched: self.touched.clone(),
            written: self.written.clone(),
        })
    }

    /// Whether pages go through a mapping (memory on huge pages, or
    /// prefaulted).
    pub(crate) fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }

    /// Writes `data` at memfd offset `off` (checked by the caller).
    fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        self.touch(off, data.len() as u64);
        let Some(view) = &self.mapped else {
            return self
                .memfd
                .write_all_at(data, off)
                .map_err(io_err("writing pages into guest memory"));
        };
        let mut done = 0;
        while done < data.len() {
            let at = off + done as u64;
            let within = (at % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - within).min(data.len() - done);
            let page = view
                .page_mut(at - within as u64)
                .ok_or_else(|| Error::Protocol(format!("page {at:#x} outside guest memory")))?;
            page[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// The page at memfd offset `off` (checked by the caller).
    fn read_page(&self, off: u64) -> Result<[u8; PAGE_SIZE as usize]> {
        let mut page = [0u8; PAGE_SIZE as usize];
        match self.mapped.as_ref().and_then(|v| v.page(off)) {
            Some(p) => page.copy_from_slice(p),
            None => self
                .memfd
                .read_exact_at(&mut page, off)
                .map_err(io_err("reading a page to apply its delta"))?,
        }
        Ok(page)
    }
}

/// Writes a batch of pages into guest memory, one write per run of adjacent pages.
pub(crate) fn store_pages(dst: &GuestMem, offsets: &[u64], data: &[u8]) -> Result<()> {
    let mut at = 0;
    for (off, len) in page_runs(dst.memory, offsets)? {
        dst.write_at(&data[at..at + len], off)?;
        at += len;
    }
    Ok(())
}

/// Stores a raw page batch whose offsets `r` has just read: straight from
/// the socket into the mapping for memory on huge pages; spliced from the
/// socket on a plaintext link (see [`crate::zerocopy`]); read and then
/// written otherwise. `data` is the buffer for the latter. Returns the bytes.
pub(crate) fn receive_pages(
    r: &mut BufReader<Link>,
    splicer: Option<&mut Splicer>,
    dst: &GuestMem,
    offsets: &[u64],
    data: &mut Vec<u8>,
) -> Result<u64> {
    let bytes = offsets.len() * PAGE_SIZE as usize;
    match (&dst.mapped, splicer) {
        (Some(view), _) => {
            for (off, len) in page_runs(dst.memory, offsets)? {
                dst.touch(off, len as u64);
                // A run that crosses from one mapping into the next goes by page.
                let mut at = 0;
                while at < len {
                    let (o, n) = match view.bytes_mut(off + at as u64, len - at) {
                        Some(run) => (run, len - at),
                        None => (
                            view.page_mut(off + at as u64).ok_or_else(|| {
                                let page = off + at as u64;
                                Error::Protocol(format!("page {page:#x} outside guest memory"))
                            })?,
                            PAGE_SIZE as usize,
                        ),
                    };
                    r.read_exact(o).map_err(wire::WireError::from)?;
                    at += n;
                }
            }
        }
        (None, Some(s)) => {
            let runs = page_runs(dst.memory, offsets)?;
            for &(off, len) in &runs {
                dst.touch(off, len as u64);
            }
            s.receive(r, &dst.memfd, &runs)
                .map_err(|e| Error::Wire(wire::WireError::Io(e)))?;
        }
        (None, None) => {
            data.resize(bytes, 0);
            r.read_exact(data).map_err(wire::WireError::from)?;
            store_pages(dst, offsets, data)?;
        }
    }
    Ok(bytes as u64)
}

/// A [`Splicer`] for the link `r` reads, when it is plaintext.
pub(crate) fn splicer_for(r: &BufReader<Link>) -> Option<Splicer> {
    if r.get_ref().is_secure() {
        return None;
    }
    Splicer::new()
        .inspect_err(|e| tracing::warn!("no pipe for zero-copy receive, copying instead: {e}"))
        .ok()
}

/// Applies an XBZRLE delta to the page at `off` (which holds what the source
/// sent of it before).
pub(crate) fn apply_delta(dst: &GuestMem, off: u64, delta: &[u8]) -> Result<()> {
    check_range(dst.memory, off, 1)?;
    let runs = crate::xbzrle::runs(delta)
        .map_err(|e| Error::Protocol(format!("delta for page {off:#x}: {e}")))?;
    // A few changed runs (the common case: a counter or a header rewritten)
    // are written where they go; reading and writing the whole page back
    // costs two 4 KiB copies and a syscall more.
    if runs.len() <= 4 {
        for (pos, bytes) in runs {
            dst.write_at(bytes, off + pos as u64)?;
        }
        return Ok(());
    }
    let mut page = dst.read_page(off)?;
    for (pos, bytes) in runs {
        page[pos..pos + bytes.len()].copy_from_slice(bytes);
    }
    dst.write_at(&page, off)
}

/// Refuses a `Zero` message whose ranges add up to more pages than `pages`
/// (guest RAM's): a source names each page at most once per message, and
/// millions of ranges over all of RAM would keep this side busy for hours,
/// reading nothing meanwhile.
pub(crate) fn check_zero_total(pages: u64, ranges: &[(u64, u64)]) -> Result<()> {
    let total = ranges.iter().try_fold(0u64, |t, &(_, n)| t.checked_add(n));
    match total {
        Some(t) if t <= pages => Ok(()),
        _ => Err(Error::Protocol(format!(
            "a Zero message whose {} ranges name more pages than the guest's {pages}",
            ranges.len()
        ))),
    }
}

/// [`zero_pages`] for each of a `Zero` message's ranges, once
/// [`check_zero_total`] has passed them.
pub(crate) fn zero_ranges(dst: &GuestMem, ranges: &[(u64, u64)]) -> Result<()> {
    check_zero_total(dst.memory / PAGE_SIZE, ranges)?;
    for &(off, n) in ranges {
        zero_pages(dst, off, n)?;
    }
    Ok(())
}

/// Makes `n` pages at `off` zero: by punching them out of the memfd, or on
/// huge pages by writing zeros where a huge page was written here (a huge
/// page never written reads as zeros). A punch there would zero nothing on
/// kernels before 6.2, which round it in to whole huge pages, and where it
/// covers a whole huge page it gives back the page reserved for it.
pub(crate) fn zero_pages(dst: &GuestMem, off: u64, n: u64) -> Result<()> {
    check_range(dst.memory, off, n)?;
    if n == 0 {
        return Err(Error::Protocol(format!(
            "an empty range of zero pages at {off:#x}"
        )));
    }
    if dst.touched.is_none() {
        return vmm::memory::punch_hole(&dst.memfd, off, n * PAGE_SIZE)
            .map_err(io_err("zeroing pages"));
    }
    let zeros = [0u8; PAGE_SIZE as usize];
    for page in 0..n {
        let at = off + page * PAGE_SIZE;
        if dst.huge_page_written(at / HUGE) == Some(true) {
            dst.write_at(&zeros, at)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migration given up while it was received sends no `Ready` (the
    /// source would commit and wait, paused, for a VM that never runs
    /// here), and the receive loop stops at its next frame.
    #[test]
    fn a_given_up_arrival_sends_no_ready() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut out = Link::plain(s);
        let a = Abandon::new(&out).unwrap();
        assert!(a.begin());
        assert!(a.check().is_ok());
        a.send_ready(&mut out).unwrap();
        assert!(a.abandon("stop requested"), "the receiver tells the source");
        assert!(matches!(a.check(), Err(Error::Cancelled)));
        assert!(matches!(a.send_ready(&mut out), Err(Error::Cancelled)));
        drop((out, a));
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        let mut r = &got[..];
        assert!(matches!(
            wire::expect_control(&mut r, "Ready"),
            Ok(Message::Ready)
        ));
        assert!(r.is_empty(), "a second Ready went out");
    }

    /// Stores, zeroes and deltas on `ram`, read back through its mapping.
    fn stores_zeroes_and_deltas(ram: &GuestRam) {
        let dst = GuestMem::new(ram).unwrap();
        let mut data = vec![1u8; 4096];
        data.extend(vec![2u8; 4096]);
        data.extend(vec![3u8; 4096]);
        store_pages(&dst, &[0x1000, 0x2000, 0x9000], &data).unwrap();
        let mut b = [0u8; 1];
        for (gpa, want) in [(0x1000, 1), (0x2fff, 2), (0x9000, 3), (0x3000, 0)] {
            ram.read(gpa, &mut b).unwrap();
            assert_eq!(b[0], want, "at {gpa:#x}");
        }
        zero_pages(&dst, 0x2000, 1).unwrap();
        ram.read(0x2000, &mut b).unwrap();
        assert_eq!(b[0], 0);
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(b[0], 1);
        // A delta of two runs, and one of many (read, patched, written back).
        let old = vec![3u8; 4096];
        for step in [2048, 64] {
            let mut new = old.clone();
            for i in (0..4096).step_by(step) {
                new[i] = 9;
            }
            let delta = crate::xbzrle::encode(&old, &new, 4096).unwrap();
            store_pages(&dst, &[0x9000], &old).unwrap();
            apply_delta(&dst, 0x9000, &delta).unwrap();
            let mut page = vec![0u8; 4096];
            ram.read(0x9000, &mut page).unwrap();
            assert!(page == new, "delta of every {step}th byte");
        }
        let end = ram.size();
        assert!(store_pages(&dst, &[end], &data[..4096]).is_err());
        assert!(store_pages(&dst, &[0x1001], &data[..4096]).is_err());
        assert!(zero_pages(&dst, 0, u64::MAX).is_err());
        // Each range within RAM, together more pages than it has.
        let pages = ram.size() / 4096;
        let e = zero_ranges(&dst, &[(0, pages), (0, 1)]).unwrap_err();
        assert!(e.to_string().contains("more pages than"), "{e}");
        let e = zero_ranges(&dst, &[(0, pages), (0, u64::MAX)]).unwrap_err();
        assert!(e.to_string().contains("more pages than"), "{e}");
        zero_ranges(&dst, &[(0, pages / 2), (pages / 2 * 4096, pages / 2)]).unwrap();
        let e = zero_pages(&dst, 0x1000, 0).unwrap_err();
        assert!(e.to_string().contains("empty range"), "{e}");
    }

    #[test]
    fn pages_land_at_their_offsets_and_zero_ranges_clear_them() {
        stores_zeroes_and_deltas(&GuestRam::new(64 << 20).unwrap());
    }

    #[test]
    fn memory_on_huge_pages_is_written_through_its_mapping() {
        let Some(ram) = vmm::testing::huge_ram_or_skip() else {
            return;
        };
        assert!(ram.is_huge());
        let dst = GuestMem::new(&ram).unwrap();
        assert!(dst.is_mapped(), "hugetlbfs has no write: the mapping it is");
        stores_zeroes_and_deltas(&ram);
        // Zeros over a whole huge page written here, and over one never
        // written (left alone: it reads as zeros, and stays unallocated).
        let dst = GuestMem::new(&ram).unwrap();
        store_pages(&dst, &[0x1000], &[5u8; 4096]).unwrap();
        zero_pages(&dst, 0, 512).unwrap();
        zero_pages(&dst, 4 << 20, 512).unwrap();
        let mut b = [9u8; 1];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(b[0], 0);
        assert_eq!(
            dst.touched_huge_pages().unwrap()[0],
            1,
            "only huge page 0 written"
        );
    }

    #[test]
    fn prefaulted_memory_is_written_through_its_second_mapping() {
        let ram = GuestRam::with_huge_pages(16 << 20, false).unwrap();
        assert!(!GuestMem::new(&ram).unwrap().is_mapped(), "fresh: pwrite");
        ram.prefault().unwrap();
        assert!(GuestMem::new(&ram).unwrap().is_mapped());
        stores_zeroes_and_deltas(&ram);
    }

    /// Pages written into prefaulted memory through its second mapping,
    /// which RAM's own mappings do not map, count as its data.
    #[test]
    fn pages_written_into_prefaulted_memory_count_as_data() {
        let ram = GuestRam::with_huge_pages(16 << 20, false).unwrap();
        ram.prefault().unwrap();
        assert!(ram.data_extents().unwrap().is_empty());
        let dst = GuestMem::new(&ram).unwrap().try_clone().unwrap();
        store_pages(&dst, &[0x1000, 0x2000, 0x9000], &vec![5u8; 3 * 4096]).unwrap();
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        new[100] = 1;
        let delta = crate::xbzrle::encode(&old, &new, 4096).unwrap();
        apply_delta(&dst, 0x20_0000, &delta).unwrap();
        assert_eq!(
            ram.data_extents().unwrap(),
            vec![(0x1000, 0x2000), (0x9000, 0x1000), (0x20_0000, 0x1000)]
        );
    }

    #[test]
    fn page_writer_stores_in_order_and_reports_bad_batches() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut w = PageWriter::new(&GuestMem::new(&ram).unwrap()).unwrap();
        // More batches than buffers: the same page written 10 times, last one wins.
        for i in 0..10u8 {
            let mut b = w.buffer().unwrap();
            b.offsets = vec![0x5000];
            b.data = vec![i; 4096];
            w.submit(b).unwrap();
        }
        w.drain().unwrap();
        let mut x = [0u8; 1];
        ram.read(0x5000, &mut x).unwrap();
        assert_eq!(x[0], 9);
        let mut b = w.buffer().unwrap();
        b.offsets = vec![64 << 20];
        b.data = vec![1; 4096];
        w.submit(b).unwrap();
        assert!(w.drain().is_err());
    }
}
