//! Test-only fault hooks (honoured only with `MIGD_FAULT_INJECTION=1`): a source
//! migration can be held at one phase for a while, so that a test can strike
//! there (drop the links, kill or stop the destination, cancel). While held,
//! the job's statistics say so in `held`. `tests/faults.rs` drives the matrix.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::precopy::Job;

/// Where a source migration can be held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// After the Hello is sent, before the Accept is read.
    Handshake,
    /// After this side's preparation (dirty log on, pages with data found),
    /// before the destination is known to be prepared.
    Prepared,
    /// Pre-copy round k, after its first page batch.
    Round(u32),
    /// After the pause, before the state is sent.
    Switch,
    /// Post-copy, after the destination's Confirm.
    Postcopy,
    /// Post-copy recovery, after the main `RecoverHello`, before `Received`.
    Recovery,
}

impl Phase {
    /// The phase's name (as `held` reports it and [`Hold::parse`] takes it).
    pub fn name(self) -> String {
        match self {
            Phase::Handshake => "handshake".into(),
            Phase::Prepared => "prepared".into(),
            Phase::Round(k) => format!("round{k}"),
            Phase::Switch => "switch".into(),
            Phase::Postcopy => "postcopy".into(),
            Phase::Recovery => "recovery".into(),
        }
    }

    fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "handshake" => Phase::Handshake,
            "prepared" => Phase::Prepared,
            "switch" => Phase::Switch,
            "postcopy" => Phase::Postcopy,
            "recovery" => Phase::Recovery,
            _ => Phase::Round(s.strip_prefix("round")?.parse().ok()?),
        })
    }
}

/// Hold the source at `phase` for `duration` (once per migration; a cancel
/// ends the hold early).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Where.
    pub phase: Phase,
    /// How long at most.
    pub duration: Duration,
}

impl Hold {
    /// Parses `PHASE:MS`, e.g. `round0:5000`.
    pub fn parse(s: &str) -> std::result::Result<Hold, String> {
        let bad = || {
            format!(
                "bad fault hold '{}': want PHASE:MS, PHASE one of handshake, prepared, round<k>, switch, postcopy, recovery",
                s.escape_debug()
            )
        };
        let (p, ms) = s.split_once(':').ok_or_else(bad)?;
        Ok(Hold {
            phase: Phase::parse(p).ok_or_else(bad)?,
            duration: Duration::from_millis(ms.parse().map_err(|_| bad())?),
        })
    }

    /// `MIGD_FAULT_HOLD`, when fault injection is on (a bad value is ignored, with a warning).
    pub fn from_env() -> Option<Hold> {
        let v = knob("MIGD_FAULT_HOLD")?;
        Hold::parse(&v)
            .inspect_err(|e| tracing::warn!("MIGD_FAULT_HOLD ignored: {e}"))
            .ok()
    }
}

/// Whether fault injection is on (`MIGD_FAULT_INJECTION=1`; tests only).
pub fn enabled() -> bool {
    std::env::var_os("MIGD_FAULT_INJECTION").is_some_and(|v| v == "1")
}

/// A test-only knob: the environment variable `var`, honoured only with
/// fault injection on.
pub fn knob(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|_| enabled())
}

/// A test-only knob in milliseconds (see [`knob`]); a bad number is none.
pub fn knob_ms(var: &str) -> Option<Duration> {
    knob(var)
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
}

/// Whether a destination is to act as if its `Confirm` could not be sent
/// (`MIGD_FAULT_CONFIRM=lost`): the source then never reads it (after a
/// pre-copy, the connection is kept open, so that the source waits).
pub(crate) fn confirm_lost() -> bool {
    knob("MIGD_FAULT_CONFIRM").as_deref() == Some("lost")
}

/// Whether a post-copy destination is to act as if its first `PostcopyDone`
/// were lost with its links (`MIGD_FAULT_POSTCOPY_DONE=lost`): once every
/// page is here it cuts the session without sending it, and the source,
/// reconnecting, gets the report repeated.
pub(crate) fn postcopy_done_lost() -> bool {
    knob("MIGD_FAULT_POSTCOPY_DONE").as_deref() == Some("lost")
}

/// Holds the migration here if its job asks for a hold at `phase`.
pub(crate) fn hold(job: &Job, phase: Phase) {
    let Some(h) = job.take_hold(phase) else {
        return;
    };
    let name = phase.name();
    tracing::warn!(phase = %name, ms = h.duration.as_millis() as u64, "fault injection: migration held");
    job.update(|s| s.held = Some(name));
    let end = Instant::now() + h.duration;
    while Instant::now() < end && !job.cancel.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
    job.update(|s| s.held = None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_parse() {
        let h = Hold::parse("round1:2500").unwrap();
        assert_eq!(h.phase, Phase::Round(1));
        assert_eq!(h.duration, Duration::from_millis(2500));
        assert_eq!(Hold::parse("switch:0").unwrap().phase, Phase::Switch);
        for bad in ["round:1", "switch", "later:5", "handshake:x", ""] {
            assert!(Hold::parse(bad).is_err(), "{bad}");
        }
        for p in [
            "handshake",
            "prepared",
            "round0",
            "round7",
            "switch",
            "postcopy",
            "recovery",
        ] {
            assert_eq!(Phase::parse(p).map(Phase::name).as_deref(), Some(p));
        }
    }
}
