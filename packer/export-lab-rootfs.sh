#!/usr/bin/env bash
# The lab source's last step (anthill.pkr.hcl): powers the throwaway lab host off and exports its
# root filesystem as an image the lab boots (`tests/e2e/lab/metal.sh up --rootfs DIR/rootfs.tar`):
# DIR/rootfs.tar and DIR/manifest.json (what was built, from what, its SHA-256). What the lab
# itself put on the host (its name, address and SSH key) stays out of it; the host's own identity
# was stripped already (strip-host-identity.sh), and the export checks that it is gone.
# Usage: export-lab-rootfs.sh HOST OUT_DIR ANTHILL_VERSION
set -euo pipefail
host="${1:?host name}" out="${2:?output folder}" version="${3:?anthill version}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
lab="${ANTHILL_METALLAB:-/tmp/anthill-metallab}"
root="$lab/hosts.d/$host/root"
say() { echo "export-lab-rootfs.sh: $*" >&2; }

[[ -d "$root/etc" ]] || { say "no lab host $host (looked for $root)"; exit 1; }
bash "$repo/tests/e2e/lab/metal.sh" poweroff "$host"
mkdir -p "$out"
tar -C "$root" --numeric-owner --one-file-system -cf "$out/rootfs.tar.partial" \
    --exclude=./etc/hostname --exclude=./etc/hosts --exclude=./etc/systemd/network/10-lab.network \
    --exclude=./root/.ssh/authorized_keys .
# Nothing of the host's identity is in it.
listing="$(tar -tf "$out/rootfs.tar.partial")"
for leaked in '^./etc/ssh/ssh_host_' '^./var/lib/anthill/.' '^./etc/anthill/node.yaml$' '^./etc/anthill/consul-token$' \
    '^./var/log/journal/.' '^./root/.ssh/authorized_keys$' '^./var/lib/systemd/random-seed$'; do
    if grep -q "$leaked" <<<"$listing"; then
        say "the image still holds $(grep "$leaked" <<<"$listing" | head -1): not exported"
        rm -f "$out/rootfs.tar.partial"
        exit 1
    fi
done
if ! grep -qx './etc/machine-id' <<<"$listing" || [[ -n "$(tar -xOf "$out/rootfs.tar.partial" ./etc/machine-id)" ]]; then
    say "the image's /etc/machine-id is missing or not empty (systemd makes one at first boot only from an empty one): not exported"
    rm -f "$out/rootfs.tar.partial"
    exit 1
fi
mv "$out/rootfs.tar.partial" "$out/rootfs.tar"
sha="$(sha256sum "$out/rootfs.tar" | cut -d' ' -f1)"
bytes="$(stat -c %s "$out/rootfs.tar")"
python3 - "$out/manifest.json" "$version" "$sha" "$bytes" <<'PY'
import json, sys, datetime
path, version, sha, size = sys.argv[1:]
json.dump({
    "image": "anthill",
    "anthill_version": version,
    "format": "rootfs.tar (a root filesystem; tests/e2e/lab/metal.sh up --rootfs)",
    "file": "rootfs.tar",
    "sha256": sha,
    "bytes": int(size),
    "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "base": "Debian 12 (bookworm), the bare-metal lab's root filesystem",
    "stripped": ["/etc/machine-id (empty)", "SSH host keys", "/var/lib/anthill", "/etc/anthill/node.yaml and consul-token", "the journal", "systemd's random seed", "authorized SSH keys", "the lab's name and address"],
}, open(path, "w"), indent=2)
PY
say "$out/rootfs.tar ($((bytes / 1024 / 1024)) MiB, sha256 $sha) and $out/manifest.json"
