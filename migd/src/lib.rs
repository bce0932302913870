//! Code shared by the `migd` and `migctl` binaries and the tests: operator sizes
//! and the client of the daemon's control socket.

pub mod client;
pub mod size;
