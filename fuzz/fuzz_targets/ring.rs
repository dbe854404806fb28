//! The shared-memory ring reader against a hostile peer (garbage bytes, forged indices,
//! scribbles over the control blocks): never a panic, a fault or unbounded memory, and a
//! corrupt ring is reported as such. See `checks.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks.rs");

fuzz_target!(|data: &[u8]| check_ring(data));
