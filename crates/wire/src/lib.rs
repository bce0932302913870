//! The migd migration protocol.
//!
//! A migration stream is a sequence of frames. Every frame is
//! `u32 length | u8 kind | body`, little-endian, where `length` counts the kind
//! byte and the body and never exceeds [`MAX_FRAME`]. Two kinds exist:
//!
//! - [`KIND_CONTROL`]: the body is one [`Message`] in bincode (standard config).
//! - [`KIND_PAGES`]: `u32 n | n × u64 memfd offset | n × 4096 bytes`, with
//!   `1 <= n <= MAX_BATCH_PAGES`; the body length must match `n` exactly.
//! - [`KIND_ZPAGES`] (capability `zstd`): `u32 n | n × u64 memfd offset |
//!   u32 raw length | zstd payload`; the raw length must be `n × 4096` and the
//!   payload must decompress to exactly that many bytes (decompressed into a
//!   buffer of that size, never more).
//!
//! The decoder never panics, checks every length before allocating, and rejects
//! unknown kinds, trailing bytes and messages of another protocol version.
//! Policy (what to send when) lives in the `migration` crate, not here.

use std::io::{IoSlice, Read, Write};

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
/// First bytes of a Hello, to reject foreign peers quickly.
pub const MAGIC: [u8; 8] = *b"MIGD-MIG";
/// Page size carried in page batches.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one batch (1 MiB of data).
pub const MAX_BATCH_PAGES: usize = 256;
/// Largest frame accepted (room for a VM state blob).
pub const MAX_FRAME: usize = 32 << 20;
/// Frame kind: a control message.
pub const KIND_CONTROL: u8 = 1;
/// Frame kind: a batch of pages.
pub const KIND_PAGES: u8 = 2;
/// Frame kind: a batch of pages, zstd-compressed (capability `zstd`).
pub const KIND_ZPAGES: u8 = 3;
/// zstd levels accepted for page compression (`zstd:LEVEL`).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

/// Protocol errors. Each says its cause in its message (no `source()`).
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the stream or it failed.
    #[error("stream: {0}")]
    Io(std::io::Error),
    /// A frame length outside the allowed bounds.
    #[error("frame of {0} bytes is outside 1..={MAX_FRAME}")]
    FrameSize(usize),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A control message larger than any the receiver expects there.
    #[error("a control message of {len} bytes where {expected} was expected (at most {max})")]
    ControlTooLarge {
        /// Its body length.
        len: usize,
        /// What was expected.
        expected: &'static str,
        /// The most accepted there.
        max: usize,
    },
    /// A page batch whose count and length disagree.
    #[error("page batch: {0}")]
    BadBatch(String),
    /// A compressed page batch that is malformed or does not decompress to
    /// exactly the size it claims.
    #[error("compressed page batch: {0}")]
    Compressed(String),
    /// A control message that does not decode.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// A frame of a kind the receiver did not expect here.
    #[error("unexpected {got} (expected {expected})")]
    Unexpected {
        /// What arrived.
        got: String,
        /// What the protocol state wanted.
        expected: &'static str,
    },
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e)
    }
}

/// Result with [`WireError`].
pub type Result<T> = std::result::Result<T, WireError>;

/// The VM as the source describes it, checked by the destination before any memory moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescriptor {
    /// VM name (unique on the destination).
    pub name: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// CPU vendor string (CPUID leaf 0).
    pub cpu_vendor: String,
    /// CPUID feature words the guest was given, in the order of
    /// `migration::handshake::CPU_WORDS` (docs/protocol.md): leaf 1 ECX/EDX
    /// and leaf 7.0 EBX/ECX/EDX first, as older builds sent them, then the
    /// words added since (0 where the guest's CPUID lacks the leaf).
    pub cpu_features: Vec<u32>,
}

/// Control messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Source → destination: who we are and what we bring.
    Hello {
        /// [`MAGIC`].
        magic: [u8; 8],
        /// [`PROTOCOL_VERSION`] of the sender.
        version: u32,
        /// Optional features the sender can use.
        capabilities: Vec<String>,
        /// Migration mode: precopy, postcopy, hybrid.
        mode: String,
        /// The VM.
        vm: VmDescriptor,
    },
    /// Destination → source: go ahead, with the capabilities both sides share.
    Accept {
        /// Destination's protocol version.
        version: u32,
        /// Capabilities both sides support.
        capabilities: Vec<String>,
    },
    /// Destination → source: no, and why.
    Refuse {
        /// Human-readable reason.
        reason: String,
    },
    /// Destination → source: the VM is built (memory, vCPUs) and waits for pages;
    /// sent by the destination's VM process after Accept, before any page moves.
    Prepared,
    /// Source → destination: these ranges are zero now (memfd offset, pages).
    Zero {
        /// (offset, page count) pairs.
        ranges: Vec<(u64, u64)>,
    },
    /// Source → destination: end of a pre-copy round.
    RoundEnd {
        /// Round number.
        round: u32,
    },
    /// Source → destination: the VM is paused; its complete state.
    State {
        /// Encoded `vmm::VmState`.
        blob: Vec<u8>,
    },
    /// Source → destination (verify mode): digest of all guest memory at the pause.
    Digest {
        /// CRC32 of the memfd contents, in offset order.
        crc32: u32,
    },
    /// Destination → source: state loaded, VM ready to run, not yet running.
    Ready,
    /// Source → destination: commit; the source will never resume its copy.
    Go,
    /// Destination → source: the VM runs here.
    Confirm {
        /// Destination time from Go to running, µs.
        resume_us: u64,
    },
    /// Either way: the migration is abandoned, with the reason.
    Cancel {
        /// Why.
        reason: String,
    },
    /// Source → destination (post-copy, the source VM is paused): the pages the
    /// destination must still receive, as (memfd offset, page count) runs. Every
    /// other page is zero (pure post-copy) or already current (hybrid).
    PageMap {
        /// (offset, pages) runs, ascending.
        runs: Vec<(u64, u64)>,
    },
    /// Source → destination (post-copy): connect back to the source's address on
    /// this port for the urgent channel (fault requests and their answers).
    UrgentListen {
        /// TCP port the source listens on.
        port: u16,
        /// Token identifying this migration on that port.
        job: u64,
    },
    /// Destination → source: first frame on the urgent channel.
    UrgentHello {
        /// The token from `UrgentListen`.
        job: u64,
    },
    /// Destination → source on the urgent channel: the guest faulted on this page.
    PageRequest {
        /// memfd offset of the page.
        offset: u64,
    },
    /// Destination → source: every expected page arrived; post-copy is complete.
    PostcopyDone {
        /// What the destination measured.
        report: PostcopyReport,
    },
    /// Destination → source (post-copy, before `Ready`): if the link drops after
    /// the switch, the source reconnects to the destination's address on this
    /// port to resume the migration (post-copy recovery).
    RecoverListen {
        /// TCP port the destination's VM process listens on.
        port: u16,
    },
    /// Source → destination: first frame on a recovery connection.
    RecoverHello {
        /// The migration's token (the one of `UrgentListen`).
        job: u64,
        /// True for the new urgent channel, false for the new main connection.
        urgent: bool,
    },
    /// Destination → source on a new main connection: the pages it holds, one
    /// bit per page of guest RAM (bit `pfn % 64` of word `pfn / 64`). The source
    /// sends every expected page not in it.
    Received {
        /// The received-bitmap.
        bitmap: Vec<u64>,
    },
    /// Source → destination (capability `xbzrle`): pages sent before, now sent
    /// as deltas against what was sent then: (memfd offset, delta); the
    /// encoding is in `crates/migration/src/xbzrle.rs`.
    Delta {
        /// (offset, delta) per page.
        pages: Vec<(u64, Vec<u8>)>,
    },
    /// Source → destination (capability `multifd`, after `Prepared`): connect
    /// back to the source's address on this port `count - 1` times for the
    /// extra page streams.
    StreamsListen {
        /// TCP port the source listens on.
        port: u16,
        /// Token identifying this migration on that port.
        job: u64,
        /// Streams in all, the main connection included (2..=16).
        count: u32,
    },
    /// Destination → source: first frame on an extra page stream.
    StreamHello {
        /// The token from `StreamsListen`.
        job: u64,
        /// Which stream this is (1..count).
        index: u32,
    },
    /// Source → destination on an extra page stream: every page of this stream
    /// before it has been sent (the stream's part of barrier `seq`).
    StreamMark {
        /// Barrier number, from 0.
        seq: u32,
    },
    /// Source → destination on the main connection: handle what follows only
    /// once every extra stream has delivered its `StreamMark{seq}` and every
    /// page before it is stored.
    Barrier {
        /// Barrier number, from 0.
        seq: u32,
    },
    /// Source → destination (capability `sync`), at the end of the rounds:
    /// answer `Synced{seq}` once everything before this is in guest memory.
    Sync {
        /// Echoed in `Synced`.
        seq: u32,
    },
    /// Destination → source: every page and message before `Sync{seq}` is
    /// stored (the source pauses only now, so that none of it is downtime).
    Synced {
        /// From `Sync`.
        seq: u32,
    },
    /// Source → destination (capability `boot-spec`), right after Accept:
    /// how the VM boots from its kernel, so that the destination can start
    /// it again once it stops; `None` for a VM the source cannot boot either.
    Boot {
        /// The source's boot spec of the VM.
        spec: Option<BootSpec>,
    },
    /// Destination → source, in place of `Received` where its bitmap would
    /// not fit one frame (guests of ~900 GiB and more): the bitmap in
    /// consecutive parts of at most [`RECEIVED_PART_WORDS`] words, the last
    /// one marked.
    ReceivedPart {
        /// Index of this part's first word in the whole bitmap.
        first_word: u64,
        /// The words.
        words: Vec<u64>,
        /// Whether this is the last part.
        last: bool,
    },
    /// Source → destination (post-copy), before a `PageMap` whose runs
    /// would not fit one frame (a very fragmented map, over a million
    /// runs): the first runs, at most [`PAGE_MAP_PART_RUNS`]; the `PageMap`
    /// that ends the parts carries the last ones.
    PageMapPart {
        /// (offset, pages) runs, ascending, before the next part's.
        runs: Vec<(u64, u64)>,
    },
    /// Source → destination, in place of `Go` where both share `go-paused`:
    /// the commit, for a VM that was paused when its migration began; it
    /// stays paused there (as libvirt and QEMU keep a paused guest paused).
    GoPaused,
}

/// Runs of a `PageMapPart` at most: 18 bytes each encoded at worst, well
/// inside a frame.
pub const PAGE_MAP_PART_RUNS: usize = 1 << 20;

/// Words of a `ReceivedPart` at most: 9 bytes each encoded at worst, well
/// inside a frame.
pub const RECEIVED_PART_WORDS: usize = 1 << 21;

/// How a VM boots from its kernel, as the source host's record has it (paths
/// on that host, which the destination uses where they exist there too:
/// shared storage or the same image installed on every host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    /// Kernel image path.
    pub kernel: String,
    /// Initramfs path.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
}

impl BootSpec {
    /// Longest path or command line accepted, in bytes (Linux's PATH_MAX).
    pub const MAX_LEN: usize = 4096;

    /// Checks the sizes and that no field holds a NUL byte.
    pub fn check(&self) -> Result<()> {
        let fields = [
            ("kernel path", Some(&self.kernel)),
            ("initrd path", self.initrd.as_ref()),
            ("command line", Some(&self.cmdline)),
        ];
        for (what, value) in fields {
            let Some(v) = value else { continue };
            if v.len() > Self::MAX_LEN {
                return Err(WireError::Malformed(format!(
                    "boot spec {what} of {} bytes exceeds {} bytes",
                    v.len(),
                    Self::MAX_LEN
                )));
            }
            if v.contains('\0') {
                return Err(WireError::Malformed(format!(
                    "boot spec {what} holds a NUL byte"
                )));
            }
        }
        if self.kernel.is_empty() {
            return Err(WireError::Malformed(
                "boot spec without a kernel path".into(),
            ));
        }
        Ok(())
    }
}

/// The destination's account of a post-copy phase, carried in `PostcopyDone`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyReport {
    /// Pages filled because the guest faulted on them (urgent channel).
    pub demand: u64,
    /// Pages filled by the source's background push (main connection).
    pub pushed: u64,
    /// Neighbours sent along with a demanded page (urgent channel).
    pub prepaged: u64,
    /// Pages that arrived for an already filled address.
    pub duplicate: u64,
    /// Faults on zero pages, filled locally.
    pub zero_faults: u64,
    /// Faults that needed a page from the source.
    pub faults: u64,
    /// Fault latency (fault read → page filled), median, µs.
    pub p50_us: u64,
    /// Fault latency, 99th percentile, µs.
    pub p99_us: u64,
    /// Fault latency, worst, µs.
    pub max_us: u64,
    /// Destination resume to the last page filled, µs.
    pub resume_to_last_us: u64,
    /// Sum of all fault latencies: the time vCPUs spent blocked on the source, µs.
    pub blocked_us: u64,
    /// Fault latency histogram: entry i counts faults that took [2^i, 2^(i+1)) µs
    /// (entry 0 also those under 1 µs); trailing empty entries are left out.
    pub histogram_us: Vec<u64>,
}

impl Message {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Accept { .. } => "Accept",
            Message::Refuse { .. } => "Refuse",
            Message::Prepared => "Prepared",
            Message::Zero { .. } => "Zero",
            Message::RoundEnd { .. } => "RoundEnd",
            Message::State { .. } => "State",
            Message::Digest { .. } => "Digest",
            Message::Ready => "Ready",
            Message::Go => "Go",
            Message::Confirm { .. } => "Confirm",
            Message::Cancel { .. } => "Cancel",
            Message::PageMap { .. } => "PageMap",
            Message::UrgentListen { .. } => "UrgentListen",
            Message::UrgentHello { .. } => "UrgentHello",
            Message::PageRequest { .. } => "PageRequest",
            Message::PostcopyDone { .. } => "PostcopyDone",
            Message::RecoverListen { .. } => "RecoverListen",
            Message::RecoverHello { .. } => "RecoverHello",
            Message::Received { .. } => "Received",
            Message::Delta { .. } => "Delta",
            Message::StreamsListen { .. } => "StreamsListen",
            Message::StreamHello { .. } => "StreamHello",
            Message::StreamMark { .. } => "StreamMark",
            Message::Barrier { .. } => "Barrier",
            Message::Sync { .. } => "Sync",
            Message::Synced { .. } => "Synced",
            Message::Boot { .. } => "Boot",
            Message::ReceivedPart { .. } => "ReceivedPart",
            Message::PageMapPart { .. } => "PageMapPart",
            Message::GoPaused => "GoPaused",
        }
    }
}

/// A decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A control message.
    Control(Message),
    /// Pages: memfd offsets and their data (`offsets.len() * PAGE_SIZE` bytes).
    Pages {
        /// memfd offset of each page.
        offsets: Vec<u64>,
        /// Page contents, in order.
        data: Vec<u8>,
    },
}

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME>,
> {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encodes a control message as a complete frame.
pub fn encode_control(msg: &Message) -> Result<Vec<u8>> {
    let body = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if body.len() + 1 > MAX_FRAME {
        return Err(WireError::FrameSize(body.len() + 1));
    }
    let mut f = Vec::with_capacity(5 + body.len());
    f.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    f.push(KIND_CONTROL);
    f.extend_from_slice(&body);
    Ok(f)
}

/// Writes a control message.
pub fn write_control(w: &mut impl Write, msg: &Message) -> Result<()> {
    w.write_all(&encode_control(msg)?)?;
    Ok(())
}

/// The header and offset table of a page batch of `n` pages.
pub fn page_batch_header(offsets: &[u64]) -> Result<Vec<u8>> {
    let n = offsets.len();
    if n == 0 || n > MAX_BATCH_PAGES {
        return Err(WireError::BadBatch(format!(
            "{n} pages (1..={MAX_BATCH_PAGES})"
        )));
    }
    let len = 1 + 4 + n * 8 + n * PAGE_SIZE;
    let mut h = Vec::with_capacity(9 + n * 8);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.push(KIND_PAGES);
    h.extend_from_slice(&(n as u32).to_le_bytes());
    for o in offsets {
        h.extend_from_slice(&o.to_le_bytes());
    }
    Ok(h)
}

/// Writes a page batch with vectored writes: header, then each page slice.
pub fn write_pages(w: &mut impl Write, offsets: &[u64], pages: &[&[u8]]) -> Result<()> {
    if pages.len() != offsets.len() || pages.iter().any(|p| p.len() != PAGE_SIZE) {
        return Err(WireError::BadBatch("pages and offsets disagree".into()));
    }
    let header = page_batch_header(offsets)?;
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(pages.len() + 1);
    slices.push(IoSlice::new(&header));
    slices.extend(pages.iter().map(|p| IoSlice::new(p)));
    write_all_vectored(w, &mut slices)?;
    Ok(())
}

fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The start of a frame: its kind and body length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// [`KIND_CONTROL`] or [`KIND_PAGES`].
    pub kind: u8,
    /// Bytes after the kind byte.
    pub body_len: usize,
}

/// Reads and checks a frame header.
pub fn read_header(r: &mut impl Read) -> Result<FrameHeader> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(WireError::FrameSize(len));
    }
    let kind = h[4];
    if !matches!(kind, KIND_CONTROL | KIND_PAGES | KIND_ZPAGES) {
        return Err(WireError::UnknownKind(kind));
    }
    Ok(FrameHeader {
        kind,
        body_len: len - 1,
    })
}

/// Decodes a control message body.
pub fn decode_control(body: &[u8]) -> Result<Message> {
    let (msg, used): (Message, usize) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes",
            body.len() - used
        )));
    }
    Ok(msg)
}

/// Reads a control body of `len` bytes.
pub fn read_control_body(r: &mut impl Read, len: usize) -> Result<Message> {
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode_control(&body)
}

/// Reads the page count and offsets of a page batch whose body is `len` bytes;
/// the caller then reads `offsets.len()` pages of data.
pub fn read_batch_offsets(r: &mut impl Read, len: usize) -> Result<Vec<u64>> {
    let mut nb = [0u8; 4];
    r.read_exact(&mut nb)?;
    let n = u32::from_le_bytes(nb) as usize;
    if n == 0 || n > MAX_BATCH_PAGES {
        return Err(WireError::BadBatch(format!(
            "{n} pages (1..={MAX_BATCH_PAGES})"
        )));
    }
    if len != 4 + n * (8 + PAGE_SIZE) {
        return Err(WireError::BadBatch(format!(
            "{n} pages need {} bytes, frame has {len}",
            4 + n * (8 + PAGE_SIZE)
        )));
    }
    let mut raw = vec![0u8; n * 8];
    r.read_exact(&mut raw)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Most bytes a compressed batch of `n` pages may carry: zstd's worst case
/// for `n × 4096` bytes (a batch that does not compress is sent raw anyway).
pub fn max_zpayload(n: usize) -> usize {
    zstd::zstd_safe::compress_bound(n * PAGE_SIZE)
}

/// The head of a compressed page batch: offsets, then how many payload bytes follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZBatch {
    /// memfd offset of each page.
    pub offsets: Vec<u64>,
    /// Bytes of zstd payload after the head (the caller reads them).
    pub payload_len: usize,
}

impl ZBatch {
    /// Bytes the payload decompresses to: `offsets.len() × PAGE_SIZE`.
    pub fn raw_len(&self) -> usize {
        self.offsets.len() * PAGE_SIZE
    }
}

/// Reads the head of a compressed page batch whose body is `len` bytes and
/// checks it: `1..=MAX_BATCH_PAGES` pages, a raw length of exactly `n × 4096`,
/// and a payload of `1..=max_zpayload(n)` bytes. Nothing is allocated before
/// the count is checked.
pub fn read_zbatch_head(r: &mut impl Read, len: usize) -> Result<ZBatch> {
    let mut nb = [0u8; 4];
    r.read_exact(&mut nb)?;
    let n = u32::from_le_bytes(nb) as usize;
    if n == 0 || n > MAX_BATCH_PAGES {
        return Err(WireError::Compressed(format!(
            "{n} pages (1..={MAX_BATCH_PAGES})"
        )));
    }
    let head = 4 + n * 8 + 4;
    if len <= head {
        return Err(WireError::Compressed(format!(
            "{n} pages need more than {head} bytes, frame has {len}"
        )));
    }
    let mut raw = vec![0u8; n * 8];
    r.read_exact(&mut raw)?;
    let mut rl = [0u8; 4];
    r.read_exact(&mut rl)?;
    let raw_len = u32::from_le_bytes(rl) as usize;
    if raw_len != n * PAGE_SIZE {
        return Err(WireError::Compressed(format!(
            "raw length {raw_len} for {n} pages (must be {})",
            n * PAGE_SIZE
        )));
    }
    let payload_len = len - head;
    if payload_len > max_zpayload(n) {
        return Err(WireError::Compressed(format!(
            "payload of {payload_len} bytes for {n} pages (at most {})",
            max_zpayload(n)
        )));
    }
    Ok(ZBatch {
        offsets: raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        payload_len,
    })
}

/// A zstd library failure (not a stream error): out of memory, a bad parameter.
fn zstd_err(e: std::io::Error) -> WireError {
    WireError::Compressed(format!("zstd: {e}"))
}

/// log2 of the largest batch (256 pages of 4 KiB): the zstd window a batch
/// needs at most, whatever the level (zstd fits the window to the input).
const MAX_BATCH_WINDOW_LOG: u32 = 20;

/// zstd compression of page batches, with a reused context.
pub struct PageCompressor {
    ctx: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

impl PageCompressor {
    /// A compressor at `level` (one of [`ZSTD_LEVELS`]).
    pub fn new(level: i32) -> Result<Self> {
        if !ZSTD_LEVELS.contains(&level) {
            return Err(WireError::Compressed(format!(
                "zstd level {level} outside {}..={}",
                ZSTD_LEVELS.start(),
                ZSTD_LEVELS.end()
            )));
        }
        Ok(PageCompressor {
            ctx: zstd::bulk::Compressor::new(level).map_err(zstd_err)?,
            out: Vec::new(),
        })
    }

    /// Compresses `raw` (whole pages); the payload is valid until the next call.
    pub fn compress(&mut self, raw: &[u8]) -> Result<&[u8]> {
        self.out.clear();
        self.out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        self.ctx
            .compress_to_buffer(raw, &mut self.out)
            .map_err(zstd_err)?;
        Ok(&self.out)
    }
}

/// zstd decompression of page batches, with a reused context.
pub struct PageDecompressor {
    ctx: zstd::bulk::Decompressor<'static>,
}

impl PageDecompressor {
    /// A decompressor that refuses frames asking for a window larger than a
    /// batch (1 MiB): no header can make it reserve more memory than that.
    pub fn new() -> Result<Self> {
        let mut ctx = zstd::bulk::Decompressor::new().map_err(zstd_err)?;
        ctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
            MAX_BATCH_WINDOW_LOG,
        ))
        .map_err(zstd_err)?;
        Ok(PageDecompressor { ctx })
    }

    /// Decompresses `payload` into `out`, which must be exactly the batch's raw
    /// length: zstd never writes past it, and a payload that decodes to fewer
    /// or more bytes, or not at all, is an error.
    pub fn decompress(&mut self, payload: &[u8], out: &mut [u8]) -> Result<()> {
        let want = out.len();
        match self.ctx.decompress_to_buffer(payload, out) {
            Ok(n) if n == want => Ok(()),
            Ok(n) => Err(WireError::Compressed(format!(
                "payload decompresses to {n} bytes, the batch claims {want}"
            ))),
            Err(e) => Err(WireError::Compressed(format!(
                "payload does not decompress to {want} bytes: {e}"
            ))),
        }
    }
}

/// Writes a compressed page batch: head, then the zstd `payload` of the
/// `offsets.len()` pages. Returns the bytes written.
pub fn write_zpages(w: &mut impl Write, offsets: &[u64], payload: &[u8]) -> Result<u64> {
    let n = offsets.len();
    if n == 0 || n > MAX_BATCH_PAGES || payload.is_empty() || payload.len() > max_zpayload(n) {
        return Err(WireError::Compressed(format!(
            "{n} pages with a payload of {} bytes",
            payload.len()
        )));
    }
    let len = 1 + 4 + n * 8 + 4 + payload.len();
    let mut h = Vec::with_capacity(13 + n * 8);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.push(KIND_ZPAGES);
    h.extend_from_slice(&(n as u32).to_le_bytes());
    for o in offsets {
        h.extend_from_slice(&o.to_le_bytes());
    }
    h.extend_from_slice(&((n * PAGE_SIZE) as u32).to_le_bytes());
    let mut slices = [IoSlice::new(&h), IoSlice::new(payload)];
    write_all_vectored(w, &mut slices)?;
    Ok(4 + len as u64)
}

/// Reads one whole frame (pages into a new buffer; a compressed batch is
/// decompressed into a [`Frame::Pages`]). Convenient, not the hot path.
pub fn read_frame(r: &mut impl Read) -> Result<Frame> {
    read_frame_up_to(r, MAX_FRAME)
}

/// [`read_frame`], refusing a control message of more than
/// `max_control` bytes before its body is read (see [`MAX_SMALL_CONTROL`]).
pub fn read_frame_up_to(r: &mut impl Read, max_control: usize) -> Result<Frame> {
    let h = read_header(r)?;
    match h.kind {
        KIND_CONTROL if h.body_len > max_control => Err(WireError::ControlTooLarge {
            len: h.body_len,
            expected: "a small control message",
            max: max_control,
        }),
        KIND_CONTROL => Ok(Frame::Control(read_control_body(r, h.body_len)?)),
        KIND_ZPAGES => {
            let z = read_zbatch_head(r, h.body_len)?;
            let mut payload = vec![0u8; z.payload_len];
            r.read_exact(&mut payload)?;
            let mut data = vec![0u8; z.raw_len()];
            PageDecompressor::new()?.decompress(&payload, &mut data)?;
            Ok(Frame::Pages {
                offsets: z.offsets,
                data,
            })
        }
        _ => {
            let offsets = read_batch_offsets(r, h.body_len)?;
            let mut data = vec![0u8; offsets.len() * PAGE_SIZE];
            r.read_exact(&mut data)?;
            Ok(Frame::Pages { offsets, data })
        }
    }
}

/// Decodes exactly one frame from a byte slice (fuzzing, tests).
pub fn decode_frame(bytes: &[u8]) -> Result<Frame> {
    let mut cur = bytes;
    let f = read_frame(&mut cur)?;
    if !cur.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} bytes after the frame",
            cur.len()
        )));
    }
    Ok(f)
}

/// Largest body [`expect_control`] reads: handshakes, requests and
/// acknowledgements, never bulk data. A frame decodes into up to ~24 times
/// its size (an empty string is one byte on the wire and 24 in memory), so
/// a peer, before anything has authenticated it, gets no more than this.
pub const MAX_SMALL_CONTROL: usize = 64 << 10;

/// Reads the next control message, of at most [`MAX_SMALL_CONTROL`] bytes,
/// failing on a page batch.
pub fn expect_control(r: &mut impl Read, expected: &'static str) -> Result<Message> {
    expect_control_up_to(r, expected, MAX_SMALL_CONTROL)
}

/// [`expect_control`] for a message that may be up to `max` bytes (the VM
/// state, post-copy's bitmap of received pages). A larger one, or a page
/// batch, is refused before its body is read.
pub fn expect_control_up_to(
    r: &mut impl Read,
    expected: &'static str,
    max: usize,
) -> Result<Message> {
    let h = read_header(r)?;
    if h.kind != KIND_CONTROL {
        return Err(WireError::Unexpected {
            got: "page batch".into(),
            expected,
        });
    }
    if h.body_len > max {
        return Err(WireError::ControlTooLarge {
            len: h.body_len,
            expected,
            max,
        });
    }
    read_control_body(r, h.body_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            capabilities: vec!["zero-ranges".into()],
            mode: "precopy".into(),
            vm: VmDescriptor {
                name: "web1".into(),
                memory: 1 << 30,
                vcpus: 2,
                cpu_vendor: "GenuineIntel".into(),
                cpu_features: vec![1, 2, 3],
            },
        }
    }

    #[test]
    fn control_round_trip() {
        for m in [
            hello(),
            Message::Refuse {
                reason: "no".into(),
            },
            Message::Zero {
                ranges: vec![(4096, 3)],
            },
            Message::State {
                blob: vec![1; 1000],
            },
            Message::Go,
            Message::GoPaused,
            Message::Confirm { resume_us: 5 },
            Message::PageMap {
                runs: vec![(0, 3), (1 << 20, 1)],
            },
            Message::UrgentListen { port: 4242, job: 7 },
            Message::UrgentHello { job: 7 },
            Message::PageRequest { offset: 8192 },
            Message::PostcopyDone {
                report: PostcopyReport {
                    demand: 1,
                    pushed: 2,
                    p99_us: 300,
                    histogram_us: vec![0, 3, 1],
                    ..Default::default()
                },
            },
            Message::RecoverListen { port: 4243 },
            Message::RecoverHello {
                job: 7,
                urgent: true,
            },
            Message::Received {
                bitmap: vec![0, u64::MAX, 5],
            },
            Message::StreamsListen {
                port: 4244,
                job: 9,
                count: 4,
            },
            Message::StreamHello { job: 9, index: 3 },
            Message::StreamMark { seq: 2 },
            Message::Barrier { seq: 2 },
            Message::Sync { seq: 3 },
            Message::Synced { seq: 3 },
            Message::Boot {
                spec: Some(BootSpec {
                    kernel: "/var/lib/images/vmlinux".into(),
                    initrd: None,
                    cmdline: "console=ttyS0".into(),
                }),
            },
            Message::Boot { spec: None },
            Message::ReceivedPart {
                first_word: 4,
                words: vec![1, u64::MAX],
                last: true,
            },
            Message::PageMapPart {
                runs: vec![(0, 1), (u64::MAX - 4095, 1)],
            },
        ] {
            let f = encode_control(&m).unwrap();
            assert_eq!(decode_frame(&f).unwrap(), Frame::Control(m));
        }
    }

    #[test]
    fn pages_round_trip() {
        let p1 = vec![1u8; PAGE_SIZE];
        let p2 = vec![2u8; PAGE_SIZE];
        let mut out = Vec::new();
        write_pages(&mut out, &[0, 8192], &[&p1, &p2]).unwrap();
        match decode_frame(&out).unwrap() {
            Frame::Pages { offsets, data } => {
                assert_eq!(offsets, vec![0, 8192]);
                assert_eq!(&data[..PAGE_SIZE], &p1[..]);
                assert_eq!(&data[PAGE_SIZE..], &p2[..]);
            }
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn a_handshake_message_too_large_is_refused_before_it_is_read() {
        // A Hello with a million empty capabilities: 1 MiB on the wire, ~24
        // MiB decoded.
        let mut big = hello();
        if let Message::Hello { capabilities, .. } = &mut big {
            *capabilities = vec![String::new(); 1 << 20];
        }
        let f = encode_control(&big).unwrap();
        let mut r = &f[..];
        match expect_control(&mut r, "Hello") {
            Err(WireError::ControlTooLarge { len, expected, max }) => {
                assert_eq!(
                    (len, expected, max),
                    (f.len() - 5, "Hello", MAX_SMALL_CONTROL)
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.len(), f.len() - 5, "the body was not read");
        // Where bulk is expected it is read, and an ordinary Hello passes.
        assert!(expect_control_up_to(&mut &f[..], "State", MAX_FRAME).is_ok());
        let f = encode_control(&hello()).unwrap();
        assert!(expect_control(&mut &f[..], "Hello").is_ok());
        // A page batch is refused before its pages are read.
        let mut b = page_batch_header(&[0]).unwrap();
        b.extend_from_slice(&[0u8; PAGE_SIZE]);
        assert!(matches!(
            expect_control(&mut &b[..], "Hello"),
            Err(WireError::Unexpected { .. })
        ));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(matches!(decode_frame(&[]), Err(WireError::Io(_))));
        assert!(matches!(
            decode_frame(&[0, 0, 0, 0, 1]),
            Err(WireError::FrameSize(0))
        ));
        assert!(matches!(
            decode_frame(&[0xff, 0xff, 0xff, 0x7f, 1]),
            Err(WireError::FrameSize(_))
        ));
        assert!(matches!(
            decode_frame(&[1, 0, 0, 0, 9]),
            Err(WireError::UnknownKind(9))
        ));
        // Page batch claiming 1000 pages.
        let mut b = vec![0u8; 0];
        b.extend_from_slice(&9u32.to_le_bytes());
        b.push(KIND_PAGES);
        b.extend_from_slice(&1000u32.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        assert!(matches!(decode_frame(&b), Err(WireError::BadBatch(_))));
        // A batch whose length disagrees with its count.
        let mut b = page_batch_header(&[0]).unwrap();
        b[0] = b[0].wrapping_sub(1);
        assert!(matches!(decode_frame(&b), Err(WireError::BadBatch(_))));
        // Truncated control message.
        let f = encode_control(&hello()).unwrap();
        assert!(decode_frame(&f[..f.len() - 3]).is_err());
        // Garbage control body.
        let mut g = vec![0u8; 0];
        g.extend_from_slice(&5u32.to_le_bytes());
        g.push(KIND_CONTROL);
        g.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(decode_frame(&g), Err(WireError::Malformed(_))));
        // A string length claiming gigabytes must not allocate them.
        let mut s = vec![0u8; 0];
        let body = [0u8, 0xfc, 0xff, 0xff, 0xff, 0x7f];
        s.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
        s.push(KIND_CONTROL);
        s.extend_from_slice(&body);
        assert!(decode_frame(&s).is_err());
    }

    /// A compressed batch of `pages` (whole pages) at `offsets`.
    fn zframe(offsets: &[u64], raw: &[u8]) -> Vec<u8> {
        let mut c = PageCompressor::new(1).unwrap();
        let payload = c.compress(raw).unwrap().to_vec();
        let mut out = Vec::new();
        let n = write_zpages(&mut out, offsets, &payload).unwrap();
        assert_eq!(n as usize, out.len());
        out
    }

    fn compressible(pages: usize) -> Vec<u8> {
        (0..pages * PAGE_SIZE).map(|i| (i / 64 % 7) as u8).collect()
    }

    #[test]
    fn zpages_round_trip() {
        let raw = compressible(3);
        let f = zframe(&[0, 4096, 1 << 20], &raw);
        assert!(f.len() < raw.len() / 4, "{} bytes", f.len());
        match decode_frame(&f).unwrap() {
            Frame::Pages { offsets, data } => {
                assert_eq!(offsets, vec![0, 4096, 1 << 20]);
                assert_eq!(data, raw);
            }
            f => panic!("{f:?}"),
        }
        // Incompressible data still round-trips (the payload is a little larger).
        let noise: Vec<u8> = (0..PAGE_SIZE as u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect();
        assert!(
            matches!(decode_frame(&zframe(&[8192], &noise)), Ok(Frame::Pages { data, .. }) if data == noise)
        );
        // Every level, on a full batch, fits the decompressor's window limit.
        let full = compressible(MAX_BATCH_PAGES);
        let offsets: Vec<u64> = (0..MAX_BATCH_PAGES as u64).map(|i| i * 4096).collect();
        for level in [1, 3, 9, 19] {
            let payload = PageCompressor::new(level)
                .unwrap()
                .compress(&full)
                .unwrap()
                .to_vec();
            let mut f = Vec::new();
            write_zpages(&mut f, &offsets, &payload).unwrap();
            assert!(
                matches!(decode_frame(&f), Ok(Frame::Pages { data, .. }) if data == full),
                "level {level}"
            );
        }
        assert!(PageCompressor::new(0).is_err());
        assert!(PageCompressor::new(20).is_err());
    }

    #[test]
    fn bad_zpages_are_errors_not_panics() {
        let raw = compressible(2);
        let good = zframe(&[0, 4096], &raw);
        let head = 5 + 4 + 2 * 8; // frame header, count, offsets
                                  // A corrupt payload.
        let mut f = good.clone();
        let last = f.len() - 1;
        f[head + 4..=last].iter_mut().for_each(|b| *b ^= 0x5a);
        assert!(matches!(decode_frame(&f), Err(WireError::Compressed(_))));
        // A raw length that is not n × 4096.
        let mut f = good.clone();
        f[head..head + 4].copy_from_slice(&4095u32.to_le_bytes());
        assert!(
            matches!(decode_frame(&f), Err(WireError::Compressed(m)) if m.contains("raw length"))
        );
        // Two pages claimed, three pages of data compressed: more than the cap.
        let big = compressible(3);
        let payload = PageCompressor::new(1)
            .unwrap()
            .compress(&big)
            .unwrap()
            .to_vec();
        let mut f = Vec::new();
        write_zpages(&mut f, &[0, 4096], &payload).unwrap();
        assert!(matches!(decode_frame(&f), Err(WireError::Compressed(_))));
        // Two pages claimed, one page compressed: too short.
        let payload = PageCompressor::new(1)
            .unwrap()
            .compress(&raw[..PAGE_SIZE])
            .unwrap()
            .to_vec();
        let mut f = Vec::new();
        write_zpages(&mut f, &[0, 4096], &payload).unwrap();
        assert!(matches!(decode_frame(&f), Err(WireError::Compressed(m)) if m.contains("4096")));
        // Oversized claims: too many pages, a payload past the bound, no payload.
        let mut f = Vec::new();
        f.extend_from_slice(&100u32.to_le_bytes());
        f.push(KIND_ZPAGES);
        f.extend_from_slice(&100_000u32.to_le_bytes());
        f.extend_from_slice(&[0; 95]);
        assert!(matches!(decode_frame(&f), Err(WireError::Compressed(_))));
        let mut f = good[..head + 4].to_vec();
        let body = (head - 5 + 4) + max_zpayload(2) + 1;
        f[0..4].copy_from_slice(&((body + 1) as u32).to_le_bytes());
        f.resize(5 + body, 0);
        assert!(matches!(decode_frame(&f), Err(WireError::Compressed(m)) if m.contains("at most")));
        let mut f = good[..head + 4].to_vec();
        f[0..4].copy_from_slice(&((head + 4 - 4) as u32).to_le_bytes());
        assert!(matches!(decode_frame(&f), Err(WireError::Compressed(_))));
        // Every prefix fails cleanly.
        for cut in 0..good.len() {
            assert!(decode_frame(&good[..cut]).is_err());
        }
    }

    #[test]
    fn every_prefix_of_a_valid_stream_fails_cleanly() {
        let mut stream = encode_control(&hello()).unwrap();
        write_pages(&mut stream, &[4096], &[&[7u8; PAGE_SIZE]]).unwrap();
        for cut in 0..stream.len() {
            let mut cur = &stream[..cut];
            let _ = read_frame(&mut cur).and_then(|_| read_frame(&mut cur));
        }
    }
}
