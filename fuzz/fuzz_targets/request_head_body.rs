#![no_main]
//! Fuzz target `request_head_body`: see `tests/fuzz_support/mod.rs` for what is checked.

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

fuzz_target!(|data: &[u8]| {
    fuzz_support::check_request(data);
});
