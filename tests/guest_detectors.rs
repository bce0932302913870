//! Proof that the test guest's detectors fire: state is damaged through the VM
//! library (a page, an AVX register in the XSAVE area, the LAPIC timer, one
//! copy of the progress counter) or by the guest's own `selftest=`, and the
//! guest must report `WORKLOAD CORRUPT` on its console.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmm::{BootSpec, Vm, VmConfig};

/// The scratch directory that holds the console (kept as long as the caller
/// holds it; first, so that it is dropped last), the VM, its console.
fn boot(name: &str, cmdline: &str, vcpus: usize) -> (Scratch, Vm, Console) {
    let dir = scratch(name);
    let console = Console(dir.join("console.log"));
    let vm = Vm::boot(
        VmConfig {
            memory: 64 << 20,
            vcpus,
            console: Some(console.0.clone()),
        },
        &BootSpec {
            kernel: guest_elf(),
            initramfs: None,
            cmdline: cmdline.into(),
        },
    )
    .expect("boot");
    vm.resume();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    console.wait_heartbeats(0, 1, Duration::from_secs(20));
    (dir, vm, console)
}

/// A `KEY=BASE+LEN` region of the `TESTGUEST layout` line.
fn layout(console: &Console, key: &str) -> (u64, u64) {
    let line = console.wait_for("TESTGUEST layout", Duration::from_secs(30));
    let region = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in '{line}'"));
    let (base, len) = region
        .split_once('+')
        .unwrap_or_else(|| panic!("{key}={region} is not BASE+LEN"));
    let hex = |s: &str| {
        u64::from_str_radix(s.trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("{key}={region}: {e}"))
    };
    (hex(base), hex(len))
}

/// The `WORKLOAD CORRUPT progress` lines so far, as (cpu, memory, register).
fn progress_lines(console: &Console) -> Vec<(u64, u64, u64)> {
    console
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("WORKLOAD CORRUPT progress "))
        .map(|l| {
            let field = |k: &str| -> u64 {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {k} in '{l}'"))
            };
            (field("cpu="), field("memory="), field("register="))
        })
        .collect()
}

/// Waits for the first `WORKLOAD CORRUPT progress` line, then two more
/// heartbeats: the report resynchronised the two copies, so it stays the only one.
fn one_progress_line(console: &Console) -> (u64, u64, u64) {
    console.wait_for("WORKLOAD CORRUPT progress", Duration::from_secs(20));
    let hb = console.last_heartbeat().unwrap_or(0);
    console.wait_heartbeats(hb, 2, Duration::from_secs(20));
    let lines = progress_lines(console);
    assert_eq!(lines.len(), 1, "one loss, one line:\n{}", console.text());
    lines[0]
}

#[test]
fn corrupted_page_is_reported() {
    if !kvm_or_skip("corrupted_page_is_reported") {
        return;
    }
    let (_dir, vm, console) = boot("det-page", "workload=dirty:8:1", 2);
    let (base, bytes, _) = console.workset();
    vm.pause();
    // One word in the middle of a few pages spread over the working set.
    for k in 1..8u64 {
        let gpa = base + (bytes / 8) * k + 2048;
        let mut w = [0u8; 8];
        vm.ram().read(gpa, &mut w).unwrap();
        for b in w.iter_mut() {
            *b ^= 0x5a;
        }
        vm.ram().write(gpa, &w).unwrap();
    }
    vm.resume();
    let line = console.wait_for("WORKLOAD CORRUPT", Duration::from_secs(20));
    assert!(line.contains("page"), "{line}");
}

#[test]
fn a_word_in_the_zeroed_memory_is_reported() {
    if !kvm_or_skip("a_word_in_the_zeroed_memory_is_reported") {
        return;
    }
    let (_dir, vm, console) = boot("det-zeros", "workload=idle zeros=2", 1);
    let (base, len) = layout(&console, "zeros");
    assert_eq!(len, 2 << 20);
    vm.ram().write(base + len / 2 + 8, &[0x77; 8]).unwrap();
    let line = console.wait_for("WORKLOAD CORRUPT zeros", Duration::from_secs(20));
    assert!(line.contains("found=0x7777777777777777"), "{line}");
}

#[test]
fn a_word_in_the_write_once_memory_is_reported() {
    if !kvm_or_skip("a_word_in_the_write_once_memory_is_reported") {
        return;
    }
    // What a migration that dropped a page in pre-copy round 0 leaves: the
    // page is never written again, so it is never sent again.
    let (_dir, vm, console) = boot("det-keep", "workload=dirty:8:1 keep=2", 1);
    let (base, len) = layout(&console, "keep");
    assert_eq!(len, 2 << 20);
    vm.ram().write(base + len / 2 + 8, &[0x77; 8]).unwrap();
    let line = console.wait_for("WORKLOAD CORRUPT keep", Duration::from_secs(20));
    assert!(
        line.contains("page=256 ") && line.contains("word=1 "),
        "{line}"
    );
    assert!(line.contains("found=0x7777777777777777"), "{line}");
    assert!(line.contains("bad_words=1"), "{line}");
}

#[test]
fn corrupted_avx_register_is_reported() {
    if !kvm_or_skip("corrupted_avx_register_is_reported") {
        return;
    }
    let (_dir, vm, console) = boot("det-simd", "workload=idle", 1);
    vm.with_vcpu(0, |fd| {
        let mut xs = fd.get_xsave().unwrap();
        // XSAVE standard format: YMM_Hi128 (component 2) at byte 576, 16 bytes a register.
        for i in 0..4 {
            xs.region[576 / 4 + 4 * 3 + i] ^= 0xffff_ffff; // ymm3's upper half
        }
        xs.region[512 / 4] |= 1 << 2; // XSTATE_BV: AVX state present
                                      // SAFETY: a legacy XSAVE area read from this vCPU, one field changed.
        unsafe { fd.set_xsave(&xs) }.unwrap();
    })
    .unwrap();
    vm.resume();
    let line = console.wait_for("WORKLOAD CORRUPT", Duration::from_secs(20));
    assert!(line.contains("simd") || line.contains("ymm"), "{line}");
}

#[test]
fn stopped_timer_is_reported() {
    if !kvm_or_skip("stopped_timer_is_reported") {
        return;
    }
    let (_dir, vm, console) = boot("det-timer", "workload=idle", 1);
    vm.with_vcpu(0, |fd| {
        let mut lapic = fd.get_lapic().unwrap();
        lapic.regs[0x322] |= 1; // LVT timer: mask bit 16
        fd.set_lapic(&lapic).unwrap();
    })
    .unwrap();
    vm.resume();
    let line = console.wait_for("WORKLOAD CORRUPT", Duration::from_secs(20));
    assert!(line.contains("timer"), "{line}");
}

#[test]
fn memory_older_than_the_registers_is_reported() {
    if !kvm_or_skip("memory_older_than_the_registers_is_reported") {
        return;
    }
    // What a migration that loses its last dirty round leaves: the vCPU's
    // registers from the pause, its progress counter's memory copy from
    // earlier. The pages and generation table would agree with each other.
    let (_dir, vm, console) = boot("det-progress-mem", "workload=dirty:8:1", 2);
    let (base, len) = layout(&console, "progress");
    assert_eq!(len, 8 * 64, "one cache line per possible vCPU");
    vm.pause();
    let mut w = [0u8; 8];
    vm.ram().read(base, &mut w).unwrap();
    let now = u64::from_le_bytes(w);
    assert!(now > 1000, "vCPU 0 has run its loop: {now}");
    vm.ram().write(base, &(now - 1000).to_le_bytes()).unwrap();
    vm.resume();
    // (Paused between its two stores, the vCPU stores the same value to
    // ymm15 on resume as it did to memory: still 1000 apart.)
    assert_eq!(one_progress_line(&console), (0, now - 1000, now));
}

#[test]
fn registers_older_than_memory_are_reported() {
    if !kvm_or_skip("registers_older_than_memory_are_reported") {
        return;
    }
    // A stale vCPU state over current memory: ymm15's upper half (the
    // counter's register copy) goes back 1000.
    let (_dir, vm, console) = boot("det-progress-reg", "workload=idle", 1);
    let (base, _) = layout(&console, "progress");
    // A vCPU paused between its two stores would overwrite the register on
    // resume: change it only where both copies agree. One paused after it
    // read both copies and before it stores the next would overwrite the
    // change too (a few instructions; seen once in a CI run): then no line
    // comes, both copies agree again, and the change is made anew.
    let change = || {
        for _ in 0..20 {
            let changed = vm
                .with_vcpu(0, |fd| {
                    let mut w = [0u8; 8];
                    vm.ram().read(base, &mut w).unwrap();
                    let memory = u64::from_le_bytes(w);
                    let mut xs = fd.get_xsave().unwrap();
                    // XSAVE standard format: YMM_Hi128 at byte 576, 16 bytes a
                    // register; ymm15's bits 191:128 (the counter) are its first 8.
                    let at = (576 + 15 * 16) / 4;
                    let reg = xs.region[at] as u64 | (xs.region[at + 1] as u64) << 32;
                    if reg != memory {
                        return None;
                    }
                    assert!(reg > 1000, "vCPU 0 has run its loop: {reg}");
                    let back = reg - 1000;
                    xs.region[at] = back as u32;
                    xs.region[at + 1] = (back >> 32) as u32;
                    // SAFETY: a legacy XSAVE area read from this vCPU, one field changed.
                    unsafe { fd.set_xsave(&xs) }.unwrap();
                    Some(memory)
                })
                .unwrap();
            vm.resume();
            if changed.is_some() {
                return changed;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    };
    let mut memory = None;
    for _ in 0..5 {
        memory = Some(change().expect("paused 20 times between the two stores"));
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end && progress_lines(&console).is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !progress_lines(&console).is_empty() {
            break;
        }
    }
    let memory = memory.unwrap_or_default();
    assert_eq!(one_progress_line(&console), (0, memory, memory - 1000));
}

#[test]
fn progress_selftest_is_reported_by_a_sleeping_ap() {
    if !kvm_or_skip("progress_selftest_is_reported_by_a_sleeping_ap") {
        return;
    }
    // An idle AP sleeps in hlt between ticks: it compares the copies when it
    // wakes.
    let (_dir, _vm, console) = boot("det-progress-self", "workload=idle selftest=progress@1", 2);
    let (cpu, memory, register) = one_progress_line(&console);
    assert_eq!((cpu, memory), (1, register + 1), "{}", console.text());
}

#[test]
fn vzeroupper_selftest_is_reported_by_simd_and_progress() {
    if !kvm_or_skip("vzeroupper_selftest_is_reported_by_simd_and_progress") {
        return;
    }
    // ymm0-14 hold constants, ymm15 the progress counter: all 16 zeroed.
    let (_dir, _vm, console) = boot("det-simd-self", "workload=idle selftest=simd", 1);
    let simd = console.wait_for("WORKLOAD CORRUPT simd", Duration::from_secs(20));
    assert!(simd.contains("bad_regs=15"), "{simd}");
    let (cpu, _, register) = one_progress_line(&console);
    assert_eq!((cpu, register), (0, 0), "{}", console.text());
    let text = console.text();
    let progress = text
        .lines()
        .find(|l| l.starts_with("WORKLOAD CORRUPT progress"))
        .unwrap_or_default();
    assert!(
        progress.contains("register_hi=0x0000000000000000"),
        "{progress}"
    );
}

/// The `WORKLOAD CORRUPT` lines so far.
fn corrupt_lines(console: &Console) -> Vec<String> {
    console
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("WORKLOAD CORRUPT "))
        .map(str::to_string)
        .collect()
}

/// The value of `key=` in a line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in '{line}'"))
}

/// A `0x...` number (up to 128 bits).
fn hex(v: &str) -> u128 {
    let digits = v
        .strip_prefix("0x")
        .unwrap_or_else(|| panic!("{v} is not 0x..."));
    u128::from_str_radix(digits, 16).unwrap_or_else(|e| panic!("{v}: {e}"))
}

/// Boots `workload=idle` on 2 vCPUs with `selftest=<selftest>`, waits for
/// the first CORRUPT line, then two more heartbeats; returns every CORRUPT
/// line (a report repairs or re-learns what it reports, so one break gives
/// one line).
fn selftest_lines(name: &str, selftest: &str) -> (Scratch, Vm, Console, Vec<String>) {
    let (dir, vm, console) = boot(name, &format!("workload=idle selftest={selftest}"), 2);
    console.wait_for("WORKLOAD CORRUPT", Duration::from_secs(20));
    let hb = console.last_heartbeat().unwrap_or(0);
    console.wait_heartbeats(hb, 2, Duration::from_secs(20));
    let lines = corrupt_lines(&console);
    (dir, vm, console, lines)
}

#[test]
fn a_changed_byte_of_the_image_is_reported_once() {
    if !kvm_or_skip("a_changed_byte_of_the_image_is_reported_once") {
        return;
    }
    // selftest=image flips the first byte of the image (its Xen note).
    let (_dir, _vm, console, lines) = selftest_lines("det-image", "image");
    let (base, len) = layout(&console, "readonly");
    assert!(
        base == 0x10_0000 && len > 0 && len % 4096 == 0,
        "{base:#x}+{len:#x}"
    );
    assert_eq!(lines.len(), 1, "{}", console.text());
    let (found, want) = (field(&lines[0], "found"), field(&lines[0], "want"));
    assert_ne!(found, want);
    assert_eq!(
        lines[0],
        format!("image addr={base:#x} bytes=4096 found={found} want={want}")
    );
}

#[test]
fn a_changed_page_table_entry_is_reported_once() {
    if !kvm_or_skip("a_changed_page_table_entry_is_reported_once") {
        return;
    }
    // selftest=pagetables sets an ignored bit of the PDE of the first 2 MiB.
    let (_dir, _vm, console, lines) = selftest_lines("det-pt", "pagetables");
    let (base, len) = layout(&console, "pagetables");
    assert_eq!(len, (2 + 64) * 4096, "PML4, PDPT, 64 page directories");
    assert_eq!(lines.len(), 1, "{}", console.text());
    let (found, want) = (field(&lines[0], "found"), field(&lines[0], "want"));
    assert_ne!(found, want);
    assert_eq!(
        lines[0],
        format!(
            "pagetables table=pd0 addr={:#x} found={found} want={want}",
            base + 2 * 4096
        )
    );
}

#[test]
fn a_changed_idt_gate_is_reported_once_and_repaired() {
    if !kvm_or_skip("a_changed_idt_gate_is_reported_once_and_repaired") {
        return;
    }
    // selftest=idt flips bit 0 of vector 254's handler address.
    let (_dir, vm, console, lines) = selftest_lines("det-idt", "idt");
    let (idt, _) = layout(&console, "idt");
    assert_eq!(lines.len(), 1, "{}", console.text());
    let (found, want) = (field(&lines[0], "found"), field(&lines[0], "want"));
    assert_eq!(hex(found) ^ hex(want), 1, "{}", lines[0]);
    assert_eq!(
        lines[0],
        format!("idt vector=254 found={found} want={want} bad_gates=1")
    );
    let mut gate = [0u8; 16];
    vm.ram().read(idt + 254 * 16, &mut gate).unwrap();
    assert_eq!(u128::from_le_bytes(gate), hex(want), "the gate is restored");
}

#[test]
fn a_changed_gdt_entry_and_tss_are_reported_once_and_repaired() {
    if !kvm_or_skip("a_changed_gdt_entry_and_tss_are_reported_once_and_repaired") {
        return;
    }
    // selftest=gdt@1 flips bit 0 of GDT entry 1 (the boot path's 32-bit
    // code segment) and the low byte of the word at 0x58 of vCPU 1's TSS
    // (in IST7, which no gate uses).
    let (_dir, vm, console, lines) = selftest_lines("det-gdt", "gdt@1");
    let (gdt, _) = layout(&console, "gdt");
    let (tss, _) = layout(&console, "tss");
    assert_eq!(lines.len(), 2, "{}", console.text());
    let (found, want) = (field(&lines[0], "found"), field(&lines[0], "want"));
    assert_eq!(hex(found) ^ hex(want), 1, "{}", lines[0]);
    assert_eq!(
        lines[0],
        format!("gdt entry=1 found={found} want={want} mask=0xfffffeffffffffff bad_entries=1")
    );
    let (tfound, twant) = (field(&lines[1], "found"), field(&lines[1], "want"));
    assert_eq!(hex(tfound) ^ hex(twant), 0xff, "{}", lines[1]);
    assert_eq!(
        lines[1],
        format!("tss cpu=1 offset=0x58 found={tfound} want={twant} bad_words=1")
    );
    let mut w = [0u8; 8];
    vm.ram().read(gdt + 8, &mut w).unwrap();
    assert_eq!(
        u64::from_le_bytes(w) as u128,
        hex(want),
        "entry 1 is restored"
    );
    vm.ram().read(tss + 256 + 0x58, &mut w).unwrap();
    assert_eq!(
        u64::from_le_bytes(w) as u128,
        hex(twant),
        "the TSS is restored"
    );
}

/// The value vCPU `cpu` holds in register `k` (`rax`, `rbx`, ... `r15` order,
/// r13 is 12) around its `n`-th checked `hlt`.
fn halt_value(k: u64, cpu: u64, n: u64) -> u64 {
    0x52 << 56 | k << 48 | cpu << 40 | (n & 0xff_ffff_ffff)
}

#[test]
fn a_register_changed_during_hlt_is_reported() {
    if !kvm_or_skip("a_register_changed_during_hlt_is_reported") {
        return;
    }
    // selftest=regs@1: vCPU 1 halts once through a service that flips r13
    // while it sleeps.
    let (_dir, _vm, console, lines) = selftest_lines("det-regs", "regs@1");
    assert_eq!(lines.len(), 1, "{}", console.text());
    let halts: u64 = field(&lines[0], "halts").parse().unwrap();
    let want = halt_value(12, 1, halts);
    assert_eq!(
        lines[0],
        format!(
            "regs cpu=1 reg=r13 found={:#018x} want={want:#018x} bad_regs=1 halts={halts}",
            !want
        )
    );
}

#[test]
fn a_halted_vcpu_restored_with_a_wrong_register_is_reported() {
    if !kvm_or_skip("a_halted_vcpu_restored_with_a_wrong_register_is_reported") {
        return;
    }
    // What a VMM that restores a halted vCPU with a wrong register leaves:
    // vCPU 1 (idle, asleep in hlt between ticks) gets r13 with bit 0 flipped.
    let (_dir, vm, console) = boot("det-regs-vmm", "workload=idle", 2);
    let mut changed = None;
    for _ in 0..50 {
        changed = vm
            .with_vcpu(1, |fd| {
                let mut regs = fd.get_regs().unwrap();
                let cs = fd.get_sregs().unwrap().cs.selector;
                // At CPL 0 with rax = 0 (the halt service) and r13 tagged: in
                // a checked halt, before the registers are stored.
                if cs & 3 != 0 || regs.rax != 0 || regs.r13 >> 48 != 0x520c {
                    return None;
                }
                let r13 = regs.r13;
                regs.r13 ^= 1;
                fd.set_regs(&regs).unwrap();
                Some(r13)
            })
            .unwrap();
        vm.resume();
        if changed.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let r13 = changed.expect("vCPU 1 found in a checked hlt");
    let line = console.wait_for("WORKLOAD CORRUPT regs", Duration::from_secs(20));
    assert_eq!(
        line,
        format!(
            "WORKLOAD CORRUPT regs cpu=1 reg=r13 found={:#018x} want={r13:#018x} bad_regs=1 halts={}",
            r13 ^ 1,
            r13 & 0xff_ffff_ffff
        )
    );
}

#[test]
fn a_cleared_cr0_wp_is_reported_once() {
    if !kvm_or_skip("a_cleared_cr0_wp_is_reported_once") {
        return;
    }
    // selftest=sysreg@1 clears CR0.WP on vCPU 1: nothing else would notice
    // (every page is writable).
    let (_dir, _vm, console, lines) = selftest_lines("det-sysreg", "sysreg@1");
    assert_eq!(
        lines,
        ["sysreg cpu=1 reg=cr0 found=0x80000033 want=0x80010033"],
        "{}",
        console.text()
    );
}

#[test]
fn a_lost_debug_register_is_reported_once() {
    if !kvm_or_skip("a_lost_debug_register_is_reported_once") {
        return;
    }
    // selftest=debugreg@1 zeroes vCPU 1's DR1; the check writes it back.
    let (_dir, _vm, console, lines) = selftest_lines("det-debugreg", "debugreg@1");
    assert_eq!(
        lines,
        ["debugreg cpu=1 reg=dr1 found=0x0 want=0x7f5a00001010"],
        "{}",
        console.text()
    );
}

#[test]
fn a_lost_kvmclock_msr_is_reported_once() {
    if !kvm_or_skip("a_lost_kvmclock_msr_is_reported_once") {
        return;
    }
    // selftest=kvmclock@1 switches vCPU 1's kvmclock off; the check writes
    // it back, so one line.
    let (_dir, _vm, console, lines) = selftest_lines("det-kvmclock", "kvmclock@1");
    assert_eq!(lines.len(), 1, "{}", console.text());
    assert!(
        lines[0].starts_with("kvmclock cpu=1 msr=system_time found=0x0 want=0x"),
        "{}",
        console.text()
    );
    assert_eq!(
        hex(field(&lines[0], "want")) & 1,
        1,
        "enabled: {}",
        lines[0]
    );
}

#[test]
fn lost_platform_device_state_is_reported_once() {
    if !kvm_or_skip("lost_platform_device_state_is_reported_once") {
        return;
    }
    // selftest=platform puts PIT channel 2 back in mode 0 and clears the
    // UART's scratch register and the master PIC's mask; CPU 0's check sets
    // each right again, so one line each.
    let (_dir, _vm, console, lines) = selftest_lines("det-platform", "platform");
    assert_eq!(lines.len(), 3, "{}", console.text());
    assert!(
        lines[0].starts_with("uart scr=0x0 lcr=0x1b want_scr=0xa5 want_lcr=0x1b"),
        "{}",
        console.text()
    );
    assert!(
        lines[1].starts_with("pit channel=2 status=0x30 count="),
        "{}",
        console.text()
    );
    assert_eq!(lines[2], "pic imr=0x0,0xfe want=0xfb,0xfe");
}

#[test]
fn a_wrong_gdtr_restored_by_the_vmm_is_reported() {
    if !kvm_or_skip("a_wrong_gdtr_restored_by_the_vmm_is_reported") {
        return;
    }
    // A VMM that restores the GDTR's limit wrong (0xff, where the guest's
    // GDT ends at 0xaf: harmless, so only the check sees it).
    let (_dir, vm, console) = boot("det-sysreg-vmm", "workload=idle", 1);
    let (gdt, len) = layout(&console, "gdt");
    vm.with_vcpu(0, |fd| {
        let mut sregs = fd.get_sregs().unwrap();
        assert_eq!((sregs.gdt.base, sregs.gdt.limit as u64), (gdt, len - 1));
        sregs.gdt.limit = 0xff;
        fd.set_sregs(&sregs).unwrap();
    })
    .unwrap();
    vm.resume();
    let line = console.wait_for("WORKLOAD CORRUPT", Duration::from_secs(20));
    assert_eq!(
        line,
        format!(
            "WORKLOAD CORRUPT sysreg cpu=0 reg=gdtr found={:#x} want={:#x}",
            gdt << 16 | 0xff,
            gdt << 16 | (len - 1)
        )
    );
}

#[test]
fn a_plain_run_reports_nothing() {
    if !kvm_or_skip("a_plain_run_reports_nothing") {
        return;
    }
    // The workload of the self-tests above, without one: vCPU 1 sleeps in a
    // checked hlt between ticks, the boot vCPU goes over the image, page
    // tables, IDT, GDT and TSSs all the time, both read their system
    // registers once a second. The accessed and dirty bits of
    // the page tables, which the CPU sets, are cleared meanwhile: not a
    // corruption.
    let (_dir, vm, console) = boot("det-plain", "workload=idle", 2);
    let (pt, len) = layout(&console, "pagetables");
    let mut tables = vec![0u8; len as usize];
    vm.pause();
    vm.ram().read(pt, &mut tables).unwrap();
    for entry in tables.chunks_mut(8) {
        entry[0] &= !0x60;
    }
    vm.ram().write(pt, &tables).unwrap();
    vm.resume();
    console.assert_runs_on(4, Duration::from_secs(30));
    assert!(
        console.text().contains("WORKLOAD READY"),
        "{}",
        console.text()
    );
}

/// A vCPU's pending NMI survives a capture and a restore (KVM_SET_VCPU_EVENTS
/// takes it only with KVM_VCPUEVENT_VALID_NMI_PENDING, which
/// KVM_GET_VCPU_EVENTS sets, and the restore passes on as captured).
#[test]
fn a_pending_nmi_survives_capture_and_restore() {
    if !kvm_or_skip("a_pending_nmi_survives_capture_and_restore") {
        return;
    }
    let (_dir, vm, _console) = boot("state-nmi", "workload=idle", 1);
    vm.pause();
    vm.with_vcpu(0, |fd| {
        let mut ev = fd.get_vcpu_events().unwrap();
        ev.nmi.pending = 1;
        ev.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING;
        fd.set_vcpu_events(&ev).unwrap();
    })
    .unwrap();
    let state = vm.capture().unwrap();
    let events = state.vcpus[0].events;
    assert_eq!(events.nmi.pending, 1, "not captured");
    assert_ne!(
        events.flags & kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING,
        0,
        "KVM_GET_VCPU_EVENTS did not say the NMI is pending"
    );
    let ram = vmm::GuestRam::new(64 << 20).unwrap();
    let restored = Vm::restore(&state, ram, None).unwrap();
    let pending = restored
        .with_vcpu(0, |fd| fd.get_vcpu_events().unwrap().nmi.pending)
        .unwrap();
    assert_eq!(pending, 1, "the pending NMI was dropped by the restore");
}

/// An interrupt the IOAPIC holds pending at capture (a level-triggered line
/// raised, not yet delivered) reaches its LAPIC on restore: the chips are
/// restored after the LAPICs, so KVM's delivery as the IOAPIC is set is not
/// wiped by the LAPIC's own restore (or dropped by a LAPIC not yet enabled).
#[test]
fn an_interrupt_pending_in_the_ioapic_reaches_its_lapic_on_restore() {
    if !kvm_or_skip("an_interrupt_pending_in_the_ioapic_reaches_its_lapic_on_restore") {
        return;
    }
    // A pin and a vector the test guest does not use.
    const PIN: usize = 20;
    const VECTOR: u64 = 0xe3;
    let (_dir, vm, _console) = boot("state-ioapic", "workload=idle", 1);
    vm.pause();
    let mut state = vm.capture().unwrap();
    let ioapic = state
        .kernel
        .irqchips
        .iter_mut()
        .find(|c| c.chip_id == kvm_bindings::KVM_IRQCHIP_IOAPIC)
        .expect("IOAPIC captured");
    // Fixed delivery, physical destination 0 (vCPU 0), level-triggered,
    // unmasked, no remote IRR: the line is up and not yet delivered.
    // SAFETY: the chip is the IOAPIC, so the union holds its state.
    unsafe {
        let io = &mut ioapic.chip.ioapic;
        io.redirtbl[PIN].bits = VECTOR | 1 << 15;
        io.irr |= 1 << PIN;
    }
    let ram = vmm::GuestRam::new(64 << 20).unwrap();
    let restored = Vm::restore(&state, ram, None).unwrap();
    let lapic = restored.with_vcpu(0, |fd| fd.get_lapic().unwrap()).unwrap();
    // The LAPIC's IRR: eight 32-bit registers from 0x200, 16 bytes apart.
    let word = 0x200 + 0x10 * (VECTOR as usize / 32);
    let irr = u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[word + i] as u8));
    assert_ne!(
        irr & 1 << (VECTOR % 32),
        0,
        "the interrupt pending in the IOAPIC never reached vCPU 0's LAPIC"
    );
}

/// A vCPU resumed after a pause tells the guest's kvmclock that the host
/// stopped it (KVM_KVMCLOCK_CTRL: PVCLOCK_GUEST_STOPPED in the clock's
/// flags), so that a Linux guest's soft-lockup and RCU-stall watchdogs do
/// not count the pause. The test guest points each vCPU's kvmclock
/// (MSR_KVM_SYSTEM_TIME_NEW) at a structure of its own, as Linux does.
#[test]
fn a_paused_vcpu_tells_kvmclock_it_was_stopped() {
    if !kvm_or_skip("a_paused_vcpu_tells_kvmclock_it_was_stopped") {
        return;
    }
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    const PVCLOCK_GUEST_STOPPED: u8 = 1 << 1;
    // pvclock_vcpu_time_info's flags byte.
    const FLAGS: u64 = 29;
    let (_dir, vm, console) = boot("state-kvmclock", "workload=idle", 1);
    console.wait_for("WORKLOAD READY", Duration::from_secs(20));
    let msr = vm
        .with_vcpu(0, |fd| {
            let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index: MSR_KVM_SYSTEM_TIME_NEW,
                ..Default::default()
            }])
            .unwrap();
            assert_eq!(fd.get_msrs(&mut msrs).unwrap(), 1);
            msrs.as_slice()[0].data
        })
        .unwrap();
    assert_eq!(msr & 1, 1, "the guest's kvmclock is off: {msr:#x}");
    let gpa = msr & !1;
    vm.resume();
    let flags = |vm: &Vm| {
        let mut b = [0u8; 1];
        vm.ram().read(gpa + FLAGS, &mut b).unwrap();
        b[0]
    };
    let n = console.wait_heartbeats(0, 1, Duration::from_secs(20));
    vm.pause();
    vm.resume();
    console.wait_heartbeats(n, 1, Duration::from_secs(20));
    assert_ne!(
        flags(&vm) & PVCLOCK_GUEST_STOPPED,
        0,
        "the resumed vCPU's kvmclock does not say it was stopped"
    );
    console.assert_clean();
}
