//! `cargo fuzz run spec_file`: [`anthill_node::fuzzing::spec_file`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::spec_file(data));
