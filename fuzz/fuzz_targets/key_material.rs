//! `cargo fuzz run key_material`: [`anthill_node::fuzzing::key_material`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::key_material(data));
