#!/usr/bin/env bash
# Builds the lab's container images without a Docker engine, as OCI archives: `anthill` (the
# node), `anthill-operator`, and the pod sandboxes' `pause` image. Each image is a root
# filesystem made here (the binary, the shared libraries `ldd` names, a passwd entry for the
# unprivileged user), turned into an OCI layout by umoci and packed with tar.
#
# Usage: tests/e2e/lab/images.sh OUT_DIR VERSION [PROFILE]
#   OUT_DIR  where anthill.tar, anthill-operator.tar and pause.tar go
#   VERSION  the tag of anthill and anthill-operator (the chart's appVersion, e.g. 0.1.0)
#   PROFILE  cargo profile of the binaries: release (default) or debug
# Image names: anthill:VERSION, anthill-operator:VERSION, anthill.local/pause:1.
set -euo pipefail

out="${1:?usage: images.sh OUT_DIR VERSION [PROFILE]}"
version="${2:?usage: images.sh OUT_DIR VERSION [PROFILE]}"
profile="${3:-release}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
say() { echo "tests/e2e/lab/images.sh: $*" >&2; }

for program in umoci tar ldd busybox; do
    command -v "$program" >/dev/null || { say "$program is missing: run tests/e2e/tools/install.sh kubelab"; exit 1; }
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"

flag=()
[[ "$profile" == release ]] && flag=(--release)
say "building anthill and anthill-operator ($profile)"
(cd "$repo" && cargo build -q "${flag[@]}" -p anthill-node --bin anthill -p anthill-operator --bin anthill-operator)
target="$repo/target/$profile"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# A root filesystem in `$1` holding the programs `$2...` in /usr/local/bin with their libraries.
rootfs() {
    local root="$1"
    shift
    mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
    chmod 1777 "$root/tmp"
    local program lib
    for program in "$@"; do
        cp "$program" "$root/usr/local/bin/"
        # `ldd` lines: "name => /path (addr)" or "/path (addr)".
        for lib in $(ldd "$program" | grep -o '/[^ ]*' | sort -u); do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
    printf 'root:x:0:0:root:/:/sbin/nologin\nanthill:x:65532:65532:anthill:/:/sbin/nologin\n' >"$root/etc/passwd"
    printf 'root:x:0:\nanthill:x:65532:\n' >"$root/etc/group"
    printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
}

# Packs the root filesystem `$2` as image `$1` (name:tag) with entrypoint `$3...` into `$out`.
pack() {
    local ref="$1" root="$2" file
    shift 2
    file="$out/$(basename "${ref%%:*}").tar"
    local layout="$work/layout-$(basename "${ref%%:*}")"
    rm -rf "$layout"
    umoci init --layout "$layout"
    umoci new --image "$layout:image"
    umoci unpack --rootless --image "$layout:image" "$work/bundle"
    rm -rf "$work/bundle/rootfs"
    cp -a "$root" "$work/bundle/rootfs"
    umoci repack --image "$layout:image" "$work/bundle"
    rm -rf "$work/bundle"
    local config=(--config.user 65532:65532 --config.workingdir /)
    local arg
    for arg in "$@"; do config+=(--config.entrypoint "$arg"); done
    umoci config --image "$layout:image" --os linux --architecture amd64 "${config[@]}"
    # `ctr images import --index-name` names the image; the layout's own tag is `image`.
    tar -C "$layout" -cf "$file" .
    say "$ref -> $file"
}

rootfs "$work/anthill" "$target/anthill"
pack "anthill:$version" "$work/anthill" /usr/local/bin/anthill
rootfs "$work/operator" "$target/anthill-operator"
pack "anthill-operator:$version" "$work/operator" /usr/local/bin/anthill-operator
# The sandbox image: anything that sleeps; busybox's static build.
mkdir -p "$work/pause/bin"
cp "$(command -v busybox)" "$work/pause/bin/busybox"
pack "anthill.local/pause:1" "$work/pause" /bin/busybox sleep 2147483647
