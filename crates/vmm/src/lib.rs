//! The migd VM library: one KVM virtual machine per process, with guest RAM in
//! a memfd, vCPU threads, PVH/bzImage boot, a serial console, pause/resume,
//! complete state capture and restore, and snapshot files.

pub mod boot;
pub mod cpuid;
pub mod devices;
pub mod dirty_ring;
pub mod error;
pub mod memory;
pub mod snapshot;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vcpu;
pub mod vm;

pub use boot::BootSpec;
pub use error::{Error, Result};
pub use memory::GuestRam;
pub use state::VmState;
pub use vcpu::VmExit;
pub use vm::{PreparedVm, Vm, VmConfig, MAX_VCPUS};
