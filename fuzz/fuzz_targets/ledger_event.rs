//! `cargo fuzz run ledger_event`: [`anthill_node::fuzzing::ledger_event`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::ledger_event(data));
