//! `cargo fuzz run partition_image`: [`anthill_node::fuzzing::partition_image`] on whatever libFuzzer makes up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anthill_node::fuzzing::partition_image(data));
