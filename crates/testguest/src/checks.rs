//! Per-CPU register-state, timer and clock checks (all in ring 3).
//!
//! Each CPU puts known values into state that a VMM must migrate (ymm upper
//! halves, x87 registers and control word, MXCSR, FS/GS bases, syscall and
//! sysenter MSRs, PAT, TSC_AUX, LAPIC registers) and checks them on every
//! loop iteration (cheap, unprivileged reads) or once a second (MSRs and
//! LAPIC registers, read through CPL-0 services). After a report the value
//! is restored so that one loss gives one line.
//!
//! Each CPU also keeps a progress counter twice, in memory ([`PROGRESS`])
//! and in the upper half of ymm15, and compares the two at the top of every
//! loop iteration ([`Checker::progress`]): memory older or newer than the
//! registers (a lost last dirty round, a stale vCPU state) shows at once.

use crate::boot::{
    KCPU, LAPIC_BASE, MAX_CPUS, SPURIOUS_VECTOR, SVC_HALT, SVC_HALT_CLOBBER, TIMER_VECTOR,
};
use crate::clock;
use crate::cpu::{self, F80, X87_REGS, YMM_REGS};
use crate::kvmclock;
use crate::platform;
use crate::{corrupt, println};
use core::sync::atomic::{AtomicU64, Ordering};

/// LAPIC timer rate.
pub const TICK_HZ: u64 = 100;
/// A gap between two clock reads longer than this is a clock step.
pub const STEP_MS: u64 = 100;
/// Gaps longer than one tick period (but no step) are time the CPU may not
/// have run (host preemption): ticks that fell in them may have coalesced.
const LOST_MS: u64 = 10;
/// Allowed cross-CPU TSC disagreement.
const SKEW_MS: u64 = 5;

const FCW: u16 = 0x0e7f; // round toward zero, 53-bit precision, all masked
const MXCSR: u32 = 0xbfc0; // FTZ | round down | DAZ | all masked
const MXCSR_FLAGS: u32 = 0x3f; // sticky exception flags: not checked

/// An MSR read for printing: its value in hex, or `gp` if it faulted.
struct Hex(Option<u64>);

impl core::fmt::Display for Hex {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:#x}"),
            None => f.write_str("gp"),
        }
    }
}

/// System registers read through [`cpu::sysreg`], by index.
const SYSREGS: [&str; 6] = ["cr0", "cr3", "cr4", "gdtr", "idtr", "tr"];

/// What the boot code leaves in them on `cpu` (GDTR and IDTR as base << 16
/// | limit).
fn sysreg_values(cpu: usize) -> [u64; 6] {
    let (gdt, gdt_len) = crate::boot::gdt_range();
    [
        0x8001_0033, // PG | WP | NE | ET | MP | PE
        crate::boot::page_tables_range().0,
        0x4_0620, // OSXSAVE | OSXMMEXCPT | OSFXSR | PAE
        gdt << 16 | (gdt_len - 1),
        crate::boot::idt_addr() << 16 | (crate::boot::IDT_BYTES as u64 - 1),
        (crate::boot::GDT_TSS_SEL + 16 * cpu) as u64,
    ]
}

/// LAPIC register offsets.
mod reg {
    pub const ID: u32 = 0x20;
    pub const TPR: u32 = 0x80;
    pub const LDR: u32 = 0xd0;
    pub const DFR: u32 = 0xe0;
    pub const SVR: u32 = 0xf0;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INIT: u32 = 0x380;
    pub const TIMER_CUR: u32 = 0x390;
    pub const TIMER_DIV: u32 = 0x3e0;
}
pub use reg::*;

const MASKED: u32 = 1 << 16;
const PERIODIC: u32 = 1 << 17;

/// Highest TSC value any CPU has published (for the cross-CPU check).
static MAX_TSC: AtomicU64 = AtomicU64::new(0);

/// The memory copy of one CPU's progress counter, alone in its cache line.
#[repr(C, align(64))]
pub struct ProgressWord(pub AtomicU64);

/// The memory copy of every CPU's progress counter (the register copy is
/// in bits 255:128 of that CPU's ymm15): CPU `c`'s is the u64 at
/// `PROGRESS + 64 * c`. Only CPU `c` writes it (or `selftest=progress`).
pub static PROGRESS: [ProgressWord; MAX_CPUS] =
    [const { ProgressWord(AtomicU64::new(0)) }; MAX_CPUS];

/// DR`n` of `cpu`: a distinct canonical address (a breakpoint never enabled).
fn debugreg_value(cpu: usize, n: usize) -> u64 {
    0x7f5a_0000_0000 | (cpu as u64) << 12 | (n as u64) << 4
}

/// Bits 255:192 of ymm15: a per-CPU tag beside the counter (bits 191:128),
/// so that a zeroed or foreign register never passes for a counter.
fn progress_tag(cpu: usize) -> u64 {
    0x5052_4f47_0000_0000 | (cpu as u64) << 8 | 0x15
}

/// The counter's first value (never 0, which a zeroed copy would read).
const PROGRESS_START: u64 = 1;

/// RFLAGS around a checked `hlt`: IF and bit 1 (as they are in ring 3),
/// and CF, PF, AF, ZF, SF, OF set (DF, TF and AC clear).
const HALT_RFLAGS: u64 = 0x202 | 0x8d5;
/// RFLAGS bits compared after it: the arithmetic flags and DF.
const HALT_RFLAGS_MASK: u64 = 0x8d5 | 0x400;

/// What the registers hold around `cpu`'s `n`-th checked `hlt` (in
/// [`cpu::HALT_REGS`] order): rax the service; register `k` of the others
/// `0x52` (`R`), `k`, the vCPU and the low 40 bits of `n`, byte by byte
/// from the top, so every register of every vCPU and halt differs and a
/// value shows where it came from.
fn halt_values(cpu: usize, n: u64, service: u32) -> [u64; 16] {
    let mut v = [0u64; 16];
    v[0] = service as u64;
    for (k, r) in v.iter_mut().enumerate().take(15).skip(1) {
        *r = 0x52 << 56 | (k as u64) << 48 | (cpu as u64) << 40 | (n & 0xff_ffff_ffff);
    }
    v[15] = HALT_RFLAGS;
    v
}

/// An MSR with a known value. `write = false`: only read and compared.
#[derive(Clone, Copy)]
struct Msr {
    msr: u32,
    name: &'static str,
    value: u64,
    write: bool,
    on: bool,
}

const MSR_COUNT: usize = 13;

fn msr_list(cpu: usize) -> [Msr; MSR_COUNT] {
    let c = cpu as u64;
    let m = |msr, name, value, write| Msr {
        msr,
        name,
        value,
        write,
        on: true,
    };
    let kcpu = &KCPU[cpu];
    [
        m(0xc000_0100, "fs_base", kcpu.fs_word.as_ptr() as u64, true),
        m(0xc000_0101, "gs_base", kcpu.gs_word.as_ptr() as u64, true),
        m(
            0xc000_0102,
            "kernel_gs_base",
            0x0000_7e57_0000_1000 + (c << 12),
            true,
        ),
        m(0xc000_0081, "star", 0x0013_0008_7e57_0000 | c, true),
        m(0xc000_0082, "lstar", 0xffff_8000_7e57_0000 + (c << 4), true),
        m(0xc000_0083, "cstar", 0x0000_7e57_c000_0000 + (c << 4), true),
        m(0xc000_0084, "sfmask", 0x0004_7700 | c, true),
        m(0x174, "sysenter_cs", 0x0b00 + c, true),
        m(0x175, "sysenter_esp", 0x7e57_5000 + (c << 3), true),
        m(0x176, "sysenter_eip", 0x7e57_e000 + (c << 3), true),
        m(0x277, "pat", 0x0406_0105_0007_0406, true),
        m(0xc000_0080, "efer", 0x500, false), // LME | LMA, compared under EFER_MASK
        m(
            0x1b,
            "apic_base",
            LAPIC_BASE | 0x800 | if cpu == 0 { 0x100 } else { 0 },
            false,
        ),
    ]
}

/// EFER bits compared: SCE, LME, LMA, NXE.
const EFER_MASK: u64 = 0xd01;

fn msr_matches(m: &Msr, v: u64) -> bool {
    match m.msr {
        0xc000_0080 => v & EFER_MASK == m.value,
        0x1b => v & !0xff == m.value,
        _ => v == m.value,
    }
}

/// A LAPIC register: (offset, bits compared, expected value).
type LapicReg = (u32, u32, u32);

/// Values for the ymm upper halves of `cpu`.
fn ymm_values(cpu: usize) -> [[u64; 2]; YMM_REGS] {
    let mut v = [[0u64; 2]; YMM_REGS];
    for (k, r) in v.iter_mut().enumerate() {
        let lo = 0x5149_4d44_0000_0000 | (cpu as u64) << 16 | (k as u64) << 8 | 0xa5;
        *r = [lo, !lo.rotate_left(17)];
    }
    v
}

/// Values for the x87 registers of `cpu` (normal numbers, loaded exactly).
fn x87_values(cpu: usize) -> [F80; X87_REGS] {
    let mut v = [(0u64, 0u16); X87_REGS];
    for (k, r) in v.iter_mut().enumerate() {
        let m =
            0x8000_0000_0000_0000 | (cpu as u64) << 48 | (k as u64) << 40 | 0x0087_0000_1234_5678;
        *r = (m, 0x3fff + (cpu as u16) * 8 + k as u16);
    }
    v
}

/// Check state of one CPU.
pub struct Checker {
    cpu: usize,
    ymm: [[u64; 2]; YMM_REGS],
    x87: [F80; X87_REGS],
    fs_gs: Option<(u64, u64)>,
    tsc_aux: Option<u32>,
    msrs: [Msr; MSR_COUNT],
    lapic: [LapicReg; 11],
    /// CR0, CR3, CR4, GDTR, IDTR, TR: the value, or None where the value
    /// read at start differs (not checked); and whether a difference was
    /// reported (cleared when the register reads right again).
    sysregs: [(Option<u64>, bool); 6],
    /// DR0 to DR3 (breakpoint addresses, never enabled in DR7): the value,
    /// or None where they do not read back at start.
    debugregs: [Option<u64>; 4],
    /// KVM's paravirtual clock, where the host has it.
    kvmclock: Option<kvmclock::Watch>,
    /// The shared devices (UART, PIT, PICs): CPU 0 only.
    platform: Option<platform::Watch>,
    /// Clock: last read, current window.
    last: u64,
    win_start: u64,
    win_ticks: u64,
    win_step: bool,
    win_lost: u64,
    skew_reported: bool,
    xcr0_reported: bool,
    next_slow: u64,
    /// Checked `hlt`s so far.
    halts: u64,
    /// Clock steps seen (for the boot CPU's stall detector).
    pub steps: u64,
}

impl Checker {
    /// Program the LAPIC (timer at `TICK_HZ` from a `bus_khz` bus clock),
    /// load all known values and check that each one reads back; state that
    /// does not read back right after being set is a platform limitation, so
    /// its check is switched off (with a note from cpu 0).
    pub fn setup(cpu: usize, apic_id: u32, bus_khz: u64) -> Checker {
        let count = (bus_khz * 1000 / TICK_HZ).clamp(1, u32::MAX as u64) as u32;
        let lapic: [LapicReg; 11] = [
            (SVR, 0x1ff, 0x100 | SPURIOUS_VECTOR),
            (TPR, 0xff, 0),
            (DFR, 0xf000_0000, 0xf000_0000),
            (LDR, 0xff00_0000, 1 << (24 + cpu)),
            (LVT_LINT0, MASKED, MASKED),
            (LVT_LINT1, MASKED, MASKED),
            (LVT_ERROR, MASKED | 0xff, MASKED | 0xfe),
            (TIMER_DIV, 0xb, 0xb),
            (LVT_TIMER, 0x700ff, PERIODIC | TIMER_VECTOR),
            (TIMER_INIT, u32::MAX, count),
            (ID, 0xff00_0000, apic_id << 24),
        ];
        for &(r, _, v) in &lapic {
            if r != ID {
                cpu::lapic_write(r, v);
            }
        }
        let note = |what: core::fmt::Arguments| {
            if cpu == 0 {
                println!("TESTGUEST note: {what}");
            }
        };

        let kcpu = &KCPU[cpu];
        kcpu.fs_word
            .store(0xf5f5_0000_0000_0000 | cpu as u64, Ordering::Relaxed);
        kcpu.gs_word
            .store(0x6565_0000_0000_0000 | cpu as u64, Ordering::Relaxed);
        let mut msrs = msr_list(cpu);
        for m in msrs.iter_mut() {
            if m.write && !cpu::wrmsr(m.msr, m.value) {
                m.on = false;
                note(format_args!(
                    "msr {} ({:#x}) not writable: not checked",
                    m.name, m.msr
                ));
                continue;
            }
            match cpu::rdmsr(m.msr) {
                Some(v) if msr_matches(m, v) => {}
                r => {
                    m.on = false;
                    let r = Hex(r);
                    note(format_args!(
                        "msr {} ({:#x}) reads {r}, want {:#x}: not checked",
                        m.name, m.msr, m.value
                    ));
                }
            }
        }
        let fs_gs = (
            kcpu.fs_word.load(Ordering::Relaxed),
            kcpu.gs_word.load(Ordering::Relaxed),
        );
        let fs_gs = if cpu::fs_gs_words() == fs_gs {
            Some(fs_gs)
        } else {
            note(format_args!(
                "fs:[0]/gs:[0] do not follow FS_BASE/GS_BASE: not checked"
            ));
            None
        };

        let mut sysregs = [(None, false); 6];
        for (k, want) in sysreg_values(cpu).into_iter().enumerate() {
            let v = cpu::sysreg(k as u32);
            if v == want {
                sysregs[k].0 = Some(want);
            } else {
                note(format_args!(
                    "{} reads {v:#x}, want {want:#x}: not checked",
                    SYSREGS[k]
                ));
            }
        }

        let rdtscp = cpu::cpuid(0x8000_0001, 0)[3] & (1 << 27) != 0;
        let tsc_aux = if !rdtscp {
            note(format_args!("no RDTSCP in CPUID: TSC_AUX not checked"));
            None
        } else if !cpu::wrmsr(0xc000_0103, cpu as u64) {
            note(format_args!("TSC_AUX not writable: not checked"));
            None
        } else {
            match cpu::rdtscp().1 {
                aux if aux == cpu as u32 => Some(aux),
                aux => {
                    note(format_args!(
                        "rdtscp in ring 3 reads TSC_AUX={aux:#x}, not the value written: not checked"
                    ));
                    None
                }
            }
        };

        let mut debugregs = [None; 4];
        for (n, slot) in debugregs.iter_mut().enumerate() {
            let want = debugreg_value(cpu, n);
            if cpu::set_debugreg(n as u32, want) == want {
                *slot = Some(want);
            }
        }
        if debugregs.contains(&None) {
            note(format_args!(
                "debug registers do not read back: not checked"
            ));
            debugregs = [None; 4];
        }

        let kvmclock = kvmclock::Watch::enable(cpu)
            .inspect_err(|why| note(format_args!("kvmclock: {why}: not checked")))
            .ok();
        let platform = (cpu == 0).then(|| platform::Watch::setup(note));

        let ymm = ymm_values(cpu);
        let x87 = x87_values(cpu);
        cpu::ymm_load_upper(&ymm);
        PROGRESS[cpu].0.store(PROGRESS_START, Ordering::Relaxed);
        cpu::ymm15_load_upper(&[PROGRESS_START, progress_tag(cpu)]);
        cpu::x87_load(FCW, &x87);
        cpu::ldmxcsr(MXCSR);

        let now = clock::now(cpu);
        Checker {
            cpu,
            ymm,
            x87,
            fs_gs,
            tsc_aux,
            msrs,
            lapic,
            sysregs,
            debugregs,
            kvmclock,
            platform,
            last: now,
            win_start: now,
            win_ticks: kcpu.ticks.load(Ordering::Relaxed),
            win_step: false,
            win_lost: 0,
            skew_reported: false,
            xcr0_reported: false,
            next_slow: now,
            halts: 0,
            steps: 0,
        }
    }

    /// Read the clock and run the clock and timer checks; returns the time.
    pub fn clock(&mut self) -> u64 {
        let cpu = self.cpu;
        let seen = MAX_TSC.load(Ordering::Acquire);
        let now = clock::now(cpu);
        let ticks = KCPU[cpu].ticks.load(Ordering::Relaxed);

        if now < self.last {
            corrupt!(
                "clock cpu={cpu} backwards_us={}",
                clock::to_ms((self.last - now) * 1000)
            );
            self.restart_window(now, ticks);
        } else {
            let gap = now - self.last;
            if gap > clock::ms(STEP_MS) {
                println!("CLOCK STEP ms={} cpu={cpu}", clock::to_ms(gap));
                self.win_step = true;
                self.steps += 1;
            } else if gap > clock::ms(LOST_MS) {
                self.win_lost += gap;
            }
        }
        self.last = now;

        if seen > now.wrapping_add(clock::ms(SKEW_MS)) && seen - now < u64::MAX / 2 {
            if !self.skew_reported {
                self.skew_reported = true;
                corrupt!(
                    "clock cpu={cpu} behind_other_cpu_us={}",
                    clock::to_ms((seen - now) * 1000)
                );
            }
        } else {
            self.skew_reported = false;
        }
        MAX_TSC.fetch_max(now, Ordering::AcqRel);

        let elapsed = now.wrapping_sub(self.win_start);
        if elapsed >= clock::tsc_hz() {
            if !self.win_step {
                let window_ms = clock::to_ms(elapsed);
                let ran_ms = window_ms.saturating_sub(clock::to_ms(self.win_lost));
                let n = ticks.wrapping_sub(self.win_ticks);
                let expected = window_ms * TICK_HZ / 1000;
                let lo = ran_ms * TICK_HZ / 1000 / 2;
                let hi = expected * 3 / 2 + 2;
                if n < lo || n > hi {
                    corrupt!(
                        "timer cpu={cpu} ticks={n} window_ms={window_ms} expected={expected} min={lo} max={hi}"
                    );
                }
            }
            self.restart_window(now, ticks);
        }
        now
    }

    fn restart_window(&mut self, now: u64, ticks: u64) {
        self.win_start = now;
        self.win_ticks = ticks;
        self.win_step = false;
        self.win_lost = 0;
    }

    /// The progress counter, first thing in every loop iteration: compares
    /// its register copy (ymm15's upper half) with its memory copy, reports
    /// a difference (and goes on from the memory copy, so that one loss
    /// gives one line), then advances the counter in memory and in the
    /// register. Both copies change only here, memory first; an interrupt
    /// (CPL 0) touches neither, so at this point they agree unless memory
    /// and registers came from different moments. Skipped while XCR0 lacks
    /// AVX (reported by [`Checker::fast`]).
    pub fn progress(&mut self) {
        if cpu::xgetbv0() & 7 != 7 {
            return;
        }
        let cpu = self.cpu;
        let word = &PROGRESS[cpu].0;
        let tag = progress_tag(cpu);
        let mem = word.load(Ordering::Relaxed);
        let [reg, hi] = cpu::ymm15_store_upper();
        if reg != mem || hi != tag {
            if hi == tag {
                corrupt!("progress cpu={cpu} memory={mem} register={reg}");
            } else {
                corrupt!(
                    "progress cpu={cpu} memory={mem} register={reg} register_hi={hi:#018x} want_hi={tag:#018x}"
                );
            }
        }
        let next = mem.wrapping_add(1);
        word.store(next, Ordering::Relaxed);
        cpu::ymm15_load_upper(&[next, tag]);
    }

    /// Unprivileged checks, run on every loop iteration.
    pub fn fast(&mut self) {
        let cpu = self.cpu;
        let xcr0 = cpu::xgetbv0();
        if xcr0 & 7 != 7 {
            // AVX would fault: report and skip the ymm check.
            if !self.xcr0_reported {
                self.xcr0_reported = true;
                corrupt!("xcr0 cpu={cpu} found={xcr0:#x} want=0x7");
            }
        } else {
            self.xcr0_reported = false;
            let mut got = [[0u64; 2]; YMM_REGS];
            cpu::ymm_store_upper(&mut got);
            if let Some(k) = (0..YMM_REGS).find(|&k| got[k] != self.ymm[k]) {
                let bad = (0..YMM_REGS).filter(|&k| got[k] != self.ymm[k]).count();
                corrupt!(
                    "simd cpu={cpu} reg=ymm{k} found=0x{:016x}{:016x} want=0x{:016x}{:016x} bad_regs={bad}",
                    got[k][1],
                    got[k][0],
                    self.ymm[k][1],
                    self.ymm[k][0]
                );
                cpu::ymm_load_upper(&self.ymm);
            }
        }

        let (st, fcw) = cpu::x87_store();
        let bad_st = (0..X87_REGS).find(|&i| st[i] != self.x87[X87_REGS - 1 - i]);
        if fcw != FCW || bad_st.is_some() {
            let i = bad_st.unwrap_or(0);
            let (m, e) = st[i];
            let (wm, we) = self.x87[X87_REGS - 1 - i];
            corrupt!(
                "x87 cpu={cpu} fcw={fcw:#06x} want_fcw={FCW:#06x} reg=st{i} found={e:04x}:{m:016x} want={we:04x}:{wm:016x}"
            );
            cpu::x87_load(FCW, &self.x87);
        }

        let mxcsr = cpu::stmxcsr();
        if mxcsr & !MXCSR_FLAGS != MXCSR {
            corrupt!("mxcsr cpu={cpu} found={mxcsr:#x} want={MXCSR:#x}");
            cpu::ldmxcsr(MXCSR);
        }

        if let Some((fs, gs)) = self.fs_gs {
            let (f, g) = cpu::fs_gs_words();
            if (f, g) != (fs, gs) {
                let which = if f != fs { "fs" } else { "gs" };
                corrupt!(
                    "segbase cpu={cpu} reg={which} fs_word={f:#x} gs_word={g:#x} want={fs:#x}/{gs:#x}"
                );
                for m in &self.msrs[..2] {
                    cpu::wrmsr(m.msr, m.value);
                }
            }
        }

        if let Some(aux) = self.tsc_aux {
            let (_, got) = cpu::rdtscp();
            if got != aux {
                corrupt!("msr cpu={cpu} msr=0xc0000103 name=tsc_aux found={got:#x} want={aux:#x}");
                cpu::wrmsr(0xc000_0103, aux as u64);
            }
        }
    }

    /// Sleeps until the next interrupt with known values in every
    /// general-purpose register but rsp, and in RFLAGS, and compares them
    /// after the wake-up: a VMM that restores a halted vCPU with wrong
    /// registers is caught. Nothing on the way changes them: the #UD
    /// handler's halt path (`sti; hlt; iretq`) only compares eax, the timer
    /// handler saves and restores rax (the one register it uses), and the
    /// spurious handler is a bare `iretq`; any other vector is fatal.
    pub fn halt(&mut self) {
        self.halt_with(SVC_HALT);
    }

    /// `selftest=regs`: one checked `hlt` through the service that flips
    /// r13 while the vCPU sleeps.
    pub fn halt_clobbered(&mut self) {
        self.halt_with(SVC_HALT_CLOBBER);
    }

    fn halt_with(&mut self, service: u32) {
        self.halts += 1;
        let cpu = self.cpu;
        let want = halt_values(cpu, self.halts, service);
        let mut found = want;
        cpu::halt_with_regs(&mut found);
        let differs = |k: usize| {
            let mask = if k == 15 { HALT_RFLAGS_MASK } else { !0 };
            (found[k] ^ want[k]) & mask != 0
        };
        let bad = (0..16).filter(|&k| differs(k)).count();
        if let Some(k) = (0..16).find(|&k| differs(k)) {
            corrupt!(
                "regs cpu={cpu} reg={} found={:#018x} want={:#018x} bad_regs={bad} halts={}",
                cpu::HALT_REGS[k],
                found[k],
                want[k],
                self.halts
            );
        }
    }

    /// Privileged-state checks through CPL-0 services, about once a second.
    pub fn slow(&mut self, now: u64) {
        if now.wrapping_sub(self.next_slow) > u64::MAX / 2 {
            return;
        }
        self.next_slow = now + clock::tsc_hz();
        let cpu = self.cpu;
        for m in self.msrs.iter().filter(|m| m.on) {
            let v = cpu::rdmsr(m.msr);
            if v.is_none_or(|v| !msr_matches(m, v)) {
                let found = Hex(v);
                corrupt!(
                    "msr cpu={cpu} msr={:#x} name={} found={found} want={:#x}",
                    m.msr,
                    m.name,
                    m.value
                );
                if m.write {
                    cpu::wrmsr(m.msr, m.value);
                }
            }
        }
        for (k, (want, reported)) in self.sysregs.iter_mut().enumerate() {
            let Some(want) = *want else { continue };
            let v = cpu::sysreg(k as u32);
            if v == want {
                *reported = false;
            } else if !*reported {
                // Not restored (ring 3 cannot): reported once until it
                // reads right again.
                *reported = true;
                corrupt!(
                    "sysreg cpu={cpu} reg={} found={v:#x} want={want:#x}",
                    SYSREGS[k]
                );
            }
        }
        for (n, want) in self.debugregs.iter().enumerate() {
            let Some(want) = *want else { continue };
            let v = cpu::debugreg(n as u32);
            if v != want {
                corrupt!("debugreg cpu={cpu} reg=dr{n} found={v:#x} want={want:#x}");
                cpu::set_debugreg(n as u32, want);
            }
        }
        if let Some(k) = &mut self.kvmclock {
            k.check();
        }
        if let Some(p) = &self.platform {
            p.check();
        }
        for &(r, mask, want) in &self.lapic {
            let v = cpu::lapic_read(r);
            if v & mask != want {
                corrupt!("lapic cpu={cpu} reg={r:#x} found={v:#x} want={want:#x} mask={mask:#x}");
                if r != ID {
                    cpu::lapic_write(r, want);
                }
            }
        }
    }
}

/// Measure the LAPIC timer clock against the TSC (used when CPUID leaf
/// 0x40000010 is absent): count down from 2^32-1 for 10 ms.
pub fn measure_bus_khz() -> u64 {
    cpu::lapic_write(SVR, 0x100 | SPURIOUS_VECTOR);
    cpu::lapic_write(TIMER_DIV, 0xb);
    cpu::lapic_write(LVT_TIMER, MASKED | TIMER_VECTOR);
    cpu::lapic_write(TIMER_INIT, u32::MAX);
    let t0 = cpu::rdtsc();
    while cpu::rdtsc() - t0 < clock::ms(10) {
        core::hint::spin_loop();
    }
    let cur = cpu::lapic_read(TIMER_CUR);
    let t1 = cpu::rdtsc();
    cpu::lapic_write(TIMER_INIT, 0);
    (u32::MAX - cur) as u64 * clock::tsc_khz() / (t1 - t0).max(1)
}

/// Self-test helpers that break state on purpose.
pub mod sabotage {
    use super::*;

    /// Advance the memory copy of this CPU's progress counter only (as if
    /// memory came from later than the registers).
    pub fn progress(cpu: usize) {
        PROGRESS[cpu].0.fetch_add(1, Ordering::Relaxed);
    }

    /// Zero all ymm upper halves (the progress counter's register copy too).
    #[inline(never)]
    pub fn simd() {
        // SAFETY: only clears the ymm upper halves, which compiled code never uses.
        unsafe { core::arch::asm!("vzeroupper", options(nostack, nomem, preserves_flags)) };
    }

    /// Reset the x87 unit.
    pub fn x87() {
        // SAFETY: resets x87 state, which compiled code never uses.
        unsafe { core::arch::asm!("fninit", options(nostack, nomem, preserves_flags)) };
    }

    /// Default MXCSR.
    pub fn mxcsr() {
        cpu::ldmxcsr(0x1f80);
    }

    /// FS_BASE = 0.
    pub fn fs_base() {
        cpu::wrmsr(0xc000_0100, 0);
    }

    /// LSTAR = 0.
    pub fn msr() {
        cpu::wrmsr(0xc000_0082, 0);
    }

    /// CR0.WP = 0.
    pub fn sysreg() {
        cpu::clear_wp();
    }

    /// DR1 = 0.
    pub fn debugreg() {
        cpu::set_debugreg(1, 0);
    }

    /// Timer divider 16.
    pub fn lapic() {
        cpu::lapic_write(TIMER_DIV, 0x3);
    }

    /// Mask the timer.
    pub fn timer() {
        cpu::lapic_write(LVT_TIMER, MASKED | PERIODIC | TIMER_VECTOR);
    }
}

const _: () = assert!(MAX_CPUS <= 8, "LDR flat model holds 8 CPUs");
