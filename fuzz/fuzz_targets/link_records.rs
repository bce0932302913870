//! Fuzzes the record layer of TLS migration links (fuzz/src/lib.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| migd_fuzz::link_records(data));
