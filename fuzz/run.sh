#!/usr/bin/env bash
# Fuzzes the node's decoders with cargo fuzz (libFuzzer) for a bounded time: each target for
# --seconds (default 60), all targets unless some are named. Installs cargo-fuzz into
# .tools/cargo-fuzz (cached) and needs a nightly toolchain (`rustup toolchain install nightly`
# when missing). An input that crashes a target is copied to fuzz/regressions/<target>/, where
# `cargo test -p anthill-node --test fuzz_regressions` runs it from then on; the run then fails.
#
#   fuzz/run.sh [--seconds N] [--json] [target...]
#
# Targets: record replica_message append_request config spec_file sealed_event partition_image
# undo_journal raft_message coordination_entry coordination_snapshot tables audit_batch requests
# ledger_event consul_reply storage_key key_material (node/src/fuzzing.rs). Progress goes to stderr; --json prints a report on stdout.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
seconds=60 json=false targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --json) json=true; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        -*) echo "fuzz/run.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
case "$seconds" in ''|*[!0-9]*|0) echo "fuzz/run.sh: --seconds takes a whole number of at least 1, got $seconds" >&2; exit 2 ;; esac
all=(record replica_message append_request config spec_file sealed_event partition_image undo_journal raft_message coordination_entry coordination_snapshot tables audit_batch requests ledger_event consul_reply storage_key key_material)
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    [[ " ${all[*]} " == *" $t "* ]] || { echo "fuzz/run.sh: unknown target $t (one of: ${all[*]})" >&2; exit 2; }
done
say() { echo "fuzz/run.sh: $*" >&2; }

if [ "$(rustup toolchain list | grep -c '^nightly' || true)" -eq 0 ]; then
    say "installing the nightly toolchain (cargo fuzz needs it)"
    rustup toolchain install nightly --profile minimal >&2
fi
fuzz_bin="$repo/.tools/cargo-fuzz/bin"
if [ ! -x "$fuzz_bin/cargo-fuzz" ]; then
    say "building cargo-fuzz into .tools/cargo-fuzz (once)"
    cargo install cargo-fuzz --locked --root "$repo/.tools/cargo-fuzz" >&2
fi
export PATH="$fuzz_bin:$PATH"
cd "$repo"
cargo run -q -p anthill-node --example fuzz_seeds -- fuzz/seeds
say "building the targets (nightly, AddressSanitizer)"
(cd fuzz && cargo +nightly fuzz build -O >&2)

results=() failed=0
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    # Only this run's findings count.
    rm -f "fuzz/artifacts/$t"/crash-* "fuzz/artifacts/$t"/oom-* "fuzz/artifacts/$t"/timeout-* "fuzz/artifacts/$t"/leak-*
    say "$t: fuzzing for ${seconds}s"
    log="fuzz/artifacts/$t/run.log"
    set +e
    (cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1) > "$log" 2>&1
    status=$?
    set -e
    runs=$( (grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" || true) | grep -o '[0-9]*$' | tail -1 || true)
    crash=$(ls -t "fuzz/artifacts/$t"/crash-* "fuzz/artifacts/$t"/oom-* "fuzz/artifacts/$t"/timeout-* "fuzz/artifacts/$t"/leak-* 2>/dev/null | head -1 || true)
    if [ "$status" -ne 0 ] || [ -n "$crash" ]; then
        failed=1
        mkdir -p "fuzz/regressions/$t"
        if [ -n "$crash" ]; then
            cp "$crash" "fuzz/regressions/$t/"
            say "$t: FAILED (exit $status); $(basename "$crash") kept in fuzz/regressions/$t/ — see $log"
        else
            say "$t: FAILED (exit $status) without an input to keep (a build failure?) — see $log"
        fi
        results+=("{\"target\":\"$t\",\"seconds\":$seconds,\"runs\":${runs:-0},\"passed\":false,\"input\":\"${crash}\"}")
    else
        say "$t: ${runs:-0} inputs, no crash"
        results+=("{\"target\":\"$t\",\"seconds\":$seconds,\"runs\":${runs:-0},\"passed\":true}")
    fi
done
if $json; then
    (IFS=,; echo "{\"passed\":$([ $failed -eq 0 ] && echo true || echo false),\"targets\":[${results[*]}]}")
fi
exit $failed
