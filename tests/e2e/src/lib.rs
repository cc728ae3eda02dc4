//! The end-to-end suites' harness: the `anthill` binary the suites run (built by cargo if
//! need be) and the tools they need (installed by `tools/install.sh` if missing). The suites
//! themselves are in `tests/`; each starts real processes and checks what they report.

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod consul;

/// The repository's root.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `tools/install.sh`, which installs what the suites need and the machine lacks (nothing
/// when all is there); panics with its output when it fails.
pub fn ensure_tools() {
    install(&[]);
}

/// Runs `tools/install.sh` for `tools` (its default set when empty); panics with its output when
/// it fails.
fn install(tools: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/install.sh");
    let out = Command::new("bash").arg(&script).args(tools).output().expect("bash runs");
    assert!(out.status.success(), "{} {} failed:\n{}", script.display(), tools.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The project-built tool `name` (`consul`, ...), installed by `tools/install.sh` into the
/// repository's `.tools/bin` if it is not there yet (a build of several minutes the first time).
pub fn tool(name: &str) -> PathBuf {
    install(&[name]);
    let path = repository().join(".tools/bin").join(name);
    assert!(path.exists(), "tools/install.sh {name} left no {}", path.display());
    path
}

/// The `anthill` binary of this workspace, in the profile these tests were built in: built by
/// `cargo build` (a no-op when it is up to date; a test of another package cannot name the
/// binary through `CARGO_BIN_EXE_…`), its path taken from cargo's own report.
pub fn anthill() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let mut command = Command::new(cargo);
    command.current_dir(repository()).args(["build", "-q", "-p", "anthill-node", "--bin", "anthill", "--message-format=json"]);
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    let out = command.output().expect("cargo runs");
    assert!(out.status.success(), "cargo build of anthill failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "anthill")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reports the anthill executable")
}
