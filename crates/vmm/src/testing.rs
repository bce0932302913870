//! Fakes for tests of this crate and of its users (feature `testing`).

use crate::devices::SerialSnapshot;
use crate::memory::GuestRam;
use crate::state::{Raw, VcpuState, VmKernelState, VmState, STATE_VERSION};

/// A VM state of one vCPU for `memory` bytes of RAM, as a capture gives
/// (the instruction pointer 0x1234), without a VM behind it.
pub fn state(memory: u64) -> VmState {
    VmState {
        version: STATE_VERSION,
        memory,
        kernel: VmKernelState {
            irqchips: (0..3)
                .map(|chip_id| kvm_bindings::kvm_irqchip {
                    chip_id,
                    ..Default::default()
                })
                .collect(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: vec![VcpuState {
            id: 0,
            cpuid: vec![Default::default()],
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            sregs: Default::default(),
            fpu: Raw(Default::default()),
            xcrs: Default::default(),
            xsave: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![Default::default(); 2],
            events: Default::default(),
            tsc_khz: 1000,
        }],
        serial: SerialSnapshot::default(),
    }
}

/// Runs `write` (a snapshot writer given `progress`) while another thread
/// cancels it once its first step is written; returns what `write` returned.
pub fn cancelled_after_first_step<T>(
    progress: &crate::snapshot::WriteProgress,
    write: impl FnOnce() -> T,
) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            while progress.written() == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            progress.cancel();
        });
        write()
    })
}

/// 16 MiB of RAM on huge pages, or None (said on stderr) where the host's
/// pool has none to give; any other failure panics.
pub fn huge_ram_or_skip() -> Option<GuestRam> {
    match GuestRam::with_huge_pages(16 << 20, true) {
        Ok(r) => Some(r),
        Err(e) if e.to_string().contains("cannot reserve") => {
            eprintln!("SKIP: no huge pages here ({e}); scripts/setup.sh reserves some");
            None
        }
        Err(e) => panic!("{e}"),
    }
}
