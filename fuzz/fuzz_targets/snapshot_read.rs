//! Fuzzes the snapshot file readers (`vmm::snapshot::read` and
//! `LazySnapshot::open`): the input is written to a file on tmpfs and read back.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let path = SCRATCH.get_or_init(|| migd_fuzz::scratch_file("snapshot"));
    migd_fuzz::snapshot_read(data, path);
});
