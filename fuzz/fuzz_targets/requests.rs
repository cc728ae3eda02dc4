//! `cargo fuzz run requests`: [`anthill_node::fuzzing::requests`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::requests(data));
