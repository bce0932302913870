//! What the VMM tells the guest: `hvm_start_info` (command line, memmap)
//! and the Intel MP table (vCPUs). Read from ring 3 through the identity map.

use crate::boot::MAX_CPUS;

/// `hvm_start_info.magic`.
const START_INFO_MAGIC: u32 = 0x336e_c578;

fn rd8(addr: u64) -> u8 {
    // SAFETY: identity-mapped guest RAM/ROM described by the VMM.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn rd16(addr: u64) -> u16 {
    u16::from_le_bytes([rd8(addr), rd8(addr + 1)])
}

fn rd32(addr: u64) -> u32 {
    u32::from_le_bytes([rd8(addr), rd8(addr + 1), rd8(addr + 2), rd8(addr + 3)])
}

fn rd64(addr: u64) -> u64 {
    rd32(addr) as u64 | (rd32(addr + 4) as u64) << 32
}

/// One RAM range from the memmap.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ram {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Maximum number of RAM ranges kept.
pub const MAX_RAM: usize = 16;
/// Longest command line kept.
pub const CMDLINE_MAX: usize = 512;

/// Parsed `hvm_start_info`.
pub struct StartInfo {
    /// RAM ranges (type 1 entries) in memmap order.
    pub ram: [Ram; MAX_RAM],
    /// Number of valid entries in `ram`.
    pub nram: usize,
    /// Command line bytes.
    pub cmdline: [u8; CMDLINE_MAX],
    /// Command line length.
    pub cmdline_len: usize,
    /// `rsdp_paddr` (0 if none).
    pub rsdp: u64,
}

impl StartInfo {
    /// Read the structure at `addr` (the boot code already checked magic and version).
    pub fn read(addr: u64) -> StartInfo {
        let mut si = StartInfo {
            ram: [Ram::default(); MAX_RAM],
            nram: 0,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            rsdp: 0,
        };
        si.rsdp = rd64(addr + 32);
        if rd32(addr) != START_INFO_MAGIC {
            crate::fatal(
                crate::exit_code::START_INFO,
                format_args!("bad hvm_start_info magic at {addr:#x}"),
            );
        }
        let cmdline = rd64(addr + 24);
        if cmdline != 0 {
            while si.cmdline_len < CMDLINE_MAX {
                let b = rd8(cmdline + si.cmdline_len as u64);
                if b == 0 {
                    break;
                }
                si.cmdline[si.cmdline_len] = b;
                si.cmdline_len += 1;
            }
        }
        let memmap = rd64(addr + 40);
        let entries = rd32(addr + 48) as u64;
        for i in 0..entries {
            let e = memmap + i * 24;
            let (start, size, kind) = (rd64(e), rd64(e + 8), rd32(e + 16));
            if kind == 1 && size != 0 && si.nram < MAX_RAM {
                si.ram[si.nram] = Ram {
                    start,
                    end: start + size,
                };
                si.nram += 1;
            }
        }
        si
    }

    /// The command line as text (non-UTF-8 bytes make it empty).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// Whether `[addr, addr + len)` lies in the guest's identity map (RAM
    /// entries rounded out to 2 MiB pages, below `MAX_RAM_GIB`).
    pub fn mapped(&self, addr: u64, len: u64) -> bool {
        const BIG: u64 = 2 << 20;
        let end = addr.saturating_add(len.max(1));
        end <= (crate::boot::MAX_RAM_GIB as u64) << 30
            && self.ram[..self.nram]
                .iter()
                .any(|r| r.start / BIG * BIG <= addr && end <= r.end.div_ceil(BIG) * BIG)
    }

    /// Total RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram[..self.nram].iter().map(|r| r.end - r.start).sum()
    }
}

/// What the workload does (`workload=`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// A small region written once and verified.
    Idle,
    /// Whole pages rewritten.
    Dirty,
    /// Only the header word of each page rewritten.
    Sparse,
}

/// Fault injected by `selftest=` to prove a detector fires.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SelfTest {
    /// Overwrite one word of a working-set page behind the generation table.
    Page,
    /// `vzeroupper`: lose the ymm upper halves.
    Simd,
    /// `fninit`: lose the x87 registers and control word.
    X87,
    /// Reset MXCSR to its default.
    Mxcsr,
    /// Zero FS_BASE.
    FsBase,
    /// Zero MSR_LSTAR.
    Msr,
    /// Change the LAPIC timer divider (timer runs 16x slower).
    Lapic,
    /// Mask the LAPIC timer.
    Timer,
    /// Move the guest clock 2 s forward on all CPUs (looks like a VMM pause).
    ClockFwd,
    /// Move the guest clock 2 s backwards on all CPUs.
    ClockBack,
    /// Move one CPU's clock 1 s ahead of the others.
    Skew,
    /// Spin forever at ring 3 without progress.
    Stall,
    /// Execute `ud2` at ring 3.
    Fault,
    /// Make CPL 0 execute `ud2` (invalid service number).
    KernelFault,
    /// Advance the memory copy of the progress counter only.
    Progress,
    /// Overwrite one word of the `keep=` memory (nothing without `keep=`).
    Keep,
    /// Flip a byte of the read-only image (its Xen note).
    Image,
    /// Set an ignored bit of a page-directory entry.
    PageTables,
    /// Flip a bit of an unused IDT gate.
    Idt,
    /// Flip a bit of an unused GDT descriptor and of an unused TSS field.
    Gdt,
    /// Halt once through a service that changes r13 while the vCPU sleeps.
    Regs,
    /// Clear CR0.WP.
    Sysreg,
    /// Switch kvmclock off (MSR_KVM_SYSTEM_TIME_NEW = 0).
    Kvmclock,
    /// Zero DR1.
    Debugreg,
    /// PIT channel 2 back to mode 0, the UART's scratch register and the
    /// master PIC's mask cleared.
    Platform,
}

impl SelfTest {
    fn parse(s: &str) -> Option<SelfTest> {
        Some(match s {
            "page" => SelfTest::Page,
            "simd" => SelfTest::Simd,
            "x87" => SelfTest::X87,
            "mxcsr" => SelfTest::Mxcsr,
            "fsbase" => SelfTest::FsBase,
            "msr" => SelfTest::Msr,
            "lapic" => SelfTest::Lapic,
            "timer" => SelfTest::Timer,
            "clockfwd" => SelfTest::ClockFwd,
            "clockback" => SelfTest::ClockBack,
            "skew" => SelfTest::Skew,
            "stall" => SelfTest::Stall,
            "fault" => SelfTest::Fault,
            "kfault" => SelfTest::KernelFault,
            "progress" => SelfTest::Progress,
            "keep" => SelfTest::Keep,
            "image" => SelfTest::Image,
            "pagetables" => SelfTest::PageTables,
            "idt" => SelfTest::Idt,
            "gdt" => SelfTest::Gdt,
            "regs" => SelfTest::Regs,
            "sysreg" => SelfTest::Sysreg,
            "kvmclock" => SelfTest::Kvmclock,
            "debugreg" => SelfTest::Debugreg,
            "platform" => SelfTest::Platform,
            _ => return None,
        })
    }
}

/// Parsed command line.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Workload kind.
    pub mode: Mode,
    /// Working set in MiB (dirty/sparse).
    pub mib: u64,
    /// Total rewrite rate in MiB/s over all vCPUs (0 = as fast as possible).
    pub rate_mib: u64,
    /// `tsc_khz=`.
    pub tsc_khz: Option<u64>,
    /// `runtime=<s>`: power off cleanly after this many seconds.
    pub runtime_s: Option<u64>,
    /// `selftest=<kind>[@cpu]`.
    pub selftest: Option<(SelfTest, usize)>,
    /// `pattern=compressible`: page bodies zstd can shrink (default `sequence`).
    pub compressible: bool,
    /// `hot=<pct>` (1..=99): that share of each slice gets half of the rewrites.
    pub hot_pct: u64,
    /// `zeros=<MiB>`: memory written with zeros at boot and verified as zeros.
    pub zeros_mib: u64,
    /// `keep=<MiB>`: memory written once at boot with a per-page pattern and
    /// verified forever.
    pub keep_mib: u64,
    /// `fill=<MiB/s>`: the first write of the working set, over all vCPUs,
    /// paced to this rate (0 = as fast as possible).
    pub fill_mib: u64,
    /// `chatty=1`: the boot CPU prints `CHATTY` lines without pause.
    pub chatty: bool,
}

fn num(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add((b - b'0') as u64)
    })
}

impl Config {
    /// Parse the space-separated `key=value` command line. Unknown keys are
    /// ignored; a malformed value of a known key is a fatal error.
    pub fn parse(cmdline: &str) -> Config {
        let mut c = Config {
            mode: Mode::Idle,
            mib: 0,
            rate_mib: 0,
            tsc_khz: None,
            runtime_s: None,
            selftest: None,
            compressible: false,
            hot_pct: 0,
            zeros_mib: 0,
            keep_mib: 0,
            fill_mib: 0,
            chatty: false,
        };
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, val)) = word.split_once('=') else {
                continue;
            };
            let bad = || -> ! {
                crate::fatal(
                    crate::exit_code::CMDLINE,
                    format_args!("bad command line value {word}"),
                )
            };
            match key {
                "workload" => {
                    let mut parts = val.split(':');
                    let kind = parts.next().unwrap_or("");
                    if kind == "idle" {
                        if parts.next().is_some() {
                            bad();
                        }
                        c.mode = Mode::Idle;
                        continue;
                    }
                    c.mode = match kind {
                        "dirty" => Mode::Dirty,
                        "sparse" => Mode::Sparse,
                        _ => bad(),
                    };
                    c.mib = parts
                        .next()
                        .and_then(num)
                        .filter(|&m| m > 0)
                        .unwrap_or_else(|| bad());
                    c.rate_mib = match parts.next() {
                        None => 0,
                        Some(r) => num(r).unwrap_or_else(|| bad()),
                    };
                    if parts.next().is_some() {
                        bad();
                    }
                }
                "tsc_khz" => c.tsc_khz = Some(num(val).filter(|&k| k > 0).unwrap_or_else(|| bad())),
                "runtime" => c.runtime_s = Some(num(val).unwrap_or_else(|| bad())),
                "pattern" => {
                    c.compressible = match val {
                        "sequence" => false,
                        "compressible" => true,
                        _ => bad(),
                    }
                }
                "hot" => {
                    c.hot_pct = num(val)
                        .filter(|p| (1..=99).contains(p))
                        .unwrap_or_else(|| bad())
                }
                "fill" => c.fill_mib = num(val).unwrap_or_else(|| bad()),
                "chatty" => {
                    c.chatty = match val {
                        "0" => false,
                        "1" => true,
                        _ => bad(),
                    }
                }
                "zeros" => {
                    c.zeros_mib = num(val).filter(|&m| m <= 1 << 20).unwrap_or_else(|| bad())
                }
                "keep" => c.keep_mib = num(val).filter(|&m| m <= 1 << 20).unwrap_or_else(|| bad()),
                "selftest" => {
                    let (kind, cpu) = match val.split_once('@') {
                        Some((k, n)) => (k, num(n).unwrap_or_else(|| bad()) as usize),
                        None => (val, 0),
                    };
                    c.selftest = Some((SelfTest::parse(kind).unwrap_or_else(|| bad()), cpu));
                }
                _ => {}
            }
        }
        c
    }
}

/// vCPUs found in the MP table (or, if it lists fewer, the ACPI MADT).
pub struct Cpus {
    /// LAPIC IDs; index 0 is the boot processor.
    pub apic_ids: [u32; MAX_CPUS],
    /// How many.
    pub count: usize,
    /// Processor entries beyond `MAX_CPUS` that were ignored.
    pub ignored: usize,
    /// Where the list came from.
    pub source: &'static str,
    /// Problems worth a note on the console.
    pub note: Option<&'static str>,
}

impl Cpus {
    fn new(bsp_apic_id: u32, source: &'static str) -> Cpus {
        let mut apic_ids = [0; MAX_CPUS];
        apic_ids[0] = bsp_apic_id;
        Cpus {
            apic_ids,
            count: 1,
            ignored: 0,
            source,
            note: None,
        }
    }

    fn add(&mut self, id: u32) {
        if id == self.apic_ids[0] {
            return;
        }
        if self.count < MAX_CPUS {
            self.apic_ids[self.count] = id;
            self.count += 1;
        } else {
            self.ignored += 1;
        }
    }
}

fn checksum(addr: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd8(addr + i)))
}

/// Enabled processors from the Intel MP table, whose floating pointer must
/// be in 0xF0000..0x100000 (boot processor first). `None` without a table.
fn mp_table(bsp_apic_id: u32) -> Option<Cpus> {
    let mut cpus = Cpus::new(bsp_apic_id, "mptable");
    let fp = (0xf_0000u64..0x10_0000).step_by(16).find(|&a| {
        rd32(a) == u32::from_le_bytes(*b"_MP_") && rd8(a + 8) == 1 && checksum(a, 16) == 0
    })?;
    let table = rd32(fp + 4) as u64;
    if table == 0 || table >= 0x10_0000 || rd32(table) != u32::from_le_bytes(*b"PCMP") {
        return None;
    }
    let len = rd16(table + 4) as u64;
    if checksum(table, len) != 0 {
        cpus.note = Some("MP config table checksum is wrong (table used anyway)");
    }
    let entries = rd16(table + 34);
    let mut p = table + 44;
    for _ in 0..entries {
        if p >= table + len {
            break;
        }
        if rd8(p) == 0 {
            if rd8(p + 3) & 1 != 0 {
                cpus.add(rd8(p + 1) as u32);
            }
            p += 20;
        } else {
            p += 8;
        }
    }
    Some(cpus)
}

/// Enabled processors from the ACPI MADT (only tables inside mapped RAM
/// are read). QEMU's SeaBIOS lists one MP-table entry per socket, so this
/// is what finds all of `-smp N` there.
fn madt(si: &StartInfo, bsp_apic_id: u32) -> Option<Cpus> {
    let rsdp = if si.rsdp != 0 {
        si.rsdp
    } else {
        (0xe_0000u64..0x10_0000)
            .step_by(16)
            .find(|&a| rd64(a) == u64::from_le_bytes(*b"RSD PTR ") && checksum(a, 20) == 0)?
    };
    let (list, entry) = match rd8(rsdp + 15) {
        0 => (rd32(rsdp + 16) as u64, 4),
        _ => (rd64(rsdp + 24), 8),
    };
    if !si.mapped(list, 36) {
        return None;
    }
    let len = rd32(list + 4) as u64;
    let madt = (36..len)
        .step_by(entry as usize)
        .map(|off| {
            if entry == 4 {
                rd32(list + off) as u64
            } else {
                rd64(list + off)
            }
        })
        .find(|&t| si.mapped(t, 44) && rd32(t) == u32::from_le_bytes(*b"APIC"))?;
    let len = rd32(madt + 4) as u64;
    if !si.mapped(madt, len) {
        return None;
    }
    let mut cpus = Cpus::new(bsp_apic_id, "acpi-madt");
    let mut p = madt + 44;
    while p + 2 <= madt + len {
        let (kind, elen) = (rd8(p), rd8(p + 1) as u64);
        if elen < 2 {
            break;
        }
        if kind == 0 && rd32(p + 4) & 1 != 0 {
            cpus.add(rd8(p + 3) as u32);
        }
        p += elen;
    }
    Some(cpus)
}

/// The vCPUs: the MP table's, or the ACPI MADT's if that lists more.
/// Without either: one CPU.
pub fn find_cpus(si: &StartInfo, bsp_apic_id: u32) -> Cpus {
    let mp = mp_table(bsp_apic_id);
    let acpi = madt(si, bsp_apic_id);
    match (mp, acpi) {
        (Some(mp), Some(acpi)) if acpi.count > mp.count => acpi,
        (Some(mp), _) => mp,
        (None, Some(acpi)) => acpi,
        (None, None) => {
            let mut c = Cpus::new(bsp_apic_id, "none");
            c.note = Some("no MP table (0xf0000-0xfffff) and no ACPI MADT: using 1 cpu");
            c
        }
    }
}
