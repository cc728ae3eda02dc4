//! `cargo fuzz run replica_message`: [`anthill_node::fuzzing::replica_message`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::replica_message(data));
