//! The end-to-end suites' harness: the `anthill` binary the suites run (built by cargo if
//! need be) and the tools they need (installed by `tools/install.sh` if missing). The suites
//! themselves are in `tests/`; each starts real processes and checks what they report.

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod kube;

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

/// The program `name` (`consul`, `kubectl`, ...), installed by `tools/install.sh` into the
/// repository's `.tools/bin` if it is not there yet (a build of several minutes the first time).
pub fn tool(name: &str) -> PathBuf {
    // The installer's name for the tool that brings the program.
    let tool = match name {
        "kube-apiserver" | "kubectl" | "etcd" => "kubernetes",
        "ansible-playbook" | "ansible-inventory" | "ansible-galaxy" | "ansible-lint" => "ansible",
        "tofu" => "terraform",
        other => other,
    };
    install(&[tool]);
    let path = repository().join(".tools/bin").join(name);
    assert!(path.exists(), "tools/install.sh {name} left no {}", path.display());
    path
}

/// Runs test `test` of this test program again, alone, in a network namespace of its own and
/// returns `false` once it passed there (it panics if it failed); in that run it returns `true`,
/// with the namespace's loopback up. There the test may cut its loopback with
/// [`anthill_node::chaos::net::Cuts`]; no packet it sends can leave the namespace, and the cuts
/// go with it. (Processes it starts must still be stopped by it: `LocalConsul` and the nodes
/// die with the thread that started them.) `tools` (and `ip`, `tc`) are installed first, here:
/// the namespace has no way out to the package registries. A test goes on only where this
/// returns `true`:
///
/// ```ignore
/// if !anthill_e2e::alone_in_own_network_namespace("the_tests_function_name", &["consul"]) { return; }
/// ```
pub fn alone_in_own_network_namespace(test: &str, tools: &[&str]) -> bool {
    use anthill_node::chaos::net;
    if net::in_own_namespace() {
        net::loopback_up().expect("the namespace's loopback comes up");
        return true;
    }
    ensure_tools();
    for name in tools {
        tool(name);
    }
    let exe = std::env::current_exe().expect("this test program's path");
    let mut command = Command::new(exe);
    command.args([test, "--exact", "--nocapture", "--test-threads", "1"]);
    net::in_own_namespace_command(&mut command);
    let out = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {test} in a network namespace of its own (root is needed): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(out.status.success(), "{test} failed in its own network namespace");
    // A misspelt name runs nothing and passes: that must not count.
    assert!(stdout.contains("test result: ok. 1 passed"), "{test} did not run in its own network namespace (is the name right?)");
    false
}

/// A finished command's stdout, or `what` and its stderr when it failed.
pub fn output(what: &str, out: std::process::Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The `anthill` binary of this workspace, in the profile these tests were built in ([`binary`]).
pub fn anthill() -> PathBuf {
    binary("anthill-node", "anthill")
}

/// The `anthill-operator` binary of this workspace ([`binary`]).
pub fn operator() -> PathBuf {
    binary("anthill-operator", "anthill-operator")
}

/// Binary `bin` of workspace package `package`, in the profile these tests were built in: built
/// by `cargo build` (a no-op when it is up to date; a test of another package cannot name the
/// binary through `CARGO_BIN_EXE_…`), its path taken from cargo's own report.
fn binary(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let mut command = Command::new(cargo);
    command.current_dir(repository()).args(["build", "-q", "-p", package, "--bin", bin, "--message-format=json"]);
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    let out = command.output().expect("cargo runs");
    assert!(out.status.success(), "cargo build of {bin} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo reports the {bin} executable"))
}
