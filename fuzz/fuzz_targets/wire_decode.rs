//! Fuzzes the migration stream decoder: any bytes must decode or fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| migd_fuzz::wire_decode(data));
