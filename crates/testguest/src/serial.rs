//! Serial console (COM1, output only) shared by all CPUs.
//!
//! A line is formatted into a stack buffer first and then written under a
//! spinlock, so lines from different CPUs never interleave and the lock is
//! held only for the port writes.

use crate::cpu::{inb, outb, rdtsc};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LINE_MAX: usize = 400;

static LOCK: AtomicBool = AtomicBool::new(false);

/// A line being formatted (truncated at `LINE_MAX` bytes).
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Line {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// The text so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(LINE_MAX - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn put(b: u8) {
    // Wait (boundedly) for THR empty; our VMM always reports ready.
    for _ in 0..100_000 {
        if inb(LSR) & 0x20 != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

fn lock(max_spins: u64) -> bool {
    let mut n = 0u64;
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        n += 1;
        if n >= max_spins {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

fn write_raw(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            put(b'\r');
        }
        put(b);
    }
}

/// Write one line (a newline is appended).
pub fn write_line(line: &Line) {
    lock(u64::MAX);
    write_raw(line.as_bytes());
    write_raw(b"\n");
    unlock();
}

/// Write a line even if another CPU died holding the lock (fatal path).
pub fn write_line_force(line: &Line) {
    let held = lock(50_000_000);
    write_raw(line.as_bytes());
    write_raw(b"\n");
    if held {
        unlock();
    }
}

/// Format and print one line.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut line = $crate::serial::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        $crate::serial::write_line(&line);
    }};
}

/// Report a `WORKLOAD CORRUPT ...` line (rate limited, see [`corrupt_line`]).
#[macro_export]
macro_rules! corrupt {
    ($($arg:tt)*) => {{
        let mut line = $crate::serial::Line::new();
        let _ = core::fmt::Write::write_str(&mut line, "WORKLOAD CORRUPT ");
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        $crate::serial::corrupt_line(line);
    }};
}

/// Total `WORKLOAD CORRUPT` events detected (printed or suppressed).
pub static CORRUPT_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Throttle state, only touched under LOCK.
static WINDOW_START: AtomicU64 = AtomicU64::new(0);
static WINDOW_LINES: AtomicU64 = AtomicU64::new(0);
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// At most this many CORRUPT lines per second (all CPUs together).
const CORRUPT_LINES_PER_SEC: u64 = 4;

/// Print a CORRUPT line unless more than `CORRUPT_LINES_PER_SEC` were printed
/// in the current second; suppressed lines are counted and the count is
/// appended to the next printed one as `suppressed=<n>`.
pub fn corrupt_line(mut line: Line) {
    CORRUPT_EVENTS.fetch_add(1, Ordering::Relaxed);
    let now = rdtsc();
    let second = crate::clock::tsc_hz();
    lock(u64::MAX);
    let start = WINDOW_START.load(Ordering::Relaxed);
    if now.wrapping_sub(start) >= second {
        WINDOW_START.store(now, Ordering::Relaxed);
        WINDOW_LINES.store(0, Ordering::Relaxed);
    }
    if WINDOW_LINES.load(Ordering::Relaxed) < CORRUPT_LINES_PER_SEC {
        WINDOW_LINES.fetch_add(1, Ordering::Relaxed);
        let s = SUPPRESSED.swap(0, Ordering::Relaxed);
        if s != 0 {
            let _ = write!(line, " suppressed={s}");
        }
        write_raw(line.as_bytes());
        write_raw(b"\n");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
    unlock();
}
