//! migd test guest: a bare-metal x86-64 PVH guest that runs a memory and
//! CPU-state workload in ring 3 and reports on the serial console anything a
//! live migration lost or corrupted. See docs/guest.md.

#![no_std]
#![no_main]

mod boot;
mod bootinfo;
mod checks;
mod clock;
mod cpu;
mod integrity;
mod kvmclock;
mod mem;
mod platform;
mod serial;
mod workload;

use boot::{MAX_CPUS, MAX_RAM_GIB, TRAMPOLINE_ADDR};
use bootinfo::{Config, Mode, StartInfo};
use core::fmt;
use core::sync::atomic::Ordering;
use workload::{IDLE_PAGES, PAGE, Plan, STATUS};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exit codes (port 0xf4). 0 is a clean power-off.
mod exit_code {
    pub const START_INFO: u32 = 0x21;
    pub const CMDLINE: u32 = 0x22;
    pub const NO_TSC_FREQ: u32 = 0x23;
    pub const NO_MEMORY: u32 = 0x24;
    pub const AP_START: u32 = 0x25;
    pub const PANIC: u32 = 0x26;
    pub const UNEXPECTED_VECTOR: u32 = 0x60;
}

/// Print `GUEST FATAL <msg>` and exit with `code` (never returns).
pub fn fatal(code: u32, msg: fmt::Arguments) -> ! {
    let mut line = serial::Line::new();
    let _ = fmt::Write::write_fmt(&mut line, format_args!("GUEST FATAL {msg}"));
    serial::write_line_force(&line);
    cpu::exit(code)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    fatal(exit_code::PANIC, format_args!("panic: {info}"))
}

/// Referenced by the precompiled libcore (built with unwinding) in non-LTO
/// builds; never called, since this crate aborts on panic.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

const EXCEPTIONS: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
    "#26", "#27", "#HV", "#VC", "#SX", "#31",
];

/// Ring-3 side of an exception or unexpected interrupt (entered from CPL 0
/// with interrupts off, on this CPU's fatal stack).
extern "C" fn user_fatal(vector: u64, err: u64, rip: u64, cr2: u64, cpu: u64, cs: u64) -> ! {
    let (what, code) = match EXCEPTIONS.get(vector as usize) {
        Some(name) => (*name, boot::EXIT_EXCEPTION_BASE + vector as u32),
        None => ("unexpected interrupt", exit_code::UNEXPECTED_VECTOR),
    };
    fatal(
        code,
        format_args!(
            "exception vector={vector} ({what}) cpu={cpu} rip={rip:#x} cs={cs:#x} err={err:#x} cr2={cr2:#x}"
        ),
    )
}

/// First ring-3 code on every CPU (from `entry64`'s iretq).
extern "C" fn user_entry(cpu: u64) -> ! {
    let cpu = cpu as usize;
    if cpu == 0 {
        boot_cpu_main()
    }
    STATUS[cpu].started.store(true, Ordering::Release);
    workload::run(cpu)
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Bump allocator over the memmap's RAM above the image (ranges in address order).
struct Alloc {
    ram: [bootinfo::Ram; bootinfo::MAX_RAM],
    nram: usize,
    cursor: u64,
}

impl Alloc {
    fn new(si: &StartInfo) -> Alloc {
        let limit = (MAX_RAM_GIB as u64) << 30;
        let mut ram = si.ram;
        for r in ram[..si.nram].iter_mut() {
            r.end = r.end.min(limit);
        }
        ram[..si.nram].sort_unstable_by_key(|r| r.start);
        Alloc {
            ram,
            nram: si.nram,
            cursor: boot::image_end(),
        }
    }

    /// First fit at or above the cursor; returns the base address.
    fn take(&mut self, bytes: u64, align: u64) -> Option<u64> {
        let cursor = self.cursor;
        let base = self.ram[..self.nram]
            .iter()
            .map(|r| (align_up(r.start.max(cursor), align), r.end))
            .find(|&(start, end)| start + bytes <= end)?
            .0;
        self.cursor = base + bytes;
        Some(base)
    }

    /// Largest free range at or above the cursor, for error messages.
    fn largest(&self, align: u64) -> u64 {
        self.ram[..self.nram]
            .iter()
            .map(|r| {
                r.end
                    .saturating_sub(align_up(r.start.max(self.cursor), align))
            })
            .max()
            .unwrap_or(0)
    }
}

fn wait_ms(ms: u64) {
    let t0 = cpu::rdtsc();
    while cpu::rdtsc() - t0 < clock::ms(ms) {
        core::hint::spin_loop();
    }
}

fn boot_cpu_main() -> ! {
    let boot_tsc = cpu::rdtsc();
    STATUS[0].started.store(true, Ordering::Relaxed);
    let si = StartInfo::read(boot::BOOT_START_INFO.load(Ordering::Relaxed) as u64);
    let cfg = Config::parse(si.cmdline());

    // TSC frequency: CPUID timing leaf, then tsc_khz=, then the PIT.
    let leaf = clock::timing_leaf();
    let (khz, source) = if let Some((k, _)) = leaf {
        (k, clock::Source::Cpuid)
    } else if let Some(k) = cfg.tsc_khz {
        (k, clock::Source::Cmdline)
    } else if let Some(k) = clock::calibrate_pit() {
        (k, clock::Source::Pit)
    } else {
        fatal(
            exit_code::NO_TSC_FREQ,
            format_args!(
                "cannot find the TSC frequency (no CPUID 0x40000010, no tsc_khz=, no PIT)"
            ),
        )
    };
    clock::init(khz, boot_tsc);
    let bus_khz = match leaf {
        Some((_, b)) if b > 0 => b,
        _ => checks::measure_bus_khz(),
    };

    let bsp_apic = cpu::lapic_read(checks::ID) >> 24;
    // Cost of one CPL-0 service round trip (informational).
    let t0 = cpu::rdtsc();
    for _ in 0..100 {
        cpu::lapic_read(checks::ID);
    }
    let svc_us = (cpu::rdtsc() - t0) * 10 / khz;
    let cpus = bootinfo::find_cpus(&si, bsp_apic);
    let n = cpus.count;

    // Memory: generation table, then the working set (2 MiB aligned).
    let pages = match cfg.mode {
        Mode::Idle => IDLE_PAGES * n as u64,
        _ => (cfg.mib * 256).max(n as u64),
    };
    let mut alloc = Alloc::new(&si);
    let gens_bytes = align_up(pages * 4, PAGE);
    let gens_base = alloc.take(gens_bytes, PAGE);
    let ws_base = gens_base.and_then(|_| alloc.take(pages * PAGE, 2 << 20));
    let (Some(gens_base), Some(ws_base)) = (gens_base, ws_base) else {
        fatal(
            exit_code::NO_MEMORY,
            format_args!(
                "working set of {} MiB does not fit: largest free RAM range is {} MiB",
                (pages * PAGE) >> 20,
                alloc.largest(2 << 20) >> 20
            ),
        )
    };

    // `zeros=`: memory the boot CPU writes zeros to and keeps verifying.
    let zeros_pages = cfg.zeros_mib * 256;
    let zeros_base = if zeros_pages == 0 {
        0
    } else {
        alloc.take(zeros_pages * PAGE, PAGE).unwrap_or_else(|| {
            fatal(
                exit_code::NO_MEMORY,
                format_args!(
                    "zeros={} MiB do not fit beside the working set: largest free RAM range is {} MiB",
                    cfg.zeros_mib,
                    alloc.largest(PAGE) >> 20
                ),
            )
        })
    };

    // `keep=`: memory the boot CPU writes once and keeps verifying.
    let keep_pages = cfg.keep_mib * 256;
    let keep_base = if keep_pages == 0 {
        0
    } else {
        alloc.take(keep_pages * PAGE, PAGE).unwrap_or_else(|| {
            fatal(
                exit_code::NO_MEMORY,
                format_args!(
                    "keep={} MiB do not fit beside the working set: largest free RAM range is {} MiB",
                    cfg.keep_mib,
                    alloc.largest(PAGE) >> 20
                ),
            )
        })
    };

    // Pages per second per vCPU of a rate in MiB/s over all of them.
    let per_cpu = |mib: u64| {
        if mib > 0 {
            (mib.saturating_mul(256) / n as u64).max(1)
        } else {
            0
        }
    };
    let rate_pages = per_cpu(cfg.rate_mib);
    let mode = match cfg.mode {
        Mode::Idle => "idle",
        Mode::Dirty => "dirty",
        Mode::Sparse => "sparse",
    };
    println!(
        "TESTGUEST v{VERSION} cmdline=\"{}\" workload={mode} cpus={n} cpus_from={} mem_mib={} tsc_khz={khz} tsc_from={} lapic_khz={bus_khz} svc_us={svc_us}",
        si.cmdline(),
        cpus.source,
        si.ram_bytes() >> 20,
        source.name()
    );
    let (stacks, stacks_len) = boot::stacks_range();
    let progress = &checks::PROGRESS;
    let (ro, ro_len) = boot::readonly_range();
    let (pt, pt_len) = boot::page_tables_range();
    let (gdt, gdt_len) = boot::gdt_range();
    let (tss, tss_len) = boot::tss_range();
    println!(
        "TESTGUEST layout image={:#x}-{:#x} readonly={ro:#x}+{ro_len:#x} pagetables={pt:#x}+{pt_len:#x} idt={:#x}+{:#x} gdt={gdt:#x}+{gdt_len:#x} tss={tss:#x}+{tss_len:#x} user_stacks={stacks:#x}+{stacks_len:#x} progress={:#x}+{:#x} gens={gens_base:#x}+{gens_bytes:#x} workset={ws_base:#x}+{:#x} zeros={zeros_base:#x}+{:#x} keep={keep_base:#x}+{:#x} trampoline={TRAMPOLINE_ADDR:#x}",
        0x10_0000,
        boot::image_end(),
        boot::idt_addr(),
        boot::IDT_BYTES,
        progress.as_ptr() as u64,
        core::mem::size_of_val(progress),
        pages * PAGE,
        zeros_pages * PAGE,
        keep_pages * PAGE
    );
    if let Some(note) = cpus.note {
        println!("TESTGUEST note: {note}");
    }
    if cpus.ignored > 0 {
        println!(
            "TESTGUEST note: {} cpus beyond {MAX_CPUS} ignored",
            cpus.ignored
        );
    }

    workload::set_plan(Plan {
        ncpus: n,
        apic_ids: cpus.apic_ids,
        mode: cfg.mode,
        rate_pages,
        fill_pages: per_cpu(cfg.fill_mib),
        ws_base,
        ws_pages: pages,
        gens_base,
        bus_khz,
        selftest: cfg.selftest,
        runtime_s: cfg.runtime_s,
        compressible: cfg.compressible,
        hot_pct: cfg.hot_pct,
        zeros_base,
        zeros_pages,
        keep_base,
        keep_pages,
        chatty: cfg.chatty,
    });

    // Start the APs one at a time: INIT, 10 ms, SIPI, 200 us, SIPI; the
    // whole sequence is tried three times (1 s each) before giving up.
    let tramp = boot::trampoline();
    // SAFETY: 0x8000.. is free low RAM reserved for the trampoline.
    unsafe {
        core::ptr::copy_nonoverlapping(tramp.as_ptr(), TRAMPOLINE_ADDR as *mut u8, tramp.len());
    }
    let sipi = 0x4600 | (TRAMPOLINE_ADDR >> 12) as u32;
    for (i, &apic) in cpus.apic_ids.iter().enumerate().take(n).skip(1) {
        boot::AP_BOOT_INDEX.store(i as u32, Ordering::Release);
        let started = || STATUS[i].started.load(Ordering::Acquire);
        let icr = |low: u32| {
            cpu::lapic_write(0x310, apic << 24);
            cpu::lapic_write(0x300, low);
        };
        let wait_started = |ms: u64| {
            let t0 = cpu::rdtsc();
            while !started() && cpu::rdtsc() - t0 < clock::ms(ms) {
                core::hint::spin_loop();
            }
            started()
        };
        let mut ok = false;
        for _ in 0..3 {
            icr(0x4500); // INIT, assert
            wait_ms(10);
            icr(sipi);
            if !wait_started(0) {
                let t0 = cpu::rdtsc();
                while cpu::rdtsc() - t0 < clock::ms(1) / 5 {
                    core::hint::spin_loop();
                }
                if !started() {
                    icr(sipi);
                }
            }
            if wait_started(1000) {
                ok = true;
                break;
            }
        }
        if !ok {
            fatal(
                exit_code::AP_START,
                format_args!("cpu {i} (apic id {apic}) did not start"),
            );
        }
    }
    workload::run(0)
}
