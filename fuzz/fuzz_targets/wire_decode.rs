//! Fuzzes the migration stream decoder: any bytes must decode or fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cur = data;
    // A stream of frames, as the destination reads it.
    for _ in 0..64 {
        if wire::read_frame(&mut cur).is_err() {
            break;
        }
    }
    let _ = wire::decode_frame(data);
});
