//! `cargo fuzz run consul_reply`: [`anthill_node::fuzzing::consul_reply`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::consul_reply(data));
