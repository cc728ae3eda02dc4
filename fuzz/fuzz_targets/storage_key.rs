//! `cargo fuzz run storage_key`: [`anthill_node::fuzzing::storage_key`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::storage_key(data));
