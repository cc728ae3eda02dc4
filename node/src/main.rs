//! The `anthill` binary: see [`anthill_node::cli`].

fn main() {
    if let Err(error) = anthill_node::cli::run() {
        eprintln!("anthill: {error:#}");
        std::process::exit(1);
    }
}
