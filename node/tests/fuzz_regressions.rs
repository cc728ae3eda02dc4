//! Every seed of the fuzz targets (`fuzz/seeds/`) and every input that ever crashed one
//! (`fuzz/regressions/`, kept there by fuzz/run.sh) goes through its target again on stable
//! Rust: a decoder that once panicked on an input must not again.

use std::path::Path;

use anthill_node::fuzzing::TARGETS;

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn every_seed_and_every_input_that_once_crashed_a_decoder_goes_through_it_without_a_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in TARGETS {
        let seeds = inputs(&fuzz.join("seeds").join(name));
        assert!(!seeds.is_empty(), "target {name} has no seed under fuzz/seeds/{name} (cargo run -p anthill-node --example fuzz_seeds)");
        for input in seeds.iter().chain(&inputs(&fuzz.join("regressions").join(name))) {
            let bytes = std::fs::read(input).unwrap();
            if let Err(panic) = std::panic::catch_unwind(|| target(&bytes)) {
                panic!("{name} panicked on {}: {panic:?}", input.display());
            }
        }
    }
}
