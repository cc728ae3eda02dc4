#!/usr/bin/env bash
# The bare-metal lab: Debian hosts on this machine, each a real systemd booted by
# `systemd-nspawn --boot` on its own copy-on-write overlay of one root filesystem, with its own
# hostname, address, filesystem, journal and sshd, all on a bridge inside a network namespace
# that the lab makes (its addresses exist only there). Terraform, Ansible and Packer reach the
# hosts from inside that namespace (`run`). docs/bare-metal.md says what the lab proves.
#
#   metal.sh up [--hosts N] [--rootfs DIR]   N hosts (default 3, at most 16) from the cached
#                                            Debian (tools/install.sh metallab) or from DIR, a
#                                            root filesystem's folder or a rootfs.tar (an image
#                                            that tests/e2e/lab/image.sh made); prints the
#                                            lab's folder
#   metal.sh down                            powers every host off, removes the namespace, the
#                                            mounts and the folder: nothing is left
#   metal.sh hosts [--json]                  each host's name, address and state
#   metal.sh ssh HOST [COMMAND...]           a shell or a command on HOST (name or number), as root
#   metal.sh run COMMAND...                  a command inside the lab's network (ansible, terraform)
#   metal.sh poweroff HOST                   a clean poweroff of HOST's systemd
#   metal.sh kill HOST                       every process of HOST killed at once (a power cut)
#   metal.sh start HOST                      boots HOST again, its filesystem as it was left
#
# The lab's folder is /tmp/anthill-metallab (ANTHILL_METALLAB): the SSH key the hosts trust
# (id_ed25519), `hosts` (name and address per line), and per host its overlay and console log.
# Host i is host-NN at 10.77.0.(10+i); this machine is 10.77.0.1 inside the namespace.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
lab="${ANTHILL_METALLAB:-/tmp/anthill-metallab}"
NS=anthill-metal
BRIDGE=anthill-br0
NET=10.77.0
MAX_HOSTS=16
# The hosts' cgroups (this machine has no systemd to make them): under each hierarchy that
# nspawn and the hosts' systemd use.
CGROUPS=(/sys/fs/cgroup/systemd/anthill-metal /sys/fs/cgroup/unified/anthill-metal)

say() { echo "tests/e2e/lab/metal.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# `host-NN` for a name or a number.
host_name() {
    case "$1" in
        host-[0-9][0-9]) echo "$1" ;;
        [0-9] | [0-9][0-9]) printf 'host-%02d\n' "$((10#$1))" ;;
        *) die "no host '$1': a name (host-01) or a number (1)" ;;
    esac
}

host_address() { echo "$NET.$((10 + 10#${1#host-}))"; }

# The pid of HOST's nspawn if it runs (a pid file is followed only to an nspawn of that host).
host_pid() {
    local file="$lab/hosts.d/$1/pid" pid
    [[ -f "$file" ]] || return 1
    pid="$(cat "$file")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "systemd-nspawn .*--machine=$1 " || return 1
    echo "$pid"
}

in_lab() { nsenter --net="/run/netns/$NS" "$@"; }

ssh_to() {
    local address="$1"
    shift
    in_lab ssh -i "$lab/id_ed25519" -o UserKnownHostsFile="$lab/known_hosts" -o StrictHostKeyChecking=accept-new \
        -o LogLevel=ERROR -o ConnectTimeout=3 -o BatchMode=yes "root@$address" "$@"
}

# Boots HOST on its overlay (mounted by `up`), in cgroups of its own, in the background.
boot() {
    local name="$1" dir="$lab/hosts.d/$1"
    (
        for hierarchy in "${CGROUPS[@]}"; do
            mkdir -p "$hierarchy/$name"
            echo "$BASHPID" >"$hierarchy/$name/cgroup.procs"
        done
        exec nsenter --net="/run/netns/$NS" systemd-nspawn --boot --keep-unit --register=no --console=read-only \
            --machine="$name" --directory="$dir/root" --network-bridge="$BRIDGE" --resolv-conf=off --timezone=off
    ) </dev/null >>"$dir/console.log" 2>&1 &
    echo "$!" >"$dir/pid"
}

# Whether HOST's sshd answers, waiting up to `$2` seconds.
wait_ssh() {
    local deadline=$((SECONDS + $2))
    until ssh_to "$(host_address "$1")" true 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        host_pid "$1" >/dev/null || return 1
        sleep 0.5
    done
}

# Every pid in HOST's cgroups.
host_processes() {
    local hierarchy
    for hierarchy in "${CGROUPS[@]}"; do
        # A cgroup the host's systemd removes meanwhile is no error.
        [[ -d "$hierarchy/$1" ]] && { find "$hierarchy/$1" -name cgroup.procs -exec cat {} + 2>/dev/null || true; }
    done | sort -u
}

# Kills every process of HOST and waits until none is left.
kill_host() {
    [[ "$1" == host-[0-9][0-9] ]] || die "kill_host: '$1' is no host"
    local pids tries=0
    while pids="$(host_processes "$1")" && [[ -n "$pids" ]]; do
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        ((++tries < 100)) || die "$1 still has processes: $pids"
        sleep 0.1
    done
}

# A clean poweroff (SIGTERM to nspawn) within `$2` seconds, else a kill.
poweroff_host() {
    local pid deadline=$((SECONDS + $2))
    if pid="$(host_pid "$1")"; then
        kill -TERM "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    fi
    kill_host "$1"
    rm -f "$lab/hosts.d/$1/pid"
}

# Removes HOST's cgroups, deepest first.
remove_cgroups() {
    local hierarchy
    for hierarchy in "${CGROUPS[@]}"; do
        [[ -d "$hierarchy/$1" ]] && find "$hierarchy/$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
}

up() {
    local hosts=3 rootfs=""
    while (($#)); do
        case "$1" in
            --hosts) hosts="${2:?--hosts needs a number}"; shift 2 ;;
            --rootfs) rootfs="${2:?--rootfs needs a folder or a .tar}"; shift 2 ;;
            *) die "up: unknown argument '$1' (--hosts N, --rootfs DIR)" ;;
        esac
    done
    [[ "$hosts" =~ ^[0-9]+$ ]] && ((hosts >= 1 && hosts <= MAX_HOSTS)) || die "--hosts must be 1 to $MAX_HOSTS, got '$hosts'"
    [[ ! -e "/run/netns/$NS" && ! -e "$lab/hosts" ]] || die "the lab is up already ($lab): 'metal.sh down' first"
    # Whatever this `up` made goes again if it fails.
    trap 'status=$?; if ((status != 0)); then say "up failed: taking down what it made"; down; fi' EXIT
    bash "$repo/tests/e2e/tools/install.sh" metallab
    if [[ -z "$rootfs" ]]; then rootfs="$(realpath "$repo/.tools/metal-rootfs")"; fi
    if [[ -f "$rootfs" && "$rootfs" == *.tar ]]; then
        # An image: unpacked once into the lab's folder, every host's shared lower layer.
        mkdir -p "$lab/image"
        tar -C "$lab/image" --numeric-owner -xf "$rootfs" || die "cannot unpack the image $rootfs"
        rootfs="$lab/image"
    fi
    [[ -x "$rootfs/lib/systemd/systemd" || -x "$rootfs/usr/lib/systemd/systemd" ]] ||
        die "$rootfs is not a root filesystem with systemd"
    mkdir -p "$lab/hosts.d"
    ssh-keygen -q -t ed25519 -N '' -C anthill-metallab -f "$lab/id_ed25519" <<<y >/dev/null
    : >"$lab/known_hosts"
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" link add "$BRIDGE" type bridge
    ip -n "$NS" addr add "$NET.1/24" dev "$BRIDGE"
    ip -n "$NS" link set "$BRIDGE" up
    local i name dir started=$SECONDS
    for ((i = 1; i <= hosts; i++)); do
        name="$(host_name "$i")"
        dir="$lab/hosts.d/$name"
        mkdir -p "$dir/upper" "$dir/work" "$dir/root"
        mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$dir/upper,workdir=$dir/work" "$dir/root"
        echo "$name" >"$dir/root/etc/hostname"
        printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$name" >"$dir/root/etc/hosts"
        mkdir -p "$dir/root/etc/systemd/network"
        printf '[Match]\nName=host0\n\n[Network]\nAddress=%s/24\n' "$(host_address "$name")" \
            >"$dir/root/etc/systemd/network/10-lab.network"
        install -d -m 700 "$dir/root/root/.ssh"
        install -m 600 "$lab/id_ed25519.pub" "$dir/root/root/.ssh/authorized_keys"
        boot "$name"
        echo "$name $(host_address "$name")" >>"$lab/hosts"
    done
    for ((i = 1; i <= hosts; i++)); do
        name="$(host_name "$i")"
        wait_ssh "$name" 60 || die "$name did not answer on SSH within 60 s; its console: $lab/hosts.d/$name/console.log"
    done
    say "$hosts hosts up in $((SECONDS - started)) s ($NET.11 to $(host_address "$(host_name "$hosts")"))"
    trap - EXIT
    echo "$lab"
}

down() {
    local name dir
    # Ansible's SSH masters of this lab (see `run`).
    pkill -f "ssh: $lab/ansible-cp/" 2>/dev/null || true
    if [[ -d "$lab/hosts.d" ]]; then
        for dir in "$lab"/hosts.d/*/; do
            name="$(basename "$dir")"
            poweroff_host "$name" 10
        done
        for dir in "$lab"/hosts.d/*/; do
            name="$(basename "$dir")"
            if mountpoint -q "$dir/root"; then umount "$dir/root" || umount -l "$dir/root"; fi
            remove_cgroups "$name"
        done
    fi
    local hierarchy
    for hierarchy in "${CGROUPS[@]}"; do [[ -d "$hierarchy" ]] && rmdir "$hierarchy" 2>/dev/null || true; done
    [[ -e "/run/netns/$NS" ]] && ip netns del "$NS"
    rm -rf "$lab"
}

hosts() {
    [[ -f "$lab/hosts" ]] || die "the lab is not up ($lab)"
    local name address state first=1
    [[ "${1:-}" == --json ]] && printf '['
    while read -r name address; do
        state=off
        host_pid "$name" >/dev/null && state=running
        if [[ "${1:-}" == --json ]]; then
            ((first)) || printf ','
            first=0
            printf '{"name":"%s","address":"%s","state":"%s"}' "$name" "$address" "$state"
        else
            printf '%s %s %s\n' "$name" "$address" "$state"
        fi
    done <"$lab/hosts"
    [[ "${1:-}" == --json ]] && printf ']\n'
    return 0
}

known_host() {
    local name
    name="$(host_name "$1")"
    grep -q "^$name " "$lab/hosts" 2>/dev/null || die "no $name in the lab ($lab/hosts)"
    echo "$name"
}

command="${1:-}"
shift || true
case "$command" in
    up) up "$@" ;;
    down) down ;;
    hosts) hosts "$@" ;;
    ssh)
        name="$(known_host "${1:?ssh needs a host}")"
        shift
        ssh_to "$(host_address "$name")" "$@"
        ;;
    run)
        [[ -e "/run/netns/$NS" ]] || die "the lab is not up"
        # Ansible's SSH connection masters (ControlPersist) in the lab's folder: `down` ends
        # them. Left in ~/.ansible they outlive the lab, and the next lab's hosts (the same
        # addresses) would be reached through a master whose host is gone: a hang.
        mkdir -p "$lab/ansible-cp"
        ANSIBLE_SSH_CONTROL_PATH_DIR="${ANSIBLE_SSH_CONTROL_PATH_DIR:-$lab/ansible-cp}" in_lab "$@"
        ;;
    # The name in a variable first: a failed substitution inside an argument would not stop the
    # script, and an empty name would mean every host.
    poweroff)
        name="$(known_host "${1:?poweroff needs a host}")"
        poweroff_host "$name" 30
        ;;
    kill)
        name="$(known_host "${1:?kill needs a host}")"
        kill_host "$name"
        rm -f "$lab/hosts.d/$name/pid"
        ;;
    start)
        name="$(known_host "${1:?start needs a host}")"
        host_pid "$name" >/dev/null && die "$name runs already"
        kill_host "$name"
        boot "$name"
        wait_ssh "$name" 60 || die "$name did not answer on SSH within 60 s; its console: $lab/hosts.d/$name/console.log"
        ;;
    *) die "usage: metal.sh up [--hosts N] [--rootfs DIR] | down | hosts [--json] | ssh HOST [COMMAND...] | run COMMAND... | poweroff HOST | kill HOST | start HOST" ;;
esac
