//! The service-name parser (and the method-name check) on arbitrary input: never panics, and
//! accepts exactly what the written rules allow. See `checks.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks.rs");

fuzz_target!(|data: &[u8]| check_name(data));
