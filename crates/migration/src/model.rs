//! The cost model of the seed papers, to predict downtime and total time.
//!
//! Every switch-over also costs `T_sw = 2 · RTT + W(n)`: its two exchanges
//! (State/Ready, Go/Confirm) and the work of pausing, capturing, restoring
//! and resuming `n` vCPUs (`W`, measured on the test host: 0.5 ms + 0.5 ms
//! per vCPU), which the seed formulas leave out and which is all the pause of
//! an idle guest.
//!
//! Post-copy (Gupta et al.): the switch-over moves the minimal state `V_min`,
//! so `T_down = V_min / R + T_sw`. The rest, `V_mem − V_min`, arrives during the
//! resumption phase, partly as `X = (V_mem − V_min) / (P · (1 + Y))` demand faults
//! (each brings `Y` pre-paged neighbours), each costing `T_fault = RTT + P·(1+Y)/R`:
//! `T_res = X · T_fault + (V_mem − V_min) / R` — the bound where every page
//! arrives by fault (demand paging alone). migd's source pushes every page
//! the guest has not asked for, and the faults' pages take the place of pushed
//! ones in the same stream, so the phase lasts `(V_mem − V_min) / R` however
//! many faults there are (measured: 100–300 ms for 256 MiB at ~1 GB/s with 56
//! to 191 faults, where the seed bound says 1.8–5.4 s): `T_mig = T_setup +
//! T_down + (V_mem − V_min) / R`. Faults cost the guest's time, not the
//! migration's; the seed bound is reported beside it (`resume_ms`).
//!
//! Pre-copy (Clark et al.): round `i` sends `V_i = V_0 · ρ^i` with `ρ = D / R`
//! (dirty rate over bandwidth); rounds stop once `V_i / R ≤ max_downtime` or
//! after `max_rounds`; `T_down = V_n / R + V_state / R + T_sw`,
//! `T_mig = Σ V_i / R + T_down`.
//! The guest dirties `min(D·t, W)` distinct bytes in a window of `t`: its
//! rate, up to its working set `W` when that is known (a guest going round
//! a fixed set), without bound otherwise (one sweeping new pages).
//!
//! Hybrid (migd's engine, `precopy::sample_hot`): round 0 watches the dirty
//! log for one step `s` (50 ms), then sends the pages not seen written while
//! it keeps watching, until every such page is sent or a time limit `L`
//! (1 s). What the guest wrote meanwhile, `H = min(D·min(t_0, L), W)`, is
//! left to post-copy, and round 0 sends the rest: `t_0 = s + (V_0 − H)/R`
//! (solved for both together, `t_0 = (s + V_0/R) / (1 + D/R)` while the
//! sampling lasts the whole round). Cold pages written after the sampling
//! ended go in up to two more rounds, then post-copy moves `H` and what
//! those rounds left.
//!
//! `--mode auto` runs hybrid's round 0 with two differences. Its first step
//! is `s = 10 ms` where the link has no cap (a link without one is fast as a
//! rule, and watching leaves it idle). And it cuts: once a tenth of `V_0` is
//! sent while the guest's dirty set still grows at a tenth of `R` or more
//! (`D ≥ 0.1 R`, and `D · t < W`), everything not sent is left to post-copy:
//! `t_0 = s + 0.1 V_0 / R`, and post-copy moves `0.9 V_0`. Otherwise it ends
//! in pre-copy where those rounds converge, in hybrid where not; that
//! hybrid ending's round 0 watches the same `s` (10 ms uncapped, 50 ms
//! capped). An ending in pre-copy is predicted as pre-copy after that same
//! watch-only step `s` (its downtime is pre-copy's; its total `s` longer).
//!
//! Every mode's total also counts the set-up before any page moves
//! (`T_setup`: connection, handshake, the destination's preparation), an
//! input: `migctl estimate` puts three round trips there, the check after a
//! migration the set-up it measured.

use serde::{Deserialize, Serialize};

/// What the model needs, all measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    /// Non-zero guest memory, bytes (what round 0 or post-copy must move).
    pub memory_bytes: f64,
    /// VM state (vCPUs, devices) moved at the switch-over, bytes.
    pub state_bytes: f64,
    /// Dirty rate of the running guest, bytes/s.
    pub dirty_rate: f64,
    /// Bandwidth to the destination, bytes/s.
    pub bandwidth: f64,
    /// Round-trip time to the destination, seconds.
    pub rtt: f64,
    /// Acceptable downtime (pre-copy stop condition), seconds.
    pub max_downtime: f64,
    /// Pages sent along with each demanded page (post-copy pre-paging window `Y`).
    pub prepaging_window: f64,
    /// vCPUs paused, captured and restored at the switch-over.
    #[serde(default)]
    pub vcpus: u32,
    /// Set-up before the first page moves, seconds.
    #[serde(default)]
    pub setup: f64,
    /// The guest's working set, bytes: what it dirties in any window is at
    /// most this (0: not known, no bound).
    #[serde(default)]
    pub working_set: f64,
    /// Whether `bandwidth` is a cap set for the migration (`--mode auto`
    /// then watches a whole sampling step before it sends).
    #[serde(default)]
    pub capped: bool,
}

/// The widest pre-paging window, pages: the engine's (a demanded page and
/// its neighbours go in one batch).
pub const MAX_PREPAGING_WINDOW: u32 = wire::MAX_BATCH_PAGES as u32 - 1;

/// Inputs the model cannot take (see [`Inputs::validate`]).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InvalidInput {
    /// A figure that is NaN or infinite.
    #[error("{0} must be a finite number")]
    NotFinite(&'static str),
    /// A figure below zero.
    #[error("{0} must not be negative")]
    Negative(&'static str),
    /// No pause fits a limit of zero.
    #[error("max_downtime must be above 0")]
    MaxDowntime,
    /// A window wider than the engine's.
    #[error("prepaging_window must be at most {MAX_PREPAGING_WINDOW} pages, got {0}")]
    PrepagingWindow(f64),
}

impl Inputs {
    /// Whether the model can take these inputs: every figure finite and not
    /// negative, `max_downtime` above 0, `prepaging_window` at most
    /// [`MAX_PREPAGING_WINDOW`]. ([`predict`] takes any window, as the
    /// engine would: the widest.)
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let figures = [
            ("memory_bytes", self.memory_bytes),
            ("state_bytes", self.state_bytes),
            ("dirty_rate", self.dirty_rate),
            ("bandwidth", self.bandwidth),
            ("rtt", self.rtt),
            ("max_downtime", self.max_downtime),
            ("prepaging_window", self.prepaging_window),
            ("setup", self.setup),
            ("working_set", self.working_set),
        ];
        for (name, v) in figures {
            if !v.is_finite() {
                return Err(InvalidInput::NotFinite(name));
            }
            if v < 0.0 {
                return Err(InvalidInput::Negative(name));
            }
        }
        if self.max_downtime <= 0.0 {
            return Err(InvalidInput::MaxDowntime);
        }
        if self.prepaging_window > MAX_PREPAGING_WINDOW as f64 {
            return Err(InvalidInput::PrepagingWindow(self.prepaging_window));
        }
        Ok(())
    }
}

/// The VM state moved at the switch-over for `vcpus` vCPUs, bytes: measured
/// ~11 KiB per vCPU (XSAVE, LAPIC, CPUID, MSRs) plus the devices.
pub fn state_bytes(vcpus: usize) -> f64 {
    ((vcpus * 11 + 1) * 1024) as f64
}

/// What the model predicts for one mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Predicted downtime, ms.
    pub downtime_ms: f64,
    /// Predicted total time (post-copy and hybrid: with the resumption
    /// phase of active push, `resume_push_only_ms`), ms.
    pub total_ms: f64,
    /// Post-copy and hybrid: resumption phase if every page came by fault
    /// (the seed formula; demand paging alone), ms.
    pub resume_ms: f64,
    /// Post-copy and hybrid: resumption phase with active push (what the
    /// total counts), ms.
    pub resume_push_only_ms: f64,
    /// Demand faults the resumption phase may take.
    pub faults: f64,
    /// Pre-copy rounds (hybrid: before the switch).
    pub rounds: u32,
    /// Pre-copy: whether the rounds reach max-downtime (false = stopped by the round limit).
    pub converges: bool,
    /// Pre-copy: bytes the rounds leave for the stop-and-copy.
    #[serde(default)]
    pub final_bytes: f64,
}

const PAGE: f64 = 4096.0;
/// Round limit of the pre-copy engine.
pub const MAX_ROUNDS: u32 = 30;

/// Post-copy of `v_mem` bytes after a switch-over that moves `v_min` bytes.
fn postcopy_phase(i: &Inputs, v_min: f64, v_mem: f64) -> (f64, f64, f64, f64) {
    let r = i.bandwidth.max(1.0);
    let t_down = (v_min - i.state_bytes).max(0.0) / r + switch_cost(i);
    let rest = (v_mem - v_min).max(0.0);
    // The engine's window is never wider (an infinite one made NaN here).
    let window = i.prepaging_window.max(0.0).min(MAX_PREPAGING_WINDOW as f64);
    let per_fault = PAGE * (1.0 + window);
    let faults = rest / per_fault;
    let t_fault = i.rtt + per_fault / r;
    let t_res = faults * t_fault + rest / r;
    (t_down, t_res, rest / r, faults)
}

/// What a pause takes beyond the dirty pages, seconds: the state at the
/// bandwidth, the switch-over's two round trips and its work per vCPU (as
/// the engine's stop rule counts them).
fn switch_cost(i: &Inputs) -> f64 {
    i.state_bytes / i.bandwidth.max(1.0)
        + 2.0 * i.rtt
        + crate::precopy::switch_work_ms(i.vcpus as usize) / 1e3
}

/// Distinct bytes the guest dirties in `t` seconds, at most `cap`: its rate
/// times the window, up to its working set.
fn dirtied(i: &Inputs, t: f64, cap: f64) -> f64 {
    let ws = if i.working_set > 0.0 {
        i.working_set
    } else {
        f64::INFINITY
    };
    (i.dirty_rate * t).min(ws).min(cap).max(0.0)
}

/// Pre-copy rounds: (bytes still dirty at the end, seconds spent, rounds,
/// converged: the pause they leave, [`switch_cost`] included, fits max-downtime).
fn precopy_rounds(i: &Inputs, max_rounds: u32) -> (f64, f64, u32, bool) {
    let t0 = i.memory_bytes / i.bandwidth.max(1.0);
    let left = dirtied(i, t0, i.memory_bytes);
    chase(i, left, t0, 1, max_rounds, i.memory_bytes)
}

/// Rounds that each send what the one before left, from `v` bytes left by
/// `rounds` rounds that took `t` seconds, until the pause the last one leaves
/// fits max-downtime or `max_rounds` have run; each leaves what the guest
/// dirties meanwhile, at most `cap`. Returns what [`precopy_rounds`] does.
fn chase(
    i: &Inputs,
    mut v: f64,
    mut t: f64,
    mut rounds: u32,
    max_rounds: u32,
    cap: f64,
) -> (f64, f64, u32, bool) {
    let r = i.bandwidth.max(1.0);
    loop {
        if v / r + switch_cost(i) <= i.max_downtime {
            return (v, t, rounds, true);
        }
        if rounds >= max_rounds {
            return (v, t, rounds, false);
        }
        let dt = v / r;
        t += dt;
        rounds += 1;
        v = dirtied(i, dt, cap);
    }
}

/// Hybrid's round 0 with its sampling (module docs), whose first,
/// watch-only step lasts `step` seconds: (hot bytes left to post-copy, the
/// round's seconds, cold bytes it leaves dirty, the most the cold pages can
/// be).
fn hybrid_round0(i: &Inputs, step: f64) -> (f64, f64, f64, f64) {
    let r = i.bandwidth.max(1.0);
    let v = i.memory_bytes;
    let limit = crate::precopy::HOT_SAMPLE_MAX.as_secs_f64();
    // The sampling lasts the whole round unless the working set or the time
    // limit ends it first; either way round 0 sends what it did not find.
    let whole = (step + v / r) / (1.0 + i.dirty_rate / r);
    let hot = dirtied(i, whole.min(limit), v);
    let t0 = step + (v - hot) / r;
    let cold = if i.working_set > 0.0 {
        i.working_set.min(v) - hot
    } else {
        v - hot
    }
    .max(0.0);
    (hot, t0, dirtied(i, t0 - limit, cold), cold)
}

/// Hybrid's first sampling step, seconds: it only watches, the link idle.
const HYBRID_STEP: f64 = crate::precopy::HOT_STEP.as_secs_f64();

/// `--mode auto`'s first sampling step, seconds: shorter where the link has
/// no cap (`sample_hot`'s rule, whether or not it cuts).
fn auto_step(i: &Inputs) -> f64 {
    if i.capped {
        HYBRID_STEP
    } else {
        crate::precopy::FIRST_STEP_UNCAPPED.as_secs_f64()
    }
}

/// The watch-only sampling step that [`predict`] counts at the start of
/// `mode`'s round 0, seconds (none where it predicts no sampling; auto
/// watches first whatever it then does).
fn round0_step(mode: &str, i: &Inputs) -> f64 {
    match mode {
        "hybrid" => HYBRID_STEP,
        "auto" => auto_step(i),
        _ => 0.0,
    }
}

/// `--mode auto`'s cut (module docs): (round 0's seconds, bytes it leaves
/// to post-copy) where the guest's dirty set still grows fast once a tenth
/// of memory is sent; None where it does not.
fn auto_cut(i: &Inputs) -> Option<(f64, f64)> {
    let r = i.bandwidth.max(1.0);
    let tenth = i.memory_bytes / 10.0;
    let t0 = auto_step(i) + tenth / r;
    let growing = i.working_set <= 0.0 || i.dirty_rate * t0 < i.working_set;
    (growing && i.dirty_rate >= crate::precopy::CUT_GROWTH * r)
        .then_some((t0, i.memory_bytes - tenth))
}

/// The mode `--mode auto` is expected to end in: pre-copy where what the
/// guest dirtied during round 0 fits the pause (the engine goes on to
/// post-copy after round 0 as soon as its sampling saw a page rewritten,
/// which any guest that dirties memory does, unless that round converged);
/// otherwise, or after a cut, round 0 and then post-copy ("hybrid").
pub fn auto_mode(i: &Inputs) -> &'static str {
    let p = predict("precopy", i);
    if auto_cut(i).is_none() && p.converges && (p.rounds <= 1 || i.dirty_rate <= 0.0) {
        "precopy"
    } else {
        "hybrid"
    }
}

/// A migration whose rounds (seconds, how many, whether they converged)
/// leave `left` bytes to post-copy.
fn ending_in_postcopy(
    i: &Inputs,
    (t_rounds, rounds, converges): (f64, u32, bool),
    left: f64,
) -> Prediction {
    let (t_down, t_res, push_only, faults) = postcopy_phase(i, i.state_bytes, left + i.state_bytes);
    Prediction {
        downtime_ms: t_down * 1e3,
        total_ms: (i.setup + t_rounds + t_down + push_only) * 1e3,
        resume_ms: t_res * 1e3,
        resume_push_only_ms: push_only * 1e3,
        faults,
        rounds,
        converges,
        final_bytes: 0.0,
    }
}

/// `--mode auto` ending in post-copy (`postcopy`) or in pre-copy.
fn auto_ending(i: &Inputs, postcopy: bool) -> Prediction {
    if !postcopy {
        // Pre-copy, after the watch-only first step (it samples before it
        // decides, whatever it decides).
        let mut p = predict("precopy", i);
        p.total_ms += auto_step(i) * 1e3;
        return p;
    }
    match auto_cut(i) {
        Some((t0, left)) => ending_in_postcopy(i, (t0, 1, true), left),
        // Round 0 with its sampling, then post-copy at once.
        None => {
            let (hot, t0, cold_left, _) = hybrid_round0(i, auto_step(i));
            ending_in_postcopy(i, (t0, 1, true), hot + cold_left)
        }
    }
}

/// Predicts `mode` ("precopy", "postcopy", "hybrid", or "auto": the one
/// [`auto_mode`] picks).
pub fn predict(mode: &str, i: &Inputs) -> Prediction {
    let r = i.bandwidth.max(1.0);
    match mode {
        "auto" => auto_ending(i, auto_mode(i) == "hybrid"),
        "postcopy" => ending_in_postcopy(i, (0.0, 0, true), i.memory_bytes),
        "hybrid" => {
            let (hot, t0, cold_left, cold) = hybrid_round0(i, HYBRID_STEP);
            let (left, t_rounds, rounds, converges) = chase(i, cold_left, t0, 1, 3, cold);
            ending_in_postcopy(i, (t_rounds, rounds, converges), hot + left)
        }
        _ => {
            let (left, t_rounds, rounds, converges) = precopy_rounds(i, MAX_ROUNDS);
            let t_down = left / r + switch_cost(i);
            Prediction {
                downtime_ms: t_down * 1e3,
                total_ms: (i.setup + t_rounds + t_down) * 1e3,
                resume_ms: 0.0,
                resume_push_only_ms: 0.0,
                faults: 0.0,
                rounds,
                converges,
                final_bytes: left,
            }
        }
    }
}

/// The model's prediction for a finished migration, from the parameters it
/// measured (round-0 or push throughput, round-0 dirty rate, memory moved,
/// Go→Confirm round trip, pre-paging window, set-up), with the error against
/// what was measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelCheck {
    /// Inputs taken from the migration's statistics.
    pub inputs: Inputs,
    /// What the model predicts from them.
    pub prediction: Prediction,
    /// (predicted − measured) / measured downtime, %.
    pub downtime_error_pct: f64,
    /// (predicted − measured) / measured total time, %.
    pub total_error_pct: f64,
    /// Pre-copy: the stop-and-copy, predicted and measured.
    #[serde(default)]
    pub final_copy: Option<FinalCopy>,
}

/// Pre-copy's stop-and-copy against the model, which splits a downtime
/// error into its two causes: the bytes the rounds left (from the dirty
/// rate), and the rate they went at (the model takes the rounds' rate; with
/// the guest paused, and the destination overwriting pages it already has
/// rather than allocating new ones, the stop-and-copy can go faster).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalCopy {
    /// Bytes the model expects the rounds to leave.
    pub bytes_predicted: f64,
    /// Bytes the stop-and-copy sent.
    pub bytes_measured: f64,
    /// The rounds' rate, bytes/s (the model's bandwidth).
    pub round_rate: f64,
    /// The stop-and-copy's rate, bytes/s.
    pub final_rate: f64,
}

/// Evaluates the model for a completed migration of a VM of `vcpus` vCPUs
/// (`capped`: under a bandwidth cap); None if it did not complete or
/// measured too little to say. `--mode auto` is predicted in the ending it
/// took (post-copy where it switched), not the one [`auto_mode`] would pick
/// from the figures measured.
pub fn check(s: &crate::stats::MigrationStats, vcpus: usize, capped: bool) -> Option<ModelCheck> {
    if s.outcome != "completed" || s.total_ms <= 0.0 || s.downtime_ms <= 0.0 {
        return None;
    }
    let postcopy = s.mode == "postcopy";
    let round0 = s.rounds.first();
    // Hybrid's and auto's round 0 counts from when the dirty log began,
    // during the set-up: its sampling's first step watched with the link
    // idle, in part or all while the destination prepared (which `setup_ms`
    // counts too). (Statistics from before they were recorded say 0.)
    let (watched, watched_in_setup) = match &s.sampling {
        Some(p) if !postcopy && p.watched_ms > 0.0 => {
            (p.watched_ms, p.watched_in_setup_ms.clamp(0.0, p.watched_ms))
        }
        _ => (0.0, 0.0),
    };
    // Hybrid may have kept its hot pages out of round 0: they are memory that
    // moves too, and a small round 0 says little about the bandwidth.
    let deferred = s.pages.deferred as f64 * PAGE;
    let (memory_bytes, bandwidth) = match round0 {
        // The bandwidth over round 0's sending time, as the engine's own.
        Some(r) if !postcopy && r.ms - watched > 0.0 && r.bytes as f64 > deferred => (
            r.bytes as f64 + deferred,
            r.bytes as f64 / ((r.ms - watched) / 1e3),
        ),
        _ => {
            let moved = (s.pages.expected.max(s.pages.sent) * PAGE as u64) as f64;
            let span = if s.resume_ms > 0.0 {
                s.resume_ms
            } else {
                s.total_ms
            };
            (moved, moved / (span / 1e3))
        }
    };
    let mut inputs = Inputs {
        memory_bytes,
        state_bytes: state_bytes(vcpus),
        dirty_rate: if postcopy {
            0.0
        } else {
            round0.map_or(0.0, |r| r.dirty_rate)
        },
        bandwidth,
        // Measured before the pause, or else its last exchange.
        rtt: s.rtt_ms.map(|ms| ms / 1e3).unwrap_or_else(|| {
            s.downtime_phases
                .as_ref()
                .map_or(100e-6, |p| p.go_confirm_us as f64 / 1e6)
        }),
        // The limit the migration ran under (statistics from before it was
        // recorded say 0: the default then).
        max_downtime: if s.max_downtime_ms > 0.0 {
            s.max_downtime_ms / 1e3
        } else {
            0.3
        },
        prepaging_window: s.prepaging_window as f64,
        vcpus: vcpus as u32,
        setup: s.setup_ms / 1e3,
        // Hybrid's sampling found the working set where the guest went
        // round it ("quiet"); otherwise it saw only part of it.
        working_set: match &s.sampling {
            Some(p) if p.ended == "quiet" => p.hot_pages as f64 * PAGE,
            _ => 0.0,
        },
        capped,
    };
    if watched > 0.0 {
        // The model's round 0 begins with its own watching step after the
        // set-up: the set-up is then the time until round 0 began to send
        // (the set-up measured, and what the watch took after it) less
        // that step, lest the watch within the set-up count twice.
        let until_sending = (s.setup_ms + watched - watched_in_setup) / 1e3;
        inputs.setup = (until_sending - round0_step(&s.mode, &inputs)).max(0.0);
    }
    let prediction = match s.mode.as_str() {
        // Auto ended as it did, whatever the model would pick from what it
        // measured: in post-copy where pages were left to arrive after the
        // switch, in pre-copy otherwise.
        "auto" => auto_ending(&inputs, s.pages.expected > 0),
        mode => predict(mode, &inputs),
    };
    let err = |p: f64, m: f64| (p - m) / m * 100.0;
    Some(ModelCheck {
        inputs,
        prediction,
        downtime_error_pct: err(prediction.downtime_ms, s.downtime_ms),
        total_error_pct: err(prediction.total_ms, s.total_ms),
        final_copy: final_copy(s, &inputs, &prediction),
    })
}

/// The stop-and-copy of a pre-copy migration (its bytes and rate, from the
/// pages sent after the rounds and the pause's `final_pages_us`) beside the
/// model's; None for other modes or where it sent nothing.
fn final_copy(
    s: &crate::stats::MigrationStats,
    inputs: &Inputs,
    prediction: &Prediction,
) -> Option<FinalCopy> {
    if s.pages.expected > 0 || !matches!(s.mode.as_str(), "precopy" | "auto") {
        return None;
    }
    let in_rounds: u64 = s.rounds.iter().map(|r| r.pages).sum();
    let bytes = s.pages.sent.checked_sub(in_rounds)? as f64 * PAGE;
    let us = s.downtime_phases.as_ref()?.final_pages_us;
    (bytes > 0.0 && us > 0).then(|| FinalCopy {
        bytes_predicted: prediction.final_bytes,
        bytes_measured: bytes,
        round_rate: inputs.bandwidth,
        final_rate: bytes / (us as f64 / 1e6),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            memory_bytes: 1024.0 * 1024.0 * 1024.0,
            state_bytes: 32.0 * 1024.0,
            dirty_rate: 0.0,
            bandwidth: 1e9,
            rtt: 100e-6,
            max_downtime: 0.3,
            prepaging_window: 16.0,
            vcpus: 1,
            setup: 0.0,
            working_set: 0.0,
            capped: false,
        }
    }

    #[test]
    fn postcopy_follows_the_seed_formulas() {
        let i = inputs();
        let p = predict("postcopy", &i);
        // T_down = V_min / R + T_sw, T_sw = 2 RTT + 0.5 ms + 0.5 ms per vCPU
        let t_sw = 2.0 * 100e-6 + 1e-3;
        assert!((p.downtime_ms - (32768.0 / 1e9 + t_sw) * 1e3).abs() < 1e-9);
        // X = (V_mem - V_min) / (P (1 + Y)), V_mem here includes the state
        let x = i.memory_bytes / (4096.0 * 17.0);
        assert!((p.faults - x).abs() < 1e-6);
        // T_res = X T_fault + (V_mem - V_min) / R
        let t_res = x * (100e-6 + 4096.0 * 17.0 / 1e9) + i.memory_bytes / 1e9;
        assert!((p.resume_ms - t_res * 1e3).abs() < 1e-6);
        // The total counts the phase with active push: every page once, at R.
        let push = i.memory_bytes / 1e9 * 1e3;
        assert!((p.resume_push_only_ms - push).abs() < 1e-6);
        assert!((p.total_ms - p.downtime_ms - push).abs() < 1e-9);
        // A bigger pre-paging window means fewer faults and a shorter resumption.
        let wider = predict(
            "postcopy",
            &Inputs {
                prepaging_window: 64.0,
                ..i
            },
        );
        assert!(wider.faults < p.faults && wider.resume_ms < p.resume_ms);
    }

    #[test]
    fn inputs_out_of_the_models_range_are_refused_and_no_window_makes_nan() {
        assert_eq!(inputs().validate(), Ok(()));
        let huge = Inputs {
            prepaging_window: 1e308,
            ..inputs()
        };
        assert_eq!(huge.validate(), Err(InvalidInput::PrepagingWindow(1e308)));
        // Predicted anyway, it is the widest window the engine has.
        let p = predict("postcopy", &huge);
        assert!(p.resume_ms.is_finite() && p.total_ms.is_finite(), "{p:?}");
        let widest = Inputs {
            prepaging_window: MAX_PREPAGING_WINDOW as f64,
            ..inputs()
        };
        assert_eq!(p, predict("postcopy", &widest));
        assert_eq!(widest.validate(), Ok(()));
        let negative = Inputs {
            max_downtime: -0.3,
            ..inputs()
        };
        assert_eq!(
            negative.validate(),
            Err(InvalidInput::Negative("max_downtime"))
        );
        let zero = Inputs {
            max_downtime: 0.0,
            ..inputs()
        };
        assert_eq!(zero.validate(), Err(InvalidInput::MaxDowntime));
        let nan = Inputs {
            bandwidth: f64::NAN,
            ..inputs()
        };
        assert_eq!(nan.validate(), Err(InvalidInput::NotFinite("bandwidth")));
        assert_eq!(
            InvalidInput::PrepagingWindow(1e308).to_string(),
            format!("prepaging_window must be at most 255 pages, got {}", 1e308)
        );
    }

    #[test]
    fn check_compares_with_the_measurement() {
        let mut s = crate::stats::MigrationStats {
            mode: "precopy".into(),
            outcome: "completed".into(),
            total_ms: 200.0,
            downtime_ms: 2.0,
            ..Default::default()
        };
        s.rounds.push(crate::stats::RoundStats {
            pages: 25600,
            bytes: 100 << 20,
            ms: 100.0,
            dirty_rate: 0.0,
        });
        let c = check(&s, 1, false).unwrap();
        assert!((c.inputs.bandwidth - (100 << 20) as f64 * 10.0).abs() < 1.0);
        assert_eq!(c.prediction.rounds, 1);
        assert_eq!(
            c.inputs.max_downtime, 0.3,
            "the default, where none is recorded"
        );
        s.max_downtime_ms = 50.0;
        let c = check(&s, 1, false).unwrap();
        assert_eq!(
            c.inputs.max_downtime, 0.05,
            "the limit the migration ran under"
        );
        // One round of 100 ms plus the state: total predicted ~100 ms against 200 measured.
        assert!((c.total_error_pct + 50.0).abs() < 2.0, "{c:?}");
        assert_eq!(c.final_copy, None, "no page after the round");
        // The set-up measured counts in the total: 100 ms of it, ~200 ms predicted.
        s.setup_ms = 100.0;
        let c = check(&s, 1, false).unwrap();
        assert!(c.total_error_pct.abs() < 2.0, "{c:?}");
        // A stop-and-copy of 2,560 pages (10 MiB) in 5 ms: 2 GiB/s, twice
        // the round's rate, beside the bytes the model expected (none: the
        // guest dirtied nothing).
        s.pages.sent = 25600 + 2560;
        s.downtime_phases = Some(crate::stats::DowntimePhases {
            final_pages_us: 5000,
            ..Default::default()
        });
        let f = check(&s, 1, false).unwrap().final_copy.unwrap();
        assert_eq!(
            (f.bytes_predicted, f.bytes_measured),
            (0.0, (10 << 20) as f64)
        );
        assert!((f.final_rate / f.round_rate - 2.0).abs() < 0.01, "{f:?}");
        // Post-copy has no stop-and-copy of its own.
        s.mode = "postcopy".into();
        s.pages.expected = 25600;
        assert_eq!(check(&s, 1, false).unwrap().final_copy, None);
        s.outcome = "failed".into();
        assert!(check(&s, 1, false).is_none());
    }

    /// Auto is checked against the ending it took, not the one the model
    /// would pick from what it measured: a guest dirtying at a fifth of the
    /// link, which the model would cut to post-copy, that converged in
    /// pre-copy is predicted in pre-copy, its stop-and-copy included; a
    /// calm one that went on in post-copy, in post-copy.
    #[test]
    fn check_predicts_the_ending_auto_took() {
        // Round 0: 100 MiB in 100 ms, dirtying 200 MB/s; then a stop-and-copy
        // of 32 MiB.
        let mut s = crate::stats::MigrationStats {
            mode: "auto".into(),
            outcome: "completed".into(),
            total_ms: 150.0,
            downtime_ms: 35.0,
            ..Default::default()
        };
        s.rounds.push(crate::stats::RoundStats {
            pages: 25600,
            bytes: 100 << 20,
            ms: 100.0,
            dirty_rate: 200e6,
        });
        s.pages.sent = 25600 + 8192;
        s.downtime_phases = Some(crate::stats::DowntimePhases {
            final_pages_us: 30000,
            ..Default::default()
        });
        let c = check(&s, 1, false).unwrap();
        assert_eq!(auto_mode(&c.inputs), "hybrid", "{c:?}");
        let p = c.prediction;
        assert!(p.final_bytes > 0.0 && p.resume_push_only_ms == 0.0, "{p:?}");
        let mut pre = predict("precopy", &c.inputs);
        pre.total_ms += auto_step(&c.inputs) * 1e3;
        assert_eq!(p, pre);
        assert!(c.final_copy.is_some(), "{c:?}");
        // The same rounds, then a switch: post-copy.
        s.pages.expected = 8192;
        let c = check(&s, 1, false).unwrap();
        assert_eq!(c.prediction, predict("auto", &c.inputs));
        assert!(c.prediction.resume_push_only_ms > 0.0, "{c:?}");
        assert_eq!(c.prediction.final_bytes, 0.0);
        // A calm guest, which the model would finish in pre-copy, that
        // switched: post-copy after round 0.
        s.rounds[0].dirty_rate = 1e6;
        let c = check(&s, 1, false).unwrap();
        assert_eq!(auto_mode(&c.inputs), "precopy", "{c:?}");
        let (hot, t0, cold_left, _) = hybrid_round0(&c.inputs, auto_step(&c.inputs));
        let want = ending_in_postcopy(&c.inputs, (t0, 1, true), hot + cold_left);
        assert_eq!(c.prediction, want);
    }

    /// Hybrid's round 0 counts from when the dirty log began, during the
    /// set-up: the check takes its bandwidth over the sending time alone,
    /// and counts the watch within the set-up once.
    #[test]
    fn check_counts_hybrids_watch_during_the_set_up_once() {
        // The log began 2 ms into a 100 ms set-up (the destination built its
        // VM); the first step watched until 1 ms after it (99 ms in all),
        // then 100 MiB went in 100 ms; a 2 ms pause.
        let mut s = crate::stats::MigrationStats {
            mode: "hybrid".into(),
            outcome: "completed".into(),
            setup_ms: 100.0,
            total_ms: 203.0,
            downtime_ms: 2.0,
            sampling: Some(crate::stats::SamplingStats {
                ms: 150.0,
                hot_pages: 0,
                ended: "all sent".into(),
                watched_ms: 99.0,
                watched_in_setup_ms: 98.0,
            }),
            ..Default::default()
        };
        s.rounds.push(crate::stats::RoundStats {
            pages: 25600,
            bytes: 100 << 20,
            ms: 199.0,
            dirty_rate: 0.0,
        });
        let c = check(&s, 1, false).unwrap();
        let rate = (100 << 20) as f64 / 0.1;
        assert!((c.inputs.bandwidth / rate - 1.0).abs() < 1e-9, "{c:?}");
        // 101 ms until round 0 sent, less the model's own 50 ms step.
        assert!((c.inputs.setup - 0.051).abs() < 1e-9, "{c:?}");
        assert!(c.total_error_pct.abs() < 2.0, "{c:?}");
        // The same where the destination prepared at once: the step watched
        // after the set-up, 48 of its 50 ms; 2 ms of set-up then.
        let sampling = s.sampling.as_mut().unwrap();
        (sampling.watched_ms, sampling.watched_in_setup_ms) = (50.0, 2.0);
        (s.setup_ms, s.total_ms, s.rounds[0].ms) = (2.0, 152.0, 150.0);
        let c = check(&s, 1, false).unwrap();
        assert!((c.inputs.bandwidth / rate - 1.0).abs() < 1e-9, "{c:?}");
        assert!(c.inputs.setup.abs() < 1e-9, "{c:?}");
        assert!(c.total_error_pct.abs() < 2.0, "{c:?}");
        // Statistics without the watch recorded are read as before.
        s.sampling = None;
        let c = check(&s, 1, false).unwrap();
        assert!((c.inputs.bandwidth / (rate / 1.5) - 1.0).abs() < 1e-9);
        assert_eq!(c.inputs.setup, 0.002);
    }

    #[test]
    fn the_set_up_counts_in_every_total_and_pre_copy_says_what_it_leaves() {
        let hot = Inputs {
            dirty_rate: 0.5e9,
            ..inputs()
        };
        let slow = Inputs { setup: 0.02, ..hot };
        for mode in ["precopy", "postcopy", "hybrid"] {
            let (a, b) = (predict(mode, &hot), predict(mode, &slow));
            assert!((b.total_ms - a.total_ms - 20.0).abs() < 1e-9, "{mode}");
            assert_eq!(a.downtime_ms, b.downtime_ms, "{mode}");
        }
        // The pause is what the rounds leave, at the bandwidth, plus the switch.
        let p = predict("precopy", &hot);
        assert!(p.final_bytes > 0.0);
        let t_sw = (hot.state_bytes / hot.bandwidth + 2.0 * hot.rtt) * 1e3 + 1.0;
        assert!((p.downtime_ms - (p.final_bytes / hot.bandwidth * 1e3 + t_sw)).abs() < 1e-9);
    }

    #[test]
    fn precopy_of_an_idle_guest_is_one_round() {
        let p = predict("precopy", &inputs());
        assert_eq!(p.rounds, 1);
        assert!(p.converges);
        assert!((p.total_ms - (1073.741824 + p.downtime_ms)).abs() < 1e-6);
    }

    #[test]
    fn every_switch_over_pays_its_round_trips_and_its_vcpus() {
        // An idle guest's pause is not bytes: ~1.5 ms for one vCPU on a LAN.
        let one = predict("precopy", &inputs());
        assert!((1.0..2.0).contains(&one.downtime_ms), "{one:?}");
        let four = Inputs {
            vcpus: 4,
            state_bytes: state_bytes(4),
            ..inputs()
        };
        for mode in ["precopy", "postcopy", "hybrid"] {
            let (a, b) = (predict(mode, &inputs()), predict(mode, &four));
            let more = b.downtime_ms - a.downtime_ms;
            assert!((1.5..1.6).contains(&more), "{mode}: {a:?} {b:?}");
        }
        let far = Inputs {
            rtt: 0.05,
            ..inputs()
        };
        let p = predict("postcopy", &far);
        assert!(p.downtime_ms > 100.0, "two round trips of 50 ms: {p:?}");
    }

    #[test]
    fn precopy_that_cannot_converge_hits_the_round_limit() {
        let i = Inputs {
            dirty_rate: 2e9,
            ..inputs()
        };
        let p = predict("precopy", &i);
        assert!(!p.converges);
        assert_eq!(p.rounds, MAX_ROUNDS);
        // Hybrid's sampling lasts its round 0 and finds every page written in
        // it: one round, then post-copy moves them, with a short pause.
        let h = predict("hybrid", &i);
        assert_eq!(h.rounds, 1);
        assert!(h.downtime_ms < p.downtime_ms);
    }

    #[test]
    fn hybrid_leaves_what_its_sampling_saw_written_to_post_copy() {
        // 2 GB/s of dirtying, 1 GB/s link: t0 = (s + V/R) / (1 + D/R), and
        // the pages written in it (D t0) go once, by post-copy.
        let i = Inputs {
            dirty_rate: 2e9,
            ..inputs()
        };
        let (hot, t0, left, _) = hybrid_round0(&i, HYBRID_STEP);
        let want = (0.05 + i.memory_bytes / 1e9) / 3.0;
        assert!((t0 - want).abs() < 1e-9, "{t0} {want}");
        assert!((hot - 2e9 * t0).abs() < 1.0 && left == 0.0);
        let h = predict("hybrid", &i);
        let push = hot / 1e9 * 1e3;
        assert!((h.resume_push_only_ms - push).abs() < 1e-6, "{h:?}");
        assert!((h.total_ms - (t0 * 1e3 + h.downtime_ms + push)).abs() < 1e-6);
        // A working set it goes round sooner is all that is left to post-copy,
        // and round 0 sends the rest of memory.
        let small = Inputs {
            working_set: 64e6,
            ..i
        };
        let (hot, t0, left, cold) = hybrid_round0(&small, HYBRID_STEP);
        assert_eq!((hot, left, cold), (64e6, 0.0, 0.0));
        assert!((t0 - (0.05 + (i.memory_bytes - 64e6) / 1e9)).abs() < 1e-9);
        // 8 GB at 1 GB/s outlasts the sampling's time limit: what the guest
        // wrote in its 1 s is hot, and what it writes after goes in rounds.
        let big = Inputs {
            memory_bytes: 8e9,
            dirty_rate: 0.1e9,
            ..inputs()
        };
        let (hot, t0, left, _) = hybrid_round0(&big, HYBRID_STEP);
        assert!((hot - 0.1e9).abs() < 1.0, "{hot}");
        assert!((t0 - (0.05 + 7.9)).abs() < 1e-9, "{t0}");
        assert!((left - 0.1e9 * (t0 - 1.0)).abs() < 1.0, "{left}");
        let h = predict("hybrid", &big);
        assert_eq!(h.rounds, 2, "{h:?}");
    }

    #[test]
    fn a_working_set_bounds_what_each_round_leaves() {
        // 2 GB/s over all of memory never converges (above); over 64 MB, the
        // first round leaves those 64 MB, 64 ms at 1 GB/s: a short pause.
        let i = Inputs {
            dirty_rate: 2e9,
            working_set: 64e6,
            ..inputs()
        };
        let p = predict("precopy", &i);
        assert!(p.converges && p.rounds == 1, "{p:?}");
        assert_eq!(p.final_bytes, 64e6);
        assert_eq!(auto_mode(&i), "precopy");
    }

    #[test]
    fn auto_picks_precopy_where_it_converges_hybrid_elsewhere_and_cuts_a_growing_set() {
        let calm = inputs();
        assert_eq!(auto_mode(&calm), "precopy");
        // Pre-copy, after its first step (10 ms of watching, no cap).
        let (auto, pre) = (predict("auto", &calm), predict("precopy", &calm));
        assert_eq!(auto.downtime_ms, pre.downtime_ms);
        assert!(
            (auto.total_ms - pre.total_ms - 10.0).abs() < 1e-9,
            "{auto:?}"
        );
        assert_eq!(round0_step("auto", &calm), 0.010);
        // Dirtying at under a tenth of the link, but a pause too short for
        // even the switch-over: no cut, hybrid.
        let tight = Inputs {
            dirty_rate: 0.05e9,
            max_downtime: 0.001,
            ..inputs()
        };
        assert_eq!(auto_mode(&tight), "hybrid");
        // Round 0, then post-copy: no further round chases the rest.
        let p = predict("auto", &tight);
        assert_eq!(p.rounds, 1);
        let h = predict("hybrid", &tight);
        assert!(h.rounds > 1 && p.total_ms < h.total_ms, "{p:?} {h:?}");
        // A set growing at twice the link's rate: cut after 10 ms of
        // watching and a tenth of memory sent; post-copy moves the rest.
        let hot = Inputs {
            dirty_rate: 2e9,
            ..inputs()
        };
        assert_eq!(auto_mode(&hot), "hybrid");
        let p = predict("auto", &hot);
        let v = hot.memory_bytes;
        let t0 = 0.010 + 0.1 * v / 1e9;
        assert_eq!(p.rounds, 1);
        let want = (t0 + p.downtime_ms / 1e3 + 0.9 * v / 1e9) * 1e3;
        assert!((p.total_ms - want).abs() < 1e-6, "{p:?}");
        assert!(p.total_ms < predict("hybrid", &hot).total_ms);
        // Under a cap the first step watches 50 ms.
        let capped = predict(
            "auto",
            &Inputs {
                capped: true,
                ..hot
            },
        );
        assert!(
            (capped.total_ms - p.total_ms - 40.0).abs() < 1e-6,
            "{capped:?}"
        );
        // A working set it has gone round by the cut: no cut.
        let round = Inputs {
            working_set: 64e6,
            ..hot
        };
        assert_eq!(auto_mode(&round), "precopy");
        // 50 MB/s swept over 8 GB on 1 GB/s: plain pre-copy would converge
        // in its second round, but what round 0 leaves (~430 ms) is over
        // the pause, so the engine goes on in post-copy after it.
        let sweep = Inputs {
            memory_bytes: 8e9,
            dirty_rate: 0.05e9,
            ..inputs()
        };
        let p = predict("precopy", &sweep);
        assert!(p.converges && p.rounds > 1, "{p:?}");
        assert_eq!(auto_mode(&sweep), "hybrid");
    }

    /// The engine's auto watches 10 ms first on a link with no cap, 50 ms
    /// under one, whether it cuts or ends in hybrid (`sample_hot`).
    #[test]
    fn auto_ending_in_hybrid_watches_what_the_engine_watches() {
        // Under a tenth of the link (no cut), a pause too short for the
        // switch-over: round 0, then post-copy.
        let tight = Inputs {
            dirty_rate: 0.05e9,
            max_downtime: 0.001,
            ..inputs()
        };
        assert!(auto_cut(&tight).is_none());
        assert_eq!(auto_mode(&tight), "hybrid");
        let capped = Inputs {
            capped: true,
            ..tight
        };
        assert_eq!(round0_step("auto", &tight), 0.010);
        assert_eq!(round0_step("auto", &capped), 0.050);
        assert_eq!(round0_step("hybrid", &tight), 0.050);
        // Round 0 takes the 10 ms step: t0 = s + (V - H) / R, H the 1 s of
        // sampling's writes; post-copy moves H and what came after it.
        let p = predict("auto", &tight);
        let v = tight.memory_bytes;
        let (hot, t0) = (0.05e9, 0.010 + (v - 0.05e9) / 1e9);
        let left = hot + 0.05e9 * (t0 - 1.0);
        let want = (t0 + left / 1e9) * 1e3 + p.downtime_ms;
        assert!((p.total_ms - want).abs() < 1e-6, "{p:?} against {want}");
        // Under a cap 40 ms more of watching, and 2 MB more written after.
        let q = predict("auto", &capped);
        let more = q.total_ms - p.total_ms;
        assert!((more - 42.0).abs() < 1e-6, "{more}");
    }

    #[test]
    fn the_round_trips_count_against_max_downtime() {
        // 100 MB/s of dirtying on a 1 GB/s link: a short last round, whose
        // pause fits 300 ms on a LAN but not with 150 ms of round trip.
        let lan = Inputs {
            dirty_rate: 0.1e9,
            ..inputs()
        };
        let p = predict("precopy", &lan);
        assert!(p.converges && p.downtime_ms < 300.0, "{p:?}");
        let far = Inputs { rtt: 0.15, ..lan };
        let q = predict("precopy", &far);
        assert!(!q.converges && q.downtime_ms > 300.0, "{q:?}");
        assert_eq!(auto_mode(&far), "hybrid");
    }

    #[test]
    fn precopy_converges_when_dirtying_is_slower_than_the_link() {
        let i = Inputs {
            dirty_rate: 0.5e9,
            ..inputs()
        };
        let p = predict("precopy", &i);
        assert!(p.converges);
        assert!(p.rounds > 1 && p.rounds < 5, "{p:?}");
        assert!(p.downtime_ms <= 300.0 + 1.0);
    }
}
