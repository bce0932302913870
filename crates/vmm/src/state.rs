//! Complete VM state as versioned serde types, and capture/restore through KVM.
//!
//! Restore order (known to work on kvm-pvm and hardware KVM): the clock
//! first, then per vCPU: TSC rate, CPUID, mp_state, regs, sregs (carries the
//! APIC base), FPU, XCRs, XSAVE, debug registers, LAPIC, MSRs, and vCPU
//! events; then the irqchips and PIT, and the serial port last. The MSRs
//! that make KVM touch guest memory at once (kvmclock's) wait for the
//! vCPU's first run ([`PendingMsrs`]).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cpuid;
use crate::devices::SerialSnapshot;
use crate::error::{kvm, Error, Result};

/// Version of the serialized state; bumped on any incompatible change.
pub const STATE_VERSION: u32 = 1;
/// Upper bound for a decoded state blob (guards against absurd sizes).
pub const MAX_STATE_BYTES: usize = 16 << 20;

/// A plain-old-data KVM struct without serde support, carried as its bytes.
#[derive(Clone, Copy)]
pub struct Raw<T: Copy>(pub T);

impl<T: Copy> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        // SAFETY: T is a repr(C) KVM struct of plain integers; reading its bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(&self.0 as *const T as *const u8, std::mem::size_of::<T>())
        };
        s.serialize_bytes(bytes)
    }
}

impl<'de, T: Copy> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let bytes: Vec<u8> = serde::de::Deserialize::deserialize(d)?;
        if bytes.len() != std::mem::size_of::<T>() {
            return Err(serde::de::Error::invalid_length(
                bytes.len(),
                &"the size of the KVM structure",
            ));
        }
        // SAFETY: length checked; T is plain integers, any bit pattern is valid.
        Ok(Raw(unsafe {
            std::ptr::read_unaligned(bytes.as_ptr() as *const T)
        }))
    }
}

impl<T: Copy> std::fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raw<{}>", std::any::type_name::<T>())
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC ID).
    pub id: usize,
    /// CPUID entries the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Run state (runnable, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers (and the APIC base).
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state.
    pub fpu: Raw<kvm_fpu>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// XSAVE area (x87, SSE, AVX...).
    pub xsave: kvm_xsave,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// In-kernel LAPIC registers, including its timer.
    pub lapic: kvm_lapic_state,
    /// Every saveable MSR, the MTRRs included.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM.
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz.
    pub tsc_khz: u32,
}

/// The VM-wide in-kernel devices and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmKernelState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// The complete state of a VM apart from its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// [`STATE_VERSION`] at capture.
    pub version: u32,
    /// Guest RAM size in bytes.
    pub memory: u64,
    /// In-kernel VM state.
    pub kernel: VmKernelState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The serial port.
    pub serial: SerialSnapshot,
}

impl VmState {
    /// Encodes the state (bincode, little-endian, varint).
    pub fn encode(&self) -> Result<Vec<u8>> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| Error::State(format!("encode: {e}")))
    }

    /// Decodes and validates a state blob; never allocates beyond [`MAX_STATE_BYTES`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_STATE_BYTES {
            return Err(Error::State(format!(
                "state blob of {} bytes exceeds the {} byte limit",
                bytes.len(),
                MAX_STATE_BYTES
            )));
        }
        let cfg = bincode::config::standard().with_limit::<MAX_STATE_BYTES>();
        let (state, used): (VmState, usize) = bincode::serde::decode_from_slice(bytes, cfg)
            .map_err(|e| Error::State(format!("malformed state: {e}")))?;
        if state.version != STATE_VERSION {
            return Err(Error::State(format!(
                "state format version {} is not the supported version {STATE_VERSION}",
                state.version
            )));
        }
        if used != bytes.len() {
            return Err(Error::State(format!(
                "{} trailing bytes after the state",
                bytes.len() - used
            )));
        }
        if state.vcpus.is_empty() || state.vcpus.len() > crate::MAX_VCPUS {
            return Err(Error::State(format!(
                "{} vCPUs in state",
                state.vcpus.len()
            )));
        }
        if !state.irqchips_ok() {
            return Err(Error::State(
                "state lacks the PIC/IOAPIC irqchips (master PIC, slave PIC, IOAPIC, in order)"
                    .into(),
            ));
        }
        // What KVM would refuse half way through restoring the vCPUs.
        for v in &state.vcpus {
            if v.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
                return Err(Error::State(format!(
                    "vCPU {} has {} CPUID entries (at most {})",
                    v.id,
                    v.cpuid.len(),
                    kvm_bindings::KVM_MAX_CPUID_ENTRIES
                )));
            }
            // KVM_SET_MSRS takes fewer than 256 at once.
            if v.msrs.len() >= kvm_bindings::KVM_MAX_MSR_ENTRIES {
                return Err(Error::State(format!(
                    "vCPU {} has {} MSRs (at most {})",
                    v.id,
                    v.msrs.len(),
                    kvm_bindings::KVM_MAX_MSR_ENTRIES - 1
                )));
            }
        }
        Ok(state)
    }

    /// The three in-kernel interrupt chips, each once, in capture order.
    fn irqchips_ok(&self) -> bool {
        self.kernel.irqchips.iter().map(|c| c.chip_id).eq(IRQCHIPS)
    }
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Captures the in-kernel VM devices and clock.
pub fn capture_vm(vm: &VmFd) -> Result<VmKernelState> {
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in IRQCHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    Ok(VmKernelState {
        irqchips,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Restores the kvmclock.
pub fn restore_clock(vm: &VmFd, s: &VmKernelState) -> Result<()> {
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
}

/// Restores the in-kernel interrupt chips and the PIT (created already).
///
/// After the vCPUs' LAPICs: KVM delivers at once the interrupts the IOAPIC
/// and the PICs hold pending, and a LAPIC restored later would wipe them (a
/// LAPIC not yet enabled drops them, and a pending level-triggered one then
/// waits for its device to raise the line anew).
pub fn restore_irqchips(vm: &VmFd, s: &VmKernelState) -> Result<()> {
    for chip in &s.irqchips {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))
}

/// Reads the given MSRs; returns only those KVM could read.
pub fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    if n != indices.len() {
        return Err(Error::State(format!(
            "KVM read {n} of {} MSRs (stopped at {:#x})",
            indices.len(),
            indices.get(n).copied().unwrap_or(0)
        )));
    }
    Ok(msrs.as_slice().to_vec())
}

/// Captures a vCPU's complete state. The vCPU must not be running.
pub fn capture_vcpu(
    id: usize,
    vcpu: &VcpuFd,
    cpuid: &[kvm_cpuid_entry2],
    msr_indices: &[u32],
) -> Result<VcpuState> {
    Ok(VcpuState {
        id,
        cpuid: cpuid.to_vec(),
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        fpu: Raw(vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?),
        xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs: read_msrs(vcpu, msr_indices)?,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        tsc_khz: vcpu.get_tsc_khz().unwrap_or(0),
    })
}

/// IA32_TSC_DEADLINE: armed against the TSC, so restored after IA32_TSC.
const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// `msrs` in the order they are restored: as captured (as KVM lists them,
/// IA32_TSC early), with IA32_TSC_DEADLINE last, so that a deadline is
/// armed against the restored TSC whatever order the capturing KVM listed
/// them in (QEMU restores it last too).
fn restore_order(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let (deadline, mut rest): (Vec<_>, Vec<_>) =
        msrs.iter().partition(|m| m.index == MSR_TSC_DEADLINE);
    rest.extend(deadline);
    rest
}

/// MSRs whose restore makes KVM touch the guest page they name at once:
/// kvmclock's system time (KVM reads the page in) and wall clock (KVM writes
/// it), by their old and new numbers. Where guest memory is still arriving
/// (post-copy, lazy restore) that page may be missing, and the fault it
/// takes is served only once the VM runs; and a page written while the
/// state loads no longer holds what the source sent. So a non-zero one is
/// restored as the vCPU first runs, by its own thread ([`PendingMsrs`]).
/// (Zero: disabled, or for the wall clock, no page: KVM touches nothing.)
const GUEST_PAGE_MSRS: [u32; 4] = [0x11, 0x12, 0x4b56_4d00, 0x4b56_4d01];

/// A vCPU's MSRs restored as it first runs rather than with the rest of
/// its state (see [`GUEST_PAGE_MSRS`]).
#[derive(Default)]
pub struct PendingMsrs {
    /// The entries still to write, and the failed tries so far.
    entries: std::sync::Mutex<(Vec<kvm_msr_entry>, u32)>,
    /// Entries wait (read before every run without taking the lock).
    waiting: std::sync::atomic::AtomicBool,
}

/// Tries of [`PendingMsrs::apply`] before the entries are given up: a
/// signal (a pause's kick) interrupts a write waiting for a missing page.
const PENDING_TRIES: u32 = 5;

impl PendingMsrs {
    fn new(entries: Vec<kvm_msr_entry>) -> Self {
        PendingMsrs {
            waiting: (!entries.is_empty()).into(),
            entries: std::sync::Mutex::new((entries, 0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<kvm_msr_entry>, u32)> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether entries wait to be written.
    pub fn waiting(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Writes the waiting entries into `vcpu` (on the vCPU's thread, before
    /// it runs: KVM may then fault on guest memory, as the guest would). What
    /// KVM did not take is tried again at the next call, up to
    /// [`PENDING_TRIES`] times in all; the error of each failed try. Given
    /// up, they are kept for [`PendingMsrs::overlay`]: the VM's next
    /// capture carries the guest's values on, not KVM's zeros (unless the
    /// guest wrote its own since).
    pub fn apply(&self, vcpu: &VcpuFd) -> Result<()> {
        let mut guard = self.lock();
        let (entries, tries) = &mut *guard;
        if entries.is_empty() || !self.waiting() {
            return Ok(());
        }
        let result = set_msrs_counted(vcpu, entries);
        let taken = *result.as_ref().unwrap_or(&0);
        entries.drain(..taken.min(entries.len()));
        if entries.is_empty() {
            self.waiting
                .store(false, std::sync::atomic::Ordering::Release);
            return Ok(());
        }
        *tries += 1;
        let first = entries[0].index;
        if *tries >= PENDING_TRIES {
            self.waiting
                .store(false, std::sync::atomic::Ordering::Release);
        }
        Err(match result {
            Err(e) => e,
            Ok(_) => Error::State(format!("KVM refused MSR {first:#x}")),
        })
    }

    /// Puts the values still waiting in place of what KVM reads for them
    /// (a VM captured again before it ran: KVM does not hold them yet).
    /// Given up, they stand only where KVM still reads 0: a value the guest
    /// has written since is its own.
    pub fn overlay(&self, msrs: &mut [kvm_msr_entry]) {
        let waiting = self.waiting();
        for p in self.lock().0.iter() {
            if let Some(m) = msrs.iter_mut().find(|m| m.index == p.index) {
                if waiting || m.data == 0 {
                    m.data = p.data;
                }
            }
        }
    }
}

/// KVM_SET_MSRS of `entries`: how many KVM took, in order.
fn set_msrs_counted(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<usize> {
    let msrs = Msrs::from_entries(entries).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
    vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))
}

/// KVM_SET_MSRS of `entries`, every one of them or an error naming the first refused.
fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    let n = set_msrs_counted(vcpu, entries)?;
    if n != entries.len() {
        return Err(Error::State(format!(
            "KVM accepted {n} of {} MSRs (refused {:#x})",
            entries.len(),
            entries.get(n).map(|m| m.index).unwrap_or(0)
        )));
    }
    Ok(())
}

/// Restores a vCPU's complete state into a freshly created vCPU; returns
/// the MSRs to write as it first runs ([`GUEST_PAGE_MSRS`]).
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<PendingMsrs> {
    let t = std::time::Instant::now();
    let lap =
        |what: &str| tracing::trace!(what, us = t.elapsed().as_micros() as u64, "restore_vcpu");
    vcpu.set_cpuid2(&cpuid::to_kvm(&s.cpuid)?)
        .map_err(kvm("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&s.fpu.0).map_err(kvm("KVM_SET_FPU"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    // SAFETY: a legacy 4 KiB kvm_xsave taken by KVM_GET_XSAVE on this kind of host.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    lap("before lapic");
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    lap("lapic");
    let (later, now): (Vec<_>, Vec<_>) = restore_order(&s.msrs)
        .into_iter()
        .partition(|m| m.data != 0 && GUEST_PAGE_MSRS.contains(&m.index));
    set_msrs(vcpu, &now).map_err(|e| Error::State(format!("vCPU {}: {e}", s.id)))?;
    lap("msrs");
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(PendingMsrs::new(later))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::state;

    #[test]
    fn the_tsc_deadline_is_restored_after_the_tsc() {
        let msr = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let order = |l: &[u32]| {
            let m: Vec<_> = l.iter().map(|&i| msr(i)).collect();
            restore_order(&m)
                .iter()
                .map(|m| m.index)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            order(&[0x6e0, 0x10, 0x174, 0x3b]),
            [0x10, 0x174, 0x3b, 0x6e0]
        );
        assert_eq!(order(&[0x10, 0x3b]), [0x10, 0x3b]);
    }

    #[test]
    fn decode_refuses_what_kvm_would_refuse_half_way() {
        let good = state(64 << 20);
        assert!(VmState::decode(&good.encode().unwrap()).is_ok());
        // The same chip three times, or the chips out of order.
        let mut s = state(64 << 20);
        s.kernel.irqchips.iter_mut().for_each(|c| c.chip_id = 0);
        let e = VmState::decode(&s.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("irqchips"), "{e}");
        let mut s = state(64 << 20);
        s.kernel.irqchips.swap(0, 2);
        assert!(VmState::decode(&s.encode().unwrap()).is_err());
        // More MSRs or CPUID entries than KVM takes.
        let mut s = state(64 << 20);
        s.vcpus[0].msrs = vec![Default::default(); kvm_bindings::KVM_MAX_MSR_ENTRIES];
        let e = VmState::decode(&s.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("256 MSRs (at most 255)"), "{e}");
        let mut s = state(64 << 20);
        s.vcpus[0].cpuid = vec![Default::default(); kvm_bindings::KVM_MAX_CPUID_ENTRIES + 1];
        let e = VmState::decode(&s.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("CPUID entries"), "{e}");
    }
}
