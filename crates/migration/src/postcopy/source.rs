//! The source of a post-copy phase: the push, the answers to faults, recovery.

use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use link::{Link, TlsSetup};
use vmm::memory::{is_zero_page, PAGE_SIZE};
use vmm::Vm;
use wire::{Message, PostcopyReport, MAX_BATCH_PAGES};

use crate::bitmap::{is_set, popcount, to_runs};
use crate::doorman::{Arrival, Doorman};
use crate::faults::{self, Phase};
use crate::memview::MemView;
use crate::precopy::{self, Job, Outcome, Params, Sender};
use crate::stats::{DowntimePhases, FaultStats, MigrationStats};
use crate::{io_err, Error, Result};

use super::{lock, prioritize_this_thread, watch_link, LINK_TIMEOUT};

/// Pages per push batch: small enough that a re-centred cursor takes effect soon.
const PUSH_BATCH: usize = 64;
/// Under a bandwidth cap, how far fault answers may run ahead of it before
/// they wait too (the push waits for them at once): a burst of ~10 answers
/// at 64 MiB/s.
const ANSWER_AHEAD: Duration = Duration::from_millis(10);
/// Under a cap, a demanded page that was sent already goes again only while
/// the push's connection holds at least this much not yet sent (its copy
/// may be that far behind): 64 KiB, half a millisecond at 1 Gbit/s, about
/// one answer.
const SENT_CLOSE_BEHIND: u64 = 64 << 10;

/// Whether a fault's answer carries the demanded page: yes unless it was
/// `sent` already, under a cap (`capped`), and the push's connection has
/// less than [`SENT_CLOSE_BEHIND`] not yet sent (`unsent`, asked only then).
fn resend_demanded(sent: bool, capped: bool, unsent: impl FnOnce() -> Option<u64>) -> bool {
    !sent || !capped || unsent().is_none_or(|n| n >= SENT_CLOSE_BEHIND)
}

/// Migrates `vm` to `params.to` in post-copy mode (`hybrid`: pre-copy rounds
/// first). Returns `Completed` only once the destination has every page; until
/// then the source keeps its (paused) copy of memory and serves it.
pub fn migrate(vm: &Vm, params: &Params, job: &Job, hybrid: bool) -> Outcome {
    let mode = match (params.auto, hybrid) {
        (true, _) => "auto",
        (false, true) => "hybrid",
        (false, false) => "postcopy",
    };
    precopy::drive(vm, params, job, mode, |start, paused_at| {
        run(vm, params, job, start, paused_at, hybrid)
    })
}

/// First and longest wait between two reconnection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where the source finds the destination again after a lost link.
struct Peer {
    /// The destination VM process's recovery listener.
    addr: SocketAddr,
    /// The name its certificate was checked for on the main link (TLS).
    identity: Option<String>,
    /// Identifies this migration there.
    token: u64,
}

/// What the source shares between its push and serving threads.
struct Supply<'a> {
    mem: &'a MemView,
    job: &'a Job,
    expected: Vec<u64>,
    total: u64,
    /// Pages sent in this session or known to be at the destination.
    claimed: Vec<AtomicU64>,
    remaining: AtomicU64,
    /// Where the push goes on (a pfn), or u64::MAX.
    recentre: AtomicU64,
    /// The session is over (completed or broken): threads wind down.
    stop: AtomicBool,
    window: u64,
    tls: Option<&'a TlsSetup>,
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

    /// Sends the pages at `offsets` on `w`: data for non-zero pages, one `Zero`
    /// message for those that are zero now (the map was made at the pause
    /// without reading the pages, to keep the pause short).
    /// Returns the bytes it wrote.
    fn send(&self, w: &Mutex<Link>, offsets: &[u64]) -> Result<u64> {
        let mut data = Vec::with_capacity(offsets.len());
        let mut pages = Vec::with_capacity(offsets.len());
        let mut zero = Vec::new();
        for &o in offsets {
            let page = self
                .mem
                .page(o)
                .ok_or_else(|| Error::Protocol(format!("page {o:#x} outside RAM")))?;
            if is_zero_page(page) {
                zero.push((o, 1));
            } else {
                data.push(o);
                pages.push(page);
            }
        }
        let mut bytes = 0;
        let mut w = lock(w);
        if !zero.is_empty() {
            let f = wire::encode_control(&Message::Zero {
                ranges: zero.clone(),
            })?;
            w.write_all(&f).map_err(io_err("sending to destination"))?;
            bytes += f.len() as u64;
        }
        if !data.is_empty() {
            wire::write_pages(&mut *w, &data, &pages)?;
            bytes += 9 + data.len() as u64 * (8 + PAGE_SIZE);
        }
        drop(w);
        self.job.update(|s| {
            s.pages.sent += data.len() as u64;
            s.pages.zero += zero.len() as u64;
            s.bytes += bytes;
            s.remaining_bytes = self.remaining.load(Ordering::Relaxed) * PAGE_SIZE;
        });
        Ok(bytes)
    }

    /// Background push on the main connection until every page is claimed.
    fn push(&self, w: &Mutex<Link>) -> Result<()> {
        let pages = self.mem.pages();
        let words = self.expected.len();
        let mut pos: u64 = 0;
        let mut batch = Vec::with_capacity(PUSH_BATCH);
        while !self.stop.load(Ordering::Relaxed) && self.remaining.load(Ordering::Acquire) > 0 {
            let r = self.recentre.swap(u64::MAX, Ordering::AcqRel);
            if r != u64::MAX && r < pages {
                pos = r;
            }
            // A full batch that ended on the last page of RAM.
            if pos >= pages {
                pos = 0;
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
                // Everything is claimed (maybe by a fault answer): done.
                break;
            }
            let bytes = self.send(w, &batch)?;
            // Under a cap the push waits for every byte sent, answers included.
            self.job.charge(bytes, Duration::ZERO);
        }
        Ok(())
    }

    /// Answers fault requests read from `r` on `w` until the destination's
    /// `PostcopyDone` (returned) or, once the session is stopping, the end of
    /// the stream (`None`). `push` is the push's connection.
    fn serve(
        &self,
        r: &mut impl Read,
        w: &Mutex<Link>,
        push: &std::net::TcpStream,
    ) -> Result<Option<PostcopyReport>> {
        let pages = self.mem.pages();
        let mut batch = Vec::with_capacity(MAX_BATCH_PAGES);
        // An answer that cannot be sent ends the answers, not the reading: the
        // destination may have finished (its PostcopyDone is still to read).
        let mut send_failed: Option<Error> = None;
        loop {
            let msg = match wire::expect_control(r, "PageRequest or PostcopyDone") {
                Ok(m) => m,
                Err(e) => {
                    return match send_failed {
                        Some(f) => Err(f),
                        None if self.stop.load(Ordering::Relaxed) => Ok(None),
                        None => Err(e.into()),
                    }
                }
            };
            if send_failed.is_some() && !matches!(msg, Message::PostcopyDone { .. }) {
                continue;
            }
            let offset = match msg {
                Message::PageRequest { offset } => offset,
                Message::PostcopyDone { report } => return Ok(Some(report)),
                Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
                other => {
                    return Err(Error::Protocol(format!(
                        "expected PageRequest, got {}",
                        other.name()
                    )))
                }
            };
            let pfn = offset / PAGE_SIZE;
            if !offset.is_multiple_of(PAGE_SIZE) || pfn >= pages || !is_set(&self.expected, pfn) {
                return Err(Error::Protocol(format!(
                    "request for page {offset:#x}, which is not to be sent"
                )));
            }
            // The demanded page goes even if it was sent already (by the push,
            // or in an earlier answer's window): that copy may be queued
            // behind bulk data, in either host's socket buffers. Under a cap
            // the push's next page is often the one a sequential writer
            // faults on, and would cross twice; there the push sends no
            // faster than the cap, so when its connection also has next to
            // nothing left to send, the copy is right behind and the page
            // does not go again. (A copy lost with a broken link is not
            // claimed after the recovery.) Without a cap the push runs
            // megabytes ahead in the destination's receive queue, which
            // this host cannot see.
            let sent = !self.claim(pfn);
            let capped = self.job.max_bandwidth().is_some();
            batch.clear();
            if resend_demanded(sent, capped, || precopy::unsent(push)) {
                batch.push(offset);
            }
            let mut p = pfn + 1;
            let mut window = 0;
            while window < self.window && p < pages && batch.len() < MAX_BATCH_PAGES {
                if is_set(&self.expected, p) && self.claim(p) {
                    batch.push(p * PAGE_SIZE);
                    window += 1;
                }
                p += 1;
            }
            if batch.is_empty() {
                self.recentre.store(p.min(pages - 1), Ordering::Release);
                continue;
            }
            match self.send(w, &batch) {
                // Under a cap an answer goes before the push's next batch,
                // and waits only once answers alone run past the cap.
                Ok(bytes) => self.job.charge(bytes, ANSWER_AHEAD),
                Err(e) => {
                    self.stop.store(true, Ordering::Relaxed);
                    self.job.close_sending();
                    send_failed = Some(e);
                    continue;
                }
            }
            self.recentre.store(p.min(pages - 1), Ordering::Release);
        }
    }

    /// One session of the post-copy phase on `main` (and `urgent`, the fault
    /// channel, if there is one): push and serve until the destination reports
    /// every page, or a connection breaks.
    fn session(&self, main: Link, urgent: Option<Link>) -> Result<PostcopyReport> {
        self.stop.store(false, Ordering::Relaxed);
        {
            let mut links = lock(&self.job.links);
            links.clear();
            for s in std::iter::once(&main).chain(urgent.as_ref()) {
                links.push(s.try_clone().map_err(io_err("socket"))?);
            }
        }
        let main_w = Mutex::new(main.try_clone().map_err(io_err("socket"))?);
        let push_sock = main.tcp().try_clone().map_err(io_err("socket"))?;
        let mut main_r = BufReader::new(main);
        let urgent = match urgent {
            Some(u) => Some((
                BufReader::new(u.try_clone().map_err(io_err("socket"))?),
                Mutex::new(u),
            )),
            None => None,
        };
        // Whichever thread fails first closes our sending side of every link:
        // the destination sees the end and closes too, so the others stop. The
        // receiving side stays open, since a `PostcopyDone` may be waiting
        // there (a push that fails because the destination finished and
        // closed is not a lost link).
        let end = |r: Result<()>| {
            if r.is_err() {
                self.stop.store(true, Ordering::Relaxed);
                self.job.close_sending();
            }
            r
        };
        std::thread::scope(|sc| {
            let pusher = sc.spawn(|| {
                prioritize_this_thread(false);
                // A panic ends the session as a failure: unseen, the phase
                // would wait for pages that nobody pushes.
                end(crate::caught(|| self.push(&main_w)))
            });
            let push_sock = &push_sock;
            let server = urgent.map(|(mut r, w)| {
                sc.spawn(move || {
                    prioritize_this_thread(true);
                    end(crate::caught(|| {
                        self.serve(&mut r, &w, push_sock)
                            .and_then(|done| match done {
                                Some(_) => {
                                    Err(Error::Protocol("PostcopyDone on the fault channel".into()))
                                }
                                None if self.stop.load(Ordering::Relaxed) => Ok(()),
                                None => Err(Error::Protocol("the fault channel closed".into())),
                            })
                    }))
                })
            });
            let done = self.serve(&mut main_r, &main_w, push_sock);
            self.stop.store(true, Ordering::Relaxed);
            self.job.cut_links();
            let mut why = None;
            for t in std::iter::once(pusher).chain(server) {
                match t.join() {
                    Ok(Err(e)) => why = why.or(Some(e)),
                    Err(_) => {
                        why = why.or(Some(Error::Protocol("a post-copy thread panicked".into())))
                    }
                    Ok(Ok(())) => {}
                }
            }
            match done {
                Ok(Some(report)) => Ok(report),
                Err(e @ Error::PeerCancelled(_)) => Err(e),
                // The first failure says best what happened.
                Ok(None) => {
                    Err(why.unwrap_or(Error::Protocol("the main connection closed".into())))
                }
                Err(e) => Err(why.unwrap_or(e)),
            }
        })
    }

    /// After a broken session: reconnects to the destination with back-off until
    /// it answers, or until the operator gives up (`migctl cancel`). Returns the
    /// new connections, or the report if the destination had finished meanwhile.
    fn recover(&self, link: &Peer, why: &Error, channel: bool) -> Result<Recovered> {
        let job = self.job;
        tracing::warn!(
            error = %why,
            destination = %link.addr,
            "post-copy link lost: the destination's VM waits for its missing pages; reconnecting"
        );
        job.update(|s| {
            s.status = "postcopy-paused".into();
            s.error = Some(format!(
                "post-copy link lost ({why}); reconnecting to {}",
                link.addr
            ));
        });
        let mut delay = BACKOFF_FIRST;
        let mut refused = false;
        for attempt in 1u64.. {
            if job.cancel.load(Ordering::SeqCst) {
                return Err(Error::Protocol(self.abandoned(link, refused)));
            }
            match self.reconnect(link, channel) {
                Ok(r) => {
                    job.update(|s| {
                        s.status = "postcopy-active".into();
                        s.recoveries += 1;
                        s.error = None;
                        // A give-up that came during this attempt is moot:
                        // the link is back ([`Job::abandon_recovery`]).
                        job.cancel.store(false, Ordering::SeqCst);
                    });
                    tracing::info!(attempt, "post-copy link re-established");
                    return Ok(r);
                }
                Err(e) => {
                    refused = matches!(&e, Error::Io { cause, .. }
                        if cause.kind() == std::io::ErrorKind::ConnectionRefused);
                    tracing::warn!(attempt, error = %e, next_in_ms = delay.as_millis() as u64, "post-copy recovery attempt failed");
                    job.update(|s| {
                        s.error = Some(format!(
                            "post-copy link lost ({why}); reconnecting to {} (attempt {attempt}: {e})",
                            link.addr
                        ))
                    });
                }
            }
            let until = Instant::now() + delay;
            while Instant::now() < until
                && !job.recover_now.swap(false, Ordering::SeqCst)
                && !job.cancel.load(Ordering::SeqCst)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
        unreachable!("the attempts never run out")
    }

    /// What the operator must know when the source gives up on a post-copy phase.
    /// `gone`: the last attempt was refused (the destination's VM process is gone).
    fn abandoned(&self, link: &Peer, gone: bool) -> String {
        if gone {
            return format!(
                "post-copy abandoned by the operator: the destination ({}) refuses \
                 reconnection, so its VM process and the VM's state since the switch are gone; \
                 this host keeps the VM paused as it was at the switch (all {} pages it had to \
                 send). Resuming it would roll the guest back to the switch: only the operator \
                 can decide that",
                link.addr.ip(),
                self.total,
            );
        }
        format!(
            "post-copy abandoned by the operator while the link was down: the destination \
             ({}) holds the VM's vCPU and device state and the pages it received; this host \
             keeps the VM paused with all {} pages it had to send, of which {} were not \
             confirmed received. Neither host can run the VM alone; it survives only if the \
             destination's VM process is kept and a new recovery is made",
            link.addr.ip(),
            self.total,
            self.remaining.load(Ordering::Relaxed),
        )
    }

    /// One reconnection: a new main connection, the destination's received-bitmap,
    /// a new fault channel; then only the pages the destination lacks count as unsent.
    fn reconnect(&self, link: &Peer, channel: bool) -> Result<Recovered> {
        let open = |urgent: bool| -> Result<Link> {
            let mut s =
                precopy::connect_addr(link.addr, link.identity.as_deref(), self.tls, LINK_TIMEOUT)?;
            watch_link(&s)?;
            s.set_read_timeout(Some(LINK_TIMEOUT))
                .map_err(io_err("socket timeout"))?;
            wire::write_control(
                &mut s,
                &Message::RecoverHello {
                    job: link.token,
                    urgent,
                },
            )?;
            Ok(s)
        };
        let mut main = open(false)?;
        // Cut-able while held (the session registers its own links).
        self.job.register(&main)?;
        faults::hold(self.job, Phase::Recovery);
        self.job.forget_links();
        self.job.check_cancel()?;
        let bitmap = match wire::expect_control_up_to(&mut main, "Received", wire::MAX_FRAME)? {
            Message::Received { bitmap } => bitmap,
            Message::ReceivedPart {
                first_word,
                words,
                last,
            } => super::read_received_parts(
                &mut main,
                (first_word, words, last),
                self.expected.len(),
            )?,
            Message::PostcopyDone { report } => return Ok(Recovered::Done(report)),
            Message::Refuse { reason } => return Err(Error::Refused(reason)),
            other => {
                return Err(Error::Protocol(format!(
                    "expected Received, got {}",
                    other.name()
                )))
            }
        };
        if bitmap.len() != self.expected.len() {
            return Err(Error::Protocol(format!(
                "received-bitmap of {} words for {} pages",
                bitmap.len(),
                self.mem.pages()
            )));
        }
        let urgent = if channel { Some(open(true)?) } else { None };
        for s in std::iter::once(&main).chain(urgent.as_ref()) {
            s.set_read_timeout(None).map_err(io_err("socket timeout"))?;
        }
        // What was in flight on the broken link is lost: the bitmap is the truth.
        let mut have = 0;
        for ((c, &e), &r) in self.claimed.iter().zip(&self.expected).zip(&bitmap) {
            c.store(e & r, Ordering::Release);
            have += (e & r).count_ones() as u64;
        }
        self.remaining.store(self.total - have, Ordering::Release);
        tracing::info!(
            received = have,
            missing = self.total - have,
            "destination's received-bitmap"
        );
        Ok(Recovered::Resumed(main, urgent))
    }
}

/// The result of a post-copy reconnection.
enum Recovered {
    /// New connections (main, fault channel).
    Resumed(Link, Option<Link>),
    /// The destination had every page already.
    Done(PostcopyReport),
}

fn run(
    vm: &Vm,
    params: &Params,
    job: &Job,
    start: Instant,
    paused_at: &mut Option<Instant>,
    hybrid: bool,
) -> Result<Outcome> {
    std::thread::scope(|scope| {
        let r = run_in(scope, vm, params, job, start, paused_at, hybrid);
        precopy::cut_links_on_failure(job, r)
    })
}

/// [`run`], with hybrid's page stream threads (multifd) on `scope`.
fn run_in<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    vm: &Vm,
    params: &Params,
    job: &'env Job,
    start: Instant,
    paused_at: &mut Option<Instant>,
    hybrid: bool,
) -> Result<Outcome> {
    let mode = if hybrid { "hybrid" } else { "postcopy" };
    let (stream, early) = precopy::open(vm, params, job, start, mode, || {
        precopy::prelude(vm, params, job, hybrid)
    })?;
    let ram = vm.ram().clone();
    let mem = MemView::new(&ram);
    let mut tx = Sender::negotiated(stream.try_clone().map_err(io_err("socket"))?, &mem, job)?;
    if hybrid {
        crate::multifd::start(scope, &mut tx, &ram, params, job)?;
    }
    job.update(|s| {
        s.prepaging_window = params.prepaging_window;
        s.fault_channel = params.fault_channel;
    });
    // What the destination will need, but for what the guest writes from now
    // to the pause (the dirty log adds that at the pause): hybrid, the pages
    // dirtied since their last round; post-copy, every page that holds data,
    // found now so that the pause does not walk the memfd.
    let todo = if hybrid {
        let limit = if params.auto {
            params.max_rounds
        } else {
            params
                .postcopy_after_rounds
                .clamp(1, params.max_rounds.max(1))
        };
        let (mut todo, round, cold_rate) =
            precopy::rounds(vm, params, job, &mut tx, early, limit, true)?;
        if params.auto {
            let s = job.snapshot();
            let (rate, bw) = (s.dirty_rate / 1e6, s.link_rate / 1e6);
            if s.stop_reason == precopy::STOP_CONVERGED {
                job.update(|s| {
                    s.policy = format!(
                        "pre-copy: after {round} round(s) the guest dirtied {rate:.0} MB/s against \
                         {bw:.0} MB/s of bandwidth; predicted downtime {:.1} ms within the \
                         {} ms allowed",
                        s.expected_downtime_ms,
                        job.max_downtime().as_millis()
                    )
                });
                let pause_start = Instant::now();
                vm.pause();
                *paused_at = Some(pause_start);
                return precopy::stop_and_copy(
                    vm,
                    params,
                    job,
                    tx,
                    stream,
                    &mut todo,
                    round,
                    pause_start,
                );
            }
            job.update(|s| s.policy = postcopy_policy(s, round, cold_rate));
        }
        // Each round ended at a barrier: the extra streams are done.
        tx.pool = None;
        todo
    } else {
        early.data
    };
    // Post-copy pages travel raw: a fault waits for its page, and the
    // destination's fault path takes only raw batches.
    tx.zstd = None;
    tx.zero_copy = false;
    // The fault channel: the destination connects back to us, so that it works
    // the same whoever accepted the main connection (`--incoming` or a daemon).
    // Without one, `UrgentListen` says port 0.
    let local = stream.local_addr().map_err(io_err("socket address"))?;
    let listener = if params.fault_channel {
        Some(TcpListener::bind((local.ip(), 0)).map_err(io_err("fault channel listener"))?)
    } else {
        None
    };
    let port = match &listener {
        Some(l) => l
            .local_addr()
            .map_err(io_err("fault channel listener"))?
            .port(),
        None => 0,
    };
    let token = crate::doorman::token();
    // Announced before the pause and accepted in the background, so that the
    // connection (and its TLS handshake) is not part of the downtime.
    tx.write_control(&Message::UrgentListen { port, job: token })?;
    let acceptor = match listener {
        Some(l) => {
            let tls = params.tls.clone();
            let peer = stream.peer_addr().map_err(io_err("peer address"))?.ip();
            let identity = stream.peer_identity().map(str::to_string);
            Some(
                std::thread::Builder::new()
                    .name("fault-channel".into())
                    .spawn(move || accept_urgent(l, (peer, identity), token, tls))
                    .map_err(io_err("starting the fault channel thread"))?,
            )
        }
        None => None,
    };

    // Switch: pause, tell the destination what it still needs, send the state.
    let pause_start = Instant::now();
    vm.pause();
    *paused_at = Some(pause_start);
    let mut clock = DowntimePhases::clock(pause_start);
    // Every candidate is expected: reading 4 KiB per page to find the zero ones
    // would lengthen the pause; the push sends those as `Zero` instead.
    let mut expected = todo;
    for (t, l) in expected.iter_mut().zip(&vm.take_dirty_bitmap()?) {
        *t |= *l;
    }
    tx.flush()?;
    let total = popcount(&expected);
    for m in super::page_map_messages(to_runs(&expected), super::page_map_part_runs()) {
        tx.write_control(&m)?;
    }
    clock.end(|p| &mut p.final_pages_us);
    faults::hold(job, Phase::Switch);
    let blob = vm.capture()?.encode()?;
    tx.write_control(&Message::State { blob })?;
    clock.end(|p| &mut p.state_us);
    let bytes = tx.bytes;
    job.update(|s| {
        s.pages.expected = total;
        s.remaining_bytes = total * PAGE_SIZE;
        s.bytes = bytes;
    });
    let urgent = match acceptor {
        Some(t) => Some(
            t.join()
                .map_err(|_| Error::Protocol("the fault channel thread panicked".into()))??,
        ),
        None => None,
    };
    let mut rx = stream;
    let recover_port = match wire::expect_control(&mut rx, "RecoverListen")? {
        Message::RecoverListen { port } => port,
        Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
        other => {
            return Err(Error::Protocol(format!(
                "expected RecoverListen, got {}",
                other.name()
            )))
        }
    };
    let link = Peer {
        addr: SocketAddr::new(
            rx.peer_addr().map_err(io_err("peer address"))?.ip(),
            recover_port,
        ),
        identity: rx.peer_identity().map(str::to_string),
        token,
    };
    crate::precopy::expect_ready(&mut rx)?;
    clock.end(|p| &mut p.destination_ready_us);
    // Commit point: from here on the source never resumes on its own.
    job.commit()?;
    let confirm = match precopy::send_go(&mut tx, params, job) {
        Ok(()) => crate::precopy::expect_confirm(&mut rx),
        Err(e) => Err(e.to_string()),
    };
    // The phases end first: they never add up to more than the downtime.
    clock.end(|p| &mut p.go_confirm_us);
    let downtime = pause_start.elapsed().as_secs_f64() * 1e3;
    job.update(|s| {
        s.downtime_phases = Some(clock.phases.clone());
        s.downtime_ms = downtime;
        s.status = "postcopy-active".into();
    });
    match confirm {
        Ok(_) => tracing::info!(
            downtime_ms = downtime,
            pages = total,
            "post-copy: destination runs the VM"
        ),
        // `Go` may have reached the destination, which then runs the VM and
        // needs the pages: serve them as after any lost link, by recovery
        // (the destination's listener is up since `RecoverListen`). If it
        // never ran the VM, it refuses reconnection and the operator's
        // cancel ends this, as it ends any recovery.
        Err(why) => {
            tracing::warn!(
                "post-copy: no confirmation from the destination ({why}); recovering the link"
            );
            let _ = rx.tcp().shutdown(std::net::Shutdown::Both);
            if let Some(u) = &urgent {
                let _ = u.tcp().shutdown(std::net::Shutdown::Both);
            }
        }
    }
    // A cancel from before the commit no longer applies: from now on it means
    // "give up recovery".
    job.cancel.store(false, Ordering::SeqCst);
    faults::hold(job, Phase::Postcopy);
    match postcopy_phase(&mem, job, params, expected, total, rx, urgent, &link) {
        Ok(report) => {
            tracing::info!(?report, "post-copy completed");
            Ok(Outcome::Completed)
        }
        Err(e) => Ok(Outcome::Unconfirmed(format!(
            "post-copy failed after the switch: {e}"
        ))),
    }
}

/// Auto's reason for going on in post-copy after `round` rounds, from the
/// statistics then. The rate it gives for the pages outside the hot ones is
/// `cold_rate` (bytes/s as sent, from [`precopy::rounds`]): the figure the
/// rounds weighed against the bandwidth, not `s.dirty_rate`, which counts
/// the hot pages too.
fn postcopy_policy(s: &MigrationStats, round: u32, cold_rate: f64) -> String {
    format!(
        "post-copy after {round} round(s): {} ({:.0} MiB of pages left to post-copy by the \
         sampling at the start of round 0; outside them the guest dirtied {:.0} MB/s, as \
         sent, against {:.0} MB/s of bandwidth)",
        s.stop_reason,
        s.pages.deferred as f64 * 4096.0 / (1 << 20) as f64,
        cold_rate / 1e6,
        s.link_rate / 1e6
    )
}

/// `peer`: the destination's address, and the name its certificate proved
/// on the main link (over TLS).
fn accept_urgent(
    listener: TcpListener,
    peer: (IpAddr, Option<String>),
    token: u64,
    tls: Option<TlsSetup>,
) -> Result<Link> {
    let wait = Duration::from_secs(20);
    let mut doorman = Doorman::new(
        listener,
        peer.0,
        tls,
        "UrgentHello",
        Duration::from_secs(10),
    )?
    .requiring_identity(peer.1.as_deref());
    let end = Instant::now() + wait;
    loop {
        // Waits without sleeping: this may be inside the pause.
        match doorman.next(end, None)? {
            Arrival::Greeted(g) => match g.hello {
                Message::UrgentHello { job } if job == token => return Ok(g.link),
                other => tracing::warn!(peer = %g.peer, ?other, "not our fault channel: dropped"),
            },
            Arrival::TimedOut | Arrival::Interrupted => {
                return Err(Error::Protocol(format!(
                    "the destination did not open the fault channel within {} s",
                    wait.as_secs()
                )))
            }
        }
    }
}

/// After Confirm: push, serve faults, wait for PostcopyDone; on a lost link,
/// reconnect and go on from the destination's received-bitmap.
#[allow(clippy::too_many_arguments)]
fn postcopy_phase(
    mem: &MemView,
    job: &Job,
    params: &Params,
    expected: Vec<u64>,
    total: u64,
    main: Link,
    urgent: Option<Link>,
    link: &Peer,
) -> Result<PostcopyReport> {
    let supply = Supply {
        mem,
        job,
        claimed: expected.iter().map(|_| AtomicU64::new(0)).collect(),
        expected,
        total,
        remaining: AtomicU64::new(total),
        recentre: AtomicU64::new(u64::MAX),
        stop: AtomicBool::new(false),
        window: params.prepaging_window as u64,
        tls: params.tls.as_ref(),
    };
    // The destination may run for long before all pages are there: no read
    // timeout; a dead link shows within LINK_TIMEOUT.
    for s in std::iter::once(&main).chain(urgent.as_ref()) {
        watch_link(s)?;
        s.set_read_timeout(None).map_err(io_err("socket timeout"))?;
    }
    let started = Instant::now();
    let (mut main, mut urgent) = (main, urgent);
    let report = loop {
        let why = match supply.session(main, urgent) {
            Ok(report) => break report,
            Err(e @ Error::PeerCancelled(_)) => return Err(e),
            Err(e) => e,
        };
        match supply.recover(link, &why, params.fault_channel)? {
            Recovered::Resumed(m, u) => (main, urgent) = (m, u),
            Recovered::Done(report) => break report,
        }
    };
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
            blocked_us: report.blocked_us,
            histogram_us: report.histogram_us.clone(),
        };
    });
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        "post-copy phase over"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Auto's reason for post-copy quotes the rate its choice went by: the
    /// cold pages' (as sent), not the dirty rate, which counts the hot ones.
    #[test]
    fn the_reason_for_post_copy_quotes_the_cold_pages_rate() {
        let mut s = MigrationStats {
            stop_reason: "dirty rate above 80 % of the bandwidth".into(),
            dirty_rate: 900e6,
            link_rate: 100e6,
            ..Default::default()
        };
        s.pages.deferred = 2560;
        let why = postcopy_policy(&s, 2, 85e6);
        assert!(
            why.starts_with("post-copy after 2 round(s): dirty rate above 80 %"),
            "{why}"
        );
        assert!(why.contains("10 MiB of pages left"), "{why}");
        assert!(
            why.contains("dirtied 85 MB/s, as sent, against 100 MB/s"),
            "{why}"
        );
        assert!(!why.contains("900"), "{why}");
    }

    #[test]
    fn a_demanded_page_goes_again_unless_its_copy_is_close_behind_under_a_cap() {
        let never = || -> Option<u64> { panic!("the queue is asked only when it matters") };
        // Not sent yet: it goes, whatever the queue.
        assert!(resend_demanded(false, true, never));
        // No cap: the push may be megabytes ahead in the receiver's queue.
        assert!(resend_demanded(true, false, never));
        // Under a cap: again only while the push has bytes left to send.
        assert!(!resend_demanded(true, true, || Some(0)));
        assert!(!resend_demanded(true, true, || Some(SENT_CLOSE_BEHIND - 1)));
        assert!(resend_demanded(true, true, || Some(SENT_CLOSE_BEHIND)));
        // A queue that cannot be read counts as a long one.
        assert!(resend_demanded(true, true, || None));
    }

    /// A push batch that ends on the last page of RAM, with pages below
    /// still to push (the push had jumped up to a fault's neighbourhood):
    /// the next batch starts again at the bottom. It read past the bitmap
    /// before (the push thread panicked, and the phase waited for ever).
    #[test]
    fn a_push_batch_that_ends_on_the_last_page_goes_on_from_the_first() {
        use std::io::Read;
        let ram = vmm::GuestRam::new(16 << 20).unwrap();
        let mem = MemView::new(&ram);
        let job = Job::default();
        let pages = mem.pages();
        let mut expected = vec![0u64; (pages / 64) as usize];
        expected[0] = 1;
        let last = expected.len() - 1;
        expected[last] = u64::MAX;
        let total = popcount(&expected);
        let supply = Supply {
            mem: &mem,
            job: &job,
            claimed: expected.iter().map(|_| AtomicU64::new(0)).collect(),
            expected,
            total,
            remaining: AtomicU64::new(total),
            // As a fault's answer leaves it: the push goes on from there.
            recentre: AtomicU64::new(pages - 64),
            stop: AtomicBool::new(false),
            window: 16,
            tls: None,
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let sink = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = s.read_to_end(&mut v);
        });
        let w = Mutex::new(Link::plain(c));
        let pushed = crate::caught(|| supply.push(&w));
        drop(w);
        sink.join().unwrap();
        assert!(pushed.is_ok(), "{pushed:?}");
        assert_eq!(supply.remaining.load(Ordering::Relaxed), 0);
    }
}
