//! `cargo fuzz run config`: [`anthill_node::fuzzing::config`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::config(data));
