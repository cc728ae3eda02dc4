#!/usr/bin/env bash
# Builds the Anthill image for real with its recipe's lab source (packer/anthill.pkr.hcl,
# `null.lab`): a throwaway host of the bare-metal lab (`metal.sh up --hosts 1`), Packer's null
# builder over SSH to it, the anthill role installing the node (packer/image.yml), the host's
# identity stripped, the host powered off and its root filesystem exported as OUT/rootfs.tar
# with OUT/manifest.json (packer/export-lab-rootfs.sh); the lab is taken down again. The lab then
# boots hosts from it: `metal.sh up --rootfs OUT/rootfs.tar`. docs/images.md.
#   tests/e2e/lab/image.sh OUT [--binary PATH] [--version V]
#     PATH: the `anthill` baked in (default: target/debug/anthill, built first); V: its version
#     (default 0.1.0)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
say() { echo "tests/e2e/lab/image.sh: $*" >&2; }
die() { say "$*"; exit 1; }

out="" binary="" version=0.1.0
while (($#)); do
    case "$1" in
        --binary) binary="${2:?--binary needs a file}"; shift 2 ;;
        --version) version="${2:?--version needs a version}"; shift 2 ;;
        -*) die "unknown argument '$1' (OUT [--binary PATH] [--version V])" ;;
        *) [[ -z "$out" ]] || die "one output folder, not '$out' and '$1'"; out="$1"; shift ;;
    esac
done
[[ -n "$out" ]] || die "usage: image.sh OUT [--binary PATH] [--version V]"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [[ -z "$binary" ]]; then
    (cd "$repo" && cargo build -q -p anthill-node --bin anthill)
    binary="$repo/target/debug/anthill"
fi
[[ -x "$binary" ]] || die "$binary is not an executable"
binary="$(realpath "$binary")"

bash "$repo/tests/e2e/tools/install.sh" metallab ansible packer
[[ ! -e /run/netns/anthill-metal ]] || die "the bare-metal lab is up: the image needs a lab of its own ('metal.sh down' first)"
trap 'bash "$here/metal.sh" down >/dev/null 2>&1 || true' EXIT
bash "$here/metal.sh" up --hosts 1 >/dev/null
started=$SECONDS
config="$(mktemp -d)"
trap 'rm -rf "$config"; bash "$here/metal.sh" down >/dev/null 2>&1 || true' EXIT
say "packer build (null.lab) of anthill $version into $out"
# Packer inside the lab's network, offline: no checkpoint, the plugins the installer built.
env CHECKPOINT_DISABLE=1 PACKER_PLUGIN_PATH="$repo/.tools/packer-plugins" PACKER_CONFIG_DIR="$config" \
    bash "$here/metal.sh" run "$repo/.tools/bin/packer" build -color=false -only=anthill.null.lab \
    -var "anthill_binary=$binary" -var "anthill_version=$version" \
    -var "ansible_playbook=$repo/.tools/bin/ansible-playbook" -var "output_dir=$out" "$repo/packer" >"$out/packer.log" 2>&1 ||
    { tail -40 "$out/packer.log" >&2; die "packer build failed (its log: $out/packer.log)"; }
[[ -f "$out/rootfs.tar" && -f "$out/manifest.json" ]] || die "packer made no image (its log: $out/packer.log)"
say "built in $((SECONDS - started)) s: $out/rootfs.tar, $out/manifest.json"
