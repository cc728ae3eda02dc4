//! `cargo fuzz run append_request`: [`anthill_node::fuzzing::append_request`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::append_request(data));
