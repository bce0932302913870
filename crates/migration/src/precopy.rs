//! Source side of a live migration: pre-copy rounds over TCP, then
//! stop-and-copy and a two-phase switch-over that never lets both hosts run the VM.
//!
//! Round 0 sends every non-zero page (holes in the memfd are skipped unread;
//! zero pages are never sent: the destination's fresh memfd is zero). Round k
//! sends what the KVM dirty log says changed during round k-1, and pages that
//! became zero travel as ranges. Rounds end when the predicted downtime
//! (remaining dirty bytes / measured bandwidth) fits `max_downtime`, or at the
//! round limit, the byte budget, or when the dirty set stops shrinking.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use link::{Link, TlsSetup};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm::memory::{is_zero_page, PAGE_SIZE};
use vmm::Vm;
use wire::{Message, MAX_BATCH_PAGES};

use crate::bitmap::{next_set, popcount, set_pages, to_runs};
use crate::compress::Compression;
use crate::faults::{self, Hold, Phase};
use crate::memview::MemView;
use crate::stats::{DowntimePhases, MigrationStats, RoundStats};
use crate::xbzrle;
use crate::{handshake, io_err, Error, Result};

/// A send to the destination that makes no progress for this long fails the
/// migration (SO_SNDTIMEO: a stalled peer must not hang the source).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Least a sender must get out per [`SEND_TIMEOUT`] spent blocked in sends
/// (100 KiB/s): less is a destination that stopped reading, whose kernel still
/// lets a trickle in as it compacts its receive queue.
const STALL_FLOOR: u64 = 1 << 20;

/// Tells a stopped destination from a slow one: over every [`SEND_TIMEOUT`]
/// of time blocked in sends, at least [`STALL_FLOOR`] bytes must go out.
/// Time not spent sending (pacing, scanning, compressing, a quiet round)
/// does not count.
#[derive(Default)]
struct Watchdog {
    blocked: Duration,
    bytes: u64,
}

impl Watchdog {
    /// Books one send that took `blocked` for `bytes`.
    fn sent(&mut self, blocked: Duration, bytes: u64) -> Result<()> {
        self.blocked += blocked;
        self.bytes += bytes;
        if self.blocked >= SEND_TIMEOUT {
            // The floor grows with the time blocked: one batch that trickled
            // out over minutes is no better than many that did.
            let floor = (STALL_FLOOR as u128 * self.blocked.as_millis() / SEND_TIMEOUT.as_millis())
                .min(u64::MAX as u128) as u64;
            if self.bytes < floor {
                return Err(Error::Stalled(self.blocked.as_secs()));
            }
            *self = Watchdog::default();
        }
        Ok(())
    }
}

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct Params {
    /// Job id.
    pub id: String,
    /// VM name on the destination.
    pub name: String,
    /// Destination HOST:PORT.
    pub to: String,
    /// Largest acceptable pause.
    pub max_downtime: Duration,
    /// Bandwidth cap in bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy rounds before stop-and-copy.
    pub max_rounds: u32,
    /// Stop pre-copy once this many bytes have been sent (multiple of RAM size).
    pub byte_budget_factor: f64,
    /// Compare memory digests of source (at pause) and destination (before resume).
    pub verify: bool,
    /// Hybrid mode: most pre-copy rounds before switching to post-copy.
    pub postcopy_after_rounds: u32,
    /// Post-copy: pages sent along with each demanded page (pre-paging window).
    pub prepaging_window: u32,
    /// Post-copy: fault requests and their answers on a connection of their own
    /// (true), or on the main connection behind the background push (false).
    pub fault_channel: bool,
    /// TLS for every connection of the migration; None: plaintext (`--insecure`).
    pub tls: Option<TlsSetup>,
    /// Delta compression (XBZRLE) of re-sent pages: cache size in bytes, 0 off.
    pub xbzrle_cache: u64,
    /// TCP streams for pre-copy page data, the main connection included
    /// (capability `multifd`; 1..=16, 1: the main connection only).
    pub streams: u32,
    /// Auto-converge: throttle the vCPUs step by step while the rounds do not
    /// catch up (an alternative to switching to post-copy).
    pub auto_converge: bool,
    /// General compression of page batches in the rounds and the stop-and-copy
    /// (needs the destination's capability `zstd`).
    pub compress: Compression,
    /// Dynamic page transfer reordering (Svärd et al., CloudCom 2011): rounds
    /// send rarely dirtied pages first and skip the hot tail's pages that the
    /// dirty log shows dirtied again meanwhile.
    pub reorder: bool,
    /// The rounds clear each word of the dirty log right before sending its
    /// pages (where KVM has manual dirty-log protection and `reorder` is off);
    /// false: the whole log at each read.
    pub clear_before_send: bool,
    /// Pre-copy: when the rounds stop without converging (round limit, byte
    /// budget, dirty set not shrinking) and the pause would exceed
    /// `max_downtime`, fail (the VM runs on here) instead of stopping and copying.
    pub strict_downtime: bool,
    /// Mode `auto`: pre-copy while it can converge, post-copy when it cannot
    /// (decided after each round from the measured dirty rate and bandwidth).
    pub auto: bool,
    /// Before the commit: how long to wait for each answer of the destination
    /// (Accept, Prepared, Ready) before giving up.
    pub answer_timeout: Duration,
    /// How the VM boots from its kernel, for the destination's record
    /// (capability `boot-spec`); None: it cannot be booted again there.
    pub boot: Option<wire::BootSpec>,
    /// Fault injection (tests only): hold the source at a phase.
    pub hold: Option<Hold>,
    /// Fault injection (tests only): send a wrong memory digest in verify mode.
    pub corrupt_digest: bool,
    /// Test-only: the send of `Go` reports an error although it went out
    /// (as the send watchdog may), to prove that the source then stays paused.
    pub fail_after_go: bool,
    /// Test-only: the migration panics as it starts (see [`drive`]).
    pub fault_panic: bool,
}

impl Params {
    /// Defaults as QEMU's: 300 ms downtime, no cap.
    pub fn new(id: &str, name: &str, to: &str) -> Self {
        Params {
            id: id.into(),
            name: name.into(),
            to: to.into(),
            max_downtime: Duration::from_millis(300),
            max_bandwidth: None,
            max_rounds: 30,
            byte_budget_factor: 4.0,
            verify: false,
            postcopy_after_rounds: 3,
            prepaging_window: 16,
            fault_channel: true,
            tls: None,
            xbzrle_cache: 0,
            compress: Compression::None,
            reorder: false,
            clear_before_send: true,
            strict_downtime: false,
            streams: 1,
            auto: false,
            auto_converge: false,
            answer_timeout: Duration::from_secs(60),
            boot: None,
            hold: Hold::from_env(),
            corrupt_digest: false,
            fail_after_go: false,
            fault_panic: false,
        }
    }
}

/// How a migration ended, from the source's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The destination runs the VM; the source copy must be destroyed.
    Completed,
    /// The source VM runs on (it was resumed if it had been paused).
    Failed(String),
    /// Cancelled; the source VM runs on.
    Cancelled,
    /// The commit was sent but not confirmed: the source VM is kept paused and must
    /// not be resumed unless the operator knows the destination does not run it.
    Unconfirmed(String),
}

/// Hybrid: the dirty log is sampled in steps of this at the start of round 0
/// to find the pages the guest keeps rewriting (they are left to post-copy),
/// for at most [`HOT_SAMPLE_MAX`] (see `sample_hot`).
pub(crate) const HOT_STEP: Duration = Duration::from_millis(50);
/// Auto on a link with no cap: its first, watch-only step (see `sample_hot`).
pub(crate) const FIRST_STEP_UNCAPPED: Duration = Duration::from_millis(10);
pub(crate) const HOT_SAMPLE_MAX: Duration = Duration::from_secs(1);

/// The stop reason of rounds that converged: what is left fits the pause.
pub(crate) const STOP_CONVERGED: &str = "expected downtime within max-downtime";

/// Auto: the sampling cuts round 0 short when, at its byte budget (a tenth
/// of memory), the hot set still grows at this fraction of the sending rate
/// or more. Sent on, the rest of round 0 would then carry about this
/// fraction of memory again, in pages the guest rewrites after they went:
/// as much as the cut costs at most (the budget, sent before the cut).
pub(crate) const CUT_GROWTH: f64 = 0.1;

/// Longest sleep of a sender held to the cap at a time: a cancel or a new
/// cap takes effect within it.
const PACE_SLICE: Duration = Duration::from_millis(50);

/// `drain`: bytes still unacknowledged that count as drained, the longest
/// wait, and the longest wait without progress.
const DRAIN_DONE: u64 = 64 << 10;
const DRAIN_MAX: Duration = Duration::from_secs(2);
const DRAIN_STUCK: Duration = Duration::from_millis(200);

/// How long a failed send looks for the destination's reason (see
/// [`cut_links_on_failure`]).
const PEER_REASON_WAIT: Duration = Duration::from_millis(300);

/// Shared live view of a migration, for status queries and cancel.
#[derive(Default)]
pub struct Job {
    /// Statistics, updated as the migration goes.
    pub stats: Mutex<MigrationStats>,
    /// Set to cancel.
    pub cancel: AtomicBool,
    /// Hybrid mode: set to switch to post-copy at the end of the current round.
    pub postcopy_now: AtomicBool,
    /// Post-copy recovery: set to try reconnecting now instead of after the back-off.
    pub recover_now: AtomicBool,
    /// Bandwidth cap in bytes/s (0: none); changes take effect at the next batch.
    max_bandwidth: AtomicU64,
    /// Largest acceptable pause in µs (0: not set yet); the rounds read it
    /// at each decision, so a change takes effect at the end of the round.
    max_downtime_us: AtomicU64,
    /// The migration's live sockets, so that a cancel before the commit, a
    /// fault-injection hook, and the post-copy phase itself (when one of them
    /// fails) can cut them all.
    pub(crate) links: Mutex<Vec<Link>>,
    /// Set when Go is about to be sent: from then on a cancel cuts nothing.
    committed: Mutex<bool>,
    /// Fault injection: where to hold the migration (taken when reached).
    hold: Mutex<Option<Hold>>,
    /// Bytes the extra page streams wrote since the last barrier (multifd).
    pub(crate) stream_bytes: AtomicU64,
    /// The destination answers `Sync` (capability `sync`).
    pub(crate) sync: AtomicBool,
    /// The VM was paused when the migration began, and the destination can
    /// keep it so (capability `go-paused`): the commit is `GoPaused`.
    pub(crate) arrive_paused: AtomicBool,
    /// When the capped link is free again, for all page streams together.
    pace_next: Mutex<Option<Instant>>,
    /// Where the commit is noted, and the note (see [`Job::note_commit_in`]).
    commit_note: Mutex<Option<(PathBuf, String)>>,
}

impl Job {
    /// Changes the statistics under their lock.
    pub fn update(&self, f: impl FnOnce(&mut MigrationStats)) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    /// A copy of the current statistics.
    pub fn snapshot(&self) -> MigrationStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the migration to stop, before the commit only: the links are cut
    /// too, so that a source blocked on a stalled destination stops at once
    /// (the migration ends as cancelled and the source VM runs on). Returns
    /// false, and changes nothing, once the commit point has passed: a stop
    /// asked for then (a SIGTERM during post-copy) must not arm the flag that
    /// post-copy recovery reads as "give up", which would strand the
    /// destination without its pages at the next lost link.
    pub fn request_cancel(&self) -> bool {
        let committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        if *committed {
            return false;
        }
        self.cancel.store(true, Ordering::SeqCst);
        self.cut_links();
        true
    }

    /// The operator gives up a post-copy recovery: taken only while the
    /// migration waits for its link (`postcopy-paused`), under the lock
    /// its status changes under, so that a give-up that crosses a
    /// successful reconnection is not kept for the next lost link. False
    /// when not waiting.
    pub fn abandon_recovery(&self) -> bool {
        let mut taken = false;
        self.update(|s| {
            if s.status == "postcopy-paused" {
                self.cancel.store(true, Ordering::SeqCst);
                taken = true;
            }
        });
        taken
    }

    /// Has the commit write `note` to `path` before Go is sent: whoever
    /// finds this process gone (a daemon, after a kill or its own restart)
    /// learns from the file that the destination may run the VM, and must
    /// not boot it here again. The file stays; a migration that completes,
    /// or an operator who resumes the VM here, makes it moot.
    pub fn note_commit_in(&self, path: PathBuf, note: String) {
        *self.commit_note.lock().unwrap_or_else(|p| p.into_inner()) = Some((path, note));
    }

    /// The commit point, just before Go: fails if a cancel came first, or
    /// if the commit cannot be noted (the migration then fails before it,
    /// and the source resumes).
    pub(crate) fn commit(&self) -> Result<()> {
        let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        self.check_cancel()?;
        if let Some((path, note)) = &*self.commit_note.lock().unwrap_or_else(|p| p.into_inner()) {
            std::fs::write(path, note).map_err(|cause| Error::Io {
                context: format!("noting the commit in {}", path.display()),
                cause,
            })?;
            sync_note_in_background(path.clone());
        }
        *committed = true;
        Ok(())
    }

    /// Whether the commit point has passed (Go is, or is about to be, sent).
    pub fn is_committed(&self) -> bool {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `link` among the sockets that [`Job::cut_links`] shuts down.
    pub(crate) fn register(&self, link: &Link) -> Result<()> {
        let clone = link.try_clone().map_err(io_err("socket"))?;
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(clone);
        Ok(())
    }

    /// Closes this job's handles on the sockets (without shutting them down).
    pub(crate) fn forget_links(&self) {
        std::mem::take(&mut *self.links.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The fault-injection hold at `phase`, if one is set (once per migration).
    pub(crate) fn take_hold(&self, phase: Phase) -> Option<Hold> {
        let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_some_and(|h| h.phase == phase) {
            h.take()
        } else {
            None
        }
    }

    /// The destination's reason for giving up, where it said so: a `Cancel`
    /// among the messages waiting on the main connection (the first one
    /// registered), read within [`PEER_REASON_WAIT`].
    fn peer_reason(&self) -> Option<String> {
        let main = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first()?
            .try_clone();
        let mut main = main.ok()?;
        main.set_read_timeout(Some(PEER_REASON_WAIT)).ok()?;
        let until = Instant::now() + PEER_REASON_WAIT;
        while Instant::now() < until {
            match wire::expect_control(&mut main, "Cancel") {
                Ok(Message::Cancel { reason }) => return Some(reason),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Shuts down the migration's connections, as a lost link would (fault
    /// injection for tests; post-copy then recovers). Returns how many.
    pub fn cut_links(&self) -> usize {
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(|p| p.into_inner()));
        for s in &links {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        links.len()
    }

    /// Shuts down the sending side of the migration's connections (they stay
    /// registered; [`Job::cut_links`] closes them for good).
    pub(crate) fn close_sending(&self) {
        for s in self.links.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Sets the largest acceptable pause (at least 1 µs), also while the
    /// migration runs (QEMU's migrate-set-parameters downtime-limit).
    pub fn set_max_downtime(&self, limit: Duration) {
        let us = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX).max(1);
        self.max_downtime_us.store(us, Ordering::Relaxed);
        self.update(|s| s.max_downtime_ms = us as f64 / 1e3);
    }

    /// The largest acceptable pause now.
    pub fn max_downtime(&self) -> Duration {
        Duration::from_micros(self.max_downtime_us.load(Ordering::Relaxed))
    }

    /// Sets the bandwidth cap (bytes/s; None or 0: none), also while the migration runs.
    pub fn set_max_bandwidth(&self, cap: Option<u64>) {
        self.max_bandwidth
            .store(cap.unwrap_or(0), Ordering::Relaxed);
    }

    /// The bandwidth cap now.
    pub fn max_bandwidth(&self) -> Option<u64> {
        Some(self.max_bandwidth.load(Ordering::Relaxed)).filter(|&c| c > 0)
    }

    /// Holds the sender of `bytes` to the cap: `next` is when the link is free
    /// again at the capped rate (no burst is saved up while idle).
    pub(crate) fn pace(&self, next: &mut Instant, bytes: u64) {
        let Some(cap) = self.max_bandwidth() else {
            return;
        };
        let now = Instant::now();
        *next = (*next).max(now) + Duration::from_secs_f64(bytes as f64 / cap as f64);
        if !self.sleep_capped(*next, cap) {
            // A new cap counts from now, without the wait booked at the old one.
            *next = Instant::now();
        }
    }

    /// [`Job::pace`] for several senders sharing the cap (multifd): each
    /// reserves its slot under the lock, then sleeps until it.
    pub(crate) fn pace_shared(&self, bytes: u64) {
        let Some(cap) = self.max_bandwidth() else {
            return;
        };
        let until = self.reserve(bytes, cap);
        if !self.sleep_capped(until, cap) {
            self.forget_bookings();
        }
    }

    /// Books `bytes` on the shared cap: the time (returned) when the link is
    /// free again at `cap` bytes/s after all the bookings so far.
    fn reserve(&self, bytes: u64, cap: u64) -> Instant {
        let mut next = self.pace_next.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let t =
            next.map_or(now, |n| n.max(now)) + Duration::from_secs_f64(bytes as f64 / cap as f64);
        *next = Some(t);
        t
    }

    /// Drops the bookings on the shared cap (after the cap changed).
    fn forget_bookings(&self) {
        *self.pace_next.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Sleeps until `until`, a slice at a time: false, early, once the job is
    /// cancelled or its cap is no longer `cap` (`migctl migrate-set`), so
    /// that neither waits behind a sleep booked at a low cap (1 MiB at
    /// 4 KiB/s would be four minutes).
    fn sleep_capped(&self, until: Instant, cap: u64) -> bool {
        loop {
            let now = Instant::now();
            if now >= until {
                return true;
            }
            if self.cancel.load(Ordering::Relaxed) || self.max_bandwidth() != Some(cap) {
                return false;
            }
            std::thread::sleep((until - now).min(PACE_SLICE));
        }
    }

    /// Charges `bytes`, just sent, to the cap that every sender of the
    /// migration shares, then waits while they together are ahead of it by
    /// more than `ahead`. Post-copy's push passes zero, so it waits for what
    /// the fault answers sent too; an answer passes a little, so it goes at
    /// once unless the answers alone have run that far past the cap.
    pub(crate) fn charge(&self, bytes: u64, ahead: Duration) {
        let Some(cap) = self.max_bandwidth() else {
            return;
        };
        self.reserve(bytes, cap);
        // Others may charge meanwhile: look again after each slice.
        loop {
            let Some(next) = *self.pace_next.lock().unwrap_or_else(|p| p.into_inner()) else {
                return;
            };
            let now = Instant::now();
            let Some(until) = next.checked_sub(ahead).filter(|&u| u > now) else {
                return;
            };
            if !self.sleep_capped(until.min(now + PACE_SLICE), cap) {
                self.forget_bookings();
                return;
            }
        }
    }

    pub(crate) fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Sends pages and tracks bytes, the cap and the resent counter.
pub(crate) struct Sender<'a> {
    pub(crate) stream: Link,
    pub(crate) mem: &'a MemView,
    pub(crate) job: &'a Job,
    /// When the capped link is free again.
    pub(crate) next: Instant,
    /// Whether the bandwidth cap applies (not to the final copy).
    pub(crate) throttle: bool,
    pub(crate) bytes: u64,
    /// Pages this sender has sent, one bit each: whole, as a delta or as a
    /// zero range (a zero page skipped, never sent, is not). The destination
    /// holds our copy of them: sent again, they count as re-sent, and once
    /// dirtied hybrid discards them there before the switch.
    pub(crate) sent_before: Vec<u64>,
    pub(crate) offsets: Vec<u64>,
    pub(crate) zero_ranges: Vec<(u64, u64)>,
    /// The pre-copy round being sent (None outside the rounds).
    pub(crate) round: Option<u32>,
    /// Delta compression of re-sent pages, when negotiated and asked for.
    pub(crate) xbzrle: Option<xbzrle::Cache>,
    /// XBZRLE: copies of the full pages queued (what is sent is what is cached).
    staged: Vec<u8>,
    /// XBZRLE: deltas queued, (memfd offset, delta), and their size.
    deltas: Vec<(u64, Vec<u8>)>,
    delta_bytes: usize,
    /// General compression of page batches, when negotiated and asked for
    /// (None: raw pages, as before; post-copy turns it off).
    pub(crate) zstd: Option<wire::PageCompressor>,
    /// zstd: the batch's pages, copied together for the compressor.
    zraw: Vec<u8>,
    /// Multifd: the extra page streams (pages of other streams go there).
    pub(crate) pool: Option<crate::multifd::Pool>,
    /// Multifd: the bandwidth cap is shared with other senders.
    pub(crate) shared_pace: bool,
    /// Whether this sender sets the statistics' byte count (the main one
    /// does, adding what the extra streams wrote).
    pub(crate) report_bytes: bool,
    /// Raw page batches go by `sendfile` from the memfd (plaintext links,
    /// without XBZRLE; see [`crate::zerocopy`]). Post-copy turns it off: its
    /// destination copies every page through user space anyway.
    pub(crate) zero_copy: bool,
    watchdog: Watchdog,
}

/// Zero ranges one `Zero` message carries at most (about 1.3 MiB encoded
/// at worst, against the 32 MiB frame limit).
const MAX_ZERO_RANGES: usize = 64 << 10;

impl<'a> Sender<'a> {
    pub(crate) fn write_control(&mut self, m: &Message) -> Result<()> {
        let f = wire::encode_control(m)?;
        let t = Instant::now();
        self.stream
            .write_all(&f)
            .map_err(|e| stalled(wire::WireError::Io(e)))?;
        self.bytes += f.len() as u64;
        self.watchdog.sent(t.elapsed(), f.len() as u64)
    }

    /// Queues page `pfn`: data if non-zero, a zero range otherwise (when `zeros` is set).
    pub(crate) fn queue(&mut self, pfn: u64, zeros: bool) -> Result<()> {
        if let Some(pool) = &mut self.pool {
            let s = pool.stream_of(pfn);
            if s != 0 {
                return pool.queue(s, pfn, zeros, self.throttle);
            }
        }
        let off = pfn * PAGE_SIZE;
        let page = self
            .mem
            .page(off)
            .ok_or_else(|| Error::Protocol(format!("page {pfn} outside RAM")))?;
        if is_zero_page(page) {
            self.job.update(|s| s.pages.zero += 1);
            if zeros {
                match self.zero_ranges.last_mut() {
                    Some((o, n)) if *o + *n * PAGE_SIZE == off => *n += 1,
                    _ => self.zero_ranges.push((off, 1)),
                }
                self.mark_sent(pfn);
                // Scattered zero pages make one range each: the message
                // must stay well inside a frame.
                if self.zero_ranges.len() >= MAX_ZERO_RANGES {
                    self.flush()?;
                }
                // The destination's copy is zero now: so is the delta base.
                if let Some(cache) = &mut self.xbzrle {
                    cache.put(pfn, &[0; PAGE_SIZE as usize]);
                }
            }
            return Ok(());
        }
        if let Some(cache) = &mut self.xbzrle {
            // One copy of the page: the delta, the cache and the data sent all
            // come from it, even if the guest writes the page meanwhile.
            let snap = page.to_vec();
            let (w, b) = ((pfn / 64) as usize, pfn % 64);
            let resend = self.sent_before[w] & (1 << b) != 0;
            let delta = cache
                .get(pfn)
                .map(|old| xbzrle::encode(old, &snap, xbzrle::MAX_DELTA));
            cache.put(pfn, &snap);
            match delta {
                Some(Some(d)) => {
                    self.delta_bytes += d.len() + 12;
                    self.deltas.push((off, d));
                    self.mark_sent(pfn);
                    self.job.update(|s| {
                        s.xbzrle.pages += 1;
                        s.xbzrle.update_rate();
                    });
                    if self.delta_bytes >= 1 << 20 {
                        self.flush()?;
                    }
                    return Ok(());
                }
                Some(None) => self.job.update(|s| {
                    s.xbzrle.overflow += 1;
                    s.xbzrle.update_rate();
                }),
                None if resend => self.job.update(|s| {
                    s.xbzrle.cache_miss += 1;
                    s.xbzrle.update_rate();
                }),
                None => {}
            }
            self.staged.extend_from_slice(&snap);
        }
        self.offsets.push(off);
        if self.offsets.len() == MAX_BATCH_PAGES {
            self.flush()?;
        }
        Ok(())
    }

    /// Sets page `pfn`'s bit in `sent_before`; returns whether it was set.
    fn mark_sent(&mut self, pfn: u64) -> bool {
        let (w, b) = ((pfn / 64) as usize, pfn % 64);
        let before = self.sent_before[w] & (1 << b) != 0;
        self.sent_before[w] |= 1 << b;
        before
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.zero_ranges.is_empty() {
            let ranges = std::mem::take(&mut self.zero_ranges);
            self.write_control(&Message::Zero { ranges })?;
        }
        if !self.deltas.is_empty() {
            let pages = std::mem::take(&mut self.deltas);
            let (n, before) = (pages.len() as u64, self.bytes);
            self.delta_bytes = 0;
            self.write_control(&Message::Delta { pages })?;
            let sent = self.bytes - before;
            self.job.update(|s| {
                s.pages.sent += n;
                s.pages.resent += n;
                s.xbzrle.bytes += sent;
            });
            if self.throttle {
                self.pace(sent);
            }
        }
        if self.offsets.is_empty() {
            return Ok(());
        }
        let offsets = std::mem::take(&mut self.offsets);
        let pages: Vec<&[u8]> = if self.xbzrle.is_some() {
            self.staged.chunks_exact(PAGE_SIZE as usize).collect()
        } else {
            offsets.iter().filter_map(|&o| self.mem.page(o)).collect()
        };
        let n = offsets.len() as u64;
        let mem = self.mem;
        let zero_copy = match mem.file() {
            Some(f) if self.zero_copy && self.xbzrle.is_none() => Some((mem, f)),
            _ => None,
        };
        // The watchdog books the writes alone: compressing a batch (seconds
        // at zstd level 19) is not time blocked in sends.
        let (frame_bytes, blocked) = match &mut self.zstd {
            Some(z) => {
                // One copy of the pages: what is compressed is what the guest
                // held at this moment (a later write is in the dirty log).
                let t = Instant::now();
                self.zraw.clear();
                for p in &pages {
                    self.zraw.extend_from_slice(p);
                }
                let payload = z.compress(&self.zraw)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let raw = self.zraw.len() as u64;
                let t = Instant::now();
                let (bytes, wire) = if (payload.len() as u64) < raw {
                    let b =
                        wire::write_zpages(&mut self.stream, &offsets, payload).map_err(stalled)?;
                    (b, payload.len() as u64)
                } else {
                    // It did not shrink: raw is as small and saves the destination work.
                    (
                        write_raw(&mut self.stream, zero_copy, &offsets, &pages)?,
                        raw,
                    )
                };
                let blocked = t.elapsed();
                self.job.update(|s| {
                    s.compression.add(raw, wire);
                    s.compression.compress_ms += ms;
                });
                (bytes, blocked)
            }
            None => {
                let t = Instant::now();
                let bytes = write_raw(&mut self.stream, zero_copy, &offsets, &pages)?;
                (bytes, t.elapsed())
            }
        };
        self.watchdog.sent(blocked, frame_bytes)?;
        self.staged.clear();
        self.bytes += frame_bytes;
        let mut resent = 0;
        for &o in &offsets {
            if self.mark_sent(o / PAGE_SIZE) {
                resent += 1;
            }
        }
        let (bytes, report) = (self.all_bytes(), self.report_bytes);
        self.job.update(|s| {
            s.pages.sent += n;
            s.pages.resent += resent;
            if report {
                s.bytes = bytes;
            }
        });
        if self.throttle {
            self.pace(frame_bytes);
        }
        if let Some(k) = self.round {
            faults::hold(self.job, Phase::Round(k));
        }
        self.job.check_cancel()
    }
}

/// Writes a raw page batch: `pages` (the data of `offsets`, as the cache or
/// the mapping holds them) or, with `zero_copy` (guest memory and its memfd),
/// the memfd's pages by `sendfile`. Returns the bytes on the wire.
fn write_raw(
    stream: &mut Link,
    zero_copy: Option<(&MemView, &std::fs::File)>,
    offsets: &[u64],
    pages: &[&[u8]],
) -> Result<u64> {
    match zero_copy {
        Some((mem, memfd)) => {
            let header = wire::page_batch_header(offsets)?;
            let runs = crate::incoming::page_runs(mem.size(), offsets)?;
            crate::zerocopy::send_batch(stream.tcp(), memfd, &header, &runs, SEND_TIMEOUT)
                .map_err(|e| stalled(wire::WireError::Io(e)))?;
        }
        None => wire::write_pages(stream, offsets, pages).map_err(stalled)?,
    }
    Ok(9 + offsets.len() as u64 * (8 + PAGE_SIZE))
}

impl Sender<'_> {
    /// Bytes written into the sockets, the extra page streams' included,
    /// that the destination has not acknowledged yet.
    fn queued_all(&self) -> u64 {
        let extra = self.pool.iter().flat_map(|p| p.sockets());
        std::iter::once(self.stream.tcp())
            .chain(extra)
            .map(|s| queued(s).unwrap_or(0))
            .sum()
    }

    /// Bytes written so far, the extra page streams' since the last barrier included.
    fn all_bytes(&self) -> u64 {
        self.bytes + self.job.stream_bytes.load(Ordering::Relaxed)
    }

    fn pace(&mut self, bytes: u64) {
        if self.shared_pace {
            self.job.pace_shared(bytes);
        } else {
            self.job.pace(&mut self.next, bytes);
        }
    }

    /// Multifd barrier: sends what is queued on every stream, has each extra
    /// stream mark its end, then says `Barrier` on the main connection (the
    /// destination handles what follows only once every stream is stored).
    /// Afterwards `bytes` counts every stream. Nothing without extra streams.
    pub(crate) fn sync(&mut self) -> Result<()> {
        if self.pool.is_none() {
            return Ok(());
        }
        self.flush()?;
        let throttle = self.throttle;
        let seq = match &mut self.pool {
            Some(pool) => pool.mark(throttle)?,
            None => return Ok(()),
        };
        self.bytes += self.job.stream_bytes.swap(0, Ordering::SeqCst);
        self.write_control(&Message::Barrier { seq })?;
        let bytes = self.bytes;
        self.job.update(|s| s.bytes = bytes);
        Ok(())
    }
}

/// A failed send; one that timed out says that the destination stopped reading.
fn stalled(e: wire::WireError) -> Error {
    match e {
        wire::WireError::Io(e) if crate::timed_out(&e) => Error::Stalled(SEND_TIMEOUT.as_secs()),
        wire::WireError::Io(e) => Error::Io {
            context: "sending to destination".into(),
            cause: e,
        },
        e => e.into(),
    }
}

/// Waits for the destination's Ready (state loaded, VM not running); a Cancel
/// carries the destination's reason (e.g. a digest mismatch).
pub(crate) fn expect_ready(rx: &mut Link) -> Result<()> {
    match wire::expect_control(rx, "Ready")? {
        Message::Ready => Ok(()),
        Message::Cancel { reason } => Err(Error::PeerCancelled(reason)),
        other => Err(Error::Protocol(format!(
            "expected Ready, got {}",
            other.name()
        ))),
    }
}

/// A round's pages in reorder mode: rarely dirtied pages first (ascending
/// count of rounds that found them dirty, memfd order within a count).
/// Before the hot tail (the pages dirtied in two rounds or more, at most the
/// upper half; the upper half when none is), the dirty log is read again; the
/// tail's pages it shows dirtied again are skipped: the next round sends them
/// anyway. Everything that read found dirty goes into `carry`, ORed into the
/// next round's set, so no page is lost. Returns the pages skipped.
fn send_reordered(
    vm: &Vm,
    tx: &mut Sender<'_>,
    todo: &[u64],
    counts: &[u8],
    carry: &mut [u64],
) -> Result<u64> {
    let (order, split) = reorder_plan(todo, counts);
    for &pfn in &order[..split] {
        tx.queue(pfn, true)?;
    }
    if split == order.len() {
        return Ok(0);
    }
    let again = vm.take_dirty_bitmap()?;
    for (c, a) in carry.iter_mut().zip(&again) {
        *c |= *a;
    }
    let mut skipped = 0;
    for &pfn in &order[split..] {
        let (w, b) = ((pfn / 64) as usize, pfn % 64);
        if again.get(w).is_some_and(|a| a & (1 << b) != 0) {
            skipped += 1;
        } else {
            tx.queue(pfn, true)?;
        }
    }
    tracing::debug!(
        pages = order.len(),
        tail = order.len() - split,
        skipped,
        "reordered round"
    );
    Ok(skipped)
}

/// The pages of `todo` in ascending `counts` (memfd order within a count),
/// and where the hot tail starts: at the first page dirtied in two rounds or
/// more, but no earlier than half-way (half-way when no page is hot yet).
fn reorder_plan(todo: &[u64], counts: &[u8]) -> (Vec<u64>, usize) {
    let count = |pfn: u64| counts.get(pfn as usize).copied().unwrap_or(u8::MAX);
    let mut order = Vec::with_capacity(popcount(todo) as usize);
    order.extend(set_pages(todo));
    // Stable: memfd order within one count keeps runs of pages together.
    order.sort_by_key(|&pfn| count(pfn));
    let hot = order.partition_point(|&pfn| count(pfn) < 2);
    let split = if hot == order.len() {
        order.len() / 2
    } else {
        hot.max(order.len() / 2)
    };
    (order, split)
}

/// Before the pause that follows the rounds: waits until the destination has
/// stored everything they sent (`Sync`, answered by `Synced`), so that the
/// pause does not begin with pages still in socket buffers, on a shaped link
/// or in the destination's queue (20–28 ms of downtime at 1 Gbit/s without
/// it). A destination without the capability: [`drain`].
fn settle(job: &Job, tx: &mut Sender<'_>, seq: u32) -> Result<()> {
    round_trip(job, tx, seq).map(drop)
}

/// [`settle`], timed: how long `Sync` took to come back as `Synced`. Right
/// after a settle, with nothing in flight either way, that is the round trip
/// the switch-over's two exchanges will take. `None` from a destination
/// without `sync` (the queue is drained instead, which times nothing).
fn round_trip(job: &Job, tx: &mut Sender<'_>, seq: u32) -> Result<Option<Duration>> {
    if !job.sync.load(Ordering::SeqCst) {
        drain(tx.stream.tcp());
        return Ok(None);
    }
    let started = Instant::now();
    tx.write_control(&Message::Sync { seq })?;
    match wire::expect_control(&mut tx.stream, "Synced")? {
        Message::Synced { seq: s } if s == seq => {}
        Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
        other => {
            return Err(Error::Protocol(format!(
                "expected Synced {seq}, got {}",
                other.name()
            )))
        }
    }
    let took = started.elapsed();
    tracing::debug!(ms = took.as_secs_f64() * 1e3, "rounds settled");
    Ok(Some(took))
}

/// What a pre-copy pause costs beyond its pages, ms: the two exchanges of
/// the switch-over (`State` → `Ready`, `Go` → `Confirm`) at the link's round
/// trip, the VM state at the link's bandwidth (bytes/s; 0 if unknown) and
/// the work of pausing, capturing, restoring and resuming each vCPU. Without
/// it, a 300 ms limit on a link of 50 ms round trip pauses up to 400 ms.
pub(crate) fn switch_allowance_ms(rtt_ms: f64, vcpus: usize, bandwidth: f64) -> f64 {
    let state = if bandwidth > 0.0 {
        (vcpus as f64 * STATE_BYTES_PER_VCPU) / bandwidth * 1e3
    } else {
        0.0
    };
    2.0 * rtt_ms + state + switch_work_ms(vcpus)
}

/// The pause the rounds expect, ms: `pending` bytes at `bandwidth` (bytes/s
/// on the wire, measured; `ratio`: how much compression shrinks the pages)
/// plus the switch-over's own cost. None while it cannot be told: no round
/// has measured the bandwidth yet and more than 64 pages wait.
pub(crate) fn expected_downtime_ms(
    pending: u64,
    ratio: f64,
    bandwidth: f64,
    rtt_ms: Option<f64>,
    vcpus: usize,
) -> Option<f64> {
    let pages_ms = if bandwidth > 0.0 {
        pending as f64 / ratio.max(1.0) / bandwidth * 1e3
    } else if pending <= 64 * PAGE_SIZE {
        0.0
    } else {
        return None;
    };
    Some(pages_ms + switch_allowance_ms(rtt_ms.unwrap_or(0.0), vcpus, bandwidth))
        .filter(|ms| ms.is_finite())
}

/// What one round sent, from round 1 on: its pages, how many of them went
/// as XBZRLE deltas and those deltas' bytes on the wire, and how long the
/// round took, ms.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct LastRound {
    pub(crate) pages: u64,
    pub(crate) deltas: u64,
    pub(crate) delta_bytes: u64,
    pub(crate) ms: f64,
}

/// How many times fewer bytes than their 4 KiB each the pending pages count
/// for against the `bandwidth` (bytes/s on the wire) the rounds decide by:
/// `cold` dirty pages, which the rounds send again, and `hot` ones, which
/// auto's stop-and-copy sends. `ratio` is zstd's measured ratio (1 without
/// it); `last`, the round just sent, from round 1 on (round 0 sends each
/// page once: it has no cache hits to show).
///
/// Without deltas in `last` (XBZRLE off, or no page hit the cache) it is
/// `ratio`, whole pages. With them, a cold page costs what the last round's
/// pages cost on average, for at most as many pages as that round sent: the
/// more of its wire bytes (its deltas at their size, the rest whole) and of
/// its time at the bandwidth (encoding and applying deltas is work: a round
/// of deltas on a fast link, or in a debug build, is bound by it, not by the
/// bytes), and never more than a whole page. Cold pages beyond that count
/// and hot pages (which may never have gone, so not be in the cache) count
/// whole. So XBZRLE only ever lowers the estimate whole pages give, by what
/// the last round showed. Zero pages are in no count (they go as ranges).
/// The stop-and-copy sends deltas as the rounds do (`Sender::queue`), so
/// the pause may count them too.
pub(crate) fn wire_ratio(
    ratio: f64,
    bandwidth: f64,
    last: Option<LastRound>,
    cold: u64,
    hot: u64,
) -> f64 {
    let ratio = ratio.max(1.0);
    let Some(last) = last.filter(|l| l.deltas > 0 && l.pages >= l.deltas) else {
        return ratio;
    };
    let whole = PAGE_SIZE as f64 / ratio;
    let n = last.pages as f64;
    let bytes = (last.delta_bytes as f64 + (last.pages - last.deltas) as f64 * whole) / n;
    let time = bandwidth.max(0.0) * (last.ms.max(0.0) / 1e3) / n;
    let per_page = bytes.max(time).min(whole);
    let measured = cold.min(last.pages);
    let wire = measured as f64 * per_page + (cold - measured + hot) as f64 * whole;
    if wire > 0.0 {
        (cold + hot) as f64 * PAGE_SIZE as f64 / wire
    } else {
        ratio
    }
}

/// `--strict-downtime`: the rounds stopped (`why`) with `dirty` bytes left,
/// a pause of `expected_ms` (None: not known) over `max_ms`.
fn over_max_downtime(why: &str, dirty: u64, expected_ms: Option<f64>, max_ms: f64) -> Error {
    let pause = match expected_ms {
        Some(ms) => format!("about {ms:.0} ms of pause at the measured bandwidth"),
        None => "a pause of unknown length (no round sent enough to measure the bandwidth)".into(),
    };
    Error::NotConverging(format!(
        "the rounds stopped ({why}) with {} MiB still dirty, {pause}, over --max-downtime \
         {max_ms:.0} ms; the VM keeps running here. Try --mode auto or hybrid (post-copy), \
         --auto-converge, a higher --max-downtime or more bandwidth",
        dirty >> 20,
    ))
}

/// The work of a switch-over whatever the link, ms: pausing, capturing,
/// restoring and resuming `vcpus` vCPUs and handling the exchanges.
pub(crate) fn switch_work_ms(vcpus: usize) -> f64 {
    SWITCH_MS + vcpus as f64 * SWITCH_MS_PER_VCPU
}

/// The VM state's size per vCPU, bytes, rounded up: 11.6 KiB for the test
/// guest with one vCPU (registers, XSAVE area, MSRs, LAPIC, plus the devices).
const STATE_BYTES_PER_VCPU: f64 = 16.0 * 1024.0;

/// The switch-over's work that does not grow with the vCPUs, ms: pausing
/// them (in parallel), the exchanges' own handling, resuming.
const SWITCH_MS: f64 = 0.5;

/// Capturing and restoring one vCPU's state, ms. Both measured on this
/// project's 2-core test host (kvm-pvm, docs/benchmarks.md): for one vCPU,
/// pause 0.1, capture 0.24, restore 0.33 (vCPUs 0.22), Go to Confirm 0.1 ms;
/// rounded up.
const SWITCH_MS_PER_VCPU: f64 = 0.5;

/// Bytes written into `sock` that the peer has not acknowledged yet (the
/// kernel's `SIOCOUTQ`).
fn queued(sock: &TcpStream) -> Option<u64> {
    send_queue(sock, libc::TIOCOUTQ)
}

/// Bytes written into `sock` that TCP has not sent yet (`SIOCOUTQNSD`).
pub(crate) fn unsent(sock: &TcpStream) -> Option<u64> {
    send_queue(sock, libc::SIOCOUTQNSD as libc::Ioctl)
}

/// One of the kernel's counts of `sock`'s send queue.
fn send_queue(sock: &TcpStream, request: libc::Ioctl) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) and SIOCOUTQNSD write one int for a live
    // socket.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut n) };
    (r == 0).then_some(n.max(0) as u64)
}

/// Waits until the destination has acknowledged what the rounds wrote into
/// `sock` (the kernel's count of bytes not
/// yet acknowledged, `SIOCOUTQ`): a switch message queued behind megabytes of
/// pages in socket buffers and a shaped link would otherwise wait for them
/// inside the downtime (20–28 ms at 1 Gbit/s). Gives up after [`DRAIN_MAX`],
/// or once the queue has not shrunk for [`DRAIN_STUCK`] (a stalled peer).
fn drain(sock: &TcpStream) {
    let outq = || queued(sock);
    let started = Instant::now();
    let Some(mut left) = outq() else { return };
    let mut progress = Instant::now();
    while left > DRAIN_DONE && started.elapsed() < DRAIN_MAX && progress.elapsed() < DRAIN_STUCK {
        std::thread::sleep(Duration::from_millis(1));
        let Some(now) = outq() else { return };
        if now < left {
            progress = Instant::now();
        }
        left = now;
    }
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        left,
        "rounds drained"
    );
}

/// What hybrid's sampling found.
#[derive(Default)]
struct Sampled {
    /// Pages left to post-copy: rewritten while sampled (or, when `cut`, not
    /// sent yet).
    hot: Vec<u64>,
    /// Pages the guest wrote while sampled (`hot` but the cut's unsent ones).
    written: Vec<u64>,
    /// Auto only: the sampling stopped at its byte budget with the working set
    /// still growing; round 0 ends where the sampling stopped.
    cut: bool,
    /// How long the first step watched with the link idle (from when the log
    /// began, the destination's preparation included): not part of round 0's
    /// sending time.
    watched: Duration,
}

/// Hybrid, at the start of round 0: pages the guest rewrites all the time
/// would only be sent again and again; finds them in the dirty log, in steps
/// of [`HOT_STEP`], to leave them to post-copy, which moves each page once.
/// It samples until two steps in a row find few new pages (the guest has gone
/// round its working set, or it writes little), for at most [`HOT_SAMPLE_MAX`].
///
/// The first step only watches. That is worth the idle link only while the
/// guest writes new pages faster than the link would send others: with
/// `--mode auto` on a link with no cap (fast, as a rule) it lasts
/// [`FIRST_STEP_UNCAPPED`]; a working set found later costs at most one
/// extra copy of each of its pages, and auto's budget bounds even that.
///
/// After the first step the pages of `todo` not yet seen rewritten are sent
/// meanwhile (and taken out of `todo`), so that the sampling costs little
/// time on a slow link; those the guest rewrites later go again after the
/// switch. With `--mode auto` that waste is bounded: once a tenth of `todo`'s
/// bytes has been sent while the working set still grows, by a tenth of the
/// link's rate or more ([`CUT_GROWTH`]), it is too large to find this way,
/// and everything not sent yet is left to post-copy (`cut`), so that the
/// whole migration moves about 1.1 × the memory in about 1.1 × the time the
/// link needs for it.
fn sample_hot(
    vm: &Vm,
    params: &Params,
    job: &Job,
    tx: &mut Sender<'_>,
    todo: &mut [u64],
    started: Instant,
    prepared: Instant,
) -> Result<Sampled> {
    let first_step = if params.auto && job.max_bandwidth().is_none() {
        FIRST_STEP_UNCAPPED
    } else {
        HOT_STEP
    };
    let sent_before = tx.all_bytes();
    let budget = params
        .auto
        .then(|| sent_before + popcount(todo) * PAGE_SIZE / 10);
    let mut hot = vec![0u64; todo.len()];
    let mut cursor = 0u64; // pages of `todo` below it are sent or hot
    let mut converged = false;
    let mut quiet = 0;
    let mut over_budget = false;
    let mut all_sent = false;
    let mut watched = None;
    tx.round = Some(0);
    loop {
        let until = Instant::now() + HOT_STEP;
        if watched.is_none() {
            // The first step only watches: a working set the guest goes round
            // within it is then known before any page is sent. It began with
            // the dirty log: the destination's preparation and finding the
            // pages with data took some of it, or all.
            let rest = (started + first_step).saturating_duration_since(Instant::now());
            std::thread::sleep(rest);
            watched = Some(started.elapsed());
        } else {
            while Instant::now() < until && !over_budget {
                let Some(pfn) = next_set(todo, cursor) else {
                    tx.flush()?;
                    all_sent = true;
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                    break;
                };
                cursor = pfn + 1;
                let (w, b) = ((pfn / 64) as usize, pfn % 64);
                if hot[w] & (1 << b) == 0 {
                    todo[w] &= !(1 << b);
                    tx.queue(pfn, false)?;
                }
                over_budget = budget.is_some_and(|b| tx.all_bytes() >= b);
            }
        }
        let mut new = 0;
        for (h, d) in hot.iter_mut().zip(vm.take_dirty_bitmap()?) {
            new += (d & !*h).count_ones() as u64;
            *h |= d;
        }
        // Two quiet steps in a row: one alone may be the guest's vCPU kept
        // off the CPU for a while (by the sending, on a small host).
        quiet = if new * 20 <= popcount(&hot) {
            quiet + 1
        } else {
            0
        };
        if quiet == 2 {
            converged = true;
            break;
        }
        // Everything not seen rewritten is sent: waiting on would idle the
        // link. What the guest has yet to rewrite of its working set shows
        // in the rounds' dirty log, and goes again there or after the switch.
        if all_sent || over_budget || started.elapsed() >= HOT_SAMPLE_MAX {
            break;
        }
    }
    tx.flush()?;
    // Cut only a working set that grows fast against the link: one found at
    // a trickle (a guest that writes little) is for the rounds to chase.
    let took = started.elapsed();
    let secs = took.as_secs_f64();
    let grow = popcount(&hot) as f64 * PAGE_SIZE as f64 / secs;
    let sent = tx.all_bytes() - sent_before;
    let watched = watched.unwrap_or_default();
    let bw = sent as f64 / took.saturating_sub(watched).as_secs_f64().max(1e-3);
    let cut = params.auto && over_budget && !converged && grow >= CUT_GROWTH * bw;
    let ended = if converged {
        "quiet"
    } else if over_budget {
        "budget"
    } else if all_sent {
        "all sent"
    } else {
        "time limit"
    };
    tracing::info!(
        ms = secs * 1e3,
        hot = popcount(&hot),
        grow_mbps = grow / 1e6,
        bandwidth_mbps = bw / 1e6,
        ended,
        cut,
        "hot pages sampled"
    );
    let written = hot.clone();
    if cut {
        for (h, t) in hot.iter_mut().zip(todo.iter_mut()) {
            *h |= std::mem::take(t);
        }
    }
    let deferred = popcount(&hot);
    // The sending began once the set-up had ended (`rounds` is called after
    // `open`), so the part of the watch before it is the set-up's.
    let in_setup = prepared.saturating_duration_since(started).min(watched);
    job.update(|s| {
        s.pages.deferred = deferred;
        s.sampling = Some(crate::stats::SamplingStats {
            ms: secs * 1e3,
            hot_pages: popcount(&written),
            ended: ended.into(),
            watched_ms: watched.as_secs_f64() * 1e3,
            watched_in_setup_ms: in_setup.as_secs_f64() * 1e3,
        });
    });
    Ok(Sampled {
        hot,
        written,
        cut,
        watched,
    })
}

/// Queues the pages of `set` on `tx`. With `clear` (manual dirty-log
/// protection on), each word's dirty bits are cleared first, so that what the
/// guest writes to those pages from then on is logged again, and what it
/// wrote before is in what is read now.
fn queue_set(vm: &Vm, tx: &mut Sender<'_>, set: &[u64], resent: bool, clear: bool) -> Result<()> {
    for (w, &bits) in set.iter().enumerate() {
        if bits == 0 {
            continue;
        }
        if clear {
            vm.clear_dirty_word(w, bits)?;
        }
        let base = w as u64 * 64;
        for b in set_pages(std::slice::from_ref(&bits)) {
            tx.queue(base + b, resent)?;
        }
    }
    Ok(())
}

/// True when the dirty set has stopped shrinking: each of the last three
/// rounds left at least 90 % of the fewest pages any round before them left.
/// More rounds would only resend the same pages; stop-and-copy (or post-copy)
/// is better. Against the smallest set so far, not the round before: a guest
/// dirtying at nearly the link's rate shrinks the set slowly, by rounds that
/// go up and down, and two rounds in a row can miss a 10 % step by chance.
pub fn not_converging(dirty_per_round: &[u64]) -> bool {
    let n = dirty_per_round.len();
    if n < 4 {
        return false;
    }
    let best = dirty_per_round[..n - 3].iter().copied().min().unwrap_or(0);
    dirty_per_round[n - 3..].iter().all(|&d| d * 10 >= best * 9)
}

/// Migrates `vm` live to `params.to`. The VM keeps running during the rounds;
/// on any outcome but `Completed` and `Unconfirmed` it is running when this returns.
pub fn migrate(vm: &Vm, params: &Params, job: &Job) -> Outcome {
    drive(vm, params, job, "precopy", |start, paused_at| {
        run(vm, params, job, start, paused_at)
    })
}

/// The frame of every mode: statistics set-up, the outcome, resuming the source
/// when the migration failed before the commit, the final figures.
pub(crate) fn drive(
    vm: &Vm,
    params: &Params,
    job: &Job,
    mode: &str,
    body: impl FnOnce(Instant, &mut Option<Instant>) -> Result<Outcome>,
) -> Outcome {
    job.set_max_bandwidth(params.max_bandwidth);
    // The parameter, unless the operator changed it already.
    if job.max_downtime_us.load(Ordering::Relaxed) == 0 {
        job.set_max_downtime(params.max_downtime);
    }
    *job.hold.lock().unwrap_or_else(|p| p.into_inner()) = params.hold;
    let start = Instant::now();
    job.update(|s| {
        s.id = params.id.clone();
        s.vm = params.name.clone();
        s.mode = mode.into();
        s.status = "setup".into();
    });
    let mut paused_at: Option<Instant> = None;
    // A VM paused before the migration stays paused if it fails.
    let was_running = vm.is_running();
    let ring_before = vm.dirty_ring_stats();
    // A panic is a failure like any other (a bug, named as one): the VM is
    // resumed or kept, and the caller told, by the same rules.
    let result = crate::caught(|| {
        if params.fault_panic {
            panic!("fault injection: fault_panic");
        }
        body(start, &mut paused_at)
    });
    let ring = vm.dirty_ring_stats().map(|r| {
        let b = ring_before.unwrap_or_default();
        crate::stats::DirtyRingStats {
            entries: r.entries,
            harvested: r.harvested - b.harvested,
            full_exits: r.full_exits - b.full_exits,
            overflows: r.overflows - b.overflows,
        }
    });
    job.forget_links();
    let _ = vm.set_dirty_logging(false);
    let outcome = match result {
        Ok(o) => o,
        Err(Error::Cancelled) => Outcome::Cancelled,
        // The cancel cut the links: the failure it caused is the cancel.
        Err(_) if job.cancel.load(Ordering::SeqCst) && !job.is_committed() => Outcome::Cancelled,
        // Sends that time out are reported as such already: this is a read.
        Err(Error::Wire(wire::WireError::Io(e))) if crate::timed_out(&e) => {
            Outcome::Failed(format!(
                "the destination did not answer within {} s",
                params.answer_timeout.as_secs_f64()
            ))
        }
        Err(e) => Outcome::Failed(e.to_string()),
    };
    // After the commit the destination may run the VM: whatever failed, the
    // source never resumes on its own (the operator decides).
    let outcome = match outcome {
        Outcome::Failed(e) if job.is_committed() => {
            Outcome::Unconfirmed(format!("after the commit: {e}"))
        }
        Outcome::Cancelled if job.is_committed() => {
            Outcome::Unconfirmed("cancelled after the commit".to_string())
        }
        o => o,
    };
    if matches!(outcome, Outcome::Failed(_) | Outcome::Cancelled) && paused_at.is_some() {
        if was_running {
            vm.resume();
            tracing::warn!("migration did not complete: source VM resumed");
        } else {
            tracing::warn!("migration did not complete: source VM left paused, as it was");
        }
    }
    let total = start.elapsed().as_secs_f64() * 1e3;
    job.update(|s| {
        s.total_ms = total;
        s.dirty_ring = ring;
        let (status, err) = match &outcome {
            Outcome::Completed => ("completed", None),
            Outcome::Failed(e) => ("failed", Some(e.clone())),
            Outcome::Cancelled => ("cancelled", Some("cancelled by the operator".to_string())),
            Outcome::Unconfirmed(e) => ("failed", Some(e.clone())),
        };
        s.status = status.into();
        s.outcome = status.into();
        s.error = err;
        if s.total_ms > 0.0 {
            s.bandwidth_mbps = s.bytes as f64 * 8.0 / (s.total_ms / 1e3) / 1e6;
        }
    });
    outcome
}

/// Sends `Go`, the commit, or `GoPaused` for a VM to arrive paused
/// (test-only: then fails, see [`Params::fail_after_go`]).
pub(crate) fn send_go(tx: &mut Sender<'_>, params: &Params, job: &Job) -> Result<()> {
    let go = if job.arrive_paused.load(Ordering::SeqCst) {
        Message::GoPaused
    } else {
        Message::Go
    };
    tx.write_control(&go)?;
    if params.fail_after_go {
        return Err(Error::Stalled(SEND_TIMEOUT.as_secs()));
    }
    Ok(())
}

/// Connects to `to` (HOST:PORT) and, with `tls`, runs the handshake verifying
/// that the peer's certificate is valid for HOST.
pub(crate) fn connect(to: &str, tls: Option<&TlsSetup>) -> Result<Link> {
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .map_err(io_err(format!("resolving {to}")))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(s) => {
                let host = to
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                    .unwrap_or(to);
                return secure(s, host, tls);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Error::Io {
        context: format!("connecting to {to}"),
        cause: last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
    })
}

/// Connects to `addr` (a peer met earlier in the same migration).
/// Over TLS, the peer's certificate must be valid for `identity`: the name
/// the migration's main link authenticated (`Link::peer_identity`), so that
/// an extra connection reaches the same peer, whatever names its
/// certificate holds; the address where there is none.
pub(crate) fn connect_addr(
    addr: SocketAddr,
    identity: Option<&str>,
    tls: Option<&TlsSetup>,
    timeout: Duration,
) -> Result<Link> {
    let s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(io_err(format!("connecting to {addr}")))?;
    match identity {
        Some(name) => secure(s, name, tls),
        None => secure(s, &addr.ip().to_string(), tls),
    }
}

fn secure(s: TcpStream, host: &str, tls: Option<&TlsSetup>) -> Result<Link> {
    Ok(match tls {
        Some(t) => t.connect(s, host)?,
        None => Link::plain(s),
    })
}

/// The accepting side of a connection within a migration (fault channel,
/// recovery): the TLS handshake with the peer check, or plaintext (both ends
/// of one migration use the same, settled on its main connection).
pub(crate) fn accept(s: TcpStream, tls: Option<&TlsSetup>) -> Result<Link> {
    match tls {
        Some(t) => Ok(t.accept(s)?),
        None => Ok(Link::plain(s)),
    }
}

/// Connects, says Hello with `mode`, and waits until the destination is
/// prepared, running `while_preparing` (this side's own preparation) meanwhile.
pub(crate) fn open(
    vm: &Vm,
    params: &Params,
    job: &Job,
    start: Instant,
    mode: &str,
    while_preparing: impl FnOnce() -> Result<Prelude>,
) -> Result<(Link, Prelude)> {
    crate::multifd::check_streams(params.streams as u64).map_err(Error::Invalid)?;
    let mut stream = connect(&params.to, params.tls.as_ref())?;
    job.register(&stream)?;
    job.check_cancel()?;
    stream.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(params.answer_timeout))
        .map_err(io_err("socket timeout"))?;
    stream
        .tcp()
        .set_write_timeout(Some(SEND_TIMEOUT))
        .map_err(io_err("socket timeout"))?;
    let cpuid = vm.cpuid(0);
    let desc = handshake::describe(&params.name, &cpuid, vm.config().memory, vm.config().vcpus);
    // `multifd` only when asked for: one stream stays what it always was.
    let caps: Vec<&str> = handshake::CAPABILITIES
        .iter()
        .copied()
        .filter(|c| *c != "multifd" || params.streams > 1)
        .collect();
    let shared =
        handshake::hello_then(&mut stream, mode, desc, params.boot.clone(), &caps, || {
            faults::hold(job, Phase::Handshake)
        })?;
    let streams = crate::multifd::negotiated(mode, params.streams, &shared);
    if streams < params.streams && mode != "postcopy" {
        tracing::warn!(
            asked = params.streams,
            "the destination lacks multifd: falling back to 1 stream"
        );
    }
    job.update(|s| s.streams = streams);
    job.sync
        .store(shared.iter().any(|c| c == "sync"), Ordering::SeqCst);
    // A paused VM arrives paused, where the destination can keep it so.
    if !vm.is_running() {
        let can = shared.iter().any(|c| c == "go-paused");
        if !can {
            tracing::warn!("the destination lacks go-paused: this paused VM will run there");
        }
        job.arrive_paused.store(can, Ordering::SeqCst);
    }
    // Delta compression only if asked for and the destination can decode it.
    if params.xbzrle_cache > 0 && shared.iter().any(|c| c == "xbzrle") {
        job.update(|s| s.xbzrle.cache_size = params.xbzrle_cache);
    }
    // General compression was asked for explicitly: a destination that cannot
    // decode it fails the migration (before any page moves) rather than
    // silently sending several times the bytes the operator planned for.
    match params.compress {
        Compression::None => job.update(|s| s.compression.algorithm = "none".into()),
        Compression::Zstd { level } => {
            if !shared.iter().any(|c| c == "zstd") {
                return Err(Error::Unsupported(format!(
                    "zstd compression (capability zstd missing); migrate without compress \
                     or upgrade the destination (asked for {})",
                    params.compress
                )));
            }
            job.update(|s| {
                s.compression.algorithm = "zstd".into();
                s.compression.level = level;
            });
        }
    }
    job.update(|s| s.reorder = params.reorder);
    // The destination may still be building its VM (a daemon starts a VM
    // process for it): this side's own preparation runs meanwhile.
    let mut early = while_preparing()?;
    faults::hold(job, Phase::Prepared);
    handshake::wait_prepared(&mut stream)?;
    early.prepared = Instant::now();
    let setup = early.prepared.saturating_duration_since(start);
    job.update(|s| {
        s.setup_ms = setup.as_secs_f64() * 1e3;
        s.status = "active".into();
    });
    job.check_cancel()?;
    Ok((stream, early))
}

/// What the source prepares while the destination does (see [`open`]).
pub(crate) struct Prelude {
    /// When dirty logging began, with an empty log.
    pub(crate) logged_from: Instant,
    /// When the destination said it was prepared: the set-up's end
    /// (`setup_ms`), set by [`open`].
    pub(crate) prepared: Instant,
    /// The pages that hold data (round 0, or post-copy's candidates),
    /// found once the log was on.
    pub(crate) data: Vec<u64>,
    /// Rounds clear each page's dirty bit right before sending it.
    pub(crate) clear_before_send: bool,
}

/// Turns dirty logging on (`rounds`: with the rounds' way of clearing it)
/// and finds the pages of `vm` that hold data.
pub(crate) fn prelude(vm: &Vm, params: &Params, job: &Job, rounds: bool) -> Result<Prelude> {
    // Reorder reads the log inside a round to find pages dirtied again since
    // its start, which needs the log cleared at each read.
    let clear_before_send =
        rounds && params.clear_before_send && !params.reorder && vm.enable_clear_before_send();
    job.update(|s| s.clear_before_send = clear_before_send);
    vm.set_dirty_logging(true)?;
    vm.take_dirty_bitmap()?; // start clean: everything from now on is logged
    let logged_from = Instant::now();
    let ram = vm.ram();
    let data = data_pages(ram, ram.size() / PAGE_SIZE)?;
    Ok(Prelude {
        logged_from,
        prepared: Instant::now(),
        data,
        clear_before_send,
    })
}

/// Bitmap (one bit per page) of the pages of `ram` that hold data (holes skipped).
pub(crate) fn data_pages(ram: &vmm::GuestRam, pages: u64) -> Result<Vec<u64>> {
    let mut todo = vec![0u64; pages.div_ceil(64) as usize];
    for (off, len) in ram.data_extents()? {
        let first = off / PAGE_SIZE;
        let last = (off + len).div_ceil(PAGE_SIZE).min(pages);
        for pfn in first..last {
            todo[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
    }
    Ok(todo)
}

impl<'a> Sender<'a> {
    /// A sender on `stream` for the pages of `mem`.
    pub(crate) fn new(stream: Link, mem: &'a MemView, job: &'a Job) -> Self {
        Sender {
            zero_copy: !stream.is_secure() && mem.file().is_some(),
            stream,
            mem,
            job,
            next: Instant::now(),
            throttle: true,
            bytes: 0,
            sent_before: vec![0u64; mem.pages().div_ceil(64) as usize],
            offsets: Vec::with_capacity(MAX_BATCH_PAGES),
            zero_ranges: Vec::new(),
            round: None,
            xbzrle: match job.snapshot().xbzrle.cache_size {
                0 => None,
                // One slot per page of guest RAM at most: more would never be used.
                bytes => Some(xbzrle::Cache::new(bytes.min(mem.pages() * PAGE_SIZE))),
            },
            staged: Vec::new(),
            deltas: Vec::new(),
            delta_bytes: 0,
            zstd: None,
            zraw: Vec::new(),
            pool: None,
            shared_pace: false,
            report_bytes: true,
            watchdog: Watchdog::default(),
        }
    }

    /// A sender that compresses page batches as `open` negotiated (see
    /// [`Sender::new`]).
    pub(crate) fn negotiated(stream: Link, mem: &'a MemView, job: &'a Job) -> Result<Self> {
        let mut tx = Sender::new(stream, mem, job);
        let c = job.snapshot().compression;
        if c.algorithm == "zstd" {
            tx.zstd = Some(wire::PageCompressor::new(c.level)?);
        }
        Ok(tx)
    }
}

fn run(
    vm: &Vm,
    params: &Params,
    job: &Job,
    start: Instant,
    paused_at: &mut Option<Instant>,
) -> Result<Outcome> {
    std::thread::scope(|scope| {
        let r = run_in(scope, vm, params, job, start, paused_at);
        cut_links_on_failure(job, r)
    })
}

/// A migration that failed before the commit: cuts its links, so that the
/// page stream workers (multifd) stop at once rather than send what they
/// hold queued before the scope that runs them can end (with the VM
/// possibly paused, waiting for that).
///
/// A send that failed because the destination gave up says only "broken
/// pipe": where the destination said why (a `Cancel` waiting on the main
/// connection), the error becomes its reason.
pub(crate) fn cut_links_on_failure<T>(job: &Job, r: Result<T>) -> Result<T> {
    if r.is_ok() || job.is_committed() {
        return r;
    }
    let r = match r {
        Err(e) if closed_by_peer(&e) => Err(job.peer_reason().map_or(e, Error::PeerCancelled)),
        r => r,
    };
    job.cut_links();
    r
}

/// Whether `e` says the destination closed the connection (a broken pipe, a
/// reset, an end of stream): only then may it have said why first. Other
/// failures (local ones, timeouts) do not wait for a reason.
fn closed_by_peer(e: &Error) -> bool {
    use std::io::ErrorKind as K;
    let kind = match e {
        Error::Io { cause, .. } => cause.kind(),
        Error::Wire(wire::WireError::Io(cause)) => cause.kind(),
        _ => return false,
    };
    matches!(kind, K::BrokenPipe | K::ConnectionReset | K::UnexpectedEof)
}

/// [`run`], with the page stream threads (multifd) on `scope`.
fn run_in<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    vm: &Vm,
    params: &Params,
    job: &'env Job,
    start: Instant,
    paused_at: &mut Option<Instant>,
) -> Result<Outcome> {
    let (stream, early) = open(vm, params, job, start, "precopy", || {
        prelude(vm, params, job, true)
    })?;
    let ram = vm.ram().clone();
    let mem = MemView::new(&ram);
    let mut tx = Sender::negotiated(stream.try_clone().map_err(io_err("socket"))?, &mem, job)?;
    crate::multifd::start(scope, &mut tx, &ram, params, job)?;
    let (mut todo, round, _) = rounds(vm, params, job, &mut tx, early, params.max_rounds, false)?;

    // Stop-and-copy.
    let pause_start = Instant::now();
    vm.pause();
    *paused_at = Some(pause_start);
    stop_and_copy(vm, params, job, tx, stream, &mut todo, round, pause_start)
}

/// The pre-copy rounds: round 0 sends every page with data, round k what the
/// dirty log says changed during round k-1. Ends at the stop condition, after
/// `limit` rounds, or (when `switch` is set) when the operator asks for post-copy.
/// Returns the pages dirtied during the last round (still to send), the
/// number of rounds run, and the rate the guest dirtied the cold pages at in
/// the last round, in bytes a second as sent (what auto weighs against the
/// bandwidth; the hot pages, which the dirty rate counts too, left out). The
/// VM runs throughout; dirty logging stays on.
pub(crate) fn rounds(
    vm: &Vm,
    params: &Params,
    job: &Job,
    tx: &mut Sender<'_>,
    early: Prelude,
    limit: u32,
    switch: bool,
) -> Result<(Vec<u64>, u32, f64)> {
    let pages = tx.mem.pages();
    let clear_before_send = early.clear_before_send;
    // Round 0: every page that holds data (but the hot ones). It starts with
    // hybrid's sampling (its first step began when the log did), which sends
    // some of it.
    let mut todo = early.data;
    if !switch && !clear_before_send {
        // Round 0 sends what the guest wrote while the destination prepared,
        // pages it wrote for the first time included (they were holes when
        // the data was found): the log starts now, lest round 1 send them
        // again.
        for (t, d) in todo.iter_mut().zip(vm.take_dirty_bitmap()?) {
            *t |= d;
        }
    }
    // With the sampling, round 0 began when the log did: what the guest wrote
    // since is in the round's dirty rate.
    let xbzrle_counts = |s: &MigrationStats| (s.xbzrle.pages, s.xbzrle.bytes);
    let round0_start = {
        let s = job.snapshot();
        (
            if switch {
                early.logged_from
            } else {
                Instant::now()
            },
            tx.bytes,
            s.pages.sent,
            xbzrle_counts(&s),
        )
    };
    let sampled = if switch {
        sample_hot(
            vm,
            params,
            job,
            tx,
            &mut todo,
            early.logged_from,
            early.prepared,
        )?
    } else {
        Sampled::default()
    };
    let hot = sampled.hot;
    let hot_pages = popcount(&hot);
    let throttle = if params.auto_converge {
        Some(crate::throttle::Throttle::start(vm.exit_watch()).map_err(io_err("auto-converge"))?)
    } else {
        None
    };
    let cold = |bits: &[u64]| -> Vec<u64> {
        bits.iter()
            .enumerate()
            .map(|(i, &w)| w & !hot.get(i).copied().unwrap_or(0))
            .collect()
    };

    // Reorder: how many rounds found each page dirty, and the pages found
    // dirty by the dirty log read inside a round (they belong to the next).
    let mut counts: Vec<u8> = if params.reorder {
        vec![0; pages as usize]
    } else {
        Vec::new()
    };
    let mut carry = vec![0u64; pages.div_ceil(64) as usize];

    let mut todo = cold(&todo);
    let budget = (vm.config().memory as f64 * params.byte_budget_factor) as u64;
    let mut round: u32 = 0;
    let mut bandwidth: f64 = 0.0; // bytes/s, measured
    let mut history: Vec<u64> = Vec::new();
    // The last round's cold pages' dirty rate as sent (wire bytes/s).
    let mut cold_wire_rate: f64;
    let stop_reason;
    // None: not known (no bandwidth measured yet).
    let mut expected_last_ms: Option<f64>;
    // The link's round trip (the shortest measured), once a settle has
    // emptied it; the pause's two exchanges take it twice.
    let mut rtt_ms: Option<f64> = None;
    let vcpus = vm.config().vcpus;
    // The byte count when the destination last confirmed it had stored
    // everything (a settle with nothing sent since need not be repeated).
    let mut settled_at = None;
    loop {
        let (t0, b0, s0, x0) = if round == 0 {
            round0_start
        } else {
            let s = job.snapshot();
            (Instant::now(), tx.bytes, s.pages.sent, xbzrle_counts(&s))
        };
        let queued0 = if round == 0 { 0 } else { tx.queued_all() };
        tx.round = Some(round);
        if clear_before_send && round > 0 && hot_pages > 0 {
            // The hot pages are never sent in a round, so nothing else clears
            // their bits: cleared here, the log shows which the guest
            // rewrote during this round.
            vm.clear_dirty_pages(&hot)?;
        }
        if params.reorder && round > 0 {
            let skipped = send_reordered(vm, tx, &todo, &counts, &mut carry)?;
            job.update(|s| s.pages.skipped_redirtied += skipped);
        } else {
            queue_set(vm, tx, &todo, round > 0, clear_before_send)?;
        }
        tx.flush()?;
        tx.sync()?;
        tx.round = None;
        tx.write_control(&Message::RoundEnd { round })?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let round_bytes = tx.bytes - b0;
        // What left this host in the round: not what still waits in the
        // sockets' queues (megabytes, against a round of a few at the end;
        // the extra streams' marks only say their pages were written).
        let gone = (round_bytes + queued0).saturating_sub(tx.queued_all());
        // Round 0's first sampling step watched with the link idle.
        let sending_ms = if round == 0 {
            ms - sampled.watched.as_secs_f64() * 1e3
        } else {
            ms
        };
        if sending_ms > 0.0 && gone > 64 * PAGE_SIZE {
            let bw = gone as f64 / (sending_ms / 1e3);
            bandwidth = if bandwidth == 0.0 {
                bw
            } else {
                0.5 * bandwidth + 0.5 * bw
            };
        }
        // Cleared before sending, the log holds what was written after.
        let mut next = if clear_before_send {
            vm.peek_dirty_bitmap()?
        } else {
            vm.take_dirty_bitmap()?
        };
        for (n, c) in next.iter_mut().zip(carry.iter_mut()) {
            *n |= std::mem::take(c);
        }
        // Every page the guest wrote during the round, hot ones included
        // (round 0's hot ones were found while it sampled): what its dirty
        // rate reports.
        let written = if round == 0 && hot_pages > 0 {
            next.iter()
                .zip(&sampled.written)
                .map(|(n, w)| (n | w).count_ones() as u64)
                .sum()
        } else {
            popcount(&next)
        };
        todo = cold(&next);
        if params.reorder {
            for pfn in set_pages(&todo) {
                if let Some(c) = counts.get_mut(pfn as usize) {
                    *c = c.saturating_add(1);
                }
            }
        }
        let dirty = popcount(&todo);
        let dirty_bytes = dirty * PAGE_SIZE;
        let per_s = |bytes: u64| {
            if ms > 0.0 {
                bytes as f64 / (ms / 1e3)
            } else {
                0.0
            }
        };
        // The rounds' own decisions go by what they must send (the cold pages).
        let cold_rate = per_s(dirty_bytes);
        let dirty_rate = per_s(written * PAGE_SIZE);
        // Auto finishes in pre-copy only if the hot pages, sent in the
        // stop-and-copy, fit the pause too; unknown bandwidth (a round too
        // small to measure) only for a handful of pages.
        let hot_pending = if params.auto { hot_pages } else { 0 };
        let now = job.snapshot();
        let sent_pages = now.pages.sent.saturating_sub(s0);
        // The bandwidth is measured in wire bytes: with compression, the
        // pending pages take what the batches so far shrank to, and with
        // XBZRLE what this round's pages took (see `wire_ratio`).
        let ratio = match &tx.zstd {
            Some(_) => now.compression.ratio.max(1.0),
            None => 1.0,
        };
        let last = (round > 0).then(|| {
            let (deltas, bytes) = xbzrle_counts(&now);
            LastRound {
                pages: sent_pages,
                deltas: deltas.saturating_sub(x0.0),
                delta_bytes: bytes.saturating_sub(x0.1),
                ms,
            }
        });
        let expected = |cold: u64, rtt_ms: Option<f64>| {
            let ratio = wire_ratio(ratio, bandwidth, last, cold, hot_pending);
            let pending = (cold + hot_pending) * PAGE_SIZE;
            expected_downtime_ms(pending, ratio, bandwidth, rtt_ms, vcpus)
        };
        let mut expected_ms = expected(dirty, rtt_ms);
        expected_last_ms = expected_ms;
        // (The bandwidth counts wire bytes: compressed pages and deltas take
        // less of it.)
        cold_wire_rate = cold_rate / wire_ratio(ratio, bandwidth, last, dirty, 0);
        job.update(|s| {
            s.rounds.push(RoundStats {
                pages: sent_pages,
                bytes: round_bytes,
                ms,
                dirty_rate,
            });
            s.round = round + 1;
            s.remaining_bytes = dirty_bytes;
            s.dirty_rate = dirty_rate;
            s.link_rate = bandwidth;
            // Unknown (no bandwidth measured yet): the last estimate stays.
            if let Some(ms) = expected_ms {
                s.expected_downtime_ms = ms;
            }
        });
        tracing::debug!(
            round,
            sent_pages,
            round_bytes,
            ms,
            dirty,
            wire_ratio = wire_ratio(ratio, bandwidth, last, dirty, hot_pending),
            ?expected_ms,
            "pre-copy round"
        );
        history.push(dirty);
        round += 1;
        // The operator's word first: it is why the rounds end, whatever else holds.
        if switch && job.postcopy_now.load(Ordering::Relaxed) {
            stop_reason = "post-copy requested";
            break;
        }
        let max_ms = job.max_downtime().as_secs_f64() * 1e3;
        // A cut left most of memory unsent, written by a guest whose working
        // set still grew fast: finished in pre-copy, all of it would go in the
        // pause. Post-copy moves it while the guest runs.
        if expected_ms.is_some_and(|e| e <= max_ms) && !sampled.cut {
            // Decide again right before the pause would come: once the
            // destination has caught up, with what the guest dirtied
            // meanwhile (at 1 Gbit/s that was 10-25 % more pause than
            // predicted). Too much: another round sends it.
            settle(job, tx, round)?;
            // The link is empty now: time one more exchange.
            if let Some(t) = round_trip(job, tx, round)? {
                let t = t.as_secs_f64() * 1e3;
                rtt_ms = Some(rtt_ms.map_or(t, |r| r.min(t)));
                job.update(|s| s.rtt_ms = rtt_ms);
            }
            // After the timed exchange: its Sync counts in the bytes, and it
            // leaves the link as empty as the settle did, so that a pause
            // right after needs no third exchange.
            settled_at = Some(tx.bytes);
            let late = cold(&vm.take_dirty_bitmap()?);
            for (t, l) in todo.iter_mut().zip(&late) {
                *t |= *l;
            }
            let dirty = popcount(&todo);
            let dirty_bytes = dirty * PAGE_SIZE;
            expected_ms = expected(dirty, rtt_ms);
            expected_last_ms = expected_ms;
            job.update(|s| {
                s.remaining_bytes = dirty_bytes;
                if let Some(ms) = expected_ms {
                    s.expected_downtime_ms = ms;
                }
            });
            if expected_ms.is_some_and(|e| e <= max_ms) {
                stop_reason = STOP_CONVERGED;
                break;
            }
            tracing::debug!(
                ?expected_ms,
                "what the guest dirtied while the destination caught up is over max-downtime"
            );
        }
        // Auto: a hot working set, or rounds that cannot catch up with a guest
        // dirtying memory at 80 % of the link's rate or more: post-copy moves
        // each of those pages once.
        if switch && params.auto && hot_pages > 0 {
            stop_reason = if sampled.cut {
                "working set still growing fast when a tenth of memory was sent"
            } else {
                "hot working set"
            };
            break;
        }
        if switch && params.auto && bandwidth > 0.0 && cold_wire_rate >= 0.8 * bandwidth {
            stop_reason = "dirty rate above 80 % of the bandwidth";
            break;
        }
        if round >= limit {
            stop_reason = "round limit";
            break;
        }
        if tx.bytes >= budget {
            stop_reason = "byte budget";
            break;
        }
        if let Some(t) = &throttle {
            // The guest dirtied half of the pages the round sent or more:
            // slow it down one step more. (Pages, not bytes: compressed
            // pages and deltas take fewer wire bytes than the dirty pages
            // they stand for.)
            if dirty * 2 >= sent_pages && t.level() < crate::throttle::MAX {
                let level = t.raise();
                tracing::info!(level, "auto-converge: vCPUs throttled");
                job.update(|s| s.throttle_pct = level);
                history.clear();
            }
        }
        if not_converging(&history) {
            stop_reason = "dirty set not shrinking";
            break;
        }
        job.check_cancel()?;
    }
    job.update(|s| s.stop_reason = stop_reason.into());
    let max_ms = job.max_downtime().as_secs_f64() * 1e3;
    if params.strict_downtime && !switch && expected_last_ms.is_none_or(|e| e > max_ms) {
        return Err(over_max_downtime(
            stop_reason,
            popcount(&todo) * PAGE_SIZE,
            expected_last_ms,
            max_ms,
        ));
    }
    // What post-copy must still move: the dirty cold pages and every hot one.
    for (t, h) in todo.iter_mut().zip(&hot) {
        *t |= *h;
    }
    // Auto finishes a converged migration in pre-copy: its stop-and-copy may
    // send deltas against what the destination holds, so nothing is discarded.
    let postcopy_next = switch && !(params.auto && stop_reason == STOP_CONVERGED);
    if postcopy_next {
        // Pages sent and dirtied since are stale at the destination: have it
        // discard them now, not inside the pause (the `PageMap` at the pause
        // discards again what is dirtied meanwhile). Pages that went on other
        // streams are not known here; the `PageMap` discards those.
        let stale: Vec<u64> = todo
            .iter()
            .zip(&tx.sent_before)
            .map(|(t, s)| t & s)
            .collect();
        for ranges in to_runs(&stale).chunks(1 << 16) {
            tx.write_control(&Message::Zero {
                ranges: ranges.to_vec(),
            })?;
        }
    }
    if settled_at != Some(tx.bytes) {
        settle(job, tx, round)?;
    }
    Ok((todo, round, cold_wire_rate))
}

/// Stop-and-copy and the commit exchange; the VM was paused at `pause_start`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stop_and_copy(
    vm: &Vm,
    params: &Params,
    job: &Job,
    mut tx: Sender<'_>,
    stream: Link,
    todo: &mut [u64],
    round: u32,
    pause_start: Instant,
) -> Result<Outcome> {
    let mem = tx.mem;
    let mut clock = DowntimePhases::clock(pause_start);
    let last = vm.take_dirty_bitmap()?;
    for (t, l) in todo.iter_mut().zip(&last) {
        *t |= *l;
    }
    tx.throttle = false; // the final copy is never throttled
    for pfn in set_pages(todo) {
        tx.queue(pfn, true)?;
    }
    tx.flush()?;
    tx.sync()?;
    tx.pool = None; // the extra streams carry nothing more
    clock.end(|p| &mut p.final_pages_us);
    faults::hold(job, Phase::Switch);
    if params.verify {
        let crc32 = mem.digest(vm.ram()) ^ u32::from(params.corrupt_digest);
        job.update(|s| s.verified = Some(false));
        tx.write_control(&Message::Digest { crc32 })?;
    }
    let state = vm.capture()?;
    let blob = state.encode()?;
    let state_bytes = blob.len();
    tx.write_control(&Message::State { blob })?;
    clock.end(|p| &mut p.state_us);
    tracing::debug!(state_bytes, "state sent");
    let mut rx = stream;
    expect_ready(&mut rx)?;
    if params.verify {
        job.update(|s| s.verified = Some(true));
    }
    clock.end(|p| &mut p.destination_ready_us);
    tracing::debug!("destination ready");
    // Commit point: from here on the source never resumes on its own.
    job.commit()?;
    send_go(&mut tx, params, job)?;
    let confirm = expect_confirm(&mut rx);
    // The phases end first, so that they never add up to more than the
    // downtime (a preemption between the two reads made them 49 µs more).
    clock.end(|p| &mut p.go_confirm_us);
    let downtime = pause_start.elapsed().as_secs_f64() * 1e3;
    job.update(|s| {
        s.downtime_phases = Some(clock.phases.clone());
        s.downtime_ms = downtime;
        s.remaining_bytes = 0;
        s.bytes = tx.bytes;
    });
    match confirm {
        Ok(resume_us) => {
            tracing::info!(
                downtime_ms = downtime,
                resume_us,
                rounds = round,
                "migration completed"
            );
            Ok(Outcome::Completed)
        }
        Err(why) => Ok(Outcome::Unconfirmed(why)),
    }
}

/// Makes a commit's note at `path` durable (the file and its directory
/// synced) on a thread of its own, started as the note is written, before
/// Go: after a power loss past Go the host comes back knowing the VM may
/// run on the destination. Off the pause (the sync takes ms, the Confirm may
/// take long), and on every path after the commit, a failed Go's too; the
/// window left is the sync's few ms. A failure is logged; the note stays as
/// written.
fn sync_note_in_background(path: std::path::PathBuf) {
    let sync = move || {
        let synced = std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .and_then(|()| match path.parent() {
                Some(dir) => std::fs::File::open(dir).and_then(|d| d.sync_all()),
                None => Ok(()),
            });
        if let Err(e) = synced {
            tracing::warn!(path = %path.display(), "syncing the commit's note: {e}");
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("commit-sync".into())
        .spawn(sync)
    {
        tracing::warn!("no thread to sync the commit's note: {e}");
    }
}

/// After Go: the destination's Confirm (its resume time, µs), or why the
/// commit stays unconfirmed (the source then keeps its copy paused).
pub(crate) fn expect_confirm(rx: &mut Link) -> std::result::Result<u64, String> {
    match wire::expect_control(rx, "Confirm") {
        Ok(Message::Confirm { resume_us }) => Ok(resume_us),
        Ok(other) => Err(format!(
            "destination answered {} instead of Confirm after the commit; source VM kept paused",
            other.name()
        )),
        Err(e) => Err(format!(
            "no confirmation after the commit ({e}); source VM kept paused: check the destination before resuming it"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{
        expected_downtime_ms, not_converging, over_max_downtime, reorder_plan, switch_allowance_ms,
        wire_ratio, LastRound, Watchdog, MAX_ZERO_RANGES,
    };
    use crate::{Error, Result};
    use std::time::Duration;

    #[test]
    fn a_full_list_of_zero_ranges_fits_in_one_frame() {
        // Scattered single pages of a guest far above 4 GiB: the largest
        // varints there are.
        let ranges: Vec<(u64, u64)> = (0..MAX_ZERO_RANGES as u64)
            .map(|i| ((1 << 50) + i * 2 * 4096, 1))
            .collect();
        let f = wire::encode_control(&wire::Message::Zero { ranges }).unwrap();
        assert!(f.len() < 2 << 20, "{} bytes", f.len());
    }

    #[test]
    fn the_watchdog_fails_a_trickle_and_spares_a_slow_link() {
        let ms = Duration::from_millis;
        // A stopped destination: 2 s blocked per 64 KiB batch.
        let mut w = Watchdog::default();
        let r: Result<Vec<()>> = (0..5).map(|_| w.sent(ms(2000), 64 << 10)).collect();
        assert!(matches!(r, Err(Error::Stalled(10))), "{r:?}");
        // A 1 Mbit/s link: 1 MiB batches of 8.4 s each, for a minute.
        let mut w = Watchdog::default();
        for _ in 0..8 {
            w.sent(ms(8400), 1 << 20).unwrap();
        }
        // One 1 MiB batch that took ten minutes to trickle out.
        let mut w = Watchdog::default();
        assert!(matches!(
            w.sent(ms(600_000), 1 << 20),
            Err(Error::Stalled(600))
        ));
        // A batch at just over the floor's rate passes, however long.
        let mut w = Watchdog::default();
        w.sent(ms(60_000), 6 << 20).unwrap();
        // Quiet stretches (nothing sent) and tiny control frames never add up.
        let mut w = Watchdog::default();
        for _ in 0..10_000 {
            w.sent(ms(0), 20).unwrap();
        }
    }

    /// A connected socket whose other end a thread reads and drops (its
    /// result: how many bytes, once the socket closes).
    fn loopback_to_sink() -> (
        std::net::TcpStream,
        std::thread::JoinHandle<std::io::Result<u64>>,
    ) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let out = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        let reader = std::thread::spawn(move || std::io::copy(&mut peer, &mut std::io::sink()));
        (out, reader)
    }

    /// Compressing a batch is not time blocked in sends: at zstd level 19 a
    /// 1 MiB batch took ~2 s, and the watchdog took a healthy migration of
    /// well-compressible memory for a destination that stopped reading.
    #[test]
    fn the_watchdog_books_the_writes_and_not_the_compression() {
        use super::{Job, Sender};
        use crate::memview::MemView;
        use link::Link;
        use vmm::memory::{GuestRam, PAGE_SIZE};

        let (out, reader) = loopback_to_sink();
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = MemView::new(&ram);
        // Text-like pages: a few letters, in an order zstd has to search.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for pfn in 0..64 {
            for b in mem.page_mut(pfn * PAGE_SIZE).unwrap().iter_mut() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = b"etaoin s"[(x >> 61) as usize];
            }
        }
        let job = Job::default();
        let mut tx = Sender::new(Link::plain(out), &mem, &job);
        tx.zstd = Some(wire::PageCompressor::new(19).unwrap());
        for pfn in 0..64 {
            tx.queue(pfn, false).unwrap();
        }
        tx.flush().unwrap();
        let c = job.snapshot().compression;
        assert!(c.wire_bytes < c.raw_bytes / 2, "{c:?}");
        let compressing = Duration::from_secs_f64(c.compress_ms / 1e3);
        // A write of a few KiB into an idle loopback socket takes
        // microseconds, the compression tens of milliseconds or more.
        assert!(
            tx.watchdog.blocked < compressing,
            "{:?} booked as blocked in sends for a batch compressed in {compressing:?}",
            tx.watchdog.blocked
        );
        assert_eq!(tx.watchdog.bytes, tx.bytes);
        drop(tx);
        reader.join().unwrap().unwrap();
    }

    /// Every page that goes marks `sent_before`: zero ranges and deltas as
    /// whole pages do, so that hybrid discards them at the destination
    /// before the switch once dirtied, and sent again they count as re-sent
    /// (and, not cached, as XBZRLE misses). A zero page skipped is not sent.
    #[test]
    fn zero_ranges_and_deltas_count_as_sent_before() {
        use super::{Job, Sender};
        use crate::memview::MemView;
        use link::Link;
        use vmm::memory::{GuestRam, PAGE_SIZE};

        let (out, reader) = loopback_to_sink();
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = MemView::new(&ram);
        let sent = |tx: &Sender<'_>, pfn: u64| {
            tx.sent_before[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
        };
        let write = |pfn: u64, b: u8| mem.page_mut(pfn * PAGE_SIZE).unwrap()[100] = b;

        // Without XBZRLE: page 0 goes as a zero range, page 1 is skipped.
        let job = Job::default();
        let mut tx = Sender::new(Link::plain(out.try_clone().unwrap()), &mem, &job);
        tx.queue(0, true).unwrap();
        tx.queue(1, false).unwrap();
        tx.flush().unwrap();
        assert!(sent(&tx, 0), "a zero range was sent");
        assert!(!sent(&tx, 1), "a zero page skipped was not");
        // Both written and sent whole: page 0 goes the second time.
        write(0, 1);
        write(1, 1);
        tx.queue(0, true).unwrap();
        tx.queue(1, true).unwrap();
        tx.flush().unwrap();
        let p = job.snapshot().pages;
        assert_eq!((p.sent, p.resent), (2, 1), "{p:?}");
        drop(tx);

        // XBZRLE with two slots: pages 2 and 4 share one, page 3 has the other.
        let job = Job::default();
        job.update(|s| s.xbzrle.cache_size = 2 * PAGE_SIZE);
        let mut tx = Sender::new(Link::plain(out), &mem, &job);
        tx.queue(2, true).unwrap();
        tx.queue(3, true).unwrap();
        tx.flush().unwrap();
        // Page 3's zero copy is the base of its delta: a delta is sent.
        write(3, 7);
        tx.queue(3, true).unwrap();
        // Page 4 takes page 2's slot: page 2, written, goes whole, missed.
        write(4, 9);
        write(2, 9);
        tx.queue(4, true).unwrap();
        tx.queue(2, true).unwrap();
        tx.flush().unwrap();
        assert!(sent(&tx, 2) && sent(&tx, 3) && sent(&tx, 4));
        let s = job.snapshot();
        assert_eq!(
            (s.xbzrle.pages, s.xbzrle.cache_miss),
            (1, 1),
            "{:?}",
            s.xbzrle
        );
        // The delta (page 3) and page 2 went before, page 4 did not.
        assert_eq!((s.pages.sent, s.pages.resent), (3, 2), "{:?}", s.pages);
        drop(tx);
        reader.join().unwrap().unwrap();
    }

    #[test]
    fn reorder_sends_rarely_dirtied_pages_first_and_splits_at_the_hot_tail() {
        // Pages 0..8 and 64..66; counts: page 1 and 64 hot.
        let todo = vec![0xff, 0b11];
        let mut counts = vec![1u8; 128];
        counts[1] = 5;
        counts[64] = 2;
        counts[3] = 0;
        let (order, split) = reorder_plan(&todo, &counts);
        assert_eq!(order, vec![3, 0, 2, 4, 5, 6, 7, 65, 64, 1]);
        assert_eq!(split, 8, "the tail is the pages dirtied twice or more");
        // No hot page: the tail is the upper half.
        let (order, split) = reorder_plan(&todo, &[1; 128]);
        assert_eq!(order, vec![0, 1, 2, 3, 4, 5, 6, 7, 64, 65]);
        assert_eq!(split, 5);
        // All hot: still only the upper half waits for the second look.
        let (_, split) = reorder_plan(&todo, &[9; 128]);
        assert_eq!(split, 5);
        // A page beyond the counts sorts last; an empty round has no tail.
        let (order, _) = reorder_plan(&[0b1, 0, 0b1], &[3; 10]);
        assert_eq!(order, vec![0, 128]);
        assert_eq!(reorder_plan(&[0, 0], &[]), (vec![], 0));
    }

    #[test]
    fn the_pause_estimate_counts_round_trips_state_and_vcpus() {
        // A 50 ms round trip is paid twice; 1 Gbit/s carries 16 KiB in 0.13 ms.
        let a = switch_allowance_ms(50.0, 1, 125e6);
        assert!(
            (a - (100.0 + 16384.0 / 125e6 * 1e3 + 1.0)).abs() < 1e-9,
            "{a}"
        );
        // More vCPUs, more state and more work; an unknown bandwidth counts no state.
        assert!(switch_allowance_ms(0.0, 4, 125e6) > switch_allowance_ms(0.0, 1, 125e6));
        assert_eq!(switch_allowance_ms(0.0, 2, 0.0), 1.5);
    }

    #[test]
    fn an_unknown_bandwidth_gives_no_expected_pause_and_no_infinite_one() {
        let page = 4096;
        // 100 MiB pending, no round measured the link yet: not known.
        assert_eq!(expected_downtime_ms(100 << 20, 1.0, 0.0, None, 1), None);
        // A handful of pages: the switch-over's own cost alone.
        assert_eq!(
            expected_downtime_ms(64 * page, 1.0, 0.0, None, 1),
            Some(1.0)
        );
        // Measured: the pages at the bandwidth, compression counted.
        let e = expected_downtime_ms(100 << 20, 2.0, 100e6, Some(1.0), 1).unwrap();
        let want = (100 << 20) as f64 / 2.0 / 100e6 * 1e3 + switch_allowance_ms(1.0, 1, 100e6);
        assert!((e - want).abs() < 1e-9, "{e} {want}");
        // The error of --strict-downtime says so, with no number.
        let e = over_max_downtime("round limit", 100 << 20, None, 300.0).to_string();
        assert!(e.contains("100 MiB still dirty"), "{e}");
        assert!(e.contains("a pause of unknown length"), "{e}");
        assert!(!e.contains("inf") && !e.contains("NaN"), "{e}");
        let e = over_max_downtime("round limit", 100 << 20, Some(1048.6), 300.0).to_string();
        assert!(e.contains("about 1049 ms of pause"), "{e}");
    }

    #[test]
    fn pending_pages_cost_what_the_last_rounds_deltas_cost_on_the_wire() {
        let bw = (16 << 20) as f64;
        // A guest bumping a counter in 4096 cached pages: the last round sent
        // each as a delta of 20 bytes, in 20 ms (5 ms of them at the link).
        let bumps = LastRound {
            pages: 4096,
            deltas: 4096,
            delta_bytes: 4096 * 20,
            ms: 20.0,
        };
        // No round with deltas yet (round 0, XBZRLE off, or no cache hit):
        // zstd's ratio alone, exactly as for whole pages.
        for ratio in [1.0, 2.5] {
            assert_eq!(wire_ratio(ratio, bw, None, 4096, 100), ratio);
            let whole = LastRound {
                deltas: 0,
                delta_bytes: 0,
                ..bumps
            };
            assert_eq!(wire_ratio(ratio, bw, Some(whole), 4096, 100), ratio);
        }
        assert_eq!(wire_ratio(0.5, bw, None, 1, 0), 1.0, "never more than raw");
        // Its time bounds it (20 ms for 4096 pages, 82 bytes each at the
        // link), not the 20 bytes: 64 MiB/s of such pages is 1.3 MB/s at
        // the link, far below 80 % of it (which the pages' raw size is
        // over: auto switched to post-copy for it).
        let r = wire_ratio(1.0, bw, Some(bumps), 4096, 0);
        let per_page = bw * 0.020 / 4096.0;
        assert!((r - 4096.0 / per_page).abs() < 1e-9, "{r}");
        let cold_rate = (64 << 20) as f64;
        assert!(cold_rate / 1.0 >= 0.8 * bw);
        assert!(cold_rate / r < 0.1 * bw, "{r}");
        // And 16 MiB of them pending is a pause of ~20 ms, not ~1 s.
        let e = expected_downtime_ms(16 << 20, r, bw, Some(0.1), 1).unwrap();
        assert!(e < 25.0, "{e}");
        let old = expected_downtime_ms(16 << 20, 1.0, bw, Some(0.1), 1).unwrap();
        assert!(old > 1000.0, "{old}");
        // A quicker round: the bytes bound it.
        let quick = LastRound { ms: 1.0, ..bumps };
        let r = wire_ratio(1.0, bw, Some(quick), 4096, 0);
        assert!((r - 4096.0 / 20.0).abs() < 1e-9, "{r}");
        // Half the pages hit (2000 bytes of deltas for 100), half went whole
        // at zstd's 2 ×: (2000 + 100 · 2048) / 200 bytes a page.
        let half = LastRound {
            pages: 200,
            deltas: 100,
            delta_bytes: 2000,
            ms: 1.0,
        };
        let r = wire_ratio(2.0, bw, Some(half), 200, 0);
        assert!((r - 4096.0 / 1034.0).abs() < 1e-9, "{r}");
        // A round that took longer than whole pages would have: whole
        // pages, no worse than without XBZRLE.
        let slow = LastRound { ms: 500.0, ..bumps };
        assert_eq!(wire_ratio(2.0, bw, Some(slow), 4096, 10), 2.0);
        // The measure holds for as many pages as the round sent: 1000 pages
        // pending after a round of 10 deltas are 990 whole ones (and zstd
        // shrinks those alone).
        let few = LastRound {
            pages: 10,
            deltas: 10,
            delta_bytes: 200,
            ms: 0.001,
        };
        let r = wire_ratio(2.0, bw, Some(few), 1000, 0);
        let want = 1000.0 * 4096.0 / (200.0 + 990.0 * 2048.0);
        assert!((r - want).abs() < 1e-9, "{r}");
        // Hot pages may never have gone, so not be in the cache: whole.
        let r = wire_ratio(1.0, bw, Some(quick), 100, 100);
        let want = 200.0 * 4096.0 / (100.0 * 20.0 + 100.0 * 4096.0);
        assert!((r - want).abs() < 1e-9, "{r}");
        // Nothing pending: no page to cost.
        assert_eq!(wire_ratio(3.0, bw, Some(bumps), 0, 0), 3.0);
    }

    #[test]
    fn convergence_rule() {
        assert!(!not_converging(&[100, 100, 100]));
        assert!(not_converging(&[100, 100, 100, 100]));
        assert!(not_converging(&[100, 95, 92, 93]));
        assert!(!not_converging(&[100, 50, 50, 50]));
        assert!(!not_converging(&[100, 100, 100, 50]));
        assert!(not_converging(&[500, 100, 50, 49, 48, 47]));
        // Slowly shrinking, up and down: goes on.
        assert!(!not_converging(&[1000, 870, 900, 780, 800]));
        assert!(!not_converging(&[1000, 870, 900, 780, 800, 790]));
        assert!(not_converging(&[1000, 870, 900, 780, 800, 790, 775]));
    }
}
