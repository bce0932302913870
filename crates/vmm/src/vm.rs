//! One VM: KVM VM fd, guest RAM, vCPU threads, devices; boot, pause, resume,
//! capture and restore.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, kvm_regs, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootEntry, BootSpec};
use crate::cpuid;
use crate::devices::{Devices, SERIAL_IRQ};
use crate::error::{kvm, Error, Result};
use crate::memory::GuestRam;
use crate::state::{self, VmState, STATE_VERSION};
use crate::vcpu::{self, RunControl, VmExit};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: usize = 8;
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// MTRR MSRs, which KVM's saveable list omits: default type, variable and fixed ranges.
const MTRR_MSRS: &[u32] = &[
    0x2ff, 0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, 0x208, 0x209, 0x20a, 0x20b,
    0x20c, 0x20d, 0x20e, 0x20f, 0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d,
    0x26e, 0x26f,
];

/// What a VM is made of.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// File the serial console is appended to.
    pub console: Option<PathBuf>,
}

/// A KVM virtual machine owned by this process.
pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    cpuids: Vec<Vec<kvm_cpuid_entry2>>,
    msr_indices: Vec<u32>,
    /// Per vCPU, the MSRs a loaded state leaves for its first run.
    pending_msrs: Vec<Arc<crate::state::PendingMsrs>>,
    devices: Arc<Mutex<Devices>>,
    control: Arc<RunControl>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// KVM's manual dirty-log protection is on (see [`Vm::enable_clear_before_send`]).
    manual_clear: std::sync::atomic::AtomicBool,
    /// Entries per vCPU dirty ring, when the VM tracks dirty pages with
    /// rings ([`crate::dirty_ring`]); 0: the bitmap log.
    ring_entries: u32,
    /// The vCPUs' dirty rings, once the vCPUs exist.
    rings: Option<Arc<crate::dirty_ring::Rings>>,
    /// Dirty logging is on ([`Vm::set_dirty_logging`]).
    dirty_logging: std::sync::atomic::AtomicBool,
}

/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`
/// (kvm-ioctls has no wrapper for it).
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<kvm_bindings::kvm_clear_dirty_log>() as libc::c_ulong) << 16)
    | (0xae << 8)
    | 0xc0;

/// Checks that captured state fits a VM of `memory` bytes.
fn check_state(state: &VmState, memory: u64) -> Result<()> {
    if state.version != STATE_VERSION {
        return Err(Error::State(format!(
            "state version {} is not {STATE_VERSION}",
            state.version
        )));
    }
    check_vcpus(state.vcpus.len())?;
    if memory != state.memory {
        return Err(Error::State(format!(
            "state is for {} bytes of RAM, got {memory}",
            state.memory
        )));
    }
    if let Some((i, s)) = state.vcpus.iter().enumerate().find(|(i, s)| s.id != *i) {
        return Err(Error::State(format!("vCPU {i} carries id {}", s.id)));
    }
    Ok(())
}

/// A VM built by [`Vm::prepare`], waiting for its state.
pub struct PreparedVm {
    vm: Vm,
    irq: EventFd,
}

impl PreparedVm {
    /// Guest RAM (to fill before loading the state).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.vm.ram
    }

    /// Loads captured state; the VM is paused until [`Vm::resume`].
    pub fn load(self, state: &VmState) -> Result<Vm> {
        let PreparedVm { mut vm, irq } = self;
        check_state(state, vm.ram.size())?;
        if state.vcpus.len() != vm.vcpus.len() {
            return Err(Error::State(format!(
                "state has {} vCPUs, the VM was prepared with {}",
                state.vcpus.len(),
                vm.vcpus.len()
            )));
        }
        let t = std::time::Instant::now();
        state::restore_clock(&vm.vm_fd, &state.kernel)?;
        for (fd, s) in vm.vcpus.iter().zip(&state.vcpus) {
            let fd = fd.lock().unwrap_or_else(|p| p.into_inner());
            if s.tsc_khz != 0 {
                // Unsupported (as on kvm-pvm) is fine where the TSC already
                // runs at the source's rate (the same host, or the same model).
                if let Err(e) = fd.set_tsc_khz(s.tsc_khz) {
                    let here = fd.get_tsc_khz().unwrap_or(0);
                    if (here as f64 - s.tsc_khz as f64).abs() > s.tsc_khz as f64 * 250e-6 {
                        tracing::warn!(
                            source_khz = s.tsc_khz,
                            here_khz = here,
                            "the guest's TSC runs at this host's rate, not the source's \
                             (KVM_SET_TSC_KHZ: {e}): its clock will drift"
                        );
                    }
                }
            }
            let pending = state::restore_vcpu(&fd, s)?;
            vm.pending_msrs.push(Arc::new(pending));
            vm.cpuids.push(s.cpuid.clone());
        }
        let vcpus_us = t.elapsed().as_micros();
        state::restore_irqchips(&vm.vm_fd, &state.kernel)?;
        // After the interrupt chips and the LAPICs: the serial port raises
        // again the interrupt it had pending, which restoring them would wipe.
        let devices = Devices::restore(
            irq.try_clone().map_err(crate::error::io("eventfd"))?,
            vm.config.console.as_deref(),
            &state.serial,
        )?;
        *vm.devices.lock().unwrap_or_else(|p| p.into_inner()) = devices;
        vm.msr_indices = state.vcpus[0].msrs.iter().map(|m| m.index).collect();
        let devices_us = t.elapsed().as_micros() - vcpus_us;
        vm.spawn_threads()?;
        tracing::debug!(
            vcpus_us,
            devices_us,
            threads_us = t.elapsed().as_micros() - vcpus_us - devices_us,
            "state loaded"
        );
        Ok(vm)
    }
}

fn check_vcpus(n: usize) -> Result<()> {
    if n == 0 || n > MAX_VCPUS {
        return Err(Error::VcpuCount(n));
    }
    Ok(())
}

impl Vm {
    /// Creates a VM and loads the guest; vCPUs exist but are paused.
    pub fn boot(config: VmConfig, spec: &BootSpec) -> Result<Self> {
        check_vcpus(config.vcpus)?;
        let ram = GuestRam::new(config.memory)?;
        let entry = boot::load(&ram, spec, config.vcpus)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(crate::error::io("eventfd"))?;
        let devices = Devices::new(
            irq.try_clone().map_err(crate::error::io("eventfd"))?,
            config.console.as_deref(),
        )?;
        let mut vm = Self::create(config, ram, devices, &irq)?;
        let base = cpuid::supported(&vm.kvm)?;
        for id in 0..vm.config.vcpus {
            let fd = vm
                .vm_fd
                .create_vcpu(id as u64)
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
            let entries = cpuid::for_vcpu(&base, id, vm.config.vcpus, tsc_khz);
            fd.set_cpuid2(&cpuid::to_kvm(&entries)?)
                .map_err(kvm("KVM_SET_CPUID2"))?;
            init_fpu_and_lint(&fd)?;
            if id == 0 {
                set_entry_registers(&fd, entry)?;
            }
            vm.vcpus.push(Arc::new(Mutex::new(fd)));
            vm.cpuids.push(entries);
        }
        vm.msr_indices = vm.probe_msrs()?;
        vm.spawn_threads()?;
        Ok(vm)
    }

    /// Recreates a VM from captured state over `ram` (which already holds the
    /// guest's memory); vCPUs are paused until [`Vm::resume`].
    pub fn restore(state: &VmState, ram: GuestRam, console: Option<&Path>) -> Result<Self> {
        check_state(state, ram.size())?;
        Self::prepare(ram, state.vcpus.len(), console)?.load(state)
    }

    /// Builds everything a restore needs that does not depend on the state (KVM
    /// VM, irqchip, PIT, memory slots, vCPUs), so that a migration destination
    /// can do it before the source pauses; [`PreparedVm::load`] finishes it.
    pub fn prepare(ram: GuestRam, vcpus: usize, console: Option<&Path>) -> Result<PreparedVm> {
        check_vcpus(vcpus)?;
        let config = VmConfig {
            memory: ram.size(),
            vcpus,
            console: console.map(Path::to_path_buf),
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(crate::error::io("eventfd"))?;
        let devices = Devices::new(
            irq.try_clone().map_err(crate::error::io("eventfd"))?,
            console,
        )?;
        let mut vm = Self::create(config, ram, devices, &irq)?;
        for id in 0..vcpus {
            let fd = vm
                .vm_fd
                .create_vcpu(id as u64)
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            vm.vcpus.push(Arc::new(Mutex::new(fd)));
        }
        Ok(PreparedVm { vm, irq })
    }

    /// The VM fd, irqchip, PIT, memory slots and serial interrupt; no vCPUs yet.
    fn create(config: VmConfig, ram: GuestRam, devices: Devices, irq: &EventFd) -> Result<Self> {
        let kvm_fd = Kvm::new().map_err(Error::KvmUnavailable)?;
        let vm_fd = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(TSS_ADDRESS)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let ring_entries = crate::dirty_ring::entries();
        if ring_entries > 0 {
            crate::dirty_ring::enable(&vm_fd, ring_entries)?;
        }
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm("KVM_CREATE_PIT2"))?;
        for (slot, (range, host)) in ram.host_ranges().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: range.guest_addr,
                memory_size: range.len,
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping lives as long as `ram`, which the Vm owns and
            // drops only after the VM fd.
            unsafe { vm_fd.set_user_memory_region(region) }
                .map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm_fd
            .register_irqfd(irq, SERIAL_IRQ)
            .map_err(kvm("KVM_IRQFD"))?;
        let n = config.vcpus;
        Ok(Vm {
            config,
            kvm: kvm_fd,
            vm_fd: Arc::new(vm_fd),
            ram: Arc::new(ram),
            vcpus: Vec::with_capacity(n),
            cpuids: Vec::with_capacity(n),
            msr_indices: Vec::new(),
            pending_msrs: Vec::new(),
            devices: Arc::new(Mutex::new(devices)),
            control: RunControl::new(n),
            threads: Mutex::new(Vec::new()),
            manual_clear: Default::default(),
            ring_entries,
            rings: None,
            dirty_logging: Default::default(),
        })
    }

    /// The MSRs to carry: KVM's saveable list plus the MTRRs, keeping only those
    /// this host's KVM can actually read.
    fn probe_msrs(&self) -> Result<Vec<u32>> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
        let mut candidates: Vec<u32> = list.as_slice().to_vec();
        for m in MTRR_MSRS {
            if !candidates.contains(m) {
                candidates.push(*m);
            }
        }
        let vcpu = self.vcpus[0].lock().unwrap_or_else(|p| p.into_inner());
        Ok(candidates
            .into_iter()
            .filter(|&m| state::read_msrs(&vcpu, &[m]).is_ok())
            .collect())
    }

    fn spawn_threads(&mut self) -> Result<()> {
        if self.ring_entries > 0 {
            self.rings = Some(Arc::new(crate::dirty_ring::Rings::map(
                self.vm_fd.clone(),
                &self.vcpus,
                &self.ram,
                self.ring_entries,
            )?));
        }
        let threads = self.threads.get_mut().unwrap_or_else(|p| p.into_inner());
        for (id, fd) in self.vcpus.iter().enumerate() {
            threads.push(vcpu::spawn(
                id,
                fd.clone(),
                self.control.clone(),
                self.devices.clone(),
                self.rings.clone(),
                self.pending_msrs.get(id).cloned(),
            )?);
        }
        // Threads start parked; wait until all of them are.
        self.control.pause();
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM fd (dirty log, memory slots).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// The CPUID entries vCPU `id` was given (empty if no such vCPU).
    pub fn cpuid(&self, id: usize) -> Vec<kvm_cpuid_entry2> {
        self.cpuids.get(id).cloned().unwrap_or_default()
    }

    /// The MSRs carried in captured state.
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// Turns KVM dirty-page logging on or off for all of RAM.
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        for (slot, (range, host)) in self.ram.host_ranges().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: range.guest_addr,
                memory_size: range.len,
                userspace_addr: host as u64,
            };
            // SAFETY: the same mapping as registered at creation, only the flags change.
            unsafe { self.vm_fd.set_user_memory_region(region) }
                .map_err(kvm("KVM_SET_USER_MEMORY_REGION (dirty log)"))?;
        }
        self.dirty_logging
            .store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Write-protects all of RAM again for the dirty log, as turning it on
    /// does: after a dirty ring overflowed, a page whose entry was lost is
    /// writable with no entry to write-protect it again, and would go
    /// unlogged for good. Nothing while the log is off (turning it on
    /// write-protects everything).
    fn rearm_dirty_log(&self) -> Result<()> {
        if !self
            .dirty_logging
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        self.set_dirty_logging(false)?;
        self.set_dirty_logging(true)
    }

    /// Turns on KVM's manual dirty-log protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`)
    /// where the host has it and every RAM range starts on a 64-page boundary;
    /// true when it is on. Then [`Vm::peek_dirty_bitmap`] reads the log without
    /// clearing it, and a sender clears each word of pages with
    /// [`Vm::clear_dirty_word`] right before it reads them: a page the guest
    /// wrote between the read of the log and its sending goes once, with what
    /// was written, instead of again in the next round. [`Vm::take_dirty_bitmap`]
    /// keeps its meaning either way. Call before turning the dirty log on.
    pub fn enable_clear_before_send(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.manual_clear.load(Ordering::Relaxed) {
            return true;
        }
        if self.ring_entries > 0 {
            // A ring is read without clearing and cleared by page as well
            // (`dirty_ring::Rings::clear`).
            return true;
        }
        const CAP: u32 = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
        const ENABLE: u64 = kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64;
        let aligned = self
            .ram
            .ranges()
            .iter()
            .all(|r| (r.file_offset / crate::memory::PAGE_SIZE).is_multiple_of(64));
        let has = self.vm_fd.check_extension_raw(CAP.into()) as u64 & ENABLE != 0;
        if !aligned || !has {
            return false;
        }
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: CAP,
            ..Default::default()
        };
        cap.args[0] = ENABLE;
        match self.vm_fd.enable_cap(&cap) {
            Ok(()) => {
                self.manual_clear.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!("manual dirty-log protection: {e}; the log is cleared as read");
                false
            }
        }
    }

    /// Clears (and write-protects again) the pages of `mask` in word `word` of
    /// the dirty bitmap (pages `64 * word ..`), with manual protection on.
    pub fn clear_dirty_word(&self, word: usize, mask: u64) -> Result<()> {
        if let Some(rings) = &self.rings {
            return rings.clear(word, &[mask]);
        }
        let pfn = word as u64 * 64;
        for (slot, r) in self.ram.ranges().iter().enumerate() {
            let first = r.file_offset / crate::memory::PAGE_SIZE;
            let pages = r.len / crate::memory::PAGE_SIZE;
            if pfn < first || pfn >= first + pages {
                continue;
            }
            let rel = pfn - first;
            let num = (pages - rel).min(64);
            let bits = if num < 64 {
                mask & ((1 << num) - 1)
            } else {
                mask
            };
            return self.clear_dirty(slot as u32, rel, num as u32, &[bits]);
        }
        Ok(())
    }

    /// With manual protection on: clears the log's bits of every page in `set`
    /// (one bit per page, indexed as [`Vm::take_dirty_bitmap`] gives them), one
    /// call per RAM range, so that what the guest writes to them from now on
    /// is logged again.
    pub fn clear_dirty_pages(&self, set: &[u64]) -> Result<()> {
        if let Some(rings) = &self.rings {
            return rings.clear(0, set);
        }
        for (slot, r) in self.ram.ranges().iter().enumerate() {
            let first = r.file_offset / crate::memory::PAGE_SIZE;
            let pages = r.len / crate::memory::PAGE_SIZE;
            if !first.is_multiple_of(64) {
                continue; // manual protection is never on for such ranges
            }
            // The kernel reads one bit per page of the range: exactly that many words.
            let mut words: Vec<u64> = (0..pages.div_ceil(64))
                .map(|i| set.get((first / 64 + i) as usize).copied().unwrap_or(0))
                .collect();
            if let (Some(last), tail @ 1..) = (words.last_mut(), pages % 64) {
                *last &= (1 << tail) - 1;
            }
            if words.iter().any(|&w| w != 0) {
                self.clear_dirty(slot as u32, 0, pages as u32, &words)?;
            }
        }
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG` of `num` pages of `slot` from page `first`,
    /// those set in `bits`.
    fn clear_dirty(&self, slot: u32, first: u64, num: u32, bits: &[u64]) -> Result<()> {
        let mut arg = kvm_bindings::kvm_clear_dirty_log {
            slot,
            num_pages: num,
            first_page: first,
            ..Default::default()
        };
        // The kernel only reads the bitmap.
        arg.__bindgen_anon_1.dirty_bitmap = bits.as_ptr().cast_mut().cast();
        // SAFETY: a live VM fd; `arg` points at `bits`, which covers `num` pages
        // and outlives the call.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&*self.vm_fd),
                KVM_CLEAR_DIRTY_LOG,
                &arg,
            )
        };
        if rc < 0 {
            return Err(kvm("KVM_CLEAR_DIRTY_LOG")(kvm_ioctls::Error::last()));
        }
        Ok(())
    }

    /// Fetches and clears the dirty bitmap of every RAM range: one bit per page,
    /// indexed by memfd page number (`file_offset / 4096`).
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>> {
        self.dirty_bitmap(true)
    }

    /// With manual protection on ([`Vm::enable_clear_before_send`]): the dirty
    /// bitmap as [`Vm::take_dirty_bitmap`] gives it, left set in KVM.
    pub fn peek_dirty_bitmap(&self) -> Result<Vec<u64>> {
        self.dirty_bitmap(false)
    }

    fn dirty_bitmap(&self, clear: bool) -> Result<Vec<u64>> {
        if let Some(rings) = &self.rings {
            return rings.read(clear, || self.rearm_dirty_log());
        }
        let manual = self.manual_clear.load(std::sync::atomic::Ordering::Relaxed);
        let pages = (self.ram.size() / crate::memory::PAGE_SIZE) as usize;
        let mut out = vec![0u64; pages.div_ceil(64)];
        for (slot, r) in self.ram.ranges().iter().enumerate() {
            let bits = self
                .vm_fd
                .get_dirty_log(slot as u32, r.len as usize)
                .map_err(kvm("KVM_GET_DIRTY_LOG"))?;
            let slot_pages = r.len / crate::memory::PAGE_SIZE;
            if manual && clear && bits.iter().any(|&w| w != 0) {
                self.clear_dirty(slot as u32, 0, slot_pages as u32, &bits)?;
            }
            let first = (r.file_offset / crate::memory::PAGE_SIZE) as usize;
            if first.is_multiple_of(64) {
                for (i, w) in bits.iter().enumerate() {
                    if let Some(o) = out.get_mut(first / 64 + i) {
                        *o |= *w;
                    }
                }
            } else {
                for (i, w) in bits.iter().enumerate() {
                    let mut w = *w;
                    while w != 0 {
                        let b = w.trailing_zeros() as usize;
                        w &= w - 1;
                        let pfn = first + i * 64 + b;
                        if let Some(o) = out.get_mut(pfn / 64) {
                            *o |= 1 << (pfn % 64);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// How the VM tracks dirty pages: None for the bitmap log, or what its
    /// dirty rings have done.
    pub fn dirty_ring_stats(&self) -> Option<crate::dirty_ring::RingStats> {
        self.rings.as_ref().map(|r| r.stats())
    }

    /// Runs (or resumes) all vCPUs.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Pauses all vCPUs; returns how long it took until every vCPU had stopped.
    pub fn pause(&self) -> Duration {
        self.control.pause()
    }

    /// True while the vCPUs are wanted running.
    pub fn is_running(&self) -> bool {
        self.control.is_running()
    }

    /// Waits for the VM to end (power-off, fatal error, stop), up to `timeout`.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<VmExit> {
        self.control.wait_exit(timeout)
    }

    /// Captures the complete state. Pauses the VM first if it is running (and
    /// leaves it paused).
    pub fn capture(&self) -> Result<VmState> {
        self.pause();
        let kernel = state::capture_vm(&self.vm_fd)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (id, fd) in self.vcpus.iter().enumerate() {
            let fd = fd.lock().unwrap_or_else(|p| p.into_inner());
            let mut vcpu = state::capture_vcpu(id, &fd, &self.cpuids[id], &self.msr_indices)?;
            if let Some(p) = self.pending_msrs.get(id) {
                p.overlay(&mut vcpu.msrs);
            }
            vcpus.push(vcpu);
        }
        let serial = self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .serial_state();
        Ok(VmState {
            version: STATE_VERSION,
            memory: self.ram.size(),
            kernel,
            vcpus,
            serial,
        })
    }

    /// A handle to wait for the VM's end or stop it from another thread.
    pub fn exit_watch(&self) -> Arc<RunControl> {
        self.control.clone()
    }

    /// Runs a closure on one vCPU's fd while the VM is paused (tests, debugging).
    pub fn with_vcpu<T>(&self, id: usize, f: impl FnOnce(&VcpuFd) -> T) -> Result<T> {
        self.pause();
        let fd = self.vcpus.get(id).ok_or(Error::Vcpu {
            id,
            reason: "no such vCPU".into(),
        })?;
        let fd = fd.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&fd))
    }

    /// Stops the VM for good and joins its vCPU threads.
    pub fn shutdown(&self, exit: VmExit) {
        self.control.terminate(exit);
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown(VmExit::Stopped);
    }
}

/// x87 control word and MXCSR at their reset values; LAPIC LINT0 = ExtINT,
/// LINT1 = NMI (what firmware sets up for the legacy PIC).
fn init_fpu_and_lint(fd: &VcpuFd) -> Result<()> {
    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    let mut lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let set = |regs: &mut [libc::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as libc::c_char;
        }
    };
    set(&mut lapic.regs, 0x350, 0x7); // LVT LINT0: ExtINT
    set(&mut lapic.regs, 0x360, 0x4); // LVT LINT1: NMI
    fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts vCPU 0 at the guest's entry point in the mode its boot protocol wants.
fn set_entry_registers(fd: &VcpuFd, entry: BootEntry) -> Result<()> {
    let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            flat_segments(&mut sregs, false);
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
            regs.rsp = boot::PVH_INFO_START;
        }
        BootEntry::Linux64 { entry, boot_params } => {
            flat_segments(&mut sregs, true);
            sregs.gdt.base = boot::BOOT_GDT_START;
            sregs.gdt.limit = 31;
            sregs.cr3 = boot::BOOT_PML4_START;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer = 0x500; // LME | LMA
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = 0x8ff0;
        }
    }
    fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// Flat code (selector 0x10; 64-bit when `long`) and data (0x18) segments in
/// every segment register, and a busy TSS, as both boot protocols expect.
fn flat_segments(sregs: &mut kvm_sregs, long: bool) {
    let data = segment(0x18, 0x3, false);
    sregs.cs = segment(0x10, 0xb, long);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
}

/// Tests: puts a vCPU at 0x1000 in flat 32-bit protected mode, paging off.
#[cfg(test)]
fn enter_flat_at_0x1000(fd: &VcpuFd) {
    let mut sregs = fd.get_sregs().unwrap();
    flat_segments(&mut sregs, false);
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    fd.set_sregs(&sregs).unwrap();
    fd.set_regs(&kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
}

#[cfg(test)]
mod dirty_ring_tests {
    //! The dirty ring against this host's KVM, with a flat 32-bit guest on
    //! 256-entry rings: a host that does not stop a vCPU before its ring is
    //! full (kvm-pvm) overflows it at once.
    use super::*;
    use std::time::{Duration, Instant};

    /// The guest writes page `p` at `BASE + p * 4096`.
    const BASE: u64 = 0x10_0000;
    /// Between its passes the guest waits for the test here (a byte, or a
    /// count).
    const GO: u64 = 0x5000;
    /// Where the guest counts what it has done.
    const DONE: u64 = 0x5004;

    /// As the other KVM tests: a skip without /dev/kvm, but not in CI.
    fn kvm_usable(test: &str) -> bool {
        match Kvm::new() {
            Ok(_) => true,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIP {test}: /dev/kvm is not usable here: {e}");
                false
            }
            Err(e) => panic!("/dev/kvm is not usable, and CI=true requires it: {e}"),
        }
    }

    /// Code that writes `byte` to each of pages `0..n` (n at least 1).
    fn pass(n: u32, byte: u8) -> Vec<u8> {
        let mut c = vec![0xbf, 0x00, 0x00, 0x10, 0x00]; // mov edi, BASE
        c.push(0xb9); // mov ecx, n
        c.extend_from_slice(&n.max(1).to_le_bytes());
        #[rustfmt::skip]
        c.extend_from_slice(&[
            0xc6, 0x07, byte,                   // 1: mov byte [edi], byte
            0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add edi, 4096
            0x49,                               // dec ecx
            0x75, 0xf4,                         // jnz 1b
        ]);
        c
    }

    /// A guest of `memory` bytes with 256-entry rings running `code` (flat
    /// 32-bit, at 0x1000); paused, dirty logging on, the log read once.
    fn guest(memory: u64, code: &[u8]) -> Vm {
        let ram = GuestRam::with_huge_pages(memory, false).unwrap();
        ram.write(0x1000, code).unwrap();
        let prepared = crate::dirty_ring::with_test_entries(256, || Vm::prepare(ram, 1, None));
        let mut vm = prepared.unwrap().vm;
        enter_flat_at_0x1000(&vm.vcpus[0].lock().unwrap());
        vm.spawn_threads().unwrap();
        vm.set_dirty_logging(true).unwrap();
        vm.take_dirty_bitmap().unwrap();
        vm
    }

    /// Code that halts for good.
    const HALT: [u8; 3] = [0xf4, 0xeb, 0xfd]; // 1: hlt; jmp 1b

    /// Runs the guest until `at` holds `want` (little-endian), for at most
    /// `limit`; then pauses it. Whether it got there.
    fn run_until(vm: &Vm, at: u64, want: &[u8], limit: Duration) -> bool {
        vm.resume();
        let start = Instant::now();
        let got = loop {
            let mut b = vec![0u8; want.len()];
            vm.ram().read(at, &mut b).unwrap();
            if b == want {
                break true;
            }
            if start.elapsed() > limit || vm.wait_exit(Some(Duration::ZERO)).is_some() {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        vm.pause();
        got
    }

    fn page(p: u32) -> u64 {
        BASE + p as u64 * 4096
    }

    /// The guest's pages of `pages` not in `log`.
    fn unlogged(log: &[u64], pages: std::ops::Range<u32>) -> Vec<u32> {
        pages
            .filter(|&p| {
                let pfn = page(p) / 4096;
                log[(pfn / 64) as usize] & (1 << (pfn % 64)) == 0
            })
            .collect()
    }

    #[test]
    fn pages_written_after_a_ring_overflow_are_logged() {
        if !kvm_usable("pages_written_after_a_ring_overflow_are_logged") {
            return;
        }
        // 600 pages once: more than a 256-entry ring holds, which this
        // host's KVM overflows. Then 64 of them again: each must be in the
        // log (all 64 went unlogged when the reads lost step with KVM).
        let mut code = pass(600, 1);
        #[rustfmt::skip]
        code.extend_from_slice(&[
            0x80, 0x3d, 0x00, 0x50, 0x00, 0x00, 0x00, // 1: cmp byte [GO], 0
            0x74, 0xf7,                               // je 1b
        ]);
        code.extend(pass(64, 2));
        code.extend(HALT);
        let vm = guest(64 << 20, &code);
        let limit = Duration::from_secs(20);
        let ended = run_until(&vm, page(599), &[1], limit);
        let stats = vm.dirty_ring_stats();
        assert!(
            ended,
            "pass 1 did not end: {stats:?}, {:?}",
            vm.wait_exit(Some(Duration::ZERO))
        );
        assert_eq!(
            unlogged(&vm.take_dirty_bitmap().unwrap(), 0..600),
            [0u32; 0]
        );
        vm.ram().write(GO, &[1]).unwrap();
        let ended = run_until(&vm, page(63), &[2], limit);
        let log = vm.take_dirty_bitmap().unwrap();
        let after = vm.dirty_ring_stats();
        eprintln!("after pass 1: {stats:?}; after pass 2: {after:?}");
        assert!(
            ended,
            "pass 2 did not end: {after:?}, {:?}",
            vm.wait_exit(Some(Duration::ZERO))
        );
        assert_eq!(unlogged(&log, 0..64), [0u32; 0], "{after:?}");
    }

    #[test]
    fn a_guest_writing_far_past_its_ring_does_not_hang() {
        if !kvm_usable("a_guest_writing_far_past_its_ring_does_not_hang") {
            return;
        }
        // 16384 pages, 64 rings' worth, flat out: overflows whose resets
        // leave KVM counting entries the ring does not hold, on a full ring
        // at every KVM_RUN unless put back in step.
        let n = 16384;
        let mut code = pass(n, 1);
        code.extend(HALT);
        let vm = guest(128 << 20, &code);
        let done = run_until(&vm, page(n - 1), &[1], Duration::from_secs(60));
        let stats = vm.dirty_ring_stats().unwrap();
        assert!(
            done,
            "the guest stopped short: {stats:?}, {:?}",
            vm.wait_exit(Some(Duration::ZERO))
        );
        eprintln!("{stats:?}");
        assert_eq!(unlogged(&vm.take_dirty_bitmap().unwrap(), 0..n), [0u32; 0]);
    }

    #[test]
    fn pages_whose_entries_an_overflow_lost_are_logged_again() {
        if !kvm_usable("pages_whose_entries_an_overflow_lost_are_logged_again") {
            return;
        }
        // 16384 pages flat out (entries lost where KVM wrote over them, and
        // their pages left writable), then all of them again 128 at a time,
        // each time after the log was read (no ring fills then): each page
        // must be in the log after its chunk, a lost one too.
        let n = 16384;
        let chunk = 128;
        let mut code = pass(n, 1);
        code.extend_from_slice(&[0x31, 0xdb]); // xor ebx, ebx
        code.extend_from_slice(&[0xbf, 0x00, 0x00, 0x10, 0x00]); // mov edi, BASE
        #[rustfmt::skip]
        code.extend_from_slice(&[
            0x43,                                     // 1: inc ebx
            0x39, 0x1d, 0x00, 0x50, 0x00, 0x00,       // 2: cmp [GO], ebx
            0x72, 0xf8,                               // jb 2b
            0xb9, 0x80, 0x00, 0x00, 0x00,             // mov ecx, 128
            0xc6, 0x07, 0x02,                         // 3: mov byte [edi], 2
            0x81, 0xc7, 0x00, 0x10, 0x00, 0x00,       // add edi, 4096
            0x49,                                     // dec ecx
            0x75, 0xf4,                               // jnz 3b
            0x89, 0x1d, 0x04, 0x50, 0x00, 0x00,       // mov [DONE], ebx
            0x81, 0xfb,                               // cmp ebx, n / 128
        ]);
        code.extend_from_slice(&(n / chunk).to_le_bytes());
        code.extend_from_slice(&[0x75, 0xd8]); // jne 1b
        code.extend(HALT);
        let vm = guest(128 << 20, &code);
        let limit = Duration::from_secs(30);
        assert!(
            run_until(&vm, page(n - 1), &[1], limit),
            "{:?}",
            vm.dirty_ring_stats()
        );
        let first = vm.dirty_ring_stats().unwrap();
        assert_eq!(unlogged(&vm.take_dirty_bitmap().unwrap(), 0..n), [0u32; 0]);
        let mut missing = Vec::new();
        for i in 1..=n / chunk {
            vm.ram().write(GO, &i.to_le_bytes()).unwrap();
            let ended = run_until(&vm, DONE, &i.to_le_bytes(), limit);
            assert!(ended, "chunk {i}: {:?}", vm.dirty_ring_stats());
            let log = vm.take_dirty_bitmap().unwrap();
            missing.extend(unlogged(&log, (i - 1) * chunk..i * chunk));
        }
        let stats = vm.dirty_ring_stats().unwrap();
        eprintln!("after the first pass: {first:?}; at the end: {stats:?}");
        assert_eq!(missing, [0u32; 0], "{stats:?}");
    }
}

#[cfg(test)]
mod pending_msr_tests {
    //! kvmclock's MSRs, which make KVM touch guest memory as they are
    //! written, wait for the vCPU's first run when a state is loaded.
    use super::*;
    use std::time::{Duration, Instant};

    const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    const PVCLOCK: u64 = 0x3000;
    const WALL: u64 = 0x4000;
    /// jmp $ (flat 32-bit, at 0x1000): a vCPU that keeps entering the
    /// guest, where KVM updates its pvclock (a halted one is never entered).
    const SPIN: [u8; 2] = [0xeb, 0xfe];

    fn halting(ram: GuestRam) -> Vm {
        ram.write(0x1000, &SPIN).unwrap();
        let mut vm = Vm::prepare(ram, 1, None).unwrap().vm;
        let entries = cpuid::for_vcpu(&cpuid::supported(&vm.kvm).unwrap(), 0, 1, 0);
        {
            let fd = vm.vcpus[0].lock().unwrap();
            fd.set_cpuid2(&cpuid::to_kvm(&entries).unwrap()).unwrap();
            enter_flat_at_0x1000(&fd);
        }
        vm.cpuids.push(entries);
        vm.msr_indices = vm.probe_msrs().unwrap();
        vm.spawn_threads().unwrap();
        vm
    }

    fn msr(state: &VmState, index: u32) -> Option<u64> {
        state.vcpus[0]
            .msrs
            .iter()
            .find(|m| m.index == index)
            .map(|m| m.data)
    }

    fn bytes(vm: &Vm, at: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        vm.ram().read(at, &mut b).unwrap();
        b
    }

    #[test]
    fn kvmclock_msrs_wait_for_the_first_run_and_are_captured_meanwhile() {
        if Kvm::new().is_err() && std::env::var("CI").as_deref() != Ok("true") {
            eprintln!("SKIP: /dev/kvm is not usable here");
            return;
        }
        let src = halting(GuestRam::new(16 << 20).unwrap());
        src.with_vcpu(0, |fd| {
            let entries = [
                kvm_bindings::kvm_msr_entry {
                    index: MSR_KVM_SYSTEM_TIME_NEW,
                    data: PVCLOCK | 1,
                    ..Default::default()
                },
                kvm_bindings::kvm_msr_entry {
                    index: MSR_KVM_WALL_CLOCK_NEW,
                    data: WALL,
                    ..Default::default()
                },
            ];
            let msrs = kvm_bindings::Msrs::from_entries(&entries).unwrap();
            assert_eq!(fd.set_msrs(&msrs).unwrap(), 2);
        })
        .unwrap();
        src.resume();
        std::thread::sleep(Duration::from_millis(20));
        let state = src.capture().unwrap();
        assert_eq!(msr(&state, MSR_KVM_SYSTEM_TIME_NEW), Some(PVCLOCK | 1));
        assert_eq!(msr(&state, MSR_KVM_WALL_CLOCK_NEW), Some(WALL));
        drop(src);

        // Loaded into zeroed memory: KVM wrote neither structure.
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.write(0x1000, &SPIN).unwrap();
        let dst = Vm::prepare(ram, 1, None).unwrap().load(&state).unwrap();
        assert_eq!(bytes(&dst, WALL, 12), [0; 12], "wall clock written at load");
        assert_eq!(bytes(&dst, PVCLOCK, 32), [0; 32], "pvclock written at load");
        // Captured again before it ran: the values still waiting.
        let again = dst.capture().unwrap();
        assert_eq!(msr(&again, MSR_KVM_SYSTEM_TIME_NEW), Some(PVCLOCK | 1));
        assert_eq!(msr(&again, MSR_KVM_WALL_CLOCK_NEW), Some(WALL));
        // Its first run writes them, and KVM then keeps both structures.
        dst.resume();
        let start = Instant::now();
        while bytes(&dst, PVCLOCK, 4) == [0; 4] || bytes(&dst, WALL, 4) == [0; 4] {
            if start.elapsed() > Duration::from_secs(3) {
                let c = dst.capture().unwrap();
                panic!(
                    "KVM never wrote the clocks: pvclock {:?} wall {:?} msrs {:?} {:?} waiting {}",
                    bytes(&dst, PVCLOCK, 32),
                    bytes(&dst, WALL, 12),
                    msr(&c, MSR_KVM_SYSTEM_TIME_NEW),
                    msr(&c, MSR_KVM_WALL_CLOCK_NEW),
                    dst.pending_msrs[0].waiting()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let ran = dst.capture().unwrap();
        assert_eq!(msr(&ran, MSR_KVM_SYSTEM_TIME_NEW), Some(PVCLOCK | 1));
        assert_eq!(msr(&ran, MSR_KVM_WALL_CLOCK_NEW), Some(WALL));
    }
}
