//! `cargo fuzz run raft_message`: [`anthill_node::fuzzing::raft_message`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::raft_message(data));
