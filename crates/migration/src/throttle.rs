//! Auto-converge: when the guest dirties memory faster than the rounds can
//! send it, slow its vCPUs down step by step (as QEMU's auto-converge does) by
//! pausing the VM for a share of every 100 ms period.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
                // Pause time owed for a run window that lasted longer than
                // asked (this thread woke late, on a loaded host): without
                // it, 99 % would be far less whenever the host is busy.
                let mut owed = Duration::ZERO;
                while !s.load(Ordering::Relaxed) {
                    let pct = l.load(Ordering::Relaxed);
                    // Never throttle a VM that someone else paused (nor
                    // resume it: `throttle_resume` ends only its own pause).
                    if pct == 0 || !control.is_running() {
                        owed = Duration::ZERO;
                        park_for(PERIOD, &s);
                        continue;
                    }
                    let (off, on) = share(pct);
                    control.throttle_pause();
                    // Parked, not asleep: dropping the throttle wakes it.
                    park_for(off + owed, &s);
                    control.throttle_resume();
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    let ran = Instant::now();
                    // Parked too: the drop, just before the final pause,
                    // should not wait out a run window.
                    park_for(on, &s);
                    owed = owed_for(ran.elapsed(), on, pct);
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

/// Parks this thread for `d`, or until `stop` is set (and it is unparked).
fn park_for(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    // Again after a spurious wake-up, so that the pause keeps its length.
    while !stop.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::park_timeout(left);
    }
}

/// The paused and the running part of a period at `pct` percent.
fn share(pct: u32) -> (Duration, Duration) {
    let off = PERIOD * pct / 100;
    (off, PERIOD - off)
}

/// The pause owed when the vCPUs ran `ran` instead of `on` at `pct` percent,
/// so that the paused share stays `pct` (at most [`MAX_OWED`]).
fn owed_for(ran: Duration, on: Duration, pct: u32) -> Duration {
    let over = ran.saturating_sub(on);
    (over * pct / (100 - pct.min(99))).min(MAX_OWED)
}

/// The longest extra pause one late wake-up can cost the guest.
const MAX_OWED: Duration = Duration::from_millis(500);

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // The thread resumes the VM before it looks at `stop` again.
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_wake_up_is_paid_back_in_the_next_pause() {
        let ms = Duration::from_millis;
        assert_eq!(share(20), (ms(20), ms(80)));
        assert_eq!(share(99), (ms(99), ms(1)));
        // On time: nothing owed.
        assert_eq!(owed_for(ms(1), ms(1), 99), Duration::ZERO);
        // 99 %: ran 3 ms instead of 1, so 2 × 99 ms more pause keeps the share.
        assert_eq!(owed_for(ms(3), ms(1), 99), ms(198));
        // 50 %: as much pause as the overrun.
        assert_eq!(owed_for(ms(60), ms(50), 50), ms(10));
        // Bounded, however late.
        assert_eq!(owed_for(ms(1000), ms(1), 99), MAX_OWED);
    }

    /// Dropping the throttle (just before the final pause) waits for no
    /// idle period or run window; the VM runs afterwards.
    #[test]
    fn a_drop_ends_the_throttle_at_once_in_any_window() {
        for raises in [0, 1] {
            let control = RunControl::new(1);
            control.resume();
            let t = Throttle::start(control.clone()).unwrap();
            for _ in 0..raises {
                t.raise();
            }
            // Into an idle period (0 %) or the 80 ms run window of 20 %,
            // 75 ms before either ends.
            std::thread::sleep(Duration::from_millis(25));
            let dropped = Instant::now();
            drop(t);
            let took = dropped.elapsed();
            assert!(took < Duration::from_millis(50), "{raises}: {took:?}");
            assert!(control.is_running());
        }
    }

    /// The throttle's pause counts as running, and its resume never ends a
    /// pause someone else made, before or during it.
    #[test]
    fn the_throttle_resumes_only_its_own_pause() {
        let control = RunControl::new(1);
        control.resume();
        control.throttle_pause();
        assert!(control.is_running(), "throttled counts as running");
        control.throttle_resume();
        assert!(control.is_running());
        // Paused by someone else during the throttle's pause: kept.
        control.throttle_pause();
        control.pause();
        assert!(!control.is_running());
        control.throttle_resume();
        assert!(!control.is_running());
        // Paused before: the throttle neither pauses nor resumes it.
        control.throttle_pause();
        control.throttle_resume();
        assert!(!control.is_running());
        control.resume();
        assert!(control.is_running());
    }
}
