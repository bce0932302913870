//! migd's migration engines.
//!
//! - [`handshake`]: the opening exchange (Hello, Accept/Refuse), used by the
//!   source VM process and the destination daemon.
//! - [`precopy`]: the source side of a pre-copy migration: dirty-log rounds,
//!   stop condition, stop-and-copy, commit.
//! - [`incoming`]: the destination side: pages into a fresh memfd, state,
//!   restore, resume, confirm.
//! - [`postcopy`]: post-copy and hybrid migration, both sides: userfaultfd on
//!   the destination, demand paging on an urgent channel, background push,
//!   pre-paging.
//! - [`model`]: the cost model that predicts downtime and total time.
//! - [`probe`]: measuring RTT and bandwidth to a destination for the model.
//! - [`lazy`]: lazy restore from a snapshot file (userfaultfd, working set first).
//! - [`uffd`]: the userfaultfd wrapper shared by post-copy and lazy restore.
//! - [`faults`]: test-only hooks that hold a migration at a phase (fault matrix).
//! - [`compress`]: the `compress` option (zstd of page batches on slow links).
//! - [`bitmap`]: page bitmaps (the dirty log's layout): test, count, visit, runs.
//! - [`stats`]: statistics named after QEMU's `query-migrate` where they overlap.

pub mod background_save;
pub mod bitmap;
pub mod compress;
pub mod deadline;
mod doorman;
pub mod faults;
pub mod handshake;
pub mod incoming;
pub mod lazy;
pub mod memview;
pub mod model;
pub mod multifd;
pub mod postcopy;
pub mod precopy;
pub mod probe;
pub mod stats;
pub mod throttle;
pub mod uffd;
pub mod xbzrle;
mod zerocopy;

/// Errors of a migration. Each says its cause in its message, so none has a
/// `source()`: a chain printed with `{:#}` would name the cause twice.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The protocol stream failed or carried something invalid.
    #[error("protocol: {0}")]
    Wire(wire::WireError),
    /// The peer refused the migration.
    #[error("destination refused: {0}")]
    Refused(String),
    /// The peer cancelled.
    #[error("peer cancelled: {0}")]
    PeerCancelled(String),
    /// The operator cancelled.
    #[error("cancelled by the operator")]
    Cancelled,
    /// The VM library failed.
    #[error("VM: {0}")]
    Vm(vmm::Error),
    /// Connecting or socket setup failed.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        cause: std::io::Error,
    },
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Sends blocked this many seconds got out less than 100 KiB/s: the peer
    /// stopped reading (or reads at a trickle).
    #[error("the destination stopped reading: under 100 KiB/s got out in {0} s blocked sending")]
    Stalled(u64),
    /// The destination lacks a capability the operator asked for.
    #[error("the destination does not support {0}")]
    Unsupported(String),
    /// The operator's parameters are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Pre-copy stopped without converging and `strict_downtime` forbids a
    /// longer pause than `max_downtime`.
    #[error("pre-copy did not converge: {0}")]
    NotConverging(String),
    /// Setting up the (TLS) link failed.
    #[error(transparent)]
    Link(#[from] link::LinkError),
    /// A bug: the migration's code panicked (the message is the panic's).
    #[error("internal error (panic: {0})")]
    Panicked(String),
}

/// What a caught panic says (its `&str` or `String` payload).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Runs `f`; a panic in it is a failure like any other, [`Error::Panicked`]
/// (a bug, named as one), which the caller handles by the same rules.
pub(crate) fn caught<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(Error::Panicked(panic_message(&*p))))
}

impl From<wire::WireError> for Error {
    fn from(e: wire::WireError) -> Self {
        Error::Wire(e)
    }
}

impl From<vmm::Error> for Error {
    fn from(e: vmm::Error) -> Self {
        Error::Vm(e)
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Whether `e` is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` expired:
/// EAGAIN, which Rust calls `WouldBlock`, or `TimedOut`).
pub(crate) fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |cause| Error::Io { context, cause }
}
