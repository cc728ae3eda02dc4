#!/usr/bin/env bash
# Installs the tools the end-to-end suites need and this machine lacks; idempotent, quiet when
# everything is there. Usage: tests/e2e/tools/install.sh [TOOL...]
#
#   iproute2   `ip` and `tc` (Debian's iproute2): the chaos suite's namespace and its cuts
#   consul     Consul server, built from its Go modules (pinned below)
#   all        every tool above
#
# No TOOL: iproute2 (what `cargo test` needs without the real-components suites).
#
# Built tools go to a cache kept across clones (ANTHILL_TOOLS_CACHE, default
# ~/.cache/anthill/tools/<name>-<version>/) and are linked into the repository's git-ignored
# `.tools/bin/`; a build that is already in the cache is not built again. A failed build fails
# this script with the build's own output; nothing is skipped. Debian only (this project's
# machines and CI). Runs of this script wait for each other (a lock in the cache).
set -euo pipefail

CONSUL_VERSION=1.20.2
# The versions of Consul's own sub-modules that its go.mod names at that version.
CONSUL_API=v1.31.0
CONSUL_ENVOYEXTENSIONS=v0.7.7
CONSUL_PROTO_PUBLIC=v0.6.2
CONSUL_SDK=v0.16.1
CONSUL_TROUBLESHOOT=v0.7.4

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
bin="$repo/.tools/bin"
cache="${ANTHILL_TOOLS_CACHE:-$HOME/.cache/anthill/tools}"
mkdir -p "$bin" "$cache"

say() { echo "tests/e2e/tools/install.sh: $*" >&2; }

# Go builds here: the module proxy only (no `direct`: a missing module fails at once) and no
# checksum database (some of these modules' look-ups fail on this network).
go_env() { env GOPROXY=https://proxy.golang.org GOSUMDB=off GOFLAGS=-mod=mod GOTOOLCHAIN=local "$@"; }

install_iproute2() {
    if command -v ip >/dev/null && command -v tc >/dev/null; then return; fi
    say "installing iproute2"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
}

# Links `$1` (a path in the cache) into .tools/bin under the name `$2`.
link() { ln -sfn "$1" "$bin/$2"; }

install_consul() {
    local dest="$cache/consul-$CONSUL_VERSION"
    if [[ ! -x "$dest/consul" ]]; then
        command -v go >/dev/null || { say "Go is needed to build Consul"; exit 1; }
        say "building Consul $CONSUL_VERSION from its Go modules (about 5 minutes on 2 cores)"
        local work
        work="$(mktemp -d)"
        # Consul's go.mod has `replace` lines, so `go install` refuses it: a wrapper module
        # requires it and its sub-modules at the versions it names, with its `exclude` lines.
        cat >"$work/go.mod" <<EOF
module anthill.local/tools/consul

go 1.22

require (
	github.com/hashicorp/consul v$CONSUL_VERSION
	github.com/hashicorp/consul/api $CONSUL_API
	github.com/hashicorp/consul/envoyextensions $CONSUL_ENVOYEXTENSIONS
	github.com/hashicorp/consul/proto-public $CONSUL_PROTO_PUBLIC
	github.com/hashicorp/consul/sdk $CONSUL_SDK
	github.com/hashicorp/consul/troubleshoot $CONSUL_TROUBLESHOOT
)

exclude (
	github.com/hashicorp/go-msgpack v1.1.5
	github.com/hashicorp/go-msgpack v1.1.6
)
EOF
        printf 'package tools\n\nimport _ "github.com/hashicorp/consul"\n' >"$work/tools.go"
        mkdir -p "$dest.partial"
        (cd "$work" && go_env go build -trimpath -o "$dest.partial/consul" github.com/hashicorp/consul) || {
            say "building Consul failed (output above)"
            exit 1
        }
        rm -rf "$dest" && mv "$dest.partial" "$dest"
        rm -rf "$work"
    fi
    link "$dest/consul" consul
}

tools=("$@")
((${#tools[@]})) || tools=(iproute2)
for tool in "${tools[@]}"; do
    [[ "$tool" == all ]] && { tools=(iproute2 consul); break; }
done

exec 9>"$cache/.lock"
flock 9
for tool in "${tools[@]}"; do
    case "$tool" in
        iproute2) install_iproute2 ;;
        consul) install_consul ;;
        *) say "unknown tool '$tool' (known: iproute2 consul all)"; exit 2 ;;
    esac
done
