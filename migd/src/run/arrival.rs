//! An incoming VM before it runs here. A stop (a signal, or `stop` on the
//! control socket) ends the process, within 2 s, while the source can still
//! resume the VM, that is until this side has read the source's `Go` (from
//! then on the source never resumes it on its own, and the VM is this
//! side's to run): nothing is half-written, since the VM's memory is the
//! process's own. A source already connected is told why first, in a
//! `Cancel`. Without this a `migd run --incoming` waiting for its source
//! ignored SIGTERM (its signals are taken by a thread that starts with the VM).

use migration::incoming::Abandon;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// Where an incoming VM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No source has connected yet (or the VM is still being built).
    Waiting,
    /// A source is sending the VM.
    Receiving,
    /// The VM runs here (or never was incoming): stops go to the main loop.
    Running,
}

/// Whether a stop ends the process now, and how.
pub struct Arrival {
    phase: Mutex<Phase>,
    /// The control socket, removed on the way out.
    control: Option<PathBuf>,
    /// While receiving a migration: the way to tell its source why it is
    /// given up.
    abandon: Mutex<Option<Abandon>>,
    /// The VM's memory (bytes) and vCPUs, for `status` while it arrives (a
    /// daemon that adopts this process counts the memory it will take).
    pub size: (u64, usize),
}

/// How long a stop while receiving waits for the source to be told why,
/// before the process exits regardless.
const TELL_SOURCE_WAIT: Duration = Duration::from_secs(2);

impl Arrival {
    /// `incoming`: whether the VM arrives by migration (otherwise it is
    /// `Running` from the start).
    pub fn new(incoming: bool, control: Option<PathBuf>, size: (u64, usize)) -> Self {
        Self {
            phase: Mutex::new(if incoming {
                Phase::Waiting
            } else {
                Phase::Running
            }),
            control,
            abandon: Mutex::new(None),
            size,
        }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the VM is still arriving (control requests other than
    /// `status` and `stop` are refused meanwhile).
    pub fn arriving(&self) -> bool {
        *self.phase() != Phase::Running
    }

    /// A source has connected and is sending the VM; `abandon`, where
    /// given, tells it why a stop gives the migration up.
    pub fn receiving(&self, abandon: Option<Abandon>) {
        let mut p = self.phase();
        if *p == Phase::Waiting {
            *p = Phase::Receiving;
            *self.abandon.lock().unwrap_or_else(|e| e.into_inner()) = abandon;
        }
    }

    /// The VM is this side's to run (`Go` read; it runs, or is about to):
    /// a stop is the main loop's from now on. Waits for a stop under way,
    /// which then never returns.
    pub fn running(&self) {
        *self.phase() = Phase::Running;
        // Its copy of the incoming connection is of no use from now on.
        self.abandon
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Stops the process for `why` if the VM has not arrived; returns
    /// (false) only if it has. Holding the lock until the process exits
    /// keeps [`Arrival::running`], and with it the confirmation to the
    /// source, from happening meanwhile.
    pub fn stop_unless_arrived(&self, why: &str) -> bool {
        let p = self.phase();
        let code = match *p {
            Phase::Running => return false,
            Phase::Waiting => {
                tracing::info!("{why}: stopping; no migration had begun");
                0
            }
            Phase::Receiving => {
                tracing::warn!("{why}: abandoning the incoming migration; the source keeps the VM");
                1
            }
        };
        if let Some(c) = &self.control {
            let _ = std::fs::remove_file(c);
        }
        let abandon = self
            .abandon
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(a) = abandon {
            // The receiver tells the source and fails; its failure ends the
            // process (this lock keeps it from running the VM meanwhile).
            if a.abandon(why) {
                std::thread::sleep(TELL_SOURCE_WAIT);
            }
        }
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_that_runs_is_not_stopped_here() {
        let a = Arrival::new(false, None, (0, 0));
        assert!(!a.arriving());
        assert!(!a.stop_unless_arrived("test"));
        let a = Arrival::new(true, None, (0, 0));
        assert!(a.arriving());
        a.receiving(None);
        assert!(a.arriving());
        a.running();
        assert!(!a.arriving());
        // Once running, a late `receiving` does not turn it back.
        a.receiving(None);
        assert!(!a.stop_unless_arrived("test"));
    }
}
