//! Several TCP streams for pre-copy page data (capability `multifd`, as QEMU's
//! multifd): the pages of the rounds and of the stop-and-copy are spread over
//! `streams` connections, so that zero detection, XBZRLE, encryption and the
//! destination's stores run on several cores.
//!
//! Each page belongs to one stream by a static partition of its frame number
//! ([`stream_of`]: 2 MiB chunks, round-robin), so the successive versions of a
//! page always travel on the same stream, in order; zero ranges and XBZRLE
//! deltas stay correct per stream (each stream has its own XBZRLE cache, a
//! share of the configured size). Stream 0 is the main connection, fed inline
//! by the thread that runs the rounds; streams 1.. have a sender thread each.
//!
//! Before each `RoundEnd`, before the stop-and-copy's digest and state, and
//! before hybrid's `PageMap`, the source sends `StreamMark{seq}` on every extra
//! stream and then `Barrier{seq}` on the main one; the destination handles what
//! follows the barrier only once every stream has delivered its mark and every
//! page before it is stored.

use std::io::{BufReader, Read};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{JoinHandle, Scope};
use std::time::{Duration, Instant};

use link::{Link, TlsSetup};
use vmm::GuestRam;
use wire::{Message, KIND_CONTROL};

use crate::doorman::{Arrival, Doorman};
use crate::incoming::GuestMem;
use crate::memview::MemView;
use crate::precopy::{self, Job, Params, Sender, SEND_TIMEOUT};
use crate::{io_err, Error, Result};

/// Most streams a migration may use (the main connection included).
pub const MAX_STREAMS: u32 = 16;

/// Pages per partition chunk (2 MiB): consecutive chunks go to consecutive streams.
pub const CHUNK_PAGES: u64 = 512;

/// How long the extra streams may take to connect (and the TLS handshakes).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the destination waits at a barrier for a stream's mark. The
/// source writes every mark before the barrier, so they are on their way.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(60);

/// Page frame numbers handed to a sender thread at once.
const HANDOFF: usize = 512;

/// Checks an operator's stream count.
pub fn check_streams(n: u64) -> std::result::Result<u32, String> {
    if (1..=MAX_STREAMS as u64).contains(&n) {
        Ok(n as u32)
    } else {
        Err(format!(
            "streams must be between 1 and {MAX_STREAMS}, got {n}"
        ))
    }
}

/// The stream that carries page `pfn` when there are `streams` of them.
pub fn stream_of(pfn: u64, streams: u32) -> usize {
    ((pfn / CHUNK_PAGES) % streams.max(1) as u64) as usize
}

/// The streams a migration uses: those asked for when the destination shares
/// the `multifd` capability, else 1; always 1 in pure post-copy (no rounds).
pub fn negotiated(mode: &str, asked: u32, shared: &[String]) -> u32 {
    if mode == "postcopy" || !shared.iter().any(|c| c == "multifd") {
        1
    } else {
        asked.max(1)
    }
}

/// What the thread running the rounds asks of a sender thread.
enum Cmd {
    /// Queue these pages (as `Sender::queue`).
    Pages {
        pfns: Vec<u64>,
        zeros: bool,
        throttle: bool,
    },
    /// Flush, then write `StreamMark{seq}` and acknowledge.
    Mark(u32),
}

struct Worker {
    cmds: mpsc::SyncSender<Cmd>,
    /// One `Ok` per mark written; an `Err` when the thread stopped on an error.
    acks: mpsc::Receiver<Result<()>>,
    /// Pages waiting to be handed over, and their `zeros` flag.
    queued: Vec<u64>,
    zeros: bool,
    /// The stream's socket, for what its send queue holds.
    sock: std::net::TcpStream,
}

/// The source's extra streams: stream `i` (1..) is `workers[i - 1]`.
pub(crate) struct Pool {
    workers: Vec<Worker>,
    count: u32,
    seq: u32,
}

impl Pool {
    /// The extra streams' sockets (for their send queues).
    pub(crate) fn sockets(&self) -> impl Iterator<Item = &std::net::TcpStream> {
        self.workers.iter().map(|w| &w.sock)
    }

    /// The stream of `pfn` (0: the main connection, queued by the caller).
    pub(crate) fn stream_of(&self, pfn: u64) -> usize {
        stream_of(pfn, self.count)
    }

    /// Queues `pfn` for extra stream `s` (1..).
    pub(crate) fn queue(&mut self, s: usize, pfn: u64, zeros: bool, throttle: bool) -> Result<()> {
        let i = s.wrapping_sub(1);
        let w = self
            .workers
            .get_mut(i)
            .ok_or_else(|| Error::Protocol(format!("no page stream {s}")))?;
        if w.zeros != zeros && !w.queued.is_empty() {
            Self::hand_over(i, w, throttle)?;
        }
        w.zeros = zeros;
        w.queued.push(pfn);
        if w.queued.len() >= HANDOFF {
            Self::hand_over(i, w, throttle)?;
        }
        Ok(())
    }

    fn hand_over(i: usize, w: &mut Worker, throttle: bool) -> Result<()> {
        let pfns = std::mem::replace(&mut w.queued, Vec::with_capacity(HANDOFF));
        Self::send(
            i,
            w,
            Cmd::Pages {
                pfns,
                zeros: w.zeros,
                throttle,
            },
        )
    }

    /// Sends a command; a stopped thread's error is the result.
    fn send(i: usize, w: &Worker, cmd: Cmd) -> Result<()> {
        if w.cmds.send(cmd).is_ok() {
            return Ok(());
        }
        match w.acks.try_recv() {
            Ok(Err(e)) => Err(e),
            _ => Err(Error::Protocol(format!("page stream {} stopped", i + 1))),
        }
    }

    /// Hands over every queued page, has each stream write `StreamMark{seq}`,
    /// and waits until all have; returns `seq`.
    pub(crate) fn mark(&mut self, throttle: bool) -> Result<u32> {
        let seq = self.seq;
        for (i, w) in self.workers.iter_mut().enumerate() {
            if !w.queued.is_empty() {
                Self::hand_over(i, w, throttle)?;
            }
            Self::send(i, w, Cmd::Mark(seq))?;
        }
        for (i, w) in self.workers.iter().enumerate() {
            match w.acks.recv() {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::Protocol(format!("page stream {} stopped", i + 1)));
                }
            }
        }
        self.seq += 1;
        Ok(seq)
    }
}

/// Source: opens the extra streams when the migration uses several (the
/// destination has `multifd` and `params.streams` > 1; see
/// `MigrationStats::streams`) and starts a sender thread per stream on `scope`.
/// Each stream gets its share of the XBZRLE cache, the main one included.
pub(crate) fn start<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    tx: &mut Sender<'_>,
    ram: &Arc<GuestRam>,
    params: &Params,
    job: &'env Job,
) -> Result<()> {
    let s = job.snapshot();
    let count = s.streams;
    if count <= 1 {
        return Ok(());
    }
    let local = tx.stream.local_addr().map_err(io_err("socket address"))?;
    let listener = TcpListener::bind((local.ip(), 0)).map_err(io_err("page stream listener"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("page stream listener"))?
        .port();
    let token = crate::doorman::token();
    tx.write_control(&Message::StreamsListen {
        port,
        job: token,
        count,
    })?;
    let links = accept_streams(listener, &tx.stream, token, count, params.tls.as_ref())?;
    // One slot per page of guest RAM at most in all, as for one stream.
    let share = s.xbzrle.cache_size.min(ram.size()) / count as u64;
    if share > 0 {
        tx.xbzrle = Some(crate::xbzrle::Cache::interleaved(
            share,
            CHUNK_PAGES,
            count as u64,
        ));
    }
    tx.shared_pace = true;
    let mut workers = Vec::with_capacity(links.len());
    for (i, link) in links.into_iter().enumerate() {
        job.register(&link)?;
        let sock = link.tcp().try_clone().map_err(io_err("socket"))?;
        let (cmds, cmd_rx) = mpsc::sync_channel(4);
        let (ack_tx, acks) = mpsc::channel();
        let ram = ram.clone();
        std::thread::Builder::new()
            .name(format!("page-stream-{}", i + 1))
            .spawn_scoped(scope, move || {
                let r = send_loop(link, &ram, job, (share, count as u64), &cmd_rx, &ack_tx);
                if let Err(e) = r {
                    tracing::debug!(stream = i + 1, "page stream stopped: {e}");
                    let _ = ack_tx.send(Err(e));
                }
            })
            .map_err(io_err("starting a page stream thread"))?;
        workers.push(Worker {
            cmds,
            acks,
            queued: Vec::with_capacity(HANDOFF),
            zeros: false,
            sock,
        });
    }
    tracing::info!(streams = count, "page streams open");
    tx.pool = Some(Pool {
        workers,
        count,
        seq: 0,
    });
    Ok(())
}

/// A sender thread: its own view of guest memory, its own `Sender` on its link.
fn send_loop(
    link: Link,
    ram: &GuestRam,
    job: &Job,
    (xbzrle, ways): (u64, u64),
    cmds: &mpsc::Receiver<Cmd>,
    acks: &mpsc::Sender<Result<()>>,
) -> Result<()> {
    let mem = MemView::new(ram);
    let mut tx = Sender::negotiated(link, &mem, job)?;
    tx.xbzrle = (xbzrle > 0).then(|| crate::xbzrle::Cache::interleaved(xbzrle, CHUNK_PAGES, ways));
    tx.shared_pace = true;
    tx.report_bytes = false;
    let mut reported = 0;
    for cmd in cmds {
        let mark = match cmd {
            Cmd::Pages {
                pfns,
                zeros,
                throttle,
            } => {
                tx.throttle = throttle;
                for pfn in pfns {
                    tx.queue(pfn, zeros)?;
                }
                false
            }
            Cmd::Mark(seq) => {
                tx.flush()?;
                tx.write_control(&Message::StreamMark { seq })?;
                true
            }
        };
        job.stream_bytes
            .fetch_add(tx.bytes - reported, Ordering::SeqCst);
        reported = tx.bytes;
        if mark && acks.send(Ok(())).is_err() {
            break;
        }
    }
    Ok(())
}

/// Source: accepts the destination's `count - 1` extra streams on `listener`,
/// each identified by `StreamHello{token, index}`; strangers are dropped. A
/// message on the main connection meanwhile (the destination's `Cancel`, say
/// because it refuses the count) ends the wait. Returns the links by index.
fn accept_streams(
    listener: TcpListener,
    main: &Link,
    token: u64,
    count: u32,
    tls: Option<&TlsSetup>,
) -> Result<Vec<Link>> {
    let peer = main.tcp().peer_addr().map_err(io_err("peer address"))?;
    let mut doorman = Doorman::new(
        listener,
        peer.ip(),
        tls.cloned(),
        "StreamHello",
        SETUP_TIMEOUT,
    )?
    .requiring_identity(main.peer_identity());
    let end = Instant::now() + SETUP_TIMEOUT;
    let mut links: Vec<Option<Link>> = (1..count).map(|_| None).collect();
    while links.iter().any(Option::is_none) {
        let g = match doorman.next(end, Some(main.as_raw_fd()))? {
            Arrival::Greeted(g) => g,
            Arrival::TimedOut => {
                let open = links.iter().filter(|l| l.is_some()).count();
                return Err(Error::Protocol(format!(
                    "the destination opened {open} of {} extra page streams within {} s",
                    count - 1,
                    SETUP_TIMEOUT.as_secs()
                )));
            }
            Arrival::Interrupted => {
                let mut m = main.try_clone().map_err(io_err("socket"))?;
                return Err(match wire::expect_control(&mut m, "StreamHello") {
                    Ok(Message::Cancel { reason }) => Error::PeerCancelled(reason),
                    Ok(other) => Error::Protocol(format!(
                        "expected the page streams, got {} on the main connection",
                        other.name()
                    )),
                    Err(e) => e.into(),
                });
            }
        };
        match g.hello {
            Message::StreamHello { job, index }
                if job == token
                    && (1..count).contains(&index)
                    && links[index as usize - 1].is_none() =>
            {
                let s = g.link;
                s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
                s.tcp()
                    .set_write_timeout(Some(SEND_TIMEOUT))
                    .map_err(io_err("socket timeout"))?;
                links[index as usize - 1] = Some(s);
            }
            other => {
                tracing::warn!(peer = %g.peer, ?other, "not one of our page streams: dropped")
            }
        }
    }
    Ok(links.into_iter().flatten().collect())
}

/// What a destination reader reports: its stream index (1..) and a mark
/// reached (with the pages and payload bytes it stored since its previous
/// mark), or why it stopped.
type Report = (u32, std::result::Result<Mark, String>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark {
    seq: u32,
    pages: u64,
    bytes: u64,
}

/// Destination: the extra streams of a migration, one reader thread each,
/// storing pages into guest memory as they come.
pub(crate) struct Streams {
    reports: mpsc::Receiver<Report>,
    /// Per stream: the marks reached and not yet consumed by a barrier.
    reached: Vec<std::collections::VecDeque<Mark>>,
    links: Vec<Link>,
    threads: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    /// Frames read on the extra streams so far (the progress a barrier's
    /// wait goes by).
    frames: Arc<AtomicU64>,
    /// How long a barrier waits with no frame arriving ([`BARRIER_TIMEOUT`]).
    idle_limit: Duration,
    /// `frames` at the last [`Streams::progressed`].
    frames_seen: u64,
    /// Barriers passed so far: a stream's reader waits before it reports a
    /// mark [`MARKS_AHEAD`] or more beyond them (each reported mark waits in
    /// memory for its barrier).
    passed: Arc<AtomicU32>,
}

/// How far a stream's marks may run ahead of the barriers passed (the
/// source marks every stream once per barrier).
const MARKS_AHEAD: u32 = 4;

impl Streams {
    /// Answers `StreamsListen{port, job, count}`: connects to the source's
    /// address on `port` `count - 1` times (over TLS when the main connection
    /// is), says `StreamHello` on each and starts its reader. A reader that
    /// fails shuts the main connection down, so that the migration fails.
    pub(crate) fn open(
        main: &Link,
        port: u16,
        job: u64,
        count: u32,
        tls: Option<&TlsSetup>,
        dst: &GuestMem,
    ) -> Result<Streams> {
        if !(2..=MAX_STREAMS).contains(&count) {
            return Err(Error::Protocol(format!(
                "{count} page streams asked for; this host takes 2 to {MAX_STREAMS}"
            )));
        }
        let source = main.peer_addr().map_err(io_err("peer address"))?.ip();
        let (report, reports) = mpsc::channel();
        let mut streams = Streams {
            reports,
            reached: (1..count).map(|_| Default::default()).collect(),
            links: Vec::new(),
            threads: Vec::new(),
            stopping: Arc::new(AtomicBool::new(false)),
            passed: Arc::new(AtomicU32::new(0)),
            frames: Arc::new(AtomicU64::new(0)),
            idle_limit: BARRIER_TIMEOUT,
            frames_seen: 0,
        };
        for index in 1..count {
            let to = SocketAddr::new(source, port);
            let mut s = precopy::connect_addr(to, main.peer_identity(), tls, SETUP_TIMEOUT)
                .map_err(|e| Error::Protocol(format!("opening page stream {index}: {e}")))?;
            wire::write_control(&mut s, &Message::StreamHello { job, index })?;
            streams.links.push(s.try_clone().map_err(io_err("socket"))?);
            let reader = Reader {
                index,
                dst: dst.try_clone()?,
                main: main.try_clone().map_err(io_err("socket"))?,
                stopping: streams.stopping.clone(),
                report: report.clone(),
                passed: streams.passed.clone(),
                frames: streams.frames.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("page-stream-{index}"))
                .spawn(move || reader.run(s))
                .map_err(io_err("starting a page stream reader"))?;
            streams.threads.push(t);
        }
        tracing::info!(streams = count, "page streams open");
        Ok(streams)
    }

    /// Takes a stream's report: a mark waits for its barrier; a failure is
    /// the stream's error.
    fn take_report(&mut self, (s, report): Report) -> Result<()> {
        match report {
            Ok(mark) => {
                if let Some(q) = self.reached.get_mut((s as usize).wrapping_sub(1)) {
                    q.push_back(mark);
                }
                Ok(())
            }
            Err(e) => Err(Error::Protocol(format!("page stream {s}: {e}"))),
        }
    }

    /// The failure a stream reported, if one did (marks reported meanwhile
    /// wait for their barriers): why the main connection was shut.
    pub(crate) fn failure(&mut self) -> Option<Error> {
        while let Ok(report) = self.reports.try_recv() {
            if let Err(e) = self.take_report(report) {
                return Some(e);
            }
        }
        None
    }

    /// Whether frames arrived on the streams since the last call.
    pub(crate) fn progressed(&mut self) -> bool {
        let now = self.frames.load(Ordering::Relaxed);
        std::mem::replace(&mut self.frames_seen, now) != now
    }

    /// `Barrier{seq}` on the main connection: waits until every stream has
    /// delivered `StreamMark{seq}` with every page before it stored; fails as
    /// soon as one stream fails. Returns the pages and payload bytes the
    /// streams stored up to their marks since the previous barrier.
    pub(crate) fn barrier(&mut self, seq: u32) -> Result<(u64, u64)> {
        // The wait lasts while frames arrive on the streams (a tight cap
        // over many streams may take minutes): only [`BARRIER_TIMEOUT`]
        // without one fails it.
        let mut frames = self.frames.load(Ordering::Relaxed);
        let mut end = Instant::now() + self.idle_limit;
        while let Some(i) = self.reached.iter().position(|q| q.is_empty()) {
            let left = end.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(report) => self.take_report(report)?,
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                    let now = self.frames.load(Ordering::Relaxed);
                    if now != frames {
                        frames = now;
                        end = Instant::now() + self.idle_limit;
                    }
                }
                Err(_) => {
                    return Err(Error::Protocol(format!(
                        "page stream {} did not reach barrier {seq}: nothing arrived on the \
                         page streams for {} s",
                        i + 1,
                        self.idle_limit.as_secs_f64()
                    )))
                }
            }
        }
        let (mut pages, mut bytes) = (0, 0);
        for (i, q) in self.reached.iter_mut().enumerate() {
            match q.pop_front() {
                Some(m) if m.seq == seq => {
                    pages += m.pages;
                    bytes += m.bytes;
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "page stream {} marked {:?} where the barrier is {seq}",
                        i + 1,
                        other.map(|m| m.seq)
                    )))
                }
            }
        }
        self.passed.store(seq.wrapping_add(1), Ordering::Release);
        Ok((pages, bytes))
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for l in &self.links {
            let _ = l.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The destination's reader of one extra stream.
struct Reader {
    index: u32,
    dst: GuestMem,
    main: Link,
    stopping: Arc<AtomicBool>,
    report: mpsc::Sender<Report>,
    passed: Arc<AtomicU32>,
    frames: Arc<AtomicU64>,
}

impl Reader {
    fn run(self, link: Link) {
        let mut r = BufReader::with_capacity(64 << 10, link);
        let e = match self.read(&mut r) {
            Ok(()) => return,
            Err(e) => e,
        };
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        tracing::warn!(stream = self.index, "page stream failed: {e}");
        let _ = self.report.send((self.index, Err(e.to_string())));
        // The main connection's reader is likely blocked on it: fail it now
        // (reading only: it tells the source why, `Streams::failure`).
        let _ = self.main.shutdown(Shutdown::Read);
    }

    /// Stores what arrives until the stream ends (an error, also for EOF).
    fn read(&self, r: &mut BufReader<Link>) -> Result<()> {
        let mut data = Vec::new();
        let mut splicer = crate::incoming::splicer_for(r);
        // Compressed batches (capability `zstd`): context and payload buffer.
        let mut zstd: Option<(wire::PageDecompressor, Vec<u8>)> = None;
        let mut mark = Mark {
            seq: 0,
            pages: 0,
            bytes: 0,
        };
        loop {
            let h = wire::read_header(r)?;
            self.frames.fetch_add(1, Ordering::Relaxed);
            if h.kind == wire::KIND_ZPAGES {
                let z = wire::read_zbatch_head(r, h.body_len)?;
                let (dctx, payload) = match &mut zstd {
                    Some(z) => z,
                    None => zstd.insert((wire::PageDecompressor::new()?, Vec::new())),
                };
                payload.resize(z.payload_len, 0);
                r.read_exact(payload).map_err(wire::WireError::from)?;
                data.resize(z.raw_len(), 0);
                dctx.decompress(payload, &mut data)?;
                crate::incoming::store_pages(&self.dst, &z.offsets, &data)?;
                mark.pages += z.offsets.len() as u64;
                mark.bytes += payload.len() as u64;
                continue;
            }
            if h.kind != KIND_CONTROL {
                let offsets = wire::read_batch_offsets(r, h.body_len)?;
                mark.bytes += crate::incoming::receive_pages(
                    r,
                    splicer.as_mut(),
                    &self.dst,
                    &offsets,
                    &mut data,
                )?;
                mark.pages += offsets.len() as u64;
                continue;
            }
            match wire::read_control_body(r, h.body_len)? {
                Message::Zero { ranges } => crate::incoming::zero_ranges(&self.dst, &ranges)?,
                Message::Delta { pages } => {
                    mark.pages += pages.len() as u64;
                    for (off, delta) in pages {
                        crate::incoming::apply_delta(&self.dst, off, &delta)?;
                    }
                }
                Message::StreamMark { seq } if seq == mark.seq => {
                    // Far ahead of the barriers (the main connection lags):
                    // wait for them, reading nothing, so that TCP holds the
                    // source's worker back instead of marks piling up here.
                    while seq.wrapping_sub(self.passed.load(Ordering::Acquire)) >= MARKS_AHEAD {
                        if self.stopping.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if self.report.send((self.index, Ok(mark))).is_err() {
                        return Ok(());
                    }
                    mark = Mark {
                        seq: seq.wrapping_add(1),
                        pages: 0,
                        bytes: 0,
                    };
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected {} on page stream {}",
                        other.name(),
                        self.index
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::memory::PAGE_SIZE;

    #[test]
    fn partition_is_static_in_2mib_chunks() {
        assert_eq!(stream_of(0, 1), 0);
        assert_eq!(stream_of(123_456, 1), 0);
        assert_eq!(stream_of(511, 4), 0);
        assert_eq!(stream_of(512, 4), 1);
        assert_eq!(stream_of(3 * 512 + 7, 4), 3);
        assert_eq!(stream_of(4 * 512, 4), 0);
        // Every stream gets an even share of a large RAM.
        let mut n = [0u64; 3];
        for pfn in 0..(768u64 << 20) / PAGE_SIZE {
            n[stream_of(pfn, 3)] += 1;
        }
        assert!(n.iter().all(|&c| c.abs_diff(n[0]) <= CHUNK_PAGES), "{n:?}");
    }

    #[test]
    fn a_destination_without_multifd_gets_one_stream() {
        let with = vec!["precopy".to_string(), "multifd".to_string()];
        let without = vec!["precopy".to_string()];
        assert_eq!(negotiated("precopy", 4, &with), 4);
        assert_eq!(negotiated("hybrid", 4, &with), 4);
        assert_eq!(negotiated("precopy", 4, &without), 1);
        assert_eq!(negotiated("postcopy", 4, &with), 1);
        assert_eq!(negotiated("precopy", 1, &with), 1);
        // The source offers multifd only with streams > 1; an old destination
        // filters it out of its Accept.
        let hello = crate::handshake::Hello {
            name: "x".into(),
            memory: 1 << 30,
            vcpus: 1,
            mode: "precopy".into(),
            capabilities: with.clone(),
            vm: wire::VmDescriptor {
                name: "x".into(),
                memory: 1 << 30,
                vcpus: 1,
                cpu_vendor: String::new(),
                cpu_features: vec![],
            },
        };
        let mut out = Vec::new();
        crate::handshake::accept(&mut out, &hello).unwrap();
        match wire::decode_frame(&out).unwrap() {
            wire::Frame::Control(Message::Accept { capabilities, .. }) => {
                assert_eq!(negotiated("precopy", 4, &capabilities), 4)
            }
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn stream_counts_are_checked() {
        assert_eq!(check_streams(1), Ok(1));
        assert_eq!(check_streams(16), Ok(16));
        assert_eq!(
            check_streams(0).unwrap_err(),
            "streams must be between 1 and 16, got 0"
        );
        assert!(check_streams(17).is_err());
    }
}

#[cfg(test)]
mod barrier_tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;
    use vmm::memory::PAGE_SIZE;

    /// A destination's extra streams opened against a fake source: the main
    /// connection (destination end), the source's ends of the extra streams,
    /// the streams, and the guest RAM.
    fn setup(count: u32) -> (Link, Vec<TcpStream>, Streams, GuestRam) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let main_dst = Link::plain(TcpStream::connect(("127.0.0.1", port)).unwrap());
        let (_main_src, _) = l.accept().unwrap();
        let ram = GuestRam::new(64 << 20).unwrap();
        let acceptor = std::thread::spawn(move || {
            let mut ends = Vec::new();
            for i in 1..count {
                let (mut s, _) = l.accept().unwrap();
                match wire::expect_control(&mut s, "StreamHello").unwrap() {
                    Message::StreamHello { job: 7, index } => assert_eq!(index, i),
                    m => panic!("{m:?}"),
                }
                ends.push(s);
            }
            (ends, _main_src)
        });
        let streams = Streams::open(
            &main_dst,
            port,
            7,
            count,
            None,
            &GuestMem::new(&ram).unwrap(),
        )
        .unwrap();
        let (ends, main_src) = acceptor.join().unwrap();
        std::mem::forget(main_src); // keep the main connection up
        (main_dst, ends, streams, ram)
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE as usize]
    }

    /// A stream that fails (a page outside guest memory) wakes the main
    /// connection's reader with an end of file, says why through
    /// `Streams::failure`, and leaves the main connection writable, so that
    /// the destination can tell the source.
    #[test]
    fn a_failed_stream_ends_the_main_reads_and_says_why() {
        let (main, mut ends, mut streams, _ram) = setup(2);
        let mut reading = main.try_clone().unwrap();
        let blocked = std::thread::spawn(move || std::io::Read::read(&mut reading, &mut [0u8; 1]));
        wire::write_pages(&mut ends[0], &[64 << 20], &[&page(1)]).unwrap();
        assert_eq!(blocked.join().unwrap().unwrap(), 0, "main reads end");
        let e = streams.failure().expect("a failure reported");
        assert!(e.to_string().contains("page stream 1"), "{e}");
        assert!(e.to_string().contains("outside"), "{e}");
        let mut out = main.try_clone().unwrap();
        let reason = e.to_string();
        wire::write_control(&mut out, &Message::Cancel { reason }).unwrap();
    }

    /// A barrier waits as long as frames keep arriving, however long that
    /// takes, and fails once none has for its limit.
    #[test]
    fn a_barrier_waits_while_pages_arrive_and_not_after() {
        let (_main, mut ends, mut streams, _ram) = setup(2);
        streams.idle_limit = Duration::from_millis(300);
        let t0 = Instant::now();
        let mut end = ends.remove(0);
        let writer = std::thread::spawn(move || {
            for i in 0..10u64 {
                std::thread::sleep(Duration::from_millis(100));
                wire::write_pages(&mut end, &[i * PAGE_SIZE], &[&page(1)]).unwrap();
            }
            wire::write_control(&mut end, &Message::StreamMark { seq: 0 }).unwrap();
            end
        });
        assert_eq!(streams.barrier(0).unwrap().0, 10);
        assert!(t0.elapsed() >= Duration::from_millis(1000));
        let _end = writer.join().unwrap();
        let t1 = Instant::now();
        let e = streams.barrier(1).unwrap_err().to_string();
        assert!(
            e.contains("nothing arrived on the page streams for 0.3 s"),
            "{e}"
        );
        assert!(t1.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn barrier_waits_for_every_stream_and_its_pages() {
        let (_main, mut ends, mut streams, ram) = setup(3);
        // Stream 1: two pages then its mark; stream 2: two pages, one of them
        // zeroed again, its mark (each page on the stream of its chunk).
        let p1 = page(1);
        wire::write_pages(&mut ends[0], &[0x1000, 0x2000], &[&p1, &p1]).unwrap();
        wire::write_control(&mut ends[0], &Message::StreamMark { seq: 0 }).unwrap();
        let p2 = page(2);
        wire::write_pages(&mut ends[1], &[0x200000, 0x201000], &[&p2, &p2]).unwrap();
        wire::write_control(
            &mut ends[1],
            &Message::Zero {
                ranges: vec![(0x201000, 1)],
            },
        )
        .unwrap();
        wire::write_control(&mut ends[1], &Message::StreamMark { seq: 0 }).unwrap();
        let (pages, bytes) = streams.barrier(0).unwrap();
        assert_eq!((pages, bytes), (4, 4 * PAGE_SIZE));
        let mut b = [0u8; 1];
        for (gpa, want) in [(0x1000, 1), (0x2000, 1), (0x200000, 2), (0x201000, 0)] {
            ram.read(gpa, &mut b).unwrap();
            assert_eq!(b[0], want, "at {gpa:#x}");
        }
        // The next barrier: stream 2 is late, so the barrier waits for it.
        wire::write_control(&mut ends[0], &Message::StreamMark { seq: 1 }).unwrap();
        let mut late = ends.remove(1);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            wire::write_pages(&mut late, &[0x202000], &[&page(3)]).unwrap();
            wire::write_control(&mut late, &Message::StreamMark { seq: 1 }).unwrap();
            late
        });
        let t0 = Instant::now();
        assert_eq!(streams.barrier(1).unwrap(), (1, PAGE_SIZE));
        assert!(t0.elapsed() >= Duration::from_millis(150));
        ram.read(0x202000, &mut b).unwrap();
        assert_eq!(b[0], 3);
        drop(t.join().unwrap());
    }

    #[test]
    fn garbage_or_a_closed_stream_fails_the_barrier_and_the_main_connection() {
        let (main, mut ends, mut streams, _ram) = setup(3);
        ends[1].write_all(&[0xff; 16]).unwrap();
        let e = streams.barrier(0).unwrap_err().to_string();
        assert!(
            e.contains("page stream 1") || e.contains("page stream 2"),
            "{e}"
        );
        // The main connection was shut down, so its reader fails too.
        let mut m = main.try_clone().unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(m.read(&mut b), Ok(0) | Err(_)));

        let (_main, mut ends, mut streams, _ram) = setup(2);
        // A page outside guest RAM.
        wire::write_pages(&mut ends[0], &[64 << 20], &[&page(1)]).unwrap();
        let e = streams.barrier(0).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");

        let (_main, ends, mut streams, _ram) = setup(2);
        drop(ends);
        let e = streams.barrier(0).unwrap_err().to_string();
        assert!(e.contains("page stream 1"), "{e}");

        let (_main, mut ends, mut streams, _ram) = setup(2);
        wire::write_control(&mut ends[0], &Message::StreamMark { seq: 5 }).unwrap();
        assert!(streams.barrier(0).is_err(), "a mark out of order");

        // Marks in order but far ahead of the barriers (the main connection
        // lags): the stream reports MARKS_AHEAD of them and waits with the
        // rest, unread, until the barriers catch up; nothing fails.
        let (_main, mut ends, mut streams, _ram) = setup(2);
        for seq in 0..MARKS_AHEAD + 2 {
            wire::write_control(&mut ends[0], &Message::StreamMark { seq }).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        let early: Vec<_> = streams.reports.try_iter().collect();
        assert_eq!(early.len(), MARKS_AHEAD as usize);
        for (s, mark) in early {
            streams.reached[s as usize - 1].push_back(mark.unwrap());
        }
        for seq in 0..MARKS_AHEAD + 2 {
            assert_eq!(streams.barrier(seq).unwrap(), (0, 0));
        }
    }

    #[test]
    fn counts_outside_the_limits_are_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let main = Link::plain(TcpStream::connect(("127.0.0.1", port)).unwrap());
        let ram = GuestRam::new(64 << 20).unwrap();
        for n in [0, 1, 17] {
            let e = Streams::open(&main, port, 7, n, None, &GuestMem::new(&ram).unwrap())
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("2 to 16"), "{e}");
        }
    }
}

#[cfg(test)]
mod accept_tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;

    /// A connected main connection: (source end, destination end).
    fn main_pair() -> (Link, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let d = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (Link::plain(l.accept().unwrap().0), d)
    }

    #[test]
    fn strangers_are_dropped_and_streams_come_back_by_index() {
        let (main, _d) = main_pair();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            // A wrong token, garbage, a bad index, then the streams out of order.
            let mut s = TcpStream::connect(addr).unwrap();
            wire::write_control(&mut s, &Message::StreamHello { job: 1, index: 1 }).unwrap();
            let mut g = TcpStream::connect(addr).unwrap();
            g.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut b = TcpStream::connect(addr).unwrap();
            wire::write_control(&mut b, &Message::StreamHello { job: 7, index: 0 }).unwrap();
            let mut ours = Vec::new();
            for index in [2, 1, 3] {
                let mut s = TcpStream::connect(addr).unwrap();
                wire::write_control(&mut s, &Message::StreamHello { job: 7, index }).unwrap();
                s.write_all(&[index as u8]).unwrap();
                ours.push(s);
            }
            (s, g, b, ours)
        });
        let links = accept_streams(l, &main, 7, 4, None).unwrap();
        let _keep = t.join().unwrap();
        assert_eq!(links.len(), 3);
        for (i, mut link) in links.into_iter().enumerate() {
            let mut b = [0u8; 1];
            link.read_exact(&mut b).unwrap();
            assert_eq!(b[0] as usize, i + 1, "stream {} in its place", i + 1);
        }
    }

    #[test]
    fn a_cancel_on_the_main_connection_ends_the_wait() {
        let (main, mut d) = main_pair();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        wire::write_control(
            &mut d,
            &Message::Cancel {
                reason: "17 page streams asked for".into(),
            },
        )
        .unwrap();
        let t0 = Instant::now();
        let e = accept_streams(l, &main, 7, 4, None).unwrap_err();
        assert!(
            matches!(e, Error::PeerCancelled(ref r) if r.contains("17")),
            "{e}"
        );
        assert!(t0.elapsed() < SETUP_TIMEOUT);
    }
}
