//! The frame decoder on arbitrary bytes with an arbitrary limit: never panics, and every frame
//! it accepts re-encodes to exactly the bytes it came from. See `checks.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks.rs");

fuzz_target!(|data: &[u8]| check_decode(data));
