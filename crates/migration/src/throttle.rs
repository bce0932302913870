//! Auto-converge: when the guest dirties memory faster than the rounds can
//! send it, slow its vCPUs down step by step (as QEMU's auto-converge does) by
//! pausing the VM for a share of every 100 ms period.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm::vcpu::RunControl;

/// The throttle period.
const PERIOD: Duration = Duration::from_millis(100);
/// First step, later steps, and the most (percent of each period paused).
pub const INITIAL: u32 = 20;
pub const INCREMENT: u32 = 10;
pub const MAX: u32 = 99;

/// A running throttle; dropping it lets the VM run at full speed again.
pub struct Throttle {
    level: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// A throttle for the VM behind `control`, at 0 % until [`Throttle::raise`].
    pub fn start(control: Arc<RunControl>) -> std::io::Result<Throttle> {
        let level = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (level.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("auto-converge".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let pct = l.load(Ordering::Relaxed);
                    // Never resume a VM that someone else paused.
                    if pct == 0 || !control.is_running() {
                        std::thread::sleep(PERIOD);
                        continue;
                    }
                    let off = PERIOD * pct / 100;
                    control.pause();
                    std::thread::sleep(off);
                    control.resume();
                    std::thread::sleep(PERIOD - off);
                }
            })?;
        Ok(Throttle {
            level,
            stop,
            thread: Some(thread),
        })
    }

    /// One step more (20 %, then +10 % up to 99 %); returns the new level.
    pub fn raise(&self) -> u32 {
        let next = match self.level.load(Ordering::Relaxed) {
            0 => INITIAL,
            l => (l + INCREMENT).min(MAX),
        };
        self.level.store(next, Ordering::Relaxed);
        next
    }

    /// The share of each period the vCPUs are paused, percent.
    pub fn level(&self) -> u32 {
        self.level.load(Ordering::Relaxed)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // The thread resumes the VM before it looks at `stop` again.
            let _ = t.join();
        }
    }
}
