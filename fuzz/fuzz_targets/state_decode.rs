//! Fuzzes the VM state decoder used by snapshots, handover and migration.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| migd_fuzz::state_decode(data));
