//! Fuzzes XBZRLE delta decoding and the encode/decode round trip (fuzz/src/lib.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| migd_fuzz::xbzrle_decode(data));
