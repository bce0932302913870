//! The VM library's error type.

use std::path::PathBuf;

/// Errors of the VM library. Each names its cause in one line, in its message
/// (so none has a `source()`: `{:#}` would print the cause twice).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm could not be opened or used.
    #[error("cannot use /dev/kvm: {0}")]
    KvmUnavailable(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {cause}")]
    Kvm {
        /// The operation that failed.
        op: &'static str,
        /// The errno KVM returned.
        cause: kvm_ioctls::Error,
    },
    /// The requested memory size is not usable.
    #[error("invalid memory size {size} bytes: {reason}")]
    MemorySize {
        /// The requested size.
        size: u64,
        /// Why it is refused.
        reason: String,
    },
    /// The requested memory is more than the host can give.
    #[error("memory of {requested_mib} MiB exceeds what this host can give ({available_mib} MiB available)")]
    MemoryTooLarge {
        /// What was asked for.
        requested_mib: u64,
        /// What the host has available.
        available_mib: u64,
    },
    /// The vCPU count is out of range.
    #[error("invalid vCPU count {0}: must be between 1 and {max}", max = crate::MAX_VCPUS)]
    VcpuCount(usize),
    /// The kernel image could not be read.
    #[error("cannot read kernel {path}: {cause}")]
    KernelRead {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The kernel image is not something we can boot.
    #[error("kernel {path} is not bootable: {reason}")]
    KernelFormat {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The initramfs could not be read or placed.
    #[error("initramfs {path}: {reason}")]
    Initramfs {
        /// The path given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The kernel command line is not acceptable.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Guest memory could not be created, mapped or accessed.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// A serial console or other device failed.
    #[error("device {device}: {reason}")]
    Device {
        /// The device.
        device: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Captured state does not fit this VM or host.
    #[error("VM state: {0}")]
    State(String),
    /// A snapshot file is unusable.
    #[error("snapshot {path}: {reason}")]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A vCPU thread failed.
    #[error("vCPU {id}: {reason}")]
    Vcpu {
        /// The vCPU index.
        id: usize,
        /// What went wrong.
        reason: String,
    },
    /// A dirty-ring size this host or this library does not take.
    #[error("dirty ring: {0}")]
    DirtyRing(String),
    /// Other I/O.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        cause: std::io::Error,
    },
}

/// Result with the library's error.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps a KVM ioctl error with the name of the operation.
pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |cause| Error::Kvm { op, cause }
}

/// Wraps an I/O error with context.
pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |cause| Error::Io { context, cause }
}
