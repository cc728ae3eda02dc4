//! `cargo fuzz run tables`: [`anthill_node::fuzzing::tables`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::tables(data));
