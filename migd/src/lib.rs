//! Code shared by the `migd` and `migctl` binaries, the tests and the fuzz targets:
//! operator sizes, the client of the daemon's control socket, the config file
//! parser, the logging set-up, JSON files written whole and other processes.

pub mod client;
pub mod config_file;
pub mod json_file;
pub mod logging;
pub mod process;
pub mod size;
pub mod tls_args;
