//! vCPU threads and the run control that pauses, resumes and stops them.
//!
//! Each vCPU runs `KVM_RUN` in its own thread. To pause, the controller sets the
//! wanted state and kicks every thread that has not parked yet with a signal
//! (which makes `KVM_RUN` return `EINTR`), repeating the kick until all threads
//! have parked: a kick that lands just before `KVM_RUN` is never lost for long.

use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::{Devices, IoAction};
use crate::dirty_ring::{Rings, EXIT_DIRTY_RING_FULL};
use crate::error::{Error, Result};
use crate::state::PendingMsrs;

/// Why a VM stopped running for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (exit port, value 0).
    PowerOff,
    /// The guest reported a fatal error code on the exit port.
    GuestFatal(u32),
    /// The guest asked for a reset (treated as a stop).
    Reset,
    /// The guest triple-faulted.
    Shutdown,
    /// KVM reported a crash of the guest (`KVM_SYSTEM_EVENT_CRASH`).
    Crashed,
    /// KVM or the VMM failed.
    Failed(String),
    /// The VMM stopped it (destroy, handover to another process).
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct RunState {
    want: Want,
    /// Paused by the throttle (auto-converge) alone: the VM counts as
    /// running, and only the throttle's resume lets it go on.
    throttled: bool,
    parked: usize,
    threads: Vec<Option<libc::pthread_t>>,
    exit: Option<VmExit>,
}

/// Shared between the controller and the vCPU threads.
pub struct RunControl {
    state: Mutex<RunState>,
    cv: Condvar,
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installing a handler that does nothing; no SA_RESTART, so
        // KVM_RUN returns EINTR when the signal arrives.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

impl RunControl {
    /// A control for `n` vCPUs that start paused.
    pub fn new(n: usize) -> Arc<Self> {
        install_kick_handler();
        Arc::new(RunControl {
            state: Mutex::new(RunState {
                want: Want::Pause,
                throttled: false,
                parked: 0,
                threads: vec![None; n],
                exit: None,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets all vCPUs run.
    pub fn resume(&self) {
        let mut st = self.lock();
        st.throttled = false;
        if st.want == Want::Pause {
            st.want = Want::Run;
        }
        self.cv.notify_all();
    }

    /// Stops all vCPUs and waits until every thread is parked; returns how
    /// long it took. A pause the throttle made becomes this one: the
    /// throttle's resume no longer ends it.
    pub fn pause(&self) -> Duration {
        let start = Instant::now();
        let mut st = self.lock();
        st.throttled = false;
        if st.want == Want::Run {
            st.want = Want::Pause;
        }
        self.wait_parked(st);
        start.elapsed()
    }

    /// The throttle's pause (auto-converge): as [`RunControl::pause`], but
    /// only of a running VM, which counts as running meanwhile.
    pub fn throttle_pause(&self) {
        let mut st = self.lock();
        if st.want == Want::Run {
            st.want = Want::Pause;
            st.throttled = true;
            self.wait_parked(st);
        }
    }

    /// Ends the throttle's pause, unless someone else paused the VM since.
    pub fn throttle_resume(&self) {
        let mut st = self.lock();
        if std::mem::take(&mut st.throttled) && st.want == Want::Pause {
            st.want = Want::Run;
            self.cv.notify_all();
        }
    }

    fn wait_parked(&self, mut st: std::sync::MutexGuard<'_, RunState>) {
        let mut delay = Duration::from_micros(20);
        loop {
            let live = st.threads.iter().flatten().count();
            if st.parked >= live {
                return;
            }
            for t in st.threads.iter().flatten() {
                // SAFETY: the thread is alive (it removes itself under this lock before exiting).
                unsafe { libc::pthread_kill(*t, kick_signal()) };
            }
            st = self
                .cv
                .wait_timeout(st, delay)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }

    /// Ends the VM with `exit` (the first reason wins) and wakes every thread.
    pub fn stop(&self, exit: VmExit) {
        let mut st = self.lock();
        st.want = Want::Stop;
        st.exit.get_or_insert(exit);
        for t in st.threads.iter().flatten() {
            // SAFETY: as in wait_parked.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
        self.cv.notify_all();
    }

    /// Stops the VM and waits until every vCPU thread has left, kicking them out of KVM_RUN.
    pub fn terminate(&self, exit: VmExit) {
        self.stop(exit);
        let mut st = self.lock();
        while st.threads.iter().flatten().count() > 0 {
            for t in st.threads.iter().flatten() {
                // SAFETY: as in wait_parked.
                unsafe { libc::pthread_kill(*t, kick_signal()) };
            }
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// True while the VM is wanted running (paused by the throttle alone
    /// counts as running).
    pub fn is_running(&self) -> bool {
        let st = self.lock();
        st.want == Want::Run || (st.want == Want::Pause && st.throttled)
    }

    /// Waits until the VM ends; returns why.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<VmExit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            if let Some(e) = &st.exit {
                return Some(e.clone());
            }
            st = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// Parks the calling vCPU thread while paused; false when it must exit.
    /// `before_parking` runs first, before the thread counts as parked (so
    /// that `pause` waits for it), outside the lock; `after_parked` once it
    /// was parked and is to run again, outside the lock.
    fn park_if_needed(&self, before_parking: impl FnOnce(), after_parked: impl FnOnce()) -> bool {
        if self.lock().want == Want::Run {
            return true;
        }
        before_parking();
        let mut st = self.lock();
        if st.want == Want::Run {
            return true;
        }
        st.parked += 1;
        self.cv.notify_all();
        while st.want == Want::Pause {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.parked -= 1;
        let run = st.want == Want::Run;
        drop(st);
        if run {
            after_parked();
        }
        run
    }

    fn register(&self, id: usize) {
        // SAFETY: pthread_self has no preconditions.
        self.lock().threads[id] = Some(unsafe { libc::pthread_self() });
    }

    fn unregister(&self, id: usize) {
        let mut st = self.lock();
        st.threads[id] = None;
        self.cv.notify_all();
    }
}

/// Starts the thread that runs vCPU `id`.
pub(crate) fn spawn(
    id: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    control: Arc<RunControl>,
    devices: Arc<Mutex<Devices>>,
    rings: Option<Arc<Rings>>,
    pending: Option<Arc<PendingMsrs>>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            control.register(id);
            let span = tracing::debug_span!("vcpu", id);
            let _g = span.enter();
            // The last exit left its instruction for the next KVM_RUN to
            // finish (port I/O, MMIO).
            let mut unfinished = false;
            let finish = |unfinished: &mut bool| {
                if std::mem::take(unfinished) {
                    let mut fd = vcpu.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(exit) = finish_instruction(id, &mut fd, &devices, rings.as_deref())
                    {
                        drop(fd);
                        tracing::info!(?exit, "vCPU ends the VM");
                        control.stop(exit);
                    }
                }
            };
            // Parked (a pause, or a VM restored and not yet run): the
            // guest's kvmclock is told that its vCPU was stopped by the host
            // (KVM_KVMCLOCK_CTRL), so that its soft-lockup and RCU-stall
            // watchdogs do not count the pause. EINVAL: the guest does not
            // use kvmclock.
            //
            // Before that, on its first run after a state was loaded, the
            // MSRs the load left for it (kvmclock's: they touch guest memory).
            let apply_pending = |fd: &VcpuFd| {
                if let Some(p) = pending.as_deref().filter(|p| p.waiting()) {
                    if let Err(e) = p.apply(fd) {
                        let gave_up = !p.waiting();
                        tracing::warn!(gave_up, "restoring the MSRs left for the first run: {e}");
                    }
                }
            };
            let stopped_by_host = || {
                let fd = vcpu.lock().unwrap_or_else(|p| p.into_inner());
                apply_pending(&fd);
                if let Err(e) = fd.kvmclock_ctrl() {
                    if e.errno() != libc::EINVAL {
                        tracing::debug!("KVM_KVMCLOCK_CTRL: {e}");
                    }
                }
            };
            while control.park_if_needed(|| finish(&mut unfinished), stopped_by_host) {
                let mut fd = vcpu.lock().unwrap_or_else(|p| p.into_inner());
                apply_pending(&fd);
                let (exit, leaves) = run_once(id, &mut fd, &devices, rings.as_deref());
                unfinished = leaves;
                if let Some(exit) = exit {
                    drop(fd);
                    tracing::info!(?exit, "vCPU ends the VM");
                    control.stop(exit);
                }
            }
            control.unregister(id);
        })
        .map_err(|e| Error::Vcpu {
            id,
            reason: format!("cannot start thread: {e}"),
        })
}

/// What a `KVM_EXIT_SYSTEM_EVENT` of `kind` means for the VM.
fn system_event(kind: u32) -> VmExit {
    match kind {
        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
        kvm_bindings::KVM_SYSTEM_EVENT_CRASH => VmExit::Crashed,
        other => VmExit::Failed(format!("unknown KVM system event {other}")),
    }
}

/// Lets KVM finish the instruction of the last exit (the register an `in`
/// loads, RIP past an `out`, the rest of a `rep ins/outs`) without running
/// the guest further: KVM does that only on the next KVM_RUN, and a state
/// captured before would have the guest run the instruction twice (a
/// console byte written twice, an interrupt identification read twice).
/// Finishing may exit again (the next part of a `rep ins/outs` or of a
/// split MMIO access), which is served like any exit; `Some` when one of
/// them ends the VM.
fn finish_instruction(
    id: usize,
    fd: &mut VcpuFd,
    devices: &Mutex<Devices>,
    rings: Option<&Rings>,
) -> Option<VmExit> {
    // A `rep ins/outs` of a page, one exit per element, and some to spare.
    for _ in 0..8192 {
        fd.set_kvm_immediate_exit(1);
        // EINTR (nothing left to finish) resets immediate_exit itself.
        let (exit, leaves) = run_once(id, fd, devices, rings);
        if exit.is_some() || !leaves {
            fd.set_kvm_immediate_exit(0);
            return exit;
        }
    }
    fd.set_kvm_immediate_exit(0);
    tracing::warn!(
        id,
        "the last instruction did not finish: it may run again after a capture"
    );
    None
}

/// The size in bytes (1, 2 or 4) of one element of the port I/O of the
/// KVM_EXIT_IO that `fd` last returned: the data kvm-ioctls hands over is
/// `count` such elements (a string `ins`/`outs` moves several at once),
/// and only kvm_run tells `size` from `count`.
///
/// The data slice of that exit stays valid across this call: it lies in
/// the PIO page of the vCPU's kvm_run mapping, which lives as long as `fd`,
/// after the `struct kvm_run` that this reads (`data_offset` is a page).
fn pio_size(fd: &mut VcpuFd) -> usize {
    let run = fd.get_kvm_run();
    debug_assert_eq!(run.exit_reason, kvm_bindings::KVM_EXIT_IO);
    // SAFETY: the exit was KVM_EXIT_IO, whose union member is `io`.
    usize::from(unsafe { run.__bindgen_anon_1.io.size })
}

/// One KVM_RUN and its exit handling; `Some` when the VM must stop, and
/// whether the exit leaves its instruction for the next KVM_RUN to finish.
fn run_once(
    id: usize,
    fd: &mut VcpuFd,
    devices: &Mutex<Devices>,
    rings: Option<&Rings>,
) -> (Option<VmExit>, bool) {
    let lock = || devices.lock().unwrap_or_else(|p| p.into_inner());
    let exit = fd.run();
    let leaves = matches!(
        exit,
        Ok(VcpuExit::IoOut(..)
            | VcpuExit::IoIn(..)
            | VcpuExit::MmioRead(..)
            | VcpuExit::MmioWrite(..))
    );
    let outcome = match exit {
        Ok(VcpuExit::IoOut(port, data)) => {
            // `data` borrows `fd`, whose kvm_run tells the element size.
            let data: *const [u8] = data;
            let size = pio_size(fd);
            // SAFETY: see pio_size.
            match lock().pio_out(port, size, unsafe { &*data }) {
                IoAction::None => None,
                IoAction::PowerOff => Some(VmExit::PowerOff),
                IoAction::GuestFatal(code) => Some(VmExit::GuestFatal(code)),
                IoAction::Reset => Some(VmExit::Reset),
            }
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            let data: *mut [u8] = data;
            let size = pio_size(fd);
            // SAFETY: see pio_size.
            lock().pio_in(port, size, unsafe { &mut *data });
            None
        }
        Ok(VcpuExit::MmioRead(_, data)) => {
            data.fill(0xff);
            None
        }
        Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Hlt) => None,
        Ok(VcpuExit::Shutdown) => Some(VmExit::Shutdown),
        Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
            match rings.map(|r| r.on_full_exit(id)) {
                Some(Ok(())) => None,
                Some(Err(e)) => Some(VmExit::Failed(format!("vCPU {id}: dirty ring: {e}"))),
                None => Some(VmExit::Failed(format!(
                    "vCPU {id}: dirty ring full, but no ring is mapped"
                ))),
            }
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            tracing::info!(kind, "system event");
            Some(system_event(kind))
        }
        Ok(other) => Some(VmExit::Failed(format!(
            "vCPU {id}: unexpected exit {other:?}"
        ))),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
            None
        }
        Err(e) => Some(VmExit::Failed(format!("vCPU {id}: KVM_RUN: {e}"))),
    };
    (outcome, leaves)
}

#[cfg(test)]
mod system_event_tests {
    use super::*;

    #[test]
    fn system_events_are_told_apart() {
        assert_eq!(
            system_event(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN),
            VmExit::PowerOff
        );
        assert_eq!(
            system_event(kvm_bindings::KVM_SYSTEM_EVENT_RESET),
            VmExit::Reset
        );
        assert_eq!(
            system_event(kvm_bindings::KVM_SYSTEM_EVENT_CRASH),
            VmExit::Crashed
        );
        assert!(matches!(system_event(99), VmExit::Failed(w) if w.contains("99")));
    }
}

#[cfg(test)]
mod string_io_tests {
    use super::*;
    use crate::devices::SerialSnapshot;
    use crate::memory::{GuestRam, MIN_MEMORY};
    use kvm_ioctls::Kvm;
    use vmm_sys_util::eventfd::EventFd;

    /// A real-mode guest's `rep outsb` of six bytes to the serial port,
    /// `rep insb` of three from it and `rep insw` of one word, through KVM:
    /// KVM hands over several elements in one exit (at least for `ins`,
    /// which it reads ahead), and each must be its own access to the UART,
    /// of the size kvm_run gives.
    #[test]
    fn rep_outsb_and_insb_move_every_byte() {
        // As the end-to-end tests: a skip without /dev/kvm, but not in CI.
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                return eprintln!("SKIP: /dev/kvm is not usable here: {e}");
            }
            Err(e) => panic!("/dev/kvm is not usable, and CI=true requires it: {e}"),
        };
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(0xfffb_d000).unwrap();
        let ram = GuestRam::with_huge_pages(MIN_MEMORY, false).unwrap();
        for (slot, (range, host)) in ram.host_ranges().into_iter().enumerate() {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: range.guest_addr,
                memory_size: range.len,
                userspace_addr: host as u64,
            };
            // SAFETY: `ram` outlives the VM fd (dropped before it).
            unsafe { vm.set_user_memory_region(region) }.unwrap();
        }
        #[rustfmt::skip]
        let code = [
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xbe, 0x00, 0x20, // mov si, 0x2000
            0xb9, 0x06, 0x00, // mov cx, 6
            0xfc,             // cld
            0xf3, 0x6e,       // rep outsb
            0xbf, 0x00, 0x30, // mov di, 0x3000
            0xb9, 0x03, 0x00, // mov cx, 3
            0xf3, 0x6c,       // rep insb
            0xb9, 0x01, 0x00, // mov cx, 1
            0xf3, 0x6d,       // rep insw: one word, [byte, 0]
            0x31, 0xc0,       // xor ax, ax
            0xe6, 0xf4,       // out 0xf4, al: power off
        ];
        ram.write(0x1000, &code).unwrap();
        ram.write(0x2000, b"hello\n").unwrap();

        let mut fd = vm.create_vcpu(0).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es] {
            seg.base = 0;
            seg.selector = 0;
        }
        fd.set_sregs(&sregs).unwrap();
        fd.set_regs(&kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();

        let dir = std::env::temp_dir().join(format!("vmm-rep-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let serial = SerialSnapshot {
            in_buffer: b"xyz!?".to_vec(),
            ..Devices::new(EventFd::new(0).unwrap(), None)
                .unwrap()
                .serial_state()
        };
        let devices =
            Mutex::new(Devices::restore(EventFd::new(0).unwrap(), Some(&log), &serial).unwrap());
        let exit = (0..100).find_map(|_| run_once(0, &mut fd, &devices, None).0);
        assert_eq!(exit, Some(VmExit::PowerOff));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\n");
        let mut read = [0xaa; 6];
        ram.read(0x3000, &mut read).unwrap();
        assert_eq!(&read, b"xyz!\0\0", "rep insb, rep insw");
        assert_eq!(devices.lock().unwrap().serial_state().in_buffer, b"?");
        drop(fd);
        drop(vm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
