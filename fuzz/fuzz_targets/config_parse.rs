//! Fuzzes the daemon's config file parser (`migd::config_file::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| migd_fuzz::config_parse(data));
