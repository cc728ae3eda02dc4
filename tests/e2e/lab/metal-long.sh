#!/usr/bin/env bash
# The bare-metal lab's long form: the test of tests/e2e/tests/metallab.rs on twelve hosts (the
# first apply on eleven, the twelfth added), release build, bounded in time. Usage:
#   tests/e2e/lab/metal-long.sh [--hosts N]     N: the hosts of the first apply (default 11)
# Prints the test's report (each step's write unavailability, the workload's counts); exits 0
# only when it passed. docs/bare-metal.md records its results.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
hosts=11
while (($#)); do
    case "$1" in
        --hosts) hosts="${2:?--hosts needs a number}"; shift 2 ;;
        *) echo "metal-long.sh: unknown argument '$1' (--hosts N)" >&2; exit 2 ;;
    esac
done
[[ "$hosts" =~ ^[0-9]+$ ]] && ((hosts >= 3 && hosts <= 11)) || { echo "metal-long.sh: --hosts must be 3 to 11" >&2; exit 2; }
cd "$repo"
echo "metal-long.sh: building (release), then the lab's test with $hosts hosts and one added (at most 60 minutes)" >&2
cargo build --release -q -p anthill-node --bin anthill
ANTHILL_METALLAB_HOSTS="$hosts" timeout --kill-after=60 3600 \
    cargo test --release -q -p anthill-e2e --test metallab -- --nocapture --test-threads=1
