//! `cargo fuzz run coordination_snapshot`: [`anthill_node::fuzzing::coordination_snapshot`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::coordination_snapshot(data));
