//! Migration statistics (field names follow QEMU's `query-migrate` where they overlap).

use serde::{Deserialize, Serialize};

/// One pre-copy round.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundStats {
    /// Pages sent as data in the round.
    pub pages: u64,
    /// Bytes put on the wire in the round.
    pub bytes: u64,
    /// Duration, ms. Round 0 of hybrid and auto counts from when the dirty
    /// log began, during the set-up: its sampling's watch-only first step
    /// (`SamplingStats::watched_ms`) is in it.
    pub ms: f64,
    /// Pages the guest wrote during the round that the destination does not
    /// hold as written (written after they were sent, or never sent: hybrid's
    /// hot pages count too), per second, in bytes/s.
    pub dirty_rate: f64,
}

/// Page counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PageStats {
    /// Pages sent as data.
    pub sent: u64,
    /// Pages found zero (sent as ranges or skipped).
    pub zero: u64,
    /// Pages sent more than once.
    pub resent: u64,
    /// Post-copy: pages the destination had to receive after the switch.
    #[serde(default)]
    pub expected: u64,
    /// Post-copy: pages filled on demand (the guest faulted on them).
    #[serde(default)]
    pub demand: u64,
    /// Post-copy: pages filled by the background push.
    #[serde(default)]
    pub pushed: u64,
    /// Post-copy: neighbours sent along with a demanded page.
    #[serde(default)]
    pub prepaged: u64,
    /// Post-copy: pages that arrived for an already filled address.
    #[serde(default)]
    pub duplicate: u64,
    /// Hybrid: pages found hot before round 0 and left to post-copy.
    #[serde(default)]
    pub deferred: u64,
    /// Reorder: pages of a round's hot tail not sent because the dirty log,
    /// read again before the tail, showed them dirtied again (they go in the
    /// next round or the stop-and-copy).
    #[serde(default)]
    pub skipped_redirtied: u64,
}

/// Post-copy fault latency as the destination measured it (fault → page filled).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultStats {
    /// Faults that needed a page from the source.
    pub count: u64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Worst, µs.
    pub max_us: u64,
    /// Faults on zero pages, filled locally on the destination.
    #[serde(default)]
    pub zero: u64,
    /// Sum of the latencies: time vCPUs spent blocked on the source, µs.
    #[serde(default)]
    pub blocked_us: u64,
    /// Latency histogram: entry i counts faults that took [2^i, 2^(i+1)) µs.
    #[serde(default)]
    pub histogram_us: Vec<u64>,
}

/// Delta compression of re-sent pages (the fields of QEMU's query-migrate
/// `xbzrle-cache`, plus the hit rate).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct XbzrleStats {
    /// Cache size in bytes (0: off).
    pub cache_size: u64,
    /// Pages sent as deltas.
    pub pages: u64,
    /// Bytes of those deltas on the wire.
    pub bytes: u64,
    /// Re-sent pages not in the cache (sent whole).
    pub cache_miss: u64,
    /// Re-sent pages whose delta was too big (sent whole).
    pub overflow: u64,
    /// pages / (pages + cache_miss + overflow).
    pub hit_rate: f64,
}

impl XbzrleStats {
    /// Recomputes the hit rate from the counters.
    pub fn update_rate(&mut self) {
        let all = self.pages + self.cache_miss + self.overflow;
        self.hit_rate = if all > 0 {
            self.pages as f64 / all as f64
        } else {
            0.0
        };
    }
}

/// General compression of page batches (`compress`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CompressionStats {
    /// `none` or `zstd` (empty before the handshake).
    pub algorithm: String,
    /// zstd level (0: none).
    pub level: i32,
    /// Page data handed to the compressor, bytes (pages × 4096).
    pub raw_bytes: u64,
    /// What that page data took on the wire, bytes (compressed payloads, or
    /// the raw pages of a batch that did not shrink); frame heads not counted.
    pub wire_bytes: u64,
    /// raw_bytes / wire_bytes (0 before the first batch).
    pub ratio: f64,
    /// Batches that did not shrink and went raw.
    pub raw_batches: u64,
    /// Time spent compressing, ms.
    pub compress_ms: f64,
}

impl CompressionStats {
    /// Counts one batch of `raw` bytes that took `wire` bytes.
    pub fn add(&mut self, raw: u64, wire: u64) {
        self.raw_bytes += raw;
        self.wire_bytes += wire;
        if raw == wire {
            self.raw_batches += 1;
        }
        self.ratio = if self.wire_bytes > 0 {
            self.raw_bytes as f64 / self.wire_bytes as f64
        } else {
            0.0
        };
    }
}

/// Statistics of one migration, updated live.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationStats {
    /// Job id.
    pub id: String,
    /// VM name.
    pub vm: String,
    /// precopy, postcopy, hybrid.
    pub mode: String,
    /// setup, active, postcopy-active, postcopy-paused (link lost, reconnecting),
    /// completed, failed, cancelled.
    pub status: String,
    /// completed, failed, cancelled (empty while running).
    pub outcome: String,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Start to end, ms.
    pub total_ms: f64,
    /// Connect + handshake, ms.
    pub setup_ms: f64,
    /// Source pause to destination confirmation, ms.
    pub downtime_ms: f64,
    /// Bytes put on the wire.
    pub bytes: u64,
    /// Page counters.
    pub pages: PageStats,
    /// Per-round figures.
    pub rounds: Vec<RoundStats>,
    /// Average throughput of the transfer, Mbit/s.
    pub bandwidth_mbps: f64,
    /// Current round.
    pub round: u32,
    /// Dirty bytes still to send (live).
    pub remaining_bytes: u64,
    /// Latest dirty rate, bytes/s.
    pub dirty_rate: f64,
    /// The link's rate as the rounds measured it, bytes/s: what their
    /// decisions go by (0 until a round sent enough to measure).
    #[serde(default)]
    pub link_rate: f64,
    /// Predicted downtime at the switch-over, ms: the pages left at the
    /// measured bandwidth plus the switch-over's own cost (two round trips,
    /// the VM state, the vCPUs' pause and restore). 0 until a round has
    /// measured the bandwidth where more than 64 pages wait (never infinite).
    pub expected_downtime_ms: f64,
    /// The largest acceptable pause the rounds aim at now, ms (`--max-downtime`,
    /// or what `migrate-set` changed it to).
    #[serde(default)]
    pub max_downtime_ms: f64,
    /// The link's round trip as the source measured it before deciding to
    /// pause (the shortest `Sync` → `Synced` on an empty link), ms.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// Why the pre-copy rounds ended.
    pub stop_reason: String,
    /// Where the downtime went.
    pub downtime_phases: Option<DowntimePhases>,
    /// Verify mode: whether the destination's memory digest matched the source's.
    pub verified: Option<bool>,
    /// Post-copy: destination resume to the last page received, ms.
    #[serde(default)]
    pub resume_ms: f64,
    /// Post-copy: fault latency on the destination.
    #[serde(default)]
    pub faults: FaultStats,
    /// Post-copy: pages sent along with each demanded page (0 outside post-copy).
    #[serde(default)]
    pub prepaging_window: u32,
    /// Post-copy: whether fault requests and answers had their own connection.
    #[serde(default)]
    pub fault_channel: bool,
    /// Post-copy: times the link was lost after the switch and re-established.
    #[serde(default)]
    pub recoveries: u32,
    /// Delta compression of re-sent pages.
    #[serde(default)]
    pub xbzrle: XbzrleStats,
    /// General compression of page batches.
    #[serde(default)]
    pub compression: CompressionStats,
    /// Dynamic page transfer reordering was on (`reorder`).
    #[serde(default)]
    pub reorder: bool,
    /// The rounds cleared each word of the dirty log right before sending its
    /// pages (KVM manual dirty-log protection), instead of all at each read.
    #[serde(default)]
    pub clear_before_send: bool,
    /// Hybrid and auto: the dirty-log sampling at the start of round 0 that
    /// finds the pages to leave to post-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingStats>,
    /// The VM tracked dirty pages with KVM's dirty ring (None: the bitmap
    /// log): what its rings did during this migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_ring: Option<DirtyRingStats>,
    /// TCP streams that carried pre-copy pages (multifd; 1: the main connection).
    #[serde(default)]
    pub streams: u32,
    /// Mode `auto`: what it chose and why.
    #[serde(default)]
    pub policy: String,
    /// Auto-converge: share of each 100 ms the vCPUs were paused at the end, %.
    #[serde(default)]
    pub throttle_pct: u32,
    /// The cost model fed with this migration's measured parameters, beside the
    /// measured times (set when the migration ends).
    #[serde(default)]
    pub model: Option<crate::model::ModelCheck>,
    /// Fault injection (tests only): the phase the source is held at now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// The switch-over, phase by phase (µs, on the source's monotonic clock).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DowntimePhases {
    /// Asking the vCPUs to stop until all have.
    pub pause_us: u64,
    /// Final dirty log and the last pages.
    pub final_pages_us: u64,
    /// Capturing, encoding and sending the VM state (and the digest in verify mode).
    pub state_us: u64,
    /// Until the destination has rebuilt the VM and answered Ready.
    pub destination_ready_us: u64,
    /// Go, the destination resumes, Confirm arrives.
    pub go_confirm_us: u64,
}

impl DowntimePhases {
    /// A clock for the switch-over that began at `pause_start`: the pause
    /// phase ends now, and each [`SwitchClock::end`] ends the next phase.
    pub(crate) fn clock(pause_start: std::time::Instant) -> SwitchClock {
        SwitchClock {
            phases: DowntimePhases {
                pause_us: pause_start.elapsed().as_micros() as u64,
                ..Default::default()
            },
            lap: std::time::Instant::now(),
        }
    }
}

/// Times the phases of a switch-over, one after the other.
pub(crate) struct SwitchClock {
    pub(crate) phases: DowntimePhases,
    lap: std::time::Instant,
}

impl SwitchClock {
    /// Ends the phase `slot` names: the time since the previous end.
    pub(crate) fn end(&mut self, slot: fn(&mut DowntimePhases) -> &mut u64) {
        *slot(&mut self.phases) = self.lap.elapsed().as_micros() as u64;
        self.lap = std::time::Instant::now();
    }
}

/// A migration's dirty-ring figures (`vmm::dirty_ring`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRingStats {
    /// Entries per vCPU ring.
    pub entries: u32,
    /// Entries read from the rings.
    pub harvested: u64,
    /// Times a vCPU stopped because its ring was full (it went on once read).
    pub full_exits: u64,
    /// Reads that found a ring completely full, where entries may have been
    /// lost: each made the next read of the log report every page dirty.
    pub overflows: u64,
}

/// What hybrid's sampling of the dirty log did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingStats {
    /// How long it ran, ms.
    pub ms: f64,
    /// Pages it saw the guest write.
    pub hot_pages: u64,
    /// Why it ended: `quiet` (two steps found few new pages: the working
    /// set is known), `all sent` (every page not seen rewritten had been
    /// sent: waiting on would idle the link), `budget` (auto: a tenth of
    /// memory sent while the working set still grew) or `time limit` (1 s).
    pub ended: String,
    /// How long its first step only watched, the link idle, ms: from when
    /// the dirty log began, during the set-up, as round 0's `ms` counts.
    /// Round 0's sending time is its `ms` less this.
    #[serde(default)]
    pub watched_ms: f64,
    /// The part of `watched_ms` that the set-up (`setup_ms`: the
    /// destination's preparation) took too, ms.
    #[serde(default)]
    pub watched_in_setup_ms: f64,
}
