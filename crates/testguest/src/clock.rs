//! Guest time from the TSC, and finding its frequency.

use crate::boot::MAX_CPUS;
use crate::cpu::{self, inb, outb, rdtsc, rdtsc_ordered};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
/// Offsets added to the TSC by `selftest=clock*`/`skew` (0 otherwise).
static OFFSET_ALL: AtomicU64 = AtomicU64::new(0);
static OFFSET_CPU: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// CPUID 0x40000010.
    Cpuid,
    /// `tsc_khz=` on the command line.
    Cmdline,
    /// Measured against PIT channel 2.
    Pit,
}

impl Source {
    /// Name for the banner.
    pub fn name(self) -> &'static str {
        match self {
            Source::Cpuid => "cpuid",
            Source::Cmdline => "cmdline",
            Source::Pit => "pit",
        }
    }
}

/// Timing leaf 0x40000010: (TSC kHz, LAPIC bus kHz), when the VMM provides it.
pub fn timing_leaf() -> Option<(u64, u64)> {
    let max = cpu::cpuid(0x4000_0000, 0)[0];
    if !(0x4000_0010..0x4000_0100).contains(&max) {
        return None;
    }
    let r = cpu::cpuid(0x4000_0010, 0);
    let (tsc, bus) = (r[0] as u64, r[1] as u64);
    (100_000..=20_000_000).contains(&tsc).then_some((tsc, bus))
}

/// One 50 ms PIT channel 2 countdown (mode 0): (TSC ticks, uncertainty).
/// The start and the end are each bracketed by two TSC reads, so a vCPU
/// preempted at the wrong moment shows up as a large uncertainty.
fn pit_once() -> Option<(u64, u64)> {
    let gate = inb(0x61);
    outb(0x61, (gate & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0
    outb(0x42, PIT_COUNT as u8);
    let a = rdtsc();
    outb(0x42, (PIT_COUNT >> 8) as u8); // counting starts here
    let b = rdtsc();
    let mut prev = b;
    let result = loop {
        let out = inb(0x61) & 0x20 != 0;
        let t = rdtsc();
        if out {
            let ticks = (t / 2 + prev / 2).saturating_sub(a / 2 + b / 2);
            break Some((ticks, (b - a) + (t - prev)));
        }
        if t - a > 1 << 36 {
            break None;
        }
        prev = t;
    };
    outb(0x61, gate);
    result
}

const PIT_HZ: u64 = 1_193_182;
const PIT_MS: u64 = 50;
const PIT_COUNT: u16 = (PIT_HZ * PIT_MS / 1000) as u16;

/// Measure the TSC against PIT channel 2: up to five 50 ms countdowns, keeping
/// the one with the tightest brackets (done as soon as one is within 0.05%).
pub fn calibrate_pit() -> Option<u64> {
    let mut best: Option<(u64, u64)> = None;
    for _ in 0..5 {
        let Some((ticks, err)) = pit_once() else {
            break;
        };
        if best.is_none_or(|(_, e)| err < e) {
            best = Some((ticks, err));
        }
        if err * 2000 < ticks {
            break;
        }
    }
    let (ticks, _) = best?;
    let khz = ticks * PIT_HZ / (PIT_COUNT as u64 * 1000);
    (100_000..=20_000_000).contains(&khz).then_some(khz)
}

/// Set the TSC frequency and the boot time stamp.
pub fn init(khz: u64, boot_tsc: u64) {
    TSC_KHZ.store(khz, Ordering::Relaxed);
    BOOT_TSC.store(boot_tsc, Ordering::Relaxed);
}

/// TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// TSC ticks per second.
pub fn tsc_hz() -> u64 {
    tsc_khz() * 1000
}

/// TSC ticks per millisecond.
pub fn ms(n: u64) -> u64 {
    tsc_khz() * n
}

/// Convert TSC ticks to milliseconds.
pub fn to_ms(ticks: u64) -> u64 {
    ticks / tsc_khz().max(1)
}

/// Guest milliseconds since boot for a `now()` value.
pub fn since_boot_ms(now: u64) -> u64 {
    to_ms(now.wrapping_sub(BOOT_TSC.load(Ordering::Relaxed)))
}

/// The guest clock on `cpu`: the TSC (read after earlier loads) plus the
/// self-test offsets.
#[inline]
pub fn now(cpu: usize) -> u64 {
    let off = OFFSET_ALL
        .load(Ordering::Acquire)
        .wrapping_add(OFFSET_CPU[cpu].load(Ordering::Acquire));
    rdtsc_ordered().wrapping_add(off)
}

/// Move every CPU's clock by `delta` (wrapping: negative moves it back).
pub fn offset_all(delta: u64) {
    OFFSET_ALL.fetch_add(delta, Ordering::Release);
}

/// Move one CPU's clock by `delta`.
pub fn offset_cpu(cpu: usize, delta: u64) {
    OFFSET_CPU[cpu].fetch_add(delta, Ordering::Release);
}
