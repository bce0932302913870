//! Proof that the test guest's detectors fire: state is damaged through the VM
//! library (a page, an AVX register in the XSAVE area, the LAPIC timer) and the
//! guest must report `WORKLOAD CORRUPT` on its console.

mod common;

use std::time::Duration;

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
    // The layout line: `zeros=BASE+LEN`.
    let text = console.text();
    let layout = text
        .lines()
        .find(|l| l.starts_with("TESTGUEST layout"))
        .expect("layout line");
    let zeros = layout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("zeros="))
        .expect("zeros= in the layout line");
    let (base, len) = zeros.split_once('+').unwrap();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let (base, len) = (hex(base), hex(len));
    assert_eq!(len, 2 << 20);
    vm.ram().write(base + len / 2 + 8, &[0x77; 8]).unwrap();
    let line = console.wait_for("WORKLOAD CORRUPT zeros", Duration::from_secs(20));
    assert!(line.contains("found=0x7777777777777777"), "{line}");
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
