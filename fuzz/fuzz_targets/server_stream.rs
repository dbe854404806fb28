//! The blocking server's connection state machine on arbitrary bytes from a real client socket:
//! it answers or closes within a bound and keeps serving others. See `checks.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks.rs");

fuzz_target!(|data: &[u8]| check_server_stream(data));
