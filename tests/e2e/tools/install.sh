#!/usr/bin/env bash
# Installs what the end-to-end suites need and this machine lacks; idempotent, quiet when all is
# there. Today: `ip` and `tc` (Debian's iproute2) for the chaos suite's own network namespace and
# its partitions. Debian only (this project's machines and CI).
set -euo pipefail
missing=()
command -v ip >/dev/null && command -v tc >/dev/null || missing+=(iproute2)
if ((${#missing[@]})); then
    echo "tests/e2e/tools/install.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
