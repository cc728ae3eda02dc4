//! `cargo fuzz run record`: [`anthill_node::fuzzing::record`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::record(data));
