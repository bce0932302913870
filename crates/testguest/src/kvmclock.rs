//! KVM's paravirtual clock, as a Linux guest uses it: each CPU points
//! `MSR_KVM_SYSTEM_TIME_NEW` at a pvclock structure in guest memory, which
//! the host rewrites, and CPU 0 points `MSR_KVM_WALL_CLOCK_NEW` at a wall
//! clock structure, which the host writes at once. Both make the host touch
//! guest memory while it restores the MSRs: a destination whose memory is
//! still arriving (post-copy) must serve those pages first, or hang. The
//! checks ([`Watch::check`], once a second) report an MSR that lost its
//! value, a structure the host stopped updating, and a clock that runs
//! backwards.

use crate::boot::MAX_CPUS;
use crate::corrupt;
use crate::cpu;
use core::cell::UnsafeCell;

const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// How far a CPU's kvmclock may step back between two reads before it is
/// reported (the host's updates may move it back a little; a clock not
/// carried across a migration moves by the hosts' difference in uptime).
const BACKWARDS_NS: u64 = 1_000_000;
/// CPUID 0x40000001 EAX: the `_NEW` clock MSRs.
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// One host-written structure (a pvclock: 32 bytes; the wall clock: 12),
/// in a cache line of its own so that it never crosses a page.
#[repr(C, align(64))]
struct Shared(UnsafeCell<[u32; 16]>);

// SAFETY: the host writes it; the guest only reads it with volatile loads.
unsafe impl Sync for Shared {}

impl Shared {
    const fn new() -> Self {
        Shared(UnsafeCell::new([0; 16]))
    }

    fn addr(&self) -> u64 {
        self.0.get() as u64
    }

    fn word(&self, i: usize) -> u32 {
        // SAFETY: an aligned read inside the structure, which stays mapped.
        unsafe { core::ptr::read_volatile((self.0.get() as *const u32).add(i)) }
    }
}

static PVCLOCK: [Shared; MAX_CPUS] = [const { Shared::new() }; MAX_CPUS];
static WALL_CLOCK: Shared = Shared::new();

/// A pvclock read: version (even), TSC at the update, nanoseconds at the
/// update, and the TSC-to-ns scale.
struct Reading {
    version: u32,
    tsc_timestamp: u64,
    system_time: u64,
    mul: u32,
    shift: i8,
}

fn read(cpu: usize) -> Reading {
    let p = &PVCLOCK[cpu];
    loop {
        let version = p.word(0);
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        let r = Reading {
            version,
            tsc_timestamp: p.word(2) as u64 | (p.word(3) as u64) << 32,
            system_time: p.word(4) as u64 | (p.word(5) as u64) << 32,
            mul: p.word(6),
            shift: p.word(7) as u8 as i8,
        };
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        if version & 1 == 0 && p.word(0) == version {
            return r;
        }
        core::hint::spin_loop();
    }
}

impl Reading {
    /// Nanoseconds at `tsc`, as a Linux guest computes them.
    fn ns(&self, tsc: u64) -> u64 {
        let mut delta = tsc.wrapping_sub(self.tsc_timestamp);
        if delta > u64::MAX / 2 {
            // TSC read before the update (another CPU's view): no time.
            delta = 0;
        }
        delta = match self.shift {
            s if s < 0 => delta >> (-(s as i32)).min(63),
            s => delta << (s as u32).min(63),
        };
        let scaled = ((delta as u128 * self.mul as u128) >> 32) as u64;
        self.system_time.wrapping_add(scaled)
    }
}

/// Self-test: switches this CPU's kvmclock off, as a VMM that lost the MSR would.
pub fn sabotage() {
    cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
}

/// The kvmclock of one CPU, switched on by [`Watch::enable`].
pub struct Watch {
    cpu: usize,
    msr: u64,
    wall: Option<u64>,
    last_ns: u64,
    /// Reported already (once until it reads right again).
    reported: [bool; 3],
}

impl Watch {
    /// Points this CPU's kvmclock (and on CPU 0 the wall clock) at the
    /// guest's structures; None, with the reason, where the host lacks it.
    pub fn enable(cpu: usize) -> Result<Watch, &'static str> {
        let sig = cpu::cpuid(0x4000_0000, 0);
        if [sig[1], sig[2], sig[3]] != [0x4b4d_564b, 0x564b_4d56, 0x4d] {
            return Err("no KVM signature in CPUID 0x40000000");
        }
        if cpu::cpuid(0x4000_0001, 0)[0] & KVM_FEATURE_CLOCKSOURCE2 == 0 {
            return Err("no KVM_FEATURE_CLOCKSOURCE2 in CPUID");
        }
        let msr = PVCLOCK[cpu].addr() | 1;
        if !cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, msr)
            || cpu::rdmsr(MSR_KVM_SYSTEM_TIME_NEW) != Some(msr)
        {
            return Err("MSR_KVM_SYSTEM_TIME_NEW not writable");
        }
        let wall = WALL_CLOCK.addr();
        let wall = (cpu == 0
            && cpu::wrmsr(MSR_KVM_WALL_CLOCK_NEW, wall)
            && cpu::rdmsr(MSR_KVM_WALL_CLOCK_NEW) == Some(wall))
        .then_some(wall);
        Ok(Watch {
            cpu,
            msr,
            wall,
            last_ns: 0,
            reported: [false; 3],
        })
    }

    /// The checks, about once a second.
    pub fn check(&mut self) {
        let cpu = self.cpu;
        let found = cpu::rdmsr(MSR_KVM_SYSTEM_TIME_NEW);
        if self.report(0, found != Some(self.msr)) {
            corrupt!(
                "kvmclock cpu={cpu} msr=system_time found={:#x} want={:#x}",
                found.unwrap_or(0),
                self.msr
            );
            cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, self.msr);
        }
        if let Some(wall) = self.wall {
            let found = cpu::rdmsr(MSR_KVM_WALL_CLOCK_NEW);
            if self.report(1, found != Some(wall)) {
                corrupt!(
                    "kvmclock cpu={cpu} msr=wall_clock found={:#x} want={wall:#x}",
                    found.unwrap_or(0)
                );
                cpu::wrmsr(MSR_KVM_WALL_CLOCK_NEW, wall);
            }
        }
        let r = read(cpu);
        let ns = r.ns(cpu::rdtsc_ordered());
        if self.report(
            2,
            r.version == 0 || r.mul == 0 || ns + BACKWARDS_NS < self.last_ns,
        ) {
            corrupt!(
                "kvmclock cpu={cpu} version={} mul={} ns={ns} last_ns={}",
                r.version,
                r.mul,
                self.last_ns
            );
        }
        self.last_ns = self.last_ns.max(ns);
    }

    /// Whether to report a check `k` that is `bad` now: once until it is good again.
    fn report(&mut self, k: usize, bad: bool) -> bool {
        let first = bad && !self.reported[k];
        self.reported[k] = bad;
        first
    }
}
