//! `cargo fuzz run undo_journal`: [`anthill_node::fuzzing::undo_journal`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::undo_journal(data));
