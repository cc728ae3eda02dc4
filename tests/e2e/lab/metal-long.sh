#!/usr/bin/env bash
# The bare-metal lab's long form: the test of tests/e2e/tests/metallab.rs on twelve hosts (the
# first apply on eleven, the twelfth added), release build, bounded in time. Usage:
#   tests/e2e/lab/metal-long.sh [--hosts N] [--coordination embedded|consul]
#     N: the hosts of the first apply (default 11); coordination: the nodes' own Raft group
#     (default) or Consul servers on three of the hosts
# Prints the test's report (each step's write unavailability, the workload's counts); exits 0
# only when it passed. docs/bare-metal.md records its results. With ANTHILL_METALLAB_HOLD_MINUTES=N
# a failed run keeps the lab up N minutes (at most 60) for a look at its hosts before the teardown.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
hosts=11
coordination=embedded
while (($#)); do
    case "$1" in
        --hosts) hosts="${2:?--hosts needs a number}"; shift 2 ;;
        --coordination) coordination="${2:?--coordination needs embedded or consul}"; shift 2 ;;
        *) echo "metal-long.sh: unknown argument '$1' (--hosts N, --coordination embedded|consul)" >&2; exit 2 ;;
    esac
done
case "$coordination" in
    embedded) test=terraform_apply_on_bare_metal_hosts ;;
    consul) test=the_same_with_consul_servers ;;
    *) echo "metal-long.sh: --coordination must be embedded or consul, not '$coordination'" >&2; exit 2 ;;
esac
[[ "$hosts" =~ ^[0-9]+$ ]] && ((hosts >= 3 && hosts <= 11)) || { echo "metal-long.sh: --hosts must be 3 to 11" >&2; exit 2; }
cd "$repo"
echo "metal-long.sh: building (release), then the lab's test ($coordination) with $hosts hosts and one added (at most 90 minutes)" >&2
cargo build --release -q -p anthill-node --bin anthill
# A failed run's hold (ANTHILL_METALLAB_HOLD_MINUTES) comes on top of the 90 minutes; should the
# timeout still kill the test before its teardown, the lab is taken down here.
hold=$((${ANTHILL_METALLAB_HOLD_MINUTES:-0} > 60 ? 60 : ${ANTHILL_METALLAB_HOLD_MINUTES:-0}))
trap 'bash "$here/metal.sh" down >/dev/null 2>&1 || true' EXIT
ANTHILL_METALLAB_HOSTS="$hosts" timeout --kill-after=60 $((5400 + hold * 60)) \
    cargo test --release -q -p anthill-e2e --test metallab -- --include-ignored --nocapture --test-threads=1 "$test"
