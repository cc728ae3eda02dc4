//! `cargo fuzz run audit_batch`: [`anthill_node::fuzzing::audit_batch`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::audit_batch(data));
