//! `cargo fuzz run coordination_entry`: [`anthill_node::fuzzing::coordination_entry`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::coordination_entry(data));
